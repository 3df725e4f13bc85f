// Users and ACLs for omrs-stream on a broker with the KRaft StandardAuthorizer.
// Run through deploy/kafka/kafka-security (which puts the Kafka jars on the class path).
//
//   apply  --prefix P --sites a,b --secrets DIR   create or update every stage's SCRAM-SHA-512
//                                                 user (password from DIR/<user>.password,
//                                                 made when missing) and its ACLs
//   rotate --user U --secrets DIR                 a new password for U, written to its file
//   list   [--prefix P]                           the ACLs of omrs-stream's users
// Common: --bootstrap HOST:PORT (default 127.0.0.1:9092: the local operator listener).
//
// Principals and what each may do (least privilege; P = topic prefix):
//   P omrs-agent-<site>   write omrs.cdc.<site>; read/write omrs.ingest.offsets.<site>;
//                         its transactional id omrs-ingest-<site>. Nothing else.
//   P omrs-transform      read omrs.cdc.* and omrs.identity.decisions; write omrs.hq.changes
//                         and omrs.dlq; read/write omrs.transform.state; its group and
//                         transactional id.
//   P omrs-hq-sink        read omrs.hq.changes; write omrs.dlq; its group.
//   P omrs-parquet-sink   the same, for the Parquet sink.
//   P omrs-operator       read every omrs topic and group (verify, dlq list); write the site
//                         topics and omrs.hq.changes (dlq replay), and omrs.identity.decisions
//                         (identity confirm): the only writer of decisions.

import java.nio.file.*;
import java.nio.file.attribute.PosixFilePermissions;
import java.security.SecureRandom;
import java.util.*;
import org.apache.kafka.clients.admin.*;
import org.apache.kafka.common.acl.*;
import org.apache.kafka.common.resource.*;

public class KafkaSecurity {
    static final ScramMechanism MECH = ScramMechanism.SCRAM_SHA_512;

    public static void main(String[] argv) throws Exception {
        if (argv.length == 0 || argv[0].equals("--help")) {
            usage();
            return;
        }
        String cmd = argv[0];
        Map<String, String> a = new HashMap<>();
        for (int i = 1; i < argv.length; i++) {
            if (!argv[i].startsWith("--") || i + 1 >= argv.length) die("unexpected argument `" + argv[i] + "`");
            a.put(argv[i].substring(2), argv[++i]);
        }
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, a.getOrDefault("bootstrap", "127.0.0.1:9092"));
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "20000");
        try (Admin admin = Admin.create(p)) {
            switch (cmd) {
                case "apply" -> apply(admin, a.getOrDefault("prefix", ""), need(a, "sites"), Paths.get(need(a, "secrets")));
                case "rotate" -> rotate(admin, need(a, "user"), Paths.get(need(a, "secrets")));
                case "list" -> list(admin, a.getOrDefault("prefix", ""));
                default -> die("unknown command `" + cmd + "` (apply, rotate or list)");
            }
        }
    }

    static void usage() {
        System.out.println("usage: kafka-security apply --prefix P --sites a,b --secrets DIR [--bootstrap H:P]\n"
            + "       kafka-security rotate --user U --secrets DIR [--bootstrap H:P]\n"
            + "       kafka-security list [--prefix P] [--bootstrap H:P]");
    }

    static String need(Map<String, String> a, String k) {
        String v = a.get(k);
        if (v == null || v.isEmpty()) die("--" + k + " is required");
        return v;
    }

    static void die(String m) {
        System.err.println("kafka-security: " + m);
        System.exit(2);
    }

    static AclBinding allow(String user, ResourceType type, String name, PatternType pattern, AclOperation op) {
        return new AclBinding(new ResourcePattern(type, name, pattern),
            new AccessControlEntry("User:" + user, "*", op, AclPermissionType.ALLOW));
    }

    static void topic(List<AclBinding> out, String user, String name, PatternType pt, AclOperation... ops) {
        for (AclOperation op : ops) out.add(allow(user, ResourceType.TOPIC, name, pt, op));
    }

    static void apply(Admin admin, String prefix, String sites, Path secrets) throws Exception {
        Files.createDirectories(secrets);
        List<AclBinding> acls = new ArrayList<>();
        List<String> users = new ArrayList<>();
        PatternType L = PatternType.LITERAL, PRE = PatternType.PREFIXED;
        AclOperation R = AclOperation.READ, W = AclOperation.WRITE, D = AclOperation.DESCRIBE;
        for (String site : sites.split(",")) {
            site = site.trim();
            if (site.isEmpty()) continue;
            String u = prefix + "omrs-agent-" + site;
            users.add(u);
            topic(acls, u, prefix + "omrs.cdc." + site, L, W, D);
            topic(acls, u, prefix + "omrs.ingest.offsets." + site, L, R, W, D);
            acls.add(allow(u, ResourceType.TRANSACTIONAL_ID, prefix + "omrs-ingest-" + site, L, W));
            acls.add(allow(u, ResourceType.TRANSACTIONAL_ID, prefix + "omrs-ingest-" + site, L, D));
            acls.add(allow(u, ResourceType.GROUP, "omrs-reader-" + prefix + "omrs.ingest.offsets." + site, L, R));
        }
        String t = prefix + "omrs-transform";
        users.add(t);
        topic(acls, t, prefix + "omrs.cdc.", PRE, R, D);
        topic(acls, t, prefix + "omrs.identity.decisions", L, R, D);
        topic(acls, t, prefix + "omrs.hq.changes", L, W, D);
        topic(acls, t, prefix + "omrs.transform.state", L, R, W, D);
        topic(acls, t, prefix + "omrs.dlq", L, W, D);
        acls.add(allow(t, ResourceType.GROUP, prefix + "omrs-transform", L, R));
        acls.add(allow(t, ResourceType.GROUP, "omrs-reader-" + prefix + "omrs.transform.state", L, R));
        acls.add(allow(t, ResourceType.TRANSACTIONAL_ID, prefix + "omrs-transform", L, W));
        acls.add(allow(t, ResourceType.TRANSACTIONAL_ID, prefix + "omrs-transform", L, D));
        for (String sink : new String[] {"hq-sink", "parquet-sink"}) {
            String u = prefix + "omrs-" + sink;
            users.add(u);
            topic(acls, u, prefix + "omrs.hq.changes", L, R, D);
            topic(acls, u, prefix + "omrs.dlq", L, W, D);
            String group = prefix + "omrs-sink-" + (sink.equals("hq-sink") ? "hq-mysql" : "parquet");
            acls.add(allow(u, ResourceType.GROUP, group, L, R));
        }
        String op = prefix + "omrs-operator";
        users.add(op);
        topic(acls, op, prefix + "omrs.", PRE, R, D, AclOperation.DESCRIBE_CONFIGS);
        topic(acls, op, prefix + "omrs.cdc.", PRE, W);
        topic(acls, op, prefix + "omrs.hq.changes", L, W);
        topic(acls, op, prefix + "omrs.identity.decisions", L, W);
        acls.add(allow(op, ResourceType.GROUP, prefix + "omrs-", PRE, R));
        acls.add(allow(op, ResourceType.GROUP, prefix + "omrs-", PRE, D));
        acls.add(allow(op, ResourceType.GROUP, "omrs-reader-" + prefix, PRE, R));

        List<UserScramCredentialAlteration> creds = new ArrayList<>();
        for (String u : users) creds.add(new UserScramCredentialUpsertion(u, new ScramCredentialInfo(MECH, 8192), password(secrets, u, false)));
        admin.alterUserScramCredentials(creds).all().get();
        admin.createAcls(acls).all().get();
        System.out.println("kafka-security: " + users.size() + " users (" + MECH + ") and " + acls.size()
            + " ACLs applied; passwords in " + secrets);
    }

    /** The password in DIR/<user>.password; a new random one when missing or when `fresh`. */
    static String password(Path dir, String user, boolean fresh) throws Exception {
        Path f = dir.resolve(user + ".password");
        if (!fresh && Files.exists(f)) {
            String s = Files.readString(f).strip();
            if (!s.isEmpty()) return s;
        }
        byte[] b = new byte[24];
        new SecureRandom().nextBytes(b);
        String pw = Base64.getUrlEncoder().withoutPadding().encodeToString(b);
        Path tmp = dir.resolve(user + ".password.tmp");
        Files.writeString(tmp, pw + "\n");
        try {
            Files.setPosixFilePermissions(tmp, PosixFilePermissions.fromString("rw-------"));
        } catch (UnsupportedOperationException e) {
            // not a POSIX file system
        }
        Files.move(tmp, f, StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE);
        return pw;
    }

    static void rotate(Admin admin, String user, Path secrets) throws Exception {
        Map<String, UserScramCredentialsDescription> have = admin.describeUserScramCredentials(List.of(user)).all().get();
        if (!have.containsKey(user)) die("no SCRAM user `" + user + "` on the broker: run `kafka-security apply` first");
        String pw = password(secrets, user, true);
        admin.alterUserScramCredentials(List.of(new UserScramCredentialUpsertion(user, new ScramCredentialInfo(MECH, 8192), pw))).all().get();
        System.out.println("kafka-security: new password for " + user + " in " + secrets.resolve(user + ".password")
            + "; restart that stage (existing connections keep their session until they reconnect)");
    }

    static void list(Admin admin, String prefix) throws Exception {
        Collection<AclBinding> all = admin.describeAcls(AclBindingFilter.ANY).values().get();
        List<String> lines = new ArrayList<>();
        for (AclBinding b : all) {
            String who = b.entry().principal();
            if (!who.startsWith("User:" + prefix + "omrs-")) continue;
            lines.add(who.substring(5) + "\t" + b.entry().permissionType() + "\t" + b.entry().operation() + "\t"
                + b.pattern().resourceType() + "\t" + b.pattern().patternType() + "\t" + b.pattern().name());
        }
        Collections.sort(lines);
        lines.forEach(System.out::println);
    }
}

// Deletes the topics of a broker whose whole name matches a regular expression (Java syntax),
// through Kafka's own Admin client. Run by deploy/kafka/kafka-delete-topics.
//   java -cp 'jars/*' DeleteTopics.java <bootstrap> <regex> [--dry-run] [--keep-prefix P]...
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.Properties;
import java.util.regex.Pattern;

import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;

public class DeleteTopics {
    public static void main(String[] args) throws Exception {
        if (args.length < 2) {
            System.err.println("usage: DeleteTopics <bootstrap> <regex> [--dry-run] [--keep-prefix P]...");
            System.exit(2);
        }
        Pattern pattern = Pattern.compile(args[1]);
        boolean dryRun = false;
        List<String> keep = new ArrayList<>();
        for (int i = 2; i < args.length; i++) {
            if (args[i].equals("--dry-run")) {
                dryRun = true;
            } else if (args[i].equals("--keep-prefix") && i + 1 < args.length) {
                keep.add(args[++i]);
            } else {
                System.err.println("unknown argument " + args[i]);
                System.exit(2);
            }
        }
        Properties p = new Properties();
        p.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
        p.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "30000");
        try (Admin admin = Admin.create(p)) {
            List<String> matching = new ArrayList<>();
            int all = 0;
            for (String name : admin.listTopics().names().get()) {
                all++;
                if (pattern.matcher(name).matches() && keep.stream().noneMatch(name::startsWith)) {
                    matching.add(name);
                }
            }
            Collections.sort(matching);
            if (dryRun) {
                matching.forEach(System.out::println);
                System.out.println(matching.size() + " of " + all + " topics match " + args[1] + " (not deleted: --dry-run)");
                return;
            }
            // In slices: one request naming thousands of topics can outlast its timeout.
            for (int i = 0; i < matching.size(); i += 200) {
                admin.deleteTopics(matching.subList(i, Math.min(i + 200, matching.size()))).all().get();
            }
            System.out.println("deleted " + matching.size() + " of " + all + " topics (matching " + args[1] + ")");
        }
    }
}

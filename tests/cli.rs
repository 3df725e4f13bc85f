//! The `omrs-stream` binary: help, argument and config errors before any connection, and
//! `topics apply|check` exit codes against the real broker.

mod common;

use std::process::Command;

use common::{bin, root};
use std::time::{SystemTime, UNIX_EPOCH};

#[test]
fn help_lists_every_subcommand() {
    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["demo", "topics", "ingest", "transform", "sink", "query", "verify", "simulate"] {
        assert!(
            text.lines().any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
            "`{cmd}` missing from --help:\n{text}"
        );
    }
}

#[test]
fn demo_refuses_bad_arguments_before_starting_anything() {
    let state = tempfile::tempdir().unwrap();
    for (args, why) in [
        (vec!["--offline", "site-x:5:20"], "not one of the demo's sites"),
        (vec!["--offline", "site-b:5:2"], "idle timeout"),
        (vec!["--offline", "site-b:500:20"], "not inside"),
        (vec!["--dup-fraction", "1.5"], "between 0 and 1"),
        (vec!["--dump", "/nonexistent/dump.sql.gz"], "/nonexistent/dump.sql.gz"),
    ] {
        let out = bin().arg("demo").arg("--state-dir").arg(state.path()).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    // Nothing was started: no run directory was made.
    assert_eq!(std::fs::read_dir(state.path()).unwrap().count(), 0);
    // Up to 50 clinics (issue #24's 50-site run); more is refused by clap before anything runs.
    let out = bin().args(["demo", "--sites", "51"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap rejects --sites 51");
    assert!(String::from_utf8_lossy(&out.stderr).contains("1..=50"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_error_prints_its_cause_once() {
    let out = bin().args(["--config", "/nonexistent/omrs-stream.toml", "topics", "check"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/omrs-stream.toml: cannot read"), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn query_outside_a_lake_says_where_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin().args(["query", "--lake"]).arg(dir.path()).arg("SELECT 1").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not an omrs-stream lake") && err.contains(&dir.path().display().to_string()), "{err}");
}

#[test]
fn invalid_config_fails_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(root().join("omrs-stream.toml")).unwrap();
    // Point Kafka at a port nothing listens on: a config error must come first.
    let text = text.replace("${OMRS_KAFKA:-127.0.0.1:9092}", "127.0.0.1:1").replacen("port = 3311", "port = 0", 1);
    std::fs::write(&cfg, text).unwrap();
    let out = bin().arg("--config").arg(&cfg).args(["topics", "check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml: sites[0].database.port"), "{err}");
}

#[test]
fn topics_apply_then_check_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let prefix = format!("test.cli.{n}.");
    let text = std::fs::read_to_string(root().join("omrs-stream.toml"))
        .unwrap()
        .replace("[kafka]\n", &format!("[kafka]\ntopic_prefix = \"{prefix}\"\n"));
    let cfg = dir.path().join("omrs-stream.toml");
    std::fs::write(&cfg, text).unwrap();

    let check = bin().arg("--config").arg(&cfg).args(["topics", "check"]).output().unwrap();
    assert_eq!(check.status.code(), Some(1));
    let err = String::from_utf8_lossy(&check.stderr);
    assert!(err.contains(&format!("{prefix}omrs.hq.changes: missing")), "{err}");

    let apply = bin().arg("--config").arg(&cfg).args(["topics", "apply"]).output().unwrap();
    assert!(apply.status.success(), "{}", String::from_utf8_lossy(&apply.stderr));
    assert!(String::from_utf8_lossy(&apply.stdout).contains("10 created, 0 changed, 0 unchanged"));

    let again = bin().arg("--config").arg(&cfg).args(["topics", "apply"]).output().unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 created, 0 changed, 10 unchanged"));

    let check = bin().arg("--config").arg(&cfg).args(["topics", "check"]).output().unwrap();
    assert_eq!(check.status.code(), Some(0), "{}", String::from_utf8_lossy(&check.stderr));

    // Leave the dev broker as we found it.
    let names: Vec<String> = ["omrs.cdc.site-a", "omrs.cdc.site-b", "omrs.cdc.site-c", "omrs.hq.changes", "omrs.transform.state", "omrs.dlq", "omrs.ingest.offsets.site-a", "omrs.ingest.offsets.site-b", "omrs.ingest.offsets.site-c"]
        .iter()
        .map(|t| format!("{prefix}{t}"))
        .collect();
    delete_topics(&names);
}

fn delete_topics(names: &[String]) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:9092")
        .create()
        .unwrap();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let _ = rt.block_on(admin.delete_topics(&refs, &AdminOptions::new()));
}

#[test]
fn hq_sink_refuses_an_uninitialised_database_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("omrs-stream.toml"))
        .unwrap()
        .replace("database = \"openmrs_hq\"", "database = \"openmrs_hq_never_initialised\"")
        .replace("user = \"hq\"", "user = \"omrs\"")
        .replace("${OMRS_HQ_PASSWORD:-hq}", "omrs");
    let config = dir.path().join("omrs-stream.toml");
    std::fs::write(&config, text).unwrap();
    let out = bin().arg("--config").arg(&config).args(["sink", "hq-mysql", "--metrics-port", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not exist") && err.contains("sink hq-mysql --init"), "{err}");
}

/// `--log-format json` writes one JSON object a line, and a stage that cannot reach its site
/// keeps retrying (with `/health` not ready) until SIGTERM, which it obeys at once with exit 0.
#[test]
fn json_logs_and_a_clean_stop_while_retrying() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("omrs-stream.toml")).unwrap().replacen("port = 3311", "port = 1", 1);
    let cfg = dir.path().join("omrs-stream.toml");
    std::fs::write(&cfg, text).unwrap();
    let log = dir.path().join("ingest.log");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["--log-format", "json", "ingest", "--site", "site-a", "--quiet", "--metrics-port", &port.to_string()])
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("transient error") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "no retry logged within 30 s:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    for line in lines.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string() && v["message"].is_string(), "{line}");
    }
    let retry: serde_json::Value = lines.lines().filter_map(|l| serde_json::from_str(l).ok()).find(|v: &serde_json::Value| v["message"].as_str().is_some_and(|m| m.contains("transient error"))).unwrap();
    assert_eq!(retry["level"], "WARN");
    assert_eq!(retry["site"], "site-a", "structured fields are fields: {retry}");
    // Not ready while it retries.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut s, b"GET /health HTTP/1.0\r\n\r\n").unwrap();
    let mut health = String::new();
    std::io::Read::read_to_string(&mut s, &mut health).unwrap();
    assert!(health.contains(" 503 ") && health.contains("not ready: retrying after a transient error"), "{health}");
    // The images' HEALTHCHECK (deploy/docker/healthcheck) says unhealthy, with the reason.
    let check = Command::new(root().join("deploy/docker/healthcheck")).env("OMRS_HEALTH_PORT", port.to_string()).output().unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert_eq!(check.status.code(), Some(1), "{said}");
    assert!(said.contains(" 503 ") && said.contains("retrying after a transient error"), "{said}");

    let stopped_at = std::time::Instant::now();
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(stopped_at.elapsed() < std::time::Duration::from_secs(10), "still retrying 10 s after SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{}", std::fs::read_to_string(&log).unwrap_or_default());
    let check = Command::new(root().join("deploy/docker/healthcheck")).env("OMRS_HEALTH_PORT", port.to_string()).output().unwrap();
    assert_eq!(check.status.code(), Some(1), "healthy with nothing listening");
    assert!(String::from_utf8_lossy(&check.stdout).contains(&format!("nothing listens on 127.0.0.1:{port}")));
}

#[test]
fn query_serve_refuses_an_open_or_half_configured_server_before_listening() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("_manifest")).unwrap();
    let lake = dir.path().to_str().unwrap().to_string();
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "\n").unwrap();
    let rsa = dir.path().join("rsa.key");
    std::fs::write(&rsa, "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n-----END RSA PRIVATE KEY-----\n").unwrap();
    let cert = dir.path().join("cert.pem");
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n").unwrap();
    let good_pw = dir.path().join("good");
    std::fs::write(&good_pw, "pw\n").unwrap();
    let (pw, rsa, cert, good_pw) = (pw.to_str().unwrap(), rsa.to_str().unwrap(), cert.to_str().unwrap(), good_pw.to_str().unwrap());
    for (args, why) in [
        (vec!["--serve", "0.0.0.0:5999"], "would let anyone who can reach this host read every clinic's records"),
        (vec!["--serve", "127.0.0.1:5999", "--password-file", pw], "the file is empty"),
        (vec!["--serve", "127.0.0.1:5999", "--password-file", "/nonexistent/pw"], "--password-file /nonexistent/pw"),
        (vec!["--serve", "127.0.0.1:5999", "--password-file", good_pw, "--tls-cert", cert, "--tls-key", rsa], "openssl pkcs8 -topk8"),
        (vec!["--serve", "127.0.0.1:5999", "--tls-cert", cert, "--tls-key", cert], "no PEM `BEGIN PRIVATE KEY` block"),
        (vec!["--serve", "127.0.0.1:5999", "--tls-cert", cert, "--tls-key", cert.replace("cert.pem", "no.key").as_str()], "--tls-key"),
        (vec!["--serve", "localhost"], "expected HOST:PORT"),
    ] {
        let out = bin().args(["query", "--lake", &lake]).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: expected `{why}` in: {err}");
        assert!(!err.contains("serving"), "{args:?} started serving: {err}");
    }
}

/// The deployable HQ stack's pieces outside Docker: deploy/compose/make-secrets makes the
/// secret files once (a second run keeps them), deploy/compose/omrs-stream.toml loads with them
/// (its passwords read from the files), and `query --serve` as the stack's `query` service
/// runs it (TLS only, SCRAM) answers psql checking the certificate, with the password file's
/// password.
#[test]
fn the_deployments_secrets_config_and_query_server_work_together() {
    let dir = tempfile::tempdir().unwrap();
    let secrets = dir.path().join("secrets");
    let make = || Command::new(root().join("deploy/compose/make-secrets")).arg("localhost").env("OMRS_SECRETS_DIR", &secrets).output().unwrap();
    let first = make();
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let password = std::fs::read_to_string(secrets.join("query_password")).unwrap();
    assert_eq!(password.trim().len(), 48, "{password}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&secrets).unwrap().permissions().mode() & 0o777, 0o700);
    for f in ["mariadb_root_password", "hq_password", "cdc_password", "dashboards_password", "grafana_admin_password", "query_tls_cert.pem", "query_tls_key.pem"] {
        assert_eq!(std::fs::metadata(secrets.join(f)).unwrap().permissions().mode() & 0o777, 0o444, "{f}");
    }
    let again = make();
    assert!(again.status.success() && !String::from_utf8_lossy(&again.stdout).contains("made "), "a second run replaced a secret");
    assert_eq!(std::fs::read_to_string(secrets.join("query_password")).unwrap(), password);

    let text = std::fs::read_to_string(root().join("deploy/compose/omrs-stream.toml")).unwrap().replace("/run/secrets", secrets.to_str().unwrap());
    let cfg = dir.path().join("omrs-stream.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = bin().arg("--config").arg(&cfg).args(["ingest", "--site", "nowhere", "--metrics-port", "0"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("site `nowhere` is not in the config (sites: clinic-a, clinic-b)"), "{err}");

    let lake = dir.path().join("lake");
    std::fs::create_dir_all(lake.join("_manifest")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = bin()
        .arg("--config")
        .arg(&cfg)
        .args(["query", "--lake"])
        .arg(&lake)
        .args(["--serve", &format!("127.0.0.1:{port}"), "--password-file"])
        .arg(secrets.join("query_password"))
        .arg("--tls-cert")
        .arg(secrets.join("query_tls_cert.pem"))
        .arg("--tls-key")
        .arg(secrets.join("query_tls_key.pem"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for(60, "query --serve to listen", || std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ()));
    let out = Command::new("psql")
        .arg(format!("host=localhost port={port} user=analyst dbname=datafusion sslmode=verify-full sslrootcert={}", secrets.join("query_tls_cert.pem").display()))
        .args(["-X", "-A", "-t", "-c", "SELECT 40 + 2"])
        .env("PGPASSWORD", password.trim())
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");
}

//! The `omrs-stream` binary: help, argument and config errors before any connection, and
//! `topics apply|check` exit codes against the real broker.

use std::path::PathBuf;
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_omrs-stream"));
    c.current_dir(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()));
    c
}

fn root() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()))
}

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
    let out = bin().args(["demo", "--sites", "27"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap rejects --sites 27");
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
}

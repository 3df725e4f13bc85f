//! Helpers for the end-to-end tests of the binary against the real services of scripts/dev-up.
#![allow(dead_code)]

pub mod hq;
pub mod pipeline;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, OptsBuilder};
use omrs_core::config::Config;
use omrs_core::envelope::ChangeEvent;

/// The repository root, read at run time (cargo sets `CARGO_MANIFEST_DIR` for tests and
/// examples). Clones at different paths share one `CARGO_TARGET_DIR`, and cargo reuses a test
/// binary that another clone built: a path fixed at compile time would point into that clone
/// (gone once CI is done with it). Every test and example finds its files this way.
pub fn root() -> PathBuf {
    PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()))
}

pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_omrs-stream"));
    c.current_dir(root());
    c
}

/// The OpenMRS demo dump (scripts/test puts it in place and sets `OMRS_DEMO_DUMP`).
pub fn dump() -> PathBuf {
    omrs_core::openmrs::default_dump()
}

/// The tests' Python (scripts/python-env's venv: DuckDB, pyarrow).
pub fn python() -> String {
    std::env::var("OMRS_PYTHON").unwrap_or_else(|_| {
        let venv = "/var/cache/omrs-stream/venv/bin/python";
        if Path::new(venv).exists() { venv.into() } else { "python3".into() }
    })
}

/// `OMRS_SITE_MODE=mysql-minimal`: the test's sites are the `site-minimal` server
/// (binlog_row_metadata=MINIMAL, port 3330) with `flavor = "mysql"`, so the agent takes the
/// MySQL snapshot path and names columns from its schema history (scripts/test runs the
/// ingest tests a second time so).
pub fn mysql_mode() -> bool {
    std::env::var("OMRS_SITE_MODE").is_ok_and(|m| m == "mysql-minimal")
}

pub fn unique(tag: &str) -> String {
    let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros();
    format!("{tag}_{}_{}", std::process::id(), n % 1_000_000_000)
}

/// A test environment: its own site database (the demo dump) on one site server, its own topic
/// prefix, and a config file pointing at both.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub cfg: Config,
    pub site: String,
    pub database: String,
    pub prefix: String,
    pub port: u16,
}

impl Env {
    /// `site` is site-a, site-b or site-c; `tweaks` edits the config text.
    pub async fn new(tag: &str, site: &str, tweaks: &[(&str, &str)]) -> Env {
        let database = unique(&format!("ing_{tag}"));
        let prefix = format!("{}.", unique(&format!("t{tag}")));
        let mysql = mysql_mode();
        let port = match site {
            _ if mysql => 3330,
            "site-a" => 3311,
            "site-b" => 3312,
            _ => 3313,
        };
        let mut admin = admin(port, None).await;
        omrs_simulate::provision::provision(&mut admin, site, &database, &dump(), true).await.expect("provision the demo dump");
        let mut text = std::fs::read_to_string(root().join("omrs-stream.toml")).unwrap();
        text = text.replace("[kafka]\n", &format!("[kafka]\ntopic_prefix = \"{prefix}\"\n"));
        text = text.replace("database = \"openmrs\"\n", &format!("database = \"{database}\"\n"));
        for (from, to) in tweaks {
            assert!(text.contains(from), "config tweak `{from}` does not apply");
            text = text.replacen(from, to, 1);
        }
        if mysql {
            // Every site on the MINIMAL-metadata server, through the MySQL paths.
            for p in ["3311", "3312", "3313"] {
                text = text.replace(&format!("port = {p}\n"), "port = 3330\nflavor = \"mysql\"\n");
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("omrs-stream.toml");
        std::fs::write(&config, &text).unwrap();
        let cfg = Config::load(&config).unwrap();
        let out = bin().arg("--config").arg(&config).args(["topics", "apply"]).output().unwrap();
        assert!(out.status.success(), "topics apply: {}", String::from_utf8_lossy(&out.stderr));
        Env { dir, config, cfg, site: site.into(), database, prefix, port }
    }

    pub fn topic(&self) -> String {
        format!("{}omrs.cdc.{}", self.prefix, self.site)
    }

    pub async fn db(&self) -> Conn {
        admin(self.port, Some(&self.database)).await
    }

    /// Runs the agent to completion with --until-caught-up.
    pub fn catch_up(&self) -> std::process::Output {
        let out = self.agent(&["--until-caught-up"]).wait_with_output().unwrap();
        assert!(out.status.success(), "ingest failed: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    pub fn agent(&self, extra: &[&str]) -> Child {
        bin()
            .arg("--config")
            .arg(&self.config)
            .args(["ingest", "--site", &self.site, "--quiet", "--metrics-port", "0"])
            .args(extra)
            .env("RUST_LOG", "warn,omrs_ingest=info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn events(&self) -> Vec<ChangeEvent> {
        read_topic(&self.topic())
    }

    pub async fn drop(self) {
        let mut c = admin(self.port, None).await;
        c.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.database)).await.unwrap();
        let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
        let names: Vec<String> = ["omrs.cdc.site-a", "omrs.cdc.site-b", "omrs.cdc.site-c", "omrs.hq.changes", "omrs.transform.state", "omrs.dlq", "omrs.ingest.offsets.site-a", "omrs.ingest.offsets.site-b", "omrs.ingest.offsets.site-c"]
            .iter()
            .map(|t| format!("{}{t}", self.prefix))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let _ = admin.delete_topics(&refs, &rdkafka::admin::AdminOptions::new()).await;
    }
}

pub async fn admin(port: u16, db: Option<&str>) -> Conn {
    let opts = OptsBuilder::default()
        .ip_or_hostname("127.0.0.1")
        .tcp_port(port)
        .user(Some("omrs"))
        .pass(Some("omrs"))
        .db_name(db.map(str::to_string))
        .prefer_socket(false);
    Conn::new(opts).await.expect("connect to the site server (is scripts/dev-up running?)")
}

/// Every committed record of a topic, read_committed, in order.
pub fn read_topic(topic: &str) -> Vec<ChangeEvent> {
    read_json(topic)
}

/// Every committed record of a topic, parsed as `T`.
pub fn read_json<T: serde::de::DeserializeOwned>(topic: &str) -> Vec<T> {
    let mut out = Vec::new();
    omrs_core::kafka::read_to_end(&omrs_core::config::KafkaConfig::default(), topic, |_, payload, offset| {
        out.push(serde_json::from_slice(payload).map_err(|e| format!("bad record at {topic}@{offset}: {e}"))?);
        Ok(())
    })
    .unwrap_or_else(|e| panic!("{e}"));
    out
}

/// Runs a future to completion from synchronous code inside the test's (multi-thread)
/// runtime, e.g. a database poll inside [`wait_for`].
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

/// Polls `f` until it returns Some, or panics after `secs`.
pub fn wait_for<T>(secs: u64, what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_for_or(secs, what, String::new, f)
}

/// As [`wait_for`]; on timeout the panic message adds `detail()` (a log, a state dump).
pub fn wait_for_or<T>(secs: u64, what: &str, detail: impl Fn() -> String, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}\n{}", detail());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Replays events into the current state per table: key → after image.
pub fn replay(events: &[ChangeEvent]) -> BTreeMap<String, BTreeMap<String, serde_json::Map<String, serde_json::Value>>> {
    let mut state: BTreeMap<String, BTreeMap<String, _>> = BTreeMap::new();
    for ev in events {
        let (Some(t), Some(k)) = (&ev.table, &ev.key) else { continue };
        let key = serde_json::to_string(k).unwrap();
        let tbl = state.entry(t.clone()).or_default();
        match ev.op {
            omrs_core::envelope::Op::Delete => {
                tbl.remove(&key);
            }
            _ => {
                tbl.insert(key, ev.after.clone().unwrap());
            }
        }
    }
    state
}

pub fn kill9(child: &mut Child) {
    let _ = child.kill(); // SIGKILL on Unix
    let _ = child.wait();
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

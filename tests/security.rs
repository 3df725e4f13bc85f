//! Security (issue #10): the whole pipeline over the broker's SASL_SSL listener (SCRAM-SHA-512,
//! the KRaft StandardAuthorizer) and over TLS to every MariaDB, each stage with its own Kafka
//! user and least-privilege ACLs from `deploy/kafka/kafka-security`, and its secrets only in
//! files. It shows:
//! - a site's credentials are refused on another site's topic and on `omrs.hq.changes`, and a
//!   wrong password is refused;
//! - a database user that requires TLS is refused without it, and works with it;
//! - the pipeline works end to end over TLS+SASL, and `verify` passes (also as the operator
//!   user over SASL_SSL);
//! - no password appears in any stage's log;
//! - scrubbed columns (`users.password`, `salt`, `secret_question`, `secret_answer`) appear in
//!   no topic, no lake file and not at HQ, from the snapshot or from the binlog, while an
//!   unscrubbed column written the same way does (so the scan can see what it looks for).
//!
//! Its own test binary: it sets up users and ACLs on the shared broker.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::hq::*;
use common::pipeline::*;
use common::*;
use mysql_async::prelude::Queryable;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};

/// Collects the client's error callbacks (librdkafka reports a refused login there).
#[derive(Default)]
struct Errors(std::sync::Mutex<Vec<(Option<RDKafkaErrorCode>, String)>>);

impl rdkafka::ClientContext for Errors {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.0.lock().unwrap().push((error.rdkafka_error_code(), reason.to_string()));
    }
}
impl rdkafka::consumer::ConsumerContext for Errors {}

const SECURE_BOOTSTRAP: &str = "localhost:9094";

fn tls_dir() -> PathBuf {
    PathBuf::from(std::env::var("OMRS_STATE").unwrap_or_else(|_| "/var/lib/omrs-stream".into())).join("tls")
}

fn kafka_user(secrets: &Path, user: &str, password: Option<&str>) -> omrs_core::config::KafkaConfig {
    let pw = match password {
        Some(p) => p.to_string(),
        None => std::fs::read_to_string(secrets.join(format!("{user}.password"))).unwrap().trim().to_string(),
    };
    omrs_core::config::KafkaConfig {
        bootstrap_servers: SECURE_BOOTSTRAP.into(),
        security_protocol: Some("sasl_ssl".into()),
        sasl_mechanism: Some("SCRAM-SHA-512".into()),
        sasl_username: Some(user.into()),
        sasl_password: Some(pw),
        ssl_ca_location: Some(tls_dir().join("ca.pem").display().to_string()),
        ..Default::default()
    }
}

/// Produces one record to `topic` as `cfg`'s user; the delivery error code, if any.
async fn produce_as(cfg: &omrs_core::config::KafkaConfig, topic: &str) -> Option<RDKafkaErrorCode> {
    let p: FutureProducer = omrs_core::kafka::client_config(cfg).set("message.timeout.ms", "15000").create().unwrap();
    match p.send(FutureRecord::to(topic).key("probe").payload("{}"), Duration::from_secs(20)).await {
        Ok(_) => None,
        Err((e, _)) => e.rdkafka_error_code().or(Some(RDKafkaErrorCode::Fail)),
    }
}

/// Reads `topic` from the start as `cfg`'s user, in a consumer group the user may use, until
/// a record or an error, within 20 s.
fn consume_as(cfg: &omrs_core::config::KafkaConfig, group: &str, topic: &str) -> Result<(), Option<RDKafkaErrorCode>> {
    let c: BaseConsumer = omrs_core::kafka::client_config(cfg).set("group.id", group).set("enable.auto.commit", "false").create().unwrap();
    // What the broker says of the topic to this user; then a read of it.
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(20)).map_err(|e| e.rdkafka_error_code())?;
    if let Some(err) = md.topics().first().and_then(|t| t.error()) {
        assert!(c.fetch_watermarks(topic, 0, Duration::from_secs(20)).is_err(), "{topic}: refused in metadata, yet its offsets were listed");
        return Err(Some(RDKafkaErrorCode::from(err)));
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    c.assign(&tpl).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        match c.poll(Duration::from_millis(500)) {
            Some(Ok(_)) => return Ok(()),
            Some(Err(e)) => return Err(e.rdkafka_error_code()),
            None => {}
        }
    }
    Err(None)
}

/// Logs in as `cfg`'s user (a metadata request); the refusal librdkafka reports, if any.
fn login(cfg: &omrs_core::config::KafkaConfig) -> Result<(), String> {
    let probe: BaseConsumer<Errors> = omrs_core::kafka::client_config(cfg).create_with_context(Errors::default()).unwrap();
    if probe.fetch_metadata(None, Duration::from_secs(20)).is_ok() {
        return Ok(());
    }
    // Error callbacks are served by poll.
    let deadline = Instant::now() + Duration::from_secs(10);
    while probe.context().0.lock().unwrap().is_empty() && Instant::now() < deadline {
        let _ = probe.poll(Duration::from_millis(200));
    }
    let errors = probe.context().0.lock().unwrap().clone();
    Err(errors.iter().find(|(code, _)| *code == Some(RDKafkaErrorCode::Authentication)).map(|(_, r)| r.clone()).unwrap_or_else(|| format!("no authentication error reported: {errors:?}")))
}

/// Every record of every topic of the run, as the operator (plaintext, local listener).
fn all_topic_bytes(prefix: &str) -> Vec<(String, Vec<u8>)> {
    let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").set("group.id", "omrs-security-scan").set("isolation.level", "read_uncommitted").create().unwrap();
    let md = c.fetch_metadata(None, Duration::from_secs(20)).unwrap();
    let topics: Vec<String> = md.topics().iter().map(|t| t.name().to_string()).filter(|n| n.starts_with(prefix)).collect();
    let mut out = Vec::new();
    for t in topics {
        let (low, high) = c.fetch_watermarks(&t, 0, Duration::from_secs(20)).unwrap();
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&t, 0, Offset::Beginning).unwrap();
        c.assign(&tpl).unwrap();
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                buf.extend_from_slice(m.key().unwrap_or_default());
                buf.extend_from_slice(m.payload().unwrap_or_default());
                if m.offset() + 1 >= high {
                    break;
                }
            }
            let pos = c.position().ok().and_then(|p| p.find_partition(&t, 0).map(|e| e.offset()));
            if matches!(pos, Some(Offset::Offset(o)) if o >= high) {
                break;
            }
            assert!(Instant::now() < deadline, "reading {t} to its end timed out");
        }
        out.push((t, buf));
    }
    out
}

/// Every lake file as text: Parquet files decoded column by column (they are compressed, so
/// their bytes would hide a value), every other file as it is.
fn lake_texts(lake: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![lake.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_some_and(|x| x == "parquet") {
                let file = std::fs::File::open(&path).unwrap();
                let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file).unwrap().build().unwrap();
                let mut text = String::new();
                for batch in reader {
                    let batch = batch.unwrap();
                    text.push_str(&arrow::util::pretty::pretty_format_batches(&[batch]).unwrap().to_string());
                }
                out.push((path, text));
            } else {
                out.push((path.clone(), String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned()));
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

async fn site_admin(port: u16, db: &str) -> mysql_async::Conn {
    admin(port, Some(db)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_runs_over_sasl_ssl_and_tls_with_per_stage_acls_and_leaks_nothing() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tsec")), database: unique("sec") };
    let hq_db = unique("openmrs_hq_sec");
    let secrets = p.dir.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();

    // 1. Users and ACLs for this run's topics.
    let out = std::process::Command::new(root().join("deploy/kafka/kafka-security"))
        .args(["apply", "--prefix", &p.prefix, "--sites", "site-a,site-b,site-c", "--secrets"])
        .arg(&secrets)
        .output()
        .unwrap();
    assert!(out.status.success(), "kafka-security apply: {}", String::from_utf8_lossy(&out.stderr));

    let Live { config: plain_config, cfg, lake, manifest: manifest_path, args } = live(&p, &hq_db, 80, 21, None).await;
    let reference = Reference::start(&p.database);
    let user = |stage: &str| format!("{}omrs-{stage}", p.prefix);

    // 2. The ACLs hold: site-a may not write site-b's topic, nor read HQ's or site-b's stream.
    let site_a = kafka_user(&secrets, &user("agent-site-a"), None);
    let t = |name: &str| format!("{}{name}", p.prefix);
    assert_eq!(produce_as(&site_a, &t("omrs.cdc.site-b")).await, Some(RDKafkaErrorCode::TopicAuthorizationFailed), "site-a wrote site-b's topic");
    assert_eq!(produce_as(&site_a, &t("omrs.hq.changes")).await, Some(RDKafkaErrorCode::TopicAuthorizationFailed), "site-a wrote omrs.hq.changes");
    // The agent's own reader group: the topic, not the group, is what is refused.
    let own_group = format!("omrs-reader-{}", t("omrs.ingest.offsets.site-a"));
    assert_eq!(consume_as(&site_a, &own_group, &t("omrs.hq.changes")), Err(Some(RDKafkaErrorCode::TopicAuthorizationFailed)), "site-a read omrs.hq.changes");
    assert_eq!(consume_as(&site_a, &own_group, &t("omrs.cdc.site-b")), Err(Some(RDKafkaErrorCode::TopicAuthorizationFailed)), "site-a read site-b's topic");
    let sink = kafka_user(&secrets, &user("hq-sink"), None);
    assert_eq!(produce_as(&sink, &t("omrs.hq.changes")).await, Some(RDKafkaErrorCode::TopicAuthorizationFailed), "the HQ sink wrote omrs.hq.changes");
    let wrong = kafka_user(&secrets, &user("agent-site-a"), Some("not-the-password"));
    let refused = login(&wrong).expect_err("a wrong password was accepted");
    assert!(refused.contains("SASL authentication error"), "a wrong password was not refused as such: {refused}");

    // Key rotation (OPERATIONS.md): a new password for site-a's agent; the old one is refused
    // from then on, the new one (in the user's file, where the agent reads it) logs in.
    let old_pw = std::fs::read_to_string(secrets.join(format!("{}.password", user("agent-site-a")))).unwrap();
    let out = std::process::Command::new(root().join("deploy/kafka/kafka-security"))
        .args(["rotate", "--user", &user("agent-site-a"), "--secrets"])
        .arg(&secrets)
        .output()
        .unwrap();
    assert!(out.status.success(), "kafka-security rotate: {}", String::from_utf8_lossy(&out.stderr));
    let new_pw = std::fs::read_to_string(secrets.join(format!("{}.password", user("agent-site-a")))).unwrap();
    assert_ne!(old_pw, new_pw, "rotate wrote no new password");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let old_refused = login(&kafka_user(&secrets, &user("agent-site-a"), Some(old_pw.trim()))).is_err();
        let new_works = login(&kafka_user(&secrets, &user("agent-site-a"), None)).is_ok();
        if old_refused && new_works {
            break;
        }
        assert!(Instant::now() < deadline, "after rotate: old password refused {old_refused}, new one works {new_works}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("ACLs: site-a refused on site-b's topic and omrs.hq.changes; wrong password refused ({refused}); rotation works");

    // 3. Database users that require TLS, with passwords in files.
    let db_user = unique("tls").replace('_', "");
    let db_pw = format!("Db-{}", unique("pw"));
    let db_pw_file = secrets.join("db.password");
    std::fs::write(&db_pw_file, format!("{db_pw}\n")).unwrap();
    for port in [3311, 3312, 3313] {
        admin(port, None)
            .await
            .query_drop(format!(
                "CREATE USER '{db_user}'@'127.0.0.1' IDENTIFIED BY '{db_pw}' REQUIRE SSL;
                 GRANT SELECT, RELOAD, REPLICATION SLAVE, REPLICATION CLIENT, BINLOG MONITOR, SLAVE MONITOR ON *.* TO '{db_user}'@'127.0.0.1'"
            ))
            .await
            .unwrap();
    }
    p.run(&plain_config, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    admin(HQ_PORT, None)
        .await
        .query_drop(format!("CREATE USER '{db_user}'@'127.0.0.1' IDENTIFIED BY '{db_pw}' REQUIRE SSL; GRANT ALL PRIVILEGES ON `{hq_db}`.* TO '{db_user}'@'127.0.0.1'"))
        .await
        .unwrap();
    let plain_try = mysql_async::Conn::new(mysql_async::OptsBuilder::default().ip_or_hostname("127.0.0.1").tcp_port(3311).user(Some(db_user.clone())).pass(Some(db_pw.clone())).prefer_socket(false)).await;
    assert!(plain_try.is_err(), "a REQUIRE SSL user connected without TLS");

    // 4. The secure config: SASL_SSL with the user and password file from each stage's
    //    environment, TLS to every database with the local CA, the password from a file.
    let ca = tls_dir().join("ca.pem");
    let mut text = std::fs::read_to_string(&plain_config).unwrap();
    text = text.replacen(
        "bootstrap_servers = \"${OMRS_KAFKA:-127.0.0.1:9092}\"",
        &format!(
            "bootstrap_servers = \"{SECURE_BOOTSTRAP}\"\nsecurity_protocol = \"sasl_ssl\"\nsasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"${{OMRS_KAFKA_USER}}\"\nsasl_password_file = \"${{OMRS_KAFKA_PASSWORD_FILE}}\"\nssl_ca_location = \"{}\"",
            ca.display()
        ),
        1,
    );
    assert!(text.contains("sasl_password_file"), "the bootstrap line was not found in the config");
    let tls_block = format!("password_file = \"{}\"\n[sites.database.tls]\nca_file = \"{}\"\n", db_pw_file.display(), ca.display());
    text = text.replace("user = \"cdc\"\npassword = \"${OMRS_CDC_PASSWORD:-cdc}\"\n", &format!("user = \"{db_user}\"\n"));
    text = text.replace(&format!("database = \"{}\"\n", p.database), &format!("database = \"{}\"\n{tls_block}", p.database));
    text = text.replace(
        &format!("user = \"omrs\"\npassword = \"omrs\"\ndatabase = \"{hq_db}\"\n"),
        &format!("user = \"{db_user}\"\ndatabase = \"{hq_db}\"\n{}", tls_block.replace("[sites.database.tls]", "[hq.database.tls]")),
    );
    assert_eq!(text.matches("ca_file").count(), 4, "TLS was not set on the three sites and HQ:\n{text}");
    assert!(!text.contains(&db_pw), "the config holds a password");
    let secure_config = p.dir.path().join("secure.toml");
    std::fs::write(&secure_config, &text).unwrap();

    // 5. Markers in the users table, before the snapshot: scrubbed columns and one that is not.
    let tag = unique("m").replace('_', "");
    let hidden = format!("HIDDEN{tag}");
    let visible = format!("VISIBLE{tag}");
    for port in [3311, 3312, 3313] {
        site_admin(port, &p.database)
            .await
            .query_drop(format!(
                "UPDATE users SET password = '{hidden}pw', salt = '{hidden}salt', secret_question = '{hidden}q', secret_answer = '{hidden}a', retire_reason = '{visible}snap'"
            ))
            .await
            .unwrap();
    }

    // 6. The pipeline, each stage as its own user.
    let stages: Vec<(&str, Vec<&str>, String)> = vec![
        ("ingest-site-a", vec!["ingest", "--site", "site-a"], user("agent-site-a")),
        ("ingest-site-b", vec!["ingest", "--site", "site-b"], user("agent-site-b")),
        ("ingest-site-c", vec!["ingest", "--site", "site-c"], user("agent-site-c")),
        ("transform", vec!["transform"], user("transform")),
        ("sink-hq-mysql", vec!["sink", "hq-mysql"], user("hq-sink")),
        ("sink-parquet", vec!["sink", "parquet"], user("parquet-sink")),
    ];
    let mut procs: Vec<Proc> = stages
        .into_iter()
        .map(|(name, a, u)| {
            let quiet = (name != "transform").then(|| "--quiet".to_string());
            let args: Vec<String> = a.iter().map(|s| s.to_string()).chain(quiet).chain(["--metrics-port".into(), "0".into()]).collect();
            let env = vec![
                ("OMRS_KAFKA_USER".to_string(), u.clone()),
                ("OMRS_KAFKA_PASSWORD_FILE".to_string(), secrets.join(format!("{u}.password")).display().to_string()),
                ("RUST_LOG".to_string(), "info".to_string()),
            ];
            let child = start_env(&secure_config, &args, &p.dir.path().join(format!("{name}.log")), &env);
            Proc { name: name.to_string(), args, child, starts: 1 }
        })
        .collect();
    let started = Instant::now();
    let manifest = omrs_simulate::run(&cfg, &omrs_simulate::SimulateArgs { no_provision: true, ..args.clone() }).await.unwrap();
    // The snapshot's markers at HQ first, so that the next ones come through the binlog.
    let mut h = hq(&hq_db).await;
    let deadline = Instant::now() + Duration::from_secs(180);
    while count(&mut h, &format!("SELECT COUNT(*) FROM users WHERE retire_reason = '{visible}snap'")).await == 0 {
        assert_alive(&mut procs, p.dir.path(), "before the snapshot reached HQ");
        assert!(Instant::now() < deadline, "the snapshot of users never reached HQ");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("the snapshot's users rows reached HQ {:.1} s after the stages started", started.elapsed().as_secs_f64());
    // The same markers again, through the binlog this time.
    for port in [3311, 3312, 3313] {
        site_admin(port, &p.database)
            .await
            .query_drop(format!(
                "UPDATE users SET password = '{hidden}pw2', salt = '{hidden}salt2', secret_question = '{hidden}q2', secret_answer = '{hidden}a2', retire_reason = '{visible}live'"
            ))
            .await
            .unwrap();
    }
    let report = drain_until_verified(&plain_config, Some(&manifest_path), &lake, &mut procs, p.dir.path(), 300, "the secure run").await;
    assert_eq!(report["ok"], true);
    // HQ holds the live marker once the binlog update is through.
    let deadline = Instant::now() + Duration::from_secs(120);
    while count(&mut h, &format!("SELECT COUNT(*) FROM users WHERE retire_reason = '{visible}live'")).await == 0 {
        assert!(Instant::now() < deadline, "the binlog update of users never reached HQ");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let leaked = count(&mut h, &format!("SELECT COUNT(*) FROM users WHERE CONCAT_WS('|', password, salt, secret_question, secret_answer) LIKE '%{hidden}%'")).await;
    assert_eq!(leaked, 0, "scrubbed columns reached HQ");
    eprintln!("secure pipeline: {} row changes, verified", manifest.row_changes);

    // 7. `verify` as the operator user, over SASL_SSL.
    let op = user("operator");
    let out = bin()
        .arg("--config")
        .arg(&secure_config)
        .args(["verify", "--lake"])
        .arg(&lake)
        .env("OMRS_KAFKA_USER", &op)
        .env("OMRS_KAFKA_PASSWORD_FILE", secrets.join(format!("{op}.password")))
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    let verify_text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "verify as the operator over SASL_SSL:\n{verify_text}");
    drop(procs);
    let (lost, doubled) = assert_as_reference(&reference, &hq_db, "the secure run").await;
    assert_eq!((lost, doubled), (0, 0));

    // 8. No secret in any log.
    let mut passwords: Vec<String> = std::fs::read_dir(&secrets)
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "password"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap().trim().to_string())
        .collect();
    assert_eq!(passwords.len(), 8, "seven users (three agents, the transform, two sinks, the operator) and the database password");
    passwords.push(db_pw.clone());
    let mut logs: Vec<(String, String)> = std::fs::read_dir(p.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| (e.path().display().to_string(), std::fs::read_to_string(e.path()).unwrap()))
        .collect();
    assert_eq!(logs.len(), 6, "one log per stage");
    assert!(logs.iter().map(|(_, l)| l.len()).sum::<usize>() > 0, "the stages logged nothing at info");
    logs.push(("verify output".into(), verify_text));
    for (name, text) in &logs {
        for pw in &passwords {
            assert!(!text.contains(pw.as_str()), "a password appears in {name}");
        }
    }

    // 9. Scrubbed columns in no topic and no lake file; the unscrubbed marker in both.
    let topics = all_topic_bytes(&p.prefix);
    assert!(topics.iter().any(|(_, b)| contains(b, &format!("{visible}snap"))), "the snapshot marker is in no topic: the scan sees nothing");
    assert!(topics.iter().any(|(_, b)| contains(b, &format!("{visible}live"))), "the binlog marker is in no topic: the scan sees nothing");
    for (name, bytes) in &topics {
        assert!(!contains(bytes, &hidden), "a scrubbed value is in topic {name}");
    }
    let files = lake_texts(&lake);
    assert!(files.iter().any(|(_, t)| t.contains(&format!("{visible}live"))), "the binlog marker is in no lake file: the scan sees nothing");
    for (path, text) in &files {
        assert!(!text.contains(&hidden), "a scrubbed value is in lake file {}", path.display());
    }
    eprintln!("scans: {} topics, {} lake files, {} logs: no password, no scrubbed value", topics.len(), files.len(), logs.len());

    for port in [HQ_PORT, 3311, 3312, 3313] {
        let _ = admin(port, None).await.query_drop(format!("DROP USER IF EXISTS '{db_user}'@'127.0.0.1'")).await;
    }
    drop_databases(&[&hq_db], &p.database).await;
}

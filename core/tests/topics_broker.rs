//! `topics apply|check` against the real Kafka broker (scripts/dev-up starts it on
//! 127.0.0.1:9092; OMRS_KAFKA overrides). Each test uses its own topic prefix.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use omrs_core::config::{Config, KafkaConfig, ResolvedTopic, TopicsFile};
use omrs_core::kafka::client_config;
use omrs_core::topics::{self, TopicNames};
use omrs_core::CoreError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;

fn kafka(prefix: &str) -> KafkaConfig {
    KafkaConfig {
        bootstrap_servers: std::env::var("OMRS_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into()),
        topic_prefix: prefix.into(),
        ..KafkaConfig::default()
    }
}

fn unique_prefix(tag: &str) -> String {
    let n = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("test.{tag}.{}.{n}.", std::process::id())
}

fn declared(prefix: &str) -> Vec<ResolvedTopic> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("..");
    let cfg = Config::load(&root.join("omrs-stream.toml")).unwrap();
    TopicsFile::load(&root.join("topics.toml")).unwrap().resolve(&cfg.site_names(), prefix)
}

/// Deletes the test's topics so repeated runs do not pile them up on the dev broker.
async fn cleanup(k: &KafkaConfig, want: &[ResolvedTopic]) {
    let admin: AdminClient<DefaultClientContext> = client_config(k).create().unwrap();
    let names: Vec<&str> = want.iter().map(|t| t.name.as_str()).collect();
    let _ = admin.delete_topics(&names, &AdminOptions::new()).await;
}

#[tokio::test]
async fn apply_creates_every_topic_with_its_settings_and_is_idempotent() {
    let prefix = unique_prefix("apply");
    let k = kafka(&prefix);
    let want = declared(&prefix);
    // Per site: omrs.cdc.<site> and omrs.ingest.offsets.<site>; then four shared topics.
    assert_eq!(want.len(), 2 * 3 + 4);

    let first = topics::apply(&k, &want).await.unwrap();
    assert_eq!(first.created.len(), 10, "{first:?}");

    // Read every topic back through the admin API.
    let names: Vec<String> = want.iter().map(|t| t.name.clone()).collect();
    let have = topics::describe(&k, &names).await.unwrap();
    let n = TopicNames::new(&prefix);
    for t in &want {
        let s = have[&t.name].as_ref().unwrap_or_else(|| panic!("{} not on the broker", t.name));
        assert_eq!(s.partitions, t.partitions, "{}", t.name);
        assert_eq!(s.replication_factor, t.replication_factor, "{}", t.name);
        for (key, value) in &t.config {
            assert_eq!(s.all_config.get(key), Some(value), "{}: {key}", t.name);
        }
    }
    let state = have[&n.transform_state()].as_ref().unwrap();
    assert_eq!(state.config["cleanup.policy"], "compact");
    let offsets = have[&n.ingest_offsets("site-a")].as_ref().unwrap();
    assert_eq!(offsets.config["cleanup.policy"], "compact");
    let site = have[&n.cdc("site-b")].as_ref().unwrap();
    assert_eq!(site.partitions, 1);
    assert_eq!(site.config["retention.ms"], "-1");

    let second = topics::apply(&k, &want).await.unwrap();
    assert!(second.is_noop(), "second apply changed something: {second:?}");
    assert_eq!(second.unchanged.len(), 10);
    topics::check(&k, &want).await.unwrap();
    cleanup(&k, &want).await;
}

#[tokio::test]
async fn check_names_each_mismatch_and_apply_fixes_what_it_can() {
    let prefix = unique_prefix("check");
    let k = kafka(&prefix);
    let want = declared(&prefix);
    let n = TopicNames::new(&prefix);

    // Hand-made mismatches: the DLQ with 3 partitions, the state topic without compaction.
    let admin: AdminClient<DefaultClientContext> = client_config(&k).create().unwrap();
    let dlq = n.dlq();
    let state = n.transform_state();
    let made = [
        NewTopic::new(&dlq, 3, TopicReplication::Fixed(1)),
        NewTopic::new(&state, 1, TopicReplication::Fixed(1)).set("cleanup.policy", "delete"),
    ];
    for r in admin.create_topics(made.iter(), &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }

    let err = topics::check(&k, &want).await.unwrap_err();
    let CoreError::TopicMismatch(lines) = &err else { panic!("{err}") };
    assert!(lines.contains(&format!("{dlq}: partitions 3 (want 1)")), "{lines:?}");
    assert!(lines.contains(&format!("{state}: cleanup.policy=delete (want compact)")), "{lines:?}");
    assert!(lines.contains(&format!("{}: missing", n.hq_changes())), "{lines:?}");
    // 8 missing topics; the state topic: policy and lag; the DLQ: partitions and retention.
    assert_eq!(lines.len(), 8 + 2 + 2, "{lines:?}");

    // apply creates the missing ones and fixes the config, but cannot remove partitions.
    let err = topics::apply(&k, &want).await.unwrap_err();
    let CoreError::TopicMismatch(lines) = &err else { panic!("{err}") };
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].starts_with(&format!("{dlq}: partitions 3 (want 1)")), "{lines:?}");
    // The broker applies config changes to its metadata asynchronously: poll until check sees
    // them, with a deadline.
    let want_lines = vec![format!("{dlq}: partitions 3 (want 1)")];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let err = topics::check(&k, &want).await.unwrap_err();
        let CoreError::TopicMismatch(lines) = &err else { panic!("{err}") };
        if *lines == want_lines {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "after apply, check still says {lines:?}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    cleanup(&k, &want).await;
}

#[tokio::test]
async fn an_unreachable_broker_is_a_transient_error() {
    let mut k = kafka("x.");
    k.bootstrap_servers = "127.0.0.1:1".into();
    k.properties.insert("socket.connection.setup.timeout.ms".into(), "1000".into());
    let err = topics::describe(&k, &["omrs.dlq".to_string()]).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
}

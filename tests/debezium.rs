//! Clinics already streamed by Debezium (issue #28), against the real connector: Kafka Connect
//! with Debezium's MariaDB connector (`deploy/debezium`, started by `scripts/test`) captures
//! site-a (JSON without schemas) and site-c (with schemas); site-b has this project's agent.
//! The simulator writes all three, with duplicates across them; the Debezium input
//! (`ingest --from-debezium`) is SIGKILLed mid-stream and started again. Then `verify
//! --manifest --lake` passes, and HQ in uuid space equals an uninterrupted run in which every
//! site has this project's agent, row for row.
//! Its own test binary: it runs a whole pipeline.

mod common;

use std::process::Command;

use common::hq::*;
use common::pipeline::*;
use common::*;
use mysql_async::prelude::Queryable;
use serde_json::json;

/// Kafka Connect's REST endpoint (deploy/debezium).
fn connect_url() -> String {
    std::env::var("OMRS_CONNECT_URL").unwrap_or_else(|_| "http://127.0.0.1:8083".into())
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "30"]).args(args).output().expect("curl");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// A Debezium MariaDB connector on a running Connect worker, deleted when dropped.
struct Connector {
    name: String,
    topic_prefix: String,
}

impl Connector {
    fn start(name: &str, port: u16, database: &str, topic_prefix: &str, server_id: u32, schemas: bool) -> Connector {
        let (ok, text) = curl(&[&format!("{}/connectors", connect_url())]);
        assert!(ok, "Kafka Connect is not running at {} (deploy/debezium/debezium-up starts it): {text}", connect_url());
        let config = json!({
            "name": name,
            "config": {
                "connector.class": "io.debezium.connector.mariadb.MariaDbConnector",
                "tasks.max": "1",
                "database.hostname": "127.0.0.1",
                "database.port": port.to_string(),
                "database.user": "cdc",
                "database.password": std::env::var("OMRS_CDC_PASSWORD").unwrap_or_else(|_| "cdc".into()),
                "database.server.id": server_id.to_string(),
                "database.include.list": database,
                "topic.prefix": topic_prefix,
                "snapshot.mode": "initial",
                "include.schema.changes": "true",
                "decimal.handling.mode": "string",
                "heartbeat.interval.ms": "1000",
                // An idle clinic gets a heartbeat every 2 s, not every 48 s (deploy/debezium).
                "connect.keep.alive.interval.ms": "2500",
                "schema.history.internal.kafka.bootstrap.servers": "127.0.0.1:9092",
                "schema.history.internal.kafka.topic": format!("{topic_prefix}.schema-history"),
                "topic.creation.default.replication.factor": "1",
                "topic.creation.default.partitions": "1",
                "key.converter": "org.apache.kafka.connect.json.JsonConverter",
                "key.converter.schemas.enable": schemas.to_string(),
                "value.converter": "org.apache.kafka.connect.json.JsonConverter",
                "value.converter.schemas.enable": schemas.to_string(),
                // Connect's JsonConverter writes a column's default for a NULL otherwise (KIP-581).
                "value.converter.replace.null.with.default": "false",
            }
        });
        let body = config.to_string();
        let (ok, text) = curl(&["-X", "POST", "-H", "Content-Type: application/json", "--data", &body, &format!("{}/connectors", connect_url())]);
        assert!(ok && !text.contains("error_code"), "creating connector {name}: {text}");
        let c = Connector { name: name.to_string(), topic_prefix: topic_prefix.to_string() };
        wait_for(120, &format!("connector {name} running"), || {
            let (_, s) = curl(&[&format!("{}/connectors/{name}/status", connect_url())]);
            assert!(!s.contains("\"FAILED\""), "connector {name} failed: {s}");
            (s.matches("\"RUNNING\"").count() >= 2).then_some(())
        });
        c
    }
}

impl Drop for Connector {
    /// The connector goes, and its heartbeat topic (the pipeline's prefix does not cover it).
    fn drop(&mut self) {
        let _ = curl(&["-X", "DELETE", &format!("{}/connectors/{}", connect_url(), self.name)]);
        delete_topics_with_prefix(&format!("__debezium-heartbeat.{}", self.topic_prefix));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clinics_streamed_by_debezium_reach_hq_and_the_lake_as_with_our_agent() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tdbz")), database: unique("dbz") };
    let hq_db = unique("openmrs_hq_dbz");
    let (prefix_a, prefix_c) = (format!("{}dbz.site-a", p.prefix), format!("{}dbz.site-c", p.prefix));
    let site_db = |port: u16| format!("port = {port}\nuser = \"cdc\"\npassword = \"${{OMRS_CDC_PASSWORD:-cdc}}\"\ndatabase = \"{}\"\n", p.database);
    let (site_a, site_c) = (site_db(3311), site_db(3313));
    let (dbz_a, dbz_c) = (format!("{site_a}[sites.debezium]\ntopic_prefix = \"{prefix_a}\"\n"), format!("{site_c}[sites.debezium]\ntopic_prefix = \"{prefix_c}\"\nschemas = true\n"));
    let Live { config, cfg, lake: lake_dir, manifest, args } = live_with(&p, &hq_db, 80, 28, Some(150.0), &[(&site_a, &dbz_a), (&site_c, &dbz_c)]).await;
    assert!(cfg.site("site-a").and_then(|s| s.debezium.as_ref()).is_some());
    let reference = Reference::start(&p.database);
    let base_id = 5400 + (std::process::id() % 1000);
    let _a = Connector::start(&format!("{}a", p.prefix), 3311, &p.database, &prefix_a, base_id, false);
    let _c = Connector::start(&format!("{}c", p.prefix), 3313, &p.database, &prefix_c, base_id + 1, true);

    p.run(&config, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);
    let specs: Vec<(&str, Vec<&str>)> = vec![
        ("ingest-site-a", vec!["ingest", "--site", "site-a", "--from-debezium", "--quiet"]),
        ("ingest-site-b", vec!["ingest", "--site", "site-b", "--quiet"]),
        ("ingest-site-c", vec!["ingest", "--site", "site-c", "--from-debezium", "--quiet"]),
        ("transform", vec!["transform"]),
        ("sink-hq-mysql", vec!["sink", "hq-mysql", "--quiet"]),
        ("sink-parquet", vec!["sink", "parquet", "--quiet"]),
    ];
    let mut procs: Vec<Proc> = specs
        .into_iter()
        .map(|(name, a)| {
            let args: Vec<String> = a.iter().map(|s| s.to_string()).chain(["--metrics-port".into(), "0".into()]).collect();
            let child = start(&config, &args, &p.dir.path().join(format!("{name}.log")));
            Proc { name: name.to_string(), args, child, starts: 1 }
        })
        .collect();
    // The workload starts once both connectors stream (a heartbeat came through each input):
    // a cold Connect worker's snapshot can take longer than the whole workload, and the kill
    // below must land while the clinic is still writing.
    for site in ["site-a", "site-c"] {
        let topic = format!("{}omrs.cdc.{site}", p.prefix);
        wait_for(300, &format!("a Debezium heartbeat in {topic}"), || {
            read_topic(&topic).iter().any(|e| e.op == omrs_core::envelope::Op::Heartbeat).then_some(())
        });
    }
    let sim_cfg = cfg.clone();
    let sim = tokio::spawn(async move { omrs_simulate::run(&sim_cfg, &omrs_simulate::SimulateArgs { no_provision: true, ..args }).await });

    // site-a's Debezium input is killed once the workload's changes are flowing through it.
    let cdc_a = format!("{}omrs.cdc.site-a", p.prefix);
    let (snapshot_rows, _) = wait_for(300, "site-a's changes past its snapshot in omrs.cdc.site-a", || {
        let events = read_topic(&cdc_a);
        let live = events.iter().filter(|e| !e.source.snapshot && e.table.is_some()).count();
        (live > 200).then_some((events.len() - live, live))
    });
    assert!(snapshot_rows > 1000, "site-a's snapshot came through Debezium: {snapshot_rows} rows");
    assert!(!sim.is_finished(), "the workload is still writing when the input is killed");
    let a = procs.iter_mut().find(|pr| pr.name == "ingest-site-a").unwrap();
    kill9(&mut a.child);
    eprintln!("site-a's Debezium input SIGKILLed");
    a.child = start(&config, &a.args, &p.dir.path().join("ingest-site-a.log"));
    a.starts += 1;

    // An OpenMRS upgrade at a Debezium clinic while it works: the connector's DDL record changes
    // the input's table model, the new column reaches HQ and the lake with the rows using it.
    let mut site_a = admin(3311, Some(&p.database)).await;
    site_a.query_drop("ALTER TABLE person_name ADD COLUMN name_origin VARCHAR(64) NULL AFTER family_name").await.unwrap();
    site_a.query_drop("UPDATE person_name SET name_origin = CONCAT('site-a registry ', person_name_id), date_changed = NOW() WHERE person_name_id <= 5").await.unwrap();

    let m = sim.await.unwrap().unwrap();
    eprintln!("debezium: {} row changes by the simulator", m.row_changes);
    let report = drain_until_verified(&config, Some(&manifest), &lake_dir, &mut procs, p.dir.path(), 480, "the Debezium sites' workload").await;
    assert_eq!(report["ok"], true);
    let origins = |port: u16, db: String| async move {
        let mut c = admin(port, Some(&db)).await;
        c.query::<(String, String), _>("SELECT uuid, name_origin FROM person_name WHERE name_origin IS NOT NULL ORDER BY uuid").await.unwrap()
    };
    let at_site = origins(3311, p.database.clone()).await;
    assert_eq!(at_site.len(), 5);
    assert_eq!(origins(HQ_PORT, hq_db.clone()).await, at_site, "the column added at site-a holds its values at HQ");

    drop(procs);
    let (lost, doubled) = assert_as_reference(&reference, &hq_db, "two clinics through Debezium, one input SIGKILLed").await;
    assert_eq!((lost, doubled), (0, 0));

    // Value for value, the Debezium input's events of each clinic are the agent's: every row's
    // final image and its references, folded from omrs.cdc.<site> of each run.
    for site in ["site-a", "site-c"] {
        let ours = fold(&read_topic(&format!("{}omrs.cdc.{site}", reference.p.prefix)));
        let events = read_topic(&format!("{}omrs.cdc.{site}", p.prefix));
        // The connector's heartbeats came through while the clinic was quiet, and none overtook
        // a change: each is later than every change before it.
        let mut latest = i64::MIN;
        let mut heartbeats = 0;
        for e in &events {
            if e.op == omrs_core::envelope::Op::Heartbeat {
                assert!(e.source.ts_ms >= latest, "{site}: a heartbeat at {} after a change at {latest}", e.source.ts_ms);
                heartbeats += 1;
            } else if !e.source.snapshot {
                latest = latest.max(e.source.ts_ms);
            }
        }
        assert!(heartbeats > 0, "{site}: no heartbeat in its topic");
        let theirs = fold(&events);
        let differ: Vec<_> = ours.iter().filter(|(k, v)| theirs.get(*k) != Some(*v)).take(5).collect();
        let extra: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).take(5).collect();
        assert!(differ.is_empty() && extra.is_empty(), "{site}: rows whose image or references differ from the agent's (agent's shown): {differ:#?}\nrows only the Debezium input has: {extra:?}\nthe Debezium input's: {:#?}", differ.iter().map(|(k, _)| theirs.get(*k)).collect::<Vec<_>>());
        assert!(ours.len() > 5_000, "{site}: {} rows", ours.len());
        eprintln!("debezium: {site}: {} rows, every image and reference equal to the agent's; {heartbeats} heartbeats", ours.len());
    }
    drop_databases(&[&hq_db], &p.database).await;
}

type Image = serde_json::Map<String, serde_json::Value>;

/// Each row's final (after image, references), by table and key, from a site's events.
fn fold(events: &[omrs_core::envelope::ChangeEvent]) -> std::collections::BTreeMap<(String, String), (Image, Image)> {
    let mut out = std::collections::BTreeMap::new();
    for ev in events {
        let (Some(t), Some(k)) = (&ev.table, &ev.key) else { continue };
        let key = (t.clone(), serde_json::to_string(k).unwrap());
        match (ev.op, &ev.after) {
            (omrs_core::envelope::Op::Delete, _) => {
                out.remove(&key);
            }
            (_, Some(after)) => {
                out.insert(key, (after.clone(), ev.refs.clone()));
            }
            _ => {}
        }
    }
    out
}

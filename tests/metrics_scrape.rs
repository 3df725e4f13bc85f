//! Every long-running process serves `/metrics` and `/health`, and the documented metric names
//! are there and move: three ingest agents, the transform, the HQ sink and the Parquet sink run
//! as they do in production (not in batch mode) over a small simulator workload, and each one's
//! endpoint is scraped until its counters are above zero. They listen on ports the local
//! Prometheus scrapes (`scripts/dev-up --prometheus`, `deploy/prometheus/prometheus.local.yml`),
//! which must see the same counters move and have the alerting rules loaded.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Stdio};

use common::hq::*;
use common::*;
use mysql_async::prelude::Queryable;

/// The i-th of the ports the local Prometheus scrapes that the demo leaves free (9486-9492).
fn scraped_port(i: u16) -> u16 {
    let port = 9486 + i;
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "port {port} (scraped by the local Prometheus) is in use: a demo running?");
    port
}

/// The sum of an instant query's samples at the local Prometheus; None when it has none yet.
fn prom_sum(prom: &str, query: &str) -> Option<f64> {
    let out = std::process::Command::new("curl").args(["-fsS", "-G", &format!("{prom}/api/v1/query"), "--data-urlencode", &format!("query={query}")]).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let samples = v["data"]["result"].as_array()?;
    (!samples.is_empty()).then(|| samples.iter().filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok()).sum())
}

fn get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// The sum of every sample of `name` (any labels) whose label set contains `filter`.
fn total(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

struct Kill(Vec<Child>);

impl Drop for Kill {
    fn drop(&mut self) {
        for c in &mut self.0 {
            kill9(c);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_serves_metrics_that_move() {
    let p = Pipeline { dir: tempfile::tempdir().unwrap(), prefix: format!("{}.", unique("tms")), database: unique("mss") };
    let hq_db = unique("openmrs_hq_m");
    let lake = p.dir.path().join("lake");
    let cfg_path = p.config(
        &hq_db,
        &[
            ("${OMRS_LAKE:-/var/lib/omrs-stream/lake}", &path_str(&lake)),
            ("roll_interval_ms = 10000", "roll_interval_ms = 300"),
        ],
    );
    p.run(&cfg_path, &["topics", "apply"]);
    let cfg = omrs_core::config::Config::load(&cfg_path).unwrap();
    let args = workload(&p, 30, 5);
    omrs_simulate::run(&cfg, &args).await.unwrap();
    p.run(&cfg_path, &["sink", "hq-mysql", "--init", "--dump", &path_str(&dump())]);

    let spawn = |args: &[&str], port: u16| -> Child {
        bin()
            .arg("--config")
            .arg(&cfg_path)
            .args(args)
            .args(["--metrics-port", &port.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut procs = Kill(Vec::new());
    let mut ports = Vec::new();
    for (i, site) in ["site-a", "site-b", "site-c"].into_iter().enumerate() {
        let port = scraped_port(i as u16);
        procs.0.push(spawn(&["ingest", "--site", site, "--quiet"], port));
        ports.push((format!("ingest {site}"), port, "omrs_stream_events_out_total", "stage=\"ingest\""));
    }
    let port = scraped_port(3);
    procs.0.push(spawn(&["transform"], port));
    ports.push(("transform".into(), port, "omrs_stream_events_out_total", "stage=\"transform\""));
    let port = scraped_port(4);
    procs.0.push(spawn(&["sink", "hq-mysql", "--quiet"], port));
    ports.push(("hq-mysql".into(), port, "omrs_stream_hq_rows_applied_total", ""));
    let port = scraped_port(5);
    procs.0.push(spawn(&["sink", "parquet", "--quiet"], port));
    ports.push(("parquet".into(), port, "omrs_stream_lake_rows_written_total", ""));

    for (what, port, name, filter) in &ports {
        let text = wait_for(180, &format!("{what}: {name}{{{filter}}} above zero on :{port}"), || {
            let t = get(*port, "/metrics")?;
            (total(&t, name, filter) > 0.0).then_some(t)
        });
        assert!(get(*port, "/health").is_some_and(|h| h.starts_with("HTTP/1.0 200") || h.starts_with("HTTP/1.1 200")), "{what}: /health");
        // The images' HEALTHCHECK agrees.
        let check = std::process::Command::new(root().join("deploy/docker/healthcheck")).env("OMRS_HEALTH_PORT", port.to_string()).output().unwrap();
        assert!(check.status.success(), "{what}: deploy/docker/healthcheck: {}", String::from_utf8_lossy(&check.stdout));
        assert!(total(&text, "omrs_stream_up", "") >= 1.0, "{what}: omrs_stream_up");
        // Every consuming stage reports its lag per partition, from librdkafka's statistics.
        if let Some(stage) = [("transform", "transform"), ("hq-mysql", "hq_mysql"), ("parquet", "parquet")].iter().find(|(w, _)| w == what).map(|(_, s)| *s) {
            wait_for(60, &format!("{what}: omrs_stream_consumer_lag_messages{{stage=\"{stage}\"}}"), || {
                get(*port, "/metrics").filter(|t| t.contains(&format!("omrs_stream_consumer_lag_messages{{partition=\"0\",stage=\"{stage}\""))).map(|_| ())
            });
        }
        match what.as_str() {
            "transform" => {
                assert!(total(&text, "omrs_stream_events_in_total", "stage=\"transform\"") > 0.0, "transform events in");
                assert!(text.contains("omrs_stream_global_watermark_ms"), "transform watermark");
                assert!(text.contains("omrs_stream_site_idle"), "idle sites");
            }
            "hq-mysql" => {
                assert!(text.contains("omrs_stream_hq_end_to_end_latency_seconds_bucket"), "HQ latency histogram");
                assert!(text.contains("omrs_stream_parked_rows"), "HQ pending rows");
            }
            "parquet" => {
                assert!(total(&text, "omrs_stream_lake_files_written_total", "dataset=\"changes\"") > 0.0, "lake files");
                assert!(total(&text, "omrs_stream_lake_bytes_written_total", "") > 0.0, "lake bytes");
                assert!(text.contains("omrs_stream_lake_manifest_lag_messages"), "manifest lag");
            }
            _ => {
                assert!(text.contains("omrs_stream_ingest_binlog_position") || text.contains("omrs_stream_snapshot_rows_total"), "{what}: ingest position");
                // The dev servers keep 14 days of binlogs (deploy/mariadb: expire_logs_days=14).
                let site = what.trim_start_matches("ingest ");
                let retention = wait_for(120, &format!("{what}: omrs_stream_ingest_binlog_retention_seconds"), || {
                    let t = get(*port, "/metrics")?;
                    let v = total(&t, "omrs_stream_ingest_binlog_retention_seconds", &format!("site=\"{site}\""));
                    (v > 0.0).then_some(v)
                });
                assert_eq!(retention, 14.0 * 86400.0, "{what}: binlog retention");
            }
        }
    }
    // The local Prometheus scrapes each of them and has the alerting rules.
    let prom = std::env::var("OMRS_PROMETHEUS_URL").unwrap_or_else(|_| "http://127.0.0.1:9090".into());
    let ready = std::process::Command::new("curl").args(["-fsS", &format!("{prom}/-/ready")]).output().unwrap();
    assert!(ready.status.success(), "no Prometheus at {prom}: start it with deploy/prometheus/prometheus-up (scripts/test does, through scripts/dev-up --prometheus)");
    for (what, port, name, filter) in &ports {
        let labels = if filter.is_empty() { format!("instance=\"127.0.0.1:{port}\"") } else { format!("instance=\"127.0.0.1:{port}\",{filter}") };
        let up = wait_for(60, &format!("Prometheus: {what} up"), || prom_sum(&prom, &format!("up{{instance=\"127.0.0.1:{port}\"}}")).filter(|v| *v == 1.0));
        assert_eq!(up, 1.0);
        let v = wait_for(60, &format!("Prometheus: {name}{{{labels}}} above zero"), || prom_sum(&prom, &format!("{name}{{{labels}}}")).filter(|v| *v > 0.0));
        eprintln!("Prometheus sees {what}: {name} = {v}");
    }
    let rules = std::process::Command::new("curl").args(["-fsS", &format!("{prom}/api/v1/rules")]).output().unwrap();
    let rules = String::from_utf8_lossy(&rules.stdout).to_string();
    for alert in ["OmrsDeadLetters", "OmrsTargetDown"] {
        assert!(rules.contains(&format!("\"name\":\"{alert}\"")), "the local Prometheus has not loaded alert {alert}");
    }
    drop(procs);

    let mut admin_hq = admin(HQ_PORT, None).await;
    admin_hq.query_drop(format!("DROP DATABASE IF EXISTS `{hq_db}`")).await.unwrap();
    for port in [3311, 3312, 3313] {
        let mut c = admin(port, None).await;
        c.query_drop(format!("DROP DATABASE IF EXISTS `{}`", p.database)).await.unwrap();
    }
}

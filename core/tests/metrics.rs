//! The metrics endpoint serves every registered metric and a health check over real HTTP.

use std::time::Duration;

use omrs_core::endpoint;
use omrs_core::metrics::metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn get(addr: std::net::SocketAddr, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out)).await.unwrap().unwrap();
    out
}

#[tokio::test]
async fn metrics_and_health_are_served() {
    metrics().events_in.with_label_values(&["test", "site-a", "obs", "c"]).inc_by(3);
    metrics().global_watermark.set(1234);
    let (addr, _h) = endpoint::serve("127.0.0.1:0".parse().unwrap(), "test").await.unwrap();
    let body = get(addr, "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains(r#"omrs_stream_events_in_total{op="c",site="site-a",stage="test",table="obs"} 3"#),
        "{body}"
    );
    assert!(body.contains("omrs_stream_global_watermark_ms 1234"), "{body}");
    assert!(body.contains(r#"omrs_stream_up{stage="test"} 1"#), "{body}");
    let build = format!(r#"omrs_stream_build_info{{stage="test",version="{}"}} 1"#, env!("CARGO_PKG_VERSION"));
    assert!(body.contains(&build), "{build} in {body}");
    for process in ["process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"] {
        assert!(body.contains(&format!("\n{process} ")), "{process} in {body}");
    }

    // Readiness: not before the stage says so, not while it retries, and not once stuck.
    let health = get(addr, "/health").await;
    assert!(health.starts_with("HTTP/1.1 503") && health.ends_with("starting\n"), "{health}");
    endpoint::ready();
    let health = get(addr, "/health").await;
    assert!(health.starts_with("HTTP/1.1 200 OK") && health.ends_with("ok\n"), "{health}");
    endpoint::not_ready("retrying after a transient error: HQ is away");
    let health = get(addr, "/health").await;
    assert!(health.starts_with("HTTP/1.1 503") && health.ends_with("not ready: retrying after a transient error: HQ is away\n"), "{health}");
    endpoint::ready();
    assert!(endpoint::health().0);
    assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
    // A request head larger than the old hand-written server took (4 KiB) is served.
    let long = format!("/health?{}", "x".repeat(8000));
    assert!(get(addr, &long).await.starts_with("HTTP/1.1 200 OK"));
}

#[test]
fn every_metric_name_has_the_project_prefix() {
    let text = metrics().render();
    for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
        let name = line.split_whitespace().nth(2).unwrap();
        // Besides ours, only the standard process metrics.
        assert!(name.starts_with("omrs_stream_") || name.starts_with("process_"), "{name}");
    }
}

/// The repository's root.
fn repo_root() -> std::path::PathBuf {
    std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("..")
}

/// Every metric name core/src/metrics.rs declares.
fn declared_metrics() -> std::collections::HashSet<String> {
    include_str!("../src/metrics.rs")
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const ") && l.contains(": &str = \"omrs_stream_"))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .collect()
}

/// The shipped alerting rules name only metrics that exist, and both Prometheus configs load them.
#[test]
fn the_alert_rules_name_real_metrics() {
    let (root, declared) = (repo_root(), declared_metrics());
    assert!(declared.len() > 30, "read the metric names: {declared:?}");
    let rules = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap();
    let mut named = 0;
    for (at, _) in rules.match_indices("omrs_stream_") {
        let name: String = rules[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let base = ["_bucket", "_sum", "_count"].iter().fold(name.clone(), |n, s| n.strip_suffix(s).map(str::to_string).unwrap_or(n));
        assert!(declared.contains(&base), "alerts.yml names `{name}`, which core/src/metrics.rs does not declare");
        named += 1;
    }
    assert!(named >= 10, "alerts.yml names {named} metrics");
    assert_eq!(rules.matches("- alert:").count(), rules.matches("expr:").count(), "every rule has an expr");
    for cfg in ["prometheus.yml", "prometheus.local.yml"] {
        let text = std::fs::read_to_string(root.join("deploy/prometheus").join(cfg)).unwrap();
        assert!(text.contains("rule_files:\n  - alerts.yml"), "{cfg} does not load alerts.yml");
    }
}

/// The shipped Grafana dashboards parse, name only metrics that exist, use only provisioned
/// datasources, and filter by clinic and stage: the `$site` and `$stage` variables exist and
/// the per-site and per-stage metrics use them; the operations dashboard has its per-clinic table.
#[test]
fn the_dashboards_name_real_metrics_and_filter_by_clinic_and_stage() {
    let (root, declared) = (repo_root(), declared_metrics());
    let provisioned: String = std::fs::read_dir(root.join("deploy/grafana/provisioning/datasources"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    let mut dashboards = 0;
    for entry in std::fs::read_dir(root.join("deploy/grafana/dashboards")).unwrap() {
        let path = entry.unwrap().path();
        let d: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        dashboards += 1;
        let mut panels: Vec<&serde_json::Value> = Vec::new();
        for p in d["panels"].as_array().unwrap() {
            panels.push(p);
            panels.extend(p["panels"].as_array().into_iter().flatten());
        }
        let mut exprs = Vec::new();
        for p in &panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                let uid = t["datasource"]["uid"].as_str().or(p["datasource"]["uid"].as_str()).unwrap_or("");
                assert!(provisioned.contains(&format!("uid: {uid}\n")), "{}: panel `{}` uses datasource `{uid}`, which is not provisioned", path.display(), p["title"]);
                exprs.extend(t["expr"].as_str().or(t["rawSql"].as_str()).map(str::to_string));
            }
        }
        let dash: Vec<&str> = omrs_core::hq::AGGREGATES.iter().map(|a| a.hq_table).collect();
        for e in &exprs {
            for (at, _) in e.match_indices("omrs_dash_") {
                let table: String = e[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                assert!(dash.contains(&table.as_str()), "{}: `{table}` is not one of HQ's dashboard tables {dash:?}", path.display());
            }
            for (at, _) in e.match_indices("omrs_stream_") {
                let name: String = e[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let base = ["_bucket", "_sum", "_count"].iter().fold(name.clone(), |n, s| n.strip_suffix(s).map(str::to_string).unwrap_or(n));
                assert!(declared.contains(&base), "{}: `{name}` is not declared in core/src/metrics.rs", path.display());
            }
        }
        if d["uid"] == "omrs-clinical" {
            // Every query reads HQ's dashboard tables for the chosen clinics.
            assert!(exprs.len() >= 5 && exprs.iter().all(|e| e.contains("omrs_dash_") && e.contains("($site)")), "{exprs:?}");
        }
        if d["uid"] != "omrs-stream" {
            continue;
        }
        let vars: Vec<&str> = d["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
        assert_eq!(vars, ["site", "stage"]);
        for (metric, var) in [
            ("omrs_stream_events_in_total", "$site"),
            ("omrs_stream_site_watermark_ms", "$site"),
            ("omrs_stream_late_events_total", "$site"),
            ("omrs_stream_hq_end_to_end_latency_seconds", "$site"),
            ("omrs_stream_up", "$stage"),
            ("omrs_stream_consumer_lag_messages", "$stage"),
            ("omrs_stream_dead_lettered_total", "$stage"),
        ] {
            let using: Vec<&String> = exprs.iter().filter(|e| e.contains(metric)).collect();
            assert!(!using.is_empty() && using.iter().all(|e| e.contains(var)), "every query of {metric} filters by {var}: {using:?}");
        }
        let clinics = panels.iter().find(|p| p["title"] == "Clinics").expect("the per-clinic table");
        assert_eq!(clinics["type"], "table");
        let targets = clinics["targets"].as_array().unwrap();
        assert!(targets.len() >= 8 && targets.iter().all(|t| t["expr"].as_str().unwrap().contains("by (site)") && t["instant"] == true), "{targets:?}");
    }
    assert!(dashboards >= 2);
}

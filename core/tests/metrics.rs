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

/// The shipped alerting rules name only metrics that exist, and both Prometheus configs load them.
#[test]
fn the_alert_rules_name_real_metrics() {
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("..");
    let declared: std::collections::HashSet<String> = include_str!("../src/metrics.rs")
        .lines()
        .filter(|l| l.trim_start().starts_with("pub const ") && l.contains(": &str = \"omrs_stream_"))
        .filter_map(|l| l.split('"').nth(1).map(str::to_string))
        .collect();
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

//! Reading the stages' `/metrics` pages: a plain HTTP/1.0 GET and the Prometheus text format,
//! enough for the demo's progress line and summary (sums by label, histogram quantiles) and for
//! `omrs-stream status`. Our own endpoints only: no redirects, no TLS, no chunked bodies.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::error::CoreError;

#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }
}

/// One scrape of `http://127.0.0.1:<port>/metrics`; `None` when the process does not answer.
pub async fn scrape(port: u16) -> Option<Vec<Sample>> {
    scrape_url(&format!("http://127.0.0.1:{port}/metrics")).await.ok()
}

/// `url`'s `HOST:PORT` and path (`/metrics` when none is given), or why it is not an
/// `http://HOST:PORT[/PATH]` URL: checked before anything connects.
pub fn split_url(url: &str) -> Result<(&str, &str), CoreError> {
    let fail = |message: &str| CoreError::Scrape { url: url.to_string(), message: message.to_string() };
    let rest = url.strip_prefix("http://").ok_or_else(|| fail("not an http:// URL (expected http://HOST:PORT/metrics)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok((authority, path)),
        _ => Err(fail("expected http://HOST:PORT/metrics")),
    }
}

/// One scrape of `url` (`http://HOST:PORT[/PATH]`), within 3 s.
pub async fn scrape_url(url: &str) -> Result<Vec<Sample>, CoreError> {
    let fail = |message: String| CoreError::Scrape { url: url.to_string(), message };
    let (authority, path) = split_url(url)?;
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(authority).await.map_err(|e| fail(e.to_string()))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes()).await.map_err(|e| fail(e.to_string()))?;
        let mut body = Vec::new();
        s.read_to_end(&mut body).await.map_err(|e| fail(e.to_string()))?;
        let text = String::from_utf8_lossy(&body).into_owned();
        let (head, page) = text.split_once("\r\n\r\n").ok_or_else(|| fail("not an HTTP response".into()))?;
        let status = head.lines().next().unwrap_or_default();
        if status.split(' ').nth(1) != Some("200") {
            return Err(fail(format!("answered `{status}`")));
        }
        Ok(parse(page))
    };
    tokio::time::timeout(Duration::from_secs(3), fetch).await.map_err(|_| fail("no answer within 3 s".into()))?
}

/// The Prometheus text exposition format: `name{k="v",…} value`, comments skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = match line.rfind(' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else { continue };
        let (name, labels) = match head.find('{') {
            Some(i) => (&head[..i], parse_labels(head[i + 1..].trim_end_matches('}'))),
            None => (head, Vec::new()),
        };
        out.push(Sample { name: name.to_string(), labels, value });
    }
    out
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 2..];
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.push((key, val));
        rest = &after[end.min(after.len())..];
    }
    out
}

/// The sum of every sample of `name` whose labels include all of `filter`.
pub fn sum(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    samples.iter().filter(|s| s.name == name && filter.iter().all(|(k, v)| s.label(k) == Some(v))).map(|s| s.value).sum()
}

/// Sums of `name` per value of `label`, skipping samples for which `keep` says no.
pub fn by_label(samples: &[Sample], name: &str, label: &str, keep: impl Fn(&Sample) -> bool) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == name && keep(s)) {
        if let Some(v) = s.label(label) {
            *out.entry(v.to_string()).or_insert(0.0) += s.value;
        }
    }
    out
}

/// `now` minus `before`, sample by sample (same name and labels): the counts of an interval.
pub fn minus(now: &[Sample], before: &[Sample]) -> Vec<Sample> {
    now.iter()
        .map(|s| {
            let b = before.iter().find(|x| x.name == s.name && x.labels == s.labels).map(|x| x.value).unwrap_or(0.0);
            Sample { value: s.value - b, ..s.clone() }
        })
        .collect()
}

/// The `q` quantile of histogram `name`, all label sets together, interpolated linearly inside
/// the bucket (as PromQL's histogram_quantile does). `None` without observations.
pub fn quantile(samples: &[Sample], name: &str, q: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in samples.iter().filter(|s| s.name == bucket) {
        let le = match s.label("le")? {
            "+Inf" => f64::INFINITY,
            v => v.parse::<f64>().ok()?,
        };
        by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
    }
    let mut buckets: Vec<(f64, f64)> = by_le.into_values().collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let span = count - prev.1;
            let frac = if span > 0.0 { (rank - prev.1) / span } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP x y
# TYPE omrs_stream_events_in_total counter
omrs_stream_events_in_total{op="insert",site="site-a",stage="transform",table="obs"} 10
omrs_stream_events_in_total{op="heartbeat",site="site-a",stage="transform",table=""} 3
omrs_stream_events_in_total{op="update",site="site-b",stage="transform",table="obs"} 5
lat_bucket{site="a",le="1"} 50
lat_bucket{site="a",le="2"} 90
lat_bucket{site="a",le="+Inf"} 100
lat_bucket{site="b",le="1"} 0
lat_bucket{site="b",le="2"} 0
lat_bucket{site="b",le="+Inf"} 0
omrs_stream_up{stage="a \"quoted\" one"} 1
"#;

    #[test]
    fn metrics_urls_are_checked_before_connecting() {
        assert_eq!(split_url("http://127.0.0.1:9467/metrics").unwrap(), ("127.0.0.1:9467", "/metrics"));
        assert_eq!(split_url("http://agents.vpn:9467").unwrap(), ("agents.vpn:9467", "/metrics"));
        for bad in ["127.0.0.1:9467", "https://x:1/metrics", "http://x/metrics", "http://:9467", "http://x:port"] {
            let e = split_url(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("http://HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn sums_and_labels() {
        let s = parse(PAGE);
        assert_eq!(sum(&s, "omrs_stream_events_in_total", &[("site", "site-a")]), 13.0);
        let per = by_label(&s, "omrs_stream_events_in_total", "site", |s| s.label("op") != Some("heartbeat"));
        assert_eq!(per.get("site-a"), Some(&10.0));
        assert_eq!(per.get("site-b"), Some(&5.0));
        assert_eq!(s.last().and_then(|x| x.label("stage")), Some("a \"quoted\" one"));
    }

    #[test]
    fn histogram_quantiles() {
        let s = parse(PAGE);
        assert_eq!(quantile(&s, "lat", 0.5), Some(1.0));
        let p75 = quantile(&s, "lat", 0.75).unwrap();
        assert!((p75 - 1.625).abs() < 1e-9, "{p75}");
        // Above the last finite bucket: its bound.
        assert_eq!(quantile(&s, "lat", 0.99), Some(2.0));
        assert_eq!(quantile(&[], "lat", 0.5), None);
        // An interval: everything before it subtracted.
        let d = minus(&s, &s);
        assert_eq!(quantile(&d, "lat", 0.5), None);
    }
}

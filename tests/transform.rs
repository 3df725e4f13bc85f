//! The transform end to end on the real broker: exactly once across SIGKILLs on a 100 k-event
//! input, merges equal to an uninterrupted run, a new site topic picked up while running, and
//! order independence across interleavings and restart points.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;
use omrs_core::envelope::{ChangeEvent, Op, Row, Source};
use omrs_transform::engine::HqEvent;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use serde_json::json;

fn input(people: usize, obs_per_person: usize) -> BTreeMap<String, Vec<ChangeEvent>> {
    omrs_transform::synth::input(3, people, obs_per_person, 5)
}

fn producer() -> FutureProducer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", "127.0.0.1:9092")
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .unwrap()
}

async fn produce(prefix: &str, site: &str, events: &[ChangeEvent]) {
    let p = producer();
    let topic = format!("{prefix}omrs.cdc.{site}");
    for ev in events {
        let payload = ev.to_json();
        loop {
            match p.send_result(FutureRecord::<str, [u8]>::to(&topic).payload(&payload)) {
                Ok(_) => break,
                Err(_) => {
                    p.poll(Duration::from_millis(10));
                }
            }
        }
    }
    p.flush(Duration::from_secs(60)).unwrap();
}

/// The two records of synthetic person `h` split by decision `i` (every tenth decision is a
/// split of a real duplicate: `h = 5 i`, registered at its home site and the next one).
fn split_pair(i: usize) -> Option<[String; 2]> {
    let h = i * 5;
    i.is_multiple_of(10).then(|| [format!("p-site-{}-{h}", (b'a' + (h % 3) as u8) as char), format!("p-site-{}-{h}", (b'a' + ((h + 1) % 3) as u8) as char)])
}

/// 100 decisions (`review-<round*100+i>`) on the decisions topic, as `identity confirm` and
/// `identity split` write them: confirmations, and every tenth a split.
async fn produce_decisions(prefix: &str, round: usize) {
    let p = producer();
    let topic = format!("{prefix}omrs.identity.decisions");
    for i in round * 100..(round + 1) * 100 {
        let pair = split_pair(i);
        let d = omrs_core::hq::review::Decision {
            action: if pair.is_some() { "split" } else { "confirm" }.into(),
            review_id: format!("review-{i:03}"),
            reason: "identifier_link".into(),
            person: format!("p-{i}"),
            records: vec![format!("p-{i}"), format!("q-{i}")],
            evidence: json!({"value": format!("NID{i}")}),
            site: "site-a".into(),
            ts_ms: 1_700_000_000_000 + i as i64,
            decided: omrs_core::hq::review::Decided { by: "dm".into(), at_ms: 1_800_000_000_000, note: None },
            keep: pair.as_ref().map(|p| vec![p[0].clone()]).unwrap_or_default(),
            other: pair.as_ref().map(|p| vec![p[1].clone()]).unwrap_or_default(),
        };
        let payload = serde_json::to_vec(&d).unwrap();
        p.send(FutureRecord::<str, [u8]>::to(&topic).key(&d.review_id).payload(&payload), Duration::from_secs(30)).await.unwrap();
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    config: PathBuf,
    prefix: String,
}

fn setup(tag: &str) -> Setup {
    setup_with(tag, &[])
}

fn setup_with(tag: &str, tweaks: &[(&str, &str)]) -> Setup {
    let prefix = format!("{}.", unique(tag));
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("omrs-stream.toml"))
        .unwrap()
        .replace("[kafka]\n", &format!("[kafka]\ntopic_prefix = \"{prefix}\"\n"))
        .replace("idle_timeout_s = 180", "idle_timeout_s = 3")
        .replace("out_of_orderness_ms = 2000", "out_of_orderness_ms = 500");
    let text = tweaks.iter().fold(text, |t, (from, to)| t.replace(from, to));
    let config = dir.path().join("omrs-stream.toml");
    std::fs::write(&config, text).unwrap();
    let out = bin().arg("--config").arg(&config).args(["topics", "apply"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Setup { _dir: dir, config, prefix }
}

fn transform(s: &Setup, until_idle: bool) -> Child {
    let mut c = bin();
    c.arg("--config").arg(&s.config).args(["transform", "--metrics-port", "0"]);
    if until_idle {
        c.arg("--until-idle");
    }
    c.env("RUST_LOG", "warn").stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

fn run_to_end(s: &Setup) {
    let out = transform(s, true).wait_with_output().unwrap();
    assert!(out.status.success(), "transform failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The end offsets of `topic`, summed over its partitions.
fn high(topic: &str) -> i64 {
    let c: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    let parts = omrs_core::kafka::topic_partitions(c.client(), topic, Duration::from_secs(10)).unwrap();
    parts.iter().map(|p| c.fetch_watermarks(topic, *p, Duration::from_secs(10)).map(|(_, h)| h).unwrap_or(0)).sum()
}

fn read_out(topic: &str) -> Vec<HqEvent> {
    read_json(topic)
}

type Id = (String, String, String, u64);

fn change_ids(out: &[HqEvent]) -> Vec<Id> {
    out.iter()
        .filter_map(|e| match e {
            HqEvent::Change { event, .. } => Some((event.site.clone(), event.table.clone().unwrap(), serde_json::to_string(&event.key).unwrap(), event.source.pos)),
            _ => None,
        })
        .collect()
}

/// Final person → survivor, from the merge and split events in stream order.
fn assignment(out: &[HqEvent]) -> BTreeMap<String, String> {
    let mut parent: HashMap<String, String> = HashMap::new();
    for e in out {
        match e {
            HqEvent::Merge { winner, loser, .. } => {
                parent.insert(loser.clone(), winner.clone());
            }
            HqEvent::Split { survivor, records, .. } => {
                parent.remove(survivor);
                for r in records.iter().filter(|r| *r != survivor) {
                    parent.insert(r.clone(), survivor.clone());
                }
            }
            _ => {}
        }
    }
    let mut res = BTreeMap::new();
    for p in parent.keys() {
        let mut cur = p.clone();
        let mut guard = 0;
        while let Some(n) = parent.get(&cur) {
            if *n == cur || guard > 100 {
                break;
            }
            cur = n.clone();
            guard += 1;
        }
        res.insert(p.clone(), cur);
    }
    res
}

fn expected_ids(input: &BTreeMap<String, Vec<ChangeEvent>>) -> Vec<Id> {
    let mut v: Vec<Id> = input
        .values()
        .flatten()
        .filter(|e| e.op != Op::Heartbeat)
        .map(|e| (e.site.clone(), e.table.clone().unwrap(), serde_json::to_string(&e.key).unwrap(), e.source.pos))
        .collect();
    v.sort();
    v
}

async fn cleanup(prefix: &str) {
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    let names: Vec<String> = ["omrs.cdc.site-a", "omrs.cdc.site-b", "omrs.cdc.site-c", "omrs.cdc.site-d", "omrs.hq.changes", "omrs.transform.state", "omrs.dlq", "omrs.ingest.offsets.site-a", "omrs.ingest.offsets.site-b", "omrs.ingest.offsets.site-c", "omrs.ingest.offsets.site-d"]
        .iter()
        .map(|t| format!("{prefix}{t}"))
        .collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let _ = admin.delete_topics(&refs, &rdkafka::admin::AdminOptions::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_several_points_gives_each_event_exactly_once_and_the_same_merges() {
    // 100 k events: 8,000 people (1,600 at two sites), each with a person, an identifier
    // and 10 obs.
    let data = input(8_000, 10);
    let total: usize = data.values().map(|v| v.len()).sum();
    assert!(total >= 100_000, "{total}");
    let killed = setup("tkill");
    let clean = setup("tclean");
    for (site, evs) in &data {
        produce(&killed.prefix, site, evs).await;
        produce(&clean.prefix, site, evs).await;
    }

    // Data managers' decisions (issue #23): all of them for the clean run; for the killed one,
    // 100 more before each run that is killed.
    for round in 0..3 {
        produce_decisions(&clean.prefix, round).await;
    }
    run_to_end(&clean);

    let out_topic = format!("{}omrs.hq.changes", killed.prefix);
    for (round, target) in [5_000, 30_000, 70_000].into_iter().enumerate() {
        produce_decisions(&killed.prefix, round).await;
        let mut t = transform(&killed, true);
        wait_for(180, &format!("{out_topic} to reach {target}"), || {
            if let Ok(Some(s)) = t.try_wait() {
                panic!("transform exited early: {s}");
            }
            (high(&out_topic) >= target).then_some(())
        });
        kill9(&mut t);
    }
    run_to_end(&killed);

    let out = read_out(&out_topic);
    let mut got = change_ids(&out);
    got.sort();
    let want = expected_ids(&data);
    let dupes = got.windows(2).filter(|w| w[0] == w[1]).count();
    assert_eq!(dupes, 0, "events emitted twice");
    assert_eq!(got.len(), want.len(), "events lost or doubled");
    assert_eq!(got, want);

    let clean_out = read_out(&format!("{}omrs.hq.changes", clean.prefix));
    let decided = |out: &[HqEvent]| -> Vec<(String, String, String)> {
        let mut d: Vec<_> = out
            .iter()
            .filter_map(|e| match e {
                HqEvent::IdentityReview { review_id, status, decided: Some(by), .. } => Some((review_id.clone(), status.clone(), by.by.clone())),
                _ => None,
            })
            .collect();
        d.sort();
        d
    };
    let want_decided: Vec<(String, String, String)> =
        (0..300).map(|i| (format!("review-{i:03}"), if split_pair(i).is_some() { "split" } else { "confirmed" }.to_string(), "dm".to_string())).collect();
    assert_eq!(decided(&out), want_decided, "every decision re-emitted exactly once across the kills");
    assert_eq!(decided(&clean_out), want_decided);
    // Each split pair ends apart, said exactly once: split after its merge, or (the decision
    // read before the records' identifiers) kept from merging, with an open review.
    for i in (0..300).filter(|i| split_pair(*i).is_some()) {
        let mut pair = split_pair(i).unwrap();
        pair.sort();
        for (run, o) in [("killed", &out), ("clean", &clean_out)] {
            let splits = o.iter().filter(|e| matches!(e, HqEvent::Split { records, .. } if records.iter().any(|r| pair.contains(r)))).count();
            let shared = o.iter().filter(|e| matches!(e, HqEvent::IdentityReview { reason, records, .. } if reason == "identifier_shared" && records[..] == pair[..])).count();
            assert_eq!((splits + shared, splits.min(shared)), (1, 0), "{run} run, split {i} of {pair:?}: {splits} splits, {shared} reviews");
        }
    }
    let a = assignment(&out);
    assert_eq!(a.len(), 1_570, "every duplicate merged once, but the 30 split");
    assert_eq!(a, assignment(&clean_out), "merges differ from the uninterrupted run");
    cleanup(&killed.prefix).await;
    cleanup(&clean.prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_site_topic_is_consumed_without_a_restart() {
    let s = setup("tnew");
    let mut t = transform(&s, false);
    let out_topic = format!("{}omrs.hq.changes", s.prefix);
    // A site that is not in the config and whose topic did not exist at start.
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", "127.0.0.1:9092").create().unwrap();
    let topic = format!("{}omrs.cdc.site-d", s.prefix);
    admin
        .create_topics([&rdkafka::admin::NewTopic::new(&topic, 1, rdkafka::admin::TopicReplication::Fixed(1))], &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let mut key = Row::new();
    key.insert("location_id".into(), json!(1));
    let ev = ChangeEvent {
        op: Op::Create,
        site: "site-d".into(),
        table: Some("location".into()),
        key: Some(key.clone()),
        uuid: Some("loc-d-1".into()),
        before: None,
        after: Some(key),
        refs: Default::default(),
        source: Source { server_id: 4, gtid: None, file: "binlog.000001".into(), pos: 1, row: 0, ts_ms: now, snapshot: false },
        ts_ms: now,
        oversize: None,
        schema: None,
    };
    let hb = ChangeEvent::heartbeat("site-d", Source { server_id: 4, gtid: None, file: "binlog.000001".into(), pos: 2, row: 0, ts_ms: now + 10_000, snapshot: false }, now);
    produce(&s.prefix, "site-d", &[ev, hb]).await;
    let got = wait_for(120, "the new site's event on the output", || {
        read_out(&out_topic).into_iter().find(|e| matches!(e, HqEvent::Change { event, .. } if event.site == "site-d"))
    });
    if let HqEvent::Change { event, .. } = got {
        assert_eq!(event.uuid.as_deref(), Some("loc-d-1"));
    }
    assert!(t.try_wait().unwrap().is_none(), "transform still running");
    kill9(&mut t);
    cleanup(&s.prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_interleavings_and_restarts_give_the_same_identities_and_events() {
    let data = input(1_500, 4);
    let want = expected_ids(&data);
    let mut results = Vec::new();

    // 1. Everything produced, one uninterrupted run.
    let v1 = setup("tord1");
    for (site, evs) in &data {
        produce(&v1.prefix, site, evs).await;
    }
    run_to_end(&v1);
    results.push(read_out(&format!("{}omrs.hq.changes", v1.prefix)));

    // 2. Sites arrive in reverse order, with a run in between (site-c alone first).
    let v2 = setup("tord2");
    produce(&v2.prefix, "site-c", &data["site-c"]).await;
    run_to_end(&v2);
    produce(&v2.prefix, "site-b", &data["site-b"]).await;
    produce(&v2.prefix, "site-a", &data["site-a"]).await;
    run_to_end(&v2);
    results.push(read_out(&format!("{}omrs.hq.changes", v2.prefix)));

    // 3. Each site's first half, a run killed part-way, then the rest.
    let v3 = setup("tord3");
    for (site, evs) in &data {
        produce(&v3.prefix, site, &evs[..evs.len() / 2]).await;
    }
    let out_topic = format!("{}omrs.hq.changes", v3.prefix);
    let mut t = transform(&v3, false);
    wait_for(120, "some output", || (high(&out_topic) >= 2_000).then_some(()));
    kill9(&mut t);
    for (site, evs) in &data {
        produce(&v3.prefix, site, &evs[evs.len() / 2..]).await;
    }
    run_to_end(&v3);
    results.push(read_out(&out_topic));

    let first = assignment(&results[0]);
    assert_eq!(first.len(), 300);
    for (i, r) in results.iter().enumerate() {
        let mut ids = change_ids(r);
        ids.sort();
        assert_eq!(ids, want, "variant {} emitted a different multiset of events", i + 1);
        assert_eq!(assignment(r), first, "variant {} assigned identities differently", i + 1);
    }
    let _ = BTreeSet::<()>::new();
    for v in [v1, v2, v3] {
        cleanup(&v.prefix).await;
    }
}

/// Issue #24: every event is emitted on arrival. Site-c is configured and silent, ten minutes
/// from its idle timeout, so it holds the global watermark back; the ordered merge this replaced
/// held every event of site-a and site-b until then. Now they all come out at once, each
/// site's in the order it wrote them, none late, and no watermark is published while site-c
/// may still send older events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_site_holds_no_other_sites_events_back() {
    let mut data = input(300, 4);
    data.retain(|site, _| site != "site-c");
    let s = setup_with("tsilent", &[("idle_timeout_s = 3", "idle_timeout_s = 600")]);
    for (site, evs) in &data {
        produce(&s.prefix, site, evs).await;
    }
    let mut child = transform(&s, false);
    let want = expected_ids(&data);
    let topic = format!("{}omrs.hq.changes", s.prefix);
    let out = wait_for(120, "every event of site-a and site-b at the output", || {
        let out = read_out(&topic);
        (change_ids(&out).len() >= want.len()).then_some(out)
    });
    let _ = child.kill();
    let _ = child.wait();
    for (site, evs) in &data {
        let got: Vec<u64> = out
            .iter()
            .filter_map(|e| match e {
                HqEvent::Change { event, .. } if &event.site == site => Some(event.source.pos),
                _ => None,
            })
            .collect();
        let wrote: Vec<u64> = evs.iter().filter(|e| e.op != Op::Heartbeat).map(|e| e.source.pos).collect();
        assert_eq!(got, wrote, "{site}'s events in the order it wrote them");
    }
    let mut ids = change_ids(&out);
    ids.sort();
    assert_eq!(ids, want);
    assert!(out.iter().all(|e| !matches!(e, HqEvent::Change { late: true, .. })), "nothing is late");
    assert!(!out.iter().any(|e| matches!(e, HqEvent::Watermark { .. })), "site-c holds the watermark back");
    cleanup(&s.prefix).await;
}

//! Transform throughput benchmark (run by `scripts/bench-transform`, release build).
//!
//! `bench_transform fill PREFIX SITES PEOPLE` pre-fills PREFIX's site topics with an obs-heavy
//! synthetic OpenMRS mix (20 obs per person, 20 % of people at two sites);
//! `bench_transform run PREFIX SITES` then runs the transform from those topics to committed
//! output (`--until-idle`) in this process, and prints `BENCH <name> <value> <unit>` lines.

use std::time::{Duration, Instant};

use omrs_core::config::{Config, TopicsFile};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

fn config(prefix: &str, sites: usize) -> Config {
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("..");
    let mut cfg = Config::load(&root.join("omrs-stream.toml")).unwrap();
    cfg.kafka.topic_prefix = prefix.into();
    // BENCH_AGGREGATES=0: the same run without the dashboard aggregates, to see their cost.
    if std::env::var("BENCH_AGGREGATES").is_ok_and(|v| v == "0") {
        cfg.aggregates.enabled = false;
    }
    let template = cfg.sites[0].clone();
    cfg.sites = (0..sites)
        .map(|i| {
            let mut s = template.clone();
            s.name = format!("site-{}", (b'a' + i as u8) as char);
            s
        })
        .collect();
    cfg
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    omrs_core::runtime::disable_transparent_huge_pages();
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("");
    let prefix = args.get(2).cloned().unwrap_or_else(|| "bench.".into());
    let sites: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
    let cfg = config(&prefix, sites);
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("..");
    match mode {
        "fill" => {
            let people: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(50_000);
            let topics = TopicsFile::load(&root.join("topics.toml")).unwrap().resolve(&cfg.site_names(), &prefix);
            omrs_core::topics::apply(&cfg.kafka, &topics).await.unwrap();
            let data = omrs_transform::synth::input(sites, people, 20, 5);
            let producer: FutureProducer = omrs_core::kafka::client_config(&cfg.kafka)
                .set("linger.ms", "20")
                .set("compression.type", "lz4")
                .set("queue.buffering.max.messages", "2000000")
                .set("queue.buffering.max.kbytes", "2097152")
                .create()
                .unwrap();
            let mut n = 0;
            for (site, evs) in &data {
                let topic = format!("{prefix}omrs.cdc.{site}");
                for ev in evs {
                    let payload = ev.to_json();
                    while producer.send_result(FutureRecord::<str, [u8]>::to(&topic).payload(&payload)).is_err() {
                        producer.poll(Duration::from_millis(5));
                    }
                    n += 1;
                }
            }
            producer.flush(Duration::from_secs(300)).unwrap();
            eprintln!("filled {n} events into {sites} site topics");
        }
        "run" => {
            let consumer: BaseConsumer = omrs_core::kafka::client_config(&cfg.kafka).create().unwrap();
            let mut input = 0i64;
            for site in cfg.site_names() {
                input += consumer.fetch_watermarks(&format!("{prefix}omrs.cdc.{site}"), 0, Duration::from_secs(10)).map(|(_, h)| h).unwrap_or(0);
            }
            let args = omrs_transform::TransformArgs { metrics_port: None, until_idle: true };
            let t = Instant::now();
            omrs_transform::runner::run(&cfg, &args).await.unwrap();
            let secs = t.elapsed().as_secs_f64();
            let m = omrs_core::metrics::metrics();
            let records = m.identity_records.get().max(1);
            let out = consumer.fetch_watermarks(&format!("{prefix}omrs.hq.changes"), 0, Duration::from_secs(10)).map(|(_, h)| h).unwrap_or(0);
            println!("BENCH transform_input_events {input} events");
            println!("BENCH transform_output_records {out} records");
            println!("BENCH transform_seconds {secs:.1} s");
            println!("BENCH transform_throughput {:.0} events/s", input as f64 / secs);
            println!("BENCH transform_merges {} merges", m.merges.get());
            println!("BENCH transform_peak_rss {} MiB", status_kib("VmHWM:") / 1024);
            println!("BENCH identity_records {records} records");
            println!("BENCH identity_bytes_per_record {:.0} bytes", m.identity_bytes.get() as f64 / records as f64);
            // Leave the broker as we found it.
            let names: Vec<String> = TopicsFile::load(&root.join("topics.toml")).unwrap().resolve(&cfg.site_names(), &prefix).into_iter().map(|t| t.name).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = omrs_core::kafka::client_config(&cfg.kafka).create().unwrap();
            let _ = admin.delete_topics(&refs, &rdkafka::admin::AdminOptions::new()).await;
        }
        _ => eprintln!("usage: bench_transform fill PREFIX SITES PEOPLE | run PREFIX SITES"),
    }
}

//! librdkafka client settings built from [`KafkaConfig`], with TLS/SASL passed through.
//!
//! Every stage builds its producers, consumers and admin clients from [`client_config`], so a
//! deployment that needs `sasl_ssl` sets it once in `omrs-stream.toml`.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::error::{CoreError, Result};

/// Base client settings: bootstrap servers, security, then raw `properties` (which win).
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &cfg.bootstrap_servers);
    let optional = [
        ("security.protocol", &cfg.security_protocol),
        ("sasl.mechanisms", &cfg.sasl_mechanism),
        ("sasl.username", &cfg.sasl_username),
        ("sasl.password", &cfg.sasl_password),
        ("ssl.ca.location", &cfg.ssl_ca_location),
        ("ssl.certificate.location", &cfg.ssl_certificate_location),
        ("ssl.key.location", &cfg.ssl_key_location),
        ("ssl.key.password", &cfg.ssl_key_password),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            cc.set(key, v);
        }
    }
    for (k, v) in &cfg.properties {
        cc.set(k, v);
    }
    cc
}

/// A consumer context that publishes how far a stage's consumer is behind, per partition, as
/// `omrs_stream_consumer_lag_messages{stage,topic,partition}`: the partition's last stable offset
/// (read_committed) minus the next offset the stage will be handed, from librdkafka's
/// statistics every [`LAG_STATS_INTERVAL_MS`] (set `statistics.interval.ms` to it).
pub struct LagContext {
    stage: &'static str,
}

/// The settings every transactional producer of change records shares (the site agents and
/// the transform): its `transactional.id`, large batches with a short linger, lz4, and the
/// largest record it may send. A stage adds its own on top.
pub fn transactional_producer(cfg: &KafkaConfig, transactional_id: String, max_message_bytes: usize) -> ClientConfig {
    let mut c = client_config(cfg);
    c.set("transactional.id", transactional_id)
        .set("transaction.timeout.ms", "60000")
        .set("linger.ms", "5")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("compression.type", "lz4")
        .set("message.max.bytes", max_message_bytes.to_string());
    c
}

/// The settings every consumer of the pipeline's topics shares (the transform and the sinks):
/// read committed records only, offsets stored by the stage itself with what it writes, lag
/// statistics, and a drained prefetch queue refilled at once (librdkafka otherwise backs off
/// for a second after a full queue, and the stages drain theirs in milliseconds). A stage adds
/// its own on top.
pub fn read_committed_consumer(cfg: &KafkaConfig, group_id: String) -> ClientConfig {
    let mut c = client_config(cfg);
    c.set("statistics.interval.ms", LAG_STATS_INTERVAL_MS)
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .set("fetch.max.bytes", "52428800")
        .set("fetch.queue.backoff.ms", "10")
        // A partition resumed after back-pressure is fetched within this time, instead of
        // waiting for a fetch that long-polls the partitions already at their end (default 500).
        .set("fetch.wait.max.ms", "20");
    c
}

/// How often librdkafka reports the statistics the lag gauge is read from.
pub const LAG_STATS_INTERVAL_MS: &str = "5000";

impl LagContext {
    pub fn new(stage: &'static str) -> Self {
        LagContext { stage }
    }
}

impl rdkafka::ClientContext for LagContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's "internal UA" partition and unknown offsets.
                if *partition < 0 || p.app_offset < 0 || p.ls_offset < 0 {
                    continue;
                }
                let lag = (p.ls_offset - p.app_offset).max(0);
                crate::metrics::metrics().consumer_lag.with_label_values(&[self.stage, topic.as_str(), &partition.to_string()]).set(lag);
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}

/// The partitions of `topic`, ascending, from the broker's metadata: none when the topic does
/// not exist. `client` is any consumer's or producer's.
pub fn topic_partitions<C: rdkafka::ClientContext>(client: &rdkafka::client::Client<C>, topic: &str, timeout: Duration) -> rdkafka::error::KafkaResult<Vec<i32>> {
    let md = client.fetch_metadata(Some(topic), timeout)?;
    let mut partitions: Vec<i32> = md.topics().iter().filter(|t| t.error().is_none()).flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    partitions.sort_unstable();
    Ok(partitions)
}

/// Reads every partition of `topic` from the beginning to its current end, read_committed,
/// partition after partition (each in order), calling `f(key, payload, offset)` for each
/// record. A missing topic is a definite error that says to run `topics apply`; `f` returning
/// Err stops the read with that message.
pub fn read_to_end(
    cfg: &KafkaConfig,
    topic: &str,
    mut f: impl FnMut(Option<&[u8]>, &[u8], i64) -> std::result::Result<(), String>,
) -> Result<()> {
    let consumer: BaseConsumer = client_config(cfg)
        .set("group.id", format!("omrs-reader-{topic}"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "false")
        .create()
        .map_err(|e| CoreError::kafka(format!("creating a reader for {topic}"), e))?;
    let missing = || CoreError::Kafka {
        context: format!("topic {topic}"),
        message: "does not exist: create the topics first with `omrs-stream topics apply`".into(),
        transient: false,
    };
    let partitions = topic_partitions(consumer.client(), topic, Duration::from_secs(30)).map_err(|e| CoreError::kafka(format!("reading the metadata of {topic}"), e))?;
    if partitions.is_empty() {
        return Err(missing());
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for part in partitions {
        // A topic just created, or a broker busy moving leaders, answers "not leader" for a
        // moment: asked again until the deadline.
        let (low, high) = loop {
            match consumer.fetch_watermarks(topic, part, Duration::from_secs(30)) {
                Ok(w) => break w,
                Err(e) if matches!(e.rdkafka_error_code(), Some(RDKafkaErrorCode::NotLeaderForPartition | RDKafkaErrorCode::LeaderNotAvailable)) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    return Err(match e.rdkafka_error_code() {
                        Some(RDKafkaErrorCode::UnknownPartition | RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic) => missing(),
                        _ => CoreError::kafka(format!("reading the end of {topic}"), e),
                    })
                }
            }
        };
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, part, Offset::Beginning).map_err(|e| CoreError::kafka(format!("assigning {topic}"), e))?;
        consumer.assign(&tpl).map_err(|e| CoreError::kafka(format!("assigning {topic}"), e))?;
        loop {
            if let Some(msg) = consumer.poll(Duration::from_millis(200)) {
                let msg = msg.map_err(|e| CoreError::kafka(format!("reading {topic}"), e))?;
                if let Some(payload) = msg.payload() {
                    f(msg.key(), payload, msg.offset()).map_err(|m| CoreError::Kafka { context: format!("{topic} partition {part} offset {}", msg.offset()), message: m, transient: false })?;
                }
            }
            // The position, not the last offset: a transactional topic ends with a commit marker.
            let pos = consumer.position().ok().and_then(|p| p.find_partition(topic, part).map(|e| e.offset()));
            if let Some(Offset::Offset(o)) = pos {
                if o >= high {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(CoreError::Kafka { context: format!("reading {topic} to its end"), message: "timed out".into(), transient: true });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_settings_pass_through() {
        let mut cfg = KafkaConfig {
            security_protocol: Some("sasl_ssl".into()),
            sasl_mechanism: Some("SCRAM-SHA-512".into()),
            sasl_username: Some("site-a".into()),
            sasl_password: Some("pw".into()),
            ssl_ca_location: Some("/etc/ca.pem".into()),
            ..KafkaConfig::default()
        };
        cfg.properties.insert("client.id".into(), "omrs".into());
        let cc = client_config(&cfg);
        assert_eq!(cc.get("bootstrap.servers"), Some("127.0.0.1:9092"));
        assert_eq!(cc.get("security.protocol"), Some("sasl_ssl"));
        assert_eq!(cc.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        assert_eq!(cc.get("sasl.username"), Some("site-a"));
        assert_eq!(cc.get("sasl.password"), Some("pw"));
        assert_eq!(cc.get("ssl.ca.location"), Some("/etc/ca.pem"));
        assert_eq!(cc.get("client.id"), Some("omrs"));
        assert_eq!(cc.get("ssl.key.location"), None);
    }
}

//! `omrs-stream ingest --site S --from-debezium`: a clinic that an existing Debezium deployment
//! (Kafka Connect's MariaDB or MySQL connector, or OpenMRS DB Sync) already streams, read from
//! its topics instead of its binlog, into `omrs.cdc.<site>` in this project's envelope.
//!
//! Delivery guarantee: **exactly once** from the Debezium topics into `omrs.cdc.<site>`. The
//! input's position, the next offset of every Debezium topic partition, is a checkpoint in
//! `omrs.ingest.offsets.<site>` written in the same Kafka transaction as the events it covers,
//! the ids learned from them and any dead letter; a restart reads on from there, and
//! `transactional.id` (the site's, as for the binlog agent) fences a second input of the site.
//! Nothing is committed on the Debezium side, so its topics may be on another cluster
//! (`[sites.debezium] kafka`).
//!
//! - [`record`]: Debezium's records (with or without schemas).
//! - [`order`]: the site's binlog order from the per-table topics.
//! - [`values`]: Debezium's value forms → the envelope's.
//! - [`ids`], [`build`]: foreign keys → uuids from the stream itself; the change event.
//!
//! Ahead of the ordered read, a second consumer reads the topics of referenced tables (person,
//! encounter, concept…) to their end, learning ids only, so that a change whose parent comes
//! later in the merge's order (cycles such as `users` ↔ `person` in the snapshot) still
//! resolves. A reference to a row that neither has seen waits `ref_wait_ms`, then the change
//! is dead-lettered (`unresolved_reference`) and the site goes on.

pub mod build;
pub mod ids;
pub mod order;
pub mod record;
pub mod values;
mod input;

use mysql_async::Conn;
use omrs_core::config::{Config, DebeziumConfig, ModelSource, SiteConfig};
use omrs_core::model::Model;

use crate::checkpoint::{self, Checkpoint};
use crate::{IngestArgs, IngestError};

/// One run of the site's Debezium input, from its checkpoint (or, `fresh`, from the topics'
/// beginning).
pub async fn run_once(cfg: &Config, site: &SiteConfig, args: &IngestArgs, fresh: bool) -> Result<(), IngestError> {
    let dbz = site.debezium.clone().ok_or_else(|| not_configured(site))?;
    let mut model = load_model(cfg, site, &dbz).await?;
    let names = omrs_core::topics::TopicNames::new(cfg.kafka.topic_prefix.clone());
    let offsets_topic = names.ingest_offsets(&site.name);
    let producer = crate::producer::TxProducer::new(&cfg.kafka, &site.name, names.cdc(&site.name), offsets_topic.clone())?;
    let mut ids = ids::Ids::default();
    let (cp, history) = if fresh {
        (None, crate::schema::History::default())
    } else {
        checkpoint::read_state(&cfg.kafka, &offsets_topic, &site.name, Some(&mut ids))?
    };
    history.apply_to(&mut model);
    let resume = match cp {
        None => input::Resume::default(),
        Some(Checkpoint::Debezium { offsets, position, ts_ms }) => input::Resume { offsets, position, ts_ms },
        Some(_) => {
            return Err(IngestError::Usage(format!(
                "site {}'s checkpoint is the binlog agent's, not the Debezium input's: run `ingest --site {}` without --from-debezium, or add --resnapshot to read the Debezium topics from their beginning",
                site.name, site.name
            )))
        }
    };
    tracing::info!(site = %site.name, tables = model.tables.len(), ids = ids.len(), topic_prefix = %dbz.topic_prefix, resumed = !resume.offsets.is_empty(), "Debezium input starting");
    let mut input = input::Input::new(cfg, site, dbz, model, ids, producer, resume)?;
    omrs_core::endpoint::ready();
    input.run(args.until_caught_up, args.quiet).await
}

fn not_configured(site: &SiteConfig) -> IngestError {
    IngestError::Usage(format!(
        "site {} has no [sites.debezium] section: --from-debezium needs its connector's topic_prefix (docs/OPERATIONS.md, \"Using an existing Debezium deployment\")",
        site.name
    ))
}

/// Checks, before anything connects, that `--from-debezium` can run for `site`.
pub fn check(site: &SiteConfig) -> Result<(), IngestError> {
    site.debezium.as_ref().map(|_| ()).ok_or_else(|| not_configured(site))
}

/// The table model: from HQ's database (the programme's OpenMRS schema) or the clinic's.
async fn load_model(cfg: &Config, site: &SiteConfig, dbz: &DebeziumConfig) -> Result<Model, IngestError> {
    let (db, what) = match dbz.model {
        ModelSource::Hq => (&cfg.hq.database, "HQ"),
        ModelSource::Site => (&site.database, "the site"),
    };
    let mut conn = Conn::new(db.opts())
        .await
        .map_err(|e| IngestError::site(&format!("connecting to {what} ({}) for the table model", db.redacted_url()), e))?;
    let model = Model::load(&mut conn, &db.database, &cfg.ingest.include, &cfg.ingest.exclude).await?;
    let _ = conn.disconnect().await;
    if model.tables.is_empty() {
        return Err(IngestError::Usage(format!("database `{}` of {what} has no tables: the Debezium input reads its table model there", db.database)));
    }
    Ok(model)
}

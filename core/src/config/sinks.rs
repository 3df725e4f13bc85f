//! `[sinks]`: the HQ MySQL sink and the Parquet lake.

use super::*;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinksConfig {
    #[serde(default)]
    pub hq_mysql: HqSinkConfig,
    #[serde(default)]
    pub parquet: ParquetSinkConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HqSinkConfig {
    /// How long a row may wait for its parent before it is dead-lettered.
    #[serde(default = "default_fk_wait")]
    pub fk_wait_timeout_s: u64,
    #[serde(default = "default_pending")]
    pub max_pending_rows: usize,
    /// A batch (one HQ transaction) holds at most this many records. It is made when the sink
    /// is ready for it, from what has arrived, and closes once nothing more is ready.
    #[serde(default = "default_batch_rows")]
    pub batch_max_rows: usize,
    /// An empty batch waits this many milliseconds for its first record.
    #[serde(default = "default_batch_ms")]
    pub batch_max_ms: u64,
    /// HQ's own foreign-key checks on the sink's inserts and updates. Off by default: the sink
    /// writes a row only once every row it references is at HQ (or staged before it in the same
    /// transaction), and parks it otherwise (semantics 7), so the server's check repeats work
    /// the sink has done; it cost HQ about a fifth of its CPU in the bench. Deletes are always
    /// checked. Turn it on when other writers delete rows at HQ while the sink runs.
    #[serde(default)]
    pub server_fk_checks: bool,
    /// Rows new to HQ go in without a lookup first. The sink keeps a filter of the uuids HQ
    /// may hold (read from HQ in the background at start, plus every row it gives an id since);
    /// a created or snapshot row whose uuid the filter has never seen is inserted straight
    /// away. HQ's unique index on `uuid` still guards it: if the uuid is there after all (a
    /// writer other than the sink), the batch rolls back and the sink restarts from its stored
    /// offsets, looking that table's rows up again. Off: every row is looked up first.
    #[serde(default = "default_true")]
    pub uuid_filter: bool,
}

fn default_batch_rows() -> usize {
    5_000
}
fn default_batch_ms() -> u64 {
    100
}

fn default_fk_wait() -> u64 {
    600
}
fn default_pending() -> usize {
    100_000
}

impl Default for HqSinkConfig {
    fn default() -> Self {
        HqSinkConfig {
            fk_wait_timeout_s: default_fk_wait(),
            max_pending_rows: default_pending(),
            batch_max_rows: default_batch_rows(),
            batch_max_ms: default_batch_ms(),
            server_fk_checks: false,
            uuid_filter: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParquetSinkConfig {
    #[serde(default = "default_lake")]
    pub path: PathBuf,
    /// Files roll (one manifest commit) when this many bytes of records are buffered…
    #[serde(default = "default_roll_bytes")]
    pub roll_max_bytes: usize,
    /// …or when the oldest buffered record is this old, whichever comes first.
    #[serde(default = "default_roll_ms")]
    pub roll_interval_ms: u64,
    /// How often the sink rebuilds `current/` and the views (0: only on demand). A compaction
    /// that took T is followed by at least 3 T without one, whatever this says.
    #[serde(default = "default_compact_s")]
    pub compact_interval_s: u64,
    /// Rows per Parquet row group.
    #[serde(default = "default_row_group")]
    pub row_group_rows: usize,
    /// Where a new lake's table model comes from. False (the default): the stream itself;
    /// every agent sends each table's shape ahead of its snapshot, and DDL changes after it.
    /// True: HQ's `information_schema`, read once at the lake's first start, for topics written
    /// by agents that sent no shapes (before 2026-12) or records produced by hand.
    #[serde(default)]
    pub schema_from_hq: bool,
}

fn default_lake() -> PathBuf {
    PathBuf::from("/var/lib/omrs-stream/lake")
}
fn default_roll_bytes() -> usize {
    128 << 20
}
fn default_roll_ms() -> u64 {
    10_000
}
fn default_compact_s() -> u64 {
    60
}
fn default_row_group() -> usize {
    128 * 1024
}

impl Default for ParquetSinkConfig {
    fn default() -> Self {
        ParquetSinkConfig {
            path: default_lake(),
            roll_max_bytes: default_roll_bytes(),
            roll_interval_ms: default_roll_ms(),
            compact_interval_s: default_compact_s(),
            row_group_rows: default_row_group(),
            schema_from_hq: false,
        }
    }
}

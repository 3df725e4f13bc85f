//! The lake on disk, and its manifest: a small transaction log that says which files exist and
//! which Kafka offsets they cover.
//!
//! ```text
//! <lake>/_schema.json                       table model (from the sites' table shapes)
//! <lake>/_manifest/<seq>.json               one commit: files, offsets, watermark
//! <lake>/_manifest/<seq>.checkpoint.json    the whole state up to <seq> (older entries deleted)
//! <lake>/_tmp/                              files being written (removed on start)
//! <lake>/_writer.lock                       flock held by the one process writing the lake
//! <lake>/changes/<table>/site=<s>/date=<d>/part-<seq>-<n>.parquet
//! <lake>/changes/<table>/site=<s>/date=<d>/_COMPLETE
//! <lake>/_snapshots/<id>/…                  current state and views, see `compact`
//! <lake>/current -> _snapshots/<id>/current, <lake>/views -> _snapshots/<id>/views
//! ```
//!
//! A commit: the data files are written under `_tmp/` and fsynced; the manifest entry that names
//! them (with their final paths and the offsets after them) is written, fsynced and renamed
//! into `_manifest/`: that rename is the commit. The files are then renamed into place. A crash
//! before the entry's rename leaves only temp files (deleted on start, their records read
//! again); a crash after it is rolled forward on start. So a final-named file is always a
//! committed one, and each record is in exactly one.
//!
//! Durability: before the entry's rename, `_tmp/` is fsynced (the files' names, not only their
//! bytes) and so is the parent of every directory created for the final paths; after the
//! renames, the directories they went into. A power loss therefore never leaves a committed
//! entry naming a file that is under neither of its names.
//!
//! One writer: whatever changes the lake (the sink for its whole life, `--compact` for its
//! run) first takes [`LakeLock`], an exclusive `flock` on `_writer.lock`. [`Lake::open`], which
//! deletes what `_tmp/` holds, and `compact` need it, so a second process can never delete the
//! running sink's fsynced but not yet committed files.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::SinkError;

/// Entries between two checkpoints.
const CHECKPOINT_EVERY: u64 = 256;

/// `(table, site, date)`.
pub type PartKey = (String, String, String);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    /// The manifest entry that committed it.
    pub seq: u64,
    /// Relative to the lake.
    pub path: String,
    pub table: String,
    pub site: String,
    pub date: String,
    pub rows: u64,
    pub bytes: u64,
    pub first_offset: i64,
    pub last_offset: i64,
    /// Written into a date partition that was already complete.
    #[serde(default)]
    pub late: bool,
}

/// One commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub files: Vec<FileEntry>,
    /// Temp path → final path (relative), for roll-forward.
    pub renames: Vec<(String, String)>,
    /// Kafka partition → next offset to read.
    pub offsets: BTreeMap<i32, i64>,
    /// The global watermark seen up to these offsets (ms): the least of the partitions'.
    pub watermark: Option<i64>,
    /// Kafka partition → the latest watermark record read in it (ms). Absent from entries of
    /// versions before partitioned `omrs.hq.changes`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partition_watermarks: BTreeMap<i32, i64>,
    /// Date partitions this commit finalised (watermark passed their end).
    pub completed: Vec<PartKey>,
    pub committed_at_ms: i64,
}

/// Raises partition `p`'s watermark in `to` to `w` if that is later.
pub(crate) fn raise_watermark(to: &mut BTreeMap<i32, i64>, p: i32, w: i64) {
    let at = to.entry(p).or_insert(w);
    *at = (*at).max(w);
}

/// A finalised date partition.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Completion {
    pub watermark_ms: i64,
    /// 1 when completed; bumped by every late file that lands after.
    pub revision: u32,
}

/// What the manifest says, folded.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct State {
    pub seq: u64,
    pub offsets: BTreeMap<i32, i64>,
    pub watermark: Option<i64>,
    /// Kafka partition → the latest watermark record read in it.
    #[serde(default)]
    pub partition_watermarks: BTreeMap<i32, i64>,
    pub files: Vec<FileEntry>,
    /// Partitions that hold at least one file.
    pub partitions: BTreeSet<PartKey>,
    pub complete: BTreeMap<PartKey, Completion>,
}

impl State {
    fn apply(&mut self, e: &Entry) {
        self.seq = e.seq;
        for (p, o) in &e.offsets {
            self.offsets.insert(*p, *o);
        }
        if e.watermark.is_some() {
            self.watermark = e.watermark;
        }
        for (p, w) in &e.partition_watermarks {
            raise_watermark(&mut self.partition_watermarks, *p, *w);
        }
        for f in &e.files {
            let key = (f.table.clone(), f.site.clone(), f.date.clone());
            if f.late {
                if let Some(c) = self.complete.get_mut(&key) {
                    c.revision += 1;
                    c.watermark_ms = self.watermark.unwrap_or(c.watermark_ms);
                }
            }
            self.partitions.insert(key);
            self.files.push(f.clone());
        }
        for k in &e.completed {
            self.complete.entry(k.clone()).or_insert(Completion { watermark_ms: e.watermark.unwrap_or(0), revision: 1 });
        }
    }

    /// The watermark after a file set that read the watermark records `seen` (the latest per
    /// Kafka partition): each partition's latest, and the global watermark, the least of them
    /// over `partitions`. The transform writes each watermark to every partition after the
    /// records it covers, so a partition read further than another cannot finalise a date the
    /// other still has rows of. A partition with none yet counts as the global watermark
    /// before (a lake of a single-partition version); the global one never goes back.
    pub fn next_watermark(&self, seen: &BTreeMap<i32, i64>, partitions: &[i32]) -> (Option<i64>, BTreeMap<i32, i64>) {
        let mut per = self.partition_watermarks.clone();
        for (p, w) in seen {
            raise_watermark(&mut per, *p, *w);
        }
        let least = partitions.iter().map(|p| per.get(p).copied().or(self.watermark)).collect::<Option<Vec<i64>>>().and_then(|v| v.into_iter().min());
        let global = match (least, self.watermark) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        (global, per)
    }

    /// The partitions the watermark `wm` has passed the end of and that are not final yet
    /// (including those `extra` adds).
    pub fn newly_complete(&self, wm: i64, extra: &BTreeSet<PartKey>) -> Vec<PartKey> {
        self.partitions
            .iter()
            .chain(extra.iter())
            .filter(|k| !self.complete.contains_key(*k) && date_end_ms(&k.2).is_some_and(|end| end <= wm))
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }
}

/// The end (exclusive) of a `YYYY-MM-DD` partition, ms.
pub fn date_end_ms(date: &str) -> Option<i64> {
    omrs_core::arrow_map::parse_date_days(date).map(|d| (d as i64 + 1) * 86_400_000)
}

/// `YYYY-MM-DD` of an event time (UTC).
pub fn date_of(ms: i64) -> String {
    thread_local! {
        // The last day asked for: consecutive events are nearly always on the same day.
        static LAST: std::cell::RefCell<(i64, String)> = const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    let day = ms.div_euclid(86_400_000);
    LAST.with(|l| {
        let mut l = l.borrow_mut();
        if l.0 != day {
            let d = chrono::DateTime::from_timestamp_millis(day * 86_400_000).map(|t| t.date_naive());
            *l = (day, d.map(|d| d.format("%Y-%m-%d").to_string()).unwrap_or_else(|| "1970-01-01".into()));
        }
        l.1.clone()
    })
}

pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SinkError {
    let c = context.into();
    move |e| SinkError::io(c, e)
}

/// fsyncs a directory, so that a rename in it is durable.
pub fn sync_dir(dir: &Path) -> Result<(), SinkError> {
    std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io(format!("fsync {}", dir.display())))
}

/// Creates `dir` and its missing parents durably: the parent of each directory it creates is
/// fsynced, so that a file renamed into `dir` (and fsynced there) survives a power loss.
pub fn create_dir_durable(dir: &Path) -> Result<(), SinkError> {
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.as_os_str().is_empty() && !d.exists() {
        missing.push(d);
        match d.parent() {
            Some(p) => d = p,
            None => break,
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    for m in missing.iter().rev() {
        match m.parent() {
            Some(p) if !p.as_os_str().is_empty() => sync_dir(p)?,
            _ => sync_dir(Path::new("."))?,
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: a temp file in `tmp_dir`, fsync, rename, fsync the dir.
pub fn write_atomic(tmp_dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), SinkError> {
    let tmp = tmp_dir.join(format!("{}.{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file"), uuid::Uuid::new_v4().simple()));
    let mut f = std::fs::File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io(format!("writing {}", tmp.display())))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(format!("renaming {} into place", path.display())))?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

/// The lake directory.
#[derive(Debug, Clone)]
pub struct Lake {
    pub root: PathBuf,
}

/// Who takes the lake's writer lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    /// `sink parquet`, for its whole life (its scheduled compactions included).
    Sink,
    /// `sink parquet --compact`, for its run.
    Compaction,
}

impl Writer {
    fn role(self) -> &'static str {
        match self {
            Writer::Sink => "sink parquet",
            Writer::Compaction => "sink parquet --compact",
        }
    }
}

/// The lake's writer lock: an exclusive `flock` on `<lake>/_writer.lock`, held by the one
/// process that may change the lake, released when it is dropped. The kernel releases it too
/// when the process ends however it ends (SIGKILL, a crash), so there is never a stale lock to
/// clean up. The pid, role and start written into the file only name the holder in the error
/// of a process that finds the lock taken.
#[derive(Debug)]
pub struct LakeLock {
    root: PathBuf,
    _file: std::fs::File,
}

impl Lake {
    pub fn new(root: impl Into<PathBuf>) -> Lake {
        Lake { root: root.into() }
    }
    pub fn tmp(&self) -> PathBuf {
        self.root.join("_tmp")
    }
    pub fn manifest_dir(&self) -> PathBuf {
        self.root.join("_manifest")
    }
    pub fn schema_path(&self) -> PathBuf {
        self.root.join("_schema.json")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.root.join("_snapshots")
    }
    pub fn partition_dir(&self, table: &str, site: &str, date: &str) -> PathBuf {
        self.root.join("changes").join(table).join(format!("site={site}")).join(format!("date={date}"))
    }
    pub fn lock_path(&self) -> PathBuf {
        self.root.join("_writer.lock")
    }

    /// Takes the lake's writer lock, or fails at once, naming the lake and the holder, when
    /// another process holds it.
    pub fn lock(&self, who: Writer) -> Result<LakeLock, SinkError> {
        create_dir_durable(&self.root)?;
        let path = self.lock_path();
        // Held read-only: a file open for writing for the sink's whole life would keep the lake's
        // file system from being remounted read-only (flock needs no write access).
        let file = match std::fs::File::open(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&path).map_err(io(format!("creating {}", path.display())))?;
                std::fs::File::open(&path)
            }
            other => other,
        }
        .map_err(io(format!("opening {}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                return Err(SinkError::Lake(self.busy(who, holder.trim())));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(SinkError::io(format!("locking {}", path.display()), e)),
        }
        let note = format!(
            "pid {}, {}, since {}\n",
            std::process::id(),
            who.role(),
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        );
        // Only a name for the error of whoever finds the lock taken: the flock is the lock.
        let _ = std::fs::write(&path, note);
        tracing::debug!(lake = %self.root.display(), role = who.role(), "lake writer lock taken");
        Ok(LakeLock { root: self.root.clone(), _file: file })
    }

    /// The error of `who` finding the lock held by `holder` (the lock file's text).
    fn busy(&self, who: Writer, holder: &str) -> String {
        let compaction = holder.contains(Writer::Compaction.role());
        let what = if compaction { "a compaction (`sink parquet --compact`) is running there" } else { "a Parquet sink is running there" };
        let advice = match (who, compaction) {
            (Writer::Compaction, false) => {
                "Stop it first, or leave compaction to it: a running sink compacts the lake itself every sinks.parquet.compact_interval_s and at the end of --until-idle."
            }
            (Writer::Compaction, true) => "Wait for it to finish.",
            (Writer::Sink, false) => "A lake has one writer: stop that sink first, or give this one its own lake (--lake or sinks.parquet.path).",
            (Writer::Sink, true) => "Start the sink once the compaction has finished.",
        };
        let holder = if holder.is_empty() { String::new() } else { format!("{holder}; ") };
        format!("{} is in use: {what} ({holder}it holds {}). {advice}", self.root.display(), self.lock_path().display())
    }

    /// Creates the layout, reads the manifest, rolls the last commits forward and removes what
    /// an interrupted commit left in `_tmp/` (hence the writer lock: while a sink runs, `_tmp/`
    /// holds its fsynced files of the commit in progress).
    pub fn open(&self, lock: &LakeLock) -> Result<State, SinkError> {
        if lock.root != self.root {
            return Err(SinkError::Lake(format!("opening {} with the writer lock of {}", self.root.display(), lock.root.display())));
        }
        for d in [self.root.clone(), self.tmp(), self.manifest_dir(), self.root.join("changes"), self.snapshots()] {
            create_dir_durable(&d)?;
        }
        let (state, entries) = self.read_manifest()?;
        // Roll forward: a committed file still under its temp name is renamed into place.
        let mut rolled = 0;
        let mut dirs = BTreeSet::new();
        for e in &entries {
            for (tmp, fin) in &e.renames {
                let (t, f) = (self.root.join(tmp), self.root.join(fin));
                if !f.exists() {
                    if t.exists() {
                        let parent = f.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
                        create_dir_durable(&parent)?;
                        std::fs::rename(&t, &f).map_err(io(format!("rolling {} forward", f.display())))?;
                        dirs.insert(parent);
                        rolled += 1;
                    } else {
                        return Err(SinkError::Lake(format!(
                            "the manifest (entry {}) names {} but neither it nor its temp file exists: the lake was changed by hand",
                            e.seq,
                            f.display()
                        )));
                    }
                }
            }
        }
        for d in &dirs {
            sync_dir(d)?;
        }
        if rolled > 0 {
            tracing::info!(files = rolled, "rolled committed files forward into place");
        }
        // Everything left in _tmp/ belongs to no commit.
        let mut removed = 0;
        if let Ok(rd) = std::fs::read_dir(self.tmp()) {
            for ent in rd.flatten() {
                let p = ent.path();
                let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
                r.map_err(io(format!("removing {}", p.display())))?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(files = removed, "removed temp files of an interrupted commit");
        }
        // Markers are derived from the manifest; rewrite those of the last entries.
        for e in &entries {
            let mut keys: BTreeSet<PartKey> = e.completed.iter().cloned().collect();
            keys.extend(e.files.iter().filter(|f| f.late).map(|f| (f.table.clone(), f.site.clone(), f.date.clone())));
            self.write_markers(&state, &keys)?;
        }
        Ok(state)
    }

    /// The folded state, and the entries after the last checkpoint.
    pub fn read_manifest(&self) -> Result<(State, Vec<Entry>), SinkError> {
        let dir = self.manifest_dir();
        let mut checkpoints: Vec<u64> = Vec::new();
        let mut seqs: Vec<u64> = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((State::default(), Vec::new())),
            Err(e) => return Err(SinkError::io(format!("reading {}", dir.display()), e)),
        };
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(".checkpoint.json").and_then(|n| n.parse().ok()) {
                checkpoints.push(n);
            } else if let Some(n) = name.strip_suffix(".json").and_then(|n| n.parse().ok()) {
                seqs.push(n);
            }
        }
        let mut state = match checkpoints.iter().max() {
            Some(c) => {
                let p = dir.join(format!("{c:020}.checkpoint.json"));
                let b = std::fs::read(&p).map_err(io(format!("reading {}", p.display())))?;
                serde_json::from_slice::<State>(&b).map_err(|e| SinkError::Lake(format!("{}: {e}", p.display())))?
            }
            None => State::default(),
        };
        seqs.sort_unstable();
        let mut entries = Vec::new();
        let from = state.seq;
        for s in seqs.into_iter().filter(|s| *s > from) {
            let p = dir.join(format!("{s:020}.json"));
            let b = std::fs::read(&p).map_err(io(format!("reading {}", p.display())))?;
            let e: Entry = serde_json::from_slice(&b).map_err(|e| SinkError::Lake(format!("{}: {e}", p.display())))?;
            state.apply(&e);
            entries.push(e);
        }
        Ok((state, entries))
    }

    /// Commits `entry` (its files are fsynced under `_tmp/`), then moves its files into place
    /// and writes the markers it changes. `state` is updated.
    pub fn commit(&self, state: &mut State, entry: Entry) -> Result<(), SinkError> {
        let bytes = serde_json::to_vec_pretty(&entry).map_err(|e| SinkError::Lake(format!("encoding the manifest entry: {e}")))?;
        let path = self.manifest_dir().join(format!("{:020}.json", entry.seq));
        // Before the entry exists, what it names must survive a power loss: the files' names in
        // `_tmp/` (their bytes were fsynced when written) and the directories they go into.
        let mut dirs = BTreeSet::new();
        for (_, fin) in &entry.renames {
            let f = self.root.join(fin);
            dirs.insert(f.parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone()));
        }
        for d in &dirs {
            create_dir_durable(d)?;
        }
        sync_dir(&self.tmp())?;
        write_atomic(&self.tmp(), &path, &bytes)?;
        failpoint("lake:after-manifest");
        for (i, (tmp, fin)) in entry.renames.iter().enumerate() {
            let f = self.root.join(fin);
            std::fs::rename(self.root.join(tmp), &f).map_err(io(format!("renaming {} into place", f.display())))?;
            if i == 0 {
                failpoint("lake:after-first-rename");
            }
        }
        for d in &dirs {
            sync_dir(d)?;
        }
        state.apply(&entry);
        let mut keys: BTreeSet<PartKey> = entry.completed.iter().cloned().collect();
        keys.extend(entry.files.iter().filter(|f| f.late).map(|f| (f.table.clone(), f.site.clone(), f.date.clone())));
        self.write_markers(state, &keys)?;
        if entry.seq.is_multiple_of(CHECKPOINT_EVERY) {
            self.checkpoint(state)?;
        }
        Ok(())
    }

    /// Writes the whole state as a checkpoint and deletes the entries it covers.
    fn checkpoint(&self, state: &State) -> Result<(), SinkError> {
        let bytes = serde_json::to_vec(state).map_err(|e| SinkError::Lake(format!("encoding a checkpoint: {e}")))?;
        let dir = self.manifest_dir();
        write_atomic(&self.tmp(), &dir.join(format!("{:020}.checkpoint.json", state.seq)), &bytes)?;
        for ent in std::fs::read_dir(&dir).map_err(io(format!("reading {}", dir.display())))?.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            let old = name
                .strip_suffix(".checkpoint.json")
                .or_else(|| name.strip_suffix(".json"))
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n < state.seq || (n == state.seq && !name.contains("checkpoint")));
            if old {
                let _ = std::fs::remove_file(ent.path());
            }
        }
        Ok(())
    }

    /// `_COMPLETE` in each finalised partition of `keys`: the watermark that finalised it, its
    /// revision (bumped by late files) and its files.
    pub fn write_markers(&self, state: &State, keys: &BTreeSet<PartKey>) -> Result<(), SinkError> {
        for k in keys {
            let Some(c) = state.complete.get(k) else { continue };
            let files: Vec<&FileEntry> = state.files.iter().filter(|f| f.table == k.0 && f.site == k.1 && f.date == k.2).collect();
            let marker = serde_json::json!({
                "table": k.0, "site": k.1, "date": k.2,
                "final": true,
                "watermark_ms": c.watermark_ms,
                "watermark": chrono::DateTime::from_timestamp_millis(c.watermark_ms).map(|t| t.to_rfc3339()),
                "revision": c.revision,
                "files": files.iter().map(|f| f.path.rsplit('/').next().unwrap_or("")).collect::<Vec<_>>(),
                "late_files": files.iter().filter(|f| f.late).count(),
                "rows": files.iter().map(|f| f.rows).sum::<u64>(),
            });
            let dir = self.partition_dir(&k.0, &k.1, &k.2);
            std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
            let bytes = serde_json::to_vec_pretty(&marker).unwrap_or_default();
            write_atomic(&self.tmp(), &dir.join("_COMPLETE"), &bytes)?;
        }
        Ok(())
    }
}

pub use crate::failpoint::failpoint;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, lake: &Lake, table: &str) -> Entry {
        let tmp = format!("_tmp/{seq}.parquet");
        std::fs::write(lake.root.join(&tmp), b"x").unwrap();
        let fin = format!("changes/{table}/site=a/date=2024-01-01/part-{seq:010}-000.parquet");
        Entry {
            seq,
            files: vec![FileEntry { seq, path: fin.clone(), table: table.into(), site: "a".into(), date: "2024-01-01".into(), rows: 1, bytes: 1, first_offset: seq as i64, last_offset: seq as i64, late: false }],
            renames: vec![(tmp, fin)],
            offsets: [(0, seq as i64 + 1)].into(),
            watermark: None,
            partition_watermarks: BTreeMap::new(),
            completed: vec![],
            committed_at_ms: 0,
        }
    }

    #[test]
    fn commit_recover_and_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let lock = lake.lock(Writer::Sink).unwrap();
        let mut st = lake.open(&lock).unwrap();
        for s in 1..=3 {
            let e = entry(s, &lake, "obs");
            lake.commit(&mut st, e).unwrap();
        }
        // An interrupted commit: a temp file with no entry, and an entry whose file was not
        // renamed yet.
        std::fs::write(lake.tmp().join("orphan.parquet"), b"x").unwrap();
        let e = entry(4, &lake, "obs");
        let bytes = serde_json::to_vec(&e).unwrap();
        std::fs::write(lake.manifest_dir().join(format!("{:020}.json", 4)), bytes).unwrap();
        let st = lake.open(&lock).unwrap();
        assert_eq!(st.seq, 4);
        assert_eq!(st.offsets[&0], 5);
        assert!(lake.root.join(&e.files[0].path).exists(), "rolled forward");
        assert_eq!(std::fs::read_dir(lake.tmp()).unwrap().count(), 0, "temp files removed");
        assert_eq!(st.files.len(), 4);
    }

    /// Issue 22 §4.4: a second writer (`--compact` next to a running sink) is refused at once,
    /// naming the lake and the running sink, and the sink's uncommitted files stay; the lock
    /// goes with its holder.
    #[test]
    fn a_second_writer_is_refused_and_the_sinks_temp_files_stay() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path().join("lake"));
        let sink = lake.lock(Writer::Sink).unwrap();
        let mut st = lake.open(&sink).unwrap();
        lake.commit(&mut st, entry(1, &lake, "obs")).unwrap();
        // The sink's next file set, written and fsynced, not committed yet.
        let pending = entry(2, &lake, "obs");
        let tmp = lake.root.join(&pending.renames[0].0);
        // Another process's view of the lake: its own `Lake`, its own open file description.
        let other = Lake::new(dir.path().join("lake"));
        let err = other.lock(Writer::Compaction).unwrap_err().to_string();
        let root = lake.root.display().to_string();
        assert!(err.contains(&format!("{root} is in use: a Parquet sink is running there")), "{err}");
        assert!(err.contains(&format!("pid {}, sink parquet, since ", std::process::id())), "{err}");
        assert!(err.contains("Stop it first") && err.contains("compact_interval_s"), "{err}");
        let err = other.lock(Writer::Sink).unwrap_err().to_string();
        assert!(err.contains("is in use: a Parquet sink is running there") && err.contains("one writer"), "{err}");
        assert!(tmp.exists(), "the sink's uncommitted file is still in _tmp/");
        // The sink commits it as if nobody had come by.
        lake.commit(&mut st, pending).unwrap();
        assert_eq!(st.seq, 2);
        drop(sink);
        // Released with its holder: the compaction gets it, and sees both entries.
        let compaction = other.lock(Writer::Compaction).unwrap();
        let st = other.open(&compaction).unwrap();
        assert_eq!((st.seq, st.files.len()), (2, 2));
        // ... and a sink that comes now is told a compaction runs.
        let err = lake.lock(Writer::Sink).unwrap_err().to_string();
        assert!(err.contains("a compaction (`sink parquet --compact`) is running there") && err.contains("once the compaction has finished"), "{err}");
        // A lock is for its own lake only.
        let elsewhere = Lake::new(dir.path().join("elsewhere"));
        assert!(elsewhere.open(&compaction).is_err());
    }

    /// What a commit names is durable before the commit: new partition directories exist
    /// (created with their parents fsynced) and the files are in place after it.
    #[test]
    fn commit_creates_the_partition_directories() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let lock = lake.lock(Writer::Sink).unwrap();
        let mut st = lake.open(&lock).unwrap();
        let e = entry(1, &lake, "encounter");
        let fin = lake.root.join(&e.files[0].path);
        assert!(!fin.parent().unwrap().exists());
        lake.commit(&mut st, e).unwrap();
        assert!(fin.is_file());
        assert_eq!(std::fs::read_dir(lake.tmp()).unwrap().count(), 0);
        create_dir_durable(&lake.root.join("a/b/c")).unwrap();
        assert!(lake.root.join("a/b/c").is_dir());
        create_dir_durable(&lake.root.join("a/b/c")).unwrap();
    }

    #[test]
    fn the_watermark_is_the_least_of_the_partitions() {
        let st = State::default();
        // Partition 1 has no watermark yet: none is global.
        let (g, per) = st.next_watermark(&[(0, 50)].into(), &[0, 1]);
        assert_eq!((g, per.get(&0).copied()), (None, Some(50)));
        let st = State { partition_watermarks: per, ..State::default() };
        let (g, per) = st.next_watermark(&[(1, 30)].into(), &[0, 1]);
        assert_eq!(g, Some(30));
        // Partition 1 moves on past partition 0: partition 0's is the global one.
        let st = State { partition_watermarks: per, watermark: g, ..State::default() };
        let (g, _) = st.next_watermark(&[(1, 90)].into(), &[0, 1]);
        assert_eq!(g, Some(50));
        // One partition: its latest; a lake written before per-partition watermarks
        // starts from its global one, which never goes back.
        let old = State { watermark: Some(70), ..State::default() };
        assert_eq!(old.next_watermark(&BTreeMap::new(), &[0, 1]).0, Some(70));
        assert_eq!(old.next_watermark(&[(0, 60)].into(), &[0]).0, Some(70));
        assert_eq!(old.next_watermark(&[(0, 80)].into(), &[0]).0, Some(80));
        assert_eq!(old.next_watermark(&[(0, 80)].into(), &[0, 1]).0, Some(70));
    }

    #[test]
    fn completion_and_late_files_bump_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let lake = Lake::new(dir.path());
        let lock = lake.lock(Writer::Sink).unwrap();
        let mut st = lake.open(&lock).unwrap();
        lake.commit(&mut st, entry(1, &lake, "obs")).unwrap();
        let wm = date_end_ms("2024-01-01").unwrap() + 5;
        let done = st.newly_complete(wm, &BTreeSet::new());
        assert_eq!(done.len(), 1);
        let mut e = entry(2, &lake, "person");
        e.files.clear();
        e.renames.clear();
        e.watermark = Some(wm);
        e.completed = done;
        lake.commit(&mut st, e).unwrap();
        let marker = lake.partition_dir("obs", "a", "2024-01-01").join("_COMPLETE");
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&marker).unwrap()).unwrap();
        assert_eq!(m["revision"], 1);
        let mut late = entry(3, &lake, "obs");
        late.files[0].late = true;
        lake.commit(&mut st, late).unwrap();
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&marker).unwrap()).unwrap();
        assert_eq!(m["revision"], 2);
        assert_eq!(m["late_files"], 1);
        assert_eq!(m["files"].as_array().unwrap().len(), 2);
    }
}

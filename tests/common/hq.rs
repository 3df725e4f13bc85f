//! The three-site pipeline of the sink tests (simulator → agents → transform → sinks), and
//! the HQ database in uuid space, to compare runs with each other and with the lake.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use mysql_async::prelude::Queryable;
use mysql_async::Conn;

use super::*;

pub const HQ_PORT: u16 = 3310;

pub struct Pipeline {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    pub database: String,
}

impl Drop for Pipeline {
    /// The test's topics go with it, whatever the outcome: the runs' topics are never read
    /// again (the logs stay in `dir` when a test keeps them), and thousands of test partitions
    /// had filled the broker's disk.
    fn drop(&mut self) {
        delete_topics_with_prefix(&self.prefix);
    }
}

/// Deletes every topic whose name starts with `prefix` (a test's own, never empty).
pub fn delete_topics_with_prefix(prefix: &str) {
    if prefix.is_empty() {
        return;
    }
    let prefix = prefix.to_string();
    // On a thread of its own: a Drop may run inside the test's runtime.
    let _ = std::thread::spawn(move || {
        use rdkafka::admin::{AdminClient, AdminOptions};
        use rdkafka::client::DefaultClientContext;
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let mut cfg = rdkafka::ClientConfig::new();
        cfg.set("bootstrap.servers", "127.0.0.1:9092");
        let Ok(consumer) = cfg.create::<BaseConsumer>() else { return };
        let Ok(md) = consumer.fetch_metadata(None, std::time::Duration::from_secs(10)) else { return };
        let names: Vec<String> = md.topics().iter().map(|t| t.name().to_string()).filter(|n| n.starts_with(&prefix)).collect();
        if names.is_empty() {
            return;
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let Ok(admin) = cfg.create::<AdminClient<DefaultClientContext>>() else { return };
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        let _ = rt.block_on(admin.delete_topics(&refs, &AdminOptions::new().operation_timeout(Some(std::time::Duration::from_secs(30)))));
    })
    .join();
}

impl Pipeline {
    pub fn config(&self, hq_db: &str, tweaks: &[(&str, &str)]) -> PathBuf {
        let mut text = std::fs::read_to_string(root().join("omrs-stream.toml"))
            .unwrap()
            .replace("[kafka]\n", &format!("[kafka]\ntopic_prefix = \"{}\"\n", self.prefix))
            .replace("database = \"openmrs\"\n", &format!("database = \"{}\"\n", self.database))
            .replace("database = \"openmrs_hq\"\n", &format!("database = \"{hq_db}\"\n"))
            .replace("idle_timeout_s = 180", "idle_timeout_s = 5")
            .replace("user = \"hq\"", "user = \"omrs\"")
            .replace("${OMRS_HQ_PASSWORD:-hq}", "omrs");
        for (from, to) in tweaks {
            assert!(text.contains(from), "tweak `{from}` does not apply");
            text = text.replacen(from, to, 1);
        }
        let path = self.dir.path().join(format!("{hq_db}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn run(&self, config: &Path, args: &[&str]) -> std::process::Output {
        let out = bin().arg("--config").arg(config).args(args).env("RUST_LOG", "warn").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    }

    pub fn sink(&self, config: &Path, extra: &[&str]) -> Child {
        bin()
            .arg("--config")
            .arg(config)
            .args(["sink", "hq-mysql", "--metrics-port", "0", "--quiet"])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("sink.log")).unwrap())
            .spawn()
            .unwrap()
    }

    /// Ingest agents started in `order` (together, or each to completion), caught up.
    pub fn ingest(&self, config: &Path, order: &[&str], concurrent: bool) {
        let mut agents = Vec::new();
        for site in order {
            let child = bin()
                .arg("--config")
                .arg(config)
                .args(["ingest", "--site", site, "--until-caught-up", "--quiet", "--metrics-port", "0"])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            // (stderr is read by wait_with_output below)
            if concurrent {
                agents.push(child);
            } else {
                let out = child.wait_with_output().unwrap();
                assert!(out.status.success(), "ingest {site}: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        for a in agents {
            let out = a.wait_with_output().unwrap();
            assert!(out.status.success(), "ingest: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

pub async fn hq(db: &str) -> Conn {
    admin(HQ_PORT, Some(db)).await
}

pub async fn count(c: &mut Conn, sql: &str) -> i64 {
    c.query_first::<i64, _>(sql).await.unwrap().unwrap_or(0)
}

/// The HQ database in uuid space: every OpenMRS table's rows, with HQ's own integer ids left out
/// and every reference replaced by the uuid of the row it points to; sorted.
pub async fn hq_dump(db: &str) -> BTreeMap<String, Vec<String>> {
    let mut c = hq(db).await;
    let cols: Vec<(String, String, String)> = c
        .exec(
            "SELECT table_name, column_name, data_type FROM information_schema.columns WHERE table_schema = ? AND table_name NOT LIKE 'omrs\\_sync\\_%' AND table_name NOT LIKE 'omrs\\_dash\\_%' ORDER BY table_name, ordinal_position",
            (db,),
        )
        .await
        .unwrap();
    type KeyRow = (String, String, String, Option<String>, Option<String>);
    let keys: Vec<KeyRow> = c
        .exec(
            "SELECT table_name, column_name, constraint_name, referenced_table_name, referenced_column_name FROM information_schema.key_column_usage WHERE table_schema = ?",
            (db,),
        )
        .await
        .unwrap();
    let mut pk: HashMap<String, Vec<String>> = HashMap::new();
    let mut fks: HashMap<(String, String), String> = HashMap::new();
    for (t, col, cons, rt, _) in &keys {
        if cons == "PRIMARY" {
            pk.entry(t.clone()).or_default().push(col.clone());
        } else if let Some(rt) = rt {
            fks.insert((t.clone(), col.clone()), rt.clone());
        }
    }
    let mut by_table: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (t, col, _) in &cols {
        by_table.entry(t.clone()).or_default().push(col.clone());
    }
    // id → uuid per table (shared-key tables through their parent).
    let mut uuid_of: HashMap<String, HashMap<String, String>> = HashMap::new();
    for (t, cs) in &by_table {
        let Some(p) = pk.get(t).filter(|p| p.len() == 1) else { continue };
        if cs.iter().any(|c| c == "uuid") {
            let rows: Vec<(String, Option<String>)> = c.query(format!("SELECT CAST(`{}` AS CHAR), uuid FROM `{t}`", p[0])).await.unwrap();
            uuid_of.insert(t.clone(), rows.into_iter().filter_map(|(i, u)| Some((i, u?))).collect());
        }
    }
    for t in by_table.keys() {
        let Some(p) = pk.get(t).filter(|p| p.len() == 1) else { continue };
        if uuid_of.contains_key(t) {
            continue;
        }
        if let Some(parent) = fks.get(&(t.clone(), p[0].clone())) {
            if let Some(m) = uuid_of.get(parent).cloned() {
                uuid_of.insert(t.clone(), m);
            }
        }
    }
    let merged = regex_lite_merged();
    let mut out = BTreeMap::new();
    for (t, cs) in &by_table {
        let p = pk.get(t).cloned().unwrap_or_default();
        let select = cs.iter().map(|c| format!("CAST(`{c}` AS CHAR)")).collect::<Vec<_>>().join(",");
        let rows: Vec<mysql_async::Row> = c.query(format!("SELECT {select} FROM `{t}`")).await.unwrap();
        let person_uuids = uuid_of.get("person").cloned().unwrap_or_default();
        let mut lines = Vec::new();
        for r in rows {
            let mut fields = Vec::new();
            for (i, col) in cs.iter().enumerate() {
                let v: Option<String> = r.get(i).unwrap_or(None);
                let own_id = p.len() == 1 && p[0] == *col && uuid_of.contains_key(t);
                if own_id {
                    continue;
                }
                let v = match (fks.get(&(t.clone(), col.clone())), &v) {
                    (Some(rt), Some(id)) => uuid_of.get(rt).and_then(|m| m.get(id)).cloned().unwrap_or_else(|| format!("#{id}")),
                    _ => v.unwrap_or_else(|| "NULL".into()),
                };
                // Only HQ's own merges name HQ ids (in person and patient); the sites' void
                // reasons elsewhere name site ids and are kept as they are.
                let v = if t == "person" || t == "patient" { merged(&v, &person_uuids) } else { v };
                let v = norm(&v);
                fields.push(format!("{col}={v}"));
            }
            lines.push(fields.join("|"));
        }
        lines.sort();
        out.insert(t.clone(), lines);
    }
    out
}

/// "Merged with patient #12" names HQ's id: map it to the person's uuid.
pub fn regex_lite_merged() -> impl Fn(&str, &HashMap<String, String>) -> String {
    |v: &str, persons: &HashMap<String, String>| {
        if let Some(id) = v.strip_prefix("Merged with patient #") {
            if let Some(u) = persons.get(id) {
                return format!("Merged with patient {u}");
            }
        }
        v.to_string()
    }
}

pub fn assert_same(a: &BTreeMap<String, Vec<String>>, b: &BTreeMap<String, Vec<String>>, what: &str) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "{what}: tables differ");
    for (t, rows) in a {
        let other = &b[t];
        if rows != other {
            let only_a: Vec<_> = rows.iter().filter(|r| !other.contains(r)).take(3).collect();
            let only_b: Vec<_> = other.iter().filter(|r| !rows.contains(r)).take(3).collect();
            panic!("{what}: table {t} differs ({} vs {} rows)\n  only in first: {only_a:#?}\n  only in second: {only_b:#?}", rows.len(), other.len());
        }
    }
}


/// A value as text in one form for HQ (`CAST(… AS CHAR)`) and the lake (JSON): booleans as
/// 1/0, datetimes with a space, numbers in their shortest form.
pub fn norm(s: &str) -> String {
    match s {
        "true" => return "1".into(),
        "false" => return "0".into(),
        _ => {}
    }
    let b = s.as_bytes();
    if b.len() >= 19 && b[4] == b'-' && b[7] == b'-' && b[10] == b'T' && b[13] == b':' {
        return s.replacen('T', " ", 1);
    }
    if !s.is_empty() && s.bytes().any(|c| c.is_ascii_digit()) && s.bytes().all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'-' | b'e' | b'E' | b'+')) {
        if let Ok(f) = s.parse::<f64>() {
            return format!("{f}");
        }
    }
    s.to_string()
}

/// One HQ table in the dump's terms: its columns, its own id (left out of the dump) and its
/// foreign-key columns (dumped as the uuid they point to).
pub async fn layout(c: &mut Conn, db: &str, table: &str) -> (Vec<String>, Option<String>, std::collections::HashSet<String>) {
    let cols: Vec<String> = c
        .exec("SELECT column_name FROM information_schema.columns WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position", (db, table))
        .await
        .unwrap();
    let keys: Vec<(String, String, Option<String>)> = c
        .exec(
            "SELECT column_name, constraint_name, referenced_table_name FROM information_schema.key_column_usage WHERE table_schema = ? AND table_name = ?",
            (db, table),
        )
        .await
        .unwrap();
    let pk: Vec<&String> = keys.iter().filter(|k| k.1 == "PRIMARY").map(|k| &k.0).collect();
    let fks: std::collections::HashSet<String> = keys.iter().filter(|k| k.2.is_some()).map(|k| k.0.clone()).collect();
    let has_uuid = cols.iter().any(|c| c == "uuid");
    let own = (pk.len() == 1 && (has_uuid || fks.contains(pk[0]))).then(|| pk[0].clone());
    (cols, own, fks)
}

/// The sink tests' simulator workload: `patients` people, 20 % of them at several sites, in the
/// pipeline's own site databases, with the ground truth in `<dir>/manifest.json`.
pub fn workload(p: &Pipeline, patients: usize, seed: u64) -> omrs_simulate::SimulateArgs {
    omrs_simulate::SimulateArgs {
        patients,
        dup_fraction: 0.2,
        seed,
        burst: true,
        manifest: p.dir.path().join("manifest.json"),
        database: Some(p.database.clone()),
        dump: dump(),
        quiet: true,
        ..Default::default()
    }
}

//! `omrs-stream query "SQL"`: DataFusion over the lake. Read only; it never blocks the sink.
//!
//! Tables:
//! - `changes.<table>`: every committed change of an OpenMRS table, with the hive partitions
//!   `site` and `date` (and `changes.omrs_merge`, the merge events);
//! - `current.<table>`: the latest version of each row, as of the published snapshot (the
//!   symlink is resolved once, so one query reads one snapshot);
//! - `patients`, `encounters_flat`, `obs_flat`: the flattened views of the same snapshot;
//! - `lake_partitions`: every date partition, its files, and whether it is final;
//! - `aggregates.<name>`: the dashboard aggregates, the latest version of each window
//!   (`is_final`, `revision`), and `aggregates.<name>_history`, every version emitted.
//!
//! `--serve ADDR` answers the same tables over the PostgreSQL wire protocol
//! (datafusion-postgres), for psql, Grafana, Metabase or Superset. It follows the lake: when the
//! sink publishes a new snapshot or commits new files, the served tables are swapped for the
//! new ones, so each query still reads one snapshot.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Int64Array, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::catalog::MemorySchemaProvider;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::ListingOptions;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::parquet::lake::Lake;
use crate::SinkError;

mod serve;
pub use serve::{serve, Access};

/// `omrs-stream query`.
#[derive(Debug, Clone, clap::Args)]
pub struct QueryArgs {
    /// The SQL statement (DataFusion's dialect, close to PostgreSQL's).
    #[arg(required_unless_present_any = ["tables", "serve"])]
    pub sql: Option<String>,
    /// List every table and its columns, then exit.
    #[arg(long)]
    pub tables: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// The lake directory, instead of sinks.parquet.path.
    #[arg(long)]
    pub lake: Option<PathBuf>,
    #[command(flatten)]
    pub server: ServeArgs,
}

/// `query --serve` and who may connect to it.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Serve the tables over the PostgreSQL wire protocol on HOST:PORT until stopped
    /// (`psql -h HOST -p PORT -U USER -c "SELECT …"`). On a loopback address without
    /// --password-file any user name is let in; any other address needs --password-file.
    #[arg(long, value_name = "HOST:PORT", conflicts_with_all = ["sql", "tables"])]
    pub serve: Option<String>,
    /// With --serve: the user name clients log in as.
    #[arg(long, value_name = "NAME", default_value = "analyst", env = "OMRS_QUERY_USER")]
    pub user: String,
    /// With --serve: a file that holds the user's password (a Docker or Kubernetes secret; a
    /// final newline is ignored). Clients then log in with SCRAM-SHA-256, as with PostgreSQL.
    #[arg(long, value_name = "FILE", env = "OMRS_QUERY_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,
    /// With --serve: TLS with this certificate chain (PEM); with --tls-key. Clients that do not
    /// ask for TLS (sslmode=disable) are then refused.
    #[arg(long, value_name = "FILE", requires = "tls_key", env = "OMRS_QUERY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// With --serve: the certificate's private key (PEM, PKCS#8: `BEGIN PRIVATE KEY`).
    #[arg(long, value_name = "FILE", requires = "tls_cert", env = "OMRS_QUERY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
}

impl Default for ServeArgs {
    /// Not serving.
    fn default() -> Self {
        ServeArgs { serve: None, user: "analyst".into(), password_file: None, tls_cert: None, tls_key: None }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    /// A JSON array of row objects.
    Json,
}

fn df_err(e: datafusion::error::DataFusionError) -> SinkError {
    SinkError::Query(e.to_string())
}

/// Registers the Parquet files under `dir` as `name` (`site`/`date` hive partitions when
/// `hive`), read in `schema` when given: a file written before a column was added or widened
/// at a site (issue #25) reads that column as null or cast to the wider type. Without it the
/// schema is inferred from the files, which fails on two types for one column.
pub async fn register_dir(ctx: &SessionContext, name: &str, dir: &Path, hive: bool, schema: Option<SchemaRef>) -> Result<(), SinkError> {
    let mut opts = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    if hive {
        opts = opts.with_table_partition_cols(vec![("site".to_string(), DataType::Utf8), ("date".to_string(), DataType::Utf8)]);
    }
    let path = format!("{}/", dir.display());
    ctx.register_listing_table(name, path, opts, schema, None).await.map_err(|e| SinkError::Query(format!("registering {name}: {e}")))
}

fn subdirs(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|n| !n.starts_with('.') && !n.starts_with('_'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn has_parquet(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|rd| rd.flatten().any(|e| if e.path().is_dir() { has_parquet(&e.path()) } else { e.path().extension().is_some_and(|x| x == "parquet") })).unwrap_or(false)
}

/// A session with every table of the lake registered.
pub async fn context(lake_root: &Path) -> Result<SessionContext, SinkError> {
    context_within(lake_root, None).await
}

/// [`context`], its queries held to `memory` bytes: a sort larger than that spills to the
/// temporary directory instead of growing (verify reads whole tables in key order).
pub async fn context_within(lake_root: &Path, memory: Option<usize>) -> Result<SessionContext, SinkError> {
    if !lake_root.join("_manifest").is_dir() {
        return Err(SinkError::Query(format!(
            "{} is not an omrs-stream lake (no _manifest/): run `omrs-stream sink parquet` first, or pass --lake",
            lake_root.display()
        )));
    }
    // Strings as Utf8 (not Utf8View): the types users see in --tables and in their tools.
    let config = SessionConfig::new().with_information_schema(true).set_bool("datafusion.execution.parquet.schema_force_view_types", false);
    let ctx = match memory {
        Some(bytes) => {
            // One sort at a time, in batches of 2,048 rows: with a sorter per core sharing the
            // pool, the final merge of a large table's spilled runs (one batch held per run)
            // could not get memory and failed (`current.encounter` at 100 k patients, 512 MiB).
            let config = config.with_target_partitions(1).with_batch_size(2048);
            let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new().with_memory_limit(bytes, 1.0).build_arc().map_err(df_err)?;
            SessionContext::new_with_config_rt(config, runtime)
        }
        None => SessionContext::new_with_config(config),
    };
    let catalog = ctx.catalog("datafusion").ok_or_else(|| SinkError::Query("no default catalog".into()))?;
    for schema in ["changes", "current", "aggregates", crate::parquet::reviews::DIR] {
        catalog.register_schema(schema, Arc::new(MemorySchemaProvider::new())).map_err(df_err)?;
    }
    // The tables' schemas as the sink last evolved them (the files' union by name).
    let tables: BTreeMap<String, SchemaRef> = crate::parquet::schema::LakeSchemaFile::load(&lake_root.join("_schema.json"))
        .ok()
        .flatten()
        .map(|f| f.tables.into_iter().map(|(name, def)| (name, crate::parquet::schema::LakeTable::new(def).schema.clone())).collect())
        .unwrap_or_default();
    let changes = lake_root.join("changes");
    for t in subdirs(&changes) {
        if has_parquet(&changes.join(&t)) {
            register_dir(&ctx, &format!("changes.{t}"), &changes.join(&t), true, tables.get(&t).cloned()).await?;
        }
    }
    // One snapshot for the whole query: the links are resolved now.
    if let Ok(cur) = std::fs::canonicalize(lake_root.join("current")) {
        for t in subdirs(&cur) {
            register_dir(&ctx, &format!("current.{t}"), &cur.join(&t), false, tables.get(&t).cloned()).await?;
        }
    }
    // Tables of the schema with no rows yet read as empty, not "not found".
    let current = catalog.schema("current").ok_or_else(|| SinkError::Query("no current schema".into()))?;
    for (name, schema) in &tables {
        if !current.table_exist(name) {
            ctx.register_batch(format!("current.{name}").as_str(), RecordBatch::new_empty(schema.clone())).map_err(df_err)?;
        }
    }
    if let Ok(views) = std::fs::canonicalize(lake_root.join("views")) {
        for v in subdirs(&views) {
            register_dir(&ctx, &v, &views.join(&v), false, None).await?;
        }
    }
    for def in omrs_core::hq::AGGREGATES.iter() {
        use crate::parquet::aggregates;
        register_versions(&ctx, lake_root, aggregates::DIR, def.name, aggregates::schema(def), &aggregates::latest_sql(def)).await?;
    }
    {
        use crate::parquet::reviews;
        register_versions(&ctx, lake_root, reviews::DIR, reviews::REVIEWS, reviews::schema(), &reviews::latest_sql()).await?;
    }
    let lake = Lake::new(lake_root);
    if let Ok((state, _)) = lake.read_manifest() {
        let keys: Vec<_> = state.partitions.iter().collect();
        let mut counts: std::collections::HashMap<(&str, &str, &str), i64> = std::collections::HashMap::new();
        for f in &state.files {
            *counts.entry((f.table.as_str(), f.site.as_str(), f.date.as_str())).or_default() += 1;
        }
        let files = |k: &crate::parquet::lake::PartKey| counts.get(&(k.0.as_str(), k.1.as_str(), k.2.as_str())).copied().unwrap_or(0);
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(keys.iter().map(|k| k.0.as_str()))),
            Arc::new(StringArray::from_iter_values(keys.iter().map(|k| k.1.as_str()))),
            Arc::new(StringArray::from_iter_values(keys.iter().map(|k| k.2.as_str()))),
            Arc::new(Int64Array::from_iter_values(keys.iter().map(|k| files(k)))),
            Arc::new(BooleanArray::from_iter(keys.iter().map(|k| Some(state.complete.contains_key(*k))))),
            Arc::new(Int64Array::from_iter(keys.iter().map(|k| state.complete.get(*k).map(|c| c.watermark_ms)))),
            Arc::new(Int64Array::from_iter(keys.iter().map(|k| state.complete.get(*k).map(|c| c.revision as i64)))),
        ];
        let schema = Arc::new(Schema::new(vec![
            Field::new("table_name", DataType::Utf8, false),
            Field::new("site", DataType::Utf8, false),
            Field::new("date", DataType::Utf8, false),
            Field::new("files", DataType::Int64, false),
            Field::new("final", DataType::Boolean, true),
            Field::new("watermark_ms", DataType::Int64, true),
            Field::new("revision", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(schema, cols).map_err(|e| SinkError::Query(e.to_string()))?;
        ctx.register_batch("lake_partitions", batch).map_err(df_err)?;
    }
    Ok(ctx)
}

/// A folder of appended versions, `<lake>/<schema>/<name>/`: every version as
/// `<schema>.<name>_history` (empty, with `schema_ref`, before its first file), and the view
/// `latest_sql` over it as `<schema>.<name>`.
async fn register_versions(ctx: &SessionContext, lake_root: &Path, schema: &str, name: &str, schema_ref: SchemaRef, latest_sql: &str) -> Result<(), SinkError> {
    let dir = lake_root.join(schema).join(name);
    let history = format!("{schema}.{name}_history");
    if has_parquet(&dir) {
        register_dir(ctx, &history, &dir, false, None).await?;
    } else {
        ctx.register_batch(history.as_str(), RecordBatch::new_empty(schema_ref)).map_err(df_err)?;
    }
    let latest = ctx.sql(latest_sql).await.map_err(df_err)?.into_view();
    ctx.register_table(format!("{schema}.{name}").as_str(), latest).map_err(df_err)?;
    Ok(())
}

/// Every registered table, `schema.table` (or bare for the default schema), sorted.
pub async fn table_names(ctx: &SessionContext) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(cat) = ctx.catalog("datafusion") {
        for s in cat.schema_names() {
            if s == "information_schema" {
                continue;
            }
            if let Some(schema) = cat.schema(&s) {
                for t in schema.table_names() {
                    out.push(if s == "public" { t } else { format!("{s}.{t}") });
                }
            }
        }
    }
    out.sort();
    out
}

/// Runs one statement.
pub async fn sql(ctx: &SessionContext, sql: &str) -> Result<Vec<RecordBatch>, SinkError> {
    let df = ctx.sql(sql).await.map_err(df_err)?;
    df.collect().await.map_err(df_err)
}

/// Renders batches in `format`.
pub fn render(batches: &[RecordBatch], format: Format) -> Result<String, SinkError> {
    let err = |e: arrow::error::ArrowError| SinkError::Query(format!("rendering the result: {e}"));
    Ok(match format {
        Format::Table => arrow::util::pretty::pretty_format_batches(batches).map_err(err)?.to_string(),
        Format::Csv => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(&mut buf);
                for b in batches {
                    w.write(b).map_err(err)?;
                }
            }
            String::from_utf8_lossy(&buf).into_owned()
        }
        Format::Json => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::json::ArrayWriter::new(&mut buf);
                for b in batches {
                    w.write(b).map_err(err)?;
                }
                w.finish().map_err(err)?;
            }
            if buf.is_empty() {
                "[]".to_string()
            } else {
                String::from_utf8_lossy(&buf).into_owned()
            }
        }
    })
}

/// `query --tables`: every table with its columns and types.
pub async fn describe(ctx: &SessionContext) -> Result<String, SinkError> {
    let mut out = String::new();
    for name in table_names(ctx).await {
        let df = ctx.table(name.as_str()).await.map_err(df_err)?;
        out.push_str(&name);
        out.push('\n');
        for f in df.schema().fields() {
            out.push_str(&format!("  {:<32} {}\n", f.name(), f.data_type()));
        }
    }
    Ok(out)
}

/// What identifies the lake's published state: the snapshot `current` points at and the
/// newest manifest entry.
pub(crate) fn lake_stamp(lake_root: &Path) -> (Option<PathBuf>, Option<u64>) {
    let snapshot = std::fs::canonicalize(lake_root.join("current")).ok();
    let seq = Lake::new(lake_root).read_manifest().ok().map(|(state, _)| state.seq);
    (snapshot, seq)
}

/// `omrs-stream query`: the output, or the error with the list of tables.
pub async fn run(lake_root: &Path, args: &QueryArgs) -> Result<String, SinkError> {
    let ctx = context(lake_root).await?;
    if args.tables {
        return describe(&ctx).await;
    }
    let statement = args.sql.as_deref().unwrap_or_default();
    match sql(&ctx, statement).await {
        Ok(batches) => render(&batches, args.format),
        Err(e) => {
            let names = table_names(&ctx).await;
            Err(SinkError::Query(format!(
                "{e}\n\nTables ({}; `omrs-stream query --tables` shows their columns):\n  {}",
                names.len(),
                names.join("\n  ")
            )))
        }
    }
}

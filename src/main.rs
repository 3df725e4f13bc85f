//! `omrs-stream`: argument parsing and wiring only. Every stage lives in its crate.

mod demo;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

/// mimalloc: the stages allocate many small row maps from several threads (tokio workers,
/// librdkafka); glibc's allocator spent a third of the ingest agent's CPU.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};
use omrs_core::config::{Config, TopicsFile};
use omrs_core::topics;

/// Exactly-once streaming consolidation of many OpenMRS sites into one HQ OpenMRS database and
/// a Parquet lake.
///
/// Site binlogs → ingest agents → Kafka (omrs.cdc.<site>) → transform (watermarks, identity,
/// conflicts) → omrs.hq.changes → HQ MySQL sink and Parquet sink → SQL.
#[derive(Parser)]
#[command(name = "omrs-stream", version, about, long_about)]
struct Cli {
    /// Sites, databases, identity rules and sinks.
    #[arg(long, global = true, default_value = "omrs-stream.toml", env = "OMRS_CONFIG")]
    config: PathBuf,
    /// Every Kafka topic: partitions, replication, retention, compaction.
    #[arg(long, global = true, default_value = "topics.toml", env = "OMRS_TOPICS")]
    topics: PathBuf,
    /// Log lines as text, or as one JSON object per line (for a log shipper: Loki, Elastic,
    /// CloudWatch). Logs go to stderr; the level is set with RUST_LOG (default info).
    #[arg(long, global = true, value_enum, default_value = "text", env = "OMRS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Everything on one machine: starts Kafka and one MariaDB per clinic plus HQ, provisions the
    /// clinics from the OpenMRS demo dump, runs the agents, the transform and both sinks on a live
    /// workload (with --offline windows), drains, verifies and prints a summary. Exit 0 only if
    /// verify passed.
    Demo(demo::DemoArgs),
    /// Create or check the Kafka topics declared in topics.toml.
    Topics {
        #[command(subcommand)]
        action: TopicsAction,
    },
    /// Run one site's agent: consistent snapshot, then binlog CDC into omrs.cdc.<site>, exactly once.
    Ingest(omrs_ingest::IngestArgs),
    /// Merge every site stream into omrs.hq.changes: each event on arrival, identity, watermarks, exactly once.
    Transform(omrs_transform::TransformArgs),
    /// Run a sink that consumes omrs.hq.changes.
    Sink {
        #[command(subcommand)]
        which: SinkKind,
    },
    /// SQL over the Parquet lake with DataFusion: changes.<table>, current.<table>, patients,
    /// encounters_flat, obs_flat, lake_partitions. `--tables` lists them with their columns.
    Query(omrs_sinks::query::QueryArgs),
    /// Reconcile sites, HQ and the lake: missing and extra rows per table and site, FK orphans,
    /// identifiers shared by unvoided patients, the lake against HQ, the lag of every stage, and
    /// with --manifest the simulator's identity ground truth. Exit 1 on any discrepancy.
    Verify(omrs_sinks::verify::VerifyArgs),
    /// The programme at a glance: per clinic, live or offline (and since when), what it
    /// captured, what the transform has yet to take, rows waiting at HQ, dead letters and open
    /// identity reviews; per stage, how far behind. Reads Kafka and HQ, never a clinic.
    /// Exit 1 when something is wrong (a clinic offline, something unreadable).
    Status(omrs_sinks::status::StatusArgs),
    /// Generate a multi-site OpenMRS workload on the real schema, with a ground-truth manifest.
    Simulate(omrs_simulate::SimulateArgs),
    /// The dead-letter topic: `list` what is there and why; `replay` records back into the
    /// topic they came from once the cause is fixed (a late parent, a missing table…).
    Dlq {
        #[command(subcommand)]
        action: omrs_sinks::dlq::DlqCommand,
    },
    /// Cross-site patient identity at HQ, for a data manager: `list` the review queue (every
    /// merge, every identifier change HQ will not act on alone), `show` one person's records
    /// per clinic and why they were joined, `confirm` a review (keep the merge), `split` a
    /// wrong merge.
    Identity {
        #[command(subcommand)]
        action: omrs_sinks::identity::IdentityCommand,
    },
}

#[derive(Subcommand)]
enum SinkKind {
    /// The consolidated HQ OpenMRS database, exactly once: merges, conflicts, FK waits.
    /// Run once with --init to create the HQ database.
    HqMysql(omrs_sinks::hq_mysql::HqSinkArgs),
    /// The Parquet lake, exactly once: typed change history per table, current state and
    /// flattened views (compacted on a schedule, or now with --compact).
    Parquet(omrs_sinks::parquet::ParquetSinkArgs),
}

#[derive(Subcommand)]
enum TopicsAction {
    /// Create missing topics and fix settings that can be fixed. Idempotent.
    Apply,
    /// Change nothing; exit 1 and name every mismatch.
    Check,
}

fn resolved_topics(cli: &Cli) -> anyhow::Result<(Config, Vec<omrs_core::config::ResolvedTopic>)> {
    let cfg = Config::load(&cli.config)?;
    let tf = TopicsFile::load(&cli.topics)?;
    let topics = tf.resolve(&cfg.site_names(), &cfg.kafka.topic_prefix);
    Ok((cfg, topics))
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if matches!(cli.command, Command::Ingest(_) | Command::Transform(_) | Command::Sink { .. }) {
        // A stage stops cleanly on SIGTERM or SIGINT: it finishes the open batch and exits 0.
        omrs_core::stop::install();
    }
    match &cli.command {
        Command::Demo(args) => {
            let run = demo::run(args, &cli.topics);
            let summary = tokio::select! {
                s = run => s?,
                _ = tokio::signal::ctrl_c() => {
                    // Dropping the run stops its child processes (SIGTERM, then SIGKILL).
                    eprintln!("\nomrs-stream demo: interrupted; the stages were stopped. Every stage is exactly once: nothing is lost, and the run's directory keeps the logs.");
                    return Ok(ExitCode::from(130));
                }
            };
            print!("{}", demo::render(&summary));
            if let Some(path) = &args.summary_json {
                std::fs::write(path, serde_json::to_string_pretty(&summary)?).with_context(|| format!("writing {}", path.display()))?;
                println!("summary written to {}", path.display());
            }
            let _ = std::fs::write(summary.run_dir.join("summary.json"), serde_json::to_string_pretty(&summary)?);
            Ok(if summary.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Ingest(args) => {
            let cfg = Config::load(&cli.config)?;
            let _metrics = omrs_core::endpoint::serve_stage(&cfg.metrics, args.metrics_port, "ingest").await?;
            omrs_ingest::run(&cfg, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Transform(args) => {
            let cfg = Config::load(&cli.config)?;
            let _metrics = omrs_core::endpoint::serve_stage(&cfg.metrics, args.metrics_port, "transform").await?;
            omrs_transform::runner::run(&cfg, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Sink { which: SinkKind::HqMysql(args) } => {
            let cfg = Config::load(&cli.config)?;
            if !args.init {
                let _metrics = omrs_core::endpoint::serve_stage(&cfg.metrics, args.metrics_port, "hq_mysql").await?;
                omrs_sinks::hq_mysql::run(&cfg, args).await?;
            } else {
                omrs_sinks::hq_mysql::run(&cfg, args).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Sink { which: SinkKind::Parquet(args) } => {
            let cfg = Config::load(&cli.config)?;
            if args.compact {
                omrs_sinks::parquet::run(&cfg, args).await?;
            } else {
                let _metrics = omrs_core::endpoint::serve_stage(&cfg.metrics, args.metrics_port, "parquet").await?;
                omrs_sinks::parquet::run(&cfg, args).await?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Query(args) => {
            let lake = match &args.lake {
                Some(p) => p.clone(),
                None => Config::load(&cli.config)?.sinks.parquet.path,
            };
            if let Some(addr) = &args.server.serve {
                let access = omrs_sinks::query::Access::from_args(addr, &args.server)?;
                omrs_sinks::query::serve(&lake, &access).await?;
                return Ok(ExitCode::SUCCESS);
            }
            match omrs_sinks::query::run(&lake, args).await {
                Ok(out) => {
                    println!("{}", out.trim_end());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("omrs-stream query: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Identity { action } => identity(&Config::load(&cli.config)?, action).await,
        Command::Dlq { action } => dlq(&Config::load(&cli.config)?, action).await,
        Command::Status(args) => status(&Config::load(&cli.config)?, args).await,
        Command::Verify(args) => {
            let cfg = Config::load(&cli.config)?;
            let report = omrs_sinks::verify::run(&cfg, args).await?;
            print_as(args.json, &report, omrs_sinks::verify::render)?;
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Topics { action: TopicsAction::Apply } => {
            let (cfg, want) = resolved_topics(&cli)?;
            let report = topics::apply(&cfg.kafka, &want).await.context("topics apply")?;
            for t in &report.created {
                println!("created   {t}");
            }
            for (t, what) in &report.changed {
                println!("changed   {t}: {what}");
            }
            for t in &report.unchanged {
                println!("unchanged {t}");
            }
            println!(
                "{} created, {} changed, {} unchanged",
                report.created.len(),
                report.changed.len(),
                report.unchanged.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Topics { action: TopicsAction::Check } => {
            let (cfg, want) = resolved_topics(&cli)?;
            match topics::check(&cfg.kafka, &want).await {
                Ok(()) => {
                    println!("all {} topics match {}", want.len(), cli.topics.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e @ omrs_core::CoreError::TopicMismatch(_)) => {
                    eprintln!("{e}");
                    Ok(ExitCode::from(1))
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Simulate(args) => {
            let cfg = Config::load(&cli.config)?;
            omrs_simulate::run(&cfg, args).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints `value` as pretty JSON (`--json`), or as `render` writes it for a person.
fn print_as<T: serde::Serialize>(json: bool, value: &T, render: impl FnOnce(&T) -> String) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(value)?);
    } else {
        print!("{}", render(value));
    }
    Ok(())
}

/// `omrs-stream identity …`: the data manager's review of cross-site merges.
async fn identity(cfg: &Config, action: &omrs_sinks::identity::IdentityCommand) -> anyhow::Result<ExitCode> {
    match action {
        omrs_sinks::identity::IdentityCommand::List(a) => {
            print_as(a.json, &omrs_sinks::identity::list(cfg, a).await?, omrs_sinks::identity::render_list)?;
        }
        omrs_sinks::identity::IdentityCommand::Confirm(a) => println!("{}", omrs_sinks::identity::confirm(cfg, a).await?),
        omrs_sinks::identity::IdentityCommand::Split(a) => println!("{}", omrs_sinks::identity::split(cfg, a).await?),
        omrs_sinks::identity::IdentityCommand::Show(a) => {
            print_as(a.json, &omrs_sinks::identity::show(cfg, a).await?, omrs_sinks::identity::render_show)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `omrs-stream dlq …`: the dead letters, listed or replayed.
async fn dlq(cfg: &Config, action: &omrs_sinks::dlq::DlqCommand) -> anyhow::Result<ExitCode> {
    match action {
        omrs_sinks::dlq::DlqCommand::List(f) => {
            let dead = omrs_sinks::dlq::read(cfg, f)?;
            print!("{}", omrs_sinks::dlq::render(&dead, f.json));
        }
        omrs_sinks::dlq::DlqCommand::Replay { filter, dry_run } => {
            let dead = omrs_sinks::dlq::read(cfg, filter)?;
            let (n, skipped) = omrs_sinks::dlq::replay(cfg, &dead, *dry_run).await?;
            for s in &skipped {
                eprintln!("skipped: {s}");
            }
            println!("{} {n} of {} dead letters", if *dry_run { "would replay" } else { "replayed" }, dead.len());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `omrs-stream status`: every clinic and stage at a glance, once or every `--watch` seconds.
async fn status(cfg: &Config, args: &omrs_sinks::status::StatusArgs) -> anyhow::Result<ExitCode> {
    for url in &args.metrics {
        omrs_core::prom::split_url(url).context("--metrics")?;
    }
    loop {
        let s = omrs_sinks::status::status(cfg, args.lake.as_deref(), &args.metrics).await;
        if args.watch.is_some() && !args.json {
            // Clear the screen and go home, as `watch` does.
            print!("\x1b[2J\x1b[H");
        }
        print_as(args.json, &s, omrs_sinks::status::render)?;
        match args.watch {
            Some(secs) => tokio::time::sleep(std::time::Duration::from_secs(secs.max(1))).await,
            None => return Ok(if s.problems.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) }),
        }
    }
}

fn main() -> ExitCode {
    omrs_core::runtime::disable_transparent_huge_pages();
    let cli = Cli::parse();
    // The demo draws its own progress; the stages it runs log to their files.
    let default_filter = if matches!(cli.command, Command::Demo(_)) { "warn" } else { "info" };
    omrs_core::runtime::init_logging(matches!(cli.log_format, LogFormat::Json), default_filter);
    omrs_core::runtime::run_main(run(cli))
}

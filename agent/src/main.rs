//! `omrs-agent`: the clinic's agent alone, the binary to copy to a clinic server.
//!
//! Delivery guarantee: **exactly once** from the site's binlog into `omrs.cdc.<site>`, as
//! `omrs-stream ingest`: it runs the same code ([`omrs_ingest::run`]) with the same config file,
//! arguments, checkpoints and metrics, so a site can move from one binary to the other and
//! resume where it was. It links `omrs-core` and `omrs-ingest` only: none of the transform,
//! the sinks, DataFusion, Arrow's kernels or Parquet, which a clinic never runs (README: the
//! sizes of both binaries).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use omrs_core::config::Config;

/// mimalloc, as in `omrs-stream`: the agent allocates many small row maps from several threads.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The omrs-stream agent for one clinic (or several, pulled over a VPN): a consistent snapshot,
/// then binlog CDC into the site's Kafka topic omrs.cdc.<site>, exactly once.
///
/// The same as `omrs-stream ingest`, in a binary that carries only the agent. It resumes from
/// the site's checkpoint topic, so it can replace `omrs-stream ingest` for a site (or be
/// replaced by it) at any time. SIGTERM or SIGINT stops it cleanly.
#[derive(Parser)]
#[command(name = "omrs-agent", version, about, long_about)]
struct Cli {
    /// Sites, databases and Kafka: the programme's omrs-stream.toml.
    #[arg(long, default_value = "omrs-stream.toml", env = "OMRS_CONFIG")]
    config: PathBuf,
    /// Log lines as text, or as one JSON object per line. Logs go to stderr; the level is set
    /// with RUST_LOG (default info).
    #[arg(long, value_enum, default_value = "text", env = "OMRS_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(flatten)]
    ingest: omrs_ingest::IngestArgs,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    omrs_core::stop::install();
    let cfg = Config::load(&cli.config)?;
    let _metrics = omrs_core::endpoint::serve_stage(&cfg.metrics, cli.ingest.metrics_port, "ingest").await?;
    omrs_ingest::run(&cfg, &cli.ingest).await?;
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    omrs_core::runtime::disable_transparent_huge_pages();
    let cli = Cli::parse();
    omrs_core::runtime::init_logging(matches!(cli.log_format, LogFormat::Json), "info");
    omrs_core::runtime::run_main(run(cli))
}

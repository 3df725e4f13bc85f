//! Test hooks: a process kills itself (SIGKILL) or pauses at a named point, so that tests can
//! crash a stage at an exact place of its commit path instead of by timing. Inert unless
//! `OMRS_FAILPOINT` names the point.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

/// Times the armed point was reached in this process.
static HITS: AtomicU64 = AtomicU64::new(0);

/// With `OMRS_FAILPOINT=<name>` the process kills itself with SIGKILL at that point (the tests
/// use it to crash the Parquet sink at exact places of a commit or a compaction, and the HQ
/// sink inside its pipelined write and plan). `OMRS_FAILPOINT_SKIP=<n>` lets the first n
/// passes go by. With `OMRS_FAILPOINT_GATE=<file>` as well it pauses there instead, for as long
/// as that file exists (the tests use it to act on the lake while the sink is in the middle of a
/// commit).
pub fn failpoint(name: &str) {
    if std::env::var("OMRS_FAILPOINT").is_ok_and(|v| v == name) {
        let skip: u64 = std::env::var("OMRS_FAILPOINT_SKIP").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        if HITS.fetch_add(1, Ordering::SeqCst) < skip {
            return;
        }
        if let Some(gate) = std::env::var_os("OMRS_FAILPOINT_GATE").map(PathBuf::from) {
            if gate.exists() {
                tracing::warn!(failpoint = name, gate = %gate.display(), "failpoint reached: paused while the gate file exists");
                while gate.exists() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                tracing::warn!(failpoint = name, "failpoint gate removed: going on");
            }
            return;
        }
        tracing::warn!(failpoint = name, "failpoint reached: killing this process");
        let _ = std::process::Command::new("kill").args(["-9", &std::process::id().to_string()]).status();
        // SIGKILL is not deliverable late; if `kill` is missing, abort (no cleanup either).
        std::process::abort();
    }
}

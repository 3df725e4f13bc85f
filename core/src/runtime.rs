//! Process-wide settings every `omrs-stream` process applies before its stages start.

/// Turns transparent huge pages off for this process.
///
/// mimalloc maps its arenas in 2 MiB steps, and with THP on the kernel backs them with huge
/// pages that it must zero on the first touch, then frees and faults again as batches come and
/// go. A profile of the HQ sink put 19 % of its CPU in `clear_page_erms` under
/// `do_huge_pmd_anonymous_page`; with THP off the sink used 17 % less CPU for the same 120,000
/// records (docs/BENCHMARKS.md). This is what `MIMALLOC_ALLOW_THP=0` does, set from code so
/// that no deployment has to remember an environment variable. Harmless where THP is already
/// off or the kernel lacks the call.
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integer arguments and touches no memory.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong, 0 as libc::c_ulong);
    }
}

/// Lowers the calling thread's CPU priority to the least (nice 19), for background work that
/// must not take CPU from the pipeline: the lake's compaction shares the host with HQ's
/// database and the other stages. Harmless where the call is refused.
pub fn lowest_thread_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take and return plain integers and touch no memory. On
    // Linux, PRIO_PROCESS with a thread id sets that thread's nice value only.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 19);
    }
}

/// Starts the process's log: to stderr, at the level `RUST_LOG` sets (else `default_filter`),
/// as text (coloured only on a terminal) or as one JSON object a line (timestamp, level, target,
/// message and the structured fields) for a log shipper.
pub fn init_logging(json: bool, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        logs.json().flatten_event(true).with_current_span(false).init();
    } else {
        logs.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init();
    }
}

/// An error and its causes, joined by ": ", leaving out a cause whose text the message before
/// it already holds (most of our errors print their source inline). What a binary prints last.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let mut cause = Some(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// Runs a binary's `main` future on a multi-thread tokio runtime and turns its outcome into
/// the exit code: the future's own, or 1 with `error: <the chain>` on stderr.
pub fn run_main<E>(main: impl std::future::Future<Output = Result<std::process::ExitCode, E>>) -> std::process::ExitCode
where
    E: AsRef<dyn std::error::Error + Send + Sync + 'static>,
{
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(main) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", error_chain(e.as_ref()));
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    #[derive(Debug)]
    struct E(&'static str, Option<Box<E>>);
    impl std::fmt::Display for E {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }
    impl std::error::Error for E {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|e| e as _)
        }
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        let inner = E("connection refused", None);
        let mid = E("site-a: connection refused", Some(Box::new(inner)));
        let top = E("ingest", Some(Box::new(mid)));
        assert_eq!(super::error_chain(&top), "ingest: site-a: connection refused");
    }
}

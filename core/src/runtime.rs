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

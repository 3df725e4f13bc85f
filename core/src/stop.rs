//! Stopping a stage cleanly: on SIGTERM or SIGINT a stage finishes (or aborts) the transaction
//! it has open, commits nothing half done, and exits 0; a second signal exits at once (130).
//!
//! The request is process-wide: [`install`] (called by `main`) turns the signals into it, and
//! each stage checks [`requested`] between batches and waits on [`wait`] where it would block.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tokio::sync::Notify;

static REQUESTED: AtomicBool = AtomicBool::new(false);

fn notify() -> &'static Notify {
    static N: OnceLock<Notify> = OnceLock::new();
    N.get_or_init(Notify::new)
}

/// Asks every stage of this process to stop at its next clean point.
pub fn request() {
    REQUESTED.store(true, Ordering::SeqCst);
    notify().notify_waiters();
}

/// A stop has been asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Resolves once a stop has been asked for (at once if it already has).
pub async fn wait() {
    loop {
        let notified = notify().notified();
        if requested() {
            return;
        }
        notified.await;
    }
}

/// Turns SIGTERM and SIGINT into a stop request; a second signal exits the process at once
/// with status 130. Call once, inside the runtime.
pub fn install() {
    tokio::spawn(async {
        #[cfg(unix)]
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops this process cleanly");
                return;
            }
        };
        for n in 0.. {
            #[cfg(unix)]
            let which = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            };
            #[cfg(not(unix))]
            let which = {
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            };
            if n > 0 {
                tracing::warn!(signal = which, "second signal: exiting at once (whatever was open is rolled back by Kafka and MariaDB)");
                std::process::exit(130);
            }
            tracing::info!(signal = which, "stopping: finishing the open batch, then exiting");
            request();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiting_ends_when_a_stop_is_asked_for() {
        assert!(!requested());
        let waiter = tokio::spawn(wait());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        request();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await.expect("wait returns").expect("joins");
        assert!(requested());
        // Once asked for, waiting returns at once.
        tokio::time::timeout(std::time::Duration::from_secs(1), wait()).await.expect("returns at once");
    }
}

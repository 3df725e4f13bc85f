//! The wall clock in milliseconds, and how a stage starts again after a transient error.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};

/// Milliseconds since the Unix epoch, UTC.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The waits between a stage's restarts after transient errors: from 0.5 s, doubling up to 30 s,
/// each with random jitter (up to the wait again), without end. The jitter keeps hundreds of
/// agents that lost the same broker from coming back all in the same second.
pub fn restart_backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
}

/// Runs a stage's `attempt` until it returns `Ok`, or an error that `transient` says a retry
/// cannot fix, waiting [`restart_backoff`] between attempts; `on_retry` hears of each transient
/// error and the wait before the next attempt (to log it and count it); `/health` says the
/// stage is not ready until it calls [`crate::endpoint::ready`] again. A stop asked for
/// ([`crate::stop`]) cuts the wait short and ends the retries with `Ok`.
pub async fn retry_transient<E: std::fmt::Display, Fut>(
    attempt: impl FnMut() -> Fut,
    transient: impl FnMut(&E) -> bool,
    on_retry: impl FnMut(&E, Duration),
) -> Result<(), E>
where
    Fut: std::future::Future<Output = Result<(), E>>,
{
    retry_with(restart_backoff(), attempt, transient, on_retry).await
}

async fn retry_with<E: std::fmt::Display, Fut>(
    backoff: impl BackoffBuilder,
    mut attempt: impl FnMut() -> Fut,
    mut transient: impl FnMut(&E) -> bool,
    mut on_retry: impl FnMut(&E, Duration),
) -> Result<(), E>
where
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let run = || {
        let stopped = crate::stop::requested();
        let next = (!stopped).then(&mut attempt);
        async move {
            match next {
                Some(f) => f.await,
                None => Ok(()),
            }
        }
    };
    let sleep = |d: Duration| async move {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = crate::stop::wait() => {}
        }
    };
    let notify = |e: &E, wait: Duration| {
        crate::endpoint::not_ready(format!("retrying after a transient error: {e}"));
        on_retry(e, wait)
    };
    run.retry(backoff).sleep(sleep).when(|e| transient(e)).notify(notify).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn waits_grow_to_the_cap_with_jitter_and_never_end() {
        let waits: Vec<Duration> = restart_backoff().build().take(12).collect();
        assert_eq!(waits.len(), 12);
        for (i, w) in waits.iter().enumerate() {
            let base = Duration::from_millis(500) * 2u32.pow(i as u32).min(60);
            let base = base.min(Duration::from_secs(30));
            assert!(*w >= base && *w <= base * 2, "wait {i}: {w:?} not in [{base:?}, {:?}]", base * 2);
        }
        // Two schedules differ: the jitter is random.
        let a: Vec<Duration> = restart_backoff().build().take(6).collect();
        let b: Vec<Duration> = restart_backoff().build().take(6).collect();
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn transient_errors_are_retried_and_definite_ones_returned() {
        let calls = Cell::new(0);
        let retried = Cell::new(0);
        let quick = || ExponentialBuilder::default().with_min_delay(Duration::from_millis(1)).with_jitter().without_max_times();
        let r: Result<(), &str> = retry_with(
            quick(),
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move {
                    match n {
                        1 | 2 => Err("transient"),
                        _ => Ok(()),
                    }
                }
            },
            |e| *e == "transient",
            |_, _| retried.set(retried.get() + 1),
        )
        .await;
        assert_eq!((r, calls.get(), retried.get()), (Ok(()), 3, 2));
        calls.set(0);
        let r: Result<(), &str> = retry_with(
            quick(),
            || {
                calls.set(calls.get() + 1);
                async { Err("definite") }
            },
            |e| *e == "transient",
            |_, _| {},
        )
        .await;
        assert_eq!((r, calls.get()), (Err("definite"), 1));
    }
}

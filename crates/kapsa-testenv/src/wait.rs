//! Waiting in tests for the cluster to reach a state.

use std::future::Future;
use std::time::Duration;

/// Polls `check` every 100 ms until it returns `Some`, and panics (failing
/// the test) after `timeout`, naming `what` it waited for.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    match try_eventually(timeout, check).await {
        Some(value) => value,
        None => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

/// [`eventually`] that returns `None` after `timeout` instead of panicking,
/// so the caller can say what it saw last.
pub async fn try_eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

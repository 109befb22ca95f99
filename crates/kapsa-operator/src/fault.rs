//! Fault injection for the perturbation tests: exit right after the k-th API
//! write.
//!
//! Every API write the operator makes calls [`after_write`] right after the
//! API server answered it with success:
//!
//! - server-side applies and deletes of the objects Kapsa owns, and status
//!   writes ([`crate::apply`]);
//! - Events published with a status change ([`crate::status`]; an Event's
//!   publication is counted once it has been attempted: the publisher logs a
//!   failure instead of returning it);
//! - the leader-election Lease: its creation, every renewal and its release
//!   ([`crate::leader`]);
//! - the host-ownership ConfigMap ([`crate::hosts`]).
//!
//! Events and Lease writes are API writes like any other, so they count: a
//! crash can happen right after any of them. (Not counted: the Events about
//! malformed objects, published by a task of [`crate::run`]; no perturbation
//! scenario has a malformed object.)
//!
//! With the cargo feature `fault-injection` (the `kapsa` crate's feature of
//! the same name turns it on), the environment variable
//! `KAPSA_EXIT_AFTER_WRITES=k` (a positive integer), read once at the first
//! write, makes the process exit with status [`EXIT_CODE`] right after its
//! k-th write: no shutdown, no lease release, no flush beyond stderr, as a
//! crash. Without the feature, [`after_write`] is an empty inline function
//! and the variable is never read.
//!
//! The same feature gives stale reads: `KAPSA_CACHE_DELAY=<plural>=<seconds>`
//! (comma-separated, e.g. `deployments=3,projects=2.5`) delays every watch
//! event of the caches of those kinds by that long ([`delayed`]), so the
//! operator reconciles from state that lags the API server, as it would
//! behind a slow watch. Without the feature, [`delayed`] returns the
//! stream as it is.
//!
//! And a clock that runs ahead: `KAPSA_CLOCK_OFFSET=<seconds>` (may be
//! negative) moves the reconcilers' clock ([`clock_offset`]), so that a
//! preview's TTL runs out without a test waiting for it. Leader election
//! and the poller keep the real clock.

/// The exit status of a process stopped by `KAPSA_EXIT_AFTER_WRITES`, so
/// that a test tells it from a crash.
pub const EXIT_CODE: i32 = 86;

/// The environment variable: exit right after this many API writes.
pub const ENV_VAR: &str = "KAPSA_EXIT_AFTER_WRITES";

/// Counts one successful API write; with `fault-injection` and
/// `KAPSA_EXIT_AFTER_WRITES=k`, exits the process right after the k-th.
#[cfg(feature = "fault-injection")]
pub fn after_write(what: &str) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    static WRITES: AtomicU64 = AtomicU64::new(0);

    let limit = LIMIT.get_or_init(|| {
        let value = std::env::var(ENV_VAR).ok()?;
        match value.trim().parse::<u64>() {
            Ok(k) if k > 0 => Some(k),
            _ => {
                eprintln!("{ENV_VAR}={value:?} is not a positive integer: ignored");
                None
            }
        }
    });
    let Some(limit) = *limit else {
        return;
    };
    let n = WRITES.fetch_add(1, Ordering::SeqCst) + 1;
    if n == limit {
        // Straight to stderr (the log subscriber may buffer): the test reads it.
        eprintln!("fault injection: exiting right after API write {n} ({what})");
        std::process::exit(EXIT_CODE);
    }
}

/// Without the `fault-injection` feature: nothing.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn after_write(_what: &str) {}

/// The environment variable: move the reconcilers' clock by this many
/// seconds.
pub const CLOCK_OFFSET_VAR: &str = "KAPSA_CLOCK_OFFSET";

/// With `fault-injection`: the offset `KAPSA_CLOCK_OFFSET` asks for (read
/// once). Otherwise zero.
#[cfg(feature = "fault-injection")]
pub fn clock_offset() -> k8s_openapi::jiff::SignedDuration {
    use std::sync::OnceLock;
    static OFFSET: OnceLock<k8s_openapi::jiff::SignedDuration> = OnceLock::new();
    *OFFSET.get_or_init(|| {
        let Ok(value) = std::env::var(CLOCK_OFFSET_VAR) else {
            return k8s_openapi::jiff::SignedDuration::ZERO;
        };
        match value.trim().parse::<i64>() {
            Ok(seconds) => {
                eprintln!("fault injection: the reconcilers' clock is {seconds} s off");
                k8s_openapi::jiff::SignedDuration::from_secs(seconds)
            }
            Err(_) => {
                eprintln!("{CLOCK_OFFSET_VAR}={value:?} is not a whole number of seconds: ignored");
                k8s_openapi::jiff::SignedDuration::ZERO
            }
        }
    })
}

/// Without the `fault-injection` feature: zero.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn clock_offset() -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::ZERO
}

/// The environment variable: delay the watch events of these kinds' caches.
pub const CACHE_DELAY_VAR: &str = "KAPSA_CACHE_DELAY";

/// The delay `KAPSA_CACHE_DELAY` asks for the cache of `plural` (e.g.
/// `deployments`), if any: `plural=seconds`, comma-separated.
pub fn cache_delay(spec: &str, plural: &str) -> Option<std::time::Duration> {
    spec.split(',').find_map(|entry| {
        let (kind, seconds) = entry.split_once('=')?;
        if kind.trim() != plural {
            return None;
        }
        let seconds: f64 = seconds.trim().parse().ok()?;
        (seconds.is_finite() && seconds > 0.0).then(|| std::time::Duration::from_secs_f64(seconds))
    })
}

/// With `fault-injection` and `KAPSA_CACHE_DELAY` naming `plural`: the
/// events of a cache's watch, each released that long after it arrived, in
/// order (a burst is not serialised into a longer lag). Otherwise `events`
/// as they are. Call within a Tokio runtime.
#[cfg(feature = "fault-injection")]
pub fn delayed<T: Send + 'static>(
    plural: &str,
    events: futures::stream::BoxStream<'static, T>,
) -> futures::stream::BoxStream<'static, T> {
    use futures::StreamExt;
    let Some(delay) = std::env::var(CACHE_DELAY_VAR)
        .ok()
        .and_then(|spec| cache_delay(&spec, plural))
    else {
        return events;
    };
    eprintln!("fault injection: the {plural} cache lags {delay:?} behind its watch");
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut events = events;
        while let Some(event) = events.next().await {
            if sender
                .send((tokio::time::Instant::now() + delay, event))
                .is_err()
            {
                break;
            }
        }
    });
    futures::stream::unfold(receiver, |mut receiver| async move {
        let (due, event) = receiver.recv().await?;
        tokio::time::sleep_until(due).await;
        Some((event, receiver))
    })
    .boxed()
}

/// Without the `fault-injection` feature: the events as they are.
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn delayed<T: Send + 'static>(
    _plural: &str,
    events: futures::stream::BoxStream<'static, T>,
) -> futures::stream::BoxStream<'static, T> {
    events
}

#[cfg(test)]
mod tests {
    use super::cache_delay;
    use std::time::Duration;

    #[test]
    fn a_cache_delay_names_a_kind_and_seconds() {
        let spec = "deployments=3, projects = 2.5,services=0,ingresses=x";
        assert_eq!(
            cache_delay(spec, "deployments"),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            cache_delay(spec, "projects"),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(cache_delay(spec, "services"), None, "zero: no delay");
        assert_eq!(cache_delay(spec, "ingresses"), None, "not a number");
        assert_eq!(cache_delay(spec, "secrets"), None, "not named");
    }
}

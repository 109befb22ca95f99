//! Fault injection for the perturbation tests: exit right after the k-th API
//! write.
//!
//! Every API write the operator makes calls [`after_write`] right after the
//! API server answered it with success:
//!
//! - server-side applies and deletes of the objects Kapsa owns, and status
//!   writes ([`crate::apply`]);
//! - Events published with a status change ([`crate::status`]; an Event's
//!   publication is counted once it has been attempted: the recorder logs a
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

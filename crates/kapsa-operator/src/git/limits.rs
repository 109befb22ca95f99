//! What one listing may cost: bytes read from the server, refs, time, and
//! the ssh process it started.
//!
//! A git server is as hostile as any tenant: it may advertise refs forever,
//! trickle one byte at a time, or accept the connection and say nothing.
//! Every byte the operator reads from a server goes through [`Bounded`],
//! which fails the read once the listing's [`Budget`] of bytes or time is
//! spent; the ssh program runs in a [`ChildSlot`], so that the operator can
//! kill it when the listing gives up, wherever it is blocked.

use std::io::{self, BufRead, Read};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::GitError;

/// The most refs a server may advertise in one listing. A repository with
/// more branches than this cannot be polled by Kapsa.
pub const MAX_REFS: usize = 50_000;

/// The most bytes read from a server in one listing (every response
/// together: the capability advertisement and the refs). 50,000 branches
/// with long names fit; an endless advertisement stops here.
pub const MAX_ADVERTISEMENT_BYTES: u64 = 8 * 1024 * 1024;

/// The most bytes read from a server in one merge check (the capability
/// advertisement and a pack of commits without trees or files). A commit
/// takes a few hundred bytes compressed: 200 of them fit many times over,
/// while a server that ignores the filter and sends files stops here.
pub const MAX_MERGE_CHECK_BYTES: u64 = 4 * 1024 * 1024;

/// The bytes and time one listing may still use, shared by every reader of
/// that listing and the task waiting for it.
pub(crate) struct Budget {
    deadline: Instant,
    timeout: Duration,
    max_bytes: u64,
    used: AtomicU64,
    cancelled: AtomicBool,
    /// The first limit that was hit: it explains the failure better than
    /// whatever the git client made of the failed read.
    tripped: Mutex<Option<GitError>>,
}

impl Budget {
    pub(crate) fn new(timeout: Duration, max_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            deadline: Instant::now() + timeout,
            timeout,
            max_bytes,
            used: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            tripped: Mutex::new(None),
        })
    }

    /// Makes every further read fail (the listing was given up).
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// The limit that stopped the listing, if one did.
    pub(crate) fn tripped(&self) -> Option<GitError> {
        self.tripped.lock().ok()?.clone()
    }

    /// Records why the listing stopped (the first reason wins).
    pub(crate) fn refuse(&self, error: GitError) {
        if let Ok(mut tripped) = self.tripped.lock() {
            tripped.get_or_insert(error);
        }
    }

    fn trip(&self, error: GitError) -> io::Error {
        let message = error.to_string();
        if let Ok(mut tripped) = self.tripped.lock() {
            tripped.get_or_insert(error);
        }
        io::Error::other(message)
    }

    fn check_time(&self) -> io::Result<()> {
        if self.cancelled.load(Ordering::SeqCst) || Instant::now() >= self.deadline {
            return Err(self.trip(GitError::Timeout(self.timeout)));
        }
        Ok(())
    }

    /// Counts `bytes` more read from the server (a caller that reads whole
    /// chunks on the runtime, not through [`Bounded`]); past the limit, the
    /// error that explains it.
    pub(crate) fn spend(&self, bytes: usize) -> Result<(), GitError> {
        if self.check_bytes(bytes).is_err() {
            return Err(self
                .tripped()
                .unwrap_or_else(|| GitError::LimitExceeded("too many bytes".into())));
        }
        self.used.fetch_add(bytes as u64, Ordering::SeqCst);
        Ok(())
    }

    /// Whether `more` bytes still fit.
    fn check_bytes(&self, more: usize) -> io::Result<()> {
        let used = self.used.load(Ordering::SeqCst);
        if used.saturating_add(more as u64) > self.max_bytes {
            return Err(self.trip(GitError::LimitExceeded(format!(
                "the server sent more than {} bytes of refs; Kapsa reads at most that much from a git server",
                self.max_bytes
            ))));
        }
        Ok(())
    }
}

/// A reader of server data that fails once its [`Budget`] is spent: the
/// deadline is checked before every read, and no byte beyond the limit is
/// handed on.
pub(crate) struct Bounded<R> {
    inner: R,
    budget: Arc<Budget>,
}

impl<R> Bounded<R> {
    pub(crate) fn new(inner: R, budget: Arc<Budget>) -> Self {
        Self { inner, budget }
    }
}

impl<R: BufRead> BufRead for Bounded<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.budget.check_time()?;
        let available = self.inner.fill_buf()?;
        self.budget.check_bytes(available.len())?;
        Ok(available)
    }

    fn consume(&mut self, amount: usize) {
        self.budget.used.fetch_add(amount as u64, Ordering::SeqCst);
        self.inner.consume(amount);
    }
}

impl<R: BufRead> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = {
            let available = self.fill_buf()?;
            let n = available.len().min(buf.len());
            buf[..n].copy_from_slice(&available[..n]);
            n
        };
        self.consume(n);
        Ok(n)
    }
}

/// The ssh process of one listing, killable from the task that waits for it.
#[derive(Default)]
pub(crate) struct ChildSlot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    child: Option<Child>,
    /// Given up: a process put in now is killed at once.
    closed: bool,
}

impl ChildSlot {
    /// Keeps `child` for [`kill`](Self::kill). If the listing was already
    /// given up, the child is killed and reaped and `false` returned.
    pub(crate) fn put(&self, mut child: Child) -> bool {
        match self.state.lock() {
            Ok(mut state) if !state.closed => {
                state.child = Some(child);
                true
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                false
            }
        }
    }

    /// Kills the process (if it still runs) and keeps any later one from
    /// running. The process is reaped by [`reap`](Self::reap), so its pid
    /// cannot have been reused when it is signalled here.
    pub(crate) fn kill(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.closed = true;
            if let Some(child) = state.child.as_mut() {
                let _ = child.kill();
            }
        }
    }

    /// Ends the process (killing it if it still runs) and waits for it.
    pub(crate) fn reap(&self) {
        let child = self.state.lock().ok().and_then(|mut s| s.child.take());
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_beyond_the_limit_are_refused() {
        let budget = Budget::new(Duration::from_secs(60), 10);
        let mut exact = Bounded::new(io::BufReader::new(&b"0123456789"[..]), budget);
        let mut all = Vec::new();
        exact.read_to_end(&mut all).unwrap();
        assert_eq!(all.len(), 10);

        let budget = Budget::new(Duration::from_secs(60), 10);
        let mut over = Bounded::new(
            io::BufReader::with_capacity(4, &b"0123456789A"[..]),
            budget.clone(),
        );
        let mut read = Vec::new();
        let err = over.read_to_end(&mut read).unwrap_err();
        assert!(read.len() <= 10, "{}", read.len());
        assert!(err.to_string().contains("more than 10 bytes"), "{err}");
        assert!(matches!(budget.tripped(), Some(GitError::LimitExceeded(_))));
    }

    #[test]
    fn reads_after_the_deadline_or_a_cancel_fail() {
        let budget = Budget::new(Duration::ZERO, 1000);
        let mut late = Bounded::new(io::BufReader::new(&b"data"[..]), budget.clone());
        assert!(late.read(&mut [0; 4]).is_err());
        assert_eq!(budget.tripped(), Some(GitError::Timeout(Duration::ZERO)));

        let budget = Budget::new(Duration::from_secs(60), 1000);
        let mut reader = Bounded::new(io::BufReader::new(&b"data"[..]), budget.clone());
        assert_eq!(reader.read(&mut [0; 2]).unwrap(), 2);
        budget.cancel();
        assert!(reader.read(&mut [0; 2]).is_err());
    }

    #[test]
    fn a_killed_slot_kills_what_is_put_in_later() {
        let slot = ChildSlot::default();
        slot.kill();
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        assert!(!slot.put(child));
        // Reaped: no such process any more.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                !stat.contains("(sleep)")
            }
        );
    }
}

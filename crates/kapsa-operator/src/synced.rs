//! Whether each cache has had its first full listing, as Kapsa sees it on
//! the cache's own event stream.
//!
//! kube-runtime's `Store::wait_until_ready` is a one-shot that remembers the
//! waker of its last poll only: of two tasks awaiting it, one may never be
//! woken, and a check without waiting (`now_or_never`) replaces the waker of
//! whoever awaits it. kube's own controllers await it for their main cache,
//! so Kapsa's code never polls it: it reads these flags instead, which any
//! number of tasks can check or await.

use std::sync::Arc;

use tokio::sync::watch;

/// One cache's flag: false until its stream has passed the first listing's
/// end (`InitDone`) through the reflector, then true for good.
#[derive(Clone, Debug)]
pub struct Synced(watch::Receiver<bool>);

/// Sets a [`Synced`] flag; held by the cache's stream.
#[derive(Debug)]
pub struct MarkSynced(watch::Sender<bool>);

impl Synced {
    /// A flag not set yet, and what sets it.
    pub fn new() -> (Self, MarkSynced) {
        let (mark, flag) = watch::channel(false);
        (Self(flag), MarkSynced(mark))
    }

    /// Whether the cache has had its first full listing.
    pub fn is_synced(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until the cache has had its first full listing. If the cache's
    /// stream is gone before that (the operator is stopping), never ends.
    pub async fn wait(&self) {
        let mut flag = self.0.clone();
        if flag.wait_for(|synced| *synced).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl MarkSynced {
    /// Marks the cache filled (again, after a relisting: no change).
    pub fn set(&self) {
        self.0
            .send_if_modified(|synced| !std::mem::replace(synced, true));
    }

    /// Marks the cache filled when `event`, already applied to the cache by
    /// the reflector, ends a listing.
    pub fn seen<K>(&self, event: &kube::runtime::watcher::Event<K>) {
        if matches!(event, kube::runtime::watcher::Event::InitDone) {
            self.set();
        }
    }
}

/// The flags of every cache the reconcilers need filled before they act,
/// by name (for `/readyz`). A cache of an API the cluster does not serve is
/// not in here: it never fills.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<[(&'static str, Synced)]>);

impl Readiness {
    pub fn new(caches: Vec<(&'static str, Synced)>) -> Self {
        Self(caches.into())
    }

    /// Whether every cache has had its first full listing.
    pub fn ready(&self) -> bool {
        self.0.iter().all(|(_, synced)| synced.is_synced())
    }

    /// Waits until the named caches have had their first full listing.
    pub async fn wait_for(&self, names: &[&str]) {
        for name in names {
            let flag = self.0.iter().find(|(n, _)| n == name);
            debug_assert!(flag.is_some(), "no cache named {name}");
            if let Some((_, synced)) = flag {
                synced.wait().await;
            }
        }
    }

    /// The caches that have not had their first full listing yet.
    pub fn unsynced(&self) -> Vec<&'static str> {
        self.0
            .iter()
            .filter(|(_, synced)| !synced.is_synced())
            .map(|(name, _)| *name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn every_waiter_is_woken_and_a_check_takes_no_waiter_away() {
        let (flag, mark) = Synced::new();
        // Two tasks wait; checks without waiting happen meanwhile (kube's
        // one-shot would have kept the waker of the last poll only).
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let flag = flag.clone();
                tokio::spawn(async move { flag.wait().await })
            })
            .collect();
        tokio::task::yield_now().await;
        for _ in 0..3 {
            assert!(!flag.is_synced());
            assert!(flag.wait().now_or_never().is_none());
        }
        mark.set();
        for waiter in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
                .await
                .expect("every waiter is woken")
                .unwrap();
        }
        assert!(flag.is_synced());
        assert!(flag.wait().now_or_never().is_some());
    }

    #[tokio::test]
    async fn readiness_names_the_caches_not_filled_yet() {
        let (projects, projects_mark) = Synced::new();
        let (namespaces, namespaces_mark) = Synced::new();
        let readiness = Readiness::new(vec![("projects", projects), ("namespaces", namespaces)]);
        assert_eq!(readiness.unsynced(), ["projects", "namespaces"]);
        assert!(!readiness.ready());
        projects_mark.set();
        assert_eq!(readiness.unsynced(), ["namespaces"]);
        assert!(!readiness.ready());
        assert!(Readiness::default().ready(), "nothing to wait for");
        let both = readiness.wait_for(&["projects", "namespaces"]);
        tokio::pin!(both);
        assert!((&mut both).now_or_never().is_none());
        namespaces_mark.set();
        assert!(both.now_or_never().is_some());
    }

    #[tokio::test]
    async fn a_flag_whose_stream_is_gone_is_never_synced() {
        let (flag, mark) = Synced::new();
        drop(mark);
        assert!(!flag.is_synced());
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(50), flag.wait())
                .await
                .is_err()
        );
    }
}

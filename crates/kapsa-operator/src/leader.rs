//! Leader election on a coordination.k8s.io Lease, so that several replicas
//! can run for availability while exactly one reconciles.
//!
//! Skew-proof, by client-go's rule (`tools/leaderelection`): a replica never
//! compares a timestamp another replica wrote with its own wall clock. It
//! notes, on its own monotonic clock, when it last saw the Lease's record
//! change, and takes the lease for expired only once `leaseDurationSeconds`
//! have passed since then with no change. The `acquireTime` and `renewTime`
//! it writes are for people (`kubectl get lease`); no decision reads them, so
//! a replica whose wall clock is hours off neither steals a live lease nor
//! keeps a dead one alive.
//!
//! Timing ([`LeaseConfig::new`] takes client-go's and the
//! kube-controller-manager's defaults):
//! - `duration` (15 s): how long the others wait after the last change they
//!   saw before they take over;
//! - `renew_deadline` (10 s): the leader steps down when its last successful
//!   renewal was *sent* longer ago than this. The others start waiting no
//!   earlier than that renewal reached the API server, so the leader stops
//!   at least `duration - renew_deadline` (5 s) before anyone may take over;
//!   the controllers' graceful shutdown has that margin;
//! - `retry_period` (2 s): between two attempts, to take or to renew.
//!
//! Offsets between clocks do not matter; differences in their *rate* are
//! tolerated up to `duration / renew_deadline` (client-go's caveat).
//!
//! On graceful shutdown the leader releases the Lease ([`release`]): it
//! clears `holderIdentity`, so a waiting replica takes over at once rather
//! than after the lease would have run out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use prometheus_client::metrics::gauge::Gauge;
use tokio::time::Instant;

/// How one replica holds leadership: the Lease, its identity, the timing,
/// and (shared by the clones of this value) what it has observed of the
/// Lease on its monotonic clock. Make each replica's with [`LeaseConfig::new`];
/// a clone is the same replica.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity, e.g. its pod name.
    pub identity: String,
    /// How long a lease stays valid after its last change
    /// (`leaseDurationSeconds`, whole seconds, at least one).
    pub duration: Duration,
    /// The leader steps down when it has not renewed for this long; shorter
    /// than `duration`.
    pub renew_deadline: Duration,
    /// Between two attempts to take or renew the lease.
    pub retry_period: Duration,
    /// Added to the wall clock for the timestamps written into the Lease
    /// (`acquireTime`, `renewTime`); zero but in tests, which use it to
    /// show that no decision depends on them.
    pub clock_offset: SignedDuration,
    observed: Observed,
}

impl LeaseConfig {
    /// A replica `identity` competing for Lease `namespace/name`, with
    /// client-go's default timing (15 s, 10 s, 2 s).
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
            clock_offset: SignedDuration::ZERO,
            observed: Observed::default(),
        }
    }

    /// The same replica with other timing (see [`LeaseConfig::validate`]).
    pub fn with_timing(
        mut self,
        duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Self {
        self.duration = duration;
        self.renew_deadline = renew_deadline;
        self.retry_period = retry_period;
        self
    }

    /// The same replica with its wall clock off by `offset` (tests only).
    pub fn with_clock_offset(mut self, offset: SignedDuration) -> Self {
        self.clock_offset = offset;
        self
    }

    /// client-go's constraints: the lease lasts whole seconds, the leader
    /// gives up renewing before it runs out, and it can try more than once
    /// before it gives up.
    pub fn validate(&self) -> Result<(), String> {
        if self.duration < Duration::from_secs(1) || self.duration.subsec_nanos() != 0 {
            return Err(format!(
                "the lease duration must be whole seconds, at least 1 (got {:?})",
                self.duration
            ));
        }
        if self.renew_deadline >= self.duration {
            return Err(format!(
                "the renew deadline ({:?}) must be shorter than the lease duration ({:?})",
                self.renew_deadline, self.duration
            ));
        }
        if self.retry_period.is_zero() || self.retry_period.mul_f64(1.2) >= self.renew_deadline {
            return Err(format!(
                "the retry period ({:?}) must be nonzero and shorter than the renew deadline ({:?}) / 1.2",
                self.retry_period, self.renew_deadline
            ));
        }
        Ok(())
    }

    /// The wall-clock time written into the Lease.
    fn wall_clock(&self) -> MicroTime {
        MicroTime(Timestamp::now() + self.clock_offset)
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// Keeps `gauge` at 1 while this replica (any clone of this value) leads
    /// and at 0 otherwise, from now on: the `kapsa_leader` metric.
    pub fn report_leadership(&self, gauge: Gauge) {
        let mut observation = self.observation();
        gauge.set(i64::from(observation.renewed_at.is_some()));
        observation.leading = Some(gauge);
    }

    fn observation(&self) -> std::sync::MutexGuard<'_, Observation> {
        // The lock is never held across an await or a panic-prone call.
        self.observed
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What one replica knows of the Lease, on its own monotonic clock.
#[derive(Debug, Default)]
struct Observation {
    /// The Lease's spec as last seen ...
    record: Option<LeaseSpec>,
    /// ... and when this replica first saw it so.
    changed_at: Option<Instant>,
    /// When this replica sent its last successful take or renewal; `None`
    /// while it does not lead. Set with [`Observation::set_renewed_at`].
    renewed_at: Option<Instant>,
    /// Where whether this replica leads is reported (`kapsa_leader`).
    leading: Option<Gauge>,
}

impl Observation {
    /// Records this replica's last successful take or renewal (`None`: it
    /// does not lead), and reports whether it leads.
    fn set_renewed_at(&mut self, at: Option<Instant>) {
        self.renewed_at = at;
        if let Some(gauge) = &self.leading {
            gauge.set(i64::from(at.is_some()));
        }
    }

    /// Records what a read or a successful write showed at `now`.
    fn saw(&mut self, spec: LeaseSpec, now: Instant) {
        if self.record.as_ref() != Some(&spec) {
            self.record = Some(spec);
            self.changed_at = Some(now);
        }
    }
}

#[derive(Clone, Default)]
struct Observed(Arc<Mutex<Observation>>);

impl std::fmt::Debug for Observed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.try_lock() {
            Ok(observation) => observation.fmt(f),
            Err(_) => f.write_str("Observation(locked)"),
        }
    }
}

/// The holder of a lease that is still valid by this replica's observation,
/// if that holder is another replica. An empty holder is a released lease:
/// free at once.
fn live_holder(
    record: &LeaseSpec,
    changed_at: Instant,
    now: Instant,
    identity: &str,
    default_duration: Duration,
) -> Option<String> {
    let holder = record.holder_identity.as_deref().unwrap_or_default();
    if holder.is_empty() || holder == identity {
        return None;
    }
    let duration = record
        .lease_duration_seconds
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.unsigned_abs().into()))
        .unwrap_or(default_duration);
    (now < changed_at + duration).then(|| holder.to_string())
}

fn desired(config: &LeaseConfig, previous: Option<&LeaseSpec>, now: MicroTime) -> LeaseSpec {
    let same_holder =
        previous.and_then(|s| s.holder_identity.as_deref()) == Some(config.identity.as_str());
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(config.lease_seconds()),
        acquire_time: if same_holder {
            previous.and_then(|s| s.acquire_time.clone())
        } else {
            Some(now.clone())
        },
        renew_time: Some(now),
        lease_transitions: Some(if same_holder || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        preferred_holder: previous.and_then(|s| s.preferred_holder.clone()),
        strategy: previous.and_then(|s| s.strategy.clone()),
    }
}

/// What one attempt to take or renew the lease found.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// This replica holds the lease (taken or renewed just now).
    Leading,
    /// Another replica holds a lease that is valid by this one's observation.
    HeldBy(String),
    /// Someone else wrote the Lease between the read and the write.
    Conflict,
}

async fn attempt(client: &Client, config: &LeaseConfig) -> Result<Outcome, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    // A renewal counts from when it was sent: the others cannot have seen
    // it any earlier.
    let sent = Instant::now();
    let written = match api.get_opt(&config.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(desired(config, None, config.wall_clock())),
            };
            api.create(&PostParams::default(), &lease).await
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let holder = {
                let now = Instant::now();
                let mut observation = config.observation();
                observation.saw(spec.clone(), now);
                let changed_at = observation.changed_at.unwrap_or(now);
                live_holder(&spec, changed_at, now, &config.identity, config.duration)
            };
            if let Some(holder) = holder {
                config.observation().set_renewed_at(None);
                return Ok(Outcome::HeldBy(holder));
            }
            lease.spec = Some(desired(config, Some(&spec), config.wall_clock()));
            // The resourceVersion makes this a compare-and-swap.
            api.replace(&config.name, &PostParams::default(), &lease)
                .await
        }
    };
    match written {
        Ok(lease) => {
            crate::fault::after_write("lease");
            let mut observation = config.observation();
            observation.saw(lease.spec.unwrap_or_default(), Instant::now());
            observation.set_renewed_at(Some(sent));
            Ok(Outcome::Leading)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Conflict),
        Err(e) => Err(e),
    }
}

/// Tries once to take or renew the lease; returns whether this replica leads.
pub async fn try_acquire(client: &Client, config: &LeaseConfig) -> Result<bool, kube::Error> {
    Ok(attempt(client, config).await? == Outcome::Leading)
}

/// Waits until this replica leads.
pub async fn acquire(client: &Client, config: &LeaseConfig) {
    loop {
        match attempt(client, config).await {
            Ok(Outcome::Leading) => {
                tracing::info!(lease = %config.name, identity = %config.identity, "became the leader");
                return;
            }
            Ok(Outcome::HeldBy(holder)) => {
                tracing::debug!(lease = %config.name, %holder, "another replica leads; waiting")
            }
            Ok(Outcome::Conflict) => {
                tracing::debug!(lease = %config.name, "the lease changed meanwhile; retrying")
            }
            Err(error) => {
                tracing::warn!(%error, lease = %config.name, "leader election failed; retrying")
            }
        }
        tokio::time::sleep(config.retry_period).await;
    }
}

/// Renews the lease every `retry_period` while this replica leads. Returns
/// (and the caller must stop reconciling) as soon as another replica holds
/// it, or when no renewal has succeeded for `renew_deadline`: before the
/// lease can run out for the others.
pub async fn hold(client: &Client, config: &LeaseConfig) {
    loop {
        let Some(renewed_at) = config.observation().renewed_at else {
            tracing::error!(lease = %config.name, "not the leader");
            return;
        };
        let deadline = renewed_at + config.renew_deadline;
        tokio::time::sleep_until((Instant::now() + config.retry_period).min(deadline)).await;
        if Instant::now() >= deadline {
            tracing::error!(lease = %config.name, "could not renew the lease in time; stepping down");
            config.observation().set_renewed_at(None);
            return;
        }
        match tokio::time::timeout_at(deadline, attempt(client, config)).await {
            Ok(Ok(Outcome::Leading)) => {}
            Ok(Ok(Outcome::HeldBy(holder))) => {
                tracing::error!(lease = %config.name, %holder, "lost the lease to another replica");
                return;
            }
            Ok(Ok(Outcome::Conflict)) => {
                tracing::warn!(lease = %config.name, "the lease changed meanwhile; retrying")
            }
            Ok(Err(error)) => {
                tracing::warn!(%error, lease = %config.name, "renewing the lease failed; retrying")
            }
            Err(_) => {}
        }
    }
}

/// Gives the lease up if this replica holds it, so that another takes over
/// at once: to be called after the controllers have stopped (graceful
/// shutdown). Returns whether it released the lease. A compare-and-swap: a
/// lease another replica took meanwhile is left alone.
pub async fn release(client: &Client, config: &LeaseConfig) -> Result<bool, kube::Error> {
    config.observation().set_renewed_at(None);
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        return Ok(false);
    };
    let spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(false);
    }
    let now = config.wall_clock();
    lease.spec = Some(LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(now.clone()),
        renew_time: Some(now),
        ..spec
    });
    match api
        .replace(&config.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => {
            crate::fault::after_write("lease release");
            tracing::info!(lease = %config.name, identity = %config.identity, "released the lease");
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LeaseConfig {
        LeaseConfig::new("kapsa-system", "kapsa", "a")
    }

    #[test]
    fn a_lease_expires_a_duration_after_this_replica_saw_it_change() {
        let now = Instant::now();
        let mut other = desired(&config(), None, config().wall_clock());
        other.holder_identity = Some("b".into());
        let d = Duration::from_secs(15);
        assert_eq!(
            live_holder(&other, now, now + Duration::from_secs(14), "a", d).as_deref(),
            Some("b")
        );
        assert_eq!(
            live_holder(&other, now, now + Duration::from_secs(15), "a", d),
            None
        );
        // The timestamps in the record play no part, however far off.
        other.renew_time = Some(MicroTime(Timestamp::now() - SignedDuration::from_hours(5)));
        assert!(live_holder(&other, now, now, "a", d).is_some());
        other.renew_time = Some(MicroTime(Timestamp::now() + SignedDuration::from_hours(5)));
        assert!(live_holder(&other, now, now + Duration::from_secs(16), "a", d).is_none());
        // Released (no holder), or this replica's own: free.
        other.holder_identity = None;
        assert!(live_holder(&other, now, now, "a", d).is_none());
        other.holder_identity = Some("a".into());
        assert!(live_holder(&other, now, now, "a", d).is_none());
    }

    #[test]
    fn an_unchanged_record_keeps_its_first_sighting() {
        let mut observation = Observation::default();
        let spec = desired(&config(), None, config().wall_clock());
        let first = Instant::now();
        observation.saw(spec.clone(), first);
        observation.saw(spec.clone(), first + Duration::from_secs(5));
        assert_eq!(observation.changed_at, Some(first));
        let mut renewed = spec;
        renewed.renew_time = Some(MicroTime(Timestamp::now() + SignedDuration::from_secs(2)));
        observation.saw(renewed, first + Duration::from_secs(6));
        assert_eq!(observation.changed_at, Some(first + Duration::from_secs(6)));
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let now = config().wall_clock();
        let mut other = desired(&config(), None, now.clone());
        other.holder_identity = Some("b".into());
        other.lease_transitions = Some(3);
        let taken = desired(&config(), Some(&other), now);
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        let later = MicroTime(Timestamp::now() + SignedDuration::from_secs(5));
        let renewed = desired(&config(), Some(&taken), later);
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }

    #[test]
    fn the_clock_offset_moves_only_the_written_timestamps() {
        let skewed = config().with_clock_offset(SignedDuration::from_hours(1));
        let written = desired(&skewed, None, skewed.wall_clock());
        let ahead = written
            .renew_time
            .unwrap()
            .0
            .duration_since(Timestamp::now());
        assert!(ahead > SignedDuration::from_mins(59) && ahead <= SignedDuration::from_hours(1));
    }

    #[test]
    fn the_leadership_gauge_follows_every_clone() {
        let leader = config();
        let gauge = Gauge::default();
        gauge.set(7);
        leader.report_leadership(gauge.clone());
        assert_eq!(gauge.get(), 0, "not leading yet");
        // The clone run.rs holds and the one release() gets are the same replica.
        let clone = leader.clone();
        clone.observation().set_renewed_at(Some(Instant::now()));
        assert_eq!(gauge.get(), 1);
        leader.observation().set_renewed_at(None);
        assert_eq!(gauge.get(), 0);
    }

    #[test]
    fn timing_follows_client_go_constraints() {
        assert!(config().validate().is_ok());
        let s = Duration::from_secs;
        assert!(config().with_timing(s(10), s(10), s(2)).validate().is_err());
        assert!(config().with_timing(s(15), s(10), s(9)).validate().is_err());
        assert!(
            config()
                .with_timing(
                    Duration::from_millis(1500),
                    s(1),
                    Duration::from_millis(200)
                )
                .validate()
                .is_err()
        );
        assert!(
            config()
                .with_timing(s(3), s(2), Duration::from_millis(500))
                .validate()
                .is_ok()
        );
    }
}

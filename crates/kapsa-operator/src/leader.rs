//! Leader election on a coordination.k8s.io Lease, so that several replicas
//! can run for availability while exactly one reconciles.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};

/// How leadership is held.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity, e.g. its pod name.
    pub identity: String,
    /// How long a lease stays valid without renewal.
    pub duration: Duration,
}

fn expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let seconds = spec.lease_duration_seconds.unwrap_or(15);
    renewed.0 + SignedDuration::from_secs(i64::from(seconds)) < now
}

fn desired(config: &LeaseConfig, previous: Option<&LeaseSpec>, now: Timestamp) -> LeaseSpec {
    let same_holder =
        previous.and_then(|s| s.holder_identity.as_deref()) == Some(config.identity.as_str());
    let transitions = previous.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(config.duration.as_secs() as i32),
        acquire_time: if same_holder {
            previous.and_then(|s| s.acquire_time.clone())
        } else {
            Some(MicroTime(now))
        },
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(if same_holder || previous.is_none() {
            transitions
        } else {
            transitions + 1
        }),
        ..LeaseSpec::default()
    }
}

/// Tries once to take or renew the lease; returns whether this replica leads.
pub async fn try_acquire(client: &Client, config: &LeaseConfig) -> Result<bool, kube::Error> {
    let api: Api<Lease> = Api::namespaced(client.clone(), &config.namespace);
    let now = Timestamp::now();
    match api.get_opt(&config.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(config.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(desired(config, None, now)),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.clone().unwrap_or_default();
            let mine = spec.holder_identity.as_deref() == Some(config.identity.as_str());
            if !mine && !expired(&spec, now) {
                return Ok(false);
            }
            lease.spec = Some(desired(config, Some(&spec), now));
            // The resourceVersion makes this a compare-and-swap.
            match api
                .replace(&config.name, &PostParams::default(), &lease)
                .await
            {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Waits until this replica leads.
pub async fn acquire(client: &Client, config: &LeaseConfig) {
    let retry = config.duration / 3;
    loop {
        match try_acquire(client, config).await {
            Ok(true) => {
                tracing::info!(lease = %config.name, identity = %config.identity, "became the leader");
                return;
            }
            Ok(false) => tracing::debug!(lease = %config.name, "another replica leads; waiting"),
            Err(error) => {
                tracing::warn!(%error, lease = %config.name, "leader election failed; retrying")
            }
        }
        tokio::time::sleep(retry).await;
    }
}

/// Renews the lease until renewal fails for longer than the lease lasts;
/// returns then, and the caller must stop reconciling.
pub async fn hold(client: &Client, config: &LeaseConfig) {
    let period = config.duration / 3;
    let mut last_renewal = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(period).await;
        match try_acquire(client, config).await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => {
                tracing::error!(lease = %config.name, "lost the lease to another replica");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, "renewing the lease failed");
                if last_renewal.elapsed() > config.duration {
                    tracing::error!(lease = %config.name, "could not renew the lease in time");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LeaseConfig {
        LeaseConfig {
            namespace: "kapsa-system".into(),
            name: "kapsa".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
        }
    }

    #[test]
    fn a_lease_expires_after_its_duration() {
        let now = Timestamp::now();
        let spec = desired(&config(), None, now);
        assert!(!expired(&spec, now + SignedDuration::from_secs(14)));
        assert!(expired(&spec, now + SignedDuration::from_secs(16)));
        assert!(expired(&LeaseSpec::default(), now));
    }

    #[test]
    fn taking_over_counts_a_transition_and_renewing_does_not() {
        let now = Timestamp::now();
        let mut other = desired(&config(), None, now);
        other.holder_identity = Some("b".into());
        other.lease_transitions = Some(3);
        let taken = desired(&config(), Some(&other), now);
        assert_eq!(taken.lease_transitions, Some(4));
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        let renewed = desired(&config(), Some(&taken), now + SignedDuration::from_secs(5));
        assert_eq!(renewed.lease_transitions, Some(4));
        assert_eq!(renewed.acquire_time, taken.acquire_time);
    }
}

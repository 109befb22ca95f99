//! Git polling: one schedule per Project, refs only (ls-remote), at the
//! Project's `pollInterval` with jitter, backing off exponentially while the
//! repository fails. A poll that changes a Project's heads or reachability
//! triggers a reconcile of that Project (`reconcile_on`); nothing else does.
//!
//! Tenants are hostile: a Project that was refused its namespace
//! (NamespaceConflict, NamespaceForbidden) is not polled at all — its git
//! Secret is never read (it would be another tenant's) and no git server is
//! contacted for it; its poll result says why. Every listing runs under the
//! operator's [`HostPolicy`] and the limits of [`ListOptions`], and error
//! texts are bounded before they reach a status or an Event.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::Project;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;

use crate::context::{GitState, PollResult, Stores};
use crate::controllers::project::dereference::namespace_refused;
use crate::git::{
    GitCredentials, HostPolicy, ListOptions, MAX_MESSAGE_BYTES, backoff_delay, bounded,
    list_branches,
};
use crate::metrics::Metrics;
use crate::resources::project::namespace_name;

/// At most this many ls-remote calls run at once.
const MAX_CONCURRENT_POLLS: usize = 16;
/// How long one ls-remote may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the schedule is checked for due polls.
const TICK: Duration = Duration::from_millis(250);

/// A Go-style duration (`pollInterval`), exactly as the CRD admits it
/// (`kapsa_api::duration`: `ns` and `us` included, no silent fallback).
pub fn parse_duration(text: &str) -> Option<Duration> {
    kapsa_api::duration::parse(text)
}

/// How soon a Project whose git secret is missing or unusable is polled again.
const CREDENTIALS_RETRY: Duration = Duration::from_secs(3);
/// How soon a Project refused its namespace is looked at again (from the
/// caches only: nothing is read or contacted while it stays refused).
const REFUSED_RECHECK: Duration = Duration::from_secs(5);

enum Outcome {
    Polled,
    RemoteFailed,
    NoCredentials,
    Refused,
}

struct Schedule {
    next: Instant,
    failures: u32,
    running: bool,
}

/// How the poller reaches git servers and how often.
#[derive(Clone, Debug, Default)]
pub struct PollerConfig {
    /// Which internal addresses git URLs may reach.
    pub hosts: HostPolicy,
    /// Poll every repository at least this often (development and tests).
    pub max_interval: Option<Duration>,
}

/// Runs the poller until the process ends. `trigger` feeds the Project
/// controller's `reconcile_on`; `hosts` says which internal addresses git
/// URLs may reach.
pub async fn run(
    client: Client,
    stores: Stores,
    state: Arc<GitState>,
    metrics: Arc<Metrics>,
    trigger: mpsc::Sender<ObjectRef<Project>>,
    config: PollerConfig,
) {
    let hosts = config.hosts.clone();
    // Whether a Project was refused its namespace is read from the Project
    // and Namespace caches: nothing is polled before both are filled, so
    // that a refusal is never missed for want of the rival in the cache.
    let _ = stores.projects.wait_until_ready().await;
    let _ = stores.namespaces.wait_until_ready().await;
    let stores = Arc::new(stores);
    let options = Arc::new(ListOptions::new(POLL_TIMEOUT).with_hosts(hosts));
    let projects = stores.projects.clone();
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_POLLS));
    let (done_tx, mut done_rx) = mpsc::channel::<(String, Outcome)>(256);
    let mut schedules: HashMap<String, Schedule> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    let mut seed: u64 = 0x5eed;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some((name, outcome)) = done_rx.recv() => {
                if let Some(s) = schedules.get_mut(&name) {
                    s.running = false;
                    let interval = projects
                        .get(&ObjectRef::new(&name))
                        .and_then(|p| parse_duration(&p.spec.source.poll_interval))
                        .unwrap_or(Duration::from_secs(60));
                    let interval = config.max_interval.map_or(interval, |max| interval.min(max));
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let delay = match outcome {
                        Outcome::Polled => {
                            s.failures = 0;
                            backoff_delay(interval, 0, seed)
                        }
                        Outcome::RemoteFailed => {
                            s.failures = s.failures.saturating_add(1);
                            backoff_delay(interval, s.failures, seed)
                        }
                        // A missing secret is usually being created right now
                        // (it lives in the namespace Kapsa just made): look again soon.
                        Outcome::NoCredentials => CREDENTIALS_RETRY.min(interval),
                        Outcome::Refused => REFUSED_RECHECK,
                    };
                    s.next = Instant::now() + delay;
                }
                continue;
            }
        }
        let current = projects.state();
        let names: std::collections::HashSet<String> =
            current.iter().map(|p| p.name_any()).collect();
        schedules.retain(|name, _| {
            let keep = names.contains(name);
            if !keep {
                state.forget(name);
            }
            keep
        });
        let now = Instant::now();
        for project in current {
            if project.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let name = project.name_any();
            let schedule = schedules.entry(name.clone()).or_insert(Schedule {
                next: now,
                failures: 0,
                running: false,
            });
            if schedule.running || schedule.next > now {
                continue;
            }
            schedule.running = true;
            let (client, stores, options, state, metrics, trigger, done, permits) = (
                client.clone(),
                stores.clone(),
                options.clone(),
                state.clone(),
                metrics.clone(),
                trigger.clone(),
                done_tx.clone(),
                permits.clone(),
            );
            tokio::spawn(async move {
                let _permit = permits.acquire_owned().await;
                let poll = Poll {
                    client: &client,
                    stores: &stores,
                    options: &options,
                    state: &state,
                    metrics: &metrics,
                    trigger: &trigger,
                };
                let outcome = poll.once(&project).await;
                let _ = done.send((name, outcome)).await;
            });
        }
    }
}

/// What one poll needs.
struct Poll<'a> {
    client: &'a Client,
    stores: &'a Stores,
    options: &'a ListOptions,
    state: &'a GitState,
    metrics: &'a Metrics,
    trigger: &'a mpsc::Sender<ObjectRef<Project>>,
}

impl Poll<'_> {
    async fn once(&self, project: &Project) -> Outcome {
        let name = project.name_any();
        let previous = self.state.get(&name).unwrap_or_default();
        let failed = |reason: &'static str, message: String| PollResult {
            error: Some(bounded(&message, MAX_MESSAGE_BYTES)),
            reason: Some(reason),
            consecutive_failures: previous.consecutive_failures + 1,
            ..previous.clone()
        };
        // A Project refused its namespace reads nothing from it and reaches
        // no git server: its Secret would be another tenant's, and its URL
        // could be anyone's.
        if let Some((reason, message)) = namespace_refused(self.stores, project) {
            let result = failed(
                "NotPolled",
                format!(
                    "not polled: the Project was refused its namespace ({reason}: {message}); \
                 Kapsa reads no git credentials from that namespace and contacts no git server for this Project"
                ),
            );
            record(self.state, self.trigger, &name, result).await;
            self.metrics.record_git_poll("refused");
            return Outcome::Refused;
        }
        let credentials = match credentials(self.client, project).await {
            Ok(c) => c,
            Err(message) => {
                record(
                    self.state,
                    self.trigger,
                    &name,
                    failed("CredentialsUnusable", message),
                )
                .await;
                self.metrics.record_git_poll("credentials_error");
                return Outcome::NoCredentials;
            }
        };
        match list_branches(
            &project.spec.source.git.url,
            credentials.as_ref(),
            self.options,
        )
        .await
        {
            Ok(heads) => {
                self.metrics.record_git_poll("success");
                let result = PollResult {
                    branches: Some(heads.branches),
                    error: None,
                    reason: None,
                    consecutive_failures: 0,
                    last_success: Some(Time(k8s_openapi::jiff::Timestamp::now())),
                    merged: None,
                };
                record(self.state, self.trigger, &name, result).await;
                Outcome::Polled
            }
            Err(error) => {
                self.metrics.record_git_poll("failure");
                tracing::info!(project = %name, reason = error.reason(), %error, "git poll failed");
                // Keep the last known heads: an unreachable repository never
                // changes or deletes what runs.
                record(
                    self.state,
                    self.trigger,
                    &name,
                    failed(error.reason(), error.to_string()),
                )
                .await;
                Outcome::RemoteFailed
            }
        }
    }
}

async fn record(
    state: &GitState,
    trigger: &mpsc::Sender<ObjectRef<Project>>,
    name: &str,
    result: PollResult,
) {
    let changed = state.record(name, result);
    tracing::debug!(project = name, changed, "polled");
    if changed {
        let _ = trigger.send(ObjectRef::new(name)).await;
    }
}

/// The git credentials a Project names, read from its namespace.
async fn credentials(client: &Client, project: &Project) -> Result<Option<GitCredentials>, String> {
    let Some(reference) = &project.spec.source.git.secret_ref else {
        return Ok(None);
    };
    let namespace = namespace_name(project);
    let secret = Api::<Secret>::namespaced(client.clone(), &namespace)
        .get_opt(&reference.name)
        .await
        .map_err(|e| format!("reading Secret {namespace}/{}: {e}", reference.name))?
        .ok_or_else(|| {
            format!(
                "Secret {namespace}/{} (spec.source.git.secretRef) does not exist",
                reference.name
            )
        })?;
    GitCredentials::from_secret(&secret)
        .map(Some)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn go_durations_parse() {
        assert_eq!(parse_duration("60s"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), None);
        assert_eq!(
            parse_duration("10s500us"),
            Some(Duration::from_micros(10_000_500)),
            "units the CRD admits are honoured, never replaced by 60 s"
        );
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration("3d"), None);
        assert_eq!(parse_duration(""), None);
    }
}

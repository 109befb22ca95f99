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
//!
//! Concurrency ([`PollSlots`]): at most [`MAX_CONCURRENT_POLLS`] polls run
//! at once, and at most [`MAX_CONCURRENT_POLLS_PER_HOST`] against one git
//! host ([`host_key`]: scheme, host and port). A poll first waits for its
//! host's slot and only then for a global one, so the polls of a slow host
//! queue behind each other and hold at most its share of the global slots:
//! other hosts keep being polled.
//!
//! Merge check: with preview environments enabled, a successful listing is
//! followed by a check of which preview-candidate branch heads the
//! production head contains ([`crate::git::contained_in`]), under the same
//! slot. Its answer is cached per Project: while neither the production head
//! nor a candidate head moves, the server is not asked again; when only some
//! candidate heads move, only those are asked. A failed check leaves
//! `merged` unknown (`None`) and never fails the poll.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::{EnvironmentPhase, EnvironmentType, Project};
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;

use crate::context::{GitState, PollResult, Stores};
use crate::controllers::project::dereference::{contested_namespaces, namespace_refused};
use crate::git::{
    GitCredentials, GitError, HostPolicy, ListOptions, MAX_MESSAGE_BYTES, MERGE_CHECK_DEPTH,
    backoff_delay, bounded, contained_in, list_branches,
};
use crate::metrics::Metrics;
use crate::resources::project::namespace_name;

/// At most this many polls (ls-remote, then the merge check) run at once.
pub const MAX_CONCURRENT_POLLS: usize = 16;
/// At most this many polls run at once against one git host (scheme, host
/// and port), besides [`MAX_CONCURRENT_POLLS`].
pub const MAX_CONCURRENT_POLLS_PER_HOST: usize = 4;
/// How long one ls-remote may take (and one merge check).
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a merge check may take before the poller stops waiting for it,
/// should the check not keep its own timeout (it holds a poll slot).
const MERGE_CHECK_DEADLINE: Duration = Duration::from_secs(2 * POLL_TIMEOUT.as_secs() + 5);
/// How often, at most, the Projects are gone over after the cache changed
/// (to start new ones' schedules and forget deleted ones').
const TICK: Duration = Duration::from_millis(250);
/// How often the `kapsa_previews` and `kapsa_environments` gauges are
/// recomputed (from the cache).
const PREVIEWS_EVERY: Duration = Duration::from_secs(5);

/// The git host a URL reaches, as `scheme://host:port` (host in lower case,
/// the scheme's default port filled in, scp-like `host:path` as ssh on port
/// 22, an IPv6 address in brackets): the unit of the per-host poll limit.
/// User names and paths are not part of it. `None` for what is no remote
/// URL (the listing refuses those at once, without connecting).
pub fn host_key(url: &str) -> Option<String> {
    use gix::url::Scheme;
    if url.is_empty() || url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return None;
    }
    // gix knows lower-case schemes only (as the URL validation does).
    let normalized = match url.split_once("://") {
        Some((scheme, rest)) => format!("{}://{rest}", scheme.to_ascii_lowercase()),
        None => url.to_owned(),
    };
    let parsed = gix::url::parse(normalized.as_bytes()).ok()?;
    let (scheme, default_port) = match parsed.scheme {
        Scheme::Https => ("https", 443),
        Scheme::Http => ("http", 80),
        Scheme::Ssh => ("ssh", 22),
        _ => return None,
    };
    let host = parsed
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if host.is_empty() {
        return None;
    }
    let port = parsed.port.unwrap_or(default_port);
    Some(if host.contains(':') {
        format!("{scheme}://[{host}]:{port}")
    } else {
        format!("{scheme}://{host}:{port}")
    })
}

/// The poller's concurrency limits: a number of global slots, and a number
/// of slots per git host ([`host_key`]). Shared by every poll task.
pub struct PollSlots {
    global: Arc<Semaphore>,
    per_host: Option<usize>,
    hosts: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// A held poll slot: released when dropped.
pub struct PollSlot {
    _global: Option<OwnedSemaphorePermit>,
    _host: Option<OwnedSemaphorePermit>,
}

impl PollSlots {
    /// `global` polls at once in all, and `per_host` at once against one
    /// host (`None`: no per-host limit).
    pub fn new(global: usize, per_host: Option<usize>) -> Self {
        Self {
            global: Arc::new(Semaphore::new(global)),
            per_host,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// The poller's limits: [`MAX_CONCURRENT_POLLS`] and
    /// [`MAX_CONCURRENT_POLLS_PER_HOST`].
    pub fn poller() -> Self {
        Self::new(MAX_CONCURRENT_POLLS, Some(MAX_CONCURRENT_POLLS_PER_HOST))
    }

    /// Waits for a slot to poll `url`: first one of its host's (in order of
    /// arrival), then a global one. Waiting for the host first means a host
    /// with a long queue never holds more than its share of global slots
    /// while it waits.
    pub async fn acquire(&self, url: &str) -> PollSlot {
        let host = match (self.per_host, host_key(url)) {
            (Some(limit), Some(key)) => {
                let semaphore = {
                    let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
                    hosts
                        .entry(key)
                        .or_insert_with(|| Arc::new(Semaphore::new(limit)))
                        .clone()
                };
                // The semaphores are never closed: an error cannot happen,
                // and would only mean running without that limit.
                semaphore.acquire_owned().await.ok()
            }
            _ => None,
        };
        let global = self.global.clone().acquire_owned().await.ok();
        PollSlot {
            _global: global,
            _host: host,
        }
    }

    /// Forgets the hosts nobody polls or waits for now (so that the map
    /// does not grow with every host ever seen).
    pub fn prune(&self) {
        let mut hosts = self.hosts.lock().unwrap_or_else(|e| e.into_inner());
        // A poll holds a clone of its host's semaphore from before it waits
        // until its slot is released; taken under this lock, so a count of
        // one means nobody holds or waits for one of its permits.
        hosts.retain(|_, semaphore| Arc::strong_count(semaphore) > 1);
    }

    /// How many hosts are tracked now (for tests).
    pub fn tracked_hosts(&self) -> usize {
        self.hosts.lock().map(|h| h.len()).unwrap_or_default()
    }
}

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

impl Outcome {
    /// The `result` label of the poll metrics.
    fn result(&self) -> &'static str {
        match self {
            Outcome::Polled => "success",
            Outcome::RemoteFailed => "failure",
            Outcome::NoCredentials => "credentials_error",
            Outcome::Refused => "refused",
        }
    }
}

struct Schedule {
    /// The uid of the Project this schedule is for.
    uid: Option<String>,
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
/// controller's `reconcile_on`; `changes` is a subscription to the Project
/// cache (every applied and deleted Project); `hosts` says which internal
/// addresses git URLs may reach.
///
/// Idle costs nothing per Project: the Projects are gone over only after
/// the cache changed (at most every [`TICK`]), to start and forget their
/// schedules; otherwise the poller sleeps until the next poll is due, kept
/// in a queue ordered by time.
pub async fn run(
    client: Client,
    stores: Stores,
    state: Arc<GitState>,
    metrics: Arc<Metrics>,
    trigger: mpsc::Sender<ObjectRef<Project>>,
    mut changes: impl Stream<Item = Arc<Project>> + Send + Unpin,
    config: PollerConfig,
) {
    let hosts = config.hosts.clone();
    // Whether a Project was refused its namespace is read from the Project
    // and Namespace caches: nothing is polled before both are filled, so
    // that a refusal is never missed for want of the rival in the cache.
    // The subscription is drained meanwhile: the cache waits for its
    // subscribers.
    {
        let readiness = stores.readiness.clone();
        let filled = readiness.wait_for(&["projects", "namespaces"]);
        tokio::pin!(filled);
        loop {
            tokio::select! {
                _ = &mut filled => break,
                Some(_) = changes.next() => {}
            }
        }
    }
    let stores = Arc::new(stores);
    let options = Arc::new(ListOptions::new(POLL_TIMEOUT).with_hosts(hosts));
    let projects = stores.projects.clone();
    let slots = Arc::new(PollSlots::poller());
    let merge_checks: Arc<MergeChecks> = Arc::default();
    let mut previews = tokio::time::interval(PREVIEWS_EVERY);
    let (done_tx, mut done_rx) = mpsc::channel::<(String, Option<String>, Outcome)>(256);
    let mut schedules: HashMap<String, Schedule> = HashMap::new();
    // When each Project's next poll is due. An entry whose time is no longer
    // its schedule's `next` (or whose schedule is gone) is stale, skipped.
    let mut queue: BinaryHeap<Reverse<(Instant, String)>> = BinaryHeap::new();
    // The namespaces several Projects name, as of the last look at the
    // Projects: what a poll checks its Project against.
    let mut contested: Arc<HashMap<String, Vec<Arc<Project>>>> = Arc::default();
    let mut changed = true;
    // As if the last look were a TICK ago: the first one is at once.
    let mut scanned = Instant::now()
        .checked_sub(TICK)
        .unwrap_or_else(Instant::now);
    let mut seed: u64 = 0x5eed;
    loop {
        let now = Instant::now();
        let next_poll = queue.peek().map(|Reverse((when, _))| *when);
        let next_scan = changed.then(|| (scanned + TICK).max(now));
        let wake = match (next_poll, next_scan) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => now + PREVIEWS_EVERY,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = previews.tick() => {
                let environments = stores.environments.state();
                metrics.set_previews(count_previews(&environments));
                metrics.set_environments(count_environments(&environments));
                continue;
            }
            Some(_) = changes.next() => {
                changed = true;
                continue;
            }
            Some((name, uid, outcome)) = done_rx.recv() => {
                // The answer of a poll of a Project since made again under
                // its name is not the new one's.
                if let Some(s) = schedules.get_mut(&name)
                    && s.uid == uid
                {
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
                    queue.push(Reverse((s.next, name)));
                }
                continue;
            }
        }
        let now = Instant::now();
        if changed && now >= scanned + TICK {
            changed = false;
            scanned = now;
            let current = projects.state();
            // A Project deleted, or deleted and made again under its name
            // (another uid), is forgotten: its heads and merge answers are
            // not the new one's.
            let uids: HashMap<&str, Option<&str>> = current
                .iter()
                .filter_map(|p| Some((p.metadata.name.as_deref()?, p.metadata.uid.as_deref())))
                .collect();
            schedules.retain(|name, schedule| {
                let keep = uids.get(name.as_str()) == Some(&schedule.uid.as_deref());
                if !keep {
                    state.forget(name);
                    merge_checks.forget(name);
                }
                keep
            });
            drop(uids);
            contested = Arc::new(contested_namespaces(&current));
            for project in &current {
                let Some(name) = project.metadata.name.as_deref() else {
                    continue;
                };
                if !schedules.contains_key(name) {
                    schedules.insert(
                        name.to_owned(),
                        Schedule {
                            uid: project.metadata.uid.clone(),
                            next: now,
                            failures: 0,
                            running: false,
                        },
                    );
                    queue.push(Reverse((now, name.to_owned())));
                }
            }
            slots.prune();
        }
        while let Some(Reverse((when, _))) = queue.peek()
            && *when <= now
        {
            let Some(Reverse((when, name))) = queue.pop() else {
                break;
            };
            let Some(schedule) = schedules.get_mut(&name) else {
                continue;
            };
            if schedule.running || schedule.next != when {
                continue;
            }
            // A Project being deleted is not polled again; it is forgotten
            // once it is gone.
            let Some(project) = projects.get(&ObjectRef::new(&name)) else {
                continue;
            };
            if project.metadata.deletion_timestamp.is_some() || project.metadata.uid != schedule.uid
            {
                continue;
            }
            schedule.running = true;
            let uid = schedule.uid.clone();
            let contested = contested.clone();
            let (client, stores, options, state, metrics, trigger, done, slots, merge_checks) = (
                client.clone(),
                stores.clone(),
                options.clone(),
                state.clone(),
                metrics.clone(),
                trigger.clone(),
                done_tx.clone(),
                slots.clone(),
                merge_checks.clone(),
            );
            tokio::spawn(async move {
                // The listing and the merge check both run under the slot.
                let slot = slots.acquire(&project.spec.source.git.url).await;
                let started = Instant::now();
                let poll = Poll {
                    client: &client,
                    stores: &stores,
                    options: &options,
                    state: &state,
                    metrics: &metrics,
                    trigger: &trigger,
                    merge_checks: &merge_checks,
                    contested: &contested,
                };
                let outcome = poll.once(&project).await;
                drop(slot);
                metrics.record_git_poll(outcome.result());
                metrics.record_git_poll_duration(outcome.result(), started.elapsed());
                let _ = done.send((name, uid, outcome)).await;
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
    merge_checks: &'a MergeChecks,
    /// The namespaces several Projects name ([`contested_namespaces`]).
    contested: &'a HashMap<String, Vec<Arc<Project>>>,
}

impl Poll<'_> {
    async fn once(&self, project: &Project) -> Outcome {
        let name = project.name_any();
        let previous = self.state.get(&name).unwrap_or_default();
        let failed = |reason: &'static str, message: String| PollResult {
            error: Some(bounded(&message, MAX_MESSAGE_BYTES)),
            reason: Some(reason),
            consecutive_failures: previous.consecutive_failures + 1,
            polled_at: Some(Time(k8s_openapi::jiff::Timestamp::now())),
            ..previous.clone()
        };
        // A Project refused its namespace reads nothing from it and reaches
        // no git server: its Secret would be another tenant's, and its URL
        // could be anyone's.
        if let Some((reason, message)) = namespace_refused(self.stores, project, self.contested) {
            let result = failed(
                "NotPolled",
                format!(
                    "not polled: the Project was refused its namespace ({reason}: {message}); \
                 Kapsa reads no git credentials from that namespace and contacts no git server for this Project"
                ),
            );
            record(self.state, self.trigger, &name, result).await;
            self.metrics.record_git_poll_failure("NotPolled");
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
                self.metrics.record_git_poll_failure("CredentialsUnusable");
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
                let merged = self
                    .merged(project, credentials.as_ref(), &heads.branches)
                    .await;
                let result = PollResult {
                    branches: Some(heads.branches),
                    error: None,
                    reason: None,
                    consecutive_failures: 0,
                    last_success: Some(Time(k8s_openapi::jiff::Timestamp::now())),
                    polled_at: Some(Time(k8s_openapi::jiff::Timestamp::now())),
                    merged,
                };
                record(self.state, self.trigger, &name, result).await;
                Outcome::Polled
            }
            Err(error) => {
                self.metrics.record_git_poll_failure(error.reason());
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

    /// The preview-candidate branches the production head contains, or
    /// `None` when previews are off, the production branch is missing or
    /// the check failed. Asks the server only about heads whose answer is
    /// not cached for this production head; a failure is logged and
    /// counted, never an error of the poll.
    async fn merged(
        &self,
        project: &Project,
        credentials: Option<&GitCredentials>,
        branches: &BTreeMap<String, String>,
    ) -> Option<BTreeSet<String>> {
        let name = project.name_any();
        let spec = &project.spec;
        if !spec.preview_environments.enabled {
            self.merge_checks.forget(&name);
            return None;
        }
        let url = &spec.source.git.url;
        let Some(production_head) = branches.get(&spec.source.git.branch) else {
            // Nothing can be merged into a branch that does not exist.
            self.merge_checks.forget(&name);
            return None;
        };
        let candidates = preview_candidates(project, branches);
        let heads: BTreeSet<String> = candidates.values().cloned().collect();
        if self.merge_checks.unsupported(url) {
            // Deletion and the TTL still remove previews (docs/previews.md).
            return None;
        }
        let ask = self
            .merge_checks
            .to_ask(&name, url, production_head, &heads);
        let answer = if ask.is_empty() {
            BTreeSet::new()
        } else {
            let check = contained_in(
                url,
                credentials,
                self.options,
                production_head,
                &ask,
                MERGE_CHECK_DEPTH,
            );
            let outcome = match tokio::time::timeout(MERGE_CHECK_DEADLINE, check).await {
                Ok(outcome) => outcome,
                Err(_) => Err(GitError::Timeout(MERGE_CHECK_DEADLINE)),
            };
            match outcome {
                Ok(contained) => contained,
                Err(error) => {
                    let reason = error.reason();
                    if matches!(error, GitError::MergeCheckUnsupported(..)) {
                        self.merge_checks.mark_unsupported(url);
                    }
                    self.metrics
                        .record_git_poll_failure(&format!("MergeCheck{reason}"));
                    // The git module's texts hold no secret; bounded again
                    // all the same, as everything that leaves the poller.
                    let message = bounded(&error.to_string(), MAX_MESSAGE_BYTES);
                    tracing::info!(
                        project = %name,
                        reason,
                        error = %message,
                        heads = ask.len(),
                        "merge check failed; merged branches unknown until the next poll"
                    );
                    return None;
                }
            }
        };
        let contained =
            self.merge_checks
                .record(&name, url, production_head, &heads, &ask, &answer);
        Some(
            candidates
                .into_iter()
                .filter(|(_, head)| contained.contains(head))
                .map(|(branch, _)| branch)
                .collect(),
        )
    }
}

/// The branches that would get a preview (branch name to head).
fn preview_candidates(
    project: &Project,
    branches: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let spec = &project.spec;
    branches
        .iter()
        .filter(|(branch, _)| {
            kapsa_api::naming::is_preview_branch(
                &spec.preview_environments.branches,
                &spec.source.git.branch,
                branch,
            )
        })
        .map(|(b, h)| (b.clone(), h.clone()))
        .collect()
}

/// The last merge check of one Project: for a URL and production head,
/// whether each candidate head it was asked about is contained.
#[derive(Debug, Clone, PartialEq)]
struct MergeCheck {
    url: String,
    production_head: String,
    contained: BTreeMap<String, bool>,
}

/// The merge checks' answers by Project name (a cache: lost on restart,
/// when the first poll asks again).
#[derive(Default)]
struct MergeChecks {
    checks: Mutex<HashMap<String, MergeCheck>>,
    /// Repositories (by URL) whose server cannot answer a merge check
    /// (`MergeCheckUnsupported`), and until when Kapsa stops asking.
    unsupported: Mutex<HashMap<String, Instant>>,
}

/// How long a server that cannot answer a merge check is not asked again.
const UNSUPPORTED_RETRY: Duration = Duration::from_secs(3600);

impl MergeChecks {
    /// Whether `url`'s server said recently that it cannot answer.
    fn unsupported(&self, url: &str) -> bool {
        let mut unsupported = self.unsupported.lock().unwrap_or_else(|e| e.into_inner());
        unsupported.retain(|_, until| *until > Instant::now());
        unsupported.contains_key(url)
    }

    fn mark_unsupported(&self, url: &str) {
        self.unsupported
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(url.to_owned(), Instant::now() + UNSUPPORTED_RETRY);
    }

    /// The candidate heads the server must be asked about: those without a
    /// cached answer for this URL and production head (all of them when
    /// the production head moved). A head equal to the production head is
    /// contained without asking.
    fn to_ask(
        &self,
        project: &str,
        url: &str,
        production_head: &str,
        heads: &BTreeSet<String>,
    ) -> BTreeSet<String> {
        let checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let cached = checks
            .get(project)
            .filter(|c| c.url == url && c.production_head == production_head);
        heads
            .iter()
            .filter(|head| *head != production_head)
            .filter(|head| cached.is_none_or(|c| !c.contained.contains_key(*head)))
            .cloned()
            .collect()
    }

    /// Records the answer (`contained`, a subset of `asked`) about `asked`
    /// and returns the candidate heads now known to be contained. Answers
    /// about heads that are no longer candidates are dropped.
    fn record(
        &self,
        project: &str,
        url: &str,
        production_head: &str,
        heads: &BTreeSet<String>,
        asked: &BTreeSet<String>,
        contained: &BTreeSet<String>,
    ) -> BTreeSet<String> {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let mut known = match checks.remove(project) {
            Some(c) if c.url == url && c.production_head == production_head => c.contained,
            _ => BTreeMap::new(),
        };
        known.retain(|head, _| heads.contains(head));
        for head in asked {
            known.insert(head.clone(), contained.contains(head));
        }
        if heads.contains(production_head) {
            known.insert(production_head.to_owned(), true);
        }
        let result = known
            .iter()
            .filter(|(_, contained)| **contained)
            .map(|(head, _)| head.clone())
            .collect();
        checks.insert(
            project.to_owned(),
            MergeCheck {
                url: url.to_owned(),
                production_head: production_head.to_owned(),
                contained: known,
            },
        );
        result
    }

    fn forget(&self, project: &str) {
        self.checks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(project);
    }
}

/// How many preview Environments are in each phase (an Environment without
/// a phase yet counts as `Pending`), from the cache.
fn count_previews(environments: &[Arc<kapsa_api::Environment>]) -> Vec<(&'static str, i64)> {
    let mut counts: BTreeMap<&'static str, i64> = BTreeMap::new();
    for environment in environments {
        if environment.spec.type_ != EnvironmentType::Preview {
            continue;
        }
        let phase = environment
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default();
        let phase = match phase {
            EnvironmentPhase::Pending => "Pending",
            EnvironmentPhase::Building => "Building",
            EnvironmentPhase::Deploying => "Deploying",
            EnvironmentPhase::Ready => "Ready",
            EnvironmentPhase::Failed => "Failed",
        };
        *counts.entry(phase).or_default() += 1;
    }
    counts.into_iter().collect()
}

/// How many Environments of each type are in each phase (an Environment
/// without a phase yet counts as `Pending`), from the cache: the
/// `kapsa_environments` gauge.
fn count_environments(
    environments: &[Arc<kapsa_api::Environment>],
) -> Vec<((&'static str, &'static str), i64)> {
    let mut counts: BTreeMap<(&'static str, &'static str), i64> = BTreeMap::new();
    for environment in environments {
        let type_ = match environment.spec.type_ {
            EnvironmentType::Production => "Production",
            EnvironmentType::Preview => "Preview",
        };
        let phase = match environment
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or_default()
        {
            EnvironmentPhase::Pending => "Pending",
            EnvironmentPhase::Building => "Building",
            EnvironmentPhase::Deploying => "Deploying",
            EnvironmentPhase::Ready => "Ready",
            EnvironmentPhase::Failed => "Failed",
        };
        *counts.entry((type_, phase)).or_default() += 1;
    }
    counts.into_iter().collect()
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
    use super::*;

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

    #[test]
    fn host_keys() {
        for (url, key) in [
            ("https://github.com/acme/shop.git", "https://github.com:443"),
            ("HTTPS://GitHub.COM/acme/shop", "https://github.com:443"),
            (
                "https://github.com:443/acme/other",
                "https://github.com:443",
            ),
            (
                "https://token@github.com/acme/shop.git",
                "https://github.com:443",
            ),
            (
                "https://github.com./acme/shop.git",
                "https://github.com:443",
            ),
            (
                "https://git.example.com:8443/a.git",
                "https://git.example.com:8443",
            ),
            ("http://127.0.0.1:8080/shop.git", "http://127.0.0.1:8080"),
            ("http://localhost/shop.git", "http://localhost:80"),
            ("ssh://git@github.com/acme/shop.git", "ssh://github.com:22"),
            (
                "ssh://git@example.com:2222/srv/shop.git",
                "ssh://example.com:2222",
            ),
            ("git@github.com:acme/shop.git", "ssh://github.com:22"),
            (
                "gitlab.example.com:group/shop.git",
                "ssh://gitlab.example.com:22",
            ),
            ("https://[::1]:8443/shop.git", "https://[::1]:8443"),
            (
                "https://[2001:DB8::1]/shop.git",
                "https://[2001:db8::1]:443",
            ),
        ] {
            assert_eq!(host_key(url).as_deref(), Some(key), "{url}");
        }
        // Scheme, host and port each make a different host.
        let keys: std::collections::HashSet<_> = [
            "https://github.com/a.git",
            "http://github.com/a.git",
            "ssh://git@github.com/a.git",
            "https://github.com:8443/a.git",
            "https://gitlab.com/a.git",
        ]
        .into_iter()
        .map(|u| host_key(u).unwrap())
        .collect();
        assert_eq!(keys.len(), 5, "{keys:?}");
        for url in [
            "",
            "/srv/git/shop.git",
            "file:///srv/git/shop.git",
            "git://github.com/acme/shop.git",
            "ftp://example.com/shop.git",
            "ext::sh -c touch% /tmp/pwned",
            "https:///acme/shop.git",
            "https://github.com/acme/ shop.git",
        ] {
            assert_eq!(host_key(url), None, "{url:?}");
        }
    }

    /// Peak concurrency of ten polls per URL under `slots`: per URL and
    /// in all.
    async fn peak_concurrency(
        slots: Arc<PollSlots>,
        urls: Vec<&'static str>,
        hold: Duration,
    ) -> (Vec<usize>, usize) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let counter = || {
            Arc::new(
                (0..=urls.len())
                    .map(|_| 0.into())
                    .collect::<Vec<AtomicUsize>>(),
            )
        };
        let (now, peak) = (counter(), counter());
        let all = urls.len();
        let mut tasks = Vec::new();
        for _ in 0..10 {
            for (i, url) in urls.iter().copied().enumerate() {
                let (slots, now, peak) = (slots.clone(), now.clone(), peak.clone());
                tasks.push(tokio::spawn(async move {
                    let _slot = slots.acquire(url).await;
                    for j in [i, all] {
                        let n = now[j].fetch_add(1, Ordering::SeqCst) + 1;
                        peak[j].fetch_max(n, Ordering::SeqCst);
                    }
                    tokio::time::sleep(hold).await;
                    for j in [i, all] {
                        now[j].fetch_sub(1, Ordering::SeqCst);
                    }
                }));
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        let mut peaks: Vec<usize> = peak.iter().map(|p| p.load(Ordering::SeqCst)).collect();
        let total = peaks.pop().unwrap_or_default();
        (peaks, total)
    }

    #[tokio::test]
    async fn at_most_four_polls_per_host() {
        let slots = Arc::new(PollSlots::poller());
        let urls = vec![
            "https://a.example/1.git",
            "https://A.example:443/2.git",
            "https://b.example/1.git",
            "git@c.example:x.git",
        ];
        let (peaks, total) = peak_concurrency(slots.clone(), urls, Duration::from_millis(20)).await;
        // a.example is one host across two URLs; 3 hosts x 4 < 16.
        assert!(peaks[0] + peaks[1] <= 4, "{peaks:?}");
        assert_eq!(&peaks[2..], &[4, 4], "{peaks:?}");
        assert!((9..=12).contains(&total), "{total} {peaks:?}");
        slots.prune();
        assert_eq!(slots.tracked_hosts(), 0, "idle hosts are forgotten");
    }

    #[tokio::test]
    async fn at_most_sixteen_polls_in_all() {
        let slots = Arc::new(PollSlots::poller());
        let urls = vec![
            "https://a.example/1.git",
            "https://b.example/1.git",
            "https://c.example/1.git",
            "https://d.example/1.git",
            "https://e.example/1.git",
            "https://f.example/1.git",
        ];
        let (peaks, total) = peak_concurrency(slots, urls, Duration::from_millis(20)).await;
        assert!(peaks.iter().all(|p| *p <= 4), "{peaks:?}");
        assert_eq!(total, MAX_CONCURRENT_POLLS, "{peaks:?}");
    }

    #[tokio::test]
    async fn a_slow_host_does_not_starve_the_others() {
        let slots = Arc::new(PollSlots::poller());
        // Forty polls of a host that never answers, queued first.
        let mut stuck = Vec::new();
        for i in 0..40 {
            let slots = slots.clone();
            stuck.push(tokio::spawn(async move {
                let _slot = slots
                    .acquire(&format!("https://slow.example/{i}.git"))
                    .await;
                std::future::pending::<()>().await;
            }));
        }
        tokio::task::yield_now().await;
        // Another host's polls all get through, 4 at a time.
        let started = Instant::now();
        let mut fast = Vec::new();
        for i in 0..12 {
            let slots = slots.clone();
            fast.push(tokio::spawn(async move {
                let _slot = slots
                    .acquire(&format!("https://fast.example/{i}.git"))
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }));
        }
        for task in fast {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("the fast host was starved")
                .unwrap();
        }
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(slots.global.available_permits(), MAX_CONCURRENT_POLLS - 4);
        for task in stuck {
            task.abort();
        }
    }

    #[tokio::test]
    async fn without_a_host_limit_only_the_global_one_holds() {
        let one_host = || vec!["https://a.example/1.git"];
        let slots = Arc::new(PollSlots::new(MAX_CONCURRENT_POLLS, None));
        let (_, total) = peak_concurrency(slots, one_host(), Duration::from_millis(10)).await;
        assert_eq!(total, 10);
        let slots = Arc::new(PollSlots::new(3, None));
        let (_, total) = peak_concurrency(slots, one_host(), Duration::from_millis(10)).await;
        assert_eq!(total, 3);
    }

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_server_that_cannot_answer_is_not_asked_again_for_a_while() {
        let checks = MergeChecks::default();
        assert!(!checks.unsupported("https://a.example/x.git"));
        checks.mark_unsupported("https://a.example/x.git");
        assert!(checks.unsupported("https://a.example/x.git"));
        assert!(!checks.unsupported("https://b.example/x.git"));
    }

    #[test]
    fn merge_checks_ask_only_what_changed() {
        let checks = MergeChecks::default();
        let url = "https://git.example/shop.git";
        // First check: everything is asked, except a head equal to
        // production's, which is contained without asking.
        let heads = set(&["a1", "b1", "p1"]);
        assert_eq!(checks.to_ask("shop", url, "p1", &heads), set(&["a1", "b1"]));
        let contained = checks.record(
            "shop",
            url,
            "p1",
            &heads,
            &set(&["a1", "b1"]),
            &set(&["a1"]),
        );
        assert_eq!(contained, set(&["a1", "p1"]));
        // Nothing moved: nothing to ask, the same answer.
        assert!(checks.to_ask("shop", url, "p1", &heads).is_empty());
        assert_eq!(
            checks.record("shop", url, "p1", &heads, &set(&[]), &set(&[])),
            set(&["a1", "p1"])
        );
        // One candidate moved (b1 -> b2), one appeared (c1), one left (p1):
        // only the new heads are asked.
        let heads = set(&["a1", "b2", "c1"]);
        assert_eq!(checks.to_ask("shop", url, "p1", &heads), set(&["b2", "c1"]));
        assert_eq!(
            checks.record(
                "shop",
                url,
                "p1",
                &heads,
                &set(&["b2", "c1"]),
                &set(&["b2"])
            ),
            set(&["a1", "b2"])
        );
        // Production moved: everything is asked again.
        assert_eq!(
            checks.to_ask("shop", url, "p2", &heads),
            set(&["a1", "b2", "c1"])
        );
        // A failed check records nothing: the same heads are asked again.
        assert_eq!(
            checks.to_ask("shop", url, "p2", &heads),
            set(&["a1", "b2", "c1"])
        );
        assert_eq!(
            checks.record("shop", url, "p2", &heads, &heads, &set(&["c1"])),
            set(&["c1"])
        );
        // Another URL, or a forgotten Project, starts over.
        assert_eq!(
            checks.to_ask("shop", "https://other.example/shop.git", "p2", &heads),
            heads
        );
        assert!(checks.to_ask("shop", url, "p2", &heads).is_empty());
        checks.forget("shop");
        assert_eq!(checks.to_ask("shop", url, "p2", &heads), heads);
        // Projects do not share answers.
        assert_eq!(
            checks.to_ask("cart", url, "p1", &set(&["a1"])),
            set(&["a1"])
        );
    }

    #[test]
    fn previews_are_counted_by_phase() {
        use kapsa_api::Environment;
        let env = |type_: &str, phase: Option<&str>| {
            let mut value = serde_json::json!({
                "apiVersion": "kapsa.dev/v1alpha1",
                "kind": "Environment",
                "metadata": {"name": "e", "namespace": "n"},
                "spec": {"project": "shop", "type": type_, "branch": "feature-x"},
            });
            if let Some(phase) = phase {
                value["status"] = serde_json::json!({ "phase": phase });
            }
            let environment: Environment = serde_json::from_value(value).unwrap();
            Arc::new(environment)
        };
        let counted = count_previews(&[
            env("Preview", Some("Ready")),
            env("Preview", Some("Ready")),
            env("Preview", Some("Failed")),
            env("Preview", None),
            env("Production", Some("Ready")),
            env("Preview", Some("Building")),
        ]);
        assert_eq!(
            counted,
            vec![("Building", 1), ("Failed", 1), ("Pending", 1), ("Ready", 2)]
        );

        let counted = count_environments(&[
            env("Preview", Some("Ready")),
            env("Preview", Some("Ready")),
            env("Preview", None),
            env("Production", Some("Ready")),
            env("Production", None),
            env("Production", Some("Failed")),
        ]);
        assert_eq!(
            counted,
            vec![
                (("Preview", "Pending"), 1),
                (("Preview", "Ready"), 2),
                (("Production", "Failed"), 1),
                (("Production", "Pending"), 1),
                (("Production", "Ready"), 1),
            ]
        );
    }
}

//! The perturbation suite: restart the operator at every write point, make
//! its caches lag, and (in [`chaos`]) kill it at random moments while the
//! API server, etcd, the git server and a registry Secret fail around it.
//!
//! The `kapsa` binary built with the cargo feature `fault-injection` exits
//! right after its k-th API write when `KAPSA_EXIT_AFTER_WRITES=k` is set
//! (`kapsa_operator::fault`: server-side applies, deletes, status writes,
//! Events, the leader-election Lease and the host-ownership ConfigMap all
//! count). For each scenario this test
//!
//! 1. runs it once unperturbed: the operator's writes until the end state
//!    is at rest, W, are counted from the API server's audit log (the
//!    operator runs as a user of its own), and the end state is recorded;
//! 2. for each chosen k in 1..=W: replays the scenario with
//!    `KAPSA_EXIT_AFTER_WRITES=k`, waits for the operator to exit (status
//!    `fault::EXIT_CODE`), starts it again without the variable, and checks
//!    the oracle against the unperturbed end state;
//! 3. stale reads: replays the scenario with one of the operator's caches
//!    three seconds behind its watch (`KAPSA_CACHE_DELAY=<plural>=3`, same
//!    feature): it reconciles from old state, and must end where the
//!    unperturbed run ended, without a second build or rollout and without
//!    going back (below).
//!
//! Scenarios (each on its own Project, deleted between runs with the
//! namespace waited out, so every run starts from the same state and
//! produces the same names, commits and digests):
//! - `new-project`: a Project is created and goes live (production Ready);
//! - `new-commit`: a live Project's branch gets a new commit, which is built
//!   and rolled out (the operator is stopped while the commit is pushed);
//! - `preview-created`: a branch appears in a live Project with
//!   `previewEnvironments.enabled`, and its preview goes live;
//! - `preview-deleted`: a live preview's branch is deleted; the preview
//!   Environment goes (the garbage collector takes its Deployment, Service
//!   and Ingress: the end state waits for it) and the Project deletes its
//!   kpack Image from the build namespace;
//! - `build-failed`: a live Project's branch gets a commit whose build
//!   fails (the kpack simulator's `failRevisions`): `Built=False`
//!   `BuildFailed` naming it, the previous release keeps serving, and the
//!   commit is built exactly once however often the operator restarts;
//! - `children-deleted`: while the operator is stopped (it never sees the
//!   delete events), a live Project's Deployment, Service, Ingress, kpack
//!   Image, runtime ServiceAccount, push credentials' copy and builder Role
//!   are deleted; they must come back as they were (one new build: the
//!   Image is a new object), each with one write;
//! - `project-deleted`: a live Project is deleted; its namespaces go with
//!   everything in them (the garbage collector and the namespace
//!   controller, waited for) and its host leaves the host-ownership table
//!   (Kapsa's part);
//! - `preview-expired`: a live preview's one-minute TTL runs out (the run's
//!   operators' clock is two minutes ahead: `KAPSA_CLOCK_OFFSET=120`, same
//!   feature); the preview goes as for a deleted branch and is not made
//!   again (the idle window would see it);
//! - `host-conflict`: next to a live Project, a tenant's namespace gets an
//!   Ingress Kapsa did not make, routing the host of a Project created at
//!   the same time, and an Environment naming a host under the live
//!   Project's; the new Project is `DomainAllocated=False` `HostInUse`, the
//!   Environment `Ready=False` `WrongNamespace`, no Kapsa Ingress routes
//!   either host, the host-ownership table gives the late host to nobody,
//!   and the live Project is untouched.
//!
//! The oracle, read from the API server (objects and the audit log), never
//! from the operator's metrics:
//! - the same objects: every object in the cluster with a `managedFields`
//!   entry of the field manager `kapsa` (Events aside: they are not state),
//!   by kind, namespace and name, with the same values of the fields that
//!   manager owns (exactly those `managedFields` lists, spec and status).
//!   Normalised before comparing, and only these: ownerReferences become
//!   (apiVersion, kind, name, controller) — the owners are recreated every
//!   run, their uids differ —, and RFC 3339 timestamps (condition
//!   transitions, poll times, `deployedAt`, a preview's `expiresAt`) become
//!   `<time>`; the `kapsa.dev/applied-hash` annotation becomes `<hash>` (it
//!   hashes the applied object, owner uids included); `observedGeneration`
//!   equal to the object's generation becomes `<current>` (a restart may
//!   skip an intermediate spec, so the generation may be lower than
//!   unperturbed; a stale one stays a number and so a difference);
//! - no orphan: every Kapsa object but the host-ownership table has an
//!   ownerReference to a live object with the same uid, and every kpack
//!   Image of the build namespace (controlled by the Project) carries the
//!   uid of a live Environment;
//! - no duplicate build: every kpack Image's `status.buildCounter` (the
//!   simulator counts the builds it starts) is what the scenario needs and
//!   what the unperturbed run shows, and no Deployment has more ReplicaSets
//!   (rollouts) than in the unperturbed run;
//! - every Ingress host is the Project's host or below it, and the
//!   host-ownership table gives that host to the Project's namespace;
//! - status matches the children: each Environment is Ready at the head of
//!   its branch, with the Image's revision and the simulator's digest, and
//!   its Deployment runs that image, all replicas ready; the Project's
//!   status lists exactly its Environments, with their commits;
//! - nothing goes back: from before the trigger, watches record every
//!   value each Environment's `status.commit` and `status.image`, each
//!   Deployment's image and the Project's `status.latestCommit` take; a
//!   value that comes back after another replaced it is a regression (a
//!   stale read acted on);
//! - no writes at rest: once the end state appears, an idle window (3 s
//!   quick, 6 s long: more than one poll interval, `--max-poll-interval
//!   2s`) must pass with zero writes by the operator, its Lease renewals
//!   aside (leader election renews every 2 s by design), within 60 s; the
//!   long form then waits a second window, after the snapshot.
//!
//! Quick form (`make test`, `hack/test.sh`): per scenario the unperturbed
//! run and a few k spread evenly over the positions of the operator's own
//! writes among 1..=W (a restart right after a Lease renewal interrupts
//! nothing new; 3 for new-project, 2 for the others, whose every run first
//! brings a Project live), and one stale run for five scenarios (the cache
//! their trigger makes the operator read). Long form: every k of every scenario and every cache of
//! [`STALE_KINDS`], e.g. `KAPSA_PERTURBATION_LONG=1 cargo test -p kapsa
//! --features fault-injection --test perturbation -- --nocapture` (W is 5
//! to 50 per scenario, about 15 to 30 s per perturbation: expect one to two
//! hours). Timings are in docs/perturbation.md.
//! To replay chosen points: `KAPSA_PERTURBATION_K=4,17` (every scenario),
//! `KAPSA_PERTURBATION_STALE=deployments` and
//! `KAPSA_PERTURBATION_SCENARIOS=new-commit` (comma-separated).
//!
//! Every operator process runs with `--identity kapsa-perturbation` (a Pod
//! restarted in place keeps its name), so a restarted operator takes over
//! the Lease its dead predecessor held at once instead of waiting it out.
#![cfg(feature = "fault-injection")]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kapsa_api::{Environment, Project};
use kapsa_operator::fault;
use kapsa_testenv::audit::{AuditEvent, AuditLog, AuditMark};
use kapsa_testenv::git_server::{GitServer, TestRepo};
use kapsa_testenv::simulators::kpack::simulated_digest;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::{ApiCapabilities, Discovery, Scope, verbs};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const PLATFORM_NAMESPACE: &str = "kapsa-system";
const POOL: &str = "pert-pool";
const BASE: &str = "pert.example.com";
const ISSUER: &str = "pert-issuer";
const REGISTRY: &str = "pert-registry";
const REGISTRY_SECRET: &str = "pert-push";
const IDENTITY: &str = "kapsa-perturbation";
/// The field manager of everything Kapsa applies.
const KAPSA_MANAGER: &str = "kapsa";
const HOST_OWNERS: &str = "kapsa-host-owners";
/// Kapsa's annotation holding a hash of what it applied; the applied object
/// holds its owner's uid, which differs from run to run.
const APPLIED_HASH: &str = "kapsa.dev/applied-hash";
const PREVIEW_BRANCH: &str = "feature-login";
/// host-conflict: the tenant's own namespace, and the Project created late
/// whose host an Ingress there already routes.
const SQUAT_NAMESPACE: &str = "pert-squat";
const LATE_PROJECT: &str = "pert-host-late";

fn late_host() -> String {
    format!("{LATE_PROJECT}.{BASE}")
}
/// Users the operator processes run as (audit log attribution): the one
/// under test (unperturbed, or exiting at k), the restarted one, and the one
/// that sets scenarios up and cleans them away.
const USER_RUN: &str = "kapsa-pert-run";
const USER_RESTARTED: &str = "kapsa-pert-restarted";
const USER_SETUP: &str = "kapsa-pert-setup";

/// The suite's tests run one at a time: each needs the two cores, and
/// each runs `kapsa operator` processes with one identity.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

mod chaos;

const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the operator exiting at k may take to reach its k-th write
/// (Lease renewals, every 2 s, count: it always gets there).
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    NewProject,
    NewCommit,
    PreviewCreated,
    /// A live preview's branch is deleted: the preview Environment, its
    /// children and its build in the build namespace go.
    PreviewDeleted,
    /// A live Project's branch gets a commit whose build fails: `Built`
    /// says so, the previous release keeps serving, one build only.
    BuildFailed,
    /// While the operator is stopped, a live Project's children are
    /// deleted (events it never sees): they come back as they were.
    ChildrenDeleted,
    /// A live Project is deleted: its namespaces and everything in them go
    /// (the garbage collector), and its host leaves the host-ownership
    /// table (Kapsa).
    ProjectDeleted,
    /// A live preview's TTL runs out (the operator's clock runs ahead,
    /// `KAPSA_CLOCK_OFFSET`): the preview goes and stays gone.
    PreviewExpired,
    /// Next to a live Project, a tenant claims hosts it may not have: an
    /// Environment in a namespace of its own names a host under the live
    /// Project's, and a new Project's host is already routed by an Ingress
    /// Kapsa did not make. Both are refused; the live Project is untouched.
    HostConflict,
}

impl Scenario {
    const ALL: [Scenario; 9] = [
        Scenario::NewProject,
        Scenario::NewCommit,
        Scenario::PreviewCreated,
        Scenario::PreviewDeleted,
        Scenario::BuildFailed,
        Scenario::ChildrenDeleted,
        Scenario::ProjectDeleted,
        Scenario::PreviewExpired,
        Scenario::HostConflict,
    ];

    fn name(self) -> &'static str {
        match self {
            Scenario::NewProject => "new-project",
            Scenario::NewCommit => "new-commit",
            Scenario::PreviewCreated => "preview-created",
            Scenario::PreviewDeleted => "preview-deleted",
            Scenario::BuildFailed => "build-failed",
            Scenario::ChildrenDeleted => "children-deleted",
            Scenario::ProjectDeleted => "project-deleted",
            Scenario::PreviewExpired => "preview-expired",
            Scenario::HostConflict => "host-conflict",
        }
    }

    fn project(self) -> String {
        format!("pert-{}", self.name())
    }

    /// Perturbations in the quick form (budget: a few minutes in all).
    fn quick_sample(self) -> u64 {
        match self {
            Scenario::NewProject => 3,
            Scenario::NewCommit
            | Scenario::PreviewCreated
            | Scenario::PreviewDeleted
            | Scenario::BuildFailed
            | Scenario::ChildrenDeleted
            | Scenario::ProjectDeleted
            | Scenario::PreviewExpired
            | Scenario::HostConflict => 2,
        }
    }

    /// Whether the Project has preview environments enabled.
    fn previews(self) -> bool {
        matches!(
            self,
            Scenario::PreviewCreated | Scenario::PreviewDeleted | Scenario::PreviewExpired
        )
    }

    /// Whether the preview is live before the trigger (and goes with it).
    fn starts_with_preview(self) -> bool {
        matches!(self, Scenario::PreviewDeleted | Scenario::PreviewExpired)
    }

    /// How far ahead the run's operators' clock is (seconds): past the
    /// preview's one-minute TTL for preview-expired.
    fn clock_offset(self) -> Option<i64> {
        (self == Scenario::PreviewExpired).then_some(120)
    }

    /// Whether the preview is part of the end state.
    fn ends_with_preview(self) -> bool {
        self == Scenario::PreviewCreated
    }
}

/// How a run is perturbed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Perturbation {
    /// The operator exits right after its k-th API write
    /// (`KAPSA_EXIT_AFTER_WRITES`) and is started again.
    Restart(u64),
    /// The cache of this kind (its plural) lags [`STALE_DELAY`] behind its
    /// watch (`KAPSA_CACHE_DELAY`): the operator reconciles from old state.
    StaleCache(&'static str),
}

impl Perturbation {
    fn tag(self) -> String {
        match self {
            Perturbation::Restart(k) => format!("k{k}"),
            Perturbation::StaleCache(plural) => format!("stale-{plural}"),
        }
    }
}

/// How far a stale cache lags: more than a poll interval (2 s).
const STALE_DELAY: Duration = Duration::from_secs(3);

/// The caches a stale run may delay: the ones whose state the operator acts
/// on (its own kinds, the children it compares with what it wants, and the
/// namespaces it waits for).
const STALE_KINDS: [&str; 7] = [
    "projects",
    "environments",
    "deployments",
    "services",
    "ingresses",
    "images",
    "namespaces",
];

impl Scenario {
    /// The cache delayed in the quick form, for the scenarios whose trigger
    /// the operator reads from one (the long form delays each of
    /// [`STALE_KINDS`] in every scenario; `KAPSA_PERTURBATION_STALE` lists
    /// them).
    fn quick_stale(self) -> Option<&'static str> {
        match self {
            Scenario::NewProject => Some("projects"),
            Scenario::NewCommit => Some("deployments"),
            Scenario::PreviewCreated => Some("environments"),
            Scenario::BuildFailed => Some("images"),
            Scenario::HostConflict => Some("ingresses"),
            Scenario::PreviewDeleted
            | Scenario::PreviewExpired
            | Scenario::ChildrenDeleted
            | Scenario::ProjectDeleted => None,
        }
    }

    fn stale_kinds(self, long: bool) -> Vec<&'static str> {
        if let Ok(list) = std::env::var("KAPSA_PERTURBATION_STALE") {
            return STALE_KINDS
                .into_iter()
                .filter(|k| list.split(',').any(|l| l.trim() == *k))
                .collect();
        }
        if long {
            STALE_KINDS.to_vec()
        } else {
            self.quick_stale().into_iter().collect()
        }
    }
}

/// What a run's Project showed over time, from watches started before its
/// trigger: each Environment's commit and image, its Deployment's image and
/// the Project's latest commit, every value it took in order. A value that
/// comes back after another replaced it is a regression (the operator acted
/// on old state).
struct History {
    values: Seen,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Shared by [`History`]'s watches: every value seen under each key, in order.
type Seen = std::sync::Arc<std::sync::Mutex<BTreeMap<String, Vec<String>>>>;

impl History {
    async fn watch(client: &Client, project: &str) -> Self {
        use k8s_openapi::api::apps::v1::Deployment;
        use kube::runtime::watcher;
        let values = Seen::default();
        let (ready, mut listed) = tokio::sync::mpsc::channel::<()>(3);
        let tasks = vec![
            Self::follow(
                Api::<Environment>::namespaced(client.clone(), project),
                watcher::Config::default(),
                &values,
                &ready,
                |e: &Environment| {
                    let status = e.status.clone().unwrap_or_default();
                    let name = e.name_any();
                    vec![
                        (format!("Environment {name} status.commit"), status.commit),
                        (format!("Environment {name} status.image"), status.image),
                    ]
                },
            ),
            Self::follow(
                Api::<Deployment>::namespaced(client.clone(), project),
                watcher::Config::default(),
                &values,
                &ready,
                |d: &Deployment| {
                    let image = d
                        .spec
                        .as_ref()
                        .and_then(|s| s.template.spec.as_ref())
                        .and_then(|s| s.containers.first())
                        .and_then(|c| c.image.clone());
                    vec![(format!("Deployment {} image", d.name_any()), image)]
                },
            ),
            Self::follow(
                Api::<Project>::all(client.clone()),
                watcher::Config::default().fields(&format!("metadata.name={project}")),
                &values,
                &ready,
                |p: &Project| {
                    let latest = p.status.as_ref().and_then(|s| s.latest_commit.clone());
                    vec![("Project status.latestCommit".to_string(), latest)]
                },
            ),
        ];
        // Every watch has listed before the trigger.
        for _ in 0..tasks.len() {
            let _ = tokio::time::timeout(Duration::from_secs(10), listed.recv()).await;
        }
        Self { values, tasks }
    }

    /// A task watching `api`: each object's values (`read`: key and value,
    /// none while unset) are appended to `values` when they change; `ready`
    /// hears when the first listing is done.
    fn follow<K>(
        api: Api<K>,
        config: kube::runtime::watcher::Config,
        values: &Seen,
        ready: &tokio::sync::mpsc::Sender<()>,
        read: impl Fn(&K) -> Vec<(String, Option<String>)> + Send + 'static,
    ) -> tokio::task::JoinHandle<()>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    {
        use futures::StreamExt;
        use kube::runtime::watcher;
        let (values, ready) = (values.clone(), ready.clone());
        tokio::spawn(async move {
            let mut events = watcher(api, config).boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::InitDone) => {
                        let _ = ready.try_send(());
                    }
                    Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                        let mut values = values.lock().unwrap();
                        for (key, value) in read(&o) {
                            let Some(value) = value else { continue };
                            let seen = values.entry(key).or_default();
                            if seen.last() != Some(&value) {
                                seen.push(value);
                            }
                        }
                    }
                    _ => {}
                }
            }
        })
    }

    /// Every value that came back after another had replaced it.
    fn regressions(&self) -> Vec<String> {
        let values = self.values.lock().unwrap();
        values
            .iter()
            .filter(|(_, seen)| {
                seen.iter()
                    .enumerate()
                    .any(|(i, v)| seen[i + 1..].contains(v))
            })
            .map(|(key, seen)| format!("regression: {key} went {}", seen.join(" → ")))
            .collect()
    }
}

impl Drop for History {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

// ---------------------------------------------------------------------------
// The operator as a child process.

struct Operator {
    child: Child,
    log: PathBuf,
}

impl Operator {
    fn start(
        kubeconfig: &Path,
        log: PathBuf,
        perturbation: Option<Perturbation>,
        clock_offset: Option<i64>,
    ) -> Self {
        let file = std::fs::File::create(&log).expect("operator log file");
        let binary = env!("CARGO_BIN_EXE_kapsa");
        // setpriv makes the kernel kill the operator if the test dies.
        let mut command = if setpriv_available() {
            let mut c = Command::new("setpriv");
            c.args(["--pdeathsig", "KILL", "--", binary]);
            c
        } else {
            Command::new(binary)
        };
        command
            .args([
                "operator",
                "--text-logs",
                "--allow-internal-git-hosts",
                "loopback",
                "--metrics-addr",
                "127.0.0.1:0",
                "--max-poll-interval",
                "2s",
                "--identity",
                IDENTITY,
                "--lease-namespace",
                PLATFORM_NAMESPACE,
            ])
            .env("KUBECONFIG", kubeconfig)
            .env(
                "RUST_LOG",
                std::env::var("KAPSA_PERTURBATION_RUST_LOG")
                    .unwrap_or_else(|_| "info,kube=warn".into()),
            )
            .env_remove(fault::ENV_VAR)
            .env_remove(fault::CACHE_DELAY_VAR)
            .env_remove(fault::CLOCK_OFFSET_VAR)
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("KAPSA_METRICS_ADDR")
            .env_remove("KAPSA_MAX_POLL_INTERVAL")
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        match perturbation {
            Some(Perturbation::Restart(k)) => {
                command.env(fault::ENV_VAR, k.to_string());
            }
            Some(Perturbation::StaleCache(plural)) => {
                command.env(
                    fault::CACHE_DELAY_VAR,
                    format!("{plural}={}", STALE_DELAY.as_secs_f64()),
                );
            }
            None => {}
        }
        if let Some(seconds) = clock_offset {
            command.env(fault::CLOCK_OFFSET_VAR, seconds.to_string());
        }
        let child = command.spawn().expect("starting kapsa operator");
        Self { child, log }
    }

    /// Waits for the process to exit; `None` after `timeout`.
    async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL, as a crash or an evicted Pod: no shutdown at all.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (the operator releases its Lease), then SIGKILL after 10 s.
    async fn stop(&mut self) {
        if self.running() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            if self.wait_exit(Duration::from_secs(10)).await.is_none() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }

    fn tail(&self, lines: usize) -> String {
        kapsa_testenv::process::log_tail(&self.log, lines)
    }

    /// Whether the process exited because it could not renew its Lease
    /// in time (the API server away): leader election's step-down.
    fn stepped_down(&mut self) -> bool {
        !self.running()
            && std::fs::read_to_string(&self.log)
                .is_ok_and(|log| log.contains("could not renew the lease in time; stepping down"))
    }

    /// The fault-injection line: which write the process exited after.
    fn exit_note(&self) -> Option<String> {
        std::fs::read_to_string(&self.log)
            .ok()?
            .lines()
            .find(|l| l.starts_with("fault injection: exiting right after API write "))
            .map(|l| {
                l.trim_start_matches("fault injection: exiting right after API write ")
                    .to_string()
            })
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

use kapsa_testenv::process::setpriv_available;

// ---------------------------------------------------------------------------
// The platform and the scenarios' repositories.

async fn apply_json(
    client: &Client,
    resource: &ApiResource,
    namespace: Option<&str>,
    object: Value,
) {
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    };
    let name = object["metadata"]["name"].as_str().unwrap().to_string();
    api.patch(
        &name,
        &PatchParams::apply("kapsa-perturbation-test").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {} {name}: {e}", resource.kind));
}

/// Makes the kpack simulator fail the builds of `revision` (none: no build
/// fails).
async fn fail_revisions(client: &Client, revision: Option<&str>) {
    use kapsa_testenv::simulators::kpack::{SETTINGS_NAME, SETTINGS_NAMESPACE};
    apply_json(
        client,
        &ApiResource::erase::<k8s_openapi::api::core::v1::ConfigMap>(&()),
        Some(SETTINGS_NAMESPACE),
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": SETTINGS_NAME},
            "data": {"failRevisions": revision.unwrap_or_default()}}),
    )
    .await;
}

async fn install_platform(client: &Client) {
    let crds = kapsa_testenv::crds::parse_crds(&kapsa_api::crds_yaml()).expect("CRDs");
    kapsa_testenv::crds::install_crds(client, &crds, "kapsa-perturbation-test")
        .await
        .expect("CRDs installed");
    let namespace = ApiResource::erase::<Namespace>(&());
    apply_json(
        client,
        &namespace,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PLATFORM_NAMESPACE}}),
    )
    .await;
    let builder = kapsa_api::external::kpack_cluster_builder();
    apply_json(
        client,
        &builder,
        None,
        json!({"apiVersion": builder.api_version, "kind": builder.kind, "metadata": {"name": "default"},
            "spec": {"tag": "registry.example/builders/default"}}),
    )
    .await;
    let issuer = kapsa_api::external::cert_manager_cluster_issuer();
    apply_json(
        client,
        &issuer,
        None,
        json!({"apiVersion": issuer.api_version, "kind": issuer.kind, "metadata": {"name": ISSUER},
            "spec": {"acme": {"server": "https://acme.example/directory", "solvers": [{"http01": {"ingress": {}}}]}}}),
    )
    .await;
    apply_json(
        client,
        &ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&()),
        Some(PLATFORM_NAMESPACE),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": REGISTRY_SECRET, "namespace": PLATFORM_NAMESPACE},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": "{\"auths\":{\"registry.example\":{\"auth\":\"dXNlcjpwYXNz\"}}}"}}),
    )
    .await;
    apply_json(
        client,
        &ApiResource::erase::<kapsa_api::ClusterRegistry>(&()),
        None,
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "ClusterRegistry", "metadata": {"name": REGISTRY},
            "spec": {"provider": "Harbor", "server": "registry.example", "repository": "kapsa",
                "credentialsSecretRef": {"name": REGISTRY_SECRET, "namespace": PLATFORM_NAMESPACE}}}),
    )
    .await;
    apply_json(
        client,
        &ApiResource::erase::<kapsa_api::DomainPool>(&()),
        None,
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "DomainPool", "metadata": {"name": POOL},
            "spec": {"domains": [BASE], "clusterIssuerRef": {"name": ISSUER}, "challenge": "HTTP01",
                "ingressClassName": "nginx"}}),
    )
    .await;
}

fn project_manifest(name: &str, url: &str, previews: bool) -> Value {
    let mut manifest = json!({
        "apiVersion": "kapsa.dev/v1alpha1", "kind": "Project",
        "metadata": {"name": name},
        "spec": {
            "source": {"git": {"url": url, "branch": "main"}, "pollInterval": "10s"},
            "registryRef": {"kind": "ClusterRegistry", "name": REGISTRY},
            "domainPoolRef": {"name": POOL},
            "runtime": {"port": 8080, "replicas": 1, "healthCheck": {"path": "/healthz"}}
        }
    });
    if previews {
        manifest["spec"]["previewEnvironments"] = json!({"enabled": true});
    }
    manifest
}

/// A scenario's repository: its commits are made once; every run sets the
/// served refs to the scenario's starting point, so every run sees the very
/// same commits (and the simulator gives the very same digests).
struct ScenarioRepo {
    _git: GitServer,
    repo: TestRepo,
    /// main's first commit.
    first: String,
    /// new-commit: main's second commit; preview-created: the branch's head.
    second: Option<String>,
}

impl ScenarioRepo {
    async fn new(scenario: Scenario) -> Self {
        let git = GitServer::start(None).await.expect("git server");
        let repo = git.create_repo(scenario.name()).expect("repository");
        let first = repo.commit("main", "app.txt", "v1", "first").unwrap();
        let second = match scenario {
            Scenario::NewProject
            | Scenario::ChildrenDeleted
            | Scenario::ProjectDeleted
            | Scenario::HostConflict => None,
            Scenario::NewCommit => Some(repo.commit("main", "app.txt", "v2", "second").unwrap()),
            // Not new-commit's content: that commit's id must not fail.
            Scenario::BuildFailed => Some(
                repo.commit("main", "app.txt", "v2 does not build", "broken")
                    .unwrap(),
            ),
            Scenario::PreviewCreated | Scenario::PreviewDeleted | Scenario::PreviewExpired => Some(
                repo.commit(PREVIEW_BRANCH, "login.txt", "login", "login page")
                    .unwrap(),
            ),
        };
        let this = Self {
            _git: git,
            repo,
            first,
            second,
        };
        this.set_ref("main", Some(&this.first.clone()));
        this.set_ref(PREVIEW_BRANCH, None);
        this
    }

    /// Points `branch` of the served repository at `commit`, or deletes it.
    fn set_ref(&self, branch: &str, commit: Option<&str>) {
        let reference = format!("refs/heads/{branch}");
        let mut args = vec!["update-ref"];
        match commit {
            Some(c) => args.extend([reference.as_str(), c]),
            None => args.extend(["-d", reference.as_str()]),
        }
        let status = Command::new("git")
            .arg("--git-dir")
            .arg(self.repo.bare_path())
            .args(&args)
            .stdout(Stdio::null())
            .status()
            .expect("git update-ref");
        assert!(status.success() || commit.is_none(), "git {args:?}");
    }
}

// ---------------------------------------------------------------------------
// The audit log.

/// The writes `user` made since `mark`; Lease writes (renewals) apart when
/// `with_leases` is false.
async fn writes(log: &AuditLog, mark: AuditMark, user: &str, with_leases: bool) -> Vec<AuditEvent> {
    log.events_since(mark)
        .await
        .into_iter()
        .filter(|e| e.user == user && e.is_write() && (with_leases || e.resource != "leases"))
        .collect()
}

fn summary(events: &[AuditEvent]) -> String {
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for e in events {
        *by.entry(format!(
            "{} {} {}/{}",
            e.verb,
            e.target(),
            e.namespace,
            e.name
        ))
        .or_default() += 1;
    }
    by.iter()
        .map(|(k, v)| format!("  {v} × {k}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------
// The end state and the oracle.

/// What one run ends with.
#[derive(Debug, Clone)]
struct EndState {
    /// `apiVersion kind namespace/name` → the fields Kapsa's field manager
    /// owns, normalised.
    objects: BTreeMap<String, Value>,
    /// Deployment `namespace/name` → its ReplicaSets (one per rollout).
    replica_sets: BTreeMap<String, usize>,
    /// Image `namespace/name` → `status.buildCounter`.
    builds: BTreeMap<String, i64>,
}

/// Projects `object` on a `managedFields[].fieldsV1` set: the values of
/// exactly the fields it lists.
fn project_fields(fields: &Value, object: &Value) -> Value {
    let Some(fields) = fields.as_object() else {
        return object.clone();
    };
    if fields.keys().all(|k| k == ".") {
        return object.clone();
    }
    match object {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            for (key, sub) in fields {
                let Some(name) = key.strip_prefix("f:") else {
                    continue;
                };
                if let Some(value) = map.get(name) {
                    out.insert(name.to_string(), project_fields(sub, value));
                }
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                let matched = fields.iter().find(|(key, _)| {
                    if let Some(k) = key.strip_prefix("k:") {
                        serde_json::from_str::<Value>(k).is_ok_and(|k| {
                            k.as_object()
                                .is_some_and(|k| k.iter().all(|(f, v)| &item[f] == v))
                        })
                    } else if let Some(v) = key.strip_prefix("v:") {
                        serde_json::from_str::<Value>(v).is_ok_and(|v| &v == item)
                    } else {
                        false
                    }
                });
                if let Some((_, sub)) = matched {
                    out.push(project_fields(sub, item));
                }
            }
            for (key, sub) in fields {
                if let Some(i) = key.strip_prefix("i:").and_then(|i| i.parse::<usize>().ok())
                    && let Some(item) = items.get(i)
                {
                    out.push(project_fields(sub, item));
                }
            }
            Value::Array(out)
        }
        other => other.clone(),
    }
}

fn merge(into: &mut Value, from: Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        a.insert(k, v);
                    }
                }
            }
        }
        (slot, from) => *slot = from,
    }
}

fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[..4].iter().all(u8::is_ascii_digit)
}

fn normalise_times(value: &mut Value) {
    match value {
        Value::String(s) if is_timestamp(s) => *s = "<time>".into(),
        Value::Array(items) => items.iter_mut().for_each(normalise_times),
        Value::Object(map) => map.values_mut().for_each(normalise_times),
        _ => {}
    }
}

/// Whether Kapsa's field manager owns fields of `object` (its status only,
/// for a Project or a DomainPool).
fn kapsa_managed(object: &Value) -> bool {
    object["metadata"]["managedFields"]
        .as_array()
        .is_some_and(|m| m.iter().any(|e| e["manager"] == KAPSA_MANAGER))
}

/// Whether Kapsa made `object`: its field manager applied the object itself,
/// not only a status (a Project's, a DomainPool's). Kapsa objects must have
/// a live owner.
fn kapsa_made(object: &Value) -> bool {
    object["metadata"]["managedFields"]
        .as_array()
        .is_some_and(|m| {
            m.iter().any(|e| {
                e["manager"] == KAPSA_MANAGER && e["subresource"].as_str().unwrap_or("").is_empty()
            })
        })
}

/// Kinds the oracle leaves out: Events are not state (an Event due right
/// after a status write is lost if the operator dies in between, by design)
/// and the Lease is leader-election bookkeeping.
fn left_out(resource: &ApiResource) -> bool {
    resource.kind == "Event" || resource.kind == "Lease"
}

/// The fields of `object` Kapsa's field manager owns, normalised (see the
/// module documentation).
fn kapsa_fields(object: &Value) -> Value {
    let mut out = json!({});
    for entry in object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if entry["manager"] == KAPSA_MANAGER {
            merge(&mut out, project_fields(&entry["fieldsV1"], object));
        }
    }
    if let Some(owners) = object["metadata"]["ownerReferences"].as_array()
        && out["metadata"].get("ownerReferences").is_some()
    {
        out["metadata"]["ownerReferences"] = owners
            .iter()
            .map(|o| {
                json!({"apiVersion": o["apiVersion"], "kind": o["kind"], "name": o["name"],
                    "controller": o["controller"]})
            })
            .collect();
    }
    if let Some(hash) = out["metadata"]["annotations"].get_mut(APPLIED_HASH)
        && hash.is_string()
    {
        *hash = json!("<hash>");
    }
    // A kpack Image names its Environment by uid, which differs between
    // runs (each run makes its Environments anew).
    if let Some(uid) = out["metadata"]["labels"].get_mut("kapsa.dev/environment-uid")
        && uid.is_string()
    {
        *uid = json!("<uid>");
    }
    let generation = object["metadata"]["generation"].as_i64();
    normalise_generations(&mut out, generation);
    normalise_times(&mut out);
    out
}

/// `observedGeneration` fields (the status's, its conditions') become
/// `<current>` when they equal the object's `metadata.generation`: how many
/// spec changes led to the end state is no part of it (a restart may skip an
/// intermediate spec), acting on the current one is. A stale one stays a
/// number, and so a difference.
fn normalise_generations(value: &mut Value, generation: Option<i64>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key == "observedGeneration" && v.as_i64().is_some() && v.as_i64() == generation {
                    *v = json!("<current>");
                } else {
                    normalise_generations(v, generation);
                }
            }
        }
        Value::Array(items) => items
            .iter_mut()
            .for_each(|v| normalise_generations(v, generation)),
        _ => {}
    }
}

struct Suite {
    env: &'static kapsa_testenv::TestEnv,
    client: Client,
    audit: AuditLog,
    resources: Vec<(ApiResource, ApiCapabilities)>,
    logs: tempfile::TempDir,
    long: bool,
    idle: Duration,
    runs: usize,
}

/// One perturbed or unperturbed run's outcome.
struct RunOutcome {
    end: EndState,
    /// Writes (Lease included) of the operator under test until at rest.
    writes: usize,
    /// The positions (1-based, among `writes`) of the writes that are not
    /// Lease renewals: where a restart interrupts Kapsa's own work.
    work_positions: Vec<u64>,
    /// How often each object was written: `<verb> <resource> <ns>/<name>`.
    write_counts: BTreeMap<String, usize>,
    write_summary: String,
    /// For a perturbed run: which write it exited after, as it logged it.
    exit_note: Option<String>,
    /// From the start of the operator that converged (after a restart: the
    /// restarted one) until the end state was there.
    converged_in: Option<Duration>,
    failures: Vec<String>,
}

impl Suite {
    fn kubeconfig(&self, user: &str) -> PathBuf {
        self.env.kubeconfig_as(user, &["system:masters"])
    }

    fn start_operator(
        &mut self,
        user: &str,
        tag: &str,
        perturbation: Option<Perturbation>,
        clock_offset: Option<i64>,
    ) -> Operator {
        self.runs += 1;
        let log = self
            .logs
            .path()
            .join(format!("{:04}-{tag}-{user}.log", self.runs));
        Operator::start(&self.kubeconfig(user), log, perturbation, clock_offset)
    }

    async fn all_objects(&self) -> Vec<(ApiResource, ApiCapabilities, Value)> {
        all_objects(&self.client, &self.resources).await
    }

    async fn end_state(&self) -> (EndState, Vec<(ApiResource, ApiCapabilities, Value)>) {
        let all = self.all_objects().await;
        let mut objects = BTreeMap::new();
        let mut replica_sets = BTreeMap::new();
        let mut builds = BTreeMap::new();
        for (resource, _, value) in &all {
            let ns = value["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = value["metadata"]["name"].as_str().unwrap_or_default();
            if resource.kind == "ReplicaSet" {
                for owner in value["metadata"]["ownerReferences"]
                    .as_array()
                    .into_iter()
                    .flatten()
                {
                    if owner["kind"] == "Deployment" {
                        *replica_sets
                            .entry(format!(
                                "{ns}/{}",
                                owner["name"].as_str().unwrap_or_default()
                            ))
                            .or_insert(0) += 1;
                    }
                }
            }
            if resource.kind == "Image" && resource.group == "kpack.io" {
                builds.insert(
                    format!("{ns}/{name}"),
                    value["status"]["buildCounter"].as_i64().unwrap_or(0),
                );
            }
            if left_out(resource) || !kapsa_managed(value) {
                continue;
            }
            objects.insert(
                format!("{} {} {ns}/{name}", resource.api_version, resource.kind),
                kapsa_fields(value),
            );
        }
        (
            EndState {
                objects,
                replica_sets,
                builds,
            },
            all,
        )
    }

    /// The checks that need no unperturbed run: orphans, builds, hosts,
    /// status against children.
    async fn check_invariants(
        &self,
        scenario: Scenario,
        repo: &ScenarioRepo,
        all: &[(ApiResource, ApiCapabilities, Value)],
    ) -> Vec<String> {
        let mut failures = Vec::new();
        let project_name = scenario.project();
        failures.extend(orphans(all));

        if scenario == Scenario::ProjectDeleted {
            if !self.project_gone(&project_name).await {
                failures.push(format!(
                    "Project {project_name}, its namespaces or its host-ownership entry remain"
                ));
            }
            return failures;
        }

        if scenario == Scenario::HostConflict {
            failures.extend(self.claims_refused().await);
        }

        // The Project, its Environments and their children.
        let Some(project) = Api::<Project>::all(self.client.clone())
            .get_opt(&project_name)
            .await
            .unwrap()
        else {
            failures.push(format!("Project {project_name} is missing"));
            return failures;
        };
        let status = project.status.clone().unwrap_or_default();
        let Some(namespace) = status.namespace.clone() else {
            failures.push("the Project's status names no namespace".into());
            return failures;
        };
        let Some(host) = status.host.clone() else {
            failures.push("the Project's status names no host".into());
            return failures;
        };
        let environments = Api::<Environment>::namespaced(self.client.clone(), &namespace)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        // kpack Images live in the Project's build namespace, the rest in
        // its namespace.
        let build_namespace = kapsa_api::naming::build_namespace(&project.name_any());
        let find = |kind: &str, name: &str| {
            let ns = if kind == "Image" {
                build_namespace.as_str()
            } else {
                namespace.as_str()
            };
            all.iter()
                .find(|(r, _, v)| {
                    r.kind == kind
                        && v["metadata"]["namespace"] == ns
                        && v["metadata"]["name"] == name
                })
                .map(|(_, _, v)| v.clone())
        };
        // Builds: the Project controls the kpack Images of its build
        // namespace (so the orphan check above passes them); each must be
        // for an Environment that exists (by uid).
        let live_uids: BTreeSet<String> = environments.iter().filter_map(|e| e.uid()).collect();
        for (r, _, v) in all.iter() {
            if r.kind == "Image"
                && r.group == "kpack.io"
                && v["metadata"]["namespace"] == build_namespace.as_str()
            {
                let uid = v["metadata"]["labels"]["kapsa.dev/environment-uid"].as_str();
                if !uid.is_some_and(|u| live_uids.contains(u)) {
                    failures.push(format!(
                        "kpack Image {build_namespace}/{}: built for no live Environment (environment-uid {uid:?})",
                        v["metadata"]["name"]
                    ));
                }
            }
        }
        let url = repo.repo.url();
        let mut expected_envs: BTreeMap<String, (String, i64)> =
            BTreeMap::from([("production".to_string(), (String::new(), 0))]);
        match scenario {
            Scenario::NewProject => {
                expected_envs.insert("production".into(), (repo.first.clone(), 1));
            }
            Scenario::NewCommit => {
                expected_envs.insert("production".into(), (repo.second.clone().unwrap(), 2));
            }
            Scenario::PreviewCreated => {
                expected_envs.insert("production".into(), (repo.first.clone(), 1));
                expected_envs.insert(
                    kapsa_api::naming::preview_environment_name(PREVIEW_BRANCH),
                    (repo.second.clone().unwrap(), 1),
                );
            }
            Scenario::PreviewDeleted
            | Scenario::PreviewExpired
            | Scenario::ChildrenDeleted
            | Scenario::ProjectDeleted
            | Scenario::HostConflict => {
                expected_envs.insert("production".into(), (repo.first.clone(), 1));
            }
            // The first commit serves; the second was built once and failed.
            Scenario::BuildFailed => {
                expected_envs.insert("production".into(), (repo.first.clone(), 2));
            }
        }
        // What each Environment's kpack Image builds: its deployed commit,
        // but build-failed's production builds the commit that failed.
        let building = |name: &str, deployed: &str| match (scenario, name) {
            (Scenario::BuildFailed, "production") => repo.second.clone().unwrap(),
            _ => deployed.to_string(),
        };
        let names: BTreeSet<String> = environments.iter().map(|e| e.name_any()).collect();
        let wanted: BTreeSet<String> = expected_envs.keys().cloned().collect();
        if names != wanted {
            failures.push(format!("Environments {names:?}, expected {wanted:?}"));
        }
        for env in &environments {
            let name = env.name_any();
            let Some((commit, builds)) = expected_envs.get(&name) else {
                continue;
            };
            let es = env.status.clone().unwrap_or_default();
            if es.phase != Some(kapsa_api::EnvironmentPhase::Ready) {
                failures.push(format!(
                    "Environment {name}: phase {:?}, not Ready",
                    es.phase
                ));
            }
            let revision = building(&name, commit);
            if revision != *commit && !build_failed(&es, &revision) {
                failures.push(format!(
                    "Environment {name}: Built {:?}, expected BuildFailed for {revision}",
                    es.conditions.iter().find(|c| c.type_ == "Built"),
                ));
            }
            if es.observed_generation != env.metadata.generation {
                failures.push(format!(
                    "Environment {name}: observedGeneration {:?} != generation {:?}",
                    es.observed_generation, env.metadata.generation
                ));
            }
            if es.commit.as_deref() != Some(commit.as_str()) {
                failures.push(format!(
                    "Environment {name}: commit {:?}, expected {commit}",
                    es.commit
                ));
            }
            let digest = simulated_digest(url, commit);
            if !es
                .image
                .as_deref()
                .is_some_and(|i| i.ends_with(&format!("@{digest}")))
            {
                failures.push(format!(
                    "Environment {name}: image {:?}, expected …@{digest}",
                    es.image
                ));
            }
            match find("Image", &name) {
                Some(image) => {
                    if image["spec"]["source"]["git"]["revision"] != revision.as_str() {
                        failures.push(format!(
                            "Image {name}: revision {}, expected {revision}",
                            image["spec"]["source"]["git"]["revision"]
                        ));
                    }
                    if image["status"]["latestImage"].as_str() != es.image.as_deref() {
                        failures.push(format!(
                            "Image {name}: latestImage {} but the Environment says {:?}",
                            image["status"]["latestImage"], es.image
                        ));
                    }
                    let counter = image["status"]["buildCounter"].as_i64().unwrap_or(0);
                    if counter != *builds {
                        failures.push(format!(
                            "Image {name}: {counter} builds, expected {builds} (one per commit)"
                        ));
                    }
                }
                None => failures.push(format!("Environment {name} has no kpack Image")),
            }
            match find("Deployment", &name) {
                Some(d) => {
                    let image = d["spec"]["template"]["spec"]["containers"][0]["image"].as_str();
                    if image != es.image.as_deref() {
                        failures.push(format!(
                            "Deployment {name} runs {image:?}, the Environment says {:?}",
                            es.image
                        ));
                    }
                    let replicas = d["spec"]["replicas"].as_i64().unwrap_or(1);
                    let ready = d["status"]["readyReplicas"].as_i64().unwrap_or(0);
                    let updated = d["status"]["updatedReplicas"].as_i64().unwrap_or(0);
                    if ready != replicas || updated != replicas {
                        failures.push(format!(
                            "Deployment {name}: {ready} ready, {updated} updated of {replicas}"
                        ));
                    }
                }
                None => failures.push(format!("Environment {name} has no Deployment")),
            }
        }
        // The Project's status lists exactly its Environments.
        let listed: BTreeMap<String, (Option<String>, bool)> = status
            .environments
            .iter()
            .map(|s| (s.name.clone(), (s.commit.clone(), s.ready)))
            .collect();
        let actual: BTreeMap<String, (Option<String>, bool)> = environments
            .iter()
            .map(|e| {
                let s = e.status.clone().unwrap_or_default();
                (
                    e.name_any(),
                    (
                        s.commit,
                        s.phase == Some(kapsa_api::EnvironmentPhase::Ready),
                    ),
                )
            })
            .collect();
        if listed != actual {
            failures.push(format!(
                "Project status.environments {listed:?} != the Environments {actual:?}"
            ));
        }
        let previews = environments
            .iter()
            .filter(|e| e.name_any() != "production")
            .count();
        if status.previews.len() != previews {
            failures.push(format!(
                "Project status.previews has {} entries, {previews} preview Environments exist",
                status.previews.len()
            ));
        }
        if scenario.previews() && status.preview_count != Some(previews as i32) {
            failures.push(format!(
                "Project status.previewCount {:?}, {previews} preview Environments exist",
                status.preview_count
            ));
        }
        let head = repo.repo.head("main").unwrap();
        if status.latest_commit != head {
            failures.push(format!(
                "Project status.latestCommit {:?}, main is at {head:?}",
                status.latest_commit
            ));
        }
        // Hosts: every Ingress host is the Project's or below it, and the
        // host-ownership table gives it to the Project's namespace.
        for (resource, _, value) in all {
            if resource.kind != "Ingress" || value["metadata"]["namespace"] != namespace.as_str() {
                continue;
            }
            let mut hosts: Vec<&str> = Vec::new();
            for rule in value["spec"]["rules"].as_array().into_iter().flatten() {
                hosts.extend(rule["host"].as_str());
            }
            for tls in value["spec"]["tls"].as_array().into_iter().flatten() {
                for h in tls["hosts"].as_array().into_iter().flatten() {
                    hosts.extend(h.as_str());
                }
            }
            for h in hosts {
                if h != host && !h.ends_with(&format!(".{host}")) {
                    failures.push(format!(
                        "Ingress {}: host {h} is not the Project's ({host}) or below it",
                        value["metadata"]["name"]
                    ));
                }
            }
        }
        let table = Api::<ConfigMap>::namespaced(self.client.clone(), PLATFORM_NAMESPACE)
            .get_opt(HOST_OWNERS)
            .await
            .unwrap()
            .and_then(|c| c.data)
            .unwrap_or_default();
        if table.get(&host) != Some(&namespace) {
            failures.push(format!(
                "host-ownership table: {host} → {:?}, expected {namespace}",
                table.get(&host)
            ));
        }
        failures
    }

    /// Whether the scenario's end state is there (not yet whether at rest).
    async fn reached(&self, scenario: Scenario, repo: &ScenarioRepo) -> bool {
        let project = scenario.project();
        if scenario == Scenario::ProjectDeleted {
            return self.project_gone(&project).await;
        }
        if scenario == Scenario::HostConflict && !self.claims_refused().await.is_empty() {
            return false;
        }
        if scenario == Scenario::ChildrenDeleted {
            for (resource, namespace, name) in deleted_children(scenario) {
                let api = Api::<DynamicObject>::namespaced_with(
                    self.client.clone(),
                    &namespace,
                    &resource,
                );
                if !matches!(api.get_opt(name).await, Ok(Some(_))) {
                    return false;
                }
            }
        }
        let production_commit = match scenario {
            Scenario::NewCommit => repo.second.clone().unwrap(),
            _ => repo.first.clone(),
        };
        if !env_ready(&self.client, &project, "production", &production_commit).await {
            return false;
        }
        if scenario == Scenario::BuildFailed {
            let failed = Api::<Environment>::namespaced(self.client.clone(), &project)
                .get_opt("production")
                .await
                .ok()
                .flatten()
                .and_then(|e| e.status)
                .is_some_and(|s| build_failed(&s, repo.second.as_deref().unwrap()));
            if !failed {
                return false;
            }
        }
        let preview = kapsa_api::naming::preview_environment_name(PREVIEW_BRANCH);
        if scenario.starts_with_preview()
            && Api::<Environment>::namespaced(self.client.clone(), &project)
                .get_opt(&preview)
                .await
                .map_or(true, |e| e.is_some())
        {
            return false;
        }
        // The garbage collector (not Kapsa) removes the deleted preview's
        // Deployment, Service and Ingress; wait for it.
        if scenario.starts_with_preview() {
            let gone = |found: Result<Option<_>, kube::Error>| matches!(found, Ok(None));
            let ns = project.as_str();
            if !gone(
                Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(self.client.clone(), ns)
                    .get_opt(&preview)
                    .await
                    .map(|d| d.map(|_| ())),
            ) || !gone(
                Api::<k8s_openapi::api::core::v1::Service>::namespaced(self.client.clone(), ns)
                    .get_opt(&preview)
                    .await
                    .map(|d| d.map(|_| ())),
            ) || !gone(
                Api::<k8s_openapi::api::networking::v1::Ingress>::namespaced(
                    self.client.clone(),
                    ns,
                )
                .get_opt(&preview)
                .await
                .map(|d| d.map(|_| ())),
            ) {
                return false;
            }
        }
        if scenario.ends_with_preview()
            && !env_ready(
                &self.client,
                &project,
                &preview,
                repo.second.as_ref().unwrap(),
            )
            .await
        {
            return false;
        }
        // The Project's summary follows its Environments a moment later.
        let Ok(Some(p)) = Api::<Project>::all(self.client.clone())
            .get_opt(&project)
            .await
        else {
            return false;
        };
        let status = p.status.unwrap_or_default();
        let expected = if scenario.ends_with_preview() { 2 } else { 1 };
        // The branch's head: build-failed's is the commit that failed.
        let head = match scenario {
            Scenario::BuildFailed => repo.second.clone().unwrap(),
            _ => production_commit,
        };
        status.environments.len() == expected
            && status.environments.iter().all(|e| e.ready)
            && status.latest_commit.as_deref() == Some(head.as_str())
    }

    /// Waits for the end state, then for an idle window with no write by
    /// `user` (Lease renewals aside). Returns the audit mark where that
    /// window began, or a failure.
    async fn converge(
        &self,
        scenario: Scenario,
        repo: &ScenarioRepo,
        user: &str,
        since: AuditMark,
        operator: &mut Operator,
    ) -> Result<(AuditMark, Duration), String> {
        let started = Instant::now();
        let deadline = started + CONVERGE_TIMEOUT;
        while !self.reached(scenario, repo).await {
            if !operator.running() {
                return Err(format!(
                    "the operator exited before the end state; its log:\n{}",
                    operator.tail(30)
                ));
            }
            if Instant::now() > deadline {
                let events = writes(&self.audit, since, user, false).await;
                let environments =
                    Api::<Environment>::namespaced(self.client.clone(), &scenario.project())
                        .list(&ListParams::default())
                        .await
                        .map(|l| {
                            l.items
                                .into_iter()
                                .map(|e| format!("{}: {:?}", e.name_any(), e.status))
                                .collect::<Vec<_>>()
                        })
                        .unwrap_or_default();
                return Err(format!(
                    "no end state within {CONVERGE_TIMEOUT:?}; writes so far:\n{}\nEnvironments: {environments:#?}\nlog:\n{}",
                    summary(&events),
                    operator.tail(30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let reached_in = started.elapsed();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mark = self.audit.mark().await;
            tokio::time::sleep(self.idle).await;
            let recent = writes(&self.audit, mark, user, false).await;
            if recent.is_empty() {
                return Ok((mark, reached_in));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "writes never stopped after the end state; the last window's:\n{}",
                    summary(&recent)
                ));
            }
        }
    }

    /// Deletes the scenario's Project and waits for its namespace to go and
    /// the host-ownership table to forget it, with an operator running.
    async fn clean(&mut self, scenario: Scenario) {
        self.clean_project(scenario, &scenario.project()).await;
        if scenario == Scenario::HostConflict {
            self.clean_project(scenario, LATE_PROJECT).await;
            let namespaces = Api::<Namespace>::all(self.client.clone());
            let _ = namespaces
                .delete(SQUAT_NAMESPACE, &DeleteParams::default())
                .await;
            kapsa_testenv::wait::eventually(
                Duration::from_secs(120),
                &format!("namespace {SQUAT_NAMESPACE} to go"),
                || {
                    let namespaces = namespaces.clone();
                    async move {
                        matches!(namespaces.get_opt(SQUAT_NAMESPACE).await, Ok(None)).then_some(())
                    }
                },
            )
            .await;
        }
    }

    /// Deletes a Project (of the scenario) and waits for its namespaces to
    /// go and the host-ownership table to forget it, with an operator
    /// running.
    async fn clean_project(&mut self, scenario: Scenario, project: &str) {
        let project = project.to_string();
        let projects = Api::<Project>::all(self.client.clone());
        let exists = projects.get_opt(&project).await.unwrap().is_some();
        let namespaces = Api::<Namespace>::all(self.client.clone());
        let namespace_exists = namespaces.get_opt(&project).await.unwrap().is_some()
            || namespaces
                .get_opt(&kapsa_api::naming::build_namespace(&project))
                .await
                .unwrap()
                .is_some();
        if !exists && !namespace_exists {
            return;
        }
        let mut operator = self.start_operator(
            USER_SETUP,
            &format!("{}-clean", scenario.name()),
            None,
            None,
        );
        let _ = projects.delete(&project, &DeleteParams::default()).await;
        // The garbage collector would delete the namespace (its owner is the
        // Project), but it learns new kinds only every 30 s: deleting the
        // namespace at once saves that wait.
        let build_namespace = kapsa_api::naming::build_namespace(&project);
        for namespace in [&project, &build_namespace] {
            let _ = Api::<Namespace>::all(self.client.clone())
                .delete(namespace, &DeleteParams::default())
                .await;
        }
        let client = self.client.clone();
        let host = format!("{project}.{BASE}");
        kapsa_testenv::wait::eventually(
            Duration::from_secs(120),
            &format!("Project {project}, its namespaces and its host to go"),
            || {
                let client = client.clone();
                let (project, host) = (project.clone(), host.clone());
                let build_namespace = build_namespace.clone();
                async move {
                    let p = Api::<Project>::all(client.clone())
                        .get_opt(&project)
                        .await
                        .ok()?;
                    let namespaces = Api::<Namespace>::all(client.clone());
                    let ns = match namespaces.get_opt(&project).await.ok()? {
                        None => namespaces.get_opt(&build_namespace).await.ok()?,
                        some => some,
                    };
                    let table = Api::<ConfigMap>::namespaced(client, PLATFORM_NAMESPACE)
                        .get_opt(HOST_OWNERS)
                        .await
                        .ok()?
                        .and_then(|c| c.data)
                        .unwrap_or_default();
                    (p.is_none() && ns.is_none() && !table.contains_key(&host)).then_some(())
                }
            },
        )
        .await;
        operator.stop().await;
    }

    /// host-conflict: what is wrong with the refusals (nothing: empty). The
    /// foreign Environment is `Ready=False` `WrongNamespace` and the late
    /// Project `DomainAllocated=False` `HostInUse`; no Ingress but the
    /// squatter's routes the late host, none is in the tenant's namespace
    /// but the squatter, and the host-ownership table gives the late host to
    /// nobody.
    async fn claims_refused(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let condition = |conditions: &[kapsa_api::Condition], type_: &str| {
            conditions
                .iter()
                .find(|c| c.type_ == type_)
                .map(|c| (format!("{:?}", c.status), c.reason.clone()))
        };
        let hijack = Api::<Environment>::namespaced(self.client.clone(), SQUAT_NAMESPACE)
            .get_opt("hijack")
            .await
            .ok()
            .flatten()
            .and_then(|e| e.status)
            .and_then(|s| condition(&s.conditions, "Ready"));
        if hijack != Some(("False".into(), "WrongNamespace".into())) {
            problems.push(format!(
                "the foreign Environment's Ready is {hijack:?}, not False WrongNamespace"
            ));
        }
        let late = Api::<Project>::all(self.client.clone())
            .get_opt(LATE_PROJECT)
            .await
            .ok()
            .flatten()
            .and_then(|p| p.status)
            .and_then(|s| condition(&s.conditions, kapsa_api::conditions::DOMAIN_ALLOCATED));
        if late != Some(("False".into(), "HostInUse".into())) {
            problems.push(format!(
                "{LATE_PROJECT}'s DomainAllocated is {late:?}, not False HostInUse"
            ));
        }
        let ingresses = Api::<k8s_openapi::api::networking::v1::Ingress>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        for ingress in ingresses {
            let ns = ingress.namespace().unwrap_or_default();
            let name = ingress.name_any();
            if ns == SQUAT_NAMESPACE && name == "squatter" {
                continue;
            }
            let hosts: Vec<String> = ingress
                .spec
                .iter()
                .flat_map(|s| s.rules.iter().flatten())
                .filter_map(|r| r.host.clone())
                .collect();
            if ns == SQUAT_NAMESPACE || hosts.contains(&late_host()) {
                problems.push(format!("Ingress {ns}/{name} routes {hosts:?}"));
            }
        }
        let table = Api::<ConfigMap>::namespaced(self.client.clone(), PLATFORM_NAMESPACE)
            .get_opt(HOST_OWNERS)
            .await
            .ok()
            .flatten()
            .and_then(|c| c.data)
            .unwrap_or_default();
        if let Some(holder) = table.get(&late_host()) {
            problems.push(format!(
                "the host-ownership table gives {} to {holder}",
                late_host()
            ));
        }
        problems
    }

    /// Whether a Project, both its namespaces and its host's entry in the
    /// host-ownership table are gone.
    async fn project_gone(&self, project: &str) -> bool {
        let namespaces = Api::<Namespace>::all(self.client.clone());
        let build = kapsa_api::naming::build_namespace(project);
        let host = format!("{project}.{BASE}");
        let table = Api::<ConfigMap>::namespaced(self.client.clone(), PLATFORM_NAMESPACE)
            .get_opt(HOST_OWNERS)
            .await
            .ok()
            .flatten()
            .and_then(|c| c.data)
            .unwrap_or_default();
        matches!(
            Api::<Project>::all(self.client.clone())
                .get_opt(project)
                .await,
            Ok(None)
        ) && matches!(namespaces.get_opt(project).await, Ok(None))
            && matches!(namespaces.get_opt(&build).await, Ok(None))
            && !table.contains_key(&host)
    }

    /// Brings the scenario to its starting point, with the operator stopped:
    /// refs reset, and for the scenarios that start from a live Project, that
    /// Project live.
    async fn prepare(&mut self, scenario: Scenario, repo: &ScenarioRepo) -> Result<(), String> {
        self.clean(scenario).await;
        repo.set_ref("main", Some(&repo.first));
        repo.set_ref(
            PREVIEW_BRANCH,
            scenario
                .starts_with_preview()
                .then_some(repo.second.as_deref())
                .flatten(),
        );
        if scenario == Scenario::NewProject {
            return Ok(());
        }
        self.create_project(scenario, repo).await;
        let mut operator = self.start_operator(
            USER_SETUP,
            &format!("{}-setup", scenario.name()),
            None,
            None,
        );
        let project = scenario.project();
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        let preview = kapsa_api::naming::preview_environment_name(PREVIEW_BRANCH);
        while !live(&self.client, &project, &repo.first).await
            || (scenario.starts_with_preview()
                && !env_ready(
                    &self.client,
                    &project,
                    &preview,
                    repo.second.as_deref().unwrap_or_default(),
                )
                .await)
        {
            if Instant::now() > deadline {
                return Err(format!("{project} did not go live:\n{}", operator.tail(30)));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // At rest before the operator stops.
        loop {
            let mark = self.audit.mark().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            if writes(&self.audit, mark, USER_SETUP, false)
                .await
                .is_empty()
            {
                break;
            }
        }
        operator.stop().await;
        Ok(())
    }

    async fn create_project(&self, scenario: Scenario, repo: &ScenarioRepo) {
        let mut manifest =
            project_manifest(&scenario.project(), repo.repo.url(), scenario.previews());
        if scenario == Scenario::PreviewExpired {
            manifest["spec"]["previewEnvironments"]["ttl"] = json!("1m");
        }
        apply_json(
            &self.client,
            &ApiResource::erase::<Project>(&()),
            None,
            manifest,
        )
        .await;
    }

    /// The event the scenario is about, with the operator stopped.
    async fn trigger(&self, scenario: Scenario, repo: &ScenarioRepo) {
        match scenario {
            Scenario::NewProject => self.create_project(scenario, repo).await,
            Scenario::NewCommit | Scenario::BuildFailed => {
                repo.set_ref("main", repo.second.as_deref())
            }
            Scenario::PreviewCreated => repo.set_ref(PREVIEW_BRANCH, repo.second.as_deref()),
            Scenario::PreviewDeleted => repo.set_ref(PREVIEW_BRANCH, None),
            // Time passes: the run's operators' clock is ahead.
            Scenario::PreviewExpired => {}
            Scenario::HostConflict => {
                let squat = ApiResource::erase::<Namespace>(&());
                apply_json(
                    &self.client,
                    &squat,
                    None,
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SQUAT_NAMESPACE}}),
                )
                .await;
                // An Ingress Kapsa did not make, routing the late Project's host.
                apply_json(
                    &self.client,
                    &ApiResource::erase::<k8s_openapi::api::networking::v1::Ingress>(&()),
                    Some(SQUAT_NAMESPACE),
                    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                        "metadata": {"name": "squatter", "namespace": SQUAT_NAMESPACE},
                        "spec": {"ingressClassName": "nginx", "rules": [{"host": late_host(),
                            "http": {"paths": [{"path": "/", "pathType": "Prefix",
                                "backend": {"service": {"name": "squatter", "port": {"number": 80}}}}]}}]}}),
                )
                .await;
                // An Environment outside the Project's namespace, naming a
                // host under the live Project's.
                apply_json(
                    &self.client,
                    &ApiResource::erase::<Environment>(&()),
                    Some(SQUAT_NAMESPACE),
                    json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment",
                        "metadata": {"name": "hijack", "namespace": SQUAT_NAMESPACE},
                        "spec": {"project": scenario.project(), "type": "Preview",
                            "image": "evil.example/app:1",
                            "host": format!("hijack.{}.{BASE}", scenario.project())}}),
                )
                .await;
                apply_json(
                    &self.client,
                    &ApiResource::erase::<Project>(&()),
                    None,
                    project_manifest(LATE_PROJECT, repo.repo.url(), false),
                )
                .await;
            }
            Scenario::ProjectDeleted => {
                Api::<Project>::all(self.client.clone())
                    .delete(&scenario.project(), &DeleteParams::default())
                    .await
                    .expect("deleting the Project");
            }
            Scenario::ChildrenDeleted => {
                for (resource, namespace, name) in deleted_children(scenario) {
                    let api = Api::<DynamicObject>::namespaced_with(
                        self.client.clone(),
                        &namespace,
                        &resource,
                    );
                    api.delete(name, &DeleteParams::default())
                        .await
                        .unwrap_or_else(|e| {
                            panic!("deleting {} {namespace}/{name}: {e}", resource.kind)
                        });
                }
            }
        }
    }

    /// One run: unperturbed (`perturbation` = None), exiting after write k
    /// and restarted, or with a lagging cache.
    async fn run(
        &mut self,
        scenario: Scenario,
        repo: &ScenarioRepo,
        perturbation: Option<Perturbation>,
    ) -> RunOutcome {
        let mut failures = Vec::new();
        let t0 = Instant::now();
        if let Err(e) = self.prepare(scenario, repo).await {
            panic!("{}: preparing the run failed: {e}", scenario.name());
        }
        let t_prepared = Instant::now();
        let history = History::watch(&self.client, &scenario.project()).await;
        self.trigger(scenario, repo).await;
        let tag = format!(
            "{}-{}",
            scenario.name(),
            perturbation.map_or("baseline".to_string(), |p| p.tag())
        );
        let start = self.audit.mark().await;
        let mut operator =
            self.start_operator(USER_RUN, &tag, perturbation, scenario.clock_offset());
        let mut exit_note = None;
        if let Some(Perturbation::StaleCache(plural)) = perturbation {
            // The hook is on: the operator says so when it starts the cache.
            let said = format!("fault injection: the {plural} cache lags");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !std::fs::read_to_string(&operator.log).is_ok_and(|l| l.contains(&said)) {
                if Instant::now() > deadline {
                    failures.push(format!("the operator never said {said:?}"));
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let (user, since, mut converging) = match perturbation {
            None | Some(Perturbation::StaleCache(_)) => (USER_RUN, start, operator),
            Some(Perturbation::Restart(k)) => {
                match operator.wait_exit(EXIT_TIMEOUT).await {
                    Some(status) if status.code() == Some(fault::EXIT_CODE) => {
                        exit_note = operator.exit_note();
                    }
                    Some(status) => failures.push(format!(
                        "k={k}: the operator exited with {status}, not the fault-injection status; log:\n{}",
                        operator.tail(30)
                    )),
                    None => {
                        failures.push(format!(
                            "k={k}: the operator made fewer than {k} writes in {EXIT_TIMEOUT:?}"
                        ));
                        operator.stop().await;
                    }
                }
                let restart = self.audit.mark().await;
                let restarted =
                    self.start_operator(USER_RESTARTED, &tag, None, scenario.clock_offset());
                (USER_RESTARTED, restart, restarted)
            }
        };
        let t1 = Instant::now();
        let mut converged_in = None;
        let at_rest = match self
            .converge(scenario, repo, user, since, &mut converging)
            .await
        {
            Ok((mark, took)) => {
                converged_in = Some(took);
                Some(mark)
            }
            Err(e) => {
                failures.push(e);
                None
            }
        };
        failures.extend(history.regressions());
        let all_writes = writes(&self.audit, start, USER_RUN, true).await;
        let (end, objects) = self.end_state().await;
        if at_rest.is_some() {
            failures.extend(self.check_invariants(scenario, repo, &objects).await);
        }
        if at_rest.is_some() && self.long {
            // Long form: a second idle window, after the snapshot.
            let mark = self.audit.mark().await;
            tokio::time::sleep(self.idle).await;
            let late = writes(&self.audit, mark, user, false).await;
            if !late.is_empty() {
                failures.push(format!("writes at rest:\n{}", summary(&late)));
            }
        }
        let counted = match at_rest {
            Some(mark) => {
                let after = writes(&self.audit, mark, USER_RUN, true).await.len();
                all_writes.len() - after.min(all_writes.len())
            }
            None => all_writes.len(),
        };
        let mut write_counts = BTreeMap::new();
        for e in all_writes.iter().take(counted) {
            *write_counts
                .entry(format!(
                    "{} {} {}/{}",
                    e.verb,
                    e.target(),
                    e.namespace,
                    e.name
                ))
                .or_insert(0) += 1;
        }
        let work_positions = all_writes
            .iter()
            .take(counted)
            .zip(1u64..)
            .filter(|(e, _)| e.resource != "leases")
            .map(|(_, position)| position)
            .collect();
        converging.stop().await;
        if std::env::var_os("KAPSA_PERTURBATION_TIMING").is_some() {
            eprintln!(
                "  timing: prepare {:.1}s, run to exit {:.1}s, converge+checks {:.1}s",
                (t_prepared - t0).as_secs_f64(),
                (t1 - t_prepared).as_secs_f64(),
                t1.elapsed().as_secs_f64()
            );
        }
        RunOutcome {
            end,
            writes: counted,
            work_positions,
            write_counts,
            write_summary: summary(&all_writes),
            exit_note,
            converged_in,
            failures,
        }
    }
}

/// Every object of every listable kind, as JSON.
async fn all_objects(
    client: &Client,
    resources: &[(ApiResource, ApiCapabilities)],
) -> Vec<(ApiResource, ApiCapabilities, Value)> {
    let mut out = Vec::new();
    for (resource, caps) in resources {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), resource);
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            // A kind gone or forbidden: nothing of Kapsa's there.
            Err(_) => continue,
        };
        for item in list.items {
            let mut value = serde_json::to_value(&item).unwrap();
            value["apiVersion"] = json!(resource.api_version);
            value["kind"] = json!(resource.kind);
            out.push((resource.clone(), caps.clone(), value));
        }
    }
    out
}

/// Every listable kind the API server serves.
async fn listable_resources(client: &Client) -> Vec<(ApiResource, ApiCapabilities)> {
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let mut resources = Vec::new();
    for group in discovery.groups() {
        for (resource, caps) in group.recommended_resources() {
            if caps.supports_operation(verbs::LIST) {
                resources.push((resource, caps));
            }
        }
    }
    resources
}

/// Orphans: every object Kapsa made (the host-ownership table aside) must
/// have an ownerReference to a live object with the same uid.
fn orphans(all: &[(ApiResource, ApiCapabilities, Value)]) -> Vec<String> {
    let mut failures = Vec::new();
    // Orphans: every Kapsa object has a live owner (same uid).
    let uids: BTreeMap<(String, String, String), String> = all
        .iter()
        .map(|(r, caps, v)| {
            let ns = match caps.scope {
                Scope::Namespaced => v["metadata"]["namespace"].as_str().unwrap_or_default(),
                Scope::Cluster => "",
            };
            (
                (
                    r.kind.clone(),
                    ns.to_string(),
                    v["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                ),
                v["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    let cluster_scoped: BTreeSet<String> = all
        .iter()
        .filter(|(_, caps, _)| caps.scope == Scope::Cluster)
        .map(|(r, _, _)| r.kind.clone())
        .collect();
    for (resource, _, value) in all {
        if left_out(resource) || !kapsa_made(value) {
            continue;
        }
        let ns = value["metadata"]["namespace"].as_str().unwrap_or_default();
        let name = value["metadata"]["name"].as_str().unwrap_or_default();
        if resource.kind == "ConfigMap" && name == HOST_OWNERS && ns == PLATFORM_NAMESPACE {
            continue;
        }
        let owners = value["metadata"]["ownerReferences"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let live = owners.iter().any(|o| {
            let kind = o["kind"].as_str().unwrap_or_default().to_string();
            let owner_ns = if cluster_scoped.contains(&kind) {
                ""
            } else {
                ns
            };
            uids.get(&(
                kind,
                owner_ns.to_string(),
                o["name"].as_str().unwrap_or_default().to_string(),
            ))
            .is_some_and(|uid| o["uid"].as_str() == Some(uid.as_str()))
        });
        if !live {
            failures.push(format!(
                "orphan: {} {ns}/{name} has no live owner (ownerReferences {})",
                resource.kind,
                json!(owners)
            ));
        }
    }
    failures
}

/// A live Project: production Ready at `commit`, and the Project's status
/// says so.
async fn live(client: &Client, project: &str, commit: &str) -> bool {
    if !env_ready(client, project, "production", commit).await {
        return false;
    }
    let Ok(Some(p)) = Api::<Project>::all(client.clone()).get_opt(project).await else {
        return false;
    };
    let status = p.status.unwrap_or_default();
    !status.environments.is_empty() && status.environments.iter().all(|e| e.ready)
}

/// Whether an Environment says the build of `commit` failed.
fn build_failed(status: &kapsa_api::EnvironmentStatus, commit: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == "Built" && c.reason == "BuildFailed" && c.message.contains(commit))
}

async fn env_ready(client: &Client, namespace: &str, name: &str, commit: &str) -> bool {
    let Ok(Some(env)) = Api::<Environment>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
    else {
        return false;
    };
    let status = env.status.unwrap_or_default();
    status.commit.as_deref() == Some(commit)
        && status.phase == Some(kapsa_api::EnvironmentPhase::Ready)
}

/// Differences between two end states, readable.
fn diff(expected: &EndState, actual: &EndState) -> Vec<String> {
    let mut out = Vec::new();
    for (key, value) in &expected.objects {
        match actual.objects.get(key) {
            None => out.push(format!("missing: {key}")),
            Some(v) if v != value => out.push(format!(
                "differs: {key}\n  unperturbed: {value}\n  perturbed:   {v}"
            )),
            Some(_) => {}
        }
    }
    for key in actual.objects.keys() {
        if !expected.objects.contains_key(key) {
            out.push(format!("extra: {key}: {}", actual.objects[key]));
        }
    }
    if expected.replica_sets != actual.replica_sets {
        out.push(format!(
            "ReplicaSets (rollouts) per Deployment: unperturbed {:?}, perturbed {:?}",
            expected.replica_sets, actual.replica_sets
        ));
    }
    if expected.builds != actual.builds {
        out.push(format!(
            "builds per Image: unperturbed {:?}, perturbed {:?}",
            expected.builds, actual.builds
        ));
    }
    out
}

/// What children-deleted deletes while the operator is stopped: the
/// production Environment's Deployment, Service, Ingress and kpack Image,
/// the push credentials' copy and the builder's Role in the build
/// namespace, and the apps' ServiceAccount.
fn deleted_children(scenario: Scenario) -> Vec<(ApiResource, String, &'static str)> {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
    use k8s_openapi::api::networking::v1::Ingress;
    use k8s_openapi::api::rbac::v1::Role;
    let project = scenario.project();
    let build = kapsa_api::naming::build_namespace(&project);
    vec![
        (
            ApiResource::erase::<Deployment>(&()),
            project.clone(),
            "production",
        ),
        (
            ApiResource::erase::<Service>(&()),
            project.clone(),
            "production",
        ),
        (
            ApiResource::erase::<Ingress>(&()),
            project.clone(),
            "production",
        ),
        (
            ApiResource::erase::<ServiceAccount>(&()),
            project,
            "kapsa-runtime",
        ),
        (
            kapsa_api::external::kpack_image(),
            build.clone(),
            "production",
        ),
        (
            ApiResource::erase::<Secret>(&()),
            build.clone(),
            "kapsa-registry",
        ),
        (ApiResource::erase::<Role>(&()), build, "kapsa-builder"),
    ]
}

/// The k values to run for a scenario with `w` writes: every one in the
/// long form (or as `KAPSA_PERTURBATION_K` lists them); in the quick form
/// `quick` of them, spread evenly over the positions of Kapsa's own writes
/// (`work`: a restart right after a Lease renewal interrupts nothing of
/// Kapsa's that a restart after the write before it does not).
fn sample(w: u64, work: &[u64], long: bool, quick: u64) -> Vec<u64> {
    if let Ok(list) = std::env::var("KAPSA_PERTURBATION_K") {
        return list
            .split(',')
            .filter_map(|k| k.trim().parse().ok())
            .filter(|k| *k > 0)
            .collect();
    }
    if long || w <= quick {
        return (1..=w).collect();
    }
    let candidates: Vec<u64> = if work.is_empty() {
        (1..=w).collect()
    } else {
        work.to_vec()
    };
    let n = candidates.len() as u64;
    if n <= quick {
        return candidates;
    }
    let ks: BTreeSet<u64> = (1..=quick)
        .map(|i| candidates[((i * n).div_ceil(quick + 1).max(1) - 1) as usize])
        .collect();
    ks.into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_at_every_write_point() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let long = std::env::var("KAPSA_PERTURBATION_LONG").is_ok_and(|v| !v.is_empty() && v != "0");
    let only: Option<BTreeSet<String>> = std::env::var("KAPSA_PERTURBATION_SCENARIOS")
        .ok()
        .map(|s| s.split(',').map(|s| s.trim().to_string()).collect());
    let env = kapsa_testenv::shared().await;
    let client = env.client().await;
    install_platform(&client).await;
    let resources = listable_resources(&client).await;
    assert!(
        resources
            .iter()
            .any(|(r, _)| r.kind == "Image" && r.group == "kpack.io"),
        "the kpack simulator's Image kind is served"
    );
    let mut suite = Suite {
        env,
        audit: env.audit_log(),
        client,
        resources,
        logs: tempfile::Builder::new()
            .prefix("kapsa-perturbation-")
            .tempdir()
            .unwrap(),
        long,
        idle: if long {
            Duration::from_secs(6)
        } else {
            Duration::from_secs(3)
        },
        runs: 0,
    };
    let mut report = Vec::new();
    // The slowest convergence after a perturbation, and which.
    let mut slowest: Option<(Duration, String)> = None;
    let mut perturbations = 0;
    let mut note_convergence = |outcome: &RunOutcome, what: String| {
        if let Some(took) = outcome.converged_in
            && slowest.as_ref().is_none_or(|(s, _)| took > *s)
        {
            slowest = Some((took, what));
        }
    };
    let mut failures = Vec::new();
    for scenario in Scenario::ALL {
        if only.as_ref().is_some_and(|o| !o.contains(scenario.name())) {
            continue;
        }
        let scenario_started = Instant::now();
        let repo = ScenarioRepo::new(scenario).await;
        // The kpack simulator fails build-failed's second commit (a commit
        // no other scenario has).
        if scenario == Scenario::BuildFailed {
            fail_revisions(&suite.client, repo.second.as_deref()).await;
        }
        let baseline = suite.run(scenario, &repo, None).await;
        assert!(
            baseline.failures.is_empty(),
            "{}: the unperturbed run fails the oracle:\n{}",
            scenario.name(),
            baseline.failures.join("\n")
        );
        let w = baseline.writes as u64;
        eprintln!(
            "{}: unperturbed run: {w} writes (Lease included) until at rest:\n{}",
            scenario.name(),
            baseline.write_summary
        );
        // Each deleted child is written once to bring it back: two
        // reconciles of one Project at once would write it twice.
        if scenario == Scenario::ChildrenDeleted {
            for (resource, namespace, name) in deleted_children(scenario) {
                let key = format!("patch {} {namespace}/{name}", resource.plural);
                let n = baseline.write_counts.get(&key).copied().unwrap_or(0);
                if n != 1 {
                    failures.push(format!(
                        "{}: {key} written {n} times to bring it back (once is enough)",
                        scenario.name()
                    ));
                }
            }
        }
        let ks = sample(
            w,
            &baseline.work_positions,
            suite.long,
            scenario.quick_sample(),
        );
        // Restarts at the chosen write points, then stale reads: one run per
        // delayed cache.
        let stale = scenario.stale_kinds(suite.long);
        let runs = ks
            .iter()
            .map(|&k| Perturbation::Restart(k))
            .chain(stale.iter().map(|&plural| Perturbation::StaleCache(plural)));
        for perturbation in runs {
            let t = Instant::now();
            let outcome = suite.run(scenario, &repo, Some(perturbation)).await;
            let what = match perturbation {
                Perturbation::Restart(k) => format!(
                    "{} k={k} (exited after {})",
                    scenario.name(),
                    outcome.exit_note.as_deref().unwrap_or("?")
                ),
                Perturbation::StaleCache(plural) => format!(
                    "{} with the {plural} cache {STALE_DELAY:?} behind",
                    scenario.name()
                ),
            };
            note_convergence(&outcome, what.clone());
            perturbations += 1;
            let mut problems = outcome.failures.clone();
            problems.extend(diff(&baseline.end, &outcome.end));
            eprintln!(
                "{what}: {} ({:.1}s)",
                if problems.is_empty() { "ok" } else { "FAILED" },
                t.elapsed().as_secs_f64()
            );
            if !problems.is_empty() {
                failures.push(format!("{what}:\n{}", problems.join("\n")));
            }
        }
        suite.clean(scenario).await;
        report.push(format!(
            "{}: W = {w}, {} restarts (k = {ks:?}), {} stale caches ({}) in {:.0}s",
            scenario.name(),
            ks.len(),
            stale.len(),
            stale.join(", "),
            scenario_started.elapsed().as_secs_f64()
        ));
    }
    let slowest = slowest.map_or("none".to_string(), |(took, what)| {
        format!("{:.1}s ({what})", took.as_secs_f64())
    });
    eprintln!(
        "perturbation suite ({} form): {perturbations} perturbations in {:.0}s; the slowest convergence after one: {slowest}\n{}\noperator logs: {}",
        if long { "long" } else { "quick" },
        started.elapsed().as_secs_f64(),
        report.join("\n"),
        suite.logs.path().display()
    );
    if !failures.is_empty() {
        // Keep the logs for a look.
        let kept = suite.logs.keep();
        panic!(
            "{} perturbation(s) broke the oracle (operator logs kept in {}):\n\n{}",
            failures.len(),
            kept.display(),
            failures.join("\n\n")
        );
    }
}

#[test]
fn the_quick_form_restarts_after_kapsas_own_writes() {
    if std::env::var_os("KAPSA_PERTURBATION_K").is_some() {
        return;
    }
    // 24 writes, Kapsa's own at 1, 2, 3, 6, 7 and 9 (the rest Lease renewals).
    assert_eq!(sample(24, &[1, 2, 3, 6, 7, 9], false, 3), [2, 3, 7]);
    assert_eq!(sample(24, &[5, 9], false, 3), [5, 9]);
    assert_eq!(sample(3, &[1], false, 3), [1, 2, 3], "few writes: all");
    assert_eq!(
        sample(9, &[], false, 3),
        [3, 5, 7],
        "positions unknown: spread"
    );
    assert_eq!(sample(6, &[1], true, 3).len(), 6, "the long form: all");
}

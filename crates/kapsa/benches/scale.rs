//! Scale benchmark: N Projects applied at once, against the local control
//! plane with simulated builds and TLS.
//!
//! `cargo bench -p kapsa --bench scale -- [--projects N] [--runs R]
//! [--idle-seconds S] [--timeout-seconds T] [--concurrency C]
//! [--previews K] [--operator-binary PATH] [--keep-logs]
//! [--resync-seconds S] [--no-sequenced] [--no-restart]`
//!
//! Each run has three phases, each on a fresh control plane (etcd,
//! kube-apiserver with its audit log on, controller-manager, scheduler,
//! kwok, plus the in-process kpack and cert-manager simulators):
//!
//! - operator: the `kapsa` binary (this build's, or `--operator-binary`)
//!   runs as a child process, as its own user `kapsa-operator`, with
//!   `--resync-period` shorter than the idle window; N Projects
//!   are applied at once; measured: the time from the first apply until every
//!   `production` Environment has `status.phase: Ready`, the operator's peak
//!   RSS (VmHWM and sampled VmRSS) by then, and, from the API server's audit
//!   log, the requests user `kapsa-operator` made until every Project was
//!   Ready and during an idle window afterwards (writes by kind, GETs by
//!   resource; CPU of every process over the window). The operator's own
//!   count (`kapsa_api_writes_total`) is printed next to it. Then the
//!   operator is restarted: the time until its caches are listed and until
//!   it has reconciled every Project and Environment, and the writes the
//!   audit log shows meanwhile (and 5 s more);
//! - raw: no operator; the bench itself (user `kapsa-bench-raw`)
//!   server-side applies the objects the operator would make (the Kapsa
//!   builders make them) as fast as it can and waits until every Deployment
//!   is Available, every kpack Image built and every Certificate ready: the
//!   API server's (and simulators') limit;
//! - sequenced raw: the same objects, applied (user
//!   `kapsa-bench-sequenced`) along the operator's dependency chain, each
//!   Project on its own: Project → `git ls-remote` → namespaces and the
//!   rest → kpack Image → the build → Deployment, Service and Ingress with
//!   the built image → Deployment Available and Certificate Ready. Waits
//!   read shared watches, as the operator's caches do.
//!
//! With `--previews K` every Project also has `previewEnvironments:
//! {enabled: true, replicas: 1}`, and the one repository they share gets K
//! branches (`feature/1` … `feature/K`, one commit each) before the
//! Projects are applied: the operator phase waits until all N × (1 + K)
//! Environments are Ready (its time and peak RSS are up to then), and the
//! raw phase also applies each preview Environment and its kpack Image,
//! Deployment, Service and Ingress, and waits for N × (1 + K) of each.
//! Without it (K = 0) nothing changes.
//!
//! The phases alternate which goes first from run to run. See
//! docs/benchmarks.md for what the figures mean.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Parser;
use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kapsa_api::naming::readable_branch_slug;
use kapsa_api::{DomainPool, Environment, EnvironmentPhase, Project, external};
use kapsa_operator::resources::environment::{
    EnvironmentInputs, deployment, image_repository, ingress, kpack_image, service,
};
use kapsa_operator::resources::project as children;
use kapsa_operator::resources::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use kapsa_testenv::audit::{self, AuditEvent, AuditLog, AuditMark};
use kapsa_testenv::find_assets;
use kapsa_testenv::simulators::kpack::simulated_digest;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

mod common;
use common::{
    BASE_DOMAIN, MASTERS, OPERATOR_USER, OperatorBinary, OperatorProcess, PLATFORM_NAMESPACE, POOL,
    REGISTRY, REGISTRY_SECRET, apply, apply_dynamic, cpu_by_process, cpu_delta, median, mib,
    platform, pool_manifest,
};

const POLL: Duration = Duration::from_millis(250);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// The user of the raw phase's applies.
const RAW_USER: &str = "kapsa-bench-raw";

#[derive(Parser, Debug, Clone)]
#[command(about = "Kapsa scale benchmark: operator vs raw server-side apply")]
struct Args {
    /// Projects applied at once.
    #[arg(long, default_value_t = 100)]
    projects: usize,
    /// Runs (each on fresh control planes); medians are over these.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Idle window after everything is Ready, to count steady-state writes.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Give up on a phase after this long.
    #[arg(long, default_value_t = 600)]
    timeout_seconds: u64,
    /// Applies in flight at once (both phases).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Keep the operator's log (its path is printed) instead of deleting it
    /// after a successful run.
    #[arg(long)]
    keep_logs: bool,
    /// Run this `kapsa` binary as the operator instead of this build's (to
    /// measure another commit with the same harness).
    #[arg(long, value_name = "PATH")]
    operator_binary: Option<PathBuf>,
    /// Preview branches per Project: every Project gets
    /// `previewEnvironments: {enabled: true, replicas: 1}`, and the
    /// repository K branches (`feature/1` … `feature/K`, one commit each)
    /// before the Projects are applied; the operator phase then waits for
    /// all N × (1 + K) Environments. 0 (the default): no previews.
    #[arg(long, default_value_t = 0)]
    previews: usize,
    /// The operator's `--resync-period`, in seconds: shorter than the idle
    /// window, so that the window sees every object at rest reconciled
    /// (an older build without the flag resyncs every 600 s).
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Skip the sequenced raw phase (the operator's dependency chain,
    /// applied by the bench).
    #[arg(long)]
    no_sequenced: bool,
    /// Skip restarting the operator after the idle window.
    #[arg(long)]
    no_restart: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

impl Args {
    /// The Environments a converged run has: production and previews.
    fn environments(&self) -> usize {
        self.projects * (1 + self.previews)
    }
}

// ---------------------------------------------------------------------------
// Counters and CPU time.

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn format_cpu(cpu: &BTreeMap<String, f64>) -> String {
    let total: f64 = cpu.values().sum();
    let parts: Vec<String> = cpu.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
    format!("{total:.1} CPU-s ({})", parts.join(", "))
}

// ---------------------------------------------------------------------------
// The API server's audit log: what one user asked of it.

/// One user's finished requests in a window of the audit log. Keys are
/// `resource[/subresource]` ([`AuditEvent::target`]). Leases are counted
/// like everything else; [`Self::lease_writes`] shows them apart. The audit
/// policy does not log reads of Leases and Events, so those are never among
/// the GETs.
#[derive(Debug, Default, Clone)]
struct AuditFigures {
    /// Writes (create, update, patch, delete, deletecollection) by kind.
    writes: BTreeMap<String, usize>,
    /// Writes by verb.
    write_verbs: BTreeMap<String, usize>,
    /// GETs (verb `get`) by kind.
    gets: BTreeMap<String, usize>,
    /// Every request by verb (a watch counts when it ends).
    verbs: BTreeMap<String, usize>,
    /// Requests whose response was not 2xx, by `verb kind code`.
    failed: BTreeMap<String, usize>,
    /// Bytes of audit log (all users) in the window.
    log_bytes: u64,
    /// Every client's writes in the window, by user and program (the user
    /// agent's first word, if any): what else the API server was writing
    /// meanwhile (the control plane's controllers, kwok and the bench's
    /// simulators share one admin user; kube-rs clients send no agent).
    writes_by_user: BTreeMap<String, usize>,
}

impl AuditFigures {
    fn of(events: &[AuditEvent], user: &str, log_bytes: u64) -> Self {
        let mut out = Self {
            log_bytes,
            ..Self::default()
        };
        for event in events.iter().filter(|e| audit::writes(e)) {
            let program = event
                .user_agent
                .split(['/', ' '])
                .next()
                .unwrap_or_default();
            let client = if program.is_empty() {
                event.user.clone()
            } else {
                format!("{} ({program})", event.user)
            };
            *out.writes_by_user.entry(client).or_default() += 1;
        }
        for event in events.iter().filter(|e| audit::by_user(user)(e)) {
            let target = event.target();
            *out.verbs.entry(event.verb.clone()).or_default() += 1;
            if audit::writes(event) {
                *out.writes.entry(target.clone()).or_default() += 1;
                *out.write_verbs.entry(event.verb.clone()).or_default() += 1;
            } else if event.verb == "get" {
                *out.gets.entry(target.clone()).or_default() += 1;
            }
            if !(200..300).contains(&event.response_code) {
                *out.failed
                    .entry(format!("{} {target} {}", event.verb, event.response_code))
                    .or_default() += 1;
            }
        }
        out
    }

    /// `user`'s requests in the audit log since `mark`, up to now.
    async fn since(log: &AuditLog, mark: AuditMark, user: &str) -> Self {
        let events = log.events_since(mark).await;
        let bytes = log.mark_now().offset().saturating_sub(mark.offset());
        Self::of(&events, user, bytes)
    }

    fn total_writes(&self) -> usize {
        self.writes.values().sum()
    }

    /// Writes to Leases (leader election), included in [`Self::total_writes`].
    fn lease_writes(&self) -> usize {
        self.writes
            .iter()
            .filter(|(kind, _)| kind.split('/').next() == Some("leases"))
            .map(|(_, n)| n)
            .sum()
    }

    fn total_gets(&self) -> usize {
        self.gets.values().sum()
    }
}

/// `a 3, b 2, c 2`: largest first (then by name), or `none`. `{:.2}`
/// gives fractions two decimals and leaves integers alone.
fn format_counts<N: Copy + PartialOrd + std::fmt::Display>(counts: &BTreeMap<String, N>) -> String {
    if counts.is_empty() {
        return "none".to_string();
    }
    let mut sorted: Vec<(&String, &N)> = counts.iter().collect();
    sorted.sort_by(|a, b| {
        b.1.partial_cmp(a.1)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.0.cmp(b.0))
    });
    sorted
        .iter()
        .map(|(k, v)| format!("{k} {v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn per_minute(count: usize, window: Duration) -> f64 {
    count as f64 * 60.0 / window.as_secs_f64()
}

fn project_name(i: usize) -> String {
    format!("bench-{i:04}")
}

/// The Project every phase applies: one replica, a health check, small
/// requests (1,000 of them fit the simulated node), polled every 60s; with
/// `previews` > 0, preview environments (1 replica each) for every branch
/// but `main`.
fn project_manifest(name: &str, repo_url: &str, previews: usize) -> Value {
    let mut manifest = json!({
        "apiVersion": "kapsa.dev/v1alpha1", "kind": "Project",
        "metadata": {"name": name},
        "spec": {
            "source": {"git": {"url": repo_url, "branch": "main"}, "pollInterval": "60s"},
            "registryRef": {"kind": "ClusterRegistry", "name": REGISTRY},
            "domainPoolRef": {"name": POOL},
            "runtime": {
                "port": 8080, "replicas": 1,
                "healthCheck": {"path": "/healthz"},
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}}
            }
        }
    });
    if previews > 0 {
        let mut spec = json!({"enabled": true, "replicas": 1});
        if previews > 10 {
            // The default maxEnvironments is 10.
            spec["maxEnvironments"] = json!(previews);
        }
        manifest["spec"]["previewEnvironments"] = spec;
    }
    manifest
}

/// `--previews K`: pushes K branches with a commit each to the platform's
/// repository (which every Project points at). Returns each branch and
/// its head.
fn preview_branches(
    platform: &common::Platform,
    k: usize,
) -> anyhow::Result<Vec<(String, String)>> {
    (1..=k)
        .map(|i| {
            let branch = format!("feature/{i}");
            let head = platform.repo.commit(
                &branch,
                "app.txt",
                format!("preview {i}"),
                "a preview branch",
            )?;
            Ok((branch, head))
        })
        .collect()
}

/// Applies the N Projects, `concurrency` at a time.
async fn apply_projects(
    client: &Client,
    manager: &str,
    args: &Args,
    repo_url: &str,
) -> anyhow::Result<Vec<Project>> {
    futures::stream::iter(0..args.projects)
        .map(|i| async move {
            let manifest: Project = serde_json::from_value(project_manifest(
                &project_name(i),
                repo_url,
                args.previews,
            ))?;
            apply(client, manager, &manifest).await
        })
        .buffer_unordered(args.concurrency)
        .try_collect()
        .await
}

/// A list served from the API server's watch cache (no etcd read).
fn cached_list() -> ListParams {
    ListParams::default().match_any()
}

// ---------------------------------------------------------------------------
// Phase 1: the operator.

/// "Every production Environment" below means every Environment,
/// production and previews, with `--previews`.
struct OperatorFigures {
    /// First apply until every production Environment is Ready.
    ready: Duration,
    /// Environments that existed (all of them, whatever their kind) then.
    environments: usize,
    /// First apply until every production Environment exists.
    environments_created: Duration,
    /// First apply until every production Environment has its commit (the
    /// git poll's result).
    commits_known: Duration,
    /// First apply until every Project reports Ready (its status caught up).
    projects_ready: Duration,
    /// CPU seconds by process from the first apply until all were Ready.
    cpu: BTreeMap<String, f64>,
    /// Peak RSS (VmHWM, and VmRSS sampled every poll) until everything was Ready.
    peak_rss_kib: u64,
    /// Peak RSS including the idle window, and VmRSS at its end.
    peak_rss_after_idle_kib: u64,
    rss_after_idle_kib: u64,
    /// The operator user's requests from its start until every Project was
    /// Ready, from the audit log.
    rollout_audit: AuditFigures,
    /// The operator user's requests during the idle window, from the audit log.
    idle_audit: AuditFigures,
    /// The operator's own count (`kapsa_api_writes_total`) of its writes
    /// while rolling out, by kind.
    rollout_writes: BTreeMap<String, u64>,
    rollout_reconciles: BTreeMap<String, u64>,
    /// The operator's own count of its writes during the idle window, by kind.
    idle_writes: BTreeMap<String, u64>,
    /// Git polls during the idle window.
    idle_polls: u64,
    /// What those writes were: Event reasons and changed status fields.
    idle_events: BTreeMap<String, usize>,
    idle_status_changes: BTreeMap<String, usize>,
    idle: Duration,
    /// CPU seconds by process during the idle window.
    idle_cpu: BTreeMap<String, f64>,
    /// Reconciles during the idle window, by controller (the operator's
    /// own count: shows the resync ran).
    idle_reconciles: BTreeMap<String, u64>,
    /// The operator's process name, its key in the CPU figures.
    operator_comm: String,
    restart: Option<RestartFigures>,
}

/// The operator restarted after the idle window.
struct RestartFigures {
    /// From the restart until `/readyz` answered 200 (caches listed).
    synced: Duration,
    /// Until the new process had reconciled at least as many Projects and
    /// Environments as exist (its own count; every status compared with
    /// its plan).
    confirmed: Duration,
    /// The operator user's requests from the restart until 5 s after
    /// `confirmed`, from the audit log.
    audit: AuditFigures,
    /// The new process's peak RSS until then.
    peak_rss_kib: u64,
    /// CPU seconds by process over the same window.
    cpu: BTreeMap<String, f64>,
}

impl OperatorFigures {
    /// Operator CPU per idle minute, in CPU-seconds.
    fn idle_cpu_per_minute(&self, process: &str) -> f64 {
        self.idle_cpu.get(process).copied().unwrap_or(0.0) * 60.0 / self.idle.as_secs_f64()
    }

    /// Audit log: the operator user's writes per minute in the idle window.
    fn idle_writes_per_minute(&self) -> f64 {
        per_minute(self.idle_audit.total_writes(), self.idle)
    }

    /// Audit log: the operator user's GETs per minute in the idle window.
    fn idle_gets_per_minute(&self) -> f64 {
        per_minute(self.idle_audit.total_gets(), self.idle)
    }

    /// The operator's own count of its idle writes, per minute.
    fn own_idle_writes_per_minute(&self) -> f64 {
        per_minute(self.idle_writes.values().sum::<u64>() as usize, self.idle)
    }
}

async fn operator_phase(
    assets: &Path,
    args: &Args,
    binary: &OperatorBinary,
    run: usize,
) -> anyhow::Result<OperatorFigures> {
    let mut platform = platform(assets).await?;
    preview_branches(&platform, args.previews)?;
    let client = platform.client.clone();
    let log = std::env::temp_dir().join(format!(
        "kapsa-bench-scale-operator-{}-run{run}.log",
        std::process::id()
    ));
    let restart_log = log.with_extension("restart.log");
    let kubeconfig = platform.plane.kubeconfig_as(OPERATOR_USER, MASTERS)?;
    let started_mark = platform.audit.mark().await;
    let extra = if binary.resync_period {
        vec![
            "--resync-period".to_string(),
            format!("{}s", args.resync_seconds),
        ]
    } else {
        Vec::new()
    };
    let mut operator = OperatorProcess::start_with(binary, &kubeconfig, log.clone(), &extra)?;
    operator.wait_for_metrics(Duration::from_secs(30)).await?;
    eprintln!(
        "  operator pid {} (log {}), applying {} Projects",
        operator.pid(),
        log.display(),
        args.projects
    );

    let timeout = Duration::from_secs(args.timeout_seconds);
    // Progress is read from a watch started before the clock, not from a
    // list every 250 ms: such lists load the API server being measured.
    let (environments, _watch) = watched::<Environment>(&client).await?;
    let cpu_before = cpu_by_process(&platform.plane, Some(operator.pid()));
    let started = Instant::now();
    apply_projects(&client, "bench", args, &platform.repo_url).await?;
    let applied = started.elapsed();

    // With --previews, every Environment (production and previews) counts.
    let wanted = args.environments();
    let what = if args.previews == 0 {
        "production Environments"
    } else {
        "Environments (production and previews)"
    };
    let mut environments_created = None;
    let mut commits_known = None;
    let mut last_progress = Instant::now();
    let (ready, environments_at_ready) = loop {
        operator.ensure_running()?;
        operator.sample_peak()?;
        platform.plane.ensure_running()?;
        let all = environments.state();
        let production: Vec<&Environment> = all
            .iter()
            .map(AsRef::as_ref)
            .filter(|e| args.previews > 0 || e.name_any() == "production")
            .collect();
        let mut phases: BTreeMap<String, usize> = BTreeMap::new();
        for e in &production {
            let phase = e
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .map_or("None".to_string(), |p| format!("{p:?}"));
            *phases.entry(phase).or_default() += 1;
        }
        if environments_created.is_none() && production.len() >= wanted {
            environments_created = Some(started.elapsed());
        }
        let with_commit = production
            .iter()
            .filter(|e| e.spec.commit.is_some())
            .count();
        if commits_known.is_none() && with_commit >= wanted {
            commits_known = Some(started.elapsed());
        }
        let ready = production
            .iter()
            .filter(|e| e.status.as_ref().and_then(|s| s.phase) == Some(EnvironmentPhase::Ready))
            .count();
        if ready >= wanted {
            break (started.elapsed(), all.len());
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            eprintln!(
                "  {:>6.1}s: {} of {wanted} {what} ({with_commit} with a commit), phases {phases:?}, operator RSS {} MiB",
                started.elapsed().as_secs_f64(),
                production.len(),
                operator.memory_kib("VmRSS").unwrap_or(0) / 1024
            );
        }
        ensure!(
            started.elapsed() < timeout,
            "timed out after {timeout:?}: {ready} of {wanted} {what} Ready ({} exist, phases {phases:?}; operator log {})",
            production.len(),
            log.display()
        );
        tokio::time::sleep(POLL).await;
    };
    let peak_rss_kib = operator.sample_peak()?;
    let cpu = cpu_delta(
        &cpu_by_process(&platform.plane, Some(operator.pid())),
        &cpu_before,
    );

    // Steady state starts once the Projects' statuses have caught up too
    // (each aggregates its production Environment's readiness), and the
    // DomainPool's allocations.
    let projects: Api<Project> = Api::all(client.clone());
    let projects_ready = loop {
        operator.ensure_running()?;
        operator.sample_peak()?;
        let list = projects.list(&cached_list()).await?;
        let ready = list
            .items
            .iter()
            .filter(|p| {
                p.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == kapsa_api::ConditionStatus::True)
                })
            })
            .count();
        // And the DomainPool's status counts them all: its reconcile is
        // debounced behind the Projects' changes, so its last write comes
        // after they are Ready (that write is convergence, not idling).
        let allocated: i32 = Api::<kapsa_api::DomainPool>::all(client.clone())
            .list(&cached_list())
            .await?
            .items
            .iter()
            .filter_map(|p| p.status.as_ref())
            .flat_map(|s| s.allocations.iter().map(|a| a.projects))
            .sum();
        if ready >= args.projects && usize::try_from(allocated).unwrap_or(0) >= args.projects {
            break started.elapsed();
        }
        ensure!(
            started.elapsed() < timeout,
            "timed out after {timeout:?}: {ready} of {} Projects Ready (operator log {})",
            args.projects,
            log.display()
        );
        tokio::time::sleep(POLL).await;
    };
    let rollout_writes = operator.writes().await?;
    let rollout_reconciles = operator.reconciles().await?;
    let rollout_audit = AuditFigures::since(&platform.audit, started_mark, OPERATOR_USER).await;
    eprintln!(
        "  all Environments Ready after {:.2}s, all Projects Ready after {:.2}s (Projects applied in {:.2}s); idle for {}s",
        ready.as_secs_f64(),
        projects_ready.as_secs_f64(),
        applied.as_secs_f64(),
        args.idle_seconds
    );

    let idle = Duration::from_secs(args.idle_seconds);
    let statuses_before = statuses(&client).await?;
    let idle_since = k8s_openapi::jiff::Timestamp::now();
    let before = operator.writes().await?;
    let reconciles_before = operator.reconciles().await?;
    let idle_cpu_before = cpu_by_process(&platform.plane, Some(operator.pid()));
    let polls_before = operator.git_polls().await?;
    let idle_mark = platform.audit.mark().await;
    let idle_started = Instant::now();
    while idle_started.elapsed() < idle {
        tokio::time::sleep(Duration::from_secs(1).min(idle.saturating_sub(idle_started.elapsed())))
            .await;
        operator.ensure_running()?;
        operator.sample_peak()?;
    }
    let idle = idle_started.elapsed();
    let idle_cpu = cpu_delta(
        &cpu_by_process(&platform.plane, Some(operator.pid())),
        &idle_cpu_before,
    );
    let idle_reconciles = delta(&operator.reconciles().await?, &reconciles_before);
    let idle_audit = AuditFigures::since(&platform.audit, idle_mark, OPERATOR_USER).await;
    let after = operator.writes().await?;
    let idle_polls = operator.git_polls().await? - polls_before;
    let idle_writes = delta(&after, &before);
    let (idle_events, idle_status_changes) =
        if idle_writes.is_empty() && idle_audit.writes.is_empty() {
            Default::default()
        } else {
            let mut changes = BTreeMap::new();
            let statuses_after = statuses(&client).await?;
            for (key, after) in &statuses_after {
                let kind = key.split('/').next().unwrap_or_default();
                let before = statuses_before.get(key).unwrap_or(&Value::Null);
                changed_fields(before, after, kind.to_string(), &mut changes);
            }
            (kapsa_events_since(&client, idle_since).await?, changes)
        };
    let peak_rss_after_idle_kib = operator.sample_peak()?;
    let rss_after_idle_kib = operator.memory_kib("VmRSS")?;
    let restart = if args.no_restart {
        None
    } else {
        operator.stop();
        drop(operator);
        let restarted = restart(&platform, args, binary, &kubeconfig, &restart_log, &extra).await?;
        operator = restarted.0;
        Some(restarted.1)
    };
    let figures = OperatorFigures {
        ready,
        environments: environments_at_ready,
        environments_created: environments_created.unwrap_or(ready),
        commits_known: commits_known.unwrap_or(ready),
        cpu,
        projects_ready,
        peak_rss_kib,
        peak_rss_after_idle_kib,
        rss_after_idle_kib,
        rollout_audit,
        idle_audit,
        rollout_writes,
        rollout_reconciles,
        idle_writes,
        idle_polls,
        idle_events,
        idle_status_changes,
        idle,
        idle_cpu,
        idle_reconciles,
        operator_comm: binary.comm(),
        restart,
    };
    operator.stop();
    drop(operator);
    drop(platform);
    if !args.keep_logs {
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(&restart_log);
    }
    Ok(figures)
}

/// Starts the operator again (the old one is gone) and measures until its
/// caches are listed and it has reconciled every Project and Environment,
/// then 5 s more for late writes.
async fn restart(
    platform: &common::Platform,
    args: &Args,
    binary: &OperatorBinary,
    kubeconfig: &Path,
    log: &Path,
    extra: &[String],
) -> anyhow::Result<(OperatorProcess, RestartFigures)> {
    let timeout = Duration::from_secs(args.timeout_seconds);
    let environments = Api::<Environment>::all(platform.client.clone())
        .list(&cached_list())
        .await?
        .items
        .len() as u64;
    let mark = platform.audit.mark().await;
    let cpu_before = cpu_by_process(&platform.plane, None);
    let started = Instant::now();
    let mut operator = OperatorProcess::start_with(binary, kubeconfig, log.to_path_buf(), extra)?;
    let mut synced = None;
    let confirmed = loop {
        operator.ensure_running()?;
        operator.sample_peak()?;
        if synced.is_none() && operator.ready().await.unwrap_or(false) {
            synced = Some(started.elapsed());
        }
        if synced.is_some() {
            let reconciles = operator.reconciles().await?;
            let done = |controller: &str, wanted: u64| {
                reconciles.get(controller).copied().unwrap_or(0) >= wanted
            };
            if done("project", args.projects as u64) && done("environment", environments) {
                break started.elapsed();
            }
        }
        ensure!(
            started.elapsed() < timeout,
            "restart: timed out after {timeout:?} (operator log {})",
            log.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(5) {
        operator.ensure_running()?;
        operator.sample_peak()?;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let cpu = cpu_delta(
        &cpu_by_process(&platform.plane, Some(operator.pid())),
        &cpu_before,
    );
    let audit = AuditFigures::since(&platform.audit, mark, OPERATOR_USER).await;
    let figures = RestartFigures {
        synced: synced.unwrap_or(confirmed),
        confirmed,
        audit,
        peak_rss_kib: operator.sample_peak()?,
        cpu,
    };
    Ok((operator, figures))
}

/// The status of every Project and Environment, by `Kind/namespace/name`.
async fn statuses(client: &Client) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for p in Api::<Project>::all(client.clone())
        .list(&cached_list())
        .await?
    {
        out.insert(
            format!("Project//{}", p.name_any()),
            serde_json::to_value(&p.status)?,
        );
    }
    for e in Api::<Environment>::all(client.clone())
        .list(&cached_list())
        .await?
    {
        out.insert(
            format!(
                "Environment/{}/{}",
                e.namespace().unwrap_or_default(),
                e.name_any()
            ),
            serde_json::to_value(&e.status)?,
        );
    }
    Ok(out)
}

/// Counts the leaves that differ between two statuses, by path (conditions
/// matched by type), e.g. `Project.conditions[Ready].message`.
fn changed_fields(before: &Value, after: &Value, path: String, out: &mut BTreeMap<String, usize>) {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            for key in b.keys().chain(a.keys().filter(|k| !b.contains_key(*k))) {
                let (bv, av) = (
                    b.get(key).unwrap_or(&Value::Null),
                    a.get(key).unwrap_or(&Value::Null),
                );
                changed_fields(bv, av, format!("{path}.{key}"), out);
            }
        }
        (Value::Array(b), Value::Array(a))
            if a.iter().chain(b).all(|v| v.get("type").is_some()) =>
        {
            let by_type = |list: &Vec<Value>, t: &Value| {
                list.iter()
                    .find(|v| v.get("type") == Some(t))
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            let mut types: Vec<&Value> = a.iter().chain(b).filter_map(|v| v.get("type")).collect();
            types.dedup();
            for t in types {
                let label = t.as_str().unwrap_or("?");
                changed_fields(
                    &by_type(b, t),
                    &by_type(a, t),
                    format!("{path}[{label}]"),
                    out,
                );
            }
        }
        (b, a) if b != a => *out.entry(path).or_default() += 1,
        _ => {}
    }
}

/// Kapsa's Events (events.k8s.io) emitted or repeated since `since`, by
/// `reason (kind)`.
async fn kapsa_events_since(
    client: &Client,
    since: k8s_openapi::jiff::Timestamp,
) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut out = BTreeMap::new();
    for e in Api::<k8s_openapi::api::events::v1::Event>::all(client.clone())
        .list(&cached_list())
        .await?
    {
        if e.reporting_controller.as_deref() != Some("kapsa") {
            continue;
        }
        let last = e
            .series
            .as_ref()
            .map(|s| s.last_observed_time.0)
            .or(e.event_time.as_ref().map(|t| t.0));
        if last.is_some_and(|t| t >= since) {
            let kind = e.regarding.and_then(|r| r.kind).unwrap_or_default();
            let reason = e.reason.unwrap_or_default();
            *out.entry(format!("{reason} ({kind})")).or_default() += 1;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Phase 2: the same objects by raw server-side apply, no operator.

const RAW_MANAGER: &str = "bench-raw";

/// The platform objects both raw phases build from: the DomainPool, the
/// registry's credentials Secret and the ClusterRegistry's spec.
async fn raw_inputs(
    client: &Client,
) -> anyhow::Result<(DomainPool, Secret, kapsa_api::RegistrySpec)> {
    let pool: DomainPool = serde_json::from_value(pool_manifest())?;
    let registry_source = Api::<Secret>::namespaced(client.clone(), PLATFORM_NAMESPACE)
        .get(REGISTRY_SECRET)
        .await?;
    let registry_spec = Api::<kapsa_api::ClusterRegistry>::all(client.clone())
        .get(REGISTRY)
        .await?
        .spec;
    Ok((pool, registry_source, registry_spec))
}

/// A Project's two Namespaces, at once.
async fn apply_namespaces(client: &Client, manager: &str, project: &Project) -> anyhow::Result<()> {
    let (namespace, build_namespace) = (
        children::namespace(project),
        children::build_namespace(project, Default::default()),
    );
    tokio::try_join!(
        apply(client, manager, &namespace),
        apply(client, manager, &build_namespace),
    )?;
    Ok(())
}

/// What goes into a Project's Namespaces besides its Environments, at
/// once: the push credentials' copy (in the build namespace; the registry
/// names no pull-only credentials), the ServiceAccounts, Role and
/// RoleBinding.
async fn apply_access(
    client: &Client,
    manager: &str,
    project: &Project,
    registry_source: &Secret,
) -> anyhow::Result<()> {
    let secret = children::push_secret(project, registry_source);
    let builder = children::builder_service_account(project, true, false);
    let runtime = children::runtime_service_account(project, false);
    let role = children::builder_role(project, true, false);
    let binding = children::builder_role_binding(project);
    tokio::try_join!(
        apply(client, manager, &secret),
        apply(client, manager, &builder),
        apply(client, manager, &runtime),
        apply(client, manager, &role),
        apply(client, manager, &binding),
    )?;
    Ok(())
}

/// Applies what the operator makes for one Project, dependencies first:
/// Project → Namespace → (registry Secret, ServiceAccounts, Role,
/// RoleBinding, Environment, the preview Environments) → (kpack Image,
/// Deployment, Service, Ingress of each Environment). `previews`: the
/// preview branches and their heads (`--previews`; none by default).
async fn raw_project(
    client: &Client,
    project: &Project,
    pool: &DomainPool,
    registry_source: &Secret,
    registry_spec: &kapsa_api::RegistrySpec,
    commit: &str,
    previews: &[(String, String)],
) -> anyhow::Result<()> {
    const MANAGER: &str = RAW_MANAGER;
    let name = project.name_any();
    apply_namespaces(client, MANAGER, project).await?;
    let host = format!("{name}.{BASE_DOMAIN}");
    let production = children::production_environment(project, Some(commit), Some(&host));
    let seen = k8s_openapi::jiff::Timestamp::now();
    let expires = seen.checked_add(k8s_openapi::jiff::SignedDuration::from_hours(72))?;
    let previews = previews
        .iter()
        .map(|(branch, head)| {
            let slug = readable_branch_slug(branch)
                .with_context(|| format!("branch {branch} has no readable slug"))?;
            let env = children::preview_environment(
                project,
                &slug,
                branch,
                head,
                Some(BASE_DOMAIN),
                seen,
                Some(expires),
            );
            anyhow::Ok((env, head.as_str()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (environment, preview_environments, ()) = tokio::try_join!(
        apply(client, MANAGER, &production),
        futures::future::try_join_all(previews.iter().map(|(e, _)| apply(client, MANAGER, e))),
        apply_access(client, MANAGER, project, registry_source),
    )?;
    tokio::try_join!(
        raw_environment(client, project, pool, registry_spec, &environment, commit),
        futures::future::try_join_all(preview_environments.iter().zip(&previews).map(
            |(env, (_, head))| raw_environment(client, project, pool, registry_spec, env, head)
        )),
    )?;
    Ok(())
}

/// The kpack Image, Deployment, Service and Ingress of one Environment at
/// `commit`, applied at once.
async fn raw_environment(
    client: &Client,
    project: &Project,
    pool: &DomainPool,
    registry_spec: &kapsa_api::RegistrySpec,
    environment: &Environment,
    commit: &str,
) -> anyhow::Result<()> {
    const MANAGER: &str = RAW_MANAGER;
    let name = project.name_any();
    let inputs = EnvironmentInputs {
        project,
        environment,
        pool: Some(pool),
        base_domain: Some(BASE_DOMAIN),
    };
    let repository = image_repository(registry_spec, &name);
    let image = kpack_image(&inputs, &repository, commit);
    let tag = image.data["spec"]["tag"].as_str().unwrap_or_default();
    let built = format!(
        "{tag}@{}",
        simulated_digest(&project.spec.source.git.url, commit)
    );
    let ingress = ingress(&inputs).context("the builders made no Ingress")?;
    let deployment = deployment(&inputs, &built);
    let service = service(&inputs);
    let image_resource = external::kpack_image();
    tokio::try_join!(
        apply_dynamic(client, MANAGER, &image_resource, &image),
        apply(client, MANAGER, &deployment),
        apply(client, MANAGER, &service),
        apply(client, MANAGER, &ingress),
    )?;
    Ok(())
}

/// Made by Kapsa (or by a phase that applies what Kapsa would).
fn managed(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY_VALUE)
}

/// A reflector of every `K` in the cluster, listed before it returns; the
/// task that feeds it stops when the guard is dropped.
async fn watched<K>(client: &Client) -> anyhow::Result<(reflector::Store<K>, common::AbortOnDrop)>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let task = common::AbortOnDrop(tokio::spawn(async move {
        stream.for_each(|_| async {}).await;
    }));
    store.wait_until_ready().await?;
    Ok((store, task))
}

fn condition_true(object: &DynamicObject, type_: &str) -> bool {
    object.data["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == type_ && c["status"] == "True")
        })
}

fn available(d: &Deployment) -> bool {
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(status) = &d.status else {
        return false;
    };
    status.observed_generation == d.metadata.generation
        && status.updated_replicas.unwrap_or(0) >= wanted
        && status.available_replicas.unwrap_or(0) >= wanted
}

struct RawFigures {
    /// First apply until everything is Available, built and issued.
    done: Duration,
    /// First apply until the last apply returned.
    applied: Duration,
    cpu: BTreeMap<String, f64>,
    /// The raw applies' user's requests, from the audit log.
    audit: AuditFigures,
}

async fn raw_phase(assets: &Path, args: &Args) -> anyhow::Result<RawFigures> {
    let mut platform = platform(assets).await?;
    let previews = preview_branches(&platform, args.previews)?;
    let client = platform.client.clone();
    let (pool, registry_source, registry_spec) = raw_inputs(&client).await?;
    let commit = platform.commit.clone();
    // The applies go as a user of their own, so that the audit log counts them.
    let raw_client = platform.plane.client_as(RAW_USER, MASTERS).await?;
    eprintln!("  applying the children of {} Projects", args.projects);

    let timeout = Duration::from_secs(args.timeout_seconds);
    // As in the operator phase: watches started before the clock.
    let watched = Watched::start(&client).await?;
    let cpu_before = cpu_by_process(&platform.plane, None);
    let mark = platform.audit.mark().await;
    let started = Instant::now();
    let projects = apply_projects(&raw_client, "bench-raw", args, &platform.repo_url).await?;
    futures::stream::iter(projects.iter())
        .map(|p| {
            raw_project(
                &raw_client,
                p,
                &pool,
                &registry_source,
                &registry_spec,
                &commit,
                &previews,
            )
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let applied = started.elapsed();

    let (mut deployments_done, mut images_done, mut certificates_done) = (0, 0, 0);
    // One of each per Environment (production and previews).
    let wanted = args.environments();
    let mut last_progress = Instant::now();
    loop {
        platform.plane.ensure_running()?;
        // A kind that is done stays done: stop counting it.
        if deployments_done < wanted {
            deployments_done = watched
                .deployments
                .state()
                .iter()
                .filter(|d| managed(&d.metadata) && available(d))
                .count();
        }
        if images_done < wanted {
            images_done = watched
                .images
                .state()
                .iter()
                .filter(|i| managed(&i.metadata) && condition_true(i, "Ready"))
                .count();
        }
        if certificates_done < wanted {
            certificates_done = watched
                .certificates
                .state()
                .iter()
                .filter(|c| condition_true(c, "Ready"))
                .count();
        }
        if deployments_done >= wanted && images_done >= wanted && certificates_done >= wanted {
            let done = started.elapsed();
            eprintln!(
                "  all Available/built/issued after {:.2}s (applied in {:.2}s)",
                done.as_secs_f64(),
                applied.as_secs_f64()
            );
            let cpu = cpu_delta(&cpu_by_process(&platform.plane, None), &cpu_before);
            let audit = AuditFigures::since(&platform.audit, mark, RAW_USER).await;
            return Ok(RawFigures {
                done,
                applied,
                cpu,
                audit,
            });
        }
        let progress = format!(
            "Deployments Available {deployments_done}, Images built {images_done}, Certificates ready {certificates_done} of {wanted}"
        );
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            eprintln!("  {:>6.1}s: {progress}", started.elapsed().as_secs_f64());
        }
        ensure!(
            started.elapsed() < timeout,
            "timed out after {timeout:?}: {progress}"
        );
        tokio::time::sleep(POLL).await;
    }
}

// ---------------------------------------------------------------------------
// Phase 3: the same objects, applied in the operator's order.

/// The user of the sequenced phase's requests.
const SEQUENCED_USER: &str = "kapsa-bench-sequenced";
const SEQUENCED_MANAGER: &str = "bench-sequenced";
/// How often a chain looks at the watched objects it waits for.
const CHAIN_POLL: Duration = Duration::from_millis(50);

/// The kpack Images, Deployments and Certificates of the cluster, watched
/// once (a reflector each) for every Project's chain to wait on.
struct Watched {
    images: reflector::Store<DynamicObject>,
    deployments: reflector::Store<Deployment>,
    certificates: reflector::Store<DynamicObject>,
    _tasks: Vec<common::AbortOnDrop>,
}

impl Watched {
    async fn start(client: &Client) -> anyhow::Result<Self> {
        let mut tasks = Vec::new();
        let mut dynamic = |resource: ApiResource| {
            let (store, stream) = kapsa_testenv::simulators::reflect_dynamic(client, &resource);
            tasks.push(common::AbortOnDrop(tokio::spawn(async move {
                stream.for_each(|_| async {}).await;
            })));
            store
        };
        let images = dynamic(external::kpack_image());
        let certificates = dynamic(external::cert_manager_certificate());
        let (deployments, task) = watched::<Deployment>(client).await?;
        tasks.push(task);
        for ready in [
            images.wait_until_ready().boxed(),
            certificates.wait_until_ready().boxed(),
        ] {
            ready.await?;
        }
        Ok(Self {
            images,
            deployments,
            certificates,
            _tasks: tasks,
        })
    }
}

/// Waits (looking at a watched store every [`CHAIN_POLL`]) until `found`
/// returns something.
async fn wait_for<T>(mut found: impl FnMut() -> Option<T>) -> T {
    loop {
        if let Some(value) = found() {
            return value;
        }
        tokio::time::sleep(CHAIN_POLL).await;
    }
}

/// The head of `branch` as `git ls-remote` reads it from `url`: the
/// operator's poll, done the plain way.
async fn ls_remote(url: &str, branch: &str) -> anyhow::Result<String> {
    let output = tokio::process::Command::new("git")
        .args(["ls-remote", url, &format!("refs/heads/{branch}")])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running git ls-remote")?;
    ensure!(
        output.status.success(),
        "git ls-remote {url} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string)
        .with_context(|| format!("{url} has no branch {branch}"))
}

/// One Project's chain, each step waiting for the one before, as the
/// operator's must: Project → poll → namespaces, credentials copy,
/// ServiceAccounts, Role, RoleBinding and Environment → kpack Image, and the
/// Service while the image builds (as the operator makes a first release's
/// Service) → the build → Deployment and Ingress (with the built image) →
/// the Deployment Available and the Certificate Ready.
async fn sequenced_project(
    client: &Client,
    watched: &Watched,
    manifest: Value,
    pool: &DomainPool,
    registry_source: &Secret,
    registry_spec: &kapsa_api::RegistrySpec,
) -> anyhow::Result<()> {
    const MANAGER: &str = SEQUENCED_MANAGER;
    let project: Project = serde_json::from_value(manifest)?;
    let project = apply(client, MANAGER, &project).await?;
    let git = &project.spec.source.git;
    let commit = ls_remote(&git.url, &git.branch).await?;
    let name = project.name_any();
    apply_namespaces(client, MANAGER, &project).await?;
    let host = format!("{name}.{BASE_DOMAIN}");
    let production = children::production_environment(&project, Some(&commit), Some(&host));
    let (environment, ()) = tokio::try_join!(
        apply(client, MANAGER, &production),
        apply_access(client, MANAGER, &project, registry_source),
    )?;
    let inputs = EnvironmentInputs {
        project: &project,
        environment: &environment,
        pool: Some(pool),
        base_domain: Some(BASE_DOMAIN),
    };
    let image = kpack_image(&inputs, &image_repository(registry_spec, &name), &commit);
    apply_dynamic(client, MANAGER, &external::kpack_image(), &image).await?;
    let image_ref =
        ObjectRef::<DynamicObject>::new_with(&image.name_any(), external::kpack_image())
            .within(&image.namespace().unwrap_or_default());
    let service = service(&inputs);
    let (service, built) = tokio::join!(
        apply(client, MANAGER, &service),
        wait_for(|| {
            let image = watched.images.get(&image_ref)?;
            if !condition_true(&image, "Ready") {
                return None;
            }
            image.data["status"]["latestImage"]
                .as_str()
                .map(str::to_string)
        })
    );
    service?;
    let ingress = ingress(&inputs).context("the builders made no Ingress")?;
    let deployment = deployment(&inputs, &built);
    tokio::try_join!(
        apply(client, MANAGER, &deployment),
        apply(client, MANAGER, &ingress),
    )?;
    let namespace = deployment.namespace().unwrap_or_default();
    let deployment_ref = ObjectRef::<Deployment>::new(&deployment.name_any()).within(&namespace);
    let certificate = ingress
        .spec
        .as_ref()
        .and_then(|s| s.tls.as_ref())
        .and_then(|tls| tls.first())
        .and_then(|tls| tls.secret_name.clone())
        .context("the Ingress names no TLS Secret")?;
    let certificate_ref =
        ObjectRef::<DynamicObject>::new_with(&certificate, external::cert_manager_certificate())
            .within(&ingress.namespace().unwrap_or_default());
    wait_for(|| {
        let available = watched
            .deployments
            .get(&deployment_ref)
            .is_some_and(|d| available(&d));
        let issued = watched
            .certificates
            .get(&certificate_ref)
            .is_some_and(|c| condition_true(&c, "Ready"));
        (available && issued).then_some(())
    })
    .await;
    Ok(())
}

struct SequencedFigures {
    /// First apply until every Project's chain ended.
    done: Duration,
    cpu: BTreeMap<String, f64>,
    /// The sequenced user's requests, from the audit log.
    audit: AuditFigures,
}

async fn sequenced_phase(assets: &Path, args: &Args) -> anyhow::Result<SequencedFigures> {
    let platform = platform(assets).await?;
    let client = platform.client.clone();
    let (pool, registry_source, registry_spec) = raw_inputs(&client).await?;
    let sequenced_client = platform.plane.client_as(SEQUENCED_USER, MASTERS).await?;
    // The watches are the bench's own (the admin's), like the operator's
    // caches: started before the clock.
    let watched = Watched::start(&client).await?;
    eprintln!(
        "  running {} Projects' chains, {} at once",
        args.projects, args.concurrency
    );
    let timeout = Duration::from_secs(args.timeout_seconds);
    let cpu_before = cpu_by_process(&platform.plane, None);
    let mark = platform.audit.mark().await;
    let started = Instant::now();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let chains = futures::stream::iter(0..args.projects)
        .map(|i| {
            let manifest = project_manifest(&project_name(i), &platform.repo_url, 0);
            let (client, watched, pool, done) = (&sequenced_client, &watched, &pool, &done);
            let (registry_source, registry_spec) = (&registry_source, &registry_spec);
            async move {
                sequenced_project(
                    client,
                    watched,
                    manifest,
                    pool,
                    registry_source,
                    registry_spec,
                )
                .await?;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                anyhow::Ok(())
            }
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<()>>();
    let progress = async {
        loop {
            tokio::time::sleep(PROGRESS_EVERY).await;
            eprintln!(
                "  {:>6.1}s: {} of {} chains done",
                started.elapsed().as_secs_f64(),
                done.load(std::sync::atomic::Ordering::Relaxed),
                args.projects
            );
        }
    };
    tokio::select! {
        result = tokio::time::timeout(timeout, chains) => {
            result.with_context(|| format!(
                "timed out after {timeout:?}: {} of {} chains done",
                done.load(std::sync::atomic::Ordering::Relaxed),
                args.projects
            ))??;
        }
        () = progress => unreachable!(),
    }
    let done = started.elapsed();
    eprintln!("  every chain done after {:.2}s", done.as_secs_f64());
    let cpu = cpu_delta(&cpu_by_process(&platform.plane, None), &cpu_before);
    let audit = AuditFigures::since(&platform.audit, mark, SEQUENCED_USER).await;
    Ok(SequencedFigures { done, cpu, audit })
}

// ---------------------------------------------------------------------------

struct RunFigures {
    operator: OperatorFigures,
    raw: RawFigures,
    sequenced: Option<SequencedFigures>,
}

impl RunFigures {
    fn ratio(&self) -> f64 {
        self.operator.ready.as_secs_f64() / self.raw.done.as_secs_f64()
    }

    /// Operator time over the sequenced raw apply's (NaN without it).
    fn sequenced_ratio(&self) -> f64 {
        self.sequenced.as_ref().map_or(f64::NAN, |s| {
            self.operator.ready.as_secs_f64() / s.done.as_secs_f64()
        })
    }

    fn sequenced_seconds(&self) -> f64 {
        self.sequenced
            .as_ref()
            .map_or(f64::NAN, |s| s.done.as_secs_f64())
    }
}

fn print_run(run: usize, args: &Args, f: &RunFigures) {
    let o = &f.operator;
    let n = args.projects as f64;
    let a = &o.rollout_audit;
    println!(
        "run {run}: operator {:.2}s, raw {:.2}s, ratio {:.2}, peak RSS {:.1} MiB; audit log, user {OPERATOR_USER}: {} writes ({:.1}/Project, {} to Leases), {} GETs ({:.1}/Project); idle {:.1} writes/min, {:.1} GETs/min",
        o.ready.as_secs_f64(),
        f.raw.done.as_secs_f64(),
        f.ratio(),
        mib(o.peak_rss_kib),
        a.total_writes(),
        a.total_writes() as f64 / n,
        a.lease_writes(),
        a.total_gets(),
        a.total_gets() as f64 / n,
        o.idle_writes_per_minute(),
        o.idle_gets_per_minute(),
    );
    println!(
        "  audit log, operator start until all Projects Ready ({:.2}s after the first apply):",
        o.projects_ready.as_secs_f64()
    );
    let per_project = |counts: &BTreeMap<String, usize>| {
        let per: BTreeMap<String, f64> = counts
            .iter()
            .map(|(k, v)| (k.clone(), *v as f64 / n))
            .collect();
        format_counts(&per)
    };
    println!("    writes per Project by kind: {}", per_project(&a.writes));
    println!(
        "    writes by kind: {}; by verb: {}",
        format_counts(&a.writes),
        format_counts(&a.write_verbs)
    );
    println!(
        "    Lease writes (leader election, in the totals above): {}",
        a.lease_writes()
    );
    println!(
        "    GETs by kind: {} (reads of Leases and Events are not audited)",
        format_counts(&a.gets)
    );
    println!(
        "    finished requests by verb (a watch counts when it ends): {}; responses other than 2xx: {}; audit log {:.1} MiB (all users)",
        format_counts(&a.verbs),
        format_counts(&a.failed),
        a.log_bytes as f64 / 1024.0 / 1024.0
    );
    let i = &o.idle_audit;
    println!(
        "  audit log, idle {:.0}s: {} writes ({}), of them {} to Leases; {} GETs ({}); responses other than 2xx: {}",
        o.idle.as_secs_f64(),
        i.total_writes(),
        format_counts(&i.writes),
        i.lease_writes(),
        i.total_gets(),
        format_counts(&i.gets),
        format_counts(&i.failed)
    );
    println!(
        "    every client's writes in that time, by user (program): {}",
        format_counts(&a.writes_by_user)
    );
    println!(
        "  raw phase, audit log, user {RAW_USER}: {} writes ({:.1}/Project); every client's writes, by user (program): {}",
        f.raw.audit.total_writes(),
        f.raw.audit.total_writes() as f64 / n,
        format_counts(&f.raw.audit.writes_by_user)
    );
    let own: u64 = o.rollout_writes.values().sum();
    println!(
        "  the operator's own count (kapsa_api_writes_total): {own} writes until all Projects Ready ({:.1}/Project) {}; idle {:.1} writes/min {}",
        own as f64 / n,
        format_counts(&o.rollout_writes),
        o.own_idle_writes_per_minute(),
        format_counts(&o.idle_writes)
    );
    println!(
        "  detail: all Environments created at {:.2}s, all with a commit at {:.2}s, all Projects Ready at {:.2}s; reconciles {}",
        o.environments_created.as_secs_f64(),
        o.commits_known.as_secs_f64(),
        o.projects_ready.as_secs_f64(),
        format_counts(&o.rollout_reconciles)
    );
    println!(
        "  after {:.0}s idle: RSS {:.1} MiB, peak RSS {:.1} MiB, {} git polls",
        o.idle.as_secs_f64(),
        mib(o.rss_after_idle_kib),
        mib(o.peak_rss_after_idle_kib),
        o.idle_polls,
    );
    println!(
        "  CPU until Ready: operator phase {}; raw phase {} (raw applies done at {:.2}s)",
        format_cpu(&o.cpu),
        format_cpu(&f.raw.cpu),
        f.raw.applied.as_secs_f64()
    );
    if let Some(q) = &f.sequenced {
        println!(
            "  sequenced raw apply (user {SEQUENCED_USER}): {:.2}s, ratio {:.2}; {} writes ({:.1}/Project) {}; CPU {}",
            q.done.as_secs_f64(),
            f.sequenced_ratio(),
            q.audit.total_writes(),
            q.audit.total_writes() as f64 / n,
            format_counts(&q.audit.writes),
            format_cpu(&q.cpu)
        );
    }
    println!(
        "  idle {:.0}s with --resync-period {}s: reconciles {}; CPU per idle minute: operator {:.2} CPU-s ({:.2} % of a core), kube-apiserver {:.2} CPU-s; all {}",
        o.idle.as_secs_f64(),
        args.resync_seconds,
        format_counts(&o.idle_reconciles),
        o.idle_cpu_per_minute(&o.operator_comm),
        o.idle_cpu_per_minute(&o.operator_comm) * 100.0 / 60.0,
        o.idle_cpu_per_minute("kube-apiserver"),
        format_cpu(&o.idle_cpu)
    );
    if let Some(r) = &o.restart {
        println!(
            "  restart: caches listed after {:.2}s, every Project and Environment reconciled after {:.2}s; audit log until 5 s later: {} writes ({}), {} GETs ({}); peak RSS {:.1} MiB; CPU {}",
            r.synced.as_secs_f64(),
            r.confirmed.as_secs_f64(),
            r.audit.total_writes(),
            format_counts(&r.audit.writes),
            r.audit.total_gets(),
            format_counts(&r.audit.gets),
            mib(r.peak_rss_kib),
            format_cpu(&r.cpu)
        );
    }
    if args.previews > 0 {
        println!(
            "  Environments: {} when all {} were Ready ({} production + {} previews wanted); peak RSS until then {:.1} MiB",
            o.environments,
            args.environments(),
            args.projects,
            args.projects * args.previews,
            mib(o.peak_rss_kib)
        );
    }
    if !o.idle_writes.is_empty() || !o.idle_audit.writes.is_empty() {
        println!(
            "  idle Events {:?}; idle status changes {:?}",
            o.idle_events, o.idle_status_changes
        );
    }
}

/// One figure of a run, e.g. its operator time in seconds.
type Figure<'a> = &'a dyn Fn(&RunFigures) -> f64;

/// The summary: medians, then one row per run and the medians as a
/// Markdown table.
fn print_summary(args: &Args, runs: &[RunFigures]) {
    let n = args.projects as f64;
    let pick = |f: &dyn Fn(&RunFigures) -> f64| median(runs.iter().map(f).collect());
    let writes = |r: &RunFigures| r.operator.rollout_audit.total_writes() as f64 / n;
    let leases = |r: &RunFigures| r.operator.rollout_audit.lease_writes() as f64;
    let gets = |r: &RunFigures| r.operator.rollout_audit.total_gets() as f64 / n;
    let raw_writes = |r: &RunFigures| r.raw.audit.total_writes() as f64 / n;
    let own = |r: &RunFigures| r.operator.rollout_writes.values().sum::<u64>() as f64 / n;
    println!(
        "median of {} run(s), {} Projects: operator {:.2}s, raw {:.2}s, ratio {:.2} (target ≤ 1.5), peak RSS {:.1} MiB (target ≤ 64 at 1,000); audit log, user {OPERATOR_USER}: {:.1} writes/Project (raw {:.1}), {:.0} Lease writes, {:.1} GETs/Project, idle {:.1} writes/min (target 0), idle {:.1} GETs/min; the operator's own count: {:.1} writes/Project, idle {:.1} writes/min",
        runs.len(),
        args.projects,
        pick(&|r| r.operator.ready.as_secs_f64()),
        pick(&|r| r.raw.done.as_secs_f64()),
        pick(&|r| r.ratio()),
        pick(&|r| mib(r.operator.peak_rss_kib)),
        pick(&writes),
        pick(&raw_writes),
        pick(&leases),
        pick(&gets),
        pick(&|r| r.operator.idle_writes_per_minute()),
        pick(&|r| r.operator.idle_gets_per_minute()),
        pick(&own),
        pick(&|r| r.operator.own_idle_writes_per_minute()),
    );
    let idle_core =
        |r: &RunFigures| r.operator.idle_cpu_per_minute(&r.operator.operator_comm) * 100.0 / 60.0;
    let restart_confirmed = |r: &RunFigures| {
        r.operator
            .restart
            .as_ref()
            .map_or(f64::NAN, |x| x.confirmed.as_secs_f64())
    };
    let restart_writes = |r: &RunFigures| {
        r.operator
            .restart
            .as_ref()
            .map_or(f64::NAN, |x| x.audit.total_writes() as f64)
    };
    let restart_rss = |r: &RunFigures| {
        r.operator
            .restart
            .as_ref()
            .map_or(f64::NAN, |x| mib(x.peak_rss_kib))
    };
    println!(
        "median: sequenced raw {:.2}s, ratio to it {:.2} (target ≤ 1.15); idle operator {:.2} % of a core (target ≤ 1), kube-apiserver {:.2} CPU-s per idle minute; restart: every status confirmed after {:.2}s (target ≤ 10), {:.0} writes (target 0), peak RSS {:.1} MiB",
        pick(&|r| r.sequenced_seconds()),
        pick(&|r| r.sequenced_ratio()),
        pick(&idle_core),
        pick(&|r| r.operator.idle_cpu_per_minute("kube-apiserver")),
        pick(&restart_confirmed),
        pick(&restart_writes),
        pick(&restart_rss),
    );
    if args.previews > 0 {
        println!(
            "with {} previews per Project: {} Environments ({} production, {} previews); median peak RSS {:.1} MiB",
            args.previews,
            args.environments(),
            args.projects,
            args.projects * args.previews,
            pick(&|r| mib(r.operator.peak_rss_kib)),
        );
    }
    println!();
    println!(
        "| run | operator | raw apply | ratio | sequenced raw | ratio (sequenced) | peak RSS | writes/Project (audit) | Lease writes | GETs/Project (audit) | idle writes/min (audit) | idle GETs/min (audit) | idle operator CPU (% of a core) | restart: confirmed | restart: writes | writes/Project (own count) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    // A row: `value` gives one figure of it (one run's, or the median).
    let row = |label: String, f: &dyn Fn(Figure) -> f64| {
        println!(
            "| {label} | {:.2} s | {:.2} s | {:.2} | {:.2} s | {:.2} | {:.1} MiB | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} s | {:.0} | {:.1} |",
            f(&|r| r.operator.ready.as_secs_f64()),
            f(&|r| r.raw.done.as_secs_f64()),
            f(&|r| r.ratio()),
            f(&|r| r.sequenced_seconds()),
            f(&|r| r.sequenced_ratio()),
            f(&|r| mib(r.operator.peak_rss_kib)),
            f(&writes),
            f(&leases),
            f(&gets),
            f(&|r| r.operator.idle_writes_per_minute()),
            f(&|r| r.operator.idle_gets_per_minute()),
            f(&idle_core),
            f(&restart_confirmed),
            f(&restart_writes),
            f(&own),
        );
    };
    for (i, run) in runs.iter().enumerate() {
        let first = if (i + 1) % 2 == 1 { "operator" } else { "raw" };
        row(format!("{} ({first} first)", i + 1), &|f| f(run));
    }
    row("**median**".to_string(), &|f| pick(f));
}

async fn one_run(
    assets: &Path,
    args: &Args,
    binary: &OperatorBinary,
    run: usize,
) -> anyhow::Result<RunFigures> {
    let sequenced = async {
        // The chain has no previews: with --previews there is no
        // sequenced phase.
        if args.no_sequenced || args.previews > 0 {
            return anyhow::Ok(None);
        }
        eprintln!("run {run}: sequenced raw-apply phase");
        Ok(Some(sequenced_phase(assets, args).await?))
    };
    // Alternate the order (operator, raw, sequenced, then the reverse), so
    // that no phase always runs on a warmer (or more tired) machine.
    if run % 2 == 1 {
        eprintln!("run {run}: operator phase");
        let operator = operator_phase(assets, args, binary, run).await?;
        eprintln!("run {run}: raw-apply phase");
        let raw = raw_phase(assets, args).await?;
        let sequenced = sequenced.await?;
        Ok(RunFigures {
            operator,
            raw,
            sequenced,
        })
    } else {
        let sequenced = sequenced.await?;
        eprintln!("run {run}: raw-apply phase");
        let raw = raw_phase(assets, args).await?;
        eprintln!("run {run}: operator phase");
        let operator = operator_phase(assets, args, binary, run).await?;
        Ok(RunFigures {
            operator,
            raw,
            sequenced,
        })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.projects > 0 && args.runs > 0 && args.concurrency > 0,
        "--projects, --runs and --concurrency must be positive"
    );
    ensure!(args.idle_seconds > 0, "--idle-seconds must be positive");
    ensure!(
        args.resync_seconds >= 10,
        "--resync-seconds is at least 10 (the operator's minimum)"
    );
    ensure!(
        args.previews <= 100,
        "--previews is at most 100 (a Project's maxEnvironments)"
    );
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let binary = OperatorBinary::detect(args.operator_binary.as_deref())?;
    let assets = find_assets()?;
    // The operator child is forked from this thread (block_on runs the
    // future here), which lives as long as the process: its parent-death
    // signal fires only when the bench ends.
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        println!(
            "Kapsa scale benchmark: {} Projects, {} run(s), idle window {}s, {} applies in flight; operator {}",
            args.projects,
            args.runs,
            args.idle_seconds,
            args.concurrency,
            binary.describe()
        );
        if args.previews > 0 {
            println!(
                "with previews: {} branches per Project (previewEnvironments enabled, 1 replica each): {} Environments in all, production and previews; the operator time is until every one of them is Ready",
                args.previews,
                args.environments()
            );
        }
        let mut runs = Vec::new();
        for run in 1..=args.runs {
            let figures = one_run(&assets, &args, &binary, run)
                .await
                .with_context(|| format!("run {run}"))?;
            print_run(run, &args, &figures);
            runs.push(figures);
        }
        print_summary(&args, &runs);
        anyhow::Ok(())
    })
}

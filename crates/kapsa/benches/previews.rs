//! Preview latency benchmark: how long a pushed branch takes to be served
//! by its preview Environment, and a deleted branch to lose it, against the
//! local control plane with simulated builds and TLS.
//!
//! `cargo bench -p kapsa --bench previews -- [--tries N] [--poll-interval D]
//! [--timeout-seconds T] [--keep-logs]` (defaults: 10 tries, `2s`, 180 s).
//!
//! One fresh control plane (etcd, kube-apiserver, controller-manager,
//! scheduler, kwok, plus the in-process kpack and cert-manager simulators),
//! the platform objects and one git repository on loopback, as in
//! `benches/scale.rs` (`common::platform`). This build's `kapsa operator`
//! runs as a child process with `--max-poll-interval D` (so every
//! repository is polled at least every D, whatever the Project's 60s
//! `pollInterval`) and `--allow-internal-git-hosts loopback`.
//!
//! One Project with `previewEnvironments: {enabled: true, replicas: 1}`
//! (every branch but `main` gets a preview). Once its production
//! Environment is Ready, N tries, one after another, each with a new branch
//! `bench/try-NN` (Environment `preview-bench-try-NN`):
//! - **created → Ready**: a commit is pushed on the new branch
//!   (`TestRepo::commit`); the clock starts when the push returns and stops
//!   when the API server shows the preview Environment with
//!   `status.phase: Ready` and `status.commit` the pushed commit (the kpack
//!   simulator's build, the Deployment Available on kwok, the cert-manager
//!   simulator's Certificate). The time the Environment first exists is
//!   printed too;
//! - **deleted → gone**: the branch is deleted (`TestRepo::delete_branch`);
//!   the clock starts when that returns and stops when the API server
//!   returns 404 for the Environment and for its Deployment (each time is
//!   printed; "gone" is the later of the two).
//!
//! Before the N tries, one untimed warm-up try (branch `bench/warm-up`,
//! printed apart): on this fresh control plane the first deletion's
//! Deployment went 39–41 s after the branch deletion (the Environment
//! itself in about 2 s), later ones within about 2 s. The operator deletes
//! the Environment with background propagation and the garbage collector
//! deletes the Deployment; the likely cause (not verified) is that
//! kube-controller-manager's garbage collector does not watch the
//! just-installed Environment CRD until its discovery resync (every 30 s).
//! A cluster with Kapsa installed for longer would not see it.
//!
//! Observation: the bench GETs the Environment (and, after a deletion, the
//! Deployment) from the API server every 100 ms (no resourceVersion: a
//! quorum read), so every figure has about 0.1 s of granularity plus one
//! GET's latency. Before each push and each deletion the bench waits a
//! random 0–D, so that pushes land at random points of the operator's poll
//! cycle (as real pushes do) rather than always just after a poll.

use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use kapsa_api::naming::{PREVIEW_ENVIRONMENT_PREFIX, readable_branch_slug};
use kapsa_api::{Environment, EnvironmentPhase, Project};
use kapsa_testenv::find_assets;
use kube::Client;
use kube::api::Api;
use serde_json::json;

mod common;
use common::{
    MASTERS, OPERATOR_USER, OperatorBinary, OperatorProcess, POOL, REGISTRY, apply, median, mib,
    platform,
};

/// How often the bench asks the API server.
const OBSERVE_EVERY: Duration = Duration::from_millis(100);
const PROJECT: &str = "latency";

#[derive(Parser, Debug, Clone)]
#[command(
    about = "Kapsa preview latency benchmark: branch pushed → preview Ready, branch deleted → preview gone"
)]
struct Args {
    /// Tries (each a new branch, one after another); medians are over these.
    #[arg(long, default_value_t = 10)]
    tries: usize,
    /// The operator's `--max-poll-interval`: every repository is polled at
    /// least this often, e.g. `2s`, `500ms`.
    #[arg(long, default_value = "2s", value_parser = parse_interval)]
    poll_interval: String,
    /// Give up on one step (production Ready, one preview Ready, one preview
    /// gone) after this long.
    #[arg(long, default_value_t = 180)]
    timeout_seconds: u64,
    /// Keep the operator's log (its path is printed) instead of deleting it
    /// after a successful run.
    #[arg(long)]
    keep_logs: bool,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Checks a duration the operator's `--max-poll-interval` accepts; keeps the text.
fn parse_interval(text: &str) -> Result<String, String> {
    kapsa_api::duration::parse(text)
        .filter(|d| !d.is_zero())
        .map(|_| text.to_string())
        .ok_or_else(|| format!("{text:?} is not a duration such as 2s, 500ms or 1m"))
}

fn interval(args: &Args) -> Duration {
    kapsa_api::duration::parse(&args.poll_interval).unwrap_or(Duration::from_secs(2))
}

/// A random duration in [0, `max`), from the standard library's random
/// hash keys.
fn jitter(max: Duration) -> Duration {
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    max.mul_f64((random >> 11) as f64 / (1u64 << 53) as f64)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The Project: one replica, a health check, small requests, polled every
/// 60s (the operator's `--max-poll-interval` makes it D), previews for
/// every branch but `main`, one replica each.
fn project_manifest(repo_url: &str) -> serde_json::Value {
    json!({
        "apiVersion": "kapsa.dev/v1alpha1", "kind": "Project",
        "metadata": {"name": PROJECT},
        "spec": {
            "source": {"git": {"url": repo_url, "branch": "main"}, "pollInterval": "60s"},
            "registryRef": {"kind": "ClusterRegistry", "name": REGISTRY},
            "domainPoolRef": {"name": POOL},
            "runtime": {
                "port": 8080, "replicas": 1,
                "healthCheck": {"path": "/healthz"},
                "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}}
            },
            "previewEnvironments": {"enabled": true, "replicas": 1}
        }
    })
}

/// One try's figures, each from the push (or the deletion) returning.
struct Try {
    branch: String,
    environment: String,
    commit: String,
    /// The preview Environment exists.
    created: Duration,
    /// It is Ready, serving the pushed commit.
    ready: Duration,
    /// After the deletion: the Environment is gone (404).
    environment_gone: Duration,
    /// The Deployment of that name is gone (404).
    deployment_gone: Duration,
}

impl Try {
    /// Environment and Deployment both gone.
    fn gone(&self) -> Duration {
        self.environment_gone.max(self.deployment_gone)
    }
}

/// Between two looks at the API server: fails if the operator exited or
/// `timeout` passed since `started`, else samples the operator's RSS and
/// sleeps [`OBSERVE_EVERY`]. `what` names the wait in errors.
async fn next_look(
    operator: &mut OperatorProcess,
    started: Instant,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<()> {
    operator.ensure_running()?;
    operator.sample_peak()?;
    ensure!(
        started.elapsed() < timeout,
        "timed out after {timeout:?} waiting for {what}"
    );
    tokio::time::sleep(OBSERVE_EVERY).await;
    Ok(())
}

fn serves(env: &Environment, commit: &str) -> bool {
    env.status.as_ref().is_some_and(|s| {
        s.phase == Some(EnvironmentPhase::Ready) && s.commit.as_deref() == Some(commit)
    })
}

/// One try on a new `branch`; `i` goes into the commit's contents.
async fn one_try(
    i: usize,
    branch: String,
    args: &Args,
    client: &Client,
    platform: &common::Platform,
    operator: &mut OperatorProcess,
) -> anyhow::Result<Try> {
    let timeout = Duration::from_secs(args.timeout_seconds);
    let namespace = PROJECT;
    let environments: Api<Environment> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let environment = format!(
        "{PREVIEW_ENVIRONMENT_PREFIX}{}",
        readable_branch_slug(&branch).context("a readable slug")?
    );

    tokio::time::sleep(jitter(interval(args))).await;
    let commit = tokio::task::block_in_place(|| {
        platform
            .repo
            .commit(&branch, "app.txt", format!("try {i}"), "a preview branch")
    })?;
    let pushed = Instant::now();
    let mut created = None;
    let ready = loop {
        if let Some(env) = environments.get_opt(&environment).await? {
            let seen = pushed.elapsed();
            created.get_or_insert(seen);
            ensure!(
                env.spec.branch.as_deref() == Some(branch.as_str()),
                "{environment} is for branch {:?}, not {branch}",
                env.spec.branch
            );
            if serves(&env, &commit) {
                break seen;
            }
        }
        let what = format!("{environment} to serve {commit}");
        next_look(operator, pushed, timeout, &what).await?;
    };
    let created = created.unwrap_or(ready);

    tokio::time::sleep(jitter(interval(args))).await;
    tokio::task::block_in_place(|| platform.repo.delete_branch(&branch))?;
    let deleted = Instant::now();
    let (mut environment_gone, mut deployment_gone) = (None, None);
    loop {
        if environment_gone.is_none() && environments.get_opt(&environment).await?.is_none() {
            environment_gone = Some(deleted.elapsed());
        }
        if deployment_gone.is_none() && deployments.get_opt(&environment).await?.is_none() {
            deployment_gone = Some(deleted.elapsed());
        }
        if let (Some(environment_gone), Some(deployment_gone)) = (environment_gone, deployment_gone)
        {
            return Ok(Try {
                branch,
                environment,
                commit,
                created,
                ready,
                environment_gone,
                deployment_gone,
            });
        }
        let what = format!("{environment} and its Deployment to be gone");
        next_look(operator, deleted, timeout, &what).await?;
    }
}

/// `median 3.21 s (min 2.10, max 4.50)`.
fn summary(values: impl Iterator<Item = Duration>) -> String {
    let values: Vec<f64> = values.map(|d| d.as_secs_f64()).collect();
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(0.0, f64::max);
    format!(
        "median {:.2} s (min {min:.2}, max {max:.2})",
        median(values)
    )
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let binary = OperatorBinary::detect(None)?;
    ensure!(
        binary.allow_internal_git_hosts,
        "this build's kapsa operator has no --allow-internal-git-hosts flag"
    );
    let assets = find_assets()?;
    println!(
        "Kapsa preview latency benchmark: {} tries, operator --max-poll-interval {} --allow-internal-git-hosts loopback; observed by GETs to the API server every {} ms; load average before: {}",
        args.tries,
        args.poll_interval,
        OBSERVE_EVERY.as_millis(),
        load_average()
    );
    let platform = platform(&assets).await?;
    let client = platform.client.clone();
    let log = std::env::temp_dir().join(format!(
        "kapsa-bench-previews-operator-{}.log",
        std::process::id()
    ));
    let kubeconfig = platform.plane.kubeconfig_as(OPERATOR_USER, MASTERS)?;
    let mut operator = OperatorProcess::start_with(
        &binary,
        &kubeconfig,
        log.clone(),
        &[
            "--max-poll-interval".to_string(),
            args.poll_interval.clone(),
        ],
    )?;
    operator.wait_for_metrics(Duration::from_secs(30)).await?;
    eprintln!("operator pid {} (log {})", operator.pid(), log.display());

    let project: Project = serde_json::from_value(project_manifest(&platform.repo_url))?;
    let applied = Instant::now();
    apply(&client, "bench", &project).await?;
    let environments: Api<Environment> = Api::namespaced(client.clone(), PROJECT);
    let timeout = Duration::from_secs(args.timeout_seconds);
    while !environments
        .get_opt("production")
        .await?
        .is_some_and(|e| serves(&e, &platform.commit))
    {
        let what = "the production Environment to be Ready";
        next_look(&mut operator, applied, timeout, what).await?;
    }
    println!(
        "production Environment Ready {:.2} s after the Project was applied",
        applied.elapsed().as_secs_f64()
    );

    let describe = |t: &Try| {
        format!(
            "{} → {} at {}: Environment exists {:.2} s, Ready serving it {:.2} s; branch deleted: Environment gone {:.2} s, Deployment gone {:.2} s",
            t.branch,
            t.environment,
            &t.commit[..12.min(t.commit.len())],
            t.created.as_secs_f64(),
            t.ready.as_secs_f64(),
            t.environment_gone.as_secs_f64(),
            t.deployment_gone.as_secs_f64(),
        )
    };
    // On a fresh control plane the first deletion's Deployment lingers for
    // ~40 s (see the module documentation): warm up once, untimed.
    let warm_up = one_try(
        0,
        "bench/warm-up".to_string(),
        args,
        &client,
        &platform,
        &mut operator,
    )
    .await
    .with_context(|| format!("the warm-up try (operator log {})", log.display()))?;
    println!("warm-up (not counted): {}", describe(&warm_up));

    let polls_before = operator.git_polls().await?;
    let tries_started = Instant::now();
    let mut tries = Vec::new();
    for i in 1..=args.tries {
        let branch = format!("bench/try-{i:02}");
        let t = one_try(i, branch, args, &client, &platform, &mut operator)
            .await
            .with_context(|| format!("try {i} (operator log {})", log.display()))?;
        println!("try {i:>2}: {}", describe(&t));
        tries.push(t);
    }
    let polls = operator.git_polls().await? - polls_before;
    let elapsed = tries_started.elapsed();

    println!(
        "over {} tries, poll interval {}:",
        tries.len(),
        args.poll_interval
    );
    println!(
        "  branch pushed → preview Ready serving the commit: {}",
        summary(tries.iter().map(|t| t.ready))
    );
    println!(
        "  branch pushed → preview Environment exists:       {}",
        summary(tries.iter().map(|t| t.created))
    );
    println!(
        "  branch deleted → Environment and Deployment gone: {}",
        summary(tries.iter().map(Try::gone))
    );
    println!(
        "  branch deleted → Environment gone:                {}",
        summary(tries.iter().map(|t| t.environment_gone))
    );
    println!(
        "  branch deleted → Deployment gone:                 {}",
        summary(tries.iter().map(|t| t.deployment_gone))
    );
    println!(
        "  operator: {polls} git polls in {:.1} s of tries ({:.2}/s), peak RSS {:.1} MiB; load average after: {}",
        elapsed.as_secs_f64(),
        polls as f64 / elapsed.as_secs_f64(),
        mib(operator.sample_peak()?),
        load_average()
    );
    operator.stop();
    drop(operator);
    drop(platform);
    if !args.keep_logs {
        let _ = std::fs::remove_file(&log);
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.tries > 0, "--tries must be positive");
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    // The operator child is forked from this thread (block_on runs the
    // future here), which lives as long as the process: its parent-death
    // signal fires only when the bench ends.
    tokio::runtime::Runtime::new()?.block_on(run(&args))
}

//! Scale benchmark: N Projects applied at once, against the local control
//! plane with simulated builds and TLS.
//!
//! `cargo bench -p kapsa --bench scale -- [--projects N] [--runs R]
//! [--idle-seconds S] [--timeout-seconds T] [--concurrency C]
//! [--operator-binary PATH] [--keep-logs]`
//!
//! Each run has two phases, each on a fresh control plane (etcd,
//! kube-apiserver with its audit log on, controller-manager, scheduler,
//! kwok, plus the in-process kpack and cert-manager simulators):
//!
//! - operator: the `kapsa` binary (this build's, or `--operator-binary`)
//!   runs as a child process, as its own user `kapsa-operator`; N Projects
//!   are applied at once; measured: the time from the first apply until every
//!   `production` Environment has `status.phase: Ready`, the operator's peak
//!   RSS (VmHWM and sampled VmRSS) by then, and, from the API server's audit
//!   log, the requests user `kapsa-operator` made until every Project was
//!   Ready and during an idle window afterwards (writes by kind, GETs by
//!   resource). The operator's own count (`kapsa_api_writes_total`) is
//!   printed next to it;
//! - raw: no operator; the bench itself (user `kapsa-bench-raw`)
//!   server-side applies the objects the operator would make (the Kapsa
//!   builders make them) as fast as it can and waits until every Deployment
//!   is Available, every kpack Image built and every Certificate ready: the
//!   API server's (and simulators') limit.
//!
//! The phases alternate which goes first from run to run. See
//! docs/benchmarks.md for what the figures mean.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kapsa_api::{DomainPool, Environment, EnvironmentPhase, Project, external};
use kapsa_operator::resources::environment::{
    EnvironmentInputs, deployment, image_repository, ingress, kpack_image, service,
};
use kapsa_operator::resources::project as children;
use kapsa_operator::resources::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use kapsa_testenv::audit::{self, AuditEvent, AuditLog, AuditMark};
use kapsa_testenv::git_server::GitServer;
use kapsa_testenv::simulators::kpack::simulated_digest;
use kapsa_testenv::{ControlPlane, ControlPlaneOptions, find_assets};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const PLATFORM_NAMESPACE: &str = "kapsa-system";
const POOL: &str = "bench-pool";
const BASE_DOMAIN: &str = "bench.example.com";
const ISSUER: &str = "bench-issuer";
const REGISTRY: &str = "bench-registry";
const REGISTRY_SECRET: &str = "bench-push";
const POLL: Duration = Duration::from_millis(250);
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// The user the operator authenticates as, so that the audit log tells its
/// requests apart from the bench's, the simulators' and the control plane's.
const OPERATOR_USER: &str = "kapsa-operator";
/// The user of the raw phase's applies.
const RAW_USER: &str = "kapsa-bench-raw";
const MASTERS: &[&str] = &["system:masters"];

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
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

// ---------------------------------------------------------------------------
// The operator as a child process.

/// The `kapsa` binary run as the operator, and which of the bench's
/// `kapsa operator` flags it accepts (an older build may lack some).
#[derive(Debug, Clone)]
struct OperatorBinary {
    path: PathBuf,
    /// `--operator-binary` (not this build's).
    other: bool,
    /// `--no-leader-election`; without it the operator elects itself
    /// through a Lease, whose writes the bench counts and shows apart.
    no_leader_election: bool,
    /// `--text-logs`; without it the log is JSON.
    text_logs: bool,
    /// `--allow-internal-git-hosts`: the bench's git server is on loopback,
    /// which a build with this flag refuses unless it is allowed.
    allow_internal_git_hosts: bool,
}

impl OperatorBinary {
    /// Checks the binary and reads its flags from `kapsa operator --help`.
    fn detect(args: &Args) -> anyhow::Result<Self> {
        let (path, other) = match &args.operator_binary {
            Some(path) => (
                std::fs::canonicalize(path)
                    .with_context(|| format!("--operator-binary {}", path.display()))?,
                true,
            ),
            None => (PathBuf::from(env!("CARGO_BIN_EXE_kapsa")), false),
        };
        let output = Command::new(&path)
            .args(["operator", "--help"])
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {} operator --help", path.display()))?;
        ensure!(
            output.status.success(),
            "{} operator --help failed ({}): {}",
            path.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let help = String::from_utf8_lossy(&output.stdout);
        let has = |flag: &str| {
            help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
                .any(|word| word == flag)
        };
        ensure!(
            has("--metrics-addr"),
            "{} operator has no --metrics-addr flag: the bench needs its /metrics",
            path.display()
        );
        Ok(Self {
            no_leader_election: has("--no-leader-election"),
            text_logs: has("--text-logs"),
            allow_internal_git_hosts: has("--allow-internal-git-hosts"),
            path,
            other,
        })
    }

    fn args(&self, metrics_addr: &str) -> Vec<String> {
        let mut args = vec!["operator".to_string()];
        if self.no_leader_election {
            args.push("--no-leader-election".into());
        }
        if self.text_logs {
            args.push("--text-logs".into());
        }
        if self.allow_internal_git_hosts {
            args.extend(["--allow-internal-git-hosts".into(), "loopback".into()]);
        }
        args.extend(["--metrics-addr".into(), metrics_addr.to_string()]);
        args
    }

    /// The process name the kernel gives it: the file name, cut to 15 bytes.
    fn comm(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        String::from_utf8_lossy(&name.as_bytes()[..name.len().min(15)]).into_owned()
    }

    fn describe(&self) -> String {
        let mut text = format!(
            "{} ({})",
            self.path.display(),
            if self.other {
                "--operator-binary"
            } else {
                "this build"
            }
        );
        if !self.no_leader_election {
            text.push_str(", no --no-leader-election flag: runs with leader election");
        }
        if !self.text_logs {
            text.push_str(", no --text-logs flag: JSON logs");
        }
        text
    }
}

/// The `kapsa operator` child process; stopped (SIGTERM, then SIGKILL) on drop.
struct OperatorProcess {
    child: Child,
    log: PathBuf,
    metrics_addr: String,
    /// The process name expected in /proc/<pid>/comm.
    comm: String,
    /// The highest resident set seen so far, in KiB.
    peak_kib: u64,
}

impl OperatorProcess {
    /// Starts `binary` as the operator, with `kubeconfig` (the operator
    /// user's) as its `KUBECONFIG`: `kapsa operator` has no kubeconfig flag.
    fn start(binary: &OperatorBinary, kubeconfig: &Path, log: PathBuf) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let metrics_addr = format!("127.0.0.1:{port}");
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        // setpriv makes the kernel kill the operator if this process dies
        // (it execs, so the pid is the operator's own).
        let mut command = if setpriv_available() {
            let mut c = Command::new("setpriv");
            c.args(["--pdeathsig", "KILL", "--"]).arg(&binary.path);
            c
        } else {
            Command::new(&binary.path)
        };
        let child = command
            .args(binary.args(&metrics_addr))
            .env("KUBECONFIG", kubeconfig)
            .env_remove("KAPSA_METRICS_ADDR")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("starting the kapsa operator")?;
        Ok(Self {
            child,
            log,
            metrics_addr,
            comm: binary.comm(),
            peak_kib: 0,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "the operator exited ({status}); last lines of {}:\n{}",
                self.log.display(),
                tail(&self.log, 30)
            );
        }
        Ok(())
    }

    /// A memory figure of /proc/<pid>/status (e.g. VmHWM, VmRSS), in KiB.
    fn memory_kib(&self, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {field} in /proc/{}/status", self.pid()))
    }

    /// The peak resident set so far, in KiB: the larger of VmHWM and every
    /// VmRSS sampled. (The kernel updates the high-water mark lazily, so
    /// VmHWM alone can read lower than an earlier VmRSS.)
    fn sample_peak(&mut self) -> anyhow::Result<u64> {
        let hwm = self.memory_kib("VmHWM")?;
        let rss = self.memory_kib("VmRSS")?;
        self.peak_kib = self.peak_kib.max(hwm).max(rss);
        Ok(self.peak_kib)
    }

    async fn wait_for_metrics(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            if scrape(&self.metrics_addr).await.is_ok() {
                let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid()))?;
                ensure!(
                    comm.trim() == self.comm,
                    "pid {} is {comm:?}, not the operator",
                    self.pid()
                );
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the operator's /metrics did not answer within {timeout:?}; log {}:\n{}",
                self.log.display(),
                tail(&self.log, 30)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn writes(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        Ok(counters(
            &scrape(&self.metrics_addr).await?,
            "kapsa_api_writes_total",
            "kind",
        ))
    }

    async fn git_polls(&self) -> anyhow::Result<u64> {
        Ok(counters(
            &scrape(&self.metrics_addr).await?,
            "kapsa_git_polls_total",
            "result",
        )
        .values()
        .sum())
    }

    async fn reconciles(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        Ok(counters(
            &scrape(&self.metrics_addr).await?,
            "kapsa_reconciles_total",
            "controller",
        ))
    }

    fn stop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

fn setpriv_available() -> bool {
    Command::new("setpriv")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn tail(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// GET /metrics over plain HTTP/1.1.
async fn scrape(addr: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .context("/metrics timed out")??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("a malformed HTTP response")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "/metrics: {head}");
    Ok(body.to_string())
}

/// `name{label="x",...} value` lines summed by `label`.
fn counters(text: &str, name: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let prefix = format!("{name}{{");
    let key = format!("{label}=\"");
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let Some(v) = labels
            .split_once(&key)
            .and_then(|(_, v)| v.split_once('"'))
            .map(|(v, _)| v.to_string())
        else {
            continue;
        };
        let Ok(n) = value.trim().parse::<f64>() else {
            continue;
        };
        *out.entry(v).or_default() += n as u64;
    }
    out
}

fn delta(after: &BTreeMap<String, u64>, before: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

/// CPU time (user + system) a process has used, in seconds.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) in parentheses;
    // utime and stime are fields 14 and 15, in USER_HZ (100 on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU seconds so far of the control plane's processes, this bench (the
/// simulators, the git server and the client) and the operator, by name.
fn cpu_by_process(plane: &ControlPlane, operator: Option<u32>) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let pids = plane
        .pids()
        .into_iter()
        .map(|p| p.to_string())
        .chain(operator.map(|p| p.to_string()))
        .chain(["self".to_string()]);
    for pid in pids {
        let name = if pid == "self" {
            "bench".to_string()
        } else {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| c.trim().to_string())
                .unwrap_or(pid.clone())
        };
        if let Some(seconds) = cpu_seconds(&pid) {
            *out.entry(name).or_default() += seconds;
        }
    }
    out
}

fn cpu_delta(
    after: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
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
}

impl AuditFigures {
    fn of(events: &[AuditEvent], user: &str, log_bytes: u64) -> Self {
        let mut out = Self {
            log_bytes,
            ..Self::default()
        };
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

// ---------------------------------------------------------------------------
// A fresh platform: control plane, CRDs, simulators, platform objects, git.

/// Aborts the task on drop.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Field order matters: everything that talks to the control plane goes
/// before it.
struct Platform {
    client: Client,
    audit: AuditLog,
    _simulators: AbortOnDrop,
    _git: GitServer,
    repo_url: String,
    commit: String,
    plane: ControlPlane,
}

async fn platform(assets: &Path) -> anyhow::Result<Platform> {
    let plane = ControlPlane::start_with_audit_log(ControlPlaneOptions {
        state_dir: None,
        assets_dir: Some(assets.to_path_buf()),
    })
    .await
    .context("starting the control plane")?;
    let client = plane.client().await?;
    kapsa_testenv::simulators::install(&client).await?;
    let crds = kapsa_testenv::crds::parse_crds(&kapsa_api::crds_yaml())?;
    kapsa_testenv::crds::install_crds(&client, &crds, "kapsa").await?;
    let simulators = AbortOnDrop(tokio::spawn(kapsa_testenv::simulators::run(client.clone())));

    let create = |resource: ApiResource, namespace: Option<&str>, object: Value| {
        let client = client.clone();
        let namespace = namespace.map(str::to_string);
        async move {
            let api: Api<DynamicObject> = match &namespace {
                Some(ns) => Api::namespaced_with(client, ns, &resource),
                None => Api::all_with(client, &resource),
            };
            let object: DynamicObject = serde_json::from_value(object)?;
            api.patch(
                &object.name_any(),
                &PatchParams::apply("bench-platform"),
                &Patch::Apply(&object),
            )
            .await?;
            anyhow::Ok(())
        }
    };
    let namespace = ApiResource::erase::<Namespace>(&());
    let secret = ApiResource::erase::<Secret>(&());
    create(
        namespace,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": PLATFORM_NAMESPACE}}),
    )
    .await?;
    let builder = external::kpack_cluster_builder();
    let builder_manifest = json!({"apiVersion": builder.api_version, "kind": builder.kind, "metadata": {"name": "default"},
        "spec": {"tag": "registry.example/builders/default"}});
    create(builder, None, builder_manifest).await?;
    let issuer = external::cert_manager_cluster_issuer();
    let issuer_manifest = json!({"apiVersion": issuer.api_version, "kind": issuer.kind, "metadata": {"name": ISSUER},
        "spec": {"acme": {"server": "https://acme.example/directory", "solvers": [{"http01": {"ingress": {}}}]}}});
    create(issuer, None, issuer_manifest).await?;
    create(
        secret,
        Some(PLATFORM_NAMESPACE),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": REGISTRY_SECRET, "namespace": PLATFORM_NAMESPACE},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": "{\"auths\":{\"registry.example\":{\"auth\":\"dXNlcjpwYXNz\"}}}"}}),
    )
    .await?;
    create(
        ApiResource::erase::<kapsa_api::ClusterRegistry>(&()),
        None,
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "ClusterRegistry", "metadata": {"name": REGISTRY},
            "spec": {"provider": "Harbor", "server": "registry.example", "repository": "kapsa",
                "credentialsSecretRef": {"name": REGISTRY_SECRET, "namespace": PLATFORM_NAMESPACE}}}),
    )
    .await?;
    create(ApiResource::erase::<DomainPool>(&()), None, pool_manifest()).await?;

    let git = GitServer::start(None).await?;
    let repo = git.create_repo("app")?;
    let commit = repo.commit("main", "app.txt", "v1", "first")?;
    Ok(Platform {
        client,
        audit: plane
            .audit_log()
            .context("the control plane has no audit log")?,
        _simulators: simulators,
        repo_url: repo.url().to_string(),
        _git: git,
        commit,
        plane,
    })
}

fn pool_manifest() -> Value {
    json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "DomainPool", "metadata": {"name": POOL},
        "spec": {"domains": [BASE_DOMAIN], "clusterIssuerRef": {"name": ISSUER}, "challenge": "HTTP01",
            "ingressClassName": "nginx"}})
}

fn project_name(i: usize) -> String {
    format!("bench-{i:04}")
}

/// The Project every phase applies: one replica, a health check, small
/// requests (1,000 of them fit the simulated node), polled every 60s.
fn project_manifest(name: &str, repo_url: &str) -> Value {
    json!({
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
    })
}

/// Server-side applies `object` (a typed object) and returns what the server stored.
async fn apply<K>(client: &Client, manager: &str, object: &K) -> anyhow::Result<K>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
{
    let resource = ApiResource::erase::<K>(&());
    let dynamic: DynamicObject = serde_json::from_value(serde_json::to_value(object)?)?;
    let stored = apply_dynamic(client, manager, &resource, &dynamic).await?;
    Ok(serde_json::from_value(serde_json::to_value(stored)?)?)
}

async fn apply_dynamic(
    client: &Client,
    manager: &str,
    resource: &ApiResource,
    object: &DynamicObject,
) -> anyhow::Result<DynamicObject> {
    let api: Api<DynamicObject> = match object.namespace() {
        Some(ns) => Api::namespaced_with(client.clone(), &ns, resource),
        None => Api::all_with(client.clone(), resource),
    };
    api.patch(
        &object.name_any(),
        &PatchParams::apply(manager).force(),
        &Patch::Apply(object),
    )
    .await
    .with_context(|| format!("applying {} {}", resource.kind, object.name_any()))
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
            let manifest: Project =
                serde_json::from_value(project_manifest(&project_name(i), repo_url))?;
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

fn managed_list() -> ListParams {
    cached_list().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"))
}

// ---------------------------------------------------------------------------
// Phase 1: the operator.

struct OperatorFigures {
    /// First apply until every production Environment is Ready.
    ready: Duration,
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
}

impl OperatorFigures {
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
    let client = platform.client.clone();
    let log = std::env::temp_dir().join(format!(
        "kapsa-bench-scale-operator-{}-run{run}.log",
        std::process::id()
    ));
    let kubeconfig = platform.plane.kubeconfig_as(OPERATOR_USER, MASTERS)?;
    let started_mark = platform.audit.mark().await;
    let mut operator = OperatorProcess::start(binary, &kubeconfig, log.clone())?;
    operator.wait_for_metrics(Duration::from_secs(30)).await?;
    eprintln!(
        "  operator pid {} (log {}), applying {} Projects",
        operator.pid(),
        log.display(),
        args.projects
    );

    let timeout = Duration::from_secs(args.timeout_seconds);
    let cpu_before = cpu_by_process(&platform.plane, Some(operator.pid()));
    let started = Instant::now();
    apply_projects(&client, "bench", args, &platform.repo_url).await?;
    let applied = started.elapsed();

    let environments: Api<Environment> = Api::all(client.clone());
    let mut environments_created = None;
    let mut commits_known = None;
    let mut last_progress = Instant::now();
    let ready = loop {
        operator.ensure_running()?;
        operator.sample_peak()?;
        platform.plane.ensure_running()?;
        let list = environments.list(&cached_list()).await?;
        let production: Vec<&Environment> = list
            .items
            .iter()
            .filter(|e| e.name_any() == "production")
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
        if environments_created.is_none() && production.len() >= args.projects {
            environments_created = Some(started.elapsed());
        }
        let with_commit = production
            .iter()
            .filter(|e| e.spec.commit.is_some())
            .count();
        if commits_known.is_none() && with_commit >= args.projects {
            commits_known = Some(started.elapsed());
        }
        let ready = production
            .iter()
            .filter(|e| e.status.as_ref().and_then(|s| s.phase) == Some(EnvironmentPhase::Ready))
            .count();
        if ready >= args.projects {
            break started.elapsed();
        }
        if last_progress.elapsed() >= PROGRESS_EVERY {
            last_progress = Instant::now();
            eprintln!(
                "  {:>6.1}s: {} of {} production Environments ({with_commit} with a commit), phases {phases:?}, operator RSS {} MiB",
                started.elapsed().as_secs_f64(),
                production.len(),
                args.projects,
                operator.memory_kib("VmRSS").unwrap_or(0) / 1024
            );
        }
        ensure!(
            started.elapsed() < timeout,
            "timed out after {timeout:?}: {ready} of {} production Environments Ready ({} exist, phases {phases:?}; operator log {})",
            args.projects,
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
    // (each aggregates its production Environment's readiness).
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
        if ready >= args.projects {
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
    let figures = OperatorFigures {
        ready,
        environments_created: environments_created.unwrap_or(ready),
        commits_known: commits_known.unwrap_or(ready),
        cpu,
        projects_ready,
        peak_rss_kib,
        peak_rss_after_idle_kib: operator.sample_peak()?,
        rss_after_idle_kib: operator.memory_kib("VmRSS")?,
        rollout_audit,
        idle_audit,
        rollout_writes,
        rollout_reconciles,
        idle_writes,
        idle_polls,
        idle_events,
        idle_status_changes,
        idle,
    };
    operator.stop();
    drop(operator);
    drop(platform);
    if !args.keep_logs {
        let _ = std::fs::remove_file(&log);
    }
    Ok(figures)
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

/// Applies what the operator makes for one Project, dependencies first:
/// Project → Namespace → (registry Secret, ServiceAccounts, Role,
/// RoleBinding, Environment) → (kpack Image, Deployment, Service, Ingress).
async fn raw_project(
    client: &Client,
    project: &Project,
    pool: &DomainPool,
    registry_source: &Secret,
    registry_spec: &kapsa_api::RegistrySpec,
    commit: &str,
) -> anyhow::Result<()> {
    const MANAGER: &str = "bench-raw";
    let name = project.name_any();
    apply(client, MANAGER, &children::namespace(project)).await?;
    let host = format!("{name}.{BASE_DOMAIN}");
    let production = children::production_environment(project, Some(commit), Some(&host));
    let secret = children::registry_secret(project, registry_source);
    let builder = children::builder_service_account(project, true);
    let runtime = children::runtime_service_account(project, true);
    let role = children::builder_role(project, true);
    let binding = children::builder_role_binding(project);
    let (environment, ..) = tokio::try_join!(
        apply(client, MANAGER, &production),
        apply(client, MANAGER, &secret),
        apply(client, MANAGER, &builder),
        apply(client, MANAGER, &runtime),
        apply(client, MANAGER, &role),
        apply(client, MANAGER, &binding),
    )?;
    let inputs = EnvironmentInputs {
        project,
        environment: &environment,
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
    let client = platform.client.clone();
    let pool: DomainPool = serde_json::from_value(pool_manifest())?;
    let registry_source = Api::<Secret>::namespaced(client.clone(), PLATFORM_NAMESPACE)
        .get(REGISTRY_SECRET)
        .await?;
    let registry_spec = Api::<kapsa_api::ClusterRegistry>::all(client.clone())
        .get(REGISTRY)
        .await?
        .spec;
    let commit = platform.commit.clone();
    // The applies go as a user of their own, so that the audit log counts them.
    let raw_client = platform.plane.client_as(RAW_USER, MASTERS).await?;
    eprintln!("  applying the children of {} Projects", args.projects);

    let timeout = Duration::from_secs(args.timeout_seconds);
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
            )
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let applied = started.elapsed();

    let deployments: Api<Deployment> = Api::all(client.clone());
    let images: Api<DynamicObject> = Api::all_with(client.clone(), &external::kpack_image());
    let certificates: Api<DynamicObject> =
        Api::all_with(client.clone(), &external::cert_manager_certificate());
    let (mut deployments_done, mut images_done, mut certificates_done) = (0, 0, 0);
    let mut last_progress = Instant::now();
    loop {
        platform.plane.ensure_running()?;
        // A kind that is done stays done: stop listing it.
        if deployments_done < args.projects {
            let list = deployments.list(&managed_list()).await?;
            deployments_done = list.items.iter().filter(|d| available(d)).count();
        }
        if images_done < args.projects {
            let list = images.list(&managed_list()).await?;
            images_done = list
                .items
                .iter()
                .filter(|i| condition_true(i, "Ready"))
                .count();
        }
        if certificates_done < args.projects {
            let list = certificates.list(&cached_list()).await?;
            certificates_done = list
                .items
                .iter()
                .filter(|c| condition_true(c, "Ready"))
                .count();
        }
        if deployments_done >= args.projects
            && images_done >= args.projects
            && certificates_done >= args.projects
        {
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
            "Deployments Available {deployments_done}, Images built {images_done}, Certificates ready {certificates_done} of {}",
            args.projects
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

struct RunFigures {
    operator: OperatorFigures,
    raw: RawFigures,
}

impl RunFigures {
    fn ratio(&self) -> f64 {
        self.operator.ready.as_secs_f64() / self.raw.done.as_secs_f64()
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
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
        "  raw phase, audit log, user {RAW_USER}: {} writes ({:.1}/Project)",
        f.raw.audit.total_writes(),
        f.raw.audit.total_writes() as f64 / n
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
    println!();
    println!(
        "| run | operator | raw apply | ratio | peak RSS | writes/Project (audit) | Lease writes | GETs/Project (audit) | idle writes/min (audit) | idle GETs/min (audit) | writes/Project (own count) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    // A row: `value` gives one figure of it (one run's, or the median).
    let row = |label: String, f: &dyn Fn(Figure) -> f64| {
        println!(
            "| {label} | {:.2} s | {:.2} s | {:.2} | {:.1} MiB | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} |",
            f(&|r| r.operator.ready.as_secs_f64()),
            f(&|r| r.raw.done.as_secs_f64()),
            f(&|r| r.ratio()),
            f(&|r| mib(r.operator.peak_rss_kib)),
            f(&writes),
            f(&leases),
            f(&gets),
            f(&|r| r.operator.idle_writes_per_minute()),
            f(&|r| r.operator.idle_gets_per_minute()),
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
    // Alternate which phase goes first, so that neither always runs on a
    // warmer (or more tired) machine.
    if run % 2 == 1 {
        eprintln!("run {run}: operator phase");
        let operator = operator_phase(assets, args, binary, run).await?;
        eprintln!("run {run}: raw-apply phase");
        let raw = raw_phase(assets, args).await?;
        Ok(RunFigures { operator, raw })
    } else {
        eprintln!("run {run}: raw-apply phase");
        let raw = raw_phase(assets, args).await?;
        eprintln!("run {run}: operator phase");
        let operator = operator_phase(assets, args, binary, run).await?;
        Ok(RunFigures { operator, raw })
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        args.projects > 0 && args.runs > 0 && args.concurrency > 0,
        "--projects, --runs and --concurrency must be positive"
    );
    ensure!(args.idle_seconds > 0, "--idle-seconds must be positive");
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let binary = OperatorBinary::detect(&args)?;
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

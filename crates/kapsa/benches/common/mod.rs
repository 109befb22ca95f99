//! What the benchmarks of this crate share: the `kapsa operator` binary
//! run as a child process (its peak RSS, its /metrics), a fresh control
//! plane with the simulators and the platform objects (builder, issuer,
//! registry, DomainPool) and a git repository on loopback, server-side
//! apply, and a median. Each bench uses part of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kapsa_api::{DomainPool, external};
use kapsa_testenv::audit::AuditLog;
use kapsa_testenv::git_server::{GitServer, TestRepo};
use kapsa_testenv::{ControlPlane, ControlPlaneOptions};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub const PLATFORM_NAMESPACE: &str = "kapsa-system";
pub const POOL: &str = "bench-pool";
pub const BASE_DOMAIN: &str = "bench.example.com";
pub const ISSUER: &str = "bench-issuer";
pub const REGISTRY: &str = "bench-registry";
pub const REGISTRY_SECRET: &str = "bench-push";
/// The user the operator authenticates as, so that the audit log tells its
/// requests apart from the bench's, the simulators' and the control plane's.
pub const OPERATOR_USER: &str = "kapsa-operator";
pub const MASTERS: &[&str] = &["system:masters"];

// ---------------------------------------------------------------------------
// The operator as a child process.

/// The `kapsa` binary run as the operator, and which of the bench's
/// `kapsa operator` flags it accepts (an older build may lack some).
#[derive(Debug, Clone)]
pub struct OperatorBinary {
    pub path: PathBuf,
    /// `--operator-binary` (not this build's).
    pub other: bool,
    /// `--no-leader-election`; without it the operator elects itself
    /// through a Lease, whose writes the bench counts and shows apart.
    pub no_leader_election: bool,
    /// `--text-logs`; without it the log is JSON.
    pub text_logs: bool,
    /// `--allow-internal-git-hosts`: the bench's git server is on loopback,
    /// which a build with this flag refuses unless it is allowed.
    pub allow_internal_git_hosts: bool,
    /// `--resync-period`: an older build resyncs every 10 minutes.
    pub resync_period: bool,
}

impl OperatorBinary {
    /// Checks the binary and reads its flags from `kapsa operator --help`.
    /// `operator_binary`: another build's `kapsa` (`--operator-binary`);
    /// `None`: this build's.
    pub fn detect(operator_binary: Option<&Path>) -> anyhow::Result<Self> {
        let (path, other) = match operator_binary {
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
            resync_period: has("--resync-period"),
            path,
            other,
        })
    }

    pub fn args(&self, metrics_addr: &str) -> Vec<String> {
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
    pub fn comm(&self) -> String {
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        String::from_utf8_lossy(&name.as_bytes()[..name.len().min(15)]).into_owned()
    }

    pub fn describe(&self) -> String {
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
pub struct OperatorProcess {
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
    pub fn start(binary: &OperatorBinary, kubeconfig: &Path, log: PathBuf) -> anyhow::Result<Self> {
        Self::start_with(binary, kubeconfig, log, &[])
    }

    /// [`Self::start`] with `extra` flags after the bench's own, e.g.
    /// `--max-poll-interval 2s`.
    pub fn start_with(
        binary: &OperatorBinary,
        kubeconfig: &Path,
        log: PathBuf,
        extra: &[String],
    ) -> anyhow::Result<Self> {
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
            .args(extra)
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

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
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
    pub fn memory_kib(&self, field: &str) -> anyhow::Result<u64> {
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
    pub fn sample_peak(&mut self) -> anyhow::Result<u64> {
        let hwm = self.memory_kib("VmHWM")?;
        let rss = self.memory_kib("VmRSS")?;
        self.peak_kib = self.peak_kib.max(hwm).max(rss);
        Ok(self.peak_kib)
    }

    pub async fn wait_for_metrics(&mut self, timeout: Duration) -> anyhow::Result<()> {
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

    /// Whether `/readyz` answers 200 (every cache had its first listing).
    pub async fn ready(&self) -> anyhow::Result<bool> {
        Ok(http_get(&self.metrics_addr, "/readyz").await?.0 == 200)
    }

    pub async fn writes(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        Ok(counters(
            &scrape(&self.metrics_addr).await?,
            "kapsa_api_writes_total",
            "kind",
        ))
    }

    pub async fn git_polls(&self) -> anyhow::Result<u64> {
        Ok(counters(
            &scrape(&self.metrics_addr).await?,
            "kapsa_git_polls_total",
            "result",
        )
        .values()
        .sum())
    }

    pub async fn reconciles(&self) -> anyhow::Result<BTreeMap<String, u64>> {
        Ok(counters(
            &scrape(&self.metrics_addr).await?,
            "kapsa_reconciles_total",
            "controller",
        ))
    }

    pub fn stop(&mut self) {
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

pub use kapsa_testenv::process::{log_tail as tail, setpriv_available};

/// GET /metrics over plain HTTP/1.1.
pub async fn scrape(addr: &str) -> anyhow::Result<String> {
    let (code, body) = http_get(addr, "/metrics").await?;
    ensure!(code == 200, "/metrics: HTTP {code}");
    Ok(body)
}

/// GET `path` of `addr` over plain HTTP/1.1: the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .with_context(|| format!("{path} timed out"))??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("a malformed HTTP response")?;
    let code = head
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("{path}: {head}"))?;
    Ok((code, body.to_string()))
}

/// `name{label="x",...} value` lines summed by `label`.
pub fn counters(text: &str, name: &str, label: &str) -> BTreeMap<String, u64> {
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

// ---------------------------------------------------------------------------
// A fresh platform: control plane, CRDs, simulators, platform objects, git.

/// Aborts the task on drop.
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Field order matters: everything that talks to the control plane goes
/// before it.
pub struct Platform {
    pub client: Client,
    pub audit: AuditLog,
    pub _simulators: AbortOnDrop,
    /// The repository every Project points at (`main` has one commit), to
    /// push to or branch from.
    pub repo: TestRepo,
    pub _git: GitServer,
    pub repo_url: String,
    pub commit: String,
    pub plane: ControlPlane,
}

pub async fn platform(assets: &Path) -> anyhow::Result<Platform> {
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
        repo,
        _git: git,
        commit,
        plane,
    })
}

pub fn pool_manifest() -> Value {
    json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "DomainPool", "metadata": {"name": POOL},
        "spec": {"domains": [BASE_DOMAIN], "clusterIssuerRef": {"name": ISSUER}, "challenge": "HTTP01",
            "ingressClassName": "nginx"}})
}

/// Server-side applies `object` (a typed object) and returns what the server stored.
pub async fn apply<K>(client: &Client, manager: &str, object: &K) -> anyhow::Result<K>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned,
{
    let resource = ApiResource::erase::<K>(&());
    let dynamic: DynamicObject = serde_json::from_value(serde_json::to_value(object)?)?;
    let stored = apply_dynamic(client, manager, &resource, &dynamic).await?;
    Ok(serde_json::from_value(serde_json::to_value(stored)?)?)
}

pub async fn apply_dynamic(
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

/// CPU time (user + system) a process has used, in seconds.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) in parentheses;
    // utime and stime are fields 14 and 15, in USER_HZ (100 on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// CPU seconds so far of the control plane's processes, this bench (the
/// simulators, the git server and the client) and the operator, by name.
pub fn cpu_by_process(plane: &ControlPlane, operator: Option<u32>) -> BTreeMap<String, f64> {
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

/// What each process used between two [`cpu_by_process`] readings.
pub fn cpu_delta(
    after: &BTreeMap<String, f64>,
    before: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .collect()
}

pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

//! A real Kubernetes control plane on loopback: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and kwok (simulated nodes).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::audit::AuditLog;
use crate::process::{ManagedProcess, log_tail, stop_all};

/// The upstream binaries a control plane is made of.
pub const REQUIRED_BINARIES: [&str; 6] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kwok",
];

/// Name of the simulated node every control plane gets.
pub const FAKE_NODE_NAME: &str = "kwok-node-0";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("control-plane binaries: {0}")]
    Assets(String),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    ProcessExited(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where the binaries are: `KUBEBUILDER_ASSETS` if it holds all of them,
/// otherwise the repository's install script builds them (once per machine)
/// and prints the cache folder.
pub fn find_assets() -> Result<PathBuf> {
    installed_folder(
        std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from),
        &install_script(),
        has_all_binaries,
        &format!("{REQUIRED_BINARIES:?}"),
        None,
    )
}

/// The folder one of the `hack/install-*.sh` scripts provides: `from_env`
/// when it names a folder `complete` accepts; otherwise the script runs
/// (it builds or fetches once per machine, then answers from its cache)
/// and prints the folder on its last line, which `complete` must accept
/// too (`lacks` names what it checks, for the error). A script that exits
/// 2 says the machine cannot run what it installs: `cannot_run` is the
/// error then.
pub(crate) fn installed_folder(
    from_env: Option<PathBuf>,
    script: &Path,
    complete: impl Fn(&Path) -> bool,
    lacks: &str,
    cannot_run: Option<&str>,
) -> Result<PathBuf> {
    installed_folder_with(from_env, script, complete, lacks, cannot_run, false)
}

/// [`installed_folder`]; with `cached_only` the script builds nothing
/// (`KAPSA_ASSETS_NO_BUILD=1`) and only reports what is there.
pub(crate) fn installed_folder_with(
    from_env: Option<PathBuf>,
    script: &Path,
    complete: impl Fn(&Path) -> bool,
    lacks: &str,
    cannot_run: Option<&str>,
    cached_only: bool,
) -> Result<PathBuf> {
    if let Some(dir) = from_env
        && complete(&dir)
    {
        return Ok(dir);
    }
    if !script.exists() {
        return Err(Error::Assets(format!(
            "no folder with {lacks} was given, and the install script {} is missing",
            script.display()
        )));
    }
    let mut command = Command::new("bash");
    command.arg(script).stderr(std::process::Stdio::inherit());
    if cached_only {
        command.env("KAPSA_ASSETS_NO_BUILD", "1");
    }
    let output = command.output()?;
    if !output.status.success() {
        return Err(Error::Assets(match (output.status.code(), cannot_run) {
            (Some(2), Some(reason)) => format!(
                "{reason} ({} exited 2; its reason is printed above)",
                script.display()
            ),
            _ => format!("{} failed ({})", script.display(), output.status),
        }));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let dir = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
    if complete(&dir) {
        Ok(dir)
    } else {
        Err(Error::Assets(format!(
            "{} printed {}, which lacks some of {lacks}",
            script.display(),
            dir.display()
        )))
    }
}

fn install_script() -> PathBuf {
    if let Some(path) = std::env::var_os("KAPSA_INSTALL_CONTROL_PLANE") {
        return PathBuf::from(path);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/install-control-plane.sh")
}

fn has_all_binaries(dir: &Path) -> bool {
    REQUIRED_BINARIES.iter().all(|b| dir.join(b).is_file())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// How to start a control plane.
///
/// The audit log is not a field here (a new field would break the struct
/// literals of existing callers): start with
/// [`ControlPlane::start_with_audit_log`] to have it.
#[derive(Debug, Clone, Default)]
pub struct ControlPlaneOptions {
    /// Folder for data, certificates, logs and the kubeconfig. A fresh
    /// temporary folder (removed on drop) when `None`; an existing folder is
    /// emptied first and kept afterwards.
    pub state_dir: Option<PathBuf>,
    /// Folder with the binaries; found with [`find_assets`] when `None`.
    pub assets_dir: Option<PathBuf>,
}

/// A running control plane. Dropping it stops every process it started.
pub struct ControlPlane {
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    kubeconfig_path: PathBuf,
    api_server_url: String,
    assets_dir: PathBuf,
    audit_log: Option<AuditLog>,
    /// In start order; stopped in reverse.
    processes: Vec<ManagedProcess>,
    /// kube-apiserver's flags, to start it again ([`Self::restart_api_server`]).
    api_server_args: Vec<String>,
    /// etcd's flags, to start it again ([`Self::restart_etcd`]).
    etcd_args: Vec<String>,
}

impl ControlPlane {
    /// Starts a control plane without an audit log.
    pub async fn start(options: ControlPlaneOptions) -> Result<Self> {
        Self::start_inner(options, false).await
    }

    /// Starts a control plane whose API server writes an audit log (one JSON
    /// line per request, [`crate::audit::POLICY`]) to `<dir>/audit.log`; read
    /// it with [`Self::audit_log`].
    pub async fn start_with_audit_log(options: ControlPlaneOptions) -> Result<Self> {
        Self::start_inner(options, true).await
    }

    async fn start_inner(options: ControlPlaneOptions, audit: bool) -> Result<Self> {
        let assets_dir = match options.assets_dir {
            Some(dir) => dir,
            None => tokio::task::spawn_blocking(find_assets)
                .await
                .map_err(|e| Error::Assets(e.to_string()))??,
        };
        let (dir, temp) = match options.state_dir {
            Some(dir) => {
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)?;
                }
                std::fs::create_dir_all(&dir)?;
                (dir, None)
            }
            None => {
                let root = std::env::temp_dir().join("kapsa-testenv");
                std::fs::create_dir_all(&root)?;
                remove_stale_dirs(&root);
                let temp = tempfile::Builder::new()
                    .prefix(&format!("cp-{}-", std::process::id()))
                    .tempdir_in(&root)?;
                (temp.path().to_path_buf(), Some(temp))
            }
        };
        let dir = std::path::absolute(&dir)?;
        let api_port = free_port()?;
        let mut plane = Self {
            kubeconfig_path: dir.join("kubeconfig"),
            api_server_url: format!("https://127.0.0.1:{api_port}"),
            audit_log: audit.then(|| AuditLog::at(dir.join("audit.log"))),
            dir,
            _temp: temp,
            assets_dir,
            processes: Vec::new(),
            api_server_args: Vec::new(),
            etcd_args: Vec::new(),
        };
        let started = Instant::now();
        plane.launch(api_port).await?;
        tracing::info!(
            url = plane.api_server_url,
            kubeconfig = %plane.kubeconfig_path.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            audit_log = plane.audit_log.is_some(),
            "control plane ready"
        );
        Ok(plane)
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    pub fn api_server_url(&self) -> &str {
        &self.api_server_url
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn assets_dir(&self) -> &Path {
        &self.assets_dir
    }

    /// Process ids of every process this control plane started.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(ManagedProcess::pid).collect()
    }

    /// A new client for the admin user. Make one per async runtime.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig_path).await
    }

    /// A new client that authenticates as `user` in `groups`, with a client
    /// certificate signed by this control plane's CA (common name `user`,
    /// one organization per group). `system:masters` is the admin group; a
    /// user outside it has only what RBAC grants it. Make one per async runtime.
    pub async fn client_as(&self, user: &str, groups: &[&str]) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig_as(user, groups)?).await
    }

    /// A kubeconfig for `user` in `groups` (see [`Self::client_as`]), for
    /// running a separate process under that identity. The same path for the
    /// same user and groups; its certificate is minted on the first call.
    pub fn kubeconfig_as(&self, user: &str, groups: &[&str]) -> Result<PathBuf> {
        user_kubeconfig(&self.dir, &self.api_server_url, user, groups)
    }

    /// The API server's audit log, if started with
    /// [`Self::start_with_audit_log`].
    pub fn audit_log(&self) -> Option<AuditLog> {
        self.audit_log.clone()
    }

    /// Checks that every process is still alive.
    pub fn ensure_running(&mut self) -> Result<()> {
        for p in &mut self.processes {
            p.ensure_running().map_err(Error::ProcessExited)?;
        }
        Ok(())
    }

    /// Stops everything: node simulator and controllers first, then the API
    /// server, then etcd.
    pub fn stop(&mut self) {
        let mut processes = std::mem::take(&mut self.processes);
        let grace = Duration::from_secs(5);
        while let Some(name) = processes.last().map(|p| p.name().to_string()) {
            // Stop the processes that depend on the API server together.
            let cut = if name == "etcd" || name == "kube-apiserver" {
                processes.len() - 1
            } else {
                processes
                    .iter()
                    .position(|p| p.name() != "etcd" && p.name() != "kube-apiserver")
                    .unwrap_or(processes.len() - 1)
            };
            let mut wave = processes.split_off(cut);
            stop_all(&mut wave, grace);
        }
    }

    async fn launch(&mut self, api_port: u16) -> Result<()> {
        let pki = crate::pki::ControlPlanePki::generate()?;
        let pki_dir = self.dir.join("pki");
        std::fs::create_dir_all(&pki_dir)?;
        let write = |name: &str, contents: &str| -> Result<PathBuf> {
            let path = pki_dir.join(name);
            std::fs::write(&path, contents)?;
            Ok(path)
        };
        let ca_cert = write("ca.crt", &pki.ca_cert_pem)?;
        write(CA_KEY_FILE, &pki.ca_key_pem)?;
        let serving_cert = write("apiserver.crt", &pki.serving_cert_pem)?;
        let serving_key = write("apiserver.key", &pki.serving_key_pem)?;
        let admin_cert = write("admin.crt", &pki.admin_cert_pem)?;
        let admin_key = write("admin.key", &pki.admin_key_pem)?;
        let kubelet_client_cert = write("kubelet-client.crt", &pki.kubelet_client_cert_pem)?;
        let kubelet_client_key = write("kubelet-client.key", &pki.kubelet_client_key_pem)?;
        let sa_key = write("service-account.key", &pki.service_account_key_pem)?;
        let sa_public_key = write("service-account.pub", &pki.service_account_public_key_pem)?;
        std::fs::write(
            &self.kubeconfig_path,
            kubeconfig_yaml(
                &self.api_server_url,
                &ca_cert,
                "kapsa-admin",
                &format!(
                    "client-certificate: {}\n    client-key: {}",
                    admin_cert.display(),
                    admin_key.display()
                ),
            ),
        )?;
        let logs = self.dir.join("logs");
        let kubeconfig = self.kubeconfig_path.display().to_string();
        let path = |p: &Path| p.display().to_string();

        let etcd_port = free_port()?;
        let etcd_peer_port = free_port()?;
        self.etcd_args = vec![
            format!("--data-dir={}", path(&self.dir.join("etcd"))),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}"),
            format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer_port}"),
            // A throwaway store: durability buys nothing and fsync costs seconds.
            "--unsafe-no-fsync=true".into(),
            "--quota-backend-bytes=4294967296".into(),
            "--log-level=warn".into(),
        ];
        self.spawn("etcd", self.etcd_args.clone(), &logs)?;

        let mut audit_args = Vec::new();
        if let Some(log) = &self.audit_log {
            let policy = self.dir.join("audit-policy.yaml");
            std::fs::write(&policy, crate::audit::POLICY)?;
            audit_args = vec![
                format!("--audit-policy-file={}", path(&policy)),
                format!("--audit-log-path={}", path(log.path())),
                "--audit-log-format=json".into(),
                // Written in the request's goroutine, so a line is in the file
                // right after the response; strict: a request that cannot be
                // audited fails rather than go unrecorded.
                "--audit-log-mode=blocking-strict".into(),
                // Megabytes; a test run never reaches it, so never rotates.
                "--audit-log-maxsize=1000".into(),
                "--audit-log-maxbackup=1".into(),
            ];
        }
        self.api_server_args = [
            vec![
                format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
                format!("--secure-port={api_port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--cert-dir={}", path(&self.dir.join("apiserver-certs"))),
                format!("--tls-cert-file={}", path(&serving_cert)),
                format!("--tls-private-key-file={}", path(&serving_key)),
                format!("--client-ca-file={}", path(&ca_cert)),
                format!("--service-account-key-file={}", path(&sa_public_key)),
                format!("--service-account-signing-key-file={}", path(&sa_key)),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                // Kubelets (the real lane's node) get the rights of their
                // own Node and its pods only.
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                // The API server reaches kubelets (`kubectl logs`, `exec`)
                // at their InternalIP, verifying their serving certificate
                // against the cluster CA.
                format!(
                    "--kubelet-client-certificate={}",
                    path(&kubelet_client_cert)
                ),
                format!("--kubelet-client-key={}", path(&kubelet_client_key)),
                format!("--kubelet-certificate-authority={}", path(&ca_cert)),
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--allow-privileged=true".into(),
                "--event-ttl=1h".into(),
                // Benchmarks apply thousands of objects at once; the defaults
                // (400/200) would measure the limiter, not Kapsa.
                "--max-requests-inflight=2000".into(),
                "--max-mutating-requests-inflight=1000".into(),
                "--v=0".into(),
            ],
            audit_args,
        ]
        .concat();
        self.spawn("kube-apiserver", self.api_server_args.clone(), &logs)?;
        self.wait_for_api_server().await?;

        let common = |extra: &[String]| -> Vec<String> {
            let mut args = vec![format!("--kubeconfig={kubeconfig}")];
            args.extend_from_slice(extra);
            args
        };
        self.spawn(
            "kube-controller-manager",
            common(&[
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--controllers=*".into(),
                format!("--root-ca-file={}", path(&ca_cert)),
                format!("--service-account-private-key-file={}", path(&sa_key)),
                "--use-service-account-credentials=false".into(),
                // Lets the garbage collector and namespace controller see
                // new resource types (CRDs installed later) quickly.
                "--concurrent-gc-syncs=10".into(),
                "--kube-api-qps=500".into(),
                "--kube-api-burst=1000".into(),
            ]),
            &logs,
        )?;
        self.spawn(
            "kube-scheduler",
            common(&[
                "--leader-elect=false".into(),
                "--secure-port=0".into(),
                "--kube-api-qps=500".into(),
                "--kube-api-burst=1000".into(),
            ]),
            &logs,
        )?;
        let kwok_stages = self.dir.join("kwok-stages.yaml");
        std::fs::write(&kwok_stages, include_str!("../crds/kwok-stages.yaml"))?;
        self.spawn(
            "kwok",
            common(&[
                format!("--config={}", path(&kwok_stages)),
                "--manage-all-nodes=false".into(),
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake".into(),
                "--disregard-status-with-annotation-selector=kwok.x-k8s.io/status=custom".into(),
                "--cidr=10.244.0.0/16".into(),
                "--node-ip=10.244.0.1".into(),
                "--node-lease-duration-seconds=40".into(),
                format!("--server-address=127.0.0.1:{}", free_port()?),
            ]),
            &logs,
        )?;

        let client = self.client().await?;
        create_fake_node(&client).await?;
        self.wait_until(
            "the simulated node to be Ready",
            Duration::from_secs(60),
            || {
                let client = client.clone();
                async move {
                    let node = Api::<Node>::all(client).get_opt(FAKE_NODE_NAME).await?;
                    Ok(node.is_some_and(|n| condition_true(&n, "Ready")))
                }
            },
        )
        .await?;
        self.wait_until(
            "the controller manager to create the default ServiceAccount",
            Duration::from_secs(60),
            || {
                let client = client.clone();
                async move {
                    let sa = Api::<ServiceAccount>::namespaced(client, "default")
                        .get_opt("default")
                        .await?;
                    Ok(sa.is_some())
                }
            },
        )
        .await?;
        Ok(())
    }

    /// Stops kube-apiserver (SIGTERM, SIGKILL after 10 s) and starts it
    /// again with the same flags and port; etcd keeps the state. Every
    /// client's watch breaks, and a watch resumed from a resourceVersion
    /// older than the new API server's watch cache gets `410 Gone` and must
    /// list again. `down` is how long it stays stopped. Returns once it is
    /// ready; its log goes on in `kube-apiserver.log`.
    pub async fn restart_api_server(&mut self, down: Duration) -> Result<()> {
        let args = self.api_server_args.clone();
        self.restart("kube-apiserver", &args, down).await
    }

    /// Stops etcd (SIGTERM, SIGKILL after 10 s) and starts it again with the
    /// same flags and data: kube-apiserver stays up but can read and write
    /// nothing meanwhile, and its watches of etcd break. `down` is how long
    /// etcd stays stopped. Returns once the API server is ready again.
    pub async fn restart_etcd(&mut self, down: Duration) -> Result<()> {
        let args = self.etcd_args.clone();
        self.restart("etcd", &args, down).await
    }

    /// Stops the process `name` (SIGTERM, SIGKILL after 10 s), waits
    /// `down`, starts it again with `args` (its old log kept as
    /// `<name>.before-restart.log`) and waits for the API server to be ready.
    async fn restart(&mut self, name: &str, args: &[String], down: Duration) -> Result<()> {
        let index = self
            .processes
            .iter()
            .position(|p| p.name() == name)
            .ok_or_else(|| Error::ProcessExited(format!("no {name} to restart")))?;
        self.processes[index].terminate();
        self.processes[index].wait_or_kill(Duration::from_secs(10));
        tokio::time::sleep(down).await;
        let logs = self.dir.join("logs");
        let _ = std::fs::rename(
            logs.join(format!("{name}.log")),
            logs.join(format!("{name}.before-restart.log")),
        );
        self.processes[index] =
            ManagedProcess::spawn(name, &self.assets_dir.join(name), args, &logs)?;
        self.wait_for_api_server().await
    }

    fn spawn(&mut self, name: &str, args: Vec<String>, logs: &Path) -> Result<()> {
        let program = self.assets_dir.join(name);
        let process = ManagedProcess::spawn(name, &program, &args, logs)?;
        self.processes.push(process);
        Ok(())
    }

    async fn wait_for_api_server(&mut self) -> Result<()> {
        let kubeconfig = self.kubeconfig_path.clone();
        self.wait_until("kube-apiserver /readyz", Duration::from_secs(90), || {
            let kubeconfig = kubeconfig.clone();
            async move {
                let client = client_from_kubeconfig(&kubeconfig).await?;
                let request = http::Request::get("/readyz")
                    .body(Vec::new())
                    .map_err(|e| Error::Kubeconfig(e.to_string()))?;
                Ok(client
                    .request_text(request)
                    .await
                    .is_ok_and(|body| body.trim() == "ok"))
            }
        })
        .await
    }

    /// Polls `check` until it returns true, failing fast if a process died.
    async fn wait_until<F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let deadline = Instant::now() + timeout;
        let mut last_error = String::new();
        loop {
            self.ensure_running()?;
            match check().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last_error = e.to_string(),
            }
            if Instant::now() >= deadline {
                let mut detail = format!("{what} (last error: {last_error})");
                if let Some(p) = self.processes.last() {
                    detail.push_str(&format!(
                        "\nlast lines of {}.log:\n{}",
                        p.name(),
                        log_tail(&self.dir.join("logs").join(format!("{}.log", p.name())), 20)
                    ));
                }
                return Err(Error::Timeout(timeout, detail));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    Ok(Client::try_from(config)?)
}

/// Name of the CA's key in the `pki` folder.
pub(crate) const CA_KEY_FILE: &str = "ca.key";

/// Writes (once) a kubeconfig for `user` in `groups` into `<dir>/users`, with
/// a client certificate signed by the CA in `<dir>/pki`, and returns its path.
pub(crate) fn user_kubeconfig(
    dir: &Path,
    server: &str,
    user: &str,
    groups: &[&str],
) -> Result<PathBuf> {
    let mut id = Sha256::new();
    id.update(user.as_bytes());
    for group in groups {
        id.update([0]);
        id.update(group.as_bytes());
    }
    let id = id.finalize();
    let safe_user: String = user
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .take(60)
        .collect();
    let users = dir.join("users");
    let path = users.join(format!(
        "{safe_user}-{:02x}{:02x}{:02x}{:02x}.kubeconfig",
        id[0], id[1], id[2], id[3]
    ));
    if path.exists() {
        return Ok(path);
    }
    let pki = dir.join("pki");
    let ca_key = std::fs::read_to_string(pki.join(CA_KEY_FILE))?;
    let (cert, key) = crate::pki::client_certificate(&ca_key, user, groups)?;
    let yaml = kubeconfig_yaml(
        server,
        &pki.join("ca.crt"),
        "kapsa-user",
        &format!(
            "client-certificate-data: {}\n    client-key-data: {}",
            BASE64.encode(cert),
            BASE64.encode(key)
        ),
    );
    // Written whole under a unique name, then renamed: a concurrent caller
    // sees either no file or a complete one (and any one minted is valid).
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(&users)?;
    let partial = users.join(format!(
        ".{}-{}.partial",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&partial, yaml)?;
    std::fs::rename(&partial, &path)?;
    Ok(path)
}

/// A kubeconfig for `server` whose one user authenticates with `user_auth`
/// (the lines of its `user:` map, indented by four spaces after the first).
fn kubeconfig_yaml(server: &str, ca: &Path, user_name: &str, user_auth: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: kapsa-local
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user_name}
  user:
    {user_auth}
contexts:
- name: kapsa-local
  context:
    cluster: kapsa-local
    user: {user_name}
current-context: kapsa-local
",
        ca = ca.display(),
    )
}

async fn create_fake_node(client: &Client) -> Result<()> {
    let node: Node = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": FAKE_NODE_NAME,
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "type": "kwok",
                "kubernetes.io/hostname": FAKE_NODE_NAME,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/role": "agent"
            }
        },
        "status": {
            "allocatable": {"cpu": "64", "memory": "512Gi", "ephemeral-storage": "1Ti", "pods": "10000"},
            "capacity": {"cpu": "64", "memory": "512Gi", "ephemeral-storage": "1Ti", "pods": "10000"}
        }
    }))
    .map_err(|e| Error::Manifest(e.to_string()))?;
    match Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn condition_true(node: &Node, type_: &str) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == type_ && c.status == "True"))
}

/// Removes folders left by test processes that no longer run (a test binary
/// exits without dropping its shared control plane).
fn remove_stale_dirs(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let pid = name
            .strip_prefix("cp-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid
            && pid != std::process::id()
            && !Path::new(&format!("/proc/{pid}")).exists()
        {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

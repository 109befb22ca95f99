//! The foundation of the REAL lane (docs/real-lane.md): a real node —
//! containerd + runc + bridge CNI + kubelet — joined to a local control plane,
//! and a container registry on loopback that the node pulls from.
//!
//! Linux and root only; the binaries come from `hack/install-real-lane.sh`
//! ([`find_real_lane_assets`]). The node registers with the taint
//! [`REAL_NODE_TAINT`] and the label [`REAL_NODE_LABEL`]`=true`, so that only
//! pods that tolerate and select it land there (the kwok node keeps the rest).
//!
//! The node changes the host while it runs (processes, mounts, a bridge,
//! iptables chains, cgroups under `kubepods`, sysctls, `/run/containerd/s`):
//! [`RealNode::stop`] (and drop) puts back what it recorded before starting.
//! A process killed outright (SIGKILL) does not get to: containerd, kubelet
//! and the registry die with it (see [`crate::process`]), but the shims and
//! pods outlive it; [`RealNode::start`] then refuses to start (their
//! `kubepods` cgroups are still there) until they are cleaned up.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::control_plane::{ControlPlane, Error, Result, client_from_kubeconfig, user_kubeconfig};
use crate::process::{ManagedProcess, log_tail};
use crate::shared::TestEnv;

/// The binaries (and programs) of the lane's cache folder.
pub const REAL_LANE_BINARIES: [&str; 8] = [
    "kubelet",
    "containerd",
    "containerd-shim-runc-v2",
    "ctr",
    "registry",
    "crane",
    "pause",
    "busybox",
];

/// Key of the taint (`NoSchedule`, value `"true"`) and of the label (value
/// `"true"`) the real node registers with.
pub const REAL_NODE_TAINT: &str = "kapsa.dev/real-node";
pub const REAL_NODE_LABEL: &str = "kapsa.dev/real-node";

/// The toleration of [`REAL_NODE_TAINT`] (any value), as JSON for a Pod
/// spec's `tolerations`.
pub fn real_node_toleration() -> serde_json::Value {
    serde_json::json!({"key": REAL_NODE_TAINT, "operator": "Exists", "effect": "NoSchedule"})
}

/// The CNI bridge of the node, and the pods' subnet (host-local IPAM).
pub const BRIDGE: &str = "kapsa-cni0";
pub const POD_SUBNET: &str = "10.89.0.0/24";
/// The host's address on [`BRIDGE`], the pods' gateway: where pods reach
/// services of the host (the lane's registry, a git server). The host
/// reaches it too, so one address serves both (an image reference that a
/// build Pod pushes to and containerd pulls from).
pub const BRIDGE_GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 89, 0, 1);
const CNI_NETWORK: &str = "kapsa-real-node";

/// Where Debian's `containernetworking-plugins` and `runc` are.
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const RUNC: &str = "/usr/sbin/runc";

/// Host settings kubelet and the bridge plugin change while the node runs;
/// recorded before it starts and written back when it stops.
pub const SYSCTLS: [&str; 7] = [
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
];

/// Host paths the node's processes create outside its own folder, whatever
/// their configuration: containerd's shim sockets (`/run/containerd/s`, a
/// compiled-in path for root), kubelet's device-plugin socket
/// (`/var/lib/kubelet/device-plugins/kubelet.sock`, compiled in too) and its
/// `/var/log/containers` symlinks, and the CNI library's result cache.
const HOST_PATHS: [&str; 5] = [
    "/run/containerd",
    "/var/lib/kubelet",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/netns",
];

/// The control plane a node joins: its folder (with `pki/ca.crt` and
/// `pki/ca.key`), URL, admin kubeconfig and kubectl.
#[derive(Debug, Clone)]
pub struct ClusterAccess {
    pub dir: PathBuf,
    pub api_server_url: String,
    pub kubeconfig_path: PathBuf,
    pub kubectl: PathBuf,
}

impl From<&ControlPlane> for ClusterAccess {
    fn from(plane: &ControlPlane) -> Self {
        Self {
            dir: plane.dir().to_path_buf(),
            api_server_url: plane.api_server_url().to_string(),
            kubeconfig_path: plane.kubeconfig_path().to_path_buf(),
            kubectl: plane.assets_dir().join("kubectl"),
        }
    }
}

impl From<&TestEnv> for ClusterAccess {
    fn from(env: &TestEnv) -> Self {
        let kubeconfig_path = env.kubeconfig_path().to_path_buf();
        Self {
            // The admin kubeconfig is `<dir>/kubeconfig`.
            dir: kubeconfig_path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            api_server_url: env.api_server_url().to_string(),
            kubeconfig_path,
            kubectl: env.assets_dir().join("kubectl"),
        }
    }
}

/// Why this machine cannot run the real lane, if it cannot (checked without
/// building anything).
pub fn unsupported_reason() -> Option<String> {
    if !cfg!(target_os = "linux") {
        return Some("the real lane needs Linux".into());
    }
    if !effective_uid_is_root() {
        return Some(
            "the real lane needs root (kubelet, containerd and runc manage cgroups, mounts, network namespaces and iptables)".into(),
        );
    }
    let cgroup2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    if !cgroup2 && !Path::new("/sys/fs/cgroup/memory").is_dir() {
        return Some("the real lane needs cgroups (neither cgroup v2 nor the v1 memory controller is mounted)".into());
    }
    None
}

/// What finds a built folder of the lane without building it, e.g.
/// [`built_real_lane_assets`].
pub type BuiltFolder = fn() -> Result<PathBuf>;

/// Whether a real-lane test runs, by `KAPSA_REAL_LANE`:
/// - `1`: it runs (what is missing is built; on a machine that cannot run
///   the lane the test fails saying why);
/// - `0`: it is skipped;
/// - unset: it runs when the machine can run the lane and everything it
///   needs is already built (`built` lists what, e.g.
///   `("Traefik", traefik::built_traefik)`; nothing is built), and is
///   skipped otherwise, saying why and how to build.
///
/// A skipped test prints `<test>: skipped: …` and passes.
pub fn real_lane_test(test: &str, built: &[(&str, BuiltFolder)]) -> bool {
    match std::env::var("KAPSA_REAL_LANE").as_deref() {
        Ok("1") => {
            if let Some(reason) = unsupported_reason() {
                panic!("KAPSA_REAL_LANE=1, but {reason}");
            }
            return true;
        }
        Ok("0") => {
            println!("{test}: skipped: KAPSA_REAL_LANE=0");
            return false;
        }
        _ => {}
    }
    let skip = |why: String| {
        println!(
            "{test}: skipped: {why} (KAPSA_REAL_LANE=1 builds what is missing and runs it; docs/real-lane.md)"
        );
        false
    };
    if let Some(reason) = unsupported_reason() {
        return skip(reason);
    }
    for program in [RUNC, &format!("{CNI_BIN_DIR}/bridge")] {
        if !Path::new(program).exists() {
            return skip(format!("{program} is not installed"));
        }
    }
    for (what, find) in [(
        "the node's binaries",
        built_real_lane_assets as fn() -> Result<PathBuf>,
    )]
    .iter()
    .chain(built)
    {
        if let Err(error) = find() {
            return skip(format!("{what} are not built yet ({error})"));
        }
    }
    true
}

/// The lane's binaries: `KAPSA_REAL_LANE_ASSETS` if it holds all of them,
/// otherwise `hack/install-real-lane.sh` builds them (once per machine) and
/// prints the cache folder. The script exits 2 when the machine cannot run
/// the lane; that is an [`Error::Assets`] saying so.
pub fn find_real_lane_assets() -> Result<PathBuf> {
    real_lane_assets(false)
}

/// [`find_real_lane_assets`] that builds and installs nothing: an error
/// unless everything is there already.
pub fn built_real_lane_assets() -> Result<PathBuf> {
    real_lane_assets(true)
}

fn real_lane_assets(cached_only: bool) -> Result<PathBuf> {
    let script = std::env::var_os("KAPSA_INSTALL_REAL_LANE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/install-real-lane.sh")
        });
    crate::control_plane::installed_folder_with(
        std::env::var_os("KAPSA_REAL_LANE_ASSETS").map(PathBuf::from),
        &script,
        has_all_binaries,
        &format!("{REAL_LANE_BINARIES:?}"),
        Some("this machine cannot run the real lane"),
        cached_only,
    )
}

/// From `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            == Some("0")
    })
}

fn has_all_binaries(dir: &Path) -> bool {
    REAL_LANE_BINARIES.iter().all(|b| dir.join(b).is_file())
}

/// A file of an image built by [`RealNode::push_image`].
#[derive(Debug, Clone)]
pub struct ImageFile {
    /// Absolute path in the image, e.g. `/www/index.html`.
    pub path: String,
    pub contents: Vec<u8>,
    /// Permission bits, e.g. `0o755`.
    pub mode: u32,
}

impl ImageFile {
    pub fn new(path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            path: path.to_string(),
            contents: contents.into(),
            mode,
        }
    }
}

/// What the host looked like before the node started.
#[derive(Debug, Default)]
struct HostSnapshot {
    sysctls: Vec<(String, String)>,
    /// `(command, table)` → the lines of `<command> -t <table> -S`.
    iptables: BTreeMap<(String, String), BTreeSet<String>>,
    /// For each of [`HOST_PATHS`]: its entries, or `None` if it did not exist.
    paths: BTreeMap<String, Option<BTreeSet<String>>>,
    /// The mode of `/var/log/containers` (kubelet changes it to 0750).
    container_logs_mode: Option<u32>,
    /// The `/run/containerd/s` entries (shim sockets) before.
    shim_sockets: Option<BTreeSet<String>>,
}

/// A running real node and its registry. Stopped on drop.
pub struct RealNode {
    name: String,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    assets: PathBuf,
    cluster: ClusterAccess,
    registry: String,
    pause_image: String,
    containerd_socket: PathBuf,
    /// In start order: registry, containerd, kubelet.
    processes: Vec<ManagedProcess>,
    host: HostSnapshot,
    started: bool,
    stopped: bool,
}

impl std::fmt::Debug for RealNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealNode")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl RealNode {
    /// Starts the registry, containerd and kubelet, joins `cluster` as a node
    /// named after this host, and waits until the Node is Ready.
    /// `assets` is the folder of [`find_real_lane_assets`].
    pub async fn start(cluster: impl Into<ClusterAccess>, assets: &Path) -> Result<Self> {
        if let Some(reason) = unsupported_reason() {
            return Err(Error::Assets(reason));
        }
        for binary in REAL_LANE_BINARIES {
            if !assets.join(binary).is_file() {
                return Err(Error::Assets(format!(
                    "{} lacks {binary} (run hack/install-real-lane.sh)",
                    assets.display()
                )));
            }
        }
        for program in [RUNC, &format!("{CNI_BIN_DIR}/bridge")] {
            if !Path::new(program).exists() {
                return Err(Error::Assets(format!(
                    "{program} is missing (hack/install-real-lane.sh installs Debian's runc and containernetworking-plugins)"
                )));
            }
        }
        if let Some(existing) = kubepods_cgroups().first() {
            return Err(Error::Assets(format!(
                "{} exists: another kubelet runs on this machine, or a previous real node was killed without its teardown (hack/clean-real-lane.sh removes what it left)",
                existing.display()
            )));
        }
        let root = std::env::temp_dir().join("kapsa-testenv");
        std::fs::create_dir_all(&root)?;
        let temp = tempfile::Builder::new()
            .prefix(&format!("node-{}-", std::process::id()))
            .tempdir_in(&root)?;
        let dir = temp.path().to_path_buf();
        let mut node = Self {
            name: node_name(),
            containerd_socket: dir.join("containerd.sock"),
            dir,
            _temp: Some(temp),
            assets: assets.to_path_buf(),
            cluster: cluster.into(),
            registry: String::new(),
            pause_image: String::new(),
            processes: Vec::new(),
            host: HostSnapshot::default(),
            started: false,
            stopped: false,
        };
        node.host = HostSnapshot::take();
        node.started = true;
        // On error, `node` is dropped here: its teardown undoes what began.
        node.launch().await?;
        Ok(node)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The node's state folder (configuration, logs, containerd's root).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `10.89.0.1:<port>` ([`BRIDGE_GATEWAY`]), the plain-HTTP registry the
    /// node pulls from and build Pods push to.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The sandbox image, by digest.
    pub fn pause_image(&self) -> &str {
        &self.pause_image
    }

    /// Process ids of the registry, containerd and kubelet.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(ManagedProcess::pid).collect()
    }

    /// Builds a one-layer image of `files` (no base image) for linux/amd64
    /// with `entrypoint`, pushes it to the node's registry as `name:latest`,
    /// and returns `10.89.0.1:<port>/<name>@sha256:…`.
    pub fn push_image(
        &self,
        name: &str,
        files: &[ImageFile],
        entrypoint: &[&str],
    ) -> Result<String> {
        self.image_pusher().push(
            &format!("{}/{name}:latest", self.registry),
            files,
            entrypoint,
            None,
        )
    }

    /// The lane's "builds": until the guard is dropped, every kpack build
    /// whose tag is in this node's registry pushes a busybox httpd image
    /// (user 65534) serving `commit <revision>` at `/` and `ok` at
    /// `/healthz` on port 8080, and the simulator reports its real digest.
    pub fn build_commit_pages(&self) -> Result<crate::simulators::kpack::RealImages> {
        let pusher = self.image_pusher();
        let busybox = std::fs::read(self.assets.join("busybox"))?;
        Ok(crate::simulators::kpack::build_real_images(
            &self.registry,
            std::sync::Arc::new(move |tag: &str, _url: &str, revision: &str| {
                pusher
                    .push(
                        tag,
                        &[
                            ImageFile::new("/bin/busybox", busybox.clone(), 0o755),
                            ImageFile::new(
                                "/www/index.html",
                                format!("commit {revision}\n"),
                                0o644,
                            ),
                            ImageFile::new("/www/healthz", "ok", 0o644),
                        ],
                        &["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"],
                        Some("65534"),
                    )
                    .map_err(|e| e.to_string())
            }),
        ))
    }

    /// What pushes images to this node's registry, for use elsewhere (the
    /// kpack simulator's real builds in this lane).
    pub fn image_pusher(&self) -> ImagePusher {
        ImagePusher {
            assets: self.assets.clone(),
            dir: self.dir.clone(),
            registry: self.registry.clone(),
        }
    }

    /// [`push_image`](Self::push_image) with the image's user set, e.g.
    /// `65534` for pods that must run as non-root (Kapsa's app pods do).
    pub fn push_image_as(
        &self,
        name: &str,
        files: &[ImageFile],
        entrypoint: &[&str],
        user: &str,
    ) -> Result<String> {
        self.image_pusher().push(
            &format!("{}/{name}:latest", self.registry),
            files,
            entrypoint,
            Some(user),
        )
    }

    /// Checks that the registry, containerd and kubelet still run.
    pub fn ensure_running(&mut self) -> Result<()> {
        for p in &mut self.processes {
            p.ensure_running().map_err(Error::ProcessExited)?;
        }
        Ok(())
    }

    async fn launch(&mut self) -> Result<()> {
        let started = Instant::now();
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs)?;

        // The pods' bridge with the host's address on it, made now (the
        // bridge plugin takes it as it finds it) so that the registry can
        // listen there before the first pod.
        if !link_exists(BRIDGE) {
            run_checked(Command::new("ip").args(["link", "add", BRIDGE, "type", "bridge"]))?;
        }
        run_checked(Command::new("ip").args([
            "addr",
            "replace",
            &format!("{BRIDGE_GATEWAY}/24"),
            "dev",
            BRIDGE,
        ]))?;
        run_checked(Command::new("ip").args(["link", "set", BRIDGE, "up"]))?;

        // The registry, on the bridge's address: pods push to it (build
        // Jobs) and containerd pulls from it, by the same reference.
        let registry_port = TcpListener::bind((BRIDGE_GATEWAY, 0))?.local_addr()?.port();
        self.registry = format!("{BRIDGE_GATEWAY}:{registry_port}");
        let registry_config = self.dir.join("registry.yaml");
        std::fs::write(
            &registry_config,
            format!(
                "version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: {}
  delete:
    enabled: true
http:
  addr: {}
",
                self.dir.join("registry").display(),
                self.registry
            ),
        )?;
        self.spawn(
            "registry",
            &self.assets.join("registry"),
            // distribution v3 exports OpenTelemetry traces by default.
            &[("OTEL_TRACES_EXPORTER", "none".to_string())],
            &["serve".into(), registry_config.display().to_string()],
            &logs,
        )?;
        let url = format!("http://{}/v2/", self.registry);
        self.wait_until("the registry to answer", Duration::from_secs(30), || {
            http_get_status(&url) == Some(200)
        })
        .await?;

        // The sandbox ("pause") image, pinned by digest.
        let pause = std::fs::read(self.assets.join("pause"))?;
        let pause_image = self.push_image(
            "kapsa/pause",
            &[ImageFile::new("/pause", pause, 0o755)],
            &["/pause"],
        )?;
        self.pause_image = pause_image;
        tracing::info!(image = self.pause_image, "pause image pushed");

        // containerd.
        let cni_conf_dir = self.dir.join("cni/net.d");
        std::fs::create_dir_all(&cni_conf_dir)?;
        std::fs::write(
            cni_conf_dir.join("10-kapsa.conflist"),
            serde_json::to_string_pretty(&serde_json::json!({
                "cniVersion": "1.0.0",
                "name": CNI_NETWORK,
                "plugins": [
                    {
                        "type": "bridge",
                        "bridge": BRIDGE,
                        "isGateway": true,
                        // No masquerading: pods need no way out, and it would
                        // add iptables rules.
                        "ipMasq": false,
                        "hairpinMode": true,
                        "ipam": {
                            "type": "host-local",
                            "ranges": [[{"subnet": POD_SUBNET}]],
                            "routes": [{"dst": "0.0.0.0/0"}],
                            "dataDir": self.dir.join("cni/ipam"),
                        }
                    },
                    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": false}
                ]
            }))
            .map_err(|e| Error::Manifest(e.to_string()))?,
        )?;
        // plain HTTP for the lane's registry.
        let certs_d = self.dir.join("certs.d");
        let hosts_dir = certs_d.join(&self.registry);
        std::fs::create_dir_all(&hosts_dir)?;
        std::fs::write(
            hosts_dir.join("hosts.toml"),
            format!(
                "server = \"http://{r}\"\n\n[host.\"http://{r}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                r = self.registry
            ),
        )?;
        let containerd_config = self.dir.join("containerd.toml");
        std::fs::write(
            &containerd_config,
            self.containerd_toml(&cni_conf_dir, &certs_d),
        )?;
        let path_env = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.assets.display()
        );
        self.spawn(
            "containerd",
            &self.assets.join("containerd"),
            &[("PATH", path_env.clone())],
            &["--config".into(), containerd_config.display().to_string()],
            &logs,
        )?;
        let socket = self.containerd_socket.clone();
        self.wait_until("containerd's socket", Duration::from_secs(30), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        })
        .await?;
        let containerd_ready = started.elapsed();

        // The node's identity: `system:node:<name>` in `system:nodes`, a
        // certificate signed by the control plane's CA; the Node authorizer
        // and NodeRestriction limit it to its own Node and pods.
        let client = client_from_kubeconfig(&self.cluster.kubeconfig_path).await?;
        let user = format!("system:node:{}", self.name);
        let kubeconfig = user_kubeconfig(
            &self.cluster.dir,
            &self.cluster.api_server_url,
            &user,
            &["system:nodes"],
        )?;

        // kubelet, serving on the node's address with a certificate of the
        // cluster CA, so that the API server reaches it (`kubectl logs`).
        let node_ip = node_address()?;
        let ca_key = std::fs::read_to_string(
            self.cluster
                .dir
                .join("pki")
                .join(crate::control_plane::CA_KEY_FILE),
        )?;
        let (serving_cert, serving_key) = crate::pki::serving_certificate(
            &ca_key,
            std::slice::from_ref(&self.name),
            &[std::net::IpAddr::V4(node_ip)],
        )
        .map_err(|e| Error::Manifest(format!("the kubelet's serving certificate: {e}")))?;
        let kubelet_pki = self.dir.join("kubelet-pki");
        std::fs::create_dir_all(&kubelet_pki)?;
        std::fs::write(kubelet_pki.join("kubelet.crt"), serving_cert)?;
        std::fs::write(kubelet_pki.join("kubelet.key"), serving_key)?;
        let kubelet_config = self.dir.join("kubelet.yaml");
        std::fs::write(&kubelet_config, self.kubelet_yaml(node_ip, &kubelet_pki))?;
        self.spawn(
            "kubelet",
            &self.assets.join("kubelet"),
            &[("PATH", path_env)],
            &[
                format!("--config={}", kubelet_config.display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", self.dir.join("kubelet").display()),
                format!("--cert-dir={}", self.dir.join("kubelet/pki").display()),
                format!("--hostname-override={}", self.name),
                format!("--node-ip={node_ip}"),
                format!("--node-labels={REAL_NODE_LABEL}=true"),
                "--v=1".into(),
            ],
            &logs,
        )?;
        let kubelet_started = Instant::now();
        let nodes = Api::<Node>::all(client);
        let name = self.name.clone();
        self.wait_until_async(
            "the real node to be Ready",
            Duration::from_secs(120),
            || {
                let nodes = nodes.clone();
                let name = name.clone();
                async move {
                    nodes
                        .get_opt(&name)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|n| node_ready(&n))
                }
            },
        )
        .await?;
        tracing::info!(
            node = self.name,
            containerd_ready_ms = containerd_ready.as_millis() as u64,
            kubelet_to_ready_ms = kubelet_started.elapsed().as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            "real node ready"
        );
        Ok(())
    }

    fn containerd_toml(&self, cni_conf_dir: &Path, certs_d: &Path) -> String {
        let d = |p: &str| self.dir.join(p).display().to_string();
        format!(
            r#"version = 3
root = "{root}"
state = "{state}"
# Plugins that would touch host paths outside this folder, or that the lane
# does not use.
disabled_plugins = [
  "io.containerd.internal.v1.opt",
  "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.differ.v1.erofs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "info"

[plugins.'io.containerd.cri.v1.runtime']
  # No process here may lower its oom_score_adj (the VM withholds
  # CAP_SYS_RESOURCE even from root); runc fails on kubelet's -998 otherwise.
  restrict_oom_score_adj = true
  # Pod network namespaces under this folder, not /run/netns.
  netns_mounts_under_state_dir = true
  tolerate_missing_hugetlb_controller = true

[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["{cni_bin}"]
  conf_dir = "{cni_conf}"
  max_conf_num = 1

[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = "runc"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  BinaryName = "{runc}"
  Root = "{runc_root}"
  SystemdCgroup = false

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "{pause}"

[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = "{certs_d}"

[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
            root = d("containerd/root"),
            state = d("containerd/state"),
            socket = self.containerd_socket.display(),
            cni_bin = CNI_BIN_DIR,
            cni_conf = cni_conf_dir.display(),
            runc = RUNC,
            runc_root = d("runc"),
            pause = self.pause_image,
            certs_d = certs_d.display(),
        )
    }

    fn kubelet_yaml(&self, address: std::net::Ipv4Addr, serving: &Path) -> String {
        let pki = self.cluster.dir.join("pki");
        let cgroup_v1 = !Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine is cgroup v1 (hybrid) when true: kubelet 1.36 refuses v1 unless told.
failCgroupV1: {fail_cgroup_v1}
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://{socket}
address: {address}
port: {port}
tlsCertFile: {serving_cert}
tlsPrivateKeyFile: {serving_key}
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
registerNode: true
registerWithTaints:
- key: {taint}
  value: "true"
  effect: NoSchedule
podLogsDir: {pod_logs}
volumePluginDir: {volume_plugins}
failSwapOn: false
# The disk of a test machine is often nearly full: no disk-pressure evictions,
# no image garbage collection (memory.available only; the other signals are 0).
evictionHard:
  memory.available: "50Mi"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
nodeStatusUpdateFrequency: 2s
nodeStatusReportFrequency: 10s
syncFrequency: 10s
fileCheckFrequency: 10s
serializeImagePulls: false
maxPods: 50
"#,
            fail_cgroup_v1 = !cgroup_v1,
            socket = self.containerd_socket.display(),
            port = free_port().unwrap_or(10250),
            serving_cert = serving.join("kubelet.crt").display(),
            serving_key = serving.join("kubelet.key").display(),
            ca = pki.join("ca.crt").display(),
            taint = REAL_NODE_TAINT,
            pod_logs = self.dir.join("pod-logs").display(),
            volume_plugins = self.dir.join("volume-plugins").display(),
        )
    }

    fn spawn(
        &mut self,
        name: &str,
        program: &Path,
        env: &[(&str, String)],
        args: &[String],
        logs: &Path,
    ) -> Result<()> {
        // `env` sets the environment and execs the program (same process).
        let mut full = Vec::new();
        for (key, value) in env {
            full.push(format!("{key}={value}"));
        }
        full.push(program.display().to_string());
        full.extend_from_slice(args);
        let process = ManagedProcess::spawn(name, Path::new("/usr/bin/env"), &full, logs)?;
        self.processes.push(process);
        Ok(())
    }

    async fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> bool,
    ) -> Result<()> {
        self.wait_until_async(what, timeout, || std::future::ready(check()))
            .await
    }

    async fn wait_until_async<F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: F,
    ) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            if check().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let mut detail = what.to_string();
                if let Some(p) = self.processes.last() {
                    detail.push_str(&format!(
                        "\nlast lines of {}.log:\n{}",
                        p.name(),
                        log_tail(&self.dir.join("logs").join(format!("{}.log", p.name())), 30)
                    ));
                }
                return Err(Error::Timeout(timeout, detail));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops everything and puts the host back as it was (see the module
    /// documentation). Idempotent; also run on drop.
    pub fn stop(&mut self) {
        if self.stopped || !self.started {
            return;
        }
        self.stopped = true;
        let started = Instant::now();
        let grace = Duration::from_secs(5);
        let mut processes = std::mem::take(&mut self.processes);
        // kubelet first, so that it restarts nothing.
        if let Some(pos) = processes.iter().position(|p| p.name() == "kubelet") {
            let mut kubelet = processes.remove(pos);
            kubelet.terminate();
            kubelet.wait_or_kill(grace);
        }
        // Every pod process (in the kubepods cgroups), then the shims.
        kill_until_gone("pod processes", pod_processes);
        let socket = self.containerd_socket.display().to_string();
        kill_until_gone("containerd shims", || shim_processes(&socket));
        // containerd and the registry.
        while let Some(mut p) = processes.pop() {
            p.terminate();
            p.wait_or_kill(grace);
        }
        // The veths of the bridge vanish with their network namespaces.
        let veths = bridge_ports(BRIDGE);
        self.unmount_all();
        for veth in veths {
            run_quiet("ip", &["link", "delete", &veth]);
        }
        if link_exists(BRIDGE) {
            run_quiet("ip", &["link", "delete", BRIDGE]);
        }
        self.host.restore_iptables();
        remove_kubepods_cgroups();
        self.host.restore_paths();
        self.host.restore_sysctls();
        // The cluster side: the Node (its pods go with it, by the pod garbage
        // collector) and the RBAC binding.
        let cache_dir = format!("--cache-dir={}", self.dir.join("kubectl-cache").display());
        let kubectl = |args: &[&str]| {
            let mut full = vec![
                "--kubeconfig",
                self.cluster.kubeconfig_path.to_str().unwrap_or_default(),
                "--request-timeout=10s",
                // Not ~/.kube/cache.
                &cache_dir,
            ];
            full.extend_from_slice(args);
            let _ = Command::new(&self.cluster.kubectl)
                .args(&full)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        };
        kubectl(&[
            "delete",
            "node",
            &self.name,
            "--ignore-not-found",
            "--wait=false",
        ]);
        // The folder, unless something is still mounted in it (never follow
        // a mount while deleting).
        if !mounts_under(&self.dir).is_empty() {
            tracing::warn!(dir = %self.dir.display(), "mounts remain; keeping the folder");
            if let Some(temp) = self._temp.take() {
                let _ = temp.keep();
            }
        } else if let Some(temp) = self._temp.take() {
            let _ = temp.close();
        }
        tracing::info!(
            node = self.name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "real node stopped"
        );
    }

    /// Unmounts, deepest first, everything mounted under the node's folder
    /// (rootfs overlays, shm, network namespaces) and under `/run/containerd`
    /// or `/run/netns` when those did not exist before.
    fn unmount_all(&self) {
        let mut roots = vec![self.dir.clone()];
        for path in ["/run/containerd", "/run/netns"] {
            match self.host.paths.get(path) {
                Some(None) => roots.push(PathBuf::from(path)),
                Some(Some(before)) if path == "/run/netns" => {
                    // Only the namespaces that are new.
                    for entry in dir_entries(Path::new(path)).unwrap_or_default() {
                        if !before.contains(&entry) {
                            roots.push(Path::new(path).join(entry));
                        }
                    }
                }
                _ => {}
            }
        }
        for _ in 0..3 {
            let mut targets: Vec<PathBuf> = roots.iter().flat_map(|r| mounts_under(r)).collect();
            if targets.is_empty() {
                return;
            }
            // Deepest first.
            targets.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
            for target in targets {
                run_quiet("umount", &["-l", &target.display().to_string()]);
            }
        }
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        self.stop();
    }
}

impl HostSnapshot {
    fn take() -> Self {
        let mut snapshot = Self {
            sysctls: SYSCTLS
                .iter()
                .filter_map(|name| Some((name.to_string(), read_sysctl(name)?)))
                .collect(),
            ..Self::default()
        };
        for (command, table) in iptables_tables() {
            snapshot.iptables.insert(
                (command.clone(), table.clone()),
                iptables_rules(&command, &table),
            );
        }
        for path in HOST_PATHS {
            snapshot
                .paths
                .insert(path.to_string(), dir_entries(Path::new(path)));
        }
        snapshot.container_logs_mode = std::fs::metadata("/var/log/containers")
            .ok()
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()));
        snapshot.shim_sockets = dir_entries(Path::new("/run/containerd/s"));
        snapshot
    }

    fn restore_sysctls(&self) {
        for (name, value) in &self.sysctls {
            if read_sysctl(name).as_deref() != Some(value.as_str()) {
                let path = sysctl_path(name);
                if let Err(e) = std::fs::write(&path, value) {
                    tracing::warn!(name, value, error = %e, "could not restore a sysctl");
                }
            }
        }
    }

    /// Deletes the rules and chains that were not there before.
    fn restore_iptables(&self) {
        for ((command, table), before) in &self.iptables {
            let now = iptables_rules(command, table);
            let added: Vec<&String> = now.difference(before).collect();
            for rule in added.iter().filter(|r| r.starts_with("-A ")) {
                let mut args = vec!["-w", "-t", table.as_str(), "-D"];
                args.extend(rule["-A ".len()..].split_whitespace());
                run_quiet(command, &args);
            }
            for chain in added.iter().filter_map(|r| r.strip_prefix("-N ")) {
                run_quiet(command, &["-w", "-t", table, "-F", chain]);
                run_quiet(command, &["-w", "-t", table, "-X", chain]);
            }
        }
    }

    /// Removes what was created under [`HOST_PATHS`] (whole folders that did
    /// not exist, new entries of those that did).
    fn restore_paths(&self) {
        for (path, before) in &self.paths {
            let path = Path::new(path);
            match before {
                None => {
                    if path.exists() && mounts_under(path).is_empty() {
                        let _ = std::fs::remove_dir_all(path);
                    }
                }
                Some(before) if path == Path::new("/run/containerd") => {
                    // Only our shim sockets in /run/containerd/s.
                    let s = path.join("s");
                    for entry in dir_entries(&s).unwrap_or_default() {
                        let old = self
                            .shim_sockets
                            .as_ref()
                            .is_some_and(|b| b.contains(&entry));
                        if !old {
                            let _ = std::fs::remove_file(s.join(&entry));
                        }
                    }
                    if !before.contains("s") && dir_entries(&s).is_some_and(|e| e.is_empty()) {
                        let _ = std::fs::remove_dir(&s);
                    }
                }
                Some(before) if path == Path::new("/var/lib/cni") => {
                    // The CNI library's cached results of this network only.
                    let results = path.join("results");
                    for entry in dir_entries(&results).unwrap_or_default() {
                        if entry.starts_with(&format!("{CNI_NETWORK}-")) {
                            let _ = std::fs::remove_file(results.join(&entry));
                        }
                    }
                    if !before.contains("results")
                        && dir_entries(&results).is_some_and(|e| e.is_empty())
                    {
                        let _ = std::fs::remove_dir(&results);
                    }
                }
                Some(before) => {
                    for entry in dir_entries(path).unwrap_or_default() {
                        // In /run/netns, only the CNI namespaces.
                        let ours = path != Path::new("/run/netns") || entry.starts_with("cni-");
                        if ours && !before.contains(&entry) {
                            let full = path.join(&entry);
                            if mounts_under(&full).is_empty() {
                                let _ = std::fs::remove_file(&full)
                                    .or_else(|_| std::fs::remove_dir_all(&full));
                            }
                        }
                    }
                }
            }
        }
        if let Some(mode) = self.container_logs_mode {
            let _ = std::fs::set_permissions(
                "/var/log/containers",
                std::os::unix::fs::PermissionsExt::from_mode(mode),
            );
        }
    }
}

/// The node's name: this host's name when it is a valid node name (the API
/// server reaches a kubelet by its node's host name), otherwise
/// `kapsa-real-node`.
/// The node's address: the host's source address towards its default route
/// (kubelet refuses a loopback node IP). kubelet listens there and the Node
/// reports it as InternalIP, where the API server reaches it.
fn node_address() -> Result<std::net::Ipv4Addr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    // Connecting a UDP socket sends nothing; it only picks a route.
    let picked = socket
        .connect("203.0.113.1:9")
        .and_then(|()| socket.local_addr());
    match picked {
        Ok(std::net::SocketAddr::V4(address)) if !address.ip().is_loopback() => Ok(*address.ip()),
        other => Err(Error::Assets(format!(
            "the real node needs a non-loopback IPv4 address with a route (kubelet refuses a loopback node IP); found {other:?}"
        ))),
    }
}

fn node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    let valid = !host.is_empty()
        && host.len() <= 63
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && host.starts_with(|c: char| c.is_ascii_alphanumeric())
        && host.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        host
    } else {
        "kapsa-real-node".into()
    }
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The status code of a plain-HTTP GET (HTTP/1.0, no body read).
fn http_get_status(url: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = std::net::TcpStream::connect(host).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Builds and pushes a one-layer image with crane (see [`RealNode::push_image`]).
/// Pushes one-layer images (no base image, linux/amd64) to a real node's
/// registry; cheap to clone, usable from any thread.
#[derive(Clone, Debug)]
pub struct ImagePusher {
    assets: PathBuf,
    dir: PathBuf,
    registry: String,
}

impl ImagePusher {
    /// `10.89.0.1:<port>`: the registry pushed to.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Builds an image of `files` with `entrypoint` (and `user`, if given),
    /// pushes it as `reference` (`<registry>/<repository>:<tag>`, in this
    /// node's registry) and returns `<registry>/<repository>@sha256:…`.
    pub fn push(
        &self,
        reference: &str,
        files: &[ImageFile],
        entrypoint: &[&str],
        user: Option<&str>,
    ) -> Result<String> {
        let (_work, layer) = layer_of(&self.dir, files)?;
        self.push_layer(reference, &layer, entrypoint, user, &[])
    }

    /// Pushes a one-layer image of the tar file `layer` (owners and modes
    /// as they are in it) as `reference`, with `entrypoint`, `user` and
    /// the `env` variables; returns `<registry>/<repository>@sha256:…`.
    pub fn push_layer(
        &self,
        reference: &str,
        layer: &Path,
        entrypoint: &[&str],
        user: Option<&str>,
        env: &[(String, String)],
    ) -> Result<String> {
        let repository = reference
            .strip_prefix(&format!("{}/", self.registry))
            .ok_or_else(|| {
                Error::Manifest(format!(
                    "{reference:?} is not in registry {}",
                    self.registry
                ))
            })?;
        let repository = repository
            .rsplit_once(':')
            .map_or(repository, |(repository, _)| repository);
        let crane = self.assets.join("crane");
        run_checked(
            Command::new(&crane)
                .args(["append", "--oci-empty-base", "--insecure", "-f"])
                .arg(layer)
                .args(["-t", reference]),
        )?;
        let mut mutate = Command::new(&crane);
        mutate.args([
            "mutate",
            "--insecure",
            reference,
            "--set-platform",
            "linux/amd64",
            "-t",
            reference,
        ]);
        if !entrypoint.is_empty() {
            mutate.args(["--entrypoint", &entrypoint.join(",")]);
        }
        if let Some(user) = user {
            mutate.args(["--user", user]);
        }
        for (name, value) in env {
            mutate.args(["--env", &format!("{name}={value}")]);
        }
        run_checked(&mut mutate)?;
        let digest = run_checked(Command::new(&crane).args(["digest", "--insecure", reference]))?;
        Ok(format!("{}/{repository}@{}", self.registry, digest.trim()))
    }
}

/// A one-layer tar of `files` (owned by root), in a temporary folder under
/// `dir` that goes when the returned guard is dropped.
fn layer_of(dir: &Path, files: &[ImageFile]) -> Result<(tempfile::TempDir, PathBuf)> {
    let work = tempfile::Builder::new().prefix("image-").tempdir_in(dir)?;
    let root = work.path().join("root");
    for file in files {
        let relative = file.path.trim_start_matches('/');
        if relative.is_empty() || relative.split('/').any(|c| c == "..") {
            return Err(Error::Manifest(format!("bad image path {:?}", file.path)));
        }
        let path = root.join(relative);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, &file.contents)?;
        std::fs::set_permissions(
            &path,
            std::os::unix::fs::PermissionsExt::from_mode(file.mode),
        )?;
    }
    std::fs::create_dir_all(&root)?;
    let layer = work.path().join("layer.tar");
    run_checked(
        Command::new("tar")
            .args(["--numeric-owner", "--owner=0", "--group=0", "--sort=name"])
            .arg("--mtime=@0")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&layer)
            .arg("."),
    )?;
    Ok((work, layer))
}

/// Runs a command to completion; its stdout, or an error with its stderr.
fn run_checked(command: &mut Command) -> Result<String> {
    let output = command.stdin(Stdio::null()).output()?;
    if !output.status.success() {
        return Err(Error::ProcessExited(format!(
            "{command:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a command, ignoring its outcome (teardown steps).
fn run_quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn sysctl_path(name: &str) -> PathBuf {
    Path::new("/proc/sys").join(name.replace('.', "/"))
}

pub fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(sysctl_path(name))
        .ok()
        .map(|v| v.trim().to_string())
}

/// The (command, table) pairs whose rules are recorded: IPv4 and IPv6,
/// filter, nat and mangle (kubelet's canary chains go in each).
fn iptables_tables() -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    for command in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            pairs.push((command.to_string(), table.to_string()));
        }
    }
    pairs
}

/// `<command> -t <table> -S`, one line each; empty if it cannot run.
pub fn iptables_rules(command: &str, table: &str) -> BTreeSet<String> {
    Command::new(command)
        .args(["-w", "-t", table, "-S"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn dir_entries(path: &Path) -> Option<BTreeSet<String>> {
    let entries = std::fs::read_dir(path).ok()?;
    Some(
        entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
    )
}

/// Mount points at or under `root`, from `/proc/self/mounts`.
pub fn mounts_under(root: &Path) -> Vec<PathBuf> {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return Vec::new();
    };
    mounts
        .lines()
        .filter_map(|line| line.split(' ').nth(1))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(root))
        .collect()
}

/// `/proc/mounts` writes space, tab, newline and backslash as octal escapes.
fn unescape_mount_path(field: &str) -> PathBuf {
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = (0..3).filter_map(|_| chars.next()).collect();
            match u8::from_str_radix(&code, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&code);
                }
            }
        } else {
            out.push(c);
        }
    }
    PathBuf::from(out)
}

/// Every `kubepods` cgroup (one per v1 hierarchy, or the v2 one).
pub fn kubepods_cgroups() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut found = Vec::new();
    for candidate in std::iter::once(root.to_path_buf()).chain(
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path()),
    ) {
        for name in ["kubepods", "kubepods.slice"] {
            let path = candidate.join(name);
            if path.is_dir() {
                found.push(path);
            }
        }
    }
    found
}

/// Removes the kubepods cgroup trees, deepest first (a cgroup is removed
/// with `rmdir`, and only once it has no processes and no children).
fn remove_kubepods_cgroups() {
    for attempt in 0..50 {
        let mut dirs = Vec::new();
        for top in kubepods_cgroups() {
            collect_dirs(&top, &mut dirs);
        }
        if dirs.is_empty() {
            return;
        }
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in &dirs {
            let _ = std::fs::remove_dir(dir);
        }
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    tracing::warn!(left = ?kubepods_cgroups(), "kubepods cgroups remain");
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}

/// Processes in a `kubepods` cgroup: pod containers and sandboxes.
pub fn pod_processes() -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|c| c.lines().any(|l| l.contains("/kubepods")))
        })
        .collect()
}

/// containerd shims serving the containerd at `socket`.
fn shim_processes(socket: &str) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"))
                && args.contains(&socket.as_bytes())
        })
        .collect()
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// SIGKILLs what `find` returns until it returns nothing (up to 10 s).
fn kill_until_gone(what: &str, mut find: impl FnMut() -> Vec<i32>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = find();
        if pids.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            tracing::warn!(what, ?pids, "processes survive SIGKILL");
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// The interfaces enslaved to `bridge`.
fn bridge_ports(bridge: &str) -> Vec<String> {
    dir_entries(&Path::new("/sys/class/net").join(bridge).join("brif"))
        .map(|e| e.into_iter().collect())
        .unwrap_or_default()
}

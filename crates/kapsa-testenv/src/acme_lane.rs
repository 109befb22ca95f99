//! The real lane's certificates: real cert-manager (its controller, run
//! outside the cluster against the kubeconfig) obtaining certificates from
//! Pebble, the ACME test server, by HTTP-01 through the lane's ingress
//! controller. Built by `hack/install-cert-manager.sh`.
//!
//! How a challenge is solved, with no DNS and no public address:
//! - the lane has a loopback address of its own ([`lane_address`], e.g.
//!   `127.0.83.1`) on which Traefik listens on ports 80 and 443;
//! - `pebble-challtestsrv` is a DNS server answering every A query with that
//!   address; Pebble resolves hosts through it and connects to port 80 to
//!   validate (no `PEBBLE_VA_ALWAYS_VALID`: validation is real), and so does
//!   cert-manager's self-check (`--acme-http01-solver-nameservers`);
//! - cert-manager's HTTP-01 solver runs as a pod on the real node, from an
//!   image of cert-manager's own `acmesolver` pushed to the lane's registry,
//!   behind an Ingress of class `traefik` that cert-manager makes.
//!
//! The ClusterIssuer [`CLUSTER_ISSUER`] (`pebble`) trusts Pebble's directory
//! through its `caBundle`; certificates Pebble issues chain to Pebble's
//! root, written to [`AcmeLane::acme_ca`] (`KAPSA_ACME_CA`). The cert-manager
//! simulator leaves alone every ClusterIssuer labelled
//! [`REAL_CERT_MANAGER_LABEL`], and the Certificates and Ingresses that name
//! one.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::json;

use crate::control_plane::{Error, Result};
use crate::http_get::{TlsRoots, get};
use crate::process::{ManagedProcess, log_tail};
use crate::real_node::{ImageFile, ImagePusher, REAL_NODE_LABEL, real_node_toleration};

/// The ClusterIssuer the lane makes (scripts and DomainPools name it).
pub const CLUSTER_ISSUER: &str = "pebble";
/// Label of ClusterIssuers served by a real cert-manager: the simulator
/// leaves them, their Certificates and their Ingresses alone.
pub const REAL_CERT_MANAGER_LABEL: &str = "kapsa-testenv.kapsa.dev/real-cert-manager";
/// Namespace of the ClusterIssuer's ACME account key (cert-manager's
/// cluster resource namespace).
pub const NAMESPACE: &str = "kapsa-lane";
const FIELD_MANAGER: &str = "kapsa-testenv";
/// The binaries and CRDs `hack/install-cert-manager.sh` puts in its folder.
pub const BINARIES: [&str; 4] = [
    "cert-manager-controller",
    "acmesolver",
    "pebble",
    "pebble-challtestsrv",
];

/// Where cert-manager and Pebble are: `KAPSA_CERT_MANAGER` if it holds
/// them, otherwise `hack/install-cert-manager.sh` builds them (once per
/// machine) and prints the cache folder.
pub fn find_cert_manager() -> Result<PathBuf> {
    folder(false)
}

/// [`find_cert_manager`] that builds nothing: an error unless it is built.
pub fn built_cert_manager() -> Result<PathBuf> {
    folder(true)
}

fn folder(cached_only: bool) -> Result<PathBuf> {
    crate::control_plane::installed_folder_with(
        std::env::var_os("KAPSA_CERT_MANAGER").map(PathBuf::from),
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/install-cert-manager.sh"),
        |dir| {
            BINARIES.iter().all(|b| dir.join(b).is_file())
                && dir.join("crds/crd-certificates.yaml").is_file()
        },
        "cert-manager",
        None,
        cached_only,
    )
}

/// A loopback address of the lane's own (`127.0.<n>.1`) whose ports 80 and
/// 443 are free: Pebble validates HTTP-01 on port 80 of the address its DNS
/// gives, so the ingress controller listens there.
pub fn lane_address() -> Result<Ipv4Addr> {
    let start = std::process::id() % 200;
    for i in 0..200 {
        let ip = Ipv4Addr::new(127, 0, (50 + (start + i) % 200) as u8, 1);
        let free = [80u16, 443]
            .iter()
            .all(|port| TcpListener::bind((ip, *port)).is_ok());
        if free {
            return Ok(ip);
        }
    }
    Err(Error::Assets(
        "no loopback address 127.0.<n>.1 with ports 80 and 443 free".into(),
    ))
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// What the lane's cert-manager needs of the cluster and the node.
#[derive(Debug, Clone)]
pub struct AcmeLaneOptions {
    /// The admin kubeconfig cert-manager's controller uses.
    pub kubeconfig: PathBuf,
    /// The folder of [`find_cert_manager`].
    pub folder: PathBuf,
    /// Where its files and logs go.
    pub dir: PathBuf,
    /// The lane's address ([`lane_address`]): DNS answers it for every host.
    pub ingress_address: Ipv4Addr,
    /// The IngressClass of the solver's Ingresses.
    pub ingress_class: String,
    /// Pushes the solver's image to the registry the real node pulls from.
    pub images: ImagePusher,
}

/// Pebble, its DNS server and cert-manager's controller; stopped on drop.
pub struct AcmeLane {
    processes: Vec<ManagedProcess>,
    acme_ca: PathBuf,
    directory: String,
    dir: PathBuf,
}

impl std::fmt::Debug for AcmeLane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcmeLane")
            .field("directory", &self.directory)
            .field("acme_ca", &self.acme_ca)
            .finish_non_exhaustive()
    }
}

impl AcmeLane {
    /// Starts the DNS server and Pebble, installs cert-manager's CRDs (in
    /// place of the simulator's), pushes the solver image, makes the
    /// ClusterIssuer `pebble` and starts cert-manager's controller; returns
    /// once the ClusterIssuer is Ready (its ACME account registered with
    /// Pebble).
    pub async fn start(client: &Client, options: AcmeLaneOptions) -> Result<Self> {
        let AcmeLaneOptions {
            kubeconfig,
            folder,
            dir,
            ingress_address,
            ingress_class,
            images,
        } = options;
        std::fs::create_dir_all(&dir)?;
        let logs = dir.join("logs");
        let mut lane = Self {
            processes: Vec::new(),
            acme_ca: dir.join("acme-ca.pem"),
            directory: String::new(),
            dir: dir.clone(),
        };

        // DNS: every A query answered with the lane's address.
        let dns = format!("127.0.0.1:{}", free_port()?);
        lane.processes.push(ManagedProcess::spawn(
            "pebble-challtestsrv",
            &folder.join("pebble-challtestsrv"),
            &[
                format!("-dnsserver={dns}"),
                format!("-management=127.0.0.1:{}", free_port()?),
                format!("-defaultIPv4={ingress_address}"),
                "-defaultIPv6=".into(),
                "-http01=".into(),
                "-https01=".into(),
                "-tlsalpn01=".into(),
                "-doh=".into(),
            ],
            &logs,
        )?);

        // Pebble, serving its directory over TLS with a certificate of ours.
        let (cert, key) = crate::pki::self_signed_certificate(&["127.0.0.1".to_string()])
            .map_err(|e| Error::Manifest(format!("Pebble's certificate: {e}")))?;
        std::fs::write(dir.join("pebble.crt"), &cert)?;
        std::fs::write(dir.join("pebble.key"), &key)?;
        let listen = format!("127.0.0.1:{}", free_port()?);
        let management = format!("127.0.0.1:{}", free_port()?);
        let config = json!({"pebble": {
            "listenAddress": listen,
            "managementListenAddress": management,
            "certificate": dir.join("pebble.crt"),
            "privateKey": dir.join("pebble.key"),
            "httpPort": 80,
            "tlsPort": 443,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        }});
        std::fs::write(dir.join("pebble.json"), config.to_string())?;
        lane.processes.push(ManagedProcess::spawn_with_env(
            "pebble",
            &folder.join("pebble"),
            &[
                "-config".into(),
                dir.join("pebble.json").display().to_string(),
                format!("-dnsserver={dns}"),
            ],
            // No random validation delay, no nonces refused at random: the
            // lane is about Kapsa, not about ACME clients' retries.
            &[("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "0")],
            &logs,
        )?);
        lane.directory = format!("https://{listen}/dir");
        let ours = TlsRoots::from_pem(cert.as_bytes())?;
        let root = lane
            .wait_for("Pebble's root certificate", Duration::from_secs(30), || {
                let ours = ours.clone();
                let management = management.clone();
                async move {
                    get(&management, "127.0.0.1", "/roots/0", Some(&ours))
                        .await
                        .ok()
                        .filter(|(status, body)| *status == 200 && body.contains("BEGIN"))
                        .map(|(_, body)| body)
                }
            })
            .await?;
        std::fs::write(&lane.acme_ca, &root)?;

        // cert-manager's own CRDs in place of the simulator's subsets (the
        // same field manager, so fields only the subsets had are dropped).
        let mut crds = Vec::new();
        let mut files: Vec<_> = std::fs::read_dir(folder.join("crds"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        files.sort();
        for file in files {
            crds.extend(crate::crds::parse_crds(&std::fs::read_to_string(file)?)?);
        }
        crate::crds::install_crds(client, &crds, crate::simulators::FIELD_MANAGER).await?;

        // The HTTP-01 solver's image: cert-manager's acmesolver, non-root.
        let solver = images.push(
            &format!("{}/cert-manager-acmesolver:v1.11.5", images.registry()),
            &[ImageFile::new(
                "/acmesolver",
                std::fs::read(folder.join("acmesolver"))?,
                0o755,
            )],
            &["/acmesolver"],
            Some("65534"),
        )?;

        let apply = PatchParams::apply(FIELD_MANAGER).force();
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .patch(
                NAMESPACE,
                &apply,
                &Patch::Apply(json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": NAMESPACE}})),
            )
            .await?;
        let issuers = Api::<DynamicObject>::all_with(
            client.clone(),
            &kapsa_api::external::cert_manager_cluster_issuer(),
        );
        use base64::Engine as _;
        issuers
            .patch(
                CLUSTER_ISSUER,
                &apply,
                &Patch::Apply(json!({
                    "apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer",
                    "metadata": {"name": CLUSTER_ISSUER, "labels": {REAL_CERT_MANAGER_LABEL: "true"}},
                    "spec": {"acme": {
                        "server": lane.directory,
                        "caBundle": base64::engine::general_purpose::STANDARD.encode(&cert),
                        "email": "lane@kapsa.test",
                        "privateKeySecretRef": {"name": "pebble-account"},
                        "solvers": [{"http01": {"ingress": {
                            "class": ingress_class,
                            "podTemplate": {"spec": {
                                "nodeSelector": {REAL_NODE_LABEL: "true"},
                                "tolerations": [real_node_toleration()]
                            }}
                        }}}]
                    }}
                })),
            )
            .await?;

        lane.processes.push(ManagedProcess::spawn(
            "cert-manager-controller",
            &folder.join("cert-manager-controller"),
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--cluster-resource-namespace={NAMESPACE}"),
                "--leader-elect=false".into(),
                format!("--acme-http01-solver-image={solver}"),
                format!("--acme-http01-solver-nameservers={dns}"),
                format!("--metrics-listen-address=127.0.0.1:{}", free_port()?),
                // A certificate's Secret goes with its Certificate.
                "--enable-certificate-owner-ref=true".into(),
                "--v=2".into(),
            ],
            &logs,
        )?);
        let issuers = &issuers;
        lane.wait_for(
            "the ClusterIssuer pebble Ready (ACME account registered)",
            Duration::from_secs(60),
            || async move {
                let issuer = issuers.get(CLUSTER_ISSUER).await.ok()?;
                issuer.data["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    .then_some(())
            },
        )
        .await?;
        Ok(lane)
    }

    /// Pebble's root certificate (PEM): what certificates it issued chain to.
    pub fn acme_ca(&self) -> &Path {
        &self.acme_ca
    }

    /// Pebble's ACME directory URL.
    pub fn directory(&self) -> &str {
        &self.directory
    }

    /// cert-manager's controller log.
    pub fn controller_log(&self) -> PathBuf {
        self.dir.join("logs/cert-manager-controller.log")
    }

    /// Process ids of the DNS server, Pebble and cert-manager.
    pub fn pids(&self) -> Vec<u32> {
        self.processes.iter().map(ManagedProcess::pid).collect()
    }

    /// Checks that every process still runs.
    pub fn ensure_running(&mut self) -> Result<()> {
        for p in &mut self.processes {
            p.ensure_running().map_err(Error::ProcessExited)?;
        }
        Ok(())
    }

    /// Stops cert-manager, Pebble and the DNS server.
    pub fn stop(&mut self) {
        for p in self.processes.iter_mut().rev() {
            p.wait_or_kill(Duration::from_secs(5));
        }
    }

    async fn wait_for<T, F, Fut>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut probe: F,
    ) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(value) = probe().await {
                return Ok(value);
            }
            // A process that exited says so with the end of its log.
            self.ensure_running()?;
            if Instant::now() > deadline {
                let log = self.controller_log();
                return Err(Error::Timeout(
                    timeout,
                    format!("{what}; cert-manager's log ends:\n{}", log_tail(&log, 20)),
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for AcmeLane {
    fn drop(&mut self) {
        self.stop();
    }
}

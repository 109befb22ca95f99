//! The real lane's ingress controller: Traefik (built from its Go module by
//! `hack/install-traefik.sh`), run outside the cluster against the local
//! control plane, routing the cluster's Ingresses of class `traefik` to pod
//! IPs (the real node's bridge is reachable from the host) on ports 80
//! (`web`) and 443 (`websecure`, serving the certificates of the Ingresses'
//! TLS Secrets) of the lane's loopback address
//! ([`crate::acme_lane::lane_address`]).
//!
//! Traefik reads the cluster as the ServiceAccount `kapsa-lane/traefik`,
//! with the read rights its Kubernetes Ingress provider documents (and
//! Ingress status), through a token from the TokenRequest API.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::networking::v1::IngressClass;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::control_plane::{Error, Result};
use crate::process::ManagedProcess;

/// The IngressClass Traefik serves in the lane.
pub const INGRESS_CLASS: &str = "traefik";
/// Traefik's IngressClass controller name.
pub const CONTROLLER: &str = "traefik.io/ingress-controller";
/// The GatewayClass Traefik serves when its Gateway API provider is on.
pub const GATEWAY_CLASS: &str = "traefik";
/// Traefik's Gateway API controller name.
pub const GATEWAY_CONTROLLER: &str = "traefik.io/gateway-controller";
/// Namespace of Traefik's ServiceAccount.
pub const NAMESPACE: &str = "kapsa-lane";
const SERVICE_ACCOUNT: &str = "traefik";
const FIELD_MANAGER: &str = "kapsa-testenv";

/// Where Traefik's binary is: `KAPSA_TRAEFIK` if it holds it, otherwise
/// `hack/install-traefik.sh` builds it (once per machine) and prints the
/// cache folder.
pub fn find_traefik() -> Result<PathBuf> {
    traefik_folder(false)
}

/// [`find_traefik`] that builds nothing: an error unless it is built.
pub fn built_traefik() -> Result<PathBuf> {
    traefik_folder(true)
}

fn traefik_folder(cached_only: bool) -> Result<PathBuf> {
    crate::control_plane::installed_folder_with(
        std::env::var_os("KAPSA_TRAEFIK").map(PathBuf::from),
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../hack/install-traefik.sh"),
        |dir| dir.join("traefik").is_file(),
        "traefik",
        None,
        cached_only,
    )
}

/// A running Traefik; stopped on drop.
pub struct Traefik {
    process: ManagedProcess,
    http: String,
    https: String,
    dir: PathBuf,
}

impl std::fmt::Debug for Traefik {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traefik")
            .field("http", &self.http)
            .field("https", &self.https)
            .field("pid", &self.process.pid())
            .finish()
    }
}

impl Traefik {
    /// Starts Traefik for the cluster at `api_server_url` (whose CA is
    /// `ca_file`), with its binary in `folder`, logs and files in `dir`.
    /// Makes its ServiceAccount, RBAC and the IngressClass, and waits until
    /// it listens. With `gateway_api` (Gateway API's CRDs must be served)
    /// its Gateway API provider runs too, for the GatewayClass `traefik`
    /// (made here): a Gateway listener must use port 80 (plain HTTP) or 443.
    /// It listens on `address` ([`crate::acme_lane::lane_address`]).
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        client: &Client,
        api_server_url: &str,
        ca_file: &Path,
        folder: &Path,
        dir: &Path,
        gateway_api: bool,
        address: std::net::Ipv4Addr,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let token = service_account_token(client, gateway_api).await?;
        let http = format!("{address}:80");
        let https = format!("{address}:443");
        let provider = "--providers.kubernetesingress";
        let args = vec![
            format!("--entrypoints.web.address={http}"),
            format!("--entrypoints.websecure.address={https}"),
            // Every router on websecure serves TLS, with the certificate of
            // the Ingresses' TLS Secrets that matches the SNI name.
            "--entrypoints.websecure.http.tls=true".to_string(),
            format!("{provider}=true"),
            format!("{provider}.endpoint={api_server_url}"),
            format!("{provider}.token={token}"),
            format!("{provider}.certauthfilepath={}", ca_file.display()),
            format!("{provider}.ingressclass={INGRESS_CLASS}"),
            "--log.level=INFO".to_string(),
        ];
        let mut args = args;
        if gateway_api {
            let provider = "--providers.kubernetesgateway";
            args.extend([
                format!("{provider}=true"),
                format!("{provider}.endpoint={api_server_url}"),
                format!("{provider}.token={token}"),
                format!("{provider}.certauthfilepath={}", ca_file.display()),
            ]);
        }
        let process = ManagedProcess::spawn("traefik", &folder.join("traefik"), &args, dir)?;
        let mut traefik = Self {
            process,
            http,
            https,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(&traefik.http).is_err()
            || TcpStream::connect(&traefik.https).is_err()
        {
            traefik
                .process
                .ensure_running()
                .map_err(Error::ProcessExited)?;
            if Instant::now() > deadline {
                return Err(Error::Timeout(
                    Duration::from_secs(30),
                    format!("Traefik to listen on {}", traefik.http),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(traefik)
    }

    /// `<lane address>:80`: Traefik's plain-HTTP entry point.
    pub fn http_address(&self) -> &str {
        &self.http
    }

    /// `<lane address>:443`: Traefik's HTTPS entry point.
    pub fn https_address(&self) -> &str {
        &self.https
    }

    /// Its log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("traefik.log")
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Stops Traefik (SIGTERM, then SIGKILL after a grace period).
    pub fn stop(&mut self) {
        self.process.wait_or_kill(Duration::from_secs(5));
    }
}

impl Drop for Traefik {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The ServiceAccount, its read rights and the IngressClass; a token for it.
async fn service_account_token(client: &Client, gateway_api: bool) -> Result<String> {
    let apply = PatchParams::apply(FIELD_MANAGER).force();
    Api::<Namespace>::all(client.clone())
        .patch(
            NAMESPACE,
            &apply,
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
            ),
        )
        .await?;
    Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .patch(
            SERVICE_ACCOUNT,
            &apply,
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ServiceAccount",
                "metadata": {"name": SERVICE_ACCOUNT, "namespace": NAMESPACE}})),
        )
        .await?;
    let role = "kapsa-lane-traefik";
    Api::<ClusterRole>::all(client.clone())
        .patch(
            role,
            &apply,
            &Patch::Apply(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                "metadata": {"name": role},
                "rules": [
                    {"apiGroups": [""], "resources": ["services", "secrets", "nodes"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
                    {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "ingressclasses"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses/status"], "verbs": ["update"]},
                    {"apiGroups": [""], "resources": ["namespaces", "configmaps"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["*"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["*/status"], "verbs": ["update", "patch"]}
                ]})),
        )
        .await?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            role,
            &apply,
            &Patch::Apply(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                "metadata": {"name": role},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                "subjects": [{"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}]})),
        )
        .await?;
    Api::<IngressClass>::all(client.clone())
        .patch(
            INGRESS_CLASS,
            &apply,
            &Patch::Apply(
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
                "metadata": {"name": INGRESS_CLASS}, "spec": {"controller": CONTROLLER}}),
            ),
        )
        .await?;
    if gateway_api {
        let classes = Api::<kube::api::DynamicObject>::all_with(
            client.clone(),
            &kapsa_api::external::gateway_gateway_class(),
        );
        classes
            .patch(
                GATEWAY_CLASS,
                &apply,
                &Patch::Apply(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
                    "metadata": {"name": GATEWAY_CLASS}, "spec": {"controllerName": GATEWAY_CONTROLLER}})),
            )
            .await?;
    }
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"expirationSeconds": 86400}
    }))
    .map_err(|e| Error::Manifest(e.to_string()))?;
    let issued: TokenRequest = Api::<ServiceAccount>::namespaced(client.clone(), NAMESPACE)
        .create_subresource("token", SERVICE_ACCOUNT, &PostParams::default(), &request)
        .await?;
    issued
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Error::Manifest("TokenRequest returned no token".into()))
}

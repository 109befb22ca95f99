//! Shared set-up of the operator's integration tests: the real control plane
//! with Kapsa's CRDs, platform objects (pool, registry, builder, issuer), git
//! repositories on loopback, and polling helpers.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kapsa_operator::metrics::Metrics;
use kapsa_operator::{OperatorConfig, run};
use kapsa_testenv::TestEnv;
use kapsa_testenv::simulators::cert_manager::cluster_issuer_resource;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub const TIMEOUT: Duration = Duration::from_secs(90);
/// Namespace of the registry credentials (as a platform team would keep them).
pub const PLATFORM_NAMESPACE: &str = "kapsa-system";

/// The control plane with Kapsa's CRDs and platform basics installed.
pub async fn cluster() -> (&'static TestEnv, Client) {
    // RUST_LOG=kapsa_operator=debug shows the operator's logs in test output.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let env = kapsa_testenv::shared().await;
    let client = env.client().await;
    static SETUP: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SETUP
        .get_or_init(|| async {
            let crds = kapsa_testenv::crds::parse_crds(&kapsa_api::crds_yaml()).expect("CRDs");
            kapsa_testenv::crds::install_crds(&client, &crds, "kapsa").await.expect("CRDs installed");
            create_ignoring_conflict(&Api::<Namespace>::all(client.clone()), json!({"metadata": {"name": PLATFORM_NAMESPACE}})).await;
            let builders: Api<DynamicObject> = Api::all_with(client.clone(), &cluster_builder_resource());
            create_ignoring_conflict(
                &builders,
                json!({"apiVersion": "kpack.io/v1alpha2", "kind": "ClusterBuilder", "metadata": {"name": "default"},
                    "spec": {"tag": "registry.example/builders/default"}}),
            )
            .await;
        })
        .await;
    (env, client)
}

/// An operator for the whole test binary, on a thread of its own (each
/// `#[tokio::test]` has its own runtime). Returns its metrics.
pub async fn shared_operator() -> Arc<Metrics> {
    let (env, _) = cluster().await;
    static OPERATOR: tokio::sync::OnceCell<Arc<Metrics>> = tokio::sync::OnceCell::const_new();
    OPERATOR
        .get_or_init(|| async {
            let metrics = Arc::new(Metrics::default());
            let for_thread = metrics.clone();
            let kubeconfig = env.kubeconfig_path().to_path_buf();
            std::thread::Builder::new()
                .name("kapsa-operator".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        let client = kapsa_testenv::client_from_kubeconfig(&kubeconfig)
                            .await
                            .unwrap();
                        run(
                            client,
                            OperatorConfig::default(),
                            for_thread,
                            futures::future::pending(),
                        )
                        .await
                        .unwrap();
                    });
                })
                .unwrap();
            metrics
        })
        .await
        .clone()
}

/// Starts an operator in the caller's runtime; it stops when `stop` completes.
pub fn operator_until(
    client: Client,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) -> (Arc<Metrics>, tokio::task::JoinHandle<()>) {
    let metrics = Arc::new(Metrics::default());
    let for_task = metrics.clone();
    let handle = tokio::spawn(async move {
        run(client, OperatorConfig::default(), for_task, stop)
            .await
            .unwrap();
    });
    (metrics, handle)
}

pub fn cluster_builder_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        "kpack.io",
        "v1alpha2",
        "ClusterBuilder",
    ))
}

pub async fn create_ignoring_conflict<K>(api: &Api<K>, value: Value)
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("a valid object");
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("create failed: {e}"),
    }
}

pub async fn create<K>(api: &Api<K>, value: Value) -> K
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("a valid object");
    api.create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("create failed: {e}"))
}

/// Polls `check` until it returns `Some`, or fails the test after [`TIMEOUT`].
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    kapsa_testenv::wait::eventually(TIMEOUT, what, check).await
}

/// The platform objects of one test: a ClusterIssuer, a ClusterRegistry with
/// credentials and a DomainPool, all named after `id`.
pub struct Platform {
    pub pool: String,
    pub base: String,
    pub issuer: String,
    pub registry: String,
    pub registry_server: String,
}

pub async fn platform(client: &Client, id: &str, challenge: &str, dns01_issuer: bool) -> Platform {
    let issuer = format!("{id}-issuer");
    let solver = if dns01_issuer {
        json!({"dns01": {"webhook": {}}})
    } else {
        json!({"http01": {"ingress": {}}})
    };
    create_ignoring_conflict(
        &Api::<DynamicObject>::all_with(client.clone(), &cluster_issuer_resource()),
        json!({"apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer", "metadata": {"name": issuer},
            "spec": {"acme": {"server": "https://acme.example/directory", "solvers": [solver]}}}),
    )
    .await;
    let secret_name = format!("{id}-push");
    create_ignoring_conflict(
        &Api::<Secret>::namespaced(client.clone(), PLATFORM_NAMESPACE),
        json!({"metadata": {"name": secret_name}, "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": "{\"auths\":{\"registry.example\":{\"auth\":\"dXNlcjpwYXNz\"}}}"}}),
    )
    .await;
    let registry = format!("{id}-registry");
    create_ignoring_conflict(
        &Api::<kapsa_api::ClusterRegistry>::all(client.clone()),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "ClusterRegistry", "metadata": {"name": registry},
            "spec": {"provider": "Harbor", "server": "registry.example", "repository": "kapsa",
                "credentialsSecretRef": {"name": secret_name, "namespace": PLATFORM_NAMESPACE}}}),
    )
    .await;
    let pool = format!("{id}-pool");
    let base = format!("{id}.example.com");
    create_ignoring_conflict(
        &Api::<kapsa_api::DomainPool>::all(client.clone()),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "DomainPool", "metadata": {"name": pool},
            "spec": {"domains": [base], "clusterIssuerRef": {"name": issuer}, "challenge": challenge, "ingressClassName": "nginx"}}),
    )
    .await;
    Platform {
        pool,
        base,
        issuer,
        registry,
        registry_server: "registry.example".into(),
    }
}

/// A Project manifest for `repo_url` on `platform`.
pub fn project_manifest(
    name: &str,
    repo_url: &str,
    platform: &Platform,
    git_secret: Option<&str>,
) -> Value {
    let mut git = json!({"url": repo_url, "branch": "main"});
    if let Some(secret) = git_secret {
        git["secretRef"] = json!({"name": secret});
    }
    json!({
        "apiVersion": "kapsa.dev/v1alpha1", "kind": "Project",
        "metadata": {"name": name},
        "spec": {
            "source": {"git": git, "pollInterval": "10s"},
            "registryRef": {"kind": "ClusterRegistry", "name": platform.registry},
            "domainPoolRef": {"name": platform.pool},
            "runtime": {
                "port": 8080, "replicas": 2,
                "healthCheck": {"path": "/healthz"},
                "configMapRefs": [{"name": "shop-config"}],
                "secretRefs": [{"name": "shop-secrets"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}
            }
        }
    })
}

/// Sets the revisions the kpack simulator fails.
pub async fn fail_revisions(client: &Client, revisions: &[&str]) {
    use kapsa_testenv::simulators::kpack::{SETTINGS_NAME, SETTINGS_NAMESPACE};
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), SETTINGS_NAMESPACE)
        .patch(
            SETTINGS_NAME,
            &PatchParams::apply("kapsa-test").force(),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": SETTINGS_NAME},
                "data": {"failRevisions": revisions.join(",")}}),
            ),
        )
        .await
        .expect("kpack simulator settings");
}

//! Shared set-up of the operator's integration tests: the real control plane
//! with Kapsa's CRDs, platform objects (pool, registry, builder, issuer), git
//! repositories on loopback, and polling helpers.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use kapsa_api::external;
use kapsa_operator::metrics::Metrics;
use kapsa_operator::{OperatorConfig, run};
use kapsa_testenv::TestEnv;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub mod lane;

pub const TIMEOUT: Duration = Duration::from_secs(90);
/// The user the shared operator runs as (in group system:masters): its
/// requests are the ones the audit log attributes to this name.
pub const OPERATOR_USER: &str = "kapsa-operator";
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
            let builder = external::kpack_cluster_builder();
            let builders: Api<DynamicObject> = Api::all_with(client.clone(), &builder);
            create_ignoring_conflict(
                &builders,
                json!({"apiVersion": builder.api_version, "kind": builder.kind, "metadata": {"name": "default"},
                    "spec": {"tag": "registry.example/builders/default"}}),
            )
            .await;
        })
        .await;
    (env, client)
}

/// The configuration of the tests' operators: the defaults, with loopback
/// git hosts allowed (every test repository is served on loopback, which an
/// operator refuses by default).
pub fn operator_config() -> OperatorConfig {
    OperatorConfig {
        allow_internal_git_hosts: kapsa_operator::git::HostPolicy::loopback(),
        ..OperatorConfig::default()
    }
}

/// An operator for the whole test binary, on a thread of its own (each
/// `#[tokio::test]` has its own runtime). Returns its metrics.
pub async fn shared_operator() -> Arc<Metrics> {
    shared_operator_with(operator_config).await
}

/// [`shared_operator`] with another configuration (the first call of a
/// test binary decides it: every test of one binary shares one operator).
pub async fn shared_operator_with(config: fn() -> OperatorConfig) -> Arc<Metrics> {
    let (env, _) = cluster().await;
    static OPERATOR: tokio::sync::OnceCell<Arc<Metrics>> = tokio::sync::OnceCell::const_new();
    OPERATOR
        .get_or_init(|| async {
            let metrics = Arc::new(Metrics::default());
            let for_thread = metrics.clone();
            let kubeconfig = env.kubeconfig_as(OPERATOR_USER, &["system:masters"]);
            std::thread::Builder::new()
                .name("kapsa-operator".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        // Its own user, so the API server's audit log tells
                        // its requests from the tests'.
                        let client = kapsa_testenv::client_from_kubeconfig(&kubeconfig)
                            .await
                            .unwrap();
                        run(client, config(), for_thread, futures::future::pending())
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
        run(client, operator_config(), for_task, stop)
            .await
            .unwrap();
    });
    (metrics, handle)
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

/// An admission policy of the platform team (a ValidatingAdmissionPolicy
/// named `name` and its binding) that refuses, in `namespace`, the requests
/// `rule` matches (one `resourceRules` entry) where `expression` is false,
/// with `message`: what a quota or a naming policy would refuse.
///
/// Returns once the API server enforces it. It compiles policies in the
/// background, so a policy just created can let requests through for a
/// moment (long enough, on a loaded machine, for the operator to make what
/// the test wants refused). The policy also refuses ConfigMaps in a probe
/// namespace of its own, and nothing else there; a dry-run ConfigMap there
/// is tried until it is refused.
pub async fn refusing_policy(
    client: &Client,
    name: &str,
    namespace: &str,
    rule: Value,
    expression: &str,
    message: &str,
) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    use k8s_openapi::api::core::v1::ConfigMap;
    let probe = format!("policy-probe-{name}");
    let probe_message = format!("probe of policy {name}");
    let refused_by = format!("ValidatingAdmissionPolicy '{name}'");
    create_ignoring_conflict(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": probe}}),
    )
    .await;
    let probe_rule = json!({"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
        "resources": ["configmaps"]});
    let policy = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [rule, probe_rule],
                "namespaceSelector": {"matchExpressions": [{
                    "key": "kubernetes.io/metadata.name", "operator": "In",
                    "values": [namespace, probe]
                }]}
            },
            // ConfigMaps only in the probe namespace: the policy refuses
            // nothing more in `namespace` than `rule` says.
            "matchConditions": [{
                "name": "probe-configmaps-only",
                "expression": format!(
                    "request.resource.resource != 'configmaps' || request.namespace == '{probe}'"
                )
            }],
            "validations": [
                {"expression": expression, "message": message},
                {"expression": format!("request.namespace != '{probe}'"), "message": probe_message}
            ]
        }
    });
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]}
    });
    create_ignoring_conflict(
        &Api::<ValidatingAdmissionPolicy>::all(client.clone()),
        policy,
    )
    .await;
    create_ignoring_conflict(
        &Api::<ValidatingAdmissionPolicyBinding>::all(client.clone()),
        binding,
    )
    .await;
    let configmaps = Api::<ConfigMap>::namespaced(client.clone(), &probe);
    let dry_run = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let sample: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "probe"}})).expect("a ConfigMap");
    eventually(&format!("policy {name} to be enforced"), || async {
        match configmaps.create(&dry_run, &sample).await {
            // The first validation that fails gives the message: `rule`'s
            // own, or the probe's when `expression` holds.
            Err(kube::Error::Api(s)) if s.message.contains(&refused_by) => Some(()),
            _ => None,
        }
    })
    .await;
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
#[derive(Clone)]
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
    let cluster_issuer = external::cert_manager_cluster_issuer();
    create_ignoring_conflict(
        &Api::<DynamicObject>::all_with(client.clone(), &cluster_issuer),
        json!({"apiVersion": cluster_issuer.api_version, "kind": cluster_issuer.kind, "metadata": {"name": issuer},
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

/// A Project that went live: its repository and the commit that serves.
pub struct LiveProject {
    pub name: String,
    pub platform: Platform,
    pub git: kapsa_testenv::git_server::GitServer,
    pub repo: kapsa_testenv::git_server::TestRepo,
    pub commit: String,
}

/// Creates a Project `name` on `platform` from a new repository with one
/// commit (after `edit` has changed its manifest) and waits until that
/// commit serves.
pub async fn live_project(
    client: &Client,
    name: &str,
    platform: Platform,
    edit: impl FnOnce(&mut Value),
) -> LiveProject {
    let git = kapsa_testenv::git_server::GitServer::start(None)
        .await
        .expect("git server");
    let repo = git.create_repo(name).expect("repository");
    let commit = repo
        .commit("main", "app.txt", "v1", "first")
        .expect("commit");
    let mut manifest = project_manifest(name, repo.url(), &platform, None);
    edit(&mut manifest);
    create(&Api::<kapsa_api::Project>::all(client.clone()), manifest).await;
    rolled_out(client, name, &commit).await;
    LiveProject {
        name: name.to_string(),
        platform,
        git,
        repo,
        commit,
    }
}

/// The production Environment of the project namespace, if it exists.
pub async fn production(client: &Client, namespace: &str) -> Option<kapsa_api::Environment> {
    Api::<kapsa_api::Environment>::namespaced(client.clone(), namespace)
        .get_opt("production")
        .await
        .ok()
        .flatten()
}

/// Waits until the production Environment has rolled out `commit` and is Ready.
pub async fn rolled_out(client: &Client, namespace: &str, commit: &str) -> kapsa_api::Environment {
    eventually(&format!("commit {commit} to be live"), || async {
        let env = production(client, namespace).await?;
        let status = env.status.clone()?;
        (status.commit.as_deref() == Some(commit)
            && status.phase == Some(kapsa_api::EnvironmentPhase::Ready))
        .then_some(env)
    })
    .await
}

/// The status and reason of a condition, e.g. `("False", "HostConflict")`.
pub fn condition_of(conditions: &[kapsa_api::Condition], type_: &str) -> Option<(String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (format!("{:?}", c.status), c.reason.clone()))
}

/// Status, reason and message of a condition of a Kapsa object.
fn condition_parts(
    conditions: Vec<kapsa_api::Condition>,
    type_: &str,
) -> Option<(String, String, String)> {
    let c = conditions.into_iter().find(|c| c.type_ == type_)?;
    Some((format!("{:?}", c.status), c.reason, c.message))
}

/// A condition of the Project `name`, as `(status, reason, message)`.
pub async fn project_condition(
    client: &Client,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let project = Api::<kapsa_api::Project>::all(client.clone())
        .get(name)
        .await
        .ok()?;
    condition_parts(project.status?.conditions, type_)
}

/// A condition of the Environment `namespace/name`, as `(status, reason, message)`.
pub async fn environment_condition(
    client: &Client,
    namespace: &str,
    name: &str,
    type_: &str,
) -> Option<(String, String, String)> {
    let env = Api::<kapsa_api::Environment>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .ok()?;
    condition_parts(env.status?.conditions, type_)
}

/// Waits until the platform objects' status is written (`Ready=True` on the
/// DomainPool and the ClusterRegistry, the pool's allocations counting every
/// Project it serves): their reconcilers are debounced, so a Project can go
/// live first. A test that counts writes "at rest" waits
/// for this too.
pub async fn platform_settled(client: &Client, platform: &Platform) {
    let ready = |conditions: Vec<kapsa_api::Condition>| {
        condition_of(&conditions, "Ready").is_some_and(|(status, _)| status == "True")
    };
    eventually("the DomainPool's and ClusterRegistry's status", || async {
        let pool = Api::<kapsa_api::DomainPool>::all(client.clone())
            .get(&platform.pool)
            .await
            .ok()?;
        // Its allocations count every Project that holds a host from it:
        // the pool's reconcile is debounced, so while Projects' statuses
        // keep changing its last write can come after they went live.
        let holders = Api::<kapsa_api::Project>::all(client.clone())
            .list(&Default::default())
            .await
            .ok()?
            .items
            .iter()
            .filter(|p| {
                p.status.as_ref().is_some_and(|s| {
                    s.domain_pool.as_deref() == Some(platform.pool.as_str())
                        && s.base_domain.is_some()
                })
            })
            .count();
        let allocated: i32 = pool
            .status
            .as_ref()
            .map(|s| s.allocations.iter().map(|a| a.projects).sum())
            .unwrap_or_default();
        if usize::try_from(allocated).ok()? != holders {
            return None;
        }
        let registry = Api::<kapsa_api::ClusterRegistry>::all(client.clone())
            .get(&platform.registry)
            .await
            .ok()?;
        (ready(pool.status?.conditions) && ready(registry.status?.conditions)).then_some(())
    })
    .await;
}

/// The image the app container of a Deployment runs.
pub fn app_image(d: &k8s_openapi::api::apps::v1::Deployment) -> String {
    d.spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0]
        .image
        .clone()
        .unwrap()
}

/// Installs the shipped host-ownership policy
/// (deploy/admission/host-ownership.yaml), its exemption naming
/// `operator_user` too (the tests' operators are client-certificate users,
/// not the ServiceAccount the file names).
pub async fn install_host_ownership_policy(client: &Client, operator_user: &str) {
    let yaml = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../deploy/admission/host-ownership.yaml"),
    )
    .expect("deploy/admission/host-ownership.yaml")
    .replace(
        "'system:serviceaccount:kapsa-system:kapsa'",
        &format!("'system:serviceaccount:kapsa-system:kapsa', '{operator_user}'"),
    );
    for document in serde_yaml_ng::Deserializer::from_str(&yaml) {
        let value: Value = serde::Deserialize::deserialize(document).unwrap();
        let kind = value["kind"].as_str().unwrap().to_string();
        let gvk = kube::core::GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", &kind);
        let api: Api<DynamicObject> =
            Api::all_with(client.clone(), &kube::api::ApiResource::from_gvk(&gvk));
        let name = value["metadata"]["name"].as_str().unwrap().to_string();
        api.patch(
            &name,
            &PatchParams::apply("kapsa-test").force(),
            &Patch::Apply(&value),
        )
        .await
        .unwrap_or_else(|e| panic!("{kind} {name} refused: {e}"));
    }
}

/// Waits until the namespace has no Ingress left (e.g. after a switch to
/// Gateway routing).
pub async fn ingresses_pruned(client: &Client, namespace: &str) {
    let ingresses =
        Api::<k8s_openapi::api::networking::v1::Ingress>::namespaced(client.clone(), namespace);
    eventually(&format!("every Ingress of {namespace} pruned"), || async {
        ingresses
            .list(&Default::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
}

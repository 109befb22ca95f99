//! The operator's packaged RBAC (deploy/operator/rbac.yaml) is enough, and no
//! more than it should be: the manifests are server-side applied to the real
//! control plane, then the operator runs in-process authenticated only as the
//! `kapsa` ServiceAccount (a TokenRequest token, no client certificate) and
//! takes a Project live with no reconcile error, while things it must not do
//! are refused. The operator's admission policy (deploy/operator/admission.yaml)
//! is installed too: under it the operator still works end to end, and its
//! ServiceAccount is refused writes of Secrets, Deployments and RoleBindings in
//! `kube-system` and in a namespace without Kapsa's ownership label, which
//! RBAC alone would allow.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::{SelfSubjectReview, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, ResourceQuota, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kapsa_api::conditions::READY;
use kapsa_api::{ConditionStatus, Environment, EnvironmentPhase, Project};
use kapsa_operator::OperatorConfig;
use kapsa_operator::leader::LeaseConfig;
use kapsa_operator::metrics::Metrics;
use kapsa_testenv::git_server::GitServer;
use kapsa_testenv::simulators::kpack::simulated_digest;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::discovery::{Scope, pinned_kind};
use kube::{Client, Config, ResourceExt};
use serde_json::{Value, json};
use support::*;

const SYSTEM_NAMESPACE: &str = "kapsa-system";
const SERVICE_ACCOUNT: &str = "kapsa";

fn manifest(file: &str) -> String {
    let path = format!(
        "{}/../../deploy/operator/{file}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"))
}

/// Every document of a multi-document YAML file.
fn documents(yaml: &str) -> Vec<DynamicObject> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::from_value(v).expect("a Kubernetes object"))
        .collect()
}

/// Server-side applies every document of `yaml`, strictly (an unknown or
/// misspelt field is an error); returns the objects as applied.
async fn apply_all(client: &Client, yaml: &str) -> Vec<DynamicObject> {
    let params = PatchParams::apply("kapsa-rbac-test")
        .force()
        .validation_strict();
    let mut applied = Vec::new();
    for object in documents(yaml) {
        let types = object.types.clone().expect("apiVersion and kind");
        let gvk = GroupVersionKind::try_from(&types).expect("a valid apiVersion");
        let (resource, capabilities) = pinned_kind(client, &gvk)
            .await
            .unwrap_or_else(|e| panic!("{gvk:?} is not served: {e}"));
        let api: Api<DynamicObject> = match capabilities.scope {
            Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                &object
                    .namespace()
                    .expect("a namespaced object names its namespace"),
                &resource,
            ),
            Scope::Cluster => Api::all_with(client.clone(), &resource),
        };
        let name = object.name_any();
        let result = api
            .patch(&name, &params, &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("applying {} {name}: {e}", types.kind));
        applied.push(result);
    }
    applied
}

/// A client that authenticates as the operator's ServiceAccount only: the
/// admin kubeconfig's server and CA, a short-lived TokenRequest token as the
/// user.
async fn service_account_client(admin: &Client, kubeconfig: &std::path::Path) -> Client {
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        }),
        ..TokenRequest::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), SYSTEM_NAMESPACE)
        .create_token_request(SERVICE_ACCOUNT, &PostParams::default(), &request)
        .await
        .expect("a token for the kapsa ServiceAccount")
        .status
        .and_then(|s| s.token)
        .expect("a token in the TokenRequest status");
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("the admin kubeconfig");
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("a config from the admin kubeconfig");
    // Replaces the admin's client certificate: only the bearer token is left.
    config.auth_info = AuthInfo {
        token: Some(token.into()),
        ..AuthInfo::default()
    };
    Client::try_from(config).expect("a client with the ServiceAccount token")
}

async fn allowed(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                namespace: namespace.map(str::to_string),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("a SelfSubjectAccessReview")
        .status
        .expect("a review status")
        .allowed
}

/// `kapsa_reconciles_total` samples with result="error" and a nonzero value.
fn reconcile_errors(metrics: &Metrics) -> Vec<String> {
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("kapsa_reconciles_total{") && l.contains("result=\"error\""))
        .filter(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) != Some(0.0))
        .map(str::to_string)
        .collect()
}

fn successes(metrics: &Metrics, controller: &str) -> u64 {
    let prefix =
        format!("kapsa_reconciles_total{{controller=\"{controller}\",result=\"success\"}}");
    metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Events Kapsa published about `name` in `namespace`.
async fn kapsa_events(client: &Client, namespace: &str, kind: &str, name: &str) -> Vec<Event> {
    Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .expect("listing Events")
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some("kapsa"))
        .filter(|e| {
            e.regarding
                .as_ref()
                .is_some_and(|r| r.kind.as_deref() == Some(kind) && r.name.as_deref() == Some(name))
        })
        .collect()
}

/// Writes the operator's ServiceAccount attempts in `namespace`, as dry runs
/// (admission runs, nothing is stored): a Secret, a Deployment and a
/// RoleBinding (handing the operator's own ClusterRole to the namespace's
/// `default` ServiceAccount, which RBAC's escalation check allows) created, and the `kapsa-registry` Secret deleted (RBAC lets it
/// delete that name anywhere; the probe skips it where it does not exist).
async fn probe_writes(
    client: &Client,
    namespace: &str,
) -> Vec<(&'static str, Result<(), kube::Error>)> {
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let name = "kapsa-reach-probe";
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": name}, "stringData": {"a": "b"}}))
            .unwrap();
    let deployment: Deployment = serde_json::from_value(json!({"metadata": {"name": name},
        "spec": {"selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.example/probe"}]}}}}))
    .unwrap();
    let binding: RoleBinding = serde_json::from_value(json!({"metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kapsa-operator"},
        "subjects": [{"kind": "ServiceAccount", "name": "default", "namespace": namespace}]}))
    .unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    let mut writes = vec![
        ("Secret", secrets.create(&dry, &secret).await.map(|_| ())),
        (
            "Deployment",
            Api::<Deployment>::namespaced(client.clone(), namespace)
                .create(&dry, &deployment)
                .await
                .map(|_| ()),
        ),
        (
            "RoleBinding",
            Api::<RoleBinding>::namespaced(client.clone(), namespace)
                .create(&dry, &binding)
                .await
                .map(|_| ()),
        ),
    ];
    let delete = DeleteParams {
        dry_run: true,
        ..DeleteParams::default()
    };
    match secrets.delete("kapsa-registry", &delete).await {
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        result => writes.push(("Secret deletion", result.map(|_| ()))),
    }
    writes
}

/// Whether a write was refused by admission.yaml's policy (not by RBAC).
fn refused_by_policy(result: &Result<(), kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("kapsa-operator-reach"))
}

#[tokio::test]
async fn the_packaged_rbac_is_enough_for_the_operator_and_no_more() {
    let (env, admin) = cluster().await;

    // The manifests are accepted by the real API server.
    let rbac = apply_all(&admin, &manifest("rbac.yaml")).await;
    let kinds: Vec<String> = rbac
        .iter()
        .map(|o| o.types.as_ref().unwrap().kind.clone())
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "rbac.yaml has a {kind}");
    }
    let operator = apply_all(&admin, &manifest("operator.yaml")).await;
    let kinds: Vec<String> = operator
        .iter()
        .map(|o| o.types.as_ref().unwrap().kind.clone())
        .collect();
    assert_eq!(kinds, ["Deployment", "Service", "PodDisruptionBudget"]);
    // The image does not exist (and kwok would only pretend to run it): the
    // Deployment was only there to be validated.
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), SYSTEM_NAMESPACE);
    let deployment = deployments.get("kapsa-operator").await.unwrap();
    let spec = deployment.spec.clone().unwrap();
    assert_eq!(spec.replicas, Some(2));
    assert_eq!(
        spec.template
            .spec
            .as_ref()
            .unwrap()
            .service_account_name
            .as_deref(),
        Some(SERVICE_ACCOUNT)
    );
    // Its pods would be admitted in kapsa-system, whose namespace enforces
    // the `restricted` Pod Security Standard (a dry run: nothing is created).
    let labels = Api::<Namespace>::all(admin.clone())
        .get(SYSTEM_NAMESPACE)
        .await
        .unwrap()
        .labels()
        .clone();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("restricted")
    );
    let pod = Pod {
        metadata: ObjectMeta {
            generate_name: Some("kapsa-operator-".into()),
            ..ObjectMeta::default()
        },
        spec: spec.template.spec.clone(),
        ..Pod::default()
    };
    Api::<Pod>::namespaced(admin.clone(), SYSTEM_NAMESPACE)
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &pod,
        )
        .await
        .expect("the operator's pod is admitted under the restricted Pod Security Standard");
    deployments
        .delete("kapsa-operator", &DeleteParams::default())
        .await
        .unwrap();

    // The operator's own client: the ServiceAccount's token and nothing else.
    let client = service_account_client(&admin, env.kubeconfig_path()).await;
    let whoami = Api::<SelfSubjectReview>::all(client.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("a SelfSubjectReview");
    let user = whoami.status.unwrap().user_info.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:kapsa-system:kapsa")
    );

    // What it must not do: refused.
    for (verb, group, resource, namespace) in [
        ("delete", "", "secrets", Some("kube-system")),
        ("create", "rbac.authorization.k8s.io", "clusterroles", None),
        (
            "create",
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            None,
        ),
        (
            "escalate",
            "rbac.authorization.k8s.io",
            "roles",
            Some("default"),
        ),
        (
            "bind",
            "rbac.authorization.k8s.io",
            "roles",
            Some("default"),
        ),
        ("create", "", "pods", Some("default")),
        ("delete", "", "namespaces", None),
        ("delete", "apps", "deployments", Some("default")),
        ("update", "kapsa.dev", "projects", None),
        ("patch", "kapsa.dev", "projects", None),
        ("delete", "kapsa.dev", "environments", Some("default")),
        ("patch", "kapsa.dev", "domainpools", None),
        ("get", "coordination.k8s.io", "leases", Some("kube-system")),
        (
            "update",
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            None,
        ),
    ] {
        assert!(
            !allowed(&client, verb, group, resource, namespace).await,
            "the operator may {verb} {group}/{resource} in {namespace:?}"
        );
    }
    // ... and an attempt is answered 403 (before the Secret is even looked up).
    match Api::<Secret>::namespaced(client.clone(), "kube-system")
        .delete("anything", &DeleteParams::default())
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("deleting a kube-system Secret was not refused: {other:?}"),
    }

    // RBAC alone lets the ServiceAccount write Secrets, Deployments and
    // RoleBindings anywhere (a project namespace does not exist until the
    // operator makes it) ...
    let foreign = "rbac-foreign";
    create(
        &Api::<Namespace>::all(admin.clone()),
        json!({"metadata": {"name": foreign}}),
    )
    .await;
    create(
        &Api::<Secret>::namespaced(admin.clone(), foreign),
        json!({"metadata": {"name": "kapsa-registry"}, "stringData": {"a": "b"}}),
    )
    .await;
    for namespace in ["kube-system", foreign] {
        for (kind, result) in probe_writes(&client, namespace).await {
            result.unwrap_or_else(|e| {
                panic!("RBAC alone should admit a {kind} in {namespace} (the gap the policy closes): {e}")
            });
        }
    }
    // ... so admission.yaml bounds it: only namespaces carrying Kapsa's
    // ownership label, never a reserved one.
    let admission = apply_all(&admin, &manifest("admission.yaml")).await;
    let kinds: Vec<String> = admission
        .iter()
        .map(|o| o.types.as_ref().unwrap().kind.clone())
        .collect();
    assert_eq!(
        kinds,
        [
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding"
        ]
    );
    eventually(
        "the policy to refuse the operator in kube-system",
        || async {
            let writes = probe_writes(&client, "kube-system").await;
            writes
                .iter()
                .all(|(_, result)| refused_by_policy(result))
                .then_some(())
        },
    )
    .await;

    // The operator, in this runtime, as the ServiceAccount, with leader election.
    let metrics = std::sync::Arc::new(Metrics::default());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = OperatorConfig {
        lease: Some(LeaseConfig::new(
            SYSTEM_NAMESPACE,
            "kapsa-rbac-test",
            "rbac-test",
        )),
        // The test's git server listens on loopback.
        allow_internal_git_hosts: kapsa_operator::git::HostPolicy::loopback(),
        ..OperatorConfig::default()
    };
    let running = tokio::spawn(kapsa_operator::run(
        client.clone(),
        config,
        metrics.clone(),
        async move {
            let _ = stopped.await;
        },
    ));

    // A Project goes live: namespace, RBAC, registry secret copy, git
    // credentials read by the poller, kpack Image, Deployment, Service,
    // Ingress, Certificate readiness, both status subresources, Events.
    let platform = platform(&admin, "rbac", "HTTP01", false).await;
    let git = GitServer::start(Some(("deploy".into(), "rbac-token".into())))
        .await
        .unwrap();
    let repo = git.create_repo("rbac").unwrap();
    let commit = repo.commit("main", "app.txt", "v1", "first").unwrap();
    let name = "rbac-shop";
    create(
        &Api::<Project>::all(admin.clone()),
        project_manifest(name, repo.url(), &platform, Some("shop-git")),
    )
    .await;
    eventually("the project namespace", || async {
        Api::<Namespace>::all(admin.clone())
            .get_opt(name)
            .await
            .ok()
            .flatten()
    })
    .await;
    create(
        &Api::<Secret>::namespaced(admin.clone(), name),
        json!({"metadata": {"name": "shop-git"}, "type": "kubernetes.io/basic-auth",
            "stringData": {"username": "deploy", "password": "rbac-token"}}),
    )
    .await;

    let image = format!(
        "registry.example/kapsa/{name}:production@{}",
        simulated_digest(repo.url(), &commit)
    );
    let environments: Api<Environment> = Api::namespaced(admin.clone(), name);
    let environment = eventually("the production Environment to be Ready", || async {
        let env = environments.get_opt("production").await.ok().flatten()?;
        let status = env.status.clone()?;
        (status.phase == Some(EnvironmentPhase::Ready)).then_some(env)
    })
    .await;
    let status = environment.status.unwrap();
    assert_eq!(status.image.as_deref(), Some(image.as_str()));
    assert_eq!(status.commit.as_deref(), Some(commit.as_str()));
    assert_eq!(
        status.url.as_deref(),
        Some(format!("https://{name}.{}", platform.base).as_str())
    );
    // The project namespace enforces the `restricted` Pod Security
    // Standard: the app's pods were admitted under it (the Environment is
    // Ready), and a privileged pod is refused there.
    let labels = Api::<Namespace>::all(admin.clone())
        .get(name)
        .await
        .unwrap()
        .labels()
        .clone();
    for mode in ["enforce", "warn", "audit"] {
        assert_eq!(
            labels
                .get(&format!("pod-security.kubernetes.io/{mode}"))
                .map(String::as_str),
            Some("restricted"),
            "{mode}"
        );
    }
    let privileged: Pod = serde_json::from_value(json!({"metadata": {"name": "privileged"},
        "spec": {"containers": [{"name": "app", "image": "registry.example/probe",
            "securityContext": {"privileged": true}}]}}))
    .unwrap();
    let dry = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    match Api::<Pod>::namespaced(admin.clone(), name)
        .create(&dry, &privileged)
        .await
    {
        Err(kube::Error::Api(s)) => {
            assert!(s.code == 403 && s.message.contains("PodSecurity"), "{s:?}")
        }
        other => panic!("a privileged pod was not refused in the project namespace: {other:?}"),
    }
    eventually("the Project to be Ready", || async {
        let project = Api::<Project>::all(admin.clone()).get(name).await.ok()?;
        let ready = project
            .status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == READY)?;
        (ready.status == ConditionStatus::True).then_some(())
    })
    .await;

    // Event publishing failures are only logged, so they are checked here:
    // in the project namespace (Environment) and in `default` (the
    // cluster-scoped Project).
    eventually("Events about the Environment and the Project", || async {
        let about_env = kapsa_events(&admin, name, "Environment", "production").await;
        let about_project = kapsa_events(&admin, "default", "Project", name).await;
        (!about_env.is_empty() && !about_project.is_empty()).then_some(())
    })
    .await;

    let lease = Api::<Lease>::namespaced(admin.clone(), SYSTEM_NAMESPACE)
        .get("kapsa-rbac-test")
        .await
        .expect("the operator's Lease");
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("rbac-test")
    );

    // The one delete Kapsa issues itself: a ResourceQuota that is no longer
    // asked for.
    let projects: Api<Project> = Api::all(admin.clone());
    let quotas: Api<ResourceQuota> = Api::namespaced(admin.clone(), name);
    for (quota, wanted) in [
        (json!({"hard": {"pods": "10"}}), true),
        (Value::Null, false),
    ] {
        projects
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"resourceQuota": quota}})),
            )
            .await
            .unwrap();
        eventually("the ResourceQuota to follow the Project", || async {
            let exists = quotas.get_opt("kapsa-quota").await.ok()?.is_some();
            (exists == wanted).then_some(())
        })
        .await;
    }

    // Under the policy the operator did all of the above; its
    // ServiceAccount is still refused every write outside project
    // namespaces, and may not claim a foreign namespace by labelling it.
    for namespace in ["kube-system", foreign] {
        for (kind, result) in probe_writes(&client, namespace).await {
            assert!(
                refused_by_policy(&result),
                "the operator's {kind} write in {namespace} was not refused by the policy: {result:?}"
            );
        }
    }
    for (kind, result) in probe_writes(&client, name).await {
        result.unwrap_or_else(|e| panic!("a {kind} in the project namespace is refused: {e}"));
    }
    let dry_patch = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let claim =
        Patch::Merge(json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "kapsa"}}}));
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let result = namespaces
        .patch(foreign, &dry_patch, &claim)
        .await
        .map(|_| ());
    assert!(
        refused_by_policy(&result),
        "the operator labelled a foreign namespace as its own: {result:?}"
    );
    namespaces
        .patch(name, &dry_patch, &claim)
        .await
        .expect("the operator may patch its own namespace");

    // No reconcile failed for want of a permission (or anything else).
    assert!(successes(&metrics, "project") > 0 && successes(&metrics, "environment") > 0);
    let errors = reconcile_errors(&metrics);
    assert!(errors.is_empty(), "reconcile errors: {errors:?}");

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the operator to stop")
        .expect("the operator task")
        .expect("the operator to stop cleanly");
}

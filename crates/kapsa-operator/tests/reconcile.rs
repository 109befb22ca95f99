//! The reconcile pipeline on the real control plane: prune (what Kapsa
//! made and no longer wants is deleted, nothing else), children deleted or
//! edited by hand come back, references are followed within seconds, a
//! stalled rollout is reported while the previous release serves, and
//! reconciles read only from caches (judged by the API server's audit log).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kapsa_api::{DomainPool, Environment, EnvironmentPhase, Project};
use kapsa_testenv::simulators::cert_manager::certificate_resource;
use kapsa_testenv::simulators::kpack::image_resource;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::json;
use support::*;

/// Within this, a change must reach what depends on it (no resync needed).
const PROMPTLY: Duration = Duration::from_secs(10);

async fn within<T, F, Fut>(limit: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    kapsa_testenv::wait::eventually(limit, what, check).await
}

async fn gone<K>(api: &Api<K>, name: &str, what: &str)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(what, || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

fn merge(value: serde_json::Value) -> Patch<serde_json::Value> {
    Patch::Merge(value)
}

#[tokio::test]
async fn a_project_that_loses_its_host_loses_its_ingress_and_certificate() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let holder = live_project(
        &client,
        "holder",
        platform(&client, "hold", "HTTP01", false).await,
        |_| {},
    )
    .await;
    let loser = live_project(
        &client,
        "loser",
        platform(&client, "lose", "HTTP01", false).await,
        |_| {},
    )
    .await;
    let ingresses = Api::<Ingress>::namespaced(client.clone(), "loser");
    let certificates =
        Api::<DynamicObject>::namespaced_with(client.clone(), "loser", &certificate_resource());
    assert!(ingresses.get_opt("production").await.unwrap().is_some());
    eventually("the loser's certificate", || async {
        certificates.get_opt("production-tls").await.ok()?
    })
    .await;

    // The platform team removes the loser's DomainPool: its host goes.
    Api::<DomainPool>::all(client.clone())
        .delete(&loser.platform.pool, &Default::default())
        .await
        .unwrap();
    eventually("DomainPoolNotFound on the loser", || async {
        let project = Api::<Project>::all(client.clone())
            .get("loser")
            .await
            .ok()?;
        let status = project.status?;
        (condition_of(&status.conditions, "DomainAllocated")?.1 == "DomainPoolNotFound"
            && status.host.is_none())
        .then_some(())
    })
    .await;
    gone(&ingresses, "production", "the loser's Ingress to be pruned").await;
    gone(
        &certificates,
        "production-tls",
        "the loser's Certificate to go with its Ingress",
    )
    .await;
    let env = production(&client, "loser").await.unwrap();
    assert_eq!(env.spec.host, None, "the Environment holds no host");
    // The app itself still runs; only its route is gone.
    assert!(
        Api::<Deployment>::namespaced(client.clone(), "loser")
            .get_opt("production")
            .await
            .unwrap()
            .is_some()
    );
    // Another Project, on another pool, still serves.
    let holder_ingress = Api::<Ingress>::namespaced(client.clone(), "holder")
        .get("production")
        .await
        .unwrap();
    assert_eq!(
        holder_ingress.spec.unwrap().rules.unwrap()[0].host,
        Some(format!("holder.{}", holder.platform.base))
    );
    let holder_env = production(&client, "holder").await.unwrap();
    assert_eq!(
        condition_of(&holder_env.status.unwrap().conditions, "Ready").map(|c| c.0),
        Some("True".into())
    );
}

#[tokio::test]
async fn a_fixed_image_prunes_the_build_and_nothing_foreign_is_deleted() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let live = live_project(
        &client,
        "fixer",
        platform(&client, "fix", "HTTP01", false).await,
        |_| {},
    )
    .await;
    let ns = live.name.as_str();
    // Builds run in the Project's build namespace.
    let build_ns = kapsa_api::naming::build_namespace(ns);
    let images =
        Api::<DynamicObject>::namespaced_with(client.clone(), &build_ns, &image_resource());
    let environments = Api::<Environment>::namespaced(client.clone(), ns);
    // A person's Environment built from a commit ...
    create(
        &environments,
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment", "metadata": {"name": "manual"},
            "spec": {"project": ns, "type": "Preview", "branch": "main", "commit": live.commit}}),
    )
    .await;
    eventually("the manual Environment's kpack Image", || async {
        images.get_opt("manual").await.ok()?
    })
    .await;
    // ... and a kpack Image of the same name as a Kapsa Environment's, made
    // by someone else (no Kapsa label, no owner).
    create(
        &environments,
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment", "metadata": {"name": "pinned"},
            "spec": {"project": ns, "type": "Preview", "image": "registry.example/other/app:1"}}),
    )
    .await;
    create(
        &images,
        json!({"apiVersion": "kpack.io/v1alpha2", "kind": "Image", "metadata": {"name": "pinned"},
            "spec": {"tag": "registry.example/someone/else", "serviceAccountName": "default",
                "builder": {"kind": "ClusterBuilder", "name": "default"},
                "source": {"git": {"url": "https://example.com/x.git", "revision": "main"}}}}),
    )
    .await;

    // The person switches "manual" to a fixed image: its build goes.
    environments
        .patch(
            "manual",
            &PatchParams::default(),
            &merge(json!({"spec": {"branch": null, "commit": null, "image": "registry.example/other/app:2"}})),
        )
        .await
        .unwrap();
    gone(
        &images,
        "manual",
        "the kpack Image after a switch to a fixed image",
    )
    .await;
    eventually("manual to run the fixed image", || async {
        let env = environments.get("manual").await.ok()?;
        let status = env.status?;
        (status.image.as_deref() == Some("registry.example/other/app:2")
            && condition_of(&status.conditions, "Built")?.1 == "FixedImage")
            .then_some(())
    })
    .await;
    // The foreign Image survives every reconcile of "pinned".
    eventually("pinned to be reconciled", || async {
        let env = environments.get("pinned").await.ok()?;
        (env.status?.image.as_deref() == Some("registry.example/other/app:1")).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let foreign = images
        .get("pinned")
        .await
        .expect("the foreign Image survives");
    assert_eq!(
        foreign.data["spec"]["tag"], "registry.example/someone/else",
        "and is untouched"
    );
    // The production build was never touched.
    assert!(images.get_opt("production").await.unwrap().is_some());
}

#[tokio::test]
async fn dns01_to_http01_prunes_the_wildcard_certificate() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let live = live_project(
        &client,
        "wildcat",
        platform(&client, "cat", "DNS01", true).await,
        |_| {},
    )
    .await;
    let ns = live.name.as_str();
    let certificates =
        Api::<DynamicObject>::namespaced_with(client.clone(), ns, &certificate_resource());
    assert!(
        certificates
            .get_opt("wildcat-wildcard")
            .await
            .unwrap()
            .is_some(),
        "DNS01: a wildcard Certificate"
    );
    Api::<DomainPool>::all(client.clone())
        .patch(
            &live.platform.pool,
            &PatchParams::default(),
            &merge(json!({"spec": {"challenge": "HTTP01"}})),
        )
        .await
        .unwrap();
    gone(
        &certificates,
        "wildcat-wildcard",
        "the wildcard Certificate after DNS01 -> HTTP01",
    )
    .await;
    let ingress = eventually("the Ingress to use a per-host certificate", || async {
        let ingress = Api::<Ingress>::namespaced(client.clone(), ns)
            .get("production")
            .await
            .ok()?;
        let secret = ingress.spec.clone()?.tls?.first()?.secret_name.clone()?;
        (secret == "production-tls").then_some(ingress)
    })
    .await;
    assert!(
        ingress
            .annotations()
            .contains_key("cert-manager.io/cluster-issuer")
    );
    eventually("TLSReady from the per-host certificate", || async {
        let (status, _, message) =
            environment_condition(&client, ns, "production", "TLSReady").await?;
        (status == "True" && message.contains("production-tls")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn children_deleted_or_edited_by_hand_come_back() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let live = live_project(
        &client,
        "mended",
        platform(&client, "mend", "HTTP01", false).await,
        |_| {},
    )
    .await;
    let ns = live.name.as_str();

    // Deleted by hand: recreated (a new object) within seconds.
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let old_uid = services.get("production").await.unwrap().uid();
    services
        .delete("production", &Default::default())
        .await
        .unwrap();
    let started = Instant::now();
    within(PROMPTLY, "the Service to be recreated", || async {
        let service = services.get_opt("production").await.ok()??;
        (service.uid() != old_uid).then_some(())
    })
    .await;
    println!("Service recreated after {:?}", started.elapsed());

    // A `false` Kapsa sets, removed by hand: put back.
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    deployments
        .patch(
            "production",
            &PatchParams::default(),
            // Strategic: containers merge by name.
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"automountServiceAccountToken": null,
                "containers": [{"name": "app", "securityContext": {"allowPrivilegeEscalation": null}}]}}}})),
        )
        .await
        .unwrap();
    let removed = deployments.get("production").await.unwrap();
    let pod = removed.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.automount_service_account_token, None, "the edit took");
    within(
        PROMPTLY,
        "automountServiceAccountToken: false to be put back",
        || async {
            let d = deployments.get("production").await.ok()?;
            let pod = d.spec?.template.spec?;
            let escalation = pod.containers[0]
                .security_context
                .as_ref()?
                .allow_privilege_escalation;
            (pod.automount_service_account_token == Some(false) && escalation == Some(false))
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_rotated_registry_secret_reaches_the_copy_within_seconds() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let live = live_project(
        &client,
        "rotor",
        platform(&client, "rot", "HTTP01", false).await,
        |_| {},
    )
    .await;
    // The push credentials' copy is in the build namespace.
    let copies = Api::<Secret>::namespaced(
        client.clone(),
        &kapsa_api::naming::build_namespace(&live.name),
    );
    let data = |s: &Secret| {
        s.data
            .as_ref()
            .and_then(|d| d.get(".dockerconfigjson"))
            .map(|v| String::from_utf8_lossy(&v.0).to_string())
    };
    let rotated = r#"{"auths":{"registry.example":{"auth":"cm90YXRlZDpuZXc="}}}"#;
    Api::<Secret>::namespaced(client.clone(), PLATFORM_NAMESPACE)
        .patch(
            "rot-push",
            &PatchParams::default(),
            &merge(json!({"stringData": {".dockerconfigjson": rotated}})),
        )
        .await
        .unwrap();
    let started = Instant::now();
    within(
        PROMPTLY,
        "the copy to follow the rotated Secret",
        || async {
            let copy = copies.get("kapsa-registry").await.ok()?;
            (data(&copy)?.as_str() == rotated).then_some(())
        },
    )
    .await;
    println!("copy followed the rotation after {:?}", started.elapsed());

    // An edit of the copy is reverted, also within seconds.
    copies
        .patch(
            "kapsa-registry",
            &PatchParams::default(),
            &merge(json!({"stringData": {".dockerconfigjson": "{\"auths\":{}}"}})),
        )
        .await
        .unwrap();
    within(PROMPTLY, "the edited copy to be restored", || async {
        let copy = copies.get("kapsa-registry").await.ok()?;
        (data(&copy)?.as_str() == rotated).then_some(())
    })
    .await;
}

#[tokio::test]
async fn missing_config_references_are_named_until_they_exist() {
    let (_, client) = cluster().await;
    shared_operator().await;
    // The project manifest names ConfigMap shop-config and Secret shop-secrets.
    let live = live_project(
        &client,
        "refs",
        platform(&client, "refs", "HTTP01", false).await,
        |_| {},
    )
    .await;
    let ns = live.name.as_str();
    let (status, reason, message) = eventually("ReferencesResolved False", || async {
        environment_condition(&client, ns, "production", "ReferencesResolved")
            .await
            .filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "ReferenceNotFound")
    );
    assert!(
        message.contains("ConfigMap \"shop-config\"")
            && message.contains("Secret \"shop-secrets\""),
        "{message}"
    );
    create(
        &Api::<ConfigMap>::namespaced(client.clone(), ns),
        json!({"metadata": {"name": "shop-config"}, "data": {"A": "1"}}),
    )
    .await;
    create(
        &Api::<Secret>::namespaced(client.clone(), ns),
        json!({"metadata": {"name": "shop-secrets"}, "stringData": {"B": "2"}}),
    )
    .await;
    within(
        PROMPTLY,
        "ReferencesResolved True once both exist",
        || async {
            let c = environment_condition(&client, ns, "production", "ReferencesResolved").await?;
            (c.0 == "True").then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_stalled_rollout_is_reported_and_the_previous_release_keeps_serving() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let live = live_project(
        &client,
        "stall",
        platform(&client, "stall", "HTTP01", false).await,
        |_| {},
    )
    .await;
    let ns = live.name.as_str();
    // A rollout whose new pods never become ready: kwok leaves pods with
    // this annotation alone. The deadline is short so that the Deployment
    // controller gives up quickly (neither field is one Kapsa sets).
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(
            "production",
            &PatchParams::apply("stall-test"),
            &Patch::Apply(json!({"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "production"},
                "spec": {"progressDeadlineSeconds": 2, "template": {"metadata": {"annotations": {"kwok.x-k8s.io/status": "custom"}}}}})),
        )
        .await
        .unwrap();
    let (_, _, message) = eventually("Deployed False ProgressDeadlineExceeded", || async {
        environment_condition(&client, ns, "production", "Deployed")
            .await
            .filter(|c| c.1 == "ProgressDeadlineExceeded")
    })
    .await;
    assert!(
        message.contains("previous release keeps serving"),
        "{message}"
    );
    let env = production(&client, ns).await.unwrap();
    let status = env.status.unwrap();
    assert_eq!(status.phase, Some(EnvironmentPhase::Failed));
    assert_eq!(
        condition_of(&status.conditions, "Ready").map(|c| c.0),
        Some("True".into()),
        "the previous release still serves"
    );
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let serving: i32 = replica_sets
        .iter()
        .filter_map(|rs| rs.status.as_ref()?.available_replicas)
        .sum();
    assert_eq!(serving, 2, "the old ReplicaSet's two pods still serve");
}

#[tokio::test]
async fn reconciles_read_only_from_caches() {
    let (env, client) = cluster().await;
    shared_operator().await;
    let log = env.audit_log();
    let live = live_project(
        &client,
        "cached",
        platform(&client, "cached", "HTTP01", false).await,
        |_| {},
    )
    .await;
    // The registry's status reconciler judges its credentials Secret once
    // (one read per version of the Secret): done before the count starts.
    eventually("the ClusterRegistry to be Ready", || async {
        let registry = Api::<kapsa_api::ClusterRegistry>::all(client.clone())
            .get(&live.platform.registry)
            .await
            .ok()?;
        (condition_of(&registry.status?.conditions, "Ready")?.0 == "True").then_some(())
    })
    .await;
    // Ten reconciles of the Project and of its Environment, each triggered
    // by a label (which changes nothing Kapsa acts on).
    let mark = log.mark().await;
    let projects = Api::<Project>::all(client.clone());
    let environments = Api::<Environment>::namespaced(client.clone(), &live.name);
    for round in 0..10 {
        let label = json!({"metadata": {"labels": {"touched": round.to_string()}}});
        projects
            .patch(&live.name, &PatchParams::default(), &merge(label.clone()))
            .await
            .unwrap();
        environments
            .patch("production", &PatchParams::default(), &merge(label))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Other tests share the operator: count what concerns this Project (its
    // namespace, itself, its registry's credentials).
    let events: Vec<_> = log
        .events_since(mark)
        .await
        .into_iter()
        .filter(|e| e.user == OPERATOR_USER)
        .filter(|e| {
            e.namespace == live.name
                || (e.resource == "projects" && e.name == live.name)
                || e.name == "cached-push"
        })
        .collect();
    let summary = kapsa_testenv::audit::summary_by(&events, OPERATOR_USER);
    println!("the operator's requests during 20 reconciles: {summary:#?}");
    let gets = kapsa_testenv::audit::count(&events, |e| e.verb == "get");
    assert_eq!(gets, 0, "live GETs by the operator: {summary:#?}");
    let writes = kapsa_testenv::audit::count(&events, kapsa_testenv::audit::writes);
    assert_eq!(
        writes, 0,
        "reconciles with nothing to do write nothing: {summary:#?}"
    );
    // The check can fail: the operator's own requests are in the log.
    let lists = kapsa_testenv::audit::count(
        &log.events_since(kapsa_testenv::AuditMark::default()).await,
        |e| e.user == OPERATOR_USER && e.verb == "list",
    );
    assert!(
        lists > 0,
        "the audit log shows the operator's cache listings"
    );
}

#[tokio::test]
async fn readyz_answers_once_the_caches_are_synced() {
    let (_, client) = cluster().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    let (stop, until) = tokio::sync::oneshot::channel::<()>();
    let config = kapsa_operator::OperatorConfig {
        metrics_addr: Some(addr),
        ..Default::default()
    };
    let operator = tokio::spawn(kapsa_operator::run(
        client,
        config,
        Default::default(),
        async move {
            let _ = until.await;
        },
    ));
    let mut last = None;
    for _ in 0..120 {
        last = http_get(addr, "/readyz").await;
        if last.as_ref().is_some_and(|r| r.0 == 200) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    assert_eq!(last.as_ref().map(|r| r.0), Some(200), "/readyz: {last:?}");
    assert_eq!(http_get(addr, "/healthz").await.map(|r| r.0), Some(200));
    let (code, metrics) = http_get(addr, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.trim_end().ends_with("# EOF"),
        "OpenMetrics text: {metrics}"
    );
    let _ = stop.send(());
    operator.await.unwrap().unwrap();
}

/// A plain HTTP/1.0 GET on loopback: the status code and the body.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// `Ready` of a DomainPool, ClusterRegistry or Registry, as `(status, reason)`.
async fn platform_ready<K>(api: &Api<K>, name: &str) -> Option<(String, String)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    let object = serde_json::to_value(api.get_opt(name).await.ok()??).ok()?;
    let conditions: Vec<kapsa_api::Condition> =
        serde_json::from_value(object["status"]["conditions"].clone()).ok()?;
    condition_of(&conditions, "Ready")
}

#[tokio::test]
async fn platform_objects_report_their_state() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let status_of = |s: &str, r: &str| Some((s.to_string(), r.to_string()));

    // A DomainPool counts the Projects holding a host under each base, and
    // is Ready while its ClusterIssuer exists.
    let pools = Api::<DomainPool>::all(client.clone());
    let platform = platform(&client, "status", "HTTP01", false).await;
    let (pool_name, base) = (platform.pool.clone(), platform.base.clone());
    let registry_name = platform.registry.clone();
    let allocations = |pool: &DomainPool| {
        pool.status
            .as_ref()
            .map(|s| {
                s.allocations
                    .iter()
                    .map(|a| (a.domain.clone(), a.projects))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    within(PROMPTLY, "the pool's status", || async {
        let pool = pools.get(&pool_name).await.ok()?;
        (allocations(&pool) == [(base.clone(), 0)]).then_some(())
    })
    .await;
    assert_eq!(
        platform_ready(&pools, &pool_name).await,
        status_of("True", "Ready")
    );
    let live = live_project(&client, "counted", platform, |_| {}).await;
    within(PROMPTLY, "the pool to count the Project", || async {
        let pool = pools.get(&pool_name).await.ok()?;
        (allocations(&pool) == [(base.clone(), 1)]).then_some(())
    })
    .await;
    // The Project's last poll rode on its status writes.
    let project = Api::<Project>::all(client.clone())
        .get(&live.name)
        .await
        .unwrap();
    assert!(
        project.status.unwrap().last_poll_time.is_some(),
        "lastPollTime is set"
    );

    // A pool whose ClusterIssuer is missing says so, until it exists.
    let lonely = "status-lonely-pool";
    create(
        &pools,
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "DomainPool", "metadata": {"name": lonely},
            "spec": {"domains": ["lonely.example.com"], "clusterIssuerRef": {"name": "status-late-issuer"},
                "challenge": "HTTP01", "ingressClassName": "nginx"}}),
    )
    .await;
    within(PROMPTLY, "ClusterIssuerNotFound", || async {
        (platform_ready(&pools, lonely).await == status_of("False", "ClusterIssuerNotFound"))
            .then_some(())
    })
    .await;
    let issuers = kapsa_api::external::cert_manager_cluster_issuer();
    create(
        &Api::<DynamicObject>::all_with(client.clone(), &issuers),
        json!({"apiVersion": issuers.api_version, "kind": issuers.kind, "metadata": {"name": "status-late-issuer"},
            "spec": {"acme": {"server": "https://acme.example/directory", "solvers": [{"http01": {"ingress": {}}}]}}}),
    )
    .await;
    within(
        PROMPTLY,
        "the pool Ready once its issuer exists",
        || async {
            (platform_ready(&pools, lonely).await == status_of("True", "Ready")).then_some(())
        },
    )
    .await;

    // A ClusterRegistry is Ready while its credentials are a Docker config
    // for its server; each change of the Secret shows within seconds.
    let cluster_registries = Api::<kapsa_api::ClusterRegistry>::all(client.clone());
    assert_eq!(
        platform_ready(&cluster_registries, &registry_name).await,
        status_of("True", "CredentialsValid")
    );
    let registry = "status-late-registry";
    let secret = "status-late-push";
    create(
        &cluster_registries,
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "ClusterRegistry", "metadata": {"name": registry},
            "spec": {"provider": "Generic", "server": "registry.example:5000", "repository": "kapsa",
                "credentialsSecretRef": {"name": secret, "namespace": PLATFORM_NAMESPACE}}}),
    )
    .await;
    within(PROMPTLY, "CredentialsNotFound", || async {
        (platform_ready(&cluster_registries, registry).await
            == status_of("False", "CredentialsNotFound"))
        .then_some(())
    })
    .await;
    let secrets = Api::<Secret>::namespaced(client.clone(), PLATFORM_NAMESPACE);
    let docker_config = |server: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": secret},
            "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": format!("{{\"auths\":{{\"{server}\":{{\"auth\":\"dXNlcjpwYXNz\"}}}}}}")}})
    };
    let apply = PatchParams::apply("platform-team").force();
    secrets
        .patch(
            secret,
            &apply,
            &Patch::Apply(docker_config("other.example")),
        )
        .await
        .unwrap();
    within(PROMPTLY, "CredentialsForOtherServer", || async {
        (platform_ready(&cluster_registries, registry).await
            == status_of("False", "CredentialsForOtherServer"))
        .then_some(())
    })
    .await;
    let (_, _, message) = {
        let r = cluster_registries.get(registry).await.unwrap();
        let c = r.status.unwrap().conditions;
        let ready = c.into_iter().find(|c| c.type_ == "Ready").unwrap();
        (ready.status, ready.reason, ready.message)
    };
    assert!(message.contains("other.example"), "{message}");
    assert!(
        !message.contains("dXNlcjpwYXNz"),
        "no credential in status: {message}"
    );
    secrets
        .patch(
            secret,
            &apply,
            &Patch::Apply(docker_config("https://registry.example:5000/v2/")),
        )
        .await
        .unwrap();
    within(PROMPTLY, "CredentialsValid", || async {
        (platform_ready(&cluster_registries, registry).await
            == status_of("True", "CredentialsValid"))
        .then_some(())
    })
    .await;
    // insecure: true off loopback is refused (the operator runs without
    // --allow-insecure-registries), and allowed again once it is turned off.
    for (insecure, expected) in [
        (true, status_of("False", "InsecureRegistryNotAllowed")),
        (false, status_of("True", "CredentialsValid")),
    ] {
        cluster_registries
            .patch(
                registry,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"insecure": insecure}})),
            )
            .await
            .unwrap();
        within(PROMPTLY, &format!("insecure: {insecure}"), || async {
            (platform_ready(&cluster_registries, registry).await == expected).then_some(())
        })
        .await;
    }

    // A namespaced Registry judges a Secret of its own namespace.
    let namespace = live.name.clone();
    let registries = Api::<kapsa_api::Registry>::namespaced(client.clone(), &namespace);
    create(
        &registries,
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "Registry", "metadata": {"name": "team", "namespace": namespace},
            "spec": {"provider": "Generic", "server": "team.example", "credentialsSecretRef": {"name": "team-push"}}}),
    )
    .await;
    within(PROMPTLY, "the Registry's CredentialsNotFound", || async {
        (platform_ready(&registries, "team").await == status_of("False", "CredentialsNotFound"))
            .then_some(())
    })
    .await;
    create(
        &Api::<Secret>::namespaced(client.clone(), &namespace),
        json!({"metadata": {"name": "team-push"}, "type": "Opaque", "stringData": {"token": "x"}}),
    )
    .await;
    within(PROMPTLY, "the Registry's CredentialsInvalid", || async {
        (platform_ready(&registries, "team").await == status_of("False", "CredentialsInvalid"))
            .then_some(())
    })
    .await;
}

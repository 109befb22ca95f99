//! The real lane (docs/real-lane.md): Kapsa's objects serve real traffic. A
//! real node runs the app's pods, Traefik (a real ingress controller, run
//! outside the cluster) routes the Environment's Ingress to them, and a
//! request to the Environment's host through Traefik returns the page the
//! deployed commit serves; a new commit rolls out while requests keep
//! being answered; then the pool switches to Gateway API and Traefik's
//! Gateway provider serves the app through Kapsa's HTTPRoute, with no
//! request lost in the switch.
//!
//! Runs where the machine can run the lane and its binaries are built
//! (`hack/install-real-lane.sh`, `hack/install-traefik.sh`,
//! `hack/install-cert-manager.sh`); `KAPSA_REAL_LANE=1` builds what is
//! missing, `KAPSA_REAL_LANE=0` skips it ([`real_node::real_lane_test`]).
//!
//! `KAPSA_REAL_LANE=1 cargo test -p kapsa-operator --test real_lane -- --nocapture`
//!
//! The kpack simulator "builds" each commit into a real image in the lane's
//! registry (busybox httpd serving `commit <sha>`), so the digest Kapsa
//! deploys exists and the pod runs it. A second Project, in a pool whose
//! ClusterIssuer is the lane's `pebble`, is served over HTTPS with the
//! certificate real cert-manager obtained from Pebble by HTTP-01 through
//! Traefik, verified against Pebble's root only.

mod support;

use std::time::{Duration, Instant};

use kapsa_api::{DomainPool, Project};
use kapsa_operator::OperatorConfig;
use kapsa_testenv::acme_lane::AcmeLane;
use kapsa_testenv::http_get::TlsRoots;
use kapsa_testenv::real_node::RealNode;
use kapsa_testenv::traefik::Traefik;
use kube::api::{Api, DeleteParams};
use serde_json::json;
use support::lane::{Lane, enabled, pool_spec};
use support::*;

/// The lane's operator: its registry is plain HTTP on the pods' bridge (a
/// private address, where build Pods reach it), which an operator refuses
/// by default.
fn config() -> OperatorConfig {
    OperatorConfig {
        allow_insecure_registries: true,
        ..operator_config()
    }
}

/// A plain-HTTP GET for `host` through `address`: the status and the body.
async fn get(address: &str, host: &str, path: &str) -> Option<(u16, String)> {
    kapsa_testenv::http_get::get(address, host, path, None)
        .await
        .ok()
}

/// Requests `GET /` for a host every 20 ms until stopped (over TLS with
/// `tls`): how many were answered 200, what the others got, and the pages.
struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<ProbeResult>,
}

#[derive(Debug)]
struct ProbeResult {
    ok: u32,
    failed: Vec<String>,
    pages: std::collections::BTreeSet<String>,
}

impl Prober {
    fn start(address: &str, host: &str, tls: Option<TlsRoots>) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (address, host, stopped) = (address.to_string(), host.to_string(), stop.clone());
        let task = tokio::spawn(async move {
            let mut result = ProbeResult {
                ok: 0,
                failed: Vec::new(),
                pages: Default::default(),
            };
            let started = Instant::now();
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                match kapsa_testenv::http_get::get(&address, &host, "/", tls.as_ref()).await {
                    Ok((200, body)) => {
                        result.ok += 1;
                        result.pages.insert(body);
                    }
                    other => result
                        .failed
                        .push(format!("{:?}: {other:?}", started.elapsed())),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            result
        });
        Self { stop, task }
    }

    async fn stop(self) -> ProbeResult {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("the prober")
    }
}

/// What switching a pool to a listener of a Gateway showed.
struct Switch {
    /// From the pool's patch to `Routed=True`.
    routed_after: Duration,
    /// From the pool's patch to the Ingress pruned.
    pruned_after: Duration,
    /// The requests during the switch (and 2 s after).
    probes: ProbeResult,
    /// A request once the Ingress is gone: the HTTPRoute alone serves it.
    after: Result<kapsa_testenv::http_get::Response, String>,
}

/// Makes the Gateway `kapsa-lane/<gateway>` of class `traefik` with
/// `listener`, and switches `pool` to that listener (`sectionName`, since
/// Traefik 3.6 has no ListenerSets) while `host` is probed at `address`:
/// waits until Traefik accepted `project`'s production HTTPRoute
/// (`Routed=True`, reason `Accepted`, Traefik's controller name) and the
/// Ingress is pruned.
async fn switch_to_gateway(
    client: &kube::Client,
    pool: &str,
    project: &str,
    gateway: &str,
    listener: serde_json::Value,
    (address, host, tls): (&str, &str, Option<TlsRoots>),
) -> Switch {
    let namespace = kapsa_testenv::traefik::NAMESPACE;
    let section = listener["name"]
        .as_str()
        .expect("a listener name")
        .to_string();
    create(
        &Api::<kube::api::DynamicObject>::namespaced_with(
            client.clone(),
            namespace,
            &kapsa_api::external::gateway_gateway(),
        ),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": gateway},
            "spec": {"gatewayClassName": kapsa_testenv::traefik::GATEWAY_CLASS,
                "listeners": [listener]}}),
    )
    .await;
    let prober = Prober::start(address, host, tls.clone());
    let switched = Instant::now();
    Api::<DomainPool>::all(client.clone())
        .patch(
            pool,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"spec": {"routing": "Gateway", "gatewayRef": {
                "name": gateway, "namespace": namespace, "sectionName": section}}})),
        )
        .await
        .expect("pool switched to Gateway routing");
    let (_, reason, message) = eventually("Routed=True from Traefik", || async {
        environment_condition(client, project, "production", "Routed")
            .await
            .filter(|(s, _, _)| s == "True")
    })
    .await;
    let routed_after = switched.elapsed();
    assert_eq!(reason, "Accepted");
    assert!(
        message.contains(kapsa_testenv::traefik::GATEWAY_CONTROLLER),
        "{message}"
    );
    ingresses_pruned(client, project).await;
    let pruned_after = switched.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let probes = prober.stop().await;
    let after = kapsa_testenv::http_get::get(address, host, "/", tls.as_ref()).await;
    Switch {
        routed_after,
        pruned_after,
        probes,
        after,
    }
}

#[tokio::test]
async fn a_project_serves_its_commit_through_the_ingress_controller() {
    if !enabled(
        "a_project_serves_its_commit_through_the_ingress_controller",
        &[],
    ) {
        return;
    }
    let (env, client) = cluster().await;
    // Gateway API's CRDs before the operator starts (it watches what is
    // served at its start; it would restart its caches for them anyway).
    let gateway_crds = kapsa_testenv::crds::gateway_api_crds().expect("Gateway API CRDs");
    kapsa_testenv::crds::install_crds(&client, &gateway_crds, "kapsa-test")
        .await
        .expect("Gateway API CRDs installed");
    shared_operator_with(config).await;
    let Lane {
        mut node,
        traefik,
        acme,
        node_ready,
        acme_ready,
    } = Lane::start(env, &client, true).await;
    println!("real lane: cert-manager's ClusterIssuer pebble Ready in {acme_ready:?}");

    // Builds of the lane's registry push real images (kpack simulator).
    let _real_builds = node.build_commit_pages().expect("real builds");

    // A pool whose apps run on the real node, routed by Traefik, plain HTTP;
    // the lane's plain-HTTP registry (insecure: allowed by the lane's
    // operator).
    let base = "real.example.com";
    let pool = "real-pool";
    create_ignoring_conflict(
        &Api::<DomainPool>::all(client.clone()),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "DomainPool", "metadata": {"name": pool},
            "spec": pool_spec(base, None)}),
    )
    .await;
    let registry = "real-registry";
    create_ignoring_conflict(
        &Api::<kapsa_api::ClusterRegistry>::all(client.clone()),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "ClusterRegistry", "metadata": {"name": registry},
            "spec": {"provider": "Generic", "server": node.registry(), "repository": "kapsa", "insecure": true}}),
    )
    .await;
    let platform = Platform {
        pool: pool.into(),
        base: base.into(),
        issuer: String::new(),
        registry: registry.into(),
        registry_server: node.registry().into(),
    };
    let name = "realapp";
    let git = kapsa_testenv::git_server::GitServer::start(None)
        .await
        .expect("git server");
    let repo = git.create_repo(name).expect("repository");
    let first = repo
        .commit("main", "app.txt", "v1", "first")
        .expect("commit");
    let mut manifest = project_manifest(name, repo.url(), &platform, None);
    manifest["spec"]["runtime"] = json!({"port": 8080, "replicas": 2,
        "healthCheck": {"path": "/healthz"},
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}});
    let applied = Instant::now();
    create(&Api::<Project>::all(client.clone()), manifest).await;
    let environment = rolled_out(&client, name, &first).await;
    let ready_after = applied.elapsed();
    let image = environment.status.and_then(|s| s.image).unwrap_or_default();
    assert!(
        image.starts_with(&format!("{}/kapsa/{name}", node.registry())),
        "the real image in the lane's registry: {image}"
    );
    let host = format!("{name}.{base}");
    let address = traefik.http_address().to_string();
    let (status, body) = eventually("the page through Traefik", || async {
        get(&address, &host, "/").await.filter(|(s, _)| *s == 200)
    })
    .await;
    let served_after = applied.elapsed();
    assert_eq!(status, 200);
    assert_eq!(body, format!("commit {first}\n"), "the deployed commit");
    // Another host is not this app's.
    let (other, _) = get(&address, &format!("nobody.{base}"), "/")
        .await
        .expect("Traefik answers");
    assert_eq!(other, 404);

    // A new commit rolls out while requests keep being answered.
    let prober = Prober::start(&address, &host, None);
    let committed = Instant::now();
    let second = repo
        .commit("main", "app.txt", "v2", "second")
        .expect("second commit");
    let second_page = format!("commit {second}\n");
    eventually("the second commit through Traefik", || async {
        get(&address, &host, "/")
            .await
            .filter(|(s, b)| *s == 200 && *b == second_page)
    })
    .await;
    let second_after = committed.elapsed();
    // Keep probing until the rollout is over (the old pods gone).
    rolled_out(&client, name, &second).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ProbeResult { ok, failed, pages } = prober.stop().await;
    println!(
        "real lane: node Ready in {node_ready:?}; Project applied -> production Ready {ready_after:?}, -> served through Traefik {served_after:?}; second commit -> served {second_after:?} (polling every 10 s); during the rollout {ok} requests answered 200, {} failed",
        failed.len()
    );
    assert_eq!(
        pages,
        [format!("commit {first}\n"), second_page.clone()].into(),
        "only the two releases answered"
    );
    assert!(
        failed.is_empty(),
        "requests failed during the rollout: {failed:?}\nTraefik log: {}",
        kapsa_testenv::process::log_tail(&traefik.log_path(), 30)
    );

    // The same app through Gateway API: Traefik's Gateway provider serves a
    // Gateway whose plain-HTTP listener covers the pool's base. (Traefik 3.6
    // does not support ListenerSets, so the pool attaches routes to that
    // listener: gatewayRef.sectionName.) The switch drops no request: the
    // Ingress goes only once Traefik has accepted the HTTPRoute.
    let Switch {
        routed_after,
        probes: ProbeResult { ok, failed, .. },
        after,
        ..
    } = switch_to_gateway(
        &client,
        pool,
        name,
        "lane",
        json!({"name": "apps", "hostname": format!("*.{base}"), "port": 80, "protocol": "HTTP",
            "allowedRoutes": {"namespaces": {"from": "All"}}}),
        (&address, &host, None),
    )
    .await;
    assert_eq!(
        after,
        Ok((200, second_page.clone())),
        "served by the HTTPRoute alone"
    );
    println!(
        "real lane: switch to Gateway API -> Routed=True by Traefik in {routed_after:?}; during the switch {ok} requests answered 200, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed during the switch to Gateway API: {failed:?}\nTraefik log: {}",
        kapsa_testenv::process::log_tail(&traefik.log_path(), 30)
    );

    Api::<Project>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
        .expect("Project deleted");

    served_over_https(&client, &node, &traefik, &acme, &git).await;

    drop(acme);
    drop(traefik);
    node.stop();
}

/// A Project in a pool whose ClusterIssuer is the lane's `pebble`: real
/// cert-manager obtains its host's certificate from Pebble (HTTP-01,
/// validated through Traefik on port 80), Traefik serves it on 443, and a
/// client that trusts only Pebble's root gets the deployed commit; a new
/// commit rolls out over HTTPS with no failed request.
async fn served_over_https(
    client: &kube::Client,
    node: &RealNode,
    traefik: &Traefik,
    acme: &AcmeLane,
    git: &kapsa_testenv::git_server::GitServer,
) {
    let base = "tls.example.com";
    let pool = "real-tls-pool";
    create_ignoring_conflict(
        &Api::<DomainPool>::all(client.clone()),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "DomainPool", "metadata": {"name": pool},
            "spec": pool_spec(base, Some(kapsa_testenv::acme_lane::CLUSTER_ISSUER))}),
    )
    .await;
    let platform = Platform {
        pool: pool.into(),
        base: base.into(),
        issuer: kapsa_testenv::acme_lane::CLUSTER_ISSUER.into(),
        registry: "real-registry".into(),
        registry_server: node.registry().into(),
    };
    let name = "secureapp";
    let repo = git.create_repo(name).expect("repository");
    let first = repo
        .commit("main", "app.txt", "v1", "first")
        .expect("commit");
    let mut manifest = project_manifest(name, repo.url(), &platform, None);
    manifest["spec"]["runtime"] = json!({"port": 8080, "replicas": 2,
        "healthCheck": {"path": "/healthz"},
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}});
    let applied = Instant::now();
    create(&Api::<Project>::all(client.clone()), manifest).await;
    rolled_out(client, name, &first).await;
    let ready_after = applied.elapsed();
    let (tls, reason, message) = environment_condition(client, name, "production", "TLSReady")
        .await
        .expect("TLSReady");
    assert_eq!(tls, "True", "TLSReady: {reason}: {message}");

    let host = format!("{name}.{base}");
    let https = traefik.https_address().to_string();
    let pebble = TlsRoots::from_pem_file(acme.acme_ca()).expect("Pebble's root");
    let last = std::sync::Mutex::new(String::new());
    let answered = kapsa_testenv::wait::try_eventually(support::TIMEOUT, || async {
        let answer = kapsa_testenv::http_get::get(&https, &host, "/", Some(&pebble)).await;
        *last.lock().unwrap() = format!("{answer:?}");
        answer.ok().filter(|(s, _)| *s == 200)
    })
    .await;
    let Some((status, body)) = answered else {
        panic!(
            "no page over HTTPS with Pebble's certificate; the last answer: {}\nTraefik log: {}",
            last.lock().unwrap(),
            kapsa_testenv::process::log_tail(&traefik.log_path(), 30)
        );
    };
    let served_after = applied.elapsed();
    assert_eq!((status, body), (200, format!("commit {first}\n")));
    // Verification is real: a client trusting another root refuses it.
    let other_root = std::fs::read(node.dir().join("acme/pebble.crt")).expect("another root");
    let refused = kapsa_testenv::http_get::get(
        &https,
        &host,
        "/",
        Some(&TlsRoots::from_pem(&other_root).expect("a root")),
    )
    .await
    .expect_err("a certificate Pebble issued is not trusted by another root");
    assert!(refused.contains("certificate"), "{refused}");

    // The certificate came by ACME: cert-manager made an Order for the host.
    let orders = Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        name,
        &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "acme.cert-manager.io",
            "v1",
            "Order",
        )),
    );
    let valid = orders
        .list(&Default::default())
        .await
        .expect("Orders")
        .items
        .into_iter()
        .filter(|o| o.data["status"]["state"] == "valid")
        .count();
    assert!(valid >= 1, "a valid ACME Order for {host}");

    // A new commit rolls out over HTTPS while requests keep being answered.
    let prober = Prober::start(&https, &host, Some(pebble.clone()));
    let second = repo
        .commit("main", "app.txt", "v2", "second")
        .expect("second commit");
    let second_page = format!("commit {second}\n");
    eventually("the second commit over HTTPS", || async {
        kapsa_testenv::http_get::get(&https, &host, "/", Some(&pebble))
            .await
            .ok()
            .filter(|(s, b)| *s == 200 && *b == second_page)
    })
    .await;
    rolled_out(client, name, &second).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ProbeResult { ok, failed, .. } = prober.stop().await;
    println!(
        "real lane, HTTPS: Project applied -> production Ready (certificate from Pebble) {ready_after:?}, -> served over HTTPS {served_after:?}; during the second rollout {ok} HTTPS requests answered 200, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "HTTPS requests failed during the rollout: {failed:?}\nTraefik log: {}",
        kapsa_testenv::process::log_tail(&traefik.log_path(), 30)
    );

    // HTTPS through Gateway API: the platform's Gateway has an HTTPS
    // listener for the pool's hosts whose certificate cert-manager obtained
    // from Pebble (Traefik 3.6 has no ListenerSets, so the pool attaches
    // routes to that listener). The switch drops no HTTPS request.
    let lane_namespace = kapsa_testenv::traefik::NAMESPACE;
    let certificates = Api::<kube::api::DynamicObject>::namespaced_with(
        client.clone(),
        lane_namespace,
        &kapsa_api::external::cert_manager_certificate(),
    );
    create(
        &certificates,
        json!({"apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": "lane-tls-apps"},
            "spec": {"secretName": "lane-tls-apps", "dnsNames": [host],
                "issuerRef": {"name": kapsa_testenv::acme_lane::CLUSTER_ISSUER, "kind": "ClusterIssuer"}}}),
    )
    .await;
    eventually("the Gateway listener's certificate from Pebble", || async {
        let certificate = certificates.get("lane-tls-apps").await.ok()?;
        certificate.data["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
            .then_some(())
    })
    .await;
    let Switch {
        routed_after,
        pruned_after,
        probes: ProbeResult { ok, failed, .. },
        after,
    } = switch_to_gateway(
        client,
        pool,
        name,
        "lane-tls",
        json!({"name": "apps-https", "hostname": format!("*.{base}"), "port": 443,
            "protocol": "HTTPS",
            "tls": {"mode": "Terminate", "certificateRefs": [{"name": "lane-tls-apps"}]},
            "allowedRoutes": {"namespaces": {"from": "All"}}}),
        (&https, &host, Some(pebble.clone())),
    )
    .await;
    assert_eq!(
        after,
        Ok((200, second_page.clone())),
        "served by the HTTPRoute alone"
    );
    let (tls, reason, _) = environment_condition(client, name, "production", "TLSReady")
        .await
        .expect("TLSReady");
    assert_eq!((tls.as_str(), reason.as_str()), ("True", "GatewayListener"));
    println!(
        "real lane, HTTPS through Gateway API: Routed=True in {routed_after:?}, the Ingress pruned after {pruned_after:?}; during the switch {ok} HTTPS requests answered 200, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "HTTPS requests failed during the switch to Gateway API: {failed:?}\nTraefik log: {}",
        kapsa_testenv::process::log_tail(&traefik.log_path(), 30)
    );

    Api::<Project>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
        .expect("Project deleted");
}

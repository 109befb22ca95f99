//! Missed events (the perturbation suite's second kind): kube-apiserver
//! restarts while the operator runs. Every watch breaks; resumed from a
//! resourceVersion older than the new API server's watch cache, a watch
//! gets `410 Gone` and must list again. While the API server is down a new
//! commit is pushed, and right after it is back (before the operator's
//! watches have come back: they back off) a Project's Deployment and
//! Service are deleted: events the operator never sees as events. It must
//! converge anyway: the children back, the new commit live, one build per
//! commit, and then no writes at rest.
//!
//! It found two bugs (fixed in run.rs): a watch error passed on to kube's
//! Controller in a trigger stream stalled that stream, so the Environment
//! controller's Deployment and Service caches stayed stale for minutes
//! after the restart (the deleted children were not back after 90 s); and
//! a relist dropped deleted objects from a cache without telling their
//! owners.
//!
//! The test has a control plane of its own (the shared one cannot be
//! restarted under the other tests of a binary). The oracle is the API
//! server: objects, and its audit log for the operator's requests (it runs
//! as a user of its own).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Service};
use kapsa_api::Project;
use kapsa_operator::metrics::Metrics;
use kapsa_testenv::control_plane::{ControlPlane, ControlPlaneOptions};
use kapsa_testenv::git_server::GitServer;
use kapsa_testenv::simulators::kpack::image_resource;
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject};
use serde_json::json;
use support::*;

const OPERATOR: &str = "kapsa-missed-events";

async fn builds(client: &Client, project: &str) -> i64 {
    Api::<DynamicObject>::namespaced_with(
        client.clone(),
        &kapsa_api::naming::build_namespace(project),
        &image_resource(),
    )
    .get("production")
    .await
    .ok()
    .and_then(|i| i.data["status"]["buildCounter"].as_i64())
    .unwrap_or(0)
}

/// What the operator did since `mark`, as the API server saw it.
async fn operator_requests(
    log: &kapsa_testenv::AuditLog,
    mark: kapsa_testenv::AuditMark,
) -> Vec<kapsa_testenv::audit::AuditEvent> {
    log.events_since(mark)
        .await
        .into_iter()
        .filter(|e| e.user == OPERATOR)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_converges_across_an_api_server_restart() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let mut plane = ControlPlane::start_with_audit_log(ControlPlaneOptions::default())
        .await
        .expect("a control plane");
    let log = plane.audit_log().expect("its audit log");
    let client = plane.client().await.expect("a client");
    kapsa_testenv::simulators::install(&client)
        .await
        .expect("simulators installed");
    let simulators = tokio::spawn(kapsa_testenv::simulators::run(client.clone()));
    let crds = kapsa_testenv::crds::parse_crds(&kapsa_api::crds_yaml()).expect("CRDs");
    kapsa_testenv::crds::install_crds(&client, &crds, "kapsa")
        .await
        .expect("CRDs installed");
    create_ignoring_conflict(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": PLATFORM_NAMESPACE}}),
    )
    .await;
    let builder = kapsa_api::external::kpack_cluster_builder();
    create_ignoring_conflict(
        &Api::<DynamicObject>::all_with(client.clone(), &builder),
        json!({"apiVersion": builder.api_version, "kind": builder.kind, "metadata": {"name": "default"},
            "spec": {"tag": "registry.example/builders/default"}}),
    )
    .await;
    let operator_client = kapsa_testenv::client_from_kubeconfig(
        &plane
            .kubeconfig_as(OPERATOR, &["system:masters"])
            .expect("the operator's kubeconfig"),
    )
    .await
    .expect("the operator's client");
    let operator = tokio::spawn(kapsa_operator::run(
        operator_client,
        kapsa_operator::OperatorConfig {
            // Polls every 2 s, whatever the Projects ask.
            max_poll_interval: Some(Duration::from_secs(2)),
            ..operator_config()
        },
        Arc::new(Metrics::default()),
        futures::future::pending(),
    ));

    let platform = platform(&client, "missed", "HTTP01", false).await;
    let git = GitServer::start(None).await.expect("git server");
    let (committed, deleted) = ("me-commit", "me-deleted");
    let mut firsts = Vec::new();
    let mut repos = Vec::new();
    for name in [committed, deleted] {
        let repo = git.create_repo(name).expect("repository");
        let first = repo.commit("main", "a", "1", "one").expect("commit");
        create(
            &Api::<Project>::all(client.clone()),
            project_manifest(name, repo.url(), &platform, None),
        )
        .await;
        firsts.push(first);
        repos.push(repo);
    }
    for (name, first) in [committed, deleted].iter().zip(&firsts) {
        rolled_out(&client, name, first).await;
    }
    platform_settled(&client, &platform).await;
    let deployment_uid = Api::<Deployment>::namespaced(client.clone(), deleted)
        .get("production")
        .await
        .expect("the Deployment")
        .metadata
        .uid;

    // The API server goes away for 3 s; meanwhile a commit is pushed.
    let restart = log.mark().await;
    let restarted = Instant::now();
    let second = repos[0].commit("main", "a", "2", "two").expect("commit");
    plane
        .restart_api_server(Duration::from_secs(3))
        .await
        .expect("kube-apiserver restarted");
    let back_after = restarted.elapsed();
    // Right away: children deleted behind the operator's back.
    let client = plane.client().await.expect("a client after the restart");
    Api::<Deployment>::namespaced(client.clone(), deleted)
        .delete("production", &DeleteParams::default())
        .await
        .expect("the Deployment deleted");
    Api::<Service>::namespaced(client.clone(), deleted)
        .delete("production", &DeleteParams::default())
        .await
        .expect("the Service deleted");

    // Convergence: the children back (new objects), the new commit live.
    let recreated = kapsa_testenv::wait::try_eventually(TIMEOUT, || async {
        let d = Api::<Deployment>::namespaced(client.clone(), deleted)
            .get("production")
            .await
            .ok()?;
        Api::<Service>::namespaced(client.clone(), deleted)
            .get("production")
            .await
            .ok()?;
        (d.metadata.uid != deployment_uid).then_some(restarted.elapsed())
    })
    .await;
    let Some(recreated) = recreated else {
        let seen: Vec<String> = operator_requests(&log, restart)
            .await
            .iter()
            .filter(|e| e.resource != "leases")
            .map(|e| {
                format!(
                    "{} {} {} {}",
                    e.verb, e.request_uri, e.response_code, e.stage_timestamp
                )
            })
            .collect();
        panic!(
            "the deleted Deployment and Service did not come back in {TIMEOUT:?}; the operator's requests since the restart:\n{}",
            seen.join("\n")
        );
    };
    rolled_out(&client, deleted, &firsts[1]).await;
    rolled_out(&client, committed, &second).await;
    let converged = restarted.elapsed();
    assert_eq!(builds(&client, committed).await, 2, "one build per commit");
    assert_eq!(
        builds(&client, deleted).await,
        1,
        "no rebuild for the deletion"
    );

    // The operator listed again after the restart (a watch resumed from an
    // old resourceVersion got 410 Gone), as the API server saw it.
    let requests = operator_requests(&log, restart).await;
    let lists: std::collections::BTreeSet<String> = requests
        .iter()
        .filter(|e| e.verb == "list")
        .map(|e| e.target())
        .collect();
    for resource in ["deployments", "services"] {
        assert!(
            lists.contains(resource),
            "the operator listed {resource} again after the restart; it listed {lists:?}"
        );
    }

    // At rest: writes stop, then none while nothing changes (several poll
    // intervals of 2 s), Lease renewals aside.
    let operator_writes = |events: &[kapsa_testenv::audit::AuditEvent]| {
        events
            .iter()
            .filter(|e| e.is_write() && e.resource != "leases")
            .count()
    };
    let mut settled = operator_writes(&operator_requests(&log, restart).await);
    for round in 0.. {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = operator_writes(&operator_requests(&log, restart).await);
        if now == settled {
            break;
        }
        assert!(round < 20, "the operator's writes never stopped");
        settled = now;
    }
    let idle = log.mark().await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let at_rest: Vec<String> = operator_requests(&log, idle)
        .await
        .iter()
        .filter(|e| e.is_write() && e.resource != "leases")
        .map(|e| format!("{} {} {}/{}", e.verb, e.target(), e.namespace, e.name))
        .collect();
    assert!(at_rest.is_empty(), "writes at rest: {at_rest:?}");
    println!(
        "missed events: kube-apiserver back after {back_after:?}; deleted children back {recreated:?} and the new commit live {converged:?} after the restart began; {settled} operator writes (Leases aside) until at rest, none in 8 s after"
    );
    operator.abort();
    simulators.abort();
}

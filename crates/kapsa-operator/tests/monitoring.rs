//! App metrics against the real control plane: a Project with
//! `runtime.metrics` on a cluster without the Prometheus Operator goes live
//! with `Monitored=False`; once the Prometheus Operator's real CRDs (from
//! its Go module, hack/install-prometheus-operator-crds.sh) are installed,
//! the running operator starts watching ServiceMonitors by itself and makes
//! one per Environment, writing nothing else; removing `runtime.metrics`
//! prunes it.
//!
//! A test binary of its own: installing a CRD changes the cluster for every
//! test of the binary.

mod support;

use k8s_openapi::api::core::v1::Service;
use kapsa_api::{Environment, Project};
use kapsa_testenv::audit::{by_user, summary_by};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::json;
use support::*;

const OPERATOR: &str = "kapsa-monitoring";

#[tokio::test]
async fn service_monitor_once_the_prometheus_operator_is_installed() {
    let (env, client) = cluster().await;
    let log = env.audit_log();
    let (stop, until) = {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        (tx, async move {
            let _ = rx.await;
        })
    };
    let (_, operator) = operator_until(env.client_as(OPERATOR, &["system:masters"]).await, until);
    let platform = platform(&client, "metrics", "HTTP01", false).await;
    let name = "metered";
    let settled = platform.clone();
    let live = live_project(&client, name, platform, |manifest| {
        manifest["spec"]["runtime"]["metrics"] = json!({"port": 9090, "path": "/prom"});
    })
    .await;

    // No Prometheus Operator: the app serves, its Service exposes the
    // metrics port, and the Environment says what is missing.
    let (status, reason, message) = eventually("Monitored=False", || async {
        environment_condition(&client, name, "production", "Monitored").await
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("False", "PrometheusOperatorNotInstalled"),
        "{message}"
    );
    let service = Api::<Service>::namespaced(client.clone(), name)
        .get("production")
        .await
        .unwrap();
    let metrics_port = service
        .spec
        .as_ref()
        .unwrap()
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .cloned()
        .expect("the Service exposes the metrics port");
    assert_eq!(metrics_port.port, 9090);
    let project = Api::<Project>::all(client.clone()).get(name).await.unwrap();
    let implemented = condition_of(&project.status.unwrap().conditions, "Implemented");
    assert_eq!(
        implemented,
        Some(("True".into(), "AllImplemented".into())),
        "runtime.metrics is acted on"
    );

    // The platform team installs the Prometheus Operator's CRDs, once the
    // operator has nothing else to do.
    platform_settled(&client, &settled).await;
    let mark = log.mark().await;
    let crds =
        kapsa_testenv::crds::prometheus_operator_crds().expect("the Prometheus Operator CRDs");
    assert!(
        crds.iter()
            .any(|c| c.metadata.name.as_deref() == Some("servicemonitors.monitoring.coreos.com")),
        "the module ships the ServiceMonitor CRD"
    );
    kapsa_testenv::crds::install_crds(&client, &crds, "platform-team")
        .await
        .expect("CRDs installed");
    let resource = kapsa_api::external::prometheus_service_monitor();
    let monitors: Api<DynamicObject> = Api::namespaced_with(client.clone(), name, &resource);
    let monitor = eventually("the ServiceMonitor", || async {
        monitors.get_opt("production").await.ok().flatten()
    })
    .await;
    let (status, reason, _) = eventually("Monitored=True", || async {
        environment_condition(&client, name, "production", "Monitored")
            .await
            .filter(|(status, _, _)| status == "True")
    })
    .await;
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", "ServiceMonitorApplied")
    );

    // What the real CRD accepted: it selects exactly the Environment's
    // Service and scrapes its metrics port at the Project's path.
    let environment = Api::<Environment>::namespaced(client.clone(), name)
        .get("production")
        .await
        .unwrap();
    let owner = &monitor.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("Environment", "production", Some(true))
    );
    assert_eq!(Some(&owner.uid), environment.metadata.uid.as_ref());
    assert_eq!(
        monitor.data["spec"]["endpoints"],
        json!([{"port": "metrics", "path": "/prom", "scheme": "http"}])
    );
    let selector = monitor.data["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
        .clone();
    let service_labels = service.metadata.labels.clone().unwrap();
    assert!(!selector.is_empty());
    for (key, value) in &selector {
        assert_eq!(
            service_labels.get(key).map(String::as_str),
            value.as_str(),
            "the Service carries the selector's {key}"
        );
    }

    // Starting its caches again wrote nothing but the ServiceMonitor and the
    // Environment's status (and an Event, perhaps): judged by the API
    // server's audit log.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let events = log.events_since(mark).await;
    let writes: Vec<_> = events
        .iter()
        .filter(|e| by_user(OPERATOR)(e) && e.is_write())
        .filter(|e| !matches!(e.target().as_str(), "events"))
        .collect();
    let summary = summary_by(&events, OPERATOR);
    for write in &writes {
        assert!(
            matches!(
                (write.target().as_str(), write.name.as_str()),
                ("servicemonitors", "production")
                    | ("environments/status", "production")
                    | ("projects/status", "metered")
            ),
            "an unexpected write after the CRD appeared: {write}\n{summary:#?}"
        );
    }
    assert_eq!(
        writes
            .iter()
            .filter(|w| w.target() == "servicemonitors")
            .count(),
        1,
        "{summary:#?}"
    );

    // runtime.metrics removed: the ServiceMonitor goes, and the condition.
    Api::<Project>::all(client.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"runtime": {"metrics": null}}})),
        )
        .await
        .unwrap();
    eventually("the ServiceMonitor to be pruned", || async {
        monitors
            .get_opt("production")
            .await
            .ok()
            .and_then(|m| m.is_none().then_some(()))
    })
    .await;
    eventually("the Monitored condition to go", || async {
        environment_condition(&client, name, "production", "Monitored")
            .await
            .is_none()
            .then_some(())
    })
    .await;

    let _ = stop.send(());
    operator.await.unwrap();
    drop(live);
}

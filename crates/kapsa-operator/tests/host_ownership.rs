//! A Kapsa host belongs to exactly one Project: the shipped
//! ValidatingAdmissionPolicy (deploy/admission/host-ownership.yaml), fed by
//! the operator's host-ownership table, refuses another namespace's Ingress
//! for it. Installed on the real API server; the tenant is a user with the
//! `admin` role in its own namespace only.

mod support;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::*;

/// The operator's user in these tests (a client certificate, not a
/// ServiceAccount): the policy's exemption is rewritten to name it.
const OPERATOR: &str = "kapsa-host-operator";

fn ingress(name: &str, host: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": name},
        "spec": {"rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
            "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]}})
}

#[tokio::test]
async fn only_the_holders_namespace_routes_a_kapsa_host() {
    let (env, client) = cluster().await;
    // The operator, as its own user, keeping the table in kapsa-system.
    let operator_client = env.client_as(OPERATOR, &["system:masters"]).await;
    let config = kapsa_operator::OperatorConfig {
        host_owners_namespace: Some(PLATFORM_NAMESPACE.into()),
        ..operator_config()
    };
    tokio::spawn(kapsa_operator::run(
        operator_client,
        config,
        Default::default(),
        futures::future::pending(),
    ));
    let alpha = live_project(
        &client,
        "alpha",
        platform(&client, "hostown", "HTTP01", false).await,
        |_| {},
    )
    .await;
    let base = alpha.platform.base.clone();
    let beta = live_project(
        &client,
        "beta",
        platform(&client, "hostown", "HTTP01", false).await,
        |_| {},
    )
    .await;
    // The table names both holders.
    let table = eventually("the host-ownership table", || async {
        let cm = Api::<ConfigMap>::namespaced(client.clone(), PLATFORM_NAMESPACE)
            .get_opt("kapsa-host-owners")
            .await
            .ok()??;
        let data = cm.data?;
        (data.get(&format!("alpha.{base}")).map(String::as_str) == Some("alpha")
            && data.get(&format!("beta.{base}")).map(String::as_str) == Some("beta"))
        .then_some(data)
    })
    .await;
    assert!(table["_bases"].split(',').any(|b| b == base));

    install_host_ownership_policy(&client, OPERATOR).await;

    // The tenant of alpha: admin of its namespace, nothing more.
    create(
        &Api::<RoleBinding>::namespaced(client.clone(), "alpha"),
        json!({"metadata": {"name": "tenant-admin"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
            "subjects": [{"kind": "User", "name": "alpha-dev", "apiGroup": "rbac.authorization.k8s.io"}]}),
    )
    .await;
    let tenant = env.client_as("alpha-dev", &[]).await;
    let ingresses: Api<Ingress> = Api::namespaced(tenant, "alpha");
    let create_ingress = |name: &str, host: String| {
        let ingresses = ingresses.clone();
        let object: Ingress = serde_json::from_value(ingress(name, &host)).unwrap();
        async move { ingresses.create(&PostParams::default(), &object).await }
    };

    // Another Project's host, one under it (a preview's), the base itself,
    // and a host under the base that nobody holds: refused.
    for (name, host) in [
        ("steal", format!("beta.{base}")),
        ("steal-preview", format!("feature.beta.{base}")),
        ("base", base.clone()),
        ("unclaimed", format!("nobody.{base}")),
    ] {
        // The policy takes a moment to be enforced after it is created.
        let message = eventually(&format!("{name}: refused"), || async {
            match create_ingress(name, host.clone()).await {
                Err(kube::Error::Api(status)) if status.code == 403 || status.code == 422 => {
                    Some(status.message)
                }
                Ok(_) => {
                    let _ = ingresses.delete(name, &Default::default()).await;
                    None
                }
                Err(_) => None,
            }
        })
        .await;
        assert!(
            message.contains("belongs to the Project that holds it"),
            "{name}: {message}"
        );
    }
    // Its own host and hosts below it, and hosts outside every base: allowed.
    for (name, host) in [
        ("own", format!("alpha.{base}")),
        ("own-preview", format!("www.alpha.{base}")),
        ("elsewhere", "shop.example.org".to_string()),
    ] {
        create_ingress(name, host.clone())
            .await
            .unwrap_or_else(|e| panic!("{name} ({host}) refused: {e}"));
    }
    // The operator itself still applies Ingresses (beta keeps serving).
    assert!(
        Api::<Ingress>::namespaced(client.clone(), "beta")
            .get_opt("production")
            .await
            .unwrap()
            .is_some()
    );
    drop(beta);
}

//! The Gateway API simulator against a real API server with the real Gateway
//! API CRDs (standard channel): the statuses it writes pass the CRDs'
//! validation, and it follows changes to the Gateway and to Services.
//!
//! A control plane of its own, so the simulator runs here once, started
//! before the CRDs exist (as in the shared control plane, where it waits for
//! a test to install them).

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Service};
use kapsa_testenv::simulators::gateway::{
    self, CONTROLLER_NAME, GROUP, gateway_resource, http_route_resource, listener_set_resource,
};
use kapsa_testenv::{ControlPlane, ControlPlaneOptions, crds};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

/// Waiting for the simulator after a change.
const REACTION: Duration = Duration::from_secs(10);
/// Waiting for the first statuses (the simulator polls discovery every
/// second, then fills its caches).
const START: Duration = Duration::from_secs(30);

async fn create<K>(api: &Api<K>, value: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("valid object");
    api.create(&PostParams::default(), &object)
        .await
        .expect("object created")
}

async fn create_dynamic(client: &Client, resource: &ApiResource, namespace: &str, value: Value) {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
    let mut object: DynamicObject = serde_json::from_value(value).expect("valid object");
    object.types = Some(kube::api::TypeMeta {
        api_version: resource.api_version.clone(),
        kind: resource.kind.clone(),
    });
    api.create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("{} created: {e}", resource.kind));
}

async fn get(
    client: &Client,
    resource: &ApiResource,
    namespace: &str,
    name: &str,
) -> DynamicObject {
    Api::<DynamicObject>::namespaced_with(client.clone(), namespace, resource)
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("{} {namespace}/{name}: {e}", resource.kind))
}

/// `(status, reason)` of the condition `type_` in a `conditions` list.
fn condition(conditions: &Value, type_: &str) -> Option<(String, String)> {
    let c = conditions.as_array()?.iter().find(|c| c["type"] == type_)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
    ))
}

fn is(conditions: &Value, type_: &str, status: &str, reason: &str) -> bool {
    condition(conditions, type_) == Some((status.to_string(), reason.to_string()))
}

/// The simulator's `status.parents[]` entry of a route.
fn our_parent(route: &DynamicObject) -> Option<Value> {
    route.data["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == CONTROLLER_NAME)
        .cloned()
}

async fn eventually<T, F, Fut>(timeout: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    kapsa_testenv::wait::eventually(timeout, what, check).await
}

#[tokio::test]
async fn gateway_simulator_follows_allowed_listeners_and_backends() {
    let plane = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("a control plane starts");
    let client = plane.client().await.expect("a client");
    let simulator = tokio::spawn(gateway::run(client.clone()));
    let gateway_crds = crds::gateway_api_crds().expect("the Gateway API CRDs");
    crds::install_crds(&client, &gateway_crds, "kapsa-testenv-test")
        .await
        .expect("the Gateway API CRDs are installed");

    let namespaces: Api<Namespace> = Api::all(client.clone());
    for name in ["infra", "shop"] {
        create(&namespaces, json!({"metadata": {"name": name}})).await;
    }
    create_dynamic(
        &client,
        &gateway_resource(),
        "infra",
        json!({
            "metadata": {"name": "shared"},
            "spec": {
                "gatewayClassName": "kapsa-simulator",
                "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}],
            },
        }),
    )
    .await;
    create_dynamic(
        &client,
        &listener_set_resource(),
        "shop",
        json!({
            "metadata": {"name": "shop"},
            "spec": {
                "parentRef": {"group": GROUP, "kind": "Gateway", "name": "shared", "namespace": "infra"},
                "listeners": [{
                    "name": "https",
                    "hostname": "shop.apps.example.com",
                    "port": 443,
                    "protocol": "HTTPS",
                    "tls": {"certificateRefs": [{"name": "shop-tls"}]},
                }],
            },
        }),
    )
    .await;
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    create(
        &services,
        json!({
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]},
        }),
    )
    .await;
    let route = |name: &str, service: &str| {
        json!({
            "metadata": {"name": name},
            "spec": {
                "parentRefs": [{"group": GROUP, "kind": "ListenerSet", "name": "shop"}],
                "hostnames": ["shop.apps.example.com"],
                "rules": [{"backendRefs": [{"name": service, "port": 80}]}],
            },
        })
    };
    create_dynamic(&client, &http_route_resource(), "shop", route("web", "web")).await;
    create_dynamic(
        &client,
        &http_route_resource(),
        "shop",
        route("broken", "missing"),
    )
    .await;

    // The Gateway allows no ListenerSets (no allowedListeners): the
    // ListenerSet is refused, so the route has no parent to attach to.
    eventually(
        START,
        "the Gateway to be Accepted and Programmed",
        || async {
            let gw = get(&client, &gateway_resource(), "infra", "shared").await;
            let c = &gw.data["status"]["conditions"];
            (is(c, "Accepted", "True", "Accepted") && is(c, "Programmed", "True", "Programmed"))
                .then_some(())
        },
    )
    .await;
    eventually(
        START,
        "the ListenerSet to be refused: NotAllowed",
        || async {
            let ls = get(&client, &listener_set_resource(), "shop", "shop").await;
            let c = &ls.data["status"]["conditions"];
            (is(c, "Accepted", "False", "NotAllowed") && is(c, "Programmed", "False", "Invalid"))
                .then_some(())
        },
    )
    .await;
    eventually(
        START,
        "the route to be refused: NoMatchingParent",
        || async {
            let parent = our_parent(&get(&client, &http_route_resource(), "shop", "web").await)?;
            let c = &parent["conditions"];
            (is(c, "Accepted", "False", "NoMatchingParent")
                && is(c, "ResolvedRefs", "True", "ResolvedRefs")
                && parent["parentRef"]["kind"] == "ListenerSet")
                .then_some(())
        },
    )
    .await;

    // The Gateway opens up: ListenerSet and routes are accepted.
    Api::<DynamicObject>::namespaced_with(client.clone(), "infra", &gateway_resource())
        .patch(
            "shared",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"allowedListeners": {"namespaces": {"from": "All"}}}})),
        )
        .await
        .expect("the Gateway patched");
    eventually(REACTION, "the ListenerSet to be Accepted", || async {
        let ls = get(&client, &listener_set_resource(), "shop", "shop").await;
        let status = &ls.data["status"];
        let listener = &status["listeners"][0];
        (is(&status["conditions"], "Accepted", "True", "Accepted")
            && is(&status["conditions"], "Programmed", "True", "Programmed")
            && listener["name"] == "https"
            && listener["attachedRoutes"] == 2
            && listener["supportedKinds"] == json!([{"group": GROUP, "kind": "HTTPRoute"}])
            && is(&listener["conditions"], "Accepted", "True", "Accepted")
            && is(&listener["conditions"], "Programmed", "True", "Programmed")
            && is(
                &listener["conditions"],
                "ResolvedRefs",
                "True",
                "ResolvedRefs",
            ))
        .then_some(())
    })
    .await;
    eventually(REACTION, "the route to be Accepted", || async {
        let parent = our_parent(&get(&client, &http_route_resource(), "shop", "web").await)?;
        let c = &parent["conditions"];
        (is(c, "Accepted", "True", "Accepted") && is(c, "ResolvedRefs", "True", "ResolvedRefs"))
            .then_some(())
    })
    .await;
    eventually(
        REACTION,
        "the route to a missing Service to be Accepted, with BackendNotFound",
        || async {
            let parent = our_parent(&get(&client, &http_route_resource(), "shop", "broken").await)?;
            let c = &parent["conditions"];
            (is(c, "Accepted", "True", "Accepted")
                && is(c, "ResolvedRefs", "False", "BackendNotFound"))
            .then_some(())
        },
    )
    .await;
    eventually(REACTION, "the Gateway to count the ListenerSet", || async {
        let gw = get(&client, &gateway_resource(), "infra", "shared").await;
        (gw.data["status"]["attachedListenerSets"] == 1
            && gw.data["status"]["listeners"][0]["attachedRoutes"] == 0)
            .then_some(())
    })
    .await;

    // The missing Service appears: the route's references resolve.
    create(
        &services,
        json!({
            "metadata": {"name": "missing"},
            "spec": {"selector": {"app": "missing"}, "ports": [{"port": 80}]},
        }),
    )
    .await;
    eventually(REACTION, "the route's backend to resolve", || async {
        let parent = our_parent(&get(&client, &http_route_resource(), "shop", "broken").await)?;
        is(
            &parent["conditions"],
            "ResolvedRefs",
            "True",
            "ResolvedRefs",
        )
        .then_some(())
    })
    .await;

    // Settled: no more writes.
    let versions = |client: Client| async move {
        let mut v = Vec::new();
        for (resource, ns, name) in [
            (gateway_resource(), "infra", "shared"),
            (listener_set_resource(), "shop", "shop"),
            (http_route_resource(), "shop", "web"),
            (http_route_resource(), "shop", "broken"),
        ] {
            v.push(get(&client, &resource, ns, name).await.resource_version());
        }
        v
    };
    let before = versions(client.clone()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        before,
        versions(client.clone()).await,
        "the simulator keeps writing"
    );

    simulator.abort();
    drop(plane);
}

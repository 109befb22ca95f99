//! Gateway API routing against the real control plane, with Gateway API's
//! real CRDs (standard channel, from the `sigs.k8s.io/gateway-api` Go module:
//! hack/install-gateway-api-crds.sh) and the kwok lane's SIMULATED gateway
//! controller (kapsa-testenv's `simulators::gateway`, which sets route and
//! listener status the way a gateway controller does; nothing routes
//! traffic here).
//!
//! A test binary of its own: installing CRDs and the host-ownership policy
//! changes the cluster for every test of the binary.

mod support;

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kapsa_api::external;
use kapsa_api::{DomainPool, Environment, Project};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::*;

const GATEWAY_NAMESPACE: &str = "gateway-system";
/// Allows ListenerSets from every namespace.
const OPEN_GATEWAY: &str = "open";
/// Allows none (Gateway API's default).
const CLOSED_GATEWAY: &str = "closed";

fn operator_config_with_host_table() -> kapsa_operator::OperatorConfig {
    kapsa_operator::OperatorConfig {
        host_owners_namespace: Some(PLATFORM_NAMESPACE.into()),
        ..operator_config()
    }
}

/// Gateway API's CRDs, two shared Gateways, the host-ownership policy, and
/// then the operator (which finds Gateway API served at its start).
async fn setup() -> Client {
    let (_, client) = cluster().await;
    static SETUP: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SETUP
        .get_or_init(|| async {
            let crds = kapsa_testenv::crds::gateway_api_crds().expect("Gateway API CRDs");
            kapsa_testenv::crds::install_crds(&client, &crds, "kapsa-test")
                .await
                .expect("Gateway API CRDs installed");
            create_ignoring_conflict(
                &Api::<Namespace>::all(client.clone()),
                json!({"metadata": {"name": GATEWAY_NAMESPACE}}),
            )
            .await;
            let gateways = gateways(&client);
            for (name, allowed) in [
                (OPEN_GATEWAY, json!({"namespaces": {"from": "All"}})),
                (CLOSED_GATEWAY, json!({"namespaces": {"from": "None"}})),
            ] {
                create_ignoring_conflict(
                    &gateways,
                    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                        "metadata": {"name": name},
                        "spec": {"gatewayClassName": "simulated", "allowedListeners": allowed,
                            "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]}}),
                )
                .await;
            }
            install_host_ownership_policy(&client, OPERATOR_USER).await;
            shared_operator_with(operator_config_with_host_table).await;
        })
        .await;
    client
}

fn gateways(client: &Client) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        GATEWAY_NAMESPACE,
        &external::gateway_gateway(),
    )
}

fn routes(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &external::gateway_http_route())
}

fn listener_sets(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &external::gateway_listener_set())
}

fn certificates(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        client.clone(),
        namespace,
        &external::cert_manager_certificate(),
    )
}

/// Switches `platform`'s pool to Gateway routing on `gateway`.
async fn route_through_gateway(client: &Client, platform: &Platform, gateway: &str) {
    Api::<DomainPool>::all(client.clone())
        .patch(
            &platform.pool,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"routing": "Gateway",
                "gatewayRef": {"name": gateway, "namespace": GATEWAY_NAMESPACE}}})),
        )
        .await
        .expect("pool switched to Gateway routing");
}

async fn condition_is(
    client: &Client,
    namespace: &str,
    environment: &str,
    type_: &str,
    status: &str,
) -> Option<(String, String, String)> {
    environment_condition(client, namespace, environment, type_)
        .await
        .filter(|(s, _, _)| s == status)
}

#[tokio::test]
async fn project_in_a_gateway_pool_goes_ready_with_route_listeners_and_certificate() {
    let client = setup().await;
    let platform = platform(&client, "gwlive", "HTTP01", false).await;
    route_through_gateway(&client, &platform, OPEN_GATEWAY).await;
    let name = "gwlive";
    let live = live_project(&client, name, platform.clone(), |_| {}).await;
    let host = format!("{name}.{}", platform.base);

    let (_, reason, message) = eventually("Routed=True", || {
        condition_is(&client, name, "production", "Routed", "True")
    })
    .await;
    assert_eq!(reason, "Accepted", "{message}");
    assert!(
        message.contains(kapsa_testenv::simulators::gateway::CONTROLLER_NAME),
        "{message}"
    );
    eventually("Ready=True", || {
        condition_is(&client, name, "production", "Ready", "True")
    })
    .await;
    let environment = Api::<Environment>::namespaced(client.clone(), name)
        .get("production")
        .await
        .unwrap();
    let status = environment.status.clone().unwrap();
    assert_eq!(
        status.url.as_deref(),
        Some(format!("https://{host}").as_str())
    );
    assert_eq!(status.commit.as_deref(), Some(live.commit.as_str()));
    let env_uid = environment.uid().unwrap();
    let project_uid = Api::<Project>::all(client.clone())
        .get(name)
        .await
        .unwrap()
        .uid()
        .unwrap();

    // The HTTPRoute: the host, on the Project's ListenerSet, to the Service.
    let route = routes(&client, name).get("production").await.unwrap();
    assert_eq!(controller_uid(&route), Some(env_uid.clone()));
    assert_eq!(route.labels()["app.kubernetes.io/managed-by"], "kapsa");
    let spec = &route.data["spec"];
    assert_eq!(spec["hostnames"], json!([host]));
    assert_eq!(
        spec["parentRefs"],
        json!([{"group": "gateway.networking.k8s.io", "kind": "ListenerSet", "name": name}])
    );
    let rule = &spec["rules"][0];
    assert_eq!(
        rule["matches"],
        json!([{"path": {"type": "PathPrefix", "value": "/"}}])
    );
    assert_eq!(rule["backendRefs"][0]["name"], "production");
    assert_eq!(rule["backendRefs"][0]["kind"], "Service");
    assert_eq!(rule["backendRefs"][0]["port"], 80);
    assert_eq!(spec["rules"].as_array().unwrap().len(), 1);

    // The ListenerSet: the Project's, on the shared Gateway, one HTTPS
    // listener for the host with the Environment's own certificate.
    let set = listener_sets(&client, name).get(name).await.unwrap();
    assert_eq!(controller_uid(&set), Some(project_uid));
    assert_eq!(
        set.data["spec"]["parentRef"],
        json!({"group": "gateway.networking.k8s.io", "kind": "Gateway",
            "name": OPEN_GATEWAY, "namespace": GATEWAY_NAMESPACE})
    );
    let listeners = set.data["spec"]["listeners"].as_array().unwrap();
    assert_eq!(listeners.len(), 1, "{listeners:?}");
    let listener = &listeners[0];
    assert_eq!(listener["name"], "production");
    assert_eq!(listener["hostname"], host.as_str());
    assert_eq!(listener["port"], 443);
    assert_eq!(listener["protocol"], "HTTPS");
    assert_eq!(listener["tls"]["mode"], "Terminate");
    assert_eq!(
        listener["tls"]["certificateRefs"],
        json!([{"group": "", "kind": "Secret", "name": "production-gateway-tls"}])
    );
    assert_eq!(listener["allowedRoutes"]["namespaces"]["from"], "Same");
    // The gateway (simulated) accepted it and counts the route.
    let accepted = set.data["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Accepted" && c["status"] == "True");
    assert!(accepted, "{}", set.data["status"]);

    // The Certificate Kapsa made for the host (ingress-shim serves no routes).
    let cert = certificates(&client, name)
        .get("production-gateway-tls")
        .await
        .unwrap();
    assert_eq!(controller_uid(&cert), Some(env_uid));
    assert_eq!(
        cert.data["spec"],
        json!({"secretName": "production-gateway-tls", "dnsNames": [host],
            "issuerRef": {"name": platform.issuer, "kind": "ClusterIssuer", "group": "cert-manager.io"}})
    );
    let (_, reason, message) = environment_condition(&client, name, "production", "TLSReady")
        .await
        .unwrap();
    assert_eq!(reason, "CertificateReady");
    assert!(message.contains("production-gateway-tls"), "{message}");

    // No Ingress at all.
    let ingresses = Api::<Ingress>::namespaced(client.clone(), name)
        .list(&Default::default())
        .await
        .unwrap();
    assert!(ingresses.items.is_empty(), "{:?}", ingresses.items);
}

#[tokio::test]
async fn switching_a_pool_to_gateway_moves_every_environment_and_prunes_the_ingresses() {
    let client = setup().await;
    let platform = platform(&client, "gwswitch", "HTTP01", false).await;
    let name = "gwswitch";
    let live = live_project(&client, name, platform.clone(), |manifest| {
        manifest["spec"]["previewEnvironments"] = json!({"enabled": true});
    })
    .await;
    live.repo
        .commit("feature/login", "app.txt", "v2", "login")
        .expect("feature commit");
    let ingresses = Api::<Ingress>::namespaced(client.clone(), name);
    let preview = eventually("the preview's Ingress", || async {
        let list = ingresses.list(&Default::default()).await.ok()?;
        let names: Vec<String> = list.items.iter().map(|i| i.name_any()).collect();
        (names.len() == 2).then(|| {
            names
                .into_iter()
                .find(|n| n != "production")
                .expect("a preview")
        })
    })
    .await;
    eventually("the preview serves", || {
        condition_is(&client, name, &preview, "Ready", "True")
    })
    .await;

    route_through_gateway(&client, &platform, OPEN_GATEWAY).await;

    for environment in ["production", preview.as_str()] {
        eventually(&format!("{environment} routed through the Gateway"), || {
            condition_is(&client, name, environment, "Routed", "True")
        })
        .await;
        eventually(&format!("{environment} Ready again"), || {
            condition_is(&client, name, environment, "Ready", "True")
        })
        .await;
        let route = routes(&client, name).get(environment).await.unwrap();
        let host = Api::<Environment>::namespaced(client.clone(), name)
            .get(environment)
            .await
            .unwrap()
            .spec
            .host
            .unwrap();
        assert_eq!(route.data["spec"]["hostnames"], json!([host]));
    }
    ingresses_pruned(&client, name).await;
    // One listener per Environment, production first.
    let set = listener_sets(&client, name).get(name).await.unwrap();
    let listener_names: Vec<&str> = set.data["spec"]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(listener_names, ["production", preview.as_str()]);

    // And back: the Ingresses return, the Gateway API objects go.
    Api::<DomainPool>::all(client.clone())
        .patch(
            &platform.pool,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"routing": "Ingress", "gatewayRef": null}})),
        )
        .await
        .expect("pool back to Ingress routing");
    eventually("Ingresses back, routes and listeners gone", || async {
        let ingress_count = ingresses.list(&Default::default()).await.ok()?.items.len();
        let route_count = routes(&client, name)
            .list(&Default::default())
            .await
            .ok()?
            .items
            .len();
        let set = listener_sets(&client, name).get_opt(name).await.ok()?;
        (ingress_count == 2 && route_count == 0 && set.is_none()).then_some(())
    })
    .await;
    let routed = environment_condition(&client, name, "production", "Routed").await;
    assert!(routed.is_none(), "Routed is Gateway-only: {routed:?}");
}

#[tokio::test]
async fn a_route_the_gateway_refuses_is_routed_false_with_the_gateways_reason() {
    let client = setup().await;
    let platform = platform(&client, "gwrefused", "HTTP01", false).await;
    route_through_gateway(&client, &platform, CLOSED_GATEWAY).await;
    let name = "gwrefused";
    // The app rolls out, but the Gateway allows no ListenerSets: the route
    // attaches to nothing.
    let git = kapsa_testenv::git_server::GitServer::start(None)
        .await
        .expect("git server");
    let repo = git.create_repo(name).expect("repository");
    let commit = repo
        .commit("main", "app.txt", "v1", "first")
        .expect("commit");
    create(
        &Api::<Project>::all(client.clone()),
        project_manifest(name, repo.url(), &platform, None),
    )
    .await;
    let (_, reason, message) = eventually("Routed=False", || {
        condition_is(&client, name, "production", "Routed", "False")
    })
    .await;
    assert_eq!(reason, "NoMatchingParent", "{message}");
    assert!(
        message.contains(kapsa_testenv::simulators::gateway::CONTROLLER_NAME),
        "{message}"
    );
    let (_, ready_reason, ready_message) = eventually("deployed, not Ready", || async {
        let deployed = condition_is(&client, name, "production", "Deployed", "True").await;
        let ready = condition_is(&client, name, "production", "Ready", "False").await;
        deployed.and(ready)
    })
    .await;
    assert_eq!(ready_reason, "NotServing");
    assert!(
        ready_message.contains("NoMatchingParent") || ready_message.contains("did not accept"),
        "{ready_message}"
    );
    // The gateway's verdict on the ListenerSet (written in a status update
    // of its own, which may come after the route's).
    let sets = listener_sets(&client, name);
    let last = std::sync::Mutex::new(None);
    let refused = kapsa_testenv::wait::try_eventually(TIMEOUT, || async {
        let set = sets.get(name).await.ok()?;
        let accepted = set.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Accepted")
            .cloned();
        *last.lock().unwrap() = accepted.clone();
        accepted.filter(|c| c["status"] == "False" && c["reason"] == "NotAllowed")
    })
    .await;
    assert!(
        refused.is_some(),
        "the ListenerSet is refused with NotAllowed; its Accepted condition: {:?}",
        last.lock().unwrap()
    );

    // The platform team lets the Project's namespace attach listeners.
    gateways(&client)
        .patch(
            CLOSED_GATEWAY,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"allowedListeners": {"namespaces": {"from": "Selector",
                "selector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}}}}),
            ),
        )
        .await
        .expect("Gateway patched");
    eventually("Routed=True", || {
        condition_is(&client, name, "production", "Routed", "True")
    })
    .await;
    let ready = eventually("Ready=True", || {
        condition_is(&client, name, "production", "Ready", "True")
    })
    .await;
    assert_eq!(ready.1, "Serving");
    let env = rolled_out(&client, name, &commit).await;
    assert!(env.status.unwrap().url.unwrap().starts_with("https://"));
}

#[tokio::test]
async fn a_tenants_route_or_listener_for_another_projects_host_is_refused() {
    let client = setup().await;
    let platform = platform(&client, "gwown", "HTTP01", false).await;
    route_through_gateway(&client, &platform, OPEN_GATEWAY).await;
    let holder = "gwowner";
    live_project(&client, holder, platform.clone(), |_| {}).await;
    let base = platform.base.clone();
    let host = format!("{holder}.{base}");
    eventually("the host-ownership table names the holder", || async {
        let cm = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
            client.clone(),
            PLATFORM_NAMESPACE,
        )
        .get_opt("kapsa-host-owners")
        .await
        .ok()??;
        (cm.data?.get(&host).map(String::as_str) == Some(holder)).then_some(())
    })
    .await;

    // A tenant namespace whose user may write HTTPRoutes and ListenerSets
    // there (RBAC allows it; the policy is what must refuse).
    let tenant_ns = "gw-tenant";
    create_ignoring_conflict(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": tenant_ns}}),
    )
    .await;
    create_ignoring_conflict(
        &Api::<Role>::namespaced(client.clone(), tenant_ns),
        json!({"metadata": {"name": "routes"}, "rules": [{"apiGroups": ["gateway.networking.k8s.io"],
            "resources": ["httproutes", "listenersets"], "verbs": ["create", "get", "list"]}]}),
    )
    .await;
    create_ignoring_conflict(
        &Api::<RoleBinding>::namespaced(client.clone(), tenant_ns),
        json!({"metadata": {"name": "routes"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "routes"},
            "subjects": [{"kind": "User", "name": "gw-dev", "apiGroup": "rbac.authorization.k8s.io"}]}),
    )
    .await;
    let (env, _) = cluster().await;
    let tenant = env.client_as("gw-dev", &[]).await;
    let route = |name: &str, hostname: &str| -> DynamicObject {
        serde_json::from_value(
            json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name},
            "spec": {"parentRefs": [{"name": OPEN_GATEWAY, "namespace": GATEWAY_NAMESPACE}],
                "hostnames": [hostname],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]}}),
        )
        .unwrap()
    };
    let listener_set = |name: &str, hostname: &str| -> DynamicObject {
        serde_json::from_value(json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "ListenerSet",
            "metadata": {"name": name},
            "spec": {"parentRef": {"name": OPEN_GATEWAY, "namespace": GATEWAY_NAMESPACE},
                "listeners": [{"name": "https", "hostname": hostname, "port": 443, "protocol": "HTTPS",
                    "tls": {"certificateRefs": [{"name": "stolen-tls"}]}}]}}))
        .unwrap()
    };
    let tenant_routes = routes(&tenant, tenant_ns);
    let tenant_sets = listener_sets(&tenant, tenant_ns);
    let refused =
        |result: Result<DynamicObject, kube::Error>, what: &str, needle: &str| match result {
            Err(kube::Error::Api(status)) => {
                assert!(
                    status.message.contains(needle),
                    "{what}: {}",
                    status.message
                );
            }
            other => panic!("{what} was not refused by the policy: {other:?}"),
        };
    let post = PostParams::default();
    for (name, hostname) in [
        ("steal", host.clone()),
        ("steal-preview", format!("pr-1.{host}")),
        ("steal-wildcard", format!("*.{host}")),
        ("unheld", format!("nobody.{base}")),
    ] {
        refused(
            tenant_routes.create(&post, &route(name, &hostname)).await,
            &format!("HTTPRoute for {hostname}"),
            "belongs to the Project that holds it",
        );
        refused(
            tenant_sets
                .create(&post, &listener_set(name, &hostname))
                .await,
            &format!("ListenerSet for {hostname}"),
            "belongs to the Project that holds it",
        );
    }
    // A wildcard over the base catches every Project's hosts.
    refused(
        tenant_sets
            .create(
                &post,
                &listener_set(
                    "catch-all",
                    &format!("*.{}", base.split_once('.').unwrap().1),
                ),
            )
            .await,
        "ListenerSet for a wildcard over the base",
        "wildcard host over a Kapsa DomainPool base",
    );
    // Hosts outside every base are not Kapsa's business.
    tenant_routes
        .create(&post, &route("own", "www.tenant.test"))
        .await
        .expect("a host outside every base");
    tenant_sets
        .create(&post, &listener_set("own", "www.tenant.test"))
        .await
        .expect("a listener outside every base");
}

#[tokio::test]
async fn without_listener_sets_routes_attach_to_the_platforms_wildcard_listener() {
    let client = setup().await;
    let platform = platform(&client, "gwlistener", "HTTP01", false).await;
    // The platform team's Gateway: one HTTPS listener for the whole base,
    // with its own wildcard certificate, open to routes from every namespace.
    create_ignoring_conflict(
        &gateways(&client),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "metadata": {"name": "wildcard"},
            "spec": {"gatewayClassName": "simulated", "listeners": [{
                "name": "apps", "hostname": format!("*.{}", platform.base), "port": 443, "protocol": "HTTPS",
                "tls": {"certificateRefs": [{"name": "apps-wildcard-tls"}]},
                "allowedRoutes": {"namespaces": {"from": "All"}}}]}}),
    )
    .await;
    Api::<DomainPool>::all(client.clone())
        .patch(
            &platform.pool,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"routing": "Gateway", "gatewayRef": {
                "name": "wildcard", "namespace": GATEWAY_NAMESPACE, "sectionName": "apps"}}})),
        )
        .await
        .expect("pool on the Gateway's listener");
    let name = "gwlistener";
    live_project(&client, name, platform.clone(), |_| {}).await;
    let (_, reason, message) = eventually("Routed=True", || {
        condition_is(&client, name, "production", "Routed", "True")
    })
    .await;
    assert_eq!(reason, "Accepted");
    assert!(
        message.contains("listener \"apps\" of Gateway"),
        "{message}"
    );
    let (_, reason, _) = eventually("Ready=True", || {
        condition_is(&client, name, "production", "TLSReady", "True")
    })
    .await;
    assert_eq!(reason, "GatewayListener");
    eventually("Ready=True", || {
        condition_is(&client, name, "production", "Ready", "True")
    })
    .await;
    let route = routes(&client, name).get("production").await.unwrap();
    assert_eq!(
        route.data["spec"]["parentRefs"],
        json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway",
            "namespace": GATEWAY_NAMESPACE, "name": "wildcard", "sectionName": "apps"}])
    );
    // Nothing of Kapsa's own for TLS or listeners.
    assert!(
        listener_sets(&client, name)
            .get_opt(name)
            .await
            .unwrap()
            .is_none()
    );
    let certs = certificates(&client, name)
        .list(&Default::default())
        .await
        .unwrap();
    assert!(certs.items.is_empty(), "{:?}", certs.items);
}

fn controller_uid(object: &DynamicObject) -> Option<String> {
    object
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true))
        .map(|o| o.uid.clone())
}

//! Gateway API routing, for DomainPools with `routing: Gateway`: the
//! Environment's `HTTPRoute` and per-host `Certificate`, and the Project's
//! `ListenerSet`, which attaches the Project's HTTPS listeners to the shared
//! Gateway the pool names (so no tenant ever writes that Gateway).
//!
//! Hosts and TLS follow the same plan as the Ingress ([`super::routing`]):
//! only the Project's own subtree `<project>.<base>`; per-host certificates
//! under HTTP01, the Project's wildcard under DNS01, plain HTTP without an
//! issuer. cert-manager's ingress-shim does not serve Gateway API routes, so
//! Kapsa makes the per-host Certificates itself, `<env>-gateway-tls` (the
//! ClusterIssuer solves HTTP-01 through the Gateway: its `gatewayHTTPRoute`
//! solver).

use kapsa_api::external::{self, GATEWAY_API_GROUP};
use kapsa_api::naming::is_dns_name;
use kapsa_api::{Challenge, DomainPool, GatewayReference, Project, Routing};
use kube::ResourceExt;
use kube::core::{ApiResource, DynamicObject};
use serde_json::{Value, json};

use super::certificates::wildcard_secret_name;
use super::routing::{RoutePlan, Tls, per_host_secret_name, route_plan};
use super::{EnvironmentInputs, SERVICE_HTTP_PORT, environment_commit, metadata, names};
use crate::resources::{controller_reference, project_labels};

/// Port of the Project's HTTPS listeners on the shared Gateway.
pub const GATEWAY_HTTPS_PORT: i32 = 443;
/// Port of the Project's listeners when the pool has no ClusterIssuer.
pub const GATEWAY_HTTP_PORT: i32 = 80;
/// Most listeners a ListenerSet may have (Gateway API).
pub const MAX_LISTENERS: usize = 64;
/// Listener of `<project>.<base>` under a wildcard scheme (the dot keeps it
/// apart from listeners named after Environments, which are DNS labels).
pub const APEX_LISTENER: &str = "project.apex";
/// Listener of `*.<project>.<base>` under a wildcard scheme.
pub const WILDCARD_LISTENER: &str = "project.wildcard";

/// The API resource of a Gateway API `HTTPRoute`.
pub fn http_route_api_resource() -> ApiResource {
    external::gateway_http_route()
}

/// The API resource of a Gateway API `ListenerSet`.
pub fn listener_set_api_resource() -> ApiResource {
    external::gateway_listener_set()
}

/// Name of a Project's ListenerSet (in its namespace): the Project's name.
pub fn listener_set_name(project: &str) -> String {
    project.to_owned()
}

/// Whether the Environment's pool routes through Gateway API.
pub fn gateway_routing(inputs: &EnvironmentInputs) -> bool {
    inputs
        .pool
        .is_some_and(|pool| pool.spec.routing == Routing::Gateway)
}

/// The shared Gateway and its listener that routes attach to directly
/// (`gatewayRef.sectionName`, for implementations without ListenerSets).
pub fn gateway_listener<'a>(
    inputs: &EnvironmentInputs<'a>,
) -> Option<(&'a GatewayReference, &'a str)> {
    let pool = inputs.pool.filter(|p| p.spec.routing == Routing::Gateway)?;
    let gateway = pool.spec.gateway_ref.as_ref()?;
    Some((gateway, gateway.section_name.as_deref()?))
}

fn gateway_plan<'a>(inputs: &EnvironmentInputs<'a>) -> Option<RoutePlan<'a>> {
    if !gateway_routing(inputs) {
        return None;
    }
    route_plan(inputs)
}

/// The Environment's HTTPRoute: its host, attached to the Project's
/// ListenerSet, every path to its Service. `None` unless the pool routes
/// through Gateway API and the host is the Project's.
pub fn http_route(inputs: &EnvironmentInputs) -> Option<DynamicObject> {
    let plan = gateway_plan(inputs)?;
    let (project_name, env_name) = names(inputs);
    let parent = match (plan.tls, gateway_listener(inputs)) {
        (Tls::GatewayListener, Some((gateway, section))) => json!({
            "group": GATEWAY_API_GROUP,
            "kind": "Gateway",
            "namespace": gateway.namespace,
            "name": gateway.name,
            "sectionName": section,
        }),
        _ => json!({
            "group": GATEWAY_API_GROUP,
            "kind": "ListenerSet",
            "name": listener_set_name(&project_name),
        }),
    };
    let spec = json!({
        "parentRefs": [parent],
        "hostnames": [plan.host],
        "rules": [{
            "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
            "backendRefs": [{
                "group": "",
                "kind": "Service",
                "name": env_name,
                "port": SERVICE_HTTP_PORT,
            }],
        }],
    });
    let mut route =
        DynamicObject::new(&env_name, &http_route_api_resource()).data(json!({ "spec": spec }));
    route.metadata = metadata(inputs, environment_commit(inputs));
    Some(route)
}

/// The Certificate of the Environment's host when it needs one of its own
/// (HTTP01, or a host the DNS01 wildcard does not cover): `<env>-gateway-tls`, the
/// Secret the ListenerSet's listener for the host names. `None` under
/// Ingress routing (cert-manager's ingress-shim makes it there), without an
/// issuer, or under the Project's wildcard.
pub fn host_certificate(inputs: &EnvironmentInputs) -> Option<DynamicObject> {
    let plan = gateway_plan(inputs)?;
    let Tls::PerHost { issuer } = plan.tls else {
        return None;
    };
    let issuer_resource = external::cert_manager_cluster_issuer();
    let spec = json!({
        "secretName": per_host_secret_name(inputs),
        "dnsNames": [plan.host],
        "issuerRef": {
            "name": issuer,
            "kind": issuer_resource.kind,
            "group": issuer_resource.group,
        },
    });
    let mut cert = DynamicObject::new(
        &per_host_secret_name(inputs),
        &external::cert_manager_certificate(),
    )
    .data(json!({ "spec": spec }));
    // No commit label: a new commit must not rewrite the Certificate.
    cert.metadata = metadata(inputs, None);
    cert.metadata.name = Some(per_host_secret_name(inputs));
    Some(cert)
}

/// The listener the Project's ListenerSet needs for this Environment's host
/// alone: one named after the Environment with its own certificate (HTTP01,
/// or a host deeper than the DNS01 wildcard covers). `None` when the
/// Project's shared listeners cover the host (DNS01 wildcard, plain HTTP),
/// or without Gateway routing.
pub fn environment_listener(inputs: &EnvironmentInputs) -> Option<Value> {
    let plan = gateway_plan(inputs)?;
    let Tls::PerHost { .. } = plan.tls else {
        return None;
    };
    let (_, env_name) = names(inputs);
    Some(https_listener(
        &env_name,
        plan.host,
        &per_host_secret_name(inputs),
    ))
}

fn https_listener(name: &str, hostname: &str, secret: &str) -> Value {
    json!({
        "name": name,
        "hostname": hostname,
        "port": GATEWAY_HTTPS_PORT,
        "protocol": "HTTPS",
        "tls": {
            "mode": "Terminate",
            "certificateRefs": [{"group": "", "kind": "Secret", "name": secret}],
        },
        "allowedRoutes": allowed_routes(),
    })
}

fn http_listener(name: &str, hostname: &str) -> Value {
    json!({
        "name": name,
        "hostname": hostname,
        "port": GATEWAY_HTTP_PORT,
        "protocol": "HTTP",
        "allowedRoutes": allowed_routes(),
    })
}

/// Only HTTPRoutes of the Project's own namespace attach.
fn allowed_routes() -> Value {
    json!({
        "namespaces": {"from": "Same"},
        "kinds": [{"group": GATEWAY_API_GROUP, "kind": "HTTPRoute"}],
    })
}

/// The Project's ListenerSet on the pool's shared Gateway, in `namespace`
/// (the project namespace), controlled by the Project. Its listeners: under
/// DNS01 `<project>.<base>` and `*.<project>.<base>` with the wildcard
/// certificate's Secret; without an issuer the same two over plain HTTP;
/// then `environment_listeners` (see [`environment_listener`]), in the
/// order given, skipping repeated hostnames, up to [`MAX_LISTENERS`].
/// `None` unless the pool routes through Gateway API with a `gatewayRef`
/// and the names are valid, or when there would be no listener at all.
pub fn listener_set(
    project: &Project,
    namespace: &str,
    pool: &DomainPool,
    base_domain: &str,
    environment_listeners: impl IntoIterator<Item = Value>,
) -> Option<DynamicObject> {
    if pool.spec.routing != Routing::Gateway {
        return None;
    }
    // Routes attach to the Gateway's own listener: no listeners of ours.
    let gateway = pool
        .spec
        .gateway_ref
        .as_ref()
        .filter(|g| g.section_name.is_none())?;
    let project_name = project.name_any();
    let apex = format!("{project_name}.{base_domain}");
    if !is_dns_name(&project_name) || !is_dns_name(base_domain) || !is_dns_name(&apex) {
        return None;
    }
    let wildcard = format!("*.{apex}");
    let issuer = pool
        .spec
        .cluster_issuer_ref
        .as_ref()
        .map(|r| r.name.as_str())
        .filter(|name| is_dns_name(name));
    let mut listeners = match (issuer, pool.spec.challenge) {
        (None, _) => vec![
            http_listener(APEX_LISTENER, &apex),
            http_listener(WILDCARD_LISTENER, &wildcard),
        ],
        (Some(_), Challenge::DNS01) => {
            let secret = wildcard_secret_name(&project_name);
            vec![
                https_listener(APEX_LISTENER, &apex, &secret),
                https_listener(WILDCARD_LISTENER, &wildcard, &secret),
            ]
        }
        (Some(_), Challenge::HTTP01) => Vec::new(),
    };
    for listener in environment_listeners {
        if listeners.len() >= MAX_LISTENERS {
            break;
        }
        let repeated = listeners
            .iter()
            .any(|l| l["hostname"] == listener["hostname"] || l["name"] == listener["name"]);
        if !repeated {
            listeners.push(listener);
        }
    }
    if listeners.is_empty() {
        return None;
    }
    let spec = json!({
        "parentRef": {
            "group": GATEWAY_API_GROUP,
            "kind": "Gateway",
            "name": gateway.name,
            "namespace": gateway.namespace,
        },
        "listeners": listeners,
    });
    let mut set = DynamicObject::new(
        &listener_set_name(&project_name),
        &listener_set_api_resource(),
    )
    .within(namespace)
    .data(json!({ "spec": spec }));
    set.metadata.labels = Some(project_labels(&project_name));
    set.metadata.owner_references = Some(vec![controller_reference(project)]);
    Some(set)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::environment::test_support::*;
    use crate::resources::environment::{
        VERSION_LABEL, environment_url, ingress, tls_certificate_name, tls_secret_name,
    };

    fn gateway_pool(fixture: &str) -> DomainPool {
        let mut pool: DomainPool = load(fixture);
        pool.spec.routing = Routing::Gateway;
        pool.spec.gateway_ref = Some(GatewayReference {
            name: "shared".into(),
            namespace: "gateway-system".into(),
            section_name: None,
        });
        pool
    }

    #[test]
    fn http01_route_certificate_and_listener() {
        let (p, e) = (project(), environment());
        let pool = gateway_pool(HTTP01);
        let i = inputs(&p, &e, Some(&pool));
        assert!(ingress(&i).is_none(), "no Ingress under Gateway routing");

        let route = http_route(&i).expect("route");
        let value = serde_json::to_value(&route).unwrap();
        assert_apply_ready(&value, "gateway.networking.k8s.io/v1", "HTTPRoute");
        assert_child_metadata(&route.metadata, Some("3f2a9c1"));
        assert_eq!(
            route.data["spec"],
            json!({
                "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "ListenerSet", "name": "shop"}],
                "hostnames": ["shop.apps.example.com"],
                "rules": [{
                    "matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                    "backendRefs": [{"group": "", "kind": "Service", "name": "production", "port": 80}],
                }],
            })
        );

        let cert = host_certificate(&i).expect("certificate");
        let value = serde_json::to_value(&cert).unwrap();
        assert_apply_ready(&value, "cert-manager.io/v1", "Certificate");
        assert_eq!(
            cert.metadata.name.as_deref(),
            Some("production-gateway-tls")
        );
        assert_eq!(cert.metadata.namespace.as_deref(), Some("shop"));
        let owners = cert.metadata.owner_references.as_ref().unwrap();
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].uid.as_str()),
            ("Environment", ENV_UID)
        );
        assert!(
            !cert
                .metadata
                .labels
                .as_ref()
                .unwrap()
                .contains_key(VERSION_LABEL)
        );
        assert_eq!(
            cert.data["spec"],
            json!({
                "secretName": "production-gateway-tls",
                "dnsNames": ["shop.apps.example.com"],
                "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer", "group": "cert-manager.io"},
            })
        );
        // TLSReady watches the same Certificate.
        assert_eq!(
            tls_certificate_name(&i).as_deref(),
            Some("production-gateway-tls")
        );
        assert_eq!(
            tls_secret_name(&i).as_deref(),
            Some("production-gateway-tls")
        );
        assert_eq!(
            environment_url(&i).as_deref(),
            Some("https://shop.apps.example.com")
        );

        let listener = environment_listener(&i).expect("listener");
        assert_eq!(
            listener,
            json!({
                "name": "production",
                "hostname": "shop.apps.example.com",
                "port": 443,
                "protocol": "HTTPS",
                "tls": {"mode": "Terminate", "certificateRefs": [{"group": "", "kind": "Secret", "name": "production-gateway-tls"}]},
                "allowedRoutes": {
                    "namespaces": {"from": "Same"},
                    "kinds": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}],
                },
            })
        );
        let set = listener_set(&p, "shop", &pool, BASE, [listener.clone()]).expect("set");
        let value = serde_json::to_value(&set).unwrap();
        assert_apply_ready(&value, "gateway.networking.k8s.io/v1", "ListenerSet");
        assert_eq!(set.metadata.name.as_deref(), Some("shop"));
        assert_eq!(set.metadata.namespace.as_deref(), Some("shop"));
        let owners = set.metadata.owner_references.as_ref().unwrap();
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].uid.as_str()),
            ("Project", PROJECT_UID)
        );
        assert_eq!(
            set.data["spec"]["parentRef"],
            json!({"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "shared", "namespace": "gateway-system"})
        );
        assert_eq!(set.data["spec"]["listeners"], json!([listener]));

        // A repeated host or name is listed once; none at all: no set.
        let twice = listener_set(&p, "shop", &pool, BASE, [listener.clone(), listener]).unwrap();
        assert_eq!(twice.data["spec"]["listeners"].as_array().unwrap().len(), 1);
        assert!(listener_set(&p, "shop", &pool, BASE, []).is_none());
    }

    #[test]
    fn dns01_uses_the_wildcard_listeners() {
        let p = project();
        let pool = gateway_pool(DNS01);
        for host in ["shop.apps.example.com", "fix-login.shop.apps.example.com"] {
            let e = env_with_host(host);
            let i = inputs(&p, &e, Some(&pool));
            assert!(http_route(&i).is_some(), "{host}");
            assert!(
                host_certificate(&i).is_none(),
                "{host}: the wildcard covers it"
            );
            assert!(environment_listener(&i).is_none(), "{host}");
            assert_eq!(tls_secret_name(&i).as_deref(), Some("shop-wildcard-tls"));
        }
        // Two labels below the Project: a listener and certificate of its own.
        let e = env_with_host("a.b.shop.apps.example.com");
        let i = inputs(&p, &e, Some(&pool));
        let deep = environment_listener(&i).expect("listener of its own");
        assert_eq!(deep["hostname"], "a.b.shop.apps.example.com");
        assert!(host_certificate(&i).is_some());

        let set = listener_set(&p, "shop", &pool, BASE, [deep]).unwrap();
        let listeners = set.data["spec"]["listeners"].as_array().unwrap();
        let summary: Vec<_> = listeners
            .iter()
            .map(|l| {
                (
                    l["name"].as_str().unwrap(),
                    l["hostname"].as_str().unwrap(),
                    l["protocol"].as_str().unwrap(),
                    l["tls"]["certificateRefs"][0]["name"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (
                    "project.apex",
                    "shop.apps.example.com",
                    "HTTPS",
                    "shop-wildcard-tls"
                ),
                (
                    "project.wildcard",
                    "*.shop.apps.example.com",
                    "HTTPS",
                    "shop-wildcard-tls"
                ),
                (
                    "production",
                    "a.b.shop.apps.example.com",
                    "HTTPS",
                    "production-gateway-tls"
                ),
            ]
        );
    }

    #[test]
    fn without_issuer_plain_http_listeners() {
        let (p, e) = (project(), environment());
        let pool = gateway_pool(NO_ISSUER);
        let i = inputs(&p, &e, Some(&pool));
        assert!(http_route(&i).is_some());
        assert!(host_certificate(&i).is_none());
        assert!(environment_listener(&i).is_none());
        assert_eq!(
            environment_url(&i).as_deref(),
            Some("http://shop.apps.example.com")
        );
        let set = listener_set(&p, "shop", &pool, BASE, []).unwrap();
        let listeners = set.data["spec"]["listeners"].as_array().unwrap();
        assert_eq!(listeners.len(), 2);
        for l in listeners {
            assert_eq!(
                (l["protocol"].as_str(), l["port"].as_i64()),
                (Some("HTTP"), Some(80))
            );
            assert!(l.get("tls").is_none());
        }
    }

    #[test]
    fn nothing_under_ingress_routing_or_for_foreign_hosts() {
        let p = project();
        let ingress_pool: DomainPool = load(HTTP01);
        let e = environment();
        let i = inputs(&p, &e, Some(&ingress_pool));
        assert!(http_route(&i).is_none());
        assert!(host_certificate(&i).is_none());
        assert!(environment_listener(&i).is_none());
        assert!(listener_set(&p, "shop", &ingress_pool, BASE, []).is_none());

        let pool = gateway_pool(HTTP01);
        for host in [
            "other.apps.example.com",
            "evil.com",
            "shop.apps2.example.com",
        ] {
            let e = env_with_host(host);
            let i = inputs(&p, &e, Some(&pool));
            assert!(http_route(&i).is_none(), "{host}");
            assert!(host_certificate(&i).is_none(), "{host}");
            assert!(environment_listener(&i).is_none(), "{host}");
        }
        let mut no_ref = pool.clone();
        no_ref.spec.gateway_ref = None;
        let e = environment();
        let listener = environment_listener(&inputs(&p, &e, Some(&pool))).unwrap();
        assert!(listener_set(&p, "shop", &no_ref, BASE, [listener.clone()]).is_none());
        assert!(listener_set(&p, "shop", &pool, "Bad Base", [listener]).is_none());
    }

    #[test]
    fn a_gateway_listener_instead_of_listener_sets() {
        let (p, e) = (project(), environment());
        for fixture in [HTTP01, DNS01, NO_ISSUER] {
            let mut pool = gateway_pool(fixture);
            pool.spec.gateway_ref.as_mut().unwrap().section_name = Some("apps".into());
            let i = inputs(&p, &e, Some(&pool));
            let route = http_route(&i).expect("route");
            assert_eq!(
                route.data["spec"]["parentRefs"],
                json!([{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                    "namespace": "gateway-system", "name": "shared", "sectionName": "apps"}])
            );
            assert!(host_certificate(&i).is_none(), "TLS is the listener's");
            assert!(environment_listener(&i).is_none());
            assert!(tls_certificate_name(&i).is_none());
            assert!(tls_secret_name(&i).is_none());
            assert_eq!(
                environment_url(&i).as_deref(),
                Some("https://shop.apps.example.com")
            );
            assert!(listener_set(&p, "shop", &pool, BASE, []).is_none());
        }
    }

    #[test]
    fn at_most_64_listeners() {
        let p = project();
        let pool = gateway_pool(HTTP01);
        let listeners = (0..100).map(|n| {
            https_listener(
                &format!("preview-{n}"),
                &format!("preview-{n}.shop.apps.example.com"),
                &format!("preview-{n}-tls"),
            )
        });
        let set = listener_set(&p, "shop", &pool, BASE, listeners).unwrap();
        let listeners = set.data["spec"]["listeners"].as_array().unwrap();
        assert_eq!(listeners.len(), MAX_LISTENERS);
        assert_eq!(listeners[0]["name"], "preview-0");
    }
}

//! Gateway API SIMULATOR: the controller of a Gateway API implementation
//! (`gateway.networking.k8s.io/v1`, controller name [`CONTROLLER_NAME`]) that
//! writes the status a real one would, and programs no data plane.
//!
//! It waits quietly (polling API discovery every second) until the Gateway
//! API CRDs are served, since only some tests install them
//! ([`crate::crds::gateway_api_crds`]). Then it watches Gateways,
//! ListenerSets, HTTPRoutes, ReferenceGrants, Services and Namespaces, and
//! on every change (coalesced, and every few seconds as a fallback)
//! recomputes every status from its caches, writing only what changed
//! (`lastTransitionTime` is kept while a condition's status stays).
//!
//! - Gateways of any class but one whose GatewayClass names another
//!   controller (a real gateway controller, in the real lane: those Gateways,
//!   and the ListenerSets and HTTPRoutes attached only to them, are left to
//!   it): `Accepted` and `Programmed` True; `listeners[]` with their attached
//!   routes; `attachedListenerSets`.
//! - ListenerSets: Accepted (and Programmed) True when the parent Gateway
//!   exists and its `allowedListeners.namespaces` (`None` when absent, `Same`,
//!   `All`, `Selector`) admits the ListenerSet's namespace; otherwise False,
//!   reason `ParentNotAccepted` (no such Gateway, or `parentRef` names no
//!   Gateway) or `NotAllowed`. `listeners[]` with attached routes and
//!   `Accepted`, `Programmed`, `ResolvedRefs` conditions (only HTTP and HTTPS
//!   listeners are served; TLS certificate Secrets are not checked).
//! - HTTPRoutes: one `status.parents[]` entry per `parentRef` of kind
//!   `Gateway` or `ListenerSet` (other controllers' entries are kept).
//!   `Accepted` is True when some listener of the parent (the one named by
//!   `sectionName`/`port`, if set) serves HTTPRoutes, admits the route's
//!   namespace (`allowedRoutes.namespaces`, `Same` by default: the namespace
//!   of the listener's Gateway or ListenerSet) and has a hostname that
//!   intersects the route's; else False with the first failing step's reason:
//!   `NoMatchingParent` (parent missing, a ListenerSet not accepted, or no
//!   listener with that `sectionName`/`port`), `NotAllowedByListeners`,
//!   `NoMatchingListenerHostname`. A route naming a Gateway attaches to that
//!   Gateway's own listeners only, not to its ListenerSets'.
//!   `ResolvedRefs` is True when every backendRef is a Service that exists;
//!   else False, `InvalidKind`, `RefNotPermitted` (another namespace with no
//!   ReferenceGrant allowing it) or `BackendNotFound`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ApiResource, DynamicObject, Patch};
use kube::core::{GroupVersionKind, PartialObjectMeta};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{now_rfc3339, write_params};

/// The `controllerName` the simulator writes into HTTPRoute statuses.
pub const CONTROLLER_NAME: &str = "kapsa.dev/gateway-simulator";
/// API group of Gateway API.
pub const GROUP: &str = "gateway.networking.k8s.io";
/// The API version the simulator serves.
pub const API_VERSION: &str = "gateway.networking.k8s.io/v1";
/// Resources that must be served before the simulator starts.
const REQUIRED: [&str; 3] = ["gateways", "listenersets", "httproutes"];

/// How long changes are coalesced before a pass.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// A pass runs at least this often, even with no change seen.
const RESYNC: Duration = Duration::from_secs(5);
/// The next pass after a failed write.
const RETRY: Duration = Duration::from_millis(500);

/// The `Gateway` resource (namespaced): [`kapsa_api::external::gateway_gateway`].
pub fn gateway_resource() -> ApiResource {
    kapsa_api::external::gateway_gateway()
}

/// The `GatewayClass` resource (cluster-scoped).
pub fn gateway_class_resource() -> ApiResource {
    kapsa_api::external::gateway_gateway_class()
}

/// The `ListenerSet` resource (namespaced).
pub fn listener_set_resource() -> ApiResource {
    kapsa_api::external::gateway_listener_set()
}

/// The `HTTPRoute` resource (namespaced).
pub fn http_route_resource() -> ApiResource {
    kapsa_api::external::gateway_http_route()
}

/// The `ReferenceGrant` resource (namespaced).
pub fn reference_grant_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, "v1", "ReferenceGrant"),
        "referencegrants",
    )
}

// ---------------------------------------------------------------------------
// The fields the simulator reads.

/// A listener of a Gateway or ListenerSet.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct Listener {
    pub name: String,
    pub hostname: Option<String>,
    pub port: Option<i64>,
    pub protocol: String,
    pub allowed_routes: Option<AllowedRoutes>,
}

/// A listener's `allowedRoutes`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct AllowedRoutes {
    pub namespaces: Option<FromNamespaces>,
    pub kinds: Option<Vec<RouteGroupKind>>,
}

/// `allowedRoutes.namespaces` of a listener, or `allowedListeners.namespaces`
/// of a Gateway: `from` is `All`, `Same`, `Selector` or `None`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct FromNamespaces {
    pub from: Option<String>,
    pub selector: Option<LabelSelector>,
}

/// A route kind in `allowedRoutes.kinds`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteGroupKind {
    pub group: Option<String>,
    pub kind: String,
}

/// A Gateway's `spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct GatewaySpec {
    pub listeners: Vec<Listener>,
    pub allowed_listeners: Option<AllowedListeners>,
}

/// A Gateway's `spec.allowedListeners`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct AllowedListeners {
    pub namespaces: Option<FromNamespaces>,
}

/// A ListenerSet's `spec`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ListenerSetSpec {
    pub parent_ref: ParentRef,
    pub listeners: Vec<Listener>,
}

/// A reference to a parent: an HTTPRoute's `parentRefs[]`, a ListenerSet's
/// `parentRef`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct ParentRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub section_name: Option<String>,
    pub port: Option<i64>,
}

/// An HTTPRoute's `spec` (`parentRefs` kept as written, to be copied into
/// the status).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRouteSpec {
    pub parent_refs: Vec<Value>,
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule>,
}

/// A rule of an HTTPRoute (its backends only).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct RouteRule {
    pub backend_refs: Vec<BackendRef>,
}

/// A `backendRefs[]` entry.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", default)]
pub struct BackendRef {
    pub group: Option<String>,
    pub kind: Option<String>,
    pub name: String,
    pub namespace: Option<String>,
    pub port: Option<i64>,
}

// ---------------------------------------------------------------------------
// The rules, as pure functions.

/// Why a parent does not take a route (or a Gateway a ListenerSet): a
/// Gateway API condition reason and a message.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn refusal(reason: &'static str, message: String) -> Refusal {
    Refusal { reason, message }
}

/// Whether two hostnames, each possibly a wildcard `*.<suffix>`, have a host
/// in common. A wildcard matches any host under its suffix with at least one
/// more label (`*.example.com` matches `a.example.com` and `a.b.example.com`,
/// not `example.com`).
pub fn hostnames_intersect(a: &str, b: &str) -> bool {
    let (a, b) = (a.to_ascii_lowercase(), b.to_ascii_lowercase());
    let under = |host: &str, suffix: &str| {
        host.len() > suffix.len() + 1
            && host.ends_with(suffix)
            && host.as_bytes()[host.len() - suffix.len() - 1] == b'.'
    };
    match (a.strip_prefix("*."), b.strip_prefix("*.")) {
        (None, None) => a == b,
        (Some(suffix), None) => under(&b, suffix),
        (None, Some(suffix)) => under(&a, suffix),
        (Some(sa), Some(sb)) => sa == sb || under(sa, sb) || under(sb, sa),
    }
}

/// Whether a listener with `listener_hostname` takes a route with
/// `route_hostnames`: no hostname on either side matches anything;
/// otherwise one of the route's must intersect the listener's.
pub fn hostname_matches(listener_hostname: Option<&str>, route_hostnames: &[String]) -> bool {
    match listener_hostname.filter(|h| !h.is_empty()) {
        None => true,
        Some(_) if route_hostnames.is_empty() => true,
        Some(listener) => route_hostnames
            .iter()
            .any(|h| hostnames_intersect(listener, h)),
    }
}

/// Whether `labels` match a Kubernetes label selector: every `matchLabels`
/// pair and every `matchExpressions` requirement (`In`, `NotIn`, `Exists`,
/// `DoesNotExist`; any other operator matches nothing). An empty selector
/// matches everything.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_match = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_match = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_match && expressions_match
}

/// Whether `namespace` (labelled `labels`) is admitted by a `from` rule whose
/// owner (the Gateway, ListenerSet) is in `owner_namespace`. With no rule or
/// no `from`, `default_from` applies (`None` for a Gateway's
/// `allowedListeners`, `Same` for a listener's `allowedRoutes`). `Selector`
/// with no selector admits nothing.
pub fn namespace_allowed(
    rule: Option<&FromNamespaces>,
    default_from: &str,
    owner_namespace: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
) -> bool {
    match rule.and_then(|r| r.from.as_deref()).unwrap_or(default_from) {
        "All" => true,
        "Same" => namespace == owner_namespace,
        "Selector" => rule
            .and_then(|r| r.selector.as_ref())
            .is_some_and(|s| selector_matches(s, labels)),
        _ => false,
    }
}

fn is_http_route(kind: &RouteGroupKind) -> bool {
    kind.kind == "HTTPRoute" && kind.group.as_deref().unwrap_or(GROUP) == GROUP
}

fn serves_protocol(listener: &Listener) -> bool {
    matches!(listener.protocol.as_str(), "HTTP" | "HTTPS")
}

/// Whether a listener takes HTTPRoutes, and whether its `allowedRoutes.kinds`
/// lists kinds the simulator does not serve (everything but HTTPRoute).
fn route_kinds(listener: &Listener) -> (bool, bool) {
    let kinds = listener
        .allowed_routes
        .as_ref()
        .and_then(|a| a.kinds.as_ref())
        .filter(|k| !k.is_empty());
    match kinds {
        None => (serves_protocol(listener), false),
        Some(kinds) => (
            serves_protocol(listener) && kinds.iter().any(is_http_route),
            kinds.iter().any(|k| !is_http_route(k)),
        ),
    }
}

/// Whether a ListenerSet in `namespace` (labelled `labels`) is accepted by
/// the parent its `parent_ref` names; `gateway` is that Gateway (its
/// namespace and spec), if it exists.
pub fn listener_set_acceptance(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    parent_ref: &ParentRef,
    gateway: Option<(&str, &GatewaySpec)>,
) -> Result<(), Refusal> {
    let group = parent_ref.group.as_deref().unwrap_or(GROUP);
    let kind = parent_ref.kind.as_deref().unwrap_or("Gateway");
    if group != GROUP || kind != "Gateway" {
        return Err(refusal(
            "ParentNotAccepted",
            format!("parentRef names a {kind} of group {group:?}, not a Gateway"),
        ));
    }
    let gateway_namespace = parent_ref.namespace.as_deref().unwrap_or(namespace);
    let what = format!("Gateway {gateway_namespace}/{}", parent_ref.name);
    let Some((owner_namespace, spec)) = gateway else {
        return Err(refusal("ParentNotAccepted", format!("{what} not found")));
    };
    let rule = spec
        .allowed_listeners
        .as_ref()
        .and_then(|a| a.namespaces.as_ref());
    if namespace_allowed(rule, "None", owner_namespace, namespace, labels) {
        Ok(())
    } else {
        let from = rule.and_then(|r| r.from.as_deref()).unwrap_or("None");
        Err(refusal(
            "NotAllowed",
            format!(
                "{what} does not allow ListenerSets from namespace {namespace} (allowedListeners.namespaces.from: {from})"
            ),
        ))
    }
}

/// A route's parent as the simulator sees it.
#[derive(Clone, Copy, Debug)]
pub enum Parent<'a> {
    /// No such Gateway or ListenerSet.
    Missing,
    /// A ListenerSet its Gateway does not accept (the message says why).
    NotAccepted(&'a str),
    /// A Gateway, or an accepted ListenerSet: its namespace and listeners.
    Accepted {
        namespace: &'a str,
        listeners: &'a [Listener],
    },
}

/// The HTTPRoute facts attachment depends on.
#[derive(Clone, Copy, Debug)]
pub struct Route<'a> {
    pub namespace: &'a str,
    pub namespace_labels: &'a BTreeMap<String, String>,
    pub hostnames: &'a [String],
}

/// The listeners of `parent` that take `route` through `parent_ref`, or why
/// none does (the first failing step: parent, `sectionName`/`port`,
/// `allowedRoutes`, hostname).
pub fn attach(
    route: &Route<'_>,
    parent_ref: &ParentRef,
    parent: &Parent<'_>,
) -> Result<Vec<String>, Refusal> {
    let what = format!(
        "{} {}/{}",
        parent_ref.kind.as_deref().unwrap_or("Gateway"),
        parent_ref.namespace.as_deref().unwrap_or(route.namespace),
        parent_ref.name
    );
    let (owner_namespace, listeners) = match parent {
        Parent::Missing => return Err(refusal("NoMatchingParent", format!("{what} not found"))),
        Parent::NotAccepted(why) => {
            return Err(refusal(
                "NoMatchingParent",
                format!("{what} is not accepted: {why}"),
            ));
        }
        Parent::Accepted {
            namespace,
            listeners,
        } => (*namespace, *listeners),
    };
    let named: Vec<&Listener> = listeners
        .iter()
        .filter(|l| {
            parent_ref
                .section_name
                .as_ref()
                .is_none_or(|s| &l.name == s)
        })
        .filter(|l| parent_ref.port.is_none_or(|p| l.port == Some(p)))
        .collect();
    if named.is_empty() {
        return Err(refusal(
            "NoMatchingParent",
            format!(
                "{what} has no listener with sectionName {:?} and port {:?}",
                parent_ref.section_name, parent_ref.port
            ),
        ));
    }
    let allowing: Vec<&Listener> = named
        .into_iter()
        .filter(|l| {
            route_kinds(l).0
                && namespace_allowed(
                    l.allowed_routes
                        .as_ref()
                        .and_then(|a| a.namespaces.as_ref()),
                    "Same",
                    owner_namespace,
                    route.namespace,
                    route.namespace_labels,
                )
        })
        .collect();
    if allowing.is_empty() {
        return Err(refusal(
            "NotAllowedByListeners",
            format!(
                "no listener of {what} allows HTTPRoutes from namespace {}",
                route.namespace
            ),
        ));
    }
    let matching: Vec<String> = allowing
        .into_iter()
        .filter(|l| hostname_matches(l.hostname.as_deref(), route.hostnames))
        .map(|l| l.name.clone())
        .collect();
    if matching.is_empty() {
        return Err(refusal(
            "NoMatchingListenerHostname",
            format!(
                "no listener of {what} that allows the route has a hostname matching {:?}",
                route.hostnames
            ),
        ));
    }
    Ok(matching)
}

/// Whether a ReferenceGrant's `spec` lets HTTPRoutes of `from_namespace`
/// refer to the Service `name` (in the grant's namespace).
pub fn grant_permits(grant_spec: &Value, from_namespace: &str, name: &str) -> bool {
    let from = grant_spec["from"].as_array().is_some_and(|f| {
        f.iter().any(|f| {
            f["group"] == GROUP && f["kind"] == "HTTPRoute" && f["namespace"] == from_namespace
        })
    });
    let to = grant_spec["to"].as_array().is_some_and(|t| {
        t.iter().any(|t| {
            t["group"] == ""
                && t["kind"] == "Service"
                && t["name"].as_str().is_none_or(|n| n.is_empty() || n == name)
        })
    });
    from && to
}

/// Why a route's backendRefs do not resolve (the first failing one), or
/// `None`. `service_exists(namespace, name)`; `permitted(namespace, name)`
/// says whether a ReferenceGrant allows the route's namespace to refer to a
/// Service in another namespace.
pub fn backend_refusal(
    route_namespace: &str,
    backends: &[BackendRef],
    service_exists: impl Fn(&str, &str) -> bool,
    permitted: impl Fn(&str, &str) -> bool,
) -> Option<Refusal> {
    for backend in backends {
        let group = backend.group.as_deref().unwrap_or("");
        let kind = backend.kind.as_deref().unwrap_or("Service");
        let namespace = backend.namespace.as_deref().unwrap_or(route_namespace);
        let what = format!("{kind} {namespace}/{}", backend.name);
        if !group.is_empty() || kind != "Service" {
            return Some(refusal(
                "InvalidKind",
                format!("backendRef {what} (group {group:?}) is not a Service"),
            ));
        }
        if namespace != route_namespace && !permitted(namespace, &backend.name) {
            return Some(refusal(
                "RefNotPermitted",
                format!(
                    "backendRef {what} is in another namespace and no ReferenceGrant there allows it"
                ),
            ));
        }
        if !service_exists(namespace, &backend.name) {
            return Some(refusal(
                "BackendNotFound",
                format!("backendRef {what} not found"),
            ));
        }
    }
    None
}

/// A condition without `lastTransitionTime` (added when written).
fn cond(type_: &str, status: bool, reason: &str, message: &str, generation: i64) -> Value {
    json!({
        "type": type_,
        "status": if status { "True" } else { "False" },
        "reason": reason,
        "message": format!("Gateway API simulator: {message}"),
        "observedGeneration": generation,
    })
}

/// An HTTPRoute's `status.parents[]` entry for `parent_ref` (copied as
/// written in the spec), without `lastTransitionTime`s: `Accepted` from
/// [`attach`], `ResolvedRefs` from [`backend_refusal`].
pub fn route_parent_status(
    parent_ref: &Value,
    generation: i64,
    attached: &Result<Vec<String>, Refusal>,
    backends: Option<&Refusal>,
) -> Value {
    let accepted = match attached {
        Ok(listeners) => cond(
            "Accepted",
            true,
            "Accepted",
            &format!("accepted by listener(s) {}", listeners.join(", ")),
            generation,
        ),
        Err(r) => cond("Accepted", false, r.reason, &r.message, generation),
    };
    let resolved = match backends {
        None => cond(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "every backendRef resolved",
            generation,
        ),
        Some(r) => cond("ResolvedRefs", false, r.reason, &r.message, generation),
    };
    json!({
        "parentRef": parent_ref,
        "controllerName": CONTROLLER_NAME,
        "conditions": [accepted, resolved],
    })
}

/// A `status.listeners[]` entry of a Gateway or ListenerSet, without
/// `lastTransitionTime`s. `owner_refusal` says why the owner (a ListenerSet)
/// is not accepted, if it is not.
pub fn listener_status(
    listener: &Listener,
    owner_refusal: Option<&str>,
    attached_routes: usize,
    generation: i64,
) -> Value {
    let (http_routes, other_kinds) = route_kinds(listener);
    let supported: Vec<Value> = if http_routes {
        vec![json!({"group": GROUP, "kind": "HTTPRoute"})]
    } else {
        Vec::new()
    };
    let (accepted, programmed) = if let Some(why) = owner_refusal {
        let message = format!("not attached: {why}");
        (
            cond("Accepted", false, "Pending", &message, generation),
            cond("Programmed", false, "Pending", &message, generation),
        )
    } else if !serves_protocol(listener) {
        let message = format!(
            "protocol {} is not served (the simulator serves HTTP and HTTPS)",
            listener.protocol
        );
        (
            cond(
                "Accepted",
                false,
                "UnsupportedProtocol",
                &message,
                generation,
            ),
            cond("Programmed", false, "Invalid", &message, generation),
        )
    } else {
        (
            cond(
                "Accepted",
                true,
                "Accepted",
                "listener accepted",
                generation,
            ),
            cond(
                "Programmed",
                true,
                "Programmed",
                "listener programmed (no data plane)",
                generation,
            ),
        )
    };
    let resolved = if other_kinds {
        cond(
            "ResolvedRefs",
            false,
            "InvalidRouteKinds",
            "allowedRoutes.kinds lists kinds other than HTTPRoute, which the simulator does not serve",
            generation,
        )
    } else {
        cond(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "references resolved (certificates are not checked)",
            generation,
        )
    };
    json!({
        "name": listener.name,
        "attachedRoutes": attached_routes,
        "supportedKinds": supported,
        "conditions": [accepted, programmed, resolved],
    })
}

/// `value` without its `lastTransitionTime`s, for comparing statuses.
fn without_times(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| k.as_str() != "lastTransitionTime")
                .map(|(k, v)| (k.clone(), without_times(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_times).collect()),
        other => other.clone(),
    }
}

/// Gives each condition of `conditions` a `lastTransitionTime`: the one of
/// the `old` condition of its type if the status is the same, else now.
fn stamp_times(conditions: &mut Value, old: Option<&Value>) {
    let now = now_rfc3339();
    let Some(conditions) = conditions.as_array_mut() else {
        return;
    };
    for c in conditions {
        let previous = old
            .and_then(Value::as_array)
            .and_then(|o| o.iter().find(|p| p["type"] == c["type"]))
            .filter(|p| p["status"] == c["status"] && p["lastTransitionTime"].is_string());
        c["lastTransitionTime"] = match previous {
            Some(p) => p["lastTransitionTime"].clone(),
            None => json!(now),
        };
    }
}

// ---------------------------------------------------------------------------
// The controller: caches, passes, writes.

type Key = (String, String);

fn key_of(obj: &DynamicObject) -> Key {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

fn spec_of<T: DeserializeOwned + Default>(obj: &DynamicObject) -> T {
    serde_json::from_value(obj.data["spec"].clone()).unwrap_or_default()
}

/// Everything a pass reads, from the caches.
struct Snapshot {
    gateways: Vec<Arc<DynamicObject>>,
    listener_sets: Vec<Arc<DynamicObject>>,
    routes: Vec<Arc<DynamicObject>>,
    grants: Vec<Arc<DynamicObject>>,
    services: HashSet<Key>,
    namespace_labels: HashMap<String, BTreeMap<String, String>>,
}

/// A status the simulator means to write.
struct StatusWrite {
    resource: ApiResource,
    namespace: String,
    name: String,
    resource_version: Option<String>,
    status: Value,
    /// The simulator's part of the status, without times.
    fingerprint: Value,
}

struct ListenerSetFacts<'a> {
    obj: &'a DynamicObject,
    spec: ListenerSetSpec,
    gateway: Key,
    acceptance: Result<(), Refusal>,
}

/// The write for a Gateway's or ListenerSet's status, if it changed: `ours`
/// conditions (other types are kept), `listeners`, and `extra` fields.
fn owner_write(
    obj: &DynamicObject,
    resource: ApiResource,
    ours: Vec<Value>,
    mut listeners: Vec<Value>,
    extra: serde_json::Map<String, Value>,
) -> Option<StatusWrite> {
    let current = &obj.data["status"];
    let current_conditions = current["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let current_ours: Vec<Value> = ours
        .iter()
        .map(|c| {
            current_conditions
                .iter()
                .find(|p| p["type"] == c["type"])
                .cloned()
                .unwrap_or(Value::Null)
        })
        .collect();
    let mut wanted = json!({"conditions": &ours, "listeners": &listeners});
    let mut have = json!({"conditions": current_ours, "listeners": current["listeners"]});
    for (k, v) in &extra {
        wanted[k] = v.clone();
        have[k] = current[k].clone();
    }
    let fingerprint = without_times(&wanted);
    if fingerprint == without_times(&have) {
        return None;
    }
    let mut stamped = Value::Array(ours);
    stamp_times(&mut stamped, Some(&current["conditions"]));
    let ours = stamped.as_array().cloned().unwrap_or_default();
    let old_listeners = current["listeners"].as_array().cloned().unwrap_or_default();
    for l in &mut listeners {
        let old = old_listeners.iter().find(|o| o["name"] == l["name"]);
        stamp_times(&mut l["conditions"], old.map(|o| &o["conditions"]));
    }
    let mut conditions: Vec<Value> = current_conditions
        .into_iter()
        .filter(|c| !ours.iter().any(|o| o["type"] == c["type"]))
        .collect();
    conditions.extend(ours);
    let mut status = json!({"conditions": conditions, "listeners": listeners});
    for (k, v) in extra {
        status[k] = v;
    }
    Some(StatusWrite {
        resource,
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        resource_version: obj.resource_version(),
        status,
        fingerprint,
    })
}

/// The statuses that differ from what the simulator wants, from a snapshot.
fn plan(s: &Snapshot) -> Vec<StatusWrite> {
    let no_labels = BTreeMap::new();
    let labels_of = |ns: &str| s.namespace_labels.get(ns).unwrap_or(&no_labels);
    let gateways: HashMap<Key, (&DynamicObject, GatewaySpec)> = s
        .gateways
        .iter()
        .map(|g| (key_of(g), (&**g, spec_of(g))))
        .collect();
    let listener_sets: BTreeMap<Key, ListenerSetFacts<'_>> = s
        .listener_sets
        .iter()
        .map(|ls| {
            let (namespace, name) = key_of(ls);
            let spec: ListenerSetSpec = spec_of(ls);
            let gateway = (
                spec.parent_ref
                    .namespace
                    .clone()
                    .unwrap_or_else(|| namespace.clone()),
                spec.parent_ref.name.clone(),
            );
            let acceptance = listener_set_acceptance(
                &namespace,
                labels_of(&namespace),
                &spec.parent_ref,
                gateways.get(&gateway).map(|(_, g)| (gateway.0.as_str(), g)),
            );
            let facts = ListenerSetFacts {
                obj: ls,
                spec,
                gateway,
                acceptance,
            };
            ((namespace, name), facts)
        })
        .collect();

    let mut writes = Vec::new();
    // (parent kind, parent, listener name) -> routes attached.
    let mut attached: HashMap<(&'static str, Key, String), usize> = HashMap::new();
    for route in &s.routes {
        let namespace = route.namespace().unwrap_or_default();
        let generation = route.metadata.generation.unwrap_or_default();
        let spec: HttpRouteSpec = spec_of(route);
        let facts = Route {
            namespace: &namespace,
            namespace_labels: labels_of(&namespace),
            hostnames: &spec.hostnames,
        };
        let backends: Vec<BackendRef> = spec
            .rules
            .iter()
            .flat_map(|r| r.backend_refs.iter().cloned())
            .collect();
        let backends = backend_refusal(
            &namespace,
            &backends,
            |ns, name| s.services.contains(&(ns.to_string(), name.to_string())),
            |ns, name| {
                s.grants.iter().any(|g| {
                    g.namespace().as_deref() == Some(ns)
                        && grant_permits(&g.data["spec"], &namespace, name)
                })
            },
        );
        let mut ours = Vec::new();
        for raw in &spec.parent_refs {
            let Ok(parent_ref) = serde_json::from_value::<ParentRef>(raw.clone()) else {
                continue;
            };
            if parent_ref.group.as_deref().unwrap_or(GROUP) != GROUP {
                continue;
            }
            let key = (
                parent_ref
                    .namespace
                    .clone()
                    .unwrap_or_else(|| namespace.clone()),
                parent_ref.name.clone(),
            );
            let (kind, parent) = match parent_ref.kind.as_deref().unwrap_or("Gateway") {
                "Gateway" => (
                    "Gateway",
                    match gateways.get(&key) {
                        Some((_, g)) => Parent::Accepted {
                            namespace: &key.0,
                            listeners: &g.listeners,
                        },
                        None => Parent::Missing,
                    },
                ),
                "ListenerSet" => (
                    "ListenerSet",
                    match listener_sets.get(&key) {
                        None => Parent::Missing,
                        Some(ls) => match &ls.acceptance {
                            Ok(()) => Parent::Accepted {
                                namespace: &key.0,
                                listeners: &ls.spec.listeners,
                            },
                            Err(r) => Parent::NotAccepted(&r.message),
                        },
                    },
                ),
                _ => continue,
            };
            let result = attach(&facts, &parent_ref, &parent);
            for listener in result.iter().flatten() {
                *attached
                    .entry((kind, key.clone(), listener.clone()))
                    .or_default() += 1;
            }
            ours.push(route_parent_status(
                raw,
                generation,
                &result,
                backends.as_ref(),
            ));
        }
        let current = route.data["status"]["parents"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let (mine, others): (Vec<Value>, Vec<Value>) = current
            .into_iter()
            .partition(|p| p["controllerName"] == CONTROLLER_NAME);
        let fingerprint = without_times(&Value::Array(ours.clone()));
        if fingerprint == without_times(&Value::Array(mine.clone())) {
            continue;
        }
        for entry in &mut ours {
            let old = mine.iter().find(|m| m["parentRef"] == entry["parentRef"]);
            stamp_times(&mut entry["conditions"], old.map(|o| &o["conditions"]));
        }
        let mut parents = others;
        parents.extend(ours);
        writes.push(StatusWrite {
            resource: http_route_resource(),
            namespace,
            name: route.name_any(),
            resource_version: route.resource_version(),
            status: json!({"parents": parents}),
            fingerprint,
        });
    }

    let count = |kind: &'static str, key: &Key, listener: &str| {
        attached
            .get(&(kind, key.clone(), listener.to_string()))
            .copied()
            .unwrap_or(0)
    };
    for (key, ls) in &listener_sets {
        let generation = ls.obj.metadata.generation.unwrap_or_default();
        let why = ls.acceptance.as_ref().err();
        let gateway = format!("Gateway {}/{}", ls.gateway.0, ls.gateway.1);
        let ours = match why {
            None => vec![
                cond(
                    "Accepted",
                    true,
                    "Accepted",
                    &format!("attached to {gateway}"),
                    generation,
                ),
                cond(
                    "Programmed",
                    true,
                    "Programmed",
                    &format!("programmed on {gateway} (no data plane)"),
                    generation,
                ),
            ],
            Some(r) => vec![
                cond("Accepted", false, r.reason, &r.message, generation),
                cond("Programmed", false, "Invalid", &r.message, generation),
            ],
        };
        let listeners = ls
            .spec
            .listeners
            .iter()
            .map(|l| {
                listener_status(
                    l,
                    why.map(|r| r.message.as_str()),
                    count("ListenerSet", key, &l.name),
                    generation,
                )
            })
            .collect();
        writes.extend(owner_write(
            ls.obj,
            listener_set_resource(),
            ours,
            listeners,
            serde_json::Map::new(),
        ));
    }

    for (key, (obj, spec)) in &gateways {
        let generation = obj.metadata.generation.unwrap_or_default();
        let ours = vec![
            cond(
                "Accepted",
                true,
                "Accepted",
                "accepted, whatever its class",
                generation,
            ),
            cond(
                "Programmed",
                true,
                "Programmed",
                "programmed (no data plane)",
                generation,
            ),
        ];
        let listeners = spec
            .listeners
            .iter()
            .map(|l| listener_status(l, None, count("Gateway", key, &l.name), generation))
            .collect();
        let attached_sets = listener_sets
            .values()
            .filter(|ls| &ls.gateway == key && ls.acceptance.is_ok())
            .count();
        let mut extra = serde_json::Map::new();
        extra.insert("attachedListenerSets".into(), json!(attached_sets));
        writes.extend(owner_write(obj, gateway_resource(), ours, listeners, extra));
    }
    writes
}

/// The simulator's caches.
struct Stores {
    gateway_classes: Store<DynamicObject>,
    gateways: Store<DynamicObject>,
    listener_sets: Store<DynamicObject>,
    routes: Store<DynamicObject>,
    grants: Option<Store<DynamicObject>>,
    services: Store<PartialObjectMeta<Service>>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
}

impl Stores {
    async fn wait_until_ready(&self) {
        let _ = self.gateway_classes.wait_until_ready().await;
        let _ = self.gateways.wait_until_ready().await;
        let _ = self.listener_sets.wait_until_ready().await;
        let _ = self.routes.wait_until_ready().await;
        if let Some(grants) = &self.grants {
            let _ = grants.wait_until_ready().await;
        }
        let _ = self.services.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
    }

    fn snapshot(&self) -> Snapshot {
        // Gateways of a class another controller owns (a real gateway
        // controller in the real lane) are left alone, with what attaches
        // to them only.
        let classes: HashMap<String, String> = self
            .gateway_classes
            .state()
            .iter()
            .map(|c| {
                (
                    c.name_any(),
                    c.data["spec"]["controllerName"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        let (gateways, foreign): (Vec<_>, Vec<_>) =
            self.gateways.state().into_iter().partition(|g| {
                let class = g.data["spec"]["gatewayClassName"]
                    .as_str()
                    .unwrap_or_default();
                classes
                    .get(class)
                    .is_none_or(|controller| controller == CONTROLLER_NAME)
            });
        let foreign: HashSet<Key> = foreign.iter().map(|g| key_of(g)).collect();
        let to_foreign = |namespace: &str, parent: &Value| {
            parent["kind"].as_str().is_none_or(|k| k == "Gateway")
                && foreign.contains(&(
                    parent["namespace"]
                        .as_str()
                        .unwrap_or(namespace)
                        .to_string(),
                    parent["name"].as_str().unwrap_or_default().to_string(),
                ))
        };
        let listener_sets = self
            .listener_sets
            .state()
            .into_iter()
            .filter(|l| {
                !to_foreign(
                    &l.namespace().unwrap_or_default(),
                    &l.data["spec"]["parentRef"],
                )
            })
            .collect();
        let routes = self
            .routes
            .state()
            .into_iter()
            .filter(|r| {
                let namespace = r.namespace().unwrap_or_default();
                let parents = r.data["spec"]["parentRefs"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                parents.is_empty() || !parents.iter().all(|p| to_foreign(&namespace, p))
            })
            .collect();
        Snapshot {
            gateways,
            listener_sets,
            routes,
            grants: self.grants.as_ref().map(Store::state).unwrap_or_default(),
            services: self
                .services
                .state()
                .iter()
                .map(|s| (s.namespace().unwrap_or_default(), s.name_any()))
                .collect(),
            namespace_labels: self
                .namespaces
                .state()
                .iter()
                .map(|n| (n.name_any(), n.labels().clone()))
                .collect(),
        }
    }
}

/// Polls API discovery (quietly) until Gateway API serves Gateways,
/// ListenerSets and HTTPRoutes; says whether ReferenceGrants are served too.
async fn wait_for_gateway_api(client: &Client) -> bool {
    let mut grace = 0;
    loop {
        if let Ok(list) = client.list_api_group_resources(API_VERSION).await {
            let served: HashSet<&str> = list.resources.iter().map(|r| r.name.as_str()).collect();
            if REQUIRED.iter().all(|r| served.contains(r)) {
                // The CRDs are installed together: give ReferenceGrants a
                // few seconds to be served as well.
                if served.contains("referencegrants") || grace >= 5 {
                    return served.contains("referencegrants");
                }
                grace += 1;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn write(client: &Client, w: &StatusWrite) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &w.namespace, &w.resource);
    // The resourceVersion makes the write fail (409) if the cache was stale.
    let body = json!({
        "metadata": {"resourceVersion": w.resource_version},
        "status": w.status,
    });
    api.patch_status(&w.name, &write_params(), &Patch::Merge(&body))
        .await
        .map(|_| ())
}

/// Runs passes on every change seen (coalesced), and every [`RESYNC`].
async fn simulate(client: Client, stores: Stores, changed: Arc<Notify>) {
    stores.wait_until_ready().await;
    tracing::info!("Gateway API simulator: caches ready");
    // What was last written per object: (resourceVersion it was written
    // over, fingerprint). A cache still at that version has not seen the
    // write yet, so the same write is not repeated.
    let mut written: HashMap<(String, Key), (Option<String>, Value)> = HashMap::new();
    let mut wait = Duration::ZERO;
    loop {
        let _ = tokio::time::timeout(wait, changed.notified()).await;
        tokio::time::sleep(DEBOUNCE).await;
        let writes = plan(&stores.snapshot());
        let keys: HashSet<(String, Key)> = writes
            .iter()
            .map(|w| {
                (
                    w.resource.plural.clone(),
                    (w.namespace.clone(), w.name.clone()),
                )
            })
            .collect();
        written.retain(|k, _| keys.contains(k));
        let mut retry = false;
        for w in writes {
            let key = (
                w.resource.plural.clone(),
                (w.namespace.clone(), w.name.clone()),
            );
            let memo = (w.resource_version.clone(), w.fingerprint.clone());
            if written.get(&key) == Some(&memo) {
                continue;
            }
            match write(&client, &w).await {
                Ok(()) => {
                    tracing::debug!(
                        kind = %w.resource.kind, namespace = %w.namespace, name = %w.name,
                        "Gateway API simulator: status written"
                    );
                    written.insert(key, memo);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(kube::Error::Api(e)) if e.code == 409 => retry = true,
                Err(error) => {
                    tracing::warn!(
                        %error, kind = %w.resource.kind, namespace = %w.namespace, name = %w.name,
                        "Gateway API simulator: status write failed; retrying"
                    );
                    retry = true;
                }
            }
        }
        wait = if retry { RETRY } else { RESYNC };
    }
}

/// A watch stream's consumer: every event wakes the passes up; errors (the
/// watcher retries with a backoff) are logged quietly.
fn on_event<T>(changed: Arc<Notify>) -> impl FnMut(Result<T, watcher::Error>) -> future::Ready<()> {
    move |event| {
        match event {
            Ok(_) => changed.notify_one(),
            Err(error) => tracing::debug!(%error, "Gateway API simulator: watch error"),
        }
        future::ready(())
    }
}

/// Runs the simulator until the future is dropped: waits for the Gateway API
/// CRDs (possibly forever), then keeps Gateway, ListenerSet and HTTPRoute
/// statuses up to date.
pub async fn run(client: Client) {
    let grants_served = wait_for_gateway_api(&client).await;
    tracing::info!(
        controller = CONTROLLER_NAME,
        "Gateway API simulator: the Gateway API is served; simulating its controller"
    );
    let changed = Arc::new(Notify::new());
    let dynamic = |resource: ApiResource| super::reflect_dynamic(&client, &resource);
    let (gateway_classes, gateway_class_events) = dynamic(gateway_class_resource());
    let (gateways, gateway_events) = dynamic(gateway_resource());
    let (listener_sets, listener_set_events) = dynamic(listener_set_resource());
    let (routes, route_events) = dynamic(http_route_resource());
    let (grants, grant_events) = if grants_served {
        let (store, stream) = dynamic(reference_grant_resource());
        (Some(store), Some(stream))
    } else {
        (None, None)
    };
    let (services, services_writer) = reflector::store();
    let service_events = watcher(
        Api::<PartialObjectMeta<Service>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(services_writer);
    let (namespaces, namespaces_writer) = reflector::store();
    let namespace_events = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(namespaces_writer);
    let stores = Stores {
        gateway_classes,
        gateways,
        listener_sets,
        routes,
        grants,
        services,
        namespaces,
    };
    let grant_watch = async {
        if let Some(events) = grant_events {
            events.for_each(on_event(changed.clone())).await;
        }
    };
    tokio::join!(
        gateway_class_events.for_each(on_event(changed.clone())),
        gateway_events.for_each(on_event(changed.clone())),
        listener_set_events.for_each(on_event(changed.clone())),
        route_events.for_each(on_event(changed.clone())),
        grant_watch,
        service_events.for_each(on_event(changed.clone())),
        namespace_events.for_each(on_event(changed.clone())),
        simulate(client.clone(), stores, changed.clone()),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn yaml<T: DeserializeOwned>(text: &str) -> T {
        serde_yaml_ng::from_str(text).expect("valid YAML")
    }

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn exact_hostnames_intersect_only_when_equal() {
        assert!(hostnames_intersect("a.example.com", "a.example.com"));
        assert!(hostnames_intersect("A.Example.com", "a.example.com"));
        assert!(!hostnames_intersect("a.example.com", "b.example.com"));
    }

    #[test]
    fn a_wildcard_needs_at_least_one_more_label() {
        assert!(hostnames_intersect("*.example.com", "a.example.com"));
        assert!(hostnames_intersect("a.b.example.com", "*.example.com"));
        assert!(!hostnames_intersect("*.example.com", "example.com"));
        assert!(!hostnames_intersect("*.example.com", "aexample.com"));
        assert!(!hostnames_intersect("*.example.com", "a.example.org"));
    }

    #[test]
    fn two_wildcards_intersect_when_one_suffix_contains_the_other() {
        assert!(hostnames_intersect("*.example.com", "*.example.com"));
        assert!(hostnames_intersect("*.example.com", "*.shop.example.com"));
        assert!(hostnames_intersect("*.shop.example.com", "*.example.com"));
        assert!(!hostnames_intersect(
            "*.shop.example.com",
            "*.blog.example.com"
        ));
        assert!(!hostnames_intersect("*.example.com", "*.xexample.com"));
    }

    #[test]
    fn no_hostname_on_either_side_matches_anything() {
        assert!(hostname_matches(None, &hosts(&["a.example.com"])));
        assert!(hostname_matches(Some(""), &hosts(&["a.example.com"])));
        assert!(hostname_matches(Some("a.example.com"), &[]));
        assert!(hostname_matches(
            Some("*.example.com"),
            &hosts(&["x.other.org", "a.example.com"])
        ));
        assert!(!hostname_matches(
            Some("a.example.com"),
            &hosts(&["b.example.com"])
        ));
    }

    #[test]
    fn selector_match_labels_and_expressions() {
        let selector: LabelSelector = yaml(
            r#"
matchLabels: {team: shop}
matchExpressions:
- {key: env, operator: In, values: [prod, staging]}
- {key: tier, operator: NotIn, values: [legacy]}
- {key: kapsa.dev/project, operator: Exists}
- {key: quarantined, operator: DoesNotExist}
"#,
        );
        let good = labels(&[
            ("team", "shop"),
            ("env", "prod"),
            ("kapsa.dev/project", "x"),
        ]);
        assert!(selector_matches(&selector, &good));
        let mut l = good.clone();
        l.insert("team".into(), "blog".into());
        assert!(!selector_matches(&selector, &l), "matchLabels");
        let mut l = good.clone();
        l.insert("env".into(), "dev".into());
        assert!(!selector_matches(&selector, &l), "In");
        let mut l = good.clone();
        l.insert("tier".into(), "legacy".into());
        assert!(!selector_matches(&selector, &l), "NotIn");
        let mut l = good.clone();
        l.remove("kapsa.dev/project");
        assert!(!selector_matches(&selector, &l), "Exists");
        let mut l = good.clone();
        l.insert("quarantined".into(), "".into());
        assert!(!selector_matches(&selector, &l), "DoesNotExist");
        assert!(selector_matches(&LabelSelector::default(), &labels(&[])));
        let unknown: LabelSelector =
            yaml("matchExpressions: [{key: a, operator: Gt, values: ['1']}]");
        assert!(!selector_matches(&unknown, &labels(&[("a", "2")])));
    }

    #[test]
    fn namespace_rules() {
        let none = BTreeMap::new();
        let rule = |text: &str| -> FromNamespaces { yaml(text) };
        assert!(!namespace_allowed(None, "None", "gw", "gw", &none));
        assert!(namespace_allowed(None, "Same", "gw", "gw", &none));
        assert!(!namespace_allowed(None, "Same", "gw", "other", &none));
        assert!(namespace_allowed(
            Some(&rule("from: All")),
            "None",
            "gw",
            "other",
            &none
        ));
        assert!(!namespace_allowed(
            Some(&rule("from: None")),
            "Same",
            "gw",
            "gw",
            &none
        ));
        let selector = rule("{from: Selector, selector: {matchLabels: {shared-gateway: 'true'}}}");
        assert!(namespace_allowed(
            Some(&selector),
            "None",
            "gw",
            "app",
            &labels(&[("shared-gateway", "true")])
        ));
        assert!(!namespace_allowed(
            Some(&selector),
            "None",
            "gw",
            "app",
            &none
        ));
        assert!(!namespace_allowed(
            Some(&rule("from: Selector")),
            "None",
            "gw",
            "app",
            &none
        ));
    }

    fn gateway_spec(allowed: &str) -> GatewaySpec {
        yaml(&format!(
            "listeners: [{{name: http, port: 80, protocol: HTTP}}]\n{allowed}"
        ))
    }

    fn parent_ref(text: &str) -> ParentRef {
        yaml(text)
    }

    #[test]
    fn listener_set_needs_its_gateway_to_allow_it() {
        let none = BTreeMap::new();
        let to_gw = parent_ref("{name: shared, namespace: infra}");
        let r = listener_set_acceptance("shop", &none, &to_gw, None).unwrap_err();
        assert_eq!(r.reason, "ParentNotAccepted");
        let closed = gateway_spec("");
        let r = listener_set_acceptance("shop", &none, &to_gw, Some(("infra", &closed)));
        assert_eq!(r.unwrap_err().reason, "NotAllowed");
        let same = gateway_spec("allowedListeners: {namespaces: {from: Same}}");
        let r = listener_set_acceptance("shop", &none, &to_gw, Some(("infra", &same)));
        assert_eq!(r.unwrap_err().reason, "NotAllowed");
        let local = parent_ref("{name: shared}");
        assert!(listener_set_acceptance("infra", &none, &local, Some(("infra", &same))).is_ok());
        let all = gateway_spec("allowedListeners: {namespaces: {from: All}}");
        assert!(listener_set_acceptance("shop", &none, &to_gw, Some(("infra", &all))).is_ok());
        let not_gateway = parent_ref("{name: shared, kind: Service, group: ''}");
        let r = listener_set_acceptance("shop", &none, &not_gateway, Some(("infra", &all)));
        assert_eq!(r.unwrap_err().reason, "ParentNotAccepted");
    }

    fn listeners(text: &str) -> Vec<Listener> {
        yaml(text)
    }

    #[test]
    fn route_attaches_to_listeners_that_allow_it_and_match_its_host() {
        let ls = listeners(
            r#"
- {name: shop, hostname: shop.apps.example.com, port: 443, protocol: HTTPS}
- {name: previews, hostname: "*.shop.apps.example.com", port: 443, protocol: HTTPS}
- {name: open, hostname: open.apps.example.com, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
- {name: tls, port: 8443, protocol: TLS}
"#,
        );
        let none = BTreeMap::new();
        let parent = Parent::Accepted {
            namespace: "shop",
            listeners: &ls,
        };
        let any = parent_ref("{kind: ListenerSet, name: shop}");
        let route_hosts = hosts(&["shop.apps.example.com"]);
        let route = Route {
            namespace: "shop",
            namespace_labels: &none,
            hostnames: &route_hosts,
        };
        assert_eq!(attach(&route, &any, &parent).unwrap(), vec!["shop"]);

        let preview_hosts = hosts(&["feature-x.shop.apps.example.com"]);
        let preview = Route {
            hostnames: &preview_hosts,
            ..route
        };
        assert_eq!(attach(&preview, &any, &parent).unwrap(), vec!["previews"]);

        let other_hosts = hosts(&["blog.apps.example.com"]);
        let other = Route {
            hostnames: &other_hosts,
            ..route
        };
        let r = attach(&other, &any, &parent).unwrap_err();
        assert_eq!(r.reason, "NoMatchingListenerHostname");

        let no_hosts = Route {
            hostnames: &[],
            ..route
        };
        assert_eq!(
            attach(&no_hosts, &any, &parent).unwrap(),
            vec!["shop", "previews", "open"]
        );

        let foreign = Route {
            namespace: "intruder",
            ..route
        };
        let shop_only = parent_ref("{kind: ListenerSet, name: shop, sectionName: shop}");
        let r = attach(&foreign, &shop_only, &parent).unwrap_err();
        assert_eq!(r.reason, "NotAllowedByListeners");
        // The listener `open` allows the namespace, but not the host.
        let r = attach(&foreign, &any, &parent).unwrap_err();
        assert_eq!(r.reason, "NoMatchingListenerHostname");
        let open_hosts = hosts(&["open.apps.example.com"]);
        let foreign_open = Route {
            hostnames: &open_hosts,
            ..foreign
        };
        assert_eq!(attach(&foreign_open, &any, &parent).unwrap(), vec!["open"]);

        let section = parent_ref("{kind: ListenerSet, name: shop, sectionName: previews}");
        let r = attach(&route, &section, &parent).unwrap_err();
        assert_eq!(r.reason, "NoMatchingListenerHostname");
        let missing_section = parent_ref("{kind: ListenerSet, name: shop, sectionName: nope}");
        let r = attach(&route, &missing_section, &parent).unwrap_err();
        assert_eq!(r.reason, "NoMatchingParent");
        let port = parent_ref("{kind: ListenerSet, name: shop, port: 80}");
        let r = attach(&route, &port, &parent).unwrap_err();
        assert_eq!(r.reason, "NoMatchingListenerHostname");
        let tls = parent_ref("{kind: ListenerSet, name: shop, sectionName: tls}");
        let r = attach(&route, &tls, &parent).unwrap_err();
        assert_eq!(r.reason, "NotAllowedByListeners");

        let r = attach(&route, &any, &Parent::Missing).unwrap_err();
        assert_eq!(r.reason, "NoMatchingParent");
        let r = attach(&route, &any, &Parent::NotAccepted("no")).unwrap_err();
        assert_eq!(r.reason, "NoMatchingParent");
    }

    #[test]
    fn listener_kinds_other_than_http_route_are_refused() {
        let ls = listeners(
            r#"
- {name: grpc, port: 80, protocol: HTTP, allowedRoutes: {kinds: [{kind: GRPCRoute}]}}
"#,
        );
        let none = BTreeMap::new();
        let route = Route {
            namespace: "shop",
            namespace_labels: &none,
            hostnames: &[],
        };
        let parent = Parent::Accepted {
            namespace: "shop",
            listeners: &ls,
        };
        let r = attach(&route, &parent_ref("{name: gw}"), &parent).unwrap_err();
        assert_eq!(r.reason, "NotAllowedByListeners");
        let status = listener_status(&ls[0], None, 0, 1);
        assert_eq!(status["supportedKinds"], json!([]));
        assert_eq!(status["conditions"][2]["reason"], "InvalidRouteKinds");
    }

    #[test]
    fn backend_refs_resolve_to_existing_services_of_permitted_namespaces() {
        let exists =
            |ns: &str, name: &str| (ns, name) == ("shop", "web") || (ns, name) == ("db", "api");
        let grant = json!({
            "from": [{"group": GROUP, "kind": "HTTPRoute", "namespace": "shop"}],
            "to": [{"group": "", "kind": "Service", "name": "api"}],
        });
        let permitted = |_: &str, name: &str| grant_permits(&grant, "shop", name);
        let refs = |text: &str| -> Vec<BackendRef> { yaml(text) };
        assert_eq!(
            backend_refusal("shop", &refs("[{name: web, port: 80}]"), exists, permitted),
            None
        );
        assert_eq!(
            backend_refusal(
                "shop",
                &refs("[{name: api, namespace: db}]"),
                exists,
                permitted
            ),
            None
        );
        let r = backend_refusal("shop", &refs("[{name: gone}]"), exists, permitted).unwrap();
        assert_eq!(r.reason, "BackendNotFound");
        let r = backend_refusal(
            "shop",
            &refs("[{name: web}, {name: other, namespace: db}]"),
            exists,
            permitted,
        )
        .unwrap();
        assert_eq!(r.reason, "RefNotPermitted");
        let r = backend_refusal(
            "shop",
            &refs("[{name: bucket, group: example.com, kind: Bucket}]"),
            exists,
            permitted,
        )
        .unwrap();
        assert_eq!(r.reason, "InvalidKind");
        assert!(!grant_permits(&grant, "intruder", "api"));
        let any_name = json!({
            "from": [{"group": GROUP, "kind": "HTTPRoute", "namespace": "shop"}],
            "to": [{"group": "", "kind": "Service"}],
        });
        assert!(grant_permits(&any_name, "shop", "whatever"));
    }

    #[test]
    fn route_parent_status_copies_the_parent_ref_and_names_the_controller() {
        let raw = json!({"group": GROUP, "kind": "ListenerSet", "name": "shop"});
        let ok = route_parent_status(&raw, 3, &Ok(vec!["https".into()]), None);
        assert_eq!(ok["parentRef"], raw);
        assert_eq!(ok["controllerName"], CONTROLLER_NAME);
        assert_eq!(ok["conditions"][0]["type"], "Accepted");
        assert_eq!(ok["conditions"][0]["status"], "True");
        assert_eq!(ok["conditions"][0]["observedGeneration"], 3);
        assert_eq!(ok["conditions"][1]["reason"], "ResolvedRefs");
        assert!(
            ok["conditions"][0]["message"]
                .as_str()
                .unwrap()
                .contains("simulator")
        );
        let refused = refusal("NotAllowedByListeners", "no".into());
        let missing = refusal("BackendNotFound", "gone".into());
        let bad = route_parent_status(&raw, 3, &Err(refused), Some(&missing));
        assert_eq!(bad["conditions"][0]["status"], "False");
        assert_eq!(bad["conditions"][0]["reason"], "NotAllowedByListeners");
        assert_eq!(bad["conditions"][1]["status"], "False");
        assert_eq!(bad["conditions"][1]["reason"], "BackendNotFound");
    }

    #[test]
    fn transition_times_are_kept_while_the_status_stays() {
        let old = json!([
            {"type": "Accepted", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"},
            {"type": "ResolvedRefs", "status": "True", "lastTransitionTime": "2020-01-01T00:00:00Z"},
        ]);
        let mut new = json!([
            {"type": "Accepted", "status": "True", "reason": "Accepted"},
            {"type": "ResolvedRefs", "status": "False", "reason": "BackendNotFound"},
        ]);
        stamp_times(&mut new, Some(&old));
        assert_eq!(new[0]["lastTransitionTime"], "2020-01-01T00:00:00Z");
        assert_ne!(new[1]["lastTransitionTime"], "2020-01-01T00:00:00Z");
        assert!(new[1]["lastTransitionTime"].is_string());
        assert_eq!(
            without_times(&new)[0],
            json!({"type": "Accepted", "status": "True", "reason": "Accepted"})
        );
    }

    fn object(
        resource: &ApiResource,
        namespace: &str,
        name: &str,
        data: Value,
    ) -> Arc<DynamicObject> {
        let mut obj = DynamicObject::new(name, resource).within(namespace);
        obj.metadata.generation = Some(1);
        obj.metadata.resource_version = Some("1".into());
        obj.data = data;
        Arc::new(obj)
    }

    fn snapshot(allowed_from: &str) -> Snapshot {
        let gateway = object(
            &gateway_resource(),
            "infra",
            "shared",
            json!({"spec": {
                "gatewayClassName": "any",
                "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}],
                "allowedListeners": {"namespaces": {"from": allowed_from}},
            }}),
        );
        let listener_set = object(
            &listener_set_resource(),
            "shop",
            "shop",
            json!({"spec": {
                "parentRef": {"group": GROUP, "kind": "Gateway", "name": "shared", "namespace": "infra"},
                "listeners": [{"name": "https", "hostname": "shop.apps.example.com", "port": 443, "protocol": "HTTPS"}],
            }}),
        );
        let route = object(
            &http_route_resource(),
            "shop",
            "web",
            json!({"spec": {
                "parentRefs": [{"group": GROUP, "kind": "ListenerSet", "name": "shop"}],
                "hostnames": ["shop.apps.example.com"],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
            }, "status": {"parents": [{
                "parentRef": {"name": "shared", "namespace": "infra"},
                "controllerName": "example.com/other",
                "conditions": [],
            }]}}),
        );
        Snapshot {
            gateways: vec![gateway],
            listener_sets: vec![listener_set],
            routes: vec![route],
            grants: Vec::new(),
            services: HashSet::from([("shop".to_string(), "web".to_string())]),
            namespace_labels: HashMap::new(),
        }
    }

    fn find<'a>(writes: &'a [StatusWrite], kind: &str) -> &'a StatusWrite {
        writes
            .iter()
            .find(|w| w.resource.kind == kind)
            .unwrap_or_else(|| panic!("a {kind} write"))
    }

    #[test]
    fn plan_follows_the_gateway_allowing_listener_sets() {
        let closed = plan(&snapshot("None"));
        let ls = find(&closed, "ListenerSet");
        assert_eq!(ls.status["conditions"][0]["reason"], "NotAllowed");
        assert_eq!(ls.status["listeners"][0]["attachedRoutes"], 0);
        let route = find(&closed, "HTTPRoute");
        let parents = route.status["parents"].as_array().unwrap();
        assert_eq!(parents.len(), 2, "the other controller's entry is kept");
        assert_eq!(parents[0]["controllerName"], "example.com/other");
        assert_eq!(parents[1]["conditions"][0]["reason"], "NoMatchingParent");
        assert_eq!(route.resource_version.as_deref(), Some("1"));

        let open = plan(&snapshot("All"));
        let ls = find(&open, "ListenerSet");
        assert_eq!(ls.status["conditions"][0]["status"], "True");
        assert_eq!(ls.status["conditions"][1]["reason"], "Programmed");
        assert_eq!(ls.status["listeners"][0]["attachedRoutes"], 1);
        let route = find(&open, "HTTPRoute");
        assert_eq!(
            route.status["parents"][1]["conditions"][0]["status"],
            "True"
        );
        assert_eq!(
            route.status["parents"][1]["conditions"][1]["status"],
            "True"
        );
        let gateway = find(&open, "Gateway");
        assert_eq!(gateway.status["attachedListenerSets"], 1);
        assert_eq!(gateway.status["conditions"][0]["reason"], "Accepted");
    }

    #[test]
    fn plan_writes_nothing_once_the_statuses_are_written() {
        let mut s = snapshot("All");
        let writes = plan(&s);
        assert_eq!(writes.len(), 3);
        let apply = |objects: &mut Vec<Arc<DynamicObject>>, kind: &str| {
            let w = find(&writes, kind);
            let mut obj = (*objects[0]).clone();
            obj.data["status"] = w.status.clone();
            objects[0] = Arc::new(obj);
        };
        apply(&mut s.gateways, "Gateway");
        apply(&mut s.listener_sets, "ListenerSet");
        apply(&mut s.routes, "HTTPRoute");
        assert!(plan(&s).is_empty());
    }
}

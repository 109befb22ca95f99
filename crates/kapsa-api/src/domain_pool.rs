//! `DomainPool`: base domains that Projects get hosts from.

// kube `printcolumn(...)` attributes repeat `type_ = "string"`, which
// clippy misreads as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::ClusterIssuerReference;
use crate::conditions::Condition;
use crate::naming::MAX_BASE_DOMAIN_LEN;
use crate::validation::{
    DNS_LABEL, DNS_NAME, DNS_SUBDOMAIN, MAX_CONDITIONS, MAX_POOL_DOMAINS, matches_rule,
};

/// How cert-manager proves control of a host. Values: `HTTP01` (one
/// certificate per host, solved through the Ingress) or `DNS01` (one
/// wildcard certificate `*.<project>.<base>` per Project, solved through
/// DNS; the ClusterIssuer needs a DNS01 solver).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum Challenge {
    /// One certificate per host, ACME HTTP-01 challenge.
    #[default]
    HTTP01,
    /// One wildcard certificate per Project, ACME DNS-01 challenge.
    DNS01,
}

/// How the hosts of a pool are routed to their apps. Values: `Ingress`
/// (default; an Ingress per Environment, for the pool's `ingressClassName`)
/// or `Gateway` (Gateway API: an HTTPRoute per Environment and a
/// ListenerSet per Project attached to the shared Gateway that
/// `spec.gatewayRef` names).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum Routing {
    /// A networking.k8s.io/v1 Ingress per Environment.
    #[default]
    Ingress,
    /// Gateway API: an HTTPRoute per Environment, a ListenerSet per Project.
    Gateway,
}

/// The shared Gateway a `routing: Gateway` pool attaches its Projects'
/// listeners to.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayReference {
    /// Name of the Gateway (`gateway.networking.k8s.io/v1`), e.g.
    /// `shared`. A DNS subdomain of at most 253 characters.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
    /// Namespace of the Gateway, e.g. `gateway-system`. A DNS label of at
    /// most 63 characters. The Gateway must allow ListenerSets from the
    /// Projects' namespaces (`spec.allowedListeners`).
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub namespace: String,
    /// A listener of the Gateway that HTTPRoutes attach to directly, for
    /// Gateway implementations without ListenerSet support, e.g. `apps`.
    /// Optional: without it each Project gets a ListenerSet with its own
    /// HTTPS listeners and certificates. With it Kapsa makes no ListenerSet
    /// and no Certificate: the platform team's listener (e.g. hostname
    /// `*.apps.example.com`, HTTPS with a wildcard certificate, routes
    /// allowed from the Projects' namespaces) terminates TLS. A Gateway API
    /// section name: a DNS subdomain of at most 253 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub section_name: Option<String>,
}

// A Pod Security Standard level (Kubernetes Pod Security Admission), as
// written in the `pod-security.kubernetes.io/*` namespace labels. (A plain
// comment: a doc comment here would replace the description of the
// `spec.podSecurity` field in the CRD.)
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum PodSecurityLevel {
    /// Unrestricted: pods may be privileged, use host namespaces and paths.
    Privileged,
    /// Minimally restrictive: known privilege escalations are refused.
    Baseline,
    /// Hardened: non-root, no privilege escalation, capabilities dropped,
    /// RuntimeDefault seccomp.
    #[default]
    Restricted,
}

impl PodSecurityLevel {
    /// The value of the `pod-security.kubernetes.io/*` labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Privileged => "privileged",
            Self::Baseline => "baseline",
            Self::Restricted => "restricted",
        }
    }
}

impl std::fmt::Display for PodSecurityLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PodSecurityLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "privileged" => Ok(Self::Privileged),
            "baseline" => Ok(Self::Baseline),
            "restricted" => Ok(Self::Restricted),
            other => Err(format!(
                "unknown Pod Security level {other:?} (privileged, baseline or restricted)"
            )),
        }
    }
}

/// Base domains that Kapsa allocates application hosts from, with the TLS
/// issuer and Ingress class used for them. Written by a platform admin.
///
/// A Project gets the host `<project>.<base>`, where `<base>` is the pool
/// domain with the fewest Projects at first allocation; the choice then
/// sticks (it is recorded in the Project's status). Preview environments
/// get `<branch-slug>.<project>.<base>`.
///
/// `spec.challenge` may be changed on a pool that is in use: the operator
/// converges to the new scheme (per-host certificates or one wildcard
/// certificate per Project). Ingresses switch to the new certificate's
/// Secret at once; until cert-manager has issued it, `TLSReady` is False and
/// the ingress controller serves its default certificate. A wildcard
/// Certificate Kapsa made is deleted after a switch to HTTP01.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kapsa.dev",
    version = "v1alpha1",
    kind = "DomainPool",
    plural = "domainpools",
    shortname = "dp",
    category = "kapsa",
    status = "DomainPoolStatus",
    derive = "PartialEq",
    label("app.kubernetes.io/part-of", "kapsa"),
    doc = "DomainPool: base domains that Kapsa allocates application hosts from (`<project>.<base>`, previews `<branch>.<project>.<base>`), with the cert-manager ClusterIssuer and Ingress class used for them. Cluster-scoped; written by a platform admin.",
    printcolumn(
        name = "Domains",
        type_ = "string",
        json_path = ".spec.domains",
        description = "Base domains of the pool"
    ),
    printcolumn(
        name = "Default",
        type_ = "boolean",
        json_path = ".spec.default",
        description = "Used by Projects that name no pool",
        priority = 1
    ),
    printcolumn(
        name = "Issuer",
        type_ = "string",
        json_path = ".spec.clusterIssuerRef.name",
        description = "cert-manager ClusterIssuer"
    ),
    printcolumn(
        name = "Challenge",
        type_ = "string",
        json_path = ".spec.challenge",
        description = "ACME challenge: HTTP01 or DNS01"
    ),
    printcolumn(
        name = "Routing",
        type_ = "string",
        json_path = ".spec.routing",
        description = "Ingress or Gateway",
        priority = 1
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Usable: its ClusterIssuer exists"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.challenge != 'DNS01' || has(self.clusterIssuerRef)")
    .message("spec.clusterIssuerRef is required when spec.challenge is DNS01")
    .field_path(".clusterIssuerRef")
    .reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("!has(self.routing) || self.routing != 'Gateway' || has(self.gatewayRef)")
    .message("spec.gatewayRef is required when spec.routing is Gateway")
    .field_path(".gatewayRef")
    .reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("(has(self.routing) && self.routing == 'Gateway') || !has(self.gatewayRef)")
    .message("spec.gatewayRef is allowed only when spec.routing is Gateway")
    .field_path(".gatewayRef")
    .reason(Reason::FieldValueForbidden))]
#[serde(rename_all = "camelCase")]
pub struct DomainPoolSpec {
    /// Base domains of the pool, e.g. `[apps.example.com, apps2.example.com]`.
    /// One to 32 unique lower-case DNS names with at least two labels, each
    /// at most 148 characters (253 for a host, minus a 63-character branch
    /// label, a 40-character project name and two dots). No domain may be a
    /// subdomain of another in the pool, because their hosts could collide.
    /// Wildcard DNS records `*.<base>` (and, for previews, `*.*.<base>` or
    /// per-project records) must point at the Ingress controller.
    #[schemars(length(min = 1, max = MAX_POOL_DOMAINS), inner(length(min = 1, max = MAX_BASE_DOMAIN_LEN)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    #[x_kube(
        validation = Rule::new(format!("self.all(d, {})", matches_rule("d", DNS_NAME)))
            .message("spec.domains: every domain must be a lower-case DNS name with at least two labels (e.g. apps.example.com); each label 1-63 characters of [a-z0-9-], not starting or ending with '-'"),
        validation = Rule::new("self.all(a, self.all(b, a == b || !b.endsWith('.' + a)))")
            .message("spec.domains: a domain must not be a subdomain of another domain of the pool (their hosts could collide)")
    )]
    pub domains: Vec<String>,

    /// Whether this pool serves Projects that set no `spec.domainPoolRef`.
    /// Default `false`. Exactly one pool should be the default; if several
    /// are, the operator reports it in a condition rather than guess.
    #[serde(default)]
    pub default: bool,

    /// The cert-manager ClusterIssuer that issues TLS certificates for hosts
    /// of this pool, e.g. `{name: letsencrypt}`. Optional: without it, hosts
    /// are served over plain HTTP (useful for local development). Required
    /// with `challenge: DNS01`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_issuer_ref: Option<ClusterIssuerReference>,

    /// ACME challenge type: `HTTP01` (default; one certificate per host) or
    /// `DNS01` (one wildcard certificate per Project; the ClusterIssuer must
    /// have a DNS01 solver for the pool's domains). May be changed while in
    /// use: certificates are issued for the new scheme, and until they are
    /// ready the hosts are served without a valid certificate (`TLSReady`
    /// False).
    #[serde(default)]
    pub challenge: Challenge,

    /// How hosts of this pool are routed: `Ingress` (default; an Ingress
    /// per Environment for `ingressClassName`) or `Gateway` (Gateway API: an
    /// HTTPRoute per Environment and a ListenerSet per Project attached to
    /// the Gateway `gatewayRef` names; TLS from Certificates Kapsa creates).
    /// May be changed while in use: every Environment moves over, and the
    /// objects of the other way are deleted once the new ones are applied.
    #[serde(default)]
    pub routing: Routing,

    /// The shared Gateway (`gateway.networking.k8s.io/v1`) that Projects'
    /// ListenerSets attach to, e.g. `{name: shared, namespace:
    /// gateway-system}`. Required when `routing` is `Gateway`, forbidden
    /// otherwise. The platform team runs it; no tenant writes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_ref: Option<GatewayReference>,

    /// IngressClass for the Ingresses of hosts of this pool (`routing:
    /// Ingress`). Default `nginx`. A DNS subdomain of at most 253 characters.
    #[serde(default = "default_ingress_class_name")]
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub ingress_class_name: String,

    /// Names no Project receives under this pool's domains, e.g. `[www,
    /// grafana, api]`: a Project named like one is refused a host (its
    /// `DomainAllocated` condition says `HostReserved`). At most 256 DNS
    /// labels (lower case, `[a-z0-9-]`, 1-63 characters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(length(min = 1, max = 63)))]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    #[x_kube(
        validation = Rule::new(format!("self.all(n, {})", matches_rule("n", DNS_LABEL)))
            .message("spec.reservedNames: every name must be a DNS label: 1-63 characters of [a-z0-9-], not starting or ending with '-'")
    )]
    pub reserved_names: Vec<String>,

    /// Pod Security Standard enforced in the namespaces of the Projects
    /// served by this pool (Pod Security Admission labels
    /// `pod-security.kubernetes.io/enforce`, `warn` and `audit`):
    /// `restricted` (hardened pods: non-root, no privilege escalation,
    /// capabilities dropped, RuntimeDefault seccomp), `baseline` (known
    /// privilege escalations refused) or `privileged` (unrestricted).
    /// Optional: without it the
    /// operator's `--pod-security` flag decides (default `restricted`).
    /// Loosen it only for pools whose apps need it; Kapsa's own Deployments
    /// meet `restricted`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_security: Option<PodSecurityLevel>,

    /// Node labels the app pods of this pool's Projects must match (their
    /// Deployments' `nodeSelector`), e.g. `{node-pool: apps}` for nodes
    /// dedicated to tenants. At most 32 entries. Builds are not affected.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: BTreeMap<String, String>,

    /// Taints the app pods of this pool's Projects tolerate (their
    /// Deployments' `tolerations`), e.g. `[{key: dedicated, operator:
    /// Equal, value: apps, effect: NoSchedule}]`. At most 32. Together with
    /// `nodeSelector` this places tenants' apps on their own nodes. Builds
    /// are not affected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
}

fn default_ingress_class_name() -> String {
    "nginx".to_owned()
}

/// Observed state of a DomainPool, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainPoolStatus {
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// How many Projects have a host under each base domain; the operator
    /// allocates new Projects to the domain with the fewest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_POOL_DOMAINS))]
    pub allocations: Vec<DomainAllocation>,

    /// Current state of the pool. Condition types: `Ready` (the pool is
    /// usable: its ClusterIssuer exists and it is the only default pool, if
    /// default; reasons `Ready`, `ClusterIssuerNotFound`,
    /// `CertManagerNotInstalled`, `MultipleDefaults`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CONDITIONS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// The number of Projects allocated to one base domain.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainAllocation {
    /// The base domain, one of `spec.domains`.
    pub domain: String,
    /// Number of Projects whose host is under this domain.
    pub projects: i32,
}

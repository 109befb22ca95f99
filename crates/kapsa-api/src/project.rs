//! `Project`: a git repository that Kapsa builds, deploys and previews.

// kube `printcolumn(...)` attributes repeat `type_ = "string"`, which
// clippy misreads as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::LocalObjectReference;
use crate::conditions::Condition;
use crate::duration::{MIN_POLL_INTERVAL, MIN_PREVIEW_TTL, as_seconds};
use crate::environment::EnvironmentType;
use crate::naming::{BUILD_NAMESPACE_PREFIX, MAX_BRANCH_NAME_LEN, MAX_PROJECT_NAME_LEN};
use crate::validation::{
    DNS_LABEL, DNS_SUBDOMAIN, DURATION, GIT_URL, GIT_URL_INSECURE, GIT_URL_LOOPBACK, HTTP_PATH,
    INTEGER_QUOTA_RESOURCE_NAMES, MAX_BRANCH_GLOBS, MAX_CONDITIONS, MAX_DURATION_LEN,
    MAX_ENV_FROM_REFS, MAX_GIT_URL_LEN, MAX_PATH_LEN, MAX_STATUS_ENVIRONMENTS, QUOTA_RESOURCE_NAME,
    QUOTA_RESOURCE_NAMES, RESERVED_NAMESPACES, RUNTIME_RESOURCE_NAMES, branch_glob_rule, cel_list,
    git_branch_rule, map_key_rule, matches_rule, max_duration_rule, min_duration_rule,
    quantity_schema, relative_path_rule,
};

/// Default `spec.source.pollInterval`.
pub const DEFAULT_POLL_INTERVAL: &str = "60s";
/// Default `spec.source.git.branch`.
pub const DEFAULT_BRANCH: &str = "main";
/// Default `spec.runtime.port`.
pub const DEFAULT_PORT: i32 = 8080;
/// Default `spec.runtime.replicas`.
pub const DEFAULT_REPLICAS: i32 = 1;
/// Default `spec.previewEnvironments.ttl`.
pub const DEFAULT_PREVIEW_TTL: &str = "72h";
/// Default `spec.previewEnvironments.maxEnvironments`.
pub const DEFAULT_MAX_PREVIEW_ENVIRONMENTS: i32 = 10;
/// Default `spec.previewEnvironments.replicas`.
pub const DEFAULT_PREVIEW_REPLICAS: i32 = 1;
/// The most preview Environments a Project may ask for.
pub const MAX_PREVIEW_ENVIRONMENTS: i32 = 100;
/// The most branches `status.previewsLeftOut` lists.
pub const MAX_PREVIEWS_LEFT_OUT: usize = 500;
/// Annotation of a preview Environment: when Kapsa first saw its branch at
/// `spec.commit` (RFC 3339); `spec.expiresAt` is this plus the TTL.
pub const HEAD_SEEN_AT_ANNOTATION: &str = "kapsa.dev/head-seen-at";
/// Annotation a person sets to `"true"` on a preview Environment to exempt
/// it from the TTL (it is still deleted with its branch or when merged).
pub const KEEP_ANNOTATION: &str = "kapsa.dev/keep";
/// Default `spec.runtime.metrics.path`.
pub const DEFAULT_METRICS_PATH: &str = "/metrics";
/// Dockerfile path used when `spec.build.dockerfile` is not set.
pub const DEFAULT_DOCKERFILE: &str = "Dockerfile";
/// Builder used when `spec.build.builderRef` is not set: the ClusterBuilder `default`.
pub const DEFAULT_BUILDER_NAME: &str = "default";

/// A git repository that Kapsa builds and runs. The Project owns one
/// namespace; Kapsa creates the production Environment from the production
/// branch and, if enabled, a preview Environment per matching branch.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kapsa.dev",
    version = "v1alpha1",
    kind = "Project",
    plural = "projects",
    shortname = "proj",
    category = "kapsa",
    status = "ProjectStatus",
    derive = "PartialEq",
    label("app.kubernetes.io/part-of", "kapsa"),
    doc = "Project: a git repository that Kapsa builds (kpack buildpacks or a Dockerfile), deploys and gives a host with TLS (`<project>.<base>` from a DomainPool), plus a preview Environment per matching branch. Cluster-scoped; owns one namespace (spec.namespace, default metadata.name). metadata.name must be a DNS label of at most 40 characters because it appears in hosts and namespace names.",
    printcolumn(name = "Host", type_ = "string", json_path = ".status.host", description = "Production host"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status", description = "Ready condition"),
    printcolumn(name = "Commit", type_ = "string", json_path = ".status.latestCommit", description = "Head of the production branch"),
    printcolumn(name = "Previews", type_ = "integer", json_path = ".status.previewCount", description = "Preview environments"),
    printcolumn(name = "Namespace", type_ = "string", json_path = ".status.namespace", description = "Namespace owned by the project", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(format!("size(self.metadata.name) <= {MAX_PROJECT_NAME_LEN}"))
        .message(Message::Message(format!("metadata.name of a Project must be at most {MAX_PROJECT_NAME_LEN} characters: it is the first label of <project>.<base> hosts, the default namespace, and a prefix of derived names"))),
    validation = Rule::new(matches_rule("self.metadata.name", DNS_LABEL))
        .message("metadata.name of a Project must be a DNS label (lower-case [a-z0-9-], no dots, not starting or ending with '-'): it is a label of every host of the project"),
    validation = Rule::new(format!(
        "has(self.spec.__namespace__) || !(self.metadata.name in {} || self.metadata.name.startsWith('kube-') || self.metadata.name.startsWith('{BUILD_NAMESPACE_PREFIX}'))",
        cel_list(&RESERVED_NAMESPACES)
    ))
    .message("metadata.name of a Project without spec.namespace is its namespace, which must not be kube-system, kube-public, kube-node-lease, default, kapsa-system or start with kube- or kapsa-build- (Kapsa's build namespaces); set spec.namespace")
)]
#[x_kube(validation = Rule::new("has(self.__namespace__) == has(oldSelf.__namespace__)")
    .message("spec.namespace cannot be added or removed after the Project is created")
    .field_path(".namespace"))]
#[serde(rename_all = "camelCase")]
pub struct ProjectSpec {
    /// Namespace the Project owns; Kapsa creates it and puts every
    /// Environment, build and runtime object of the project in it. Optional,
    /// default `metadata.name`. A DNS label of at most 63 characters, never
    /// `kube-system`, `kube-public`, `kube-node-lease`, `default`,
    /// `kapsa-system`, any `kube-*` name or any `kapsa-build-*` name (Kapsa's
    /// build namespaces). Immutable: it can be neither
    /// changed nor added or removed after creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    #[x_kube(
        validation = Rule::new(matches_rule("self", DNS_LABEL))
            .message("spec.namespace must be a DNS label: lower-case [a-z0-9-], not starting or ending with '-'"),
        validation = Rule::new(format!("!(self in {} || self.startsWith('kube-') || self.startsWith('{BUILD_NAMESPACE_PREFIX}'))", cel_list(&RESERVED_NAMESPACES)))
            .message("spec.namespace must not be kube-system, kube-public, kube-node-lease, default, kapsa-system or start with kube- or kapsa-build- (Kapsa's build namespaces)")
            .reason(Reason::FieldValueForbidden),
        validation = Rule::new("self == oldSelf").message("spec.namespace is immutable")
    )]
    pub namespace: Option<String>,

    /// Where the code comes from: a git repository, its production branch
    /// and how often to poll it.
    pub source: ProjectSource,

    /// How images are built: with Cloud Native Buildpacks (kpack, default)
    /// or a Dockerfile.
    #[serde(default)]
    pub build: BuildSpec,

    /// The registry that built images are pushed to: a ClusterRegistry, or a
    /// Registry in the project's namespace. Images go to
    /// `<server>/<repository>/<project>`.
    pub registry_ref: RegistryReference,

    /// The DomainPool the project's host comes from, e.g. `{name: default}`.
    /// Optional: without it, the pool with `spec.default: true`. The base
    /// domain chosen at first allocation sticks (see `status.baseDomain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_pool_ref: Option<LocalObjectReference>,

    /// How the app runs: port, replicas, resources, health check,
    /// configuration and metrics. Applies to every Environment of the
    /// project.
    #[serde(default)]
    pub runtime: RuntimeSpec,

    /// Preview environments: one Environment `preview-<branch-slug>` per
    /// matching branch, at `<branch-slug>.<project>.<base>`, rebuilt on every
    /// push and deleted when the branch is deleted or merged into the
    /// production branch, or when its TTL passes without a new commit.
    /// Disabled by default.
    #[serde(default)]
    pub preview_environments: PreviewEnvironmentsSpec,

    /// Optional ResourceQuota Kapsa creates in the project's namespace, e.g.
    /// `{hard: {requests.cpu: "4", requests.memory: 8Gi, pods: "20"}}`.
    /// Cluster admins write Projects, so this is how they cap a project.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_quota: Option<ResourceQuotaSpec>,
}

/// Where the code comes from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSource {
    /// The git repository.
    pub git: GitSource,

    /// How often Kapsa polls the repository for new commits and branches
    /// (refs only, no clone), as a duration such as `30s`, `5m` or `1h30m`:
    /// one or more numbers (at most 5 digits, optionally with a fraction of
    /// at most 9 digits, e.g. `1.5`), each followed by a unit `ns`, `us`,
    /// `ms`, `s`, `m` or `h`; at most 32 characters. Default `60s`; at least
    /// `10s`. Failed polls back off.
    #[serde(default = "default_poll_interval")]
    #[schemars(length(min = 1, max = MAX_DURATION_LEN))]
    #[x_kube(
        validation = Rule::new(matches_rule("self", DURATION))
            .message("spec.source.pollInterval must be a duration such as 30s, 5m or 1h30m: numbers of at most 5 digits (optionally with a fraction of at most 9 digits), each followed by a unit ns, us, ms, s, m or h"),
        validation = Rule::new(min_duration_rule("self", &as_seconds(MIN_POLL_INTERVAL))).message(Message::Message(format!("spec.source.pollInterval must be at least {}", as_seconds(MIN_POLL_INTERVAL))))
    )]
    pub poll_interval: String,

    /// Subdirectory of the repository to build, e.g. `services/api`.
    /// Optional; empty or absent means the repository root. A relative path
    /// without `..` components, at most 1024 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_PATH_LEN))]
    #[x_kube(validation = Rule::new(format!("self == '' || ({})", relative_path_rule("self")))
        .message("spec.source.contextDir must be a relative path inside the repository ([A-Za-z0-9._+@-] and '/', not starting with '/', no '..' components)"))]
    pub context_dir: Option<String>,
}

fn default_poll_interval() -> String {
    DEFAULT_POLL_INTERVAL.to_owned()
}

/// A git repository and its production branch.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(format!(
    "!{} || self.allowInsecureHttp || {}",
    matches_rule("self.url", GIT_URL_INSECURE),
    matches_rule("self.url", GIT_URL_LOOPBACK)
))
.message("spec.source.git.url: plain http:// URLs are only allowed for a loopback host (localhost, 127.x.x.x, [::1]) unless spec.source.git.allowInsecureHttp is true; use https:// or ssh")
.field_path(".url")
.reason(Reason::FieldValueForbidden))]
#[serde(rename_all = "camelCase")]
pub struct GitSource {
    /// URL of the repository. Accepted forms: `https://host[:port]/path`,
    /// `ssh://[user@]host[:port]/path` and scp-like `user@host:path` (e.g.
    /// `git@github.com:acme/shop.git`); a port is 1–65535, a user name does
    /// not start with `-` or `.`. `http://` only for a loopback host
    /// (`localhost`, `127.x.x.x`, `[::1]`) or with `allowInsecureHttp: true`.
    /// `git://`, `file://`, local paths and other schemes are refused.
    /// Credentials never go in the URL; use `secretRef`. At most 2048
    /// characters.
    #[schemars(length(min = 1, max = MAX_GIT_URL_LEN))]
    #[x_kube(validation = Rule::new(matches_rule("self", GIT_URL))
        .message("spec.source.git.url must be https://host[:port]/path, ssh://[user@]host[:port]/path or user@host:path (scp-like; http:// only for loopback or with allowInsecureHttp; no git://, file:// or other schemes), with a port 1-65535, a user not starting with '-' or '.', without credentials or spaces, e.g. https://github.com/acme/shop.git or git@github.com:acme/shop.git"))]
    pub url: String,

    /// The production branch: the production Environment is built from its
    /// head. Default `main`. A branch name as `git check-ref-format
    /// --branch` accepts it (no spaces, control characters, `..`, `//`,
    /// `@{`, `~^:?*[\`; no leading `-`, `/` or `.`, no component starting
    /// with `.` or ending with `.lock`, no trailing `/` or `.`; not `HEAD`),
    /// without the `refs/heads/` prefix (names starting with `refs/` and the
    /// name `@` are refused), at most 255 characters.
    #[serde(default = "default_branch")]
    #[schemars(length(min = 1, max = MAX_BRANCH_NAME_LEN))]
    #[x_kube(validation = Rule::new(git_branch_rule("self"))
        .message("spec.source.git.branch must be a valid git branch name without refs/heads/: no spaces, control characters, '..', '//', '@{', or any of ~^:?*[\\; no component starting with '.' or ending with '.lock'; must not start with '-', '/' or '.', nor end with '/' or '.', nor be HEAD or @, nor start with refs/"))]
    pub branch: String,

    /// Secret with credentials for the repository, in the project's
    /// namespace: type `kubernetes.io/basic-auth` (https; e.g. a token as
    /// password) or `kubernetes.io/ssh-auth` (ssh; optionally with a
    /// `known_hosts` key). Optional for public repositories.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<LocalObjectReference>,

    /// Allow a plain `http://` URL to a host that is not loopback. Default `false`. Traffic, including credentials, is then
    /// unencrypted; only for trusted networks.
    #[serde(default)]
    pub allow_insecure_http: bool,
}

fn default_branch() -> String {
    DEFAULT_BRANCH.to_owned()
}

/// How images are built. Values: `Buildpacks` (Cloud Native Buildpacks
/// through kpack) or `Dockerfile` (a Dockerfile in the repository).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum BuildStrategy {
    /// Cloud Native Buildpacks, built by kpack.
    #[default]
    Buildpacks,
    /// A Dockerfile in the repository.
    Dockerfile,
}

/// How images are built.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(
    validation = Rule::new("!has(self.dockerfile) || self.strategy == 'Dockerfile'")
        .message("spec.build.dockerfile is only allowed with spec.build.strategy Dockerfile")
        .field_path(".dockerfile")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(self.builderRef) || self.strategy == 'Buildpacks'")
        .message("spec.build.builderRef is only allowed with spec.build.strategy Buildpacks")
        .field_path(".builderRef")
        .reason(Reason::FieldValueForbidden),
    validation = Rule::new("!has(self.timeout) || self.strategy == 'Dockerfile'")
        .message("spec.build.timeout is only allowed with spec.build.strategy Dockerfile (kpack has its own)")
        .field_path(".timeout")
        .reason(Reason::FieldValueForbidden)
)]
#[serde(rename_all = "camelCase")]
pub struct BuildSpec {
    /// Build strategy: `Buildpacks` (default; Cloud Native Buildpacks via
    /// kpack, no Dockerfile needed) or `Dockerfile` (a BuildKit Job per
    /// commit in the Project's build namespace).
    #[serde(default)]
    pub strategy: BuildStrategy,

    /// Path of the Dockerfile, relative to `spec.source.contextDir`. Only
    /// with strategy `Dockerfile`; default `Dockerfile`. A relative path
    /// without `..` components, at most 1024 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_PATH_LEN))]
    #[x_kube(validation = Rule::new(relative_path_rule("self"))
        .message("spec.build.dockerfile must be a relative path inside the repository ([A-Za-z0-9._+@-] and '/', not starting with '/', no '..' components)"))]
    pub dockerfile: Option<String>,

    /// The kpack builder, e.g. `{kind: ClusterBuilder, name: default}`. Only
    /// with strategy `Buildpacks`; default the ClusterBuilder `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builder_ref: Option<BuilderReference>,

    /// How long one build may take before it is stopped and reported
    /// failed (`Built=False`, reason `BuildTimedOut`), as a duration such as
    /// `30m` or `1h`. Only with strategy `Dockerfile`; default `30m`; at
    /// least `1m`, at most `6h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_DURATION_LEN))]
    #[x_kube(
        validation = Rule::new(matches_rule("self", DURATION))
            .message("spec.build.timeout must be a duration such as 30m or 1h: numbers of at most 5 digits (optionally with a fraction of at most 9 digits), each followed by a unit ns, us, ms, s, m or h"),
        validation = Rule::new(min_duration_rule("self", "60s")).message("spec.build.timeout must be at least 1m"),
        validation = Rule::new(max_duration_rule("self", "6h")).message("spec.build.timeout must be at most 6h")
    )]
    pub timeout: Option<String>,
}

/// Kind of kpack builder: `ClusterBuilder` (cluster-scoped) or `Builder`
/// (in the Project's build namespace `kapsa-build-<project>`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum BuilderKind {
    /// A kpack `ClusterBuilder`.
    #[default]
    ClusterBuilder,
    /// A kpack `Builder` in the Project's build namespace
    /// (`kapsa-build-<project>`, made by a platform admin: builds run there,
    /// out of the tenants' reach).
    Builder,
}

/// A reference to a kpack builder.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuilderReference {
    /// `ClusterBuilder` (default) or `Builder` (in the Project's build
    /// namespace `kapsa-build-<project>`, where builds run).
    #[serde(default)]
    pub kind: BuilderKind,
    /// Name of the builder, a DNS subdomain, e.g. `default`.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
}

/// Kind of registry a Project pushes to: `ClusterRegistry` or `Registry`
/// (in the project's namespace).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum RegistryKind {
    /// A cluster-scoped ClusterRegistry.
    #[default]
    ClusterRegistry,
    /// A Registry in the project's namespace.
    Registry,
}

/// A reference to a ClusterRegistry or to a Registry in the project's
/// namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryReference {
    /// `ClusterRegistry` (default) or `Registry` (in the project's namespace).
    #[serde(default)]
    pub kind: RegistryKind,
    /// Name of the registry object, a DNS subdomain, e.g. `harbor`.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
}

/// How the app runs. Applies to every Environment of the project.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeSpec {
    /// TCP port the app listens on (HTTP), e.g. `8080`. Default `8080`;
    /// 1–65535.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Pods per Environment. Default `1`; 0–100 (0 stops the app without
    /// deleting anything).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,

    /// CPU, memory and ephemeral-storage requests and limits of the app
    /// container, e.g. `{requests: {cpu: 100m, memory: 128Mi}}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// HTTP health check, used for the readiness and liveness probes, e.g.
    /// `{path: /healthz}`. Optional: without it, a TCP check on the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,

    /// ConfigMaps in the project's namespace whose keys become environment
    /// variables of the app, e.g. `[{name: shop-config}]`. At most 16,
    /// unique names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ENV_FROM_REFS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub config_map_refs: Vec<LocalObjectReference>,

    /// Secrets in the project's namespace whose keys become environment
    /// variables of the app, by reference only (create them with External
    /// Secrets, Vault, Sealed Secrets or kubectl), e.g.
    /// `[{name: shop-secrets}]`. At most 16, unique names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ENV_FROM_REFS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub secret_refs: Vec<LocalObjectReference>,

    /// Prometheus metrics endpoint of the app, e.g. `{port: 9090, path:
    /// /metrics}`. The port is exposed on the Service (`metrics`). A
    /// ServiceMonitor is not created by this version yet (the Project's
    /// `Implemented` condition says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsSpec>,
}

impl Default for RuntimeSpec {
    fn default() -> Self {
        Self {
            port: DEFAULT_PORT,
            replicas: DEFAULT_REPLICAS,
            resources: None,
            health_check: None,
            config_map_refs: Vec::new(),
            secret_refs: Vec::new(),
            metrics: None,
        }
    }
}

fn default_port() -> i32 {
    DEFAULT_PORT
}

fn default_replicas() -> i32 {
    DEFAULT_REPLICAS
}

/// Compute resources of the app container.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[schemars(transform = requests_within_limits)]
#[serde(rename_all = "camelCase")]
pub struct ResourceRequirements {
    /// Resources the scheduler reserves, e.g. `{cpu: 100m, memory: 128Mi}`.
    /// Keys: `cpu`, `memory`, `ephemeral-storage`; values are non-negative
    /// Kubernetes quantities (e.g. `100m`, `"0.5"`, `2`, `128Mi`), each at
    /// most the limit of the same resource.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "resource_requests_schema")]
    pub requests: BTreeMap<String, Quantity>,

    /// Upper bounds for the container, e.g. `{memory: 256Mi}`. Keys: `cpu`,
    /// `memory`, `ephemeral-storage`; values are non-negative Kubernetes
    /// quantities.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "resource_limits_schema")]
    pub limits: BTreeMap<String, Quantity>,
}

/// Adds the rule "no request exceeds the limit of the same resource" (a Pod
/// with such a container is refused) to the schema of
/// [`ResourceRequirements`], naming the resource.
fn requests_within_limits(schema: &mut schemars::Schema) {
    const PREDICATE: &str = "!(k in self.limits) || !isQuantity(string(self.requests[k])) \
        || !isQuantity(string(self.limits[k])) \
        || quantity(string(self.requests[k])).compareTo(quantity(string(self.limits[k]))) <= 0";
    const MESSAGE: &str =
        "a request must not exceed the limit of the same resource in spec.runtime.resources.limits";
    schema.insert(
        "x-kubernetes-validations".to_owned(),
        serde_json::json!([{
            "rule": format!("!has(self.requests) || !has(self.limits) || self.requests.all(k, {PREDICATE})"),
            "message": format!("spec.runtime.resources.requests: {MESSAGE}"),
            "messageExpression": format!(
                "'spec.runtime.resources.requests[' + self.requests.filter(k, !({PREDICATE}))[0] + ']: {MESSAGE}'"
            ),
            "fieldPath": ".requests",
        }]),
    );
}

/// A map of runtime resource names to quantities, named `field` in messages.
fn runtime_resources_schema(field: &str) -> schemars::Schema {
    let keys = cel_list(&RUNTIME_RESOURCE_NAMES);
    schemars::Schema::try_from(serde_json::json!({
        "type": "object",
        "maxProperties": RUNTIME_RESOURCE_NAMES.len(),
        "additionalProperties": quantity_schema(field),
        "x-kubernetes-validations": [map_key_rule(
            field,
            &format!("k in {keys}"),
            "not a resource Kapsa sets; keys must be cpu, memory or ephemeral-storage",
        )],
    }))
    .expect("an object schema")
}

fn resource_requests_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    runtime_resources_schema("spec.runtime.resources.requests")
}

fn resource_limits_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    runtime_resources_schema("spec.runtime.resources.limits")
}

/// An HTTP health check of the app.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// HTTP path that answers 2xx or 3xx when the app is healthy, e.g.
    /// `/healthz`. Starts with `/`, printable ASCII without spaces, at most
    /// 1024 characters.
    #[schemars(length(min = 1, max = MAX_PATH_LEN), regex(pattern = HTTP_PATH))]
    pub path: String,

    /// Port of the check. Optional, default `spec.runtime.port`; 1–65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,

    /// Seconds after the container starts before the first check. Optional
    /// (Kubernetes default 0); 0–3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub initial_delay_seconds: Option<i32>,

    /// Seconds between checks. Optional (Kubernetes default 10); 1–3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub period_seconds: Option<i32>,

    /// Consecutive failures before the pod is marked unready (and, for
    /// liveness, restarted). Optional (Kubernetes default 3); 1–100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: Option<i32>,
}

/// The Prometheus metrics endpoint of the app.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsSpec {
    /// Port that serves metrics, e.g. `9090`; 1–65535. May equal
    /// `spec.runtime.port`.
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// HTTP path of the metrics. Default `/metrics`. Starts with `/`,
    /// printable ASCII without spaces, at most 1024 characters.
    #[serde(default = "default_metrics_path")]
    #[schemars(length(min = 1, max = MAX_PATH_LEN), regex(pattern = HTTP_PATH))]
    pub path: String,
}

fn default_metrics_path() -> String {
    DEFAULT_METRICS_PATH.to_owned()
}

/// Preview environments: one Environment per matching branch.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PreviewEnvironmentsSpec {
    /// Whether Kapsa creates preview environments. Default `false`.
    #[serde(default)]
    pub enabled: bool,

    /// Branch globs that get a preview, e.g. `["feature/*", "fix-*"]`: `*`
    /// matches within one path segment, `?` one character (neither matches
    /// `/`). Optional: without it, every branch except the production
    /// branch. At most 32 globs of at most 255 characters of
    /// `[A-Za-z0-9._/*?-]`, each able to match a valid branch name: not
    /// starting with `/`, `-` or `.`, not ending with `/`, `.` or `.lock`,
    /// without `..`, `//`, a component starting with `.` or a component
    /// ending with `.lock`. The production branch never gets a preview.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_BRANCH_GLOBS), inner(length(min = 1, max = MAX_BRANCH_NAME_LEN)))]
    #[x_kube(validation = Rule::new(format!("self.all(g, {})", branch_glob_rule("g")))
        .message("spec.previewEnvironments.branches: every glob must use only A-Z a-z 0-9 . _ / * ? - and be able to match a git branch name: must not start with '/', '-' or '.', nor end with '/', '.' or '.lock', nor contain '..', '//', '/.' or '.lock/'"))]
    pub branches: Vec<String>,

    /// How long a preview lives after Kapsa first saw its branch at the
    /// current head (a push starts it again; ref listings carry no commit
    /// dates), as a
    /// duration such as `72h`, `30m` or `1h30m`: one or more numbers (at most
    /// 5 digits, optionally with a fraction of at most 9 digits), each
    /// followed by a unit `ns`, `us`, `ms`, `s`, `m` or `h`; at most 32
    /// characters. Default `72h`; at least `1m`. A preview is also deleted
    /// when its branch is deleted or merged. After expiry a branch gets a
    /// preview again only with a new commit.
    #[serde(default = "default_ttl")]
    #[schemars(length(min = 1, max = MAX_DURATION_LEN))]
    #[x_kube(
        validation = Rule::new(matches_rule("self", DURATION))
            .message("spec.previewEnvironments.ttl must be a duration such as 72h, 90m or 1h30m: numbers of at most 5 digits (optionally with a fraction of at most 9 digits), each followed by a unit ns, us, ms, s, m or h"),
        validation = Rule::new(min_duration_rule("self", &as_seconds(MIN_PREVIEW_TTL))).message("spec.previewEnvironments.ttl must be at least 1m")
    )]
    pub ttl: String,

    /// Maximum number of preview environments of the project at a time.
    /// Default `10`; 1–100. When more branches qualify, previews that exist
    /// keep their place; free places go to the branches whose current head
    /// Kapsa saw most recently, ties by branch name; the others are listed
    /// in `status.previewsLeftOut` with reason `LimitReached`. Lowering it
    /// deletes the previews whose head was seen longest ago.
    #[serde(default = "default_max_environments")]
    #[schemars(range(min = 1, max = MAX_PREVIEW_ENVIRONMENTS))]
    pub max_environments: i32,

    /// Pods per preview Environment. Default `1`; 0–100. Replaces
    /// `spec.runtime.replicas` for previews only.
    #[serde(default = "default_preview_replicas")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,

    /// ConfigMaps in the project's namespace whose keys become environment
    /// variables of previews only, added after (and so overriding) those of
    /// `spec.runtime.configMapRefs`, e.g. `[{name: shop-preview-config}]`,
    /// so that previews never reach production data by accident. At most
    /// 16, unique names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ENV_FROM_REFS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub config_map_refs: Vec<LocalObjectReference>,

    /// Secrets in the project's namespace whose keys become environment
    /// variables of previews only, added after (and so overriding) those of
    /// `spec.runtime.secretRefs`, by reference only. At most 16, unique
    /// names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ENV_FROM_REFS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub secret_refs: Vec<LocalObjectReference>,
}

impl Default for PreviewEnvironmentsSpec {
    fn default() -> Self {
        Self {
            enabled: false,
            branches: Vec::new(),
            ttl: default_ttl(),
            max_environments: DEFAULT_MAX_PREVIEW_ENVIRONMENTS,
            replicas: DEFAULT_PREVIEW_REPLICAS,
            config_map_refs: Vec::new(),
            secret_refs: Vec::new(),
        }
    }
}

fn default_preview_replicas() -> i32 {
    DEFAULT_PREVIEW_REPLICAS
}

impl ProjectSpec {
    /// How an Environment of type `type_` runs: `runtime`, with the
    /// preview overrides of `previewEnvironments` for previews (replicas
    /// replaced, configMapRefs and secretRefs appended).
    pub fn runtime_for(&self, type_: EnvironmentType) -> RuntimeSpec {
        let mut runtime = self.runtime.clone();
        if type_ == EnvironmentType::Preview {
            let previews = &self.preview_environments;
            runtime.replicas = previews.replicas;
            runtime
                .config_map_refs
                .extend(previews.config_map_refs.iter().cloned());
            runtime
                .secret_refs
                .extend(previews.secret_refs.iter().cloned());
        }
        runtime
    }
}

fn default_ttl() -> String {
    DEFAULT_PREVIEW_TTL.to_owned()
}

fn default_max_environments() -> i32 {
    DEFAULT_MAX_PREVIEW_ENVIRONMENTS
}

/// A ResourceQuota for the project's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceQuotaSpec {
    /// Hard limits, as in a Kubernetes ResourceQuota's `spec.hard`, e.g.
    /// `{requests.cpu: "4", limits.memory: 16Gi, pods: "50"}`. One to 32
    /// entries. Keys are quota resource names: `cpu`, `memory`,
    /// `ephemeral-storage`, `requests.*` and `limits.*` of these,
    /// `requests.storage`, `hugepages-<size>`, `requests.hugepages-<size>`,
    /// object counts (`pods`, `services`, `secrets`, `configmaps`,
    /// `persistentvolumeclaims`, `replicationcontrollers`, `resourcequotas`,
    /// `services.nodeports`, `services.loadbalancers`,
    /// `count/<resource>[.<group>]`) or other names with a domain prefix
    /// (`requests.nvidia.com/gpu`). Values are non-negative Kubernetes
    /// quantities; object counts and other prefixed names take whole
    /// numbers.
    #[schemars(schema_with = "quota_hard_schema")]
    pub hard: BTreeMap<String, Quantity>,
}

fn quota_hard_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    const FIELD: &str = "spec.resourceQuota.hard";
    // Kubernetes' rule for which quota resources count whole things: the
    // object counts, and every name with a `/` that is neither a `requests.`
    // resource nor a `kubernetes.io/` one (extended resources, `count/...`).
    let integer = format!(
        "k in {} || (k.contains('/') && !k.startsWith('requests.') && !k.contains('kubernetes.io/'))",
        cel_list(&INTEGER_QUOTA_RESOURCE_NAMES)
    );
    schemars::Schema::try_from(serde_json::json!({
        "type": "object",
        "minProperties": 1,
        "maxProperties": 32,
        "additionalProperties": quantity_schema(FIELD),
        "x-kubernetes-validations": [
            map_key_rule(
                FIELD,
                &matches_rule("k", QUOTA_RESOURCE_NAME),
                "not a resource name; keys are names such as requests.cpu, limits.memory, pods, count/deployments.apps or requests.nvidia.com/gpu: an optional DNS prefix and '/', then 1-63 characters of [A-Za-z0-9._-] starting and ending with a letter or digit",
            ),
            map_key_rule(
                FIELD,
                &format!(
                    "k.contains('/') || k in {} || k.startsWith('hugepages-') || k.startsWith('requests.hugepages-')",
                    cel_list(&QUOTA_RESOURCE_NAMES)
                ),
                "not a standard quota resource; a key without '/' must be cpu, memory, ephemeral-storage, requests.cpu, requests.memory, requests.storage, requests.ephemeral-storage, limits.cpu, limits.memory, limits.ephemeral-storage, pods, services, secrets, configmaps, persistentvolumeclaims, replicationcontrollers, resourcequotas, services.nodeports, services.loadbalancers, hugepages-<size> or requests.hugepages-<size>",
            ),
            map_key_rule(
                FIELD,
                &format!("!({integer}) || !isQuantity(string(self[k])) || quantity(string(self[k])).isInteger()"),
                "must be a whole number: object counts (pods, services, secrets, count/<resource>, ...) and extended resources are counted in units",
            ),
        ],
    }))
    .expect("an object schema")
}

/// Observed state of a Project, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectStatus {
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The namespace the project owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,

    /// The DomainPool the host was allocated from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain_pool: Option<String>,

    /// The base domain chosen at first allocation, e.g. `apps.example.com`.
    /// Sticky: it does not change when the pool's allocation counts do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_domain: Option<String>,

    /// Production host, `<project>.<baseDomain>`, e.g. `shop.apps.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,

    /// Head commit of the production branch at the last successful poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_commit: Option<String>,

    /// When the repository was last polled (successfully or not), as of the
    /// last change of this status: it is written with a change (a new
    /// commit, a branch, reachability, an Environment's state), never on
    /// its own, so that Projects at rest cost no writes; it can be older
    /// than `pollInterval`. `SourceReachable` says whether polls succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_time: Option<Time>,

    /// Summary of the project's Environments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_STATUS_ENVIRONMENTS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub environments: Vec<EnvironmentSummary>,

    /// Number of preview Environments (a printer column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_count: Option<i32>,

    /// The preview Environments, by branch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PREVIEW_ENVIRONMENTS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["branch"]))]
    pub previews: Vec<PreviewSummary>,

    /// Branches that qualify for a preview but have none, and why:
    /// `LimitReached` (maxEnvironments), `Expired` (the TTL passed at
    /// `commit`; a new commit brings the preview back), `Merged` (the
    /// production branch contains its head), `NameTaken` (Environments not
    /// made by Kapsa hold the names it could take), `InvalidBranchName` (a
    /// name git allows but an Environment cannot hold, e.g. longer than 255
    /// characters). At most 500 entries.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_PREVIEWS_LEFT_OUT))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["branch"]))]
    pub previews_left_out: Vec<PreviewLeftOut>,

    /// Current state of the project. Condition types: `Ready` (the production
    /// environment serves the latest commit), `SourceReachable` (the last
    /// poll succeeded), `DomainAllocated` (a host was allocated),
    /// `Implemented` (every field set is acted on), `Applied` (the API server
    /// accepted every object Kapsa applies for it; False names what a quota
    /// or an admission policy refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CONDITIONS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One Environment of a project, as summarised in the project's status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentSummary {
    /// Name of the Environment, e.g. `production` or `preview-fix-login`.
    pub name: String,

    /// `Production` or `Preview`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<EnvironmentType>,

    /// Branch the Environment is built from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,

    /// The commit the environment served when it was last Ready (set
    /// once it is Ready; while a new commit rolls out, the one before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,

    /// URL of the Environment, e.g. `https://shop.apps.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,

    /// Whether the Environment's Ready condition is True.
    #[serde(default)]
    pub ready: bool,
}

/// One preview Environment, as summarised in the project's status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreviewSummary {
    /// The branch previewed, e.g. `feature/login`.
    pub branch: String,
    /// The Environment, `preview-<branch-slug>`.
    pub environment: String,
    /// The branch head the preview is built from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// URL of the preview, e.g. `https://feature-login.shop.apps.example.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The Environment's phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<crate::EnvironmentPhase>,
    /// When the preview expires (absent: kept with `kapsa.dev/keep`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

/// Why a branch that qualifies for a preview has none.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum PreviewLeftOutReason {
    /// `maxEnvironments` previews exist; the branch waits for a place.
    LimitReached,
    /// Its TTL passed at `commit`; a new commit brings the preview back.
    Expired,
    /// The production branch contains its head (merged, or no commits of
    /// its own).
    Merged,
    /// Environments that Kapsa did not make have both names the preview
    /// could take.
    NameTaken,
    /// The branch name is one an Environment cannot hold (longer than 255
    /// characters, or refused by `spec.branch`'s rule).
    InvalidBranchName,
}

/// A branch left without a preview, in the project's status.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreviewLeftOut {
    /// The branch, e.g. `feature/old`.
    pub branch: String,
    /// `LimitReached`, `Expired`, `Merged`, `NameTaken` or `InvalidBranchName`.
    pub reason: PreviewLeftOutReason,
    /// The branch head this applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// When Kapsa first saw the branch at `commit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_seen_at: Option<Time>,
}

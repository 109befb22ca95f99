//! `ClusterRegistry` and `Registry`: container registries Kapsa pushes
//! built images to and pulls them from. Both kinds share [`RegistrySpec`]
//! (like cert-manager's `ClusterIssuer` / `Issuer`).

// kube `printcolumn(...)` attributes repeat `type_ = "string"`, which
// clippy misreads as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::borrow::Cow;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, ValidationRule,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::object::{HasSpec, HasStatus};
use kube::core::{ApiResource, NamespaceResourceScope, Resource};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::SecretReference;
use crate::conditions::Condition;
use crate::validation::{
    MAX_CONDITIONS, MAX_REPOSITORY_LEN, MAX_SERVER_LEN, REGISTRY_SERVER, REPOSITORY_PATH,
    matches_rule,
};

/// Registry product, which selects provider-specific behaviour (e.g. how
/// repositories are created). Values: `Harbor`, `GitLab`, `DockerHub`,
/// `ECR`, `GCR`, `ACR`, `Generic` (any registry speaking the OCI
/// distribution API).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum RegistryProvider {
    /// Harbor.
    Harbor,
    /// GitLab container registry.
    GitLab,
    /// Docker Hub.
    DockerHub,
    /// Amazon Elastic Container Registry.
    ECR,
    /// Google Container Registry / Artifact Registry.
    GCR,
    /// Azure Container Registry.
    ACR,
    /// Any OCI distribution registry.
    #[default]
    Generic,
}

/// A container registry: where Kapsa pushes the images it builds and where
/// the cluster pulls them from. Images go to
/// `<server>/<repository>/<project>`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "kapsa.dev",
    version = "v1alpha1",
    kind = "ClusterRegistry",
    plural = "clusterregistries",
    shortname = "creg",
    category = "kapsa",
    status = "RegistryStatus",
    derive = "PartialEq",
    label("app.kubernetes.io/part-of", "kapsa"),
    doc = "ClusterRegistry: a container registry usable by every Project (cluster-scoped; the Registry kind is the namespaced equivalent). Kapsa pushes built images to `<server>/<repository>/<project>` with the credentials Secret it names. Written by a platform admin.",
    printcolumn(name = "Provider", type_ = "string", json_path = ".spec.provider", description = "Registry product"),
    printcolumn(name = "Server", type_ = "string", json_path = ".spec.server", description = "Registry host[:port]"),
    printcolumn(name = "Repository", type_ = "string", json_path = ".spec.repository", description = "Repository path prefix", priority = 1),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status", description = "Its credentials are a Docker config for the server"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new("!has(self.spec.credentialsSecretRef) || has(self.spec.credentialsSecretRef.__namespace__)")
        .message("spec.credentialsSecretRef.namespace is required on a ClusterRegistry (e.g. kapsa-system)")
        .field_path(".spec.credentialsSecretRef.namespace")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("!has(self.spec.pullSecretRef) || has(self.spec.pullSecretRef.__namespace__)")
        .message("spec.pullSecretRef.namespace is required on a ClusterRegistry (e.g. kapsa-system)")
        .field_path(".spec.pullSecretRef.namespace")
        .reason(Reason::FieldValueRequired)
)]
// The namespaced `Registry` kind shares this spec type; it is implemented by
// hand below because a derive produces one kind per spec struct.
// What each provider's `server` and `repository` look like (the rules sit on
// the spec, so both kinds have them).
#[x_kube(
    validation = Rule::new(r"self.provider != 'ECR' || self.server.matches('^[0-9]{12}\\.dkr\\.ecr(-fips)?\\.[a-z0-9-]+\\.amazonaws\\.com(\\.cn)?$')")
        .message("with provider ECR, spec.server must be <12-digit account id>.dkr.ecr.<region>.amazonaws.com, e.g. 123456789012.dkr.ecr.eu-west-1.amazonaws.com")
        .field_path(".server"),
    validation = Rule::new(r"self.provider != 'GCR' || self.server in ['gcr.io', 'us.gcr.io', 'eu.gcr.io', 'asia.gcr.io'] || self.server.matches('^[a-z0-9-]+-docker\\.pkg\\.dev$')")
        .message("with provider GCR, spec.server must be gcr.io, us.gcr.io, eu.gcr.io, asia.gcr.io or an Artifact Registry host <location>-docker.pkg.dev")
        .field_path(".server"),
    validation = Rule::new(r"self.provider != 'GCR' || (has(self.repository) && (!self.server.endsWith('-docker.pkg.dev') || self.repository.contains('/')))")
        .message("with provider GCR, spec.repository is required: the Google Cloud project (gcr.io), or <project>/<repository> (Artifact Registry)")
        .field_path(".repository")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new(r"self.provider != 'ACR' || self.server.matches('^[a-z0-9]{5,50}\\.azurecr\\.(io|cn|us)$')")
        .message("with provider ACR, spec.server must be <registry name>.azurecr.io (5-50 lower-case letters or digits)")
        .field_path(".server"),
    validation = Rule::new(r"self.provider != 'DockerHub' || self.server in ['docker.io', 'index.docker.io', 'registry-1.docker.io']")
        .message("with provider DockerHub, spec.server must be docker.io")
        .field_path(".server"),
    validation = Rule::new(r"self.provider != 'DockerHub' || (has(self.repository) && !self.repository.contains('/'))")
        .message("with provider DockerHub, spec.repository is required and is the Docker Hub namespace (a user or organisation, one path component), e.g. acme")
        .field_path(".repository")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new(r"self.provider != 'GitLab' || (has(self.repository) && self.repository.contains('/'))")
        .message("with provider GitLab, spec.repository is required and is the project's path, <group>/<project> (images go to <server>/<group>/<project>/<kapsa project>)")
        .field_path(".repository")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new(r"self.provider != 'Harbor' || has(self.repository)")
        .message("with provider Harbor, spec.repository is required: the Harbor project (optionally followed by a path), e.g. kapsa")
        .field_path(".repository")
        .reason(Reason::FieldValueRequired)
)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySpec {
    /// Registry product: `Harbor`, `GitLab`, `DockerHub`, `ECR`, `GCR`,
    /// `ACR` or `Generic` (default; any OCI distribution registry).
    #[serde(default)]
    pub provider: RegistryProvider,

    /// Registry host with an optional port, without scheme or path, e.g.
    /// `harbor.example.com`, `registry.local:5000`, `123456789012.dkr.ecr.eu-west-1.amazonaws.com`.
    /// At most 259 characters.
    #[schemars(length(min = 1, max = MAX_SERVER_LEN))]
    #[x_kube(
        validation = Rule::new("!self.contains('://')")
            .message("spec.server must not include a scheme such as https://; give host or host:port, e.g. harbor.example.com"),
        validation = Rule::new(format!("self.contains('://') || {}", matches_rule("self", REGISTRY_SERVER)))
            .message("spec.server must be a host or host:port without path, e.g. harbor.example.com or registry.local:5000")
    )]
    pub server: String,

    /// Repository path prefix inside the registry, e.g. `kapsa` or
    /// `team/kapsa`: lower-case `[a-z0-9]` components separated by `/`, with
    /// `.`, `_` or `-` inside a component; at most 255 characters. Optional:
    /// without it images go to `<server>/<project>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_REPOSITORY_LEN))]
    #[x_kube(validation = Rule::new(matches_rule("self", REPOSITORY_PATH))
        .message("spec.repository must be a registry path such as kapsa or team/kapsa: lower-case [a-z0-9] components separated by '/', with '.', '_' or '-' inside a component"))]
    pub repository: Option<String>,

    /// The Secret (type `kubernetes.io/dockerconfigjson`) with the push
    /// credentials for the registry, by reference only. Only builds use it:
    /// Kapsa copies it into each Project's build namespace
    /// (`kapsa-build-<project>`, which tenants cannot read), never into a
    /// project namespace. On a ClusterRegistry both `name` and `namespace`
    /// are required; on a Registry only `name`, and the Secret lives in the
    /// Registry's namespace. Optional for registries that need no
    /// credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretReference>,

    /// The Secret (type `kubernetes.io/dockerconfigjson`) with pull-only
    /// credentials (a Harbor robot account with pull permission, a GitLab
    /// deploy token with `read_registry`, …), by reference only. Kapsa
    /// copies it into every project namespace as `kapsa-registry` and the
    /// apps' service account pulls with it. Without it, apps pull with no
    /// credentials (a public registry, or credentials configured on the
    /// nodes): push credentials are never given to apps. Namespace rules as
    /// for `credentialsSecretRef`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_secret_ref: Option<SecretReference>,

    /// Whether the registry is reached over plain HTTP or with a certificate
    /// that is not trusted. Default `false`. Only for local or test
    /// registries.
    #[serde(default)]
    pub insecure: bool,
}

/// Observed state of a ClusterRegistry or Registry, written by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryStatus {
    /// The `metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Current state of the registry. Condition types: `Ready` (the
    /// credentials Secrets it names exist, are of type
    /// `kubernetes.io/dockerconfigjson` and hold credentials for `server`;
    /// reasons `CredentialsValid`, `NoCredentials`, `CredentialsNotFound`,
    /// `CredentialsInvalid`, `CredentialsForOtherServer` and the same with
    /// `Pull` for `pullSecretRef`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_CONDITIONS))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Registry: a container registry usable by the Projects whose namespace is
/// the Registry's namespace. The namespaced equivalent of
/// [`ClusterRegistry`], with the same [`RegistrySpec`]; its
/// `credentialsSecretRef` names a Secret in its own namespace.
///
/// Implemented by hand (a `CustomResource` derive makes one kind per spec
/// struct); its CRD is the ClusterRegistry CRD with the names, scope and
/// root validation rule of this kind.
#[derive(Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Registry {
    /// Standard object metadata.
    pub metadata: ObjectMeta,
    /// Desired state of the registry.
    pub spec: RegistrySpec,
    /// Observed state, written by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<RegistryStatus>,
}

const REGISTRY_KIND: &str = "Registry";
const REGISTRY_PLURAL: &str = "registries";
const REGISTRY_CRD_NAME: &str = "registries.kapsa.dev";
const REGISTRY_SHORTNAMES: &[&str] = &["reg"];
const REGISTRY_DESCRIPTION: &str = "Registry: a container registry usable by the Projects in its namespace (the namespaced equivalent of ClusterRegistry, with the same spec). Kapsa pushes built images to `<server>/<repository>/<project>` with the credentials Secret it names, which lives in the Registry's namespace. Written by a project owner.";

impl Registry {
    /// A new Registry named `name` (set the namespace on `metadata`).
    pub fn new(name: &str, spec: RegistrySpec) -> Self {
        Self {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                ..ObjectMeta::default()
            },
            spec,
            status: None,
        }
    }
}

impl Serialize for Registry {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut obj =
            ser.serialize_struct(REGISTRY_KIND, 4 + usize::from(self.status.is_some()))?;
        obj.serialize_field("apiVersion", &<Self as Resource>::api_version(&()))?;
        obj.serialize_field("kind", REGISTRY_KIND)?;
        obj.serialize_field("metadata", &self.metadata)?;
        obj.serialize_field("spec", &self.spec)?;
        if let Some(status) = &self.status {
            obj.serialize_field("status", status)?;
        }
        obj.end()
    }
}

impl Resource for Registry {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        REGISTRY_KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        crate::GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        crate::VERSION.into()
    }

    fn api_version(_: &()) -> Cow<'_, str> {
        crate::API_VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        REGISTRY_PLURAL.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl HasSpec for Registry {
    type Spec = RegistrySpec;

    fn spec(&self) -> &RegistrySpec {
        &self.spec
    }

    fn spec_mut(&mut self) -> &mut RegistrySpec {
        &mut self.spec
    }
}

impl HasStatus for Registry {
    type Status = RegistryStatus;

    fn status(&self) -> Option<&RegistryStatus> {
        self.status.as_ref()
    }

    fn status_mut(&mut self) -> &mut Option<RegistryStatus> {
        &mut self.status
    }
}

impl CustomResourceExt for Registry {
    fn crd() -> CustomResourceDefinition {
        let mut crd = ClusterRegistry::crd();
        crd.metadata.name = Some(REGISTRY_CRD_NAME.to_owned());
        crd.spec.scope = "Namespaced".to_owned();
        let names = &mut crd.spec.names;
        names.kind = REGISTRY_KIND.to_owned();
        names.plural = REGISTRY_PLURAL.to_owned();
        names.singular = Some(REGISTRY_KIND.to_ascii_lowercase());
        names.short_names = Some(
            REGISTRY_SHORTNAMES
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        );
        for version in &mut crd.spec.versions {
            if let Some(schema) = version
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                schema.description = Some(REGISTRY_DESCRIPTION.to_owned());
                schema.x_kubernetes_validations = Some(
                    ["credentialsSecretRef", "pullSecretRef"]
                        .map(|field| ValidationRule {
                            rule: format!(
                                "!has(self.spec.{field}) || !has(self.spec.{field}.__namespace__)"
                            ),
                            message: Some(format!(
                                "spec.{field}.namespace must not be set on a Registry: the Secret is read from the Registry's own namespace"
                            )),
                            field_path: Some(format!(".spec.{field}.namespace")),
                            reason: Some("FieldValueForbidden".to_owned()),
                            ..ValidationRule::default()
                        })
                        .to_vec(),
                );
            }
        }
        crd
    }

    fn crd_name() -> &'static str {
        REGISTRY_CRD_NAME
    }

    fn api_resource() -> ApiResource {
        ApiResource::erase::<Self>(&())
    }

    fn shortnames() -> &'static [&'static str] {
        REGISTRY_SHORTNAMES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_is_the_namespaced_twin_of_cluster_registry() {
        let cluster = ClusterRegistry::crd();
        let namespaced = Registry::crd();
        assert_eq!(namespaced.spec.scope, "Namespaced");
        assert_eq!(cluster.spec.scope, "Cluster");
        assert_eq!(Registry::crd_name(), "registries.kapsa.dev");
        assert_eq!(
            namespaced.metadata.name.as_deref(),
            Some(Registry::crd_name())
        );
        let spec_of = |crd: &CustomResourceDefinition| {
            crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .and_then(|s| s.properties.as_ref())
                .and_then(|p| p.get("spec"))
                .cloned()
        };
        assert!(spec_of(&cluster).is_some());
        assert_eq!(spec_of(&cluster), spec_of(&namespaced), "same spec schema");
        let ar = Registry::api_resource();
        assert_eq!(ar.plural, "registries");
        assert_eq!(ar.api_version, "kapsa.dev/v1alpha1");
        assert_eq!(Registry::shortnames(), ["reg"]);
    }

    #[test]
    fn registry_serializes_with_type_meta() {
        let mut reg = Registry::new(
            "team",
            RegistrySpec {
                provider: RegistryProvider::GitLab,
                server: "registry.example.com".into(),
                repository: Some("acme/shop".into()),
                credentials_secret_ref: Some(SecretReference {
                    name: "push".into(),
                    namespace: None,
                }),
                pull_secret_ref: None,
                insecure: false,
            },
        );
        reg.metadata.namespace = Some("shop".into());
        let value = serde_json::to_value(&reg).expect("serialize");
        assert_eq!(value["apiVersion"], "kapsa.dev/v1alpha1");
        assert_eq!(value["kind"], "Registry");
        assert_eq!(value["spec"]["server"], "registry.example.com");
        assert!(value.get("status").is_none());
        let back: Registry = serde_json::from_value(value).expect("deserialize");
        assert_eq!(back, reg);
        assert_eq!(back.spec().server, "registry.example.com");
        assert!(back.status().is_none());
    }
}

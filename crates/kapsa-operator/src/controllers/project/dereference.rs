//! Step 1 of the Project reconcile: everything the plan needs, from the
//! caches. The one exception is the registry's credentials Secret: only its
//! metadata is cached (never a cache of every Secret's data), so its data
//! is read when, and only when, the copy in the project namespace is not
//! known to match it (the source changed, or someone edited the copy).

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ResourceQuota, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::naming::PRODUCTION_ENVIRONMENT_NAME;
use kapsa_api::{DomainPool, Environment, Project};
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, PartialObjectMeta};

use crate::children::Observed;
use crate::context::{Context, PollResult, cached, cached_with};
use crate::error::{Error, Result};
use crate::references::{Problem, RegistryRef, registry};
use crate::resources::environment::{
    BUILDER_SERVICE_ACCOUNT, RUNTIME_SERVICE_ACCOUNT, certificate_api_resource,
    wildcard_certificate_name,
};
use crate::resources::project::{
    BUILDER_ROLE, REGISTRY_SECRET, RESOURCE_QUOTA, namespace_name, source_version,
};

/// The registry credentials to copy into the project namespace.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// The registry names none.
    None,
    /// The registry names a Secret that cannot be used.
    Unusable(Problem),
    /// The copy matches the source: nothing to read or write.
    Current,
    /// The source, read because the copy does not match it.
    Fetched(Arc<Secret>),
}

/// The inputs of [`super::plan::plan`].
#[derive(Clone, Debug)]
pub struct ProjectWorld {
    pub project: Arc<Project>,
    /// The namespace it names, if it exists (metadata only).
    pub namespace: Option<Arc<PartialObjectMeta<Namespace>>>,
    /// Every other Project (namespace and host claims).
    pub others: Vec<Arc<Project>>,
    pub pools: Vec<Arc<DomainPool>>,
    pub registry: Result<RegistryRef, Problem>,
    pub credentials: Credentials,
    /// Kapsa's children in the namespace, as cached.
    pub service_accounts: Vec<Arc<ServiceAccount>>,
    pub role: Option<Arc<Role>>,
    pub role_binding: Option<Arc<RoleBinding>>,
    pub registry_secret: Option<Arc<Secret>>,
    pub quota: Option<Arc<ResourceQuota>>,
    pub wildcard_certificate: Option<Arc<DynamicObject>>,
    /// The Project's Environments in its namespace (production among them).
    pub environments: Vec<Arc<Environment>>,
    /// The latest poll of its repository (None until the first poll since start).
    pub poll: Option<PollResult>,
    /// `(host, "<namespace>/<name>")` routed by Ingresses Kapsa did not make.
    pub foreign_hosts: Vec<(String, String)>,
    /// The Pod Security Standard for namespaces whose pool sets none.
    pub pod_security_default: kapsa_api::domain_pool::PodSecurityLevel,
    pub now: Time,
}

impl ProjectWorld {
    /// The Project's children as cached (the namespace included), for prune
    /// and compare.
    pub fn observed(&self) -> Vec<Observed> {
        let mut observed: Vec<Observed> = self
            .service_accounts
            .iter()
            .map(|sa| Observed::typed(sa.as_ref()))
            .collect();
        observed.extend(self.role.as_deref().map(Observed::typed));
        observed.extend(self.role_binding.as_deref().map(Observed::typed));
        observed.extend(self.registry_secret.as_deref().map(Observed::typed));
        observed.extend(self.quota.as_deref().map(Observed::typed));
        observed.extend(
            self.wildcard_certificate
                .as_deref()
                .map(|c| Observed::of(&certificate_api_resource(), c)),
        );
        observed.extend(
            self.environments
                .iter()
                .filter(|e| {
                    e.name_any() == PRODUCTION_ENVIRONMENT_NAME
                        || super::previews::is_kapsa_preview(&self.project, e)
                })
                .map(|e| Observed::typed(e.as_ref())),
        );
        if let Some(ns) = &self.namespace {
            // Only metadata is cached; that is all Kapsa sets on a namespace.
            let mut namespace = Observed::typed(&Namespace {
                metadata: ns.metadata.clone(),
                ..Namespace::default()
            });
            if let Some(map) = namespace.value.as_object_mut() {
                map.insert("apiVersion".into(), "v1".into());
                map.insert("kind".into(), "Namespace".into());
            }
            observed.push(namespace);
        }
        observed
    }
}

pub async fn dereference(project: Arc<Project>, ctx: &Context) -> Result<ProjectWorld> {
    let stores = &ctx.stores;
    let name = project.name_any();
    let namespace = namespace_name(&project);
    let ns = Some(namespace.as_str());
    let registry = registry(stores, &project, &namespace);
    let registry_secret = cached(&stores.secrets, REGISTRY_SECRET, ns);
    let others: Vec<Arc<Project>> = stores
        .projects
        .state()
        .into_iter()
        .filter(|p| p.name_any() != name)
        .collect();
    let mut world = ProjectWorld {
        namespace: cached(&stores.namespaces, &namespace, None),
        others,
        pools: stores.pools.state(),
        registry,
        credentials: Credentials::None,
        service_accounts: [BUILDER_SERVICE_ACCOUNT, RUNTIME_SERVICE_ACCOUNT]
            .iter()
            .filter_map(|sa| cached(&stores.service_accounts, sa, ns))
            .collect(),
        role: cached(&stores.roles, BUILDER_ROLE, ns),
        role_binding: cached(&stores.role_bindings, BUILDER_ROLE, ns),
        registry_secret,
        quota: cached(&stores.quotas, RESOURCE_QUOTA, ns),
        wildcard_certificate: cached_with(
            &stores.certificates,
            &wildcard_certificate_name(&name),
            ns,
            certificate_api_resource(),
        ),
        environments: stores
            .environments
            .state()
            .into_iter()
            .filter(|e| e.namespace().as_deref() == ns && e.spec.project == name)
            .collect(),
        poll: ctx.git.get(&name),
        pod_security_default: ctx.pod_security_default,
        foreign_hosts: foreign_hosts(stores.ingress_hosts.state().iter().map(|i| i.as_ref())),
        now: Time(crate::controllers::now()),
        project,
    };
    // A Project refused its namespace reads no Secret (a Registry's
    // credentials live in that namespace).
    if super::plan::namespace_problem(&world, &namespace).is_some() {
        return Ok(world);
    }
    world.credentials = match &world.registry {
        Err(_) => Credentials::Unusable(Problem {
            reason: "RegistryUnavailable",
            message: String::new(),
        }),
        Ok(RegistryRef {
            credentials: None, ..
        }) => Credentials::None,
        Ok(RegistryRef {
            credentials: Some((secret_ns, secret_name)),
            ..
        }) => {
            credentials(
                ctx,
                secret_ns,
                secret_name,
                world.registry_secret.as_deref(),
            )
            .await?
        }
    };
    Ok(world)
}

/// The state of the registry credentials: from the metadata cache when the
/// copy is known to match the source; otherwise the source is read.
async fn credentials(
    ctx: &Context,
    namespace: &str,
    name: &str,
    copy: Option<&Secret>,
) -> Result<Credentials> {
    let not_found = || {
        Credentials::Unusable(Problem {
            reason: "RegistryCredentialsNotFound",
            message: format!(
                "Secret {namespace}/{name} (the registry's credentialsSecretRef) does not exist"
            ),
        })
    };
    let Some(meta) = cached(&ctx.stores.secret_metadata, name, Some(namespace)) else {
        return Ok(not_found());
    };
    if copy.is_some_and(|copy| {
        crate::resources::project::copy_matches(copy, &source_version(&meta.metadata))
    }) {
        return Ok(Credentials::Current);
    }
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(Error::Dereference)?;
    ctx.metrics.record_live_read("Secret");
    Ok(match secret {
        None => not_found(),
        Some(s) if s.type_.as_deref() != Some("kubernetes.io/dockerconfigjson") => {
            Credentials::Unusable(Problem {
                reason: "RegistryCredentialsInvalid",
                message: format!(
                    "Secret {namespace}/{name} has type {:?}; registry credentials must be kubernetes.io/dockerconfigjson",
                    s.type_.clone().unwrap_or_default()
                ),
            })
        }
        Some(s) => Credentials::Fetched(Arc::new(s)),
    })
}

/// Whether a Project was refused its namespace, from the caches (for the
/// poller: the git Secret of a refused namespace is never read).
pub fn namespace_refused(
    stores: &crate::context::Stores,
    project: &Project,
) -> Option<(&'static str, String)> {
    let namespace = namespace_name(project);
    let others = stores.projects.state();
    super::plan::refused_namespace(
        project,
        &namespace,
        others.iter().map(|p| p.as_ref()),
        cached(&stores.namespaces, &namespace, None).as_deref(),
    )
}

/// The hosts routed by Ingresses Kapsa did not make (no Environment is their
/// controller), from the cache of every Ingress's hosts.
pub fn foreign_hosts<'a>(
    ingresses: impl IntoIterator<Item = &'a k8s_openapi::api::networking::v1::Ingress>,
) -> Vec<(String, String)> {
    ingresses
        .into_iter()
        .filter(|i| {
            !i.owner_references().iter().any(|o| {
                o.controller == Some(true)
                    && o.kind == "Environment"
                    && o.api_version.starts_with("kapsa.dev/")
            })
        })
        .flat_map(|i| {
            let by = format!("{}/{}", i.namespace().unwrap_or_default(), i.name_any());
            let spec = i.spec.as_ref();
            let rules = spec
                .and_then(|s| s.rules.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|r| r.host.clone());
            let tls = spec
                .and_then(|s| s.tls.as_ref())
                .into_iter()
                .flatten()
                .flat_map(|t| t.hosts.clone().unwrap_or_default());
            rules
                .chain(tls)
                .map(move |h| (h, by.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

//! Step 1 of the Project reconcile: everything the plan needs, from the
//! caches. The one exception is the registry's credentials Secret: only its
//! metadata is cached (never a cache of every Secret's data), so its data
//! is read when, and only when, the copy in the project namespace is not
//! known to match it (the source changed, or someone edited the copy).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ResourceQuota, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::naming::PRODUCTION_ENVIRONMENT_NAME;
use kapsa_api::{DomainPool, Environment, Project};
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, PartialObjectMeta};

use crate::children::Observed;
use crate::context::{Context, PollResult, cached};
use crate::error::{Error, Result};
use crate::references::{Problem, RegistryRef, registry};
use crate::resources::environment::{
    BUILDER_SERVICE_ACCOUNT, RUNTIME_SERVICE_ACCOUNT, certificate_api_resource,
    kpack_image_api_resource, listener_set_api_resource, listener_set_name,
    wildcard_certificate_name,
};
use crate::resources::project::{
    BUILDER_ROLE, GIT_SECRET, REGISTRY_SECRET, RESOURCE_QUOTA, build_namespace_name,
    namespace_name, source_version,
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
    /// Its build namespace (`kapsa-build-<project>`), if it exists.
    pub build_namespace: Option<Arc<PartialObjectMeta<Namespace>>>,
    /// Every other Project (namespace and host claims).
    pub others: Vec<Arc<Project>>,
    pub pools: Vec<Arc<DomainPool>>,
    pub registry: Result<RegistryRef, Problem>,
    /// The registry's push credentials, copied into the build namespace.
    pub credentials: Credentials,
    /// The registry's pull-only credentials, copied into the project namespace.
    pub pull_credentials: Credentials,
    /// The git credentials, copied into the build namespace.
    pub git_credentials: Credentials,
    /// Kapsa's children in both namespaces, as cached (the builder's in the
    /// project namespace only where an older Kapsa put them there).
    pub service_accounts: Vec<Arc<ServiceAccount>>,
    pub roles: Vec<Arc<Role>>,
    pub role_bindings: Vec<Arc<RoleBinding>>,
    /// The push credentials' copy in the build namespace.
    pub push_secret: Option<Arc<Secret>>,
    /// The copy in the project namespace: pull-only credentials (an older
    /// Kapsa put the push credentials there).
    pub registry_secret: Option<Arc<Secret>>,
    /// The git credentials' copy in the build namespace.
    pub git_secret: Option<Arc<Secret>>,
    /// The uid of the registry's push credentials Secret, if cached (a copy
    /// made from it is never left in the project namespace).
    pub push_source_uid: Option<String>,
    pub quota: Option<Arc<ResourceQuota>>,
    pub wildcard_certificate: Option<Arc<DynamicObject>>,
    /// Whether the cluster serves Gateway API's HTTPRoute and ListenerSet.
    pub gateway_installed: bool,
    /// Its ListenerSet (Gateway routing), when cached.
    pub listener_set: Option<Arc<DynamicObject>>,
    /// The kpack Images in the build namespace (one per Environment that
    /// builds; an Environment's deletion leaves its Image to the Project).
    pub build_images: Vec<Arc<DynamicObject>>,
    /// Its Dockerfile build Jobs in the build namespace.
    pub build_jobs: Vec<Arc<k8s_openapi::api::batch::v1::Job>>,
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
    /// The Project's children as cached (the namespaces included), for prune
    /// and compare.
    pub fn observed(&self) -> Vec<Observed> {
        let mut observed: Vec<Observed> = self
            .service_accounts
            .iter()
            .map(|sa| Observed::typed(sa.as_ref()))
            .collect();
        observed.extend(self.roles.iter().map(|r| Observed::typed(r.as_ref())));
        observed.extend(
            self.role_bindings
                .iter()
                .map(|r| Observed::typed(r.as_ref())),
        );
        observed.extend(
            [&self.push_secret, &self.registry_secret, &self.git_secret]
                .into_iter()
                .flatten()
                .map(|s| Observed::typed(s.as_ref())),
        );
        observed.extend(self.quota.as_deref().map(Observed::typed));
        observed.extend(
            self.wildcard_certificate
                .as_deref()
                .map(|c| Observed::of(&certificate_api_resource(), c)),
        );
        observed.extend(
            self.listener_set
                .as_deref()
                .map(|l| Observed::of(&listener_set_api_resource(), l)),
        );
        observed.extend(
            self.build_images
                .iter()
                .map(|i| Observed::of(&kpack_image_api_resource(), i.as_ref())),
        );
        observed.extend(self.build_jobs.iter().map(|j| Observed::typed(j.as_ref())));
        observed.extend(
            self.environments
                .iter()
                .filter(|e| {
                    e.name_any() == PRODUCTION_ENVIRONMENT_NAME
                        || super::previews::is_kapsa_preview(&self.project, e)
                })
                .map(|e| Observed::typed(e.as_ref())),
        );
        for ns in [&self.namespace, &self.build_namespace]
            .into_iter()
            .flatten()
        {
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
    let build_ns = build_namespace_name(&project);
    let ns = Some(namespace.as_str());
    let bns = Some(build_ns.as_str());
    let registry = registry(stores, &project, &namespace);
    let others: Vec<Arc<Project>> = stores
        .projects
        .state()
        .into_iter()
        .filter(|p| p.metadata.name.as_deref() != Some(name.as_str()))
        .collect();
    let both = [bns, ns];
    let mut world = ProjectWorld {
        namespace: stores.namespaces.get(&namespace, None),
        build_namespace: stores.namespaces.get(&build_ns, None),
        others,
        pools: stores.pools.state(),
        credentials: Credentials::None,
        pull_credentials: Credentials::None,
        git_credentials: Credentials::None,
        push_source_uid: registry
            .as_ref()
            .ok()
            .and_then(|r| r.credentials.as_ref())
            .and_then(|(sns, sname)| cached(&stores.secret_metadata, sname, Some(sns)))
            .and_then(|m| m.metadata.uid.clone()),
        registry,
        service_accounts: [
            (BUILDER_SERVICE_ACCOUNT, bns),
            (RUNTIME_SERVICE_ACCOUNT, ns),
            (BUILDER_SERVICE_ACCOUNT, ns),
        ]
        .iter()
        .filter_map(|(sa, ns)| stores.service_accounts.get(sa, *ns))
        .collect(),
        roles: both
            .iter()
            .filter_map(|ns| stores.roles.get(BUILDER_ROLE, *ns))
            .collect(),
        role_bindings: both
            .iter()
            .filter_map(|ns| stores.role_bindings.get(BUILDER_ROLE, *ns))
            .collect(),
        push_secret: stores.secrets.get(REGISTRY_SECRET, bns),
        registry_secret: stores.secrets.get(REGISTRY_SECRET, ns),
        git_secret: stores.git_secrets.get(GIT_SECRET, bns),
        quota: stores.quotas.get(RESOURCE_QUOTA, ns),
        wildcard_certificate: stores
            .certificates
            .get(&wildcard_certificate_name(&name), ns),
        gateway_installed: stores.installed.gateway_api,
        listener_set: stores.listener_sets.get(&listener_set_name(&name), ns),
        build_images: stores.images.in_namespace(bns),
        build_jobs: stores
            .jobs
            .state()
            .into_iter()
            .filter(|j| j.metadata.namespace.as_deref() == bns)
            .collect(),
        environments: stores
            .environments
            .state()
            .into_iter()
            .filter(|e| e.metadata.namespace.as_deref() == ns && e.spec.project == name)
            .collect(),
        poll: ctx.git.get(&name),
        pod_security_default: ctx.pod_security_default,
        foreign_hosts: foreign_hosts(stores.ingress_hosts.state().iter().map(|i| i.as_ref())),
        now: Time(crate::controllers::now()),
        project,
    };
    // A Project refused its namespace reads no Secret (a Registry's
    // credentials and the git credentials live in that namespace).
    if super::plan::namespace_problem(&world, &namespace).is_some() {
        return Ok(world);
    }
    match world.registry.clone() {
        Err(_) => {
            let unavailable = || {
                Credentials::Unusable(Problem {
                    reason: "RegistryUnavailable",
                    message: String::new(),
                })
            };
            world.credentials = unavailable();
            world.pull_credentials = unavailable();
        }
        Ok(registry) => {
            if let Some(at) = &registry.credentials {
                world.credentials =
                    credentials(ctx, at, &PUSH, world.push_secret.as_deref()).await?;
            }
            if let Some(at) = &registry.pull {
                world.pull_credentials =
                    credentials(ctx, at, &PULL, world.registry_secret.as_deref()).await?;
            }
        }
    }
    if let Some(git) = &world.project.spec.source.git.secret_ref {
        let location = (namespace.clone(), git.name.clone());
        world.git_credentials =
            credentials(ctx, &location, &GIT, world.git_secret.as_deref()).await?;
    }
    Ok(world)
}

/// A kind of Secret Kapsa copies: the field naming it, the types it may
/// have and the reasons of its problems.
pub(crate) struct CopiedSecret {
    field: &'static str,
    types: &'static [&'static str],
    not_found: &'static str,
    invalid: &'static str,
}

pub(crate) const PUSH: CopiedSecret = CopiedSecret {
    field: "the registry's credentialsSecretRef",
    types: &["kubernetes.io/dockerconfigjson"],
    not_found: "RegistryCredentialsNotFound",
    invalid: "RegistryCredentialsInvalid",
};

pub(crate) const PULL: CopiedSecret = CopiedSecret {
    field: "the registry's pullSecretRef",
    types: &["kubernetes.io/dockerconfigjson"],
    not_found: "RegistryPullSecretNotFound",
    invalid: "RegistryPullSecretInvalid",
};

pub(crate) const GIT: CopiedSecret = CopiedSecret {
    field: "spec.source.git.secretRef",
    types: &["kubernetes.io/basic-auth", "kubernetes.io/ssh-auth"],
    not_found: "GitCredentialsNotFound",
    invalid: "GitCredentialsInvalid",
};

/// The state of a Secret to copy: from the metadata cache when the copy is
/// known to match the source; otherwise the source is read.
async fn credentials(
    ctx: &Context,
    location: &(String, String),
    kind: &CopiedSecret,
    copy: Option<&Secret>,
) -> Result<Credentials> {
    let (namespace, name) = location;
    let Some(meta) = cached(&ctx.stores.secret_metadata, name, Some(namespace)) else {
        return Ok(judge(kind, location, None));
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
    Ok(judge(kind, location, secret))
}

/// What a Secret to copy, as read (`None`: it does not exist), means.
pub(crate) fn judge(
    kind: &CopiedSecret,
    (namespace, name): &(String, String),
    source: Option<Secret>,
) -> Credentials {
    match source {
        None => Credentials::Unusable(Problem {
            reason: kind.not_found,
            message: format!("Secret {namespace}/{name} ({}) does not exist", kind.field),
        }),
        Some(s) if !kind.types.contains(&s.type_.as_deref().unwrap_or_default()) => {
            Credentials::Unusable(Problem {
                reason: kind.invalid,
                message: format!(
                    "Secret {namespace}/{name} ({}) has type {:?}; it must be {}",
                    kind.field,
                    s.type_.clone().unwrap_or_default(),
                    kind.types.join(" or ")
                ),
            })
        }
        Some(s) => Credentials::Fetched(Arc::new(s)),
    }
}

/// Whether a Project was refused its namespace (for the poller: the git
/// Secret of a refused namespace is never read). Its rivals are the other
/// Projects that name the same namespace (none for most), looked up in
/// `contested` ([`contested_namespaces`]); the namespace itself is read
/// from its cache.
pub fn namespace_refused(
    stores: &crate::context::Stores,
    project: &Project,
    contested: &HashMap<String, Vec<Arc<Project>>>,
) -> Option<(&'static str, String)> {
    let namespace = namespace_name(project);
    let rivals = contested.get(&namespace).map_or(&[][..], Vec::as_slice);
    super::plan::refused_namespace(
        project,
        &namespace,
        rivals.iter().map(|p| p.as_ref()),
        stores.namespaces.get(&namespace, None).as_deref(),
    )
}

/// The namespaces more than one of `projects` names, each with the
/// Projects that name it: the only ones where a Project can be refused for
/// another having come first. One pass over the Projects, so that a check
/// per poll is a lookup rather than a pass of its own.
pub fn contested_namespaces(projects: &[Arc<Project>]) -> HashMap<String, Vec<Arc<Project>>> {
    let mut claims: HashMap<&str, Vec<&Arc<Project>>> = HashMap::with_capacity(projects.len());
    for project in projects {
        claims
            .entry(crate::resources::project::namespace_of(project))
            .or_default()
            .push(project);
    }
    claims
        .into_iter()
        .filter(|(_, claimants)| claimants.len() > 1)
        .map(|(namespace, claimants)| {
            (
                namespace.to_owned(),
                claimants.into_iter().cloned().collect(),
            )
        })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn project(name: &str, namespace: Option<&str>) -> Arc<Project> {
        let mut spec = serde_json::json!({
            "source": {"git": {"url": "https://git.example.com/a.git"}},
            "registryRef": {"name": "r"}
        });
        if let Some(namespace) = namespace {
            spec["namespace"] = namespace.into();
        }
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "apiVersion": "kapsa.dev/v1alpha1", "kind": "Project",
                "metadata": {"name": name}, "spec": spec
            }))
            .unwrap(),
        )
    }

    #[test]
    fn only_namespaces_named_twice_are_contested_with_every_claimant() {
        let projects = [
            project("shop", None),
            project("intruder", Some("shop")),
            project("blog", None),
            project("docs", Some("pages")),
            project("pages", None),
            project("wiki", Some("wiki-ns")),
        ];
        let contested = contested_namespaces(&projects);
        let mut names: Vec<(&str, Vec<String>)> = contested
            .iter()
            .map(|(ns, ps)| {
                let mut ps: Vec<String> = ps.iter().map(|p| p.name_any()).collect();
                ps.sort();
                (ns.as_str(), ps)
            })
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![
                ("pages", vec!["docs".to_string(), "pages".to_string()]),
                ("shop", vec!["intruder".to_string(), "shop".to_string()]),
            ]
        );
    }
}

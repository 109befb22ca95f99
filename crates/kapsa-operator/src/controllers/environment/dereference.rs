//! Step 1 of the Environment reconcile: everything the plan needs, read from
//! the caches only (no API call).

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::project::{BuildStrategy, BuilderKind, DEFAULT_BUILDER_NAME};
use kapsa_api::{DomainPool, Environment, Project};
use kube::api::DynamicObject;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use crate::children::Observed;
use crate::context::{Context, cached, cached_with};
use crate::references::{Problem, RegistryRef, registry};
use crate::resources::environment::{
    ENVIRONMENT_UID_LABEL, certificate_api_resource, kpack_image_api_resource,
    service_monitor_api_resource, wildcard_certificate_name,
};
use crate::resources::project::build_namespace_name;

/// Whether the kpack builder a Project names can build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuilderState {
    Present,
    NotFound,
    KpackNotInstalled,
}

/// The inputs of [`super::plan::plan`].
#[derive(Clone, Debug)]
pub struct EnvironmentWorld {
    pub environment: Arc<Environment>,
    pub project: Option<Arc<Project>>,
    pub pool: Option<Arc<DomainPool>>,
    /// The registry's address (its credentials are the Project's business).
    pub registry: Result<RegistryRef, Problem>,
    pub builder: BuilderState,
    /// The Environment's children as cached now.
    pub deployment: Option<Arc<Deployment>>,
    pub service: Option<Arc<Service>>,
    pub ingress: Option<Arc<Ingress>>,
    /// Its kpack Image in the Project's build namespace.
    pub image: Option<Arc<DynamicObject>>,
    /// A kpack Image in the project namespace that an older Kapsa made for
    /// it (pruned: builds run in the build namespace now).
    pub legacy_image: Option<Arc<DynamicObject>>,
    /// Whether the Project's build namespace exists (the Project makes it)
    /// and is not being deleted.
    pub build_namespace_exists: bool,
    /// The Certificates its TLS may come from: `<env>-tls` (per host) and
    /// `<project>-wildcard` (DNS01), when cached.
    pub certificates: Vec<Arc<DynamicObject>>,
    /// Whether the cluster serves the Prometheus Operator's ServiceMonitor
    /// API (what `runtime.metrics` needs).
    pub monitoring_installed: bool,
    /// Its ServiceMonitor, when cached.
    pub service_monitor: Option<Arc<DynamicObject>>,
    /// `configMapRefs`/`secretRefs` that do not exist, e.g. `ConfigMap "x"`.
    pub missing_references: Vec<String>,
    /// The head of `spec.branch` at the Project's last poll, when
    /// `spec.commit` is not set (an Environment a person made follows its
    /// branch; Kapsa's own have their commit set by the Project).
    pub branch_head: Option<String>,
    pub now: Time,
}

impl EnvironmentWorld {
    /// The Environment's children as cached, for prune and compare.
    pub fn observed(&self) -> Vec<Observed> {
        [
            self.deployment.as_deref().map(Observed::typed),
            self.service.as_deref().map(Observed::typed),
            self.ingress.as_deref().map(Observed::typed),
            self.service_monitor
                .as_deref()
                .map(|m| Observed::of(&service_monitor_api_resource(), m)),
            self.image.as_deref().map(|i| self.build_image(i)),
            self.legacy_image
                .as_deref()
                .map(|i| Observed::of(&kpack_image_api_resource(), i)),
        ]
        .into_iter()
        .flatten()
        .collect()
    }
}

impl EnvironmentWorld {
    /// The kpack Image in the build namespace, seen as this Environment's
    /// child: its controller is the Project, and it is this Environment's
    /// when it carries the Environment's uid. (Only then may the
    /// Environment prune it.)
    fn build_image(&self, image: &DynamicObject) -> Observed {
        let mut observed = Observed::of(&kpack_image_api_resource(), image);
        let project_uid = self.project.as_ref().and_then(|p| p.uid());
        let env_uid = self.environment.uid();
        let ours = observed.controller_uid.is_some()
            && observed.controller_uid == project_uid
            && env_uid.is_some()
            && image.labels().get(ENVIRONMENT_UID_LABEL) == env_uid.as_ref();
        observed.controller_uid = if ours { env_uid } else { None };
        observed
    }
}

/// `runtime.configMapRefs` and `runtime.secretRefs` that `exists` denies,
/// described for a condition message.
pub fn missing_references(
    project: &Project,
    type_: kapsa_api::EnvironmentType,
    mut exists: impl FnMut(&str, &str) -> bool,
) -> Vec<String> {
    let runtime = &project.spec.runtime_for(type_);
    let config_maps = runtime
        .config_map_refs
        .iter()
        .map(|r| ("ConfigMap", &r.name));
    let secrets = runtime.secret_refs.iter().map(|r| ("Secret", &r.name));
    config_maps
        .chain(secrets)
        .filter(|(kind, name)| !exists(kind, name))
        .map(|(kind, name)| format!("{kind} {name:?}"))
        .collect()
}

/// The kpack builder a Project builds with.
pub fn builder_ref(project: &Project) -> (BuilderKind, String) {
    project
        .spec
        .build
        .builder_ref
        .as_ref()
        .map(|b| (b.kind, b.name.clone()))
        .unwrap_or((
            BuilderKind::ClusterBuilder,
            DEFAULT_BUILDER_NAME.to_string(),
        ))
}

pub fn dereference(env: Arc<Environment>, ctx: &Context) -> EnvironmentWorld {
    let stores = &ctx.stores;
    let name = env.name_any();
    let namespace = env.namespace().unwrap_or_default();
    let project = cached(&stores.projects, &env.spec.project, None);
    let pool = project
        .as_ref()
        .and_then(|p| p.status.as_ref()?.domain_pool.clone())
        .and_then(|pool| cached(&stores.pools, &pool, None));
    let registry = match &project {
        Some(p) => registry(stores, p, &namespace),
        None => Err(Problem {
            reason: "ProjectNotFound",
            message: String::new(),
        }),
    };
    let builder = match &project {
        _ if !stores.installed.kpack => BuilderState::KpackNotInstalled,
        Some(p) if p.spec.build.strategy == BuildStrategy::Buildpacks => {
            let (kind, builder) = builder_ref(p);
            let resource = kapsa_api::external::kpack_builder(kind);
            let found = match kind {
                BuilderKind::ClusterBuilder => stores
                    .cluster_builders
                    .get(&ObjectRef::new_with(&builder, resource)),
                BuilderKind::Builder => stores
                    .builders
                    .get(&ObjectRef::new_with(&builder, resource).within(&build_namespace_name(p))),
            };
            if found.is_some() {
                BuilderState::Present
            } else {
                BuilderState::NotFound
            }
        }
        _ => BuilderState::NotFound,
    };
    let mut certificates = vec![cached_with(
        &stores.certificates,
        &format!("{name}-tls"),
        Some(&namespace),
        certificate_api_resource(),
    )];
    if let Some(p) = &project {
        certificates.push(cached_with(
            &stores.certificates,
            &wildcard_certificate_name(&p.name_any()),
            Some(&namespace),
            certificate_api_resource(),
        ));
    }
    let missing_references = match &project {
        Some(p) => missing_references(p, env.spec.type_, |kind, name| match kind {
            "ConfigMap" => cached(&stores.config_map_metadata, name, Some(&namespace)).is_some(),
            _ => cached(&stores.secret_metadata, name, Some(&namespace)).is_some(),
        }),
        None => Vec::new(),
    };
    let branch_head = match (&env.spec.branch, &env.spec.commit) {
        (Some(branch), None) => ctx
            .git
            .get(&env.spec.project)
            .and_then(|poll| poll.branches?.get(branch).cloned()),
        _ => None,
    };
    let build_ns = project.as_deref().map(build_namespace_name);
    let world = EnvironmentWorld {
        branch_head,
        project,
        pool,
        registry,
        builder,
        deployment: cached(&stores.deployments, &name, Some(&namespace)),
        service: cached(&stores.services, &name, Some(&namespace)),
        ingress: cached(&stores.ingresses, &name, Some(&namespace)),
        image: build_ns.as_ref().and_then(|bns| {
            cached_with(&stores.images, &name, Some(bns), kpack_image_api_resource())
        }),
        legacy_image: cached_with(
            &stores.images,
            &name,
            Some(&namespace),
            kpack_image_api_resource(),
        ),
        // A build namespace being deleted (its Project's earlier life) is
        // waited out: nothing can be made in it.
        build_namespace_exists: build_ns.as_ref().is_some_and(|bns| {
            cached(&stores.namespaces, bns, None)
                .is_some_and(|n| n.metadata.deletion_timestamp.is_none())
        }),
        certificates: certificates.into_iter().flatten().collect(),
        monitoring_installed: stores.installed.prometheus_operator,
        service_monitor: cached_with(
            &stores.service_monitors,
            &name,
            Some(&namespace),
            service_monitor_api_resource(),
        ),
        missing_references,
        now: Time(crate::controllers::now()),
        environment: env,
    };
    debug_assert!(world.environment.meta().name.is_some());
    world
}

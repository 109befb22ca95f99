//! Step 1 of the Environment reconcile: everything the plan needs, read from
//! the caches only (no API call).

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::project::{BuildStrategy, BuilderKind, DEFAULT_BUILDER_NAME};
use kapsa_api::{DomainPool, Environment, Project};
use kube::api::DynamicObject;
use kube::{Resource, ResourceExt};

use crate::children::Observed;
use crate::context::{Context, cached, cached_with};
use crate::references::{Problem, RegistryRef, registry};
use crate::resources::environment::{
    ENVIRONMENT_UID_LABEL, certificate_api_resource, http_route_api_resource,
    kpack_image_api_resource, service_monitor_api_resource, wildcard_certificate_name,
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
    /// The Certificates its TLS may come from: `<env>-tls` (per host, from
    /// ingress-shim), `<env>-gateway-tls` (per host, Kapsa's, Gateway
    /// routing) and `<project>-wildcard` (DNS01), when cached.
    pub certificates: Vec<Arc<DynamicObject>>,
    /// Whether the cluster serves Gateway API's HTTPRoute and ListenerSet.
    pub gateway_installed: bool,
    /// Whether the cluster serves cert-manager's Certificates.
    pub cert_manager_installed: bool,
    /// Its HTTPRoute (Gateway routing), when cached.
    pub http_route: Option<Arc<DynamicObject>>,
    /// Its Dockerfile build Jobs in the build namespace (tied to it by its
    /// uid), newest first, with what each reported.
    pub build_jobs: Vec<BuildJob>,
    /// What Dockerfile build Pods run and where (`--buildkit-image`,
    /// `--build-node-selector`, `--build-toleration`).
    pub build_pods: crate::resources::environment::BuildPods,
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
            self.http_route
                .as_deref()
                .map(|r| Observed::of(&http_route_api_resource(), r)),
            self.image.as_deref().map(|i| self.build_image(i)),
            self.legacy_image
                .as_deref()
                .map(|i| Observed::of(&kpack_image_api_resource(), i)),
        ]
        .into_iter()
        .flatten()
        .chain(self.build_jobs.iter().map(|b| self.build_job(&b.job)))
        // Certificates Kapsa made for the Environment (Gateway routing);
        // ingress-shim's and the Project's wildcard have other controllers.
        .chain(
            self.certificates
                .iter()
                .filter(|c| {
                    let uid = self.environment.uid();
                    uid.is_some()
                        && c.owner_references()
                            .iter()
                            .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
                })
                .map(|c| Observed::of(&certificate_api_resource(), c.as_ref())),
        )
        .collect()
    }
}

impl EnvironmentWorld {
    /// The kpack Image in the build namespace, seen as this Environment's
    /// child: its controller is the Project, and it is this Environment's
    /// when it carries the Environment's uid. (Only then may the
    /// Environment prune it.)
    fn build_job(&self, job: &Job) -> Observed {
        self.ours_in_build_namespace(Observed::typed(job), job.labels())
    }

    fn build_image(&self, image: &DynamicObject) -> Observed {
        self.ours_in_build_namespace(
            Observed::of(&kpack_image_api_resource(), image),
            image.labels(),
        )
    }

    fn ours_in_build_namespace(
        &self,
        mut observed: Observed,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> Observed {
        let project_uid = self.project.as_ref().and_then(|p| p.uid());
        let env_uid = self.environment.uid();
        let ours = observed.controller_uid.is_some()
            && observed.controller_uid == project_uid
            && env_uid.is_some()
            && labels.get(ENVIRONMENT_UID_LABEL) == env_uid.as_ref();
        observed.controller_uid = if ours { env_uid } else { None };
        observed
    }
}

/// A Dockerfile build Job and what it concluded.
#[derive(Clone, Debug)]
pub struct BuildJob {
    pub job: Arc<Job>,
    /// The commit it builds (its annotation).
    pub commit: Option<String>,
    pub outcome: JobOutcome,
}

/// What a build Job concluded, from its conditions and its Pod's
/// termination message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobOutcome {
    Running,
    /// Complete, with the digest the build container reported (if any).
    Succeeded {
        digest: Option<String>,
    },
    /// Failed: `BuildTimedOut` (the Job's deadline) or `BuildFailed`, with
    /// the end of the build's output.
    Failed {
        reason: &'static str,
        message: String,
    },
}

/// Longest build output quoted in a condition.
const MAX_BUILD_MESSAGE: usize = 1024;

/// What `job` concluded; `pods` are its Pods (their build container's
/// termination message carries the digest, or the end of the log).
pub fn job_outcome(job: &Job, pods: &[&Pod]) -> JobOutcome {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let holds = |type_: &str| {
        conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == "True")
    };
    let message = || {
        pods.iter()
            .filter_map(|p| p.status.as_ref()?.container_statuses.as_ref())
            .flatten()
            .filter(|c| c.name == crate::resources::environment::BUILD_CONTAINER)
            .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
            .map(|m| m.trim().to_string())
            .find(|m| !m.is_empty())
    };
    if holds("Complete").is_some() {
        let digest = message().filter(|m| {
            m.strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        });
        return JobOutcome::Succeeded { digest };
    }
    if let Some(failed) = holds("Failed") {
        let timed_out = failed.reason.as_deref() == Some("DeadlineExceeded");
        let mut text = message()
            .or_else(|| failed.message.clone())
            .unwrap_or_else(|| "no output".into());
        if text.len() > MAX_BUILD_MESSAGE {
            let mut start = text.len() - MAX_BUILD_MESSAGE;
            while !text.is_char_boundary(start) {
                start += 1;
            }
            text = format!("…{}", &text[start..]);
        }
        return JobOutcome::Failed {
            reason: if timed_out {
                "BuildTimedOut"
            } else {
                "BuildFailed"
            },
            message: text,
        };
    }
    JobOutcome::Running
}

/// The build Jobs of an Environment with their outcomes, newest first.
pub fn build_jobs(
    jobs: impl IntoIterator<Item = Arc<Job>>,
    pods_of: impl Fn(&str) -> Vec<Arc<Pod>>,
) -> Vec<BuildJob> {
    let mut found: Vec<BuildJob> = jobs
        .into_iter()
        .map(|job| {
            let pods = pods_of(&job.name_any());
            let pods: Vec<&Pod> = pods.iter().map(|p| p.as_ref()).collect();
            BuildJob {
                commit: job
                    .annotations()
                    .get(crate::resources::environment::BUILD_COMMIT_ANNOTATION)
                    .cloned(),
                outcome: job_outcome(&job, &pods),
                job,
            }
        })
        .collect();
    found.sort_by(|a, b| {
        b.job
            .metadata
            .creation_timestamp
            .cmp(&a.job.metadata.creation_timestamp)
            .then_with(|| b.job.name_any().cmp(&a.job.name_any()))
    });
    found
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
    let registry =
        match &project {
            Some(p) => registry(stores, p, &namespace).and_then(|r| {
                match crate::references::insecure_refused(&r.spec, ctx.allow_insecure_registries) {
                    Some(problem) => Err(problem),
                    None => Ok(r),
                }
            }),
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
                BuilderKind::ClusterBuilder => {
                    cached_with(&stores.cluster_builders, &builder, None, resource)
                }
                BuilderKind::Builder => cached_with(
                    &stores.builders,
                    &builder,
                    Some(&build_namespace_name(p)),
                    resource,
                ),
            };
            if found.is_some() {
                BuilderState::Present
            } else {
                BuilderState::NotFound
            }
        }
        _ => BuilderState::NotFound,
    };
    let mut certificates: Vec<_> = [format!("{name}-tls"), format!("{name}-gateway-tls")]
        .iter()
        .map(|cert| stores.certificates.get(cert, Some(&namespace)))
        .collect();
    if let Some(p) = &project {
        certificates.push(
            stores
                .certificates
                .get(&wildcard_certificate_name(&p.name_any()), Some(&namespace)),
        );
    }
    let missing_references = match &project {
        Some(p) => missing_references(p, env.spec.type_, |kind, name| match kind {
            "ConfigMap" => stores.config_map_metadata.contains(name, Some(&namespace)),
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
        deployment: stores.deployments.get(&name, Some(&namespace)),
        service: stores.services.get(&name, Some(&namespace)),
        ingress: stores.ingresses.get(&name, Some(&namespace)),
        image: build_ns
            .as_ref()
            .and_then(|bns| stores.images.get(&name, Some(bns))),
        legacy_image: stores.images.get(&name, Some(&namespace)),
        // A build namespace being deleted (its Project's earlier life) is
        // waited out: nothing can be made in it.
        build_namespace_exists: build_ns.as_ref().is_some_and(|bns| {
            stores
                .namespaces
                .get(bns, None)
                .is_some_and(|n| n.metadata.deletion_timestamp.is_none())
        }),
        certificates: certificates.into_iter().flatten().collect(),
        build_jobs: match (&build_ns, env.uid()) {
            (Some(bns), Some(uid)) => build_jobs(
                stores.jobs.state().into_iter().filter(|j| {
                    j.metadata.namespace.as_deref() == Some(bns.as_str())
                        && j.labels().get(ENVIRONMENT_UID_LABEL) == Some(&uid)
                }),
                |job| {
                    stores
                        .build_pods
                        .state()
                        .into_iter()
                        .filter(|p| {
                            p.metadata.namespace.as_deref() == Some(bns.as_str())
                                && p.labels()
                                    .get("batch.kubernetes.io/job-name")
                                    .map(String::as_str)
                                    == Some(job)
                        })
                        .collect()
                },
            ),
            _ => Vec::new(),
        },
        build_pods: ctx.build_pods.clone(),
        monitoring_installed: stores.installed.prometheus_operator,
        gateway_installed: stores.installed.gateway_api,
        cert_manager_installed: stores.installed.cert_manager,
        http_route: stores.http_routes.get(&name, Some(&namespace)),
        service_monitor: stores.service_monitors.get(&name, Some(&namespace)),
        missing_references,
        now: Time(crate::controllers::now()),
        environment: env,
    };
    debug_assert!(world.environment.meta().name.is_some());
    world
}

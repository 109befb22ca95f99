//! Step 2 of the Project reconcile: a pure function from what the caches
//! hold ([`ProjectWorld`]) to its namespace and access objects, registry
//! credentials, quota, host, production Environment and wildcard
//! Certificate, the children to delete, and the status.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::conditions::{
    DOMAIN_ALLOCATED, IMPLEMENTED, READY, SOURCE_REACHABLE, find_condition, is_condition_true,
    merge_conditions,
};
use kapsa_api::naming::PRODUCTION_ENVIRONMENT_NAME;
use kapsa_api::project::{EnvironmentSummary, ProjectStatus};
use kapsa_api::validation::RESERVED_NAMESPACES;
use kapsa_api::{Condition, ConditionStatus, DomainPool, Environment, Project, Routing};
use kube::{Resource, ResourceExt};

use super::dereference::{Credentials, ProjectWorld};
use crate::children::{Child, ChildKey, Deletion, Observed, prune};
use crate::controllers::transitions;
use crate::domains::{AllocationError, Landscape, allocate_host, choose_base_domain, select_pool};
use crate::resources::environment::{
    EnvironmentInputs, certificate_api_resource, environment_listener, environment_url,
    kpack_image_api_resource, listener_set, listener_set_api_resource, wildcard_certificate,
};
use crate::resources::project as build;
use crate::status::PlannedEvent;

use crate::controllers::RESYNC;

/// How soon a Project waiting for its old build namespace to go looks again.
pub const BUILD_NAMESPACE_RECHECK: Duration = Duration::from_secs(5);

/// What the Project reconcile does next.
#[derive(Clone, Debug)]
pub struct ProjectPlan {
    pub apply: Vec<Child>,
    pub delete: Vec<Deletion>,
    /// The children as the caches showed them (computed once: the apply
    /// step compares with them).
    pub observed: Vec<Observed>,
    pub status: ProjectStatus,
    pub events: Vec<PlannedEvent>,
    pub requeue: Duration,
}

pub fn plan(world: &ProjectWorld) -> ProjectPlan {
    let mut plan = plan_steps(world);
    let before = world.project.status.clone().unwrap_or_default();
    let polled_at = world.poll.as_ref().and_then(|p| p.polled_at.clone());
    stamp_poll_time(&mut plan.status, &before, polled_at);
    plan
}

/// `lastPollTime` is written with the status, never on its own: when the
/// status changes anyway it takes the time of the last poll; a poll that
/// changes nothing writes nothing (no writes at rest).
fn stamp_poll_time(status: &mut ProjectStatus, before: &ProjectStatus, polled_at: Option<Time>) {
    if status != before
        && let Some(polled_at) = polled_at
    {
        status.last_poll_time = Some(polled_at);
    }
}

fn plan_steps(world: &ProjectWorld) -> ProjectPlan {
    let project = world.project.as_ref();
    let generation = project.meta().generation;
    let namespace = build::namespace_name(project);
    let before = project.status.clone().unwrap_or_default();
    let mut status = ProjectStatus {
        observed_generation: generation,
        ..before.clone()
    };
    let now = &world.now;
    let condition = |type_: &str, status: ConditionStatus, reason: &str, message: String| {
        Condition::new(type_, status, reason, message, generation, now.clone())
    };
    let implemented = implemented_condition(project, &condition);

    // The namespace must be free or already this Project's. Refused, the
    // Project touches nothing and reads nothing of it.
    if let Some((reason, message)) = namespace_problem(world, &namespace) {
        merge_conditions(
            &mut status.conditions,
            [
                condition(
                    SOURCE_REACHABLE,
                    ConditionStatus::Unknown,
                    "NotPolled",
                    "not polled: the Project was refused its namespace, so none of its Secrets are read".into(),
                ),
                condition(READY, ConditionStatus::False, reason, message),
                implemented,
            ],
        );
        status.namespace = None;
        return ProjectPlan {
            apply: Vec::new(),
            delete: Vec::new(),
            observed: Vec::new(),
            events: events(project, &before, &status),
            status,
            requeue: Duration::from_secs(60),
        };
    }
    status.namespace = Some(namespace.clone());

    // The namespace enforces the Pod Security Standard of the Project's pool,
    // or the operator's default.
    let pools: Vec<DomainPool> = world.pools.iter().map(|p| (**p).clone()).collect();
    let level = build::pod_security_level(
        select_pool(project, &pools).ok(),
        world.pod_security_default,
    );
    // Rootless BuildKit needs what only `privileged` allows (an unconfined
    // seccomp profile, setuid newuidmap): the build namespace of a
    // Dockerfile Project enforces that level. No tenant is bound there.
    let build_level =
        if project.spec.build.strategy == kapsa_api::project::BuildStrategy::Dockerfile {
            kapsa_api::domain_pool::PodSecurityLevel::Privileged
        } else {
            level
        };
    let mut apply = vec![
        Child::typed(&build::namespace_with_pod_security(project, level)),
        Child::typed(&build::build_namespace(project, build_level)),
    ];
    let mut keep: Vec<ChildKey> = Vec::new();
    let observed = world.observed();

    // Registry credentials: the push credentials are copied into the build
    // namespace only, the pull-only credentials into the project namespace.
    // Without a usable registry an existing copy is kept (builds and
    // running pods may need it); a registry that names none has no copy.
    let registry_problem = match (&world.registry, &world.credentials, &world.pull_credentials) {
        (Err(problem), _, _)
        | (Ok(_), Credentials::Unusable(problem), _)
        | (Ok(_), _, Credentials::Unusable(problem)) => Some(problem.clone()),
        _ => None,
    };
    let mut copy = |credentials: &Credentials,
                    existing: Option<&Secret>,
                    make: fn(&Project, &Secret) -> Secret,
                    keep_unusable: bool|
     -> bool {
        match credentials {
            Credentials::Fetched(source) => {
                apply.push(Child::typed(&make(project, source)));
                true
            }
            Credentials::Current => existing.is_some_and(|copy| {
                keep.push(Observed::typed(copy).key);
                true
            }),
            Credentials::Unusable(_) if keep_unusable => existing.is_some_and(|copy| {
                keep.push(Observed::typed(copy).key);
                true
            }),
            Credentials::Unusable(_) | Credentials::None => false,
        }
    };
    let has_push = copy(
        &world.credentials,
        world.push_secret.as_deref(),
        build::push_secret,
        true,
    );
    // A copy of the push credentials in the project namespace (made by an
    // older Kapsa) is never kept there.
    let pull_copy = world
        .registry_secret
        .as_deref()
        .filter(|copy| !build::copied_from(copy, world.push_source_uid.as_deref()));
    let has_pull = copy(&world.pull_credentials, pull_copy, build::pull_secret, true);
    // Git credentials the Project no longer names, or that are gone, are
    // not kept (the poller reports the problem).
    let has_git = copy(
        &world.git_credentials,
        world.git_secret.as_deref(),
        build::git_secret,
        false,
    );
    apply.push(Child::typed(&build::builder_service_account(
        project, has_push, has_git,
    )));
    apply.push(Child::typed(&build::runtime_service_account(
        project, has_pull,
    )));
    apply.push(Child::typed(&build::builder_role(
        project, has_push, has_git,
    )));
    apply.push(Child::typed(&build::builder_role_binding(project)));
    // The build namespace's kpack Images stay while their Environment does.
    let live: std::collections::BTreeSet<String> =
        world.environments.iter().filter_map(|e| e.uid()).collect();
    keep.extend(
        world
            .build_images
            .iter()
            .filter(|i| {
                i.labels()
                    .get(crate::resources::environment::ENVIRONMENT_UID_LABEL)
                    .is_some_and(|uid| live.contains(uid))
            })
            .map(|i| Observed::of(&kpack_image_api_resource(), i.as_ref()).key),
    );
    // So do the build Jobs (the Environment prunes its own history).
    keep.extend(
        world
            .build_jobs
            .iter()
            .filter(|j| {
                j.labels()
                    .get(crate::resources::environment::ENVIRONMENT_UID_LABEL)
                    .is_some_and(|uid| live.contains(uid))
            })
            .map(|j| Observed::typed(j.as_ref()).key),
    );
    if let Some(quota) = build::resource_quota(project) {
        apply.push(Child::typed(&quota));
    }

    // Host allocation.
    let others: Vec<&Project> = world.others.iter().map(|p| p.as_ref()).collect();
    let allocation = select_pool(project, &pools).and_then(|pool| {
        let base = choose_base_domain(pool, before.base_domain.as_deref(), &others)
            .ok_or(AllocationError::NoDefaultPool)?;
        let landscape = Landscape {
            bases: pools.iter().flat_map(|p| p.spec.domains.clone()).collect(),
            reserving_pool: pool
                .spec
                .reserved_names
                .contains(&project.name_any())
                .then(|| pool.name_any()),
            foreign_hosts: world.foreign_hosts.clone(),
        };
        let host = allocate_host(project, &base, &others, &landscape)?;
        Ok((pool.clone(), base, host))
    });
    // The pool and base the Project serves from after this reconcile.
    let mut serving_from: Option<(DomainPool, String)> = None;
    let domain_condition = match &allocation {
        Ok((pool, base, host)) => {
            status.domain_pool = Some(pool.name_any());
            status.base_domain = Some(base.clone());
            status.host = Some(host.clone());
            serving_from = Some((pool.clone(), base.clone()));
            condition(
                DOMAIN_ALLOCATED,
                ConditionStatus::True,
                "Allocated",
                format!("{host} from DomainPool {}", pool.name_any()),
            )
        }
        Err(problem) => {
            // A conflict never takes a host away from its holder, and this
            // Project gets none. A bad pool reference keeps the host while
            // the pool it came from still lists its base; a removed pool or
            // base takes it away.
            let still_listed = pools.iter().find(|p| {
                Some(p.name_any()) == before.domain_pool
                    && before
                        .base_domain
                        .as_ref()
                        .is_some_and(|b| p.spec.domains.contains(b))
            });
            let loses_host = matches!(
                problem,
                AllocationError::HostConflict { .. }
                    | AllocationError::HostIsBase { .. }
                    | AllocationError::HostReserved { .. }
                    | AllocationError::HostInUse { .. }
            );
            match still_listed {
                Some(pool) if !loses_host => {
                    serving_from = before.base_domain.clone().map(|b| (pool.clone(), b));
                }
                _ => {
                    status.host = None;
                    status.base_domain = None;
                    status.domain_pool = None;
                }
            }
            condition(
                DOMAIN_ALLOCATED,
                ConditionStatus::False,
                problem.reason(),
                problem.to_string(),
            )
        }
    };

    // The production branch's head, from the poller.
    let branch = &project.spec.source.git.branch;
    let production = world
        .environments
        .iter()
        .find(|e| e.name_any() == PRODUCTION_ENVIRONMENT_NAME);
    let polled_head = world
        .poll
        .as_ref()
        .and_then(|p| p.branches.as_ref())
        .and_then(|b| b.get(branch))
        .cloned();
    let commit = polled_head
        .clone()
        .or_else(|| production.and_then(|e| e.spec.commit.clone()));
    let source_condition = match &world.poll {
        // Not polled yet since this operator started: what the status says stands.
        None => find_condition(&before.conditions, SOURCE_REACHABLE)
            .cloned()
            .unwrap_or_else(|| {
                condition(
                    SOURCE_REACHABLE,
                    ConditionStatus::Unknown,
                    "Polling",
                    "the repository has not been polled yet".into(),
                )
            }),
        Some(p) if p.branches.is_none() || p.error.is_some() => condition(
            SOURCE_REACHABLE,
            ConditionStatus::False,
            p.reason.unwrap_or("Unreachable"),
            format!(
                "{} (failed {} time(s) in a row; running environments are kept)",
                p.error.clone().unwrap_or_default(),
                p.consecutive_failures
            ),
        ),
        Some(_) if polled_head.is_none() => condition(
            SOURCE_REACHABLE,
            ConditionStatus::False,
            "BranchNotFound",
            format!("the repository has no branch {branch:?}"),
        ),
        Some(_) => condition(
            SOURCE_REACHABLE,
            ConditionStatus::True,
            "Reachable",
            format!("{branch} is at {}", commit.clone().unwrap_or_default()),
        ),
    };
    status.latest_commit = commit.clone().or(status.latest_commit);
    // A new production Environment is made once the branch's head is known
    // and the host and pool it reads from this status have been written
    // (the cached status already holds them): made earlier, it would write
    // its status over and over (waiting for a commit, then for a host)
    // before its first build. One that exists is always kept.
    let planned_production = (production.is_some()
        || (commit.is_some()
            && before.observed_generation.is_some()
            && before.domain_pool == status.domain_pool))
        .then(|| build::production_environment(project, commit.as_deref(), status.host.as_deref()));
    apply.extend(planned_production.iter().map(Child::typed));

    // Previews: one Environment per qualifying branch.
    let previews = super::previews::plan_previews(&super::previews::PreviewInputs {
        project,
        poll: world.poll.as_ref(),
        environments: &world.environments,
        before: &before,
        base_domain: serving_from.as_ref().map(|(_, base)| base.as_str()),
        now,
    });
    apply.extend(previews.apply.iter().map(Child::typed));
    keep.extend(previews.keep.iter().cloned());
    status.preview_count = project
        .spec
        .preview_environments
        .enabled
        .then(|| i32::try_from(previews.previews.len()).unwrap_or(i32::MAX));
    status.previews = previews.previews.clone();
    status.previews_left_out = previews.left_out.clone();

    // DNS01 pools: one wildcard certificate per project, shared by its environments.
    if let Some((pool, base)) = &serving_from
        && let Some(cert) = wildcard_certificate(project, &namespace, pool, base)
    {
        apply.push(Child::dynamic(certificate_api_resource(), cert));
    }
    // Gateway pools: the Project's listeners on the shared Gateway, for its
    // Environments' hosts (production first).
    if let Some((pool, base)) = &serving_from
        && pool.spec.routing == Routing::Gateway
    {
        if world.gateway_installed {
            let mut environments: Vec<&Environment> =
                world.environments.iter().map(AsRef::as_ref).collect();
            environments
                .sort_by_key(|e| (e.name_any() != PRODUCTION_ENVIRONMENT_NAME, e.name_any()));
            let listeners = environments.into_iter().filter_map(|environment| {
                environment_listener(&EnvironmentInputs {
                    project,
                    environment,
                    pool: Some(pool),
                    base_domain: Some(base),
                })
            });
            if let Some(set) = listener_set(project, &namespace, pool, base, listeners) {
                apply.push(Child::dynamic(listener_set_api_resource(), set));
            }
        } else {
            // Nothing replaces what routes now.
            keep.extend(
                world
                    .listener_set
                    .as_deref()
                    .map(|l| Observed::of(&listener_set_api_resource(), l).key),
            );
        }
    }

    // Aggregate the environments, with the production Environment this
    // reconcile makes (not Ready yet), so that its appearance costs no
    // status write of its own. The URL is where each serves, or will once
    // deployed: it does not change on the way to Ready.
    let url_of = |environment: &Environment| {
        let st = environment.status.as_ref();
        serving_from
            .as_ref()
            .and_then(|(pool, base)| {
                environment_url(&EnvironmentInputs {
                    project,
                    environment,
                    pool: Some(pool),
                    base_domain: Some(base),
                })
            })
            .or_else(|| st.and_then(|s| s.url.clone()))
    };
    let made_now = planned_production.as_ref().filter(|_| production.is_none());
    let mut environments: Vec<EnvironmentSummary> = world
        .environments
        .iter()
        .map(AsRef::as_ref)
        .chain(made_now)
        .map(|e| {
            let st = e.status.clone().unwrap_or_default();
            let name = e.name_any();
            let ready = is_condition_true(&st.conditions, READY);
            // The commit it serves as of when it was last Ready: a rollout
            // on its way (deployed, its certificate not issued yet) is no
            // status write of the Project's; its Ready is.
            let commit = if ready {
                st.commit.clone()
            } else {
                before
                    .environments
                    .iter()
                    .find(|s| s.name == name)
                    .and_then(|s| s.commit.clone())
            };
            EnvironmentSummary {
                name,
                type_: Some(e.spec.type_),
                branch: e.spec.branch.clone(),
                commit,
                url: url_of(e),
                ready,
            }
        })
        .collect();
    environments.sort_by(|a, b| a.name.cmp(&b.name));
    let production = environments
        .iter()
        .find(|e| e.name == PRODUCTION_ENVIRONMENT_NAME && e.ready);
    let production_ready = production.is_some();
    let serves = match production.and_then(|e| e.url.as_deref()) {
        Some(url) => format!("the production environment serves at {url}"),
        None => "the production environment serves".into(),
    };
    status.environments = environments;

    let ready = match (&registry_problem, &allocation) {
        (Some(problem), _) => condition(
            READY,
            ConditionStatus::False,
            problem.reason,
            problem.message.clone(),
        ),
        (_, Err(problem)) => condition(
            READY,
            ConditionStatus::False,
            problem.reason(),
            problem.to_string(),
        ),
        _ if production_ready => condition(READY, ConditionStatus::True, "ProductionReady", serves),
        _ => condition(
            READY,
            ConditionStatus::False,
            "ProductionNotReady",
            "the production environment is not ready yet".into(),
        ),
    };
    merge_conditions(
        &mut status.conditions,
        [domain_condition, source_condition, implemented, ready],
    );
    // A build namespace being deleted (left by an earlier Project of this
    // name) is waited out: nothing can be made in it, and what is in it goes
    // with it. The Project comes back when it is gone.
    let build_namespace = build::build_namespace_name(project);
    let build_namespace_terminating = world
        .build_namespace
        .as_ref()
        .is_some_and(|n| n.metadata.deletion_timestamp.is_some());
    if build_namespace_terminating {
        let inside = |key: &ChildKey| {
            key.namespace.as_deref() == Some(build_namespace.as_str())
                || (key.kind == "/Namespace" && key.name == build_namespace)
        };
        apply.retain(|child| !inside(&child.key()));
        keep.extend(observed.iter().map(|o| o.key.clone()).filter(inside));
    }
    let delete = prune(&observed, &apply, &keep, &project.uid().unwrap_or_default());
    let mut events = events(project, &before, &status);
    events.extend(previews.events);
    ProjectPlan {
        apply,
        delete,
        observed,
        events,
        status,
        requeue: if build_namespace_terminating {
            BUILD_NAMESPACE_RECHECK
        } else {
            previews.wake.map_or(RESYNC, |wake| wake.min(RESYNC))
        },
    }
}

fn events(project: &Project, before: &ProjectStatus, after: &ProjectStatus) -> Vec<PlannedEvent> {
    let mut events = transitions(
        &before.conditions,
        &after.conditions,
        &[READY, DOMAIN_ALLOCATED, SOURCE_REACHABLE, IMPLEMENTED],
    );
    // The first commit seen is not a new one: the production
    // Environment's BuildStarted announces it.
    if before.latest_commit.is_some()
        && before.latest_commit != after.latest_commit
        && let Some(commit) = &after.latest_commit
    {
        events.push(PlannedEvent::normal(
            "NewCommit",
            format!("{} is at {commit}", project.spec.source.git.branch),
        ));
    }
    events
}

/// Fields the API accepts that this version does not act on yet.
pub fn not_implemented(project: &Project) -> Vec<&'static str> {
    let _ = project;
    Vec::new()
}

fn implemented_condition(
    project: &Project,
    condition: &dyn Fn(&str, ConditionStatus, &str, String) -> Condition,
) -> Condition {
    let missing = not_implemented(project);
    if missing.is_empty() {
        condition(
            IMPLEMENTED,
            ConditionStatus::True,
            "AllImplemented",
            "every field set is acted on".into(),
        )
    } else {
        condition(
            IMPLEMENTED,
            ConditionStatus::False,
            "NotImplemented",
            format!(
                "accepted but not acted on by this version of Kapsa yet: {}",
                missing.join("; ")
            ),
        )
    }
}

/// Why the Project may not use its namespace, if it may not. (Also asked by
/// the dereference step: a refused Project reads no Secret there.)
pub(crate) fn namespace_problem(
    world: &ProjectWorld,
    namespace: &str,
) -> Option<(&'static str, String)> {
    let project = world.project.as_ref();
    refused_namespace(
        project,
        namespace,
        world.others.iter().map(|p| p.as_ref()),
        world.namespace.as_deref(),
    )
    .or_else(|| {
        let build_ns = world.build_namespace.as_deref()?;
        (!build::namespace_belongs_to(build_ns, project)).then(|| {
            (
                "BuildNamespaceConflict",
                format!(
                    "namespace {:?}, where this Project's builds run, exists and is not this Project's; Kapsa never takes over a namespace",
                    build_ns.name_any()
                ),
            )
        })
    })
}

/// Why `project` may not use `namespace`: reserved for the system, named
/// first by another Project (of `others`), or existing (`existing`) and not
/// this Project's. Kapsa never takes over a namespace, and reads no Secret of
/// one it was refused.
pub fn refused_namespace<'a>(
    project: &Project,
    namespace: &str,
    mut others: impl Iterator<Item = &'a Project>,
    existing: Option<&impl Resource>,
) -> Option<(&'static str, String)> {
    if RESERVED_NAMESPACES.contains(&namespace)
        || namespace.starts_with("kube-")
        || namespace.starts_with(kapsa_api::naming::BUILD_NAMESPACE_PREFIX)
    {
        return Some((
            "NamespaceForbidden",
            format!("namespace {namespace:?} is reserved for the system"),
        ));
    }
    // Another Project that names the same namespace and came first keeps it.
    // Compared in place: this runs over every Project, for every reconcile
    // and every poll.
    let name = project.metadata.name.as_deref();
    let rival = others.find(|other| {
        other.metadata.name.as_deref() != name
            && build::namespace_of(other) == namespace
            && (other.creation_timestamp(), other.name_any())
                < (project.creation_timestamp(), project.name_any())
    });
    if let Some(rival) = rival {
        return Some((
            "NamespaceConflict",
            format!(
                "namespace {namespace:?} belongs to Project {:?}",
                rival.name_any()
            ),
        ));
    }
    match existing {
        Some(ns) if !build::namespace_belongs_to(ns, project) => Some((
            "NamespaceConflict",
            format!(
                "namespace {namespace:?} exists and does not belong to this Project; Kapsa never takes over a namespace"
            ),
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests;

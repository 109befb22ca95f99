//! Project reconciler: namespace, service accounts and RBAC, registry
//! credentials, quota, host allocation and the production Environment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kapsa_api::conditions::{DOMAIN_ALLOCATED, READY, SOURCE_REACHABLE, merge_conditions};
use kapsa_api::naming::PRODUCTION_ENVIRONMENT_NAME;
use kapsa_api::project::{EnvironmentSummary, ProjectStatus};
use kapsa_api::validation::RESERVED_NAMESPACES;
use kapsa_api::{ConditionStatus, DomainPool, Project};
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::{condition, transition};
use crate::context::{Context, cached, cached_with};
use crate::domains::{allocate_host, choose_base_domain, select_pool};
use crate::error::{Error, Result};
use crate::references::resolve_registry;
use crate::resources::environment::{certificate_api_resource, wildcard_certificate};
use crate::resources::project as build;

/// A safety-net resync: reads only, writes nothing when nothing changed.
const RESYNC: Duration = Duration::from_secs(600);

pub async fn reconcile(project: Arc<Project>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.stores.ready() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    tracing::debug!(project = %project.name_any(), "reconciling");
    let started = Instant::now();
    let result = reconcile_project(&project, &ctx).await;
    ctx.metrics
        .record_reconcile("project", result.is_ok(), started.elapsed());
    result
}

pub fn error_policy(project: Arc<Project>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(project = %project.name_any(), %error, "project reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_project(project: &Project, ctx: &Context) -> Result<Action> {
    if project.meta().deletion_timestamp.is_some() {
        // The garbage collector removes the namespace and everything in it.
        return Ok(Action::await_change());
    }
    let name = project.name_any();
    let generation = project.meta().generation;
    let namespace = build::namespace_name(project);
    let before = project.status.clone().unwrap_or_default();
    let mut status = ProjectStatus {
        observed_generation: generation,
        ..before.clone()
    };

    // Validate: the namespace must be free or already this Project's.
    let existing_ns = Api::<Namespace>::all(ctx.client.clone())
        .get_opt(&namespace)
        .await?;
    if let Some(problem) = namespace_problem(project, &namespace, existing_ns.as_ref(), ctx) {
        merge_conditions(
            &mut status.conditions,
            [condition(
                READY,
                ConditionStatus::False,
                problem.0,
                problem.1,
                generation,
            )],
        );
        status.namespace = None;
        finish(project, ctx, &before, status).await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    }
    status.namespace = Some(namespace.clone());

    // Apply the namespace and its access objects.
    ctx.applier
        .apply(&build::namespace(project), existing_ns.as_ref())
        .await?;

    let registry = resolve_registry(&ctx.client, project, &namespace).await?;
    let registry_secret = match &registry {
        Ok(r) => r
            .credentials
            .as_ref()
            .map(|s| build::registry_secret(project, s)),
        Err(_) => None,
    };
    // Without a usable registry the existing copy is kept: running pods may need it to pull.
    let has_registry_secret = registry_secret.is_some()
        || cached(
            &ctx.stores.secrets,
            build::REGISTRY_SECRET,
            Some(&namespace),
        )
        .is_some();
    if let Some(secret) = &registry_secret {
        let current = cached(
            &ctx.stores.secrets,
            build::REGISTRY_SECRET,
            Some(&namespace),
        );
        ctx.applier.apply(secret, current.as_deref()).await?;
    }
    let builder_sa = build::builder_service_account(project, has_registry_secret);
    let runtime_sa = build::runtime_service_account(project, has_registry_secret);
    for sa in [&builder_sa, &runtime_sa] {
        let current = cached(
            &ctx.stores.service_accounts,
            &sa.name_any(),
            Some(&namespace),
        );
        ctx.applier.apply(sa, current.as_deref()).await?;
    }
    let role = build::builder_role(project, has_registry_secret);
    ctx.applier
        .apply(
            &role,
            cached(&ctx.stores.roles, build::BUILDER_ROLE, Some(&namespace)).as_deref(),
        )
        .await?;
    let binding = build::builder_role_binding(project);
    ctx.applier
        .apply(
            &binding,
            cached(
                &ctx.stores.role_bindings,
                build::BUILDER_ROLE,
                Some(&namespace),
            )
            .as_deref(),
        )
        .await?;
    let current_quota = cached(&ctx.stores.quotas, build::RESOURCE_QUOTA, Some(&namespace));
    match (build::resource_quota(project), current_quota) {
        (Some(quota), current) => {
            ctx.applier.apply(&quota, current.as_deref()).await?;
        }
        (None, Some(_)) => {
            Api::<k8s_openapi::api::core::v1::ResourceQuota>::namespaced(
                ctx.client.clone(),
                &namespace,
            )
            .delete(build::RESOURCE_QUOTA, &DeleteParams::default())
            .await?;
            ctx.metrics.record_write("ResourceQuota");
        }
        (None, None) => {}
    }

    // Host allocation.
    let pools: Vec<DomainPool> = ctx
        .stores
        .pools
        .state()
        .iter()
        .map(|p| (**p).clone())
        .collect();
    let all_projects = ctx.stores.projects.state();
    let others: Vec<&Project> = all_projects
        .iter()
        .map(|p| p.as_ref())
        .filter(|p| p.name_any() != name)
        .collect();
    let allocation = select_pool(project, &pools).and_then(|pool| {
        let base = choose_base_domain(pool, before.base_domain.as_deref(), &others)
            .ok_or(crate::domains::AllocationError::NoDefaultPool)?;
        let host = allocate_host(project, &base, &others)?;
        Ok((pool.clone(), base, host))
    });
    let domain_condition = match &allocation {
        Ok((pool, base, host)) => {
            status.domain_pool = Some(pool.name_any());
            status.base_domain = Some(base.clone());
            status.host = Some(host.clone());
            condition(
                DOMAIN_ALLOCATED,
                ConditionStatus::True,
                "Allocated",
                format!("{host} from DomainPool {}", pool.name_any()),
                generation,
            )
        }
        Err(problem) => {
            // A conflict never takes a host away from its holder, and this
            // Project gets none; a missing pool keeps an allocated host.
            if matches!(
                problem,
                crate::domains::AllocationError::HostConflict { .. }
            ) {
                status.host = None;
                status.base_domain = None;
            }
            condition(
                DOMAIN_ALLOCATED,
                ConditionStatus::False,
                problem.reason(),
                problem.to_string(),
                generation,
            )
        }
    };
    let host = status.host.clone();

    // The production branch's head, from the poller.
    let branch = &project.spec.source.git.branch;
    let poll = ctx.git.get(&name);
    let production = cached(
        &ctx.stores.environments,
        PRODUCTION_ENVIRONMENT_NAME,
        Some(&namespace),
    );
    let polled_head = poll
        .as_ref()
        .and_then(|p| p.branches.as_ref())
        .and_then(|b| b.get(branch))
        .cloned();
    let commit = polled_head
        .clone()
        .or_else(|| production.as_ref().and_then(|e| e.spec.commit.clone()));
    let source_condition = match &poll {
        // Not polled yet since this operator started: what the status says stands.
        None => kapsa_api::conditions::find_condition(&before.conditions, SOURCE_REACHABLE)
            .cloned()
            .unwrap_or_else(|| {
                condition(
                    SOURCE_REACHABLE,
                    ConditionStatus::Unknown,
                    "Polling",
                    "the repository has not been polled yet",
                    generation,
                )
            }),
        Some(p) if p.branches.is_none() || p.error.is_some() => condition(
            SOURCE_REACHABLE,
            ConditionStatus::False,
            "Unreachable",
            format!(
                "{} (failed {} time(s) in a row; running environments are kept)",
                p.error.clone().unwrap_or_default(),
                p.consecutive_failures
            ),
            generation,
        ),
        Some(_) if polled_head.is_none() => condition(
            SOURCE_REACHABLE,
            ConditionStatus::False,
            "BranchNotFound",
            format!("the repository has no branch {branch:?}"),
            generation,
        ),
        Some(_) => condition(
            SOURCE_REACHABLE,
            ConditionStatus::True,
            "Reachable",
            format!("{branch} is at {}", commit.clone().unwrap_or_default()),
            generation,
        ),
    };
    status.latest_commit = commit.clone().or(status.latest_commit);

    let env = build::production_environment(project, commit.as_deref(), host.as_deref());
    ctx.applier.apply(&env, production.as_deref()).await?;

    // DNS01 pools: one wildcard certificate per project, shared by its environments.
    if let Ok((pool, base, _)) = &allocation
        && let Some(cert) = wildcard_certificate(project, &namespace, pool, base)
    {
        let current = cached_with(
            &ctx.stores.certificates,
            &cert.name_any(),
            Some(&namespace),
            certificate_api_resource(),
        );
        ctx.applier
            .apply_dynamic(&certificate_api_resource(), &cert, current.as_deref())
            .await?;
    }

    // Aggregate the environments.
    let mut environments: Vec<EnvironmentSummary> = ctx
        .stores
        .environments
        .state()
        .iter()
        .filter(|e| e.namespace().as_deref() == Some(namespace.as_str()) && e.spec.project == name)
        .map(|e| {
            let st = e.status.clone().unwrap_or_default();
            EnvironmentSummary {
                name: e.name_any(),
                type_: Some(e.spec.type_),
                branch: e.spec.branch.clone(),
                commit: st.commit.clone(),
                url: st.url.clone(),
                ready: kapsa_api::conditions::is_condition_true(&st.conditions, READY),
            }
        })
        .collect();
    environments.sort_by(|a, b| a.name.cmp(&b.name));
    let production_ready = environments
        .iter()
        .any(|e| e.name == PRODUCTION_ENVIRONMENT_NAME && e.ready);
    status.environments = environments;

    let ready = match (&registry, &allocation) {
        (Err(problem), _) => condition(
            READY,
            ConditionStatus::False,
            problem.reason,
            problem.message.clone(),
            generation,
        ),
        (_, Err(problem)) => condition(
            READY,
            ConditionStatus::False,
            problem.reason(),
            problem.to_string(),
            generation,
        ),
        _ if production_ready => condition(
            READY,
            ConditionStatus::True,
            "ProductionReady",
            "the production environment serves",
            generation,
        ),
        _ => condition(
            READY,
            ConditionStatus::False,
            "ProductionNotReady",
            "the production environment is not ready yet",
            generation,
        ),
    };
    merge_conditions(
        &mut status.conditions,
        [domain_condition, source_condition, ready],
    );
    finish(project, ctx, &before, status).await?;
    Ok(Action::requeue(RESYNC))
}

/// Why the Project may not use its namespace, if it may not.
fn namespace_problem(
    project: &Project,
    namespace: &str,
    existing: Option<&Namespace>,
    ctx: &Context,
) -> Option<(&'static str, String)> {
    if RESERVED_NAMESPACES.contains(&namespace) || namespace.starts_with("kube-") {
        return Some((
            "NamespaceForbidden",
            format!("namespace {namespace:?} is reserved for the system"),
        ));
    }
    // Another Project that names the same namespace and came first keeps it.
    let rival = ctx.stores.projects.state().into_iter().find(|other| {
        other.name_any() != project.name_any()
            && build::namespace_name(other) == namespace
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

/// Writes the status if it changed, with Events for the transitions.
async fn finish(
    project: &Project,
    ctx: &Context,
    before: &ProjectStatus,
    after: ProjectStatus,
) -> Result<()> {
    if *before == after {
        return Ok(());
    }
    // Events only for what was written: a reconcile on a cache that has not
    // seen Kapsa's last status yet must not announce the same thing again.
    if !ctx
        .applier
        .apply_status(project, &serde_json::to_value(&after)?)
        .await?
    {
        return Ok(());
    }
    for type_ in [READY, DOMAIN_ALLOCATED, SOURCE_REACHABLE] {
        if let Some((warning, c)) = transition(&before.conditions, &after.conditions, type_) {
            ctx.event(project, warning, &c.reason, c.message.clone())
                .await;
        }
    }
    if before.latest_commit != after.latest_commit
        && let Some(commit) = &after.latest_commit
    {
        ctx.event(
            project,
            false,
            "NewCommit",
            format!("{} is at {commit}", project.spec.source.git.branch),
        )
        .await;
    }
    Ok(())
}

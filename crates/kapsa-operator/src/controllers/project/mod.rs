//! Project reconciler: namespace, service accounts and RBAC, registry
//! credentials, quota, host allocation and the production Environment.

pub mod dereference;
pub mod plan;
pub mod previews;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kapsa_api::Project;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use crate::context::Context;
use crate::error::{Error, Result};

fn key(project: &Project) -> String {
    format!("project/{}", project.name_any())
}

#[tracing::instrument(skip_all, fields(project = %project.name_any()))]
pub async fn reconcile(project: Arc<Project>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.stores.ready() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let started = Instant::now();
    let result = reconcile_project(project.clone(), &ctx).await;
    ctx.metrics
        .record_reconcile("project", result.is_ok(), started.elapsed());
    if result.is_ok() {
        super::on_success(&ctx, &key(&project));
    }
    result
}

pub fn error_policy(project: Arc<Project>, error: &Error, ctx: Arc<Context>) -> Action {
    super::on_error(&ctx, "project", key(&project), error)
}

async fn reconcile_project(project: Arc<Project>, ctx: &Context) -> Result<Action> {
    if project.meta().deletion_timestamp.is_some() {
        // The garbage collector removes the namespace and everything in it.
        return Ok(Action::await_change());
    }
    // Never plan from a copy older than Kapsa's own last status write: the
    // watch event of that write is on its way and triggers the next reconcile.
    if ctx.applier.status_behind(project.as_ref()) {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    // 1. Dereference (caches; the registry Secret's data only when it changed).
    let world = dereference::dereference(project.clone(), ctx).await?;
    // 2. Plan (pure).
    let plan = plan::plan(&world);
    tracing::debug!(
        apply = plan.apply.len(),
        delete = plan.delete.len(),
        "planned"
    );
    // 3. Apply and prune.
    let refused =
        super::apply_and_prune(ctx, &plan.apply, &plan.observed, &plan.delete, None).await?;
    // 4. Status: one write, only on change.
    let before = project.status.clone().unwrap_or_default();
    let (mut status, mut events) = (plan.status, plan.events);
    super::record_refusals(
        &refused,
        &before.conditions,
        &mut status.conditions,
        &mut events,
        project.meta().generation,
    );
    crate::status::update(ctx, project.as_ref(), &before, &status, &events).await?;
    let requeue = super::after_refusals(ctx, &key(project.as_ref()), &refused, plan.requeue);
    Ok(Action::requeue(requeue.min(ctx.resync_period)))
}

//! Environment reconciler: build (a kpack Image per Environment, or a fixed
//! image), then Deployment, Service and Ingress, then status. A failed build
//! or a missing reference never takes down the release that is serving.

pub mod dereference;
pub mod plan;

use std::sync::Arc;
use std::time::{Duration, Instant};

use kapsa_api::Environment;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use crate::context::Context;
use crate::error::{Error, Result};

pub use plan::HISTORY_LIMIT;

fn key(env: &Environment) -> String {
    format!(
        "environment/{}/{}",
        env.namespace().unwrap_or_default(),
        env.name_any()
    )
}

#[tracing::instrument(skip_all, fields(namespace = %env.namespace().unwrap_or_default(), environment = %env.name_any()))]
pub async fn reconcile(env: Arc<Environment>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.stores.ready() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    let started = Instant::now();
    let result = reconcile_environment(env.clone(), &ctx).await;
    ctx.metrics
        .record_reconcile("environment", result.is_ok(), started.elapsed());
    if result.is_ok() {
        super::on_success(&ctx, &key(&env));
    }
    result
}

pub fn error_policy(env: Arc<Environment>, error: &Error, ctx: Arc<Context>) -> Action {
    super::on_error(&ctx, "environment", key(&env), error)
}

async fn reconcile_environment(env: Arc<Environment>, ctx: &Context) -> Result<Action> {
    if env.meta().deletion_timestamp.is_some() {
        // The garbage collector removes the children.
        return Ok(Action::await_change());
    }
    // Never plan from a copy older than Kapsa's own last status write: the
    // watch event of that write is on its way and triggers the next reconcile.
    if ctx.applier.status_behind(env.as_ref()) {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    // 1. Dereference (caches only).
    let world = dereference::dereference(env.clone(), ctx);
    // 2. Plan (pure).
    let plan = plan::plan(&world);
    tracing::debug!(
        apply = plan.apply.len(),
        delete = plan.delete.len(),
        phase = ?plan.status.phase,
        built = kapsa_api::conditions::find_condition(&plan.status.conditions, kapsa_api::conditions::BUILT)
            .map(|c| c.reason.as_str())
            .unwrap_or_default(),
        commit = world.environment.spec.commit.as_deref().unwrap_or_default(),
        "planned"
    );
    // 3. Apply and prune. A new Service is created in the background (the
    // API server makes Services one at a time); if that fails, this
    // Environment is reconciled again to report it.
    let wake: crate::apply::Wake = {
        let environments = ctx.wake_environments.clone();
        let this = ObjectRef::from_obj(env.as_ref());
        Arc::new(move || {
            let _ = environments.send(this.clone());
        })
    };
    let refused =
        super::apply_and_prune(ctx, &plan.apply, &plan.observed, &plan.delete, Some(&wake)).await?;
    // 4. Status: one write, only on change.
    let before = env.status.clone().unwrap_or_default();
    let (mut status, mut events) = (plan.status, plan.events);
    super::record_refusals(
        &refused,
        &before.conditions,
        &mut status.conditions,
        &mut events,
        env.meta().generation,
    );
    if crate::status::update(ctx, env.as_ref(), &before, &status, &events).await? {
        // Builds are counted from the Built condition Kapsa just wrote: a
        // reconcile that writes nothing counts nothing.
        ctx.metrics
            .record_build_transition(&before.conditions, &status.conditions);
    }
    let requeue = super::after_refusals(ctx, &key(env.as_ref()), &refused, plan.requeue);
    Ok(Action::requeue(requeue.min(ctx.resync_period)))
}

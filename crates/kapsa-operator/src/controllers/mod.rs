//! One reconciler per resource. Each reconcile is a visible pipeline, one
//! module per step:
//!
//! 1. **dereference** (`<kind>/dereference.rs`): everything the plan needs,
//!    from the caches only;
//! 2. **plan** (`<kind>/plan.rs`): a pure function from those inputs to the
//!    children to apply, the children to delete, the status and the Events;
//! 3. **apply and prune** ([`crate::apply`]): server-side apply (field
//!    manager `kapsa`), each object written only if it changes, then delete
//!    what Kapsa owns and the plan no longer wants;
//! 4. **update status** ([`crate::status`]): one write, only on change.
//!
//! The platform objects (DomainPool, ClusterRegistry, Registry) own no
//! children: their reconcilers ([`platform`]) only plan and write status.

pub mod environment;
pub mod platform;
pub mod project;

/// The YAML fixture loader and checker of both plans' unit tests.
#[cfg(test)]
pub(crate) mod plan_fixtures;

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::conditions::APPLIED;
use kapsa_api::{Condition, ConditionStatus};
use kube::runtime::controller::Action;

use crate::apply::{Applier, Wake};
use crate::children::{Child, ChildKey, Deletion, Observed};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::status::PlannedEvent;

/// The safety-net resync of an object at rest (the default of
/// `--resync-period`): a reconcile that reads caches only and writes
/// nothing when nothing changed.
pub const RESYNC: Duration = Duration::from_secs(600);

/// The reconcilers' clock (a preview's TTL, condition times). With the
/// test-only feature `fault-injection`, `KAPSA_CLOCK_OFFSET` moves it
/// ([`crate::fault::clock_offset`]).
pub(crate) fn now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now() + crate::fault::clock_offset()
}

/// Transitions announced with a Normal Event: the milestones a person
/// follows. Every other transition to True is routine and only in the status
/// (a host allocated, for one: `status.host` and `DomainAllocated` say so,
/// and `ProductionReady` names the URL once it serves; failing to allocate
/// is a Warning).
const MILESTONES: [&str; 3] = ["ProductionReady", "RolledOut", "Pinned"];

/// Reasons of conditions that are False on the way to True (a new object,
/// a build or rollout under way): normal, and not worth an Event.
const PASSING_REASONS: [&str; 10] = [
    "NothingToDeploy",
    "NoClusterIssuer",
    "NoDomain",
    "NoHost",
    "NotServing",
    "CertificatePending",
    "ProductionNotReady",
    "WaitingForCommit",
    "Building",
    "RollingOut",
];

/// Events for the conditions of `types` whose change from `before` to
/// `after` is worth one: problems (False with a reason that is not a
/// passing state, as a Warning) and milestones.
pub(crate) fn transitions(
    before: &[Condition],
    after: &[Condition],
    types: &[&str],
) -> Vec<PlannedEvent> {
    let mut events: Vec<PlannedEvent> = Vec::new();
    let found = types.iter().filter_map(|type_| {
        let new = after.iter().find(|c| c.type_ == *type_)?;
        let old = before.iter().find(|c| c.type_ == *type_);
        if old.is_some_and(|old| old.status == new.status && old.reason == new.reason) {
            return None;
        }
        match new.status {
            ConditionStatus::False if !PASSING_REASONS.contains(&new.reason.as_str()) => {
                Some(PlannedEvent::warning(&new.reason, &new.message))
            }
            ConditionStatus::True if MILESTONES.contains(&new.reason.as_str()) => {
                Some(PlannedEvent::normal(&new.reason, &new.message))
            }
            _ => None,
        }
    });
    // One problem often shows in two conditions (DomainAllocated and Ready):
    // one Event.
    for event in found {
        if !events.contains(&event) {
            events.push(event);
        }
    }
    events
}

/// Step 3: applies what the plan wants (each object only if it changes
/// something), then deletes what it no longer wants.
///
/// The applies go in waves ([`apply_wave`]), each wave's at once: the
/// Namespaces, then what lives in them, then the RoleBindings (the API
/// server checks a binding against its Role, which must exist by then).
/// A reconcile thus waits for three round trips, not one per object.
///
/// With `wake`, a child the cache does not hold and that
/// [`Applier::creates_in_background`] names is created in a task of its own
/// ([`Applier::create_in_background`]); `wake` reconciles the owner again if
/// that creation fails.
pub(crate) async fn apply_and_prune(
    ctx: &Context,
    apply: &[Child],
    observed: &[Observed],
    delete: &[Deletion],
    wake: Option<&Wake>,
) -> Result<Vec<Refusal>> {
    // A child the API server refuses (a quota, an admission policy) does not
    // stop the others, nor the status that says so; anything else (the API
    // server unreachable, a conflict) fails the reconcile, to be retried,
    // once the wave it was in has been answered.
    let mut refused = Vec::new();
    for wave in 0..APPLY_WAVES {
        let applies =
            apply
                .iter()
                .filter(|child| apply_wave(child) == wave)
                .map(|child| async move {
                    let key = child.key();
                    let cached = observed.iter().find(|o| o.key == key);
                    let answer = match wake {
                        Some(wake) if cached.is_none() && Applier::creates_in_background(child) => {
                            ctx.applier.create_in_background(child, wake.clone()).await
                        }
                        _ => ctx.applier.apply(child, cached).await,
                    };
                    (key, cached.is_some(), answer)
                });
        let answers = futures::future::join_all(applies).await;
        let mut failed = None;
        for (key, cached, answer) in answers {
            match answer {
                Ok(wrote) => tracing::trace!(object = %key, wrote, cached, "apply step"),
                Err(error) => match refusal(&error) {
                    Some(message) => {
                        tracing::info!(object = %key, %message, "the API server refused it");
                        refused.push(Refusal { key, message });
                    }
                    None => {
                        failed.get_or_insert(error);
                    }
                },
            }
        }
        if let Some(error) = failed {
            return Err(error);
        }
    }
    // Pruning deletes only what the plan no longer wants; a refused child is
    // wanted, so its current version (if any) stays.
    let deleted = futures::future::join_all(
        delete
            .iter()
            .map(|d| async move { (d, ctx.applier.delete(d).await) }),
    )
    .await;
    let mut failed = None;
    for (deletion, answer) in deleted {
        match answer {
            Ok(true) => {
                tracing::info!(object = %deletion.key, "pruned: the plan no longer wants it")
            }
            Ok(false) => {}
            Err(error) => {
                failed.get_or_insert(error);
            }
        }
    }
    match failed {
        Some(error) => Err(error),
        None => Ok(refused),
    }
}

/// How many waves [`apply_and_prune`] applies in (an empty one costs
/// nothing).
const APPLY_WAVES: u8 = 3;

/// Which wave of [`apply_and_prune`] applies `child`: Namespaces first,
/// RoleBindings last, everything else in between.
fn apply_wave(child: &Child) -> u8 {
    match (child.resource.group.as_str(), child.resource.kind.as_str()) {
        ("", "Namespace") => 0,
        ("rbac.authorization.k8s.io", "RoleBinding" | "ClusterRoleBinding") => 2,
        _ => 1,
    }
}

/// A child the API server would not take.
#[derive(Clone, Debug)]
pub(crate) struct Refusal {
    pub key: ChildKey,
    /// The API server's message, bounded.
    pub message: String,
}

/// The API server's message when `error` is a refusal of the object itself
/// (400 Bad Request, 403 Forbidden — quotas and admission policies —, 422
/// Invalid), not a failure worth retrying at once.
fn refusal(error: &Error) -> Option<String> {
    match error {
        Error::Apply {
            source: kube::Error::Api(response),
            ..
        } if matches!(response.code, 400 | 403 | 422) => Some(crate::git::bounded(
            &response.message,
            crate::git::MAX_MESSAGE_BYTES,
        )),
        _ => None,
    }
}

/// The `Applied` condition after an apply step, and the Events of its
/// change: merged into `status_conditions`, Events added to `events`.
pub(crate) fn record_refusals(
    refused: &[Refusal],
    before: &[Condition],
    conditions: &mut Vec<Condition>,
    events: &mut Vec<PlannedEvent>,
    generation: Option<i64>,
) {
    let now = Time(now());
    let applied = if refused.is_empty() {
        Condition::new(
            APPLIED,
            ConditionStatus::True,
            "Applied",
            "the API server accepted every object",
            generation,
            now,
        )
    } else {
        let list: Vec<String> = refused
            .iter()
            .map(|r| format!("{}: {}", r.key, r.message))
            .collect();
        Condition::new(
            APPLIED,
            ConditionStatus::False,
            "Refused",
            crate::git::bounded(
                &format!("the API server refused {}", list.join("; ")),
                4 * crate::git::MAX_MESSAGE_BYTES,
            ),
            generation,
            now,
        )
    };
    kapsa_api::conditions::merge_conditions(conditions, [applied]);
    events.extend(transitions(before, conditions, &[APPLIED]));
}

/// Shortest and longest wait before retrying a failed reconcile.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// The wait after the `failures`-th failure in a row: 1 s, 2 s, 4 s, … up
/// to five minutes.
pub fn backoff(failures: u32) -> Duration {
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    (BACKOFF_MIN * factor).min(BACKOFF_MAX)
}

/// Records a failed reconcile of `key` and returns when to retry.
pub(crate) fn on_error(ctx: &Context, controller: &str, key: String, error: &Error) -> Action {
    ctx.metrics.record_failure(controller, error.reason());
    let failures = match ctx.failures.lock() {
        Ok(mut failures) => {
            let n = failures.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        Err(_) => 1,
    };
    let wait = backoff(failures);
    tracing::warn!(controller, object = %key, %error, failures, retry_in_s = wait.as_secs(), "reconcile failed; retrying");
    Action::requeue(wait)
}

/// Forgets the failures of `key` after a successful reconcile.
/// The longest wait before trying a refused object again.
const REFUSED_RETRY_MAX: Duration = Duration::from_secs(30);

/// When to look again after an apply step: `planned` when the API server
/// took everything; after a refusal sooner, backing off (1 s, 2 s, … 30 s)
/// while refusals go on — a quota whose usage is not computed yet refuses
/// for a moment, an admission policy until someone changes it, and nothing
/// tells Kapsa when that happens.
pub(crate) fn after_refusals(
    ctx: &Context,
    key: &str,
    refused: &[Refusal],
    planned: Duration,
) -> Duration {
    let key = format!("refused/{key}");
    let Ok(mut failures) = ctx.failures.lock() else {
        return planned;
    };
    if refused.is_empty() {
        failures.remove(&key);
        return planned;
    }
    let n = failures.entry(key).or_insert(0);
    *n = n.saturating_add(1);
    backoff(*n).min(REFUSED_RETRY_MAX).min(planned)
}

pub(crate) fn on_success(ctx: &Context, key: &str) {
    if let Ok(mut failures) = ctx.failures.lock()
        && !failures.is_empty()
    {
        failures.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(9), Duration::from_secs(256));
        assert_eq!(backoff(10), BACKOFF_MAX);
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }
}

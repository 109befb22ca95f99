//! One reconciler per resource. Each reconcile is a visible pipeline:
//! dereference → validate → build (pure, in `crate::resources`) → apply →
//! update status (only when it changed).

pub mod environment;
pub mod project;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::{Condition, ConditionStatus};

/// A condition stamped with the current time and the object's generation.
pub(crate) fn condition(
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Condition {
    Condition::new(type_, status, reason, message, generation, Time(now()))
}

pub(crate) fn now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

/// Transitions announced with a Normal Event: the milestones a person
/// follows. Every other transition to True is routine and only in the status.
const MILESTONES: [&str; 3] = ["ProductionReady", "RolledOut", "Allocated"];

/// Reasons of conditions that are False on the way to True (a new object,
/// a build or rollout under way): normal, and not worth an Event.
const PASSING_REASONS: [&str; 9] = [
    "NothingToDeploy",
    "NoDomain",
    "NoHost",
    "NotServing",
    "CertificatePending",
    "ProductionNotReady",
    "WaitingForCommit",
    "Building",
    "RollingOut",
];

/// The condition of `type_` in `after`, if its change from `before` is
/// worth an Event, and whether that Event is a warning: problems (False
/// with a reason that is not a passing state) and milestones.
pub(crate) fn transition<'a>(
    before: &[Condition],
    after: &'a [Condition],
    type_: &str,
) -> Option<(bool, &'a Condition)> {
    let new = after.iter().find(|c| c.type_ == type_)?;
    let old = before.iter().find(|c| c.type_ == type_);
    if old.is_some_and(|old| old.status == new.status && old.reason == new.reason) {
        return None;
    }
    match new.status {
        ConditionStatus::False if !PASSING_REASONS.contains(&new.reason.as_str()) => {
            Some((true, new))
        }
        ConditionStatus::True if MILESTONES.contains(&new.reason.as_str()) => Some((false, new)),
        _ => None,
    }
}

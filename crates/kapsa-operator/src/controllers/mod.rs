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

/// Reasons of conditions that are False on the way to True (a new object,
/// a build or rollout under way): normal, and not worth an Event.
const PASSING_REASONS: [&str; 8] = [
    "NothingToDeploy",
    "NoDomain",
    "NoHost",
    "NotServing",
    "CertificatePending",
    "ProductionNotReady",
    "WaitingForCommit",
    "Building",
];

/// The condition of `type_` in `after` if its status or reason differs from
/// `before`: the transitions worth an Event.
pub(crate) fn transition<'a>(
    before: &[Condition],
    after: &'a [Condition],
    type_: &str,
) -> Option<&'a Condition> {
    let new = after.iter().find(|c| c.type_ == type_)?;
    if PASSING_REASONS.contains(&new.reason.as_str()) {
        return None;
    }
    let old = before.iter().find(|c| c.type_ == type_);
    match old {
        Some(old) if old.status == new.status && old.reason == new.reason => None,
        _ => Some(new),
    }
}

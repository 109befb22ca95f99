//! The last step of every reconcile: one status write, only on change, and
//! the Events the plan asked for (published in the background, in order),
//! only when that write happened (a reconcile on a cache that has not seen
//! Kapsa's last status yet must not announce the same thing twice).

use kube::Resource;
use serde::Serialize;

use crate::context::Context;
use crate::error::Result;

/// An Event a plan wants published with its status change. Notes never hold
/// secret values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    pub warning: bool,
    pub reason: String,
    pub note: String,
}

impl PlannedEvent {
    pub fn normal(reason: impl Into<String>, note: impl Into<String>) -> Self {
        Self {
            warning: false,
            reason: reason.into(),
            note: note.into(),
        }
    }

    pub fn warning(reason: impl Into<String>, note: impl Into<String>) -> Self {
        Self {
            warning: true,
            reason: reason.into(),
            note: note.into(),
        }
    }
}

/// Writes `after` as the status of `object` unless it equals `before` (the
/// cached status), then publishes `events`. Returns whether it wrote.
pub async fn update<K, S>(
    ctx: &Context,
    object: &K,
    before: &S,
    after: &S,
    events: &[PlannedEvent],
) -> Result<bool>
where
    K: Resource<DynamicType = ()>,
    S: Serialize + PartialEq,
{
    if before == after {
        return Ok(false);
    }
    if !ctx
        .applier
        .apply_status(object, &serde_json::to_value(after)?)
        .await?
    {
        return Ok(false);
    }
    ctx.publish_events(object, events);
    Ok(true)
}

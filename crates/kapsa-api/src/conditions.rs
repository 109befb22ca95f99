//! Kubernetes-style status conditions and pure helpers to maintain them.
//!
//! Conditions are stored as a list-map keyed on `type`
//! (`x-kubernetes-list-type: map`), one entry per condition type, following
//! the conventions of `metav1.Condition`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Condition type: the object is fully reconciled and serving (every kind).
pub const READY: &str = "Ready";
/// Condition type (Project): the git repository answered the last poll.
pub const SOURCE_REACHABLE: &str = "SourceReachable";
/// Condition type (Project): a host under a DomainPool base was allocated.
pub const DOMAIN_ALLOCATED: &str = "DomainAllocated";
/// Condition type (Environment): the image for the wanted commit is built.
pub const BUILT: &str = "Built";
/// Condition type (Environment): the Deployment runs the wanted image and is available.
pub const DEPLOYED: &str = "Deployed";
/// Condition type (Environment): the TLS certificate for the host is ready.
pub const TLS_READY: &str = "TLSReady";
/// Condition type (Environment): every `configMapRefs`/`secretRefs` entry exists.
pub const REFERENCES_RESOLVED: &str = "ReferencesResolved";
/// Condition type (Project): every field set in the spec is acted on by this
/// version of the operator (False, reason `NotImplemented`, names the ones
/// that are accepted but not acted on yet).
pub const IMPLEMENTED: &str = "Implemented";
/// Condition type (Project, Environment): the API server accepted every
/// object Kapsa applies for it (False, reason `Refused`, names the refused
/// ones and the API server's reason: a ResourceQuota, an admission policy).
pub const APPLIED: &str = "Applied";
/// Environment: `spec.pin` holds a release back (True, naming it and what
/// waits), or cannot be honoured (False, e.g. `ReleaseNotFound`). Absent
/// when the Environment is not pinned.
pub const PINNED: &str = "Pinned";
/// Environment, with the Project's `runtime.metrics`: a Prometheus Operator
/// `ServiceMonitor` selects its Service's `metrics` port (True), or cannot,
/// e.g. False with reason `PrometheusOperatorNotInstalled`. Absent without
/// `runtime.metrics`.
pub const MONITORED: &str = "Monitored";
/// Environment, under a DomainPool with `routing: Gateway`: the gateway
/// controller accepted its HTTPRoute and resolved its backend (True), or
/// not, e.g. False with the gateway's reason (`NotAllowedByListeners`,
/// `NoMatchingParent`, `BackendNotFound`, …) or `GatewayAPINotInstalled`.
/// Absent under `routing: Ingress`.
pub const ROUTED: &str = "Routed";

/// Status of a condition: `True`, `False` or `Unknown`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema, Default)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The controller cannot tell (yet).
    #[default]
    Unknown,
}

impl ConditionStatus {
    /// The status for a boolean.
    pub fn from_bool(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// One aspect of the current state of an object, in the style of the
/// Kubernetes `metav1.Condition` type. Written by the Kapsa operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Type of the condition in CamelCase, e.g. `Ready`, `SourceReachable`,
    /// `DomainAllocated`, `Built`, `Deployed`, `TLSReady`. Unique within the
    /// list.
    #[serde(rename = "type")]
    #[schemars(
        length(min = 1, max = 316),
        regex(
            pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
        )
    )]
    pub type_: String,

    /// Status of the condition: `True`, `False` or `Unknown`.
    pub status: ConditionStatus,

    /// Machine-readable reason for the last transition, in CamelCase, e.g.
    /// `BuildFailed`, `RepositoryUnreachable`, `Available`.
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    )]
    pub reason: String,

    /// Human-readable explanation of the condition, for `kubectl describe`.
    /// May be empty.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub message: String,

    /// When the status last changed (RFC 3339). Unchanged when only the
    /// reason or message change.
    pub last_transition_time: Time,

    /// The `metadata.generation` of the object this condition was computed
    /// from. Lower than the object's generation means the condition is stale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

impl Condition {
    /// A new condition. `now` becomes its `lastTransitionTime` (the caller
    /// supplies the clock, which keeps this crate free of I/O).
    pub fn new(
        type_: impl Into<String>,
        status: ConditionStatus,
        reason: impl Into<String>,
        message: impl Into<String>,
        observed_generation: Option<i64>,
        now: Time,
    ) -> Self {
        Self {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now,
            observed_generation,
        }
    }

    /// True if the status is `True`.
    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}

/// Whether `reason` is a valid condition reason (CamelCase: a letter, then
/// letters, digits, `_`, `,` or `:`, not ending in `,` or `:`; at most 1024
/// characters), e.g. to pass on another controller's reason as it is.
pub fn is_valid_reason(reason: &str) -> bool {
    let bytes = reason.as_bytes();
    let inner = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b',' | b':');
    (1..=1024).contains(&bytes.len())
        && bytes[0].is_ascii_alphabetic()
        && bytes.iter().all(inner)
        && !matches!(bytes[bytes.len() - 1], b',' | b':')
}

/// The condition of type `type_`, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// True if the condition of type `type_` is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(Condition::is_true)
}

/// Sets `condition` in `conditions`, replacing any condition of the same type.
///
/// If a condition of that type exists with the same status, its
/// `lastTransitionTime` is kept (only reason, message and
/// observedGeneration are updated). Returns true if anything changed,
/// which tells the caller whether a status write is needed.
pub fn set_condition(conditions: &mut Vec<Condition>, mut condition: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == condition.type_) {
        Some(existing) => {
            if existing.status == condition.status {
                condition.last_transition_time = existing.last_transition_time.clone();
            }
            if *existing == condition {
                false
            } else {
                *existing = condition;
                true
            }
        }
        None => {
            conditions.push(condition);
            true
        }
    }
}

/// Merges `updates` into `conditions` with [`set_condition`], one by one.
/// Conditions of types not in `updates` are kept. Returns true if anything
/// changed.
pub fn merge_conditions(
    conditions: &mut Vec<Condition>,
    updates: impl IntoIterator<Item = Condition>,
) -> bool {
    let mut changed = false;
    for condition in updates {
        changed |= set_condition(conditions, condition);
    }
    changed
}

/// Removes the condition of type `type_`. Returns true if one was removed.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn time(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    #[test]
    fn valid_reasons() {
        for ok in ["Accepted", "NotAllowedByListeners", "A", "a_b:c,d1"] {
            assert!(is_valid_reason(ok), "{ok}");
        }
        let long = "A".repeat(1025);
        for bad in [
            "",
            "1Bad",
            "Has space",
            "Trailing:",
            "Trailing,",
            "Dash-ed",
            "Ünicode",
            &long,
        ] {
            assert!(!is_valid_reason(bad), "{bad}");
        }
    }

    fn cond(status: ConditionStatus, reason: &str, at: &str) -> Condition {
        Condition::new(READY, status, reason, "msg", Some(1), time(at))
    }

    #[test]
    fn set_adds_new_condition() {
        let mut list = Vec::new();
        assert!(set_condition(
            &mut list,
            cond(ConditionStatus::True, "Ok", "2025-01-01T00:00:00Z")
        ));
        assert_eq!(list.len(), 1);
        assert!(is_condition_true(&list, READY));
        assert!(!is_condition_true(&list, BUILT));
    }

    #[test]
    fn same_status_keeps_transition_time() {
        let mut list = vec![cond(ConditionStatus::True, "Ok", "2025-01-01T00:00:00Z")];
        let changed = set_condition(
            &mut list,
            cond(ConditionStatus::True, "StillOk", "2025-02-01T00:00:00Z"),
        );
        assert!(changed, "reason changed");
        assert_eq!(list[0].reason, "StillOk");
        assert_eq!(list[0].last_transition_time, time("2025-01-01T00:00:00Z"));
    }

    #[test]
    fn identical_update_is_not_a_change() {
        let mut list = vec![cond(ConditionStatus::True, "Ok", "2025-01-01T00:00:00Z")];
        assert!(!set_condition(
            &mut list,
            cond(ConditionStatus::True, "Ok", "2025-03-01T00:00:00Z")
        ));
        assert_eq!(list[0].last_transition_time, time("2025-01-01T00:00:00Z"));
    }

    #[test]
    fn status_change_moves_transition_time() {
        let mut list = vec![cond(ConditionStatus::True, "Ok", "2025-01-01T00:00:00Z")];
        assert!(set_condition(
            &mut list,
            cond(ConditionStatus::False, "Broken", "2025-02-01T00:00:00Z")
        ));
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].status, ConditionStatus::False);
        assert_eq!(list[0].last_transition_time, time("2025-02-01T00:00:00Z"));
    }

    #[test]
    fn observed_generation_update_is_a_change() {
        let mut list = vec![cond(ConditionStatus::True, "Ok", "2025-01-01T00:00:00Z")];
        let mut next = cond(ConditionStatus::True, "Ok", "2025-02-01T00:00:00Z");
        next.observed_generation = Some(2);
        assert!(set_condition(&mut list, next));
        assert_eq!(list[0].observed_generation, Some(2));
        assert_eq!(list[0].last_transition_time, time("2025-01-01T00:00:00Z"));
    }

    #[test]
    fn merge_and_remove() {
        let t = "2025-01-01T00:00:00Z";
        let mut list = vec![cond(ConditionStatus::True, "Ok", t)];
        let built = Condition::new(
            BUILT,
            ConditionStatus::Unknown,
            "Building",
            "",
            None,
            time(t),
        );
        assert!(merge_conditions(
            &mut list,
            [built.clone(), cond(ConditionStatus::True, "Ok", t)]
        ));
        assert_eq!(list.len(), 2);
        assert!(!merge_conditions(&mut list, [built]));
        assert_eq!(
            find_condition(&list, BUILT).map(|c| c.status),
            Some(ConditionStatus::Unknown)
        );
        assert!(remove_condition(&mut list, BUILT));
        assert!(!remove_condition(&mut list, BUILT));
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn from_bool() {
        assert_eq!(ConditionStatus::from_bool(true), ConditionStatus::True);
        assert_eq!(ConditionStatus::from_bool(false), ConditionStatus::False);
    }

    #[test]
    fn serde_shape() {
        let c = cond(ConditionStatus::True, "Ok", "2025-01-01T00:00:00Z");
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["type"], "Ready");
        assert_eq!(v["status"], "True");
        assert_eq!(v["lastTransitionTime"], "2025-01-01T00:00:00Z");
        assert_eq!(v["observedGeneration"], 1);
        let back: Condition = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
    }
}

//! Server-side apply that writes only when something would change.
//!
//! Before applying, the desired object is compared with the cached one: if
//! every field Kapsa sets already has the value Kapsa wants, there is nothing
//! to write. Fields others set (defaults, other controllers) do not count, and
//! a person's edit of a field Kapsa sets does: it is reverted.

use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::Value;

use crate::error::Result;
use crate::metrics::Metrics;
use crate::resources::FIELD_MANAGER;

/// Whether `actual` already holds everything `desired` says: every key of a
/// desired map has a matching value, and lists match element by element.
pub fn is_subset(desired: &Value, actual: &Value) -> bool {
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => d.iter().all(|(k, dv)| match a.get(k) {
            Some(av) => is_subset(dv, av),
            // The API server drops Go zero values of `omitempty` fields
            // (e.g. `minReadySeconds: 0`): absent means zero there.
            None => is_zero(dv),
        }),
        (Value::Array(d), Value::Array(a)) => {
            d.len() == a.len() && d.iter().zip(a).all(|(dv, av)| is_subset(dv, av))
        }
        (Value::Number(d), Value::Number(a)) => d.as_f64() == a.as_f64(),
        _ => desired == actual,
    }
}

fn is_zero(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_zero),
    }
}

fn up_to_date<K: Serialize>(desired: &K, cached: Option<&K>) -> Result<bool> {
    let Some(cached) = cached else {
        return Ok(false);
    };
    let mut desired = serde_json::to_value(desired)?;
    // Status is never applied, and metadata bookkeeping is the server's.
    if let Some(map) = desired.as_object_mut() {
        map.remove("status");
    }
    Ok(is_subset(&desired, &serde_json::to_value(cached)?))
}

fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

/// Applies `desired` unless `cached` already matches it; returns whether it wrote.
pub async fn apply<K>(
    client: &Client,
    metrics: &Metrics,
    desired: &K,
    cached: Option<&K>,
) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Serialize,
{
    if up_to_date(desired, cached)? {
        return Ok(false);
    }
    let resource = ApiResource::erase::<K>(&());
    let object: DynamicObject = serde_json::from_value(serde_json::to_value(desired)?)?;
    patch(client, metrics, &resource, &object).await?;
    Ok(true)
}

async fn patch(
    client: &Client,
    metrics: &Metrics,
    resource: &ApiResource,
    desired: &DynamicObject,
) -> Result<()> {
    let api: Api<DynamicObject> = match desired.namespace() {
        Some(ns) => Api::namespaced_with(client.clone(), &ns, resource),
        None => Api::all_with(client.clone(), resource),
    };
    api.patch(&desired.name_any(), &params(), &Patch::Apply(desired))
        .await?;
    metrics.record_write(&resource.kind);
    Ok(())
}

/// [`apply`] for objects of kinds Kapsa has no Rust type for (kpack, cert-manager).
pub async fn apply_dynamic(
    client: &Client,
    metrics: &Metrics,
    resource: &ApiResource,
    desired: &DynamicObject,
    cached: Option<&DynamicObject>,
) -> Result<bool> {
    if up_to_date(desired, cached)? {
        return Ok(false);
    }
    patch(client, metrics, resource, desired).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extra_fields_in_the_cluster_do_not_count() {
        let desired = json!({"spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "app", "image": "a"}]}}}});
        let actual = json!({"spec": {"replicas": 2, "revisionHistoryLimit": 10,
            "template": {"spec": {"containers": [{"name": "app", "image": "a", "imagePullPolicy": "IfNotPresent"}]}}}});
        assert!(is_subset(&desired, &actual));
    }

    #[test]
    fn an_edited_field_counts() {
        let desired = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "a"}]}}}});
        let edited = json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "b"}]}}}});
        assert!(!is_subset(&desired, &edited));
    }

    #[test]
    fn list_length_and_missing_keys_count() {
        assert!(!is_subset(&json!({"a": [1, 2]}), &json!({"a": [1]})));
        assert!(!is_subset(&json!({"a": [1]}), &json!({"a": [1, 2]})));
        assert!(!is_subset(&json!({"a": {"b": 1}}), &json!({"a": {}})));
        assert!(is_subset(&json!({"a": null}), &json!({})));
        assert!(is_subset(&json!({"n": 1}), &json!({"n": 1.0})));
    }

    #[test]
    fn zero_values_the_server_omits_match_absent_keys() {
        assert!(is_subset(
            &json!({"minReadySeconds": 0, "paused": false, "args": []}),
            &json!({})
        ));
        assert!(!is_subset(&json!({"minReadySeconds": 5}), &json!({})));
        assert!(!is_subset(
            &json!({"minReadySeconds": 0}),
            &json!({"minReadySeconds": 5})
        ));
    }
}

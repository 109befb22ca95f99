//! Server-side apply that writes only when something would change.
//!
//! Before applying, the desired object is compared with the cached one: if
//! every field Kapsa sets already has the value Kapsa wants, there is nothing
//! to write. Fields others set (defaults, other controllers) do not count, and
//! a person's edit of a field Kapsa sets does: it is reverted.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

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

fn resource_version(value: &Value) -> Option<u64> {
    value["metadata"]["resourceVersion"].as_str()?.parse().ok()
}

/// Applies objects, skipping writes that would change nothing.
///
/// The caches lag behind writes by a watch event; a reconcile in that window
/// would see the old object and apply the same thing again. So the applier
/// remembers, per object, a digest of what it last applied and the
/// resourceVersion the API server answered; while the cache is older than
/// that answer, the same desired object is not applied again. (A digest, not
/// the object: this must stay small at thousands of objects.)
pub struct Applier {
    client: Client,
    metrics: Arc<Metrics>,
    answered: Mutex<HashMap<String, (u64, u64)>>,
}

/// Entries kept at most; past that the memory is dropped (it only saves writes).
const MAX_REMEMBERED: usize = 50_000;

fn digest(value: &Value) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.to_string().hash(&mut hasher);
    hasher.finish()
}

impl Applier {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            metrics,
            answered: Mutex::new(HashMap::new()),
        }
    }

    fn key(resource: &ApiResource, object: &DynamicObject) -> String {
        format!(
            "{}/{}/{}/{}",
            resource.group,
            resource.kind,
            object.namespace().unwrap_or_default(),
            object.name_any()
        )
    }

    /// Whether `wanted` needs no write, given the cache and our last answer.
    fn unchanged(&self, key: &str, wanted: &Value, cached: Option<&Value>) -> bool {
        let cache_rv = cached.and_then(resource_version);
        if let Ok(mut answered) = self.answered.lock()
            && let Some(&(answer_rv, applied)) = answered.get(key)
        {
            if cache_rv.is_none_or(|rv| rv < answer_rv) {
                return applied == digest(wanted);
            }
            answered.remove(key);
        }
        cached.is_some_and(|current| is_subset(wanted, current))
    }

    /// Writes `status` to the status subresource of `object` (a cached copy)
    /// unless Kapsa wrote this very status already and the cache has not
    /// caught up yet. The caller compares with the cached status first.
    pub async fn apply_status<K>(&self, object: &K, status: &Value) -> Result<bool>
    where
        K: Resource<DynamicType = ()>,
    {
        let resource = ApiResource::erase::<K>(&());
        let name = object.meta().name.clone().unwrap_or_default();
        let namespace = object.meta().namespace.clone();
        let key = format!(
            "status/{}/{}/{}/{name}",
            resource.group,
            resource.kind,
            namespace.clone().unwrap_or_default()
        );
        let cache_rv: Option<u64> = object
            .meta()
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok());
        if let Ok(answered) = self.answered.lock()
            && let Some(&(answer_rv, written)) = answered.get(&key)
            && cache_rv.is_none_or(|rv| rv < answer_rv)
            && written == digest(status)
        {
            return Ok(false);
        }
        let api: Api<DynamicObject> = match &namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        let patch = serde_json::json!({"apiVersion": resource.api_version, "kind": resource.kind, "status": status});
        let answer = api
            .patch_status(&name, &params(), &Patch::Apply(&patch))
            .await?;
        self.metrics
            .record_write(&format!("{}/status", resource.kind));
        self.remember(key, answer.metadata.resource_version.as_deref(), status);
        Ok(true)
    }

    fn remember(&self, key: String, resource_version: Option<&str>, written: &Value) {
        if let (Ok(mut answered), Some(rv)) = (
            self.answered.lock(),
            resource_version.and_then(|v| v.parse().ok()),
        ) {
            if answered.len() >= MAX_REMEMBERED {
                answered.clear();
            }
            answered.insert(key, (rv, digest(written)));
        }
    }

    /// Applies `desired` unless it would change nothing; returns whether it wrote.
    pub async fn apply<K>(&self, desired: &K, cached: Option<&K>) -> Result<bool>
    where
        K: Resource<DynamicType = ()> + Serialize,
    {
        let resource = ApiResource::erase::<K>(&());
        let object: DynamicObject = serde_json::from_value(serde_json::to_value(desired)?)?;
        let cached = cached.map(serde_json::to_value).transpose()?;
        self.apply_value(&resource, &object, cached).await
    }

    /// [`Applier::apply`] for kinds Kapsa has no Rust type for (kpack, cert-manager).
    pub async fn apply_dynamic(
        &self,
        resource: &ApiResource,
        desired: &DynamicObject,
        cached: Option<&DynamicObject>,
    ) -> Result<bool> {
        let cached = cached.map(serde_json::to_value).transpose()?;
        self.apply_value(resource, desired, cached).await
    }

    async fn apply_value(
        &self,
        resource: &ApiResource,
        desired: &DynamicObject,
        cached: Option<Value>,
    ) -> Result<bool> {
        let key = Self::key(resource, desired);
        let mut wanted = serde_json::to_value(desired)?;
        // Status is never applied.
        if let Some(map) = wanted.as_object_mut() {
            map.remove("status");
        }
        if self.unchanged(&key, &wanted, cached.as_ref()) {
            return Ok(false);
        }
        let api: Api<DynamicObject> = match desired.namespace() {
            Some(ns) => Api::namespaced_with(self.client.clone(), &ns, resource),
            None => Api::all_with(self.client.clone(), resource),
        };
        let answer = api
            .patch(&desired.name_any(), &params(), &Patch::Apply(desired))
            .await?;
        self.metrics.record_write(&resource.kind);
        if let (Ok(mut answered), Some(rv)) = (
            self.answered.lock(),
            answer
                .metadata
                .resource_version
                .as_deref()
                .and_then(|v| v.parse().ok()),
        ) {
            if answered.len() >= MAX_REMEMBERED {
                answered.clear();
            }
            answered.insert(key, (rv, digest(&wanted)));
        }
        Ok(true)
    }
}

fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
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

//! Apply and prune: server-side apply (field manager `kapsa`) that writes
//! only when something would change, and deletes of what a plan no longer
//! wants.
//!
//! Before applying, the desired object is compared with the cached one: if
//! every field Kapsa sets already has the value Kapsa wants, there is nothing
//! to write. Fields others set (defaults, other controllers) do not count, and
//! a person's edit of a field Kapsa sets does: it is reverted.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, Preconditions};
use kube::{Client, Resource};
use serde_json::Value;

use crate::children::{Child, ChildKey, Deletion, Observed};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::resources::FIELD_MANAGER;

/// Whether `actual` already holds everything `desired` says: every key of a
/// desired map has a matching value, and lists match element by element.
pub fn is_subset(desired: &Value, actual: &Value) -> bool {
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => d.iter().all(|(k, dv)| match a.get(k) {
            Some(av) => is_subset(dv, av),
            // The API server drops Go zero values of `omitempty` fields that
            // are not pointers (e.g. `minReadySeconds: 0`): absent means zero
            // there. A desired `false` is not among them: every boolean Kapsa
            // sets is a pointer field (`allowPrivilegeEscalation`,
            // `automountServiceAccountToken`), kept by the server, so a
            // missing one was removed by someone and is put back.
            None => is_omitted_zero(dv),
        }),
        (Value::Array(d), Value::Array(a)) => {
            d.len() == a.len() && d.iter().zip(a).all(|(dv, av)| is_subset(dv, av))
        }
        (Value::Number(d), Value::Number(a)) => d.as_f64() == a.as_f64(),
        _ => desired == actual,
    }
}

fn is_omitted_zero(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Bool(_) => false,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_omitted_zero),
    }
}

fn resource_version(value: &Value) -> Option<u64> {
    value["metadata"]["resourceVersion"].as_str()?.parse().ok()
}

/// What Kapsa last wrote to one object.
#[derive(Clone, Copy)]
struct Answer {
    /// The resourceVersion the API server answered.
    resource_version: u64,
    /// A digest of what was written.
    digest: u64,
    at: Instant,
}

/// How long an object written by Kapsa may be missing from the cache before
/// it is taken as deleted (and so written again). Deletes Kapsa's caches
/// see are forgotten at once ([`Applier::forget`]); this covers deletes a
/// watch missed.
const CACHE_LAG: Duration = Duration::from_secs(5);

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
    answered: Mutex<HashMap<String, Answer>>,
    /// Creations sent from a task of their own, by object, until they end
    /// well (then the cache's watch event wakes the owner) or until the
    /// owner's next reconcile takes their error.
    background: Mutex<HashMap<String, Background>>,
    /// Bounds the background creations in flight at once, in all and per
    /// namespace.
    creations: Arc<Creations>,
}

/// A creation sent in the background.
enum Background {
    InFlight,
    /// It failed (at that time); the owner's next reconcile reports the
    /// error.
    Failed(Error, Instant),
    /// It failed and was reported (last at that time): applied in the
    /// reconcile from now on, like any other child, until it is accepted (so
    /// a refusal stays reported instead of coming and going with each
    /// background try).
    Inline(Instant),
}

/// A failure no reconcile came for in this long is forgotten: its owner was
/// deleted (or no longer wants the object). Forgetting one that was still
/// wanted costs one background try more.
const STALE_FAILURE: Duration = Duration::from_secs(60 * 60);

/// Forgets the failures older than [`STALE_FAILURE`] at `now` (entries in
/// flight always end by themselves).
fn forget_stale(background: &mut HashMap<String, Background>, now: Instant) {
    background.retain(|_, entry| match entry {
        Background::InFlight => true,
        Background::Failed(_, at) | Background::Inline(at) => {
            now.saturating_duration_since(*at) < STALE_FAILURE
        }
    });
}

/// Wakes the reconciler of the object a background creation was for, when
/// that creation failed (a success shows in the cache, which wakes it).
pub type Wake = Arc<dyn Fn() + Send + Sync>;

/// Background creations in flight at once. kube-apiserver allocates a
/// Service's cluster IP under one lock (its `IPAddress` object is created
/// while the lock is held), so Services are made one at a time whatever
/// the number of requests; a few in flight keep that lock busy, more would
/// only take the API server's request slots from Kapsa's other writes.
const BACKGROUND_CREATIONS: usize = 8;

/// Background creations of one namespace (one tenant's) in flight or waiting
/// for one of the [`BACKGROUND_CREATIONS`] at once: a tenant that makes
/// hundreds of Services queues them behind each other, not in front of
/// every other tenant's.
const NAMESPACE_CREATIONS: usize = 2;

/// The slots of background creations: a few in all, fewer per namespace.
struct Creations {
    all: Arc<tokio::sync::Semaphore>,
    per_namespace: usize,
    /// A namespace's semaphore exists while one of its creations holds or
    /// waits for a slot.
    namespaces: Mutex<HashMap<String, Arc<tokio::sync::Semaphore>>>,
}

/// A slot of [`Creations`], given back when dropped.
struct CreationSlot {
    creations: Arc<Creations>,
    namespace: String,
    permits: Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    )>,
}

impl Creations {
    fn new(all: usize, per_namespace: usize) -> Self {
        Self {
            all: Arc::new(tokio::sync::Semaphore::new(all)),
            per_namespace,
            namespaces: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for a slot of `namespace`'s, then for one of all: a creation
    /// waiting for its namespace holds none of the shared slots.
    async fn slot(self: &Arc<Self>, namespace: &str) -> CreationSlot {
        let own = self
            .namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(namespace.to_string())
            .or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.per_namespace)))
            .clone();
        let mut slot = CreationSlot {
            creations: self.clone(),
            namespace: namespace.to_string(),
            permits: None,
        };
        // Neither semaphore is ever closed.
        if let Ok(own) = own.acquire_owned().await
            && let Ok(shared) = self.all.clone().acquire_owned().await
        {
            slot.permits = Some((own, shared));
        }
        slot
    }
}

impl Drop for CreationSlot {
    fn drop(&mut self) {
        self.permits = None;
        let mut namespaces = self
            .creations
            .namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Only the map holds it: no creation of that namespace holds or
        // waits for a slot (every clone is made under this lock).
        if namespaces
            .get(&self.namespace)
            .is_some_and(|own| Arc::strong_count(own) == 1)
        {
            namespaces.remove(&self.namespace);
        }
    }
}

/// Entries kept at most; past that the memory is dropped (it only saves writes).
const MAX_REMEMBERED: usize = 50_000;

fn digest(value: &Value) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.to_string().hash(&mut hasher);
    hasher.finish()
}

fn api(client: &Client, resource: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, resource),
        None => Api::all_with(client.clone(), resource),
    }
}

impl Applier {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self {
            client,
            metrics,
            answered: Mutex::new(HashMap::new()),
            background: Mutex::new(HashMap::new()),
            creations: Arc::new(Creations::new(BACKGROUND_CREATIONS, NAMESPACE_CREATIONS)),
        }
    }

    /// Whether a `child` the cache does not hold yet is created by
    /// [`Self::create_in_background`] rather than applied in the reconcile:
    /// a Service, whose creation queues behind every other Service's at the
    /// API server (seconds each when hundreds are made at once) and would
    /// hold a reconcile, and with it the other Environments, that long.
    pub fn creates_in_background(child: &Child) -> bool {
        child.resource.group.is_empty() && child.resource.kind == "Service"
    }

    /// Creates `child`, which the cache does not hold, in a task of its own
    /// (at most [`BACKGROUND_CREATIONS`] at once), and returns without
    /// waiting for it: `Ok(true)` when it was sent now, `Ok(false)` when one
    /// is already on its way or was just written. When a background creation
    /// of it failed (`wake` announced it), the next call returns that error,
    /// for the reconcile to report like any apply's, and from then on `child`
    /// is applied here and now until the API server accepts it.
    pub async fn create_in_background(self: &Arc<Self>, child: &Child, wake: Wake) -> Result<bool> {
        let key = child.key().to_string();
        let inline = {
            let mut background = self
                .background
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match background.remove(&key) {
                Some(Background::InFlight) => {
                    background.insert(key, Background::InFlight);
                    return Ok(false);
                }
                Some(Background::Failed(error, _)) => {
                    background.insert(key, Background::Inline(Instant::now()));
                    return Err(error);
                }
                Some(Background::Inline(_)) => {
                    background.insert(key.clone(), Background::Inline(Instant::now()));
                    true
                }
                None => {
                    if self.unchanged(&key, &with_applied_hash(child.to_value()), None) {
                        return Ok(false);
                    }
                    background.insert(key.clone(), Background::InFlight);
                    false
                }
            }
        };
        if inline {
            let answer = self.apply(child, None).await;
            if answer.is_ok() {
                self.background
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&key);
            }
            return answer;
        }
        let applier = self.clone();
        let child = child.clone();
        tokio::spawn(async move {
            let permit = applier
                .creations
                .slot(
                    child
                        .object
                        .metadata
                        .namespace
                        .as_deref()
                        .unwrap_or_default(),
                )
                .await;
            // Boxed: hundreds of these tasks can wait for a slot at once
            // (a burst of new Environments), and unboxed each would hold
            // the space of a whole request in flight (about 3 KiB) while
            // it waits.
            let result = Box::pin(applier.apply(&child, None)).await;
            drop(permit);
            let mut background = applier
                .background
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match result {
                Ok(_) => {
                    background.remove(&key);
                }
                Err(error) => {
                    tracing::debug!(object = %key, %error, "background creation failed");
                    let now = Instant::now();
                    forget_stale(&mut background, now);
                    background.insert(key, Background::Failed(error, now));
                    drop(background);
                    wake();
                }
            }
        });
        Ok(true)
    }

    /// Forgets what Kapsa wrote to an object the caches saw deleted, so the
    /// next reconcile recreates it at once.
    pub fn forget(&self, key: &ChildKey) {
        if let Ok(mut answered) = self.answered.lock() {
            answered.remove(&key.to_string());
        }
    }

    /// Whether `wanted` needs no write, given the cache and our last answer.
    fn unchanged(&self, key: &str, wanted: &Value, cached: Option<&Value>) -> bool {
        let cache_rv = cached.and_then(resource_version);
        if let Ok(mut answered) = self.answered.lock()
            && let Some(answer) = answered.get(key).copied()
        {
            let behind = match cache_rv {
                Some(rv) => rv < answer.resource_version,
                None => answer.at.elapsed() < CACHE_LAG,
            };
            if behind {
                return answer.digest == digest(wanted);
            }
            answered.remove(key);
        }
        cached.is_some_and(|current| is_subset(wanted, current))
    }

    fn remember(&self, key: String, resource_version: Option<&str>, written: &Value) {
        if let (Ok(mut answered), Some(rv)) = (
            self.answered.lock(),
            resource_version.and_then(|v| v.parse().ok()),
        ) {
            if answered.len() >= MAX_REMEMBERED {
                answered.clear();
            }
            answered.insert(
                key,
                Answer {
                    resource_version: rv,
                    digest: digest(written),
                    at: Instant::now(),
                },
            );
        }
    }

    /// Applies `child` unless it would change nothing; returns whether it wrote.
    pub async fn apply(&self, child: &Child, cached: Option<&Observed>) -> Result<bool> {
        let key = child.key();
        let wanted = with_applied_hash(child.to_value());
        if self.unchanged(&key.to_string(), &wanted, cached.map(|o| &o.value)) {
            return Ok(false);
        }
        tracing::debug!(
            object = %key,
            cached_rv = cached.and_then(|o| resource_version(&o.value)),
            "applying: the cached object is missing or differs"
        );
        let answer = api(&self.client, &child.resource, key.namespace.as_deref())
            .patch(&key.name, &params(), &Patch::Apply(&wanted))
            .await
            .map_err(|source| Error::Apply {
                kind: child.resource.kind.clone(),
                name: key.to_string(),
                source,
            })?;
        self.metrics.record_write(&child.resource.kind);
        crate::fault::after_write("apply");
        self.remember(
            key.to_string(),
            answer.metadata.resource_version.as_deref(),
            &wanted,
        );
        Ok(true)
    }

    /// Deletes what the plan no longer wants, only if it is still the
    /// object the plan saw (uid precondition). Already gone is fine.
    pub async fn delete(&self, deletion: &Deletion) -> Result<bool> {
        let key = &deletion.key;
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(deletion.uid.clone()),
                resource_version: None,
            }),
            // Children of the deleted object (an Ingress's Certificate) go too.
            propagation_policy: Some(kube::api::PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        let result = api(&self.client, &deletion.resource, key.namespace.as_deref())
            .delete(&key.name, &params)
            .await;
        self.forget(key);
        match result {
            Ok(_) => {
                self.metrics
                    .record_write(&format!("{}/delete", deletion.resource.kind));
                crate::fault::after_write("delete");
                Ok(true)
            }
            // Gone already, or replaced by a newer object (uid mismatch).
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
            Err(source) => Err(Error::Prune {
                kind: deletion.resource.kind.clone(),
                name: key.to_string(),
                source,
            }),
        }
    }

    /// Whether the cached copy of `object` is older than the status Kapsa
    /// last wrote to it: the cache has not caught up with Kapsa's own write
    /// yet. A plan made from that copy would start from the state before
    /// Kapsa's last decision (announce an expiry again, re-create what it
    /// just recorded as gone); the reconcile waits for the cache instead.
    /// Bounded by [`CACHE_LAG`], so a cache that never catches up (a missed
    /// event) does not stop the object for long.
    pub fn status_behind<K>(&self, object: &K) -> bool
    where
        K: Resource<DynamicType = ()>,
    {
        let meta = object.meta();
        let key = status_key(object);
        let cache_rv: Option<u64> = meta
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok());
        self.answered.lock().is_ok_and(|answered| {
            answered.get(&key).is_some_and(|answer| {
                cache_rv.is_some_and(|rv| rv < answer.resource_version)
                    && answer.at.elapsed() < CACHE_LAG
            })
        })
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
        let key = status_key(object);
        let cache_rv: Option<u64> = object
            .meta()
            .resource_version
            .as_deref()
            .and_then(|v| v.parse().ok());
        if let Ok(answered) = self.answered.lock()
            && let Some(answer) = answered.get(&key)
            && cache_rv.is_none_or(|rv| rv < answer.resource_version)
            && answer.digest == digest(status)
        {
            return Ok(false);
        }
        let patch = serde_json::json!({"apiVersion": resource.api_version, "kind": resource.kind, "status": status});
        let answer = api(&self.client, &resource, namespace.as_deref())
            .patch_status(&name, &params(), &Patch::Apply(&patch))
            .await
            .map_err(Error::Status)?;
        self.metrics
            .record_write(&format!("{}/status", resource.kind));
        crate::fault::after_write("status");
        self.remember(key, answer.metadata.resource_version.as_deref(), status);
        Ok(true)
    }
}

/// The key under which the applier remembers its last status write to
/// `object`.
fn status_key<K: Resource<DynamicType = ()>>(object: &K) -> String {
    let meta = object.meta();
    let key = ChildKey::new(
        &ApiResource::erase::<K>(&()),
        meta.namespace.as_deref(),
        meta.name.as_deref().unwrap_or_default(),
    );
    format!("status/{key}")
}

/// Annotation on every object Kapsa applies: a hash of what it applied. A
/// field Kapsa stops setting (a TLS section, a host) is absent from the new
/// desired object, which the field-by-field check cannot see; the hash
/// changes, so the object is written and the field removed.
pub const APPLIED_HASH_ANNOTATION: &str = "kapsa.dev/applied-hash";

fn with_applied_hash(mut wanted: Value) -> Value {
    use sha2::{Digest, Sha256};
    let hash: String = Sha256::digest(wanted.to_string().as_bytes())[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    wanted["metadata"]["annotations"][APPLIED_HASH_ANNOTATION] = Value::String(hash);
    wanted
}

fn params() -> PatchParams {
    PatchParams::apply(FIELD_MANAGER).force()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn one_namespace_cannot_take_every_creation_slot() {
        let creations = Arc::new(Creations::new(3, 2));
        let a1 = creations.slot("a").await;
        let a2 = creations.slot("a").await;
        // A third of a's waits for a's own slot, holding no shared one...
        let a3 = tokio::spawn({
            let creations = creations.clone();
            async move { creations.slot("a").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!a3.is_finished());
        assert_eq!(creations.all.available_permits(), 1);
        // ... so b gets the last one at once.
        let b = tokio::time::timeout(Duration::from_secs(1), creations.slot("b"))
            .await
            .expect("another namespace is not queued behind a's");
        drop(a1);
        let a3 = tokio::time::timeout(Duration::from_secs(1), a3)
            .await
            .unwrap()
            .unwrap();
        drop((a2, a3, b));
        // Nothing held or waiting: no namespace is remembered.
        assert!(creations.namespaces.lock().unwrap().is_empty());
        assert_eq!(creations.all.available_permits(), 3);
    }

    #[test]
    fn failures_no_reconcile_came_for_are_forgotten() {
        let start = Instant::now();
        let failed = || {
            Background::Failed(
                Error::Serialization(serde_json::from_str::<Value>("{").unwrap_err()),
                start,
            )
        };
        let mut background = HashMap::from([
            ("in-flight".to_string(), Background::InFlight),
            ("failed".to_string(), failed()),
            ("inline".to_string(), Background::Inline(start)),
            (
                "inline-recent".to_string(),
                Background::Inline(start + STALE_FAILURE),
            ),
        ]);
        forget_stale(&mut background, start + STALE_FAILURE / 2);
        assert_eq!(background.len(), 4);
        forget_stale(&mut background, start + STALE_FAILURE);
        let mut left: Vec<_> = background.keys().cloned().collect();
        left.sort();
        assert_eq!(left, ["in-flight", "inline-recent"]);
    }

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
            &json!({"minReadySeconds": 0, "args": [], "name": ""}),
            &json!({})
        ));
        assert!(!is_subset(&json!({"minReadySeconds": 5}), &json!({})));
        assert!(!is_subset(
            &json!({"minReadySeconds": 0}),
            &json!({"minReadySeconds": 5})
        ));
    }

    #[test]
    fn a_field_kapsa_stops_setting_changes_the_hash() {
        let with_tls = with_applied_hash(json!({"metadata": {"name": "a"}, "spec": {"tls": [1]}}));
        let without = with_applied_hash(json!({"metadata": {"name": "a"}, "spec": {}}));
        assert!(!is_subset(&without, &with_tls));
        assert!(is_subset(&with_tls, &with_tls.clone()));
        assert_eq!(
            with_applied_hash(json!({"metadata": {"name": "a"}})),
            with_applied_hash(json!({"metadata": {"name": "a"}})),
            "stable"
        );
    }

    #[test]
    fn a_removed_false_is_put_back() {
        let desired = json!({"securityContext": {"allowPrivilegeEscalation": false}, "automountServiceAccountToken": false});
        assert!(!is_subset(
            &desired,
            &json!({"securityContext": {}, "automountServiceAccountToken": false})
        ));
        assert!(!is_subset(
            &desired,
            &json!({"securityContext": {"allowPrivilegeEscalation": false}})
        ));
        assert!(is_subset(&desired, &desired.clone()));
    }
}

//! Cached objects held as the JSON the API server sent, not as Rust structs.
//!
//! Kapsa caches a few objects of each kind per Project (its Deployment,
//! Service, Ingress, kpack Image, ServiceAccounts, Role, RoleBinding, Secret
//! copies). As structs they cost three to four times their JSON: each
//! label or annotation map is a B-tree node of 11 slots (640 bytes however
//! few entries it holds), each string is an allocation of its own, and
//! an untyped object (a kpack Image) is a tree of such maps. A heap profile
//! of the operator at 1,000 Projects (docs/benchmarks.md) found these caches
//! to be most of its memory. A [`Compact`] object keeps the metadata that
//! the caches and the watch mappers read (name, namespace, uid,
//! resourceVersion, generation, owners, deletion) as fields, and the rest as
//! the object's JSON (managed fields left out), decoded only when a
//! reconcile reads it.

use std::borrow::Cow;
use std::marker::PhantomData;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::runtime::reflector::Store;
use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer, Serialize};

/// An object of kind `K` as cached: its identity and owners, and its JSON.
pub struct Compact<K> {
    metadata: ObjectMeta,
    json: Arc<[u8]>,
    kind: PhantomData<fn() -> K>,
}

impl<K> Compact<K>
where
    K: Resource + Serialize + DeserializeOwned,
{
    /// `object` as cached: its identity and owners as fields, the rest
    /// (managed fields left out) as JSON. The fields kept apart are not in
    /// the JSON too: at 1,000 Projects the identities and owner references
    /// of about 10,000 objects would otherwise be held twice.
    pub fn new(mut object: K) -> serde_json::Result<Self> {
        object.meta_mut().managed_fields = None;
        let mut metadata = ObjectMeta::default();
        move_identity(object.meta_mut(), &mut metadata);
        let json = serde_json::to_vec(&object)?.into();
        Ok(Self {
            metadata,
            json,
            kind: PhantomData,
        })
    }

    /// The whole object (as it was cached, managed fields left out).
    pub fn decode(&self) -> serde_json::Result<K> {
        let mut object: K = serde_json::from_slice(&self.json)?;
        move_identity(&mut self.metadata.clone(), object.meta_mut());
        Ok(object)
    }

    /// Changes the object: decoded, changed and encoded again (kept as it
    /// was if it does not decode).
    pub fn modify(&mut self, change: impl FnOnce(&mut K)) {
        if let Ok(mut object) = self.decode() {
            change(&mut object);
            if let Ok(changed) = Compact::new(object) {
                *self = changed;
            }
        }
    }
}

/// Moves what a compact object keeps as fields (name, namespace, uid,
/// resourceVersion, generation, owners, deletion) from `from` to `to`: out
/// of the object before it is encoded, back into it when decoded. One list,
/// so that nothing is kept apart and then not put back.
fn move_identity(from: &mut ObjectMeta, to: &mut ObjectMeta) {
    to.name = from.name.take();
    to.namespace = from.namespace.take();
    to.uid = from.uid.take();
    to.resource_version = from.resource_version.take();
    to.generation = from.generation.take();
    to.owner_references = from.owner_references.take();
    to.deletion_timestamp = from.deletion_timestamp.take();
}

impl<K> Clone for Compact<K> {
    fn clone(&self) -> Self {
        Self {
            metadata: self.metadata.clone(),
            json: self.json.clone(),
            kind: PhantomData,
        }
    }
}

impl<K> std::fmt::Debug for Compact<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compact")
            .field("metadata", &self.metadata)
            .field("json_bytes", &self.json.len())
            .finish()
    }
}

impl<K: Resource> Resource for Compact<K> {
    type DynamicType = K::DynamicType;
    type Scope = K::Scope;

    fn kind(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::version(dt)
    }

    fn api_version(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::api_version(dt)
    }

    fn plural(dt: &Self::DynamicType) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn url_path(dt: &Self::DynamicType, namespace: Option<&str>) -> String {
        K::url_path(dt, namespace)
    }

    fn metadata_api() -> bool {
        K::metadata_api()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Decoded from the API server's JSON as `K`, then made compact: the
/// watch's list and events decode straight into the cache's form.
impl<'de, K> Deserialize<'de> for Compact<K>
where
    K: Resource + Serialize + DeserializeOwned,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let object = K::deserialize(deserializer)?;
        Compact::new(object).map_err(D::Error::custom)
    }
}

/// A cache of compact objects.
pub type CompactStore<K> = Store<Compact<K>>;

/// Looks an object up in a compact cache and decodes it. An object that
/// does not decode (it was encoded from the same type, so only a bug would
/// make one) is logged and taken as absent.
pub fn get<K>(
    store: &CompactStore<K>,
    name: &str,
    namespace: Option<&str>,
    dyntype: K::DynamicType,
) -> Option<Arc<K>>
where
    K: Resource + Serialize + DeserializeOwned + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    decoded(&*crate::context::cached_with(
        store, name, namespace, dyntype,
    )?)
}

/// Every object of a compact cache in `namespace`, decoded.
pub fn in_namespace<K>(store: &CompactStore<K>, namespace: Option<&str>) -> Vec<Arc<K>>
where
    K: Resource + Serialize + DeserializeOwned,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .state()
        .iter()
        .filter(|c| c.metadata.namespace.as_deref() == namespace)
        .filter_map(|c| decoded(c))
        .collect()
}

/// A compact object decoded; one that does not decode is logged and taken
/// as absent.
pub fn decoded<K>(compact: &Compact<K>) -> Option<Arc<K>>
where
    K: Resource + Serialize + DeserializeOwned,
{
    match compact.decode() {
        Ok(object) => Some(Arc::new(object)),
        Err(error) => {
            tracing::error!(
                name = ?compact.metadata.name,
                namespace = ?compact.metadata.namespace,
                %error,
                "a cached object does not decode"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, OwnerReference};
    use kube::api::{ApiResource, DynamicObject};

    fn deployment() -> Deployment {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "production",
                "namespace": "shop",
                "uid": "u1",
                "resourceVersion": "42",
                "generation": 3,
                "deletionTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"kapsa.dev/project": "shop"},
                "annotations": {"kapsa.dev/applied-hash": "0123456789abcdef"},
                "ownerReferences": [{
                    "apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment",
                    "name": "production", "uid": "e1", "controller": true
                }],
                "managedFields": [{"manager": "kapsa", "operation": "Apply"}]
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "shop"}},
                "template": {"spec": {"containers": [{"name": "app", "image": "shop:1"}]}}
            },
            "status": {"availableReplicas": 2}
        }))
        .unwrap()
    }

    #[test]
    fn keeps_identity_and_owners_as_fields_and_the_rest_as_json() {
        let compact = Compact::new(deployment()).unwrap();
        let meta = compact.meta();
        assert_eq!(meta.name.as_deref(), Some("production"));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(meta.uid.as_deref(), Some("u1"));
        assert_eq!(meta.resource_version.as_deref(), Some("42"));
        assert_eq!(meta.generation, Some(3));
        let owners: &[OwnerReference] = meta.owner_references.as_deref().unwrap();
        assert_eq!(owners[0].uid, "e1");
        // Labels and annotations are in the JSON only.
        assert!(meta.labels.is_none() && meta.annotations.is_none());

        let decoded = compact.decode().unwrap();
        let mut expected = deployment();
        expected.metadata.managed_fields = None;
        assert_eq!(decoded, expected);
        assert_eq!(
            decoded.metadata.managed_fields,
            None::<Vec<ManagedFieldsEntry>>
        );
    }

    #[test]
    fn decodes_from_the_api_servers_json_and_looks_up_by_name() {
        let json = serde_json::to_string(&deployment()).unwrap();
        let compact: Compact<Deployment> = serde_json::from_str(&json).unwrap();
        let held = String::from_utf8_lossy(&compact.json).into_owned();
        assert!(!held.contains("managedFields"));
        // Identity and owners are held once, as fields, not in the JSON too.
        for once in [
            "\"name\":\"production\"",
            "\"namespace\"",
            "\"uid\"",
            "\"resourceVersion\"",
            "\"generation\"",
            "\"ownerReferences\"",
        ] {
            assert!(!held.contains(once), "{once} in {held}");
        }

        let (reader, mut writer) = kube::runtime::reflector::store::<Compact<Deployment>>();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(compact));
        let found = get(&reader, "production", Some("shop"), ()).unwrap();
        assert_eq!(found.spec.as_ref().unwrap().replicas, Some(2));
        assert!(get(&reader, "production", Some("other"), ()).is_none());
        assert_eq!(in_namespace(&reader, Some("shop")).len(), 1);
        assert!(in_namespace(&reader, Some("other")).is_empty());
    }

    #[test]
    fn untyped_objects_keep_their_data() {
        let resource = ApiResource {
            group: "kpack.io".into(),
            version: "v1alpha2".into(),
            api_version: "kpack.io/v1alpha2".into(),
            kind: "Image".into(),
            plural: "images".into(),
        };
        let image: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "production", "namespace": "kapsa-build-shop"},
            "spec": {"tag": "registry/shop"},
            "status": {"latestImage": "registry/shop@sha256:00"}
        }))
        .unwrap();
        let compact = Compact::new(image).unwrap();
        let mut writer = kube::runtime::reflector::store::Writer::<Compact<DynamicObject>>::new(
            resource.clone(),
        );
        let reader = writer.as_reader();
        writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply(compact));
        let found = get(&reader, "production", Some("kapsa-build-shop"), resource).unwrap();
        assert_eq!(
            found.data["status"]["latestImage"],
            "registry/shop@sha256:00"
        );
    }
}

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
//! reconcile reads it. A [`CompactStore`] caches such objects, each as one
//! compressed buffer.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::ops::Bound;
use std::sync::{Arc, OnceLock, RwLock};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
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

/// A cache of compact objects: Kapsa's own rather than kube-runtime's
/// `Store`, which keys every object by an `ObjectRef` (name, namespace, uid
/// and resourceVersion as four strings, plus the kind's five for an untyped
/// one) and holds it in an `Arc` box with a whole `ObjectMeta` (about 350
/// bytes however little of it is set). Here an object is one buffer, keyed
/// by `<namespace>/<name>` in a sorted map (a namespace's objects are one
/// range): the JSON of its identity and owners (name and namespace left
/// out: they are the key), then the JSON of the rest, LZ4-compressed.
///
/// The objects of one cache are much alike (Kapsa made them from the same
/// template, for different Projects), so each is compressed against the
/// first object the cache held: a Deployment's 3 KB of JSON become about
/// 300 bytes. A cache of Secrets (Kapsa's credential copies) compresses
/// without that dictionary ([`CompactStore::without_dictionary`]): it
/// would keep the first Secret's data after the Secret is gone.
pub struct CompactStore<K> {
    shared: Arc<Shared>,
    kind: PhantomData<fn() -> K>,
}

struct Shared {
    objects: RwLock<BTreeMap<Box<str>, Held>>,
    /// The first object held, as held before compression (at most
    /// [`DICTIONARY_MAX`] bytes of it); empty when the cache compresses
    /// without a dictionary.
    dictionary: OnceLock<Box<[u8]>>,
}

/// The longest dictionary kept: objects Kapsa makes are a few KB.
const DICTIONARY_MAX: usize = 16 * 1024;

/// One cached object: its identity's JSON, then its body's, compressed
/// (with the uncompressed size first); `split` is where the body begins
/// once decompressed.
struct Held {
    bytes: Box<[u8]>,
    split: u32,
}

impl<K> Clone for CompactStore<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            kind: PhantomData,
        }
    }
}

impl<K> Default for CompactStore<K> {
    fn default() -> Self {
        Self::with_dictionary(OnceLock::new())
    }
}

/// The key of an object in a [`CompactStore`].
fn key(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or_default())
}

impl<K> CompactStore<K> {
    /// A cache whose objects are compressed each on its own (no object's
    /// content is kept as a dictionary).
    pub fn without_dictionary() -> Self {
        Self::with_dictionary(OnceLock::from(Box::default()))
    }

    fn with_dictionary(dictionary: OnceLock<Box<[u8]>>) -> Self {
        Self {
            shared: Arc::new(Shared {
                objects: Default::default(),
                dictionary,
            }),
            kind: PhantomData,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<Box<str>, Held>> {
        self.shared
            .objects
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<Box<str>, Held>> {
        self.shared
            .objects
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The dictionary objects were compressed with (none yet: no object
    /// was held, so none is compressed).
    fn dictionary(&self) -> &[u8] {
        self.shared.dictionary.get().map_or(&[], |d| d)
    }

    /// How many objects are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no object is held.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether an object named `name` in `namespace` is held.
    pub fn contains(&self, name: &str, namespace: Option<&str>) -> bool {
        self.read().contains_key(key(namespace, name).as_str())
    }

    /// What fills this cache from its watch's events.
    pub fn writer(&self) -> CompactWriter<K> {
        CompactWriter {
            store: self.clone(),
            listing: None,
        }
    }

    /// The bytes held of all objects, compressed.
    #[cfg(test)]
    fn held_bytes(&self) -> usize {
        self.read().values().map(|held| held.bytes.len()).sum()
    }
}

impl<K> CompactStore<K>
where
    K: Resource + Serialize + DeserializeOwned,
{
    /// The object named `name` in `namespace`, decoded. One that does not
    /// decode (only a bug would make one: it was encoded from the same
    /// type) is logged and taken as absent.
    pub fn get(&self, name: &str, namespace: Option<&str>) -> Option<Arc<K>> {
        let key = key(namespace, name);
        let objects = self.read();
        objects.get(key.as_str())?.decode(&key, self.dictionary())
    }

    /// Every object in `namespace`, decoded.
    pub fn in_namespace(&self, namespace: Option<&str>) -> Vec<Arc<K>> {
        let prefix = key(namespace, "");
        let objects = self.read();
        objects
            .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix.as_str()))
            .filter_map(|(key, held)| held.decode(key, self.dictionary()))
            .collect()
    }

    /// Every object held, as compact objects (for the deletes a relisting
    /// hides: `run::with_relist_deletes`).
    pub fn state(&self) -> Vec<Arc<Compact<K>>> {
        let objects = self.read();
        objects
            .iter()
            .filter_map(|(key, held)| held.compact(key, self.dictionary()).map(Arc::new))
            .collect()
    }
}

impl Held {
    fn new<K>(compact: &Compact<K>, dictionary: &OnceLock<Box<[u8]>>) -> serde_json::Result<Self> {
        let mut identity = compact.metadata.clone();
        identity.name = None;
        identity.namespace = None;
        let mut plain = serde_json::to_vec(&identity)?;
        let split = u32::try_from(plain.len()).map_err(serde_json::Error::custom)?;
        plain.extend_from_slice(&compact.json);
        let dictionary = dictionary.get_or_init(|| plain[..plain.len().min(DICTIONARY_MAX)].into());
        Ok(Self {
            bytes: lz4_flex::block::compress_prepend_size_with_dict(&plain, dictionary)
                .into_boxed_slice(),
            split,
        })
    }

    /// The object as held before compression, or why it does not
    /// decompress (only a bug would make one).
    fn plain(&self, key: &str, dictionary: &[u8]) -> Option<Vec<u8>> {
        lz4_flex::block::decompress_size_prepended_with_dict(&self.bytes, dictionary)
            .inspect_err(|error| {
                tracing::error!(%key, %error, "a cached object does not decompress");
            })
            .ok()
            .filter(|plain| plain.len() >= self.split as usize)
    }

    /// The identity of the object held under `key` (from its uncompressed
    /// bytes), with its name and namespace put back.
    fn metadata(key: &str, identity: &[u8]) -> serde_json::Result<ObjectMeta> {
        let mut metadata: ObjectMeta = serde_json::from_slice(identity)?;
        let (namespace, name) = key.split_once('/').unwrap_or(("", key));
        metadata.name = Some(name.to_string());
        metadata.namespace = (!namespace.is_empty()).then(|| namespace.to_string());
        Ok(metadata)
    }

    /// The compact object held under `key`.
    fn compact<K>(&self, key: &str, dictionary: &[u8]) -> Option<Compact<K>> {
        let plain = self.plain(key, dictionary)?;
        let (identity, json) = plain.split_at(self.split as usize);
        Some(Compact {
            metadata: Self::metadata(key, identity).ok()?,
            json: json.into(),
            kind: PhantomData,
        })
    }

    /// The object held under `key`, decoded; one that does not decode (only
    /// a bug would make one: it was encoded from the same type) is logged
    /// and taken as absent.
    fn decode<K: Resource + DeserializeOwned>(
        &self,
        key: &str,
        dictionary: &[u8],
    ) -> Option<Arc<K>> {
        let plain = self.plain(key, dictionary)?;
        let (identity, json) = plain.split_at(self.split as usize);
        let decoded = Self::metadata(key, identity).and_then(|mut metadata| {
            let mut object: K = serde_json::from_slice(json)?;
            move_identity(&mut metadata, object.meta_mut());
            Ok(object)
        });
        match decoded {
            Ok(object) => Some(Arc::new(object)),
            Err(error) => {
                tracing::error!(%key, %error, "a cached object does not decode");
                None
            }
        }
    }
}

/// Fills a [`CompactStore`] from its watch's events. A listing is built
/// aside and replaces what was held when it ends, as kube's reflector does:
/// until then readers see the previous contents.
pub struct CompactWriter<K> {
    store: CompactStore<K>,
    listing: Option<BTreeMap<Box<str>, Held>>,
}

/// The key of a compact object in a [`CompactStore`].
fn key_of<K>(compact: &Compact<K>) -> String {
    key(
        compact.metadata.namespace.as_deref(),
        compact.metadata.name.as_deref().unwrap_or_default(),
    )
}

impl<K> CompactWriter<K> {
    /// The cache this fills.
    pub fn store(&self) -> CompactStore<K> {
        self.store.clone()
    }

    pub fn apply(&mut self, event: &kube::runtime::watcher::Event<Compact<K>>) {
        use kube::runtime::watcher::Event;
        let dictionary = &self.store.shared.dictionary;
        let entry = |compact: &Compact<K>| {
            let key = key_of(compact);
            match Held::new(compact, dictionary) {
                Ok(held) => Some((key.into_boxed_str(), held)),
                Err(error) => {
                    tracing::error!(%key, %error, "an object could not be cached");
                    None
                }
            }
        };
        match event {
            Event::Init => self.listing = Some(BTreeMap::new()),
            Event::InitApply(compact) => {
                if let (Some(listing), Some((key, held))) = (self.listing.as_mut(), entry(compact))
                {
                    listing.insert(key, held);
                }
            }
            Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    *self.store.write() = listing;
                }
            }
            Event::Apply(compact) => {
                if let Some((key, held)) = entry(compact) {
                    self.store.write().insert(key, held);
                }
            }
            Event::Delete(compact) => {
                self.store.write().remove(key_of(compact).as_str());
            }
        }
    }
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
    use kube::api::DynamicObject;

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

        let store = CompactStore::<Deployment>::default();
        store
            .writer()
            .apply(&kube::runtime::watcher::Event::Apply(compact));
        let found = store.get("production", Some("shop")).unwrap();
        assert_eq!(found.spec.as_ref().unwrap().replicas, Some(2));
        // What the store gives back is the whole object, identity included.
        let mut expected = deployment();
        expected.metadata.managed_fields = None;
        assert_eq!(*found, expected);
        assert!(store.get("production", Some("other")).is_none());
        assert_eq!(store.in_namespace(Some("shop")).len(), 1);
        assert!(store.in_namespace(Some("other")).is_empty());
        // As a compact object again (for the deletes a relisting hides).
        let held = store.state();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].decode().unwrap(), expected);
    }

    fn named(name: &str, namespace: &str) -> Compact<Deployment> {
        let mut deployment = deployment();
        deployment.metadata.name = Some(name.into());
        deployment.metadata.namespace = Some(namespace.into());
        Compact::new(deployment).unwrap()
    }

    #[test]
    fn a_namespace_is_its_own_objects_only_and_deletes_are_forgotten() {
        use kube::runtime::watcher::Event;
        let store = CompactStore::<Deployment>::default();
        let mut writer = store.writer();
        for (name, namespace) in [("a", "shop"), ("b", "shop"), ("a", "shop-2"), ("a", "sho")] {
            writer.apply(&Event::Apply(named(name, namespace)));
        }
        let names = |namespace| {
            store
                .in_namespace(Some(namespace))
                .iter()
                .map(|d| d.metadata.name.clone().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("shop"), ["a", "b"]);
        assert_eq!(names("shop-2"), ["a"]);
        assert_eq!(names("sho"), ["a"]);
        writer.apply(&Event::Delete(named("a", "shop")));
        assert_eq!(names("shop"), ["b"]);
        assert!(store.get("a", Some("shop")).is_none());
        assert_eq!(store.len(), 3);
    }

    #[test]
    fn objects_alike_are_held_in_a_fraction_of_their_json() {
        use kube::runtime::watcher::Event;
        let json_of = |compact: &Compact<Deployment>| compact.json.len();
        for store in [
            CompactStore::<Deployment>::default(),
            CompactStore::without_dictionary(),
        ] {
            let mut writer = store.writer();
            writer.apply(&Event::Apply(named("first", "shop")));
            let first = store.held_bytes();
            let mut json = 0;
            for i in 0..10 {
                let other = named("production", &format!("shop-{i}"));
                json += json_of(&other);
                writer.apply(&Event::Apply(other));
            }
            let held = store.held_bytes() - first;
            // Against the first object, each is held in a fraction of its
            // JSON (identity included); on its own, no such gain.
            let dictionary = !store.dictionary().is_empty();
            assert_eq!(held * 3 < json, dictionary, "{held} of {json}");
            // Whatever the compression, every object comes back whole.
            for i in 0..10 {
                let namespace = format!("shop-{i}");
                let found = store.get("production", Some(&namespace)).unwrap();
                assert_eq!(
                    found.metadata.namespace.as_deref(),
                    Some(namespace.as_str())
                );
                assert_eq!(found.metadata.uid.as_deref(), Some("u1"));
                assert_eq!(found.spec, deployment().spec);
            }
        }
    }

    #[test]
    fn a_cache_without_a_dictionary_keeps_nothing_of_its_first_object() {
        use kube::runtime::watcher::Event;
        let store = CompactStore::<Deployment>::without_dictionary();
        let mut writer = store.writer();
        writer.apply(&Event::Apply(named("first", "shop")));
        writer.apply(&Event::Delete(named("first", "shop")));
        assert!(store.is_empty());
        assert!(store.dictionary().is_empty());
        let with = CompactStore::<Deployment>::default();
        with.writer().apply(&Event::Apply(named("first", "shop")));
        assert!(!with.dictionary().is_empty());
    }

    #[test]
    fn a_listing_replaces_what_was_held_when_it_ends() {
        use kube::runtime::watcher::Event;
        let store = CompactStore::<Deployment>::default();
        let mut writer = store.writer();
        writer.apply(&Event::Apply(named("old", "shop")));
        writer.apply(&Event::Init);
        writer.apply(&Event::InitApply(named("new", "shop")));
        // Until the listing ends, readers see what was held.
        assert!(store.get("old", Some("shop")).is_some());
        assert!(store.get("new", Some("shop")).is_none());
        writer.apply(&Event::InitDone);
        assert!(store.get("old", Some("shop")).is_none());
        assert!(store.get("new", Some("shop")).is_some());
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn untyped_objects_keep_their_data() {
        let image: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "production", "namespace": "kapsa-build-shop"},
            "spec": {"tag": "registry/shop"},
            "status": {"latestImage": "registry/shop@sha256:00"}
        }))
        .unwrap();
        let compact = Compact::new(image).unwrap();
        let store = CompactStore::<DynamicObject>::default();
        store
            .writer()
            .apply(&kube::runtime::watcher::Event::Apply(compact));
        let found = store.get("production", Some("kapsa-build-shop")).unwrap();
        assert_eq!(
            found.data["status"]["latestImage"],
            "registry/shop@sha256:00"
        );
    }
}

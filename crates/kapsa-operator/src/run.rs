//! Wiring: caches, the two controllers, the git poller, metrics and health
//! endpoints, and leader election.
//!
//! Every read of a reconcile comes from a cache filled here, and every cache
//! that a reconcile reads also triggers the reconciles that depend on it, so
//! a change reaches them within seconds (not at the next resync).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Pod, ResourceQuota, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kapsa_api::project::{BuildStrategy, RegistryKind};
use kapsa_api::{ClusterRegistry, DomainPool, Environment, Project, Registry};
use kube::api::{Api, ApiResource, DynamicObject, PartialObjectMeta};
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::apply::Applier;
use crate::children::ChildKey;
use crate::compact::{Compact, CompactStore};
use crate::context::{Context, GitState, Installed, Stores};
use crate::http::Health;
use crate::leader::LeaseConfig;
use crate::metrics::Metrics;
use crate::resources::environment::{
    certificate_api_resource, http_route_api_resource, kpack_image_api_resource,
    listener_set_api_resource, service_monitor_api_resource,
};
use crate::resources::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
use crate::synced::{Readiness, Synced};
use crate::{controllers, poller};

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None` serves nothing.
    pub metrics_addr: Option<SocketAddr>,
    /// Leader election; `None` runs as the only replica.
    pub lease: Option<LeaseConfig>,
    /// Reconciles running at once, per controller. Bounded: unbounded
    /// concurrency at start-up has OOM-killed kube-rs operators.
    pub concurrency: u16,
    /// The internal addresses (loopback, private ranges, ...) that Projects'
    /// git URLs may reach; none by default.
    pub allow_internal_git_hosts: crate::git::HostPolicy,
    /// The Pod Security Standard enforced in project namespaces whose
    /// DomainPool sets none (`spec.podSecurity`).
    pub pod_security: kapsa_api::domain_pool::PodSecurityLevel,
    /// Namespace of the host-ownership table (ConfigMap `kapsa-host-owners`)
    /// that the shipped ValidatingAdmissionPolicy reads; `None` keeps none.
    pub host_owners_namespace: Option<String>,
    /// Poll every repository at least this often, whatever its
    /// `pollInterval` says (for development and tests: the CRD's minimum
    /// is 10 s); `None` honours each Project's interval.
    pub max_poll_interval: Option<std::time::Duration>,
    /// What Dockerfile build Jobs run (rootless BuildKit) and where.
    pub build_pods: crate::resources::environment::BuildPods,
    /// Use registries with `insecure: true` that are not on loopback
    /// (refused by default: push credentials would cross the network
    /// without TLS verification).
    pub allow_insecure_registries: bool,
    /// The longest a Project, Environment or DomainPool goes without a
    /// reconcile when nothing changes (each reconcile of an object at rest
    /// reads caches only and writes nothing).
    pub resync_period: std::time::Duration,
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            metrics_addr: None,
            lease: None,
            concurrency: 16,
            allow_internal_git_hosts: crate::git::HostPolicy::none(),
            pod_security: kapsa_api::domain_pool::PodSecurityLevel::Restricted,
            host_owners_namespace: None,
            max_poll_interval: None,
            build_pods: Default::default(),
            allow_insecure_registries: false,
            resync_period: controllers::RESYNC,
        }
    }
}

/// Objects per page of a cache's first listing (kube's default is 500). A
/// page is held whole, as decoded objects and as the response it came in,
/// until the cache has taken it; the caches list at once when the operator
/// starts, so at 1,000 Projects pages of 500 made a restarted operator's
/// peak memory about a third higher than at rest (docs/benchmarks.md). A
/// page of 100 is ten requests per kind at 1,000 Projects.
const LIST_PAGE: u32 = 100;

/// How every cache watches: its first listing in pages of [`LIST_PAGE`].
fn listing() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE)
}

fn managed() -> watcher::Config {
    listing().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"))
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = T> + Send>>;
type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;
type EventStream<K> = BoxStream<Result<watcher::Event<K>, watcher::Error>>;
type ObjectStream<K> = BoxStream<Result<K, watcher::Error>>;

/// The watch events of a kind with a Rust type, as they come.
fn watch<K>(api: Api<K>, config: watcher::Config) -> EventStream<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, config).backoff(watch_backoff()).boxed()
}

/// The longest wait between two attempts of a watch (before jitter).
pub const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How a broken watch is retried: from 0.5 s, doubling, at most
/// [`WATCH_BACKOFF_MAX`] (with jitter, up to twice that), reset after a
/// minute without errors. kube's default goes up to 30 s (60 s with
/// jitter), which after an API server outage of a few seconds left caches
/// stale for more than a minute (tests/missed_events.rs); a handful of
/// watches retrying every few seconds is no load for an API server.
fn watch_backoff() -> kube::runtime::utils::ResetTimerBackoff<watcher::ExponentialBackoff> {
    kube::runtime::utils::ResetTimerBackoff::new(
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(500))
            .with_max_delay(WATCH_BACKOFF_MAX)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .into(),
        Duration::from_secs(60),
    )
}

/// Deletes that a relist hides. When a watch must list again (`410 Gone`
/// after an API server restart, say), an object deleted meanwhile is simply
/// not in the new list: kube's reflector drops it from the cache without an
/// event, so nothing tells its owner, whose cache-only reconcile would not
/// run again until its next resync. This passes the new list through and,
/// at its end, a `Delete` for every object the cache held that the list no
/// longer has (before `InitDone`): the cache forgets it and its owner is
/// reconciled, as for a delete the watch saw.
fn with_relist_deletes<K>(
    events: EventStream<K>,
    held: impl Fn() -> Vec<Arc<K>> + Send + 'static,
) -> EventStream<K>
where
    K: Resource + Clone + Send + Sync + 'static,
{
    type Key = (Option<String>, String);
    let key = |o: &K| (o.meta().namespace.clone(), o.name_any());
    let mut listing: Option<std::collections::HashMap<Key, Arc<K>>> = None;
    events
        .flat_map(move |event| {
            let out: Vec<Result<watcher::Event<K>, watcher::Error>> = match event {
                Ok(watcher::Event::Init) => {
                    listing = Some(held().into_iter().map(|o| (key(&o), o)).collect());
                    vec![Ok(watcher::Event::Init)]
                }
                Ok(watcher::Event::InitApply(o)) => {
                    if let Some(held) = listing.as_mut() {
                        held.remove(&key(&o));
                    }
                    vec![Ok(watcher::Event::InitApply(o))]
                }
                Ok(watcher::Event::InitDone) => listing
                    .take()
                    .unwrap_or_default()
                    .into_values()
                    .map(|gone| Ok(watcher::Event::Delete(gone.as_ref().clone())))
                    .chain([Ok(watcher::Event::InitDone)])
                    .collect(),
                other => vec![other],
            };
            futures::stream::iter(out)
        })
        .boxed()
}

/// The watch events of one of Kapsa's own kinds, decoded object by object:
/// one that does not decode (written under an older schema, say) is
/// reported ([`Malformed`]) and skipped, and every other object is cached
/// and reconciled as usual. (A typed watch would fail its whole listing on
/// one such object and stop the operator for everyone.) A malformed edit of
/// an object Kapsa had read keeps the last version it could read.
fn decoded<K>(client: &Client, malformed: Malformed) -> EventStream<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let resource = ApiResource::erase::<K>(&());
    // Any object that decoded: with the metadata of an undecodable one, it
    // removes that one from the cache when it is deleted (the cache keys on
    // metadata only). No second copy of the objects is kept.
    let template: Arc<std::sync::Mutex<Option<K>>> = Default::default();
    watcher(
        Api::<DynamicObject>::all_with(client.clone(), &resource),
        listing(),
    )
    .backoff(watch_backoff())
    .try_filter_map(move |event| {
        let decode = |o: DynamicObject, deleting: bool| -> Option<K> {
            match serde_json::to_value(&o).and_then(serde_json::from_value::<K>) {
                Ok(object) => {
                    if let Ok(mut template) = template.lock()
                        && template.is_none()
                    {
                        *template = Some(object.clone());
                    }
                    Some(object)
                }
                Err(error) => {
                    malformed.report(&resource, &o, &error);
                    if !deleting {
                        return None;
                    }
                    let mut tombstone = template.lock().ok()?.clone()?;
                    *tombstone.meta_mut() = o.metadata;
                    Some(tombstone)
                }
            }
        };
        let event = match event {
            watcher::Event::Apply(o) => decode(o, false).map(watcher::Event::Apply),
            watcher::Event::InitApply(o) => decode(o, false).map(watcher::Event::InitApply),
            watcher::Event::Delete(o) => decode(o, true).map(watcher::Event::Delete),
            watcher::Event::Init => Some(watcher::Event::Init),
            watcher::Event::InitDone => Some(watcher::Event::InitDone),
        };
        futures::future::ready(Ok(event))
    })
    .boxed()
}

/// Reports objects of Kapsa's kinds that this operator cannot read: a log
/// line and a Warning Event on the object, once per version.
#[derive(Clone)]
struct Malformed {
    reports:
        tokio::sync::mpsc::UnboundedSender<(k8s_openapi::api::core::v1::ObjectReference, String)>,
    seen: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Malformed {
    /// The reporter and the task that publishes its Events through
    /// `events` (the reconcilers' publisher: one memory of series).
    fn new(events: Arc<crate::events::Publisher>) -> (Self, BoxFuture) {
        let (reports, mut rx) = tokio::sync::mpsc::unbounded_channel::<(
            k8s_openapi::api::core::v1::ObjectReference,
            String,
        )>();
        let publisher = async move {
            while let Some((object, note)) = rx.recv().await {
                let event = kube::runtime::events::Event {
                    type_: kube::runtime::events::EventType::Warning,
                    reason: "Malformed".into(),
                    note: Some(note),
                    action: "Decode".into(),
                    secondary: None,
                };
                if let Err(error) = events.publish(&event, &object).await {
                    tracing::warn!(%error, "publishing a Malformed Event failed");
                }
            }
        };
        (
            Self {
                reports,
                seen: Default::default(),
            },
            Box::pin(publisher),
        )
    }

    fn report(&self, resource: &ApiResource, object: &DynamicObject, error: &serde_json::Error) {
        let version = format!(
            "{}/{}",
            object.uid().unwrap_or_default(),
            object.resource_version().unwrap_or_default()
        );
        if let Ok(mut seen) = self.seen.lock() {
            if seen.len() > 10_000 {
                seen.clear();
            }
            if !seen.insert(version) {
                return;
            }
        }
        let mut message = error.to_string();
        message.truncate(512);
        tracing::warn!(
            kind = %resource.kind,
            namespace = ?object.namespace(),
            name = %object.name_any(),
            error = %message,
            "skipping an object this operator cannot read"
        );
        let note = format!(
            "{} {} cannot be read by this version of Kapsa and is skipped until it is fixed: {message}",
            resource.kind,
            object.name_any()
        );
        let _ = self.reports.send((object.object_ref(resource), note));
    }
}

/// What a cache is filled through: kube-runtime's `Writer` for the caches
/// of whole objects, [`crate::compact::CompactWriter`] for the compact ones.
trait Fills<K>: Send + 'static {
    /// The cache's read side.
    type Reader: Clone + Send + 'static;
    fn reader(&self) -> Self::Reader;
    /// Everything `reader` holds (for the deletes a relisting hides).
    fn held(reader: &Self::Reader) -> Vec<Arc<K>>;
    fn apply(&mut self, event: &watcher::Event<K>);
}

impl<K> Fills<K> for reflector::store::Writer<K>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    type Reader = Store<K>;

    fn reader(&self) -> Store<K> {
        self.as_reader()
    }

    fn held(reader: &Store<K>) -> Vec<Arc<K>> {
        reader.state()
    }

    fn apply(&mut self, event: &watcher::Event<K>) {
        self.apply_watcher_event(event);
    }
}

impl<K> Fills<Compact<K>> for crate::compact::CompactWriter<K>
where
    K: Resource + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Reader = CompactStore<K>;

    fn reader(&self) -> CompactStore<K> {
        self.store()
    }

    fn held(reader: &CompactStore<K>) -> Vec<Arc<Compact<K>>> {
        reader.state()
    }

    fn apply(&mut self, event: &watcher::Event<Compact<K>>) {
        crate::compact::CompactWriter::apply(self, event);
    }
}

/// A cache, filled through `writer`, and the watch stream that fills it (it
/// must be polled): owner-checked where `owners` is given, relist deletes
/// added, managed fields pruned and `trim` applied before the cache sees an
/// object; then every object touched, for the controllers. Objects the
/// watch sees deleted are forgotten by the applier, so a child deleted by
/// hand is recreated at once.
#[allow(clippy::too_many_arguments)]
fn cache<K, W>(
    api: Api<K>,
    config: watcher::Config,
    resource: ApiResource,
    mut writer: W,
    trim: fn(&mut K),
    applier: Arc<Applier>,
    owners: Option<Owners>,
) -> (W::Reader, Synced, ObjectStream<K>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Clone,
    W: Fills<K>,
{
    let reader = writer.reader();
    let held = reader.clone();
    let (synced, mark) = Synced::new();
    let events = watcher(api, config).backoff(watch_backoff());
    let events: EventStream<K> = match owners {
        None => events.boxed(),
        Some(owners) => owners.admit(events),
    };
    let events = crate::fault::delayed(&resource.plural, events);
    let kind = resource.kind.clone();
    let stream = with_relist_deletes(events, move || W::held(&held))
        .inspect(move |event| match event {
            Ok(watcher::Event::Init) => tracing::debug!(kind, "cache: listing"),
            Err(error) => tracing::debug!(kind, %error, "cache: watch error"),
            _ => {}
        })
        .inspect_ok(move |event| {
            if let watcher::Event::Delete(object) = event {
                applier.forget(&ChildKey::new(
                    &resource,
                    object.meta().namespace.as_deref(),
                    &object.name_any(),
                ));
            }
        })
        .modify(move |o: &mut K| {
            o.managed_fields_mut().clear();
            trim(o);
        })
        .inspect_ok(move |event| {
            writer.apply(event);
            mark.seen(event);
        })
        // Deletes too: a child deleted by hand brings its owner back at once.
        .touched_objects()
        // The watcher retries by itself (its backoff); its errors, logged
        // above, are not passed on to the controller.
        .filter(|item| futures::future::ready(item.is_ok()));
    (reader, synced, stream.boxed())
}

/// Kapsa's Projects and Environments, to check that an object claiming to be
/// Kapsa's really is before it is cached.
#[derive(Clone)]
struct Owners {
    projects: Store<Project>,
    environments: Store<Environment>,
    projects_synced: Synced,
    environments_synced: Synced,
}

impl Owners {
    /// Whether Kapsa made this object: its controller is a Project or
    /// Environment that exists with that uid, and it is where (and, for an
    /// Environment's children, named as) that owner puts its children. A
    /// label and an owner reference are both writable by a tenant; this
    /// bounds what a tenant can make Kapsa cache to the objects Kapsa itself
    /// would make, one per name.
    fn owns(&self, meta: &ObjectMeta) -> bool {
        let Some(owner) = meta
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.controller == Some(true))
        else {
            return false;
        };
        if !owner.api_version.starts_with("kapsa.dev/") {
            return false;
        }
        // Until Projects and Environments are listed, an owner cannot be
        // looked up: Kapsa's label and owner reference must do. That is the
        // start-up listing only; afterwards every owner is checked.
        let starting = !self.projects_synced.is_synced() || !self.environments_synced.is_synced();
        let uid_matches = |uid: Option<String>| uid.as_deref() == Some(owner.uid.as_str());
        match owner.kind.as_str() {
            "Environment" => {
                let Some(namespace) = meta.namespace.as_deref() else {
                    return false;
                };
                meta.name.as_deref() == Some(owner.name.as_str())
                    && match self
                        .environments
                        .get(&ObjectRef::new(&owner.name).within(namespace))
                    {
                        Some(e) => uid_matches(e.uid()),
                        None => starting,
                    }
            }
            "Project" => match self.projects.get(&ObjectRef::new(&owner.name)) {
                Some(p) => {
                    uid_matches(p.uid())
                        && meta.namespace.as_deref().is_some_and(|ns| {
                            ns == crate::resources::project::namespace_name(&p)
                                || ns == crate::resources::project::build_namespace_name(&p)
                        })
                }
                None => starting,
            },
            _ => false,
        }
    }

    /// The events of a watch of Kapsa's children, with everything Kapsa did
    /// not make left out (an object that stops qualifying leaves the cache).
    fn admit<K>(
        self,
        events: impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
    ) -> EventStream<K>
    where
        K: Resource + Send + 'static,
    {
        events
            .try_filter_map(move |event| {
                let event = match event {
                    watcher::Event::Apply(o) if !self.owns(o.meta()) => {
                        Some(watcher::Event::Delete(o))
                    }
                    watcher::Event::InitApply(o) if !self.owns(o.meta()) => None,
                    other => Some(other),
                };
                futures::future::ready(Ok(event))
            })
            .boxed()
    }
}

/// A cache read by both controllers: the store, the driver that fills it
/// (it must be polled) and two subscriptions to its changes.
#[allow(clippy::type_complexity)]
fn shared_cache<K>(
    events: EventStream<K>,
    dyntype: K::DynamicType,
    trim: fn(&mut K),
    applier: Arc<Applier>,
    subscribers: &[Changes],
) -> anyhow::Result<(Store<K>, Synced, BoxFuture, Vec<BoxStream<Arc<K>>>)>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Default + Send + Sync,
{
    let writer = reflector::store::Writer::new_shared(1024, dyntype);
    let store = writer.as_reader();
    let (synced, mark) = Synced::new();
    // Subscribers hear of applied objects only; deletes (a pool removed, a
    // production Environment deleted by hand) are sent alongside.
    let mut senders = Vec::with_capacity(subscribers.len());
    let mut streams = Vec::with_capacity(subscribers.len());
    for changes in subscribers {
        let (deleted, mut deletes) = tokio::sync::mpsc::unbounded_channel::<Arc<K>>();
        let subscriber = writer
            .subscribe()
            .ok_or_else(|| anyhow::anyhow!("subscribe"))?;
        let subscriber = match changes {
            Changes::All => subscriber.boxed(),
            Changes::Spec => spec_changes(subscriber),
        };
        let deletes = futures::stream::poll_fn(move |cx| deletes.poll_recv(cx));
        senders.push(deleted);
        streams.push(futures::stream::select(subscriber, deletes).boxed());
    }
    let events =
        crate::fault::delayed(&ApiResource::erase::<K>(&Default::default()).plural, events);
    let held = store.clone();
    let driver = with_relist_deletes(events, move || held.state())
        .modify(move |o: &mut K| {
            o.managed_fields_mut().clear();
            trim(o);
        })
        .inspect_ok(move |event| {
            if let watcher::Event::Delete(object) = event {
                applier.forget(&ChildKey::new(
                    &ApiResource::erase::<K>(&Default::default()),
                    object.meta().namespace.as_deref(),
                    &object.name_any(),
                ));
                let object = Arc::new(object.clone());
                for sender in &senders {
                    let _ = sender.send(object.clone());
                }
            }
        })
        .reflect_shared(writer)
        .inspect_ok(move |event| mark.seen(event))
        .for_each(|_| async {});
    Ok((store, synced, Box::pin(driver), streams))
}

/// Which changes of a [`shared_cache`]'s objects one subscriber hears of
/// (deletes always).
#[derive(Clone, Copy, Debug)]
enum Changes {
    /// Every change.
    All,
    /// Changes of `metadata.generation` only: the spec, or a deletion
    /// begun. For a controller that reads nothing else of these objects,
    /// as the Projects and Environments of a DomainPool: the pool's status
    /// (its allocation count) changes with every Project allocated, and
    /// each change would otherwise reconcile every Project and Environment.
    Spec,
}

/// `objects` without those whose `metadata.generation` did not change
/// since the last one with the same uid that passed (an object made again
/// under the same name is a new uid, and passes).
fn spec_changes<K>(objects: impl Stream<Item = Arc<K>> + Send + 'static) -> BoxStream<Arc<K>>
where
    K: Resource + Send + Sync + 'static,
{
    let mut seen: HashMap<String, Option<i64>> = HashMap::new();
    objects
        .filter(move |object| {
            let meta = object.meta();
            let changed = match &meta.uid {
                Some(uid) => seen.insert(uid.clone(), meta.generation) != Some(meta.generation),
                None => true,
            };
            futures::future::ready(changed)
        })
        .boxed()
}

/// The subscriber streams of a [`shared_cache`], as an array.
fn subscribers<K, const N: usize>(
    streams: Vec<BoxStream<Arc<K>>>,
) -> anyhow::Result<[BoxStream<Arc<K>>; N]> {
    streams
        .try_into()
        .map_err(|v: Vec<_>| anyhow::anyhow!("{} subscribers, not {N}", v.len()))
}

/// Keeps a cached object whole.
fn keep_all<K>(_: &mut K) {}

/// The annotation in which `kubectl apply` keeps a second, whole copy of
/// what it applied.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Kapsa's own kinds are cached whole except for `kubectl apply`'s copy of
/// the object in an annotation (which no plan reads): a Project or
/// Environment applied with kubectl would otherwise be held twice.
fn without_last_applied<K: Resource>(object: &mut K) {
    let annotations = &mut object.meta_mut().annotations;
    if let Some(map) = annotations.as_mut() {
        map.remove(LAST_APPLIED);
        if map.is_empty() {
            *annotations = None;
        }
    }
}

/// Of a Secret's, ConfigMap's, builder's or issuer's metadata only what
/// says it exists and when it changed is kept: its name, namespace, uid,
/// resourceVersion and deletion. No plan reads their labels, annotations
/// (which can hold the whole object:
/// `kubectl.kubernetes.io/last-applied-configuration`) or owners, and at
/// 1,000 Projects these caches hold a few thousand objects.
fn metadata_only<K>(object: &mut PartialObjectMeta<K>) {
    let meta = &mut object.metadata;
    *meta = ObjectMeta {
        name: meta.name.take(),
        namespace: meta.namespace.take(),
        uid: meta.uid.take(),
        resource_version: meta.resource_version.take(),
        deletion_timestamp: meta.deletion_timestamp.take(),
        ..ObjectMeta::default()
    };
}

/// Of an Ingress only its hosts and owners are kept.
fn ingress_hosts_only(ingress: &mut Ingress) {
    use k8s_openapi::api::networking::v1::{IngressRule, IngressSpec, IngressTLS};
    ingress.metadata.annotations = None;
    ingress.metadata.labels = None;
    ingress.status = None;
    if let Some(spec) = ingress.spec.take() {
        ingress.spec = Some(IngressSpec {
            rules: spec.rules.map(|rules| {
                rules
                    .into_iter()
                    .map(|r| IngressRule {
                        host: r.host,
                        http: None,
                    })
                    .collect()
            }),
            tls: spec.tls.map(|tls| {
                tls.into_iter()
                    .map(|t| IngressTLS {
                        hosts: t.hosts,
                        secret_name: None,
                    })
                    .collect()
            }),
            ..IngressSpec::default()
        });
    }
}

/// Of a build Pod only its labels, owners and its containers' terminated
/// states are kept (the digest or the end of the log is in the message).
fn trim_build_pod(pod: &mut Pod) {
    pod.metadata.annotations = None;
    pod.spec = None;
    if let Some(status) = pod.status.take() {
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: status.phase,
            container_statuses: status.container_statuses.map(|statuses| {
                statuses
                    .into_iter()
                    .map(|c| k8s_openapi::api::core::v1::ContainerStatus {
                        name: c.name,
                        state: c.state,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        });
    }
}

/// Of a Namespace's annotations only Kapsa's own are kept.
fn namespace_metadata(object: &mut PartialObjectMeta<Namespace>) {
    if let Some(annotations) = object.metadata.annotations.as_mut() {
        annotations.retain(|k, _| k.starts_with("kapsa.dev/"));
    }
}

/// Certificates are cached unfiltered (cert-manager makes the per-host ones),
/// so of those Kapsa does not manage only the name, owners and Ready
/// condition are kept: memory stays flat however many other Certificates
/// the cluster holds.
fn trim_certificate(certificate: &mut Compact<DynamicObject>) {
    certificate.modify(trim_certificate_object);
}

fn trim_certificate_object(certificate: &mut DynamicObject) {
    let managed = certificate
        .labels()
        .get(MANAGED_BY_LABEL)
        .is_some_and(|v| v == MANAGED_BY_VALUE);
    if managed {
        return;
    }
    let conditions = certificate.data["status"]["conditions"].take();
    certificate.data = serde_json::json!({"status": {"conditions": conditions}});
    certificate.metadata.annotations = None;
    certificate.metadata.labels = None;
}

/// Whether the cluster serves `resource` (an optional integration).
async fn serves(client: &Client, resource: &ApiResource) -> bool {
    match client.list_api_group_resources(&resource.api_version).await {
        Ok(list) => list.resources.iter().any(|r| r.name == resource.plural),
        Err(error) => {
            tracing::info!(api = %resource.api_version, %error, "optional API not served");
            false
        }
    }
}

/// Runs the operator until `shutdown` completes (or leadership is lost).
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let health = Arc::new(Health::default());
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
        tokio::spawn(crate::http::serve(
            listener,
            metrics.clone(),
            health.clone(),
        ));
    }
    metrics.set_leader(config.lease.is_none());
    if let Some(lease) = &config.lease {
        lease.report_leadership(metrics.leader_gauge());
        health.set_standby(true);
        crate::leader::acquire(&client, lease).await;
        health.set_standby(false);
    }
    let lost_leadership = {
        let (client, lease) = (client.clone(), config.lease.clone());
        async move {
            match lease {
                Some(lease) => crate::leader::hold(&client, &lease).await,
                None => futures::future::pending().await,
            }
        }
    };
    let stop = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = lost_leadership => {}
        }
    };
    let stop: Stop = futures::future::FutureExt::shared(Box::pin(stop));
    loop {
        match run_once(&client, &config, &metrics, &health, stop.clone()).await? {
            Ended::Stopped => return Ok(()),
            Ended::OptionalApisChanged => {
                tracing::info!("starting again with the optional APIs the cluster serves now");
            }
        }
    }
}

/// The operator's stop signal: shutdown, or leadership lost.
type Stop = futures::future::Shared<Pin<Box<dyn Future<Output = ()> + Send>>>;

/// Why [`run_once`] ended.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// Shutdown, or leadership lost.
    Stopped,
    /// An optional API (kpack, cert-manager, the Prometheus Operator) was
    /// installed or removed: the caches and controllers start again, so
    /// that they watch what the cluster serves now.
    OptionalApisChanged,
}

/// Which optional APIs the cluster serves now (API discovery).
async fn discover_installed(client: &Client) -> Installed {
    Installed {
        kpack: serves(client, &kpack_image_api_resource()).await,
        cert_manager: serves(client, &certificate_api_resource()).await,
        prometheus_operator: serves(client, &service_monitor_api_resource()).await,
        gateway_api: serves(client, &http_route_api_resource()).await
            && serves(client, &listener_set_api_resource()).await,
    }
}

/// The CRDs that decide [`Installed`]: the one of each optional API that
/// Kapsa looks up at start-up.
fn installed_by_crds(present: impl Fn(&str) -> bool) -> Installed {
    use kapsa_api::external::crd_name;
    Installed {
        kpack: present(&crd_name(&kpack_image_api_resource())),
        cert_manager: present(&crd_name(&certificate_api_resource())),
        prometheus_operator: present(&crd_name(&service_monitor_api_resource())),
        gateway_api: present(&crd_name(&http_route_api_resource()))
            && present(&crd_name(&listener_set_api_resource())),
    }
}

/// Resolves once the optional APIs the cluster serves differ from
/// `installed`: a CRD of one of them appeared or went (a metadata-only
/// watch of CustomResourceDefinitions), confirmed by API discovery (a CRD
/// is served only once it is Established). Never resolves where the
/// operator may not watch CRDs.
async fn optional_apis_changed(client: Client, installed: Installed) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let (store, writer) = reflector::store::<PartialObjectMeta<CustomResourceDefinition>>();
    let mut events = std::pin::pin!(
        reflector::reflector(
            writer,
            watcher::watcher(
                Api::<PartialObjectMeta<CustomResourceDefinition>>::all(client.clone()),
                listing(),
            ),
        )
        .backoff(watch_backoff())
    );
    while let Some(event) = events.next().await {
        match event {
            Err(error) => {
                tracing::debug!(%error, "watching CustomResourceDefinitions (optional APIs)");
                continue;
            }
            // Judged on the whole listing only (the store fills at InitDone).
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
            Ok(_) => {}
        }
        let by_crds = installed_by_crds(|name| {
            store
                .get(&ObjectRef::new(name))
                .is_some_and(|crd| crd.metadata.deletion_timestamp.is_none())
        });
        if by_crds == installed {
            continue;
        }
        // Discovery follows a CRD change within a moment.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let now = discover_installed(&client).await;
        if now != installed {
            tracing::info!(
                kpack = now.kpack,
                cert_manager = now.cert_manager,
                prometheus_operator = now.prometheus_operator,
                gateway_api = now.gateway_api,
                "the optional APIs the cluster serves changed"
            );
            return;
        }
    }
    futures::future::pending::<()>().await
}

/// The caches, the controllers, the poller: until `stop`, or until the
/// optional APIs the cluster serves change.
async fn run_once(
    client: &Client,
    config: &OperatorConfig,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    stop: Stop,
) -> anyhow::Result<Ended> {
    let (client, metrics) = (client.clone(), metrics.clone());
    let image_resource = kpack_image_api_resource();
    let certificate_resource = certificate_api_resource();
    let service_monitor_resource = service_monitor_api_resource();
    let http_route_resource = http_route_api_resource();
    let listener_set_resource = listener_set_api_resource();
    let installed = discover_installed(&client).await;
    tracing::info!(
        kpack = installed.kpack,
        cert_manager = installed.cert_manager,
        prometheus_operator = installed.prometheus_operator,
        gateway_api = installed.gateway_api,
        "optional APIs"
    );
    let changed = futures::future::FutureExt::shared(Box::pin(optional_apis_changed(
        client.clone(),
        installed,
    )));
    let stop = {
        let (stop, changed) = (stop.clone(), changed.clone());
        futures::future::FutureExt::shared(Box::pin(async move {
            tokio::select! {
                _ = stop => {}
                _ = changed => {}
            }
        }))
    };
    let applier = Arc::new(Applier::new(client.clone(), metrics.clone()));

    // Read by both controllers: shared caches. Kapsa's own kinds are decoded
    // object by object, so that one malformed object stops nothing.
    // One Event publisher for the reconcilers and the Malformed reporter.
    let events = Arc::new(crate::events::Publisher::new(
        client.clone(),
        "kapsa",
        std::env::var("POD_NAME").ok(),
    ));
    let (malformed, malformed_publisher) = Malformed::new(events.clone());
    let (projects, projects_synced, project_driver, projects_subscribers) = shared_cache(
        decoded::<Project>(&client, malformed.clone()),
        (),
        without_last_applied,
        applier.clone(),
        &[Changes::All; 5],
    )?;
    let [
        projects_for_projects,
        projects_for_environments,
        projects_for_pools,
        projects_for_poller,
        projects_for_hosts,
    ] = subscribers(projects_subscribers)?;
    let (environments, environments_synced, environment_driver, environment_subscribers) =
        shared_cache(
            decoded::<Environment>(&client, malformed.clone()),
            (),
            without_last_applied,
            applier.clone(),
            &[Changes::All; 2],
        )?;
    let [environments_for_environments, environments_for_projects] =
        subscribers(environment_subscribers)?;
    let (pools, pools_synced, pool_driver, pool_subscribers) = shared_cache(
        decoded::<DomainPool>(&client, malformed.clone()),
        (),
        without_last_applied,
        applier.clone(),
        &[Changes::Spec, Changes::Spec, Changes::All, Changes::Spec],
    )?;
    let [
        pools_for_projects,
        pools_for_environments,
        pools_for_pools,
        pools_for_hosts,
    ] = subscribers(pool_subscribers)?;
    let (cluster_registries, cluster_registries_synced, cluster_registry_driver, cr_subscribers) =
        shared_cache(
            decoded::<ClusterRegistry>(&client, malformed.clone()),
            (),
            without_last_applied,
            applier.clone(),
            &[Changes::All; 3],
        )?;
    let [cr_for_projects, cr_for_environments, cr_for_registries] = subscribers(cr_subscribers)?;
    let (registries, registries_synced, registry_driver, registry_subscribers) = shared_cache(
        decoded::<Registry>(&client, malformed),
        (),
        without_last_applied,
        applier.clone(),
        &[Changes::All; 3],
    )?;
    let [
        registries_for_projects,
        registries_for_environments,
        registries_for_registries,
    ] = subscribers(registry_subscribers)?;
    // Secrets and ConfigMaps: metadata only (never a cache of Secret data).
    let (secret_metadata, secret_metadata_synced, secret_metadata_driver, secret_subscribers) =
        shared_cache(
            watch(
                Api::<PartialObjectMeta<Secret>>::all(client.clone()),
                listing(),
            ),
            (),
            metadata_only,
            applier.clone(),
            &[Changes::All; 4],
        )?;
    let [
        secrets_for_projects,
        secrets_for_environments,
        secrets_for_cluster_registries,
        secrets_for_registries,
    ] = subscribers(secret_subscribers)?;
    // Held compact: every namespace has a ConfigMap or two.
    let (config_map_metadata, config_map_metadata_synced, config_map_stream) = cache(
        Api::<Compact<PartialObjectMeta<ConfigMap>>>::all(client.clone()),
        listing(),
        ApiResource::erase::<ConfigMap>(&()),
        CompactStore::default().writer(),
        |config_map| config_map.modify(metadata_only),
        applier.clone(),
        None,
    );
    let (namespaces, namespaces_synced, namespace_stream) = cache(
        Api::<Compact<PartialObjectMeta<Namespace>>>::all(client.clone()),
        listing(),
        ApiResource::erase::<Namespace>(&()),
        CompactStore::default().writer(),
        |namespace| namespace.modify(namespace_metadata),
        applier.clone(),
        None,
    );

    // What Kapsa made: label-filtered, then owner-checked before caching.
    let owners = Owners {
        projects: projects.clone(),
        environments: environments.clone(),
        projects_synced: projects_synced.clone(),
        environments_synced: environments_synced.clone(),
    };
    // Held compact (compressed JSON, decoded when read): these are most of
    // the cached objects, a few per Project.
    macro_rules! managed_cache {
        ($kind:ty, $config:expr, $store:expr) => {
            cache(
                Api::<Compact<$kind>>::all(client.clone()),
                $config,
                ApiResource::erase::<$kind>(&()),
                $store.writer(),
                keep_all,
                applier.clone(),
                Some(owners.clone()),
            )
        };
        ($kind:ty) => {
            managed_cache!($kind, managed(), CompactStore::default())
        };
    }
    let (service_accounts, service_accounts_synced, sa_stream) = managed_cache!(ServiceAccount);
    let (roles, roles_synced, role_stream) = managed_cache!(Role);
    let (role_bindings, role_bindings_synced, binding_stream) = managed_cache!(RoleBinding);
    // Of Secrets only Kapsa's copies, by name: no tenant can make Kapsa
    // cache other Secrets, whatever labels they carry. (Compressed without
    // a dictionary: no Secret's data outlives it in the cache.)
    let (secrets, secrets_synced, secret_stream) = managed_cache!(
        Secret,
        managed().fields(&format!(
            "metadata.name={}",
            crate::resources::project::REGISTRY_SECRET
        )),
        CompactStore::without_dictionary()
    );
    let (git_secrets, git_secrets_synced, git_secret_stream) = managed_cache!(
        Secret,
        managed().fields(&format!(
            "metadata.name={}",
            crate::resources::project::GIT_SECRET
        )),
        CompactStore::without_dictionary()
    );
    let (quotas, quotas_synced, quota_stream) = managed_cache!(ResourceQuota);
    let (deployments, deployments_synced, deployment_stream) = managed_cache!(Deployment);
    let (services, services_synced, service_stream) = managed_cache!(Service);
    let (ingresses, ingresses_synced, ingress_stream) = managed_cache!(Ingress);
    // Dockerfile builds: their Jobs (controlled by the Project, in build
    // namespaces) and their Pods, trimmed to what the build reported.
    // (Whole: their labels are read, and there are few.)
    let (jobs, jobs_synced, job_stream) = cache(
        Api::<Job>::all(client.clone()),
        managed().labels(&format!(
            "{}={}",
            crate::resources::environment::BUILD_LABEL,
            crate::resources::environment::DOCKERFILE_BUILD
        )),
        ApiResource::erase::<Job>(&()),
        reflector::store::Writer::new(()),
        keep_all,
        applier.clone(),
        Some(owners.clone()),
    );
    let (build_pods, build_pods_synced, build_pod_stream) = cache(
        Api::<Pod>::all(client.clone()),
        managed().labels(&format!(
            "{}={}",
            crate::resources::environment::BUILD_LABEL,
            crate::resources::environment::DOCKERFILE_BUILD
        )),
        ApiResource::erase::<Pod>(&()),
        reflector::store::Writer::new(()),
        trim_build_pod,
        applier.clone(),
        None,
    );
    // Every Ingress's hosts (allocation skips hosts others already route).
    let (ingress_hosts, ingress_hosts_synced, ingress_hosts_stream) = cache(
        Api::<Ingress>::all(client.clone()),
        listing(),
        ApiResource::erase::<Ingress>(&()),
        reflector::store::Writer::new(()),
        ingress_hosts_only,
        applier.clone(),
        None,
    );

    // kpack and cert-manager: watched only where installed.
    let cluster_builder_resource =
        kapsa_api::external::kpack_builder(kapsa_api::BuilderKind::ClusterBuilder);
    let builder_resource = kapsa_api::external::kpack_builder(kapsa_api::BuilderKind::Builder);
    let (images, images_synced, image_stream) = cache(
        Api::<Compact<DynamicObject>>::all_with(client.clone(), &image_resource),
        managed(),
        image_resource.clone(),
        CompactStore::default().writer(),
        keep_all,
        applier.clone(),
        Some(owners.clone()),
    );
    let (cluster_builders, cluster_builders_synced, cluster_builder_stream) = cache(
        Api::<PartialObjectMeta<DynamicObject>>::all_with(
            client.clone(),
            &cluster_builder_resource,
        ),
        listing(),
        cluster_builder_resource.clone(),
        reflector::store::Writer::new(cluster_builder_resource.clone()),
        metadata_only,
        applier.clone(),
        None,
    );
    let (builders, builders_synced, builder_stream) = cache(
        Api::<PartialObjectMeta<DynamicObject>>::all_with(client.clone(), &builder_resource),
        listing(),
        builder_resource.clone(),
        reflector::store::Writer::new(builder_resource.clone()),
        metadata_only,
        applier.clone(),
        None,
    );
    let cluster_issuer_resource = kapsa_api::external::cert_manager_cluster_issuer();
    let (cluster_issuers, cluster_issuers_synced, cluster_issuer_stream) = cache(
        Api::<PartialObjectMeta<DynamicObject>>::all_with(client.clone(), &cluster_issuer_resource),
        listing(),
        cluster_issuer_resource.clone(),
        reflector::store::Writer::new(cluster_issuer_resource.clone()),
        metadata_only,
        applier.clone(),
        None,
    );
    let cluster_issuer_stream = if installed.cert_manager {
        cluster_issuer_stream
    } else {
        futures::stream::pending().boxed()
    };
    // Not label-filtered: cert-manager's ingress-shim makes the per-host
    // Certificates, and their readiness is what TLSReady reports.
    let (certificates, certificates_synced, certificate_stream) = cache(
        Api::<Compact<DynamicObject>>::all_with(client.clone(), &certificate_resource),
        listing(),
        certificate_resource.clone(),
        CompactStore::default().writer(),
        trim_certificate,
        applier.clone(),
        None,
    );
    let (service_monitors, service_monitors_synced, service_monitor_stream) = cache(
        Api::<Compact<DynamicObject>>::all_with(client.clone(), &service_monitor_resource),
        managed(),
        service_monitor_resource.clone(),
        CompactStore::default().writer(),
        keep_all,
        applier.clone(),
        Some(owners.clone()),
    );
    // Gateway API: the Environments' HTTPRoutes and the Projects'
    // ListenerSets, watched only where installed.
    let (http_routes, http_routes_synced, http_route_stream) = cache(
        Api::<Compact<DynamicObject>>::all_with(client.clone(), &http_route_resource),
        managed(),
        http_route_resource.clone(),
        CompactStore::default().writer(),
        keep_all,
        applier.clone(),
        Some(owners.clone()),
    );
    let (listener_sets, listener_sets_synced, listener_set_stream) = cache(
        Api::<Compact<DynamicObject>>::all_with(client.clone(), &listener_set_resource),
        managed(),
        listener_set_resource.clone(),
        CompactStore::default().writer(),
        keep_all,
        applier.clone(),
        Some(owners.clone()),
    );
    fn only_if<K: Send + 'static>(
        on: bool,
        stream: BoxStream<Result<K, watcher::Error>>,
    ) -> BoxStream<Result<K, watcher::Error>> {
        if on {
            stream
        } else {
            futures::stream::pending().boxed()
        }
    }
    let image_stream = only_if(installed.kpack, image_stream);
    let certificate_stream = only_if(installed.cert_manager, certificate_stream);
    let service_monitor_stream = only_if(installed.prometheus_operator, service_monitor_stream);
    let http_route_stream = only_if(installed.gateway_api, http_route_stream);
    let listener_set_stream = only_if(installed.gateway_api, listener_set_stream);
    let (cluster_builder_stream, builder_stream) = if installed.kpack {
        (cluster_builder_stream, builder_stream)
    } else {
        (
            futures::stream::pending().boxed(),
            futures::stream::pending().boxed(),
        )
    };

    // Optional APIs' caches count only where those are installed:
    // elsewhere they never fill.
    let readiness = Readiness::new(
        [
            ("projects", projects_synced, true),
            ("environments", environments_synced, true),
            ("domainpools", pools_synced, true),
            ("serviceaccounts", service_accounts_synced, true),
            ("roles", roles_synced, true),
            ("rolebindings", role_bindings_synced, true),
            ("secrets", secrets_synced, true),
            ("git secrets", git_secrets_synced, true),
            ("resourcequotas", quotas_synced, true),
            ("deployments", deployments_synced, true),
            ("services", services_synced, true),
            ("ingresses", ingresses_synced, true),
            ("jobs", jobs_synced, true),
            ("build pods", build_pods_synced, true),
            ("ingress hosts", ingress_hosts_synced, true),
            ("clusterregistries", cluster_registries_synced, true),
            ("registries", registries_synced, true),
            ("namespaces", namespaces_synced, true),
            ("secret metadata", secret_metadata_synced, true),
            ("configmap metadata", config_map_metadata_synced, true),
            ("kpack images", images_synced, installed.kpack),
            (
                "kpack clusterbuilders",
                cluster_builders_synced,
                installed.kpack,
            ),
            ("kpack builders", builders_synced, installed.kpack),
            ("certificates", certificates_synced, installed.cert_manager),
            (
                "clusterissuers",
                cluster_issuers_synced,
                installed.cert_manager,
            ),
            (
                "servicemonitors",
                service_monitors_synced,
                installed.prometheus_operator,
            ),
            ("httproutes", http_routes_synced, installed.gateway_api),
            ("listenersets", listener_sets_synced, installed.gateway_api),
        ]
        .into_iter()
        .filter(|(_, _, counts)| *counts)
        .map(|(name, synced, _)| (name, synced))
        .collect(),
    );
    let stores = Stores {
        projects: projects.clone(),
        environments: environments.clone(),
        pools,
        cluster_registries,
        registries,
        namespaces,
        secret_metadata,
        config_map_metadata,
        cluster_builders,
        builders,
        service_accounts,
        roles,
        role_bindings,
        secrets,
        git_secrets,
        quotas,
        deployments,
        services,
        ingresses,
        ingress_hosts,
        images,
        certificates,
        cluster_issuers,
        service_monitors,
        http_routes,
        listener_sets,
        jobs,
        build_pods,
        installed,
        readiness,
    };
    health.set_stores(stores.clone());
    let git = Arc::new(GitState::default());
    let mut ctx = Context::new(
        client.clone(),
        applier,
        stores.clone(),
        metrics.clone(),
        git.clone(),
        events,
    );
    ctx.pod_security_default = config.pod_security;
    ctx.build_pods = config.build_pods.clone();
    ctx.allow_insecure_registries = config.allow_insecure_registries;
    ctx.resync_period = config.resync_period;
    let (wake_tx, wake_rx) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<Environment>>();
    ctx.wake_environments = wake_tx;
    let ctx = Arc::new(ctx);
    let controller_config = controller::Config::default().concurrency(config.concurrency);

    let (poll_tx, poll_rx) = tokio::sync::mpsc::channel::<ObjectRef<Project>>(1024);
    // A changed poll also wakes the Environments that follow a branch
    // without a commit of their own (made by a person): they build its head.
    let (env_poll_tx, env_poll_rx) = tokio::sync::mpsc::channel::<ObjectRef<Environment>>(1024);
    let following = stores.environments.clone();
    let polled =
        futures::stream::unfold(
            poll_rx,
            |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
        )
        .map(move |project: ObjectRef<Project>| {
            for env in following.state() {
                if env.spec.project == project.name
                    && env.spec.branch.is_some()
                    && env.spec.commit.is_none()
                {
                    let _ = env_poll_tx.try_send(ObjectRef::from_obj(env.as_ref()));
                }
            }
            project
        });
    let env_polled = futures::stream::unfold(env_poll_rx, |mut rx| async move {
        rx.recv().await.map(|r| (r, rx))
    });
    // Environments whose Service failed to be created in the background.
    let env_woken =
        futures::stream::unfold(
            wake_rx,
            |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
        );

    let mappers = Mappers {
        stores: stores.clone(),
    };
    let project_controller = Controller::for_shared_stream(projects_for_projects, projects.clone())
        .with_config(controller_config.clone())
        .watches_shared_stream(
            environments_for_projects,
            mappers.clone().project_of_environment(),
        )
        // Not `owns_stream`: kube-runtime gives an owner found in a child's
        // ownerReferences the child's namespace, and a Project is
        // cluster-scoped; those references would differ from the Project's
        // own, and one Project would be reconciled several times at once.
        .watches_stream(namespace_stream, owning_project)
        .watches_stream(sa_stream, owning_project)
        .watches_stream(role_stream, owning_project)
        .watches_stream(binding_stream, owning_project)
        .watches_stream(secret_stream, owning_project)
        .watches_stream(git_secret_stream, owning_project)
        .watches_stream(quota_stream, owning_project)
        .watches_stream_with(listener_set_stream, owning_project, listener_set_resource)
        .watches_shared_stream(pools_for_projects, mappers.clone().all_projects())
        .watches_shared_stream(
            cr_for_projects,
            mappers.clone().projects_of_cluster_registry(),
        )
        .watches_shared_stream(
            registries_for_projects,
            mappers.clone().projects_of_registry(),
        )
        .watches_shared_stream(secrets_for_projects, mappers.clone().projects_of_secret())
        .watches_stream(
            ingress_hosts_stream,
            mappers.clone().projects_without_host(),
        )
        .reconcile_on(polled)
        .graceful_shutdown_on(stop.clone())
        .run(
            controllers::project::reconcile,
            controllers::project::error_policy,
            ctx.clone(),
        )
        .for_each(|result| log_failure("project", result));

    let environment_controller =
        Controller::for_shared_stream(environments_for_environments, environments.clone())
            .with_config(controller_config)
            .owns_stream(deployment_stream)
            .owns_stream(service_stream)
            .owns_stream(ingress_stream)
            .owns_stream_with(service_monitor_stream, service_monitor_resource)
            .owns_stream_with(http_route_stream, http_route_resource)
            .watches_stream(job_stream, mappers.clone().environment_of_build())
            .watches_stream(build_pod_stream, mappers.clone().environment_of_build())
            .watches_stream_with(
                image_stream,
                mappers.clone().environment_of_image(),
                image_resource,
            )
            .watches_stream_with(
                certificate_stream,
                mappers.clone().environments_of_certificate(),
                certificate_resource,
            )
            .watches_shared_stream(
                projects_for_environments,
                mappers.clone().environments_of_project(),
            )
            .watches_shared_stream(
                pools_for_environments,
                mappers.clone().environments_of_pool(),
            )
            .watches_shared_stream(
                cr_for_environments,
                mappers.clone().environments_of_cluster_registry(),
            )
            .watches_shared_stream(
                registries_for_environments,
                mappers.clone().environments_of_registry(),
            )
            .watches_shared_stream(
                secrets_for_environments,
                mappers.clone().environments_naming::<Secret>(),
            )
            .watches_stream(
                config_map_stream,
                mappers.clone().environments_naming::<ConfigMap>(),
            )
            .watches_stream_with(
                cluster_builder_stream,
                mappers.clone().environments_of_builder(),
                cluster_builder_resource,
            )
            .watches_stream_with(
                builder_stream,
                mappers.clone().environments_of_builder(),
                builder_resource,
            )
            .reconcile_on(futures::stream::select(env_polled, env_woken))
            .graceful_shutdown_on(stop.clone())
            .run(
                controllers::environment::reconcile,
                controllers::environment::error_policy,
                ctx.clone(),
            )
            .for_each(|result| log_failure("environment", result));

    // The platform objects' status: a few objects, woken in bursts (every
    // Project's status change reaches its pool), so debounced.
    let platform_config = controller::Config::default()
        .concurrency(2)
        .debounce(std::time::Duration::from_secs(1));
    let pool_controller = Controller::for_shared_stream(pools_for_pools, stores.pools.clone())
        .with_config(platform_config.clone())
        .watches_shared_stream(projects_for_pools, |project: Arc<Project>| {
            project
                .status
                .as_ref()
                .and_then(|s| s.domain_pool.clone())
                .map(|pool| ObjectRef::<DomainPool>::new(&pool))
        })
        .watches_stream_with(
            cluster_issuer_stream,
            mappers.clone().pools_of_issuer(),
            cluster_issuer_resource,
        )
        .graceful_shutdown_on(stop.clone())
        .run(
            controllers::platform::reconcile_pool,
            controllers::platform::error_policy_pool,
            ctx.clone(),
        )
        .for_each(|result| log_failure("domainpool", result));
    let cluster_registry_controller =
        Controller::for_shared_stream(cr_for_registries, stores.cluster_registries.clone())
            .with_config(platform_config.clone())
            .watches_shared_stream(
                secrets_for_cluster_registries,
                mappers.clone().cluster_registries_naming(),
            )
            .graceful_shutdown_on(stop.clone())
            .run(
                controllers::platform::reconcile_cluster_registry,
                controllers::platform::error_policy_cluster_registry,
                ctx.clone(),
            )
            .for_each(|result| log_failure("clusterregistry", result));
    let registry_controller =
        Controller::for_shared_stream(registries_for_registries, stores.registries.clone())
            .with_config(platform_config)
            .watches_shared_stream(secrets_for_registries, mappers.clone().registries_naming())
            .graceful_shutdown_on(stop.clone())
            .run(
                controllers::platform::reconcile_registry,
                controllers::platform::error_policy_registry,
                ctx.clone(),
            )
            .for_each(|result| log_failure("registry", result));

    // The table changes with the Projects (their hosts) and the pools'
    // specs (their bases). Without a table the subscriptions are drained
    // all the same: the caches wait for their subscribers.
    let host_changes =
        futures::stream::select(projects_for_hosts.map(|_| ()), pools_for_hosts.map(|_| ()));
    let host_owners: BoxFuture = match config.host_owners_namespace.clone() {
        Some(namespace) => Box::pin(crate::hosts::run(
            client.clone(),
            stores.clone(),
            namespace,
            host_changes,
        )),
        None => Box::pin(host_changes.for_each(|_| async {})),
    };
    let poller = poller::run(
        client.clone(),
        stores,
        git,
        metrics,
        poll_tx,
        projects_for_poller,
        poller::PollerConfig {
            hosts: config.allow_internal_git_hosts.clone(),
            max_interval: config.max_poll_interval,
        },
    );
    tracing::info!("Kapsa operator running");
    let stopping = stop.clone();
    // Each loop is a task of its own, polled by the runtime's workers where
    // its I/O wakes it, not by the thread that polls this function (every
    // wake-up of a loop inside this future was a hand-off to that thread:
    // most of an idle operator's CPU, in the kernel).
    let drivers = futures::future::join_all(
        [
            host_owners,
            project_driver,
            environment_driver,
            pool_driver,
            cluster_registry_driver,
            registry_driver,
            secret_metadata_driver,
            malformed_publisher,
        ]
        .map(Task::spawn),
    );
    let controllers = futures::future::join_all([
        Task::spawn(project_controller),
        Task::spawn(environment_controller),
        Task::spawn(pool_controller),
        Task::spawn(cluster_registry_controller),
        Task::spawn(registry_controller),
    ]);
    let poller = Task::spawn(poller);
    tokio::select! {
        _ = controllers => {}
        _ = poller => {}
        _ = drivers => {}
    }
    // Dropped here: every task still running is aborted.
    // The controllers end only on shutdown; anything else ending is a dead loop.
    if futures::FutureExt::now_or_never(stopping).is_none() {
        tracing::error!("a controller loop stopped; /healthz reports it");
        health.mark_dead();
    } else if futures::FutureExt::now_or_never(changed).is_some() {
        return Ok(Ended::OptionalApisChanged);
    }
    tracing::info!("Kapsa operator stopped");
    Ok(Ended::Stopped)
}

/// One of the operator's loops, running as a task of its own; it ends when
/// the loop ends (a panic in it goes on in the caller, as if the loop were
/// polled there), and is aborted when dropped.
struct Task(tokio::task::JoinHandle<()>);

impl Task {
    fn spawn(future: impl Future<Output = ()> + Send + 'static) -> Self {
        Self(tokio::spawn(future))
    }
}

impl Future for Task {
    type Output = ();

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match std::task::ready!(Pin::new(&mut self.0).poll(cx)) {
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Ok(()) | Err(_) => std::task::Poll::Ready(()),
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Logs what the controller machinery reports besides reconcile errors
/// (those are logged by the error policies): watches that fail, e.g. on a
/// missing permission or a CRD that is not installed, would otherwise retry
/// in silence.
fn log_failure<T, E: std::error::Error>(
    controller: &str,
    result: Result<T, controller::Error<E, watcher::Error>>,
) -> futures::future::Ready<()> {
    match result {
        Ok(_) | Err(controller::Error::ReconcilerFailed(..)) => {}
        // Deleted between the trigger and the reconcile (a child's watch
        // event after its owner went): nothing to do, nothing wrong.
        Err(error @ controller::Error::ObjectNotFound(..)) => {
            tracing::debug!(controller, %error, "object gone before its reconcile")
        }
        Err(error) => tracing::warn!(controller, %error, "controller error"),
    }
    futures::future::ready(())
}

/// The Project that is the controller of `object` (a namespace, or a child
/// in the project or build namespace), as the reference of the
/// cluster-scoped Project itself (no namespace).
fn owning_project<K: Resource>(object: K) -> Option<ObjectRef<Project>> {
    object
        .owner_references()
        .iter()
        .find(|o| {
            o.controller == Some(true)
                && o.kind == "Project"
                && o.api_version.starts_with("kapsa.dev/")
        })
        .map(|o| ObjectRef::new(&o.name))
}

/// Maps a changed object to the Projects or Environments that read it.
#[derive(Clone)]
struct Mappers {
    stores: Stores,
}

impl Mappers {
    /// The DomainPools naming a ClusterIssuer.
    fn pools_of_issuer(
        self,
    ) -> impl Fn(PartialObjectMeta<DynamicObject>) -> Vec<ObjectRef<DomainPool>> + Send + 'static
    {
        move |issuer| {
            let name = issuer.name_any();
            self.stores
                .pools
                .state()
                .iter()
                .filter(|p| {
                    p.spec
                        .cluster_issuer_ref
                        .as_ref()
                        .is_some_and(|r| r.name == name)
                })
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect()
        }
    }

    /// The ClusterRegistries naming a Secret (push or pull credentials).
    fn cluster_registries_naming(
        self,
    ) -> impl Fn(Arc<PartialObjectMeta<Secret>>) -> Vec<ObjectRef<ClusterRegistry>> + Send + 'static
    {
        move |secret| {
            let at = (secret.namespace().unwrap_or_default(), secret.name_any());
            self.stores
                .cluster_registries
                .state()
                .iter()
                .filter(|r| controllers::platform::names_secret(&r.spec, None, (&at.0, &at.1)))
                .map(|r| ObjectRef::from_obj(r.as_ref()))
                .collect()
        }
    }

    /// The Registries naming a Secret of their namespace.
    fn registries_naming(
        self,
    ) -> impl Fn(Arc<PartialObjectMeta<Secret>>) -> Vec<ObjectRef<Registry>> + Send + 'static {
        move |secret| {
            let at = (secret.namespace().unwrap_or_default(), secret.name_any());
            self.stores
                .registries
                .state()
                .iter()
                .filter(|r| {
                    let own = r.namespace();
                    own.as_deref() == Some(at.0.as_str())
                        && controllers::platform::names_secret(
                            &r.spec,
                            own.as_deref(),
                            (&at.0, &at.1),
                        )
                })
                .map(|r| ObjectRef::from_obj(r.as_ref()))
                .collect()
        }
    }

    fn projects_where(&self, keep: impl Fn(&Project) -> bool) -> Vec<ObjectRef<Project>> {
        self.stores
            .projects
            .state()
            .iter()
            .filter(|p| keep(p))
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect()
    }

    fn environments_of_projects_where(
        &self,
        keep: impl Fn(&Project) -> bool,
    ) -> Vec<ObjectRef<Environment>> {
        let projects: std::collections::BTreeSet<String> = self
            .stores
            .projects
            .state()
            .iter()
            .filter(|p| keep(p))
            .map(|p| p.name_any())
            .collect();
        if projects.is_empty() {
            return Vec::new();
        }
        self.stores
            .environments
            .state()
            .iter()
            .filter(|e| projects.contains(&e.spec.project))
            .map(|e| ObjectRef::from_obj(e.as_ref()))
            .collect()
    }

    fn all_projects(self) -> impl Fn(Arc<DomainPool>) -> Vec<ObjectRef<Project>> + Send + Sync {
        move |_| self.projects_where(|_| true)
    }

    /// A host freed or taken by some Ingress matters to Projects that have none.
    fn projects_without_host(self) -> impl Fn(Ingress) -> Vec<ObjectRef<Project>> + Send + Sync {
        move |_| self.projects_where(|p| p.status.as_ref().is_none_or(|s| s.host.is_none()))
    }

    fn projects_of_cluster_registry(
        self,
    ) -> impl Fn(Arc<ClusterRegistry>) -> Vec<ObjectRef<Project>> + Send + Sync {
        move |registry| self.projects_where(|p| names_cluster_registry(p, &registry.name_any()))
    }

    fn projects_of_registry(
        self,
    ) -> impl Fn(Arc<Registry>) -> Vec<ObjectRef<Project>> + Send + Sync {
        move |registry| self.projects_where(|p| names_registry(p, &registry))
    }

    fn projects_of_secret(
        self,
    ) -> impl Fn(Arc<PartialObjectMeta<Secret>>) -> Vec<ObjectRef<Project>> + Send + Sync {
        move |secret| {
            let namespace = secret.namespace().unwrap_or_default();
            let name = secret.name_any();
            self.projects_where(|p| {
                crate::references::uses_credentials(&self.stores, p, (&namespace, &name))
            })
        }
    }

    fn environments_of_project(
        self,
    ) -> impl Fn(Arc<Project>) -> Vec<ObjectRef<Environment>> + Send + Sync {
        move |project| {
            let name = project.name_any();
            self.stores
                .environments
                .state()
                .iter()
                .filter(|e| e.spec.project == name)
                .map(|e| ObjectRef::from_obj(e.as_ref()))
                .collect()
        }
    }

    fn environments_of_pool(
        self,
    ) -> impl Fn(Arc<DomainPool>) -> Vec<ObjectRef<Environment>> + Send + Sync {
        move |pool| {
            let name = pool.name_any();
            self.environments_of_projects_where(|p| {
                p.status.as_ref().and_then(|s| s.domain_pool.as_deref()) == Some(name.as_str())
            })
        }
    }

    fn environments_of_cluster_registry(
        self,
    ) -> impl Fn(Arc<ClusterRegistry>) -> Vec<ObjectRef<Environment>> + Send + Sync {
        move |registry| {
            self.environments_of_projects_where(|p| names_cluster_registry(p, &registry.name_any()))
        }
    }

    fn environments_of_registry(
        self,
    ) -> impl Fn(Arc<Registry>) -> Vec<ObjectRef<Environment>> + Send + Sync {
        move |registry| self.environments_of_projects_where(|p| names_registry(p, &registry))
    }

    /// Environments whose Project's `configMapRefs`/`secretRefs` name the object.
    fn environments_naming<K: Resource<DynamicType = ()> + MetaTrigger>(
        self,
    ) -> impl Fn(PartialObjectMetaOrArc<K>) -> Vec<ObjectRef<Environment>> + Send + Sync {
        move |object| {
            let (namespace, name) = object.namespace_and_name();
            let is_secret = K::kind(&()) == "Secret";
            self.environments_of_projects_where(|p| {
                crate::resources::project::namespace_name(p) == namespace && {
                    let previews = &p.spec.preview_environments;
                    if is_secret {
                        (p.spec.runtime.secret_refs.iter())
                            .chain(&previews.secret_refs)
                            .any(|r| r.name == name)
                    } else {
                        (p.spec.runtime.config_map_refs.iter())
                            .chain(&previews.config_map_refs)
                            .any(|r| r.name == name)
                    }
                }
            })
        }
    }

    fn environments_of_builder(
        self,
    ) -> impl Fn(PartialObjectMeta<DynamicObject>) -> Vec<ObjectRef<Environment>> + Send + Sync
    {
        move |builder| {
            let name = builder.name_any();
            let namespace = builder.namespace();
            self.environments_of_projects_where(|p| {
                let (kind, builder_name) = controllers::environment::dereference::builder_ref(p);
                p.spec.build.strategy == BuildStrategy::Buildpacks
                    && builder_name == name
                    && match kind {
                        kapsa_api::BuilderKind::ClusterBuilder => namespace.is_none(),
                        kapsa_api::BuilderKind::Builder => {
                            namespace.as_deref()
                                == Some(crate::resources::project::namespace_name(p).as_str())
                        }
                    }
            })
        }
    }

    /// Maps a Certificate to the Environments whose TLS it serves: the one
    /// whose Ingress owns it (HTTP01), or every Environment of the namespace
    /// (the project's DNS01 wildcard).
    /// Every Environment's changes (a deletion included, and Environments a
    /// person made, which the Project does not own) concern its Project:
    /// its summary, and the kpack Image it leaves in the build namespace.
    fn project_of_environment(
        self,
    ) -> impl Fn(Arc<Environment>) -> Vec<ObjectRef<Project>> + Send + Sync {
        move |env| vec![ObjectRef::new(&env.spec.project)]
    }

    /// A kpack Image is named after its Environment, in the Project's build
    /// namespace (or, made by an older Kapsa, in the project namespace).
    fn environment_of_image(
        self,
    ) -> impl Fn(Compact<DynamicObject>) -> Vec<ObjectRef<Environment>> + Send + Sync {
        move |image| {
            let Some(image) = crate::compact::decoded(&image) else {
                return Vec::new();
            };
            let Some(project) = image
                .labels()
                .get(crate::resources::PROJECT_LABEL)
                .and_then(|p| self.stores.projects.get(&ObjectRef::new(p)))
            else {
                return Vec::new();
            };
            let namespace = crate::resources::project::namespace_name(&project);
            vec![ObjectRef::new(&image.name_any()).within(&namespace)]
        }
    }

    /// The Environment a build Job or its Pod is for: its Project's
    /// namespace (from the Project label) and its Environment label.
    fn environment_of_build<K: Resource>(
        self,
    ) -> impl Fn(K) -> Option<ObjectRef<Environment>> + Send + Sync {
        move |object| {
            let labels = object.meta().labels.as_ref()?;
            let project = self.stores.projects.get(&ObjectRef::new(
                labels.get(crate::resources::PROJECT_LABEL)?,
            ))?;
            let namespace = crate::resources::project::namespace_name(&project);
            let name = labels.get(crate::resources::ENVIRONMENT_LABEL)?;
            Some(ObjectRef::new(name).within(&namespace))
        }
    }

    fn environments_of_certificate(
        self,
    ) -> impl Fn(Compact<DynamicObject>) -> Vec<ObjectRef<Environment>> + Send + Sync {
        move |certificate| {
            let Some(namespace) = certificate.namespace() else {
                return Vec::new();
            };
            let owner = certificate
                .owner_references()
                .iter()
                // ingress-shim's (Ingress) or Kapsa's (Environment, Gateway
                // routing): both are named after the Environment.
                .find(|o| o.kind == "Ingress" || o.kind == "Environment")
                .map(|o| o.name.clone());
            self.stores
                .environments
                .state()
                .iter()
                .filter(|e| e.namespace().as_deref() == Some(namespace.as_str()))
                .filter(|e| owner.as_ref().is_none_or(|o| *o == e.name_any()))
                .map(|e| ObjectRef::from_obj(e.as_ref()))
                .collect()
        }
    }
}

fn names_cluster_registry(project: &Project, name: &str) -> bool {
    project.spec.registry_ref.kind == RegistryKind::ClusterRegistry
        && project.spec.registry_ref.name == name
}

fn names_registry(project: &Project, registry: &Registry) -> bool {
    project.spec.registry_ref.kind == RegistryKind::Registry
        && project.spec.registry_ref.name == registry.name_any()
        && registry.namespace().as_deref()
            == Some(crate::resources::project::namespace_name(project).as_str())
}

/// A metadata object as a shared stream (`Arc`) or a plain one yields it.
trait NamespaceAndName {
    fn namespace_and_name(&self) -> (String, String);
}

type PartialObjectMetaOrArc<K> = <K as MetaTrigger>::Item;

/// What the Secret (shared, `Arc`) and ConfigMap (plain) metadata streams yield.
trait MetaTrigger {
    type Item: NamespaceAndName + Send + 'static;
}

impl MetaTrigger for Secret {
    type Item = Arc<PartialObjectMeta<Secret>>;
}

impl MetaTrigger for ConfigMap {
    type Item = Compact<PartialObjectMeta<ConfigMap>>;
}

impl<K: Resource> NamespaceAndName for PartialObjectMeta<K> {
    fn namespace_and_name(&self) -> (String, String) {
        (
            self.metadata.namespace.clone().unwrap_or_default(),
            self.metadata.name.clone().unwrap_or_default(),
        )
    }
}

impl<K> NamespaceAndName for Compact<K>
where
    Compact<K>: Resource,
{
    fn namespace_and_name(&self) -> (String, String) {
        (
            self.meta().namespace.clone().unwrap_or_default(),
            self.meta().name.clone().unwrap_or_default(),
        )
    }
}

impl<K: Resource> NamespaceAndName for Arc<PartialObjectMeta<K>> {
    fn namespace_and_name(&self) -> (String, String) {
        self.as_ref().namespace_and_name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubectls_copy_of_a_project_is_not_cached_and_kapsas_annotations_are() {
        let mut project: Project = serde_json::from_value(serde_json::json!({
            "apiVersion": "kapsa.dev/v1alpha1", "kind": "Project",
            "metadata": {"name": "shop", "annotations": {
                LAST_APPLIED: "{\"spec\":{\"a\":\"whole copy\"}}",
                "kapsa.dev/keep": "true",
            }},
            "spec": {"source": {"git": {"url": "https://git.example.com/shop.git"}},
                "registryRef": {"name": "r"}},
        }))
        .unwrap();
        without_last_applied(&mut project);
        assert_eq!(
            project.metadata.annotations,
            Some([("kapsa.dev/keep".to_string(), "true".to_string())].into())
        );
        // Only that annotation: none left means none at all.
        let mut environment: Environment = serde_json::from_value(serde_json::json!({
            "apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment",
            "metadata": {"name": "production", "namespace": "shop",
                "annotations": {LAST_APPLIED: "{}"}},
            "spec": {"project": "shop", "type": "Production", "branch": "main"},
        }))
        .unwrap();
        without_last_applied(&mut environment);
        assert_eq!(environment.metadata.annotations, None);
    }

    #[test]
    fn a_secrets_metadata_is_cached_as_its_identity_and_version_only() {
        let mut secret: PartialObjectMeta<Secret> = serde_json::from_value(serde_json::json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": "shop-git", "namespace": "shop", "uid": "u1",
                "resourceVersion": "7", "creationTimestamp": "2026-01-01T00:00:00Z",
                "deletionTimestamp": "2026-01-02T00:00:00Z",
                "labels": {"team": "a"}, "annotations": {LAST_APPLIED: "{\"data\":{}}"},
                "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o",
                    "uid": "o1"}],
                "finalizers": ["example.com/keep"]}
        }))
        .unwrap();
        let deletion = secret.metadata.deletion_timestamp.clone();
        metadata_only(&mut secret);
        assert_eq!(
            secret.metadata,
            ObjectMeta {
                name: Some("shop-git".into()),
                namespace: Some("shop".into()),
                uid: Some("u1".into()),
                resource_version: Some("7".into()),
                deletion_timestamp: deletion,
                ..ObjectMeta::default()
            }
        );
    }

    #[test]
    fn a_projects_child_maps_to_the_cluster_scoped_project() {
        let child: ServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kapsa-runtime", "namespace": "shop", "ownerReferences": [
                {"apiVersion": "kapsa.dev/v1alpha1", "kind": "Project", "name": "shop",
                 "uid": "u", "controller": true}]}
        }))
        .unwrap();
        let reference = owning_project(child).expect("the Project");
        assert_eq!(reference.name, "shop");
        assert_eq!(
            reference.namespace, None,
            "the same reference as the Project's own, so one reconcile at a time"
        );
        assert_eq!(reference, ObjectRef::<Project>::new("shop"));
        let foreign: ServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "x", "namespace": "shop", "ownerReferences": [
                {"apiVersion": "v1", "kind": "Project", "name": "shop", "uid": "u", "controller": true}]}
        }))
        .unwrap();
        assert!(owning_project(foreign).is_none());
    }

    fn config_map(name: &str) -> k8s_openapi::api::core::v1::ConfigMap {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "resourceVersion": "1"}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn a_relist_reports_the_objects_it_no_longer_has_as_deleted() {
        let mut writer =
            reflector::store::Writer::<k8s_openapi::api::core::v1::ConfigMap>::default();
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(config_map("kept")),
            watcher::Event::InitApply(config_map("gone")),
            watcher::Event::InitDone,
        ] {
            writer.apply_watcher_event(&event);
        }
        let store = writer.as_reader();
        let name = |e: &watcher::Event<k8s_openapi::api::core::v1::ConfigMap>| match e {
            watcher::Event::Init => "Init".to_string(),
            watcher::Event::InitApply(o) => format!("InitApply {}", o.name_any()),
            watcher::Event::InitDone => "InitDone".to_string(),
            watcher::Event::Apply(o) => format!("Apply {}", o.name_any()),
            watcher::Event::Delete(o) => format!("Delete {}", o.name_any()),
        };
        // A relist (after `410 Gone`) that no longer has "gone", then a
        // watch event: the delete comes before InitDone, nothing else
        // changes.
        let relist: EventStream<k8s_openapi::api::core::v1::ConfigMap> = futures::stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(config_map("kept"))),
            Ok(watcher::Event::InitApply(config_map("new"))),
            Ok(watcher::Event::InitDone),
            Ok(watcher::Event::Apply(config_map("kept"))),
        ])
        .boxed();
        let held = store.clone();
        let seen: Vec<String> = with_relist_deletes(relist, move || held.state())
            .map(|e| name(&e.unwrap()))
            .collect()
            .await;
        assert_eq!(
            seen,
            [
                "Init",
                "InitApply kept",
                "InitApply new",
                "Delete gone",
                "InitDone",
                "Apply kept"
            ]
        );
        // The first listing (an empty cache) reports nothing deleted.
        let first: EventStream<k8s_openapi::api::core::v1::ConfigMap> = futures::stream::iter([
            Ok(watcher::Event::Init),
            Ok(watcher::Event::InitApply(config_map("a"))),
            Ok(watcher::Event::InitDone),
        ])
        .boxed();
        let empty = reflector::store::Writer::<k8s_openapi::api::core::v1::ConfigMap>::default();
        let empty = empty.as_reader();
        let seen: Vec<String> = with_relist_deletes(first, move || empty.state())
            .map(|e| name(&e.unwrap()))
            .collect()
            .await;
        assert_eq!(seen, ["Init", "InitApply a", "InitDone"]);
    }
}

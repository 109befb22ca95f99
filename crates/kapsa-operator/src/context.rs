//! What every reconcile shares: the client, caches, metrics, Events and the
//! latest git poll results.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    ConfigMap, Namespace, Pod, ResourceQuota, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::{ClusterRegistry, DomainPool, Environment, Project, Registry};
use kube::Client;
use kube::api::{DynamicObject, PartialObjectMeta};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::compact::CompactStore;
use crate::metrics::Metrics;

/// Caches of everything the reconcilers read, filled by the controllers'
/// watches (managed fields pruned). Reads come from here, not the API server.
///
/// Whole objects are cached only for Kapsa's own kinds, the platform's
/// registries and what Kapsa created (label-filtered); what Kapsa created is
/// held compact ([`crate::compact`]), as JSON decoded when read. Of Namespaces,
/// Secrets, ConfigMaps and kpack builders only metadata is cached (with
/// annotations dropped: `kubectl apply` keeps a Secret's whole content in
/// one), enough to see that they exist and when they change.
#[derive(Clone)]
pub struct Stores {
    pub projects: Store<Project>,
    pub environments: Store<Environment>,
    pub pools: Store<DomainPool>,
    pub cluster_registries: Store<ClusterRegistry>,
    pub registries: Store<Registry>,
    pub namespaces: CompactStore<PartialObjectMeta<Namespace>>,
    pub secret_metadata: Store<PartialObjectMeta<Secret>>,
    pub config_map_metadata: CompactStore<PartialObjectMeta<ConfigMap>>,
    /// kpack ClusterBuilders and Builders (metadata); empty without kpack.
    pub cluster_builders: Store<PartialObjectMeta<DynamicObject>>,
    pub builders: Store<PartialObjectMeta<DynamicObject>>,
    pub service_accounts: CompactStore<ServiceAccount>,
    pub roles: CompactStore<Role>,
    pub role_bindings: CompactStore<RoleBinding>,
    /// Kapsa's copies of the registry credentials (`kapsa-registry`).
    pub secrets: CompactStore<Secret>,
    /// Kapsa's copies of git credentials (`kapsa-git`, build namespaces).
    pub git_secrets: CompactStore<Secret>,
    pub quotas: CompactStore<ResourceQuota>,
    pub deployments: CompactStore<Deployment>,
    pub services: CompactStore<Service>,
    pub ingresses: CompactStore<Ingress>,
    /// Every Ingress in the cluster, trimmed to its hosts and owners (for
    /// host allocation: a host another Ingress routes is not given out).
    pub ingress_hosts: Store<Ingress>,
    pub images: CompactStore<DynamicObject>,
    pub certificates: CompactStore<DynamicObject>,
    /// ClusterIssuers' metadata (where cert-manager is installed): a
    /// DomainPool is Ready when the one it names exists.
    pub cluster_issuers: Store<PartialObjectMeta<DynamicObject>>,
    /// Dockerfile build Jobs (label-filtered, owner-checked).
    pub jobs: Store<Job>,
    /// The Pods of build Jobs, trimmed to their build container's state.
    pub build_pods: Store<Pod>,
    /// The Environments' ServiceMonitors (where the Prometheus Operator's
    /// CRD is installed).
    pub service_monitors: CompactStore<DynamicObject>,
    /// The Environments' HTTPRoutes and the Projects' ListenerSets (where
    /// Gateway API is installed).
    pub http_routes: CompactStore<DynamicObject>,
    pub listener_sets: CompactStore<DynamicObject>,
    /// Which optional APIs the cluster serves (found at start-up).
    pub installed: Installed,
    /// Which caches have had their first full listing.
    pub readiness: crate::synced::Readiness,
}

/// The optional APIs Kapsa integrates with, as discovered at start-up.
/// Their caches count for readiness only when they are installed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Installed {
    pub kpack: bool,
    pub cert_manager: bool,
    /// The Prometheus Operator's `ServiceMonitor` API.
    pub prometheus_operator: bool,
    /// Gateway API's `HTTPRoute` and `ListenerSet` (both needed).
    pub gateway_api: bool,
}

impl Stores {
    /// Whether the caches have had their first full listing. Until then a
    /// reconcile must not run: it would take "not cached yet" for "absent"
    /// and re-create or blank what exists. Checked without waiting, so a
    /// reconcile can requeue instead of holding a worker the caches'
    /// watches may need. (kpack's and cert-manager's caches count only
    /// where those are installed: elsewhere they never fill.)
    pub fn ready(&self) -> bool {
        self.readiness.ready()
    }

    /// The caches that have not had their first full listing yet.
    pub fn unsynced(&self) -> Vec<&'static str> {
        self.readiness.unsynced()
    }
}

/// Looks an object up in a cache by name and namespace.
pub fn cached<K>(store: &Store<K>, name: &str, namespace: Option<&str>) -> Option<Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    cached_with(store, name, namespace, Default::default())
}

/// [`cached`] for kinds without a Rust type (kpack, cert-manager).
pub fn cached_with<K>(
    store: &Store<K>,
    name: &str,
    namespace: Option<&str>,
    dyntype: K::DynamicType,
) -> Option<Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let mut key = ObjectRef::<K>::new_with(name, dyntype);
    if let Some(ns) = namespace {
        key = key.within(ns);
    }
    store.get(&key)
}

/// The latest result of polling a Project's repository.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PollResult {
    /// Branch name to commit id, from the last successful poll.
    pub branches: Option<std::collections::BTreeMap<String, String>>,
    /// Why the last poll failed (no secret values in here).
    pub error: Option<String>,
    /// The condition reason for that failure (`Unreachable`, `Timeout`,
    /// `HostNotAllowed`, `Redirected`, `LimitExceeded`, …).
    pub reason: Option<&'static str>,
    /// Failed polls since the last success.
    pub consecutive_failures: u32,
    pub last_success: Option<Time>,
    /// When this poll ended (successful or not).
    pub polled_at: Option<Time>,
    /// Preview-candidate branches whose head the production branch's head
    /// contains (merged, or no commits of their own), as far as the bounded
    /// history fetched shows; `None` when not known (previews disabled, the
    /// check failed or the server does not allow it).
    pub merged: Option<std::collections::BTreeSet<String>>,
}

/// Poll results by Project name. A cache of the remote, not a source of
/// truth: after a restart the first poll fills it again, and until then the
/// Environments keep the commits recorded in their specs.
#[derive(Default)]
pub struct GitState {
    results: RwLock<HashMap<String, PollResult>>,
}

impl GitState {
    pub fn get(&self, project: &str) -> Option<PollResult> {
        self.results.read().ok()?.get(project).cloned()
    }

    /// Records a result; returns whether it differs from the previous one in
    /// a way a reconcile cares about (heads or reachability).
    pub fn record(&self, project: &str, result: PollResult) -> bool {
        let Ok(mut results) = self.results.write() else {
            return false;
        };
        let previous = results.get(project);
        let changed = previous.is_none_or(|p| {
            p.branches != result.branches
                || p.merged != result.merged
                || p.error.is_some() != result.error.is_some()
                || p.reason != result.reason
        });
        results.insert(project.to_string(), result);
        changed
    }

    pub fn forget(&self, project: &str) {
        if let Ok(mut results) = self.results.write() {
            results.remove(project);
        }
    }
}

pub struct Context {
    pub client: Client,
    pub applier: Arc<crate::apply::Applier>,
    pub stores: Stores,
    pub metrics: Arc<Metrics>,
    pub git: Arc<GitState>,
    /// The Pod Security Standard of project namespaces whose DomainPool
    /// sets none (`--pod-security`).
    pub pod_security_default: kapsa_api::domain_pool::PodSecurityLevel,
    /// What Dockerfile build Pods run and where (`--buildkit-image`,
    /// `--build-node-selector`, `--build-toleration`).
    pub build_pods: crate::resources::environment::BuildPods,
    /// Whether registries with `insecure: true` off loopback are used
    /// (`--allow-insecure-registries`).
    pub allow_insecure_registries: bool,
    /// The longest wait between two reconciles of an object at rest.
    pub resync_period: std::time::Duration,
    /// Consecutive failed reconciles per object, for exponential backoff.
    pub failures: std::sync::Mutex<HashMap<String, u32>>,
    /// What the registry reconcilers concluded of each credentials Secret
    /// they read, keyed by `(<namespace>/<name>, <server> <field>)`, with
    /// the resourceVersion read: read again only when that changes.
    /// Verdicts only, never Secret data.
    pub secret_verdicts: std::sync::Mutex<HashMap<(String, String), SecretVerdict>>,
    /// Reconciles an Environment again (a background creation of one of its
    /// children failed). Until the operator connects it to the Environment
    /// controller, what is sent here goes nowhere.
    pub wake_environments: tokio::sync::mpsc::UnboundedSender<ObjectRef<Environment>>,
    publisher: Arc<crate::events::Publisher>,
}

/// A registry credentials Secret as judged at one resourceVersion.
#[derive(Clone, Debug)]
pub struct SecretVerdict {
    pub resource_version: String,
    pub verdict: Result<(), crate::references::Problem>,
}

impl Context {
    pub fn new(
        client: Client,
        applier: Arc<crate::apply::Applier>,
        stores: Stores,
        metrics: Arc<Metrics>,
        git: Arc<GitState>,
        publisher: Arc<crate::events::Publisher>,
    ) -> Self {
        Self {
            publisher,
            applier,
            client,
            stores,
            metrics,
            git,
            failures: Default::default(),
            secret_verdicts: Default::default(),
            build_pods: Default::default(),
            pod_security_default: Default::default(),
            allow_insecure_registries: false,
            resync_period: crate::controllers::RESYNC,
            wake_environments: tokio::sync::mpsc::unbounded_channel().0,
        }
    }

    /// Publishes Kubernetes Events about `object`, in order, in a task of
    /// their own: the reconcile that planned them does not wait for the API
    /// server's answers. Failing to publish is logged, never fatal. Notes
    /// must never hold secret values.
    pub fn publish_events<K: Resource<DynamicType = ()>>(
        &self,
        object: &K,
        events: &[crate::status::PlannedEvent],
    ) {
        if events.is_empty() {
            return;
        }
        let publisher = self.publisher.clone();
        let metrics = self.metrics.clone();
        let reference = object.object_ref(&());
        let name = object.name_any();
        let events: Vec<Event> = events
            .iter()
            .map(|planned| {
                // Events with the same action are one series whose note never
                // changes; a digest of the note in the action keeps "built
                // commit A" and "built commit B" apart while repeats still
                // aggregate.
                let digest = Sha256::digest(planned.note.as_bytes());
                Event {
                    type_: if planned.warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: planned.reason.clone(),
                    note: Some(planned.note.clone()),
                    action: format!(
                        "{}-{:02x}{:02x}{:02x}{:02x}",
                        planned.reason, digest[0], digest[1], digest[2], digest[3]
                    ),
                    secondary: None,
                }
            })
            .collect();
        tokio::spawn(async move {
            for event in events {
                if let Err(error) = publisher.publish(&event, &reference).await {
                    tracing::warn!(%error, object = %name, reason = %event.reason, "publishing an Event failed");
                }
                metrics.record_write("Event");
                crate::fault::after_write("event");
            }
        });
    }
}

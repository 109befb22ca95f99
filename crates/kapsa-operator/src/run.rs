//! Wiring: caches, the two controllers, the git poller, metrics and health
//! endpoints, and leader election.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kapsa_api::{ClusterRegistry, DomainPool, Environment, Project};
use kube::api::{Api, DynamicObject};
use kube::runtime::controller::{self, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::context::{Context, GitState, Stores};
use crate::leader::LeaseConfig;
use crate::metrics::Metrics;
use crate::resources::environment::{certificate_api_resource, kpack_image_api_resource};
use crate::resources::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};
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
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            metrics_addr: None,
            lease: None,
            concurrency: 16,
        }
    }
}

fn managed() -> watcher::Config {
    watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}"))
}

/// A cache and the watch stream that fills it (it must be polled).
fn cache<K>(
    api: Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
    trim: fn(&mut K),
) -> (
    Store<K>,
    impl Stream<Item = Result<K, watcher::Error>> + Send + 'static,
)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let reader = writer.as_reader();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(move |o: &mut K| {
            o.managed_fields_mut().clear();
            trim(o);
        })
        .reflect(writer)
        .applied_objects();
    (reader, stream)
}

/// Keeps a cached object whole.
fn keep_all<K>(_: &mut K) {}

/// Certificates are cached unfiltered (cert-manager makes the per-host ones),
/// so of those Kapsa does not manage only the name, owners and Ready
/// condition are kept: memory stays flat however many other Certificates
/// the cluster holds.
fn trim_certificate(certificate: &mut DynamicObject) {
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

/// Runs the operator until `shutdown` completes (or leadership is lost).
pub async fn run(
    client: Client,
    config: OperatorConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    if let Some(addr) = config.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
        tokio::spawn(crate::http::serve(listener, metrics.clone()));
    }
    if let Some(lease) = &config.lease {
        crate::leader::acquire(&client, lease).await;
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
    let stop = futures::future::FutureExt::shared(Box::pin(stop));

    // Projects and Environments feed both controllers: shared caches.
    let (projects, project_writer) = reflector::store_shared::<Project>(1024);
    let projects_for_projects = project_writer
        .subscribe()
        .ok_or_else(|| anyhow::anyhow!("subscribe"))?;
    let projects_for_environments = project_writer
        .subscribe()
        .ok_or_else(|| anyhow::anyhow!("subscribe"))?;
    let project_driver = watcher(
        Api::<Project>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|o: &mut Project| o.managed_fields_mut().clear())
    .reflect_shared(project_writer)
    .for_each(|_| async {});
    let (environments, environment_writer) = reflector::store_shared::<Environment>(1024);
    let environments_for_environments = environment_writer
        .subscribe()
        .ok_or_else(|| anyhow::anyhow!("subscribe"))?;
    let environments_for_projects = environment_writer
        .subscribe()
        .ok_or_else(|| anyhow::anyhow!("subscribe"))?;
    let environment_driver = watcher(
        Api::<Environment>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|o: &mut Environment| o.managed_fields_mut().clear())
    .reflect_shared(environment_writer)
    .for_each(|_| async {});

    let (pools, pool_stream) = cache(
        Api::<DomainPool>::all(client.clone()),
        watcher::Config::default(),
        (),
        keep_all,
    );
    let (service_accounts, sa_stream) = cache(
        Api::<ServiceAccount>::all(client.clone()),
        managed(),
        (),
        keep_all,
    );
    let (roles, role_stream) = cache(Api::<Role>::all(client.clone()), managed(), (), keep_all);
    let (role_bindings, binding_stream) = cache(
        Api::<RoleBinding>::all(client.clone()),
        managed(),
        (),
        keep_all,
    );
    let (secrets, secret_stream) =
        cache(Api::<Secret>::all(client.clone()), managed(), (), keep_all);
    let (quotas, quota_stream) = cache(
        Api::<ResourceQuota>::all(client.clone()),
        managed(),
        (),
        keep_all,
    );
    let (deployments, deployment_stream) = cache(
        Api::<Deployment>::all(client.clone()),
        managed(),
        (),
        keep_all,
    );
    let (services, service_stream) =
        cache(Api::<Service>::all(client.clone()), managed(), (), keep_all);
    let (ingresses, ingress_stream) =
        cache(Api::<Ingress>::all(client.clone()), managed(), (), keep_all);
    let image_resource = kpack_image_api_resource();
    let (images, image_stream) = cache(
        Api::<DynamicObject>::all_with(client.clone(), &image_resource),
        managed(),
        image_resource.clone(),
        keep_all,
    );
    let certificate_resource = certificate_api_resource();
    // Not label-filtered: cert-manager's ingress-shim makes the per-host
    // Certificates, and their readiness is what TLSReady reports.
    let (certificates, certificate_stream) = cache(
        Api::<DynamicObject>::all_with(client.clone(), &certificate_resource),
        watcher::Config::default(),
        certificate_resource.clone(),
        trim_certificate,
    );

    let stores = Stores {
        projects: projects.clone(),
        environments: environments.clone(),
        pools,
        service_accounts,
        roles,
        role_bindings,
        secrets,
        quotas,
        deployments,
        services,
        ingresses,
        images,
        certificates,
    };
    let git = Arc::new(GitState::default());
    let ctx = Arc::new(Context::new(
        client.clone(),
        stores,
        metrics.clone(),
        git.clone(),
    ));
    let controller_config = controller::Config::default().concurrency(config.concurrency);

    let (poll_tx, poll_rx) = tokio::sync::mpsc::channel::<ObjectRef<Project>>(1024);
    let polled =
        futures::stream::unfold(
            poll_rx,
            |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
        );
    let all_projects = {
        let projects = projects.clone();
        move || {
            projects
                .state()
                .iter()
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        }
    };
    let on_pool = all_projects.clone();
    let on_registry = all_projects.clone();
    let project_controller = Controller::for_shared_stream(projects_for_projects, projects.clone())
        .with_config(controller_config.clone())
        .owns_shared_stream(environments_for_projects)
        .owns(Api::<Namespace>::all(client.clone()), managed())
        .owns_stream(sa_stream)
        .owns_stream(role_stream)
        .owns_stream(binding_stream)
        .owns_stream(secret_stream)
        .owns_stream(quota_stream)
        .watches_stream(pool_stream, move |_: DomainPool| on_pool())
        .watches(
            Api::<ClusterRegistry>::all(client.clone()),
            watcher::Config::default(),
            move |_| on_registry(),
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
            .owns_stream_with(image_stream, image_resource)
            .watches_stream_with(
                certificate_stream,
                environments_of_certificate(environments.clone()),
                certificate_resource,
            )
            .watches_shared_stream(
                projects_for_environments,
                environments_of_project(environments.clone()),
            )
            .graceful_shutdown_on(stop.clone())
            .run(
                controllers::environment::reconcile,
                controllers::environment::error_policy,
                ctx.clone(),
            )
            .for_each(|result| log_failure("environment", result));

    let poller = poller::run(client.clone(), projects, git, metrics, poll_tx);
    tracing::info!("Kapsa operator running");
    tokio::select! {
        _ = async { tokio::join!(project_controller, environment_controller) } => {}
        _ = poller => {}
        _ = project_driver => {}
        _ = environment_driver => {}
    }
    tracing::info!("Kapsa operator stopped");
    Ok(())
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
        Err(error) => tracing::warn!(controller, %error, "controller error"),
    }
    futures::future::ready(())
}

/// Maps a Certificate to the Environments whose TLS it serves: the one
/// whose Ingress owns it (HTTP01), or every Environment of the namespace
/// (the project's DNS01 wildcard).
fn environments_of_certificate(
    environments: Store<Environment>,
) -> impl Fn(DynamicObject) -> Vec<ObjectRef<Environment>> + Send + Sync + 'static {
    move |certificate| {
        let Some(namespace) = certificate.namespace() else {
            return Vec::new();
        };
        let owner = certificate
            .owner_references()
            .iter()
            .find(|o| o.kind == "Ingress")
            .map(|o| o.name.clone());
        environments
            .state()
            .iter()
            .filter(|e| e.namespace().as_deref() == Some(namespace.as_str()))
            .filter(|e| owner.as_ref().is_none_or(|o| *o == e.name_any()))
            .map(|e| ObjectRef::from_obj(e.as_ref()))
            .collect()
    }
}

/// Maps a Project to its Environments (so a change of the runtime spec
/// reaches every Deployment).
fn environments_of_project(
    environments: Store<Environment>,
) -> impl Fn(Arc<Project>) -> Vec<ObjectRef<Environment>> + Send + Sync + 'static {
    move |project| {
        let name = project.name_any();
        environments
            .state()
            .iter()
            .filter(|e| e.spec.project == name)
            .map(|e| ObjectRef::from_obj(e.as_ref()))
            .collect()
    }
}

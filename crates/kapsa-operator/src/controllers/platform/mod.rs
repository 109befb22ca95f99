//! Status of the platform objects: a DomainPool's allocations and `Ready`
//! (its ClusterIssuer exists), a ClusterRegistry's or Registry's `Ready`
//! (its credentials Secrets are Docker configs for its server). Each
//! reconcile: dereference (caches; a credentials Secret is read only when
//! its resourceVersion changed since it was judged) → plan (pure, see
//! [`plan`]) → one status write, only on change. They own no children.

pub mod plan;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::registry::RegistryStatus;
use kapsa_api::{ClusterRegistry, DomainPool, Registry, RegistrySpec};
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use crate::context::{Context, SecretVerdict, cached, cached_with};
use crate::error::{Error, Result};
use crate::references::Problem;
use plan::{CredentialsField, PoolWorld};

fn key(kind: &str, namespace: Option<&str>, name: &str) -> String {
    match namespace {
        Some(namespace) => format!("{kind}/{namespace}/{name}"),
        None => format!("{kind}/{name}"),
    }
}

async fn measured<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    object: &K,
    controller: &str,
    key: String,
    reconcile: impl Future<Output = Result<()>>,
) -> Result<Action> {
    // Not before the caches are filled, and never from a copy older than
    // Kapsa's own last status write (its watch event is on its way).
    if !ctx.stores.ready() || ctx.applier.status_behind(object) {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    if object.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let started = Instant::now();
    let result = reconcile.await;
    ctx.metrics
        .record_reconcile(controller, result.is_ok(), started.elapsed());
    result?;
    super::on_success(ctx, &key);
    Ok(Action::requeue(ctx.resync_period))
}

pub async fn reconcile_pool(pool: Arc<DomainPool>, ctx: Arc<Context>) -> Result<Action> {
    let key = key("domainpool", None, &pool.name_any());
    measured(&ctx, pool.as_ref(), "domainpool", key, async {
        let stores = &ctx.stores;
        let projects = stores.projects.state();
        let pools = stores.pools.state();
        let issuer_exists = pool.spec.cluster_issuer_ref.as_ref().is_some_and(|r| {
            cached_with(
                &stores.cluster_issuers,
                &r.name,
                None,
                kapsa_api::external::cert_manager_cluster_issuer(),
            )
            .is_some()
        });
        let name = pool.name_any();
        let world = PoolWorld {
            pool: pool.as_ref(),
            projects: projects.iter().map(|p| p.as_ref()).collect(),
            other_defaults: pools
                .iter()
                .filter(|p| p.spec.default && p.name_any() != name)
                .map(|p| p.name_any())
                .collect(),
            cert_manager_installed: stores.installed.cert_manager,
            issuer_exists,
            now: Time(super::now()),
        };
        let after = plan::pool_status(&world);
        let before = pool.status.clone().unwrap_or_default();
        crate::status::update(&ctx, pool.as_ref(), &before, &after, &[]).await?;
        Ok(())
    })
    .await
}

pub fn error_policy_pool(pool: Arc<DomainPool>, error: &Error, ctx: Arc<Context>) -> Action {
    super::on_error(
        &ctx,
        "domainpool",
        key("domainpool", None, &pool.name_any()),
        error,
    )
}

/// Where a registry's credentials are: a ClusterRegistry names the
/// namespace; a Registry's are in its own.
fn locations(
    spec: &RegistrySpec,
    own_namespace: Option<&str>,
) -> [(CredentialsField, Option<(String, String)>); 2] {
    let locate = |r: &kapsa_api::common::SecretReference| {
        let namespace = match own_namespace {
            Some(ns) => ns.to_string(),
            None => r.namespace.clone().unwrap_or_default(),
        };
        (namespace, r.name.clone())
    };
    [
        (
            CredentialsField::Push,
            spec.credentials_secret_ref.as_ref().map(locate),
        ),
        (
            CredentialsField::Pull,
            spec.pull_secret_ref.as_ref().map(locate),
        ),
    ]
}

/// The verdict on one credentials Secret: from the cache of verdicts while
/// its resourceVersion is the one judged, otherwise read and judged now.
async fn verdict(
    ctx: &Context,
    field: CredentialsField,
    server: &str,
    (namespace, name): &(String, String),
) -> Result<std::result::Result<(), Problem>> {
    let at = (namespace.as_str(), name.as_str());
    let Some(meta) = cached(&ctx.stores.secret_metadata, name, Some(namespace)) else {
        return Ok(plan::judge_credentials(field, server, at, None));
    };
    let version = meta.metadata.resource_version.clone().unwrap_or_default();
    // One Secret may serve several registries (servers) and both fields.
    let memo_key = (format!("{namespace}/{name}"), format!("{server} {field:?}"));
    if let Ok(verdicts) = ctx.secret_verdicts.lock()
        && let Some(known) = verdicts.get(&memo_key)
        && known.resource_version == version
    {
        return Ok(known.verdict.clone());
    }
    let secret = Api::<Secret>::namespaced(ctx.client.clone(), namespace)
        .get_opt(name)
        .await
        .map_err(Error::Dereference)?;
    ctx.metrics.record_live_read("Secret");
    let verdict = plan::judge_credentials(field, server, at, secret.as_ref());
    // The resourceVersion actually read (the cache may lag behind it).
    let read_version = secret
        .as_ref()
        .and_then(|s| s.metadata.resource_version.clone())
        .unwrap_or(version);
    drop(secret);
    if let Ok(mut verdicts) = ctx.secret_verdicts.lock() {
        verdicts.insert(
            memo_key,
            SecretVerdict {
                resource_version: read_version,
                verdict: verdict.clone(),
            },
        );
    }
    Ok(verdict)
}

/// Plans a registry's status from its credentials and writes it on change.
async fn update_registry_status<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    object: &K,
    spec: &RegistrySpec,
    own_namespace: Option<&str>,
    before: Option<&RegistryStatus>,
) -> Result<()> {
    let mut verdicts: [Option<std::result::Result<(), Problem>>; 2] = [None, None];
    for (slot, (field, location)) in verdicts
        .iter_mut()
        .zip(locations(spec, own_namespace).iter())
    {
        if let Some(location) = location {
            *slot = Some(verdict(ctx, *field, &spec.server, location).await?);
        }
    }
    if let Some(problem) = crate::references::insecure_refused(spec, ctx.allow_insecure_registries)
    {
        verdicts[0] = Some(Err(problem));
    }
    let after = plan::registry_status(
        before,
        object.meta().generation,
        verdicts[0].as_ref(),
        verdicts[1].as_ref(),
        &Time(super::now()),
    );
    let before = before.cloned().unwrap_or_default();
    crate::status::update(ctx, object, &before, &after, &[]).await?;
    Ok(())
}

pub async fn reconcile_cluster_registry(
    registry: Arc<ClusterRegistry>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let key = key("clusterregistry", None, &registry.name_any());
    measured(
        &ctx,
        registry.as_ref(),
        "clusterregistry",
        key,
        update_registry_status(
            &ctx,
            registry.as_ref(),
            &registry.spec,
            None,
            registry.status.as_ref(),
        ),
    )
    .await
}

pub fn error_policy_cluster_registry(
    registry: Arc<ClusterRegistry>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    super::on_error(
        &ctx,
        "clusterregistry",
        key("clusterregistry", None, &registry.name_any()),
        error,
    )
}

pub async fn reconcile_registry(registry: Arc<Registry>, ctx: Arc<Context>) -> Result<Action> {
    let namespace = registry.namespace().unwrap_or_default();
    let key = key("registry", Some(&namespace), &registry.name_any());
    measured(
        &ctx,
        registry.as_ref(),
        "registry",
        key,
        update_registry_status(
            &ctx,
            registry.as_ref(),
            &registry.spec,
            Some(&namespace),
            registry.status.as_ref(),
        ),
    )
    .await
}

pub fn error_policy_registry(registry: Arc<Registry>, error: &Error, ctx: Arc<Context>) -> Action {
    super::on_error(
        &ctx,
        "registry",
        key(
            "registry",
            registry.namespace().as_deref(),
            &registry.name_any(),
        ),
        error,
    )
}

/// Whether a registry names the Secret `(namespace, name)` (push or pull).
pub fn names_secret(
    spec: &RegistrySpec,
    own_namespace: Option<&str>,
    (namespace, name): (&str, &str),
) -> bool {
    locations(spec, own_namespace)
        .iter()
        .filter_map(|(_, l)| l.as_ref())
        .any(|(ns, n)| ns == namespace && n == name)
}

//! The host-ownership table: which namespace holds which host under a
//! DomainPool base. Kapsa keeps it in one ConfigMap, the parameter of the
//! shipped ValidatingAdmissionPolicy (`deploy/admission/host-ownership.yaml`),
//! so that no namespace but the holder's can route a Project's hosts.
//!
//! Computed from the caches after they change, at most once a second;
//! written only when it changes (it is read once at start-up, so a restart
//! writes nothing).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kapsa_api::{DomainPool, Project};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};

use crate::context::Stores;
use crate::resources::{FIELD_MANAGER, MANAGED_BY_LABEL, MANAGED_BY_VALUE};

/// Name of the ConfigMap.
pub const HOST_OWNERS: &str = "kapsa-host-owners";
/// Key listing the base domains of every DomainPool, comma-separated.
pub const BASES_KEY: &str = "_bases";

/// The table: every pool's base domains, and every allocated Project's host
/// (`<project>.<base>`; its previews lie below it) with its namespace.
pub fn host_owners(
    projects: &[Arc<Project>],
    pools: &[Arc<DomainPool>],
) -> BTreeMap<String, String> {
    let mut bases: Vec<&str> = pools
        .iter()
        .flat_map(|p| p.spec.domains.iter().map(String::as_str))
        .collect();
    bases.sort_unstable();
    bases.dedup();
    let mut data = BTreeMap::from([(BASES_KEY.to_string(), bases.join(","))]);
    for project in projects {
        let Some(status) = project.status.as_ref() else {
            continue;
        };
        if let (Some(host), Some(namespace)) = (&status.host, &status.namespace) {
            data.insert(host.clone(), namespace.clone());
        }
    }
    data
}

fn config_map(namespace: &str, data: BTreeMap<String, String>) -> ConfigMap {
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(HOST_OWNERS.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_string(),
                MANAGED_BY_VALUE.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    }
}

/// Keeps the table in `namespace` up to date until the process ends.
/// `changes` yields once for every change of a Project or of a pool's
/// spec: the table is computed again only after one (at most once a
/// second), and after a write that failed.
pub async fn run(
    client: Client,
    stores: Stores,
    namespace: String,
    mut changes: impl Stream<Item = ()> + Send + Unpin,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    // The subscriptions are drained during every request: the cache they
    // follow waits for its subscribers once their buffers are full.
    let mut changed = true;
    let existing = draining(api.get_opt(HOST_OWNERS), &mut changes, &mut changed).await;
    let mut written: Option<BTreeMap<String, String>> = match existing {
        Ok(existing) => existing.and_then(|c| c.data),
        Err(error) => {
            tracing::warn!(%error, namespace, "reading the host-ownership table");
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick(), if changed => {}
            Some(()) = changes.next() => {
                changed = true;
                continue;
            }
        }
        if !stores.ready() {
            continue;
        }
        changed = false;
        let data = host_owners(&stores.projects.state(), &stores.pools.state());
        if written.as_ref() == Some(&data) {
            continue;
        }
        let patch = config_map(&namespace, data.clone());
        let (params, patch) = (
            PatchParams::apply(FIELD_MANAGER).force(),
            Patch::Apply(&patch),
        );
        let write = api.patch(HOST_OWNERS, &params, &patch);
        match draining(write, &mut changes, &mut changed).await {
            Ok(_) => {
                crate::fault::after_write("host-ownership table");
                tracing::debug!(hosts = data.len() - 1, "host-ownership table written");
                written = Some(data);
            }
            Err(error) => {
                tracing::warn!(%error, namespace, "writing the host-ownership table");
                changed = true;
            }
        }
    }
}

/// Awaits `request`, meanwhile taking what `changes` sends (and noting
/// that something changed).
async fn draining<T>(
    request: impl std::future::Future<Output = T>,
    changes: &mut (impl Stream<Item = ()> + Unpin),
    changed: &mut bool,
) -> T {
    tokio::pin!(request);
    loop {
        tokio::select! {
            answer = &mut request => return answer,
            Some(()) = changes.next() => *changed = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project(name: &str, host: Option<&str>, namespace: &str) -> Arc<Project> {
        let mut p: Project = serde_json::from_value(serde_json::json!({
            "apiVersion": "kapsa.dev/v1alpha1", "kind": "Project", "metadata": {"name": name},
            "spec": {"source": {"git": {"url": "https://git.example.com/a.git"}},
                "registryRef": {"name": "r"}}
        }))
        .unwrap();
        p.status = Some(kapsa_api::project::ProjectStatus {
            host: host.map(str::to_string),
            namespace: Some(namespace.into()),
            ..Default::default()
        });
        Arc::new(p)
    }

    #[test]
    fn the_table_lists_bases_and_allocated_hosts_only() {
        let pools: Vec<Arc<DomainPool>> = [
            "{metadata: {name: a}, spec: {domains: [apps.example.com, eu.apps.example.com]}}",
            "{metadata: {name: b}, spec: {domains: [apps.example.com]}}",
        ]
        .iter()
        .map(|y| Arc::new(serde_yaml_ng::from_str(y).unwrap()))
        .collect();
        let projects = vec![
            project("shop", Some("shop.apps.example.com"), "shop"),
            project("refused", None, "refused"),
        ];
        let table = host_owners(&projects, &pools);
        assert_eq!(
            table,
            BTreeMap::from([
                (
                    BASES_KEY.to_string(),
                    "apps.example.com,eu.apps.example.com".to_string()
                ),
                ("shop.apps.example.com".to_string(), "shop".to_string()),
            ])
        );
    }
}

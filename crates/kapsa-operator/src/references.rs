//! Dereferencing what a Project names, from the caches: its registry and the
//! Secret with that registry's credentials. A missing reference is not an
//! error of the reconcile but a condition on the object, so these return a
//! [`Problem`] for it.

use kapsa_api::project::RegistryKind;
use kapsa_api::{Project, RegistrySpec};

use crate::context::{Stores, cached};

/// Why a reference could not be used; the message names objects, never values.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// The registry a Project names, and where its credentials Secret is.
#[derive(Debug, Clone, PartialEq)]
pub struct RegistryRef {
    pub spec: RegistrySpec,
    /// Namespace and name of the `kubernetes.io/dockerconfigjson` Secret.
    pub credentials: Option<(String, String)>,
}

/// Looks up the registry a Project names in the caches (a ClusterRegistry,
/// or a Registry in the project namespace).
pub fn registry(
    stores: &Stores,
    project: &Project,
    namespace: &str,
) -> Result<RegistryRef, Problem> {
    resolve_registry(
        project,
        namespace,
        |name| cached(&stores.cluster_registries, name, None).map(|r| r.spec.clone()),
        |ns, name| cached(&stores.registries, name, Some(ns)).map(|r| r.spec.clone()),
    )
}

/// The registry a Project names, found with `cluster` (ClusterRegistry by
/// name) or `namespaced` (Registry by namespace and name). The credentials
/// of a Registry are in the project namespace; a ClusterRegistry names
/// their namespace.
pub fn resolve_registry(
    project: &Project,
    namespace: &str,
    cluster: impl FnOnce(&str) -> Option<RegistrySpec>,
    namespaced: impl FnOnce(&str, &str) -> Option<RegistrySpec>,
) -> Result<RegistryRef, Problem> {
    let reference = &project.spec.registry_ref;
    let spec = match reference.kind {
        RegistryKind::ClusterRegistry => cluster(&reference.name).ok_or_else(|| Problem {
            reason: "RegistryNotFound",
            message: format!("ClusterRegistry {:?} does not exist", reference.name),
        })?,
        RegistryKind::Registry => {
            namespaced(namespace, &reference.name).ok_or_else(|| Problem {
                reason: "RegistryNotFound",
                message: format!(
                    "Registry {:?} does not exist in namespace {namespace:?}",
                    reference.name
                ),
            })?
        }
    };
    let credentials = spec.credentials_secret_ref.as_ref().map(|secret| {
        let ns = match reference.kind {
            RegistryKind::ClusterRegistry => secret
                .namespace
                .clone()
                .unwrap_or_else(|| namespace.to_string()),
            RegistryKind::Registry => namespace.to_string(),
        };
        (ns, secret.name.clone())
    });
    Ok(RegistryRef { spec, credentials })
}

/// Whether a Project names `(namespace, name)` as its registry's credentials
/// (for mapping a changed Secret to the Projects that copy it).
pub fn uses_credentials(stores: &Stores, project: &Project, secret: (&str, &str)) -> bool {
    let namespace = crate::resources::project::namespace_name(project);
    registry(stores, project, &namespace)
        .ok()
        .and_then(|r| r.credentials)
        .is_some_and(|(ns, name)| ns == secret.0 && name == secret.1)
}

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
    /// Namespace and name of the push credentials (`kubernetes.io/dockerconfigjson`).
    pub credentials: Option<(String, String)>,
    /// Namespace and name of the pull-only credentials, if any.
    pub pull: Option<(String, String)>,
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
    let locate = |secret: &kapsa_api::common::SecretReference| {
        let ns = match reference.kind {
            RegistryKind::ClusterRegistry => secret
                .namespace
                .clone()
                .unwrap_or_else(|| namespace.to_string()),
            RegistryKind::Registry => namespace.to_string(),
        };
        (ns, secret.name.clone())
    };
    let credentials = spec.credentials_secret_ref.as_ref().map(locate);
    let pull = spec.pull_secret_ref.as_ref().map(locate);
    Ok(RegistryRef {
        spec,
        credentials,
        pull,
    })
}

/// Whether a Project copies the Secret `(namespace, name)`: its registry's
/// push or pull credentials, or its git credentials (for mapping a changed
/// Secret to the Projects that copy it).
pub fn uses_credentials(stores: &Stores, project: &Project, secret: (&str, &str)) -> bool {
    let namespace = crate::resources::project::namespace_name(project);
    let is = |s: &(String, String)| s.0 == secret.0 && s.1 == secret.1;
    let git = project
        .spec
        .source
        .git
        .secret_ref
        .as_ref()
        .is_some_and(|r| namespace == secret.0 && r.name == secret.1);
    git || registry(stores, project, &namespace)
        .ok()
        .is_some_and(|r| r.credentials.iter().chain(r.pull.iter()).any(is))
}

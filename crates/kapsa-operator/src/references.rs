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

/// Refuses `insecure: true` (plain HTTP, or a certificate nobody checks)
/// for a registry that is not on loopback, unless the operator allows it
/// (`--allow-insecure-registries`): push credentials would cross the
/// network unprotected, and a tenant's namespaced Registry could ask for it.
pub fn insecure_refused(spec: &RegistrySpec, allow_insecure: bool) -> Option<Problem> {
    (spec.insecure && !allow_insecure && !is_loopback_server(&spec.server)).then(|| Problem {
        reason: "InsecureRegistryNotAllowed",
        message: format!(
            "registry {:?} sets insecure: true but is not on loopback: pushes (and their credentials) would cross the network without TLS verification; use TLS, or start the operator with --allow-insecure-registries",
            spec.server
        ),
    })
}

/// Whether a registry server (`host[:port]`) is on loopback: `localhost`,
/// `127.0.0.0/8` or `[::1]`.
pub fn is_loopback_server(server: &str) -> bool {
    let host = match server.strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(rest, |(host, _)| host),
        None => server.rsplit_once(':').map_or(server, |(host, _)| host),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(server: &str, insecure: bool) -> RegistrySpec {
        let mut spec: RegistrySpec =
            serde_json::from_value(serde_json::json!({"server": server})).unwrap();
        spec.insecure = insecure;
        spec
    }

    #[test]
    fn insecure_only_on_loopback_unless_allowed() {
        for server in [
            "127.0.0.1:5000",
            "localhost:5000",
            "localhost",
            "[::1]:5000",
            "127.8.9.1",
        ] {
            assert!(is_loopback_server(server), "{server}");
            assert!(
                insecure_refused(&spec(server, true), false).is_none(),
                "{server}"
            );
        }
        for server in [
            "harbor.example.com",
            "10.0.0.5:5000",
            "localhost.evil.com",
            "127.0.0.1.nip.io:5000",
            "[2001:db8::1]:5000",
        ] {
            assert!(!is_loopback_server(server), "{server}");
            let problem = insecure_refused(&spec(server, true), false).expect(server);
            assert_eq!(problem.reason, "InsecureRegistryNotAllowed");
            assert!(problem.message.contains("--allow-insecure-registries"));
            assert!(
                insecure_refused(&spec(server, true), true).is_none(),
                "{server}"
            );
            assert!(
                insecure_refused(&spec(server, false), false).is_none(),
                "{server}"
            );
        }
    }
}

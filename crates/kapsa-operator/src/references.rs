//! Dereferencing what a Project names: its registry and that registry's
//! credentials. A missing reference is not an error of the reconcile but a
//! condition on the object, so these return `Ok(Err(problem))` for it.

use k8s_openapi::api::core::v1::Secret;
use kapsa_api::project::RegistryKind;
use kapsa_api::{ClusterRegistry, Project, Registry, RegistrySpec};
use kube::Client;
use kube::api::Api;

use crate::error::Result;

/// A registry with its push/pull credentials, if it names any.
pub struct ResolvedRegistry {
    pub spec: RegistrySpec,
    pub credentials: Option<Secret>,
}

/// Why a registry could not be used; the message names objects, never values.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
}

/// Fetches the registry a Project names; the namespace of its credentials
/// Secret comes with it (a Registry's are in the project namespace).
pub async fn registry_spec(
    client: &Client,
    project: &Project,
    namespace: &str,
) -> Result<Result<(RegistrySpec, String), Problem>> {
    let reference = &project.spec.registry_ref;
    Ok(match reference.kind {
        RegistryKind::ClusterRegistry => match Api::<ClusterRegistry>::all(client.clone())
            .get_opt(&reference.name)
            .await?
        {
            Some(r) => {
                let ns = r
                    .spec
                    .credentials_secret_ref
                    .as_ref()
                    .and_then(|s| s.namespace.clone())
                    .unwrap_or_else(|| namespace.to_string());
                Ok((r.spec, ns))
            }
            None => Err(Problem {
                reason: "RegistryNotFound",
                message: format!("ClusterRegistry {:?} does not exist", reference.name),
            }),
        },
        RegistryKind::Registry => match Api::<Registry>::namespaced(client.clone(), namespace)
            .get_opt(&reference.name)
            .await?
        {
            Some(r) => Ok((r.spec, namespace.to_string())),
            None => Err(Problem {
                reason: "RegistryNotFound",
                message: format!(
                    "Registry {:?} does not exist in namespace {namespace:?}",
                    reference.name
                ),
            }),
        },
    })
}

/// Fetches the registry a Project names, and its credentials Secret.
pub async fn resolve_registry(
    client: &Client,
    project: &Project,
    namespace: &str,
) -> Result<Result<ResolvedRegistry, Problem>> {
    let (spec, secret_namespace) = match registry_spec(client, project, namespace).await? {
        Ok(found) => found,
        Err(problem) => return Ok(Err(problem)),
    };
    let Some(secret_ref) = spec.credentials_secret_ref.clone() else {
        return Ok(Ok(ResolvedRegistry {
            spec,
            credentials: None,
        }));
    };
    let secret = Api::<Secret>::namespaced(client.clone(), &secret_namespace)
        .get_opt(&secret_ref.name)
        .await?;
    match secret {
        Some(s) if s.type_.as_deref() == Some("kubernetes.io/dockerconfigjson") => {
            Ok(Ok(ResolvedRegistry {
                spec,
                credentials: Some(s),
            }))
        }
        Some(s) => Ok(Err(Problem {
            reason: "RegistryCredentialsInvalid",
            message: format!(
                "Secret {secret_namespace}/{} has type {:?}; registry credentials must be kubernetes.io/dockerconfigjson",
                secret_ref.name,
                s.type_.unwrap_or_default()
            ),
        })),
        None => Ok(Err(Problem {
            reason: "RegistryCredentialsNotFound",
            message: format!(
                "Secret {secret_namespace}/{} (the registry's credentialsSecretRef) does not exist",
                secret_ref.name
            ),
        })),
    }
}

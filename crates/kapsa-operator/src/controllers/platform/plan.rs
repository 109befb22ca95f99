//! The plans of the platform objects' status: pure functions from what the
//! caches (and, for a changed credentials Secret, one read) show to the
//! status of a DomainPool, a ClusterRegistry or a Registry. Kapsa writes
//! nothing else for them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::conditions::{READY, merge_conditions};
use kapsa_api::domain_pool::{DomainAllocation, DomainPoolStatus};
use kapsa_api::registry::RegistryStatus;
use kapsa_api::{Condition, ConditionStatus, DomainPool, Project};
use kube::ResourceExt;

use crate::references::Problem;

/// The Secret type of registry credentials.
pub const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";

/// What a DomainPool's status is planned from.
#[derive(Clone, Debug)]
pub struct PoolWorld<'a> {
    pub pool: &'a DomainPool,
    /// Every Project (those allocated to this pool count).
    pub projects: Vec<&'a Project>,
    /// The other default pools, by name (a default pool should be alone).
    pub other_defaults: Vec<String>,
    /// Whether the cluster serves cert-manager's API.
    pub cert_manager_installed: bool,
    /// Whether the ClusterIssuer the pool names exists.
    pub issuer_exists: bool,
    pub now: Time,
}

/// The DomainPool's status: the Projects holding a host under each base
/// domain (every domain of the spec, zero included, then any base that a
/// Project still holds after its domain left the spec) and `Ready`.
pub fn pool_status(world: &PoolWorld) -> DomainPoolStatus {
    let pool = world.pool;
    let name = pool.name_any();
    let generation = pool.metadata.generation;
    let mut counts: BTreeMap<&str, i32> = BTreeMap::new();
    for project in &world.projects {
        let Some(status) = project.status.as_ref() else {
            continue;
        };
        if status.domain_pool.as_deref() == Some(name.as_str())
            && let Some(base) = status.base_domain.as_deref()
        {
            *counts.entry(base).or_default() += 1;
        }
    }
    let mut allocations: Vec<DomainAllocation> = pool
        .spec
        .domains
        .iter()
        .map(|domain| DomainAllocation {
            domain: domain.clone(),
            projects: counts.remove(domain.as_str()).unwrap_or(0),
        })
        .collect();
    allocations.extend(
        counts
            .into_iter()
            .map(|(domain, projects)| DomainAllocation {
                domain: domain.to_string(),
                projects,
            }),
    );
    let total: i32 = allocations.iter().map(|a| a.projects).sum();
    let issuer = pool
        .spec
        .cluster_issuer_ref
        .as_ref()
        .map(|r| r.name.as_str());
    let problem = if pool.spec.default && !world.other_defaults.is_empty() {
        Some(Problem {
            reason: "MultipleDefaults",
            message: format!(
                "DomainPool(s) {} are default too; Projects that name no pool cannot choose",
                world.other_defaults.join(", ")
            ),
        })
    } else {
        match issuer {
            Some(_) if !world.cert_manager_installed => Some(Problem {
                reason: "CertManagerNotInstalled",
                message: "spec.clusterIssuerRef is set, but the cluster does not serve cert-manager.io/v1; hosts get no certificates".to_string(),
            }),
            Some(issuer) if !world.issuer_exists => Some(Problem {
                reason: "ClusterIssuerNotFound",
                message: format!("ClusterIssuer {issuer:?} does not exist; hosts get no certificates until it does"),
            }),
            _ => None,
        }
    };
    let ready = match problem {
        Some(problem) => Condition::new(
            READY,
            ConditionStatus::False,
            problem.reason,
            problem.message,
            generation,
            world.now.clone(),
        ),
        None => Condition::new(
            READY,
            ConditionStatus::True,
            "Ready",
            match issuer {
                Some(issuer) => format!(
                    "{total} Project(s) hold hosts; certificates from ClusterIssuer {issuer:?}"
                ),
                None => format!(
                    "{total} Project(s) hold hosts; no ClusterIssuer: hosts are served without TLS"
                ),
            },
            generation,
            world.now.clone(),
        ),
    };
    let mut status = pool.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.allocations = allocations;
    merge_conditions(&mut status.conditions, [ready]);
    status
}

/// Which credentials of a registry a Secret holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialsField {
    /// `spec.credentialsSecretRef`: push (and pull) credentials.
    Push,
    /// `spec.pullSecretRef`: pull-only credentials.
    Pull,
}

impl CredentialsField {
    fn field(self) -> &'static str {
        match self {
            Self::Push => "spec.credentialsSecretRef",
            Self::Pull => "spec.pullSecretRef",
        }
    }
}

/// Whether `secret` (None: it does not exist) holds Docker credentials for
/// `server`: type `kubernetes.io/dockerconfigjson`, a `.dockerconfigjson`
/// with an `auths` entry for the server. Messages name the Secret and the
/// servers it has entries for, never a value.
pub fn judge_credentials(
    field: CredentialsField,
    server: &str,
    (namespace, name): (&str, &str),
    secret: Option<&Secret>,
) -> Result<(), Problem> {
    let (not_found, invalid, other_server) = match field {
        CredentialsField::Push => (
            "CredentialsNotFound",
            "CredentialsInvalid",
            "CredentialsForOtherServer",
        ),
        CredentialsField::Pull => (
            "PullCredentialsNotFound",
            "PullCredentialsInvalid",
            "PullCredentialsForOtherServer",
        ),
    };
    let what = format!("Secret {namespace}/{name} ({})", field.field());
    let Some(secret) = secret else {
        return Err(Problem {
            reason: not_found,
            message: format!("{what} does not exist"),
        });
    };
    let type_ = secret.type_.as_deref().unwrap_or_default();
    if type_ != DOCKER_CONFIG_JSON {
        return Err(Problem {
            reason: invalid,
            message: format!("{what} has type {type_:?}; it must be {DOCKER_CONFIG_JSON}"),
        });
    }
    let config = secret
        .data
        .as_ref()
        .and_then(|d| d.get(".dockerconfigjson"))
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes.0).ok());
    let Some(auths) = config
        .as_ref()
        .and_then(|c| c.get("auths"))
        .and_then(|a| a.as_object())
    else {
        return Err(Problem {
            reason: invalid,
            message: format!("{what}: its .dockerconfigjson is not a Docker config with \"auths\""),
        });
    };
    let wanted = registry_host(server);
    if auths
        .keys()
        .any(|key| same_registry(&registry_host(key), &wanted))
    {
        return Ok(());
    }
    let mut hosts: Vec<String> = auths.keys().map(|k| registry_host(k)).collect();
    hosts.sort();
    hosts.dedup();
    hosts.truncate(5);
    Err(Problem {
        reason: other_server,
        message: format!(
            "{what} has no credentials for {wanted:?} (it has: {})",
            if hosts.is_empty() {
                "none".to_string()
            } else {
                hosts.join(", ")
            }
        ),
    })
}

/// `host[:port]` of a registry address or a Docker config `auths` key
/// (`https://index.docker.io/v1/`, `harbor.example.com`,
/// `registry:5000/path`), lower case.
fn registry_host(address: &str) -> String {
    let address = address.trim();
    let without_scheme = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address);
    without_scheme
        .split('/')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase()
}

/// Docker Hub answers to several names.
fn same_registry(a: &str, b: &str) -> bool {
    const DOCKER_HUB: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    a == b || (DOCKER_HUB.contains(&a) && DOCKER_HUB.contains(&b))
}

/// A registry's status from the verdicts on its push and pull credentials
/// (`None`: it names none).
pub fn registry_status(
    before: Option<&RegistryStatus>,
    generation: Option<i64>,
    push: Option<&Result<(), Problem>>,
    pull: Option<&Result<(), Problem>>,
    now: &Time,
) -> RegistryStatus {
    let problem = [push, pull]
        .into_iter()
        .flatten()
        .find_map(|verdict| verdict.as_ref().err());
    let ready = match (problem, push) {
        (Some(problem), _) => Condition::new(
            READY,
            ConditionStatus::False,
            problem.reason,
            problem.message.clone(),
            generation,
            now.clone(),
        ),
        (None, Some(_)) => Condition::new(
            READY,
            ConditionStatus::True,
            "CredentialsValid",
            format!(
                "the credentials Secret is a {DOCKER_CONFIG_JSON} for the server{}",
                if pull.is_some() {
                    ", and so is the pull Secret"
                } else {
                    ""
                }
            ),
            generation,
            now.clone(),
        ),
        (None, None) => Condition::new(
            READY,
            ConditionStatus::True,
            "NoCredentials",
            "no credentialsSecretRef: builds push without credentials",
            generation,
            now.clone(),
        ),
    };
    let mut status = before.cloned().unwrap_or_default();
    status.observed_generation = generation;
    merge_conditions(&mut status.conditions, [ready]);
    status
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    fn now() -> Time {
        serde_json::from_value(serde_json::json!("2026-03-01T12:00:00Z")).unwrap()
    }

    fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
        serde_yaml_ng::from_str(text).unwrap()
    }

    const POOL: &str = r#"
apiVersion: kapsa.dev/v1alpha1
kind: DomainPool
metadata: {name: default, generation: 2}
spec:
  domains: [apps.example.com, apps2.example.com]
  default: true
  clusterIssuerRef: {name: letsencrypt}
  challenge: HTTP01
  ingressClassName: nginx
"#;

    fn project(name: &str, pool: &str, base: &str) -> Project {
        yaml(&format!(
            r#"
apiVersion: kapsa.dev/v1alpha1
kind: Project
metadata: {{name: {name}}}
spec:
  source: {{git: {{url: "https://git.example.com/{name}.git", branch: main}}}}
  registryRef: {{kind: ClusterRegistry, name: harbor}}
status:
  domainPool: {pool}
  baseDomain: {base}
  host: {name}.{base}
"#
        ))
    }

    fn ready(conditions: &[Condition]) -> (ConditionStatus, String, String) {
        let c = conditions.iter().find(|c| c.type_ == READY).unwrap();
        (c.status, c.reason.clone(), c.message.clone())
    }

    #[test]
    fn pool_counts_projects_per_base_domain() {
        let pool: DomainPool = yaml(POOL);
        let projects = [
            project("a", "default", "apps.example.com"),
            project("b", "default", "apps.example.com"),
            project("c", "other", "apps2.example.com"),
            // Its domain left the spec; its host is still in use.
            project("d", "default", "old.example.com"),
        ];
        let mut unallocated = project("e", "default", "apps.example.com");
        unallocated.status = None;
        let world = PoolWorld {
            pool: &pool,
            projects: projects.iter().chain([&unallocated]).collect(),
            other_defaults: vec![],
            cert_manager_installed: true,
            issuer_exists: true,
            now: now(),
        };
        let status = pool_status(&world);
        let allocations: Vec<(&str, i32)> = status
            .allocations
            .iter()
            .map(|a| (a.domain.as_str(), a.projects))
            .collect();
        assert_eq!(
            allocations,
            [
                ("apps.example.com", 2),
                ("apps2.example.com", 0),
                ("old.example.com", 1)
            ]
        );
        assert_eq!(status.observed_generation, Some(2));
        let (s, reason, message) = ready(&status.conditions);
        assert_eq!((s, reason.as_str()), (ConditionStatus::True, "Ready"));
        assert!(message.contains("3 Project(s)"), "{message}");
        assert!(message.contains("letsencrypt"), "{message}");
    }

    #[test]
    fn pool_not_ready_without_its_issuer_or_cert_manager_or_alone_as_default() {
        let pool: DomainPool = yaml(POOL);
        let world = |installed, exists, others: &[&str]| PoolWorld {
            pool: &pool,
            projects: vec![],
            other_defaults: others.iter().map(|s| s.to_string()).collect(),
            cert_manager_installed: installed,
            issuer_exists: exists,
            now: now(),
        };
        let reason = |w: PoolWorld| {
            let (s, reason, _) = ready(&pool_status(&w).conditions);
            (s, reason)
        };
        assert_eq!(
            reason(world(true, false, &[])),
            (ConditionStatus::False, "ClusterIssuerNotFound".into())
        );
        assert_eq!(
            reason(world(false, false, &[])),
            (ConditionStatus::False, "CertManagerNotInstalled".into())
        );
        assert_eq!(
            reason(world(true, true, &["second"])),
            (ConditionStatus::False, "MultipleDefaults".into())
        );
        // Without an issuer there is nothing to find: Ready, without TLS.
        let mut plain = pool.clone();
        plain.spec.cluster_issuer_ref = None;
        let status = pool_status(&PoolWorld {
            pool: &plain,
            ..world(false, false, &[])
        });
        let (s, reason, message) = ready(&status.conditions);
        assert_eq!((s, reason.as_str()), (ConditionStatus::True, "Ready"));
        assert!(message.contains("without TLS"), "{message}");
        // The allocations list every domain of the spec, zero included.
        assert_eq!(status.allocations.len(), 2);
    }

    #[test]
    fn a_settled_pool_plans_the_status_it_has() {
        let pool: DomainPool = yaml(POOL);
        let projects = [project("a", "default", "apps.example.com")];
        let world = |pool: &DomainPool| {
            pool_status(&PoolWorld {
                pool,
                projects: projects.iter().collect(),
                other_defaults: vec![],
                cert_manager_installed: true,
                issuer_exists: true,
                now: now(),
            })
        };
        let first = world(&pool);
        let mut settled = pool.clone();
        settled.status = Some(first.clone());
        // Later, nothing changed: the same status (no write).
        assert_eq!(world(&settled), first);
    }

    fn secret(type_: &str, config: &str) -> Secret {
        let mut secret: Secret = yaml(&format!(
            "metadata: {{name: push, namespace: kapsa-system}}\ntype: {type_}"
        ));
        secret.data = Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(config.as_bytes().to_vec()),
        )]));
        secret
    }

    #[test]
    fn credentials_must_be_a_docker_config_for_the_server() {
        let at = ("kapsa-system", "push");
        let judge = |server: &str, s: Option<&Secret>| {
            judge_credentials(CredentialsField::Push, server, at, s).map_err(|p| p.reason)
        };
        let good = secret(
            DOCKER_CONFIG_JSON,
            r#"{"auths":{"https://Harbor.example.com/v2/":{"auth":"dXNlcjpwYXNz"}}}"#,
        );
        assert_eq!(judge("harbor.example.com", Some(&good)), Ok(()));
        assert_eq!(
            judge("quay.io", Some(&good)),
            Err("CredentialsForOtherServer")
        );
        assert_eq!(
            judge("harbor.example.com", None),
            Err("CredentialsNotFound")
        );
        let opaque = secret("Opaque", r#"{"auths":{}}"#);
        assert_eq!(
            judge("harbor.example.com", Some(&opaque)),
            Err("CredentialsInvalid")
        );
        let garbled = secret(DOCKER_CONFIG_JSON, "not json");
        assert_eq!(
            judge("harbor.example.com", Some(&garbled)),
            Err("CredentialsInvalid")
        );
        let hub = secret(
            DOCKER_CONFIG_JSON,
            r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"}}}"#,
        );
        assert_eq!(judge("docker.io", Some(&hub)), Ok(()));
        let with_port = secret(
            DOCKER_CONFIG_JSON,
            r#"{"auths":{"registry.local:5000":{"auth":"dXNlcjpwYXNz"}}}"#,
        );
        assert_eq!(judge("registry.local:5000", Some(&with_port)), Ok(()));
        assert_eq!(
            judge("registry.local:5001", Some(&with_port)),
            Err("CredentialsForOtherServer")
        );
        // The message names servers, never a credential.
        let message = judge_credentials(CredentialsField::Pull, "quay.io", at, Some(&good))
            .unwrap_err()
            .message;
        assert!(message.contains("harbor.example.com"), "{message}");
        assert!(message.contains("spec.pullSecretRef"), "{message}");
        assert!(!message.contains("dXNlcjpwYXNz"), "{message}");
    }

    #[test]
    fn registry_ready_follows_its_credentials() {
        let status = |push: Option<Result<(), Problem>>, pull: Option<Result<(), Problem>>| {
            let s = registry_status(None, Some(1), push.as_ref(), pull.as_ref(), &now());
            let (status, reason, _) = ready(&s.conditions);
            (status, reason)
        };
        let bad = |reason| {
            Err(Problem {
                reason,
                message: String::new(),
            })
        };
        assert_eq!(
            status(Some(Ok(())), None),
            (ConditionStatus::True, "CredentialsValid".into())
        );
        assert_eq!(
            status(None, None),
            (ConditionStatus::True, "NoCredentials".into())
        );
        assert_eq!(
            status(
                Some(bad("CredentialsNotFound")),
                Some(bad("PullCredentialsNotFound"))
            ),
            (ConditionStatus::False, "CredentialsNotFound".into())
        );
        assert_eq!(
            status(Some(Ok(())), Some(bad("PullCredentialsInvalid"))),
            (ConditionStatus::False, "PullCredentialsInvalid".into())
        );
    }
}

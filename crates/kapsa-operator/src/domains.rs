//! Host allocation from DomainPools: pure decisions, unit-tested.
//!
//! A Project is given `<project>.<base>` and, for its previews, every host
//! below it: it *claims* that domain and its subdomains. Two claims conflict
//! when one is, or lies under, the other (pools may hold nested bases, e.g.
//! `apps.example.com` and `shop.apps.example.com`). The Project that recorded
//! its host first keeps it; the other one is refused with a condition.

use std::collections::BTreeMap;

use kapsa_api::naming::production_host;
use kapsa_api::{DomainPool, Project};
use kube::ResourceExt;

/// Why a Project has no host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllocationError {
    /// `spec.domainPoolRef` names a pool that does not exist.
    PoolNotFound(String),
    /// No pool is marked default and the Project names none.
    NoDefaultPool,
    /// Several pools are marked default; the operator does not guess.
    SeveralDefaultPools(Vec<String>),
    /// The host is, or lies under or over, a host another Project holds.
    HostConflict { host: String, holder: String },
    /// The pool reserves the Project's name (`spec.reservedNames`).
    HostReserved { host: String, pool: String },
    /// The host is a pool's base domain, or lies above one: taking it would
    /// block that base for everyone.
    HostIsBase { host: String, base: String },
    /// An Ingress Kapsa does not manage already routes the host (or a host
    /// under it).
    HostInUse { host: String, by: String },
}

impl AllocationError {
    /// The condition reason for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::PoolNotFound(_) => "DomainPoolNotFound",
            Self::NoDefaultPool => "NoDefaultDomainPool",
            Self::SeveralDefaultPools(_) => "SeveralDefaultDomainPools",
            Self::HostConflict { .. } => "HostConflict",
            Self::HostReserved { .. } => "HostReserved",
            Self::HostIsBase { .. } => "HostIsBase",
            Self::HostInUse { .. } => "HostInUse",
        }
    }
}

impl std::fmt::Display for AllocationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::PoolNotFound(name) => write!(f, "DomainPool {name:?} does not exist"),
            Self::NoDefaultPool => write!(
                f,
                "spec.domainPoolRef is not set and no DomainPool has spec.default: true"
            ),
            Self::SeveralDefaultPools(names) => write!(
                f,
                "spec.domainPoolRef is not set and several DomainPools are marked default ({}); name one",
                names.join(", ")
            ),
            Self::HostConflict { host, holder } => write!(
                f,
                "host {host} overlaps hosts of Project {holder:?}, which holds them already"
            ),
            Self::HostReserved { host, pool } => write!(
                f,
                "host {host} is reserved by DomainPool {pool:?} (spec.reservedNames); rename the Project or use another pool"
            ),
            Self::HostIsBase { host, base } => write!(
                f,
                "host {host} would cover the base domain {base} of a DomainPool; rename the Project or use another pool"
            ),
            Self::HostInUse { host, by } => write!(
                f,
                "host {host} is already routed by Ingress {by}, which Kapsa does not manage"
            ),
        }
    }
}

/// The pool a Project draws its host from.
pub fn select_pool<'a>(
    project: &Project,
    pools: &'a [DomainPool],
) -> Result<&'a DomainPool, AllocationError> {
    if let Some(reference) = &project.spec.domain_pool_ref {
        return pools
            .iter()
            .find(|p| p.name_any() == reference.name)
            .ok_or_else(|| AllocationError::PoolNotFound(reference.name.clone()));
    }
    let defaults: Vec<&DomainPool> = pools.iter().filter(|p| p.spec.default).collect();
    match defaults.as_slice() {
        [pool] => Ok(pool),
        [] => Err(AllocationError::NoDefaultPool),
        several => {
            let mut names: Vec<String> = several.iter().map(|p| p.name_any()).collect();
            names.sort();
            Err(AllocationError::SeveralDefaultPools(names))
        }
    }
}

/// The base domain for a Project: the one it already has if the pool still
/// lists it (sticky), otherwise the pool's domain with the fewest Projects
/// (ties go to the earlier domain in the list).
pub fn choose_base_domain(
    pool: &DomainPool,
    current: Option<&str>,
    others: &[&Project],
) -> Option<String> {
    if let Some(current) = current
        && pool.spec.domains.iter().any(|d| d == current)
    {
        return Some(current.to_string());
    }
    let mut counts: BTreeMap<&str, usize> =
        pool.spec.domains.iter().map(|d| (d.as_str(), 0)).collect();
    for project in others {
        if let Some(base) = project
            .status
            .as_ref()
            .and_then(|s| s.base_domain.as_deref())
            && let Some(count) = counts.get_mut(base)
        {
            *count += 1;
        }
    }
    pool.spec
        .domains
        .iter()
        .min_by_key(|d| counts[d.as_str()])
        .cloned()
}

/// What else there is to allocate around: every pool's base domains, the
/// names the Project's pool reserves, and the hosts Ingresses Kapsa does not
/// manage already route.
#[derive(Clone, Debug, Default)]
pub struct Landscape {
    /// Base domains of every DomainPool.
    pub bases: Vec<String>,
    /// The pool, if it reserves the Project's name.
    pub reserving_pool: Option<String>,
    /// `(host, "<namespace>/<ingress>")` of Ingresses Kapsa does not manage.
    pub foreign_hosts: Vec<(String, String)>,
}

impl Landscape {
    /// A base domain that is `host` or lies under it, if any.
    pub fn base_at_or_under(&self, host: &str) -> Option<&str> {
        self.bases
            .iter()
            .find(|b| at_or_under(b, host))
            .map(String::as_str)
    }
}

/// Whether `name` is `domain` or lies under it (`<label>.<domain>`).
/// Allocates nothing: host allocation runs it over every Project.
fn at_or_under(name: &str, domain: &str) -> bool {
    name.strip_suffix(domain)
        .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
}

/// Whether two claimed domains overlap: equal, or one under the other.
pub fn claims_overlap(a: &str, b: &str) -> bool {
    at_or_under(a, b) || at_or_under(b, a)
}

/// Allocates `<project>.<base>` for `project`, refusing it if another
/// Project's claim overlaps and that Project came first (it recorded its
/// host already, or was created earlier, or — same instant — sorts first).
pub fn allocate_host(
    project: &Project,
    base: &str,
    others: &[&Project],
    landscape: &Landscape,
) -> Result<String, AllocationError> {
    let host = production_host(&project.name_any(), base);
    let mine_recorded =
        project.status.as_ref().and_then(|s| s.host.as_deref()) == Some(host.as_str());
    if let Some(pool) = &landscape.reserving_pool
        && !mine_recorded
    {
        return Err(AllocationError::HostReserved {
            host,
            pool: pool.clone(),
        });
    }
    // Bases win over Projects, whenever the base was added.
    if let Some(base) = landscape.base_at_or_under(&host) {
        return Err(AllocationError::HostIsBase {
            host,
            base: base.to_string(),
        });
    }
    if !mine_recorded
        && let Some((_, by)) = landscape
            .foreign_hosts
            .iter()
            .find(|(h, _)| at_or_under(h, &host))
    {
        return Err(AllocationError::HostInUse {
            host,
            by: by.clone(),
        });
    }
    // Over every other Project, for every reconcile: nothing is copied
    // until a claim overlaps.
    let name = project.metadata.name.as_deref();
    for other in others {
        if other.metadata.name.as_deref() == name {
            continue;
        }
        let status = other.status.as_ref();
        let recorded = status.and_then(|s| s.host.as_deref());
        let other_host: std::borrow::Cow<'_, str> = match recorded {
            Some(host) => host.into(),
            None => match status.and_then(|s| s.base_domain.as_deref()) {
                Some(b) => production_host(&other.name_any(), b).into(),
                None => continue,
            },
        };
        if !claims_overlap(&host, &other_host) {
            continue;
        }
        // A claim on a base (or above one) is void: it holds nothing.
        if landscape.base_at_or_under(&other_host).is_some() {
            continue;
        }
        let other_recorded = recorded.is_some();
        let other_first = match (mine_recorded, other_recorded) {
            (true, false) => false,
            (false, true) => true,
            _ => {
                (other.creation_timestamp(), other.name_any())
                    < (project.creation_timestamp(), project.name_any())
            }
        };
        if other_first {
            return Err(AllocationError::HostConflict {
                host,
                holder: other.name_any(),
            });
        }
    }
    Ok(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(yaml: &str) -> DomainPool {
        serde_yaml_ng::from_str(yaml).expect("DomainPool YAML")
    }

    fn project(name: &str, base: Option<&str>, host: Option<&str>, created: &str) -> Project {
        let mut p: Project = serde_yaml_ng::from_str(&format!(
            "apiVersion: kapsa.dev/v1alpha1
kind: Project
metadata: {{name: {name}, creationTimestamp: '{created}'}}
spec:
  source: {{git: {{url: 'https://git.example.com/{name}.git'}}}}
  registryRef: {{name: harbor}}
"
        ))
        .expect("Project YAML");
        p.status = Some(kapsa_api::project::ProjectStatus {
            base_domain: base.map(str::to_string),
            host: host.map(str::to_string),
            ..Default::default()
        });
        p
    }

    const POOLS: &str = "
apiVersion: kapsa.dev/v1alpha1
kind: DomainPool
metadata: {name: default}
spec: {domains: [a.example.com, b.example.com], default: true}
";

    #[test]
    fn default_pool_is_used_when_none_is_named() {
        let pools = vec![
            pool(POOLS),
            pool("metadata: {name: other}\nspec: {domains: [c.example.com]}"),
        ];
        let p = project("shop", None, None, "2026-01-01T00:00:00Z");
        assert_eq!(select_pool(&p, &pools).unwrap().name_any(), "default");
    }

    #[test]
    fn missing_and_ambiguous_pools_are_errors() {
        let mut p = project("shop", None, None, "2026-01-01T00:00:00Z");
        assert_eq!(
            select_pool(&p, &[]).unwrap_err(),
            AllocationError::NoDefaultPool
        );
        let two = vec![
            pool(POOLS),
            pool("metadata: {name: x}\nspec: {domains: [c.example.com], default: true}"),
        ];
        assert_eq!(
            select_pool(&p, &two).unwrap_err(),
            AllocationError::SeveralDefaultPools(vec!["default".into(), "x".into()])
        );
        p.spec.domain_pool_ref = Some(kapsa_api::common::LocalObjectReference::new("nope"));
        assert_eq!(
            select_pool(&p, &two).unwrap_err().reason(),
            "DomainPoolNotFound"
        );
    }

    #[test]
    fn base_with_fewest_projects_wins_then_sticks() {
        let pool = pool(POOLS);
        let on_a = project("one", Some("a.example.com"), None, "2026-01-01T00:00:00Z");
        let others = [&on_a];
        assert_eq!(
            choose_base_domain(&pool, None, &others).as_deref(),
            Some("b.example.com")
        );
        // Sticky: an existing allocation stays even when it is the fuller one.
        assert_eq!(
            choose_base_domain(&pool, Some("a.example.com"), &others).as_deref(),
            Some("a.example.com")
        );
        // A base the pool no longer lists is re-chosen.
        assert_eq!(
            choose_base_domain(&pool, Some("gone.example.com"), &[]).as_deref(),
            Some("a.example.com")
        );
    }

    #[test]
    fn overlapping_claims_are_detected() {
        assert!(claims_overlap(
            "shop.apps.example.com",
            "shop.apps.example.com"
        ));
        assert!(claims_overlap(
            "api.shop.apps.example.com",
            "shop.apps.example.com"
        ));
        assert!(claims_overlap(
            "shop.apps.example.com",
            "api.shop.apps.example.com"
        ));
        assert!(!claims_overlap(
            "shop.apps.example.com",
            "myshop.apps.example.com"
        ));
        assert!(!claims_overlap(
            "shop.apps.example.com",
            "api.apps.example.com"
        ));
    }

    #[test]
    fn the_first_holder_keeps_an_overlapping_host() {
        // `shop` on apps.example.com claims *.shop.apps.example.com, where
        // `api` on the nested base shop.apps.example.com would land.
        let shop = project(
            "shop",
            Some("apps.example.com"),
            Some("shop.apps.example.com"),
            "2026-01-02T00:00:00Z",
        );
        let api = project("api", None, None, "2026-01-01T00:00:00Z");
        let err = allocate_host(
            &api,
            "shop.apps.example.com",
            &[&shop],
            &Landscape::default(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            AllocationError::HostConflict {
                host: "api.shop.apps.example.com".into(),
                holder: "shop".into()
            }
        );
        // The holder itself is never refused because of the newcomer.
        let api_pending = project(
            "api",
            Some("shop.apps.example.com"),
            None,
            "2026-01-01T00:00:00Z",
        );
        assert_eq!(
            allocate_host(
                &shop,
                "apps.example.com",
                &[&api_pending],
                &Landscape::default()
            )
            .unwrap(),
            "shop.apps.example.com"
        );
    }

    #[test]
    fn without_recorded_hosts_the_older_project_wins() {
        let old = project(
            "shop",
            Some("apps.example.com"),
            None,
            "2026-01-01T00:00:00Z",
        );
        let new = project(
            "api",
            Some("shop.apps.example.com"),
            None,
            "2026-01-02T00:00:00Z",
        );
        assert!(
            allocate_host(
                &new,
                "shop.apps.example.com",
                &[&old],
                &Landscape::default()
            )
            .is_err()
        );
        assert!(allocate_host(&old, "apps.example.com", &[&new], &Landscape::default()).is_ok());
    }
}

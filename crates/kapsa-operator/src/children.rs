//! The objects a plan is made of: the children Kapsa wants ([`Child`]), the
//! children it sees in its caches ([`Observed`]) and the ones to delete
//! ([`Deletion`]). Everything is kept as JSON with its API resource, so one
//! apply-and-prune step serves every kind, typed or not (kpack, cert-manager).

use std::collections::BTreeSet;

use kube::api::{ApiResource, DynamicObject};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde_json::Value;

use crate::resources::{MANAGED_BY_LABEL, MANAGED_BY_VALUE};

/// Which object: kind (with group), namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChildKey {
    /// `<group>/<Kind>` (`/Deployment` is `apps/Deployment`; core kinds have an empty group).
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
}

impl ChildKey {
    pub fn new(resource: &ApiResource, namespace: Option<&str>, name: &str) -> Self {
        Self {
            kind: format!("{}/{}", resource.group, resource.kind),
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }
}

impl std::fmt::Display for ChildKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = self.kind.rsplit('/').next().unwrap_or(&self.kind);
        match &self.namespace {
            Some(ns) => write!(f, "{kind} {ns}/{}", self.name),
            None => write!(f, "{kind} {}", self.name),
        }
    }
}

/// An object the plan wants, as it will be server-side applied.
#[derive(Clone, Debug)]
pub struct Child {
    pub resource: ApiResource,
    pub object: DynamicObject,
}

impl Child {
    /// A typed object (Deployment, Secret, …).
    pub fn typed<K: Resource<DynamicType = ()> + Serialize>(object: &K) -> Self {
        let value = serde_json::to_value(object).expect("a Kubernetes object serializes");
        Self {
            resource: ApiResource::erase::<K>(&()),
            object: serde_json::from_value(value).expect("a Kubernetes object is a DynamicObject"),
        }
    }

    /// An object of a kind Kapsa has no Rust type for.
    pub fn dynamic(resource: ApiResource, object: DynamicObject) -> Self {
        Self { resource, object }
    }

    pub fn key(&self) -> ChildKey {
        ChildKey::new(
            &self.resource,
            self.object.metadata.namespace.as_deref(),
            &self.object.name_any(),
        )
    }

    /// The JSON of the object (without status): what is applied and compared.
    pub fn to_value(&self) -> Value {
        let mut value = serde_json::to_value(&self.object).expect("serializes");
        if let Some(map) = value.as_object_mut() {
            map.insert(
                "apiVersion".into(),
                self.resource.api_version.clone().into(),
            );
            map.insert("kind".into(), self.resource.kind.clone().into());
            map.remove("status");
        }
        value
    }
}

/// A child as the caches show it now.
#[derive(Clone, Debug)]
pub struct Observed {
    pub resource: ApiResource,
    pub key: ChildKey,
    pub uid: String,
    /// The uid of its controller owner, if it has one.
    pub controller_uid: Option<String>,
    /// Carries `app.kubernetes.io/managed-by=kapsa`.
    pub managed: bool,
    /// The whole cached object as JSON, for the write-only-on-change check.
    pub value: Value,
}

impl Observed {
    /// Describes a cached object.
    pub fn of<K>(resource: &ApiResource, object: &K) -> Self
    where
        K: Resource + Serialize,
    {
        let meta = object.meta();
        Self {
            resource: resource.clone(),
            key: ChildKey::new(resource, meta.namespace.as_deref(), &object.name_any()),
            uid: meta.uid.clone().unwrap_or_default(),
            controller_uid: meta
                .owner_references
                .iter()
                .flatten()
                .find(|o| o.controller == Some(true))
                .map(|o| o.uid.clone()),
            managed: meta
                .labels
                .as_ref()
                .and_then(|l| l.get(MANAGED_BY_LABEL))
                .is_some_and(|v| v == MANAGED_BY_VALUE),
            value: serde_json::to_value(object).unwrap_or(Value::Null),
        }
    }

    /// [`Observed::of`] for a typed object.
    pub fn typed<K: Resource<DynamicType = ()> + Serialize>(object: &K) -> Self {
        Self::of(&ApiResource::erase::<K>(&()), object)
    }

    /// Whether Kapsa made this object for `owner_uid`: it carries Kapsa's
    /// label and `owner_uid` is its controller. Nothing else is ever pruned.
    pub fn owned_by(&self, owner_uid: &str) -> bool {
        self.managed && !owner_uid.is_empty() && self.controller_uid.as_deref() == Some(owner_uid)
    }
}

/// An object Kapsa made that the plan no longer wants. Deleted with a uid
/// precondition, so a newer object of the same name is never hit.
#[derive(Clone, Debug, PartialEq)]
pub struct Deletion {
    pub resource: ApiResource,
    pub key: ChildKey,
    pub uid: String,
}

/// The children of `owner_uid` among `observed` that are neither wanted nor
/// kept: what to prune.
pub fn prune(
    observed: &[Observed],
    desired: &[Child],
    keep: &[ChildKey],
    owner_uid: &str,
) -> Vec<Deletion> {
    let wanted: BTreeSet<ChildKey> = desired
        .iter()
        .map(Child::key)
        .chain(keep.iter().cloned())
        .collect();
    observed
        .iter()
        .filter(|o| o.owned_by(owner_uid) && !wanted.contains(&o.key))
        .map(|o| Deletion {
            resource: o.resource.clone(),
            key: o.key.clone(),
            uid: o.uid.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use serde_json::json;

    fn config_map(name: &str, labels: Value, owner: Option<&str>) -> ConfigMap {
        let mut value = json!({"metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}"), "labels": labels}});
        if let Some(owner) = owner {
            value["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "X", "name": "o", "uid": owner, "controller": true}]);
        }
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn only_kapsa_children_of_the_owner_that_are_not_wanted_are_pruned() {
        let managed = json!({MANAGED_BY_LABEL: MANAGED_BY_VALUE});
        let observed = vec![
            Observed::typed(&config_map("wanted", managed.clone(), Some("owner"))),
            Observed::typed(&config_map("kept", managed.clone(), Some("owner"))),
            Observed::typed(&config_map("stale", managed.clone(), Some("owner"))),
            Observed::typed(&config_map("foreign", json!({}), Some("owner"))),
            Observed::typed(&config_map("other-owner", managed.clone(), Some("other"))),
            Observed::typed(&config_map("orphan", managed, None)),
        ];
        let desired = vec![Child::typed(&config_map("wanted", json!({}), None))];
        let keep = vec![observed[1].key.clone()];
        let deletions = prune(&observed, &desired, &keep, "owner");
        assert_eq!(deletions.len(), 1);
        assert_eq!(deletions[0].key.name, "stale");
        assert_eq!(deletions[0].uid, "uid-stale");
        assert!(
            prune(&observed, &[], &[], "").is_empty(),
            "no owner uid, no prune"
        );
    }
}

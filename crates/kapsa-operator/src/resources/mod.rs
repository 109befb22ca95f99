//! Pure functions from desired state to Kubernetes objects. No I/O here: the
//! reconcilers fetch what these need, and apply what they return.

pub mod environment;
pub mod project;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};

/// Field manager of every server-side apply Kapsa makes.
pub const FIELD_MANAGER: &str = "kapsa";
/// Label on every object Kapsa manages: `app.kubernetes.io/managed-by=kapsa`.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "kapsa";
/// The Project an object belongs to.
pub const PROJECT_LABEL: &str = "kapsa.dev/project";
/// The Environment an object belongs to.
pub const ENVIRONMENT_LABEL: &str = "kapsa.dev/environment";

/// Labels every object of a Project carries.
pub fn project_labels(project: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY_VALUE.to_string()),
        ("app.kubernetes.io/part-of".to_string(), project.to_string()),
        (PROJECT_LABEL.to_string(), project.to_string()),
    ])
}

/// Labels every object of an Environment carries; the selector labels are a
/// subset that never changes for the life of the Environment.
pub fn environment_labels(project: &str, environment: &str) -> BTreeMap<String, String> {
    let mut labels = project_labels(project);
    labels.extend(selector_labels(project, environment));
    labels.insert(
        "app.kubernetes.io/instance".to_string(),
        instance_label(project, environment),
    );
    labels
}

/// Longest label value the API server accepts.
pub const MAX_LABEL_VALUE: usize = 63;

/// `<project>-<environment>`, or, when that is longer than a label value may
/// be (a 40-character project and a 63-character Environment), its first
/// 56 characters and a 6-hex-digit hash of the whole: stable, distinct, valid.
pub fn instance_label(project: &str, environment: &str) -> String {
    use sha2::{Digest, Sha256};
    let full = format!("{project}-{environment}");
    if full.len() <= MAX_LABEL_VALUE {
        return full;
    }
    let hash: String = Sha256::digest(full.as_bytes())[..3]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let head = full[..MAX_LABEL_VALUE - 7].trim_end_matches(['-', '.']);
    format!("{head}-{hash}")
}

/// The Deployment's selector and the Service's: immutable once created.
pub fn selector_labels(project: &str, environment: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), project.to_string()),
        (PROJECT_LABEL.to_string(), project.to_string()),
        (ENVIRONMENT_LABEL.to_string(), environment.to_string()),
    ])
}

/// An owner reference that makes `owner` the controller of an object, so the
/// garbage collector deletes the object with it.
pub fn controller_reference<K: Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).to_string(),
        kind: K::kind(&()).to_string(),
        name: owner.name_any(),
        uid: owner.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_label_fits_a_label_value_at_the_longest_names() {
        assert_eq!(instance_label("shop", "production"), "shop-production");
        let project = "p".repeat(40);
        let a = instance_label(&project, &format!("preview-{}", "a".repeat(55)));
        let b = instance_label(&project, &format!("preview-{}", "a".repeat(54) + "b"));
        for value in [&a, &b] {
            assert!(value.len() <= MAX_LABEL_VALUE, "{value}");
            assert!(value.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
            assert!(
                value.starts_with('p') && value.chars().last().unwrap().is_ascii_alphanumeric()
            );
        }
        assert_ne!(a, b, "distinct environments keep distinct labels");
        assert_eq!(
            a,
            instance_label(&project, &format!("preview-{}", "a".repeat(55)))
        );
        // A cut that would end on a dash does not.
        let cut = instance_label(&"x".repeat(55), "-y-production-environment");
        assert!(!cut.contains("--"), "{cut}");
    }
}

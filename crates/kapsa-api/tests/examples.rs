//! Every file under `examples/` deserializes into the Rust types and
//! serializes back without losing a field.

use std::fs;
use std::path::{Path, PathBuf};

use kapsa_api::{ClusterRegistry, DomainPool, Environment, Project, Registry};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

fn examples() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("read examples/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every value in `original` is present and equal in `round_tripped`
/// (which may add fields the types default).
fn assert_subset(original: &Value, round_tripped: &Value, path: &str) {
    match (original, round_tripped) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let other = b
                    .get(key)
                    .unwrap_or_else(|| panic!("field lost: {path}.{key}"));
                assert_subset(value, other, &format!("{path}.{key}"));
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "list length changed at {path}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_subset(x, y, &format!("{path}[{i}]"));
            }
        }
        _ => assert_eq!(original, round_tripped, "value changed at {path}"),
    }
}

fn round_trip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(
    original: &Value,
    file: &Path,
) {
    let typed: T = serde_json::from_value(original.clone())
        .unwrap_or_else(|e| panic!("{}: does not deserialize: {e}", file.display()));
    let back = serde_json::to_value(&typed).expect("serialize");
    assert_subset(original, &back, &file.display().to_string());
    // A second trip is exact.
    let again: T = serde_json::from_value(back.clone()).expect("deserialize again");
    assert_eq!(again, typed, "{}", file.display());
    assert_eq!(serde_json::to_value(&again).expect("serialize again"), back);
}

#[test]
fn examples_round_trip() {
    let files = examples();
    let mut kinds = std::collections::BTreeSet::new();
    for file in &files {
        let text = fs::read_to_string(file).expect("read example");
        let value: Value =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        match kind.as_str() {
            "DomainPool" => round_trip::<DomainPool>(&value, file),
            "ClusterRegistry" => round_trip::<ClusterRegistry>(&value, file),
            "Registry" => round_trip::<Registry>(&value, file),
            "Project" => round_trip::<Project>(&value, file),
            "Environment" => round_trip::<Environment>(&value, file),
            other => panic!("{}: unknown kind {other:?}", file.display()),
        }
        kinds.insert(kind);
    }
    for required in ["DomainPool", "ClusterRegistry", "Project", "Environment"] {
        assert!(kinds.contains(required), "examples/ has a {required}");
    }
}

#[test]
fn required_examples_exist() {
    let names: Vec<String> = examples()
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for required in [
        "domain-pool.yaml",
        "cluster-registry.yaml",
        "project.yaml",
        "environment-image.yaml",
    ] {
        assert!(
            names.iter().any(|n| n == required),
            "examples/{required} exists"
        );
    }
}

#[test]
fn project_example_has_previews_and_runtime() {
    let text = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/project.yaml"),
    )
    .expect("read project example");
    let project: Project = serde_yaml_ng::from_str(&text).expect("parse project example");
    let previews = &project.spec.preview_environments;
    assert!(previews.enabled);
    assert_eq!(previews.branches, vec!["feature/*".to_owned()]);
    let runtime = &project.spec.runtime;
    assert!(runtime.health_check.is_some());
    assert!(!runtime.config_map_refs.is_empty());
    assert!(!runtime.secret_refs.is_empty());
    assert!(runtime.metrics.is_some());
}

#[test]
fn fixed_image_example() {
    let text = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/environment-image.yaml"),
    )
    .expect("read environment example");
    let env: Environment = serde_yaml_ng::from_str(&text).expect("parse environment example");
    assert_eq!(env.metadata.namespace.as_deref(), Some("shop"));
    assert!(env.spec.image.is_some());
    assert!(env.spec.branch.is_none());
}

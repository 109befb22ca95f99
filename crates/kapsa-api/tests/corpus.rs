//! Shape checks for the admission corpora under `tests/`:
//!
//! * `invalid/*.yaml`: one object each, violating one rule, first line
//!   `# expect: <fragment of the API server's rejection message>`;
//! * `transitions/<case>/{before,after}.yaml`: an accepted object and an
//!   update of it that an immutability rule rejects (`# expect:` in after);
//! * `valid/*.yaml`: boundary cases that must be accepted.
//!
//! The integration test against a real kube-apiserver applies them; this
//! test only checks that every file is well formed.

use std::fs;
use std::path::{Path, PathBuf};

use kapsa_api::{ClusterRegistry, DomainPool, Environment, Project, Registry};

const KINDS: [&str; 5] = [
    "DomainPool",
    "ClusterRegistry",
    "Registry",
    "Project",
    "Environment",
];
const NAMESPACED: [&str; 2] = ["Registry", "Environment"];

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|entry| entry.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn expect_fragment(text: &str) -> Option<&str> {
    text.lines()
        .next()?
        .strip_prefix("# expect:")
        .map(str::trim)
        .filter(|s| !s.is_empty())
}

/// Parses a single-object file and checks apiVersion, kind and metadata.
fn parse_object(path: &Path) -> (String, serde_json::Value) {
    let text = fs::read_to_string(path).expect("read corpus file");
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect();
    assert_eq!(
        docs.len(),
        1,
        "{}: exactly one object per file",
        path.display()
    );
    let obj = docs.into_iter().next().expect("one document");
    assert_eq!(
        obj["apiVersion"],
        "kapsa.dev/v1alpha1",
        "{}",
        path.display()
    );
    let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
    assert!(
        KINDS.contains(&kind.as_str()),
        "{}: unknown kind {kind:?}",
        path.display()
    );
    assert!(
        obj["metadata"]["name"].is_string(),
        "{}: metadata.name",
        path.display()
    );
    let namespace = obj["metadata"]["namespace"].as_str();
    if NAMESPACED.contains(&kind.as_str()) {
        assert_eq!(
            namespace,
            Some("shop"),
            "{}: namespaced objects use namespace shop",
            path.display()
        );
    } else {
        assert_eq!(
            namespace,
            None,
            "{}: cluster-scoped objects have no namespace",
            path.display()
        );
    }
    (kind, obj)
}

/// Deserializes a valid object into its Rust type.
fn typed(kind: &str, obj: serde_json::Value, path: &Path) {
    let result = match kind {
        "DomainPool" => serde_json::from_value::<DomainPool>(obj).map(drop),
        "ClusterRegistry" => serde_json::from_value::<ClusterRegistry>(obj).map(drop),
        "Registry" => serde_json::from_value::<Registry>(obj).map(drop),
        "Project" => serde_json::from_value::<Project>(obj).map(drop),
        "Environment" => serde_json::from_value::<Environment>(obj).map(drop),
        other => panic!("unknown kind {other}"),
    };
    if let Err(e) = result {
        panic!(
            "{}: does not deserialize into the Rust type: {e}",
            path.display()
        );
    }
}

#[test]
fn invalid_corpus_is_well_formed() {
    let files = yaml_files(&dir("invalid"));
    assert!(
        files.len() >= 130,
        "at least 130 invalid objects, found {}",
        files.len()
    );
    let mut kinds_seen = std::collections::BTreeSet::new();
    for path in &files {
        let text = fs::read_to_string(path).expect("read");
        let fragment = expect_fragment(&text)
            .unwrap_or_else(|| panic!("{}: missing `# expect:` line", path.display()));
        assert!(
            fragment.contains("spec") || fragment.contains("metadata.name"),
            "{}: the fragment should name the offending field: {fragment:?}",
            path.display()
        );
        let (kind, _) = parse_object(path);
        kinds_seen.insert(kind);
    }
    assert_eq!(
        kinds_seen.len(),
        KINDS.len(),
        "every kind has invalid examples: {kinds_seen:?}"
    );
}

#[test]
fn transition_corpus_is_well_formed() {
    let root = dir("transitions");
    let mut cases: Vec<PathBuf> = fs::read_dir(&root)
        .expect("read transitions")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 3, "at least 3 transition cases");
    for case in cases {
        let before = case.join("before.yaml");
        let after = case.join("after.yaml");
        let (kind_before, obj_before) = parse_object(&before);
        let (kind_after, obj_after) = parse_object(&after);
        assert_eq!(kind_before, kind_after, "{}", case.display());
        assert_eq!(
            obj_before["metadata"],
            obj_after["metadata"],
            "{}: same object",
            case.display()
        );
        let text = fs::read_to_string(&after).expect("read after");
        assert!(
            expect_fragment(&text).is_some(),
            "{}: missing `# expect:`",
            after.display()
        );
        typed(&kind_before, obj_before, &before);
        typed(&kind_after, obj_after, &after);
    }
}

#[test]
fn valid_corpus_is_well_formed() {
    let files = yaml_files(&dir("valid"));
    assert!(!files.is_empty());
    for path in &files {
        let text = fs::read_to_string(path).expect("read");
        assert!(
            expect_fragment(&text).is_none(),
            "{}: valid objects expect no error",
            path.display()
        );
        let (kind, obj) = parse_object(path);
        typed(&kind, obj, path);
    }
}

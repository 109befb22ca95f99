//! Kapsa's CRDs against a real kube-apiserver (the shared test control plane):
//! they install and become Established, every example and boundary case is
//! accepted, every object of the invalid corpus is refused with a message that
//! names the offending field, immutable fields stay immutable, and
//! `kubectl explain` shows the descriptions.

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Namespace;
use kapsa_api::{ClusterRegistry, DomainPool, Environment, Project, Registry};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::{Client, ResourceExt};
use serde_json::Value;

fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(name)
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Every document of a YAML file, with the `# expect:` fragment if any.
fn read_objects(path: &Path) -> (Vec<DynamicObject>, Option<String>) {
    let text = std::fs::read_to_string(path).expect("readable corpus file");
    let expect = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("# expect:"))
        .map(|s| s.trim().to_string());
    let objects = serde_yaml_ng::Deserializer::from_str(&text)
        .filter_map(|doc| {
            let value: Value = serde::Deserialize::deserialize(doc).expect("valid YAML");
            (!value.is_null()).then(|| serde_json::from_value(value).expect("a Kubernetes object"))
        })
        .collect();
    (objects, expect)
}

fn api_for(client: &Client, object: &DynamicObject) -> Api<DynamicObject> {
    let kind = object
        .types
        .as_ref()
        .map(|t| t.kind.as_str())
        .unwrap_or_default();
    let resource = match kind {
        "DomainPool" => ApiResource::erase::<DomainPool>(&()),
        "ClusterRegistry" => ApiResource::erase::<ClusterRegistry>(&()),
        "Registry" => ApiResource::erase::<Registry>(&()),
        "Project" => ApiResource::erase::<Project>(&()),
        "Environment" => ApiResource::erase::<Environment>(&()),
        other => panic!("unknown kind {other}"),
    };
    match object.namespace() {
        Some(ns) => Api::namespaced_with(client.clone(), &ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        field_manager: Some("kapsa-admission-test".into()),
    }
}

/// The shared control plane with Kapsa's CRDs and the `shop` namespace.
async fn client() -> Client {
    let env = kapsa_testenv::shared().await;
    let client = env.client().await;
    static SETUP: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    SETUP
        .get_or_init(|| async {
            let crds = kapsa_testenv::crds::parse_crds(&kapsa_api::crds_yaml()).expect("CRD YAML");
            kapsa_testenv::crds::install_crds(&client, &crds, "kapsa")
                .await
                .expect("Kapsa's CRDs install and become Established");
            for ns in ["shop", "staging"] {
                let namespace: Namespace =
                    serde_json::from_value(serde_json::json!({"metadata": {"name": ns}})).unwrap();
                let _ = Api::<Namespace>::all(client.clone())
                    .create(&PostParams::default(), &namespace)
                    .await;
            }
        })
        .await;
    client
}

async fn accepted_all(dir: &Path) -> usize {
    let client = client().await;
    let mut count = 0;
    for file in yaml_files(dir) {
        for object in read_objects(&file).0 {
            if let Err(e) = api_for(&client, &object).create(&dry_run(), &object).await {
                panic!("{} was refused: {e}", file.display());
            }
            count += 1;
        }
    }
    count
}

#[tokio::test]
async fn every_example_is_accepted() {
    let count = accepted_all(&examples_dir()).await;
    assert!(
        count >= 4,
        "examples/ holds a pool, a registry, a project and an environment"
    );
}

#[tokio::test]
async fn every_boundary_case_is_accepted() {
    let count = accepted_all(&corpus_dir("valid")).await;
    assert!(count > 0);
}

#[tokio::test]
async fn every_invalid_object_is_refused_naming_the_field() {
    let client = client().await;
    let mut failures = Vec::new();
    let files = yaml_files(&corpus_dir("invalid"));
    for file in &files {
        let (objects, expect) = read_objects(file);
        let expect = expect.expect("an `# expect:` line");
        let object = &objects[0];
        match api_for(&client, object).create(&dry_run(), object).await {
            Ok(_) => failures.push(format!("{}: accepted", file.display())),
            Err(kube::Error::Api(status)) => {
                if !(status.code == 422 || status.code == 400) {
                    failures.push(format!(
                        "{}: HTTP {} {}",
                        file.display(),
                        status.code,
                        status.message
                    ));
                } else if !status
                    .message
                    .to_lowercase()
                    .contains(&expect.to_lowercase())
                {
                    failures.push(format!(
                        "{}: message lacks {expect:?}: {}",
                        file.display(),
                        status.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{}: {e}", file.display())),
        }
    }
    assert!(files.len() >= 130, "the corpus holds at least 130 objects");
    assert!(
        failures.is_empty(),
        "{} of {} not refused as expected:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
    println!(
        "{} invalid objects refused, each naming its field",
        files.len()
    );
}

#[tokio::test]
async fn immutable_fields_stay_immutable() {
    let client = client().await;
    let cases: Vec<PathBuf> = std::fs::read_dir(corpus_dir("transitions"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(cases.len() >= 3);
    for case in cases {
        let (before, _) = read_objects(&case.join("before.yaml"));
        let (after, expect) = read_objects(&case.join("after.yaml"));
        let expect = expect.expect("an `# expect:` line in after.yaml");
        let api = api_for(&client, &before[0]);
        let created = api
            .create(&PostParams::default(), &before[0])
            .await
            .unwrap_or_else(|e| panic!("{}: before.yaml refused: {e}", case.display()));
        let mut update = after[0].clone();
        update.metadata.resource_version = created.metadata.resource_version.clone();
        let err = api
            .replace(&created.name_any(), &PostParams::default(), &update)
            .await
            .expect_err(&format!("{}: the update was accepted", case.display()));
        let message = err.to_string();
        assert!(
            message.to_lowercase().contains(&expect.to_lowercase()),
            "{}: {message} lacks {expect:?}",
            case.display()
        );
    }
}

#[tokio::test]
async fn kubectl_explain_shows_descriptions() {
    client().await;
    let env = kapsa_testenv::shared().await;
    let output = std::process::Command::new(env.assets_dir().join("kubectl"))
        .arg("--kubeconfig")
        .arg(env.kubeconfig_path())
        .args(["explain", "project.spec.previewEnvironments"])
        .output()
        .expect("kubectl runs");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "kubectl explain failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The description kubectl prints is the one the Rust doc comments produced.
    let crd = kapsa_api::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "Project")
        .unwrap();
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
    let description = schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["previewEnvironments"]
        ["description"]
        .as_str()
        .expect("previewEnvironments has a description")
        .to_string();
    let first_words: String = description
        .split_whitespace()
        .take(5)
        .collect::<Vec<_>>()
        .join(" ");
    let printed: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        printed.contains(&first_words),
        "kubectl explain lacks {first_words:?}:\n{text}"
    );
    for field in ["branches", "ttl", "maxEnvironments", "enabled"] {
        assert!(
            text.contains(field),
            "kubectl explain lacks the field {field}:\n{text}"
        );
    }
}

//! The Helm chart (`charts/kapsa`) and the operator image (`Dockerfile`).
//!
//! - `helm lint --strict` passes, with the default values and with every
//!   toggle flipped.
//! - No drift: `helm template kapsa charts/kapsa -n kapsa-system` renders
//!   every object of deploy/operator/{rbac,operator,admission}.yaml and
//!   deploy/admission/host-ownership.yaml, and nothing else. Each object is
//!   compared whole (apiVersion, kind, name, namespace, labels, annotations,
//!   spec, rules, roleRef, subjects, data, ...), except for what Helm adds:
//!   the labels in [`HELM_LABELS`] and the annotations in
//!   [`HELM_ANNOTATIONS`], dropped from the rendered side only. The drift
//!   test sets `namespace.create=true`: by default the chart leaves the
//!   release namespace to `helm install --create-namespace` (Helm stores the
//!   release there before it creates any object), which another test checks.
//! - The chart's CRDs are deploy/crds/kapsa.yaml byte for byte, its
//!   appVersion is the workspace version, and every value is documented in
//!   `helm show values`.
//! - The real API server (this binary's own control plane) accepts the
//!   rendered chart (server-side apply, strict field validation), and a
//!   scratch `helm install` / `helm upgrade` / `helm uninstall` works.
//! - The Dockerfile copies files that exist, and its cargo command, run
//!   here with its RUSTFLAGS, gives a static binary that runs
//!   `kapsa --version` (the image itself cannot be built here: no container
//!   runtime).
//!
//! Helm: `KAPSA_HELM`, else the binary hack/install-helm.sh caches. Without
//! helm the helm tests print that they skipped and pass, unless
//! `KAPSA_HELM_REQUIRED=1` (hack/test.sh sets it): then they fail.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::{Scope, pinned_kind};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use serde_json::Value;

/// Labels Helm's conventions add to every object of the chart; the drift
/// test ignores them on the rendered objects.
const HELM_LABELS: [&str; 4] = [
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
];

/// Annotations only Helm reads (`keep` on the Namespace); ignored likewise.
const HELM_ANNOTATIONS: [&str; 1] = ["helm.sh/resource-policy"];

/// The plain manifests the chart must render.
const PLAIN_MANIFESTS: [&str; 4] = [
    "deploy/operator/rbac.yaml",
    "deploy/operator/operator.yaml",
    "deploy/operator/admission.yaml",
    "deploy/admission/host-ownership.yaml",
];

const RELEASE: &str = "kapsa";
const NAMESPACE: &str = "kapsa-system";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// The pinned Helm version of hack/install-helm.sh.
fn pinned_helm_version() -> String {
    read("hack/install-helm.sh")
        .lines()
        .find_map(|l| {
            l.strip_prefix("HELM_VERSION=\"${HELM_VERSION:-")
                .and_then(|rest| rest.strip_suffix("}\""))
                .map(str::to_owned)
        })
        .expect("hack/install-helm.sh pins HELM_VERSION")
}

/// Where hack/install-helm.sh caches helm (the same rule as the script).
fn cached_helm() -> PathBuf {
    let root = match std::env::var_os("KAPSA_ASSETS_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                });
            cache.join("kapsa/assets")
        }
    };
    root.join(format!("helm-{}", pinned_helm_version()))
        .join("helm")
}

/// The helm binary, or `None` (the test then skips) when there is none and
/// `KAPSA_HELM_REQUIRED` is not set.
fn helm() -> Option<PathBuf> {
    let required = env_flag("KAPSA_HELM_REQUIRED");
    if let Some(path) = std::env::var_os("KAPSA_HELM").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "KAPSA_HELM={} is not a file (hack/install-helm.sh prints the path)",
            path.display()
        );
        return Some(path);
    }
    let cached = cached_helm();
    if cached.is_file() {
        return Some(cached);
    }
    assert!(
        !required,
        "helm is required (KAPSA_HELM_REQUIRED is set) but KAPSA_HELM is unset and {} does not \
         exist: run hack/install-helm.sh",
        cached.display()
    );
    eprintln!(
        "skipped: no helm (set KAPSA_HELM, or run hack/install-helm.sh to build it into {})",
        cached.display()
    );
    None
}

/// Runs helm with `args` in the repository root, with its configuration,
/// cache and data in a scratch folder; panics with helm's output on failure.
fn run_helm(helm: &Path, args: &[&str]) -> String {
    let (ok, stdout, stderr) = try_helm(helm, args);
    assert!(ok, "helm {} failed:\n{stdout}\n{stderr}", args.join(" "));
    stdout
}

/// Runs helm; returns whether it succeeded, its stdout and its stderr.
fn try_helm(helm: &Path, args: &[&str]) -> (bool, String, String) {
    let home = tempfile::tempdir().expect("a scratch folder for helm");
    let output = Command::new(helm)
        .args(args)
        .current_dir(repo_root())
        .env("HELM_CONFIG_HOME", home.path().join("config"))
        .env("HELM_CACHE_HOME", home.path().join("cache"))
        .env("HELM_DATA_HOME", home.path().join("data"))
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", helm.display()));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `helm template kapsa charts/kapsa -n kapsa-system` with `set` values.
fn render(helm: &Path, set: &[&str]) -> Vec<Value> {
    let mut args = vec![
        "template",
        RELEASE,
        "charts/kapsa",
        "--namespace",
        NAMESPACE,
    ];
    for value in set {
        args.extend(["--set", value]);
    }
    documents(&run_helm(helm, &args))
}

/// Every document of a multi-document YAML stream.
fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

fn str_at<'a>(object: &'a Value, pointer: &str) -> &'a str {
    object
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// kind, name and namespace: what identifies an object.
fn identity(object: &Value) -> (String, String, String) {
    (
        str_at(object, "/kind").to_owned(),
        str_at(object, "/metadata/name").to_owned(),
        str_at(object, "/metadata/namespace").to_owned(),
    )
}

/// A rendered object without what Helm adds (see [`HELM_LABELS`]).
fn without_helm_metadata(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        for (field, ignored) in [
            ("labels", &HELM_LABELS[..]),
            ("annotations", &HELM_ANNOTATIONS[..]),
        ] {
            if let Some(map) = metadata.get_mut(field).and_then(Value::as_object_mut) {
                for key in ignored {
                    map.remove(*key);
                }
                if map.is_empty() {
                    metadata.remove(field);
                }
            }
        }
    }
    object
}

/// The first place where `a` and `b` differ, as a JSON pointer.
fn first_difference(a: &Value, b: &Value, at: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| {
                let path = format!("{at}/{k}");
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => first_difference(u, v, &path),
                    (u, v) => Some(format!("{path}: {u:?} vs {v:?}")),
                }
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| first_difference(u, v, &format!("{at}/{i}"))),
        _ if a == b => None,
        _ => Some(format!("{at}: {a} vs {b}")),
    }
}

/// Asserts that `rendered` holds exactly the plain manifests' objects.
fn assert_renders_the_plain_manifests(rendered: &[Value]) {
    let mut expected = Vec::new();
    for file in PLAIN_MANIFESTS {
        for object in documents(&read(file)) {
            expected.push((file, object));
        }
    }
    let mut problems = Vec::new();
    for (file, object) in &expected {
        let id = identity(object);
        let found: Vec<&Value> = rendered.iter().filter(|r| identity(r) == id).collect();
        match found.as_slice() {
            [one] => {
                let one = without_helm_metadata(one);
                if let Some(difference) = first_difference(object, &one, "") {
                    problems.push(format!(
                        "{} {} (namespace {:?}) of {file} differs from the chart's at {difference}",
                        id.0, id.1, id.2
                    ));
                }
            }
            [] => problems.push(format!(
                "{} {} (namespace {:?}) of {file} is not in the chart",
                id.0, id.1, id.2
            )),
            _ => problems.push(format!("the chart renders {} {} twice", id.0, id.1)),
        }
    }
    let known: BTreeSet<_> = expected.iter().map(|(_, o)| identity(o)).collect();
    for object in rendered {
        let id = identity(object);
        if !known.contains(&id) {
            problems.push(format!(
                "the chart renders {} {} (namespace {:?}), which deploy/ does not have",
                id.0, id.1, id.2
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "the chart and deploy/ drifted apart (ignored: labels {HELM_LABELS:?}, annotations \
         {HELM_ANNOTATIONS:?}):\n- {}",
        problems.join("\n- ")
    );
}

fn kinds(objects: &[Value]) -> Vec<String> {
    objects
        .iter()
        .map(|o| format!("{}/{}", str_at(o, "/kind"), str_at(o, "/metadata/name")))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects
        .iter()
        .filter(|o| str_at(o, "/kind") == kind)
        .collect()
}

fn operator_args(objects: &[Value]) -> Vec<String> {
    let deployment = find(objects, "Deployment");
    let args = deployment[0]
        .pointer("/spec/template/spec/containers/0/args")
        .and_then(Value::as_array)
        .expect("the operator's args");
    args.iter()
        .map(|a| a.as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn chart_lints_strictly() {
    let Some(helm) = helm() else { return };
    let variants: [&[&str]; 4] = [
        &[],
        &[
            "namespace.create=true",
            "serviceMonitor.enabled=true",
            "image.digest=sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "image.pullPolicy=Always",
            "operator.extraArgs={--max-poll-interval=30s}",
        ],
        &[
            "admission.operatorReach.enabled=false",
            "admission.hostOwnership.enabled=false",
            "podDisruptionBudget.enabled=false",
            "metrics.service.enabled=false",
        ],
        &["replicaCount=1", "leaderElection.enabled=false"],
    ];
    for set in variants {
        let mut args = vec!["lint", "--strict", "charts/kapsa", "--namespace", NAMESPACE];
        for value in set {
            args.extend(["--set", value]);
        }
        let out = run_helm(&helm, &args);
        assert!(out.contains("0 chart(s) failed"), "helm lint: {out}");
    }
}

#[test]
fn chart_renders_exactly_the_plain_manifests() {
    let Some(helm) = helm() else { return };
    assert_renders_the_plain_manifests(&render(&helm, &["namespace.create=true"]));
}

#[test]
fn chart_defaults_and_toggles() {
    let Some(helm) = helm() else { return };
    // The defaults: deploy/ without the Namespace (left to `helm install
    // --create-namespace`), and no ServiceMonitor.
    let defaults = render(&helm, &[]);
    let with_namespace = render(&helm, &["namespace.create=true"]);
    let mut expected: Vec<String> = kinds(&with_namespace)
        .into_iter()
        .filter(|k| !k.starts_with("Namespace/"))
        .collect();
    let mut got = kinds(&defaults);
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    assert!(find(&defaults, "ServiceMonitor").is_empty());
    assert_eq!(
        operator_args(&defaults),
        ["operator", "--metrics-addr=0.0.0.0:8080"]
    );

    // The ServiceMonitor scrapes the metrics Service's `metrics` port.
    let monitored = render(&helm, &["serviceMonitor.enabled=true"]);
    let monitor = find(&monitored, "ServiceMonitor");
    assert_eq!(monitor.len(), 1, "{:?}", kinds(&monitored));
    let monitor = monitor[0];
    assert_eq!(str_at(monitor, "/apiVersion"), "monitoring.coreos.com/v1");
    assert_eq!(str_at(monitor, "/metadata/namespace"), NAMESPACE);
    let service = find(&monitored, "Service")[0];
    let service_labels = service.pointer("/metadata/labels").unwrap();
    for (key, value) in monitor
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .expect("a label selector")
    {
        assert_eq!(service_labels.get(key), Some(value), "selector {key}");
    }
    assert_eq!(
        str_at(monitor, "/spec/endpoints/0/port"),
        str_at(service, "/spec/ports/0/name")
    );
    assert_eq!(str_at(monitor, "/spec/endpoints/0/path"), "/metrics");

    // Where and with what Dockerfile builds run.
    let builds = render(
        &helm,
        &[
            "operator.builds.buildkitImage=mirror.example/buildkit@sha256:0123",
            "operator.builds.nodeSelector.node-pool=builds",
            "operator.builds.tolerations={dedicated=builds:NoSchedule}",
            "operator.allowInsecureRegistries=true",
        ],
    );
    let args = operator_args(&builds);
    for arg in [
        "--buildkit-image=mirror.example/buildkit@sha256:0123",
        "--build-node-selector=node-pool=builds",
        "--build-toleration=dedicated=builds:NoSchedule",
        "--allow-insecure-registries",
    ] {
        assert!(args.contains(&arg.to_owned()), "{arg} in {args:?}");
    }

    // Admission policies off: no policies, and no host-ownership table.
    let no_admission = render(
        &helm,
        &[
            "admission.operatorReach.enabled=false",
            "admission.hostOwnership.enabled=false",
        ],
    );
    assert!(find(&no_admission, "ValidatingAdmissionPolicy").is_empty());
    assert!(find(&no_admission, "ValidatingAdmissionPolicyBinding").is_empty());
    assert!(operator_args(&no_admission).contains(&"--no-host-owners".to_owned()));

    // One replica without leader election: no PodDisruptionBudget (it would
    // block every drain); two without leader election do not render.
    let single = render(&helm, &["replicaCount=1", "leaderElection.enabled=false"]);
    assert!(find(&single, "PodDisruptionBudget").is_empty());
    assert!(operator_args(&single).contains(&"--no-leader-election".to_owned()));
    let (ok, _, stderr) = try_helm(
        &helm,
        &[
            "template",
            RELEASE,
            "charts/kapsa",
            "--set",
            "leaderElection.enabled=false",
        ],
    );
    assert!(!ok && stderr.contains("replicaCount: 1"), "{stderr}");

    // Another release and namespace: names, bindings and the policies'
    // user name follow.
    let other = documents(&run_helm(
        &helm,
        &["template", "paas", "charts/kapsa", "--namespace", "paas"],
    ));
    let reach = find(&other, "ValidatingAdmissionPolicy")
        .into_iter()
        .find(|p| str_at(p, "/metadata/name") == "paas-kapsa-operator-reach")
        .expect("the operator-reach policy of release paas");
    assert!(
        str_at(reach, "/spec/matchConditions/0/expression")
            .contains("'system:serviceaccount:paas:paas-kapsa'"),
        "{reach}"
    );
    let binding = find(&other, "ClusterRoleBinding")[0];
    assert_eq!(str_at(binding, "/subjects/0/name"), "paas-kapsa");
    assert_eq!(str_at(binding, "/subjects/0/namespace"), "paas");
}

#[test]
fn every_value_is_documented() {
    let Some(helm) = helm() else { return };
    let shown = run_helm(&helm, &["show", "values", "charts/kapsa"]);
    // A key is documented when a comment sits right above it or above one
    // of the keys it lies under; every key that holds a value (not a
    // nested group of keys) must be.
    let lines: Vec<&str> = shown.lines().collect();
    let mut undocumented = Vec::new();
    // (indent, documented) of the enclosing keys.
    let mut stack: Vec<(usize, bool)> = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('-') {
            continue;
        }
        let Some((key, rest)) = trimmed.split_once(':') else {
            continue;
        };
        let indent = line.len() - trimmed.len();
        while stack.last().is_some_and(|(d, _)| *d >= indent) {
            stack.pop();
        }
        let commented = i > 0 && lines[i - 1].trim_start().starts_with('#');
        let documented = commented || stack.iter().any(|(_, d)| *d);
        let is_group = rest.trim().is_empty()
            && lines[i + 1..]
                .iter()
                .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                .is_some_and(|next| {
                    let next_indent = next.len() - next.trim_start().len();
                    next_indent > indent && !next.trim_start().starts_with('-')
                });
        if !is_group && !documented {
            undocumented.push(key.to_owned());
        }
        stack.push((indent, documented));
    }
    assert!(
        undocumented.is_empty(),
        "values without a comment in `helm show values`: {undocumented:?}"
    );
}

#[test]
fn chart_crds_are_the_deploy_crds() {
    assert!(
        read("charts/kapsa/crds/kapsa.yaml") == read("deploy/crds/kapsa.yaml"),
        "charts/kapsa/crds/kapsa.yaml differs from deploy/crds/kapsa.yaml: run `make crds`"
    );
}

#[test]
fn chart_app_version_is_the_workspace_version() {
    let cargo = read("Cargo.toml");
    let workspace_version = cargo
        .split("[workspace.package]")
        .nth(1)
        .and_then(|section| {
            section.lines().find_map(|l| {
                l.strip_prefix("version = \"")
                    .and_then(|v| v.strip_suffix('"'))
            })
        })
        .expect("the workspace version in Cargo.toml");
    let chart: Value = serde_yaml_ng::from_str(&read("charts/kapsa/Chart.yaml")).unwrap();
    assert_eq!(str_at(&chart, "/apiVersion"), "v2");
    assert_eq!(str_at(&chart, "/appVersion"), workspace_version);
    assert_eq!(env!("CARGO_PKG_VERSION"), workspace_version);
}

/// Server-side applies `object`, strictly (an unknown or misspelt field is
/// an error).
async fn apply(client: &Client, object: &Value) -> Result<DynamicObject, String> {
    let object: DynamicObject = serde_json::from_value(object.clone()).expect("an object");
    let types = object.types.clone().expect("apiVersion and kind");
    let gvk = GroupVersionKind::try_from(&types).expect("a valid apiVersion");
    let (resource, capabilities) = pinned_kind(client, &gvk)
        .await
        .map_err(|e| format!("{gvk:?} is not served: {e}"))?;
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Namespaced => Api::namespaced_with(
            client.clone(),
            &object
                .namespace()
                .expect("a namespaced object names its namespace"),
            &resource,
        ),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let params = PatchParams::apply("kapsa-chart-test")
        .force()
        .validation_strict();
    api.patch(&object.name_any(), &params, &Patch::Apply(&object))
        .await
        .map_err(|e| format!("{} {}: {e}", types.kind, object.name_any()))
}

#[tokio::test]
async fn the_api_server_accepts_the_chart() {
    let Some(helm) = helm() else { return };
    let env = kapsa_testenv::shared().await;
    let client = env.client().await;
    let kubeconfig = env.kubeconfig_path().to_str().expect("a UTF-8 path");

    // A scratch release installed the documented way (its own namespace,
    // made by --create-namespace; the CRDs from crds/), upgraded, and
    // uninstalled.
    let scratch = ["--namespace", "kapsa-scratch", "--kubeconfig", kubeconfig];
    let install = [
        &[
            "install",
            "kapsa-scratch",
            "charts/kapsa",
            "--create-namespace",
        ][..],
        &scratch,
    ]
    .concat();
    run_helm(&helm, &install);
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in kapsa_testenv::crds::parse_crds(&read("charts/kapsa/crds/kapsa.yaml")).unwrap() {
        let name = crd.name_any();
        assert!(
            crds.get_opt(&name).await.unwrap().is_some(),
            "helm install created {name}"
        );
    }
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "kapsa-scratch");
    let deployment = deployments.get("kapsa-scratch-operator").await.unwrap();
    assert_eq!(
        deployment
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|s| s.service_account_name)
            .as_deref(),
        Some("kapsa-scratch")
    );
    let policies = Api::<DynamicObject>::all_with(
        client.clone(),
        &kube::api::ApiResource::from_gvk(&GroupVersionKind::gvk(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingAdmissionPolicy",
        )),
    );
    assert!(
        policies
            .get_opt("kapsa-scratch-host-ownership")
            .await
            .unwrap()
            .is_some()
    );
    let upgrade = [
        &[
            "upgrade",
            "kapsa-scratch",
            "charts/kapsa",
            "--reuse-values",
            "--set",
            "admission.hostOwnership.enabled=false",
        ][..],
        &scratch,
    ]
    .concat();
    run_helm(&helm, &upgrade);
    assert!(
        policies
            .get_opt("kapsa-scratch-host-ownership")
            .await
            .unwrap()
            .is_none(),
        "helm upgrade removed the policy it no longer renders"
    );
    let args = deployments
        .get("kapsa-scratch-operator")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers[0].args.clone())
        .unwrap_or_default();
    assert!(args.contains(&"--no-host-owners".to_owned()), "{args:?}");
    run_helm(
        &helm,
        &[&["uninstall", "kapsa-scratch"][..], &scratch].concat(),
    );
    assert!(
        deployments
            .get_opt("kapsa-scratch-operator")
            .await
            .unwrap()
            .is_none_or(|d| d.metadata.deletion_timestamp.is_some()),
        "helm uninstall removed the Deployment"
    );
    for crd in kapsa_testenv::crds::parse_crds(&read("charts/kapsa/crds/kapsa.yaml")).unwrap() {
        assert!(
            crds.get_opt(&crd.name_any()).await.unwrap().is_some(),
            "helm uninstall keeps the CRDs"
        );
    }

    // The release `kapsa` in kapsa-system, as the drift test renders it:
    // every object is accepted under strict field validation.
    let rendered = render(&helm, &["namespace.create=true"]);
    let mut applied = Vec::new();
    for object in &rendered {
        match apply(&client, object).await {
            Ok(o) => applied.push(format!(
                "{}/{}",
                o.types
                    .as_ref()
                    .map(|t| t.kind.as_str())
                    .unwrap_or_default(),
                o.name_any()
            )),
            Err(e) => panic!("the API server refused the chart's {e}"),
        }
    }
    assert_eq!(applied, kinds(&rendered));

    // Moving those plain-manifest objects to Helm, as documented: `helm
    // install --take-ownership` adopts them (the namespace included, with
    // namespace.create=true); `helm uninstall` keeps the namespace.
    run_helm(
        &helm,
        &[
            "install",
            RELEASE,
            "charts/kapsa",
            "--namespace",
            NAMESPACE,
            "--kubeconfig",
            kubeconfig,
            "--set",
            "namespace.create=true",
            "--take-ownership",
        ],
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace = namespaces.get(NAMESPACE).await.unwrap();
    assert_eq!(
        namespace
            .labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("Helm"),
        "the release adopted the namespace"
    );
    run_helm(
        &helm,
        &[
            "uninstall",
            RELEASE,
            "--namespace",
            NAMESPACE,
            "--kubeconfig",
            kubeconfig,
        ],
    );
    let namespace = namespaces.get(NAMESPACE).await.unwrap();
    assert!(
        namespace.metadata.deletion_timestamp.is_none(),
        "helm uninstall keeps the namespace"
    );
    assert!(
        Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
            .get_opt("kapsa-operator")
            .await
            .unwrap()
            .is_none_or(|d| d.metadata.deletion_timestamp.is_some()),
        "helm uninstall removed the Deployment"
    );

    // The ServiceMonitor, where the Prometheus Operator's CRD is installed.
    let monitored = render(&helm, &["serviceMonitor.enabled=true"]);
    let monitor = find(&monitored, "ServiceMonitor")[0];
    if crds
        .get_opt("servicemonitors.monitoring.coreos.com")
        .await
        .unwrap()
        .is_some()
    {
        apply(&client, monitor)
            .await
            .unwrap_or_else(|e| panic!("the API server refused the chart's {e}"));
    } else {
        eprintln!(
            "the ServiceMonitor was not applied: this control plane has no \
             servicemonitors.monitoring.coreos.com CRD"
        );
    }
}

// --- The operator image --------------------------------------------------

/// The Dockerfile's instructions, continuation lines joined.
fn dockerfile_instructions() -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in read("Dockerfile").lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                instructions.push(std::mem::take(&mut current));
            }
        }
    }
    instructions
}

/// (stage name, base image, instructions) of each stage.
fn dockerfile_stages() -> Vec<(String, String, Vec<String>)> {
    let mut stages: Vec<(String, String, Vec<String>)> = Vec::new();
    for instruction in dockerfile_instructions() {
        let words: Vec<&str> = instruction.split_whitespace().collect();
        if words[0].eq_ignore_ascii_case("FROM") {
            let name = match words.as_slice() {
                [_, .., as_, name] if as_.eq_ignore_ascii_case("AS") => name.to_string(),
                _ => String::new(),
            };
            stages.push((name, words[1].to_owned(), Vec::new()));
        } else if let Some(stage) = stages.last_mut() {
            stage.2.push(instruction);
        }
    }
    stages
}

#[test]
fn dockerfile_copies_what_exists() {
    let stages = dockerfile_stages();
    let names: Vec<&str> = stages.iter().map(|s| s.0.as_str()).collect();
    assert_eq!(names, ["build", "ssh", "static"], "the Dockerfile's stages");
    // .dockerignore lets in only what it names after `*`.
    let allowed: Vec<String> = read(".dockerignore")
        .lines()
        .filter_map(|l| l.strip_prefix('!'))
        .map(|p| p.trim_end_matches('/').to_owned())
        .collect();
    let root = repo_root();
    for (index, (stage, _, instructions)) in stages.iter().enumerate() {
        for instruction in instructions {
            let words: Vec<&str> = instruction.split_whitespace().collect();
            if !["COPY", "ADD"].contains(&words[0].to_ascii_uppercase().as_str()) {
                continue;
            }
            let from = words.iter().find_map(|w| w.strip_prefix("--from="));
            let paths: Vec<&str> = words[1..]
                .iter()
                .copied()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let (sources, _destination) = paths.split_at(paths.len() - 1);
            match from {
                Some(from) => assert!(
                    names[..index].contains(&from),
                    "stage {stage}: {instruction}: no earlier stage {from}"
                ),
                None => {
                    for source in sources {
                        let source = source.trim_start_matches("./");
                        assert!(
                            root.join(source).exists(),
                            "stage {stage}: {instruction}: {source} does not exist"
                        );
                        assert!(
                            allowed.iter().any(|a| a == source.trim_end_matches('/')),
                            "stage {stage}: {instruction}: .dockerignore leaves {source} out"
                        );
                    }
                }
            }
        }
    }
    // Both images: the binary the build stage made, as the entrypoint, run
    // as 65532; the default one on distroless/static, the other with ssh.
    for (stage, base, instructions) in &stages[1..] {
        let copy = instructions
            .iter()
            .find(|i| i.starts_with("COPY --from=build /out/kapsa "))
            .unwrap_or_else(|| panic!("stage {stage} copies the binary"));
        let binary = copy.split_whitespace().last().unwrap();
        assert!(
            instructions.contains(&format!("ENTRYPOINT [\"{binary}\"]")),
            "stage {stage} runs {binary}"
        );
        assert!(
            instructions.contains(&"USER 65532:65532".to_owned()),
            "stage {stage} runs as 65532"
        );
        if stage == "static" {
            assert!(base.starts_with("gcr.io/distroless/static"), "{base}");
        } else {
            assert!(
                instructions.iter().any(|i| i.contains("openssh-client")),
                "stage {stage} installs ssh"
            );
        }
    }
}

/// Whether a 64-bit little-endian ELF file has a PT_INTERP program header
/// (a dynamic loader to run it).
fn has_interpreter(elf: &[u8]) -> bool {
    assert_eq!(&elf[..4], b"\x7fELF", "an ELF file");
    assert_eq!((elf[4], elf[5]), (2, 1), "64-bit little-endian ELF");
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        u32::from_le_bytes(elf[at..at + 4].try_into().unwrap()) == 3
    })
}

/// The build stage's RUSTFLAGS and `cargo build` arguments.
fn dockerfile_build_command() -> (String, Vec<String>) {
    let stages = dockerfile_stages();
    let build = &stages[0].2;
    let rustflags = build
        .iter()
        .find_map(|i| i.strip_prefix("ENV RUSTFLAGS="))
        .expect("the build stage sets RUSTFLAGS")
        .trim_matches('"')
        .to_owned();
    let run = build
        .iter()
        .find(|i| i.contains("cargo build"))
        .expect("the build stage runs cargo build");
    let command = run
        .split("cargo build")
        .nth(1)
        .unwrap()
        .split("&&")
        .next()
        .unwrap();
    let args = command
        .split_whitespace()
        .map(|w| w.trim_matches('"').to_owned())
        .collect();
    (rustflags, args)
}

/// Builds `kapsa` with the Dockerfile's RUSTFLAGS and cargo arguments (on
/// this machine's architecture, in `<target>/static-image`) and runs
/// `kapsa --version`. Slow: about 10 minutes the first time on 2 cores
/// (every dependency, in release), 2 to 3 minutes after a change to the
/// workspace's crates: a separate command (`KAPSA_STATIC_BUILD=1`, see
/// deploy/operator/README.md), skipped by `make test` and plain `cargo test`. `KAPSA_STATIC_BUILD=dev` builds with the dev
/// profile instead of `--release` (linked the same way, compiled faster).
#[test]
fn dockerfile_builds_a_static_binary_that_runs() {
    let (rustflags, args) = dockerfile_build_command();
    assert!(rustflags.contains("+crt-static"), "{rustflags}");
    assert!(args.iter().any(|a| a == "--target"), "{args:?}");
    let mode = std::env::var("KAPSA_STATIC_BUILD").unwrap_or_default();
    if mode.is_empty() || mode == "0" {
        eprintln!("skipped the static build (set KAPSA_STATIC_BUILD=1, or =dev)");
        return;
    }
    let target = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let args: Vec<String> = args
        .into_iter()
        .map(|a| if a == "$target" { target.clone() } else { a })
        .filter(|a| mode != "dev" || a != "--release")
        .collect();
    // A target folder of its own: other RUSTFLAGS would rebuild every
    // dependency in the usual one, and the `cargo test` running this test
    // may hold that one's lock.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("static-image");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let started = std::time::Instant::now();
    let status = Command::new(cargo)
        .arg("build")
        .args(&args)
        .current_dir(repo_root())
        .env("RUSTFLAGS", &rustflags)
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .expect("running cargo");
    assert!(status.success(), "cargo build {}", args.join(" "));
    let profile = if mode == "dev" { "debug" } else { "release" };
    let binary = target_dir.join(&target).join(profile).join("kapsa");
    eprintln!("built {} in {:.0?}", binary.display(), started.elapsed());
    // Static: no program interpreter (no dynamic loader, so no libc needed
    // in the image).
    let elf = std::fs::read(&binary).expect("the binary");
    assert!(
        !has_interpreter(&elf),
        "{} names a dynamic loader: not static",
        binary.display()
    );
    let output = Command::new(&binary)
        .arg("--version")
        .env_clear()
        .output()
        .expect("running kapsa --version");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "kapsa --version: {output:?}");
    assert_eq!(
        stdout.trim(),
        format!("kapsa {}", env!("CARGO_PKG_VERSION"))
    );
}

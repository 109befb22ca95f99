//! Fixture loading and plan checking shared by the plan tests of both
//! reconcilers. Not declared in `controllers`: `environment/plan/tests.rs`
//! and `project/plan/tests.rs` each include it with `#[path]` (hence the
//! `clippy::duplicate_mod` allowance there).
//!
//! A fixture is one multi-document YAML file under
//! `tests/fixtures/plan/<reconciler>/<case>.yaml`. Its documents are the
//! Kubernetes objects the caches would hold (a Project with its status, an
//! Environment, DomainPools, a ClusterRegistry, a Deployment with its
//! status, a kpack Image, cert-manager Certificates, Secrets, ...) plus
//! test-only documents of `apiVersion: test.kapsa.dev/v1`:
//!
//! - `kind: Expect` (exactly one): what the plan must produce.
//!   - `phase`: the planned `status.phase` (null: none);
//!   - `conditions`: every condition of the planned status, by type, with
//!     `status`, `reason` and, optionally, `messageContains`;
//!   - `apply`, `delete`: the children, as `Kind/name`, in any order;
//!   - `events`: `Normal/<reason>` or `Warning/<reason>`, in any order;
//!   - `status` (optional): fields of the planned status (null: absent);
//!   - `objects` (optional): `{ref: Kind/name, pointer: <JSON pointer>,
//!     equals: <value>}` on children to apply (null: absent); `ref` may be
//!     `Kind/namespace/name` where one name is applied in two namespaces;
//!   - `requeueSeconds` (optional).
//! - `kind: Cluster` (optional): `kpackInstalled: false`
//!   for a cluster without kpack; `buildNamespaceExists: false` before the
//!   Project has made its build namespace; `prometheusOperatorInstalled:
//!   false` for a cluster that does not serve ServiceMonitors;
//!   `gatewayApiInstalled: false` without Gateway API's HTTPRoutes and
//!   ListenerSets (Project fixtures too); `certManagerInstalled: false`
//!   without cert-manager.
//! - `kind: Poll` (optional): the last git poll of the Project
//!   (`branches`, `merged`, `error`, `consecutiveFailures`); without it the
//!   repository has not been polled since the operator started.
//!   Environment fixtures read `branches` only (an Environment without
//!   `spec.commit` follows its branch's head).
//!
//! Every world document must be read by the test's world builder: a
//! document that is not (a misspelt name or namespace) fails the test
//! rather than silently testing something else.

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::{ClusterRegistry, Condition, Project, Registry};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};

use crate::children::{Child, ChildKey, Deletion};
use crate::references::{Problem, RegistryRef};
use crate::status::PlannedEvent;

/// `apiVersion` of the test-only documents.
pub const TEST_API_VERSION: &str = "test.kapsa.dev/v1";
/// `apiVersion` of Kapsa's own kinds.
pub const KAPSA: &str = "kapsa.dev/v1alpha1";
/// The clock of every planned world.
pub const NOW: &str = "2026-03-01T12:00:00Z";

/// The kinds a fixture may hold, by `apiVersion`.
const KNOWN_KINDS: [(&str, &[&str]); 11] = [
    (
        KAPSA,
        &[
            "Project",
            "Environment",
            "DomainPool",
            "ClusterRegistry",
            "Registry",
        ],
    ),
    (
        "v1",
        &[
            "Namespace",
            "Secret",
            "ConfigMap",
            "Service",
            "ServiceAccount",
            "ResourceQuota",
            "Pod",
        ],
    ),
    ("batch/v1", &["Job"]),
    ("apps/v1", &["Deployment"]),
    ("networking.k8s.io/v1", &["Ingress"]),
    ("rbac.authorization.k8s.io/v1", &["Role", "RoleBinding"]),
    ("kpack.io/v1alpha2", &["Image", "ClusterBuilder", "Builder"]),
    ("cert-manager.io/v1", &["Certificate"]),
    ("monitoring.coreos.com/v1", &["ServiceMonitor"]),
    (
        "gateway.networking.k8s.io/v1",
        &["HTTPRoute", "ListenerSet"],
    ),
    (TEST_API_VERSION, &["Expect", "Cluster", "Poll"]),
];

/// Keys an `Expect` document may have besides `apiVersion` and `kind`.
const EXPECT_KEYS: [&str; 9] = [
    "description",
    "phase",
    "conditions",
    "apply",
    "delete",
    "events",
    "status",
    "objects",
    "requeueSeconds",
];

/// A value no plan ever produces: what an expectation is changed to when
/// checking that it can fail.
const BOGUS: &str = "__bogus__";

pub fn now() -> Time {
    serde_json::from_value(json!(NOW)).expect("NOW is an RFC 3339 time")
}

fn fixtures_dir(reconciler: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/plan")
        .join(reconciler)
}

/// One fixture file: its world documents and its test-only documents.
pub struct Fixture {
    /// `<reconciler>/<case>.yaml`, for messages.
    pub name: String,
    documents: Vec<Value>,
    /// Which of `documents` the world builder read.
    read: RefCell<Vec<bool>>,
    expect: Value,
    test_documents: Vec<Value>,
}

impl Fixture {
    pub fn load(reconciler: &str, case: &str) -> Self {
        let name = format!("{reconciler}/{case}.yaml");
        let path = fixtures_dir(reconciler).join(format!("{case}.yaml"));
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("fixture {name}: cannot read {}: {e}", path.display()));
        let mut documents = Vec::new();
        let mut test_documents = Vec::new();
        let mut expect = Vec::new();
        for (i, document) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = Value::deserialize(document)
                .unwrap_or_else(|e| panic!("fixture {name}: document {}: {e}", i + 1));
            if value.is_null() {
                continue;
            }
            let (api_version, kind) = type_of(&value);
            let known = KNOWN_KINDS
                .iter()
                .any(|(v, kinds)| *v == api_version && kinds.contains(&kind));
            assert!(
                known,
                "fixture {name}: document {} has an unknown kind {api_version}/{kind}",
                i + 1
            );
            if api_version == TEST_API_VERSION {
                if kind == "Expect" {
                    expect.push(value);
                } else {
                    test_documents.push(value);
                }
            } else {
                assert!(
                    value["metadata"]["name"].is_string(),
                    "fixture {name}: document {} ({kind}) has no metadata.name",
                    i + 1
                );
                documents.push(value);
            }
        }
        assert_eq!(
            expect.len(),
            1,
            "fixture {name}: needs exactly one `kind: Expect` document"
        );
        Self {
            name,
            read: RefCell::new(vec![false; documents.len()]),
            documents,
            expect: expect.remove(0),
            test_documents,
        }
    }

    /// Every document of `api_version`/`kind`, typed.
    pub fn all<K: DeserializeOwned>(&self, api_version: &str, kind: &str) -> Vec<K> {
        self.matching(api_version, kind, |_| true)
    }

    /// The document of `api_version`/`kind` named `name` in `namespace`
    /// (`None`: cluster-scoped), typed.
    pub fn find<K: DeserializeOwned>(
        &self,
        api_version: &str,
        kind: &str,
        name: &str,
        namespace: Option<&str>,
    ) -> Option<K> {
        let mut found = self.matching(api_version, kind, |metadata| {
            metadata["name"].as_str() == Some(name) && metadata["namespace"].as_str() == namespace
        });
        assert!(
            found.len() <= 1,
            "fixture {}: {kind} {namespace:?}/{name} appears more than once",
            self.name
        );
        found.pop()
    }

    fn matching<K: DeserializeOwned>(
        &self,
        api_version: &str,
        kind: &str,
        wanted: impl Fn(&Value) -> bool,
    ) -> Vec<K> {
        let mut read = self.read.borrow_mut();
        self.documents
            .iter()
            .enumerate()
            .filter(|(_, d)| type_of(d) == (api_version, kind) && wanted(&d["metadata"]))
            .map(|(i, d)| {
                read[i] = true;
                serde_json::from_value(d.clone()).unwrap_or_else(|e| {
                    panic!(
                        "fixture {}: {kind} {}: {e}",
                        self.name, d["metadata"]["name"]
                    )
                })
            })
            .collect()
    }

    /// The test-only document of `kind` (`Cluster`, `Poll`), if there is one.
    pub fn test_document(&self, kind: &str) -> Option<&Value> {
        let mut found = self
            .test_documents
            .iter()
            .filter(|d| d["kind"].as_str() == Some(kind));
        let first = found.next();
        assert!(
            found.next().is_none(),
            "fixture {}: more than one `kind: {kind}` document",
            self.name
        );
        first
    }

    /// The registry a Project names, as `crate::references::registry` finds
    /// it in the caches.
    pub fn registry(&self, project: &Project, namespace: &str) -> Result<RegistryRef, Problem> {
        crate::references::resolve_registry(
            project,
            namespace,
            |name| {
                self.find::<ClusterRegistry>(KAPSA, "ClusterRegistry", name, None)
                    .map(|r| r.spec)
            },
            |ns, name| {
                self.find::<Registry>(KAPSA, "Registry", name, Some(ns))
                    .map(|r| r.spec)
            },
        )
    }

    /// Whether the plan matches the `Expect` document.
    pub fn matches(&self, outcome: &Outcome, required: &[&str]) -> bool {
        check(&self.expect, outcome, required).is_empty()
    }

    /// Panics, naming the fixture, unless the plan matches the `Expect`
    /// document and the world builder read every document.
    pub fn assert_plan(&self, outcome: &Outcome, required: &[&str]) {
        let mut problems = check(&self.expect, outcome, required);
        let read = self.read.borrow();
        for (document, _) in self.documents.iter().zip(read.iter()).filter(|(_, r)| !**r) {
            let (_, kind) = type_of(document);
            problems.push(format!(
                "document {kind} {}/{} is not read by the world builder (misspelt name or namespace?)",
                document["metadata"]["namespace"].as_str().unwrap_or(""),
                document["metadata"]["name"].as_str().unwrap_or("")
            ));
        }
        assert!(
            problems.is_empty(),
            "fixture {}: the plan does not match its Expect document:\n  - {}\n\nplanned: {}",
            self.name,
            problems.join("\n  - "),
            outcome.summary()
        );
    }

    /// Panics unless changing any single expectation of the `Expect`
    /// document makes [`check`] report a difference: no expectation is
    /// vacuous. The unchanged document must match.
    pub fn assert_every_expectation_can_fail(&self, outcome: &Outcome, required: &[&str]) {
        assert!(
            check(&self.expect, outcome, required).is_empty(),
            "fixture {}: does not match; run its own test",
            self.name
        );
        let variants = variants(&self.expect, required);
        assert!(
            variants.len() >= required.len(),
            "fixture {}: too few variants",
            self.name
        );
        for (change, variant) in variants {
            assert!(
                !check(&variant, outcome, required).is_empty(),
                "fixture {}: {change} in its Expect document goes unnoticed",
                self.name
            );
        }
    }
}

/// Panics unless the fixtures of `reconciler` on disk are exactly `cases`.
pub fn assert_every_fixture_is_tested(reconciler: &str, cases: &[&str]) {
    let dir = fixtures_dir(reconciler);
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            (path.extension()? == "yaml").then(|| path.file_stem()?.to_str().map(str::to_string))?
        })
        .collect();
    on_disk.sort();
    let mut tested: Vec<String> = cases.iter().map(|c| c.to_string()).collect();
    tested.sort();
    assert_eq!(
        on_disk,
        tested,
        "the fixtures in {} and the cases the tests run differ",
        dir.display()
    );
}

/// What a plan produced, in the terms of an `Expect` document.
pub struct Outcome<'a> {
    /// The planned status as JSON.
    pub status: Value,
    pub conditions: &'a [Condition],
    pub apply: &'a [Child],
    pub delete: &'a [Deletion],
    pub events: &'a [PlannedEvent],
    pub requeue: Duration,
}

impl Outcome<'_> {
    fn applied(&self) -> Vec<String> {
        self.apply.iter().map(|c| child_ref(&c.key())).collect()
    }

    fn deleted(&self) -> Vec<String> {
        self.delete.iter().map(|d| child_ref(&d.key)).collect()
    }

    fn events(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| {
                let type_ = if e.warning { "Warning" } else { "Normal" };
                format!("{type_}/{}", e.reason)
            })
            .collect()
    }

    /// The whole outcome, for a failure message.
    fn summary(&self) -> String {
        let conditions: Vec<String> = self
            .conditions
            .iter()
            .map(|c| format!("{}={:?}/{} ({:?})", c.type_, c.status, c.reason, c.message))
            .collect();
        let mut status = self.status.clone();
        if let Some(map) = status.as_object_mut() {
            map.remove("conditions");
        }
        format!(
            "\n  status: {status}\n  conditions: {conditions:#?}\n  apply: {:?}\n  delete: {:?}\n  events: {:?}\n  requeue: {}s",
            self.applied(),
            self.deleted(),
            self.events(),
            self.requeue.as_secs()
        )
    }
}

/// `Kind/name` of a child.
fn child_ref(key: &ChildKey) -> String {
    let kind = key.kind.rsplit('/').next().unwrap_or(&key.kind);
    format!("{kind}/{}", key.name)
}

/// Whether `reference` (`Kind/name`, or `Kind/namespace/name` where one
/// name is applied in two namespaces) names the child.
fn names_child(reference: &str, key: &ChildKey) -> bool {
    let kind = key.kind.rsplit('/').next().unwrap_or(&key.kind);
    reference == child_ref(key)
        || key
            .namespace
            .as_ref()
            .is_some_and(|ns| reference == format!("{kind}/{ns}/{}", key.name))
}

fn type_of(document: &Value) -> (&str, &str) {
    (
        document["apiVersion"].as_str().unwrap_or(""),
        document["kind"].as_str().unwrap_or(""),
    )
}

/// The differences between `expect` (an `Expect` document) and `outcome`,
/// one line each; empty when they match.
pub fn check(expect: &Value, outcome: &Outcome, required: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(expect) = expect.as_object() else {
        return vec!["the Expect document is not a mapping".into()];
    };
    for key in required {
        if !expect.contains_key(*key) {
            problems.push(format!("the Expect document lacks `{key}`"));
        }
    }
    for (key, want) in expect {
        match key.as_str() {
            "apiVersion" | "kind" | "description" => {}
            "phase" => compare(&mut problems, "phase", want, outcome.status.get("phase")),
            "conditions" => check_conditions(&mut problems, want, outcome.conditions),
            "apply" => check_set(&mut problems, "apply", want, outcome.applied()),
            "delete" => check_set(&mut problems, "delete", want, outcome.deleted()),
            "events" => check_set(&mut problems, "events", want, outcome.events()),
            "status" => match want.as_object() {
                Some(fields) => {
                    for (field, want) in fields {
                        compare(
                            &mut problems,
                            &format!("status.{field}"),
                            want,
                            outcome.status.get(field),
                        );
                    }
                }
                None => problems.push("`status` must be a mapping".into()),
            },
            "objects" => check_objects(&mut problems, want, outcome.apply),
            "requeueSeconds" => compare(
                &mut problems,
                "requeueSeconds",
                want,
                Some(&json!(outcome.requeue.as_secs())),
            ),
            other => problems.push(format!(
                "unknown key `{other}` in the Expect document (known: {EXPECT_KEYS:?})"
            )),
        }
    }
    problems
}

/// Adds a line to `problems` unless `actual` (absent: null) is `want`.
fn compare(problems: &mut Vec<String>, what: &str, want: &Value, actual: Option<&Value>) {
    let actual = actual.unwrap_or(&Value::Null);
    if actual != want {
        problems.push(format!("{what}: expected {want}, got {actual}"));
    }
}

/// A condition status as written in a fixture: a string, or a YAML boolean.
fn status_text(value: &Value) -> Value {
    match value {
        Value::Bool(true) => json!("True"),
        Value::Bool(false) => json!("False"),
        other => other.clone(),
    }
}

fn check_conditions(problems: &mut Vec<String>, want: &Value, actual: &[Condition]) {
    let Some(want) = want.as_object() else {
        problems.push("`conditions` must be a mapping from type to {status, reason}".into());
        return;
    };
    for condition in actual {
        let status = serde_json::to_value(condition.status).unwrap_or_default();
        let Some(expected) = want.get(&condition.type_) else {
            problems.push(format!(
                "condition {}: not expected, got {status} {} ({:?})",
                condition.type_, condition.reason, condition.message
            ));
            continue;
        };
        let what = |field: &str| format!("condition {}.{field}", condition.type_);
        compare(
            problems,
            &what("status"),
            &status_text(&expected["status"]),
            Some(&status),
        );
        compare(
            problems,
            &what("reason"),
            &expected["reason"],
            Some(&json!(condition.reason)),
        );
        if let Some(part) = expected.get("messageContains")
            && !part
                .as_str()
                .is_some_and(|part| condition.message.contains(part))
        {
            problems.push(format!(
                "{}: expected to contain {part}, got {:?}",
                what("message"),
                condition.message
            ));
        }
        if let Some(unknown) = expected.as_object().and_then(|e| {
            e.keys()
                .find(|k| !["status", "reason", "messageContains"].contains(&k.as_str()))
        }) {
            problems.push(format!("{}: unknown key `{unknown}`", what("")));
        }
    }
    for type_ in want.keys() {
        if !actual.iter().any(|c| &c.type_ == type_) {
            problems.push(format!(
                "condition {type_}: expected {}, absent",
                want[type_]
            ));
        }
    }
}

fn check_set(problems: &mut Vec<String>, what: &str, want: &Value, mut actual: Vec<String>) {
    let Some(want) = want.as_array() else {
        problems.push(format!("`{what}` must be a list"));
        return;
    };
    let mut want: Vec<String> = want
        .iter()
        .map(|w| {
            w.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| w.to_string())
        })
        .collect();
    want.sort();
    actual.sort();
    if want != actual {
        let missing: Vec<&String> = want.iter().filter(|w| !actual.contains(w)).collect();
        let unexpected: Vec<&String> = actual.iter().filter(|a| !want.contains(a)).collect();
        problems.push(format!(
            "{what}: expected {want:?}, got {actual:?} (missing {missing:?}, unexpected {unexpected:?})"
        ));
    }
}

fn check_objects(problems: &mut Vec<String>, want: &Value, apply: &[Child]) {
    let Some(checks) = want.as_array() else {
        problems.push("`objects` must be a list".into());
        return;
    };
    for check in checks {
        let (Some(reference), Some(pointer)) = (check["ref"].as_str(), check["pointer"].as_str())
        else {
            problems.push(format!("objects: {check} needs `ref` and `pointer`"));
            continue;
        };
        let Some(child) = apply.iter().find(|c| names_child(reference, &c.key())) else {
            problems.push(format!("objects: {reference} is not applied"));
            continue;
        };
        let value = child.to_value();
        compare(
            problems,
            &format!("{reference} {pointer}"),
            &check["equals"],
            value.pointer(pointer),
        );
    }
}

/// Every single-expectation change of `expect`, described.
fn variants(expect: &Value, required: &[&str]) -> Vec<(String, Value)> {
    let mut variants = Vec::new();
    let Some(map) = expect.as_object() else {
        return variants;
    };
    let with = |key: &str, value: Value| {
        let mut changed: Map<String, Value> = map.clone();
        changed.insert(key.to_string(), value);
        Value::Object(changed)
    };
    for key in required {
        let mut changed = map.clone();
        changed.remove(*key);
        variants.push((format!("removing `{key}`"), Value::Object(changed)));
    }
    if map.contains_key("phase") {
        variants.push(("changing `phase`".into(), with("phase", json!(BOGUS))));
    }
    if let Some(conditions) = map.get("conditions").and_then(Value::as_object) {
        for (type_, condition) in conditions {
            let Some(fields) = condition.as_object() else {
                continue;
            };
            for field in fields.keys() {
                let mut changed = conditions.clone();
                changed[type_][field] = json!(BOGUS);
                variants.push((
                    format!("changing `conditions.{type_}.{field}`"),
                    with("conditions", Value::Object(changed)),
                ));
            }
            let mut changed = conditions.clone();
            changed.remove(type_);
            variants.push((
                format!("removing `conditions.{type_}`"),
                with("conditions", Value::Object(changed)),
            ));
        }
        let mut changed = conditions.clone();
        changed.insert(BOGUS.into(), json!({"status": "True", "reason": BOGUS}));
        variants.push((
            "adding a condition".into(),
            with("conditions", Value::Object(changed)),
        ));
    }
    for key in ["apply", "delete", "events"] {
        let Some(list) = map.get(key).and_then(Value::as_array) else {
            continue;
        };
        for (i, item) in list.iter().enumerate() {
            let mut changed = list.clone();
            changed.remove(i);
            variants.push((
                format!("removing {item} from `{key}`"),
                with(key, Value::Array(changed)),
            ));
        }
        let mut changed = list.clone();
        changed.push(json!(BOGUS));
        variants.push((
            format!("adding to `{key}`"),
            with(key, Value::Array(changed)),
        ));
    }
    if let Some(status) = map.get("status").and_then(Value::as_object) {
        for field in status.keys() {
            let mut changed = status.clone();
            changed[field] = json!(BOGUS);
            variants.push((
                format!("changing `status.{field}`"),
                with("status", Value::Object(changed)),
            ));
        }
    }
    if let Some(objects) = map.get("objects").and_then(Value::as_array) {
        for (i, object) in objects.iter().enumerate() {
            let mut changed = objects.clone();
            changed[i]["equals"] = json!(BOGUS);
            variants.push((
                format!("changing `objects[{i}].equals` ({})", object["pointer"]),
                with("objects", Value::Array(changed)),
            ));
        }
    }
    if map.contains_key("requeueSeconds") {
        variants.push((
            "changing `requeueSeconds`".into(),
            with("requeueSeconds", json!(123_456)),
        ));
    }
    variants
}

/// One `#[test]` per fixture (calling the invoking module's `run`), ignored
/// tests for known bugs, and the `CASES` and `KNOWN_BUGS` lists the
/// fixture-wide checks walk. Shared by both plans' test modules.
macro_rules! cases {
    (
        fixtures {
            $($test:ident => $case:literal,)*
        }
        known_bugs {
            $($bug:ident => $bug_case:literal: $why:literal,)*
        }
    ) => {
        $(
            #[test]
            fn $test() {
                run($case);
            }
        )*
        $(
            #[test]
            #[ignore = $why]
            fn $bug() {
                run($bug_case);
            }
        )*
        /// The fixtures the plan matches.
        const CASES: &[&str] = &[$($case),*];
        /// The fixtures that state what the plan should do but does not
        /// yet: their tests are ignored (`cargo test -- --ignored` shows
        /// the difference).
        const KNOWN_BUGS: &[&str] = &[$($bug_case),*];
    };
}

pub(crate) use cases;

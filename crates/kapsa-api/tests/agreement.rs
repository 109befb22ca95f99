//! Admission agrees with what later consumes a value, judged by a real
//! kube-apiserver with Kapsa's CRDs:
//!
//! * durations: the CRD accepts exactly the strings that
//!   `kapsa_api::duration` parses (and that reach the field's minimum);
//! * branch names: every name the CRD accepts, `git check-ref-format
//!   --branch` accepts; every name it refuses, git refuses too, or it is one
//!   of the two documented tightenings (`@`, `refs/...`);
//! * branch globs: an accepted glob can match a valid branch name, a refused
//!   one cannot;
//! * quantities: a `resourceQuota.hard` entry is accepted exactly when the
//!   API server accepts it in a ResourceQuota, and `runtime.resources`
//!   exactly when it accepts them in a Deployment's container.
//!
//! Each test sends its candidates as dry-run creates; nothing is stored.

use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota};
use kapsa_api::duration;
use kapsa_api::{Environment, Project};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::{Client, Resource};
use serde_json::{Value, json};

const NAMESPACE: &str = "shop";

fn dry_run() -> PostParams {
    PostParams {
        dry_run: true,
        field_manager: Some("kapsa-agreement-test".into()),
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
            let namespace: Namespace =
                serde_json::from_value(json!({"metadata": {"name": NAMESPACE}})).unwrap();
            let _ = Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &namespace)
                .await;
        })
        .await;
    client
}

/// `Ok` if the API server accepts the dry-run create, `Err(message)` if it
/// refuses it as invalid. Any other failure fails the test.
async fn verdict<K>(api: &Api<K>, object: &K) -> Result<(), String>
where
    K: Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.create(&dry_run(), object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 422 || status.code == 400 => {
            Err(status.message)
        }
        Err(e) => panic!("dry-run create failed unexpectedly: {e}"),
    }
}

fn projects(client: &Client) -> Api<DynamicObject> {
    Api::all_with(client.clone(), &ApiResource::erase::<Project>(&()))
}

/// A valid Project with `patch` merged into its spec.
fn project(patch: Value) -> DynamicObject {
    let mut spec = json!({
        "source": {"git": {"url": "https://github.com/acme/shop.git"}},
        "registryRef": {"name": "harbor"},
    });
    merge(&mut spec, patch);
    serde_json::from_value(json!({
        "apiVersion": "kapsa.dev/v1alpha1",
        "kind": "Project",
        "metadata": {"name": "agreement"},
        "spec": spec,
    }))
    .expect("a Project object")
}

fn merge(target: &mut Value, patch: Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                merge(target.entry(key).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch,
    }
}

/// SplitMix64: a deterministic generator, so that failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).expect("small")
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }

    /// 1 to `max` tokens drawn from `tokens`, concatenated.
    fn tokens(&mut self, tokens: &[&str], max: usize) -> String {
        (0..=self.below(max)).map(|_| self.pick(tokens)).collect()
    }
}

/// Durations of the CRD language around a minimum of `min_secs` seconds, in
/// every unit, plus random members of the language.
fn duration_candidates(min_secs: u64, rng: &mut Rng) -> Vec<String> {
    let below = min_secs - 1;
    let mut out = vec![
        format!("{min_secs}s"),
        format!("{below}s"),
        format!("{below}.999999999s"),
        format!("{below}s999ms999us999ns"),
        format!("{below}s999ms999us1000ns"),
        format!("{below}s999ms1000us"),
        format!("{below}s1000ms"),
        format!("{}ms", min_secs * 1000),
        format!("{}ms", min_secs * 1000 - 1),
        format!("{}.000000001s", min_secs),
        format!("{}m", min_secs / 60),
        format!("0.{:09}m", min_secs * 1_000_000_000 / 60),
        "0.16666666m".to_owned(),
        "0.166666667m".to_owned(),
        "0.016666666h".to_owned(),
        "0.016666667h".to_owned(),
        "0.002777777h".to_owned(),
        "0.002777778h".to_owned(),
        "99999h".to_owned(),
        "99999.999999999h".to_owned(),
        "0s".to_owned(),
        "1ns".to_owned(),
    ];
    let units = ["ns", "us", "ms", "s", "m", "h"];
    for _ in 0..60 {
        let mut text = String::new();
        for _ in 0..=rng.below(3) {
            let digits = 1 + rng.below(5);
            let whole: String = (0..digits)
                .map(|_| char::from(b'0' + u8::try_from(rng.below(10)).unwrap()))
                .collect();
            text.push_str(&whole);
            if rng.below(3) == 0 {
                text.push('.');
                let fraction = 1 + rng.below(9);
                for _ in 0..fraction {
                    text.push(char::from(b'0' + u8::try_from(rng.below(10)).unwrap()));
                }
            }
            text.push_str(rng.pick(&units));
        }
        if text.len() <= duration::MAX_DURATION_LEN {
            out.push(text);
        }
    }
    // Strings outside the language: a mix of the characters durations use
    // and some they do not.
    let tokens = [
        "1", "0", "5", "9", "12", "100000", ".", "s", "m", "h", "ms", "us", "ns", "µs", "d", "-",
        "+", " ", "e", "S",
    ];
    for _ in 0..80 {
        out.push(rng.tokens(&tokens, 6));
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test]
async fn durations_admission_and_parser_agree() {
    let client = client().await;
    let api = projects(&client);
    let mut rng = Rng(0x6475_7261);
    let mut disagreements = Vec::new();
    let mut counts = [0usize; 4];
    for (field, min, parse) in [
        (
            "pollInterval",
            duration::MIN_POLL_INTERVAL,
            duration::poll_interval as fn(&str) -> Option<Duration>,
        ),
        ("ttl", duration::MIN_PREVIEW_TTL, duration::preview_ttl),
    ] {
        for text in duration_candidates(min.as_secs(), &mut rng) {
            let patch = match field {
                "pollInterval" => json!({"source": {"pollInterval": text}}),
                _ => json!({"previewEnvironments": {"ttl": text}}),
            };
            let admitted = verdict(&api, &project(patch)).await;
            let parsed = parse(&text);
            counts[usize::from(admitted.is_ok()) * 2 + usize::from(field == "ttl")] += 1;
            if admitted.is_ok() != parsed.is_some() {
                disagreements.push(format!(
                    "{field} {text:?}: admission {admitted:?}, parser {parsed:?}"
                ));
            }
            if let Err(message) = &admitted {
                let path = match field {
                    "pollInterval" => "spec.source.pollInterval",
                    _ => "spec.previewEnvironments.ttl",
                };
                assert!(message.contains(path), "{text:?}: {message}");
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} disagreements:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
    let [poll_refused, ttl_refused, poll_accepted, ttl_accepted] = counts;
    println!(
        "durations: pollInterval {poll_accepted} accepted / {poll_refused} refused, \
         ttl {ttl_accepted} accepted / {ttl_refused} refused; parser agrees on all"
    );
    for n in counts {
        assert!(n >= 20, "both verdicts are exercised: {counts:?}");
    }
}

/// `git check-ref-format --branch <name>`, outside any repository.
fn git_accepts_branch(name: &str) -> bool {
    Command::new("git")
        .args(["check-ref-format", "--branch", name])
        .current_dir(std::env::temp_dir())
        .env("GIT_CEILING_DIRECTORIES", std::env::temp_dir())
        .output()
        .expect("git runs (the tests need git)")
        .status
        .success()
}

/// The names Kapsa refuses although git takes them, on purpose.
/// `@`, `refs/...`, and (checked by length in the caller) names longer than
/// 255 bytes.
fn documented_tightening(name: &str) -> bool {
    name == "@" || name.starts_with("refs/")
}

#[tokio::test]
async fn branch_names_agree_with_git() {
    let client = client().await;
    let api = projects(&client);
    let environments = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource::erase::<Environment>(&()),
    );
    let mut names: Vec<String> = [
        "main",
        "feature/login",
        "release/2025.06/final",
        "HEAD",
        "head",
        "@",
        "a@b",
        "main@{1}",
        "refs/heads/main",
        "refs",
        "feature/.x",
        "a.lock/b",
        "a.lockb",
        "x.lock",
        "-x",
        "x-",
        "_x",
        "a..b",
        "a/b/",
        "a//b",
        "/a",
        ".a",
        "a.",
        "é/ü",
        "a\u{7f}",
        "a\tb",
        "a b",
        "a~1",
        "a^",
        "a:b",
        "a?",
        "a*",
        "a[1]",
        "a\\b",
        "a{b}",
        "a#b%c+d=e,f",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    // At and past the length limit (git allows longer names; Kapsa cannot
    // store them).
    names.push("x".repeat(255));
    names.push(format!("{}/{}", "x".repeat(150), "y".repeat(150)));
    let tokens = [
        "a", "B", "7", "/", ".", "..", "-", "_", "@", "{", "}", "~", "^", ":", "?", "*", "[", "\\",
        " ", "\t", ".lock", "HEAD", "refs/", "é", "+", "#",
    ];
    let mut rng = Rng(0x0067_6974);
    for _ in 0..250 {
        names.push(rng.tokens(&tokens, 5));
    }
    names.sort();
    names.dedup();
    let mut problems = Vec::new();
    let (mut accepted, mut refused, mut tightened) = (0, 0, 0);
    for name in &names {
        let admitted = verdict(&api, &project(json!({"source": {"git": {"branch": name}}}))).await;
        let git = git_accepts_branch(name);
        // The operator's own predicate (it skips branches the CRD refuses).
        assert_eq!(
            kapsa_api::validation::is_valid_branch_name(name),
            admitted.is_ok(),
            "{name:?}: is_valid_branch_name and admission disagree ({admitted:?})"
        );
        match (&admitted, git) {
            (Ok(()), true) => accepted += 1,
            (Err(_), false) => refused += 1,
            (Err(_), true) if documented_tightening(name) || name.len() > 255 => tightened += 1,
            (Ok(()), false) => problems.push(format!("{name:?}: Kapsa accepts, git refuses")),
            (Err(e), true) => problems.push(format!("{name:?}: Kapsa refuses, git accepts: {e}")),
        }
        if let Err(message) = &admitted {
            assert!(
                message.contains("spec.source.git.branch must be a valid git branch name")
                    || (name.len() > 255 && message.contains("spec.source.git.branch: Too long")),
                "{name:?}: {message}"
            );
        }
        // An Environment's branch follows the same rule.
        let environment: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "kapsa.dev/v1alpha1",
            "kind": "Environment",
            "metadata": {"name": "agreement", "namespace": NAMESPACE},
            "spec": {"project": "shop", "type": "Preview", "branch": name},
        }))
        .unwrap();
        let env_admitted = verdict(&environments, &environment).await;
        assert_eq!(
            env_admitted.is_ok(),
            admitted.is_ok(),
            "{name:?}: Environment {env_admitted:?}, Project {admitted:?}"
        );
    }
    assert!(
        problems.is_empty(),
        "{} disagreements with git:\n{}",
        problems.len(),
        problems.join("\n")
    );
    println!(
        "branch names: {} checked; {accepted} accepted by both, {refused} refused by both, \
         {tightened} refused by Kapsa only (@, refs/...)",
        names.len()
    );
    assert!(accepted >= 20 && refused >= 100 && tightened >= 2);
}

/// Branch names a glob matches, with its wildcards replaced uniformly:
/// `*` by one of `star`, `?` by one of `question`.
fn instances(glob: &str) -> Vec<String> {
    let mut out = Vec::new();
    for star in ["x", "", "x.y", "x-y"] {
        for question in ["x", "-", "_"] {
            out.push(glob.replace('*', star).replace('?', question));
        }
    }
    out.sort();
    out.dedup();
    out
}

#[tokio::test]
async fn accepted_globs_can_match_a_branch_and_refused_ones_cannot() {
    let client = client().await;
    let api = projects(&client);
    let mut globs: Vec<String> = [
        "*",
        "feature/*",
        "fix-*",
        "x.lock*",
        "*.lock",
        "a/*/",
        "*.",
        ".*",
        "a/.*",
        "a//*",
        "a..*",
        "x.lock/*",
        "release-?",
        "**",
        "-*",
        "/a",
        "a/-b",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let tokens = [
        "a", "x", "/", ".", "..", "-", "_", "*", "?", ".lock", "lock",
    ];
    let mut rng = Rng(0x676c_6f62);
    for _ in 0..200 {
        globs.push(rng.tokens(&tokens, 5));
    }
    globs.sort();
    globs.dedup();
    let mut problems = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for glob in &globs {
        let admitted = verdict(
            &api,
            &project(json!({"previewEnvironments": {"branches": [glob]}})),
        )
        .await;
        let candidates = instances(glob);
        match &admitted {
            Ok(()) => {
                accepted += 1;
                if !candidates.iter().any(|b| git_accepts_branch(b)) {
                    problems.push(format!("{glob:?} accepted, but matches no valid branch"));
                }
            }
            Err(message) => {
                refused += 1;
                assert!(
                    message.contains("spec.previewEnvironments.branches"),
                    "{glob:?}: {message}"
                );
                if let Some(branch) = candidates.iter().find(|b| git_accepts_branch(b)) {
                    problems.push(format!(
                        "{glob:?} refused, but matches the branch {branch:?}"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    println!(
        "branch globs: {} checked; {accepted} accepted (each matches a branch git accepts), \
         {refused} refused (none of their instances is a valid branch)",
        globs.len()
    );
    assert!(accepted >= 20 && refused >= 50);
}

#[tokio::test]
async fn quota_entries_agree_with_resource_quota_validation() {
    let client = client().await;
    let api = projects(&client);
    let quotas = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource::erase::<ResourceQuota>(&()),
    );
    let keys = [
        "cpu",
        "memory",
        "ephemeral-storage",
        "requests.cpu",
        "requests.memory",
        "requests.storage",
        "requests.ephemeral-storage",
        "limits.cpu",
        "limits.memory",
        "limits.ephemeral-storage",
        "pods",
        "services",
        "secrets",
        "configmaps",
        "persistentvolumeclaims",
        "replicationcontrollers",
        "resourcequotas",
        "services.nodeports",
        "services.loadbalancers",
        "hugepages-2Mi",
        "requests.hugepages-1Gi",
        "count/deployments.apps",
        "count/pods",
        "requests.nvidia.com/gpu",
        "nvidia.com/gpu",
        "example.com/widgets",
        "gold.storageclass.storage.k8s.io/requests.storage",
        "gold.storageclass.storage.k8s.io/persistentvolumeclaims",
        "cpus",
        "request.cpu",
        "requests.gpu",
        "limits.storage",
        "Pods",
        "-pods",
        "requests cpu",
        "a/b/c",
        "Example.com/x",
    ];
    let values = [
        json!("1"),
        json!(2),
        json!("0"),
        json!("1.5"),
        json!("500m"),
        json!("4Gi"),
        json!("1e3"),
        json!("-1"),
        json!(-3),
        json!("four"),
    ];
    let mut problems = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for key in keys {
        for value in &values {
            let admitted = verdict(
                &api,
                &project(json!({"resourceQuota": {"hard": {key: value}}})),
            )
            .await;
            let quota: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "v1",
                "kind": "ResourceQuota",
                "metadata": {"name": "agreement", "namespace": NAMESPACE},
                "spec": {"hard": {key: value}},
            }))
            .expect("a ResourceQuota");
            let kubernetes = verdict(&quotas, &quota).await;
            if admitted.is_ok() != kubernetes.is_ok() {
                problems.push(format!(
                    "{key}: {value}: Kapsa {admitted:?}, ResourceQuota {kubernetes:?}"
                ));
            }
            match &admitted {
                Ok(()) => accepted += 1,
                Err(message) => {
                    refused += 1;
                    assert!(
                        message.contains("spec.resourceQuota.hard"),
                        "{key}: {value}: {message}"
                    );
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} disagreements:\n{}",
        problems.len(),
        problems.join("\n")
    );
    println!(
        "quota entries: {} checked against ResourceQuota validation; {accepted} accepted, \
         {refused} refused by both",
        keys.len() * values.len()
    );
    assert!(accepted >= 50 && refused >= 50);
}

#[tokio::test]
async fn runtime_resources_agree_with_container_validation() {
    let client = client().await;
    let api = projects(&client);
    let deployments = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        NAMESPACE,
        &ApiResource::erase::<Deployment>(&()),
    );
    let values = [
        json!("100m"),
        json!(1),
        json!("1"),
        json!("0.5"),
        json!("1500m"),
        json!("1Gi"),
        json!("1024Mi"),
        json!("1.5Gi"),
        json!("1e3"),
        json!("0"),
        json!("-1"),
        json!(-2),
        json!("abc"),
        json!("1GB"),
        json!(""),
    ];
    let mut cases = Vec::new();
    for key in ["cpu", "memory", "ephemeral-storage"] {
        for value in &values {
            cases.push(json!({"requests": {key: value}}));
            cases.push(json!({"limits": {key: value}}));
        }
        for (request, limit) in [
            ("100m", "1"),
            ("1", "1000m"),
            ("2", "1"),
            ("1Gi", "1024Mi"),
            ("1Gi", "1000Mi"),
            ("1001m", "1"),
            ("0", "0"),
        ] {
            cases.push(json!({"requests": {key: request}, "limits": {key: limit}}));
        }
    }
    cases.push(json!({"requests": {"cpu": "2"}, "limits": {"memory": "1Gi"}}));
    let mut problems = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for resources in &cases {
        let admitted = verdict(&api, &project(json!({"runtime": {"resources": resources}}))).await;
        let deployment: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "agreement", "namespace": NAMESPACE},
            "spec": {
                "selector": {"matchLabels": {"app": "agreement"}},
                "template": {
                    "metadata": {"labels": {"app": "agreement"}},
                    "spec": {"containers": [{
                        "name": "app",
                        "image": "nginx:1.27",
                        "resources": resources,
                    }]},
                },
            },
        }))
        .expect("a Deployment");
        let kubernetes = verdict(&deployments, &deployment).await;
        if admitted.is_ok() != kubernetes.is_ok() {
            problems.push(format!(
                "{resources}: Kapsa {admitted:?}, Deployment {kubernetes:?}"
            ));
        }
        match &admitted {
            Ok(()) => accepted += 1,
            Err(message) => {
                refused += 1;
                assert!(
                    message.contains("spec.runtime.resources"),
                    "{resources}: {message}"
                );
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} disagreements:\n{}",
        problems.len(),
        problems.join("\n")
    );
    println!(
        "runtime resources: {} checked against Deployment validation; {accepted} accepted, \
         {refused} refused by both",
        cases.len()
    );
    assert!(accepted >= 30 && refused >= 30);
}

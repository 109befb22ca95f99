//! A tenant cannot run the operator out of memory: Secrets and ConfigMaps
//! that carry Kapsa's label (and even an owner reference to the tenant's
//! Project) are never cached whole. The operator runs as its own process
//! (the `kapsa` binary), so its memory is measured alone.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kapsa_api::Project;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// Objects of each kind in the flood, and the size of each.
const FLOOD: usize = 200;
const SIZE: usize = 1_000_000;
/// How much the operator's resident memory may grow because of the flood.
const BUDGET_MIB: f64 = 32.0;

struct Operator(Child);

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0)
        .unwrap_or(0.0)
}

async fn until<T, F, Fut>(limit: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    kapsa_testenv::wait::eventually(limit, what, check).await
}

async fn project(client: &Client, name: &str) {
    let projects: Api<Project> = Api::all(client.clone());
    let project: Project = serde_json::from_value(json!({
        "apiVersion": "kapsa.dev/v1alpha1", "kind": "Project", "metadata": {"name": name},
        "spec": {
            "source": {"git": {"url": "https://git.invalid/acme/app.git", "branch": "main"}},
            "registryRef": {"kind": "ClusterRegistry", "name": "none"},
            "runtime": {"port": 8080}
        }
    }))
    .unwrap();
    projects
        .create(&PostParams::default(), &project)
        .await
        .unwrap();
}

/// The namespace Kapsa makes for a Project: proof that it reconciles.
async fn namespace_made(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    until(
        Duration::from_secs(60),
        &format!("namespace {name} from the operator"),
        || async { namespaces.get_opt(name).await.ok()? },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labelled_secrets_and_config_maps_do_not_grow_the_operator() {
    let env = kapsa_testenv::shared().await;
    let client = env.client().await;
    let crds = kapsa_testenv::crds::parse_crds(&kapsa_api::crds_yaml()).unwrap();
    kapsa_testenv::crds::install_crds(&client, &crds, "kapsa")
        .await
        .unwrap();
    let kubeconfig = env.kubeconfig_as("kapsa-operator", &["system:masters"]);
    let operator = Operator(
        // KAPSA_FLOOD_OPERATOR runs another build (e.g. an older commit's,
        // to see this test fail where the flood is cached).
        Command::new(
            std::env::var("KAPSA_FLOOD_OPERATOR")
                .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kapsa").to_string()),
        )
        .args([
            "operator",
            "--no-leader-election",
            "--text-logs",
            "--metrics-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("the kapsa binary starts"),
    );
    let pid = operator.0.id();

    project(&client, "tenant").await;
    namespace_made(&client, "tenant").await;
    let tenant = Api::<Project>::all(client.clone())
        .get("tenant")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let baseline = rss_mib(pid);

    // The flood: labelled as Kapsa's, owned (on paper) by the tenant's own
    // Project, 1 MB each.
    let owner = OwnerReference {
        api_version: "kapsa.dev/v1alpha1".into(),
        kind: "Project".into(),
        name: "tenant".into(),
        uid: tenant.uid().unwrap(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    let meta = |name: String| ObjectMeta {
        name: Some(name),
        namespace: Some("tenant".into()),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/managed-by".to_string(),
            "kapsa".to_string(),
        )])),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    };
    let payload = "x".repeat(SIZE);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "tenant");
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "tenant");
    let started = Instant::now();
    let mut peak = baseline;
    for i in 0..FLOOD {
        let secret = Secret {
            metadata: meta(format!("flood-{i}")),
            data: Some(BTreeMap::from([(
                "blob".to_string(),
                ByteString(payload.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        let config_map = ConfigMap {
            metadata: meta(format!("flood-{i}")),
            data: Some(BTreeMap::from([("blob".to_string(), payload.clone())])),
            ..ConfigMap::default()
        };
        config_maps
            .create(&PostParams::default(), &config_map)
            .await
            .unwrap();
        peak = peak.max(rss_mib(pid));
    }
    let flooded_in = started.elapsed();

    // It keeps reconciling: a new Project gets its namespace.
    project(&client, "after-flood").await;
    namespace_made(&client, "after-flood").await;
    for _ in 0..20 {
        peak = peak.max(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = rss_mib(pid);
    println!(
        "operator RSS: {baseline:.1} MiB before, peak {peak:.1} MiB, {after:.1} MiB after {} Secrets and {} ConfigMaps of {} bytes each ({:.0} MiB in all, created in {:.1?})",
        FLOOD,
        FLOOD,
        SIZE,
        (2 * FLOOD * SIZE) as f64 / 1048576.0,
        flooded_in
    );
    assert!(baseline > 1.0, "RSS is read from /proc ({baseline} MiB)");
    assert!(
        peak - baseline < BUDGET_MIB,
        "the flood grew the operator from {baseline:.1} MiB to {peak:.1} MiB (budget {BUDGET_MIB} MiB)"
    );
}

//! `kapsa dev up --demo`: a platform (pool, registry, builder, issuer), a git
//! repository on loopback and a Project, to watch Kapsa take it live and
//! roll out a second commit, then give a branch its preview environment and
//! take it away with the branch.

use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::api::apps::v1::Deployment;
use kapsa_api::{Environment, EnvironmentPhase, external};
use kapsa_testenv::git_server::{GitServer, TestRepo};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::Value;

/// The platform a cluster admin would set up, for the local control plane.
const PLATFORM: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: kapsa-system}
---
apiVersion: v1
kind: Secret
metadata: {name: local-registry-push, namespace: kapsa-system}
type: kubernetes.io/dockerconfigjson
stringData:
  .dockerconfigjson: '{"auths":{"registry.kapsa.localhost":{"auth":"ZGVtbzpkZW1v"}}}'
---
apiVersion: kapsa.dev/v1alpha1
kind: ClusterRegistry
metadata: {name: local}
spec:
  provider: Generic
  server: registry.kapsa.localhost
  repository: demo
  credentialsSecretRef: {name: local-registry-push, namespace: kapsa-system}
---
apiVersion: kpack.io/v1alpha2
kind: ClusterBuilder
metadata: {name: default}
spec: {tag: registry.kapsa.localhost/builders/default}
---
apiVersion: cert-manager.io/v1
kind: ClusterIssuer
metadata: {name: local-issuer}
spec:
  acme:
    server: https://acme.kapsa.localhost/directory
    solvers: [{http01: {ingress: {}}}]
---
apiVersion: kapsa.dev/v1alpha1
kind: DomainPool
metadata: {name: default}
spec:
  domains: [apps.kapsa.localhost]
  default: true
  clusterIssuerRef: {name: local-issuer}
  challenge: HTTP01
  ingressClassName: nginx
"#;

fn resource_of(object: &DynamicObject) -> anyhow::Result<ApiResource> {
    let types = object.types.as_ref().context("apiVersion and kind")?;
    // The kpack and cert-manager kinds, with their exact plurals.
    if let Some(resource) = external::all()
        .into_iter()
        .find(|r| r.api_version == types.api_version && r.kind == types.kind)
    {
        return Ok(resource);
    }
    let (group, version) = types
        .api_version
        .split_once('/')
        .unwrap_or(("", &types.api_version));
    Ok(ApiResource::from_gvk(&GroupVersionKind::gvk(
        group,
        version,
        &types.kind,
    )))
}

/// Server-side applies every document of a YAML stream.
pub async fn apply_yaml(client: &Client, yaml: &str) -> anyhow::Result<()> {
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value: Value = serde::Deserialize::deserialize(document)?;
        if value.is_null() {
            continue;
        }
        let object: DynamicObject = serde_json::from_value(value)?;
        let resource = resource_of(&object)?;
        let api: Api<DynamicObject> = match object.namespace() {
            Some(ns) => Api::namespaced_with(client.clone(), &ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        api.patch(
            &object.name_any(),
            &PatchParams::apply("kapsa-demo").force(),
            &Patch::Apply(&object),
        )
        .await
        .with_context(|| format!("applying {} {}", resource.kind, object.name_any()))?;
    }
    Ok(())
}

/// The real lane the demo runs in, when `kapsa dev up` started it.
pub struct Lane {
    /// `127.0.0.1:<port>`: the node's registry.
    pub registry: String,
    /// `<lane address>:80`: Traefik's HTTP entry point.
    pub ingress_http: String,
    /// `<lane address>:443`: Traefik's HTTPS entry point.
    pub ingress_https: String,
    /// Pebble's root certificate: what the served certificates chain to.
    pub acme_ca: std::path::PathBuf,
}

/// The platform in the real lane: apps run on the real node, Traefik routes
/// them, cert-manager obtains their certificates from Pebble (the
/// ClusterIssuer `pebble`, HTTP-01), and builds push to the node's registry
/// (plain HTTP on the pods' bridge).
fn lane_platform(lane: &Lane) -> String {
    format!(
        r#"
apiVersion: kapsa.dev/v1alpha1
kind: ClusterRegistry
metadata: {{name: local}}
spec:
  provider: Generic
  server: "{registry}"
  repository: demo
  insecure: true
---
apiVersion: kpack.io/v1alpha2
kind: ClusterBuilder
metadata: {{name: default}}
spec: {{tag: "{registry}/builders/default"}}
---
apiVersion: kapsa.dev/v1alpha1
kind: DomainPool
metadata: {{name: default}}
spec:
  domains: [apps.kapsa.localhost]
  default: true
  clusterIssuerRef: {{name: {issuer}}}
  challenge: HTTP01
  ingressClassName: {class}
  nodeSelector: {{"{label}": "true"}}
  tolerations: [{{key: "{taint}", operator: Exists, effect: NoSchedule}}]
"#,
        registry = lane.registry,
        class = kapsa_testenv::traefik::INGRESS_CLASS,
        issuer = kapsa_testenv::acme_lane::CLUSTER_ISSUER,
        label = kapsa_testenv::real_node::REAL_NODE_LABEL,
        taint = kapsa_testenv::real_node::REAL_NODE_TAINT,
    )
}

/// `GET /` for `host` through Traefik, printed like curl's first lines.
/// `curl --cacert <Pebble's root> https://<host>/` through Traefik, until
/// the page contains `expect` (the certificate may still be on its way).
async fn curl(lane: &Lane, host: &str, expect: &str) -> anyhow::Result<()> {
    use kapsa_testenv::http_get::{TlsRoots, get};
    let roots = TlsRoots::from_pem_file(&lane.acme_ca)?;
    let started = Instant::now();
    loop {
        let answer = get(&lane.ingress_https, host, "/", Some(&roots)).await;
        if let Ok((status, body)) = &answer
            && body.contains(expect)
        {
            println!(
                "  curl --cacert {} --resolve {host}:443:{} https://{host}/  ->  {status}  {}",
                lane.acme_ca.display(),
                lane.ingress_https.rsplit_once(':').map_or("", |(ip, _)| ip),
                body.trim()
            );
            return Ok(());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "https://{host}/ did not answer with {expect:?} through Traefik with a certificate from Pebble: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn project_yaml(url: &str) -> String {
    format!(
        r#"
apiVersion: kapsa.dev/v1alpha1
kind: Project
metadata: {{name: hello}}
spec:
  source:
    git: {{url: "{url}", branch: main}}
    pollInterval: 10s
  registryRef: {{kind: ClusterRegistry, name: local}}
  runtime:
    port: 8080
    replicas: 2
    healthCheck: {{path: /healthz}}
  previewEnvironments:
    enabled: true
    ttl: 24h
"#
    )
}

async fn wait_live(client: &Client, commit: &str) -> anyhow::Result<Environment> {
    wait_env_live(client, "production", commit).await
}

async fn wait_env_live(client: &Client, name: &str, commit: &str) -> anyhow::Result<Environment> {
    let envs: Api<Environment> = Api::namespaced(client.clone(), "hello");
    let started = Instant::now();
    let mut last_phase = None;
    loop {
        if let Some(env) = envs.get_opt(name).await? {
            let status = env.status.clone().unwrap_or_default();
            if status.phase != last_phase {
                println!(
                    "  {name}: {:?}",
                    status.phase.unwrap_or(EnvironmentPhase::Pending)
                );
                last_phase = status.phase;
            }
            if status.commit.as_deref() == Some(commit)
                && status.phase == Some(EnvironmentPhase::Ready)
            {
                return Ok(env);
            }
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "commit {commit} did not go live in 5 minutes"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn show(client: &Client, env: &Environment, took: Duration) -> anyhow::Result<()> {
    let status = env.status.clone().unwrap_or_default();
    let deployment = Api::<Deployment>::namespaced(client.clone(), "hello")
        .get(&env.name_any())
        .await?;
    let ready = deployment
        .status
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    println!(
        "  live after {:.1}s at {} — commit {}, image {}, {ready} pods ready",
        took.as_secs_f64(),
        status.url.unwrap_or_default(),
        status.commit.unwrap_or_default(),
        status.image.unwrap_or_default(),
    );
    Ok(())
}

/// Sets up the demo and shows a Project going live; returns the git server
/// and repository, which must outlive the demo for polling to work.
pub async fn run(
    client: &Client,
    kubeconfig: &std::path::Path,
    lane: Option<Lane>,
) -> anyhow::Result<(GitServer, TestRepo)> {
    match &lane {
        None => {
            println!(
                "demo: a platform (DomainPool apps.kapsa.localhost, ClusterRegistry, kpack and cert-manager simulators)"
            );
            apply_yaml(client, PLATFORM).await?;
        }
        Some(lane) => {
            println!(
                "demo: a platform in the real lane (DomainPool apps.kapsa.localhost on the real node, routed by Traefik at {} and {}, certificates from Pebble by cert-manager; ClusterRegistry {}; builds by the kpack simulator push a real image serving the commit)",
                lane.ingress_http, lane.ingress_https, lane.registry
            );
            apply_yaml(client, &lane_platform(lane)).await?;
        }
    }
    let host = "hello.apps.kapsa.localhost";
    let git = GitServer::start(None).await?;
    let repo = git.create_repo("hello")?;
    let first = repo.commit(
        "main",
        "index.html",
        "<h1>Hello from Kapsa</h1>\n",
        "first version",
    )?;
    println!("demo: git repository {} (main at {first})", repo.url());
    apply_yaml(client, &project_yaml(repo.url())).await?;
    println!("demo: Project hello applied; building and deploying main …");
    let started = Instant::now();
    let env = wait_live(client, &first).await?;
    show(client, &env, started.elapsed()).await?;
    if let Some(lane) = &lane {
        curl(lane, host, &first).await?;
    }

    let second = repo.commit(
        "main",
        "index.html",
        "<h1>Hello again</h1>\n",
        "second version",
    )?;
    println!("demo: pushed {second} to main; Kapsa polls, rebuilds and rolls out …");
    let started = Instant::now();
    let env = wait_live(client, &second).await?;
    show(client, &env, started.elapsed()).await?;
    if let Some(lane) = &lane {
        curl(lane, host, &second).await?;
    }

    // A branch gets its own preview environment, and loses it with the branch.
    let feature = repo.commit(
        "feature/greeting",
        "index.html",
        "<h1>Hello from a branch</h1>\n",
        "a feature",
    )?;
    println!("demo: pushed branch feature/greeting; Kapsa gives it a preview environment …");
    let started = Instant::now();
    let env = wait_env_live(client, "preview-feature-greeting", &feature).await?;
    show(client, &env, started.elapsed()).await?;
    if let Some(lane) = &lane {
        curl(
            lane,
            "feature-greeting.hello.apps.kapsa.localhost",
            &feature,
        )
        .await?;
    }
    repo.delete_branch("feature/greeting")?;
    println!("demo: deleted the branch; its preview goes …");
    let started = Instant::now();
    let envs: Api<Environment> = Api::namespaced(client.clone(), "hello");
    while envs.get_opt("preview-feature-greeting").await?.is_some() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the preview was not deleted in 2 minutes"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!(
        "  preview-feature-greeting: gone after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    // What `kapsa status` says now, and what to try next.
    println!("demo: `kapsa status hello` says:");
    match std::env::current_exe().and_then(|kapsa| {
        std::process::Command::new(kapsa)
            .args(["status", "hello"])
            .env("KUBECONFIG", kubeconfig)
            .stdin(std::process::Stdio::null())
            .output()
    }) {
        Ok(output) => print!("{}", String::from_utf8_lossy(&output.stdout)),
        Err(error) => println!("  (could not run kapsa status: {error})"),
    }
    println!(
        "demo: done. Try, with `export KUBECONFIG={}`:\n  \
         kapsa projects\n  \
         kapsa status hello\n  \
         kapsa open hello\n  \
         kapsa rollback hello   # run the first version again; `kapsa unpin hello` to undo\n  \
         kubectl get kapsa -A\n\
         and push to the repository (`git clone {}`, commit, push) to roll out more.",
        kubeconfig.display(),
        repo.bare_path().display()
    );
    Ok((git, repo))
}

//! Preview environments on the real control plane, from real git
//! repositories on loopback: a branch gets a preview at its own host, follows
//! its pushes, and loses it when the branch is deleted or merged or its TTL
//! passes; `maxEnvironments` holds exactly; hostile branch names get
//! distinct hosts inside the project's subtree; an unreachable repository
//! changes nothing; git credentials never show anywhere.
//!
//! The operator of this binary polls every 2 s (`max_poll_interval`), the
//! interval the preview latency figures are quoted at.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Namespace, Secret, Service};
use k8s_openapi::api::networking::v1::Ingress;
use kapsa_api::project::PreviewLeftOutReason;
use kapsa_api::{Environment, EnvironmentPhase, EnvironmentType, Project};
use kapsa_operator::OperatorConfig;
use kapsa_testenv::git_server::GitServer;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;
use support::*;

/// This binary's operator: polls at least every 2 s.
fn preview_config() -> OperatorConfig {
    OperatorConfig {
        max_poll_interval: Some(Duration::from_secs(2)),
        ..operator_config()
    }
}

/// Everything the operator logs in this test binary (debug and up), to look
/// for secrets in.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| Arc::new(Mutex::new(Vec::new())))
}

#[derive(Clone)]
struct LogSink;

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn operator() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(
                "kapsa_operator=debug,kube=debug",
            ))
            .with_writer(|| LogSink)
            .try_init();
    });
    shared_operator_with(preview_config).await;
}

fn with_previews(previews: serde_json::Value) -> impl FnOnce(&mut serde_json::Value) {
    move |manifest| {
        manifest["spec"]["previewEnvironments"] = previews;
        // No app configuration: previews should be Ready without it.
        manifest["spec"]["runtime"]
            .as_object_mut()
            .unwrap()
            .retain(|k, _| k != "configMapRefs" && k != "secretRefs");
    }
}

async fn environment(client: &Client, namespace: &str, name: &str) -> Option<Environment> {
    Api::<Environment>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .ok()
        .flatten()
}

/// Waits until `namespace/name` serves `commit` (phase Ready).
async fn serves(client: &Client, namespace: &str, name: &str, commit: &str) -> Environment {
    eventually(&format!("{namespace}/{name} to serve {commit}"), || async {
        let env = environment(client, namespace, name).await?;
        let status = env.status.clone()?;
        (status.commit.as_deref() == Some(commit) && status.phase == Some(EnvironmentPhase::Ready))
            .then_some(env)
    })
    .await
}

/// Waits until the Environment and the Deployment, Service and Ingress of
/// that name are gone.
async fn gone(client: &Client, namespace: &str, name: &str) {
    eventually(
        &format!("{namespace}/{name} and its children gone"),
        || async {
            let env = environment(client, namespace, name).await;
            let deployment = Api::<Deployment>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await
                .ok()?;
            let service = Api::<Service>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await
                .ok()?;
            let ingress = Api::<Ingress>::namespaced(client.clone(), namespace)
                .get_opt(name)
                .await
                .ok()?;
            (env.is_none() && deployment.is_none() && service.is_none() && ingress.is_none())
                .then_some(())
        },
    )
    .await;
}

async fn project(client: &Client, name: &str) -> Project {
    Api::<Project>::all(client.clone()).get(name).await.unwrap()
}

/// The preview Environments of a namespace, by name.
async fn previews(client: &Client, namespace: &str) -> BTreeSet<String> {
    Api::<Environment>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.spec.type_ == EnvironmentType::Preview)
        .map(|e| e.metadata.name.unwrap_or_default())
        .collect()
}

/// Reasons of the Events about the Project `name`.
async fn project_events(client: &Client, name: &str) -> Vec<String> {
    Api::<Event>::all(client.clone())
        .list(&ListParams::default().fields(&format!(
            "involvedObject.kind=Project,involvedObject.name={name}"
        )))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect()
}

/// The distinct messages of the Events with `reason` about the Project
/// `name` (one announcement may be published twice: see the note in the
/// TTL test).
async fn project_event_messages(client: &Client, name: &str, reason: &str) -> BTreeSet<String> {
    Api::<Event>::all(client.clone())
        .list(&ListParams::default().fields(&format!(
            "involvedObject.kind=Project,involvedObject.name={name},reason={reason}"
        )))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|e| e.message)
        .collect()
}

#[tokio::test]
async fn a_branch_gets_a_preview_that_follows_it_and_goes_with_it() {
    let (_, client) = cluster().await;
    operator().await;
    let p = platform(&client, "pv-life", "HTTP01", false).await;
    let base = p.base.clone();
    let live = live_project(
        &client,
        "pv-life",
        p,
        with_previews(json!({"enabled": true, "branches": ["feature/*"]})),
    )
    .await;
    let ns = "pv-life";
    let first = live
        .repo
        .commit("feature/login", "app.txt", "login v1", "login")
        .unwrap();
    live.repo
        .commit("fix-1", "app.txt", "fix", "not a preview branch")
        .unwrap();
    let env = serves(&client, ns, "preview-feature-login", &first).await;
    let host = format!("feature-login.pv-life.{base}");
    assert_eq!(env.spec.type_, EnvironmentType::Preview);
    assert_eq!(env.spec.branch.as_deref(), Some("feature/login"));
    assert_eq!(env.spec.host.as_deref(), Some(host.as_str()));
    assert!(env.spec.expires_at.is_some(), "a preview expires");
    let status = env.status.clone().unwrap();
    assert_eq!(status.url, Some(format!("https://{host}")));
    let ingress = Api::<Ingress>::namespaced(client.clone(), ns)
        .get("preview-feature-login")
        .await
        .unwrap();
    let rules = ingress.spec.unwrap().rules.unwrap();
    assert_eq!(rules[0].host.as_deref(), Some(host.as_str()));
    // The preview runs one replica (previewEnvironments.replicas), not the
    // runtime's two.
    let deployment = Api::<Deployment>::namespaced(client.clone(), ns)
        .get("preview-feature-login")
        .await
        .unwrap();
    assert_eq!(deployment.spec.unwrap().replicas, Some(1));

    // The Project's status lists it; the branch the globs do not match has none.
    let status = eventually("the Project's status to list the preview", || async {
        let status = project(&client, ns).await.status?;
        (status.previews.len() == 1 && status.previews[0].phase == Some(EnvironmentPhase::Ready))
            .then_some(status)
    })
    .await;
    assert_eq!(status.previews[0].branch, "feature/login");
    assert_eq!(status.previews[0].environment, "preview-feature-login");
    assert_eq!(status.preview_count, Some(1));
    assert_eq!(
        previews(&client, ns).await,
        BTreeSet::from(["preview-feature-login".to_string()])
    );

    // A push rolls the preview out again, and pushes its expiry forward.
    let second = live
        .repo
        .commit("feature/login", "app.txt", "login v2", "login again")
        .unwrap();
    let updated = serves(&client, ns, "preview-feature-login", &second).await;
    assert!(
        updated.spec.expires_at.as_ref().unwrap().0 >= env.spec.expires_at.as_ref().unwrap().0,
        "a new commit pushes the expiry forward"
    );

    // Deleting the branch deletes the preview and everything it ran.
    live.repo.delete_branch("feature/login").unwrap();
    gone(&client, ns, "preview-feature-login").await;
    let events = project_events(&client, ns).await;
    for reason in ["PreviewCreated", "PreviewUpdated", "PreviewDeleted"] {
        assert!(events.iter().any(|e| e == reason), "{reason} in {events:?}");
    }
    // Production never moved.
    let production = production(&client, ns).await.unwrap();
    assert_eq!(
        production.status.unwrap().commit.as_deref(),
        Some(live.commit.as_str())
    );
}

#[tokio::test]
async fn a_merged_branch_loses_its_preview() {
    let (_, client) = cluster().await;
    operator().await;
    let p = platform(&client, "pv-merge", "HTTP01", false).await;
    let live = live_project(
        &client,
        "pv-merge",
        p,
        with_previews(json!({"enabled": true})),
    )
    .await;
    let ns = "pv-merge";
    let head = live
        .repo
        .commit("topic", "topic.txt", "t", "topic")
        .unwrap();
    serves(&client, ns, "preview-topic", &head).await;
    live.repo.merge("main", "topic", "merge topic").unwrap();
    gone(&client, ns, "preview-topic").await;
    let status = project(&client, ns).await.status.unwrap();
    let left = status
        .previews_left_out
        .iter()
        .find(|l| l.branch == "topic")
        .expect("the merged branch is listed");
    assert_eq!(left.reason, PreviewLeftOutReason::Merged);
    // A new branch with no commits of its own gets none either.
    live.repo.create_branch("empty", "main").unwrap();
    eventually("the empty branch to be listed as merged", || async {
        let status = project(&client, ns).await.status?;
        status
            .previews_left_out
            .iter()
            .any(|l| l.branch == "empty" && l.reason == PreviewLeftOutReason::Merged)
            .then_some(())
    })
    .await;
    assert!(environment(&client, ns, "preview-empty").await.is_none());
}

#[tokio::test]
async fn the_ttl_deletes_a_preview_once_and_keep_exempts_one() {
    let (_, client) = cluster().await;
    operator().await;
    let p = platform(&client, "pv-ttl", "HTTP01", false).await;
    let live = live_project(
        &client,
        "pv-ttl",
        p,
        with_previews(json!({"enabled": true, "ttl": "1m", "replicas": 0})),
    )
    .await;
    let ns = "pv-ttl";
    let a = live.repo.commit("short", "a.txt", "a", "a").unwrap();
    let b = live.repo.commit("kept", "b.txt", "b", "b").unwrap();
    let short = eventually("both previews", || async {
        let short = environment(&client, ns, "preview-short").await?;
        environment(&client, ns, "preview-kept").await?;
        Some(short)
    })
    .await;
    assert_eq!(short.spec.commit.as_deref(), Some(a.as_str()));
    Api::<Environment>::namespaced(client.clone(), ns)
        .patch(
            "preview-kept",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"kapsa.dev/keep": "true"}}})),
        )
        .await
        .unwrap();
    // The TTL (a minute from the first sighting of the head) passes.
    kapsa_testenv::wait::eventually(
        Duration::from_secs(150),
        "the short-lived preview to expire",
        || async {
            environment(&client, ns, "preview-short")
                .await
                .is_none()
                .then_some(())
        },
    )
    .await;
    let status = project(&client, ns).await.status.unwrap();
    let left = status
        .previews_left_out
        .iter()
        .find(|l| l.branch == "short")
        .unwrap();
    assert_eq!(left.reason, PreviewLeftOutReason::Expired);
    assert_eq!(left.commit.as_deref(), Some(a.as_str()));
    let kept = environment(&client, ns, "preview-kept")
        .await
        .expect("kept");
    assert_eq!(kept.spec.commit.as_deref(), Some(b.as_str()));
    assert!(
        kept.spec.expires_at.is_none(),
        "a kept preview has no expiry"
    );
    // Not re-created while the branch stays at the expired head (three polls).
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(environment(&client, ns, "preview-short").await.is_none());
    // One expiry, no re-create loop: a loop would expire the preview again
    // at a later first sighting (another message). The same announcement
    // can be published twice when two status writes plan it (a known
    // duplicate, noted for the perturbation issue), so distinct messages
    // are counted.
    let expired = project_event_messages(&client, ns, "PreviewExpired").await;
    assert_eq!(expired.len(), 1, "one expiry: {expired:?}");
    let created = project_event_messages(&client, ns, "PreviewCreated").await;
    assert_eq!(
        created.len(),
        2,
        "short and kept created once each: {created:?}"
    );
    // A new commit brings it back.
    let c = live.repo.commit("short", "a.txt", "a2", "again").unwrap();
    let back = eventually("the preview to come back", || async {
        environment(&client, ns, "preview-short")
            .await
            .filter(|e| e.spec.commit.as_deref() == Some(c.as_str()))
    })
    .await;
    assert!(back.spec.expires_at.is_some());
}

#[tokio::test]
async fn max_environments_holds_exactly_and_names_the_rest() {
    let (_, client) = cluster().await;
    operator().await;
    let p = platform(&client, "pv-max", "HTTP01", false).await;
    let live = live_project(
        &client,
        "pv-max",
        p,
        with_previews(json!({"enabled": true, "maxEnvironments": 10, "replicas": 0})),
    )
    .await;
    let ns = "pv-max";
    // Thirty branches, each with a commit of its own (a branch at main's
    // head is contained in production: no preview).
    for i in 0..30 {
        live.repo
            .commit(&format!("b{i:02}"), "own.txt", i.to_string(), "own")
            .unwrap();
    }
    let status = eventually("10 previews and 20 branches left out", || async {
        let status = project(&client, ns).await.status?;
        (status.previews.len() == 10 && status.previews_left_out.len() == 20).then_some(status)
    })
    .await;
    assert!(
        status
            .previews_left_out
            .iter()
            .all(|l| l.reason == PreviewLeftOutReason::LimitReached),
        "{:?}",
        status.previews_left_out
    );
    // Exactly 10 exist, and stay 10 over a few polls.
    for _ in 0..3 {
        assert_eq!(previews(&client, ns).await.len(), 10);
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let names = previews(&client, ns).await;
    let listed: BTreeSet<String> = status
        .previews
        .iter()
        .map(|p| p.environment.clone())
        .collect();
    assert_eq!(names, listed);
}

#[tokio::test]
async fn hostile_branch_names_get_distinct_hosts_inside_the_project() {
    let (_, client) = cluster().await;
    operator().await;
    let p = platform(&client, "pv-names", "HTTP01", false).await;
    let base = p.base.clone();
    let live = live_project(
        &client,
        "pv-names",
        p,
        with_previews(json!({"enabled": true, "maxEnvironments": 20, "replicas": 0})),
    )
    .await;
    let ns = "pv-names";
    // 200 characters (a slug that must be truncated), and 300 (git allows
    // it; an Environment cannot hold it: left out, stopping nothing else).
    let long = format!("{}/{}", "x".repeat(100), "y".repeat(99));
    let too_long = format!("{}/{}", "x".repeat(150), "y".repeat(149));
    let branches = [
        "a.b",
        "Feature/Login",
        "feature/login",
        "feature-login",
        "日本語",
        "production",
        "pv-life",
        long.as_str(),
        too_long.as_str(),
    ];
    for (i, branch) in branches.iter().enumerate() {
        live.repo
            .commit(branch, "f.txt", i.to_string(), "hostile")
            .unwrap();
    }
    let valid = branches.len() - 1;
    let envs = eventually("a preview per valid branch", || async {
        let envs: Vec<Environment> = Api::<Environment>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|e| e.spec.type_ == EnvironmentType::Preview)
            .collect();
        (envs.len() == valid).then_some(envs)
    })
    .await;
    let status = eventually("the too-long name to be listed", || async {
        let status = project(&client, ns).await.status?;
        status
            .previews_left_out
            .iter()
            .any(|l| l.branch == too_long && l.reason == PreviewLeftOutReason::InvalidBranchName)
            .then_some(status)
    })
    .await;
    assert_eq!(
        status.previews_left_out.len(),
        1,
        "{:?}",
        status.previews_left_out
    );
    let suffix = format!(".pv-names.{base}");
    let mut hosts = BTreeSet::new();
    for env in &envs {
        let host = env.spec.host.clone().unwrap();
        assert!(
            host.ends_with(&suffix),
            "{host} is inside the project's subtree"
        );
        let label = host.strip_suffix(&suffix).unwrap();
        assert!(kapsa_api::naming::is_dns_label(label), "{host}");
        assert!(kapsa_api::naming::is_dns_name(&host), "{host}");
        assert_ne!(host, format!("pv-life.{base}"));
        assert!(hosts.insert(host.clone()), "{host} is given once");
    }
    assert!(hosts.contains(&format!("production{suffix}")));
    assert!(hosts.contains(&format!("feature-login{suffix}")));
    assert!(
        envs.iter()
            .any(|e| e.metadata.name.as_deref() == Some("preview-production"))
    );
    // Each gets an Ingress for its own host only.
    for env in &envs {
        let name = env.metadata.name.clone().unwrap();
        let ingress = eventually(&format!("Ingress {name}"), || async {
            Api::<Ingress>::namespaced(client.clone(), ns)
                .get_opt(&name)
                .await
                .ok()
                .flatten()
        })
        .await;
        let rules = ingress.spec.unwrap().rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].host, env.spec.host);
    }
}

#[tokio::test]
async fn an_unreachable_repository_keeps_previews_running() {
    let (_, client) = cluster().await;
    operator().await;
    let p = platform(&client, "pv-down", "HTTP01", false).await;
    let live = live_project(
        &client,
        "pv-down",
        p,
        with_previews(json!({"enabled": true})),
    )
    .await;
    let ns = "pv-down";
    let head = live.repo.commit("topic", "t.txt", "t", "topic").unwrap();
    let before = serves(&client, ns, "preview-topic", &head).await;
    // The repository disappears from the server for a while.
    let bare = live.repo.bare_path().to_path_buf();
    let hidden = bare.with_extension("hidden");
    std::fs::rename(&bare, &hidden).unwrap();
    eventually("SourceReachable False", || async {
        project_condition(&client, ns, "SourceReachable")
            .await
            .filter(|c| c.0 == "False")
    })
    .await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let env = environment(&client, ns, "preview-topic")
            .await
            .expect("kept");
        assert_eq!(env.metadata.uid, before.metadata.uid, "the same preview");
        assert_eq!(env.status.unwrap().phase, Some(EnvironmentPhase::Ready));
    }
    std::fs::rename(&hidden, &bare).unwrap();
    eventually("SourceReachable True again", || async {
        project_condition(&client, ns, "SourceReachable")
            .await
            .filter(|c| c.0 == "True")
    })
    .await;
    let next = live.repo.commit("topic", "t.txt", "t2", "after").unwrap();
    serves(&client, ns, "preview-topic", &next).await;
}

#[tokio::test]
async fn an_environment_a_person_made_follows_its_branch() {
    let (_, client) = cluster().await;
    operator().await;
    let p = platform(&client, "pv-person", "HTTP01", false).await;
    let base = p.base.clone();
    let live = live_project(&client, "pv-person", p, |_| {}).await;
    let ns = "pv-person";
    let first = live
        .repo
        .commit("develop", "d.txt", "1", "develop")
        .unwrap();
    create(
        &Api::<Environment>::namespaced(client.clone(), ns),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment",
            "metadata": {"name": "staging", "namespace": ns},
            "spec": {"project": ns, "type": "Preview", "branch": "develop",
                "host": format!("staging.{ns}.{base}")}}),
    )
    .await;
    serves(&client, ns, "staging", &first).await;
    let second = live
        .repo
        .commit("develop", "d.txt", "2", "develop again")
        .unwrap();
    let env = serves(&client, ns, "staging", &second).await;
    assert_eq!(env.spec.commit, None, "the person's spec is not written");
    // Not a Kapsa preview: never deleted by the preview rules.
    assert!(env.metadata.owner_references.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn git_credentials_never_show_in_status_events_or_logs() {
    let (_, client) = cluster().await;
    operator().await;
    let p = platform(&client, "pv-canary", "HTTP01", false).await;
    let canary = format!("kapsa-canary-{}", std::process::id());
    let wrong = format!("kapsa-canary-wrong-{}", std::process::id());
    let git = GitServer::start(Some(("deploy".into(), canary.clone())))
        .await
        .unwrap();
    let repo = git.create_repo("canary").unwrap();
    let first = repo.commit("main", "app.txt", "v1", "first").unwrap();
    let topic = repo.commit("topic", "t.txt", "t", "topic").unwrap();
    let ns = "pv-canary";
    let mut manifest = project_manifest(ns, repo.url(), &p, Some("git"));
    with_previews(json!({"enabled": true}))(&mut manifest);
    create(&Api::<Project>::all(client.clone()), manifest).await;
    eventually("the project namespace", || async {
        Api::<Namespace>::all(client.clone())
            .get_opt(ns)
            .await
            .ok()
            .flatten()
    })
    .await;
    let secrets = Api::<Secret>::namespaced(client.clone(), ns);
    create(
        &secrets,
        json!({"metadata": {"name": "git"}, "type": "kubernetes.io/basic-auth",
            "stringData": {"username": "deploy", "password": canary}}),
    )
    .await;
    rolled_out(&client, ns, &first).await;
    serves(&client, ns, "preview-topic", &topic).await;
    // A wrong password: authentication fails, and says so without it.
    secrets
        .patch(
            "git",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"password": wrong}})),
        )
        .await
        .unwrap();
    let (_, reason, message) = eventually("SourceReachable False", || async {
        project_condition(&client, ns, "SourceReachable")
            .await
            .filter(|c| c.0 == "False")
    })
    .await;
    assert!(!message.is_empty(), "{reason}: a reason is given");
    let mut seen = String::new();
    seen += &serde_json::to_string(&project(&client, ns).await).unwrap();
    for env in Api::<Environment>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        seen += &serde_json::to_string(&env).unwrap();
    }
    for event in Api::<Event>::all(client.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
    {
        seen += &serde_json::to_string(&event).unwrap();
    }
    seen += &String::from_utf8_lossy(&logs().lock().unwrap());
    assert!(seen.len() > 10_000, "something was searched");
    for secret in [&canary, &wrong] {
        assert!(!seen.contains(secret.as_str()), "{secret} leaked");
    }
    // The base64 of the credentials (basic auth) does not leak either.
    use base64::Engine;
    for secret in [&canary, &wrong] {
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("deploy:{secret}"));
        assert!(!seen.contains(&basic), "basic auth of {secret} leaked");
    }
}

#[tokio::test]
async fn a_preview_the_api_server_refuses_is_named_and_stops_nothing_else() {
    let (_, client) = cluster().await;
    operator().await;
    let ns = "pv-refuse";
    // An admission policy of the platform team that refuses one Environment
    // name in this namespace (as a quota or a naming policy would).
    refusing_policy(
        &client,
        "pv-refuse-beta",
        ns,
        json!({"apiGroups": ["kapsa.dev"], "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE"], "resources": ["environments"]}),
        "object.metadata.name != 'preview-beta'",
        "the platform does not allow preview-beta here",
    )
    .await;
    let p = platform(&client, ns, "HTTP01", false).await;
    let live = live_project(
        &client,
        ns,
        p,
        with_previews(json!({"enabled": true, "replicas": 0})),
    )
    .await;
    let a = live.repo.commit("alpha", "a.txt", "a", "a").unwrap();
    environment_with_commit(&client, ns, "preview-alpha", &a).await;
    let b = live.repo.commit("beta", "b.txt", "b", "b").unwrap();
    let (_, reason, message) = eventually("Applied False naming the refused preview", || async {
        project_condition(&client, ns, "Applied")
            .await
            .filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "Refused");
    assert!(message.contains("preview-beta"), "{message}");
    assert!(message.contains("does not allow preview-beta"), "{message}");
    // Everything else goes on: production serves, the other preview
    // follows its branch, and the status was written.
    let production = production(&client, ns).await.unwrap();
    assert_eq!(
        production.status.unwrap().phase,
        Some(EnvironmentPhase::Ready)
    );
    let a2 = live.repo.commit("alpha", "a.txt", "a2", "a2").unwrap();
    environment_with_commit(&client, ns, "preview-alpha", &a2).await;
    assert!(
        project_events(&client, ns)
            .await
            .iter()
            .any(|e| e == "Refused")
    );
    // The policy goes: the refused preview is created and Applied turns True.
    Api::<k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding>::all(
        client.clone(),
    )
    .delete("pv-refuse-beta", &Default::default())
    .await
    .unwrap();
    environment_with_commit(&client, ns, "preview-beta", &b).await;
    eventually("Applied True again", || async {
        project_condition(&client, ns, "Applied")
            .await
            .filter(|c| c.0 == "True")
    })
    .await;
}

async fn environment_with_commit(
    client: &Client,
    namespace: &str,
    name: &str,
    commit: &str,
) -> Environment {
    eventually(&format!("{namespace}/{name} at {commit}"), || async {
        environment(client, namespace, name)
            .await
            .filter(|e| e.spec.commit.as_deref() == Some(commit))
    })
    .await
}

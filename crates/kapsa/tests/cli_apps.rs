//! The application developer's verbs of the `kapsa` binary (`projects`,
//! `status`, `logs`, `open`, `create project`, `completion`, and the
//! `kubectl kapsa` plugin form), run as a process against the real control
//! plane of this test binary, with the kpack and cert-manager simulators, a
//! git server on loopback and the operator (the same binary) running.
//!
//! Error paths: no cluster (a kubeconfig at a closed port), Kapsa's CRDs
//! missing (`kapsa projects` run once before the set-up installs them: the
//! control plane is this binary's own, so nothing else is disturbed), an
//! unknown project, and a user without permission (a client certificate of
//! its own, no RBAC).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use kapsa_api::{ClusterRegistry, DomainPool, Environment, EnvironmentPhase, Project, external};
use kapsa_testenv::git_server::{GitServer, TestRepo};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

const POOL: &str = "cli-pool";
const BASE: &str = "cli.example.com";
const REGISTRY: &str = "cli-registry";
const PLATFORM_NAMESPACE: &str = "kapsa-system";
/// The Project that goes live in the set-up.
const LIVE: &str = "cli-shop";
const TIMEOUT: Duration = Duration::from_secs(60);

/// What every test shares: made once per test binary.
struct Setup {
    /// `kapsa projects` as run before Kapsa's CRDs were installed.
    before_crds: Output,
    /// An admin kubeconfig.
    kubeconfig: PathBuf,
    /// The git server and the repository the Projects build (kept alive).
    git: GitServer,
    repo: TestRepo,
    /// The commit the live Project serves.
    commit: String,
}

static SETUP: OnceCell<Setup> = OnceCell::const_new();

/// Held by a test while it depends on how long builds take: the kpack
/// simulator's build delay is one setting for every build.
static BUILDS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `kapsa` with `args` against `kubeconfig`, never with a browser.
fn kapsa(kubeconfig: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kapsa"))
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("DISPLAY")
        .env_remove("WAYLAND_DISPLAY")
        .env_remove("BROWSER")
        .stdin(Stdio::null())
        .output()
        .expect("the kapsa binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("UTF-8 stdout")
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).expect("UTF-8 stderr")
}

/// Asserts success and returns stdout.
fn ok(output: Output, what: &str) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({:?}): {}{}",
        output.status.code(),
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

/// Asserts failure with `code` and returns stderr.
fn fails(output: Output, code: i32, what: &str) -> String {
    assert_eq!(
        output.status.code(),
        Some(code),
        "{what}: exit code; stdout: {} stderr: {}",
        stdout(&output),
        stderr(&output)
    );
    let err = stderr(&output);
    assert!(err.starts_with("error: "), "{what}: {err}");
    err
}

async fn create<K>(api: &Api<K>, value: Value)
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("a valid object");
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("create failed: {e}"),
    }
}

async fn until<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    kapsa_testenv::wait::eventually(TIMEOUT, what, check).await
}

fn project_manifest(name: &str, url: &str, registry: &str) -> Value {
    json!({
        "apiVersion": "kapsa.dev/v1alpha1", "kind": "Project", "metadata": {"name": name},
        "spec": {
            "source": {"git": {"url": url, "branch": "main"}, "pollInterval": "10s"},
            "registryRef": {"kind": "ClusterRegistry", "name": registry},
            "domainPoolRef": {"name": POOL},
            "runtime": {"port": 8080, "replicas": 2}
        }
    })
}

/// The operator: this very binary, as its own user, on a thread that lives
/// as long as the test binary (the kernel kills the process with it).
fn start_operator(kubeconfig: PathBuf, log: PathBuf) {
    std::thread::Builder::new()
        .name("kapsa-operator".into())
        .spawn(move || {
            let binary = env!("CARGO_BIN_EXE_kapsa");
            let mut command = if kapsa_testenv::process::setpriv_available() {
                let mut c = Command::new("setpriv");
                c.args(["--pdeathsig", "KILL", "--", binary]);
                c
            } else {
                Command::new(binary)
            };
            let file = std::fs::File::create(&log).expect("operator log");
            let mut child: Child = command
                .args([
                    "operator",
                    "--no-leader-election",
                    "--text-logs",
                    "--allow-internal-git-hosts",
                    "loopback",
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--max-poll-interval",
                    "2s",
                ])
                .env("KUBECONFIG", &kubeconfig)
                .env("RUST_LOG", "warn")
                .env_remove("POD_NAME")
                .env_remove("POD_NAMESPACE")
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .expect("kapsa operator starts");
            let _ = child.wait();
        })
        .expect("operator thread");
}

async fn setup() -> &'static Setup {
    SETUP
        .get_or_init(|| async {
            let env = kapsa_testenv::shared().await;
            let client = env.client().await;
            let kubeconfig = env.kubeconfig_path().to_path_buf();

            // This binary's control plane has no Kapsa CRDs yet.
            let before_crds = kapsa(&kubeconfig, &["projects"]);

            let crds = kapsa_testenv::crds::parse_crds(&kapsa_api::crds_yaml()).unwrap();
            kapsa_testenv::crds::install_crds(&client, &crds, "kapsa")
                .await
                .unwrap();
            platform(&client).await;
            // Beside the control plane's own logs.
            let log = kubeconfig
                .parent()
                .expect("the control plane's folder")
                .join("kapsa-operator.log");
            start_operator(
                env.kubeconfig_as("kapsa-operator", &["system:masters"]),
                log,
            );

            let git = GitServer::start(None).await.expect("git server");
            let repo = git.create_repo("shop").expect("repository");
            let commit = repo
                .commit("main", "app.txt", "v1", "first")
                .expect("commit");
            create(
                &Api::<Project>::all(client.clone()),
                project_manifest(LIVE, repo.url(), REGISTRY),
            )
            .await;
            let environments: Api<Environment> = Api::namespaced(client.clone(), LIVE);
            until("the live project's production to be Ready", || async {
                let env = environments.get_opt("production").await.ok()??;
                let status = env.status?;
                (status.phase == Some(EnvironmentPhase::Ready)
                    && status.commit.as_deref() == Some(commit.as_str()))
                .then_some(())
            })
            .await;
            // The Project's own status follows its Environment's.
            let projects: Api<Project> = Api::all(client.clone());
            until("the live project to be Ready", || async {
                let status = projects.get(LIVE).await.ok()?.status?;
                let ready = kapsa_api::conditions::is_condition_true(
                    &status.conditions,
                    kapsa_api::conditions::READY,
                );
                let production = status.environments.iter().any(|e| {
                    e.name == "production" && e.ready && e.commit.as_deref() == Some(&commit)
                });
                (ready && production && status.latest_commit.as_deref() == Some(&commit))
                    .then_some(())
            })
            .await;
            Setup {
                before_crds,
                kubeconfig,
                git,
                repo,
                commit,
            }
        })
        .await
}

/// A pool, a registry with credentials, the default kpack builder and an issuer.
async fn platform(client: &Client) {
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": PLATFORM_NAMESPACE}}),
    )
    .await;
    let builder = external::kpack_cluster_builder();
    create(
        &Api::<DynamicObject>::all_with(client.clone(), &builder),
        json!({"apiVersion": builder.api_version, "kind": builder.kind, "metadata": {"name": "default"},
            "spec": {"tag": "registry.example/builders/default"}}),
    )
    .await;
    let issuer = external::cert_manager_cluster_issuer();
    create(
        &Api::<DynamicObject>::all_with(client.clone(), &issuer),
        json!({"apiVersion": issuer.api_version, "kind": issuer.kind, "metadata": {"name": "cli-issuer"},
            "spec": {"acme": {"server": "https://acme.example/directory", "solvers": [{"http01": {"ingress": {}}}]}}}),
    )
    .await;
    create(
        &Api::<Secret>::namespaced(client.clone(), PLATFORM_NAMESPACE),
        json!({"metadata": {"name": "cli-push"}, "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": "{\"auths\":{\"registry.example\":{\"auth\":\"dXNlcjpwYXNz\"}}}"}}),
    )
    .await;
    create(
        &Api::<ClusterRegistry>::all(client.clone()),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "ClusterRegistry", "metadata": {"name": REGISTRY},
            "spec": {"provider": "Harbor", "server": "registry.example", "repository": "kapsa",
                "credentialsSecretRef": {"name": "cli-push", "namespace": PLATFORM_NAMESPACE}}}),
    )
    .await;
    create(
        &Api::<DomainPool>::all(client.clone()),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "DomainPool", "metadata": {"name": POOL},
            "spec": {"domains": [BASE], "clusterIssuerRef": {"name": "cli-issuer"}, "challenge": "HTTP01",
                "ingressClassName": "nginx"}}),
    )
    .await;
}

/// The whitespace-separated cells of the table row that starts with `name`.
fn row(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
        .find(|cells| cells.first().map(String::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no row {name} in:\n{table}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projects_lists_the_live_project_as_table_json_and_yaml() {
    let s = setup().await;
    let table = ok(kapsa(&s.kubeconfig, &["projects"]), "kapsa projects");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["PROJECT", "HOST", "READY", "COMMIT", "ENVIRONMENTS", "AGE"]
    );
    let cells = row(&table, LIVE);
    assert_eq!(cells[1], format!("{LIVE}.{BASE}"));
    assert_eq!(cells[2], "True");
    assert_eq!(cells[3], s.commit[..7]);
    assert_eq!(cells[4], "1");

    let json: Value = serde_json::from_str(&ok(
        kapsa(&s.kubeconfig, &["projects", "-o", "json"]),
        "kapsa projects -o json",
    ))
    .expect("JSON");
    let live = json
        .as_array()
        .expect("a list")
        .iter()
        .find(|p| p["name"] == LIVE)
        .expect("the live project");
    assert_eq!(live["commit"], s.commit.as_str());
    assert_eq!(live["ready"], "True");
    assert_eq!(live["host"], format!("{LIVE}.{BASE}"));
    assert_eq!(live["namespace"], LIVE);
    assert_eq!(live["environments"][0]["name"], "production");
    assert_eq!(live["environments"][0]["ready"], true);

    let yaml: Value = serde_yaml_ng::from_str(&ok(
        kapsa(&s.kubeconfig, &["projects", "-o", "yaml"]),
        "kapsa projects -o yaml",
    ))
    .expect("YAML");
    let mut from_yaml = yaml
        .as_array()
        .expect("a list")
        .iter()
        .find(|p| p["name"] == LIVE)
        .expect("the live project")
        .clone();
    let mut from_json = live.clone();
    // Other tests add Projects meanwhile, and a second may pass between runs.
    from_yaml["age"] = Value::Null;
    from_json["age"] = Value::Null;
    assert_eq!(from_yaml, from_json, "YAML and JSON say the same");

    // --context picks a context of the kubeconfig by name.
    let current = kube::config::Kubeconfig::read_from(&s.kubeconfig)
        .unwrap()
        .current_context
        .expect("a current context");
    let named = ok(
        kapsa(&s.kubeconfig, &["projects", "--context", &current]),
        "projects --context",
    );
    assert_eq!(row(&named, LIVE)[2], "True");
    let err = fails(
        kapsa(&s.kubeconfig, &["projects", "--context", "nope"]),
        1,
        "an unknown context",
    );
    assert!(err.contains("no context \"nope\""), "{err}");
    assert!(err.contains(&current), "{err}");

    // -n keeps the Project that owns that namespace only.
    let none = kapsa(
        &s.kubeconfig,
        &["projects", "-n", "no-such-namespace", "-o", "json"],
    );
    assert_eq!(ok(none, "projects -n").trim(), "[]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_environments_and_events_of_a_live_project() {
    let s = setup().await;
    let table = ok(kapsa(&s.kubeconfig, &["status", LIVE]), "kapsa status");
    let url = format!("https://{LIVE}.{BASE}");
    let production = row(&table, "production");
    assert_eq!(
        production,
        [
            "production",
            "Production",
            "main",
            &s.commit[..7],
            "Ready",
            url.as_str(),
            "-"
        ],
        "{table}"
    );
    assert!(table.contains("Conditions: all OK."), "{table}");
    assert!(table.contains("Build in progress: none."), "{table}");

    let json: Value = serde_json::from_str(&ok(
        kapsa(&s.kubeconfig, &["status", LIVE, "-o", "json"]),
        "kapsa status -o json",
    ))
    .expect("JSON");
    assert_eq!(json["project"]["name"], LIVE);
    assert_eq!(json["git"]["url"], s.repo.url());
    let env = &json["environments"][0];
    assert_eq!(env["name"], "production");
    assert_eq!(env["phase"], "Ready");
    assert_eq!(env["commit"], s.commit.as_str());
    assert_eq!(env["url"], url.as_str());
    assert_eq!(json["notOk"], json!([]));
    let events = json["events"].as_array().expect("events");
    assert!(
        events
            .iter()
            .any(|e| e["object"] == "Environment/production" && e["reason"] == "RolledOut"),
        "the roll-out's Event is shown: {events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_failing_condition_with_reason_and_message() {
    let s = setup().await;
    let client = kapsa_testenv::shared().await.client().await;
    create(
        &Api::<Project>::all(client),
        project_manifest("cli-broken", s.repo.url(), "missing-registry"),
    )
    .await;
    let report: Value = until("status to show the missing registry", || async {
        let output = kapsa(&s.kubeconfig, &["status", "cli-broken", "-o", "json"]);
        let report: Value = serde_json::from_slice(&output.stdout).ok()?;
        report["notOk"]
            .as_array()?
            .iter()
            .any(|p| p["reason"] == "RegistryNotFound")
            .then_some(report)
    })
    .await;
    let problem = report["notOk"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["reason"] == "RegistryNotFound")
        .unwrap();
    assert_eq!(problem["object"], "Project/cli-broken");
    assert_ne!(problem["status"], "True");
    assert!(
        problem["message"]
            .as_str()
            .unwrap()
            .contains("missing-registry"),
        "{problem}"
    );
    let table = ok(kapsa(&s.kubeconfig, &["status", "cli-broken"]), "status");
    let line = table
        .lines()
        .find(|l| l.contains("Project/cli-broken") && l.contains("RegistryNotFound"))
        .unwrap_or_else(|| panic!("no RegistryNotFound line in:\n{table}"));
    assert!(line.contains("missing-registry"), "{line}");
    assert!(table.contains("Conditions not OK:"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_the_build_in_progress_with_its_age() {
    use kapsa_testenv::simulators::kpack::{SETTINGS_NAME, SETTINGS_NAMESPACE};
    let s = setup().await;
    let _builds = BUILDS.lock().await;
    let client = kapsa_testenv::shared().await.client().await;
    let settings: Api<ConfigMap> = Api::namespaced(client.clone(), SETTINGS_NAMESPACE);
    let set_delay = |millis: u64| {
        let settings = settings.clone();
        async move {
            settings
                .patch(
                    SETTINGS_NAME,
                    &PatchParams::apply("kapsa-cli-test").force(),
                    &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": SETTINGS_NAME},
                        "data": {"buildDelayMillis": millis.to_string()}})),
                )
                .await
                .expect("kpack simulator settings");
        }
    };
    // Builds started from now on take a minute (only this test builds now:
    // the live project is built, the others never build).
    set_delay(60_000).await;
    create(
        &Api::<Project>::all(client.clone()),
        project_manifest("cli-slow", s.repo.url(), REGISTRY),
    )
    .await;
    let report: Value = until("status to show a build in progress", || async {
        let output = kapsa(&s.kubeconfig, &["status", "cli-slow", "-o", "json"]);
        let report: Value = serde_json::from_slice(&output.stdout).ok()?;
        (!report["builds"].as_array()?.is_empty()).then_some(report)
    })
    .await;
    let build = &report["builds"][0];
    assert_eq!(build["kind"], "kpack Image");
    assert_eq!(build["environment"], "production");
    assert_eq!(build["commit"], s.commit.as_str());
    assert!(build["started"].is_string(), "{build}");
    assert!(build["age"].as_str().unwrap().ends_with('s'), "{build}");
    let table = ok(kapsa(&s.kubeconfig, &["status", "cli-slow"]), "status");
    let cells = row(&table, "production");
    assert_eq!(cells[1], "Production");
    assert!(table.contains("Build in progress:\n"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("kpack Image") && l.contains(&s.commit[..7])),
        "{table}"
    );
    set_delay(0).await;
}

/// The image the simulated build of `commit` of `repo` pushes.
fn built_digest(repo: &TestRepo, commit: &str) -> String {
    kapsa_testenv::simulators::kpack::simulated_digest(repo.url(), commit)
}

fn deployed_image(
    client: &Client,
    namespace: &str,
) -> impl std::future::Future<Output = Option<String>> {
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), namespace);
    async move {
        let deployment = deployments.get_opt("production").await.ok()??;
        deployment.spec?.template.spec?.containers[0].image.clone()
    }
}

/// `rollback` pins production to the release before the running one: the
/// Deployment and `status.image` change to it and `status` shows the pin; a
/// new commit is built but not rolled out; `unpin` rolls it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_runs_an_earlier_release_until_unpin() {
    let s = setup().await;
    let _builds = BUILDS.lock().await;
    let client = kapsa_testenv::shared().await.client().await;
    let name = "cli-roll";
    let repo = s.git.create_repo("roll").expect("repository");
    let first = repo.commit("main", "app.txt", "v1", "first").unwrap();
    create(
        &Api::<Project>::all(client.clone()),
        project_manifest(name, repo.url(), REGISTRY),
    )
    .await;
    let environments: Api<Environment> = Api::namespaced(client.clone(), name);
    let serving = |commit: String| {
        let environments = environments.clone();
        async move {
            let status = environments.get_opt("production").await.ok()??.status?;
            (status.phase == Some(EnvironmentPhase::Ready)
                && status.commit.as_deref() == Some(commit.as_str()))
            .then_some(status)
        }
    };
    until("release 1 to serve", || serving(first.clone())).await;
    let second = repo.commit("main", "app.txt", "v2", "second").unwrap();
    let status = until("release 2 to serve", || serving(second.clone())).await;
    let numbers: Vec<Option<i64>> = status.history.iter().map(|r| r.number).collect();
    assert_eq!(numbers, [Some(2), Some(1)], "{:?}", status.history);
    let first_image = status.history[1].image.clone();
    assert!(first_image.ends_with(&built_digest(&repo, &first)));

    let out = ok(kapsa(&s.kubeconfig, &["rollback", name]), "rollback");
    println!("$ kapsa rollback {name}\n{out}");
    assert!(out.contains("pinned to release 1"), "{out}");
    until("the Deployment to run release 1 again", || async {
        (deployed_image(&client, name).await? == first_image).then_some(())
    })
    .await;
    let status = until("status to say release 1 is held", || async {
        let status = environments.get("production").await.ok()?.status?;
        let pinned = kapsa_api::conditions::find_condition(&status.conditions, "Pinned")?;
        (status.image.as_deref() == Some(first_image.as_str())
            && pinned.status == kapsa_api::ConditionStatus::True)
            .then_some(status)
    })
    .await;
    assert_eq!(status.commit.as_deref(), Some(first.as_str()));
    assert_eq!(status.history[0].number, Some(3), "a rollback is a release");
    let report: Value = serde_json::from_str(&ok(
        kapsa(&s.kubeconfig, &["status", name, "-o", "json"]),
        "status",
    ))
    .unwrap();
    assert_eq!(report["environments"][0]["pinnedRelease"], 1, "{report}");
    assert!(
        report["notOk"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["type"] == "Pinned" && p["status"] == "True"),
        "{report}"
    );
    let table = ok(kapsa(&s.kubeconfig, &["status", name]), "status");
    println!("$ kapsa status {name}\n{table}");
    assert!(table.contains("Releases of production:"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("v1") && l.contains("pinned")),
        "{table}"
    );

    // A new commit is built, not rolled out.
    let third = repo.commit("main", "app.txt", "v3", "third").unwrap();
    let third_digest = built_digest(&repo, &third);
    until("the third commit to be built and wait", || async {
        let status = environments.get("production").await.ok()?.status?;
        let built = kapsa_api::conditions::find_condition(&status.conditions, "Built")?;
        let pinned = kapsa_api::conditions::find_condition(&status.conditions, "Pinned")?;
        (built.message.contains(&third_digest)
            && pinned.message.contains("newer build waiting")
            && pinned.message.contains(&third_digest))
        .then_some(())
    })
    .await;
    assert_eq!(
        deployed_image(&client, name).await.as_deref(),
        Some(first_image.as_str()),
        "a pinned Environment does not roll out the new build"
    );

    let out = ok(kapsa(&s.kubeconfig, &["unpin", name]), "unpin");
    assert!(out.contains("unpinned"), "{out}");
    let status = until("the third commit to roll out", || serving(third.clone())).await;
    assert!(
        kapsa_api::conditions::find_condition(&status.conditions, "Pinned").is_none(),
        "{:?}",
        status.conditions
    );
    assert!(
        deployed_image(&client, name)
            .await
            .is_some_and(|i| i.ends_with(&third_digest))
    );
    let err = fails(
        kapsa(&s.kubeconfig, &["rollback", name, "--to", "99"]),
        5,
        "rollback to an unknown release",
    );
    assert!(
        err.contains("no release 99") && err.contains("releases kept: 4, 3, 2, 1"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_prints_the_url_of_an_environment() {
    let s = setup().await;
    let url = format!("https://{LIVE}.{BASE}");
    assert_eq!(
        ok(kapsa(&s.kubeconfig, &["open", LIVE]), "kapsa open"),
        format!("{url}\n")
    );
    let json: Value = serde_json::from_str(&ok(
        kapsa(
            &s.kubeconfig,
            &["open", LIVE, "--env", "main", "-o", "json"],
        ),
        "kapsa open by branch",
    ))
    .unwrap();
    assert_eq!(json["url"], url.as_str());
    assert_eq!(json["environment"], "production");
    let err = fails(
        kapsa(&s.kubeconfig, &["open", LIVE, "--env", "productoin"]),
        5,
        "open an unknown environment",
    );
    assert!(err.contains("Did you mean \"production\"?"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_read_every_replica_or_say_clearly_why_not() {
    let s = setup().await;
    let client = kapsa_testenv::shared().await.client().await;
    let pods: Vec<String> = Api::<Pod>::namespaced(client, LIVE)
        .list(&ListParams::default().labels("kapsa.dev/environment=production"))
        .await
        .unwrap()
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    assert_eq!(pods.len(), 2, "two replicas: {pods:?}");
    let output = kapsa(&s.kubeconfig, &["logs", LIVE, "--since", "1h"]);
    if output.status.success() {
        // A node that serves logs: every line names its pod.
        for line in stdout(&output).lines() {
            assert!(
                pods.iter().any(|p| line.starts_with(&format!("[{p}] "))),
                "{line}"
            );
        }
    } else {
        // kwok's simulated nodes run no containers: the API server cannot
        // fetch logs from them, and the CLI says so, naming the pods.
        let err = fails(output, 1, "kapsa logs");
        assert!(err.contains("no logs could be read from 2 pod(s)"), "{err}");
        assert!(pods.iter().any(|p| err.contains(p.as_str())), "{err}");
        assert!(err.contains("kubelet"), "{err}");
        // Following gives up just as clearly instead of hanging.
        let mut follow = Command::new(env!("CARGO_BIN_EXE_kapsa"))
            .args(["logs", LIVE, "-f"])
            .env("KUBECONFIG", &s.kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while follow.try_wait().unwrap().is_none() {
            if std::time::Instant::now() > deadline {
                let _ = follow.kill();
                panic!("kapsa logs -f kept running with no log to read");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let err = fails(follow.wait_with_output().unwrap(), 1, "kapsa logs -f");
        assert!(err.contains("no logs could be read from 2 pod(s)"), "{err}");
    }
    let err = fails(
        kapsa(&s.kubeconfig, &["logs", LIVE, "--build"]),
        5,
        "kapsa logs --build",
    );
    assert!(
        err.contains("no build pod for Environment production"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_project_dry_run_prints_a_project_and_changes_nothing() {
    let s = setup().await;
    let yaml = ok(
        kapsa(
            &s.kubeconfig,
            &[
                "create",
                "project",
                "cli-dry",
                "--git",
                "https://github.com/acme/dry.git",
                "--branch",
                "trunk",
                "--pool",
                POOL,
                "--registry",
                "ClusterRegistry/cli-registry",
                "--previews",
                "feature/*",
                "--dry-run",
            ],
        ),
        "create --dry-run",
    );
    let project: Project = serde_yaml_ng::from_str(&yaml).expect("a Project");
    assert_eq!(project.name_any(), "cli-dry");
    assert_eq!(
        project.spec.source.git.url,
        "https://github.com/acme/dry.git"
    );
    assert_eq!(project.spec.source.git.branch, "trunk");
    assert_eq!(project.spec.registry_ref.name, REGISTRY);
    assert_eq!(project.spec.domain_pool_ref.unwrap().name, POOL);
    assert!(project.spec.preview_environments.enabled);
    assert_eq!(project.spec.preview_environments.branches, ["feature/*"]);
    let client = kapsa_testenv::shared().await.client().await;
    assert!(
        Api::<Project>::all(client)
            .get_opt("cli-dry")
            .await
            .unwrap()
            .is_none(),
        "--dry-run creates nothing"
    );
    // Without --registry, the cluster's only ClusterRegistry.
    let yaml = ok(
        kapsa(
            &s.kubeconfig,
            &[
                "create",
                "project",
                "cli-dry",
                "--git",
                "https://github.com/acme/dry.git",
                "--dry-run",
            ],
        ),
        "create --dry-run without --registry",
    );
    let project: Project = serde_yaml_ng::from_str(&yaml).expect("a Project");
    assert_eq!(project.spec.registry_ref.name, REGISTRY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_project_applies_it_with_the_cli_field_manager() {
    let s = setup().await;
    // The same command twice: created, then configured.
    let create = || {
        kapsa(
            &s.kubeconfig,
            &[
                "create",
                "project",
                "cli-new",
                "--git",
                "https://git.example.invalid/acme/new.git",
                "--registry",
                REGISTRY,
                "--port",
                "3000",
            ],
        )
    };
    let output = create();
    let note = stderr(&output);
    let yaml = ok(output, "create project");
    assert!(note.contains("project.kapsa.dev/cli-new created"), "{note}");
    let printed: Project = serde_yaml_ng::from_str(&yaml).expect("the applied YAML");
    let client = kapsa_testenv::shared().await.client().await;
    let stored = Api::<Project>::all(client)
        .get("cli-new")
        .await
        .expect("the Project exists");
    assert_eq!(stored.spec.source.git.url, printed.spec.source.git.url);
    assert_eq!(stored.spec.runtime.port, 3000);
    assert_eq!(stored.spec.registry_ref.name, REGISTRY);
    let managers: Vec<(String, String)> = stored
        .managed_fields()
        .iter()
        .map(|f| {
            (
                f.manager.clone().unwrap_or_default(),
                f.operation.clone().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        managers.contains(&("kapsa-cli".to_string(), "Apply".to_string())),
        "{managers:?}"
    );
    // Applying again is not an error: the same object, configured.
    let again = create();
    assert!(stderr(&again).contains("project.kapsa.dev/cli-new configured"));
    ok(again, "create again");
    // A name the API would refuse never reaches it.
    let err = fails(
        kapsa(
            &s.kubeconfig,
            &[
                "create",
                "project",
                "Bad_Name",
                "--git",
                "https://x.example/a.git",
                "--registry",
                REGISTRY,
            ],
        ),
        1,
        "a bad name",
    );
    assert!(err.contains("DNS label"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_scripts_are_printed() {
    let s = setup().await;
    let bash = ok(kapsa(&s.kubeconfig, &["completion", "bash"]), "bash");
    assert!(bash.contains("_kapsa()"), "a bash function");
    assert!(bash.contains("projects") && bash.contains("status"));
    let zsh = ok(kapsa(&s.kubeconfig, &["completion", "zsh"]), "zsh");
    assert!(
        zsh.starts_with("#compdef kapsa"),
        "{}",
        &zsh[..40.min(zsh.len())]
    );
    let fish = ok(kapsa(&s.kubeconfig, &["completion", "fish"]), "fish");
    assert!(fish.contains("complete -c kapsa"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_runs_it_as_the_kapsa_plugin() {
    let s = setup().await;
    let env = kapsa_testenv::shared().await;
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_kapsa"),
        bin.path().join("kubectl-kapsa"),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = Command::new(env.assets_dir().join("kubectl"))
        .args(["kapsa", "projects"])
        .env("PATH", &path)
        .env("KUBECONFIG", &s.kubeconfig)
        .stdin(Stdio::null())
        .output()
        .expect("kubectl runs");
    let table = ok(output, "kubectl kapsa projects");
    assert_eq!(row(&table, LIVE)[2], "True");
    let help = Command::new(bin.path().join("kubectl-kapsa"))
        .arg("--help")
        .output()
        .unwrap();
    let help = ok(help, "kubectl-kapsa --help");
    assert!(help.contains("Usage: kubectl kapsa"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_cluster_says_where_it_looked_and_what_to_do() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: gone\n  cluster: {{server: \"https://127.0.0.1:{port}\", insecure-skip-tls-verify: true}}\nusers:\n- name: me\n  user: {{token: t}}\ncontexts:\n- name: gone\n  context: {{cluster: gone, user: me}}\ncurrent-context: gone\n"
        ),
    )
    .unwrap();
    for verb in [&["projects"][..], &["status", "shop"], &["open", "shop"]] {
        let err = fails(kapsa(&kubeconfig, verb), 3, "an unreachable cluster");
        assert!(
            err.contains(&format!(
                "cannot reach the Kubernetes API server at https://127.0.0.1:{port}"
            )),
            "{err}"
        );
        assert!(err.contains("context \"gone\""), "{err}");
        assert!(err.contains("kapsa dev up"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_crds_say_how_to_install_them() {
    let s = setup().await;
    let err = fails(s.before_crds.clone(), 4, "kapsa projects without CRDs");
    assert!(err.contains("Kapsa is not installed"), "{err}");
    assert!(err.contains("projects.kapsa.dev"), "{err}");
    assert!(err.contains("kapsa crds | kubectl apply"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_project_gets_close_names_suggested() {
    let s = setup().await;
    for verb in ["status", "open", "logs"] {
        let err = fails(kapsa(&s.kubeconfig, &[verb, "cli-shpo"]), 5, verb);
        assert!(err.contains("project \"cli-shpo\" not found"), "{err}");
        assert!(err.contains("Did you mean \"cli-shop\"?"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_permission_is_told_the_verb_and_resource() {
    let s = setup().await;
    let nobody = kapsa_testenv::shared()
        .await
        .kubeconfig_as("cli-nobody", &[]);
    let err = fails(kapsa(&nobody, &["projects"]), 6, "projects as nobody");
    assert!(err.contains("no permission"), "{err}");
    assert!(err.contains("\"cli-nobody\""), "{err}");
    assert!(err.contains("may not list projects.kapsa.dev"), "{err}");
    assert!(
        err.contains("kubectl auth can-i list projects.kapsa.dev"),
        "{err}"
    );
    let err = fails(kapsa(&nobody, &["status", LIVE]), 6, "status as nobody");
    assert!(err.contains("may not get projects.kapsa.dev"), "{err}");
    let _ = s;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_developer_sees_status_and_what_was_not_shown() {
    let s = setup().await;
    let env = kapsa_testenv::shared().await;
    let client = env.client().await;
    // Projects and Environments everywhere, `view` in the project's namespace
    // only: no kpack objects, no Events of the cluster-scoped Project.
    let rbac = |value: Value| async {
        let resource = kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "rbac.authorization.k8s.io",
            "v1",
            value["kind"].as_str().unwrap(),
        ));
        let api: Api<DynamicObject> = match value["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
            None => Api::all_with(client.clone(), &resource),
        };
        create(&api, value).await;
    };
    rbac(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": "cli-developer"},
        "rules": [{"apiGroups": ["kapsa.dev"], "resources": ["projects", "environments"], "verbs": ["get", "list"]}]}))
    .await;
    rbac(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": "cli-dev-developer"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cli-developer"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "cli-dev"}]}))
    .await;
    rbac(json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "cli-dev-view", "namespace": LIVE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "view"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "cli-dev"}]}))
    .await;
    let developer = env.kubeconfig_as("cli-dev", &[]);
    let report: Value = until("RBAC to let cli-dev read the status", || async {
        let output = kapsa(&developer, &["status", LIVE, "-o", "json"]);
        serde_json::from_slice::<Value>(&output.stdout)
            .ok()
            .filter(|r| {
                r["notShown"].as_array().is_some_and(|h| {
                    !h.iter()
                        .any(|x| x.as_str() == Some(&format!("events in {LIVE}")))
                })
            })
    })
    .await;
    assert_eq!(report["environments"][0]["commit"], s.commit.as_str());
    let hidden: Vec<&str> = report["notShown"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        hidden.contains(&format!("images.kpack.io in {LIVE}").as_str()),
        "{hidden:?}"
    );
    assert!(hidden.contains(&"events in default"), "{hidden:?}");
    let table = ok(
        kapsa(&developer, &["status", LIVE]),
        "status as a developer",
    );
    assert_eq!(row(&table, "production")[4], "Ready");
    assert!(
        table.contains("Not shown (no permission to list): "),
        "{table}"
    );
}

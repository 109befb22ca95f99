//! Dockerfile builds in the real lane (docs/real-lane.md, docs/builds.md):
//! real BuildKit, built from its Go module into a rootless image in the
//! lane's registry, runs Kapsa's build Job on the real node. It clones the
//! commit from the lane's git server, builds the repository's Dockerfile
//! (`FROM scratch`), pushes the image and a registry build cache to the
//! lane's registry, and reports the digest; the app's pods run that image
//! and answer over HTTPS with the certificate real cert-manager obtained
//! from Pebble. A second commit rebuilds with cache hits from the registry
//! cache the first build exported.
//!
//! Runs where the real lane can run and its binaries, Traefik,
//! cert-manager, Pebble and BuildKit are built (`KAPSA_REAL_LANE=1` builds
//! what is missing, `=0` skips).
//!
//! `KAPSA_REAL_LANE=1 cargo test -p kapsa-operator --test real_build -- --nocapture`

mod support;

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kapsa_api::{DomainPool, Project};
use kapsa_operator::OperatorConfig;
use kapsa_operator::resources::environment::BuildPods;
use kapsa_testenv::http_get::TlsRoots;
use kapsa_testenv::real_node::{BRIDGE_GATEWAY, REAL_NODE_LABEL, real_node_toleration};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, LogParams};
use serde_json::json;
use support::lane::{Lane, enabled, pool_spec};
use support::*;

/// The lane's BuildKit image, by digest (pushed before the operator starts).
static BUILDKIT_IMAGE: OnceLock<String> = OnceLock::new();

/// The lane's operator: build Pods run the lane's BuildKit on the real
/// node; the git server and the registry are on the pods' bridge (a private
/// address), and the registry is plain HTTP.
fn config() -> OperatorConfig {
    OperatorConfig {
        allow_internal_git_hosts: format!("loopback,{BRIDGE_GATEWAY}/32")
            .parse()
            .expect("a host policy"),
        allow_insecure_registries: true,
        // Commit to served, without waiting for the 10 s poll.
        max_poll_interval: Some(Duration::from_secs(1)),
        build_pods: BuildPods {
            image: BUILDKIT_IMAGE.get().expect("BuildKit pushed").clone(),
            node_selector: [(REAL_NODE_LABEL.to_string(), "true".to_string())].into(),
            tolerations: vec![serde_json::from_value(real_node_toleration()).unwrap()],
        },
        ..operator_config()
    }
}

/// The repository's Dockerfile: a stage that runs a command in a base
/// image of the lane's registry (pulled by BuildKit), and an image of its
/// result and the repository's pages.
fn dockerfile(base: &str) -> String {
    format!(
        r#"FROM {base} AS tools
RUN ["/bin/busybox", "sh", "-c", "mkdir -p /rootfs/bin && cp /bin/busybox /rootfs/bin/busybox && echo built by RUN > /rootfs/bin/.run"]
FROM scratch
COPY --from=tools /rootfs/ /
COPY www/ /www/
USER 65532:65532
ENTRYPOINT ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
"#
    )
}

/// A build Job of the Project, by the commit it built.
async fn build_job(client: &kube::Client, project: &str, commit: &str) -> Job {
    let jobs = Api::<Job>::namespaced(client.clone(), &kapsa_api::naming::build_namespace(project));
    jobs.list(&ListParams::default())
        .await
        .expect("build Jobs")
        .items
        .into_iter()
        .find(|j| j.annotations().get("kapsa.dev/commit").map(String::as_str) == Some(commit))
        .expect("the commit's build Job")
}

/// The Pod of a build Job, and the API of its namespace.
async fn build_pod(client: &kube::Client, project: &str, job: &Job) -> (Pod, Api<Pod>) {
    let namespace = kapsa_api::naming::build_namespace(project);
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace);
    let pod = pods
        .list(&ListParams::default().labels(&format!("job-name={}", job.name_any())))
        .await
        .expect("build Pods")
        .items
        .into_iter()
        .next()
        .expect("the build Pod");
    (pod, pods)
}

/// The log of a build Job's Pod (through the API server and the kubelet).
async fn build_log(client: &kube::Client, project: &str, job: &Job) -> String {
    let (pod, pods) = build_pod(client, project, job).await;
    pods.logs(&pod.name_any(), &LogParams::default())
        .await
        .expect("the build log")
}

/// How long the build took, in whole seconds: from the Job's start to its
/// completion (the Pod's start and BuildKit's image pull included), and
/// from its container's start to its end.
async fn build_seconds(client: &kube::Client, project: &str, job: &Job) -> (i64, i64) {
    let jobs = Api::<Job>::namespaced(client.clone(), &kapsa_api::naming::build_namespace(project));
    let status = jobs
        .get(&job.name_any())
        .await
        .expect("the build Job")
        .status
        .expect("its status");
    let (Some(started), Some(completed)) = (status.start_time, status.completion_time) else {
        panic!("the build Job has no start or completion time");
    };
    let job_seconds = completed.0.as_second() - started.0.as_second();
    let (pod, _) = build_pod(client, project, job).await;
    let terminated = pod.status.and_then(|s| s.container_statuses).and_then(|c| {
        c.into_iter()
            .next()
            .and_then(|c| c.state)
            .and_then(|s| s.terminated)
    });
    let terminated = terminated.expect("the build container terminated");
    let (Some(start), Some(end)) = (terminated.started_at, terminated.finished_at) else {
        panic!("the build container has no start or end time");
    };
    (job_seconds, end.0.as_second() - start.0.as_second())
}

/// The Dockerfile steps BuildKit took from a cache rather than running
/// them: a step marked `CACHED`, or whose result it fetched and extracted
/// (`#N extracting sha256:…`, a layer of the registry cache).
fn cache_hits(log: &str) -> Vec<String> {
    let mut steps: std::collections::BTreeMap<&str, (&str, bool)> = Default::default();
    for line in log.lines() {
        let Some((id, rest)) = line.split_once(' ') else {
            continue;
        };
        if !id.starts_with('#') {
            continue;
        }
        if rest.starts_with('[') && !rest.starts_with("[internal]") {
            steps.entry(id).or_insert((rest, false));
        } else if (rest == "CACHED" || rest.starts_with("extracting sha256:"))
            && let Some(step) = steps.get_mut(id)
        {
            step.1 = true;
        }
    }
    steps
        .into_values()
        .filter(|(_, hit)| *hit)
        .map(|(step, _)| step.to_string())
        .collect()
}

/// Waits up to 5 minutes for `commit` to be live in the production
/// Environment (a cold BuildKit build included); on a timeout, the build's
/// log says what happened.
async fn live(client: &kube::Client, project: &str, commit: &str) {
    // Ready with the commit, or its build failed (no need to wait longer).
    let live = kapsa_testenv::wait::try_eventually(Duration::from_secs(180), || async {
        let env = production(client, project).await?;
        let status = env.status?;
        let failed = status.conditions.iter().any(|c| {
            c.type_ == "Built"
                && c.reason.starts_with("Build")
                && c.message.contains(commit)
                && format!("{:?}", c.status) == "False"
        });
        if failed {
            return Some(false);
        }
        (status.commit.as_deref() == Some(commit)
            && status.phase == Some(kapsa_api::EnvironmentPhase::Ready))
        .then_some(true)
    })
    .await;
    if live != Some(true) {
        let env = production(client, project).await;
        let conditions = env.and_then(|e| e.status).map(|s| s.conditions);
        let jobs =
            Api::<Job>::namespaced(client.clone(), &kapsa_api::naming::build_namespace(project))
                .list(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default();
        let mut logs = String::new();
        for job in &jobs {
            logs.push_str(&format!(
                "--- {}:\n{}\n",
                job.name_any(),
                build_log(client, project, job).await
            ));
        }
        let pods = Api::<Pod>::namespaced(client.clone(), project)
            .list(&ListParams::default())
            .await
            .map(|l| l.items)
            .unwrap_or_default();
        let pods: Vec<_> = pods
            .iter()
            .map(|p| {
                (
                    p.name_any(),
                    p.status.as_ref().map(|s| (&s.phase, &s.container_statuses)),
                )
            })
            .collect();
        panic!(
            "commit {commit} is not live; conditions: {conditions:?}\napp pods: {pods:?}\n{logs}"
        );
    }
}

#[tokio::test]
async fn a_dockerfile_project_is_built_by_real_buildkit_and_served_over_https() {
    if !enabled(
        "a_dockerfile_project_is_built_by_real_buildkit_and_served_over_https",
        &[("BuildKit", kapsa_testenv::buildkit::built_buildkit)],
    ) {
        return;
    }
    let buildkit_folder = kapsa_testenv::buildkit::find_buildkit().expect("BuildKit");
    let (env, client) = cluster().await;
    let mut lane = Lane::start(env, &client, false).await;
    let pushed = Instant::now();
    let image = kapsa_testenv::buildkit::push_image(&lane.node.image_pusher(), &buildkit_folder)
        .expect("BuildKit's image pushed");
    println!(
        "real build: the BuildKit image pushed in {:?}",
        pushed.elapsed()
    );
    BUILDKIT_IMAGE.set(image.clone()).expect("set once");
    shared_operator_with(config).await;

    // The platform: the lane's registry (plain HTTP, on the bridge), with
    // push credentials it does not check; a pool served over HTTPS with
    // certificates from Pebble.
    let registry_server = lane.node.registry().to_string();
    create_ignoring_conflict(
        &Api::<Secret>::namespaced(client.clone(), PLATFORM_NAMESPACE),
        json!({"metadata": {"name": "lane-push"}, "type": "kubernetes.io/dockerconfigjson",
            "stringData": {".dockerconfigjson": json!({"auths": {&registry_server: {"auth": "a2Fwc2E6bGFuZQ=="}}}).to_string()}}),
    )
    .await;
    create_ignoring_conflict(
        &Api::<kapsa_api::ClusterRegistry>::all(client.clone()),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "ClusterRegistry", "metadata": {"name": "lane"},
            "spec": {"provider": "Generic", "server": registry_server, "repository": "kapsa", "insecure": true,
                "credentialsSecretRef": {"name": "lane-push", "namespace": PLATFORM_NAMESPACE}}}),
    )
    .await;
    let base = "build.example.com";
    create_ignoring_conflict(
        &Api::<DomainPool>::all(client.clone()),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "DomainPool", "metadata": {"name": "build-pool"},
            "spec": pool_spec(base, Some(kapsa_testenv::acme_lane::CLUSTER_ISSUER))}),
    )
    .await;

    // The repository, served where build Pods reach it: a Dockerfile, a
    // static busybox and the page.
    let git = kapsa_testenv::git_server::GitServer::start_on(BRIDGE_GATEWAY, None)
        .await
        .expect("git server");
    let name = "dockerapp";
    let repo = git.create_repo(name).expect("repository");
    let assets = kapsa_testenv::real_node::find_real_lane_assets().expect("the lane's binaries");
    let busybox = std::fs::read(assets.join("busybox")).expect("busybox");
    let base_image = lane
        .node
        .push_image(
            "kapsa-lane/busybox",
            &[kapsa_testenv::real_node::ImageFile::new(
                "/bin/busybox",
                busybox,
                0o755,
            )],
            &["/bin/busybox", "sh"],
        )
        .expect("a base image");
    repo.commit("main", "Dockerfile", dockerfile(&base_image), "Dockerfile")
        .expect("commit");
    repo.commit("main", "www/healthz", "ok\n", "health")
        .expect("commit");
    let first = repo
        .commit("main", "www/index.html", "built by BuildKit: v1\n", "v1")
        .expect("commit");
    let manifest = json!({
        "apiVersion": "kapsa.dev/v1alpha1", "kind": "Project", "metadata": {"name": name},
        "spec": {
            "source": {"git": {"url": repo.url(), "branch": "main", "allowInsecureHttp": true},
                "pollInterval": "10s"},
            "build": {"strategy": "Dockerfile"},
            "registryRef": {"kind": "ClusterRegistry", "name": "lane"},
            "domainPoolRef": {"name": "build-pool"},
            "runtime": {"port": 8080, "replicas": 1, "healthCheck": {"path": "/healthz"},
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}
        }
    });
    let applied = Instant::now();
    create(&Api::<Project>::all(client.clone()), manifest).await;
    live(&client, name, &first).await;
    let ready_after = applied.elapsed();

    // The image the Job built and pushed is the one running.
    let environment = production(&client, name).await.expect("production");
    let deployed = environment.status.and_then(|s| s.image).unwrap_or_default();
    assert!(
        deployed.starts_with(&format!(
            "{registry_server}/kapsa/{name}:production@sha256:"
        )),
        "the digest the build pushed: {deployed}"
    );
    let first_job = build_job(&client, name, &first).await;
    let pod = first_job
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap();
    assert_eq!(pod.containers[0].image.as_deref(), Some(image.as_str()));
    let cold = build_seconds(&client, name, &first_job).await;
    let cold_log = build_log(&client, name, &first_job).await;
    assert!(
        cold_log.contains("exporting to image"),
        "BuildKit built the image: {cold_log}"
    );

    // Served over HTTPS, verified against Pebble's root only.
    let host = format!("{name}.{base}");
    let https = lane.traefik.https_address().to_string();
    let pebble = TlsRoots::from_pem_file(lane.acme.acme_ca()).expect("Pebble's root");
    // The page `expected`, or the last answer when it never came.
    let page = |expected: &'static str| {
        let (https, host, pebble) = (https.clone(), host.clone(), pebble.clone());
        async move {
            let last = std::sync::Mutex::new(String::new());
            let served = kapsa_testenv::wait::try_eventually(support::TIMEOUT, || async {
                let answer = kapsa_testenv::http_get::get(&https, &host, "/", Some(&pebble)).await;
                *last.lock().unwrap() = format!("{answer:?}");
                answer.ok().filter(|(s, b)| *s == 200 && b == expected)
            })
            .await;
            served.map(|_| ()).ok_or_else(|| last.into_inner().unwrap())
        }
    };
    if let Err(last) = page("built by BuildKit: v1\n").await {
        panic!("the page the Dockerfile built, over HTTPS; the last answer: {last}");
    }
    let served_after = applied.elapsed();

    // A second commit rebuilds: the unchanged steps are cache hits from the
    // registry cache the first build exported.
    let committed = Instant::now();
    let second = repo
        .commit("main", "www/index.html", "built by BuildKit: v2\n", "v2")
        .expect("commit");
    live(&client, name, &second).await;
    if let Err(last) = page("built by BuildKit: v2\n").await {
        panic!("the second build, over HTTPS; the last answer: {last}");
    }
    let second_served = committed.elapsed();
    let second_job = build_job(&client, name, &second).await;
    let warm = build_seconds(&client, name, &second_job).await;
    let warm_log = build_log(&client, name, &second_job).await;
    let hits = cache_hits(&warm_log);
    assert!(
        hits.iter().any(|step| step.contains("RUN")),
        "the RUN step came from the registry cache: {hits:?}\n{warm_log}"
    );
    assert!(
        cache_hits(&cold_log)
            .iter()
            .all(|step| !step.contains("RUN")),
        "the first build had no cache to hit"
    );
    println!(
        "real build: Project applied -> production Ready {ready_after:?} (cold build: Job {} s, BuildKit's container {} s), -> served over HTTPS {served_after:?}; second commit -> served over HTTPS {second_served:?} (build with the registry cache: Job {} s, container {} s; cache hits: {hits:?})",
        cold.0, cold.1, warm.0, warm.1
    );

    Api::<Project>::all(client.clone())
        .delete(name, &DeleteParams::default())
        .await
        .expect("Project deleted");
    drop(lane.acme);
    drop(lane.traefik);
    lane.node.stop();
}

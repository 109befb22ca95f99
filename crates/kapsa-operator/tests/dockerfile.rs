//! Dockerfile builds in the kwok lane, against the real control plane: the
//! build Job Kapsa makes (asserted field by field), the real Job controller
//! running it, and the BuildKit SIMULATOR of kapsa-testenv finishing its Pod
//! with a digest (or a failure) in the termination message.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Namespace;
use kapsa_operator::OperatorConfig;
use kapsa_testenv::simulators::build_jobs::simulated_dockerfile_digest;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use serde_json::json;
use support::*;

fn config() -> OperatorConfig {
    OperatorConfig {
        max_poll_interval: Some(Duration::from_secs(1)),
        ..operator_config()
    }
}

#[tokio::test]
async fn a_dockerfile_project_builds_in_jobs_keeps_serving_through_a_failure_and_prunes_old_jobs() {
    let (_, client) = cluster().await;
    shared_operator_with(config).await;
    let platform = platform(&client, "docker", "HTTP01", false).await;
    let name = "dockerized";
    let live = live_project(&client, name, platform, |manifest| {
        manifest["spec"]["build"] =
            json!({"strategy": "Dockerfile", "dockerfile": "deploy/Dockerfile", "timeout": "15m"});
        manifest["spec"]["source"]["contextDir"] = json!("app");
    })
    .await;
    let url = live.repo.url().to_string();
    let build_ns = kapsa_api::naming::build_namespace(name);
    let jobs = Api::<Job>::namespaced(client.clone(), &build_ns);
    let tag = format!("registry.example/kapsa/{name}:production");

    // Live from the image the build reported.
    let env = production(&client, name).await.unwrap();
    let first_image = format!("{tag}@{}", simulated_dockerfile_digest(&url, &live.commit));
    assert_eq!(
        env.status.as_ref().unwrap().image.as_deref(),
        Some(first_image.as_str())
    );
    let deployments = Api::<Deployment>::namespaced(client.clone(), name);
    assert_eq!(
        app_image(&deployments.get("production").await.unwrap()),
        first_image
    );

    // The Job, as the API server holds it.
    let job = jobs
        .get(&format!("production-{}", &live.commit[..7]))
        .await
        .unwrap();
    assert_eq!(
        job.annotations().get("kapsa.dev/commit"),
        Some(&live.commit)
    );
    let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Project", name)
    );
    let spec = job.spec.as_ref().unwrap();
    assert_eq!(spec.active_deadline_seconds, Some(900));
    assert_eq!(spec.backoff_limit, Some(0));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("kapsa-builder"));
    assert_eq!(pod.automount_service_account_token, Some(false));
    let container = &pod.containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some(kapsa_operator::resources::environment::DEFAULT_BUILDKIT_IMAGE)
    );
    let vars: std::collections::BTreeMap<String, String> = container
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|v| (v.name, v.value.unwrap_or_default()))
        .collect();
    assert_eq!(vars["KAPSA_GIT_URL"], url);
    assert_eq!(vars["KAPSA_COMMIT"], live.commit);
    assert_eq!(vars["KAPSA_CONTEXT_DIR"], "app");
    assert_eq!(vars["KAPSA_DOCKERFILE"], "deploy/Dockerfile");
    assert_eq!(vars["KAPSA_IMAGE"], tag);
    let limits = container
        .resources
        .as_ref()
        .unwrap()
        .limits
        .as_ref()
        .unwrap();
    assert_eq!(limits["memory"].0, "4Gi");
    let security = container.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_non_root, Some(true));
    let volumes = pod.volumes.as_ref().unwrap();
    let secret = |volume: &str| {
        volumes
            .iter()
            .find(|v| v.name == volume)
            .and_then(|v| v.secret.as_ref())
            .and_then(|s| s.secret_name.clone())
    };
    assert_eq!(secret("registry").as_deref(), Some("kapsa-registry"));
    assert_eq!(secret("git").as_deref(), Some("kapsa-git"));
    let done = job.status.as_ref().unwrap().conditions.as_ref().unwrap();
    assert!(
        done.iter()
            .any(|c| c.type_ == "Complete" && c.status == "True"),
        "the Job controller completed it: {done:?}"
    );
    // Rootless BuildKit runs where the build namespace allows it.
    let namespace = Api::<Namespace>::all(client.clone())
        .get(&build_ns)
        .await
        .unwrap();
    assert_eq!(
        namespace
            .labels()
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged")
    );

    // A failing build: Built=False with BuildKit's error, and the release
    // keeps serving.
    let second = live.repo.commit("main", "app.txt", "v2", "second").unwrap();
    fail_revisions(&client, &[&second]).await;
    let (status, reason, message) = eventually("the failed build to show", || async {
        environment_condition(&client, name, "production", "Built")
            .await
            .filter(|(s, _, m)| s == "False" && m.contains(&second))
    })
    .await;
    assert_eq!((status.as_str(), reason.as_str()), ("False", "BuildFailed"));
    assert!(message.contains("failed to solve"), "{message}");
    let env = production(&client, name).await.unwrap();
    let ready = condition_of(&env.status.as_ref().unwrap().conditions, "Ready");
    assert_eq!(ready, Some(("True".into(), "Serving".into())));
    assert_eq!(
        app_image(&deployments.get("production").await.unwrap()),
        first_image
    );
    fail_revisions(&client, &[]).await;

    // Three more commits: each builds once; beyond the history limit (3
    // finished Jobs besides the current one) the oldest Job goes.
    let mut last = second.clone();
    for round in 3..=5 {
        last = live
            .repo
            .commit("main", "app.txt", format!("v{round}"), "more")
            .unwrap();
        rolled_out(&client, name, &last).await;
    }
    let env = production(&client, name).await.unwrap();
    assert_eq!(
        env.status.as_ref().unwrap().image.as_deref(),
        Some(format!("{tag}@{}", simulated_dockerfile_digest(&url, &last)).as_str())
    );
    let names = eventually("the history limit to prune the oldest Job", || async {
        let names: Vec<String> = jobs
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .iter()
            .filter(|j| j.metadata.deletion_timestamp.is_none())
            .map(|j| j.name_any())
            .collect();
        (names.len() == 4).then_some(names)
    })
    .await;
    assert!(
        !names.contains(&format!("production-{}", &live.commit[..7])),
        "the first commit's Job is pruned: {names:?}"
    );
    assert!(
        names.contains(&format!("production-{}", &last[..7])),
        "{names:?}"
    );
    assert!(
        names.contains(&format!("production-{}", &second[..7])),
        "{names:?}"
    );
}

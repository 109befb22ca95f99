//! Restarting the operator, at rest and in the middle of a rollout: it
//! converges with no duplicate builds and writes nothing it need not.

mod support;

use std::time::Duration;

use kapsa_api::{Environment, EnvironmentPhase, Project};
use kapsa_testenv::git_server::GitServer;
use kapsa_testenv::simulators::kpack::image_resource;
use kube::Client;
use kube::api::{Api, DynamicObject};
use support::*;

async fn live(client: &Client, namespace: &str, commit: &str) {
    eventually(&format!("{commit} to be live"), || async {
        let env = Api::<Environment>::namespaced(client.clone(), namespace)
            .get("production")
            .await
            .ok()?;
        let status = env.status?;
        (status.commit.as_deref() == Some(commit) && status.phase == Some(EnvironmentPhase::Ready))
            .then_some(())
    })
    .await;
}

async fn build_counter(client: &Client, namespace: &str) -> i64 {
    let image = Api::<DynamicObject>::namespaced_with(client.clone(), namespace, &image_resource())
        .get("production")
        .await
        .unwrap();
    image.data["status"]["buildCounter"].as_i64().unwrap_or(0)
}

fn stopper() -> (
    tokio::sync::oneshot::Sender<()>,
    impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

#[tokio::test]
async fn restarts_converge_without_duplicate_builds_or_extra_writes() {
    let (_, client) = cluster().await;
    let platform = platform(&client, "restart", "HTTP01", false).await;
    let git = GitServer::start(None).await.unwrap();
    let repo = git.create_repo("app").unwrap();
    let first = repo.commit("main", "a", "1", "one").unwrap();
    let name = "steady";
    create(
        &Api::<Project>::all(client.clone()),
        project_manifest(name, repo.url(), &platform, None),
    )
    .await;

    let (stop_a, until_a) = stopper();
    let (_, a) = operator_until(client.clone(), until_a);
    live(&client, name, &first).await;
    let _ = stop_a.send(());
    a.await.unwrap();
    assert_eq!(build_counter(&client, name).await, 1);

    // At rest: a new operator reads the world and finds nothing to write,
    // across more than one poll interval (10s).
    let (stop_b, until_b) = stopper();
    let (metrics_b, b) = operator_until(client.clone(), until_b);
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(
        metrics_b.total_writes(),
        0,
        "a restarted operator with nothing to do writes nothing:\n{}",
        metrics_b.encode()
    );
    assert_eq!(
        build_counter(&client, name).await,
        1,
        "no rebuild after a restart"
    );

    // Mid-way: stop as soon as the build of a new commit has started.
    let second = repo.commit("main", "a", "2", "two").unwrap();
    eventually("the build of the second commit to start", || async {
        let image = Api::<DynamicObject>::namespaced_with(client.clone(), name, &image_resource())
            .get("production")
            .await
            .ok()?;
        (image.data["spec"]["source"]["git"]["revision"].as_str() == Some(second.as_str()))
            .then_some(())
    })
    .await;
    let _ = stop_b.send(());
    b.await.unwrap();

    let (stop_c, until_c) = stopper();
    let (metrics_c, c) = operator_until(client.clone(), until_c);
    live(&client, name, &second).await;
    assert_eq!(
        build_counter(&client, name).await,
        2,
        "exactly one build per commit"
    );
    // Converged (the Project's status follows its Environment's a moment
    // later): once writes stop, none come while nothing changes, across
    // more than two poll intervals.
    let mut settled = metrics_c.total_writes();
    for round in 0.. {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = metrics_c.total_writes();
        if now == settled {
            break;
        }
        assert!(round < 20, "writes never stopped:\n{}", metrics_c.encode());
        settled = now;
    }
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(
        metrics_c.total_writes(),
        settled,
        "idle writes after convergence:\n{}",
        metrics_c.encode()
    );
    let _ = stop_c.send(());
    c.await.unwrap();
}

//! Restarting the operator, at rest and in the middle of a rollout: it
//! converges with no duplicate builds and writes nothing it need not.

mod support;

use std::time::Duration;

use kapsa_api::Project;
use kapsa_testenv::git_server::GitServer;
use kapsa_testenv::simulators::kpack::image_resource;
use kube::Client;
use kube::api::{Api, DynamicObject};
use support::*;

/// Writes the API server saw from `user` since `mark` (its audit log).
async fn writes_by(
    log: &kapsa_testenv::AuditLog,
    mark: kapsa_testenv::AuditMark,
    user: &str,
) -> (usize, String) {
    let events = log.events_since(mark).await;
    let writes = kapsa_testenv::audit::count(&events, |e| {
        e.user == user && kapsa_testenv::audit::writes(e)
    });
    let summary = kapsa_testenv::audit::summary_by(&events, user);
    (writes, format!("{summary:#?}"))
}

async fn build_counter(client: &Client, namespace: &str) -> i64 {
    let build_namespace = kapsa_api::naming::build_namespace(namespace);
    let image =
        Api::<DynamicObject>::namespaced_with(client.clone(), &build_namespace, &image_resource())
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
    let (env, client) = cluster().await;
    let log = env.audit_log();
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
    rolled_out(&client, name, &first).await;
    platform_settled(&client, &platform).await;
    let _ = stop_a.send(());
    a.await.unwrap();
    assert_eq!(build_counter(&client, name).await, 1);

    // At rest: a new operator reads the world and finds nothing to write,
    // across more than one poll interval (10s).
    // Judged by the API server's audit log: the operator runs as a user of
    // its own.
    let (stop_b, until_b) = stopper();
    let mark = log.mark().await;
    let (_, b) = operator_until(
        env.client_as("kapsa-restart-b", &["system:masters"]).await,
        until_b,
    );
    tokio::time::sleep(Duration::from_secs(25)).await;
    let (writes, summary) = writes_by(&log, mark, "kapsa-restart-b").await;
    assert_eq!(
        writes, 0,
        "a restarted operator with nothing to do writes nothing:\n{summary}"
    );
    assert_eq!(
        build_counter(&client, name).await,
        1,
        "no rebuild after a restart"
    );

    // Mid-way: stop as soon as the build of a new commit has started.
    let second = repo.commit("main", "a", "2", "two").unwrap();
    eventually("the build of the second commit to start", || async {
        let build_namespace = kapsa_api::naming::build_namespace(name);
        let image = Api::<DynamicObject>::namespaced_with(
            client.clone(),
            &build_namespace,
            &image_resource(),
        )
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
    let user_c = "kapsa-restart-c";
    let start_c = log.mark().await;
    let (_, c) = operator_until(env.client_as(user_c, &["system:masters"]).await, until_c);
    rolled_out(&client, name, &second).await;
    assert_eq!(
        build_counter(&client, name).await,
        2,
        "exactly one build per commit"
    );
    // Converged (the Project's status follows its Environment's a moment
    // later): once writes stop, none come while nothing changes, across
    // more than two poll intervals.
    let mut settled = writes_by(&log, start_c, user_c).await.0;
    for round in 0.. {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (now, summary) = writes_by(&log, start_c, user_c).await;
        if now == settled {
            break;
        }
        assert!(round < 20, "writes never stopped:\n{summary}");
        settled = now;
    }
    assert!(
        settled > 0,
        "the audit log shows the restarted operator's writes (the oracle can see them)"
    );
    let idle = log.mark().await;
    tokio::time::sleep(Duration::from_secs(25)).await;
    let (writes, summary) = writes_by(&log, idle, user_c).await;
    assert_eq!(writes, 0, "idle writes after convergence:\n{summary}");
    let _ = stop_c.send(());
    c.await.unwrap();
}

//! BuildKit SIMULATOR for Dockerfile builds: finishes the Pods of Kapsa's
//! build Jobs (label `kapsa.dev/build=dockerfile`) without building.
//!
//! The real kube-controller-manager runs the Jobs and makes their Pods;
//! kwok schedules the Pods on a simulated node and marks them Running
//! (kwok's job-pod stage leaves build Pods alone). This simulator then
//! ends the Pod as BuildKit's script would: `Succeeded`, its `build`
//! container terminated with exit code 0 and, as termination message, the
//! digest `sha256:<sha256 of "<KAPSA_GIT_URL>@<KAPSA_COMMIT>#dockerfile">`;
//! or, for a commit listed in the kpack simulator's `failRevisions`
//! (ConfigMap `kpack-simulator/settings`), `Failed` with exit code 1 and a
//! BuildKit-like error as message. The Job controller turns that into the
//! Job's `Complete` or `Failed` condition. `buildDelayMillis` of the same
//! ConfigMap delays every build.
//!
//! Build Pods placed on the real lane's node (their `nodeSelector` names
//! [`crate::real_node::REAL_NODE_LABEL`]) are left alone: real BuildKit
//! builds there.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{now_rfc3339, write_params};

/// The label selecting the Pods this simulator finishes.
pub const BUILD_POD_SELECTOR: &str = "kapsa.dev/build=dockerfile";

/// The digest the simulator reports for a Dockerfile build of `commit`
/// from `url`.
pub fn simulated_dockerfile_digest(url: &str, commit: &str) -> String {
    let hash = Sha256::digest(format!("{url}@{commit}#dockerfile").as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[derive(Debug, thiserror::Error)]
enum SimError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

struct Ctx {
    client: Client,
}

fn env_of(pod: &Pod, name: &str) -> Option<String> {
    pod.spec
        .as_ref()?
        .containers
        .first()?
        .env
        .as_ref()?
        .iter()
        .find(|v| v.name == name)
        .and_then(|v| v.value.clone())
}

/// Whether the Pod is placed on the real lane's node.
fn on_real_node(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_selector.as_ref())
        .is_some_and(|s| s.contains_key(crate::real_node::REAL_NODE_LABEL))
}

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Ctx>) -> Result<Action, SimError> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    if phase.as_deref() != Some("Running") || pod.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    if on_real_node(&pod) {
        return Ok(Action::await_change());
    }
    let (fail, delay) = super::kpack::settings(&ctx.client).await;
    tokio::time::sleep(delay).await;
    let url = env_of(&pod, "KAPSA_GIT_URL").unwrap_or_default();
    let commit = env_of(&pod, "KAPSA_COMMIT").unwrap_or_default();
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
        .unwrap_or_default();
    let now = now_rfc3339();
    let failing = fail.contains(&commit);
    let (phase, exit_code, reason, message) = if failing {
        tracing::info!(pod = %pod.name_any(), commit, "BuildKit simulator: failing build as configured");
        (
            "Failed",
            1,
            "Error",
            format!(
                "BuildKit simulator: ERROR: failed to solve: process \"/bin/sh -c make\" did not complete successfully: exit code: 2 (commit {commit} is listed in failRevisions)"
            ),
        )
    } else {
        let digest = simulated_dockerfile_digest(&url, &commit);
        tracing::info!(pod = %pod.name_any(), commit, digest, "BuildKit simulator: build succeeded");
        ("Succeeded", 0, "Completed", digest)
    };
    let patch = json!({"status": {
        "phase": phase,
        "containerStatuses": [{
            "name": container.0,
            "image": container.1,
            "imageID": "",
            "ready": false,
            "started": false,
            "restartCount": 0,
            "state": {"terminated": {
                "exitCode": exit_code,
                "reason": reason,
                "message": message,
                "startedAt": now,
                "finishedAt": now,
            }},
        }],
    }});
    Api::<Pod>::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default())
        .patch_status(&pod.name_any(), &write_params(), &Patch::Merge(&patch))
        .await?;
    Ok(Action::await_change())
}

fn error_policy(_: Arc<Pod>, error: &SimError, _: Arc<Ctx>) -> Action {
    tracing::warn!(%error, "BuildKit simulator: retrying");
    Action::requeue(Duration::from_millis(500))
}

pub async fn run(client: Client) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
    });
    Controller::new(
        Api::<Pod>::all(client),
        watcher::Config::default().labels(BUILD_POD_SELECTOR),
    )
    .run(reconcile, error_policy, ctx)
    .for_each(|_| async {})
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dockerfile_digests_differ_from_buildpack_digests() {
        let a = simulated_dockerfile_digest("https://git.example/a.git", "1111");
        assert_eq!(
            a,
            simulated_dockerfile_digest("https://git.example/a.git", "1111")
        );
        assert_ne!(
            a,
            simulated_dockerfile_digest("https://git.example/a.git", "2222")
        );
        assert_ne!(
            a,
            super::super::kpack::simulated_digest("https://git.example/a.git", "1111")
        );
        assert_eq!(a.len(), "sha256:".len() + 64);
    }
}

//! kpack SIMULATOR: completes `kpack.io/v1alpha2` Image builds without building.
//!
//! For an Image whose generation it has not built yet, it first reports the
//! build as running (`Ready=Unknown`, `observedGeneration` = generation), as
//! kpack does, then finishes it: `status.latestImage` becomes
//! `<spec.tag>@sha256:<sha256 of "<git url>@<revision>">`, so the same commit
//! always gives the same digest, `Ready=True`, `buildCounter` + 1 and a
//! `latestBuildRef`.
//!
//! Making builds fail (for tests): list the revision in the ConfigMap
//! `kpack-simulator/settings`, key `failRevisions` (whitespace or comma
//! separated). A failed build sets `Ready=False` with reason `BuildFailed` and
//! keeps the previous `latestImage`, like kpack. The same ConfigMap's
//! `buildDelayMillis` makes every build take that long (default 0).
//! ClusterBuilders and Builders are marked Ready with a `latestImage`.
//!
//! In the real lane a test registers a [`RealImageBuilder`] for the lane's
//! registry ([`build_real_images`]): a build whose `spec.tag` is in that
//! registry then pushes a real image (what the builder makes of the
//! revision, e.g. a static HTTP server whose page names the commit) and
//! reports its real digest. Still a simulator: nothing is built from the
//! repository's sources.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kapsa_api::external;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{condition, write_params};

/// Namespace of the simulator's settings ConfigMap.
pub const SETTINGS_NAMESPACE: &str = "kpack-simulator";
/// Name of the simulator's settings ConfigMap.
pub const SETTINGS_NAME: &str = "settings";

/// The kpack `Image` resource: [`kapsa_api::external::kpack_image`].
pub fn image_resource() -> ApiResource {
    external::kpack_image()
}

/// Makes and pushes a real image for a build: given the Image's `spec.tag`,
/// git URL and revision, returns the pushed `<repository>@sha256:…`.
pub type RealImageBuilder = Arc<dyn Fn(&str, &str, &str) -> Result<String, String> + Send + Sync>;

static REAL_IMAGES: std::sync::RwLock<Vec<(String, RealImageBuilder)>> =
    std::sync::RwLock::new(Vec::new());

/// Until the returned guard is dropped, builds whose `spec.tag` is in
/// `registry` (`host:port`) push a real image made by `builder` (real lane).
pub fn build_real_images(registry: &str, builder: RealImageBuilder) -> RealImages {
    let prefix = format!("{registry}/");
    if let Ok(mut builders) = REAL_IMAGES.write() {
        builders.push((prefix.clone(), builder));
    }
    RealImages { prefix }
}

/// Keeps real builds on for one registry; see [`build_real_images`].
#[must_use = "real builds stop when this is dropped"]
pub struct RealImages {
    prefix: String,
}

impl Drop for RealImages {
    fn drop(&mut self) {
        if let Ok(mut builders) = REAL_IMAGES.write() {
            builders.retain(|(prefix, _)| *prefix != self.prefix);
        }
    }
}

fn real_image_builder(tag: &str) -> Option<RealImageBuilder> {
    REAL_IMAGES
        .read()
        .ok()?
        .iter()
        .find(|(prefix, _)| tag.starts_with(prefix.as_str()))
        .map(|(_, builder)| builder.clone())
}

/// The digest the simulator gives a build of `revision` from `url`.
pub fn simulated_digest(url: &str, revision: &str) -> String {
    let hash = Sha256::digest(format!("{url}@{revision}").as_bytes());
    format!("sha256:{}", hex(&hash))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) async fn install(client: &Client) -> crate::control_plane::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": SETTINGS_NAMESPACE}}))
        .map_err(|e| crate::control_plane::Error::Manifest(e.to_string()))?;
    match namespaces.create(&PostParams::default(), &ns).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Revisions whose builds must fail, and the build delay, from the settings ConfigMap.
pub(crate) async fn settings(client: &Client) -> (Vec<String>, Duration) {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), SETTINGS_NAMESPACE)
        .get_opt(SETTINGS_NAME)
        .await
        .ok()
        .flatten();
    let data = cm.and_then(|c| c.data).unwrap_or_default();
    let fail = data
        .get("failRevisions")
        .map(|s| {
            s.split(|c: char| c == ',' || c.is_whitespace())
                .filter(|r| !r.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let delay = data
        .get("buildDelayMillis")
        .and_then(|s| s.trim().parse().ok())
        .map(Duration::from_millis)
        .unwrap_or_default();
    (fail, delay)
}

#[derive(Debug, thiserror::Error)]
enum SimError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
}

struct Ctx {
    client: Client,
}

async fn reconcile_image(image: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, SimError> {
    let generation = image.metadata.generation.unwrap_or_default();
    let status = image.data.get("status").cloned().unwrap_or(Value::Null);
    let observed = status.get("observedGeneration").and_then(Value::as_i64);
    let ready = status
        .get("conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .and_then(|c| c["status"].as_str())
        .unwrap_or("Unknown")
        .to_string();
    if observed == Some(generation) && ready != "Unknown" {
        return Ok(Action::await_change());
    }
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        &image.namespace().unwrap_or_default(),
        &image_resource(),
    );
    let name = image.name_any();
    let spec = image.data.get("spec").cloned().unwrap_or(Value::Null);
    let tag = spec["tag"].as_str().unwrap_or_default();
    let url = spec["source"]["git"]["url"].as_str().unwrap_or_default();
    let revision = spec["source"]["git"]["revision"]
        .as_str()
        .unwrap_or_default();
    let counter = status
        .get("buildCounter")
        .and_then(Value::as_i64)
        .unwrap_or(0);

    if observed != Some(generation) {
        // Step 1, as kpack: a build for this generation is now running.
        let patch = json!({"status": {
            "observedGeneration": generation,
            "buildCounter": counter + 1,
            "latestBuildRef": format!("{name}-build-{}", counter + 1),
            "latestBuildReason": if counter == 0 { "CONFIG" } else { "COMMIT" },
            "conditions": [
                condition("Ready", "Unknown", "BuildRunning", "kpack simulator: build running"),
                condition("BuilderReady", "True", "", ""),
            ],
        }});
        api.patch_status(&name, &write_params(), &Patch::Merge(&patch))
            .await?;
        return Ok(Action::requeue(Duration::from_millis(1)));
    }

    // Step 2: the build finishes.
    let (fail_revisions, delay) = settings(&ctx.client).await;
    tokio::time::sleep(delay).await;
    let patch = if tag.is_empty() || url.is_empty() || revision.is_empty() {
        json!({"status": {"conditions": [condition("Ready", "False", "BuildFailed",
            "kpack simulator: spec.tag, spec.source.git.url and spec.source.git.revision are required")]}})
    } else if fail_revisions.iter().any(|r| r == revision) {
        tracing::info!(image = %name, revision, "kpack simulator: failing build as configured");
        json!({"status": {"conditions": [condition("Ready", "False", "BuildFailed",
            &format!("kpack simulator: build of revision {revision} failed (listed in {SETTINGS_NAMESPACE}/{SETTINGS_NAME} failRevisions)"))]}})
    } else {
        // The real lane's image for this build, or the simulated digest.
        let built = match real_image_builder(tag) {
            Some(builder) => {
                let (tag, url, revision) = (tag.to_string(), url.to_string(), revision.to_string());
                tokio::task::spawn_blocking(move || builder(&tag, &url, &revision))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
                    .map(|latest| (latest, "kpack simulator: build succeeded (a real image, made by the real lane, not from the sources)"))
            }
            None => Ok((
                format!("{tag}@{}", simulated_digest(url, revision)),
                "kpack simulator: build succeeded",
            )),
        };
        match built {
            Ok((latest, message)) => {
                tracing::info!(image = %name, revision, latest, "kpack simulator: build succeeded");
                json!({"status": {
                    "latestImage": latest,
                    "conditions": [
                        condition("Ready", "True", "", message),
                        condition("BuilderReady", "True", "", ""),
                    ],
                }})
            }
            Err(error) => {
                json!({"status": {"conditions": [condition("Ready", "False", "BuildFailed",
                &format!("kpack simulator: pushing the real image failed: {error}"))]}})
            }
        }
    };
    api.patch_status(&name, &write_params(), &Patch::Merge(&patch))
        .await?;
    Ok(Action::await_change())
}

async fn reconcile_builder(builder: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, SimError> {
    // A ClusterBuilder is cluster-scoped, a Builder namespaced.
    let api: Api<DynamicObject> = match builder.namespace() {
        Some(ns) => Api::namespaced_with(
            ctx.client.clone(),
            &ns,
            &external::kpack_namespaced_builder(),
        ),
        None => Api::all_with(ctx.client.clone(), &external::kpack_cluster_builder()),
    };
    let generation = builder.metadata.generation.unwrap_or_default();
    let status = builder.data.get("status").cloned().unwrap_or(Value::Null);
    if status.get("observedGeneration").and_then(Value::as_i64) == Some(generation) {
        return Ok(Action::await_change());
    }
    let tag = builder.data["spec"]["tag"]
        .as_str()
        .unwrap_or("kpack-simulator/builder");
    let patch = json!({"status": {
        "observedGeneration": generation,
        "latestImage": format!("{tag}@{}", simulated_digest(tag, &generation.to_string())),
        "conditions": [condition("Ready", "True", "", "kpack simulator: builder ready")],
    }});
    api.patch_status(&builder.name_any(), &write_params(), &Patch::Merge(&patch))
        .await?;
    Ok(Action::await_change())
}

fn error_policy(_: Arc<DynamicObject>, error: &SimError, _: Arc<Ctx>) -> Action {
    tracing::warn!(%error, "kpack simulator: retrying");
    Action::requeue(Duration::from_millis(500))
}

pub async fn run(client: Client) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
    });
    let images = Controller::new_with(
        Api::<DynamicObject>::all_with(client.clone(), &image_resource()),
        watcher::Config::default(),
        image_resource(),
    )
    .run(reconcile_image, error_policy, ctx.clone())
    .for_each(|_| async {});
    let cluster_builders = Controller::new_with(
        Api::<DynamicObject>::all_with(client.clone(), &external::kpack_cluster_builder()),
        watcher::Config::default(),
        external::kpack_cluster_builder(),
    )
    .run(reconcile_builder, error_policy, ctx.clone())
    .for_each(|_| async {});
    let builders = Controller::new_with(
        Api::<DynamicObject>::all_with(client.clone(), &external::kpack_namespaced_builder()),
        watcher::Config::default(),
        external::kpack_namespaced_builder(),
    )
    .run(reconcile_builder, error_policy, ctx)
    .for_each(|_| async {});
    tokio::join!(images, cluster_builders, builders);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_is_deterministic_and_depends_on_url_and_revision() {
        let a = simulated_digest("https://git.example/a.git", "1111");
        assert_eq!(a, simulated_digest("https://git.example/a.git", "1111"));
        assert_ne!(a, simulated_digest("https://git.example/a.git", "2222"));
        assert_ne!(a, simulated_digest("https://git.example/b.git", "1111"));
        assert!(a.starts_with("sha256:") && a.len() == "sha256:".len() + 64);
    }
}

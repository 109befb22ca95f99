//! The build Job of an Environment of a `build.strategy: Dockerfile`
//! Project: one Job per commit, in the Project's build namespace (where the
//! push credentials are and no tenant is bound), running BuildKit without a
//! daemon (`buildctl-daemonless.sh`, the Dockerfile frontend).
//!
//! The container clones exactly the commit (git credentials read from the
//! mounted copy `kapsa-git`, never from args or env), builds
//! `<contextDir>` with `<contextDir>/<dockerfile>`, pushes
//! `<repository>:<environment>` with the mounted push credentials
//! (`kapsa-registry`), imports and exports a registry build cache
//! `<repository>:kapsa-build-cache` shared by the Project's Environments,
//! and writes the pushed digest to its termination message, which the
//! operator reads from the Pod's status.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Container, EmptyDirVolumeSource, EnvVar, KeyToPath, PodSecurityContext, PodSpec,
    PodTemplateSpec, ResourceRequirements, SeccompProfile, SecretVolumeSource, SecurityContext,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kapsa_api::RegistrySpec;
use kube::ResourceExt;
use sha2::{Digest, Sha256};

use super::{BUILDER_SERVICE_ACCOUNT, ENVIRONMENT_UID_LABEL, EnvironmentInputs, metadata};

/// The upstream rootless BuildKit image, the default of `--buildkit-image`.
pub const DEFAULT_BUILDKIT_IMAGE: &str = "docker.io/moby/buildkit:v0.26.2-rootless";
/// What Dockerfile build Pods run and where: the operator's
/// `--buildkit-image`, `--build-node-selector` and `--build-toleration`.
#[derive(Clone, Debug, PartialEq)]
pub struct BuildPods {
    /// The BuildKit image (rootless; it has `buildctl-daemonless.sh`, git
    /// and a POSIX shell).
    pub image: String,
    /// Node labels build Pods must match (their `nodeSelector`), e.g.
    /// nodes set aside for builds; empty: any node.
    pub node_selector: BTreeMap<String, String>,
    /// Taints build Pods tolerate.
    pub tolerations: Vec<Toleration>,
}

impl Default for BuildPods {
    fn default() -> Self {
        Self {
            image: DEFAULT_BUILDKIT_IMAGE.to_string(),
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
        }
    }
}

/// Label on build Jobs and their Pods: which strategy made them.
pub const BUILD_LABEL: &str = "kapsa.dev/build";
/// Value of [`BUILD_LABEL`] for Dockerfile builds.
pub const DOCKERFILE_BUILD: &str = "dockerfile";
/// Annotation on a build Job: the full commit it builds.
pub const BUILD_COMMIT_ANNOTATION: &str = "kapsa.dev/commit";
/// The tag of the registry build cache of a Project, beside its images.
pub const BUILD_CACHE_TAG: &str = "kapsa-build-cache";
/// Default of `build.timeout`.
pub const DEFAULT_BUILD_TIMEOUT_SECONDS: i64 = 30 * 60;
/// Finished build Jobs kept per Environment, besides the current one (their
/// Pods keep the logs until they go).
pub const BUILD_HISTORY_LIMIT: usize = 3;
/// The container of a build Job.
pub const BUILD_CONTAINER: &str = "build";

/// What the build container runs. Everything it reads is in its mounted
/// files and the plain `KAPSA_*` variables (no secret among them).
const BUILD_SCRIPT: &str = r#"set -eu
mkdir -p /work/src /work/home
export HOME=/work/home
git config --global advice.detachedHead false
if [ -f /kapsa/git/password ]; then
  printf '#!/bin/sh\ncase "$1" in Username*) cat /kapsa/git/username;; *) cat /kapsa/git/password;; esac\n' > /work/askpass
  chmod 700 /work/askpass
  export GIT_ASKPASS=/work/askpass GIT_TERMINAL_PROMPT=0
fi
if [ -f /kapsa/git/ssh-privatekey ]; then
  cp /kapsa/git/ssh-privatekey /work/ssh-key && chmod 600 /work/ssh-key
  known=/work/known_hosts; : > "$known"
  [ -f /kapsa/git/known_hosts ] && cp /kapsa/git/known_hosts "$known"
  export GIT_SSH_COMMAND="ssh -i /work/ssh-key -o IdentitiesOnly=yes -o UserKnownHostsFile=$known -o StrictHostKeyChecking=accept-new"
fi
cd /work/src
git init -q .
git remote add origin "$KAPSA_GIT_URL"
git fetch -q --depth 1 origin "$KAPSA_COMMIT"
git checkout -q FETCH_HEAD
test "$(git rev-parse HEAD)" = "$KAPSA_COMMIT"
context="/work/src/$KAPSA_CONTEXT_DIR"
dockerfile="$context/$KAPSA_DOCKERFILE"
output="type=image,name=$KAPSA_IMAGE,push=true"
cache="type=registry,ref=$KAPSA_CACHE"
if [ "$KAPSA_INSECURE" = true ]; then
  output="$output,registry.insecure=true"
  cache="$cache,registry.insecure=true"
  # Base images from the same registry are pulled the same way.
  printf '[registry."%s"]\n  http = true\n  insecure = true\n' "$KAPSA_REGISTRY_SERVER" > /work/buildkitd.toml
  export BUILDKITD_FLAGS="$BUILDKITD_FLAGS --config=/work/buildkitd.toml"
fi
buildctl-daemonless.sh build \
  --frontend dockerfile.v0 \
  --local context="$context" \
  --local dockerfile="$(dirname "$dockerfile")" \
  --opt filename="$(basename "$dockerfile")" \
  --output "$output" \
  --import-cache "$cache" \
  --export-cache "$cache,mode=max" \
  --metadata-file /work/metadata.json
sed -n 's/.*"containerimage.digest": *"\(sha256:[0-9a-f]*\)".*/\1/p' /work/metadata.json | head -n 1 > /dev/termination-log
test -s /dev/termination-log
"#;

/// Name of the Job that builds `commit` for `environment`:
/// `<environment>-<7 hex of the commit>`, the Environment's name shortened
/// (with a hash of it) when that would pass 63 characters.
pub fn build_job_name(environment: &str, commit: &str) -> String {
    let short = &commit[..commit.len().min(7)];
    let full = format!("{environment}-{short}");
    if full.len() <= 63 {
        return full;
    }
    let hash = Sha256::digest(environment.as_bytes());
    let hash: String = hash.iter().take(3).map(|b| format!("{b:02x}")).collect();
    let keep = 63 - short.len() - hash.len() - 2;
    let head = environment[..keep].trim_end_matches('-');
    format!("{head}-{hash}-{short}")
}

/// How long a build may take: `build.timeout`, default 30 minutes.
pub fn build_timeout_seconds(inputs: &EnvironmentInputs) -> i64 {
    inputs
        .project
        .spec
        .build
        .timeout
        .as_deref()
        .and_then(kapsa_api::duration::parse)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .filter(|s| *s > 0)
        .unwrap_or(DEFAULT_BUILD_TIMEOUT_SECONDS)
}

fn quantity(value: &str) -> Quantity {
    Quantity(value.to_string())
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_string(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.to_string(),
        mount_path: path.to_string(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

/// The build Job for `commit`, pushing to `<repository>:<environment>`
/// (`repository` is [`super::image_repository`]) of `registry`.
pub fn build_job(
    inputs: &EnvironmentInputs,
    registry: &RegistrySpec,
    repository: &str,
    commit: &str,
    pods: &BuildPods,
) -> Job {
    let project = inputs.project;
    let env_name = inputs.environment.name_any();
    let mut meta: ObjectMeta = metadata(inputs, Some(commit));
    meta.name = Some(build_job_name(&env_name, commit));
    meta.namespace = Some(crate::resources::project::build_namespace_name(project));
    meta.owner_references = Some(vec![crate::resources::controller_reference(project)]);
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(BUILD_LABEL.to_string(), DOCKERFILE_BUILD.to_string());
    if let Some(uid) = inputs.environment.uid() {
        labels.insert(ENVIRONMENT_UID_LABEL.to_string(), uid);
    }
    let pod_labels = labels.clone();
    meta.annotations = Some(BTreeMap::from([(
        BUILD_COMMIT_ANNOTATION.to_string(),
        commit.to_string(),
    )]));
    let context_dir = project
        .spec
        .source
        .context_dir
        .clone()
        .unwrap_or_default()
        .trim_matches('/')
        .to_string();
    let dockerfile = project
        .spec
        .build
        .dockerfile
        .clone()
        .unwrap_or_else(|| "Dockerfile".to_string());
    let container = Container {
        name: BUILD_CONTAINER.to_string(),
        image: Some(pods.image.clone()),
        command: Some(vec!["sh".into(), "-c".into(), BUILD_SCRIPT.into()]),
        env: Some(vec![
            env("KAPSA_GIT_URL", project.spec.source.git.url.clone()),
            env("KAPSA_COMMIT", commit),
            env("KAPSA_CONTEXT_DIR", context_dir),
            env("KAPSA_DOCKERFILE", dockerfile),
            env("KAPSA_IMAGE", format!("{repository}:{env_name}")),
            env("KAPSA_CACHE", format!("{repository}:{BUILD_CACHE_TAG}")),
            env("KAPSA_INSECURE", registry.insecure.to_string()),
            env("KAPSA_REGISTRY_SERVER", registry.server.clone()),
            env("DOCKER_CONFIG", "/kapsa/docker"),
            // Rootless BuildKit in a pod without privileges of its own.
            env("BUILDKITD_FLAGS", "--oci-worker-no-process-sandbox"),
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), quantity("500m")),
                ("memory".to_string(), quantity("1Gi")),
            ])),
            limits: Some(BTreeMap::from([
                ("cpu".to_string(), quantity("2")),
                ("memory".to_string(), quantity("4Gi")),
                ("ephemeral-storage".to_string(), quantity("10Gi")),
            ])),
            ..ResourceRequirements::default()
        }),
        // The digest, or on failure the end of the log, for the operator.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            run_as_user: Some(1000),
            run_as_group: Some(1000),
            run_as_non_root: Some(true),
            // Rootless BuildKit maps users with newuidmap (setuid) and
            // needs the syscalls of user namespaces: see docs/builds.md.
            allow_privilege_escalation: Some(true),
            seccomp_profile: Some(SeccompProfile {
                type_: "Unconfined".into(),
                ..SeccompProfile::default()
            }),
            app_armor_profile: Some(k8s_openapi::api::core::v1::AppArmorProfile {
                type_: "Unconfined".into(),
                ..Default::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![
            mount("work", "/work", false),
            mount("buildkit", "/home/user/.local/share/buildkit", false),
            mount("registry", "/kapsa/docker", true),
            mount("git", "/kapsa/git", true),
        ]),
        ..Container::default()
    };
    let empty = |name: &str| Volume {
        name: name.to_string(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    };
    let secret = |name: &str, secret: &str, items: Option<Vec<KeyToPath>>, optional| Volume {
        name: name.to_string(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            items,
            optional: Some(optional),
            default_mode: Some(0o440),
        }),
        ..Volume::default()
    };
    let pod = PodSpec {
        service_account_name: Some(BUILDER_SERVICE_ACCOUNT.to_string()),
        automount_service_account_token: Some(false),
        restart_policy: Some("Never".into()),
        enable_service_links: Some(false),
        node_selector: (!pods.node_selector.is_empty()).then(|| pods.node_selector.clone()),
        tolerations: (!pods.tolerations.is_empty()).then(|| pods.tolerations.clone()),
        security_context: Some(PodSecurityContext {
            fs_group: Some(1000),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: Some(vec![
            empty("work"),
            empty("buildkit"),
            secret(
                "registry",
                crate::resources::project::REGISTRY_SECRET,
                Some(vec![KeyToPath {
                    key: ".dockerconfigjson".into(),
                    path: "config.json".into(),
                    mode: None,
                }]),
                false,
            ),
            secret("git", crate::resources::project::GIT_SECRET, None, true),
        ]),
        ..PodSpec::default()
    };
    Job {
        metadata: meta,
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(build_timeout_seconds(inputs)),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..JobSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::environment::image_repository;
    use crate::resources::environment::test_support::*;
    use kapsa_api::project::BuildStrategy;

    const COMMIT: &str = "3f2a9c1e0b7d4a5f6e8c9d0a1b2c3d4e5f6a7b8c";

    #[test]
    fn build_job_names_fit_a_label() {
        assert_eq!(build_job_name("production", COMMIT), "production-3f2a9c1");
        let long = "preview-".to_string() + &"a".repeat(55);
        let name = build_job_name(&long, COMMIT);
        assert!(name.len() <= 63, "{name}");
        assert!(name.ends_with("-3f2a9c1"), "{name}");
        assert_ne!(name, build_job_name(&(long.clone() + "b"), COMMIT)[..]);
    }

    #[test]
    fn build_job_runs_buildkit_on_the_commit_with_mounted_credentials() {
        let mut p = project();
        p.spec.build.strategy = BuildStrategy::Dockerfile;
        p.spec.build.builder_ref = None;
        p.spec.build.dockerfile = Some("docker/app.Dockerfile".into());
        p.spec.build.timeout = Some("20m".into());
        p.spec.source.context_dir = Some("services/api".into());
        let e = environment();
        let registry: RegistrySpec = serde_json::from_value(serde_json::json!(
            {"provider": "Harbor", "server": "harbor.example.com", "repository": "team/kapsa"}
        ))
        .unwrap();
        let repository = image_repository(&registry, "shop");
        let job = build_job(
            &inputs(&p, &e, None),
            &registry,
            &repository,
            COMMIT,
            &BuildPods {
                image: "buildkit:test".into(),
                ..BuildPods::default()
            },
        );
        let meta = &job.metadata;
        assert_eq!(meta.name.as_deref(), Some("production-3f2a9c1"));
        assert_eq!(meta.namespace.as_deref(), Some("kapsa-build-shop"));
        assert_eq!(meta.owner_references.as_ref().unwrap()[0].kind, "Project");
        assert_eq!(
            meta.annotations.as_ref().unwrap()[BUILD_COMMIT_ANNOTATION],
            COMMIT
        );
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(labels[BUILD_LABEL], DOCKERFILE_BUILD);
        assert_eq!(labels[ENVIRONMENT_UID_LABEL], ENV_UID);
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!(spec.active_deadline_seconds, Some(1200));
        let template = &spec.template;
        assert_eq!(
            template.metadata.as_ref().unwrap().labels.as_ref().unwrap()[BUILD_LABEL],
            DOCKERFILE_BUILD
        );
        let pod = template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("buildkit:test"));
        let vars: BTreeMap<String, String> = c
            .env
            .clone()
            .unwrap()
            .into_iter()
            .map(|v| (v.name, v.value.unwrap_or_default()))
            .collect();
        assert_eq!(vars["KAPSA_COMMIT"], COMMIT);
        assert_eq!(vars["KAPSA_CONTEXT_DIR"], "services/api");
        assert_eq!(vars["KAPSA_DOCKERFILE"], "docker/app.Dockerfile");
        assert_eq!(
            vars["KAPSA_IMAGE"],
            "harbor.example.com/team/kapsa/shop:production"
        );
        assert_eq!(
            vars["KAPSA_CACHE"],
            "harbor.example.com/team/kapsa/shop:kapsa-build-cache"
        );
        // No credential in the spec: only mounted Secrets.
        let text = serde_json::to_string(&job).unwrap();
        assert!(!text.contains("password\":"), "{text}");
        let mounts: Vec<(&str, &str)> = c
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert!(mounts.contains(&("registry", "/kapsa/docker")));
        assert!(mounts.contains(&("git", "/kapsa/git")));
        let volumes = pod.volumes.as_ref().unwrap();
        let secret_of = |name: &str| {
            volumes
                .iter()
                .find(|v| v.name == name)
                .and_then(|v| v.secret.clone())
                .unwrap()
        };
        assert_eq!(
            secret_of("registry").secret_name.as_deref(),
            Some("kapsa-registry")
        );
        assert_eq!(secret_of("git").secret_name.as_deref(), Some("kapsa-git"));
        assert_eq!(secret_of("git").optional, Some(true));
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["memory"].0, "4Gi");
        assert_eq!(
            c.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        assert_eq!(
            c.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        // The script builds exactly the commit and reports the digest.
        let script = &c.command.as_ref().unwrap()[2];
        assert!(script.contains("git fetch -q --depth 1 origin \"$KAPSA_COMMIT\""));
        assert!(script.contains("buildctl-daemonless.sh build"));
        assert!(script.contains("/dev/termination-log"));
        assert_apply_ready(&serde_json::to_value(&job).unwrap(), "batch/v1", "Job");
        // Anywhere, unless the operator places builds.
        assert!(pod.node_selector.is_none() && pod.tolerations.is_none());

        // Without a timeout: 30 minutes. Placed where the operator says.
        p.spec.build.timeout = None;
        let placed = BuildPods {
            node_selector: BTreeMap::from([("node-pool".into(), "builds".into())]),
            tolerations: vec![Toleration {
                key: Some("dedicated".into()),
                operator: Some("Equal".into()),
                value: Some("builds".into()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            }],
            ..BuildPods::default()
        };
        let job = build_job(
            &inputs(&p, &e, None),
            &registry,
            &repository,
            COMMIT,
            &placed,
        );
        let spec = job.spec.unwrap();
        assert_eq!(spec.active_deadline_seconds, Some(1800));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.node_selector, Some(placed.node_selector.clone()));
        assert_eq!(pod.tolerations, Some(placed.tolerations.clone()));
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some(DEFAULT_BUILDKIT_IMAGE)
        );
    }
}

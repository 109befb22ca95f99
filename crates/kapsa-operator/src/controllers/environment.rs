//! Environment reconciler: build (a kpack Image per Environment, or a fixed
//! image), then Deployment, Service and Ingress, then status. A failed build
//! or a missing reference never takes down the release that is serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::conditions::{BUILT, DEPLOYED, READY, TLS_READY, merge_conditions};
use kapsa_api::environment::{EnvironmentStatus, Release};
use kapsa_api::project::{BuildStrategy, BuilderKind};
use kapsa_api::{ConditionStatus, DomainPool, Environment, EnvironmentPhase, Project};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::Value;

use super::{condition, now, transition};
use crate::context::{Context, cached, cached_with};
use crate::error::{Error, Result};
use crate::references::registry_spec;
use crate::resources::environment::{
    APP_CONTAINER, COMMIT_ANNOTATION, EnvironmentInputs, certificate_api_resource, deployment,
    environment_url, image_repository, ingress, kpack_image, kpack_image_api_resource, service,
    tls_certificate_name,
};

/// How many releases `status.history` keeps (the CRD allows at most 10).
pub const HISTORY_LIMIT: usize = 10;

pub async fn reconcile(env: Arc<Environment>, ctx: Arc<Context>) -> Result<Action> {
    if !ctx.stores.ready() {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    tracing::debug!(environment = %env.name_any(), "reconciling");
    let started = Instant::now();
    let result = reconcile_environment(&env, &ctx).await;
    ctx.metrics
        .record_reconcile("environment", result.is_ok(), started.elapsed());
    result
}

pub fn error_policy(env: Arc<Environment>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(environment = %env.name_any(), namespace = ?env.namespace(), %error, "environment reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// What the build step concluded.
enum Build {
    /// An image for `commit` (None for a fixed image) is ready to deploy.
    Ready {
        image: String,
        commit: Option<String>,
    },
    /// Nothing new to deploy yet; the reason goes into the Built condition.
    Pending {
        reason: &'static str,
        message: String,
        failed: bool,
    },
}

async fn reconcile_environment(env: &Environment, ctx: &Context) -> Result<Action> {
    if env.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let generation = env.meta().generation;
    let namespace = env.namespace().unwrap_or_default();
    let before = env.status.clone().unwrap_or_default();
    let mut status = EnvironmentStatus {
        observed_generation: generation,
        ..before.clone()
    };

    // Dereference.
    let Some(project) = cached(&ctx.stores.projects, &env.spec.project, None) else {
        merge_conditions(
            &mut status.conditions,
            [condition(
                READY,
                ConditionStatus::False,
                "ProjectNotFound",
                format!("Project {:?} does not exist", env.spec.project),
                generation,
            )],
        );
        finish(env, ctx, &before, status).await?;
        return Ok(Action::requeue(Duration::from_secs(60)));
    };
    // An Environment serves its Project only from the Project's namespace:
    // anywhere else it could claim the Project's hosts for another tenant.
    let project_namespace = crate::resources::project::namespace_name(&project);
    if project_namespace != namespace {
        merge_conditions(
            &mut status.conditions,
            [condition(
                READY,
                ConditionStatus::False,
                "WrongNamespace",
                format!(
                    "Project {:?} lives in namespace {project_namespace:?}; its Environments must be there too",
                    env.spec.project
                ),
                generation,
            )],
        );
        finish(env, ctx, &before, status).await?;
        return Ok(Action::await_change());
    }
    let project_status = project.status.clone().unwrap_or_default();
    let pool: Option<Arc<DomainPool>> = project_status
        .domain_pool
        .as_deref()
        .and_then(|p| cached(&ctx.stores.pools, p, None));
    let base_domain = project_status.base_domain.clone();

    let current = cached(&ctx.stores.deployments, &env.name_any(), Some(&namespace));

    // Build.
    let build = build(env, &project, &namespace, ctx).await?;
    let (built_condition, to_deploy) = match &build {
        Build::Ready { image, commit } => (
            condition(
                BUILT,
                ConditionStatus::True,
                if commit.is_some() {
                    "BuildSucceeded"
                } else {
                    "FixedImage"
                },
                format!("image {image}"),
                generation,
            ),
            Some((image.clone(), commit.clone())),
        ),
        Build::Pending {
            reason,
            message,
            failed,
        } => (
            condition(
                BUILT,
                if *failed {
                    ConditionStatus::False
                } else {
                    ConditionStatus::Unknown
                },
                reason,
                message.clone(),
                generation,
            ),
            // Keep what Kapsa deployed last, never what the Deployment says
            // now: a person's edit of it is to be reverted, not kept.
            last_good_build(env, &before, current.as_deref(), ctx)
                .or_else(|| before.image.clone().map(|i| (i, before.commit.clone()))),
        ),
    };

    // Deploy: the new image when there is one, else keep the current release.
    let mut deployed_condition = condition(
        DEPLOYED,
        ConditionStatus::False,
        "NothingToDeploy",
        "no image has been built yet",
        generation,
    );
    let mut rolled_out = None;
    if let Some((image, commit)) = &to_deploy {
        let mut pinned = env.clone();
        pinned.spec.commit = commit.clone();
        let inputs = EnvironmentInputs {
            project: &project,
            environment: &pinned,
            pool: pool.as_deref(),
            base_domain: base_domain.as_deref(),
        };
        let desired = deployment(&inputs, image);
        ctx.applier.apply(&desired, current.as_deref()).await?;
        let svc = service(&inputs);
        ctx.applier
            .apply(
                &svc,
                cached(&ctx.stores.services, &svc.name_any(), Some(&namespace)).as_deref(),
            )
            .await?;
        if let Some(ing) = ingress(&inputs) {
            ctx.applier
                .apply(
                    &ing,
                    cached(&ctx.stores.ingresses, &ing.name_any(), Some(&namespace)).as_deref(),
                )
                .await?;
        }
        deployed_condition = match current.as_deref() {
            Some(d) if rollout_complete(d, image) => {
                rolled_out = Some((image.clone(), commit.clone()));
                condition(
                    DEPLOYED,
                    ConditionStatus::True,
                    "RolledOut",
                    format!("{image} is available"),
                    generation,
                )
            }
            _ => condition(
                DEPLOYED,
                ConditionStatus::False,
                "RollingOut",
                format!("rolling out {image}; the previous release serves until it is ready"),
                generation,
            ),
        };
        status.url = environment_url(&inputs);
    }

    // TLS.
    let tls_condition = tls_condition(
        env,
        &project,
        pool.as_deref(),
        base_domain.as_deref(),
        ctx,
        generation,
    );

    // Status.
    if let Some((image, commit)) = rolled_out
        && status.image.as_deref() != Some(image.as_str())
    {
        status.history.insert(
            0,
            Release {
                commit: commit.clone(),
                image: image.clone(),
                deployed_at: Time(now()),
            },
        );
        status.history.truncate(HISTORY_LIMIT);
        status.image = Some(image);
        status.commit = commit;
    }
    let serving = deployed_condition.status == ConditionStatus::True;
    let tls_ok =
        tls_condition.status == ConditionStatus::True || tls_condition.reason == "NoClusterIssuer";
    let build_failed = matches!(build, Build::Pending { failed: true, .. });
    status.phase = Some(phase(
        serving,
        tls_ok,
        to_deploy.is_some(),
        build_failed,
        env.spec.commit.is_some() || env.spec.image.is_some(),
    ));
    // Ready means "serves": during a rolling update the previous release
    // keeps serving (maxUnavailable 0), so Ready stays True while the phase
    // says Deploying.
    let previous_serves = status.image.is_some() && current.as_deref().is_some_and(available);
    let ready = if tls_ok && (serving || previous_serves) {
        condition(
            READY,
            ConditionStatus::True,
            "Serving",
            format!(
                "{} serves {}",
                status.url.clone().unwrap_or_default(),
                status.image.clone().unwrap_or_default()
            ),
            generation,
        )
    } else {
        condition(
            READY,
            ConditionStatus::False,
            "NotServing",
            format!(
                "phase {:?}",
                status.phase.unwrap_or(EnvironmentPhase::Pending)
            ),
            generation,
        )
    };
    merge_conditions(
        &mut status.conditions,
        [built_condition, deployed_condition, tls_condition, ready],
    );
    finish(env, ctx, &before, status).await?;
    Ok(Action::requeue(Duration::from_secs(600)))
}

/// The phase, from what serves and what is under way. A build or a failed
/// build behind a release that serves does not change it: the conditions
/// tell that story.
fn phase(
    serving: bool,
    tls_ok: bool,
    deploying: bool,
    build_failed: bool,
    source_known: bool,
) -> EnvironmentPhase {
    match (serving, tls_ok, deploying, build_failed, source_known) {
        (true, true, ..) => EnvironmentPhase::Ready,
        (true, false, ..) => EnvironmentPhase::Deploying,
        (false, _, true, ..) => EnvironmentPhase::Deploying,
        (false, _, false, true, _) => EnvironmentPhase::Failed,
        (false, _, false, false, true) => EnvironmentPhase::Building,
        (false, _, false, false, false) => EnvironmentPhase::Pending,
    }
}

/// The image and commit the cached Deployment runs.
fn deployed_release(d: &Deployment) -> (Option<String>, Option<String>) {
    let template = d.spec.as_ref().map(|s| &s.template);
    let image = template
        .and_then(|t| t.spec.as_ref())
        .and_then(|s| s.containers.iter().find(|c| c.name == APP_CONTAINER))
        .and_then(|c| c.image.clone());
    let commit = template
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(COMMIT_ANNOTATION).cloned());
    (image, commit)
}

/// The last image kpack built successfully for this Environment (kpack keeps
/// it in `status.latestImage` while later builds run or fail), with its
/// commit when Kapsa knows it.
fn last_good_build(
    env: &Environment,
    status: &EnvironmentStatus,
    deployment: Option<&Deployment>,
    ctx: &Context,
) -> Option<(String, Option<String>)> {
    if env.spec.image.is_some() {
        return None;
    }
    let built = cached_with(
        &ctx.stores.images,
        &env.name_any(),
        env.namespace().as_deref(),
        kpack_image_api_resource(),
    )?;
    let image = built.data["status"]["latestImage"].as_str()?.to_string();
    let commit = status
        .history
        .iter()
        .find(|r| r.image == image)
        .and_then(|r| r.commit.clone())
        .or_else(|| {
            deployment
                .map(deployed_release)
                .filter(|(i, _)| i.as_deref() == Some(image.as_str()))
                .and_then(|(_, c)| c)
        });
    Some((image, commit))
}

/// Whether the Deployment has as many available replicas as it wants.
fn available(d: &Deployment) -> bool {
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    d.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
        >= wanted
}

/// Whether the Deployment has fully rolled out `image`: observed, updated and available.
fn rollout_complete(d: &Deployment, image: &str) -> bool {
    let (running, _) = deployed_release(d);
    let wanted = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(st) = d.status.as_ref() else {
        return false;
    };
    running.as_deref() == Some(image)
        && st.observed_generation >= d.meta().generation
        && st.updated_replicas.unwrap_or(0) >= wanted
        && st.available_replicas.unwrap_or(0) >= wanted
        && st.replicas.unwrap_or(0) == st.updated_replicas.unwrap_or(0)
}

fn builder_resource(kind: &BuilderKind) -> ApiResource {
    let kind = match kind {
        BuilderKind::ClusterBuilder => "ClusterBuilder",
        BuilderKind::Builder => "Builder",
    };
    ApiResource::from_gvk(&GroupVersionKind::gvk("kpack.io", "v1alpha2", kind))
}

async fn build(
    env: &Environment,
    project: &Project,
    namespace: &str,
    ctx: &Context,
) -> Result<Build> {
    if let Some(image) = &env.spec.image {
        return Ok(Build::Ready {
            image: image.clone(),
            commit: None,
        });
    }
    let Some(commit) = env.spec.commit.clone() else {
        return Ok(Build::Pending {
            reason: "WaitingForCommit",
            message: "the branch's head is not known yet".into(),
            failed: false,
        });
    };
    if project.spec.build.strategy == BuildStrategy::Dockerfile {
        return Ok(Build::Pending {
            reason: "StrategyNotSupported",
            message: "Dockerfile builds are not supported by this version of Kapsa yet; use Buildpacks or a fixed image".into(),
            failed: true,
        });
    }
    // Only the registry's address matters here; its credentials are the
    // Project's business (copied into the namespace for the builder).
    let (registry, _) = match registry_spec(&ctx.client, project, namespace).await? {
        Ok(found) => found,
        Err(problem) => {
            return Ok(Build::Pending {
                reason: problem.reason,
                message: problem.message,
                failed: true,
            });
        }
    };
    let (builder_kind, builder_name) = project
        .spec
        .build
        .builder_ref
        .as_ref()
        .map(|b| (b.kind, b.name.clone()))
        .unwrap_or((
            BuilderKind::ClusterBuilder,
            kapsa_api::project::DEFAULT_BUILDER_NAME.to_string(),
        ));
    let current = cached_with(
        &ctx.stores.images,
        &env.name_any(),
        Some(namespace),
        kpack_image_api_resource(),
    );
    let builds_commit = current.as_ref().is_some_and(|image| {
        image.data["spec"]["source"]["git"]["revision"].as_str() == Some(commit.as_str())
    });
    // The builder is looked up only when a build is due, not on every reconcile.
    if !builds_commit
        && let Some(problem) = builder_problem(ctx, namespace, builder_kind, &builder_name).await?
    {
        return Ok(problem);
    }

    let inputs = EnvironmentInputs {
        project,
        environment: env,
        pool: None,
        base_domain: None,
    };
    let desired = kpack_image(
        &inputs,
        &image_repository(&registry, &project.name_any()),
        &commit,
    );
    let wrote = ctx
        .applier
        .apply_dynamic(&kpack_image_api_resource(), &desired, current.as_deref())
        .await?;
    if wrote {
        ctx.event(
            env,
            false,
            "BuildStarted",
            format!("building commit {commit}"),
        )
        .await;
        return Ok(Build::Pending {
            reason: "Building",
            message: format!("building commit {commit}"),
            failed: false,
        });
    }
    Ok(image_build_state(current.as_deref(), &commit))
}

/// Why the named kpack builder cannot build, if it cannot.
async fn builder_problem(
    ctx: &Context,
    namespace: &str,
    kind: BuilderKind,
    name: &str,
) -> Result<Option<Build>> {
    let resource = builder_resource(&kind);
    let builders = match kind {
        BuilderKind::ClusterBuilder => {
            Api::<DynamicObject>::all_with(ctx.client.clone(), &resource)
        }
        BuilderKind::Builder => {
            Api::<DynamicObject>::namespaced_with(ctx.client.clone(), namespace, &resource)
        }
    };
    Ok(match builders.get_opt(name).await {
        Ok(Some(_)) => None,
        Ok(None) => Some(Build::Pending {
            reason: "BuilderNotFound",
            message: format!("{kind:?} {name:?} does not exist"),
            failed: true,
        }),
        Err(kube::Error::Api(s)) if s.code == 404 => Some(Build::Pending {
            reason: "KpackNotInstalled",
            message: "the kpack.io API is not installed in this cluster".into(),
            failed: true,
        }),
        Err(e) => return Err(e.into()),
    })
}

/// Reads a kpack Image's status the way kpack means it: the build for the
/// current generation is done when `observedGeneration` caught up and
/// `Ready` is no longer Unknown.
fn image_build_state(image: Option<&DynamicObject>, commit: &str) -> Build {
    let Some(image) = image else {
        return Build::Pending {
            reason: "Building",
            message: format!("building commit {commit}"),
            failed: false,
        };
    };
    let revision = image.data["spec"]["source"]["git"]["revision"].as_str();
    let observed = image.data["status"]["observedGeneration"].as_i64();
    let ready = image.data["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .cloned()
        .unwrap_or(Value::Null);
    if revision != Some(commit) || observed != image.metadata.generation {
        return Build::Pending {
            reason: "Building",
            message: format!("building commit {commit}"),
            failed: false,
        };
    }
    match ready["status"].as_str() {
        Some("True") => match image.data["status"]["latestImage"].as_str() {
            Some(latest) => Build::Ready {
                image: latest.to_string(),
                commit: Some(commit.to_string()),
            },
            None => Build::Pending {
                reason: "Building",
                message: "the build reports no image".into(),
                failed: false,
            },
        },
        Some("False") => Build::Pending {
            reason: "BuildFailed",
            message: format!(
                "the build of commit {commit} failed: {}; the previous release keeps serving",
                ready["message"].as_str().unwrap_or("no details")
            ),
            failed: true,
        },
        _ => Build::Pending {
            reason: "Building",
            message: format!("building commit {commit}"),
            failed: false,
        },
    }
}

fn tls_condition(
    env: &Environment,
    project: &Project,
    pool: Option<&DomainPool>,
    base_domain: Option<&str>,
    ctx: &Context,
    generation: Option<i64>,
) -> kapsa_api::Condition {
    let namespace = env.namespace().unwrap_or_default();
    let Some(pool) = pool else {
        return condition(
            TLS_READY,
            ConditionStatus::False,
            "NoDomain",
            "the project has no host yet",
            generation,
        );
    };
    if pool.spec.cluster_issuer_ref.is_none() {
        return condition(
            TLS_READY,
            ConditionStatus::False,
            "NoClusterIssuer",
            "the DomainPool names no ClusterIssuer: served over plain HTTP",
            generation,
        );
    }
    let inputs = EnvironmentInputs {
        project,
        environment: env,
        pool: Some(pool),
        base_domain,
    };
    // The same decision that shaped the Ingress names the Certificate.
    let Some(certificate_name) = tls_certificate_name(&inputs) else {
        return condition(
            TLS_READY,
            ConditionStatus::False,
            "NoHost",
            "the environment has no valid host",
            generation,
        );
    };
    let cert = cached_with(
        &ctx.stores.certificates,
        &certificate_name,
        Some(&namespace),
        certificate_api_resource(),
    );
    let ready = cert.as_ref().and_then(|c| {
        c.data["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|x| x["type"] == "Ready")
            .cloned()
    });
    match ready {
        Some(c) if c["status"] == "True" => condition(
            TLS_READY,
            ConditionStatus::True,
            "CertificateReady",
            format!("Certificate {certificate_name} is ready"),
            generation,
        ),
        Some(c) => condition(
            TLS_READY,
            ConditionStatus::False,
            "CertificateNotReady",
            format!(
                "Certificate {certificate_name}: {}",
                c["message"].as_str().unwrap_or("not ready")
            ),
            generation,
        ),
        None => condition(
            TLS_READY,
            ConditionStatus::False,
            "CertificatePending",
            format!("waiting for Certificate {certificate_name}"),
            generation,
        ),
    }
}

async fn finish(
    env: &Environment,
    ctx: &Context,
    before: &EnvironmentStatus,
    after: EnvironmentStatus,
) -> Result<()> {
    if *before == after {
        return Ok(());
    }
    if !ctx
        .applier
        .apply_status(env, &serde_json::to_value(&after)?)
        .await?
    {
        return Ok(());
    }
    for type_ in [BUILT, DEPLOYED, TLS_READY, READY] {
        if let Some((warning, c)) = transition(&before.conditions, &after.conditions, type_) {
            ctx.event(env, warning, &c.reason, c.message.clone()).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn image(revision: &str, generation: i64, observed: i64, ready: &str) -> DynamicObject {
        let mut img = DynamicObject::new("production", &kpack_image_api_resource()).data(json!({
            "spec": {"source": {"git": {"revision": revision}}},
            "status": {"observedGeneration": observed, "latestImage": "r/shop@sha256:1",
                "conditions": [{"type": "Ready", "status": ready, "message": "boom"}]}
        }));
        img.metadata.generation = Some(generation);
        img
    }

    #[test]
    fn phase_follows_what_serves() {
        use EnvironmentPhase::*;
        assert_eq!(phase(true, true, true, false, true), Ready);
        assert_eq!(
            phase(true, true, false, true, true),
            Ready,
            "a failed build behind a serving release"
        );
        assert_eq!(
            phase(true, false, true, false, true),
            Deploying,
            "waiting for TLS"
        );
        assert_eq!(
            phase(false, true, true, false, true),
            Deploying,
            "rolling out"
        );
        assert_eq!(
            phase(false, true, false, true, true),
            Failed,
            "nothing serves and the build failed"
        );
        assert_eq!(phase(false, true, false, false, true), Building);
        assert_eq!(phase(false, true, false, false, false), Pending);
    }

    #[test]
    fn a_build_is_done_only_for_the_current_generation_and_revision() {
        assert!(matches!(
            image_build_state(Some(&image("c1", 2, 2, "True")), "c1"),
            Build::Ready { .. }
        ));
        assert!(matches!(
            image_build_state(Some(&image("c1", 2, 1, "True")), "c1"),
            Build::Pending { failed: false, .. }
        ));
        assert!(matches!(
            image_build_state(Some(&image("c0", 2, 2, "True")), "c1"),
            Build::Pending { failed: false, .. }
        ));
        assert!(matches!(
            image_build_state(Some(&image("c1", 2, 2, "Unknown")), "c1"),
            Build::Pending { failed: false, .. }
        ));
        assert!(matches!(
            image_build_state(None, "c1"),
            Build::Pending { failed: false, .. }
        ));
    }

    #[test]
    fn a_failed_build_says_why_and_keeps_the_release() {
        match image_build_state(Some(&image("c1", 3, 3, "False")), "c1") {
            Build::Pending {
                reason,
                message,
                failed,
            } => {
                assert_eq!(reason, "BuildFailed");
                assert!(failed);
                assert!(
                    message.contains("boom") && message.contains("previous release keeps serving")
                );
            }
            Build::Ready { .. } => panic!("a failed build is not ready"),
        }
    }
}

//! Step 2 of the Environment reconcile: a pure function from what the caches
//! hold ([`EnvironmentWorld`]) to what should be: the children to apply, the
//! ones to delete, the status (conditions and phase) and the Events.
//!
//! A failed build, a missing reference or a stalled rollout never takes down
//! the release that serves: what is not wanted any more is deleted only when
//! the plan knows what replaces it (an Ingress for a host the Project lost, a
//! kpack Image after a switch to a fixed image).

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kapsa_api::conditions::{
    BUILT, DEPLOYED, MONITORED, PINNED, READY, REFERENCES_RESOLVED, ROUTED, TLS_READY,
    find_condition, merge_conditions,
};
use kapsa_api::environment::{EnvironmentStatus, Release};
use kapsa_api::project::BuildStrategy;
use kapsa_api::{Condition, ConditionStatus, Environment, EnvironmentPhase};
use kube::api::DynamicObject;
use kube::{Resource, ResourceExt};
use serde_json::Value;

use super::dereference::{BuilderState, EnvironmentWorld, JobOutcome};
use crate::children::{Child, ChildKey, Deletion, Observed, prune};
use crate::controllers::transitions;
use crate::resources::environment::{
    APP_CONTAINER, BUILD_HISTORY_LIMIT, COMMIT_ANNOTATION, EnvironmentInputs, build_job,
    certificate_api_resource, deployment, environment_url, gateway_listener, gateway_routing,
    host_certificate, http_route, http_route_api_resource, image_repository, ingress, kpack_image,
    kpack_image_api_resource, listener_set_name, service, service_monitor,
    service_monitor_api_resource, tls_certificate_name,
};
use crate::status::PlannedEvent;

/// How many releases `status.history` keeps (the CRD allows at most 10).
pub const HISTORY_LIMIT: usize = 10;
use crate::controllers::RESYNC;
/// How long the Ingress keeps serving after a switch to Gateway routing once
/// the gateway has accepted the HTTPRoute (`Routed` turned True): gateway
/// controllers write `Accepted` before their data plane routes (Traefik
/// applies its configuration up to 2 s later), and a request in between
/// would find no route.
pub const ROUTE_HANDOVER: Duration = Duration::from_secs(5);

/// What the Environment reconcile does next.
#[derive(Clone, Debug)]
pub struct EnvironmentPlan {
    /// Children to server-side apply (each written only if it changes something).
    pub apply: Vec<Child>,
    /// Children Kapsa made that are no longer wanted.
    pub delete: Vec<Deletion>,
    /// The children as the caches showed them (computed once: the apply
    /// step compares with them).
    pub observed: Vec<Observed>,
    pub status: EnvironmentStatus,
    /// Published only if the status write happens.
    pub events: Vec<PlannedEvent>,
    pub requeue: Duration,
}

/// What the build step concluded.
#[derive(Clone, Debug, PartialEq)]
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

fn pending(reason: &'static str, message: impl Into<String>, failed: bool) -> Build {
    Build::Pending {
        reason,
        message: message.into(),
        failed,
    }
}

/// The plan for one Environment.
pub fn plan(world: &EnvironmentWorld) -> EnvironmentPlan {
    let env = world.environment.as_ref();
    let generation = env.meta().generation;
    let namespace = env.namespace().unwrap_or_default();
    let before = env.status.clone().unwrap_or_default();
    let mut status = EnvironmentStatus {
        observed_generation: generation,
        ..before.clone()
    };
    let now = &world.now;
    let condition = |type_: &str, status: ConditionStatus, reason: &str, message: String| {
        Condition::new(type_, status, reason, message, generation, now.clone())
    };
    let refused = |mut status: EnvironmentStatus, reason: &str, message: String, requeue| {
        // Nothing is done for it: that needs a person's attention.
        status.phase = Some(EnvironmentPhase::Failed);
        merge_conditions(
            &mut status.conditions,
            [condition(READY, ConditionStatus::False, reason, message)],
        );
        EnvironmentPlan {
            apply: Vec::new(),
            delete: Vec::new(),
            observed: Vec::new(),
            events: events(&before, &status),
            status,
            requeue,
        }
    };

    let Some(project) = world.project.as_deref() else {
        return refused(
            status,
            "ProjectNotFound",
            format!("Project {:?} does not exist", env.spec.project),
            Duration::from_secs(60),
        );
    };
    // An Environment serves its Project only from the Project's namespace:
    // anywhere else it could claim the Project's hosts for another tenant.
    let project_namespace = crate::resources::project::namespace_name(project);
    if project_namespace != namespace {
        return refused(
            status,
            "WrongNamespace",
            format!(
                "Project {:?} lives in namespace {project_namespace:?}; its Environments must be there too",
                env.spec.project
            ),
            RESYNC,
        );
    }
    let base_domain = project.status.as_ref().and_then(|s| s.base_domain.clone());
    let pool = world.pool.as_deref();
    let mut apply = Vec::new();
    // Children the plan leaves as they are (neither applied nor pruned).
    let mut keep: Vec<ChildKey> = Vec::new();
    let observed = world.observed();
    let observed_key = |kind: &str| {
        observed
            .iter()
            .find(|o| o.key.kind == kind)
            .map(|o| o.key.clone())
    };

    // Build.
    let build = match build(world, project) {
        (build, Some(image)) => {
            apply.push(image);
            build
        }
        (build, None) => {
            // A build that cannot start keeps the last Image (and its
            // latestImage); a fixed image or another strategy needs none.
            let needs_no_image = env.spec.image.is_some()
                || project.spec.build.strategy != BuildStrategy::Buildpacks;
            if !needs_no_image {
                keep.extend(
                    world
                        .image
                        .as_deref()
                        .map(|i| Observed::of(&kpack_image_api_resource(), i).key),
                );
            }
            build
        }
    };
    keep.extend(kept_build_jobs(
        world,
        env.spec.commit.as_deref().or(world.branch_head.as_deref()),
    ));
    let built_condition = match &build {
        Build::Ready { image, commit } => condition(
            BUILT,
            ConditionStatus::True,
            if commit.is_some() {
                "BuildSucceeded"
            } else {
                "FixedImage"
            },
            format!("image {image}"),
        ),
        Build::Pending {
            reason,
            message,
            failed,
        } => condition(
            BUILT,
            if *failed {
                ConditionStatus::False
            } else {
                ConditionStatus::Unknown
            },
            reason,
            message.clone(),
        ),
    };
    let built = match &build {
        Build::Ready { image, commit } => Some((image.clone(), commit.clone())),
        // Keep what Kapsa deployed last, never what the Deployment says
        // now: a person's edit of it is to be reverted, not kept.
        // A first release is never started from a build whose commit is
        // unknown (after a restart, before the first poll): it would roll
        // out again, with its commit, a moment later.
        Build::Pending { .. } => last_good_build(world, &before)
            .filter(|(_, commit)| {
                commit.is_some() || before.image.is_some() || world.deployment.is_some()
            })
            .or_else(|| before.image.clone().map(|i| (i, before.commit.clone()))),
    };
    // A pin holds a release back: it runs instead of the newest build,
    // which waits (builds go on).
    let (to_deploy, pinned_condition) = match pinned_release(env, &before) {
        None => (built, None),
        Some(Ok(held)) => {
            let message = pin_message(&held, &build);
            (
                Some((held.image, held.commit)),
                Some(condition(PINNED, ConditionStatus::True, "Pinned", message)),
            )
        }
        // A pin that names no known release changes nothing that runs.
        Some(Err(message)) => (
            before
                .image
                .clone()
                .map(|i| (i, before.commit.clone()))
                .or(built),
            Some(condition(
                PINNED,
                ConditionStatus::False,
                "ReleaseNotFound",
                message,
            )),
        ),
    };

    // Deploy: the new image when there is one, else keep the current release.
    let current = world.deployment.as_deref();
    let mut deployed_condition = condition(
        DEPLOYED,
        ConditionStatus::False,
        "NothingToDeploy",
        "no image has been built yet".into(),
    );
    let mut rolled_out = None;
    let mut rollout_failed = false;
    if let Some((image, commit)) = &to_deploy {
        let mut pinned = env.clone();
        pinned.spec.commit = commit.clone();
        let inputs = EnvironmentInputs {
            project,
            environment: &pinned,
            pool,
            base_domain: base_domain.as_deref(),
        };
        apply.push(Child::typed(&deployment(&inputs, image)));
        apply.push(Child::typed(&service(&inputs)));
        if let Some(ing) = ingress(&inputs) {
            apply.push(Child::typed(&ing));
        }
        if gateway_routing(&inputs) {
            if world.gateway_installed {
                if let Some(route) = http_route(&inputs) {
                    apply.push(Child::dynamic(http_route_api_resource(), route));
                }
            } else {
                // Nothing replaces the Ingress yet: it keeps serving.
                keep.extend(observed_key("networking.k8s.io/Ingress"));
            }
            if world.cert_manager_installed
                && let Some(cert) = host_certificate(&inputs)
            {
                apply.push(Child::dynamic(certificate_api_resource(), cert));
            }
        }
        if world.monitoring_installed
            && let Some(monitor) = service_monitor(&inputs)
        {
            apply.push(Child::dynamic(service_monitor_api_resource(), monitor));
        }
        // Without its Service (still being created, or deleted by hand and
        // being made again) a release serves nothing yet.
        let service_exists = world.service.is_some();
        deployed_condition = match current {
            Some(d) if rollout_complete(d, image) && service_exists => {
                rolled_out = Some((image.clone(), commit.clone()));
                condition(
                    DEPLOYED,
                    ConditionStatus::True,
                    "RolledOut",
                    format!("{image} is available"),
                )
            }
            Some(d) if progress_deadline_exceeded(d, image) => {
                rollout_failed = true;
                condition(
                    DEPLOYED,
                    ConditionStatus::False,
                    "ProgressDeadlineExceeded",
                    format!(
                        "the rollout of {image} made no progress within {}s; the previous release keeps serving",
                        d.spec
                            .as_ref()
                            .and_then(|s| s.progress_deadline_seconds)
                            .unwrap_or(600)
                    ),
                )
            }
            _ => condition(
                DEPLOYED,
                ConditionStatus::False,
                "RollingOut",
                format!("rolling out {image}; the previous release serves until it is ready"),
            ),
        };
        status.url = environment_url(&inputs);
    } else {
        // A first release on its way (nothing runs yet) gets its Service
        // while the image builds: it does not depend on the image, and
        // kube-apiserver allocates cluster IPs one Service at a time, so a
        // burst of new Environments would otherwise queue there after their
        // builds. (Its creation does not hold this reconcile: see
        // `Applier::create_in_background`.)
        let first_build = matches!(
            build,
            Build::Pending {
                reason: "Building",
                ..
            }
        );
        if current.is_none() && first_build {
            let inputs = EnvironmentInputs {
                project,
                environment: env,
                pool,
                base_domain: base_domain.as_deref(),
            };
            apply.push(Child::typed(&service(&inputs)));
        }
        // Nothing to deploy yet: whatever runs stays.
        for kind in [
            "apps/Deployment",
            "/Service",
            "networking.k8s.io/Ingress",
            "monitoring.coreos.com/ServiceMonitor",
            "gateway.networking.k8s.io/HTTPRoute",
            "cert-manager.io/Certificate",
        ] {
            keep.extend(observed_key(kind));
        }
    }
    let monitored_condition = project.spec.runtime.metrics.as_ref().map(|metrics| {
        if !world.monitoring_installed {
            condition(
                MONITORED,
                ConditionStatus::False,
                "PrometheusOperatorNotInstalled",
                "runtime.metrics is set, but the cluster does not serve monitoring.coreos.com/v1 ServiceMonitors; install the Prometheus Operator's CRDs (the operator picks them up without a restart of its own) or scrape the Service's metrics port another way".into(),
            )
        } else if to_deploy.is_some() {
            condition(
                MONITORED,
                ConditionStatus::True,
                "ServiceMonitorApplied",
                format!(
                    "ServiceMonitor {:?} scrapes port {:?} ({}) of Service {:?}",
                    env.name_any(),
                    crate::resources::environment::METRICS_PORT_NAME,
                    metrics.path,
                    env.name_any()
                ),
            )
        } else {
            condition(
                MONITORED,
                ConditionStatus::Unknown,
                "NothingToDeploy",
                "the ServiceMonitor comes with the first release".into(),
            )
        }
    });

    let tls_condition = tls_condition(world, project, base_domain.as_deref(), &condition);
    let routed_condition = routed_condition(world, project, base_domain.as_deref(), &condition);
    let routed_ok = routed_condition
        .as_ref()
        .is_none_or(|c| c.status == ConditionStatus::True);
    // After a switch to Gateway routing the Ingress serves until the
    // gateway has accepted the route that replaces it (and so the app
    // still serves meanwhile).
    let ingress_serves = !routed_ok && observed_key("networking.k8s.io/Ingress").is_some();
    if ingress_serves {
        keep.extend(observed_key("networking.k8s.io/Ingress"));
    }
    let routed_ok = routed_ok || ingress_serves;
    let references_condition = if world.missing_references.is_empty() {
        condition(
            REFERENCES_RESOLVED,
            ConditionStatus::True,
            "Found",
            "every configMapRef and secretRef exists".into(),
        )
    } else {
        condition(
            REFERENCES_RESOLVED,
            ConditionStatus::False,
            "ReferenceNotFound",
            format!(
                "{} not found in namespace {namespace:?}; the app's pods cannot start without them",
                world.missing_references.join(", ")
            ),
        )
    };

    // Status.
    // A new release: a new image, or the same image for a new commit (a
    // commit that changes nothing the build sees).
    if let Some((image, commit)) = rolled_out
        && (status.image.as_deref() != Some(image.as_str()) || status.commit != commit)
    {
        let number = next_release_number(&status.history);
        status.history.insert(
            0,
            Release {
                number: Some(number),
                commit: commit.clone(),
                image: image.clone(),
                deployed_at: now.clone(),
            },
        );
        // The oldest release goes, never the one a pin holds.
        let held = env.spec.pin.as_ref().and_then(|p| p.release);
        while status.history.len() > HISTORY_LIMIT {
            match status
                .history
                .iter()
                .rposition(|r| held.is_none() || r.number != held)
            {
                Some(oldest) => status.history.remove(oldest),
                None => break,
            };
        }
        status.image = Some(image);
        status.commit = commit;
    }
    let serving = deployed_condition.status == ConditionStatus::True;
    let tls_ok = (tls_condition.status == ConditionStatus::True
        || tls_condition.reason == "NoClusterIssuer")
        && routed_ok;
    // Running but unreachable (no pool, no host: a host conflict, a pool
    // removed) is a failure to be looked at, not a rollout under way.
    let unrouted = matches!(tls_condition.reason.as_str(), "NoDomain" | "NoHost");
    let build_failed = matches!(build, Build::Pending { failed: true, .. });
    status.phase = Some(if serving && unrouted {
        EnvironmentPhase::Failed
    } else {
        phase(
            serving,
            tls_ok,
            to_deploy.is_some() && !rollout_failed,
            build_failed || rollout_failed,
            env.spec.commit.is_some() || world.branch_head.is_some() || env.spec.image.is_some(),
        )
    });
    // Ready means "serves": during a rolling update the previous release
    // keeps serving (maxUnavailable 0), so Ready stays True while the phase
    // says Deploying.
    let previous_serves =
        status.image.is_some() && current.is_some_and(available) && world.service.is_some();
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
        )
    } else {
        condition(
            READY,
            ConditionStatus::False,
            "NotServing",
            format!(
                "phase {:?}{}",
                status.phase.unwrap_or(EnvironmentPhase::Pending),
                match &routed_condition {
                    _ if unrouted => format!(": {}", tls_condition.message),
                    Some(routed) if !routed_ok => format!(": {}", routed.message),
                    _ => String::new(),
                }
            ),
        )
    };
    merge_conditions(
        &mut status.conditions,
        [
            built_condition,
            deployed_condition,
            tls_condition,
            references_condition,
            ready,
        ],
    );
    for (type_, optional) in [
        (PINNED, pinned_condition),
        (MONITORED, monitored_condition),
        (ROUTED, routed_condition),
    ] {
        match optional {
            Some(condition) => {
                merge_conditions(&mut status.conditions, [condition]);
            }
            None => status.conditions.retain(|c| c.type_ != type_),
        }
    }
    let mut requeue = RESYNC;
    if let Some(held) = routed_for(&status, &world.now)
        && held < ROUTE_HANDOVER
        && let Some(ingress) = observed_key("networking.k8s.io/Ingress")
    {
        keep.push(ingress);
        requeue = ROUTE_HANDOVER - held + Duration::from_millis(100);
    }
    let delete = prune(&observed, &apply, &keep, &env.uid().unwrap_or_default());
    EnvironmentPlan {
        apply,
        delete,
        observed,
        events: events(&before, &status),
        status,
        requeue,
    }
}

/// How long `Routed` has been True (as of `now`), if it is.
fn routed_for(
    status: &EnvironmentStatus,
    now: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Time,
) -> Option<Duration> {
    let routed = status
        .conditions
        .iter()
        .find(|c| c.type_ == ROUTED && c.status == ConditionStatus::True)?;
    Some(
        Duration::try_from(now.0.duration_since(routed.last_transition_time.0)).unwrap_or_default(),
    )
}

/// Events for the status change: problems and milestones of each
/// condition, and the start of a build.
fn events(before: &EnvironmentStatus, after: &EnvironmentStatus) -> Vec<PlannedEvent> {
    let mut events = transitions(
        &before.conditions,
        &after.conditions,
        &[
            BUILT,
            DEPLOYED,
            TLS_READY,
            REFERENCES_RESOLVED,
            READY,
            PINNED,
            MONITORED,
            ROUTED,
        ],
    );
    if find_condition(&before.conditions, PINNED).is_some()
        && find_condition(&after.conditions, PINNED).is_none()
    {
        events.push(PlannedEvent::normal(
            "Unpinned",
            "spec.pin was removed: the newest build rolls out",
        ));
    }
    let old = find_condition(&before.conditions, BUILT);
    if let Some(new) = find_condition(&after.conditions, BUILT)
        && new.reason == "Building"
        && new.message.starts_with("building commit")
        && old.is_none_or(|old| old.reason != new.reason || old.message != new.message)
    {
        events.push(PlannedEvent::normal("BuildStarted", new.message.clone()));
    }
    events
}

/// The build: what it concluded, and the kpack Image to apply (if any).
fn build(world: &EnvironmentWorld, project: &kapsa_api::Project) -> (Build, Option<Child>) {
    let env = world.environment.as_ref();
    if let Some(image) = &env.spec.image {
        return (
            Build::Ready {
                image: image.clone(),
                commit: None,
            },
            None,
        );
    }
    let Some(commit) = env.spec.commit.clone().or(world.branch_head.clone()) else {
        return (
            pending(
                "WaitingForCommit",
                "the branch's head is not known yet",
                false,
            ),
            None,
        );
    };
    let registry = match &world.registry {
        Ok(r) => &r.spec,
        Err(problem) => return (pending(problem.reason, problem.message.clone(), true), None),
    };
    if project.spec.build.strategy == BuildStrategy::Dockerfile {
        return dockerfile_build(world, project, registry, &commit);
    }
    let current = world.image.as_deref();
    let builds_commit = current.is_some_and(|image| {
        image.data["spec"]["source"]["git"]["revision"].as_str() == Some(commit.as_str())
    });
    // A missing builder matters only when a build is due.
    if !builds_commit {
        let (kind, name) = super::dereference::builder_ref(project);
        match world.builder {
            BuilderState::Present => {}
            BuilderState::NotFound => {
                return (
                    pending(
                        "BuilderNotFound",
                        format!("{kind:?} {name:?} does not exist"),
                        true,
                    ),
                    None,
                );
            }
            BuilderState::KpackNotInstalled => {
                return (
                    pending(
                        "KpackNotInstalled",
                        "the cluster does not serve the kpack.io API; install kpack (the operator starts watching it once it is served)",
                        true,
                    ),
                    None,
                );
            }
        }
    }
    if !world.build_namespace_exists {
        return (waiting_for_build_namespace(project), None);
    }
    let inputs = EnvironmentInputs {
        project,
        environment: env,
        pool: None,
        base_domain: None,
    };
    let desired = kpack_image(
        &inputs,
        &image_repository(registry, &project.name_any()),
        &commit,
    );
    let state = if builds_commit {
        image_build_state(current, &commit)
    } else {
        pending("Building", format!("building commit {commit}"), false)
    };
    (
        state,
        Some(Child::dynamic(kpack_image_api_resource(), desired)),
    )
}

/// Builds wait for the build namespace the Project makes.
fn waiting_for_build_namespace(project: &kapsa_api::Project) -> Build {
    pending(
        "WaitingForBuildNamespace",
        format!(
            "the build namespace {:?} does not exist yet (the Project makes it)",
            crate::resources::project::build_namespace_name(project)
        ),
        false,
    )
}

/// A Dockerfile build: the Job for `commit` (made when missing), and what
/// it concluded.
fn dockerfile_build(
    world: &EnvironmentWorld,
    project: &kapsa_api::Project,
    registry: &kapsa_api::RegistrySpec,
    commit: &str,
) -> (Build, Option<Child>) {
    let env = world.environment.as_ref();
    let repository = image_repository(registry, &project.name_any());
    let existing = world
        .build_jobs
        .iter()
        .find(|b| b.commit.as_deref() == Some(commit));
    let failed_message = |what: &str| {
        format!("the build of commit {commit} failed: {what}; the previous release keeps serving")
    };
    match existing.map(|b| &b.outcome) {
        Some(JobOutcome::Running) => (
            pending("Building", format!("building commit {commit}"), false),
            None,
        ),
        Some(JobOutcome::Succeeded {
            digest: Some(digest),
        }) => (
            Build::Ready {
                image: format!("{repository}:{}@{digest}", env.name_any()),
                commit: Some(commit.to_string()),
            },
            None,
        ),
        Some(JobOutcome::Succeeded { digest: None }) => (
            pending(
                "BuildReportedNoDigest",
                failed_message("the build Job completed without reporting a digest"),
                true,
            ),
            None,
        ),
        Some(JobOutcome::Failed { reason, message }) => {
            (pending(reason, failed_message(message), true), None)
        }
        None if !world.build_namespace_exists => (waiting_for_build_namespace(project), None),
        None => {
            let inputs = EnvironmentInputs {
                project,
                environment: env,
                pool: None,
                base_domain: None,
            };
            let job = build_job(&inputs, registry, &repository, commit, &world.build_pods);
            (
                pending("Building", format!("building commit {commit}"), false),
                Some(Child::typed(&job)),
            )
        }
    }
}

/// The build Jobs kept: the one of the commit wanted, and the newest
/// finished others up to the history limit (their Pods keep the logs).
/// Every other one of the Environment's is pruned.
fn kept_build_jobs(world: &EnvironmentWorld, commit: Option<&str>) -> Vec<ChildKey> {
    let dockerfile = world.environment.spec.image.is_none()
        && world
            .project
            .as_ref()
            .is_some_and(|p| p.spec.build.strategy == BuildStrategy::Dockerfile);
    if !dockerfile {
        return Vec::new();
    }
    let current = world
        .build_jobs
        .iter()
        .filter(|b| commit.is_some() && b.commit.as_deref() == commit);
    let history = world
        .build_jobs
        .iter()
        .filter(|b| !(commit.is_some() && b.commit.as_deref() == commit))
        .filter(|b| b.outcome != JobOutcome::Running)
        .take(BUILD_HISTORY_LIMIT);
    current
        .chain(history)
        .map(|b| Observed::typed(b.job.as_ref()).key)
        .collect()
}

/// The phase, from what serves and what is under way. A build or a failed
/// build behind a release that serves does not change it: the conditions
/// tell that story.
fn phase(
    serving: bool,
    tls_ok: bool,
    deploying: bool,
    failed: bool,
    source_known: bool,
) -> EnvironmentPhase {
    match (serving, tls_ok, deploying, failed, source_known) {
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

/// The release a pin holds.
#[derive(Clone, Debug)]
struct Held {
    image: String,
    commit: Option<String>,
    /// `release 3` or `image <ref>`.
    what: String,
}

/// What `spec.pin` holds: `None` unpinned, an error when it names a release
/// `status.history` does not have.
fn pinned_release(env: &Environment, status: &EnvironmentStatus) -> Option<Result<Held, String>> {
    let pin = env.spec.pin.as_ref()?;
    if let Some(image) = &pin.image {
        return Some(Ok(Held {
            image: image.clone(),
            commit: None,
            what: format!("image {image}"),
        }));
    }
    let number = pin.release?;
    Some(
        status
            .history
            .iter()
            .find(|r| r.number == Some(number))
            .map(|r| Held {
                image: r.image.clone(),
                commit: r.commit.clone(),
                what: format!("release {number}"),
            })
            .ok_or_else(|| {
                let known: Vec<String> = status
                    .history
                    .iter()
                    .filter_map(|r| r.number.map(|n| n.to_string()))
                    .collect();
                format!(
                    "spec.pin.release {number} is not in status.history (releases kept: {}); what runs stays",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )
            }),
    )
}

/// The `Pinned` message: the release held, and what waits.
fn pin_message(held: &Held, build: &Build) -> String {
    let commit = |c: &Option<String>| {
        c.as_deref()
            .map(|c| format!(" (commit {})", &c[..c.len().min(12)]))
            .unwrap_or_default()
    };
    let mut message = format!(
        "holding {}{}: {}",
        held.what,
        commit(&held.commit),
        held.image
    );
    match build {
        Build::Ready { image, commit: c } if *image != held.image || *c != held.commit => {
            message.push_str(&format!(
                "; newer build waiting to roll out: {image}{}",
                commit(c)
            ));
        }
        Build::Pending { message: why, .. } => {
            message.push_str(&format!("; the newest commit is not built yet ({why})"));
        }
        _ => message.push_str("; nothing newer waits"),
    }
    message.push_str("; remove spec.pin (kapsa unpin) to roll out the newest build");
    message
}

/// One more than the highest release number in `history` (releases made
/// before numbers existed count by position).
fn next_release_number(history: &[Release]) -> i64 {
    let highest = history.iter().filter_map(|r| r.number).max().unwrap_or(0);
    highest.max(i64::try_from(history.len()).unwrap_or(i64::MAX)) + 1
}

/// The last image kpack built successfully for this Environment (kpack keeps
/// it in `status.latestImage` while later builds run or fail), with its
/// commit when Kapsa knows it.
fn last_good_build(
    world: &EnvironmentWorld,
    status: &EnvironmentStatus,
) -> Option<(String, Option<String>)> {
    if world.environment.spec.image.is_some() {
        return None;
    }
    let image = match world.image.as_deref() {
        Some(built) => built.data["status"]["latestImage"].as_str()?.to_string(),
        // A Dockerfile build: the newest Job that reported a digest.
        None => {
            let project = world.project.as_deref()?;
            let registry = world.registry.as_ref().ok()?;
            let digest = world.build_jobs.iter().find_map(|b| match &b.outcome {
                JobOutcome::Succeeded { digest } => digest.clone(),
                _ => None,
            })?;
            format!(
                "{}:{}@{digest}",
                image_repository(&registry.spec, &project.name_any()),
                world.environment.name_any()
            )
        }
    };
    let commit = status
        .history
        .iter()
        .find(|r| r.image == image)
        .and_then(|r| r.commit.clone())
        .or_else(|| {
            world
                .deployment
                .as_deref()
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

/// Whether the Deployment controller gave up on the rollout of `image`
/// (`Progressing=False`, reason `ProgressDeadlineExceeded`, for the
/// generation that runs it): a condition left from an earlier rollout says
/// nothing about a new one.
fn progress_deadline_exceeded(d: &Deployment, image: &str) -> bool {
    let (running, _) = deployed_release(d);
    let observed = d
        .status
        .as_ref()
        .and_then(|s| s.observed_generation)
        .is_some_and(|g| Some(g) >= d.meta().generation);
    running.as_deref() == Some(image)
        && observed
        && d.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| {
                c.type_ == "Progressing"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            })
}

/// Reads a kpack Image's status the way kpack means it: the build for the
/// current generation is done when `observedGeneration` caught up and
/// `Ready` is no longer Unknown.
fn image_build_state(image: Option<&DynamicObject>, commit: &str) -> Build {
    let building = || pending("Building", format!("building commit {commit}"), false);
    let Some(image) = image else {
        return building();
    };
    let revision = image.data["spec"]["source"]["git"]["revision"].as_str();
    let observed = image.data["status"]["observedGeneration"].as_i64();
    let ready = image.data["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .cloned()
        .unwrap_or(Value::Null);
    if revision != Some(commit) || observed != image.metadata.generation {
        return building();
    }
    match ready["status"].as_str() {
        Some("True") => match image.data["status"]["latestImage"].as_str() {
            Some(latest) => Build::Ready {
                image: latest.to_string(),
                commit: Some(commit.to_string()),
            },
            None => pending("Building", "the build reports no image", false),
        },
        Some("False") => pending(
            "BuildFailed",
            format!(
                "the build of commit {commit} failed: {}; the previous release keeps serving",
                ready["message"].as_str().unwrap_or("no details")
            ),
            true,
        ),
        _ => building(),
    }
}

fn tls_condition(
    world: &EnvironmentWorld,
    project: &kapsa_api::Project,
    base_domain: Option<&str>,
    condition: &dyn Fn(&str, ConditionStatus, &str, String) -> Condition,
) -> Condition {
    let env: &Environment = &world.environment;
    let Some(pool) = world.pool.as_deref() else {
        return condition(
            TLS_READY,
            ConditionStatus::False,
            "NoDomain",
            "the project has no host yet".into(),
        );
    };
    let inputs = EnvironmentInputs {
        project,
        environment: env,
        pool: Some(pool),
        base_domain,
    };
    if environment_url(&inputs).is_none() {
        return condition(
            TLS_READY,
            ConditionStatus::False,
            "NoHost",
            "the environment has no valid host".into(),
        );
    }
    if let Some((gateway, section)) = gateway_listener(&inputs) {
        return condition(
            TLS_READY,
            ConditionStatus::True,
            "GatewayListener",
            format!(
                "TLS terminates at listener {section:?} of Gateway {}/{} (the platform team's certificate)",
                gateway.namespace, gateway.name
            ),
        );
    }
    if pool.spec.cluster_issuer_ref.is_none() {
        return condition(
            TLS_READY,
            ConditionStatus::False,
            "NoClusterIssuer",
            "the DomainPool names no ClusterIssuer: served over plain HTTP".into(),
        );
    }
    if !world.cert_manager_installed {
        return condition(
            TLS_READY,
            ConditionStatus::False,
            "CertManagerNotInstalled",
            "the DomainPool names a ClusterIssuer, but the cluster does not serve cert-manager.io/v1 Certificates; install cert-manager (the operator picks it up without a restart of its own)".into(),
        );
    }
    // The same decision that shaped the Ingress names the Certificate.
    let Some(certificate_name) = tls_certificate_name(&inputs) else {
        return condition(
            TLS_READY,
            ConditionStatus::False,
            "NoHost",
            "the environment has no valid host".into(),
        );
    };
    let ready = world
        .certificates
        .iter()
        .find(|c| c.name_any() == certificate_name)
        .and_then(|c| {
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
        ),
        Some(c) => condition(
            TLS_READY,
            ConditionStatus::False,
            "CertificateNotReady",
            format!(
                "Certificate {certificate_name}: {}",
                c["message"].as_str().unwrap_or("not ready")
            ),
        ),
        None => condition(
            TLS_READY,
            ConditionStatus::False,
            "CertificatePending",
            format!("waiting for Certificate {certificate_name}"),
        ),
    }
}

#[cfg(test)]
mod tests;

/// `Routed` (Gateway routing only; `None` under Ingress routing): what the
/// gateway controller says of the Environment's HTTPRoute on the Project's
/// ListenerSet, its `Accepted` and `ResolvedRefs` conditions, reasons
/// passed on as the gateway wrote them.
fn routed_condition(
    world: &EnvironmentWorld,
    project: &kapsa_api::Project,
    base_domain: Option<&str>,
    condition: &dyn Fn(&str, ConditionStatus, &str, String) -> Condition,
) -> Option<Condition> {
    let env: &Environment = &world.environment;
    let inputs = EnvironmentInputs {
        project,
        environment: env,
        pool: world.pool.as_deref(),
        base_domain,
    };
    if !gateway_routing(&inputs) {
        return None;
    }
    let parent = match gateway_listener(&inputs) {
        Some((gateway, section)) => Parent::GatewayListener {
            namespace: &gateway.namespace,
            name: &gateway.name,
            section,
        },
        None => Parent::ListenerSet(listener_set_name(&project.name_any())),
    };
    let route_name = env.name_any();
    let (status, reason, message) = if !world.gateway_installed {
        (
            ConditionStatus::False,
            "GatewayAPINotInstalled".to_owned(),
            "the DomainPool routes through Gateway API, but the cluster does not serve gateway.networking.k8s.io/v1 HTTPRoutes and ListenerSets; install Gateway API's standard CRDs (v1.5 or later; the operator picks them up without a restart of its own); an Ingress made before keeps serving".to_owned(),
        )
    } else if http_route(&inputs).is_none() {
        (
            ConditionStatus::False,
            "NoHost".to_owned(),
            "the environment has no valid host to route".to_owned(),
        )
    } else {
        match world.http_route.as_deref() {
            None => (
                ConditionStatus::Unknown,
                "RoutePending".to_owned(),
                format!("HTTPRoute {route_name:?} comes with the first release"),
            ),
            Some(route) => route_verdict(route, &parent),
        }
    };
    Some(condition(ROUTED, status, &reason, message))
}

/// What an Environment's HTTPRoute attaches to.
enum Parent<'a> {
    /// The Project's ListenerSet (in the route's namespace).
    ListenerSet(String),
    /// A listener of the shared Gateway (`gatewayRef.sectionName`).
    GatewayListener {
        namespace: &'a str,
        name: &'a str,
        section: &'a str,
    },
}

impl Parent<'_> {
    fn matches(&self, parent_ref: &Value, route_namespace: Option<&str>) -> bool {
        let namespace = parent_ref["namespace"].as_str().or(route_namespace);
        match self {
            Parent::ListenerSet(name) => {
                parent_ref["kind"] == "ListenerSet"
                    && parent_ref["name"] == name.as_str()
                    && namespace == route_namespace
            }
            Parent::GatewayListener {
                namespace: gateway_namespace,
                name,
                section,
            } => {
                parent_ref["kind"].as_str().is_none_or(|k| k == "Gateway")
                    && parent_ref["name"] == *name
                    && namespace == Some(*gateway_namespace)
                    && parent_ref["sectionName"] == *section
            }
        }
    }
}

impl std::fmt::Display for Parent<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Parent::ListenerSet(name) => write!(f, "ListenerSet {name:?}"),
            Parent::GatewayListener {
                namespace,
                name,
                section,
            } => write!(f, "listener {section:?} of Gateway {namespace}/{name}"),
        }
    }
}

/// The gateway's verdict on `route` attached to `target`.
fn route_verdict(route: &DynamicObject, target: &Parent) -> (ConditionStatus, String, String) {
    let name = route.name_any();
    let generation = route.meta().generation;
    let parent = route.data["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| target.matches(&p["parentRef"], route.meta().namespace.as_deref()));
    let waiting = (
        ConditionStatus::Unknown,
        "WaitingForGateway".to_owned(),
        format!(
            "no gateway controller has reported on HTTPRoute {name:?} attached to {target} yet (with a ListenerSet, the Gateway's controller must support ListenerSets)"
        ),
    );
    let Some(parent) = parent else {
        return waiting;
    };
    let controller = parent["controllerName"].as_str().unwrap_or("the gateway");
    let find = |type_: &str| {
        parent["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == type_)
            // A verdict on an older generation of the route is no verdict.
            .filter(|c| {
                generation.is_none()
                    || c["observedGeneration"]
                        .as_i64()
                        .is_none_or(|g| Some(g) >= generation)
            })
    };
    let (Some(accepted), Some(resolved)) = (find("Accepted"), find("ResolvedRefs")) else {
        return waiting;
    };
    for (c, what) in [(accepted, "accept"), (resolved, "resolve the backend of")] {
        if c["status"] == "False" {
            let reason = c["reason"]
                .as_str()
                .filter(|r| kapsa_api::conditions::is_valid_reason(r))
                .unwrap_or("RouteNotAccepted");
            let message: String = c["message"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(1024)
                .collect();
            return (
                ConditionStatus::False,
                reason.to_owned(),
                format!("{controller} did not {what} HTTPRoute {name:?} on {target}: {message}"),
            );
        }
    }
    if accepted["status"] == "True" && resolved["status"] == "True" {
        (
            ConditionStatus::True,
            "Accepted".to_owned(),
            format!("{controller} accepted HTTPRoute {name:?} on {target}"),
        )
    } else {
        waiting
    }
}

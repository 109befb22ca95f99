//! The Environment plan, case by case, from the YAML fixtures of
//! `tests/fixtures/plan/environment/` (format: see `plan_fixtures.rs`).
//!
//! The world is built from the fixture's documents the way
//! [`dereference::dereference`] builds it from the caches.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kapsa_api::project::{BuildStrategy, BuilderKind};
use kapsa_api::{DomainPool, Environment, Project};
use kube::ResourceExt;
use kube::api::DynamicObject;

use super::super::dereference::{self, BuilderState, EnvironmentWorld, builder_ref};
use super::{EnvironmentPlan, plan};
use crate::references::Problem;
use crate::resources::environment::wildcard_certificate_name;
use crate::resources::project::build_namespace_name;

use crate::controllers::plan_fixtures as fixtures;
use crate::controllers::plan_fixtures::cases;
use fixtures::{Fixture, KAPSA, Outcome};

const RECONCILER: &str = "environment";
/// What every Environment `Expect` document states.
const REQUIRED: [&str; 5] = ["phase", "conditions", "apply", "delete", "events"];
const KPACK: &str = "kpack.io/v1alpha2";

/// The world of a fixture: its one Environment and what it names.
fn world(fixture: &Fixture) -> EnvironmentWorld {
    let mut environments: Vec<Environment> = fixture.all(KAPSA, "Environment");
    assert_eq!(
        environments.len(),
        1,
        "fixture {}: needs exactly one Environment",
        fixture.name
    );
    let environment = environments.remove(0);
    let name = environment.name_any();
    let namespace = environment.namespace().unwrap_or_default();
    let ns = Some(namespace.as_str());
    let project: Option<Project> = fixture.find(KAPSA, "Project", &environment.spec.project, None);
    let pool = project
        .as_ref()
        .and_then(|p| p.status.as_ref()?.domain_pool.clone())
        .and_then(|pool| fixture.find::<DomainPool>(KAPSA, "DomainPool", &pool, None));
    let registry =
        match &project {
            // As dereference does, under the default `--allow-insecure-registries=false`.
            Some(p) => fixture.registry(p, &namespace).and_then(|r| {
                match crate::references::insecure_refused(&r.spec, false) {
                    Some(problem) => Err(problem),
                    None => Ok(r),
                }
            }),
            None => Err(Problem {
                reason: "ProjectNotFound",
                message: String::new(),
            }),
        };
    let exists = |api_version: &str, kind: &str, name: &str, namespace: Option<&str>| {
        fixture
            .find::<serde_json::Value>(api_version, kind, name, namespace)
            .is_some()
    };
    let monitoring_installed = fixture
        .test_document("Cluster")
        .and_then(|c| c["prometheusOperatorInstalled"].as_bool())
        .unwrap_or(true);
    let flag = |name: &str| {
        fixture
            .test_document("Cluster")
            .and_then(|c| c[name].as_bool())
            .unwrap_or(true)
    };
    let gateway_installed = flag("gatewayApiInstalled");
    let cert_manager_installed = flag("certManagerInstalled");
    let kpack_installed = fixture
        .test_document("Cluster")
        .and_then(|c| c["kpackInstalled"].as_bool())
        .unwrap_or(true);
    // The Project's build namespace exists unless the Cluster document
    // says `buildNamespaceExists: false`.
    let build_ns = project.as_ref().map(build_namespace_name);
    let build_namespace_exists = fixture
        .test_document("Cluster")
        .and_then(|c| c["buildNamespaceExists"].as_bool())
        .unwrap_or(true);
    let builder = match &project {
        _ if !kpack_installed => BuilderState::KpackNotInstalled,
        Some(p) if p.spec.build.strategy == BuildStrategy::Buildpacks => {
            let (kind, builder) = builder_ref(p);
            let found = match kind {
                BuilderKind::ClusterBuilder => exists(KPACK, "ClusterBuilder", &builder, None),
                BuilderKind::Builder => exists(KPACK, "Builder", &builder, build_ns.as_deref()),
            };
            if found {
                BuilderState::Present
            } else {
                BuilderState::NotFound
            }
        }
        _ => BuilderState::NotFound,
    };
    let mut certificate_names = vec![format!("{name}-tls"), format!("{name}-gateway-tls")];
    if let Some(p) = &project {
        certificate_names.push(wildcard_certificate_name(&p.name_any()));
    }
    let certificates = certificate_names
        .iter()
        .filter_map(|c| fixture.find::<DynamicObject>("cert-manager.io/v1", "Certificate", c, ns))
        .map(Arc::new)
        .collect();
    let missing_references = match &project {
        Some(p) => dereference::missing_references(p, environment.spec.type_, |kind, reference| {
            exists("v1", kind, reference, ns)
        }),
        None => Vec::new(),
    };
    // A Poll document: the Project's last poll (`branches`), which an
    // Environment without `spec.commit` follows.
    let branch_head = fixture.test_document("Poll").and_then(|poll| {
        let branch = environment.spec.branch.as_deref()?;
        if environment.spec.commit.is_some() {
            return None;
        }
        poll["branches"][branch].as_str().map(str::to_string)
    });
    EnvironmentWorld {
        branch_head,
        project: project.map(Arc::new),
        pool: pool.map(Arc::new),
        registry,
        builder,
        deployment: fixture
            .find::<Deployment>("apps/v1", "Deployment", &name, ns)
            .map(Arc::new),
        service: fixture
            .find::<Service>("v1", "Service", &name, ns)
            .map(Arc::new),
        ingress: fixture
            .find::<Ingress>("networking.k8s.io/v1", "Ingress", &name, ns)
            .map(Arc::new),
        image: build_ns.as_deref().and_then(|bns| {
            fixture
                .find::<DynamicObject>(KPACK, "Image", &name, Some(bns))
                .map(Arc::new)
        }),
        legacy_image: fixture
            .find::<DynamicObject>(KPACK, "Image", &name, ns)
            .map(Arc::new),
        build_namespace_exists,
        certificates,
        gateway_installed,
        cert_manager_installed,
        http_route: fixture
            .find::<DynamicObject>("gateway.networking.k8s.io/v1", "HTTPRoute", &name, ns)
            .map(Arc::new),
        build_jobs: dereference::build_jobs(
            fixture
                .all::<k8s_openapi::api::batch::v1::Job>("batch/v1", "Job")
                .into_iter()
                .filter(|j| {
                    j.namespace() == build_ns
                        && environment.uid().is_some()
                        && j.labels()
                            .get(crate::resources::environment::ENVIRONMENT_UID_LABEL)
                            == environment.uid().as_ref()
                })
                .map(Arc::new),
            |job| {
                fixture
                    .all::<k8s_openapi::api::core::v1::Pod>("v1", "Pod")
                    .into_iter()
                    .filter(|p| {
                        p.labels()
                            .get("batch.kubernetes.io/job-name")
                            .map(String::as_str)
                            == Some(job)
                    })
                    .map(Arc::new)
                    .collect()
            },
        ),
        build_pods: crate::resources::environment::BuildPods {
            image: "buildkit.example/buildkit:rootless".into(),
            ..Default::default()
        },
        monitoring_installed,
        service_monitor: fixture
            .find::<DynamicObject>("monitoring.coreos.com/v1", "ServiceMonitor", &name, ns)
            .map(Arc::new),
        missing_references,
        now: fixtures::now(),
        environment: Arc::new(environment),
    }
}

fn outcome(plan: &EnvironmentPlan) -> Outcome<'_> {
    Outcome {
        status: serde_json::to_value(&plan.status).expect("the status serializes"),
        conditions: &plan.status.conditions,
        apply: &plan.apply,
        delete: &plan.delete,
        events: &plan.events,
        requeue: plan.requeue,
    }
}

fn run(case: &str) {
    let fixture = Fixture::load(RECONCILER, case);
    let plan = plan(&world(&fixture));
    fixture.assert_plan(&outcome(&plan), &REQUIRED);
}

cases! {
    fixtures {
        person_environment_follows_branch => "person-environment-follows-branch",
        preview_runtime_overrides => "preview-runtime-overrides",
        preview_dns01_uses_the_wildcard => "preview-dns01-uses-the-wildcard",
        build_done_rollout_complete => "build-done-rollout-complete",
        rollout_complete_without_its_service => "rollout-complete-without-its-service",
        build_reports_no_image => "build-reports-no-image",
        build_namespace_missing => "build-namespace-missing",
        legacy_kpack_image_moves_to_build_namespace => "legacy-kpack-image-moves-to-build-namespace",
        pin_holds_a_newer_build_back => "pin-holds-a-newer-build-back",
        pin_keeps_the_held_release_in_a_full_history => "pin-keeps-the-held-release-in-a-full-history",
        pin_rolls_back_to_a_release => "pin-rolls-back-to-a-release",
        pin_to_an_unknown_release_changes_nothing => "pin-to-an-unknown-release-changes-nothing",
        unpin_rolls_out_the_newest_build => "unpin-rolls-out-the-newest-build",
        builder_missing_build_due => "builder-missing-build-due",
        builder_missing_image_builds_commit => "builder-missing-image-builds-commit",
        dockerfile_first_build_starts_a_job => "dockerfile-first-build-starts-a-job",
        dockerfile_build_running => "dockerfile-build-running",
        dockerfile_build_succeeded_rolls_out => "dockerfile-build-succeeded-rolls-out",
        dockerfile_build_failed_keeps_the_release => "dockerfile-build-failed-keeps-the-release",
        dockerfile_build_timed_out => "dockerfile-build-timed-out",
        dockerfile_history_limit_prunes_old_jobs => "dockerfile-history-limit-prunes-old-jobs",
        failed_build_with_release => "failed-build-with-release",
        first_build_failing => "first-build-failing",
        first_build_running => "first-build-running",
        first_build_still_running => "first-build-still-running",
        fixed_image_keeps_foreign_kpack_image => "fixed-image-keeps-foreign-kpack-image",
        fixed_image_keeps_unlabelled_kpack_image => "fixed-image-keeps-unlabelled-kpack-image",
        fixed_image_prunes_owned_kpack_image => "fixed-image-prunes-owned-kpack-image",
        history_is_capped => "history-is-capped",
        host_removed_ingress_exists => "host-removed-ingress-exists",
        kpack_not_installed => "kpack-not-installed",
        missing_references => "missing-references",
        no_cluster_issuer => "no-cluster-issuer",
        no_host => "no-host",
        pool_missing => "pool-missing",
        project_missing => "project-missing",
        registry_missing_first_build => "registry-missing-first-build",
        registry_missing_release_kept => "registry-missing-release-kept",
        rolled_out_certificate_pending => "rolled-out-certificate-pending",
        rollout_failed => "rollout-failed",
        rollout_in_progress => "rollout-in-progress",
        tls_dns01 => "tls-dns01",
        tls_http01 => "tls-http01",
        waiting_for_commit => "waiting-for-commit",
        first_release_waits_for_its_commit => "first-release-waits-for-its-commit",
        wrong_namespace => "wrong-namespace",
        no_host_without_cluster_issuer => "no-host-without-cluster-issuer",
        same_image_new_commit => "same-image-new-commit",
        new_rollout_after_failed_rollout => "new-rollout-after-failed-rollout",
        metrics_service_monitor => "metrics-service-monitor",
        metrics_prometheus_operator_missing => "metrics-prometheus-operator-missing",
        metrics_removed_prunes_service_monitor => "metrics-removed-prunes-service-monitor",
        gateway_http01_route_replaces_the_ingress => "gateway-http01-route-replaces-the-ingress",
        gateway_route_rejected => "gateway-route-rejected",
        gateway_api_not_installed_keeps_the_ingress => "gateway-api-not-installed-keeps-the-ingress",
        gateway_stale_verdict_is_no_verdict => "gateway-stale-verdict-is-no-verdict",
        gateway_listener_instead_of_listener_set => "gateway-listener-instead-of-listener-set",
        gateway_keeps_the_ingress_until_routed => "gateway-keeps-the-ingress-until-routed",
        gateway_route_handover_keeps_the_ingress => "gateway-route-handover-keeps-the-ingress",
        registry_insecure_off_loopback_release_kept => "registry-insecure-off-loopback-release-kept",
    }
    known_bugs {
    }
}

#[test]
fn every_fixture_is_tested() {
    fixtures::assert_every_fixture_is_tested(RECONCILER, &[CASES, KNOWN_BUGS].concat());
}

/// A known bug that is fixed makes this fail: move its case out of
/// `known_bugs` then.
#[test]
fn known_bugs_are_still_there() {
    for case in KNOWN_BUGS {
        let fixture = Fixture::load(RECONCILER, case);
        let plan = plan(&world(&fixture));
        assert!(
            !fixture.matches(&outcome(&plan), &REQUIRED),
            "fixture {}: the plan now does what it states; move it out of known_bugs",
            fixture.name
        );
    }
}

/// Changing any one expectation of any fixture makes its test fail.
#[test]
fn every_expectation_can_fail() {
    for case in CASES {
        let fixture = Fixture::load(RECONCILER, case);
        let plan = plan(&world(&fixture));
        fixture.assert_every_expectation_can_fail(&outcome(&plan), &REQUIRED);
    }
}

//! The Project plan, case by case, from the YAML fixtures of
//! `tests/fixtures/plan/project/` (format: see `plan_fixtures.rs`).
//!
//! The first Project document of a fixture is the one planned; the others
//! are the other Projects of the cluster. The world is built from the
//! documents the way [`super::super::dereference::dereference`] builds it
//! from the caches and, for the registry credentials, the API server.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ResourceQuota, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kapsa_api::{DomainPool, Environment, Project};
use kube::ResourceExt;
use kube::api::{DynamicObject, PartialObjectMeta};

use super::super::dereference::{CopiedSecret, Credentials, GIT, PULL, PUSH, ProjectWorld, judge};
use super::{ProjectPlan, plan};
use crate::context::PollResult;
use crate::references::Problem;
use crate::resources::environment::{
    BUILDER_SERVICE_ACCOUNT, RUNTIME_SERVICE_ACCOUNT, wildcard_certificate_name,
};
use crate::resources::project::{
    BUILDER_ROLE, GIT_SECRET, REGISTRY_SECRET, RESOURCE_QUOTA, build_namespace_name, copy_matches,
    namespace_name, source_version,
};

use crate::controllers::plan_fixtures as fixtures;
use crate::controllers::plan_fixtures::cases;
use fixtures::{Fixture, KAPSA, Outcome};

const RECONCILER: &str = "project";
/// What every Project `Expect` document states.
const REQUIRED: [&str; 4] = ["conditions", "apply", "delete", "events"];
const RBAC: &str = "rbac.authorization.k8s.io/v1";

/// The world of a fixture: its first Project, the other Projects, and what
/// the first one names or owns.
fn world(fixture: &Fixture) -> ProjectWorld {
    // A Cluster document says only `gatewayApiInstalled` to the project plan.
    if let Some(cluster) = fixture.test_document("Cluster") {
        let keys: Vec<&String> = cluster
            .as_object()
            .map(|o| {
                o.keys()
                    .filter(|k| !["apiVersion", "kind"].contains(&k.as_str()))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            keys.iter().all(|k| *k == "gatewayApiInstalled"),
            "fixture {}: the project plan reads only `gatewayApiInstalled` of a `kind: Cluster` document, not {keys:?}",
            fixture.name
        );
    }
    let mut projects: Vec<Project> = fixture.all(KAPSA, "Project");
    assert!(
        !projects.is_empty(),
        "fixture {}: needs a Project",
        fixture.name
    );
    let project = projects.remove(0);
    let name = project.name_any();
    let namespace = namespace_name(&project);
    let ns = Some(namespace.as_str());
    let registry = fixture.registry(&project, &namespace);
    let build_namespace = build_namespace_name(&project);
    let bns = Some(build_namespace.as_str());
    let secret = |name: &str, namespace: Option<&str>| {
        fixture
            .find::<Secret>("v1", "Secret", name, namespace)
            .map(Arc::new)
    };
    let (push_secret, registry_secret, git_secret) = (
        secret(REGISTRY_SECRET, bns),
        secret(REGISTRY_SECRET, ns),
        secret(GIT_SECRET, bns),
    );
    let unavailable = || {
        Credentials::Unusable(Problem {
            reason: "RegistryUnavailable",
            message: String::new(),
        })
    };
    let copy_of = |location: &Option<(String, String)>,
                   kind: &CopiedSecret,
                   copy: &Option<Arc<Secret>>| match location {
        None => Credentials::None,
        Some(at) => credentials(fixture, at, kind, copy.as_deref()),
    };
    let (credentials, pull_credentials) = match &registry {
        Err(_) => (unavailable(), unavailable()),
        Ok(r) => (
            copy_of(&r.credentials, &PUSH, &push_secret),
            copy_of(&r.pull, &PULL, &registry_secret),
        ),
    };
    let git_location = project
        .spec
        .source
        .git
        .secret_ref
        .as_ref()
        .map(|r| (namespace.clone(), r.name.clone()));
    let git_credentials = copy_of(&git_location, &GIT, &git_secret);
    let push_source_uid = registry
        .as_ref()
        .ok()
        .and_then(|r| r.credentials.as_ref())
        .and_then(|(sns, sname)| fixture.find::<Secret>("v1", "Secret", sname, Some(sns)))
        .and_then(|s| s.metadata.uid);
    let service_accounts = [
        (BUILDER_SERVICE_ACCOUNT, bns),
        (RUNTIME_SERVICE_ACCOUNT, ns),
        (BUILDER_SERVICE_ACCOUNT, ns),
    ]
    .iter()
    .filter_map(|(sa, ns)| fixture.find::<ServiceAccount>("v1", "ServiceAccount", sa, *ns))
    .map(Arc::new)
    .collect();
    let environments = fixture
        .all::<Environment>(KAPSA, "Environment")
        .into_iter()
        .filter(|e| e.namespace().as_deref() == ns && e.spec.project == name)
        .map(Arc::new)
        .collect();
    let poll = fixture.test_document("Poll").map(|poll| {
        let branches: Option<BTreeMap<String, String>> = poll
            .get("branches")
            .map(|b| serde_json::from_value(b.clone()).expect("Poll.branches: name to commit"));
        PollResult {
            branches,
            error: poll["error"].as_str().map(str::to_string),
            reason: poll["reason"].as_str().map(|r| match r {
                "Timeout" => "Timeout",
                "HostNotAllowed" => "HostNotAllowed",
                _ => "Unreachable",
            }),
            consecutive_failures: poll["consecutiveFailures"]
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            last_success: None,
            polled_at: poll
                .get("polledAt")
                .map(|t| serde_json::from_value(t.clone()).expect("Poll.polledAt: a time")),
            merged: poll.get("merged").map(|m| {
                serde_json::from_value(m.clone()).expect("Poll.merged: a list of branch names")
            }),
        }
    });
    ProjectWorld {
        namespace: fixture
            .find::<PartialObjectMeta<Namespace>>("v1", "Namespace", &namespace, None)
            .map(Arc::new),
        build_namespace: fixture
            .find::<PartialObjectMeta<Namespace>>("v1", "Namespace", &build_namespace, None)
            .map(Arc::new),
        build_images: fixture
            .all::<DynamicObject>("kpack.io/v1alpha2", "Image")
            .into_iter()
            .filter(|i| i.metadata.namespace.as_deref() == bns)
            .map(Arc::new)
            .collect(),
        build_jobs: fixture
            .all::<k8s_openapi::api::batch::v1::Job>("batch/v1", "Job")
            .into_iter()
            .filter(|j| j.metadata.namespace.as_deref() == bns)
            .map(Arc::new)
            .collect(),
        others: projects.into_iter().map(Arc::new).collect(),
        pools: fixture
            .all::<DomainPool>(KAPSA, "DomainPool")
            .into_iter()
            .map(Arc::new)
            .collect(),
        registry,
        credentials,
        pull_credentials,
        git_credentials,
        push_source_uid,
        service_accounts,
        roles: [bns, ns]
            .iter()
            .filter_map(|ns| fixture.find::<Role>(RBAC, "Role", BUILDER_ROLE, *ns))
            .map(Arc::new)
            .collect(),
        role_bindings: [bns, ns]
            .iter()
            .filter_map(|ns| fixture.find::<RoleBinding>(RBAC, "RoleBinding", BUILDER_ROLE, *ns))
            .map(Arc::new)
            .collect(),
        push_secret,
        registry_secret,
        git_secret,
        quota: fixture
            .find::<ResourceQuota>("v1", "ResourceQuota", RESOURCE_QUOTA, ns)
            .map(Arc::new),
        wildcard_certificate: fixture
            .find::<DynamicObject>(
                "cert-manager.io/v1",
                "Certificate",
                &wildcard_certificate_name(&name),
                ns,
            )
            .map(Arc::new),
        gateway_installed: fixture
            .test_document("Cluster")
            .and_then(|c| c["gatewayApiInstalled"].as_bool())
            .unwrap_or(true),
        listener_set: fixture
            .find::<DynamicObject>("gateway.networking.k8s.io/v1", "ListenerSet", &name, ns)
            .map(Arc::new),
        environments,
        poll,
        pod_security_default: Default::default(),
        foreign_hosts: super::super::dereference::foreign_hosts(
            &fixture.all::<k8s_openapi::api::networking::v1::Ingress>(
                "networking.k8s.io/v1",
                "Ingress",
            ),
        ),
        now: fixtures::now(),
        project: Arc::new(project),
    }
}

/// A Secret to copy as the dereference step finds it: current when the
/// copy matches the source's version, else judged as read.
fn credentials(
    fixture: &Fixture,
    location: &(String, String),
    kind: &CopiedSecret,
    copy: Option<&Secret>,
) -> Credentials {
    let source = fixture.find::<Secret>("v1", "Secret", &location.1, Some(&location.0));
    if let Some(source) = &source
        && copy.is_some_and(|copy| copy_matches(copy, &source_version(&source.metadata)))
    {
        return Credentials::Current;
    }
    judge(kind, location, source)
}

fn outcome(plan: &ProjectPlan) -> Outcome<'_> {
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
        dns01_pool => "dns01-pool",
        gateway_http01_listener_per_environment => "gateway-http01-listener-per-environment",
        gateway_api_not_installed_keeps_the_listener_set => "gateway-api-not-installed-keeps-the-listener-set",
        gateway_to_ingress_prunes_the_listener_set => "gateway-to-ingress-prunes-the-listener-set",
        dns01_to_http01 => "dns01-to-http01",
        base_holder_claim_is_void => "base-holder-claim-is-void",
        host_in_use => "host-in-use",
        host_is_base => "host-is-base",
        host_reserved => "host-reserved",
        namespace_claimed_by_older_project => "namespace-claimed-by-older-project",
        namespace_foreign => "namespace-foreign",
        namespace_reserved => "namespace-reserved",
        poll_branch_missing => "poll-branch-missing",
        first_poll_makes_production => "first-poll-makes-production",
        first_poll_before_first_status => "first-poll-before-first-status",
        poll_never => "poll-never",
        poll_never_keeps_status => "poll-never-keeps-status",
        poll_reachable_new_commit => "poll-reachable-new-commit",
        poll_timeout => "poll-timeout",
        poll_unreachable => "poll-unreachable",
        pool_reference_missing_old_pool_lists_base => "pool-reference-missing-old-pool-lists-base",
        pool_removed => "pool-removed",
        preview_environments_enabled => "preview-environments-enabled",
        previews_branch_deleted => "previews-branch-deleted",
        previews_created => "previews-created",
        previews_created_announced_once => "previews-created-announced-once",
        previews_disabled => "previews-disabled",
        previews_expire_records_first => "previews-expire-records-first",
        previews_expired_deleted => "previews-expired-deleted",
        previews_expired_new_commit => "previews-expired-new-commit",
        previews_expired_not_recreated => "previews-expired-not-recreated",
        previews_hostile_branch_names => "previews-hostile-branch-names",
        previews_keep_annotation => "previews-keep-annotation",
        previews_limit => "previews-limit",
        previews_limit_lowered => "previews-limit-lowered",
        previews_merged => "previews-merged",
        previews_merged_check_unknown => "previews-merged-check-unknown",
        previews_name_taken => "previews-name-taken",
        previews_name_taken_hashed => "previews-name-taken-hashed",
        previews_new_commit => "previews-new-commit",
        previews_source_unreachable => "previews-source-unreachable",
        previews_unchanged => "previews-unchanged",
        production_not_ready => "production-not-ready",
        production_ready => "production-ready",
        build_images_of_deleted_environments_pruned => "build-images-of-deleted-environments-pruned",
        build_namespace_foreign => "build-namespace-foreign",
        build_namespace_terminating => "build-namespace-terminating",
        git_credentials_copied => "git-credentials-copied",
        git_credentials_removed => "git-credentials-removed",
        registry_legacy_push_copy_removed => "registry-legacy-push-copy-removed",
        registry_pull_secret_replaces_push_copy => "registry-pull-secret-replaces-push-copy",
        registry_pull_secret_missing_drops_push_copy => "registry-pull-secret-missing-drops-push-copy",
        registry_credentials_changed => "registry-credentials-changed",
        registry_credentials_current => "registry-credentials-current",
        registry_credentials_fetched => "registry-credentials-fetched",
        registry_credentials_secret_missing => "registry-credentials-secret-missing",
        registry_missing => "registry-missing",
        registry_without_credentials => "registry-without-credentials",
        resource_quota_removed => "resource-quota-removed",
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

/// The copy in registry-credentials-current.yaml is the one Kapsa writes
/// for its source, so that fixture tests a real match (not just the
/// annotations the loader compares).
#[test]
fn the_current_copy_fixture_is_what_kapsa_writes() {
    let fixture = Fixture::load(RECONCILER, "registry-credentials-current");
    let project = &fixture.all::<Project>(KAPSA, "Project")[0];
    let source: Secret = fixture
        .find("v1", "Secret", "harbor-push", Some("kapsa-system"))
        .expect("the source Secret");
    let copy: Secret = fixture
        .find("v1", "Secret", REGISTRY_SECRET, Some("kapsa-build-shop"))
        .expect("the copy");
    let written = crate::resources::project::push_secret(project, &source);
    assert_eq!(copy.metadata.annotations, written.metadata.annotations);
    assert_eq!(copy.data, written.data);
    assert_eq!(copy.type_, written.type_);
    assert!(copy_matches(&copy, &source_version(&source.metadata)));
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

/// `lastPollTime` rides on a status that changes, and a poll that finds
/// nothing new writes nothing.
#[test]
fn last_poll_time_is_written_with_a_change_only() {
    let fixture = Fixture::load(RECONCILER, "poll-reachable-new-commit");
    let mut world = world(&fixture);
    let polled_at: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time =
        serde_json::from_value(serde_json::json!("2026-03-01T11:59:30Z")).unwrap();
    world
        .poll
        .as_mut()
        .expect("the fixture has a Poll")
        .polled_at = Some(polled_at.clone());
    let first = plan(&world);
    assert_ne!(Some(&first.status), world.project.status.as_ref());
    assert_eq!(first.status.last_poll_time.as_ref(), Some(&polled_at));

    // The next poll, a minute later, finds the same heads.
    let mut settled = world.project.as_ref().clone();
    settled.status = Some(first.status.clone());
    world.project = Arc::new(settled);
    let later: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time =
        serde_json::from_value(serde_json::json!("2026-03-01T12:00:30Z")).unwrap();
    world.poll.as_mut().unwrap().polled_at = Some(later);
    let second = plan(&world);
    assert_eq!(
        Some(&second.status),
        world.project.status.as_ref(),
        "nothing to write at rest"
    );
    assert_eq!(second.status.last_poll_time.as_ref(), Some(&polled_at));
}

//! A Project's children: its namespace, service accounts, RBAC, registry
//! credentials, quota and production Environment.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{
    LocalObjectReference, Namespace, ObjectReference, ResourceQuota, ResourceQuotaSpec, Secret,
    ServiceAccount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kapsa_api::domain_pool::PodSecurityLevel;
use kapsa_api::naming::PRODUCTION_ENVIRONMENT_NAME;
use kapsa_api::{DomainPool, Environment, EnvironmentSpec, EnvironmentType, Project};
use kube::{Resource, ResourceExt};

use super::environment::{BUILDER_SERVICE_ACCOUNT, RUNTIME_SERVICE_ACCOUNT};
use super::{controller_reference, project_labels};

/// The copies of the registry's credentials: the push credentials in the
/// build namespace, the pull-only credentials in the project namespace
/// (one name, two namespaces; the push credentials never reach the project
/// namespace).
pub const REGISTRY_SECRET: &str = "kapsa-registry";
/// The copy of the Project's git credentials in the build namespace.
pub const GIT_SECRET: &str = "kapsa-git";
/// kpack's annotation naming the git server a credentials Secret is for.
pub const KPACK_GIT_ANNOTATION: &str = "kpack.io/git";
/// Label on a build namespace (value: the Project).
pub const BUILD_NAMESPACE_LABEL: &str = "kapsa.dev/build-namespace-of";
/// Role and RoleBinding of the builder service account.
pub const BUILDER_ROLE: &str = "kapsa-builder";
/// The project's optional ResourceQuota.
pub const RESOURCE_QUOTA: &str = "kapsa-quota";
/// Annotation on the namespace naming the Project that owns it; an existing
/// namespace is adopted only when it names this Project.
pub const OWNER_ANNOTATION: &str = "kapsa.dev/owner-project";

/// The namespace a Project uses: `spec.namespace`, else its name.
pub fn namespace_name(project: &Project) -> String {
    namespace_of(project).to_string()
}

/// [`namespace_name`] without a copy, for scans over every Project.
pub fn namespace_of(project: &Project) -> &str {
    project
        .spec
        .namespace
        .as_deref()
        .or(project.metadata.name.as_deref())
        .unwrap_or_default()
}

fn meta(project: &Project, name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some(project_labels(&project.name_any())),
        owner_references: Some(vec![controller_reference(project)]),
        ..ObjectMeta::default()
    }
}

/// The Pod Security Admission labels of a project namespace: the level is
/// enforced (pods that break it are refused), and also warned about and
/// audited, so `kubectl apply` of a Deployment that breaks it warns at once.
pub const POD_SECURITY_LABELS: [&str; 3] = [
    "pod-security.kubernetes.io/enforce",
    "pod-security.kubernetes.io/warn",
    "pod-security.kubernetes.io/audit",
];

/// The Pod Security level of a project namespace: its DomainPool's
/// `spec.podSecurity` if set, else the operator's default (the
/// `--pod-security` flag, `restricted` unless changed).
pub fn pod_security_level(
    pool: Option<&DomainPool>,
    operator_default: PodSecurityLevel,
) -> PodSecurityLevel {
    pool.and_then(|p| p.spec.pod_security)
        .unwrap_or(operator_default)
}

/// The project namespace, enforcing the `restricted` Pod Security Standard.
pub fn namespace(project: &Project) -> Namespace {
    namespace_with_pod_security(project, PodSecurityLevel::default())
}

/// The project namespace, enforcing the Pod Security Standard `level` (see
/// [`pod_security_level`]).
pub fn namespace_with_pod_security(project: &Project, level: PodSecurityLevel) -> Namespace {
    let mut metadata = meta(project, &namespace_name(project), None);
    metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .extend(POD_SECURITY_LABELS.map(|label| (label.to_string(), level.as_str().to_string())));
    metadata.annotations = Some(BTreeMap::from([(
        OWNER_ANNOTATION.to_string(),
        project.name_any(),
    )]));
    Namespace {
        metadata,
        ..Namespace::default()
    }
}

/// The namespace a Project's builds run in: `kapsa-build-<project>`. Only
/// Kapsa and the platform's admins have access to it: the registry's push
/// credentials live there, never in the project namespace.
pub fn build_namespace_name(project: &Project) -> String {
    kapsa_api::naming::build_namespace(&project.name_any())
}

/// The build namespace, enforcing the Pod Security Standard `level`.
pub fn build_namespace(project: &Project, level: PodSecurityLevel) -> Namespace {
    let mut namespace = namespace_with_pod_security(project, level);
    namespace.metadata.name = Some(build_namespace_name(project));
    namespace
        .metadata
        .labels
        .get_or_insert_with(BTreeMap::new)
        .insert(BUILD_NAMESPACE_LABEL.to_string(), project.name_any());
    namespace
}

/// Whether an existing namespace may be used by `project`: only if it is
/// already this Project's (by owner reference or owner annotation).
pub fn namespace_belongs_to(ns: &impl Resource, project: &Project) -> bool {
    let by_owner = ns.owner_references().iter().any(|o| {
        o.kind == "Project"
            && o.name == project.name_any()
            && Some(&o.uid) == project.uid().as_ref()
    });
    by_owner || ns.annotations().get(OWNER_ANNOTATION) == Some(&project.name_any())
}

/// The builder's service account, in the build namespace: kpack pushes
/// with the registry's push credentials and clones with the git
/// credentials, both copied there and attached here.
pub fn builder_service_account(project: &Project, has_push: bool, has_git: bool) -> ServiceAccount {
    let secrets = builder_secrets(has_push, has_git);
    ServiceAccount {
        metadata: meta(
            project,
            BUILDER_SERVICE_ACCOUNT,
            Some(&build_namespace_name(project)),
        ),
        secrets: Some(
            secrets
                .iter()
                .map(|name| ObjectReference {
                    name: Some(name.to_string()),
                    ..ObjectReference::default()
                })
                .collect(),
        ),
        image_pull_secrets: has_push.then(|| {
            vec![LocalObjectReference {
                name: REGISTRY_SECRET.to_string(),
            }]
        }),
        automount_service_account_token: Some(false),
    }
}

fn builder_secrets(has_push: bool, has_git: bool) -> Vec<&'static str> {
    [(has_push, REGISTRY_SECRET), (has_git, GIT_SECRET)]
        .into_iter()
        .filter_map(|(has, name)| has.then_some(name))
        .collect()
}

/// The app's service account, in the project namespace: pulls with the
/// registry's pull-only credentials (if it names any), holds no API
/// permissions and mounts no token.
pub fn runtime_service_account(project: &Project, has_pull: bool) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(
            project,
            RUNTIME_SERVICE_ACCOUNT,
            Some(&namespace_name(project)),
        ),
        image_pull_secrets: has_pull.then(|| {
            vec![LocalObjectReference {
                name: REGISTRY_SECRET.to_string(),
            }]
        }),
        automount_service_account_token: Some(false),
        secrets: None,
    }
}

/// The builder may read exactly the secrets it needs, nothing else.
pub fn builder_role(project: &Project, has_push: bool, has_git: bool) -> Role {
    let names: Vec<String> = builder_secrets(has_push, has_git)
        .into_iter()
        .map(str::to_string)
        .collect();
    let rules = (!names.is_empty()).then(|| {
        vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".to_string()]),
            resource_names: Some(names),
            verbs: vec!["get".to_string()],
            ..PolicyRule::default()
        }]
    });
    Role {
        metadata: meta(project, BUILDER_ROLE, Some(&build_namespace_name(project))),
        rules: Some(rules.unwrap_or_default()),
    }
}

pub fn builder_role_binding(project: &Project) -> RoleBinding {
    let ns = build_namespace_name(project);
    RoleBinding {
        metadata: meta(project, BUILDER_ROLE, Some(&ns)),
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".to_string()),
            kind: "Role".to_string(),
            name: BUILDER_ROLE.to_string(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".to_string(),
            name: BUILDER_SERVICE_ACCOUNT.to_string(),
            namespace: Some(ns),
            ..Subject::default()
        }]),
    }
}

/// Annotation on the registry Secret copy: `<uid>/<resourceVersion>` of the
/// source it was copied from.
pub const SOURCE_VERSION_ANNOTATION: &str = "kapsa.dev/source-version";
/// Annotation on the registry Secret copy: SHA-256 of the data it was given,
/// so an edit of the copy is noticed without reading the source.
pub const DATA_DIGEST_ANNOTATION: &str = "kapsa.dev/data-sha256";

/// `<uid>/<resourceVersion>`: changes whenever the object does.
pub fn source_version(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.uid.as_deref().unwrap_or_default(),
        meta.resource_version.as_deref().unwrap_or_default()
    )
}

/// SHA-256 (hex) of a Secret's data, keys and values length-prefixed.
pub fn data_digest(data: Option<&BTreeMap<String, ByteString>>) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for (key, value) in data.into_iter().flatten() {
        hasher.update((key.len() as u64).to_be_bytes());
        hasher.update(key.as_bytes());
        hasher.update((value.0.len() as u64).to_be_bytes());
        hasher.update(&value.0);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether the copy was made from the source at `version` and still holds
/// what it was given.
pub fn copy_matches(copy: &Secret, version: &str) -> bool {
    let annotations = copy.annotations();
    annotations
        .get(SOURCE_VERSION_ANNOTATION)
        .map(String::as_str)
        == Some(version)
        && annotations.get(DATA_DIGEST_ANNOTATION) == Some(&data_digest(copy.data.as_ref()))
}

/// Whether `copy` was made from the Secret with uid `source_uid`.
pub fn copied_from(copy: &Secret, source_uid: Option<&str>) -> bool {
    source_uid.is_some_and(|uid| {
        copy.annotations()
            .get(SOURCE_VERSION_ANNOTATION)
            .and_then(|v| v.split_once('/'))
            .is_some_and(|(copied, _)| copied == uid)
    })
}

/// A copy of a Secret's data (and type) in `namespace` under `name`, kept
/// in sync with the source. Only the data is copied: labels and
/// annotations of the source are not trusted.
fn secret_copy(project: &Project, name: &str, namespace: &str, source: &Secret) -> Secret {
    let mut metadata = meta(project, name, Some(namespace));
    metadata.annotations = Some(BTreeMap::from([
        (
            SOURCE_VERSION_ANNOTATION.to_string(),
            source_version(&source.metadata),
        ),
        (
            DATA_DIGEST_ANNOTATION.to_string(),
            data_digest(source.data.as_ref()),
        ),
    ]));
    Secret {
        metadata,
        type_: source.type_.clone(),
        data: source.data.clone(),
        ..Secret::default()
    }
}

/// The copy of the registry's push credentials in the build namespace.
pub fn push_secret(project: &Project, source: &Secret) -> Secret {
    secret_copy(
        project,
        REGISTRY_SECRET,
        &build_namespace_name(project),
        source,
    )
}

/// The copy of the registry's pull-only credentials in the project
/// namespace.
pub fn pull_secret(project: &Project, source: &Secret) -> Secret {
    secret_copy(project, REGISTRY_SECRET, &namespace_name(project), source)
}

/// The copy of the Project's git credentials in the build namespace, with
/// the `kpack.io/git` annotation kpack matches it to the repository by.
pub fn git_secret(project: &Project, source: &Secret) -> Secret {
    let mut copy = secret_copy(project, GIT_SECRET, &build_namespace_name(project), source);
    if let Some(value) = crate::git::kpack_git_annotation(&project.spec.source.git.url) {
        copy.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(KPACK_GIT_ANNOTATION.to_string(), value);
    }
    copy
}

pub fn resource_quota(project: &Project) -> Option<ResourceQuota> {
    let quota = project.spec.resource_quota.as_ref()?;
    Some(ResourceQuota {
        metadata: meta(project, RESOURCE_QUOTA, Some(&namespace_name(project))),
        spec: Some(ResourceQuotaSpec {
            hard: Some(quota.hard.clone()),
            ..ResourceQuotaSpec::default()
        }),
        status: None,
    })
}

/// The production Environment: the production branch at `commit` (unknown
/// until the first poll succeeds), served at `host`.
pub fn production_environment(
    project: &Project,
    commit: Option<&str>,
    host: Option<&str>,
) -> Environment {
    let mut env = Environment::new(
        PRODUCTION_ENVIRONMENT_NAME,
        EnvironmentSpec {
            project: project.name_any(),
            type_: EnvironmentType::Production,
            branch: Some(project.spec.source.git.branch.clone()),
            commit: commit.map(str::to_string),
            image: None,
            host: host.map(str::to_string),
            expires_at: None,
            pin: None,
        },
    );
    env.metadata = meta(
        project,
        PRODUCTION_ENVIRONMENT_NAME,
        Some(&namespace_name(project)),
    );
    env
}

/// The preview Environment of `branch` at `head`: `preview-<slug>`, type
/// Preview, at `<slug>.<project>.<base>` when the Project has a base
/// domain, owned by the Project. `slug` is a DNS label of at most
/// `MAX_BRANCH_SLUG_LEN` characters (the planner chooses it). `seen` (when Kapsa first saw the branch at
/// `head`) is kept in an annotation; `expires` is `seen` + the TTL (None:
/// kept by `kapsa.dev/keep`).
pub fn preview_environment(
    project: &Project,
    slug: &str,
    branch: &str,
    head: &str,
    base_domain: Option<&str>,
    seen: k8s_openapi::jiff::Timestamp,
    expires: Option<k8s_openapi::jiff::Timestamp>,
) -> Environment {
    let name = format!("{}{slug}", kapsa_api::naming::PREVIEW_ENVIRONMENT_PREFIX);
    let mut env = Environment::new(
        &name,
        EnvironmentSpec {
            project: project.name_any(),
            type_: EnvironmentType::Preview,
            branch: Some(branch.to_string()),
            commit: Some(head.to_string()),
            image: None,
            host: base_domain.map(|base| format!("{slug}.{}.{base}", project.name_any())),
            expires_at: expires.map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time),
            pin: None,
        },
    );
    env.metadata = meta(project, &name, Some(&namespace_name(project)));
    env.metadata.annotations = Some(
        [(
            kapsa_api::project::HEAD_SEEN_AT_ANNOTATION.to_string(),
            seen.to_string(),
        )]
        .into(),
    );
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn project() -> Project {
        serde_yaml_ng::from_str(include_str!("../../tests/fixtures/project/project.yaml"))
            .expect("fixture")
    }

    #[test]
    fn namespace_defaults_to_the_project_name_and_is_owned() {
        let mut p = project();
        p.spec.namespace = None;
        let ns = namespace(&p);
        assert_eq!(ns.name_any(), "shop");
        assert_eq!(ns.owner_references()[0].kind, "Project");
        assert_eq!(ns.owner_references()[0].controller, Some(true));
        assert!(namespace_belongs_to(&ns, &p));
    }

    #[test]
    fn the_namespace_enforces_restricted_pod_security_unless_configured() {
        let p = project();
        let labels = namespace(&p).labels().clone();
        for label in POD_SECURITY_LABELS {
            assert_eq!(labels.get(label).map(String::as_str), Some("restricted"));
        }
        assert_eq!(
            labels
                .get(crate::resources::MANAGED_BY_LABEL)
                .map(String::as_str),
            Some(crate::resources::MANAGED_BY_VALUE),
            "the ownership label the operator's admission policy checks"
        );
        let baseline = namespace_with_pod_security(&p, PodSecurityLevel::Baseline);
        assert_eq!(
            baseline
                .labels()
                .get(POD_SECURITY_LABELS[0])
                .map(String::as_str),
            Some("baseline")
        );

        let mut pool: DomainPool = serde_yaml_ng::from_str(
            "apiVersion: kapsa.dev/v1alpha1\nkind: DomainPool\nmetadata: {name: p}\nspec: {domains: [apps.example.com]}",
        )
        .unwrap();
        let flag = PodSecurityLevel::Baseline;
        assert_eq!(pod_security_level(None, flag), flag);
        assert_eq!(pod_security_level(Some(&pool), flag), flag);
        pool.spec.pod_security = Some(PodSecurityLevel::Privileged);
        assert_eq!(
            pod_security_level(Some(&pool), flag),
            PodSecurityLevel::Privileged,
            "the pool's setting wins over the operator's"
        );
    }

    #[test]
    fn a_foreign_namespace_is_not_adopted() {
        let p = project();
        let foreign = Namespace {
            metadata: ObjectMeta {
                name: Some("shop-prod".into()),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        assert!(!namespace_belongs_to(&foreign, &p));
        let mut other = namespace(&p);
        other
            .annotations_mut()
            .insert(OWNER_ANNOTATION.into(), "other".into());
        other.metadata.owner_references = None;
        assert!(!namespace_belongs_to(&other, &p));
    }

    #[test]
    fn the_builder_lives_in_the_build_namespace_with_the_push_and_git_copies() {
        let p = project();
        let build_ns = build_namespace(&p, PodSecurityLevel::Restricted);
        assert_eq!(build_ns.name_any(), "kapsa-build-shop");
        assert!(namespace_belongs_to(&build_ns, &p));
        assert_eq!(
            build_ns
                .labels()
                .get(BUILD_NAMESPACE_LABEL)
                .map(String::as_str),
            Some("shop")
        );
        let builder = builder_service_account(&p, true, true);
        assert_eq!(builder.namespace().as_deref(), Some("kapsa-build-shop"));
        let names: Vec<_> = builder
            .secrets
            .unwrap()
            .into_iter()
            .filter_map(|s| s.name)
            .collect();
        assert_eq!(names, [REGISTRY_SECRET, GIT_SECRET]);
        let runtime = runtime_service_account(&p, true);
        assert_eq!(runtime.namespace().as_deref(), Some("shop"));
        assert!(runtime.secrets.is_none(), "the runtime SA holds no secrets");
        assert_eq!(runtime.image_pull_secrets.unwrap()[0].name, REGISTRY_SECRET);
        assert_eq!(runtime.automount_service_account_token, Some(false));
        assert!(
            runtime_service_account(&p, false)
                .image_pull_secrets
                .is_none()
        );
        assert!(
            builder_service_account(&p, false, false)
                .secrets
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn builder_role_reads_only_named_secrets() {
        let role = builder_role(&project(), true, true);
        assert_eq!(role.namespace().as_deref(), Some("kapsa-build-shop"));
        let rules = role.rules.unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].verbs, vec!["get"]);
        assert_eq!(
            rules[0].resource_names.as_ref().unwrap(),
            &vec![REGISTRY_SECRET.to_string(), GIT_SECRET.to_string()]
        );
        assert!(
            builder_role(&project(), false, false)
                .rules
                .unwrap()
                .is_empty()
        );
        let binding = builder_role_binding(&project());
        assert_eq!(binding.namespace().as_deref(), Some("kapsa-build-shop"));
        assert_eq!(binding.subjects.unwrap()[0].name, BUILDER_SERVICE_ACCOUNT);
    }

    #[test]
    fn the_git_copy_keeps_the_type_and_names_the_server_for_kpack() {
        let source = Secret {
            metadata: ObjectMeta {
                name: Some("shop-git".into()),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/basic-auth".into()),
            data: Some(BTreeMap::from([(
                "password".into(),
                k8s_openapi::ByteString(b"token".to_vec()),
            )])),
            ..Secret::default()
        };
        let copy = git_secret(&project(), &source);
        assert_eq!(copy.name_any(), GIT_SECRET);
        assert_eq!(copy.namespace().as_deref(), Some("kapsa-build-shop"));
        assert_eq!(copy.type_.as_deref(), Some("kubernetes.io/basic-auth"));
        assert_eq!(copy.data, source.data);
        assert!(copy.annotations().contains_key(KPACK_GIT_ANNOTATION));
    }

    #[test]
    fn registry_secret_copies_data_but_not_metadata() {
        let source = Secret {
            metadata: ObjectMeta {
                name: Some("harbor-push".into()),
                annotations: Some(BTreeMap::from([("evil".into(), "x".into())])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            data: Some(BTreeMap::from([(
                ".dockerconfigjson".into(),
                k8s_openapi::ByteString(b"{}".to_vec()),
            )])),
            ..Secret::default()
        };
        let copy = push_secret(&project(), &source);
        assert_eq!(copy.namespace().as_deref(), Some("kapsa-build-shop"));
        let copy = pull_secret(&project(), &source);
        assert_eq!(
            copy.type_.as_deref(),
            Some("kubernetes.io/dockerconfigjson")
        );
        assert_eq!(copy.data, source.data);
        let annotations = copy.annotations();
        assert!(
            !annotations.contains_key("evil"),
            "source annotations are not copied"
        );
        assert_eq!(
            annotations.keys().collect::<Vec<_>>(),
            [DATA_DIGEST_ANNOTATION, SOURCE_VERSION_ANNOTATION]
        );
        assert_eq!(copy.namespace().as_deref(), Some("shop"));
        assert!(copy_matches(&copy, &source_version(&source.metadata)));
        let mut edited = copy.clone();
        edited.data = Some(BTreeMap::from([(
            ".dockerconfigjson".into(),
            k8s_openapi::ByteString(b"{\"auths\":{}}".to_vec()),
        )]));
        assert!(
            !copy_matches(&edited, &source_version(&source.metadata)),
            "an edited copy"
        );
        assert!(!copy_matches(&copy, "other-uid/1"), "a changed source");
    }

    #[test]
    fn quota_only_when_asked() {
        let mut p = project();
        assert!(resource_quota(&p).is_some());
        p.spec.resource_quota = None;
        assert!(resource_quota(&p).is_none());
    }

    #[test]
    fn production_environment_follows_the_production_branch() {
        let env = production_environment(&project(), Some("abc"), Some("shop.apps.example.com"));
        assert_eq!(env.name_any(), "production");
        assert_eq!(env.namespace().as_deref(), Some("shop"));
        assert_eq!(env.spec.branch.as_deref(), Some("main"));
        assert_eq!(env.spec.commit.as_deref(), Some("abc"));
        assert_eq!(env.spec.type_, EnvironmentType::Production);
        assert_eq!(env.owner_references()[0].name, "shop");
    }
}

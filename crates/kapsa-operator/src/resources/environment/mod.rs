//! Environment children: the kpack `Image` that builds it, its Deployment,
//! Service, Ingress and ServiceMonitor, and the per-Project wildcard Certificate used under
//! a DNS01 DomainPool.
//!
//! Everything here is a pure function of [`EnvironmentInputs`]: the
//! reconciler fetches the Project, Environment, DomainPool and base domain,
//! and server-side applies what these return (field manager
//! [`FIELD_MANAGER`](super::FIELD_MANAGER)). No object carries `status`,
//! `resourceVersion` or `managedFields`.
//!
//! Security: the only annotation value that can reach an Ingress is the
//! DomainPool's ClusterIssuer name, written by a cluster admin. The host
//! comes only from `environment.spec.host` and must be a DNS name inside the
//! Project's own subtree of its base domain (`<project>.<base>` or
//! `*.<project>.<base>`), so an Environment can never claim a host of
//! another Project or outside the pool.
//!
//! The builders are split by object family, all re-exported here: `build`
//! (the kpack `Image`), `workload` (Deployment and Service), `routing`
//! (Ingress, URL, TLS Secret), `gateway` (HTTPRoute, per-host Certificate
//! and the Project's ListenerSet under Gateway API routing), `certificates`
//! (the DNS01 wildcard Certificate) and `monitoring` (the ServiceMonitor). This module holds what they share: [`EnvironmentInputs`],
//! the names, labels and metadata of every child, and commit handling.

mod build;
mod certificates;
mod dockerfile;
mod gateway;
mod monitoring;
mod routing;
mod workload;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kapsa_api::{DomainPool, Environment, Project};
use kube::ResourceExt;

use super::{controller_reference, environment_labels};

pub use build::{BUILDER_SERVICE_ACCOUNT, image_repository, kpack_image, kpack_image_api_resource};
pub use certificates::{
    certificate_api_resource, wildcard_certificate, wildcard_certificate_name, wildcard_secret_name,
};
pub use dockerfile::{
    BUILD_COMMIT_ANNOTATION, BUILD_CONTAINER, BUILD_HISTORY_LIMIT, BUILD_LABEL, BuildPods,
    DEFAULT_BUILDKIT_IMAGE, DOCKERFILE_BUILD, build_job, build_job_name,
};
pub use gateway::{
    APEX_LISTENER, GATEWAY_HTTP_PORT, GATEWAY_HTTPS_PORT, MAX_LISTENERS, WILDCARD_LISTENER,
    environment_listener, gateway_listener, gateway_routing, host_certificate, http_route,
    http_route_api_resource, listener_set, listener_set_api_resource, listener_set_name,
};
pub use monitoring::{service_monitor, service_monitor_api_resource};
pub use routing::{
    CLUSTER_ISSUER_ANNOTATION, environment_url, ingress, tls_certificate_name, tls_secret_name,
};
pub use workload::{
    APP_CONTAINER, COMMIT_ANNOTATION, METRICS_PORT_NAME, REVISION_HISTORY_LIMIT,
    RUNTIME_SERVICE_ACCOUNT, SERVICE_HTTP_PORT, SERVICE_METRICS_FALLBACK_PORT, deployment, service,
};

/// Name of the app's HTTP port (container and Service).
pub const HTTP_PORT_NAME: &str = "http";
/// Label with the short commit an object was made for.
pub const VERSION_LABEL: &str = "app.kubernetes.io/version";
/// Hex digits of a commit in the version label.
pub const SHORT_COMMIT_LEN: usize = 7;

/// Everything the builders need, fetched by the reconciler beforehand.
pub struct EnvironmentInputs<'a> {
    /// The Project (`spec.runtime`, `spec.build`, `spec.source`, name).
    pub project: &'a Project,
    /// The Environment: name, namespace (the project namespace), uid (owner
    /// references), `spec.host`, `spec.commit`.
    pub environment: &'a Environment,
    /// The Project's DomainPool: ingress class, ClusterIssuer, challenge.
    /// `None`: no Ingress.
    pub pool: Option<&'a DomainPool>,
    /// The Project's allocated base domain (`status.baseDomain`), e.g.
    /// `apps.example.com`. When set, the host must be inside
    /// `<project>.<base>`; it also names the DNS01 wildcard certificate.
    pub base_domain: Option<&'a str>,
}

/// The first [`SHORT_COMMIT_LEN`] digits of a full commit SHA (40 or 64
/// lower-case hex digits); `None` for anything else, so that only hex ever
/// reaches a label or annotation.
pub fn short_commit(commit: &str) -> Option<&str> {
    is_commit_sha(commit).then(|| &commit[..SHORT_COMMIT_LEN])
}

// ---------------------------------------------------------------------------

fn names(inputs: &EnvironmentInputs) -> (String, String) {
    (inputs.project.name_any(), inputs.environment.name_any())
}

/// The commit the Environment's objects are made for (branch environments).
fn environment_commit<'a>(inputs: &EnvironmentInputs<'a>) -> Option<&'a str> {
    inputs
        .environment
        .spec
        .commit
        .as_deref()
        .filter(|c| is_commit_sha(c))
}

fn is_commit_sha(commit: &str) -> bool {
    matches!(commit.len(), 40 | 64)
        && commit
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `environment_labels` plus the version label when the commit is known.
fn labels(inputs: &EnvironmentInputs, commit: Option<&str>) -> BTreeMap<String, String> {
    let (project_name, env_name) = names(inputs);
    let mut labels = environment_labels(&project_name, &env_name);
    if let Some(short) = commit.and_then(short_commit) {
        labels.insert(VERSION_LABEL.to_owned(), short.to_owned());
    }
    labels
}

/// Name, namespace, labels and controller reference of a child object.
/// Label on an Environment's kpack Image in the build namespace: the uid of
/// the Environment it builds for.
pub const ENVIRONMENT_UID_LABEL: &str = "kapsa.dev/environment-uid";

fn metadata(inputs: &EnvironmentInputs, commit: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(inputs.environment.name_any()),
        namespace: inputs.environment.namespace(),
        labels: Some(labels(inputs, commit)),
        owner_references: Some(vec![controller_reference(inputs.environment)]),
        ..ObjectMeta::default()
    }
}

/// Fixtures and assertions shared by the unit tests of every family.
#[cfg(test)]
mod test_support {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kapsa_api::{DomainPool, Environment, Project};
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    use super::{EnvironmentInputs, VERSION_LABEL};
    use crate::resources::environment_labels;

    pub(super) const PROJECT: &str =
        include_str!("../../../tests/fixtures/environment/project.yaml");
    pub(super) const PROJECT_MINIMAL: &str =
        include_str!("../../../tests/fixtures/environment/project-minimal.yaml");
    pub(super) const ENVIRONMENT: &str =
        include_str!("../../../tests/fixtures/environment/environment.yaml");
    pub(super) const ENVIRONMENT_MINIMAL: &str =
        include_str!("../../../tests/fixtures/environment/environment-minimal.yaml");
    pub(super) const HTTP01: &str = include_str!("../../../tests/fixtures/environment/http01.yaml");
    pub(super) const DNS01: &str = include_str!("../../../tests/fixtures/environment/dns01.yaml");
    pub(super) const NO_ISSUER: &str =
        include_str!("../../../tests/fixtures/environment/no-issuer.yaml");
    pub(super) const REGISTRY: &str =
        include_str!("../../../tests/fixtures/environment/registry.yaml");

    pub(super) const BASE: &str = "apps.example.com";
    pub(super) const COMMIT: &str = "3f2a9c1d4e5b6a7980a1b2c3d4e5f60718293a4b";
    pub(super) const ENV_UID: &str = "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d";
    pub(super) const PROJECT_UID: &str = "2f0c6a4e-1b7d-4c1e-9a52-5d3f8e7b6a01";

    pub(super) fn load<T: DeserializeOwned>(yaml: &str) -> T {
        serde_yaml_ng::from_str(yaml).expect("fixture parses into the kapsa-api type")
    }

    pub(super) fn project() -> Project {
        load(PROJECT)
    }

    pub(super) fn environment() -> Environment {
        load(ENVIRONMENT)
    }

    pub(super) fn inputs<'a>(
        project: &'a Project,
        environment: &'a Environment,
        pool: Option<&'a DomainPool>,
    ) -> EnvironmentInputs<'a> {
        EnvironmentInputs {
            project,
            environment,
            pool,
            base_domain: Some(BASE),
        }
    }

    pub(super) fn env_with_host(host: &str) -> Environment {
        let mut env = environment();
        env.spec.host = Some(host.to_owned());
        env
    }

    pub(super) fn container(d: &Deployment) -> &Container {
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.containers.len(), 1);
        &pod.containers[0]
    }

    pub(super) fn pod_spec(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    /// The owner, namespace, name and labels every Environment child has.
    pub(super) fn assert_child_metadata(meta: &ObjectMeta, version: Option<&str>) {
        assert_eq!(meta.name.as_deref(), Some("production"));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        let owners = meta.owner_references.as_ref().expect("owner references");
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "Environment");
        assert_eq!(owners[0].api_version, "kapsa.dev/v1alpha1");
        assert_eq!(owners[0].name, "production");
        assert_eq!(owners[0].uid, ENV_UID);
        assert_eq!(owners[0].controller, Some(true));
        let labels = meta.labels.as_ref().expect("labels");
        for (k, v) in environment_labels("shop", "production") {
            assert_eq!(labels.get(&k), Some(&v), "label {k}");
        }
        assert_eq!(labels.get(VERSION_LABEL).map(String::as_str), version);
        assert!(meta.resource_version.is_none());
        assert!(meta.managed_fields.is_none());
        assert!(meta.uid.is_none());
    }

    /// Serialized form has type meta (for server-side apply) and no status.
    pub(super) fn assert_apply_ready(value: &Value, api_version: &str, kind: &str) {
        assert_eq!(value["apiVersion"], api_version);
        assert_eq!(value["kind"], kind);
        assert!(value.get("status").is_none(), "{value}");
        assert!(value["metadata"].get("resourceVersion").is_none());
        assert!(value["metadata"].get("managedFields").is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use kapsa_api::{Challenge, LocalObjectReference};

    #[test]
    fn fixtures_parse_with_their_contract_fields() {
        let p = project();
        assert_eq!(p.spec.runtime.replicas, 3);
        assert_eq!(
            p.spec.runtime.health_check.as_ref().unwrap().port,
            Some(8081)
        );
        let minimal: Project = load(PROJECT_MINIMAL);
        assert!(minimal.spec.build.builder_ref.is_none());
        assert_eq!(minimal.spec.runtime.port, kapsa_api::project::DEFAULT_PORT);
        let no_issuer: DomainPool = load(NO_ISSUER);
        assert_eq!(no_issuer.spec.ingress_class_name, "nginx");
        assert!(no_issuer.spec.cluster_issuer_ref.is_none());
        let dns: DomainPool = load(DNS01);
        assert_eq!(dns.spec.challenge, Challenge::DNS01);
    }

    #[test]
    fn non_hex_commit_never_reaches_labels_or_annotations() {
        assert_eq!(short_commit(COMMIT), Some("3f2a9c1"));
        assert_eq!(short_commit(&"c".repeat(64)), Some("ccccccc"));
        assert_eq!(short_commit("3f2a9c1"), None, "abbreviated");
        assert_eq!(short_commit(&"G".repeat(40)), None);
        let p = project();
        let mut e = environment();
        e.spec.commit = Some(format!("{}\"; x", "a".repeat(36)));
        let d = deployment(&inputs(&p, &e, None), "img");
        assert!(!d.metadata.labels.unwrap().contains_key(VERSION_LABEL));
        let template = d.spec.unwrap().template.metadata.unwrap();
        assert!(template.annotations.is_none());
    }

    /// The ingress-nginx annotation-injection class of bugs: nothing a
    /// developer writes in a Project or Environment may reach an annotation.
    #[test]
    fn user_strings_never_reach_annotations() {
        const MARK: &str = "pwned";
        let evil = format!(
            "/x\"; }} location /{MARK} {{ proxy_pass http://169.254.169.254; }} #\nnginx.ingress.kubernetes.io/server-snippet: {MARK}"
        );
        let mut p = project();
        p.spec.runtime.health_check.as_mut().unwrap().path = evil.clone();
        p.spec.runtime.metrics.as_mut().unwrap().path = evil.clone();
        p.spec.runtime.config_map_refs = vec![LocalObjectReference::new(format!("{MARK}-cm"))];
        p.spec.runtime.secret_refs = vec![LocalObjectReference::new(format!("{MARK}-secret"))];
        p.spec.source.context_dir = Some(format!("{MARK}/dir"));
        p.spec.source.git.url = format!("https://{MARK}.example.com/{MARK}.git");
        let mut e = environment();
        e.spec.branch = Some(format!("{MARK}/branch"));

        for fixture in [HTTP01, DNS01, NO_ISSUER] {
            let pool: DomainPool = load(fixture);
            let i = inputs(&p, &e, Some(&pool));
            let ing = ingress(&i).expect("ingress");
            let annotations = ing.metadata.annotations.clone().unwrap_or_default();
            let allowed: Vec<&str> = match pool.spec.challenge {
                Challenge::HTTP01 if pool.spec.cluster_issuer_ref.is_some() => {
                    vec![CLUSTER_ISSUER_ANNOTATION]
                }
                _ => vec![],
            };
            assert_eq!(
                annotations.keys().map(String::as_str).collect::<Vec<_>>(),
                allowed,
                "{fixture}"
            );
            if let Some(value) = annotations.get(CLUSTER_ISSUER_ANNOTATION) {
                assert_eq!(
                    Some(value),
                    pool.spec.cluster_issuer_ref.as_ref().map(|r| &r.name)
                );
            }
            // Nothing user-written appears anywhere in the Ingress.
            let text = serde_json::to_string(&ing).unwrap();
            assert!(!text.contains(MARK), "{text}");
            assert!(!text.contains("nginx.ingress.kubernetes.io"), "{text}");

            // Nor in any annotation of the other children.
            let d = deployment(&i, "img");
            let s = service(&i);
            let k = kpack_image(&i, "r", COMMIT);
            let mut all = vec![
                d.metadata.annotations.clone(),
                d.spec
                    .as_ref()
                    .unwrap()
                    .template
                    .metadata
                    .as_ref()
                    .unwrap()
                    .annotations
                    .clone(),
                s.metadata.annotations.clone(),
                k.metadata.annotations.clone(),
            ];
            if let Some(cert) = wildcard_certificate(&p, "shop", &pool, BASE) {
                all.push(cert.metadata.annotations.clone());
            }
            for map in all.into_iter().flatten() {
                for (key, value) in &map {
                    assert!(!key.starts_with("nginx.ingress.kubernetes.io"), "{key}");
                    assert!(
                        !key.contains(MARK) && !value.contains(MARK),
                        "{key}={value}"
                    );
                    assert!(key == COMMIT_ANNOTATION, "unexpected annotation {key}");
                }
            }
            // The strings do reach the fields they belong in (the test has teeth).
            let probe = container(&d).readiness_probe.clone().unwrap();
            assert_eq!(probe.http_get.unwrap().path.as_deref(), Some(evil.as_str()));
        }
    }
}

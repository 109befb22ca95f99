//! Environment children: the kpack `Image` that builds it, its Deployment,
//! Service and Ingress, and the per-Project wildcard Certificate used under
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

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapEnvSource, Container, ContainerPort, EnvFromSource, EnvVar,
    HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements as CoreResourceRequirements, SeccompProfile, SecretEnvSource,
    SecurityContext, Service, ServicePort, ServiceSpec, TCPSocketAction,
};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, IngressTLS, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kapsa_api::naming::is_dns_name;
use kapsa_api::project::DEFAULT_BUILDER_NAME;
use kapsa_api::{BuilderKind, Challenge, DomainPool, Environment, Project, RegistrySpec};
use kube::ResourceExt;
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde_json::json;

use super::{controller_reference, environment_labels, project_labels, selector_labels};

/// ServiceAccount the app's pods run as (created by the Project reconciler,
/// with the registry pull secret attached).
pub const RUNTIME_SERVICE_ACCOUNT: &str = "kapsa-runtime";
/// ServiceAccount kpack builds run as (created by the Project reconciler,
/// with the registry push and git secrets attached).
pub const BUILDER_SERVICE_ACCOUNT: &str = "kapsa-builder";

/// Name of the app container in the Deployment.
pub const APP_CONTAINER: &str = "app";
/// Name of the app's HTTP port (container and Service).
pub const HTTP_PORT_NAME: &str = "http";
/// Name of the app's metrics port (container and Service), with `runtime.metrics`.
pub const METRICS_PORT_NAME: &str = "metrics";
/// Port of the Service in front of the app.
pub const SERVICE_HTTP_PORT: i32 = 80;
/// Service port used for metrics when `runtime.metrics.port` is 80 (which
/// the HTTP port of the Service already takes).
pub const SERVICE_METRICS_FALLBACK_PORT: i32 = 9090;
/// Label with the short commit an object was made for.
pub const VERSION_LABEL: &str = "app.kubernetes.io/version";
/// Pod-template annotation with the full commit the pods run.
pub const COMMIT_ANNOTATION: &str = "kapsa.dev/commit";
/// The cert-manager ingress-shim annotation (HTTP01 pools).
pub const CLUSTER_ISSUER_ANNOTATION: &str = "cert-manager.io/cluster-issuer";
/// Hex digits of a commit in the version label.
pub const SHORT_COMMIT_LEN: usize = 7;
/// Revisions of the Deployment kept for `kubectl rollout undo`.
pub const REVISION_HISTORY_LIMIT: i32 = 10;

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

/// The image repository of a project in a registry:
/// `<server>/<repository>/<project>`, or `<server>/<project>` without a
/// repository.
pub fn image_repository(registry: &RegistrySpec, project: &str) -> String {
    let server = registry.server.trim_end_matches('/');
    match registry
        .repository
        .as_deref()
        .map(|r| r.trim_matches('/'))
        .filter(|r| !r.is_empty())
    {
        Some(repository) => format!("{server}/{repository}/{project}"),
        None => format!("{server}/{project}"),
    }
}

/// The API resource of a kpack `Image` (`kpack.io/v1alpha2`).
pub fn kpack_image_api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kpack.io", "v1alpha2", "Image"),
        "images",
    )
}

/// The API resource of a cert-manager `Certificate` (`cert-manager.io/v1`).
pub fn certificate_api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
        "certificates",
    )
}

/// The kpack `Image` that builds `commit` of the Environment's branch into
/// `<repository>:<environment>`. One per Environment, so successive builds
/// reuse kpack's cache. `repository` is [`image_repository`].
pub fn kpack_image(inputs: &EnvironmentInputs, repository: &str, commit: &str) -> DynamicObject {
    let project = inputs.project;
    let env_name = inputs.environment.name_any();
    let (builder_kind, builder_name) = match &project.spec.build.builder_ref {
        Some(builder) => (builder.kind, builder.name.as_str()),
        None => (BuilderKind::ClusterBuilder, DEFAULT_BUILDER_NAME),
    };
    let builder_kind = match builder_kind {
        BuilderKind::ClusterBuilder => "ClusterBuilder",
        BuilderKind::Builder => "Builder",
    };
    let mut source = json!({
        "git": {
            "url": project.spec.source.git.url,
            "revision": commit,
        }
    });
    if let Some(dir) = context_dir(project) {
        source["subPath"] = json!(dir);
    }
    let spec = json!({
        "tag": format!("{repository}:{env_name}"),
        "serviceAccountName": BUILDER_SERVICE_ACCOUNT,
        "builder": {"kind": builder_kind, "name": builder_name},
        "source": source,
    });
    let mut image =
        DynamicObject::new(&env_name, &kpack_image_api_resource()).data(json!({ "spec": spec }));
    image.metadata = metadata(inputs, Some(commit));
    image
}

/// The Deployment running `image`.
pub fn deployment(inputs: &EnvironmentInputs, image: &str) -> Deployment {
    let (project_name, env_name) = names(inputs);
    let runtime = &inputs.project.spec.runtime;
    let commit = environment_commit(inputs);

    let mut ports = vec![container_port(HTTP_PORT_NAME, runtime.port)];
    if let Some(port) = separate_metrics_port(inputs) {
        ports.push(container_port(METRICS_PORT_NAME, port));
    }

    let probe = probe(inputs);
    let env_from: Vec<EnvFromSource> = runtime
        .config_map_refs
        .iter()
        .map(|r| EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: r.name.clone(),
                optional: None,
            }),
            ..EnvFromSource::default()
        })
        .chain(runtime.secret_refs.iter().map(|r| EnvFromSource {
            secret_ref: Some(SecretEnvSource {
                name: r.name.clone(),
                optional: None,
            }),
            ..EnvFromSource::default()
        }))
        .collect();

    let resources = runtime.resources.as_ref().and_then(|r| {
        let requests = (!r.requests.is_empty()).then(|| r.requests.clone());
        let limits = (!r.limits.is_empty()).then(|| r.limits.clone());
        (requests.is_some() || limits.is_some()).then(|| CoreResourceRequirements {
            requests,
            limits,
            ..CoreResourceRequirements::default()
        })
    });

    let container = Container {
        name: APP_CONTAINER.to_owned(),
        image: Some(image.to_owned()),
        ports: Some(ports),
        env: Some(vec![EnvVar {
            name: "PORT".to_owned(),
            value: Some(runtime.port.to_string()),
            value_from: None,
        }]),
        env_from: (!env_from.is_empty()).then_some(env_from),
        resources,
        readiness_probe: Some(probe.clone()),
        liveness_probe: Some(probe),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };

    let mut template_annotations = BTreeMap::new();
    if let Some(commit) = commit {
        template_annotations.insert(COMMIT_ANNOTATION.to_owned(), commit.to_owned());
    }

    Deployment {
        metadata: metadata(inputs, commit),
        spec: Some(DeploymentSpec {
            replicas: Some(runtime.replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(&project_name, &env_name)),
                match_expressions: None,
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".to_owned()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            revision_history_limit: Some(REVISION_HISTORY_LIMIT),
            min_ready_seconds: Some(0),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(inputs, commit)),
                    annotations: (!template_annotations.is_empty()).then_some(template_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    service_account_name: Some(RUNTIME_SERVICE_ACCOUNT.to_owned()),
                    automount_service_account_token: Some(false),
                    // Service links put every Service of the namespace into
                    // the app's environment; the app gets PORT and envFrom only.
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        seccomp_profile: Some(runtime_default_seccomp()),
                        ..PodSecurityContext::default()
                    }),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

/// The ClusterIP Service in front of the Deployment: port 80 → `http`, plus
/// `metrics` with `runtime.metrics`.
pub fn service(inputs: &EnvironmentInputs) -> Service {
    let (project_name, env_name) = names(inputs);
    let mut ports = vec![service_port(
        HTTP_PORT_NAME,
        SERVICE_HTTP_PORT,
        HTTP_PORT_NAME,
    )];
    if let Some(metrics) = &inputs.project.spec.runtime.metrics {
        let port = if metrics.port == SERVICE_HTTP_PORT {
            SERVICE_METRICS_FALLBACK_PORT
        } else {
            metrics.port
        };
        // Metrics on the HTTP port have no container port of their own.
        let target = if separate_metrics_port(inputs).is_some() {
            METRICS_PORT_NAME
        } else {
            HTTP_PORT_NAME
        };
        ports.push(service_port(METRICS_PORT_NAME, port, target));
    }
    Service {
        metadata: metadata(inputs, environment_commit(inputs)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector_labels(&project_name, &env_name)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The Ingress for the Environment's host. `None` without a pool, without a
/// host, or with a host that is not a DNS name inside `<project>.<base>`.
pub fn ingress(inputs: &EnvironmentInputs) -> Option<Ingress> {
    let plan = ingress_plan(inputs)?;
    let pool = inputs.pool?;
    let (_, env_name) = names(inputs);

    let mut meta = metadata(inputs, environment_commit(inputs));
    let tls = match &plan.tls {
        Tls::None => None,
        Tls::PerHost { issuer } => {
            meta.annotations = Some(BTreeMap::from([(
                CLUSTER_ISSUER_ANNOTATION.to_owned(),
                (*issuer).to_owned(),
            )]));
            Some(per_host_secret_name(&env_name))
        }
        Tls::Wildcard => Some(wildcard_secret_name(&inputs.project.name_any())),
    }
    .map(|secret_name| {
        vec![IngressTLS {
            hosts: Some(vec![plan.host.to_owned()]),
            secret_name: Some(secret_name),
        }]
    });

    Some(Ingress {
        metadata: meta,
        spec: Some(IngressSpec {
            ingress_class_name: Some(pool.spec.ingress_class_name.clone()),
            rules: Some(vec![IngressRule {
                host: Some(plan.host.to_owned()),
                http: Some(HTTPIngressRuleValue {
                    paths: vec![HTTPIngressPath {
                        path: Some("/".to_owned()),
                        path_type: "Prefix".to_owned(),
                        backend: IngressBackend {
                            service: Some(IngressServiceBackend {
                                name: env_name,
                                port: Some(ServiceBackendPort {
                                    name: Some(HTTP_PORT_NAME.to_owned()),
                                    number: None,
                                }),
                            }),
                            resource: None,
                        },
                    }],
                }),
            }]),
            tls,
            default_backend: None,
        }),
        status: None,
    })
}

/// The Secret the Ingress's TLS uses: `<environment>-tls` (a per-host
/// certificate issued by cert-manager's ingress-shim) or
/// `<project>-wildcard-tls` (the Project's DNS01 wildcard certificate).
/// `None`: no TLS (or no Ingress).
pub fn tls_secret_name(inputs: &EnvironmentInputs) -> Option<String> {
    match ingress_plan(inputs)?.tls {
        Tls::None => None,
        Tls::PerHost { .. } => Some(per_host_secret_name(&inputs.environment.name_any())),
        Tls::Wildcard => Some(wildcard_secret_name(&inputs.project.name_any())),
    }
}

/// The cert-manager Certificate behind the Ingress's TLS, to watch for the
/// `TLSReady` condition: the Secret's name for a per-host certificate
/// (ingress-shim names the Certificate after `secretName`), or
/// [`wildcard_certificate_name`] for the Project's DNS01 wildcard. `None`:
/// no TLS. Pass the same `base_domain` as for [`ingress`]: under DNS01 a host
/// the wildcard does not cover gets a per-host certificate.
pub fn tls_certificate_name(inputs: &EnvironmentInputs) -> Option<String> {
    match ingress_plan(inputs)?.tls {
        Tls::None => None,
        Tls::PerHost { .. } => Some(per_host_secret_name(&inputs.environment.name_any())),
        Tls::Wildcard => Some(wildcard_certificate_name(&inputs.project.name_any())),
    }
}

/// The URL the Environment is served at: `https://<host>` with TLS,
/// `http://<host>` when the pool has no issuer, `None` without an Ingress.
pub fn environment_url(inputs: &EnvironmentInputs) -> Option<String> {
    let plan = ingress_plan(inputs)?;
    let scheme = match plan.tls {
        Tls::None => "http",
        Tls::PerHost { .. } | Tls::Wildcard => "https",
    };
    Some(format!("{scheme}://{}", plan.host))
}

/// Name of a Project's DNS01 wildcard Certificate: `<project>-wildcard`.
pub fn wildcard_certificate_name(project: &str) -> String {
    format!("{project}-wildcard")
}

/// Name of the Secret of a Project's DNS01 wildcard Certificate:
/// `<project>-wildcard-tls`.
pub fn wildcard_secret_name(project: &str) -> String {
    format!("{project}-wildcard-tls")
}

/// The Project's wildcard Certificate under a DNS01 pool, in `namespace`
/// (the project namespace): `*.<project>.<base>` and `<project>.<base>`,
/// shared by all its Environments. `None` unless the pool is DNS01 with a
/// ClusterIssuer and the names are valid DNS names.
pub fn wildcard_certificate(
    project: &Project,
    namespace: &str,
    pool: &DomainPool,
    base_domain: &str,
) -> Option<DynamicObject> {
    if pool.spec.challenge != Challenge::DNS01 {
        return None;
    }
    let issuer = issuer_name(pool)?;
    let project_name = project.name_any();
    let apex = format!("{project_name}.{base_domain}");
    if !is_dns_name(&project_name) || !is_dns_name(base_domain) || !is_dns_name(&apex) {
        return None;
    }
    let spec = json!({
        "secretName": wildcard_secret_name(&project_name),
        "dnsNames": [format!("*.{apex}"), apex],
        "issuerRef": {
            "name": issuer,
            "kind": "ClusterIssuer",
            "group": "cert-manager.io",
        },
    });
    let mut cert = DynamicObject::new(
        &wildcard_certificate_name(&project_name),
        &certificate_api_resource(),
    )
    .within(namespace)
    .data(json!({ "spec": spec }));
    cert.metadata.labels = Some(project_labels(&project_name));
    cert.metadata.owner_references = Some(vec![controller_reference(project)]);
    Some(cert)
}

/// The first [`SHORT_COMMIT_LEN`] digits of a full commit SHA (40 or 64
/// lower-case hex digits); `None` for anything else, so that only hex ever
/// reaches a label or annotation.
pub fn short_commit(commit: &str) -> Option<&str> {
    is_commit_sha(commit).then(|| &commit[..SHORT_COMMIT_LEN])
}

// ---------------------------------------------------------------------------

/// How the Ingress of an Environment is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls<'a> {
    /// Plain HTTP: the pool has no ClusterIssuer.
    None,
    /// A certificate for this host from cert-manager's ingress-shim.
    PerHost { issuer: &'a str },
    /// The Project's shared DNS01 wildcard certificate.
    Wildcard,
}

struct IngressPlan<'a> {
    host: &'a str,
    tls: Tls<'a>,
}

/// The host and TLS scheme of the Environment's Ingress, or `None` when it
/// gets no Ingress. The single source of truth for [`ingress`],
/// [`tls_secret_name`] and [`environment_url`].
fn ingress_plan<'a>(inputs: &EnvironmentInputs<'a>) -> Option<IngressPlan<'a>> {
    let pool = inputs.pool?;
    let host = inputs.environment.spec.host.as_deref()?;
    if !is_dns_name(host) {
        return None;
    }
    let project_name = inputs.project.name_any();
    let apex = inputs
        .base_domain
        .map(|base| format!("{project_name}.{base}"));
    // Only the Project's own subtree of its base: `<project>.<base>` or
    // `<labels>.<project>.<base>`. Anything else under the base may be (or
    // become) another Project's host.
    let label_prefix = match &apex {
        Some(apex) if host == apex => Some(""),
        Some(apex) => Some(
            host.strip_suffix(apex.as_str())?
                .strip_suffix('.')
                .filter(|p| !p.is_empty())?,
        ),
        None => None,
    };
    let tls = match pool.spec.cluster_issuer_ref.as_ref() {
        None => Tls::None,
        Some(issuer_ref) => {
            // Admin-written and schema-validated; an odd value is refused
            // rather than downgraded to plain HTTP or put in an annotation.
            if !is_dns_name(&issuer_ref.name) {
                return None;
            }
            let issuer = issuer_ref.name.as_str();
            match pool.spec.challenge {
                Challenge::HTTP01 => Tls::PerHost { issuer },
                // The wildcard covers `<project>.<base>` and one more label.
                // A deeper host (or an unknown base) gets its own
                // certificate from the same issuer, which has a DNS01 solver.
                Challenge::DNS01 => match label_prefix {
                    Some(prefix) if !prefix.contains('.') => Tls::Wildcard,
                    _ => Tls::PerHost { issuer },
                },
            }
        }
    };
    Some(IngressPlan { host, tls })
}

fn per_host_secret_name(environment: &str) -> String {
    format!("{environment}-tls")
}

fn issuer_name(pool: &DomainPool) -> Option<&str> {
    pool.spec
        .cluster_issuer_ref
        .as_ref()
        .map(|r| r.name.as_str())
        .filter(|name| is_dns_name(name))
}

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
fn metadata(inputs: &EnvironmentInputs, commit: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(inputs.environment.name_any()),
        namespace: inputs.environment.namespace(),
        labels: Some(labels(inputs, commit)),
        owner_references: Some(vec![controller_reference(inputs.environment)]),
        ..ObjectMeta::default()
    }
}

fn context_dir(project: &Project) -> Option<&str> {
    project
        .spec
        .source
        .context_dir
        .as_deref()
        .map(|d| d.trim_matches('/'))
        .filter(|d| !d.is_empty() && *d != ".")
}

/// The metrics port when it needs a container port of its own (it is set
/// and differs from the HTTP port).
fn separate_metrics_port(inputs: &EnvironmentInputs) -> Option<i32> {
    let runtime = &inputs.project.spec.runtime;
    runtime
        .metrics
        .as_ref()
        .map(|m| m.port)
        .filter(|port| *port != runtime.port)
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn service_port(name: &str, port: i32, target: &str) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::String(target.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..ServicePort::default()
    }
}

/// Readiness and liveness probe: HTTP GET on `healthCheck`, or a TCP check
/// on the app port without one.
fn probe(inputs: &EnvironmentInputs) -> Probe {
    let runtime = &inputs.project.spec.runtime;
    match &runtime.health_check {
        Some(check) => Probe {
            http_get: Some(HTTPGetAction {
                path: Some(check.path.clone()),
                port: IntOrString::Int(check.port.unwrap_or(runtime.port)),
                scheme: Some("HTTP".to_owned()),
                ..HTTPGetAction::default()
            }),
            initial_delay_seconds: check.initial_delay_seconds,
            period_seconds: check.period_seconds,
            failure_threshold: check.failure_threshold,
            ..Probe::default()
        },
        None => Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(runtime.port),
                host: None,
            }),
            ..Probe::default()
        },
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        localhost_profile: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use kapsa_api::{ClusterRegistry, HealthCheck, LocalObjectReference, MetricsSpec};
    use serde::de::DeserializeOwned;
    use serde_json::Value;

    const PROJECT: &str = include_str!("../../tests/fixtures/environment/project.yaml");
    const PROJECT_MINIMAL: &str =
        include_str!("../../tests/fixtures/environment/project-minimal.yaml");
    const ENVIRONMENT: &str = include_str!("../../tests/fixtures/environment/environment.yaml");
    const ENVIRONMENT_MINIMAL: &str =
        include_str!("../../tests/fixtures/environment/environment-minimal.yaml");
    const HTTP01: &str = include_str!("../../tests/fixtures/environment/http01.yaml");
    const DNS01: &str = include_str!("../../tests/fixtures/environment/dns01.yaml");
    const NO_ISSUER: &str = include_str!("../../tests/fixtures/environment/no-issuer.yaml");
    const REGISTRY: &str = include_str!("../../tests/fixtures/environment/registry.yaml");

    const BASE: &str = "apps.example.com";
    const COMMIT: &str = "3f2a9c1d4e5b6a7980a1b2c3d4e5f60718293a4b";
    const ENV_UID: &str = "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d";
    const PROJECT_UID: &str = "2f0c6a4e-1b7d-4c1e-9a52-5d3f8e7b6a01";

    fn load<T: DeserializeOwned>(yaml: &str) -> T {
        serde_yaml_ng::from_str(yaml).expect("fixture parses into the kapsa-api type")
    }

    fn project() -> Project {
        load(PROJECT)
    }

    fn environment() -> Environment {
        load(ENVIRONMENT)
    }

    fn inputs<'a>(
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

    fn env_with_host(host: &str) -> Environment {
        let mut env = environment();
        env.spec.host = Some(host.to_owned());
        env
    }

    fn container(d: &Deployment) -> &Container {
        let pod = d.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.containers.len(), 1);
        &pod.containers[0]
    }

    fn pod_spec(d: &Deployment) -> &PodSpec {
        d.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    /// The owner, namespace, name and labels every Environment child has.
    fn assert_child_metadata(meta: &ObjectMeta, version: Option<&str>) {
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
    fn assert_apply_ready(value: &Value, api_version: &str, kind: &str) {
        assert_eq!(value["apiVersion"], api_version);
        assert_eq!(value["kind"], kind);
        assert!(value.get("status").is_none(), "{value}");
        assert!(value["metadata"].get("resourceVersion").is_none());
        assert!(value["metadata"].get("managedFields").is_none());
    }

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
    fn image_repository_with_and_without_repository() {
        let registry: ClusterRegistry = load(REGISTRY);
        assert_eq!(
            image_repository(&registry.spec, "shop"),
            "harbor.example.com/team/kapsa/shop"
        );
        let mut spec = registry.spec.clone();
        spec.repository = None;
        assert_eq!(image_repository(&spec, "shop"), "harbor.example.com/shop");
        spec.server = "registry.local:5000".to_owned();
        spec.repository = Some("kapsa".to_owned());
        assert_eq!(
            image_repository(&spec, "blog"),
            "registry.local:5000/kapsa/blog"
        );
    }

    #[test]
    fn deployment_metadata_owner_and_type_meta() {
        let (p, e) = (project(), environment());
        let d = deployment(
            &inputs(&p, &e, None),
            "harbor.example.com/kapsa/shop@sha256:ab",
        );
        assert_child_metadata(&d.metadata, Some("3f2a9c1"));
        assert!(d.status.is_none());
        let value = serde_json::to_value(&d).unwrap();
        assert_apply_ready(&value, "apps/v1", "Deployment");
        assert!(d.metadata.annotations.is_none());
    }

    #[test]
    fn deployment_rolls_out_without_dropping_ready_replicas() {
        let (p, e) = (project(), environment());
        let d = deployment(&inputs(&p, &e, None), "img");
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(3));
        let strategy = spec.strategy.as_ref().unwrap();
        assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
        let rolling = strategy.rolling_update.as_ref().unwrap();
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
        assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
        assert_eq!(spec.revision_history_limit, Some(10));
        assert_eq!(spec.min_ready_seconds, Some(0));
    }

    #[test]
    fn deployment_selector_is_stable_and_inside_template_labels() {
        let (p, e) = (project(), environment());
        let d = deployment(&inputs(&p, &e, None), "img");
        let spec = d.spec.as_ref().unwrap();
        let selector = spec.selector.match_labels.as_ref().unwrap();
        assert_eq!(selector, &selector_labels("shop", "production"));
        assert!(!selector.contains_key(VERSION_LABEL));
        assert!(spec.selector.match_expressions.is_none());
        let template = spec.template.metadata.as_ref().unwrap();
        let template_labels = template.labels.as_ref().unwrap();
        for (k, v) in selector {
            assert_eq!(template_labels.get(k), Some(v), "selector label {k}");
        }
        assert_eq!(
            template_labels.get(VERSION_LABEL).map(String::as_str),
            Some("3f2a9c1")
        );
        assert_eq!(
            template.annotations,
            Some(BTreeMap::from([(
                COMMIT_ANNOTATION.to_owned(),
                COMMIT.to_owned()
            )]))
        );

        // A new commit changes the version, never the selector.
        let mut next = environment();
        next.spec.commit = Some("b".repeat(40));
        let d2 = deployment(&inputs(&p, &next, None), "img2");
        let spec2 = d2.spec.as_ref().unwrap();
        assert_eq!(spec2.selector, spec.selector);
        assert_eq!(
            spec2
                .template
                .metadata
                .as_ref()
                .unwrap()
                .labels
                .as_ref()
                .unwrap()[VERSION_LABEL],
            "bbbbbbb"
        );
    }

    #[test]
    fn deployment_container_ports_env_and_resources() {
        let (p, e) = (project(), environment());
        let d = deployment(
            &inputs(&p, &e, None),
            "harbor.example.com/kapsa/shop@sha256:ab",
        );
        let c = container(&d);
        assert_eq!(c.name, "app");
        assert_eq!(
            c.image.as_deref(),
            Some("harbor.example.com/kapsa/shop@sha256:ab")
        );
        let ports: Vec<(Option<&str>, i32)> = c
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref(), p.container_port))
            .collect();
        assert_eq!(ports, [(Some("http"), 8080), (Some("metrics"), 9090)]);
        let env = c.env.as_ref().unwrap();
        assert_eq!(env.len(), 1);
        assert_eq!(env[0].name, "PORT");
        assert_eq!(env[0].value.as_deref(), Some("8080"));

        let env_from = c.env_from.as_ref().unwrap();
        let refs: Vec<(&str, &str)> = env_from
            .iter()
            .map(|s| match (&s.config_map_ref, &s.secret_ref) {
                (Some(cm), None) => ("configMap", cm.name.as_str()),
                (None, Some(sec)) => ("secret", sec.name.as_str()),
                other => panic!("one source per entry: {other:?}"),
            })
            .collect();
        assert_eq!(
            refs,
            [
                ("configMap", "shop-config"),
                ("configMap", "shop-flags"),
                ("secret", "shop-secrets")
            ]
        );
        assert!(env_from.iter().all(|s| s.prefix.is_none()));

        let resources = c.resources.as_ref().unwrap();
        let requests = resources.requests.as_ref().unwrap();
        assert_eq!(requests["cpu"], Quantity("100m".to_owned()));
        assert_eq!(requests["memory"], Quantity("128Mi".to_owned()));
        let limits = resources.limits.as_ref().unwrap();
        assert_eq!(limits["memory"], Quantity("256Mi".to_owned()));
        assert_eq!(limits["ephemeral-storage"], Quantity("1Gi".to_owned()));
        assert!(!limits.contains_key("cpu"));
    }

    #[test]
    fn deployment_http_probes_from_health_check() {
        let (p, e) = (project(), environment());
        let d = deployment(&inputs(&p, &e, None), "img");
        let c = container(&d);
        for probe in [c.readiness_probe.as_ref(), c.liveness_probe.as_ref()] {
            let probe = probe.expect("probe");
            let get = probe.http_get.as_ref().expect("httpGet");
            assert_eq!(get.path.as_deref(), Some("/healthz"));
            assert_eq!(get.port, IntOrString::Int(8081));
            assert!(probe.tcp_socket.is_none());
            assert_eq!(probe.initial_delay_seconds, Some(5));
            assert_eq!(probe.period_seconds, Some(15));
            assert_eq!(probe.failure_threshold, Some(4));
        }

        // Without healthCheck.port, the app port; unset timings stay unset.
        let mut p2 = project();
        p2.spec.runtime.health_check = Some(HealthCheck {
            path: "/ready".to_owned(),
            port: None,
            initial_delay_seconds: None,
            period_seconds: None,
            failure_threshold: None,
        });
        let d = deployment(&inputs(&p2, &e, None), "img");
        let probe = container(&d).readiness_probe.clone().unwrap();
        let get = probe.http_get.unwrap();
        assert_eq!(get.port, IntOrString::Int(8080));
        assert_eq!(get.path.as_deref(), Some("/ready"));
        assert_eq!(probe.period_seconds, None);
        assert_eq!(probe.failure_threshold, None);
    }

    #[test]
    fn deployment_tcp_probes_and_defaults_without_health_check() {
        let p: Project = load(PROJECT_MINIMAL);
        let e: Environment = load(ENVIRONMENT_MINIMAL);
        let d = deployment(&inputs(&p, &e, None), "img");
        let c = container(&d);
        for probe in [c.readiness_probe.as_ref(), c.liveness_probe.as_ref()] {
            let probe = probe.expect("probe");
            assert!(probe.http_get.is_none());
            let tcp = probe.tcp_socket.as_ref().expect("tcpSocket");
            assert_eq!(tcp.port, IntOrString::Int(8080));
        }
        assert_eq!(c.ports.as_ref().unwrap().len(), 1, "no metrics port");
        assert!(c.env_from.is_none());
        assert!(c.resources.is_none());
        assert_eq!(d.spec.as_ref().unwrap().replicas, Some(1));
        let labels = d.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[super::super::PROJECT_LABEL], "blog");
        assert_eq!(labels[VERSION_LABEL], "aaaaaaa");
    }

    #[test]
    fn deployment_runs_locked_down() {
        let (p, e) = (project(), environment());
        let d = deployment(&inputs(&p, &e, None), "img");
        let pod = pod_spec(&d);
        assert_eq!(
            pod.service_account_name.as_deref(),
            Some(RUNTIME_SERVICE_ACCOUNT)
        );
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert!(pod.host_network.is_none() && pod.host_pid.is_none());
        let pod_sc = pod.security_context.as_ref().unwrap();
        assert_eq!(pod_sc.run_as_non_root, Some(true));
        assert_eq!(
            pod_sc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        let sc = container(&d).security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.privileged, None);
        let caps = sc.capabilities.as_ref().unwrap();
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert!(caps.add.is_none());
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    }

    #[test]
    fn fixed_image_environment_has_no_version_or_commit() {
        let p = project();
        let mut e = environment();
        e.spec.branch = None;
        e.spec.commit = None;
        e.spec.image = Some("nginx:1.27".to_owned());
        let i = inputs(&p, &e, None);
        let d = deployment(&i, "nginx:1.27");
        assert_child_metadata(&d.metadata, None);
        let template = d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap();
        assert!(template.annotations.is_none());
        assert!(
            !template
                .labels
                .as_ref()
                .unwrap()
                .contains_key(VERSION_LABEL)
        );
        assert_child_metadata(&service(&i).metadata, None);
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

    #[test]
    fn service_shape() {
        let (p, e) = (project(), environment());
        let s = service(&inputs(&p, &e, None));
        assert_child_metadata(&s.metadata, Some("3f2a9c1"));
        assert_apply_ready(&serde_json::to_value(&s).unwrap(), "v1", "Service");
        let spec = s.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(
            spec.selector.as_ref().unwrap(),
            &selector_labels("shop", "production")
        );
        let ports: Vec<(Option<&str>, i32, Option<&IntOrString>)> = spec
            .ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| (p.name.as_deref(), p.port, p.target_port.as_ref()))
            .collect();
        assert_eq!(
            ports,
            [
                (
                    Some("http"),
                    80,
                    Some(&IntOrString::String("http".to_owned()))
                ),
                (
                    Some("metrics"),
                    9090,
                    Some(&IntOrString::String("metrics".to_owned()))
                ),
            ]
        );
        assert!(spec.cluster_ip.is_none(), "allocated by the API server");

        let minimal: Project = load(PROJECT_MINIMAL);
        let e2: Environment = load(ENVIRONMENT_MINIMAL);
        let s = service(&inputs(&minimal, &e2, None));
        assert_eq!(s.spec.unwrap().ports.unwrap().len(), 1);
    }

    #[test]
    fn metrics_on_the_app_port_or_port_80_do_not_collide() {
        let mut p = project();
        p.spec.runtime.metrics = Some(MetricsSpec {
            port: 8080,
            path: "/metrics".to_owned(),
        });
        let e = environment();
        let d = deployment(&inputs(&p, &e, None), "img");
        assert_eq!(container(&d).ports.as_ref().unwrap().len(), 1);
        let ports = service(&inputs(&p, &e, None)).spec.unwrap().ports.unwrap();
        assert_eq!(ports[1].name.as_deref(), Some("metrics"));
        assert_eq!(
            ports[1].target_port,
            Some(IntOrString::String("http".to_owned()))
        );

        p.spec.runtime.metrics = Some(MetricsSpec {
            port: 80,
            path: "/metrics".to_owned(),
        });
        let ports = service(&inputs(&p, &e, None)).spec.unwrap().ports.unwrap();
        assert_eq!(ports[0].port, 80);
        assert_eq!(ports[1].port, SERVICE_METRICS_FALLBACK_PORT);
    }

    #[test]
    fn ingress_http01_uses_ingress_shim_and_a_per_host_secret() {
        let (p, e) = (project(), environment());
        let pool: DomainPool = load(HTTP01);
        let i = inputs(&p, &e, Some(&pool));
        let ing = ingress(&i).expect("ingress");
        assert_child_metadata(&ing.metadata, Some("3f2a9c1"));
        assert_apply_ready(
            &serde_json::to_value(&ing).unwrap(),
            "networking.k8s.io/v1",
            "Ingress",
        );
        assert_eq!(
            ing.metadata.annotations,
            Some(BTreeMap::from([(
                CLUSTER_ISSUER_ANNOTATION.to_owned(),
                "letsencrypt".to_owned()
            )]))
        );
        let spec = ing.spec.as_ref().unwrap();
        assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
        let rules = spec.rules.as_ref().unwrap();
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].host.as_deref(), Some("shop.apps.example.com"));
        let paths = &rules[0].http.as_ref().unwrap().paths;
        assert_eq!(paths.len(), 1);
        assert_eq!(paths[0].path.as_deref(), Some("/"));
        assert_eq!(paths[0].path_type, "Prefix");
        let backend = paths[0].backend.service.as_ref().unwrap();
        assert_eq!(backend.name, "production");
        assert_eq!(backend.port.as_ref().unwrap().name.as_deref(), Some("http"));
        let tls = spec.tls.as_ref().unwrap();
        assert_eq!(tls.len(), 1);
        assert_eq!(
            tls[0].hosts.as_deref(),
            Some(&["shop.apps.example.com".to_owned()][..])
        );
        assert_eq!(tls[0].secret_name.as_deref(), Some("production-tls"));
        assert_eq!(tls_secret_name(&i).as_deref(), Some("production-tls"));
        assert_eq!(tls_certificate_name(&i).as_deref(), Some("production-tls"));
        assert_eq!(
            environment_url(&i).as_deref(),
            Some("https://shop.apps.example.com")
        );
    }

    #[test]
    fn ingress_dns01_uses_the_shared_wildcard_secret_without_annotations() {
        let p = project();
        let pool: DomainPool = load(DNS01);
        for host in ["shop.apps.example.com", "fix-login.shop.apps.example.com"] {
            let e = env_with_host(host);
            let i = inputs(&p, &e, Some(&pool));
            let ing = ingress(&i).expect("ingress");
            assert!(ing.metadata.annotations.is_none(), "{host}");
            let spec = ing.spec.unwrap();
            assert_eq!(spec.ingress_class_name.as_deref(), Some("traefik"));
            let tls = spec.tls.unwrap();
            assert_eq!(tls[0].hosts.as_deref(), Some(&[host.to_owned()][..]));
            assert_eq!(tls[0].secret_name.as_deref(), Some("shop-wildcard-tls"));
            assert_eq!(tls_secret_name(&i).as_deref(), Some("shop-wildcard-tls"));
            assert_eq!(environment_url(&i), Some(format!("https://{host}")));
            assert_eq!(tls_certificate_name(&i).as_deref(), Some("shop-wildcard"));
        }

        // Two labels below the project: the wildcard does not cover it, so
        // it gets its own certificate from the same issuer.
        let e = env_with_host("a.b.shop.apps.example.com");
        let i = inputs(&p, &e, Some(&pool));
        let ing = ingress(&i).expect("ingress");
        assert_eq!(
            ing.metadata.annotations.unwrap()[CLUSTER_ISSUER_ANNOTATION],
            "letsencrypt-dns"
        );
        assert_eq!(tls_secret_name(&i).as_deref(), Some("production-tls"));
        assert_eq!(tls_certificate_name(&i).as_deref(), Some("production-tls"));

        // Without a known base the wildcard cannot be relied on either.
        let e = environment();
        let mut i = inputs(&p, &e, Some(&pool));
        i.base_domain = None;
        assert_eq!(tls_secret_name(&i).as_deref(), Some("production-tls"));
        assert!(ingress(&i).unwrap().metadata.annotations.is_some());
    }

    #[test]
    fn ingress_without_issuer_is_plain_http() {
        let (p, e) = (project(), environment());
        let pool: DomainPool = load(NO_ISSUER);
        let i = inputs(&p, &e, Some(&pool));
        let ing = ingress(&i).expect("ingress");
        assert!(ing.metadata.annotations.is_none());
        let spec = ing.spec.unwrap();
        assert!(spec.tls.is_none());
        assert_eq!(spec.ingress_class_name.as_deref(), Some("nginx"));
        assert_eq!(tls_secret_name(&i), None);
        assert_eq!(tls_certificate_name(&i), None);
        assert_eq!(
            environment_url(&i).as_deref(),
            Some("http://shop.apps.example.com")
        );
    }

    #[test]
    fn no_ingress_without_pool_or_host() {
        let p = project();
        let pool: DomainPool = load(HTTP01);
        let e = environment();
        let i = inputs(&p, &e, None);
        assert!(ingress(&i).is_none());
        assert!(tls_secret_name(&i).is_none());
        assert!(environment_url(&i).is_none());

        let mut e = environment();
        e.spec.host = None;
        let i = inputs(&p, &e, Some(&pool));
        assert!(ingress(&i).is_none());
        assert!(tls_secret_name(&i).is_none());
        assert!(environment_url(&i).is_none());
    }

    #[test]
    fn hosts_outside_the_projects_subtree_are_refused() {
        let p = project();
        let pools: [DomainPool; 3] = [load(HTTP01), load(DNS01), load(NO_ISSUER)];
        let refused = [
            "evil.com",
            "apps.example.com",
            "other.apps.example.com",
            "x.other.apps.example.com",
            "evilshop.apps.example.com",
            "shop.apps.example.com.evil.com",
            "shop.apps2.example.com",
            "Shop.apps.example.com",
            "a..shop.apps.example.com",
            ".shop.apps.example.com",
            "shop.apps.example.com.",
            "a b.shop.apps.example.com",
            "x\".shop.apps.example.com",
        ];
        for pool in &pools {
            for host in refused {
                let e = env_with_host(host);
                let i = inputs(&p, &e, Some(pool));
                assert!(ingress(&i).is_none(), "{host} accepted");
                assert!(tls_secret_name(&i).is_none(), "{host}");
                assert!(environment_url(&i).is_none(), "{host}");
            }
            for host in ["shop.apps.example.com", "preview-1.shop.apps.example.com"] {
                let e = env_with_host(host);
                assert!(ingress(&inputs(&p, &e, Some(pool))).is_some(), "{host}");
            }
        }

        // Without a known base only DNS validity is checked.
        let e = env_with_host("shop.internal.test");
        let mut i = inputs(&p, &e, Some(&pools[0]));
        i.base_domain = None;
        assert!(ingress(&i).is_some());
        let e = env_with_host("not a host");
        let mut i = inputs(&p, &e, Some(&pools[0]));
        i.base_domain = None;
        assert!(ingress(&i).is_none());
    }

    #[test]
    fn wildcard_certificate_only_for_dns01_with_issuer() {
        let p = project();
        let dns: DomainPool = load(DNS01);
        let cert = wildcard_certificate(&p, "shop", &dns, BASE).expect("certificate");
        let types = cert.types.as_ref().unwrap();
        assert_eq!(types.api_version, "cert-manager.io/v1");
        assert_eq!(types.kind, "Certificate");
        assert_eq!(cert.metadata.name.as_deref(), Some("shop-wildcard"));
        assert_eq!(cert.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(cert.metadata.labels.as_ref(), Some(&project_labels("shop")));
        let owners = cert.metadata.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "Project");
        assert_eq!(owners[0].name, "shop");
        assert_eq!(owners[0].uid, PROJECT_UID);
        assert_eq!(owners[0].controller, Some(true));
        let spec = &cert.data["spec"];
        assert_eq!(
            spec["dnsNames"],
            json!(["*.shop.apps.example.com", "shop.apps.example.com"])
        );
        assert_eq!(spec["secretName"], "shop-wildcard-tls");
        assert_eq!(
            spec["issuerRef"],
            json!({"name": "letsencrypt-dns", "kind": "ClusterIssuer", "group": "cert-manager.io"})
        );
        let value = serde_json::to_value(&cert).unwrap();
        assert_apply_ready(&value, "cert-manager.io/v1", "Certificate");

        // The Ingress under the same pool uses exactly this Secret.
        let e = environment();
        let i = inputs(&p, &e, Some(&dns));
        assert_eq!(tls_secret_name(&i).as_deref(), spec["secretName"].as_str());

        let http: DomainPool = load(HTTP01);
        assert!(wildcard_certificate(&p, "shop", &http, BASE).is_none());
        let none: DomainPool = load(NO_ISSUER);
        assert!(wildcard_certificate(&p, "shop", &none, BASE).is_none());
        let mut dns_no_issuer = dns.clone();
        dns_no_issuer.spec.cluster_issuer_ref = None;
        assert!(wildcard_certificate(&p, "shop", &dns_no_issuer, BASE).is_none());
        assert!(wildcard_certificate(&p, "shop", &dns, "Bad Base").is_none());
    }

    #[test]
    fn url_scheme_follows_the_pool() {
        let (p, e) = (project(), environment());
        let cases = [
            (HTTP01, "https://shop.apps.example.com"),
            (DNS01, "https://shop.apps.example.com"),
            (NO_ISSUER, "http://shop.apps.example.com"),
        ];
        for (fixture, url) in cases {
            let pool: DomainPool = load(fixture);
            assert_eq!(
                environment_url(&inputs(&p, &e, Some(&pool))).as_deref(),
                Some(url)
            );
        }
    }

    #[test]
    fn kpack_image_with_explicit_builder_and_sub_path() {
        let (p, e) = (project(), environment());
        let registry: ClusterRegistry = load(REGISTRY);
        let repo = image_repository(&registry.spec, "shop");
        let image = kpack_image(&inputs(&p, &e, None), &repo, COMMIT);
        let types = image.types.as_ref().unwrap();
        assert_eq!(types.api_version, "kpack.io/v1alpha2");
        assert_eq!(types.kind, "Image");
        assert_child_metadata(&image.metadata, Some("3f2a9c1"));
        let spec = &image.data["spec"];
        assert_eq!(spec["tag"], "harbor.example.com/team/kapsa/shop:production");
        assert_eq!(spec["serviceAccountName"], BUILDER_SERVICE_ACCOUNT);
        assert_eq!(
            spec["builder"],
            json!({"kind": "Builder", "name": "team-builder"})
        );
        assert_eq!(
            spec["source"]["git"],
            json!({"url": "https://git.example.com/acme/shop.git", "revision": COMMIT})
        );
        assert_eq!(spec["source"]["subPath"], "services/api");
        assert_apply_ready(
            &serde_json::to_value(&image).unwrap(),
            "kpack.io/v1alpha2",
            "Image",
        );
    }

    #[test]
    fn kpack_image_defaults_to_the_default_cluster_builder() {
        let p: Project = load(PROJECT_MINIMAL);
        let e: Environment = load(ENVIRONMENT_MINIMAL);
        let commit = "1234567".repeat(6)[..40].to_owned();
        let image = kpack_image(&inputs(&p, &e, None), "harbor.example.com/blog", &commit);
        let spec = &image.data["spec"];
        assert_eq!(
            spec["builder"],
            json!({"kind": "ClusterBuilder", "name": "default"})
        );
        assert_eq!(spec["tag"], "harbor.example.com/blog:production");
        assert_eq!(spec["source"]["git"]["revision"], commit.as_str());
        assert_eq!(
            spec["source"]["git"]["url"],
            "git@git.example.com:acme/blog.git"
        );
        assert!(spec["source"].get("subPath").is_none());
        assert_eq!(
            image.metadata.labels.as_ref().unwrap()[VERSION_LABEL],
            "1234567"
        );
        assert_eq!(image.metadata.namespace.as_deref(), Some("blog"));

        // An empty context dir is the repository root.
        let mut p2 = p.clone();
        p2.spec.source.context_dir = Some(String::new());
        let image = kpack_image(&inputs(&p2, &e, None), "r", &commit);
        assert!(image.data["spec"]["source"].get("subPath").is_none());
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

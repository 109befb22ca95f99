//! The app's Deployment and the Service in front of it: ports, probes,
//! environment, resources and the locked-down security context.

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
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{EnvironmentInputs, HTTP_PORT_NAME, environment_commit, labels, metadata, names};
use crate::resources::selector_labels;

/// ServiceAccount the app's pods run as (created by the Project reconciler,
/// with the registry pull secret attached).
pub const RUNTIME_SERVICE_ACCOUNT: &str = "kapsa-runtime";

/// Name of the app container in the Deployment.
pub const APP_CONTAINER: &str = "app";
/// Name of the app's metrics port (container and Service), with `runtime.metrics`.
pub const METRICS_PORT_NAME: &str = "metrics";
/// Port of the Service in front of the app.
pub const SERVICE_HTTP_PORT: i32 = 80;
/// Service port used for metrics when `runtime.metrics.port` is 80 (which
/// the HTTP port of the Service already takes).
pub const SERVICE_METRICS_FALLBACK_PORT: i32 = 9090;
/// Pod-template annotation with the full commit the pods run.
pub const COMMIT_ANNOTATION: &str = "kapsa.dev/commit";
/// Revisions of the Deployment kept for `kubectl rollout undo`.
pub const REVISION_HISTORY_LIMIT: i32 = 10;

/// The Deployment running `image`.
pub fn deployment(inputs: &EnvironmentInputs, image: &str) -> Deployment {
    let (project_name, env_name) = names(inputs);
    // Previews run with the preview overrides (replicas, extra env sources).
    let runtime = inputs
        .project
        .spec
        .runtime_for(inputs.environment.spec.type_);
    let runtime = &runtime;
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
                    // Where the pool's apps run (admin-written).
                    node_selector: inputs
                        .pool
                        .map(|p| p.spec.node_selector.clone())
                        .filter(|s| !s.is_empty()),
                    tolerations: inputs
                        .pool
                        .map(|p| p.spec.tolerations.clone())
                        .filter(|t| !t.is_empty()),
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
    use crate::resources::PROJECT_LABEL;
    use crate::resources::environment::VERSION_LABEL;
    use crate::resources::environment::test_support::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use kapsa_api::{Environment, HealthCheck, MetricsSpec, Project};

    #[test]
    fn pool_places_the_app_pods() {
        let (p, e) = (project(), environment());
        let mut pool: kapsa_api::DomainPool = load(HTTP01);
        let d = deployment(&inputs(&p, &e, Some(&pool)), "img");
        assert!(pod_spec(&d).node_selector.is_none());
        assert!(pod_spec(&d).tolerations.is_none());
        pool.spec.node_selector =
            std::collections::BTreeMap::from([("node-pool".to_owned(), "apps".to_owned())]);
        pool.spec.tolerations = vec![k8s_openapi::api::core::v1::Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("apps".into()),
            effect: Some("NoSchedule".into()),
            toleration_seconds: None,
        }];
        let d = deployment(&inputs(&p, &e, Some(&pool)), "img");
        assert_eq!(
            pod_spec(&d).node_selector.as_ref(),
            Some(&pool.spec.node_selector)
        );
        assert_eq!(
            pod_spec(&d).tolerations.as_ref(),
            Some(&pool.spec.tolerations)
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
        assert_eq!(labels[PROJECT_LABEL], "blog");
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
}

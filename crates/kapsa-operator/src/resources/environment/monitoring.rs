//! The Prometheus Operator `ServiceMonitor` of an Environment whose Project
//! sets `runtime.metrics`: it selects the Environment's Service (and only
//! it) and scrapes its `metrics` port at the configured path.

use kapsa_api::external;
use kube::core::{ApiResource, DynamicObject};
use serde_json::json;

use super::{EnvironmentInputs, METRICS_PORT_NAME, metadata, names};
use crate::resources::selector_labels;

/// The API resource of a `ServiceMonitor` (`monitoring.coreos.com/v1`).
pub fn service_monitor_api_resource() -> ApiResource {
    external::prometheus_service_monitor()
}

/// The Environment's ServiceMonitor, named after it, in its namespace,
/// controlled by it; `None` without `runtime.metrics`. The path is the
/// Project's (validated by the CRD: it starts with `/` and holds no
/// whitespace); nothing else a tenant writes reaches it.
pub fn service_monitor(inputs: &EnvironmentInputs) -> Option<DynamicObject> {
    let metrics = inputs.project.spec.runtime.metrics.as_ref()?;
    let (project_name, env_name) = names(inputs);
    let spec = json!({
        "selector": {"matchLabels": selector_labels(&project_name, &env_name)},
        "endpoints": [{
            "port": METRICS_PORT_NAME,
            "path": metrics.path,
            "scheme": "http",
        }],
    });
    let mut monitor = DynamicObject::new(&env_name, &service_monitor_api_resource())
        .data(json!({ "spec": spec }));
    monitor.metadata = metadata(inputs, None);
    Some(monitor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::environment::service;
    use crate::resources::environment::test_support::*;
    use kapsa_api::project::MetricsSpec;

    #[test]
    fn service_monitor_selects_the_environment_service_metrics_port() {
        let mut p = project();
        let e = environment();
        p.spec.runtime.metrics = None;
        assert!(service_monitor(&inputs(&p, &e, None)).is_none());

        p.spec.runtime.metrics = Some(MetricsSpec {
            port: 9090,
            path: "/prom".into(),
        });
        let i = inputs(&p, &e, None);
        let monitor = service_monitor(&i).expect("a ServiceMonitor");
        let types = monitor.types.as_ref().unwrap();
        assert_eq!(types.api_version, "monitoring.coreos.com/v1");
        assert_eq!(types.kind, "ServiceMonitor");
        assert_eq!(monitor.metadata.name, e.metadata.name);
        assert_eq!(monitor.metadata.namespace, e.metadata.namespace);
        let owners = monitor.metadata.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        assert_eq!(owners[0].kind, "Environment");
        assert_eq!(owners[0].controller, Some(true));
        let spec = &monitor.data["spec"];
        assert_eq!(
            spec["endpoints"],
            json!([{"port": "metrics", "path": "/prom", "scheme": "http"}])
        );
        // It selects exactly the Service of this Environment: the Service
        // carries every label of the selector, and has the port it names.
        let svc = service(&i);
        let labels = svc.metadata.labels.clone().unwrap();
        let selector = spec["selector"]["matchLabels"].as_object().unwrap();
        assert!(!selector.is_empty());
        for (key, value) in selector {
            assert_eq!(labels.get(key).map(String::as_str), value.as_str(), "{key}");
        }
        assert!(
            svc.spec
                .unwrap()
                .ports
                .unwrap()
                .iter()
                .any(|p| p.name.as_deref() == Some("metrics"))
        );
        let value = serde_json::to_value(&monitor).unwrap();
        assert_apply_ready(&value, "monitoring.coreos.com/v1", "ServiceMonitor");
    }
}

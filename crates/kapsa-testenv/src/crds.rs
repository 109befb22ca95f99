//! Installing CustomResourceDefinitions and waiting until they are served.

use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;

use crate::control_plane::{Error, Result};

/// Parses a multi-document YAML stream of CRDs (empty documents are skipped).
pub fn parse_crds(yaml: &str) -> Result<Vec<CustomResourceDefinition>> {
    let mut crds = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(document)
            .map_err(|e| Error::Manifest(format!("CRD YAML: {e}")))?;
        if value.is_null() {
            continue;
        }
        crds.push(serde_json::from_value(value).map_err(|e| Error::Manifest(format!("CRD: {e}")))?);
    }
    Ok(crds)
}

/// Server-side applies `crds` and waits until each is Established.
pub async fn install_crds(
    client: &Client,
    crds: &[CustomResourceDefinition],
    field_manager: &str,
) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(field_manager).force();
    for crd in crds {
        let mut crd = crd.clone();
        crd.metadata.managed_fields = None;
        crd.metadata.resource_version = None;
        api.patch(&crd.name_any(), &params, &Patch::Apply(&crd))
            .await?;
    }
    let timeout = Duration::from_secs(60);
    let deadline = Instant::now() + timeout;
    for crd in crds {
        let name = crd.name_any();
        loop {
            let current = api.get(&name).await?;
            let established = current
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
            if established {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(
                    timeout,
                    format!("CRD {name} to be Established"),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The Prometheus Operator's `ServiceMonitor` and `PodMonitor` CRDs
/// (`monitoring.coreos.com/v1`), as its Go module ships them: from the folder
/// `KAPSA_PROMETHEUS_OPERATOR_CRDS` names, or else fetched (once per machine,
/// then cached) by `hack/install-prometheus-operator-crds.sh`.
pub fn prometheus_operator_crds() -> Result<Vec<CustomResourceDefinition>> {
    const FILES: [&str; 2] = [
        "monitoring.coreos.com_servicemonitors.yaml",
        "monitoring.coreos.com_podmonitors.yaml",
    ];
    module_crds(
        "KAPSA_PROMETHEUS_OPERATOR_CRDS",
        "install-prometheus-operator-crds.sh",
        &FILES,
    )
}

/// The Gateway API CRDs of the standard channel (`gateway.networking.k8s.io`:
/// Gateway, HTTPRoute, ListenerSet and the others), as the Go module
/// `sigs.k8s.io/gateway-api` ships them: from the folder
/// `KAPSA_GATEWAY_API_CRDS` names, or else fetched (once per machine, then
/// cached) by `hack/install-gateway-api-crds.sh`. The channel's
/// ValidatingAdmissionPolicy (not a CRD) is left out.
pub fn gateway_api_crds() -> Result<Vec<CustomResourceDefinition>> {
    const FILES: [&str; 10] = [
        "gateway.networking.k8s.io_gatewayclasses.yaml",
        "gateway.networking.k8s.io_gateways.yaml",
        "gateway.networking.k8s.io_httproutes.yaml",
        "gateway.networking.k8s.io_grpcroutes.yaml",
        "gateway.networking.k8s.io_listenersets.yaml",
        "gateway.networking.k8s.io_referencegrants.yaml",
        "gateway.networking.k8s.io_backendtlspolicies.yaml",
        "gateway.networking.k8s.io_tcproutes.yaml",
        "gateway.networking.k8s.io_tlsroutes.yaml",
        "gateway.networking.k8s.io_udproutes.yaml",
    ];
    module_crds(
        "KAPSA_GATEWAY_API_CRDS",
        "install-gateway-api-crds.sh",
        &FILES,
    )
}

/// The CRDs in `files` of the folder `env_var` names, or else of the one
/// `hack/<script>` fetches (once per machine, then cached) from a Go module.
fn module_crds(
    env_var: &str,
    script: &str,
    files: &[&str],
) -> Result<Vec<CustomResourceDefinition>> {
    let dir = crate::control_plane::installed_folder(
        std::env::var_os(env_var).map(std::path::PathBuf::from),
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../hack")
            .join(script),
        |dir| files.iter().all(|f| dir.join(f).is_file()),
        &format!("{files:?}"),
        None,
    )?;
    let mut crds = Vec::new();
    for file in files {
        crds.extend(parse_crds(&std::fs::read_to_string(dir.join(file))?)?);
    }
    Ok(crds)
}

//! The real lane (docs/real-lane.md) for the operator's tests: a real node,
//! Traefik on the lane's own loopback address, and cert-manager with Pebble
//! (the ClusterIssuer `pebble`).

use std::time::{Duration, Instant};

use kapsa_testenv::TestEnv;
use kapsa_testenv::acme_lane::{AcmeLane, AcmeLaneOptions};
use kapsa_testenv::real_node::{
    self, BuiltFolder, REAL_NODE_LABEL, RealNode, real_node_toleration,
};
use kapsa_testenv::traefik::{INGRESS_CLASS, Traefik};
use serde_json::{Value, json};

/// Whether a real-lane test runs (see [`real_node::real_lane_test`]): it
/// needs Traefik, cert-manager and Pebble, and what `more` lists.
pub fn enabled(test: &str, more: &[(&str, BuiltFolder)]) -> bool {
    let mut built: Vec<(&str, BuiltFolder)> = vec![
        ("Traefik", kapsa_testenv::traefik::built_traefik),
        (
            "cert-manager and Pebble",
            kapsa_testenv::acme_lane::built_cert_manager,
        ),
    ];
    built.extend_from_slice(more);
    real_node::real_lane_test(test, &built)
}

pub struct Lane {
    pub node: RealNode,
    pub traefik: Traefik,
    pub acme: AcmeLane,
    /// From [`Lane::start`] to the node Ready.
    pub node_ready: Duration,
    /// From the node Ready to the ClusterIssuer `pebble` Ready.
    pub acme_ready: Duration,
}

impl Lane {
    /// Starts the node, Traefik (with its Gateway API provider when
    /// `gateway_api`) and cert-manager with Pebble.
    pub async fn start(env: &TestEnv, client: &kube::Client, gateway_api: bool) -> Lane {
        let assets = real_node::find_real_lane_assets().expect("the real lane's binaries");
        let traefik_folder = kapsa_testenv::traefik::find_traefik().expect("Traefik");
        let cert_manager_folder =
            kapsa_testenv::acme_lane::find_cert_manager().expect("cert-manager and Pebble");
        let started = Instant::now();
        let node = RealNode::start(env, &assets).await.expect("a real node");
        let node_ready = started.elapsed();
        let ca = env
            .kubeconfig_path()
            .parent()
            .expect("the control plane's folder")
            .join("pki/ca.crt");
        let lane_address = kapsa_testenv::acme_lane::lane_address().expect("a loopback address");
        let traefik = Traefik::start(
            client,
            env.api_server_url(),
            &ca,
            &traefik_folder,
            &node.dir().join("traefik"),
            gateway_api,
            lane_address,
        )
        .await
        .expect("Traefik");
        let acme_started = Instant::now();
        let acme = AcmeLane::start(
            client,
            AcmeLaneOptions {
                kubeconfig: env.kubeconfig_path().to_path_buf(),
                folder: cert_manager_folder,
                dir: node.dir().join("acme"),
                ingress_address: lane_address,
                ingress_class: INGRESS_CLASS.to_string(),
                images: node.image_pusher(),
            },
        )
        .await
        .expect("cert-manager and Pebble");
        Lane {
            node,
            traefik,
            acme,
            node_ready,
            acme_ready: acme_started.elapsed(),
        }
    }
}

/// A DomainPool `spec` whose apps run on the real node, routed by Traefik;
/// with `issuer`, TLS from that ClusterIssuer by HTTP-01.
pub fn pool_spec(base: &str, issuer: Option<&str>) -> Value {
    let mut spec = json!({"domains": [base], "ingressClassName": INGRESS_CLASS,
        "nodeSelector": {REAL_NODE_LABEL: "true"},
        "tolerations": [real_node_toleration()]});
    if let Some(issuer) = issuer {
        spec["clusterIssuerRef"] = json!({"name": issuer});
        spec["challenge"] = json!("HTTP01");
    }
    spec
}

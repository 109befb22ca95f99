//! cert-manager SIMULATOR: `cert-manager.io/v1` Certificates issued at once,
//! self-signed, with no ACME or other certificate authority involved.
//!
//! - ingress-shim: an Ingress annotated `cert-manager.io/cluster-issuer: <name>`
//!   gets one Certificate per `spec.tls` entry, named after its `secretName`,
//!   for that entry's hosts, owned by the Ingress.
//! - issuing: a Certificate whose ClusterIssuer exists gets a fresh key pair
//!   and a self-signed certificate for its `dnsNames` in its `secretName`
//!   Secret (`kubernetes.io/tls`), then `Ready=True`. It is re-issued when its
//!   names change. Wildcard names are issued only when the ClusterIssuer has an
//!   ACME `dns01` solver, as with a real ACME CA; otherwise the Certificate
//!   gets `Ready=False`, reason `WildcardRequiresDNS01`.
//! - ClusterIssuers are marked Ready.
//! - It stands aside for ClusterIssuers a real cert-manager serves (the real
//!   lane's, labelled [`crate::acme_lane::REAL_CERT_MANAGER_LABEL`]), and for
//!   the Certificates and Ingresses that name them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kapsa_api::external;
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{FIELD_MANAGER, condition, now_rfc3339, write_params};

/// The ingress-shim annotation the simulator honours.
pub const CLUSTER_ISSUER_ANNOTATION: &str = "cert-manager.io/cluster-issuer";
/// Annotation on issued Secrets: a hash of the names the certificate covers.
const NAMES_HASH_ANNOTATION: &str = "cert-manager-simulator.kapsa.dev/names-hash";

/// The cert-manager `Certificate` resource:
/// [`kapsa_api::external::cert_manager_certificate`].
pub fn certificate_resource() -> ApiResource {
    external::cert_manager_certificate()
}

/// The cert-manager `ClusterIssuer` resource:
/// [`kapsa_api::external::cert_manager_cluster_issuer`].
pub fn cluster_issuer_resource() -> ApiResource {
    external::cert_manager_cluster_issuer()
}

#[derive(Debug, thiserror::Error)]
enum SimError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("certificate generation: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("{0}")]
    Serde(#[from] serde_json::Error),
}

struct Ctx {
    client: Client,
}

/// The Certificates ingress-shim wants for an Ingress.
pub fn certificates_for_ingress(ingress: &Ingress) -> Vec<DynamicObject> {
    let Some(issuer) = ingress.annotations().get(CLUSTER_ISSUER_ANNOTATION) else {
        return Vec::new();
    };
    let owner = OwnerReference {
        api_version: "networking.k8s.io/v1".into(),
        kind: "Ingress".into(),
        name: ingress.name_any(),
        uid: ingress.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let tls = ingress
        .spec
        .as_ref()
        .and_then(|s| s.tls.clone())
        .unwrap_or_default();
    tls.into_iter()
        .filter_map(|entry| {
            let secret = entry.secret_name?;
            let mut cert = DynamicObject::new(&secret, &certificate_resource())
                .within(&ingress.namespace().unwrap_or_default());
            cert.metadata.owner_references = Some(vec![owner.clone()]);
            cert.data = json!({"spec": {
                "secretName": secret,
                "dnsNames": entry.hosts.unwrap_or_default(),
                "issuerRef": {"name": issuer, "kind": "ClusterIssuer", "group": external::CERT_MANAGER_GROUP},
            }});
            Some(cert)
        })
        .collect()
}

/// Whether a real cert-manager serves this ClusterIssuer (the real lane):
/// then the simulator leaves it, its Certificates and Ingresses alone.
fn served_by_real_cert_manager(issuer: &DynamicObject) -> bool {
    issuer
        .labels()
        .contains_key(crate::acme_lane::REAL_CERT_MANAGER_LABEL)
}

async fn reconcile_ingress(ingress: Arc<Ingress>, ctx: Arc<Ctx>) -> Result<Action, SimError> {
    if let Some(issuer) = ingress.annotations().get(CLUSTER_ISSUER_ANNOTATION)
        && let Some(issuer) =
            Api::<DynamicObject>::all_with(ctx.client.clone(), &cluster_issuer_resource())
                .get_opt(issuer)
                .await?
        && served_by_real_cert_manager(&issuer)
    {
        return Ok(Action::await_change());
    }
    let namespace = ingress.namespace().unwrap_or_default();
    let api: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &namespace, &certificate_resource());
    for cert in certificates_for_ingress(&ingress) {
        api.patch(
            &cert.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&cert),
        )
        .await?;
    }
    Ok(Action::await_change())
}

fn names_hash(names: &[String]) -> String {
    let mut sorted = names.to_vec();
    sorted.sort();
    let digest = Sha256::digest(sorted.join(",").as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Whether a ClusterIssuer can solve DNS-01 challenges (needed for wildcards).
pub fn issuer_supports_dns01(issuer: &DynamicObject) -> bool {
    issuer.data["spec"]["acme"]["solvers"]
        .as_array()
        .is_some_and(|solvers| solvers.iter().any(|s| s.get("dns01").is_some()))
}

async fn reconcile_certificate(
    cert: Arc<DynamicObject>,
    ctx: Arc<Ctx>,
) -> Result<Action, SimError> {
    let namespace = cert.namespace().unwrap_or_default();
    let name = cert.name_any();
    let certs: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &namespace, &certificate_resource());
    let spec = &cert.data["spec"];
    let mut names: Vec<String> = spec["dnsNames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if let Some(cn) = spec["commonName"].as_str()
        && !names.iter().any(|n| n == cn)
    {
        names.push(cn.to_string());
    }
    let secret_name = spec["secretName"].as_str().unwrap_or_default().to_string();
    let issuer_name = spec["issuerRef"]["name"].as_str().unwrap_or_default();
    let issuer_kind = spec["issuerRef"]["kind"].as_str().unwrap_or("Issuer");
    let generation = cert.metadata.generation.unwrap_or_default();

    let not_ready = |reason: &str, message: String| {
        let mut c = condition(
            "Ready",
            "False",
            reason,
            &format!("cert-manager simulator: {message}"),
        );
        c["observedGeneration"] = json!(generation);
        json!({"status": {"conditions": [c]}})
    };
    let issuer = if issuer_kind == "ClusterIssuer" {
        Api::<DynamicObject>::all_with(ctx.client.clone(), &cluster_issuer_resource())
            .get_opt(issuer_name)
            .await?
    } else {
        None
    };
    if issuer.as_ref().is_some_and(served_by_real_cert_manager) {
        return Ok(Action::await_change());
    }
    let problem = match &issuer {
        _ if names.is_empty() => Some(("InvalidSpec", "no dnsNames or commonName".to_string())),
        None => Some((
            "IssuerNotFound",
            format!(
                "{issuer_kind} {issuer_name:?} not found (the simulator serves ClusterIssuers only)"
            ),
        )),
        Some(issuer)
            if names.iter().any(|n| n.starts_with("*.")) && !issuer_supports_dns01(issuer) =>
        {
            Some((
                "WildcardRequiresDNS01",
                format!(
                    "wildcard names need a DNS-01 solver, and ClusterIssuer {issuer_name:?} has none"
                ),
            ))
        }
        Some(_) => None,
    };
    if let Some((reason, message)) = problem {
        let current = cert.data["status"]["conditions"][0]["reason"].as_str();
        if current != Some(reason) {
            certs
                .patch_status(
                    &name,
                    &write_params(),
                    &Patch::Merge(&not_ready(reason, message)),
                )
                .await?;
        }
        return Ok(Action::requeue(Duration::from_secs(5)));
    }

    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let hash = names_hash(&names);
    let existing = secrets.get_opt(&secret_name).await?;
    let up_to_date = existing
        .as_ref()
        .is_some_and(|s| s.annotations().get(NAMES_HASH_ANNOTATION) == Some(&hash));
    let ready_for_generation = cert.data["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .is_some_and(|c| c["status"] == "True" && c["observedGeneration"] == json!(generation));
    if up_to_date && ready_for_generation {
        return Ok(Action::await_change());
    }
    if !up_to_date {
        let (cert_pem, key_pem) = crate::pki::self_signed_certificate(&names)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                namespace: Some(namespace.clone()),
                annotations: Some(BTreeMap::from([
                    ("cert-manager.io/certificate-name".to_string(), name.clone()),
                    ("cert-manager.io/alt-names".to_string(), names.join(",")),
                    (NAMES_HASH_ANNOTATION.to_string(), hash),
                ])),
                labels: Some(BTreeMap::from([(
                    "controller.cert-manager.io/fao".to_string(),
                    "true".to_string(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".into()),
            data: Some(BTreeMap::from([
                (
                    "tls.crt".to_string(),
                    ByteString(cert_pem.clone().into_bytes()),
                ),
                ("tls.key".to_string(), ByteString(key_pem.into_bytes())),
                ("ca.crt".to_string(), ByteString(cert_pem.into_bytes())),
            ])),
            ..Secret::default()
        };
        secrets
            .patch(
                &secret_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?;
        tracing::info!(certificate = %name, %namespace, ?names, "cert-manager simulator: issued");
    }
    let revision = cert.data["status"]["revision"].as_i64().unwrap_or(0) + i64::from(!up_to_date);
    let mut ready = condition(
        "Ready",
        "True",
        "Ready",
        "cert-manager simulator: certificate issued (self-signed)",
    );
    ready["observedGeneration"] = json!(generation);
    let not_after = chrono::Utc::now() + chrono::Duration::days(90);
    let patch = json!({"status": {
        "conditions": [ready],
        "notBefore": now_rfc3339(),
        "notAfter": not_after.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "revision": revision.max(1),
    }});
    certs
        .patch_status(&name, &write_params(), &Patch::Merge(&patch))
        .await?;
    Ok(Action::requeue(Duration::from_secs(60)))
}

async fn reconcile_issuer(issuer: Arc<DynamicObject>, ctx: Arc<Ctx>) -> Result<Action, SimError> {
    if served_by_real_cert_manager(&issuer) {
        return Ok(Action::await_change());
    }
    let ready = issuer.data["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
    if !ready {
        let patch = json!({"status": {"conditions": [condition("Ready", "True", "Simulated",
            "cert-manager simulator: issuer ready")]}});
        Api::<DynamicObject>::all_with(ctx.client.clone(), &cluster_issuer_resource())
            .patch_status(&issuer.name_any(), &write_params(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(Action::await_change())
}

fn error_policy<K>(_: Arc<K>, error: &SimError, _: Arc<Ctx>) -> Action {
    tracing::warn!(%error, "cert-manager simulator: retrying");
    Action::requeue(Duration::from_millis(500))
}

pub async fn run(client: Client) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
    });
    let ingresses = Controller::new(
        Api::<Ingress>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns_with(
        Api::<DynamicObject>::all_with(client.clone(), &certificate_resource()),
        certificate_resource(),
        watcher::Config::default(),
    )
    .run(reconcile_ingress, error_policy, ctx.clone())
    .for_each(|_| async {});
    let certificates = Controller::new_with(
        Api::<DynamicObject>::all_with(client.clone(), &certificate_resource()),
        watcher::Config::default(),
        certificate_resource(),
    )
    .run(reconcile_certificate, error_policy, ctx.clone())
    .for_each(|_| async {});
    let issuers = Controller::new_with(
        Api::<DynamicObject>::all_with(client.clone(), &cluster_issuer_resource()),
        watcher::Config::default(),
        cluster_issuer_resource(),
    )
    .run(reconcile_issuer, error_policy, ctx)
    .for_each(|_| async {});
    tokio::join!(ingresses, certificates, issuers);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ingress(yaml: &str) -> Ingress {
        serde_yaml_ng::from_str(yaml).expect("valid Ingress YAML")
    }

    #[test]
    fn annotated_ingress_gets_one_certificate_per_tls_entry() {
        let ing = ingress(
            r#"
metadata:
  name: web
  namespace: shop
  uid: 1234
  annotations: {cert-manager.io/cluster-issuer: letsencrypt}
spec:
  tls:
  - {hosts: [shop.apps.example.com], secretName: shop-tls}
  - {hosts: [a.shop.apps.example.com, b.shop.apps.example.com], secretName: ab-tls}
  - {hosts: [no-secret.example.com]}
"#,
        );
        let certs = certificates_for_ingress(&ing);
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0].name_any(), "shop-tls");
        assert_eq!(certs[0].data["spec"]["issuerRef"]["name"], "letsencrypt");
        assert_eq!(
            certs[1].data["spec"]["dnsNames"][1],
            "b.shop.apps.example.com"
        );
        assert_eq!(certs[1].owner_references()[0].name, "web");
    }

    #[test]
    fn unannotated_ingress_gets_none() {
        let ing = ingress(
            "metadata: {name: web}\nspec: {tls: [{hosts: [a.example.com], secretName: s}]}",
        );
        assert!(certificates_for_ingress(&ing).is_empty());
    }

    #[test]
    fn dns01_is_detected_from_acme_solvers() {
        let mut issuer = DynamicObject::new("le", &cluster_issuer_resource());
        issuer.data = json!({"spec": {"acme": {"solvers": [{"http01": {}}]}}});
        assert!(!issuer_supports_dns01(&issuer));
        issuer.data =
            json!({"spec": {"acme": {"solvers": [{"http01": {}}, {"dns01": {"webhook": {}}}]}}});
        assert!(issuer_supports_dns01(&issuer));
    }
}

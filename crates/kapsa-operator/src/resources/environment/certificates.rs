//! The Project's wildcard Certificate under a DNS01 DomainPool, and the
//! names of that Certificate and its Secret.

use kapsa_api::naming::is_dns_name;
use kapsa_api::{Challenge, DomainPool, Project, external};
use kube::ResourceExt;
use kube::core::{ApiResource, DynamicObject};
use serde_json::json;

use crate::resources::{controller_reference, project_labels};

/// The API resource of a cert-manager `Certificate` (`cert-manager.io/v1`):
/// [`kapsa_api::external::cert_manager_certificate`].
pub fn certificate_api_resource() -> ApiResource {
    external::cert_manager_certificate()
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
    let issuer_resource = external::cert_manager_cluster_issuer();
    let spec = json!({
        "secretName": wildcard_secret_name(&project_name),
        "dnsNames": [format!("*.{apex}"), apex],
        "issuerRef": {
            "name": issuer,
            "kind": issuer_resource.kind,
            "group": issuer_resource.group,
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

fn issuer_name(pool: &DomainPool) -> Option<&str> {
    pool.spec
        .cluster_issuer_ref
        .as_ref()
        .map(|r| r.name.as_str())
        .filter(|name| is_dns_name(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::environment::test_support::*;
    use crate::resources::environment::tls_secret_name;

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
}

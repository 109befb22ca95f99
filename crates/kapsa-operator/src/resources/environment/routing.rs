//! The Environment's Ingress (DomainPools with `routing: Ingress`): which host it gets (only inside the
//! Project's own subtree of its base domain), how it is secured (per-host
//! certificate, the Project's wildcard, or plain HTTP), the TLS Secret and
//! Certificate behind it, and the URL it is served at.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, IngressTLS, ServiceBackendPort,
};
use kapsa_api::naming::is_dns_name;
use kapsa_api::{Challenge, Routing};
use kube::ResourceExt;

use super::certificates::{wildcard_certificate_name, wildcard_secret_name};
use super::{EnvironmentInputs, HTTP_PORT_NAME, environment_commit, metadata, names};

/// The cert-manager ingress-shim annotation (HTTP01 pools).
pub const CLUSTER_ISSUER_ANNOTATION: &str = "cert-manager.io/cluster-issuer";

/// The Ingress for the Environment's host. `None` without a pool, under a
/// pool with `routing: Gateway` (see [`super::gateway`]), without a host, or
/// with a host that is not a DNS name inside `<project>.<base>`.
pub fn ingress(inputs: &EnvironmentInputs) -> Option<Ingress> {
    let pool = inputs.pool?;
    if pool.spec.routing != Routing::Ingress {
        return None;
    }
    let plan = route_plan(inputs)?;
    let (_, env_name) = names(inputs);

    let mut meta = metadata(inputs, environment_commit(inputs));
    let tls = match &plan.tls {
        Tls::None | Tls::GatewayListener => None,
        Tls::PerHost { issuer } => {
            meta.annotations = Some(BTreeMap::from([(
                CLUSTER_ISSUER_ANNOTATION.to_owned(),
                (*issuer).to_owned(),
            )]));
            Some(per_host_secret_name(inputs))
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
    match route_plan(inputs)?.tls {
        Tls::None | Tls::GatewayListener => None,
        Tls::PerHost { .. } => Some(per_host_secret_name(inputs)),
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
    match route_plan(inputs)?.tls {
        Tls::None | Tls::GatewayListener => None,
        Tls::PerHost { .. } => Some(per_host_secret_name(inputs)),
        Tls::Wildcard => Some(wildcard_certificate_name(&inputs.project.name_any())),
    }
}

/// The URL the Environment is served at: `https://<host>` with TLS,
/// `http://<host>` when the pool has no issuer, `None` without an Ingress.
pub fn environment_url(inputs: &EnvironmentInputs) -> Option<String> {
    let plan = route_plan(inputs)?;
    let scheme = match plan.tls {
        Tls::None => "http",
        Tls::PerHost { .. } | Tls::Wildcard | Tls::GatewayListener => "https",
    };
    Some(format!("{scheme}://{}", plan.host))
}

/// How the host of an Environment is secured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Tls<'a> {
    /// Plain HTTP: the pool has no ClusterIssuer.
    None,
    /// A certificate for this host: from cert-manager's ingress-shim
    /// (Ingress), or a Certificate Kapsa makes (Gateway).
    PerHost { issuer: &'a str },
    /// The Project's shared DNS01 wildcard certificate.
    Wildcard,
    /// The shared Gateway's listener that `gatewayRef.sectionName` names
    /// (HTTPS, the platform team's certificate).
    GatewayListener,
}

pub(super) struct RoutePlan<'a> {
    pub(super) host: &'a str,
    pub(super) tls: Tls<'a>,
}

/// The host and TLS scheme of the Environment's route (Ingress or
/// HTTPRoute), or `None` when it gets none. The single source of truth for
/// [`ingress`], the Gateway API objects, [`tls_secret_name`] and
/// [`environment_url`].
pub(super) fn route_plan<'a>(inputs: &EnvironmentInputs<'a>) -> Option<RoutePlan<'a>> {
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
    let listener = pool
        .spec
        .gateway_ref
        .as_ref()
        .and_then(|g| g.section_name.as_ref());
    let tls = match pool.spec.cluster_issuer_ref.as_ref() {
        _ if pool.spec.routing == Routing::Gateway && listener.is_some() => Tls::GatewayListener,
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
    Some(RoutePlan { host, tls })
}

/// The per-host certificate's (and its Secret's) name: `<env>-tls`, named
/// by the Ingress and made by cert-manager's ingress-shim; under Gateway
/// routing `<env>-gateway-tls`, made by Kapsa. (Distinct names: after a
/// switch, the ingress-shim's Certificate, controlled by the Ingress, goes
/// with the Ingress and never has two controllers.)
pub fn per_host_secret_name(inputs: &EnvironmentInputs) -> String {
    let environment = inputs.environment.name_any();
    if super::gateway::gateway_routing(inputs) {
        format!("{environment}-gateway-tls")
    } else {
        format!("{environment}-tls")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::environment::test_support::*;
    use kapsa_api::DomainPool;

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
}

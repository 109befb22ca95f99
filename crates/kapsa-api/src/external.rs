//! The kinds of other projects that Kapsa creates, reads or watches: kpack
//! (`kpack.io/v1alpha2`: `Image`, `ClusterBuilder`, `Builder`),
//! cert-manager (`cert-manager.io/v1`: `Certificate`, `ClusterIssuer`) and
//! the Prometheus Operator (`monitoring.coreos.com/v1`: `ServiceMonitor`)
//! and Gateway API (`gateway.networking.k8s.io/v1`: `HTTPRoute`,
//! `ListenerSet`, `Gateway`).
//!
//! Kapsa has no Rust types for these; it handles them as
//! `kube::core::DynamicObject`s, which need an [`ApiResource`] to be sent to
//! the API server. This module is the one place that names them: the
//! operator, its tests, the simulators of `kapsa-testenv` and the `kapsa`
//! binary all take the group, version, kind and plural from here.
//!
//! Every function returns a fresh value (an [`ApiResource`] owns its
//! strings); they are cheap.

use kube::core::{ApiResource, GroupVersionKind};

use crate::BuilderKind;

/// API group of kpack.
pub const KPACK_GROUP: &str = "kpack.io";
/// The kpack API version Kapsa uses.
pub const KPACK_VERSION: &str = "v1alpha2";
/// `apiVersion` of the kpack objects Kapsa uses: `kpack.io/v1alpha2`.
pub const KPACK_API_VERSION: &str = "kpack.io/v1alpha2";

/// API group of cert-manager.
pub const CERT_MANAGER_GROUP: &str = "cert-manager.io";
/// The cert-manager API version Kapsa uses.
pub const CERT_MANAGER_VERSION: &str = "v1";
/// `apiVersion` of the cert-manager objects Kapsa uses: `cert-manager.io/v1`.
pub const CERT_MANAGER_API_VERSION: &str = "cert-manager.io/v1";

/// API group of the Prometheus Operator.
pub const PROMETHEUS_OPERATOR_GROUP: &str = "monitoring.coreos.com";
/// The Prometheus Operator API version Kapsa uses.
pub const PROMETHEUS_OPERATOR_VERSION: &str = "v1";

/// API group of Gateway API.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// The Gateway API version Kapsa uses (standard channel, v1.5 or later:
/// `ListenerSet` is stable there).
pub const GATEWAY_API_VERSION: &str = "v1";

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

/// A kpack `Image` (namespaced, plural `images`): builds a git revision
/// into a container image. The operator creates one per Environment.
pub fn kpack_image() -> ApiResource {
    resource(KPACK_GROUP, KPACK_VERSION, "Image", "images")
}

/// A kpack `ClusterBuilder` (cluster-scoped, plural `clusterbuilders`).
pub fn kpack_cluster_builder() -> ApiResource {
    resource(
        KPACK_GROUP,
        KPACK_VERSION,
        "ClusterBuilder",
        "clusterbuilders",
    )
}

/// A kpack `Builder` (namespaced, plural `builders`).
pub fn kpack_namespaced_builder() -> ApiResource {
    resource(KPACK_GROUP, KPACK_VERSION, "Builder", "builders")
}

/// The kpack builder kind a Project's `spec.build.builderRef.kind` names:
/// [`kpack_cluster_builder`] or [`kpack_namespaced_builder`].
pub fn kpack_builder(kind: BuilderKind) -> ApiResource {
    match kind {
        BuilderKind::ClusterBuilder => kpack_cluster_builder(),
        BuilderKind::Builder => kpack_namespaced_builder(),
    }
}

/// A cert-manager `Certificate` (namespaced, plural `certificates`).
pub fn cert_manager_certificate() -> ApiResource {
    resource(
        CERT_MANAGER_GROUP,
        CERT_MANAGER_VERSION,
        "Certificate",
        "certificates",
    )
}

/// A cert-manager `ClusterIssuer` (cluster-scoped, plural `clusterissuers`).
pub fn cert_manager_cluster_issuer() -> ApiResource {
    resource(
        CERT_MANAGER_GROUP,
        CERT_MANAGER_VERSION,
        "ClusterIssuer",
        "clusterissuers",
    )
}

/// A Prometheus Operator `ServiceMonitor` (namespaced, plural
/// `servicemonitors`): tells Prometheus to scrape the Services it selects.
/// The operator creates one per Environment of a Project with
/// `runtime.metrics`, where the CRD is installed.
pub fn prometheus_service_monitor() -> ApiResource {
    resource(
        PROMETHEUS_OPERATOR_GROUP,
        PROMETHEUS_OPERATOR_VERSION,
        "ServiceMonitor",
        "servicemonitors",
    )
}

/// A Gateway API `HTTPRoute` (namespaced, plural `httproutes`): routes a
/// host to a Service through a Gateway. The operator creates one per
/// Environment under a DomainPool with `routing: Gateway`.
pub fn gateway_http_route() -> ApiResource {
    resource(
        GATEWAY_API_GROUP,
        GATEWAY_API_VERSION,
        "HTTPRoute",
        "httproutes",
    )
}

/// A Gateway API `ListenerSet` (namespaced, plural `listenersets`): listeners
/// attached to a shared Gateway from another namespace. The operator creates
/// one per Project under a DomainPool with `routing: Gateway`.
pub fn gateway_listener_set() -> ApiResource {
    resource(
        GATEWAY_API_GROUP,
        GATEWAY_API_VERSION,
        "ListenerSet",
        "listenersets",
    )
}

/// A Gateway API `Gateway` (namespaced, plural `gateways`): the shared
/// Gateway a DomainPool's `spec.gatewayRef` names; the platform team runs it.
pub fn gateway_gateway() -> ApiResource {
    resource(
        GATEWAY_API_GROUP,
        GATEWAY_API_VERSION,
        "Gateway",
        "gateways",
    )
}

/// A Gateway API `GatewayClass` (cluster-scoped, plural `gatewayclasses`):
/// which controller serves a Gateway. Kapsa never writes one; the test
/// environment's real lane does.
pub fn gateway_gateway_class() -> ApiResource {
    resource(
        GATEWAY_API_GROUP,
        GATEWAY_API_VERSION,
        "GatewayClass",
        "gatewayclasses",
    )
}

/// Every kind of this module, in the order: kpack `Image`, `ClusterBuilder`,
/// `Builder`, cert-manager `Certificate`, `ClusterIssuer`, Prometheus
/// Operator `ServiceMonitor`, Gateway API `HTTPRoute`, `ListenerSet`,
/// `Gateway`. For looking a kind up by its `apiVersion` and `kind`.
pub fn all() -> [ApiResource; 9] {
    [
        kpack_image(),
        kpack_cluster_builder(),
        kpack_namespaced_builder(),
        cert_manager_certificate(),
        cert_manager_cluster_issuer(),
        prometheus_service_monitor(),
        gateway_http_route(),
        gateway_listener_set(),
        gateway_gateway(),
    ]
}

/// The name of the CustomResourceDefinition that serves `resource`
/// (`<plural>.<group>`), e.g. `servicemonitors.monitoring.coreos.com`.
pub fn crd_name(resource: &ApiResource) -> String {
    format!("{}.{}", resource.plural, resource.group)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_groups_versions_and_plurals() {
        let expected = [
            ("kpack.io/v1alpha2", "Image", "images"),
            ("kpack.io/v1alpha2", "ClusterBuilder", "clusterbuilders"),
            ("kpack.io/v1alpha2", "Builder", "builders"),
            ("cert-manager.io/v1", "Certificate", "certificates"),
            ("cert-manager.io/v1", "ClusterIssuer", "clusterissuers"),
            (
                "monitoring.coreos.com/v1",
                "ServiceMonitor",
                "servicemonitors",
            ),
            ("gateway.networking.k8s.io/v1", "HTTPRoute", "httproutes"),
            (
                "gateway.networking.k8s.io/v1",
                "ListenerSet",
                "listenersets",
            ),
            ("gateway.networking.k8s.io/v1", "Gateway", "gateways"),
        ];
        assert_eq!(all().len(), expected.len());
        for (resource, (api_version, kind, plural)) in all().into_iter().zip(expected) {
            assert_eq!(resource.api_version, api_version);
            assert_eq!(
                format!("{}/{}", resource.group, resource.version),
                api_version
            );
            assert_eq!(resource.kind, kind);
            assert_eq!(resource.plural, plural);
            // The same as kube's guess, so callers that used `from_gvk` see
            // no difference.
            let gvk = GroupVersionKind::gvk(&resource.group, &resource.version, kind);
            assert_eq!(ApiResource::from_gvk(&gvk), resource);
        }
        assert_eq!(KPACK_API_VERSION, format!("{KPACK_GROUP}/{KPACK_VERSION}"));
        assert_eq!(
            CERT_MANAGER_API_VERSION,
            format!("{CERT_MANAGER_GROUP}/{CERT_MANAGER_VERSION}")
        );
        assert_eq!(
            crd_name(&prometheus_service_monitor()),
            "servicemonitors.monitoring.coreos.com"
        );
        assert_eq!(crd_name(&kpack_image()), "images.kpack.io");
    }

    #[test]
    fn builder_kind_maps_to_its_kpack_kind() {
        assert_eq!(
            kpack_builder(BuilderKind::ClusterBuilder),
            kpack_cluster_builder()
        );
        assert_eq!(
            kpack_builder(BuilderKind::Builder),
            kpack_namespaced_builder()
        );
        // The API's enum serializes to the kpack kind name.
        for kind in [BuilderKind::ClusterBuilder, BuilderKind::Builder] {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                kpack_builder(kind).kind.as_str()
            );
        }
    }
}

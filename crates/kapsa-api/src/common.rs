//! Small types shared by several kinds: object references.
//!
//! Kapsa defines its own reference types (rather than embedding
//! `k8s-openapi` ones) so that every field carries a Kapsa description and
//! the exact constraints Kapsa needs.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{DNS_LABEL, DNS_SUBDOMAIN};

/// A reference to an object by name, in the namespace the referring field
/// documents (usually the Project's namespace).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct LocalObjectReference {
    /// Name of the referenced object: a DNS subdomain (lower-case
    /// `[a-z0-9.-]`, at most 253 characters), e.g. `shop-config`.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
}

impl LocalObjectReference {
    /// A reference to `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self { name: name.into() }
    }
}

/// A reference to a Secret by name and, where the field allows it, namespace.
/// Kapsa never stores secret values in its resources; it only names Secrets.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct SecretReference {
    /// Name of the Secret: a DNS subdomain (lower-case `[a-z0-9.-]`, at most
    /// 253 characters), e.g. `harbor-push`.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,

    /// Namespace of the Secret: a DNS label, e.g. `kapsa-system`. Required on
    /// a ClusterRegistry; must be omitted on a Registry (whose Secret is read
    /// from the Registry's own namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = DNS_LABEL))]
    pub namespace: Option<String>,
}

/// A reference to a cert-manager `ClusterIssuer`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub struct ClusterIssuerReference {
    /// Name of the cert-manager ClusterIssuer, e.g. `letsencrypt`. A DNS
    /// subdomain of at most 253 characters.
    #[schemars(length(min = 1, max = 253), regex(pattern = DNS_SUBDOMAIN))]
    pub name: String,
}

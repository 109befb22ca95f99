//! Errors of a reconcile, one kind per step of the pipeline. Problems with
//! the user's objects are not errors: they become conditions. These are the
//! ones worth a retry (with per-object exponential backoff).

/// Which step of the pipeline failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Dereference: a read that could not be served from the caches failed
    /// (only a changed registry credentials Secret is read live).
    #[error("dereference: {0}")]
    Dereference(#[source] kube::Error),
    /// Apply: a server-side apply was refused.
    #[error("apply {kind} {name}: {source}")]
    Apply {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Prune: deleting an object the plan no longer wants failed.
    #[error("prune {kind} {name}: {source}")]
    Prune {
        kind: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    /// Status: the one status write failed.
    #[error("status: {0}")]
    Status(#[source] kube::Error),
    /// A Kubernetes call outside the four steps (leader election, polling).
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("serialization: {0}")]
    Serialization(#[from] serde_json::Error),
}

impl Error {
    /// A short label for metrics (`kapsa_reconcile_failures_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Dereference(_) => "Dereference",
            Self::Apply { .. } => "Apply",
            Self::Prune { .. } => "Prune",
            Self::Status(_) => "Status",
            Self::Kube(_) => "Kube",
            Self::Serialization(_) => "Serialization",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

use std::time::Duration;

/// Why a remote repository could not be listed.
///
/// The texts never contain a password, token or private key: errors are
/// built from messages that never see them, and [`list_branches`] scrubs the
/// secret values out of every message as a second line of defence.
///
/// [`list_branches`]: super::list_branches
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GitError {
    /// The URL is malformed, uses an unsupported transport (only `https://`,
    /// `http://`, `ssh://` and scp-like `user@host:path` are accepted), or
    /// embeds a password.
    #[error("invalid git URL: {0}")]
    InvalidUrl(String),
    /// The Secret's type is not one Kapsa can use for git, or it does not fit
    /// the URL (an ssh key for an https URL, for example).
    #[error("unsupported git credentials: {0}")]
    UnsupportedSecret(String),
    /// The Secret has a supported type but lacks a key or holds invalid data.
    #[error("invalid git credentials Secret: {0}")]
    InvalidSecret(String),
    /// The server refused the credentials, or asked for credentials and none
    /// were given.
    #[error("git authentication failed: {0}")]
    AuthenticationFailed(String),
    /// The ssh host key did not match `known_hosts`.
    #[error("ssh host key verification failed: {0}")]
    HostKeyVerificationFailed(String),
    /// The server answered but has no such repository.
    #[error("git repository not found: {0}")]
    NotFound(String),
    /// The server could not be reached or the exchange failed (DNS, refused
    /// or reset connections, TLS errors, server errors, protocol errors).
    #[error("git remote unreachable: {0}")]
    Unreachable(String),
    /// No answer within the given time.
    #[error("git remote did not answer within {0:?}")]
    Timeout(Duration),
    /// A local failure (temporary files, a panicked worker).
    #[error("git client error: {0}")]
    Internal(String),
}

impl GitError {
    /// A short machine-friendly reason, for a status condition's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            GitError::InvalidUrl(_) => "InvalidURL",
            GitError::UnsupportedSecret(_) => "UnsupportedSecret",
            GitError::InvalidSecret(_) => "InvalidSecret",
            GitError::AuthenticationFailed(_) => "AuthenticationFailed",
            GitError::HostKeyVerificationFailed(_) => "HostKeyVerificationFailed",
            GitError::NotFound(_) => "RepositoryNotFound",
            GitError::Unreachable(_) => "Unreachable",
            GitError::Timeout(_) => "Timeout",
            GitError::Internal(_) => "InternalError",
        }
    }

    /// Whether retrying later without any change may succeed. A wrong URL or
    /// Secret needs a person; the operator still polls, with backoff.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            GitError::Unreachable(_) | GitError::Timeout(_) | GitError::Internal(_)
        )
    }

    /// The same error with `prefix: ` before its message.
    pub(crate) fn prefixed(self, prefix: &str) -> Self {
        self.map_message(|m| format!("{prefix}: {m}"))
    }

    /// Replace every occurrence of each secret value in the message.
    pub(crate) fn scrub(self, secrets: &[&str]) -> Self {
        self.map_message(|msg| {
            secrets
                .iter()
                .filter(|s| s.len() >= 3)
                .fold(msg, |msg, s| msg.replace(s, "[REDACTED]"))
        })
    }

    fn map_message(self, f: impl FnOnce(String) -> String) -> Self {
        match self {
            GitError::InvalidUrl(m) => GitError::InvalidUrl(f(m)),
            GitError::UnsupportedSecret(m) => GitError::UnsupportedSecret(f(m)),
            GitError::InvalidSecret(m) => GitError::InvalidSecret(f(m)),
            GitError::AuthenticationFailed(m) => GitError::AuthenticationFailed(f(m)),
            GitError::HostKeyVerificationFailed(m) => GitError::HostKeyVerificationFailed(f(m)),
            GitError::NotFound(m) => GitError::NotFound(f(m)),
            GitError::Unreachable(m) => GitError::Unreachable(f(m)),
            GitError::Internal(m) => GitError::Internal(f(m)),
            GitError::Timeout(d) => GitError::Timeout(d),
        }
    }
}

use std::time::Duration;

/// The longest message a [`GitError`] carries, in bytes. Messages end up in
/// a Project's status and in Events (whose note is limited to 1 KiB): text
/// that a git server sent must never make those writes fail.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// `text` on one line (control characters become spaces) and at most `max`
/// bytes long, cut at a character boundary and marked with `…` when cut.
pub fn bounded(text: &str, max: usize) -> String {
    let clean: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if clean.len() <= max {
        return clean;
    }
    let ellipsis = '…';
    let mut end = max.saturating_sub(ellipsis.len_utf8());
    while !clean.is_char_boundary(end) {
        end -= 1;
    }
    let mut cut = clean[..end].to_owned();
    cut.push(ellipsis);
    cut
}

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
    /// The URL's host is, or resolves only to, an internal address (loopback,
    /// link-local, a private range, ...) that the operator does not allow
    /// (see [`HostPolicy`](super::HostPolicy)).
    #[error("git URL refused: {0}")]
    HostNotAllowed(String),
    /// The server answered with a redirect. Kapsa follows none: a redirect
    /// could lead credentials or requests to another host.
    #[error("git server redirected: {0}")]
    Redirected(String),
    /// The server sent more refs or more bytes than Kapsa accepts.
    #[error("git server sent too much: {0}")]
    LimitExceeded(String),
    /// The server cannot answer the merge check cheaply: it does not speak
    /// git protocol v2, or its `fetch` lacks `shallow` (a depth-limited
    /// history) or `filter` (commits without their trees and files; git's
    /// `uploadpack.allowFilter`), or it uses another hash than SHA-1. Kapsa
    /// then downloads nothing rather than the repository's files.
    #[error("git server cannot answer the merge check: {0}")]
    MergeCheckUnsupported(String),
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
            GitError::HostNotAllowed(_) => "HostNotAllowed",
            GitError::Redirected(_) => "Redirected",
            GitError::LimitExceeded(_) => "LimitExceeded",
            GitError::MergeCheckUnsupported(_) => "MergeCheckUnsupported",
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

    /// The same error with its message made safe to show: control
    /// characters replaced, at most [`MAX_MESSAGE_BYTES`] long.
    pub(crate) fn bounded(self) -> Self {
        self.map_message(|m| bounded(&m, MAX_MESSAGE_BYTES))
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
            GitError::HostNotAllowed(m) => GitError::HostNotAllowed(f(m)),
            GitError::Redirected(m) => GitError::Redirected(f(m)),
            GitError::LimitExceeded(m) => GitError::LimitExceeded(f(m)),
            GitError::MergeCheckUnsupported(m) => GitError::MergeCheckUnsupported(f(m)),
            GitError::Internal(m) => GitError::Internal(f(m)),
            GitError::Timeout(d) => GitError::Timeout(d),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_bounded_and_on_one_line() {
        assert_eq!(bounded("short", 10), "short");
        assert_eq!(bounded("a\nb\r\tc\u{1b}[31m", 100), "a b  c [31m");
        let long = "x".repeat(32 * 1024);
        let cut = bounded(&long, MAX_MESSAGE_BYTES);
        assert_eq!(cut.len(), MAX_MESSAGE_BYTES);
        assert!(cut.ends_with('…'));
        // Never a split character.
        let wide = "é".repeat(1000);
        let cut = bounded(&wide, 101);
        assert!(cut.len() <= 101 && cut.ends_with('…'), "{}", cut.len());
        let err = GitError::Unreachable(long).bounded();
        assert!(err.to_string().len() < MAX_MESSAGE_BYTES + 40);
    }
}

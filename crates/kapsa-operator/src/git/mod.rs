//! Refs-only access to remote git repositories: the `ls-remote` of Kapsa.
//!
//! The operator never clones. [`list_branches`] connects to a repository in
//! the fetch direction, performs the git protocol handshake (v2 when the
//! server speaks it) and lists the refs under `refs/heads/`, returning each
//! branch with the commit it points to. Builds (kpack) fetch the source
//! themselves, pinned to that commit.
//!
//! - Transports: `https://`, `http://`, `ssh://` and scp-like `git@host:path`
//!   URLs. Everything else (local paths, `file://`, `git://`, remote helpers
//!   like `ext::`) is refused with [`GitError::InvalidUrl`].
//! - Library: gitoxide (`gix`), pure Rust. HTTP(S) goes through reqwest with
//!   rustls (ring provider, the platform's trust store); SSH through the
//!   system `ssh` program.
//! - Isolation: the host's git configuration (system, global, `~/.gitconfig`,
//!   `GIT_*` environment), its credential helpers, prompts, `~/.ssh/config`,
//!   its ssh keys and agent are never consulted, so a result does not depend
//!   on the machine the operator runs on.
//! - Credentials come from a Kubernetes Secret ([`GitCredentials::from_secret`]):
//!   `kubernetes.io/basic-auth` (a password or a token) or
//!   `kubernetes.io/ssh-auth` (a private key and optional `known_hosts`).
//!   They are never written into a URL, a log line or an error message.
//! - Polling cadence: [`backoff_delay`] gives the delay before the next poll,
//!   with jitter, and exponential backoff after failures.
//!
//! gix is blocking: [`list_branches`] runs it on tokio's blocking pool with a
//! timeout.

mod backoff;
mod credentials;
mod error;
mod remote;
mod ssh;
mod url;

pub use backoff::{MAX_BACKOFF, backoff_delay};
pub use credentials::GitCredentials;
pub use error::GitError;
pub use remote::{RemoteHeads, list_branches};

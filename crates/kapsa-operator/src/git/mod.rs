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
//!   system `ssh` program, which the operator starts itself.
//! - Isolation: the host's git configuration (system, global, `~/.gitconfig`,
//!   `GIT_*` environment), its credential helpers, prompts, `~/.ssh/config`,
//!   its ssh keys and agent are never consulted, so a result does not depend
//!   on the machine the operator runs on.
//! - Credentials come from a Kubernetes Secret ([`GitCredentials::from_secret`]):
//!   `kubernetes.io/basic-auth` (a password or a token) or
//!   `kubernetes.io/ssh-auth` (a private key and optional `known_hosts`).
//!   They are never written into a URL, a log line or an error message.
//! - Where it connects ([`HostPolicy`]): a URL whose host is, or resolves
//!   only to, an internal address (loopback, link-local such as the cloud
//!   metadata service, private ranges, ...) is refused unless the operator
//!   allows it (`--allow-internal-git-hosts`); the connection goes to exactly
//!   the addresses that were checked. No redirect is followed, and
//!   credentials go to the URL's own scheme, host and port only.
//! - A hostile server is bounded ([`ListOptions`]): at most
//!   [`MAX_ADVERTISEMENT_BYTES`] read and [`MAX_REFS`] refs per listing, and
//!   one timeout for all of it, after which the ssh process is killed.
//!   Error texts are bounded ([`MAX_MESSAGE_BYTES`]) and never quote a
//!   server's response body.
//! - Polling cadence: [`backoff_delay`] gives the delay before the next poll,
//!   with jitter, and exponential backoff after failures.
//!
//! Where it runs: an `http(s)://` listing is two requests made and awaited
//! on the operator's runtime, their answers parsed in memory by gix's
//! pkt-line reader and ref parsers (`smart_http`). gix's transports are
//! blocking: an ssh listing and every merge check run gix on tokio's
//! blocking pool, with the same timeout.

mod ancestry;
mod backoff;
mod credentials;
mod error;
mod hosts;
mod limits;
mod remote;
mod smart_http;
mod ssh;
mod url;

pub use ancestry::{MERGE_CHECK_DEPTH, contained_in};
pub use backoff::{MAX_BACKOFF, backoff_delay};
pub use credentials::GitCredentials;
pub use error::{GitError, MAX_MESSAGE_BYTES, bounded};
pub use hosts::{AddressClass, HostPolicy, Network, classify};
pub use limits::{MAX_ADVERTISEMENT_BYTES, MAX_MERGE_CHECK_BYTES, MAX_REFS};
pub use remote::{ListOptions, RemoteHeads, list_branches};
pub use smart_http::V2Servers;
pub use url::kpack_git_annotation;

//! Listing a remote's branches with gix: handshake + ls-refs, no fetch.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use gix::{
    credentials::{helper::Action, protocol::Outcome},
    protocol::{
        handshake::Ref,
        transport::{
            Protocol,
            client::blocking_io::{http, ssh},
        },
    },
    remote::Direction,
};
use rustls_platform_verifier::BuilderVerifierExt;

use super::{
    GitCredentials, GitError,
    ssh::{SshSession, classify_failure},
    url::{self, RemoteUrl, Transport},
};

/// The branches of a remote repository.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoteHeads {
    /// Branch name (without `refs/heads/`) → the commit it points to, as
    /// lower-case hex (40 characters for SHA-1 repositories).
    pub branches: BTreeMap<String, String>,
}

impl RemoteHeads {
    /// The commit a branch points to, if the branch exists.
    pub fn get(&self, branch: &str) -> Option<&str> {
        self.branches.get(branch).map(String::as_str)
    }
}

/// The refspec whose sources are listed: every branch, nothing else.
const BRANCHES_REFSPEC: &str = "+refs/heads/*:refs/remotes/origin/*";

/// List the branches of the repository at `url`, refs only (no clone, no
/// objects fetched), with `credentials` if given, giving up after `timeout`.
///
/// - `url`: `https://`, `http://`, `ssh://` or scp-like `user@host:path`.
/// - `credentials`: [`GitCredentials::Basic`] for http(s), only sent when the
///   server asks for them and only to the URL's host;
///   [`GitCredentials::SshKey`] for ssh (required there). A mismatch is
///   [`GitError::UnsupportedSecret`].
/// - The host's git and ssh configuration, credential helpers, keys and
///   agent are never used.
///
/// Errors: [`GitError::InvalidUrl`], [`GitError::AuthenticationFailed`]
/// (refused or missing credentials), [`GitError::NotFound`],
/// [`GitError::Unreachable`], [`GitError::Timeout`] and others; none of
/// their texts contains a secret.
///
/// The blocking work runs on tokio's blocking pool. On timeout the caller is
/// answered at once; the abandoned attempt ends on its own shortly after
/// (its HTTP client and ssh connect/keep-alive timeouts derive from
/// `timeout`).
pub async fn list_branches(
    url: &str,
    credentials: Option<&GitCredentials>,
    timeout: Duration,
) -> Result<RemoteHeads, GitError> {
    let secrets: Vec<String> = credentials
        .map(|c| c.secret_values().into_iter().map(str::to_owned).collect())
        .unwrap_or_default();
    let scrub = |e: GitError| e.scrub(&secrets.iter().map(String::as_str).collect::<Vec<_>>());

    let remote = url::parse(url).map_err(scrub)?;
    match (remote.transport, credentials) {
        (Transport::Http, Some(GitCredentials::SshKey { .. })) => {
            return Err(GitError::UnsupportedSecret(format!(
                "an ssh-auth Secret cannot be used with the http(s) URL {}; use a basic-auth Secret or an ssh URL",
                remote.display
            )));
        }
        (Transport::Ssh, Some(GitCredentials::Basic { .. })) => {
            return Err(GitError::UnsupportedSecret(format!(
                "a basic-auth Secret cannot be used with the ssh URL {}; use an ssh-auth Secret or an https URL",
                remote.display
            )));
        }
        (Transport::Http, Some(GitCredentials::Basic { .. }))
            if remote.url.scheme == gix::url::Scheme::Http && !is_loopback(&remote.url) =>
        {
            return Err(GitError::UnsupportedSecret(format!(
                "credentials are only sent over https (plain http only to loopback), not to {}",
                remote.display
            )));
        }
        (Transport::Ssh, None) => {
            return Err(GitError::AuthenticationFailed(format!(
                "the ssh URL {} needs credentials: reference a kubernetes.io/ssh-auth Secret",
                remote.display
            )));
        }
        _ => {}
    }

    let credentials = credentials.cloned();
    let work =
        tokio::task::spawn_blocking(move || list_blocking(&remote, credentials.as_ref(), timeout));
    let outcome = match tokio::time::timeout(timeout, work).await {
        Err(_elapsed) => Err(GitError::Timeout(timeout)),
        Ok(Err(join)) => Err(GitError::Internal(format!("the git worker failed: {join}"))),
        Ok(Ok(result)) => result,
    };
    outcome.map_err(scrub)
}

fn list_blocking(
    remote: &RemoteUrl,
    credentials: Option<&GitCredentials>,
    timeout: Duration,
) -> Result<RemoteHeads, GitError> {
    // gix needs a repository to hang a remote on: an empty bare one in a
    // temporary folder, opened with only its own configuration (no system,
    // global or user config, no GIT_* environment).
    let dir = tempfile::Builder::new()
        .prefix("kapsa-git-")
        .tempdir()
        .map_err(|e| GitError::Internal(format!("cannot create a temporary folder: {e}")))?;
    let repo = gix::ThreadSafeRepository::init_opts(
        dir.path(),
        gix::create::Kind::Bare,
        gix::create::Options::default(),
        gix::open::Options::isolated().config_overrides([
            "protocol.version=2".to_owned(),
            format!("gitoxide.userAgent=kapsa/{}", env!("CARGO_PKG_VERSION")),
        ]),
    )
    .map_err(|e| {
        GitError::Internal(format!(
            "cannot initialise a scratch repository: {}",
            describe(&e)
        ))
    })?
    .to_thread_local();

    let gremote = repo
        .remote_at_without_url_rewrite(remote.url.clone())
        .and_then(|r| r.with_refspecs([BRANCHES_REFSPEC], Direction::Fetch))
        .map(|r| r.with_fetch_tags(gix::remote::fetch::Tags::None))
        .map_err(|e| GitError::InvalidUrl(format!("{}: {}", remote.display, describe(&e))))?;

    let options = gix::remote::ref_map::Options::default();
    let ref_map = match remote.transport {
        Transport::Http => {
            let transport_options = http_options(&repo, remote, timeout)?;
            let host = remote.url.host().unwrap_or_default().to_owned();
            let basic = match credentials {
                Some(GitCredentials::Basic { username, password }) => {
                    Some((username.clone(), password.clone()))
                }
                _ => None,
            };
            let connection = gremote
                .connect(Direction::Fetch)
                .map_err(|e| classify(&e, remote, false))?
                .with_transport_options(transport_options)
                .with_credentials(move |action| basic_auth(action, &host, basic.as_ref()));
            let with_credentials = credentials.is_some();
            connection
                .ref_map(gix::progress::Discard, options)
                .map_err(|e| classify(&e, remote, with_credentials))?
                .0
        }
        Transport::Ssh => {
            let Some(GitCredentials::SshKey {
                private_key,
                known_hosts,
            }) = credentials
            else {
                return Err(GitError::Internal("ssh without a key".into()));
            };
            let session = SshSession::new(private_key, known_hosts.as_deref(), timeout)?;
            let transport = ssh::connect(
                remote.url.clone(),
                Protocol::V2,
                ssh::connect::Options {
                    command: Some(session.command().into()),
                    disallow_shell: false,
                    kind: Some(ssh::ProgramKind::Ssh),
                },
                false,
            )
            .map_err(|e| GitError::InvalidUrl(format!("{}: {e}", remote.display)))?;
            let connection = gremote
                .to_connection_with_transport(transport)
                .with_credentials(|_| Ok(None));
            match connection.ref_map(gix::progress::Discard, options) {
                Ok((map, _handshake)) => map,
                Err(e) => {
                    return Err(match classify_failure(&session.stderr()) {
                        Some(from_ssh) => from_ssh.prefixed(&remote.display),
                        None => classify(&e, remote, true),
                    });
                }
            }
        }
    };

    let mut branches = BTreeMap::new();
    for r in ref_map.remote_refs {
        let (name, id) = match r {
            Ref::Direct {
                full_ref_name,
                object,
            }
            | Ref::Peeled {
                full_ref_name,
                object,
                ..
            }
            | Ref::Symbolic {
                full_ref_name,
                object,
                ..
            } => (full_ref_name, object),
            Ref::Unborn { .. } => continue,
        };
        if let Some(branch) = name.strip_prefix(b"refs/heads/") {
            branches.insert(
                String::from_utf8_lossy(branch).into_owned(),
                id.to_hex().to_string(),
            );
        }
    }
    Ok(RemoteHeads { branches })
}

/// Answer gix's credential requests with the Secret's username and password,
/// only for the URL's own host (a redirect elsewhere gets nothing); never a
/// helper program or a prompt.
fn basic_auth(
    action: Action,
    host: &str,
    basic: Option<&(String, String)>,
) -> gix::Result<Option<Outcome>> {
    let Action::Get(context) = action else {
        // Store/Erase: there is no credential store to update.
        return Ok(None);
    };
    let Some((username, password)) = basic else {
        return Ok(None);
    };
    let same_host = context
        .url
        .as_ref()
        .and_then(|u| gix::url::parse(u.as_slice()).ok())
        .is_none_or(|u| u.host() == Some(host));
    if !same_host {
        return Ok(None);
    }
    Ok(Some(Outcome {
        identity: gix::sec::identity::Account {
            username: username.clone(),
            password: password.clone(),
            oauth_refresh_token: None,
        },
        next: context.into(),
    }))
}

/// gix's HTTP options for this URL (from the isolated configuration), with
/// our reqwest client: ring-based rustls with the platform's trust store, and
/// an overall request timeout.
fn http_options(
    repo: &gix::Repository,
    remote: &RemoteUrl,
    timeout: Duration,
) -> Result<Box<dyn std::any::Any>, GitError> {
    let mut options = repo
        .transport_options(
            gix::bstr::ByteSlice::as_bstr(remote.url.to_bstring().as_slice()),
            None,
        )
        .ok()
        .flatten()
        .and_then(|o| o.downcast::<http::Options>().ok())
        .map(|o| *o)
        .unwrap_or_default();
    let tls = tls_config()?;
    options.connect_timeout = Some(timeout.min(Duration::from_secs(30)));
    options.user_agent = Some(format!("kapsa/{}", env!("CARGO_PKG_VERSION")));
    options.backend = Some(Arc::new(Mutex::new(http::reqwest::Options {
        configure_client: Some(Box::new(move |builder| {
            Ok(builder
                .timeout(timeout)
                .connect_timeout(timeout.min(Duration::from_secs(30)))
                .no_proxy()
                .tls_backend_preconfigured((*tls).clone()))
        })),
        configure_request: None,
    })));
    Ok(Box::new(options))
}

/// One TLS configuration per process (loading the platform's trust store
/// once), on the ring provider that kube also uses.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, GitError> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    if let Some(config) = CONFIG.get() {
        return Ok(config.clone());
    }
    let tls_error = |e: rustls::Error| GitError::Internal(format!("cannot set up TLS: {e}"));
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(tls_error)?
    .with_platform_verifier()
    .map_err(tls_error)?
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(CONFIG.get_or_init(|| Arc::new(config)).clone())
}

/// Whether the URL's host is this machine (`localhost`, 127.0.0.0/8, `::1`).
fn is_loopback(url: &gix::url::Url) -> bool {
    let host = url.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Map a gix error to ours by its classification.
fn classify(err: &gix::Error, remote: &RemoteUrl, with_credentials: bool) -> GitError {
    let description = describe(err);
    let http_404 = err.iter_errors().any(|e| {
        e.downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.status() == Some(reqwest::StatusCode::NOT_FOUND))
    }) || description.contains("HTTP status 404");
    let msg = format!("{}: {description}", remote.display);
    if err.is_unauthenticated() || err.is_permission_denied() {
        if with_credentials {
            GitError::AuthenticationFailed(msg)
        } else {
            GitError::AuthenticationFailed(format!(
                "{}: the server requires authentication and no credentials Secret is referenced",
                remote.display
            ))
        }
    } else if http_404 || err.is_not_found() {
        GitError::NotFound(msg)
    } else {
        GitError::Unreachable(msg)
    }
}

/// The error's message and its causes, de-duplicated, on one line.
fn describe(err: &gix::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for e in err.iter_errors() {
        let text = e.to_string();
        let text = text.trim();
        if text.is_empty() || parts.iter().any(|p| p.contains(text)) {
            continue;
        }
        parts.push(text.to_owned());
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> (String, String) {
        ("alice".into(), "t0ken-value".into())
    }

    #[test]
    fn basic_auth_answers_only_for_the_urls_host() {
        let c = creds();
        let get = |url: &str| Action::get_for_url(url);
        let outcome = basic_auth(
            get("https://git.example.com/a.git"),
            "git.example.com",
            Some(&c),
        )
        .unwrap()
        .expect("credentials for the same host");
        assert_eq!(outcome.identity.username, "alice");
        assert_eq!(outcome.identity.password, "t0ken-value");
        assert!(
            basic_auth(
                get("https://evil.example.net/a.git"),
                "git.example.com",
                Some(&c)
            )
            .unwrap()
            .is_none()
        );
        assert!(
            basic_auth(
                get("https://git.example.com/a.git"),
                "git.example.com",
                None
            )
            .unwrap()
            .is_none()
        );
        assert!(
            basic_auth(Action::Erase("x".into()), "git.example.com", Some(&c))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn loopback_hosts() {
        for (url, expected) in [
            ("http://127.0.0.1:8080/a.git", true),
            ("http://127.1.2.3/a.git", true),
            ("http://localhost/a.git", true),
            ("http://[::1]:80/a.git", true),
            ("http://git.example.com/a.git", false),
            ("http://10.0.0.1/a.git", false),
            ("http://127.0.0.1.example.com/a.git", false),
        ] {
            let parsed = url::parse(url).unwrap();
            assert_eq!(is_loopback(&parsed.url), expected, "{url}");
        }
    }

    #[tokio::test]
    async fn mismatched_credentials_are_refused_before_connecting() {
        let basic = GitCredentials::Basic {
            username: "a".into(),
            password: "p4ssword".into(),
        };
        let key = GitCredentials::SshKey {
            private_key: "KEY".into(),
            known_hosts: None,
        };
        let t = Duration::from_secs(5);
        assert!(matches!(
            list_branches("https://git.invalid/a.git", Some(&key), t).await,
            Err(GitError::UnsupportedSecret(_))
        ));
        assert!(matches!(
            list_branches("git@git.invalid:a.git", Some(&basic), t).await,
            Err(GitError::UnsupportedSecret(_))
        ));
        assert!(matches!(
            list_branches("ssh://git@git.invalid/a.git", None, t).await,
            Err(GitError::AuthenticationFailed(_))
        ));
        match list_branches("http://git.example.com/a.git", Some(&basic), t).await {
            Err(GitError::UnsupportedSecret(msg)) => assert!(msg.contains("https"), "{msg}"),
            other => panic!("plain http with credentials off loopback: {other:?}"),
        }
        assert!(matches!(
            list_branches("file:///etc", Some(&basic), t).await,
            Err(GitError::InvalidUrl(_))
        ));
    }
}

//! Listing a remote's branches (handshake + ls-refs, no fetch): over
//! http(s) on the runtime ([`smart_http`]), over ssh with gix on the
//! blocking pool; and the gix connection path that the merge check in
//! [`ancestry`](super::ancestry) uses for both transports.

use std::{
    collections::BTreeMap,
    io::BufReader,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use gix::{
    credentials::{helper::Action, protocol::Outcome},
    error::ErrorExt,
    protocol::{
        handshake::Ref,
        transport::{
            Protocol,
            client::{
                blocking_io::{Transport as BlockingTransport, http},
                git as git_transport,
            },
            packetline,
        },
    },
    remote::Direction,
};
use rustls_platform_verifier::BuilderVerifierExt;

use super::{
    GitCredentials, GitError, HostPolicy,
    error::bounded,
    hosts::allowed_addresses,
    limits::{Bounded, Budget, ChildSlot, MAX_ADVERTISEMENT_BYTES, MAX_REFS},
    smart_http,
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

/// How [`list_branches`] may reach a server, and how much it accepts.
#[derive(Debug, Clone)]
pub struct ListOptions {
    /// Time for the whole listing, from the DNS lookup to the last byte. On
    /// timeout the ssh process is killed and every read fails.
    pub timeout: Duration,
    /// The internal addresses the URL's host may resolve to (none by default).
    pub hosts: HostPolicy,
    /// The most refs the server may advertise ([`MAX_REFS`]).
    pub max_refs: usize,
    /// The most bytes read from the server, all responses together
    /// ([`MAX_ADVERTISEMENT_BYTES`]).
    pub max_bytes: u64,
    /// The ssh client to run for ssh URLs: `ssh`, found on `PATH`, by default.
    pub ssh_program: std::path::PathBuf,
    /// The `ls-refs` command of each protocol-v2 server listed before,
    /// shared by the clones of these options: a later listing of the same
    /// URL is one request.
    pub v2_servers: Arc<super::smart_http::V2Servers>,
}

impl ListOptions {
    /// `timeout`, the default limits, and no internal address allowed.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            hosts: HostPolicy::default(),
            max_refs: MAX_REFS,
            max_bytes: MAX_ADVERTISEMENT_BYTES,
            ssh_program: "ssh".into(),
            v2_servers: Arc::default(),
        }
    }

    /// The same options with `hosts` as the host policy.
    pub fn with_hosts(mut self, hosts: HostPolicy) -> Self {
        self.hosts = hosts;
        self
    }
}

/// The refspec whose sources are listed: every branch, nothing else.
const BRANCHES_REFSPEC: &str = "+refs/heads/*:refs/remotes/origin/*";

/// The longest part of a git client error shown in a message.
pub(super) const MAX_PART_CHARS: usize = 200;

/// List the branches of the repository at `url`, refs only (no clone, no
/// objects fetched), with `credentials` if given, within `options`.
///
/// - `url`: `https://`, `http://`, `ssh://` or scp-like `user@host:path`.
/// - Where it connects: the URL's host resolves once; every address is
///   checked against `options.hosts` ([`GitError::HostNotAllowed`] when none
///   is allowed), and the connection goes to exactly the allowed addresses
///   (http: a pinned resolver that answers no other name; ssh:
///   `HostName=<address>`), so a DNS answer that changes after the check
///   changes nothing. Redirects are never followed ([`GitError::Redirected`]),
///   and every request is checked to go to the URL's own scheme, host and
///   port.
/// - `credentials`: [`GitCredentials::Basic`] for http(s), only sent when the
///   server asks for them and only to the URL's own scheme, host and port;
///   [`GitCredentials::SshKey`] for ssh (required there). A mismatch is
///   [`GitError::UnsupportedSecret`].
/// - Bounds: at most `options.max_bytes` read from the server and
///   `options.max_refs` refs ([`GitError::LimitExceeded`]), and
///   `options.timeout` in all ([`GitError::Timeout`]): on timeout the
///   caller is answered at once, the ssh process is killed, and any read
///   still waiting fails when its data or its HTTP client's read timeout
///   (also `options.timeout`) comes.
/// - The host's git and ssh configuration, credential helpers, keys and
///   agent are never used.
/// - Where it runs: http(s) on the caller's runtime (no blocking thread);
///   ssh on tokio's blocking pool.
///
/// Errors: [`GitError::InvalidUrl`], [`GitError::AuthenticationFailed`]
/// (refused or missing credentials), [`GitError::NotFound`],
/// [`GitError::Unreachable`], [`GitError::Timeout`] and others; none of
/// their texts contains a secret or a server's response body, and none is
/// longer than [`MAX_MESSAGE_BYTES`](super::error::MAX_MESSAGE_BYTES).
pub async fn list_branches(
    url: &str,
    credentials: Option<&GitCredentials>,
    options: &ListOptions,
) -> Result<RemoteHeads, GitError> {
    let (remote, scrub) = checked(url, credentials)?;
    if remote.transport == Transport::Http {
        // On the runtime: two requests, no blocking thread.
        let budget = Budget::new(options.timeout, options.max_bytes);
        let listing = smart_http::list(&remote, credentials, options, &budget);
        let outcome = match tokio::time::timeout(options.timeout, listing).await {
            Err(_elapsed) => Err(GitError::Timeout(options.timeout)),
            Ok(result) => result,
        };
        return outcome.map_err(|e| scrub.apply(e));
    }
    run(url, credentials, options, options.max_bytes, |session| {
        list_blocking(&session)
    })
    .await
}

/// The secret values of an exchange's credentials, to be removed from any
/// error text before it is shown.
pub(super) struct Scrub(Vec<String>);

impl Scrub {
    fn new(credentials: Option<&GitCredentials>) -> Self {
        Self(
            credentials
                .map(|c| c.secret_values().into_iter().map(str::to_owned).collect())
                .unwrap_or_default(),
        )
    }

    /// `e` without the secrets, and bounded.
    pub(super) fn apply(&self, e: GitError) -> GitError {
        e.scrub(&self.0.iter().map(String::as_str).collect::<Vec<_>>())
            .bounded()
    }
}

/// Parse `url` and check that the `credentials` fit it (before anything
/// connects); the error is already scrubbed.
fn checked(
    url: &str,
    credentials: Option<&GitCredentials>,
) -> Result<(RemoteUrl, Scrub), GitError> {
    let scrub = Scrub::new(credentials);
    let remote = url::parse(url).map_err(|e| scrub.apply(e))?;
    let refused = match (remote.transport, credentials) {
        (Transport::Http, Some(GitCredentials::SshKey { .. })) => {
            Some(GitError::UnsupportedSecret(format!(
                "an ssh-auth Secret cannot be used with the http(s) URL {}; use a basic-auth Secret or an ssh URL",
                remote.display
            )))
        }
        (Transport::Ssh, Some(GitCredentials::Basic { .. })) => {
            Some(GitError::UnsupportedSecret(format!(
                "a basic-auth Secret cannot be used with the ssh URL {}; use an ssh-auth Secret or an https URL",
                remote.display
            )))
        }
        (Transport::Http, Some(GitCredentials::Basic { .. }))
            if remote.url.scheme == gix::url::Scheme::Http && !is_loopback(&remote.url) =>
        {
            Some(GitError::UnsupportedSecret(format!(
                "credentials are only sent over https (plain http only to loopback), not to {}",
                remote.display
            )))
        }
        (Transport::Ssh, None) => Some(GitError::AuthenticationFailed(format!(
            "the ssh URL {} needs credentials: reference a kubernetes.io/ssh-auth Secret",
            remote.display
        ))),
        _ => None,
    };
    match refused {
        Some(e) => Err(scrub.apply(e)),
        None => Ok((remote, scrub)),
    }
}

/// One exchange with a remote, as the blocking worker sees it: the parsed
/// URL, the credentials, the options and the bounds every read goes through.
pub(super) struct Session {
    pub(super) remote: RemoteUrl,
    pub(super) credentials: Option<GitCredentials>,
    pub(super) options: ListOptions,
    pub(super) budget: Arc<Budget>,
    child: Arc<ChildSlot>,
    /// The operator's runtime, on which HTTP requests are made.
    runtime: tokio::runtime::Handle,
}

/// The checks and bounds shared by every exchange with a remote
/// ([`list_branches`], the merge check): parse `url` and check that the
/// `credentials` fit it, then run `work` on tokio's blocking pool with at most
/// `max_bytes` read from the server and `options.timeout` in all; on timeout
/// (or when the caller drops the future) the ssh process is killed and every
/// further read fails. The error's text is scrubbed of the secrets and
/// bounded.
pub(super) async fn run<T, F>(
    url: &str,
    credentials: Option<&GitCredentials>,
    options: &ListOptions,
    max_bytes: u64,
    work: F,
) -> Result<T, GitError>
where
    T: Send + 'static,
    F: FnOnce(Session) -> Result<T, GitError> + Send + 'static,
{
    let (remote, scrub) = checked(url, credentials)?;
    let budget = Budget::new(options.timeout, max_bytes);
    let child = Arc::new(ChildSlot::default());
    // Whatever way this function ends (an answer, a timeout, the caller
    // dropping it), the work it started stops: the ssh process is killed
    // and every further read of server data fails.
    let _give_up = GiveUpOnDrop {
        budget: budget.clone(),
        child: child.clone(),
    };
    let session = Session {
        remote,
        credentials: credentials.cloned(),
        options: options.clone(),
        budget,
        child,
        runtime: tokio::runtime::Handle::current(),
    };
    let work = tokio::task::spawn_blocking(move || work(session));
    let outcome = match tokio::time::timeout(options.timeout, work).await {
        Err(_elapsed) => Err(GitError::Timeout(options.timeout)),
        Ok(Err(join)) => Err(GitError::Internal(format!("the git worker failed: {join}"))),
        Ok(Ok(result)) => result,
    };
    outcome.map_err(|e| scrub.apply(e))
}

struct GiveUpOnDrop {
    budget: Arc<Budget>,
    child: Arc<ChildSlot>,
}

impl Drop for GiveUpOnDrop {
    fn drop(&mut self) {
        self.budget.cancel();
        self.child.kill();
    }
}

/// gix needs a repository to hang a remote (and its HTTP options) on: an
/// empty bare one in a temporary folder, opened with only its own
/// configuration (no system, global or user config, no GIT_* environment).
/// The folder goes when the returned guard is dropped.
pub(super) fn scratch_repository() -> Result<(tempfile::TempDir, gix::Repository), GitError> {
    let dir = tempfile::Builder::new()
        .prefix("kapsa-git-")
        .tempdir()
        .map_err(|e| GitError::Internal(format!("cannot create a temporary folder: {e}")))?;
    let repo = gix::ThreadSafeRepository::init_opts(
        dir.path(),
        gix::create::Kind::Bare,
        gix::create::Options::default(),
        scratch_open_options(),
    )
    .map_err(|e| {
        GitError::Internal(format!(
            "cannot initialise a scratch repository: {}",
            describe(&e)
        ))
    })?
    .to_thread_local();
    Ok((dir, repo))
}

/// How scratch repositories are opened: with only their own configuration.
fn scratch_open_options() -> gix::open::Options {
    gix::open::Options::isolated().config_overrides([
        "protocol.version=2".to_owned(),
        format!("gitoxide.userAgent=kapsa/{}", env!("CARGO_PKG_VERSION")),
    ])
}

/// A transport to the remote's `git-upload-pack`, connected (ssh: the
/// process runs) but before the handshake.
pub(super) struct Connected {
    /// The transport; every byte it reads goes through the session's budget.
    pub(super) transport: Box<dyn BlockingTransport>,
    /// What to `configure` the transport with before the handshake (http:
    /// the pinned, redirect-free client).
    pub(super) transport_options: Option<Box<dyn std::any::Any>>,
    /// Where basic credentials may go, and which (http only).
    auth: Option<(Origin, Option<(String, String)>)>,
    /// The ssh command's files and stderr (ssh only), for [`finish`] once
    /// the transport is gone.
    pub(super) ssh: Option<SshSession>,
}

impl Connected {
    /// gix's credential callback: the Secret's username and password for
    /// the URL's own origin only (http), nothing otherwise (ssh
    /// authenticates with its key).
    pub(super) fn authenticate(
        &self,
    ) -> impl FnMut(Action) -> gix::Result<Option<Outcome>> + 'static {
        let auth = self.auth.clone();
        move |action| match &auth {
            Some((origin, basic)) => basic_auth(action, origin, basic.as_ref()),
            None => Ok(None),
        }
    }
}

/// Why an exchange with a connected remote failed: something gix reported
/// (classified by [`finish`]), or an error of ours.
pub(super) enum Failure {
    Git(gix::Error),
    Ours(GitError),
}

impl From<gix::Error> for Failure {
    fn from(e: gix::Error) -> Self {
        Failure::Git(e)
    }
}

impl From<GitError> for Failure {
    fn from(e: GitError) -> Self {
        Failure::Ours(e)
    }
}

/// Connect to the URL's host the one way Kapsa does, for reading
/// (`git-upload-pack`): the host resolves once and its addresses are checked
/// against the host policy; http goes through a client pinned to those
/// addresses that follows no redirect and reads through the session's budget;
/// ssh runs the system `ssh` (killed when the session gives up) against one
/// of them.
pub(super) fn connect(session: &Session, repo: &gix::Repository) -> Result<Connected, GitError> {
    let remote = &session.remote;
    // Where to connect, before anything connects.
    let host = remote.url.host().unwrap_or_default().to_ascii_lowercase();
    let port = remote
        .url
        .port_or_default()
        .ok_or_else(|| GitError::InvalidUrl(format!("{}: no port", remote.display)))?;
    let addresses = allowed_addresses(&host, port, &session.options.hosts)
        .map_err(|e| e.prefixed(&remote.display))?;
    match remote.transport {
        Transport::Http => connect_http(session, repo, addresses),
        Transport::Ssh => connect_ssh(session, addresses[0].ip()),
    }
}

/// The end of an exchange with a connected remote: the ssh process is
/// reaped, a limit that was hit explains the failure (it explains it better
/// than what the git client made of the failed read), then what ssh said,
/// then gix's error by its classification.
pub(super) fn finish<T>(
    session: &Session,
    connected_ssh: Option<&SshSession>,
    result: Result<T, Failure>,
) -> Result<T, GitError> {
    session.child.reap();
    if let Some(limit) = session.budget.tripped() {
        return Err(limit.prefixed(&session.remote.display));
    }
    match result {
        Ok(value) => Ok(value),
        Err(Failure::Ours(e)) => Err(e),
        Err(Failure::Git(e)) => Err(
            match connected_ssh.and_then(|s| classify_failure(&s.stderr())) {
                Some(from_ssh) => from_ssh.prefixed(&session.remote.display),
                None => classify(&e, &session.remote, session.credentials.is_some()),
            },
        ),
    }
}

/// The scratch repository listings hang their remote on: made once per
/// process, because a listing reads nothing from it and writes nothing to it
/// (every poll making and removing one of its own was most of an idle
/// operator's CPU, in the kernel's file system code), and opened once per
/// thread of tokio's blocking pool (opening it for every poll read its
/// configuration from disk each time; a gix repository cannot move between
/// threads). A merge check, which fetches into its repository, still gets
/// one of its own. The folder stays until the process ends.
fn listing_repository() -> Result<gix::Repository, GitError> {
    static SHARED: std::sync::Mutex<Option<tempfile::TempDir>> = std::sync::Mutex::new(None);
    thread_local! {
        static OPEN: std::cell::RefCell<Option<(std::path::PathBuf, gix::Repository)>> =
            const { std::cell::RefCell::new(None) };
    }
    let path = {
        let mut shared = SHARED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match shared.as_ref() {
            Some(dir) if dir.path().is_dir() => dir.path().to_path_buf(),
            // First use, or something removed the folder (a /tmp cleaner):
            // make it.
            _ => {
                let (dir, _) = scratch_repository()?;
                let path = dir.path().to_path_buf();
                *shared = Some(dir);
                path
            }
        }
    };
    OPEN.with(|open| {
        let mut open = open.borrow_mut();
        if let Some((opened, repo)) = open.as_ref()
            && *opened == path
        {
            return Ok(repo.clone());
        }
        let repo = gix::open_opts(&path, scratch_open_options()).map_err(|e| {
            GitError::Internal(format!(
                "cannot open the scratch repository: {}",
                describe(&e)
            ))
        })?;
        *open = Some((path, repo.clone()));
        Ok(repo)
    })
}

fn list_blocking(session: &Session) -> Result<RemoteHeads, GitError> {
    let remote = &session.remote;
    let options = &session.options;
    let repo = listing_repository()?;
    let gremote = repo
        .remote_at_without_url_rewrite(remote.url.clone())
        .and_then(|r| r.with_refspecs([BRANCHES_REFSPEC], Direction::Fetch))
        .map(|r| r.with_fetch_tags(gix::remote::fetch::Tags::None))
        .map_err(|e| GitError::InvalidUrl(format!("{}: {}", remote.display, describe(&e))))?;

    let connected = connect(session, &repo)?;
    let authenticate = connected.authenticate();
    let Connected {
        transport,
        transport_options,
        ssh,
        ..
    } = connected;
    let mut connection = gremote
        .to_connection_with_transport(transport)
        .with_credentials(authenticate);
    if let Some(transport_options) = transport_options {
        connection = connection.with_transport_options(transport_options);
    }
    let listed = connection
        .ref_map(
            gix::progress::Discard,
            gix::remote::ref_map::Options::default(),
        )
        .map(|(map, _handshake)| map)
        .map_err(Failure::Git);
    let ref_map = finish(session, ssh.as_ref(), listed)?;
    heads_of(ref_map.remote_refs, remote, options.max_refs)
}

/// The branches among the refs a server listed (at most `max_refs` refs).
pub(super) fn heads_of(
    refs: Vec<Ref>,
    remote: &RemoteUrl,
    max_refs: usize,
) -> Result<RemoteHeads, GitError> {
    if refs.len() > max_refs {
        return Err(GitError::LimitExceeded(format!(
            "{}: the server advertised {} refs; Kapsa lists at most {}",
            remote.display,
            refs.len(),
            max_refs
        )));
    }
    let mut branches = BTreeMap::new();
    for r in refs {
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

fn connect_http(
    session: &Session,
    repo: &gix::Repository,
    addresses: Vec<SocketAddr>,
) -> Result<Connected, GitError> {
    let remote = &session.remote;
    let transport_options = http_options(repo, remote);
    let basic = match &session.credentials {
        Some(GitCredentials::Basic { username, password }) => {
            Some((username.clone(), password.clone()))
        }
        _ => None,
    };
    let origin = Origin::of(&remote.url);
    let transport = http::connect_http(
        RuntimeHttp {
            client: shared_client(&origin, &addresses, session.options.timeout)?,
            runtime: session.runtime.clone(),
            budget: session.budget.clone(),
            origin,
            headers: Vec::new(),
        },
        remote.url.clone(),
        Protocol::V2,
        false,
    );
    Ok(Connected {
        transport: Box::new(transport),
        transport_options: Some(transport_options),
        auth: Some((Origin::of(&remote.url), basic)),
        ssh: None,
    })
}

fn connect_ssh(session: &Session, connect_to: std::net::IpAddr) -> Result<Connected, GitError> {
    let remote = &session.remote;
    let options = &session.options;
    let Some(GitCredentials::SshKey {
        private_key,
        known_hosts,
    }) = &session.credentials
    else {
        return Err(GitError::Internal("ssh without a key".into()));
    };
    let ssh = SshSession::new(private_key, known_hosts.as_deref(), options.timeout)?;
    let mut process = ssh
        .command(&options.ssh_program, &remote.url, connect_to)?
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                GitError::Internal("the ssh program is not installed".into())
            }
            _ => GitError::Internal(format!("cannot start ssh: {e}")),
        })?;
    let (Some(stdout), Some(stdin)) = (process.stdout.take(), process.stdin.take()) else {
        return Err(GitError::Internal("ssh has no pipes".into()));
    };
    if !session.child.put(process) {
        return Err(GitError::Timeout(options.timeout));
    }
    let transport = git_transport::blocking_io::Connection::new(
        Bounded::new(BufReader::new(stdout), session.budget.clone()),
        stdin,
        Protocol::V2,
        remote.url.path.clone(),
        None::<(String, Option<u16>)>,
        git_transport::ConnectMode::Process,
        false,
    )
    .custom_url(Some(remote.url.to_bstring()));
    Ok(Connected {
        transport: Box::new(transport),
        transport_options: None,
        auth: None,
        ssh: Some(ssh),
    })
}

/// gix's HTTP exchanges (merge checks; listings over http(s) no longer use
/// gix's transport, see [`smart_http`]), made on the operator's own tokio
/// runtime through a client shared by every exchange with the same origin,
/// pinned addresses and timeout ([`shared_client`]). gix's own HTTP backend
/// runs every request on a thread of its own, behind a blocking reqwest
/// client with a runtime thread of its own, and hands headers and body from
/// thread to thread one write at a time. Here the exchange's own (blocking)
/// thread waits for each step on the runtime.
/// Every response body is read through the listing's [`Budget`], every
/// request must go to the URL's own origin, no redirect is followed, and a
/// response that names another location is refused.
struct RuntimeHttp {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
    budget: Arc<Budget>,
    origin: Origin,
    /// Header lines every request carries (gix's configuration: the user
    /// agent, and any extra headers).
    headers: Vec<String>,
}

/// One request and its response, shared by the headers and the body gix
/// reads: sent when gix first reads either (after it has written a POST's
/// body), the body read chunk by chunk as gix asks for it.
type Shared = std::rc::Rc<std::cell::RefCell<Exchange>>;

enum Exchange {
    Pending {
        request: reqwest::RequestBuilder,
        post: Option<std::rc::Rc<std::cell::RefCell<Vec<u8>>>>,
    },
    Answered {
        headers: Option<Vec<u8>>,
        response: reqwest::Response,
    },
    Failed(Option<std::io::Error>),
}

/// The most bytes of response headers read (hyper bounds them further).
const MAX_HEADER_BYTES: usize = 64 * 1024;

fn request_failed(error: reqwest::Error) -> std::io::Error {
    let kind = if error.is_timeout() {
        std::io::ErrorKind::TimedOut
    } else if error.is_connect() {
        std::io::ErrorKind::ConnectionRefused
    } else {
        std::io::ErrorKind::Other
    };
    std::io::Error::new(kind, error)
}

impl Exchange {
    /// Sends the request if it is pending, and waits for the response's
    /// headers; a 401 becomes gix's "authentication required", another
    /// error status an error.
    fn send(shared: &Shared, runtime: &tokio::runtime::Handle) {
        let (request, post) = {
            let mut state = shared.borrow_mut();
            match std::mem::replace(&mut *state, Exchange::Failed(None)) {
                Exchange::Pending { request, post } => (request, post),
                answered => {
                    *state = answered;
                    return;
                }
            }
        };
        let request = match post {
            Some(body) => request.body(std::mem::take(&mut *body.borrow_mut())),
            None => request,
        };
        let answer = runtime.block_on(request.send()).map_err(request_failed);
        *shared.borrow_mut() = match answer.and_then(checked_status) {
            Ok(response) => {
                let mut headers = Vec::new();
                for (name, value) in response.headers() {
                    headers.extend_from_slice(name.as_str().as_bytes());
                    headers.push(b':');
                    headers.extend_from_slice(value.as_bytes());
                    headers.push(b'\n');
                }
                headers.truncate(MAX_HEADER_BYTES);
                Exchange::Answered {
                    headers: Some(headers),
                    response,
                }
            }
            Err(error) => Exchange::Failed(Some(error)),
        };
    }

    fn failure(&mut self) -> std::io::Error {
        match self {
            Exchange::Failed(error) => error
                .take()
                .unwrap_or_else(|| std::io::Error::other("the request failed")),
            _ => std::io::Error::other("the request was not sent"),
        }
    }
}

/// The response if its status lets gix read it: a success, or a redirect
/// (refused once its headers are read). Otherwise the error gix expects.
fn checked_status(response: reqwest::Response) -> std::io::Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() || status.is_redirection() {
        return Ok(response);
    }
    if status == reqwest::StatusCode::UNAUTHORIZED {
        let www_authenticate = response
            .headers()
            .get_all(reqwest::header::WWW_AUTHENTICATE)
            .iter()
            .map(|value| value.as_bytes().into())
            .collect();
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            gix::protocol::transport::client::AuthenticationRequired { www_authenticate },
        ));
    }
    let kind = if status.is_server_error() && status != reqwest::StatusCode::NOT_IMPLEMENTED {
        std::io::ErrorKind::ConnectionAborted
    } else {
        std::io::ErrorKind::Other
    };
    Err(std::io::Error::new(
        kind,
        format!("Received HTTP status {}", status.as_str()),
    ))
}

/// The response headers as gix reads them (`name:value` lines).
struct Headers {
    shared: Shared,
    runtime: tokio::runtime::Handle,
    budget: Arc<Budget>,
    read: Option<std::io::Cursor<Vec<u8>>>,
}

impl Headers {
    fn load(&mut self) -> std::io::Result<&mut std::io::Cursor<Vec<u8>>> {
        if self.read.is_none() {
            Exchange::send(&self.shared, &self.runtime);
            let bytes = match &mut *self.shared.borrow_mut() {
                Exchange::Answered { headers, .. } => headers.take().unwrap_or_default(),
                other => return Err(other.failure()),
            };
            let location = String::from_utf8_lossy(&bytes).lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.trim()
                    .eq_ignore_ascii_case("location")
                    .then(|| value.trim().to_owned())
            });
            if let Some(location) = location {
                self.budget.refuse(GitError::Redirected(format!(
                    "the server redirects to {}, and Kapsa follows no redirect (credentials and requests go to the URL's own host only); set the URL to the repository's final location",
                    bounded(&location, MAX_PART_CHARS)
                )));
                return Err(std::io::Error::other("redirect refused"));
            }
            self.read = Some(std::io::Cursor::new(bytes));
        }
        Ok(self.read.as_mut().expect("loaded above"))
    }
}

impl std::io::Read for Headers {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::io::Read::read(self.load()?, buf)
    }
}

impl std::io::BufRead for Headers {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.load()?.fill_buf()
    }

    fn consume(&mut self, amount: usize) {
        if let Some(read) = self.read.as_mut() {
            read.consume(amount);
        }
    }
}

/// The response body, a chunk at a time (through the [`Budget`], which
/// wraps it).
struct Body {
    shared: Shared,
    runtime: tokio::runtime::Handle,
    chunk: bytes::Bytes,
}

impl std::io::Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let available = std::io::BufRead::fill_buf(self)?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        std::io::BufRead::consume(self, n);
        Ok(n)
    }
}

impl std::io::BufRead for Body {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.chunk.is_empty() {
            Exchange::send(&self.shared, &self.runtime);
            let next = match &mut *self.shared.borrow_mut() {
                Exchange::Answered { response, .. } => self
                    .runtime
                    .block_on(response.chunk())
                    .map_err(request_failed)?,
                other => return Err(other.failure()),
            };
            self.chunk = next.unwrap_or_default();
        }
        Ok(&self.chunk)
    }

    fn consume(&mut self, amount: usize) {
        let amount = amount.min(self.chunk.len());
        let _ = self.chunk.split_to(amount);
    }
}

/// What gix writes as a POST's body (it is sent once gix reads the answer).
struct PostBody(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl std::io::Write for PostBody {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl RuntimeHttp {
    /// A request to `url`, which must be on the URL's own origin, with
    /// gix's headers and the configured ones.
    fn exchange(
        &self,
        method: reqwest::Method,
        url: &str,
        headers: impl IntoIterator<Item = impl AsRef<str>>,
        post: Option<std::rc::Rc<std::cell::RefCell<Vec<u8>>>>,
    ) -> gix::Result<Shared> {
        let url =
            reqwest::Url::parse(url).map_err(|e| gix::error::message!("not a URL: {e}").raise())?;
        let to = Origin::of_request(&url);
        if to != self.origin {
            return Err(gix::error::message!(
                "refusing a request to {}://{} (not the git URL's origin)",
                to.scheme,
                to.host
            )
            .raise());
        }
        let mut map = reqwest::header::HeaderMap::new();
        let lines = headers
            .into_iter()
            .map(|line| line.as_ref().to_owned())
            .chain(self.headers.iter().cloned());
        for line in lines {
            if let Some((name, value)) = line.split_once(':')
                && let (Ok(name), Ok(value)) = (
                    reqwest::header::HeaderName::from_bytes(name.trim().as_bytes()),
                    reqwest::header::HeaderValue::from_str(value.trim()),
                )
            {
                map.append(name, value);
            }
        }
        let request = self.client.request(method, url).headers(map);
        Ok(std::rc::Rc::new(std::cell::RefCell::new(
            Exchange::Pending { request, post },
        )))
    }

    fn response(&self, shared: Shared) -> (Headers, Bounded<Body>) {
        (
            Headers {
                shared: shared.clone(),
                runtime: self.runtime.clone(),
                budget: self.budget.clone(),
                read: None,
            },
            Bounded::new(
                Body {
                    shared,
                    runtime: self.runtime.clone(),
                    chunk: bytes::Bytes::new(),
                },
                self.budget.clone(),
            ),
        )
    }
}

impl http::Http for RuntimeHttp {
    type Headers = Headers;
    type ResponseBody = Bounded<Body>;
    type PostBody = PostBody;

    fn get(
        &mut self,
        url: &str,
        _base_url: &str,
        headers: impl IntoIterator<Item = impl AsRef<str>>,
    ) -> gix::Result<http::GetResponse<Self::Headers, Self::ResponseBody>> {
        let shared = self.exchange(reqwest::Method::GET, url, headers, None)?;
        let (headers, body) = self.response(shared);
        Ok(http::GetResponse { headers, body })
    }

    fn post(
        &mut self,
        url: &str,
        _base_url: &str,
        headers: impl IntoIterator<Item = impl AsRef<str>>,
        _body: http::PostBodyDataKind,
    ) -> gix::Result<http::PostResponse<Self::Headers, Self::ResponseBody, Self::PostBody>> {
        let written = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let shared = self.exchange(reqwest::Method::POST, url, headers, Some(written.clone()))?;
        let (headers, body) = self.response(shared);
        Ok(http::PostResponse {
            post_body: PostBody(written),
            headers,
            body,
        })
    }

    fn configure(&mut self, config: &dyn std::any::Any) -> gix::Result {
        if let Some(options) = config.downcast_ref::<http::Options>() {
            self.headers = options.extra_headers.clone();
            if let Some(agent) = &options.user_agent {
                self.headers.push(format!("User-Agent: {agent}"));
            }
        }
        Ok(())
    }

    fn redirected_base_url(&self) -> Option<String> {
        None
    }
}

/// At most this many HTTP clients are kept (one per origin, pinned
/// addresses and timeout; each keeps its idle connections for a while).
const MAX_HTTP_CLIENTS: usize = 64;

/// The shared client for `origin` reached at `addresses` with `timeout`:
/// made once, pinned to those addresses (a resolver that answers no other
/// name), following no redirect, on Kapsa's TLS configuration. The least
/// recently used goes when more than [`MAX_HTTP_CLIENTS`] are kept.
pub(super) fn shared_client(
    origin: &Origin,
    addresses: &[SocketAddr],
    timeout: Duration,
) -> Result<reqwest::Client, GitError> {
    type Kept = Vec<((Origin, Vec<SocketAddr>, Duration), reqwest::Client)>;
    static CLIENTS: Mutex<Kept> = Mutex::new(Vec::new());
    let key = (origin.clone(), addresses.to_vec(), timeout);
    let mut clients = CLIENTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(at) = clients.iter().position(|(k, _)| *k == key) {
        let kept = clients.remove(at);
        let client = kept.1.clone();
        clients.push(kept);
        return Ok(client);
    }
    let pinned = origin.host.parse::<std::net::IpAddr>().is_err();
    let builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(30)))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .tls_backend_preconfigured((*tls_config()?).clone())
        .dns_resolver(Arc::new(NoOtherNames));
    let builder = if pinned {
        builder.resolve_to_addrs(&origin.host, addresses)
    } else {
        builder
    };
    let client = builder
        .build()
        .map_err(|e| GitError::Internal(format!("cannot set up the HTTP client: {e}")))?;
    clients.push((key, client.clone()));
    if clients.len() > MAX_HTTP_CLIENTS {
        clients.remove(0);
    }
    Ok(client)
}

/// Scheme, host and port: where credentials may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

impl Origin {
    fn new(scheme: &str, host: &str, port: Option<u16>) -> Self {
        Self {
            scheme: scheme.to_ascii_lowercase(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase(),
            port,
        }
    }

    pub(super) fn of(url: &gix::url::Url) -> Self {
        Self::new(
            url.scheme.as_str(),
            url.host().unwrap_or_default(),
            url.port_or_default(),
        )
    }

    pub(super) fn of_request(url: &reqwest::Url) -> Self {
        Self::new(
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port_or_known_default(),
        )
    }
}

/// Answer gix's credential requests with the Secret's username and password,
/// only for the URL's own scheme, host and port (a request about any other
/// URL, or about no URL, gets nothing); never a helper program or a prompt.
fn basic_auth(
    action: Action,
    origin: &Origin,
    basic: Option<&(String, String)>,
) -> gix::Result<Option<Outcome>> {
    let Action::Get(context) = action else {
        // Store/Erase: there is no credential store to update.
        return Ok(None);
    };
    let Some((username, password)) = basic else {
        return Ok(None);
    };
    let same_origin = context
        .url
        .as_ref()
        .and_then(|u| gix::url::parse(u.as_slice()).ok())
        .is_some_and(|u| Origin::of(&u) == *origin);
    if !same_origin {
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

/// Answers no name: the one name a listing connects to is pinned to its
/// checked addresses, and nothing else is looked up.
struct NoOtherNames;

impl reqwest::dns::Resolve for NoOtherNames {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_owned();
        Box::pin(async move {
            Err(format!("{name} is not the git URL's host; Kapsa connects nowhere else").into())
        })
    }
}

/// gix's HTTP options for this URL (from the isolated configuration): Kapsa's
/// user agent, and no redirect followed (the client follows none either, and
/// a 3xx answer itself is refused when its headers are read). The rest
/// (timeouts, TLS, the pinned addresses, the origin check) is the shared
/// client's and [`RuntimeHttp`]'s.
fn http_options(repo: &gix::Repository, remote: &RemoteUrl) -> Box<dyn std::any::Any> {
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
    options.user_agent = Some(format!("kapsa/{}", env!("CARGO_PKG_VERSION")));
    options.follow_redirects = http::options::FollowRedirects::None;
    Box::new(options)
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

/// Whether the URL's host is this machine (`localhost`, 127.0.0.0/8, `::1`,
/// `::ffff:127.0.0.1`).
fn is_loopback(url: &gix::url::Url) -> bool {
    let host = url.host().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Map a gix error to ours by its classification.
pub(super) fn classify(err: &gix::Error, remote: &RemoteUrl, with_credentials: bool) -> GitError {
    let redirected = err.iter_errors().any(|e| {
        e.downcast_ref::<reqwest::Error>()
            .is_some_and(reqwest::Error::is_redirect)
    });
    if redirected {
        return GitError::Redirected(format!(
            "{}: the server answered with a redirect, and Kapsa follows no redirect (credentials and requests go to the URL's own host only); set the URL to the repository's final location",
            remote.display
        ));
    }
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

/// The error's message and its causes, de-duplicated, on one line, each
/// part bounded. What a server sent is shown only as the git protocol's own
/// error line (`ERR ...`, bounded); an answer that is not git is described,
/// never quoted.
fn describe(err: &gix::Error) -> String {
    if let Some(line) = server_error_line(err) {
        return format!(
            "the server refused: {}",
            bounded(line.trim(), MAX_PART_CHARS)
        );
    }
    if err.is_corrupted() {
        return "the server's answer is not a valid git ref advertisement".into();
    }
    let mut parts: Vec<String> = Vec::new();
    for e in err.iter_errors() {
        let text = bounded(e.to_string().trim(), MAX_PART_CHARS);
        let text = text.trim();
        if text.is_empty() || parts.iter().any(|p| p.contains(text)) {
            continue;
        }
        parts.push(text.to_owned());
    }
    parts.join(": ")
}

/// The git protocol's error line (`ERR ...`) the server sent, if the error
/// comes from one (unbounded: bound it before showing it).
pub(super) fn server_error_line(err: &gix::Error) -> Option<String> {
    err.iter_errors().find_map(|e| {
        e.downcast_ref::<packetline::read::Error>()
            .map(|line| line.message.to_string())
            .or_else(|| {
                e.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|inner| inner.downcast_ref::<packetline::read::Error>())
                    .map(|line| line.message.to_string())
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> (String, String) {
        ("alice".into(), "t0ken-value".into())
    }

    #[test]
    fn basic_auth_answers_only_for_the_urls_origin() {
        let c = creds();
        let origin = Origin::of(&url::parse("https://git.example.com/a.git").unwrap().url);
        let answer = |url: &str| {
            basic_auth(Action::get_for_url(url), &origin, Some(&c))
                .unwrap()
                .map(|o| o.identity)
        };
        let identity = answer("https://git.example.com/other.git").expect("the same origin");
        assert_eq!(identity.username, "alice");
        assert_eq!(identity.password, "t0ken-value");
        assert!(answer("https://GIT.example.com:443/a.git").is_some());
        for elsewhere in [
            "https://evil.example.net/a.git",
            "https://git.example.com:8443/a.git",
            "http://git.example.com/a.git",
            "ssh://git@git.example.com/a.git",
            "not a url at all",
        ] {
            assert!(answer(elsewhere).is_none(), "{elsewhere}");
        }
        // A request that names no URL gets nothing either.
        let mut no_url = Action::get_for_url("https://git.example.com/a.git");
        if let Action::Get(context) = &mut no_url {
            context.url = None;
        }
        assert!(basic_auth(no_url, &origin, Some(&c)).unwrap().is_none());
        assert!(
            basic_auth(
                Action::get_for_url("https://git.example.com/a.git"),
                &origin,
                None
            )
            .unwrap()
            .is_none()
        );
        assert!(
            basic_auth(Action::Erase("x".into()), &origin, Some(&c))
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
            ("http://[::ffff:127.0.0.1]/a.git", true),
            ("http://[::ffff:10.0.0.1]/a.git", false),
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
        let t = &ListOptions::new(Duration::from_secs(5));
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

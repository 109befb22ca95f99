//! Real git repositories served over smart HTTP on loopback, for tests.
//!
//! [`GitServer`] serves every bare repository under its root folder through
//! `git http-backend` (the CGI program of the installed git) behind a small
//! hyper server on `127.0.0.1:<free port>`, optionally behind HTTP basic
//! auth. [`TestRepo`] is one served bare repository plus a working clone
//! used to make commits with the `git` command line; commits are pushed to
//! the bare repository through the file system, so the server stays
//! read-only (clone, fetch, ls-remote).
//!
//! The server runs on its own thread with its own single-threaded tokio
//! runtime, so it serves whatever runtime (or none) its users run in, and
//! it can outlive the `#[tokio::test]` that started it (for a shared
//! fixture). Dropping the [`GitServer`] stops it and deletes its folders.
//!
//! Every `git` run here is isolated from the machine: no system or global
//! configuration (`GIT_CONFIG_NOSYSTEM`, `GIT_CONFIG_GLOBAL=/dev/null`, a
//! temporary `HOME`), fixed author and committer.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use base64::Engine;
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;

/// The branch every [`TestRepo`] starts with, and branches are created from.
pub const DEFAULT_BRANCH: &str = "main";

/// Author and committer of every commit made by [`TestRepo::commit`].
pub const AUTHOR_NAME: &str = "Kapsa Test";
/// E-mail of the author and committer.
pub const AUTHOR_EMAIL: &str = "test@kapsa.invalid";

/// The `WWW-Authenticate` challenge of a server with basic auth.
const CHALLENGE: &str = "Basic realm=\"kapsa-test-git\"";

/// Serves the bare repositories under its root over smart HTTP on loopback.
pub struct GitServer {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

struct State {
    /// The repositories (`<name>.git`); deleted on drop.
    root: tempfile::TempDir,
    /// `HOME` for every git process.
    home: tempfile::TempDir,
    basic_auth: Option<(String, String)>,
    requests: Mutex<Vec<String>>,
    /// Response body bytes sent so far.
    bytes_served: AtomicU64,
    /// While set, every request gets `503 Service Unavailable`.
    down: std::sync::atomic::AtomicBool,
    /// While set, the `Git-Protocol` header is not passed on: the server
    /// speaks protocol v0, as an older git host does.
    v0_only: std::sync::atomic::AtomicBool,
}

impl GitServer {
    /// Start a server on a free loopback port; with `basic_auth`, every
    /// request needs that username and password (401 with a
    /// `WWW-Authenticate: Basic` challenge otherwise).
    pub async fn start(basic_auth: Option<(String, String)>) -> io::Result<Self> {
        Self::start_on(std::net::Ipv4Addr::LOCALHOST, basic_auth).await
    }

    /// [`GitServer::start`] on a free port of `address`, a local address:
    /// e.g. the real lane's bridge gateway, where build Pods reach it.
    pub async fn start_on(
        address: std::net::Ipv4Addr,
        basic_auth: Option<(String, String)>,
    ) -> io::Result<Self> {
        let root = tempfile::Builder::new()
            .prefix("kapsa-git-server-")
            .tempdir()?;
        let home = tempfile::Builder::new()
            .prefix("kapsa-git-home-")
            .tempdir()?;
        let listener = std::net::TcpListener::bind((address, 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            root,
            home,
            basic_auth,
            requests: Mutex::new(Vec::new()),
            bytes_served: AtomicU64::new(0),
            down: Default::default(),
            v0_only: Default::default(),
        });
        let (shutdown, stop) = tokio::sync::oneshot::channel();
        let (ready_tx, ready) = tokio::sync::oneshot::channel();
        let served = state.clone();
        let thread = std::thread::Builder::new()
            .name(format!("git-server-{}", addr.port()))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    serve(listener, served, stop).await;
                });
            })?;
        ready
            .await
            .map_err(|_| io::Error::other("the git server thread died"))??;
        tracing::debug!(%addr, "git server started");
        Ok(GitServer {
            addr,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// `http://<address>:PORT/<repo>.git` (a `.git` suffix in `repo` is kept
    /// as is).
    pub fn url(&self, repo: &str) -> String {
        let repo = repo.trim_start_matches('/');
        let repo = repo.strip_suffix(".git").unwrap_or(repo);
        format!("http://{}/{repo}.git", self.addr)
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The folder holding the bare repositories.
    pub fn root(&self) -> &Path {
        self.state.root.path()
    }

    /// Every request served so far, as `METHOD /path?query` (before the
    /// authentication check), oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.state
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Takes the server down (every request, recorded in [`Self::requests`],
    /// gets `503 Service Unavailable`, as from a git host in an outage) or
    /// brings it back.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Makes the server speak protocol v0 only (it no longer hears a
    /// client's request for v2), as a git host moved to an older server
    /// would, or v2 again.
    pub fn set_v0_only(&self, v0_only: bool) {
        self.state.v0_only.store(v0_only, Ordering::SeqCst);
    }

    /// The bytes of every response body served so far (the git data a
    /// client received, without HTTP headers).
    pub fn bytes_served(&self) -> u64 {
        self.state.bytes_served.load(Ordering::SeqCst)
    }

    /// Create an empty bare repository `<name>.git` served by this server,
    /// with a working clone to commit from. `name` may contain `/` (for
    /// `acme/shop`) but no `..`. The repository allows partial fetches
    /// (`uploadpack.allowFilter true`; see [`TestRepo::set_config`] to turn
    /// that off); the server speaks protocol v2 to clients that ask for it
    /// (the `Git-Protocol` header reaches `git http-backend`).
    pub fn create_repo(&self, name: &str) -> io::Result<TestRepo> {
        let name = name.strip_suffix(".git").unwrap_or(name);
        let valid = !name.is_empty()
            && !name.starts_with('/')
            && name
                .split('/')
                .all(|part| !part.is_empty() && part != "." && part != "..")
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !valid {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid repository name {name:?}"),
            ));
        }
        let bare = self.root().join(format!("{name}.git"));
        if bare.exists() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("repository {name:?} exists"),
            ));
        }
        let home = self.state.home.path().to_owned();
        let work = tempfile::Builder::new()
            .prefix("kapsa-git-work-")
            .tempdir()?;
        let b = DEFAULT_BRANCH;
        git(
            &home,
            self.root(),
            &["init", "-q", "--bare", "-b", b, path_str(&bare)?],
        )?;
        git(
            &home,
            &bare,
            &["config", "--local", "uploadpack.allowFilter", "true"],
        )?;
        git(&home, work.path(), &["init", "-q", "-b", b, "."])?;
        git(
            &home,
            work.path(),
            &["remote", "add", "origin", path_str(&bare)?],
        )?;
        Ok(TestRepo {
            name: name.to_owned(),
            url: self.url(name),
            bare,
            work,
            home,
            lock: Mutex::new(()),
        })
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A bare repository served by a [`GitServer`] and a working clone that
/// makes commits and pushes them to it.
pub struct TestRepo {
    name: String,
    url: String,
    bare: PathBuf,
    work: tempfile::TempDir,
    home: PathBuf,
    /// Serialises the git commands of concurrent callers.
    lock: Mutex<()>,
}

impl TestRepo {
    /// The repository's name on the server.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its URL on the server (`http://127.0.0.1:PORT/<name>.git`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The bare repository on disk.
    pub fn bare_path(&self) -> &Path {
        &self.bare
    }

    /// Write `contents` to `path` on `branch`, commit it with `message`
    /// (even if nothing changed, so every call makes a new commit) and push
    /// the branch. A missing branch is created from the default branch
    /// ([`DEFAULT_BRANCH`]), or as the first commit of an empty repository.
    /// Returns the new commit's id.
    pub fn commit(
        &self,
        branch: &str,
        path: &str,
        contents: impl AsRef<[u8]>,
        message: &str,
    ) -> io::Result<String> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        check_branch(branch)?;
        let rel = Path::new(path);
        if path.is_empty()
            || rel.is_absolute()
            || rel
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid path {path:?}"),
            ));
        }
        let work = self.work.path();
        self.checkout_for_commit(branch)?;
        let file = work.join(rel);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, contents)?;
        self.git(work, &["add", "--", path])?;
        self.git(work, &["commit", "-q", "--allow-empty", "-m", message])?;
        self.git(
            work,
            &[
                "push",
                "-q",
                "--force",
                "origin",
                &format!("HEAD:refs/heads/{branch}"),
            ],
        )?;
        Ok(self.git(work, &["rev-parse", "HEAD"])?.trim().to_owned())
    }

    /// Make `count` commits on `branch`, each changing `files` files
    /// (`series/file-<n>.txt`, about 500 bytes each, different in every
    /// commit), and push them at once. A missing branch is created as by
    /// [`commit`](Self::commit). Returns the id of every commit, oldest first.
    pub fn commit_series(
        &self,
        branch: &str,
        count: usize,
        files: usize,
    ) -> io::Result<Vec<String>> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        check_branch(branch)?;
        let work = self.work.path();
        self.checkout_for_commit(branch)?;
        std::fs::create_dir_all(work.join("series"))?;
        let mut ids = Vec::with_capacity(count);
        for i in 0..count {
            for f in 0..files.max(1) {
                std::fs::write(
                    work.join("series").join(format!("file-{f}.txt")),
                    series_text(branch, i, f),
                )?;
            }
            self.git(work, &["add", "--", "series"])?;
            self.git(
                work,
                &[
                    "commit",
                    "-q",
                    "--allow-empty",
                    "-m",
                    &format!("series {i}"),
                ],
            )?;
            ids.push(self.git(work, &["rev-parse", "HEAD"])?.trim().to_owned());
        }
        self.push(branch)?;
        Ok(ids)
    }

    /// Merge `from` into `into` with a merge commit (`--no-ff`, even when a
    /// fast-forward is possible) and push `into`. Both branches must exist
    /// (made through this [`TestRepo`]). Returns the new head of `into`.
    pub fn merge(&self, into: &str, from: &str, message: &str) -> io::Result<String> {
        self.merge_with(into, from, &["--no-ff", "-m", message])
    }

    /// Fast-forward `into` to `from` (`--ff-only`: `from` must contain
    /// `into`) and push `into`. Returns the new head of `into`, `from`'s.
    pub fn fast_forward(&self, into: &str, from: &str) -> io::Result<String> {
        self.merge_with(into, from, &["--ff-only"])
    }

    fn merge_with(&self, into: &str, from: &str, how: &[&str]) -> io::Result<String> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        check_branch(into)?;
        check_branch(from)?;
        let work = self.work.path();
        self.git(work, &["checkout", "-q", into])?;
        let mut args = vec!["merge", "-q"];
        args.extend_from_slice(how);
        args.extend(["--", from]);
        self.git(work, &args)?;
        self.push(into)?;
        Ok(self.git(work, &["rev-parse", "HEAD"])?.trim().to_owned())
    }

    /// Create `branch` at `from`'s head (no new commit) and push it. Returns
    /// the commit it points to.
    pub fn create_branch(&self, branch: &str, from: &str) -> io::Result<String> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        check_branch(branch)?;
        check_branch(from)?;
        let work = self.work.path();
        self.git(
            work,
            &[
                "branch",
                "-q",
                "--no-track",
                "--",
                branch,
                &format!("refs/heads/{from}"),
            ],
        )?;
        self.push(branch)?;
        Ok(self
            .git(work, &["rev-parse", &format!("refs/heads/{branch}")])?
            .trim()
            .to_owned())
    }

    /// Set `key` to `value` in the served (bare) repository's configuration,
    /// e.g. `uploadpack.allowFilter false`.
    pub fn set_config(&self, key: &str, value: &str) -> io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if key.starts_with('-') || value.starts_with('-') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid configuration {key:?} = {value:?}"),
            ));
        }
        self.git(&self.bare, &["config", "--local", key, value])
            .map(|_| ())
    }

    /// Check out `branch` in the working clone to commit on it: an existing
    /// local branch, else a new one from [`DEFAULT_BRANCH`], else (an empty
    /// repository) an orphan branch that the first commit starts.
    fn checkout_for_commit(&self, branch: &str) -> io::Result<()> {
        let work = self.work.path();
        let local = |b: &str| {
            self.git_ok(
                work,
                &["rev-parse", "--verify", "-q", &format!("refs/heads/{b}")],
            )
        };
        if local(branch)? {
            self.git(work, &["checkout", "-q", branch])?;
        } else if local(DEFAULT_BRANCH)? {
            self.git(work, &["checkout", "-q", "-b", branch, DEFAULT_BRANCH])?;
        } else {
            self.git(work, &["checkout", "-q", "--orphan", branch])?;
        }
        Ok(())
    }

    /// Push the working clone's `branch` to the served repository.
    fn push(&self, branch: &str) -> io::Result<()> {
        self.git(
            self.work.path(),
            &[
                "push",
                "-q",
                "--force",
                "origin",
                &format!("refs/heads/{branch}:refs/heads/{branch}"),
            ],
        )
        .map(|_| ())
    }

    /// Delete `branch` from the served repository (and the working clone).
    pub fn delete_branch(&self, branch: &str) -> io::Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        check_branch(branch)?;
        let work = self.work.path();
        self.git(work, &["push", "-q", "origin", "--delete", branch])?;
        let current = self
            .git(work, &["symbolic-ref", "-q", "--short", "HEAD"])
            .unwrap_or_default();
        if current.trim() == branch {
            self.git(work, &["checkout", "-q", "--detach"])?;
        }
        if self.git_ok(
            work,
            &[
                "rev-parse",
                "--verify",
                "-q",
                &format!("refs/heads/{branch}"),
            ],
        )? {
            self.git(work, &["branch", "-q", "-D", branch])?;
        }
        Ok(())
    }

    /// The commit `branch` points to in the served repository, if it exists.
    pub fn head(&self, branch: &str) -> io::Result<Option<String>> {
        check_branch(branch)?;
        let out = git_output(
            &self.home,
            &self.bare,
            &[
                "rev-parse",
                "--verify",
                "-q",
                &format!("refs/heads/{branch}^{{commit}}"),
            ],
        )?;
        Ok(out
            .status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }

    /// The branches of the served repository and their commits.
    pub fn branches(&self) -> io::Result<std::collections::BTreeMap<String, String>> {
        let out = git(
            &self.home,
            &self.bare,
            &[
                "for-each-ref",
                "--format=%(refname:strip=2) %(objectname)",
                "refs/heads/",
            ],
        )?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(b, id)| (b.to_owned(), id.to_owned()))
            .collect())
    }

    fn git(&self, dir: &Path, args: &[&str]) -> io::Result<String> {
        git(&self.home, dir, args)
    }

    fn git_ok(&self, dir: &Path, args: &[&str]) -> io::Result<bool> {
        Ok(git_output(&self.home, dir, args)?.status.success())
    }
}

/// About 500 bytes that differ from commit to commit and compress poorly
/// (pseudo-random hex), like real source changes do more than repeated
/// lines: a fetch that brings files along shows in its size.
fn series_text(branch: &str, commit: usize, file: usize) -> String {
    let mut state = (commit as u64 + 1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(file as u64 + 1)
        .wrapping_add(branch.len() as u64);
    let mut text = format!("commit {commit} of {branch}, file {file}\n");
    for _ in 0..8 {
        for _ in 0..4 {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            text.push_str(&format!(
                "{:016x}",
                state.wrapping_mul(0x2545_F491_4F6C_DD1D)
            ));
        }
        text.push('\n');
    }
    text
}

fn check_branch(branch: &str) -> io::Result<()> {
    let ok = !branch.is_empty()
        && !branch.starts_with('-')
        && !branch.contains("..")
        && !branch.ends_with('/')
        && branch
            .chars()
            .all(|c| c.is_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unsupported branch name {branch:?}"),
        ))
    }
}

fn path_str(p: &Path) -> io::Result<&str> {
    p.to_str()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("non-UTF-8 path {p:?}")))
}

/// A `git` command isolated from the machine's configuration.
fn git_command(home: &Path, dir: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.current_dir(dir).env_clear();
    if let Some(path) = std::env::var_os("PATH") {
        cmd.env("PATH", path);
    }
    cmd.env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", AUTHOR_NAME)
        .env("GIT_AUTHOR_EMAIL", AUTHOR_EMAIL)
        .env("GIT_COMMITTER_NAME", AUTHOR_NAME)
        .env("GIT_COMMITTER_EMAIL", AUTHOR_EMAIL)
        .env("LC_ALL", "C")
        .stdin(Stdio::null());
    cmd
}

fn git_output(home: &Path, dir: &Path, args: &[&str]) -> io::Result<std::process::Output> {
    git_command(home, dir).args(args).output()
}

/// Run git; a non-zero exit is an error carrying its stderr.
fn git(home: &Path, dir: &Path, args: &[&str]) -> io::Result<String> {
    let out = git_output(home, dir, args)?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "git {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(text.to_owned())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    res
}

/// Whether the request carries the expected basic credentials; the user
/// name on success.
fn authorized(req: &Request<Incoming>, expected: &(String, String)) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    (user == expected.0 && password == expected.1).then(|| user.to_owned())
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or_default().to_owned();
    state
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(format!(
            "{} {path}{}{query}",
            req.method(),
            if query.is_empty() { "" } else { "?" }
        ));

    if state.down.load(Ordering::SeqCst) {
        return plain(StatusCode::SERVICE_UNAVAILABLE, "down for maintenance\n");
    }
    let remote_user = match &state.basic_auth {
        None => None,
        Some(expected) => match authorized(&req, expected) {
            Some(user) => Some(user),
            None => {
                let mut res = plain(StatusCode::UNAUTHORIZED, "authentication required\n");
                res.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static(CHALLENGE),
                );
                return res;
            }
        },
    };
    if !path.starts_with('/') || path.split('/').any(|p| p == "..") {
        return plain(StatusCode::BAD_REQUEST, "bad path\n");
    }
    let header_str = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let content_type = header_str(header::CONTENT_TYPE);
    let content_encoding = header_str(header::CONTENT_ENCODING);
    let git_protocol = header_str(header::HeaderName::from_static("git-protocol"));
    let method = req.method().as_str().to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return plain(StatusCode::BAD_REQUEST, &format!("reading the body: {e}\n")),
    };

    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend").env_clear();
    if let Some(p) = std::env::var_os("PATH") {
        cmd.env("PATH", p);
    }
    cmd.env("HOME", state.home.path())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_PROJECT_ROOT", state.root.path())
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1")
        .env("REQUEST_METHOD", &method)
        .env("PATH_INFO", &path)
        .env("QUERY_STRING", &query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("REMOTE_ADDR", "127.0.0.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(v) = content_type {
        cmd.env("CONTENT_TYPE", v);
    }
    if let Some(v) = content_encoding {
        cmd.env("HTTP_CONTENT_ENCODING", v);
    }
    if let Some(v) = git_protocol
        && !state.v0_only.load(Ordering::SeqCst)
    {
        cmd.env("GIT_PROTOCOL", v);
    }
    if let Some(user) = remote_user {
        cmd.env("REMOTE_USER", user);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("cannot run git http-backend: {e}\n"),
            );
        }
    };
    let mut stdin = child.stdin.take();
    let writer = async move {
        if let Some(stdin) = stdin.as_mut() {
            // http-backend may exit without reading everything (an error).
            let _ = stdin.write_all(&body).await;
            let _ = stdin.shutdown().await;
        }
        drop(stdin);
    };
    let (_, output) = tokio::join!(writer, child.wait_with_output());
    let output = match output {
        Ok(o) => o,
        Err(e) => {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("git http-backend failed: {e}\n"),
            );
        }
    };
    if !output.stderr.is_empty() {
        tracing::debug!(
            stderr = %String::from_utf8_lossy(&output.stderr).trim(),
            "git http-backend"
        );
    }
    let response = cgi_response(&output.stdout);
    let sent = hyper::body::Body::size_hint(response.body())
        .exact()
        .unwrap_or_default();
    state.bytes_served.fetch_add(sent, Ordering::SeqCst);
    response
}

/// Turn a CGI program's output (headers, a blank line, the body) into a
/// response.
fn cgi_response(out: &[u8]) -> Response<Full<Bytes>> {
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| {
            out.windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, i + 2))
        });
    let Some((head_end, body_start)) = split else {
        return plain(
            StatusCode::BAD_GATEWAY,
            "git http-backend gave no headers\n",
        );
    };
    let head = String::from_utf8_lossy(&out[..head_end]);
    let mut res = Response::new(Full::new(Bytes::copy_from_slice(&out[body_start..])));
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<u16>().ok());
            if let Some(status) = code.and_then(|c| StatusCode::from_u16(c).ok()) {
                *res.status_mut() = status;
            }
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            header::HeaderName::from_bytes(name.trim().as_bytes()),
            header::HeaderValue::from_str(value),
        ) {
            res.headers_mut().append(name, value);
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgi_output_is_parsed() {
        let res = cgi_response(b"Status: 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope");
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
        assert_eq!(res.headers()[header::CONTENT_TYPE], "text/plain");
        let res =
            cgi_response(b"Content-Type: application/x-git-upload-pack-advertisement\n\n0000");
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(cgi_response(b"garbage").status(), StatusCode::BAD_GATEWAY);
    }

    #[tokio::test]
    async fn serves_refs_and_enforces_basic_auth() {
        let server = GitServer::start(Some(("alice".into(), "s3cret".into())))
            .await
            .unwrap();
        let repo = server.create_repo("shop").unwrap();
        assert_eq!(repo.head("main").unwrap(), None);
        let main = repo
            .commit("main", "README.md", "hello\n", "first")
            .unwrap();
        assert_eq!(main.len(), 40);
        assert_eq!(repo.head("main").unwrap().as_deref(), Some(main.as_str()));
        let feature = repo.commit("feature/x", "src/x.txt", "x\n", "x").unwrap();
        assert_ne!(feature, main);
        assert_eq!(repo.branches().unwrap().len(), 2);

        // `git ls-remote` through the server, as a client would.
        let home = server.state.home.path().to_owned();
        let url = repo.url().replace("http://", "http://alice:s3cret@");
        let listed = git(&home, server.root(), &["ls-remote", "--heads", &url]).unwrap();
        assert!(
            listed.contains(&format!("{main}\trefs/heads/main")),
            "{listed}"
        );
        assert!(
            listed.contains(&format!("{feature}\trefs/heads/feature/x")),
            "{listed}"
        );
        let wrong = repo.url().replace("http://", "http://alice:wrong@");
        assert!(git(&home, server.root(), &["ls-remote", &wrong]).is_err());
        // Down: nothing is served; back: served again.
        server.set_down(true);
        assert!(git(&home, server.root(), &["ls-remote", "--heads", &url]).is_err());
        server.set_down(false);
        assert!(git(&home, server.root(), &["ls-remote", "--heads", &url]).is_ok());

        repo.delete_branch("feature/x").unwrap();
        assert_eq!(repo.head("feature/x").unwrap(), None);
        // Re-creating a deleted branch starts again from main.
        let again = repo.commit("feature/x", "y.txt", "y\n", "y").unwrap();
        assert_eq!(
            repo.head("feature/x").unwrap().as_deref(),
            Some(again.as_str())
        );
        assert!(server.requests().iter().any(|r| r.contains("info/refs")));

        let root = server.root().to_owned();
        drop(server);
        assert!(!root.exists());
    }

    #[test]
    fn names_are_checked() {
        assert!(check_branch("feature/a-b_c.1").is_ok());
        for bad in ["", "-x", "a..b", "a b", "a/", "a;b"] {
            assert!(check_branch(bad).is_err(), "{bad}");
        }
    }
}

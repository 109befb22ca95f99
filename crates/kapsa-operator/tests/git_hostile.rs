//! Git polling that a hostile tenant or git server cannot abuse (issue 8,
//! items 1, 4 and 7), against servers on loopback:
//!
//! - credentials go to the URL's own origin only: no redirect is followed,
//!   to another port or scheme either;
//! - a server that advertises refs forever, too many refs, or trickles
//!   bytes is cut off by the byte, ref and time limits, and a slow ssh
//!   process is killed at the timeout;
//! - internal addresses (literal or by DNS name) are refused unless allowed;
//!   an error line from a server is bounded and a response body is never
//!   quoted;
//! - with the operator running: a Project refused its namespace never gets
//!   another tenant's git Secret read or sent anywhere, an operator without
//!   the allowance reports a loopback URL as refused, and a 32 KiB error
//!   line from a server still gives a status and an Event.
//!
//! The operator tests start and stop their own operator, one at a time (an
//! operator without the loopback allowance must not share the cluster with
//! one that has it).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use kapsa_operator::git::{
    GitCredentials, GitError, HostPolicy, ListOptions, MAX_ADVERTISEMENT_BYTES, MAX_MESSAGE_BYTES,
    MAX_REFS, list_branches,
};
use kapsa_operator::{OperatorConfig, run};
use kapsa_testenv::audit::by_user;
use kapsa_testenv::git_server::GitServer;
use kapsa_testenv::hostile_git::{Behaviour, HostileServer};
use kube::api::{Api, ListParams};
use serde_json::json;
use support::*;

const PASSWORD: &str = "tenant-a-s3cret-T0ken";
/// Not a usable key; what matters is that it never leaves the operator.
const SSH_KEY: &str = "-----BEGIN OPENSSH PRIVATE KEY-----\nVEVOQU5ULUEtUFJJVkFURS1LRVktTUFURVJJQUw=\n-----END OPENSSH PRIVATE KEY-----\n";
const SSH_KEY_BODY: &str = "VEVOQU5ULUEtUFJJVkFURS1LRVktTUFURVJJQUw=";

fn loopback(timeout: Duration) -> ListOptions {
    ListOptions::new(timeout).with_hosts(HostPolicy::loopback())
}

fn basic() -> GitCredentials {
    GitCredentials::Basic {
        username: "tenant-a".into(),
        password: PASSWORD.into(),
    }
}

fn ssh_key() -> GitCredentials {
    GitCredentials::SshKey {
        private_key: SSH_KEY.into(),
        known_hosts: None,
    }
}

/// Every text of an error the operator could show or log.
fn texts(err: &GitError) -> [String; 2] {
    [err.to_string(), format!("{err:?}")]
}

// ---------------------------------------------------------------------------
// Item 1: credentials go to the URL's origin only.

#[tokio::test]
async fn a_redirect_to_another_port_gets_no_request_and_no_credentials() {
    // The second origin would ask for credentials and record them.
    let elsewhere = HostileServer::start(Behaviour::Challenge).unwrap();
    let origin = HostileServer::start(Behaviour::Redirect {
        base: format!("http://{}", elsewhere.addr()),
    })
    .unwrap();
    let err = list_branches(
        &origin.url("repo"),
        Some(&basic()),
        &loopback(Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, GitError::Redirected(_)), "{err:?}");
    assert!(err.to_string().contains("follows no redirect"), "{err}");
    assert_eq!(elsewhere.connections(), 0, "{:?}", elsewhere.requests());
    // The origin saw one request, without credentials (it asked for none).
    let requests = origin.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].authorization, None);
}

#[tokio::test]
async fn credentials_sent_to_the_origin_are_not_redirected_elsewhere() {
    // The origin asks for credentials, gets them (it is the URL's host), and
    // then redirects to another port, by address and by name.
    let elsewhere = HostileServer::start(Behaviour::Challenge).unwrap();
    for base in [
        format!("http://{}", elsewhere.addr()),
        format!("http://localhost:{}", elsewhere.addr().port()),
    ] {
        let origin = HostileServer::start(Behaviour::AuthThenRedirect { base }).unwrap();
        let err = list_branches(
            &origin.url("r"),
            Some(&basic()),
            &loopback(Duration::from_secs(10)),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, GitError::Redirected(_)), "{err:?}");
        let requests = origin.requests();
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert_eq!(requests[0].authorization, None);
        assert!(requests[1].authorization.is_some(), "{requests:?}");
    }
    assert_eq!(elsewhere.connections(), 0, "{:?}", elsewhere.requests());
}

#[tokio::test]
async fn a_redirect_to_another_scheme_is_not_followed() {
    // To https (on a server that would record the connection).
    let elsewhere = HostileServer::start(Behaviour::Challenge).unwrap();
    let origin = HostileServer::start(Behaviour::AuthThenRedirect {
        base: format!("https://{}", elsewhere.addr()),
    })
    .unwrap();
    let err = list_branches(
        &origin.url("r"),
        Some(&basic()),
        &loopback(Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, GitError::Redirected(_)), "{err:?}");
    assert_eq!(elsewhere.connections(), 0);
    for text in texts(&err) {
        assert!(!text.contains(PASSWORD), "{text}");
    }
}

#[tokio::test]
async fn the_urls_own_origin_gets_the_credentials() {
    let server = GitServer::start(Some(("tenant-a".into(), PASSWORD.into())))
        .await
        .unwrap();
    let repo = server.create_repo("real").unwrap();
    let main = repo.commit("main", "a.txt", "a\n", "a").unwrap();
    let heads = list_branches(
        repo.url(),
        Some(&basic()),
        &loopback(Duration::from_secs(20)),
    )
    .await
    .unwrap();
    assert_eq!(heads.get("main"), Some(main.as_str()));
}

// ---------------------------------------------------------------------------
// Item 4: a hostile server cannot exhaust the operator.

#[tokio::test]
async fn endless_refs_stop_at_the_byte_limit() {
    let server = HostileServer::start(Behaviour::EndlessRefs).unwrap();
    let started = Instant::now();
    let err = list_branches(
        &server.url("endless"),
        None,
        &loopback(Duration::from_secs(30)),
    )
    .await
    .unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(err, GitError::LimitExceeded(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains(&MAX_ADVERTISEMENT_BYTES.to_string()),
        "{err}"
    );
    assert!(elapsed < Duration::from_secs(15), "{elapsed:?}");
    // The client stopped reading: the server's writes end soon after.
    let closed = kapsa_testenv::wait::eventually(
        Duration::from_secs(5),
        "the endless advertisement to be cut off",
        || async { server.closed().first().copied() },
    )
    .await;
    let sent = server.bytes_sent();
    // What the server managed to send: the limit, plus what the loopback
    // socket buffers (autotuned to several MiB each way) and the HTTP
    // client's pipe held when the client stopped reading. Without the
    // limit it streams until the timeout: gigabytes.
    assert!(sent < MAX_ADVERTISEMENT_BYTES + 40 * 1024 * 1024, "{sent}");
    eprintln!(
        "MEASURE endless refs: gave up after {elapsed:?} (connection closed {:?} after the start), {sent} bytes sent by the server",
        closed.duration_since(started)
    );
}

#[tokio::test]
async fn too_many_refs_are_refused_and_the_most_allowed_are_listed() {
    let at_limit = HostileServer::start(Behaviour::Refs { count: MAX_REFS }).unwrap();
    let started = Instant::now();
    let heads = list_branches(
        &at_limit.url("many"),
        None,
        &loopback(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(heads.branches.len(), MAX_REFS);
    eprintln!(
        "MEASURE {MAX_REFS} refs ({} bytes) listed in {elapsed:?}",
        at_limit.bytes_sent()
    );

    let over = HostileServer::start(Behaviour::Refs {
        count: MAX_REFS + 1,
    })
    .unwrap();
    let err = list_branches(&over.url("many"), None, &loopback(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(matches!(err, GitError::LimitExceeded(_)), "{err:?}");
    assert!(
        err.to_string().contains(&format!("{} refs", MAX_REFS + 1)),
        "{err}"
    );
}

#[tokio::test]
async fn the_largest_real_advertisement_is_accepted() {
    // A real repository (git http-backend, protocol v2) with as many
    // branches as Kapsa lists.
    let server = GitServer::start(None).await.unwrap();
    let repo = server.create_repo("big").unwrap();
    let main = repo.commit("main", "a.txt", "a\n", "a").unwrap();
    let mut packed = String::from("# pack-refs with: peeled fully-peeled sorted \n");
    for n in 0..MAX_REFS - 1 {
        packed.push_str(&format!("{main} refs/heads/b{n:08}\n"));
    }
    std::fs::write(repo.bare_path().join("packed-refs"), &packed).unwrap();
    let started = Instant::now();
    let heads = list_branches(repo.url(), None, &loopback(Duration::from_secs(60)))
        .await
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(heads.branches.len(), MAX_REFS);
    assert_eq!(heads.get("main"), Some(main.as_str()));
    eprintln!(
        "MEASURE real git http-backend: {MAX_REFS} branches (~{} bytes of ls-refs) listed in {elapsed:?}",
        MAX_REFS * (4 + 40 + 1 + "refs/heads/b00000000\n".len())
    );

    // One more and the repository is refused, with a reason.
    packed.push_str(&format!("{main} refs/heads/c\n"));
    std::fs::write(repo.bare_path().join("packed-refs"), &packed).unwrap();
    let err = list_branches(repo.url(), None, &loopback(Duration::from_secs(60)))
        .await
        .unwrap_err();
    assert!(matches!(err, GitError::LimitExceeded(_)), "{err:?}");
}

#[tokio::test]
async fn a_trickling_server_is_given_up_at_the_timeout() {
    let server = HostileServer::start(Behaviour::Trickle {
        interval: Duration::from_millis(50),
    })
    .unwrap();
    let timeout = Duration::from_secs(2);
    let started = Instant::now();
    let err = list_branches(&server.url("slow"), None, &loopback(timeout))
        .await
        .unwrap_err();
    let answered = started.elapsed();
    assert_eq!(err, GitError::Timeout(timeout));
    assert!(
        answered >= timeout && answered < timeout + Duration::from_secs(1),
        "{answered:?}"
    );
    // Not abandoned: the worker stops reading, and the connection closes.
    let closed = kapsa_testenv::wait::eventually(
        Duration::from_secs(5),
        "the trickling connection to be closed",
        || async { server.closed().first().copied() },
    )
    .await;
    let closed_after = closed.duration_since(started);
    assert!(
        closed_after < timeout + Duration::from_secs(1),
        "{closed_after:?}"
    );
    eprintln!(
        "MEASURE trickle (1 byte / 50 ms): answered Timeout after {answered:?}, connection closed after {closed_after:?}"
    );
}

/// A fake `ssh` (the listing runs it with the URL's address and the
/// remote command): `script` is its body after recording its pid.
fn fake_ssh(dir: &std::path::Path, script: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("ssh");
    std::fs::write(
        &path,
        format!("#!/bin/sh\necho $$ > '{}/pid'\n{script}\n", dir.display()),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn alive(pid: &str) -> bool {
    // A zombie is dead too: only its exit status is left.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or_default()
            .trim_start()
            .starts_with('Z')
    })
}

async fn pid_of(dir: &std::path::Path) -> String {
    kapsa_testenv::wait::eventually(Duration::from_secs(5), "the fake ssh to start", || async {
        std::fs::read_to_string(dir.join("pid"))
            .ok()
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
    })
    .await
}

#[tokio::test]
async fn a_slow_ssh_process_is_killed_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    // Connected, and then nothing: a server that never answers the git protocol.
    let options = ListOptions {
        ssh_program: fake_ssh(dir.path(), "exec sleep 600"),
        ..loopback(Duration::from_secs(2))
    };
    let started = Instant::now();
    let err = list_branches(
        "ssh://git@127.0.0.1:2222/slow.git",
        Some(&ssh_key()),
        &options,
    )
    .await
    .unwrap_err();
    let answered = started.elapsed();
    assert_eq!(err, GitError::Timeout(Duration::from_secs(2)));
    let pid = pid_of(dir.path()).await;
    let gone = kapsa_testenv::wait::eventually(
        Duration::from_secs(5),
        "the slow ssh process to be killed",
        || async { (!alive(&pid)).then(Instant::now) },
    )
    .await;
    assert!(
        gone.duration_since(started) < Duration::from_secs(3),
        "killed only after {:?}",
        gone.duration_since(started)
    );
    eprintln!(
        "MEASURE slow ssh: Timeout after {answered:?}, process gone after {:?}",
        gone.duration_since(started)
    );
}

#[tokio::test]
async fn an_ssh_process_streaming_refs_forever_stops_at_the_byte_limit() {
    let dir = tempfile::tempdir().unwrap();
    let sha = kapsa_testenv::hostile_git::FAKE_COMMIT;
    let first = format!("{sha} refs/heads/main\\000ofs-delta\\n");
    // printf's escapes are one byte each in the output.
    let first_len = 4 + sha.len() + " refs/heads/main".len() + 1 + "ofs-delta".len() + 1;
    let line = format!("{sha} refs/heads/loop");
    let script = format!(
        "printf '{first_len:04x}{first}'\nexec yes '{:04x}{line}'",
        4 + line.len() + 1
    );
    let options = ListOptions {
        ssh_program: fake_ssh(dir.path(), &script),
        ..loopback(Duration::from_secs(30))
    };
    let started = Instant::now();
    let err = list_branches("git@127.0.0.1:endless.git", Some(&ssh_key()), &options)
        .await
        .unwrap_err();
    assert!(matches!(err, GitError::LimitExceeded(_)), "{err:?}");
    let pid = pid_of(dir.path()).await;
    assert!(!alive(&pid), "the ssh process outlived its listing");
    eprintln!(
        "MEASURE endless refs over ssh: LimitExceeded after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_silent_ssh_server_is_left_at_the_timeout() {
    // The real ssh program against a server that sends its banner and then
    // nothing.
    if std::process::Command::new("ssh")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("no ssh program: skipped");
        return;
    }
    let server = HostileServer::start(Behaviour::SshBanner).unwrap();
    let timeout = Duration::from_secs(3);
    let started = Instant::now();
    let err = list_branches(
        &server.ssh_url("silent"),
        Some(&ssh_key()),
        &loopback(timeout),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, GitError::Timeout(_) | GitError::Unreachable(_)),
        "{err:?}"
    );
    let closed =
        kapsa_testenv::wait::eventually(Duration::from_secs(5), "ssh to hang up", || async {
            server.closed().first().copied()
        })
        .await;
    assert!(closed.duration_since(started) < timeout + Duration::from_secs(1));
    for text in texts(&err) {
        assert!(!text.contains(SSH_KEY_BODY), "{text}");
    }
}

// ---------------------------------------------------------------------------
// Item 7: internal addresses, and what a server's words may do.

#[tokio::test]
async fn internal_addresses_are_refused_unless_allowed() {
    let server = HostileServer::start(Behaviour::Challenge).unwrap();
    let port = server.addr().port();
    let default = ListOptions::new(Duration::from_secs(10));
    for url in [
        format!("http://127.0.0.1:{port}/r.git"),
        // A DNS name: judged by what it resolves to.
        format!("http://localhost:{port}/r.git"),
        format!("http://[::1]:{port}/r.git"),
        format!("http://127.1.2.3:{port}/r.git"),
        format!("http://[::ffff:127.0.0.1]:{port}/r.git"),
        format!("ssh://git@127.0.0.1:{port}/r.git"),
        "git@localhost:r.git".to_string(),
    ] {
        let creds = if url.starts_with("http") {
            basic()
        } else {
            ssh_key()
        };
        let started = Instant::now();
        let err = list_branches(&url, Some(&creds), &default)
            .await
            .unwrap_err();
        match &err {
            GitError::HostNotAllowed(msg) => {
                assert!(msg.contains("loopback"), "{url}: {msg}");
                assert!(
                    msg.contains("--allow-internal-git-hosts loopback"),
                    "{url}: {msg}"
                );
            }
            other => panic!("{url}: {other:?}"),
        }
        assert_eq!(err.reason(), "HostNotAllowed");
        assert!(started.elapsed() < Duration::from_secs(2), "{url}");
    }
    assert_eq!(server.connections(), 0, "{:?}", server.requests());

    // Allowed, the same server is reached, by name too.
    let err = list_branches(
        &format!("http://localhost:{port}/r.git"),
        Some(&basic()),
        &loopback(Duration::from_secs(10)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, GitError::AuthenticationFailed(_)), "{err:?}");
    assert!(server.connections() > 0);
    // A CIDR allowance of another network does not cover loopback.
    let other =
        ListOptions::new(Duration::from_secs(10)).with_hosts("10.0.0.0/8,private".parse().unwrap());
    let err = list_branches(&format!("http://127.0.0.1:{port}/r.git"), None, &other)
        .await
        .unwrap_err();
    assert!(matches!(err, GitError::HostNotAllowed(_)), "{err:?}");
}

#[tokio::test]
async fn a_huge_error_line_is_bounded_and_bodies_are_never_quoted() {
    let timeout = Duration::from_secs(10);
    // The git protocol's own error line, 32 KiB long.
    let line = format!("REFUSED-{}", "x".repeat(32 * 1024));
    let server = HostileServer::start(Behaviour::ErrLine { message: line }).unwrap();
    let err = list_branches(&server.url("r"), None, &loopback(timeout))
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("REFUSED-xxx"), "{text}");
    assert!(text.len() <= MAX_MESSAGE_BYTES + 64, "{} bytes", text.len());

    // Response bodies: an error page, and a web page that is not git.
    const BODY_MARK: &str = "BODY-MARK-7f3a";
    for behaviour in [
        Behaviour::HttpError {
            status: 500,
            body: format!("<html>{BODY_MARK} {}</html>", "y".repeat(40 * 1024)),
        },
        Behaviour::HttpError {
            status: 404,
            body: format!("<html>{BODY_MARK}</html>"),
        },
        Behaviour::NotGit {
            body: format!("{{\"AccessKeyId\": \"{BODY_MARK}\"}}"),
        },
    ] {
        let server = HostileServer::start(behaviour.clone()).unwrap();
        let err = list_branches(&server.url("r"), None, &loopback(timeout))
            .await
            .unwrap_err();
        for text in texts(&err) {
            assert!(!text.contains(BODY_MARK), "{behaviour:?}: {text}");
            assert!(
                text.len() <= MAX_MESSAGE_BYTES + 64,
                "{behaviour:?}: {text}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// With the operator.

/// One operator at a time in this binary.
static OPERATOR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts an operator with `config` as user `user`; stops when dropped.
struct Operator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Operator {
    async fn start(user: &str, config: OperatorConfig) -> Self {
        let (env, _) = cluster().await;
        let client = env.client_as(user, &["system:masters"]).await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            run(client, config, Default::default(), async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self {
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_refused_its_namespace_never_sends_that_namespaces_credentials() {
    let _one = OPERATOR.lock().await;
    let (env, client) = cluster().await;
    let user = "kapsa-operator-hostile-ns";
    let operator = Operator::start(user, operator_config()).await;
    let platform = platform(&client, "hostile-ns", "HTTP01", false).await;

    // Tenant A: a live Project, and git credentials in its namespace.
    let a = live_project(&client, "hostile-a", platform, |_| {}).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &a.name);
    create(
        &secrets,
        json!({"metadata": {"name": "a-git"}, "type": "kubernetes.io/basic-auth",
            "stringData": {"username": "tenant-a", "password": PASSWORD}}),
    )
    .await;
    create(
        &secrets,
        json!({"metadata": {"name": "a-ssh"}, "type": "kubernetes.io/ssh-auth",
            "stringData": {"ssh-privatekey": SSH_KEY}}),
    )
    .await;

    // Tenant B names A's namespace and A's Secrets, with URLs of its own
    // servers (loopback is allowed to this operator, as every test's is).
    let attacker_http = HostileServer::start(Behaviour::Challenge).unwrap();
    let attacker_ssh = HostileServer::start(Behaviour::SshBanner).unwrap();
    let mark = env.audit_log().mark().await;
    let projects = Api::<kapsa_api::Project>::all(client.clone());
    for (name, url, secret) in [
        ("hostile-b-http", attacker_http.url("steal"), "a-git"),
        ("hostile-b-ssh", attacker_ssh.ssh_url("steal"), "a-ssh"),
    ] {
        let mut manifest = project_manifest(name, &url, &a.platform, Some(secret));
        manifest["spec"]["namespace"] = json!(a.name);
        create(&projects, manifest).await;
    }
    for name in ["hostile-b-http", "hostile-b-ssh"] {
        let (status, _reason, message) = eventually(&format!("{name} to be refused"), || async {
            project_condition(&client, name, "Ready")
                .await
                .filter(|(_, reason, _)| reason == "NamespaceConflict")
        })
        .await;
        assert_eq!(status, "False", "{message}");
    }
    // A first poll (due at once for a new Project) and refusal re-checks
    // later: nothing reached B's servers, and nothing read A's Secrets.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(
        attacker_http.connections(),
        0,
        "{:?}",
        attacker_http.requests()
    );
    assert!(
        attacker_http
            .requests()
            .iter()
            .all(|r| r.authorization.is_none())
    );
    assert_eq!(attacker_ssh.connections(), 0);
    let events = env.audit_log().events_since(mark).await;
    let secret_reads: Vec<String> = events
        .iter()
        .filter(|e| by_user(user)(e))
        .filter(|e| e.resource == "secrets" && e.namespace == a.name)
        .filter(|e| e.name == "a-git" || e.name == "a-ssh")
        .map(|e| e.target())
        .collect();
    assert!(secret_reads.is_empty(), "{secret_reads:?}");
    // A is untouched: its namespace is still its own.
    let ns = Api::<Namespace>::all(client.clone())
        .get(&a.name)
        .await
        .unwrap();
    assert!(ns.metadata.deletion_timestamp.is_none());

    for name in ["hostile-b-http", "hostile-b-ssh", "hostile-a"] {
        let _ = projects.delete(name, &Default::default()).await;
    }
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_without_the_allowance_refuses_a_loopback_url() {
    let _one = OPERATOR.lock().await;
    let (_, client) = cluster().await;
    let operator = Operator::start("kapsa-operator-no-loopback", OperatorConfig::default()).await;
    let platform = platform(&client, "hostile-noloop", "HTTP01", false).await;
    let git = GitServer::start(None).await.unwrap();
    let repo = git.create_repo("noloop").unwrap();
    repo.commit("main", "a.txt", "a\n", "a").unwrap();
    let projects = Api::<kapsa_api::Project>::all(client.clone());
    create(
        &projects,
        project_manifest("hostile-noloop", repo.url(), &platform, None),
    )
    .await;
    let (status, _reason, message) = eventually("the loopback URL to be refused", || async {
        project_condition(&client, "hostile-noloop", "SourceReachable")
            .await
            .filter(|(_, _, message)| message.contains("git URL refused"))
    })
    .await;
    assert_eq!(status, "False");
    assert!(
        message.contains("127.0.0.1 is a loopback address"),
        "{message}"
    );
    assert!(
        message.contains("--allow-internal-git-hosts loopback"),
        "{message}"
    );
    assert!(git.requests().is_empty(), "{:?}", git.requests());
    // Nothing was deployed from it.
    assert!(
        production(&client, "hostile-noloop")
            .await
            .is_none_or(|e| e.spec.commit.is_none())
    );
    let _ = projects.delete("hostile-noloop", &Default::default()).await;
    operator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_32_kib_error_line_still_gives_a_status_and_an_event() {
    let _one = OPERATOR.lock().await;
    let (_, client) = cluster().await;
    let operator = Operator::start("kapsa-operator-err-line", operator_config()).await;
    let platform = platform(&client, "hostile-errline", "HTTP01", false).await;
    let server = HostileServer::start(Behaviour::ErrLine {
        message: format!("NO-{}", "z".repeat(32 * 1024)),
    })
    .unwrap();
    let name = "hostile-errline";
    let projects = Api::<kapsa_api::Project>::all(client.clone());
    create(
        &projects,
        project_manifest(name, &server.url("r"), &platform, None),
    )
    .await;
    let (status, _reason, message) = eventually("the error line in the status", || async {
        project_condition(&client, name, "SourceReachable")
            .await
            .filter(|(_, _, message)| message.contains("NO-zzz"))
    })
    .await;
    assert_eq!(status, "False");
    assert!(message.len() < 1024, "{} bytes", message.len());
    // The Warning Event about it was written too (an Event's note is limited to 1 KiB).
    let event = eventually("a Warning Event about the source", || async {
        Api::<Event>::namespaced(client.clone(), "default")
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.note.as_deref().is_some_and(|n| n.contains("NO-zzz"))
            })
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    let _ = projects.delete(name, &Default::default()).await;
    operator.stop().await;
}

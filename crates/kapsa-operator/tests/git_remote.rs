//! `kapsa_operator::git::list_branches` against real git repositories served
//! over smart HTTP on loopback (`git http-backend`), and against ssh and TCP
//! endpoints that fail in known ways. No sshd is needed: the ssh tests cover
//! the failure paths only (see the report of the git issue).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use kapsa_operator::git::{GitCredentials, GitError, HostPolicy, ListOptions, list_branches};
use kapsa_testenv::git_server::{GitServer, TestRepo};

const TIMEOUT: Duration = Duration::from_secs(20);
const PASSWORD: &str = "gh-t0ken-Zq81xVb3";

/// Every repository here is on loopback, which only an explicit allowance
/// reaches.
fn loopback(timeout: Duration) -> ListOptions {
    ListOptions::new(timeout).with_hosts(HostPolicy::loopback())
}

fn basic(username: &str, password: &str) -> GitCredentials {
    GitCredentials::Basic {
        username: username.into(),
        password: password.into(),
    }
}

/// A server with a repository `shop` whose `main` has one commit, and that
/// commit.
async fn shop() -> (GitServer, TestRepo, String) {
    let server = GitServer::start(None).await.unwrap();
    let repo = server.create_repo("shop").unwrap();
    let main = repo
        .commit("main", "README.md", "# shop\n", "initial")
        .unwrap();
    (server, repo, main)
}

/// Every error text the operator could show or log.
fn texts(err: &GitError) -> [String; 3] {
    [err.to_string(), format!("{err:?}"), format!("{err:#?}")]
}

#[tokio::test]
async fn lists_branches_and_follows_changes() {
    let (server, repo, main) = shop().await;
    let a = repo
        .commit("feature/login", "login.txt", "login\n", "login")
        .unwrap();
    let b = repo.commit("fix-42", "fix.txt", "fix\n", "fix").unwrap();

    let heads = list_branches(repo.url(), None, &loopback(TIMEOUT))
        .await
        .unwrap();
    let expected = BTreeMap::from([
        ("main".to_string(), main.clone()),
        ("feature/login".to_string(), a.clone()),
        ("fix-42".to_string(), b),
    ]);
    assert_eq!(heads.branches, expected);
    assert_eq!(heads.get("main"), Some(main.as_str()));
    assert_eq!(heads.branches, repo.branches().unwrap());

    // Refs only: one advertisement and one protocol-v2 `ls-refs` command;
    // a fetch would need another upload-pack POST.
    assert_eq!(
        server.requests(),
        [
            "GET /shop.git/info/refs?service=git-upload-pack",
            "POST /shop.git/git-upload-pack"
        ],
    );

    // A new commit moves the branch.
    let main2 = repo
        .commit("main", "README.md", "# shop v2\n", "v2")
        .unwrap();
    assert_ne!(main2, main);
    let heads = list_branches(repo.url(), None, &loopback(TIMEOUT))
        .await
        .unwrap();
    assert_eq!(heads.get("main"), Some(main2.as_str()));
    assert_eq!(heads.get("feature/login"), Some(a.as_str()));

    // A deleted branch disappears.
    repo.delete_branch("feature/login").unwrap();
    let heads = list_branches(repo.url(), None, &loopback(TIMEOUT))
        .await
        .unwrap();
    assert_eq!(heads.get("feature/login"), None);
    assert_eq!(heads.branches.len(), 2);
}

/// With the same options (as the poller keeps them), a protocol-v2 server
/// is asked for its capabilities once: a later listing is the `ls-refs`
/// command alone, and it still sees every change.
#[tokio::test]
async fn a_v2_server_is_asked_for_its_capabilities_once() {
    let (server, repo, main) = shop().await;
    let options = loopback(TIMEOUT);
    let heads = list_branches(repo.url(), None, &options).await.unwrap();
    assert_eq!(heads.get("main"), Some(main.as_str()));
    assert_eq!(options.v2_servers.len(), 1);

    let feature = repo
        .commit("feature/cart", "cart.txt", "cart\n", "cart")
        .unwrap();
    let heads = list_branches(repo.url(), None, &options).await.unwrap();
    assert_eq!(heads.branches, repo.branches().unwrap());
    assert_eq!(heads.get("feature/cart"), Some(feature.as_str()));
    assert_eq!(
        server.requests(),
        [
            "GET /shop.git/info/refs?service=git-upload-pack",
            "POST /shop.git/git-upload-pack",
            "POST /shop.git/git-upload-pack",
        ],
    );

    // Other options (another operator) know nothing of it yet.
    list_branches(repo.url(), None, &loopback(TIMEOUT))
        .await
        .unwrap();
    assert_eq!(
        server.requests()[3],
        "GET /shop.git/info/refs?service=git-upload-pack"
    );
}

/// A server that stops speaking v2 answers the remembered command with
/// something else than refs: the same listing starts over with the
/// advertisement and lists the branches of the v0 answer; an outage is
/// the listing's error, and the server is asked for its capabilities
/// again once it is back.
#[tokio::test]
async fn a_server_that_no_longer_speaks_v2_is_listed_from_its_advertisement() {
    let (server, repo, main) = shop().await;
    let options = loopback(TIMEOUT);
    list_branches(repo.url(), None, &options).await.unwrap();
    assert_eq!(options.v2_servers.len(), 1);

    server.set_v0_only(true);
    let fix = repo.commit("fix-1", "fix.txt", "fix\n", "fix").unwrap();
    let heads = list_branches(repo.url(), None, &options).await.unwrap();
    assert_eq!(heads.get("main"), Some(main.as_str()));
    assert_eq!(heads.get("fix-1"), Some(fix.as_str()));
    assert_eq!(heads.branches, repo.branches().unwrap());
    assert_eq!(
        server.requests()[2..],
        [
            "POST /shop.git/git-upload-pack",
            "GET /shop.git/info/refs?service=git-upload-pack",
        ],
    );
    // A v0 advertisement holds the refs: nothing to remember.
    assert!(options.v2_servers.is_empty());

    server.set_v0_only(false);
    list_branches(repo.url(), None, &options).await.unwrap();
    assert_eq!(options.v2_servers.len(), 1);
    server.set_down(true);
    let err = list_branches(repo.url(), None, &options).await.unwrap_err();
    assert!(matches!(err, GitError::Unreachable(_)), "{err:?}");
    assert!(err.to_string().contains("503"), "{err}");
    assert!(options.v2_servers.is_empty());
    server.set_down(false);
    list_branches(repo.url(), None, &options).await.unwrap();
    assert_eq!(
        server.requests()[4..],
        [
            // v2 again: advertisement and command.
            "GET /shop.git/info/refs?service=git-upload-pack",
            "POST /shop.git/git-upload-pack",
            // The outage: the command, then the advertisement.
            "POST /shop.git/git-upload-pack",
            "GET /shop.git/info/refs?service=git-upload-pack",
            // Back: asked for its capabilities again.
            "GET /shop.git/info/refs?service=git-upload-pack",
            "POST /shop.git/git-upload-pack",
        ],
    );
}

#[test]
fn an_http_listing_needs_no_thread_of_the_blocking_pool() {
    // A runtime whose one blocking thread is taken for longer than the
    // listing's timeout: a listing that waited for that thread would time
    // out; one made on the runtime itself answers.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(1)
        .build()
        .unwrap();
    runtime.block_on(async {
        let server = GitServer::start(None).await.unwrap();
        let repo = server.create_repo("pool").unwrap();
        let main = repo.commit("main", "a.txt", "a\n", "a").unwrap();
        let (taken_tx, taken_rx) = tokio::sync::oneshot::channel();
        let occupied = tokio::task::spawn_blocking(move || {
            let _ = taken_tx.send(());
            std::thread::sleep(Duration::from_secs(6));
        });
        taken_rx.await.unwrap();
        let started = Instant::now();
        let heads = list_branches(repo.url(), None, &loopback(Duration::from_secs(4)))
            .await
            .unwrap();
        assert_eq!(heads.get("main"), Some(main.as_str()));
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        occupied.await.unwrap();
    });
}

#[tokio::test]
async fn empty_repository_has_no_branches() {
    let server = GitServer::start(None).await.unwrap();
    let repo = server.create_repo("empty").unwrap();
    let heads = list_branches(repo.url(), None, &loopback(TIMEOUT))
        .await
        .unwrap();
    assert!(heads.branches.is_empty(), "{heads:?}");
}

#[tokio::test]
async fn missing_repository_is_not_found() {
    let server = GitServer::start(None).await.unwrap();
    let err = list_branches(&server.url("nope"), None, &loopback(TIMEOUT))
        .await
        .unwrap_err();
    assert!(matches!(err, GitError::NotFound(_)), "{err:?}");
}

#[tokio::test]
async fn basic_auth() {
    let server = GitServer::start(Some(("ci-bot".into(), PASSWORD.into())))
        .await
        .unwrap();
    let repo = server.create_repo("acme/private").unwrap();
    let main = repo.commit("main", "a.txt", "a\n", "a").unwrap();

    // Right credentials.
    let heads = list_branches(
        repo.url(),
        Some(&basic("ci-bot", PASSWORD)),
        &loopback(TIMEOUT),
    )
    .await
    .unwrap();
    assert_eq!(heads.get("main"), Some(main.as_str()));

    // Wrong password.
    let wrong = format!("{PASSWORD}-wrong");
    let err = list_branches(
        repo.url(),
        Some(&basic("ci-bot", &wrong)),
        &loopback(TIMEOUT),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, GitError::AuthenticationFailed(_)), "{err:?}");
    for text in texts(&err) {
        assert!(!text.contains(PASSWORD), "{text}");
    }

    // Wrong user, right password: the password is not echoed either.
    let err = list_branches(
        repo.url(),
        Some(&basic("someone", PASSWORD)),
        &loopback(TIMEOUT),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, GitError::AuthenticationFailed(_)), "{err:?}");
    for text in texts(&err) {
        assert!(!text.contains(PASSWORD), "{text}");
    }

    // None at all.
    let err = list_branches(repo.url(), None, &loopback(TIMEOUT))
        .await
        .unwrap_err();
    assert!(matches!(err, GitError::AuthenticationFailed(_)), "{err:?}");

    // Listings of one server share an HTTP client (and its connections):
    // the credentials of one are never carried into the next.
    for _ in 0..2 {
        list_branches(
            repo.url(),
            Some(&basic("ci-bot", PASSWORD)),
            &loopback(TIMEOUT),
        )
        .await
        .unwrap();
        let err = list_branches(repo.url(), None, &loopback(TIMEOUT))
            .await
            .unwrap_err();
        assert!(matches!(err, GitError::AuthenticationFailed(_)), "{err:?}");
    }
}

#[tokio::test]
async fn host_configuration_is_not_consulted() {
    // A credential helper in the user's git configuration would answer with
    // the right password; the operator must not use it.
    let server = GitServer::start(Some(("ci-bot".into(), PASSWORD.into())))
        .await
        .unwrap();
    let repo = server.create_repo("isolated").unwrap();
    repo.commit("main", "a.txt", "a\n", "a").unwrap();
    let home = tempfile::tempdir().unwrap();
    let config = home.path().join(".gitconfig");
    std::fs::write(
        &config,
        format!(
            "[credential]\n\thelper = \"!f() {{ echo username=ci-bot; echo password={PASSWORD}; }}; f\"\n"
        ),
    )
    .unwrap();
    let err = list_branches_with_env(repo.url(), home.path())
        .await
        .unwrap_err();
    assert!(matches!(err, GitError::AuthenticationFailed(_)), "{err:?}");
}

/// Run `list_branches` in a child process of this test binary whose `HOME`
/// and global git config hold that helper, so the environment of the other
/// tests stays untouched.
async fn list_branches_with_env(url: &str, home: &std::path::Path) -> Result<(), GitError> {
    let exe = std::env::current_exe().unwrap();
    let out = tokio::process::Command::new(exe)
        .args([
            "--exact",
            "child_list_branches",
            "--nocapture",
            "--include-ignored",
        ])
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home)
        .env("GIT_CONFIG_GLOBAL", home.join(".gitconfig"))
        .env("KAPSA_TEST_CHILD_URL", url)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    if stdout.contains("CHILD-RESULT: AuthenticationFailed") {
        Err(GitError::AuthenticationFailed("in the child".into()))
    } else if stdout.contains("CHILD-RESULT: ok") {
        Ok(())
    } else {
        panic!("unexpected child output: {stdout}");
    }
}

/// The child half of `host_configuration_is_not_consulted`.
#[tokio::test]
#[ignore = "run by host_configuration_is_not_consulted in a child process"]
async fn child_list_branches() {
    let Ok(url) = std::env::var("KAPSA_TEST_CHILD_URL") else {
        return;
    };
    match list_branches(&url, None, &loopback(TIMEOUT)).await {
        Ok(_) => println!("CHILD-RESULT: ok"),
        Err(GitError::AuthenticationFailed(_)) => println!("CHILD-RESULT: AuthenticationFailed"),
        Err(e) => println!("CHILD-RESULT: {e:?}"),
    }
}

#[tokio::test]
async fn closed_port_is_unreachable_quickly() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let started = Instant::now();
    let err = list_branches(
        &format!("http://127.0.0.1:{port}/shop.git"),
        None,
        &loopback(TIMEOUT),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, GitError::Unreachable(_)), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn https_client_is_built_without_a_process_crypto_provider() {
    // The HTTPS client (ring-based rustls, platform trust store) is built
    // before connecting: a closed port must give Unreachable, not a panic or
    // an internal error.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let url = format!("https://127.0.0.1:{port}/shop.git");
    let err = list_branches(&url, Some(&basic("ci-bot", PASSWORD)), &loopback(TIMEOUT))
        .await
        .unwrap_err();
    assert!(matches!(err, GitError::Unreachable(_)), "{err:?}");
    for text in texts(&err) {
        assert!(!text.contains(PASSWORD), "{text}");
    }
}

#[tokio::test]
async fn timeout_is_honoured() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let timeout = Duration::from_millis(1500);
    let started = Instant::now();
    let err = list_branches(
        &format!("http://127.0.0.1:{port}/shop.git"),
        None,
        &loopback(timeout),
    )
    .await
    .unwrap_err();
    let elapsed = started.elapsed();
    assert_eq!(err, GitError::Timeout(timeout));
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(5),
        "{elapsed:?}"
    );
    hold.abort();
}

#[tokio::test]
async fn ssh_to_a_closed_port_is_unreachable_and_the_key_is_removed() {
    if std::process::Command::new("ssh")
        .arg("-V")
        .output()
        .is_err()
    {
        eprintln!("no ssh program: skipped");
        return;
    }
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let key = "-----BEGIN OPENSSH PRIVATE KEY-----\nbm90IGEgcmVhbCBrZXkgYnV0IGxvbmcgZW5vdWdo\n-----END OPENSSH PRIVATE KEY-----\n";
    let creds = GitCredentials::SshKey {
        private_key: key.into(),
        known_hosts: None,
    };
    let before = ssh_temp_dirs();
    let started = Instant::now();
    for url in [
        format!("ssh://git@127.0.0.1:{port}/acme/shop.git"),
        // scp-like (port 22; no sshd on loopback here, or one that refuses this key).
        "git@127.0.0.1:acme/shop.git".to_string(),
    ] {
        let err = list_branches(&url, Some(&creds), &loopback(TIMEOUT))
            .await
            .unwrap_err();
        if url.starts_with("ssh://") {
            assert!(matches!(err, GitError::Unreachable(_)), "{url}: {err:?}");
            assert!(err.to_string().contains("Connection refused"), "{err}");
        }
        for text in texts(&err) {
            assert!(
                !text.contains("bm90IGEgcmVhbCBrZXkgYnV0IGxvbmcgZW5vdWdo"),
                "{text}"
            );
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    let after = ssh_temp_dirs();
    assert!(
        after.is_subset(&before),
        "key folders left behind: {:?}",
        after.difference(&before)
    );
}

fn ssh_temp_dirs() -> std::collections::BTreeSet<std::path::PathBuf> {
    std::fs::read_dir(std::env::temp_dir())
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("kapsa-git-ssh-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

//! `kapsa_operator::git::contained_in` (the merge check of previews) against
//! real git repositories served over smart HTTP on loopback
//! (`git http-backend`, protocol v2).

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use kapsa_operator::git::{
    GitCredentials, GitError, HostPolicy, ListOptions, MERGE_CHECK_DEPTH, contained_in,
};
use kapsa_testenv::git_server::{GitServer, TestRepo};

const TIMEOUT: Duration = Duration::from_secs(30);
const PASSWORD: &str = "gh-t0ken-Mx42pQ7w";

fn loopback() -> ListOptions {
    ListOptions::new(TIMEOUT).with_hosts(HostPolicy::loopback())
}

fn set(heads: &[&str]) -> BTreeSet<String> {
    heads.iter().map(|h| (*h).to_owned()).collect()
}

/// The heads of `heads` that main's current head contains, at `depth`.
async fn check(repo: &TestRepo, heads: &[&str], depth: u32) -> Result<BTreeSet<String>, GitError> {
    let main = repo.head("main").unwrap().expect("main exists");
    contained_in(repo.url(), None, &loopback(), &main, &set(heads), depth).await
}

/// Every error text the operator could show or log.
fn texts(err: &GitError) -> [String; 3] {
    [err.to_string(), format!("{err:?}"), format!("{err:#?}")]
}

#[tokio::test]
async fn a_branch_merged_with_a_merge_commit_is_contained() {
    let server = GitServer::start(None).await.unwrap();
    let repo = server.create_repo("shop").unwrap();
    repo.commit("main", "README.md", "# shop\n", "initial")
        .unwrap();
    let feature = repo
        .commit("feature/login", "login.txt", "login\n", "login")
        .unwrap();
    // main moves on, so that the merge cannot be a fast-forward.
    repo.commit("main", "README.md", "# shop v2\n", "v2")
        .unwrap();
    assert!(
        check(&repo, &[&feature], MERGE_CHECK_DEPTH)
            .await
            .unwrap()
            .is_empty(),
        "not merged yet"
    );

    let merge = repo
        .merge("main", "feature/login", "Merge feature/login")
        .unwrap();
    assert_eq!(repo.head("main").unwrap().as_deref(), Some(merge.as_str()));
    // The feature's head is the merge commit's second parent only: a
    // first-parent walk would miss it.
    assert_eq!(
        check(&repo, &[&feature], MERGE_CHECK_DEPTH).await.unwrap(),
        set(&[&feature])
    );
    // Still contained after more commits on main.
    repo.commit("main", "README.md", "# shop v3\n", "v3")
        .unwrap();
    assert_eq!(
        check(&repo, &[&feature], MERGE_CHECK_DEPTH).await.unwrap(),
        set(&[&feature])
    );
    // One capability advertisement and one fetch: no ls-refs, no clone.
    let requests = server.requests();
    assert_eq!(
        requests[requests.len() - 2..],
        [
            "GET /shop.git/info/refs?service=git-upload-pack",
            "POST /shop.git/git-upload-pack"
        ],
    );
}

#[tokio::test]
async fn a_fast_forwarded_branch_is_contained_and_an_unmerged_one_is_not() {
    let server = GitServer::start(None).await.unwrap();
    let repo = server.create_repo("shop").unwrap();
    repo.commit("main", "README.md", "# shop\n", "initial")
        .unwrap();
    let first = repo.commit("fast", "a.txt", "a\n", "a").unwrap();
    let fast = repo.commit("fast", "b.txt", "b\n", "b").unwrap();
    let own = repo.commit("own", "own.txt", "own\n", "own").unwrap();
    assert_eq!(repo.fast_forward("main", "fast").unwrap(), fast);
    // main moves past the fast-forwarded head, so that containment is
    // ancestry, not equality.
    let main = repo.commit("main", "README.md", "# v2\n", "v2").unwrap();
    let found = check(&repo, &[&fast, &first, &own, &main], MERGE_CHECK_DEPTH)
        .await
        .unwrap();
    assert_eq!(found, set(&[&fast, &first, &main]));

    // The unmerged branch's own commit keeps it out even once it also
    // contains main.
    repo.merge("own", "main", "sync with main").unwrap();
    let own2 = repo.head("own").unwrap().unwrap();
    assert!(
        check(&repo, &[&own, &own2], MERGE_CHECK_DEPTH)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn a_branch_created_from_main_without_commits_is_contained() {
    let server = GitServer::start(None).await.unwrap();
    let repo = server.create_repo("shop").unwrap();
    let base = repo
        .commit("main", "README.md", "# shop\n", "initial")
        .unwrap();
    let created = repo.create_branch("preview/empty", "main").unwrap();
    assert_eq!(created, base);
    assert_eq!(
        repo.head("preview/empty").unwrap().as_deref(),
        Some(base.as_str())
    );
    // Equal to main's head: contained.
    assert_eq!(
        check(&repo, &[&created], MERGE_CHECK_DEPTH).await.unwrap(),
        set(&[&created])
    );
    // main moves on: the branch's head is now an ancestor.
    repo.commit("main", "README.md", "# v2\n", "v2").unwrap();
    repo.commit("main", "README.md", "# v3\n", "v3").unwrap();
    assert_eq!(
        check(&repo, &[&created], MERGE_CHECK_DEPTH).await.unwrap(),
        set(&[&created])
    );
}

#[tokio::test]
async fn the_depth_bound_is_real() {
    let server = GitServer::start(None).await.unwrap();
    let repo = server.create_repo("shop").unwrap();
    let ids = repo.commit_series("main", 12, 2).unwrap();
    let distance = |d: usize| ids[ids.len() - 1 - d].clone();
    let (four, five, eleven) = (distance(4), distance(5), distance(11));
    // Depth 5: the head and its four ancestors.
    assert_eq!(
        check(&repo, &[&four, &five, &eleven], 5).await.unwrap(),
        set(&[&four])
    );
    assert_eq!(
        check(&repo, &[&four, &five, &eleven], 6).await.unwrap(),
        set(&[&four, &five])
    );
    assert_eq!(
        check(&repo, &[&four, &five, &eleven], MERGE_CHECK_DEPTH)
            .await
            .unwrap(),
        set(&[&four, &five, &eleven])
    );
}

#[tokio::test]
async fn a_head_unknown_to_the_server_is_not_contained() {
    let server = GitServer::start(None).await.unwrap();
    let repo = server.create_repo("shop").unwrap();
    let base = repo
        .commit("main", "README.md", "# shop\n", "initial")
        .unwrap();
    repo.commit("main", "README.md", "# v2\n", "v2").unwrap();
    let unknown = "0123456789abcdef0123456789abcdef01234567";
    assert_eq!(
        check(&repo, &[unknown, &base, "not-a-commit"], MERGE_CHECK_DEPTH)
            .await
            .unwrap(),
        set(&[&base])
    );
    // A production head the server does not have is an error, not "nothing
    // is merged".
    let err = contained_in(
        repo.url(),
        None,
        &loopback(),
        unknown,
        &set(&[&base]),
        MERGE_CHECK_DEPTH,
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "Unreachable", "{err}");
    assert!(err.to_string().contains("refused"), "{err}");
    assert!(err.to_string().len() <= 600, "{err}");
}

#[tokio::test]
async fn a_server_without_filters_gets_a_clear_error() {
    let server = GitServer::start(None).await.unwrap();
    let repo = server.create_repo("nofilter").unwrap();
    repo.set_config("uploadpack.allowFilter", "false").unwrap();
    let base = repo
        .commit("main", "README.md", "# shop\n", "initial")
        .unwrap();
    repo.commit("main", "README.md", "# v2\n", "v2").unwrap();
    let before = server.bytes_served();
    let err = check(&repo, &[&base], MERGE_CHECK_DEPTH).await.unwrap_err();
    assert_eq!(err.reason(), "MergeCheckUnsupported", "{err}");
    assert!(matches!(err, GitError::MergeCheckUnsupported(_)));
    assert!(err.to_string().contains("filter"), "{err}");
    assert!(!err.is_transient());
    // Nothing was fetched: only the capability advertisement was read.
    assert_eq!(
        server.requests().last().map(String::as_str),
        Some("GET /nofilter.git/info/refs?service=git-upload-pack")
    );
    assert!(server.bytes_served() - before < 1024);

    // The same repository with filters allowed answers.
    repo.set_config("uploadpack.allowFilter", "true").unwrap();
    assert_eq!(
        check(&repo, &[&base], MERGE_CHECK_DEPTH).await.unwrap(),
        set(&[&base])
    );
}

#[tokio::test]
async fn credentials_are_used_and_never_shown() {
    let server = GitServer::start(Some(("alice".into(), PASSWORD.into())))
        .await
        .unwrap();
    let repo = server.create_repo("private").unwrap();
    let base = repo
        .commit("main", "README.md", "# shop\n", "initial")
        .unwrap();
    let main = repo.commit("main", "README.md", "# v2\n", "v2").unwrap();
    let heads = set(&[&base]);
    let good = GitCredentials::Basic {
        username: "alice".into(),
        password: PASSWORD.into(),
    };
    assert_eq!(
        contained_in(
            repo.url(),
            Some(&good),
            &loopback(),
            &main,
            &heads,
            MERGE_CHECK_DEPTH
        )
        .await
        .unwrap(),
        heads
    );

    let wrong = GitCredentials::Basic {
        username: "alice".into(),
        password: "wr0ng-Password".into(),
    };
    let err = contained_in(
        repo.url(),
        Some(&wrong),
        &loopback(),
        &main,
        &heads,
        MERGE_CHECK_DEPTH,
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "AuthenticationFailed", "{err}");
    for text in texts(&err) {
        assert!(!text.contains("wr0ng-Password"), "{text}");
    }
    let err = contained_in(repo.url(), None, &loopback(), &main, &heads, 200)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "AuthenticationFailed", "{err}");
    for text in texts(&err) {
        assert!(!text.contains(PASSWORD), "{text}");
    }
}

#[tokio::test]
async fn the_host_policy_and_the_byte_budget_apply() {
    let server = GitServer::start(None).await.unwrap();
    let repo = server.create_repo("shop").unwrap();
    let ids = repo.commit_series("main", 40, 2).unwrap();
    let main = ids.last().unwrap().clone();
    let heads = set(&[&ids[0]]);

    // Loopback is not allowed by default.
    let err = contained_in(
        repo.url(),
        None,
        &ListOptions::new(TIMEOUT),
        &main,
        &heads,
        MERGE_CHECK_DEPTH,
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "HostNotAllowed", "{err}");

    // A budget smaller than the pack.
    let mut small = loopback();
    small.max_bytes = 2_000;
    let err = contained_in(repo.url(), None, &small, &main, &heads, MERGE_CHECK_DEPTH)
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "LimitExceeded", "{err}");
    assert!(err.to_string().contains("merge check"), "{err}");
}

/// One check at depth 200 on a repository of 300 commits of a few files:
/// the bytes the server sent and the time it took.
#[tokio::test]
async fn one_check_at_depth_200_is_cheap() {
    let server = GitServer::start(None).await.unwrap();
    let repo = server.create_repo("big").unwrap();
    let ids = repo.commit_series("main", 300, 4).unwrap();
    let main = ids.last().unwrap().clone();
    let at = |d: usize| ids[ids.len() - 1 - d].clone();
    let heads = set(&[&at(150), &at(199), &at(200), &at(299)]);

    let before = server.bytes_served();
    let started = Instant::now();
    let found = contained_in(
        repo.url(),
        None,
        &loopback(),
        &main,
        &heads,
        MERGE_CHECK_DEPTH,
    )
    .await
    .unwrap();
    let took = started.elapsed();
    let bytes = server.bytes_served() - before;
    assert_eq!(found, set(&[&at(150), &at(199)]));
    println!(
        "merge check, depth {MERGE_CHECK_DEPTH}, 300 commits of 4 files: {bytes} bytes received in {took:?}"
    );
    // 200 commits without trees or files; the files alone of those commits
    // (4 files of a few hundred bytes, all different) are several times that.
    assert!(bytes < 100 * 1024, "{bytes} bytes");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

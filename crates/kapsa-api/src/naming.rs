//! Name and host arithmetic: how long names may be, and how branch names turn
//! into DNS labels.
//!
//! Every limit here is derived from two Kubernetes/DNS facts and from the
//! shapes of the names Kapsa builds:
//!
//! * a DNS label (and a Kubernetes DNS-1123 / DNS-1035 label, e.g. a
//!   Namespace or Service name) is at most [`DNS_LABEL_MAX_LEN`] = 63
//!   characters;
//! * a DNS name (host) is at most [`DNS_NAME_MAX_LEN`] = 253 characters.
//!
//! ## Environment names
//!
//! An Environment's name is also the name of its Deployment and its Service.
//! Service names are DNS-1035 labels (start with a letter, at most 63
//! characters), so [`MAX_ENVIRONMENT_NAME_LEN`] = 63. Preview environments
//! are named `preview-<slug>`, so a branch slug is at most
//! 63 − len(`"preview-"`) = 63 − 8 = [`MAX_BRANCH_SLUG_LEN`] = 55 characters.
//!
//! ## Hosts
//!
//! * production: `<project>.<base>`
//! * preview:    `<slug>.<project>.<base>`
//!
//! The first label of a preview host is a branch slug (≤ 55 characters), but
//! the arithmetic reserves a full DNS label ([`HOST_LABEL_RESERVE`] = 63) for
//! it so that a future naming scheme with a longer first label stays valid.
//! The project name is also the default Namespace name and appears in derived
//! object names (`<project>-…`), so it is capped at
//! [`MAX_PROJECT_NAME_LEN`] = 40, leaving 23 characters for suffixes. The
//! longest preview host must fit in 253 characters:
//!
//! ```text
//!   63 (first label) + 1 (".") + 40 (project) + 1 (".") + base ≤ 253
//!   ⇒ base ≤ 253 − 105 = 148 = MAX_BASE_DOMAIN_LEN
//! ```
//!
//! so every DomainPool base domain is at most [`MAX_BASE_DOMAIN_LEN`] = 148
//! characters and every host Kapsa derives is a valid DNS name.
//!
//! ## Branch slugs
//!
//! [`branch_slug`] turns any git branch name into a DNS label of at most 55
//! characters (`[a-z0-9-]`, no leading or trailing `-`). A branch that is
//! already a valid slug is used as is (`main`, `fix-login`). Every other
//! branch (upper case, `/`, `_`, `.`, unicode, runs of `-`, too long) is
//! mapped lossily and gets a suffix `-<6 hex digits of sha256(branch)>`.
//! Branch names that are valid slugs but *look like* a hashed slug (end in
//! `-` and six hex digits) are hashed too, so a literal branch can never take
//! the slug of a different, hashed branch. A slug never contains a dot, so a
//! branch name can never inject a label into a host.

use sha2::{Digest, Sha256};

/// Maximum length of a DNS label and of a Kubernetes DNS-1123/1035 label name.
pub const DNS_LABEL_MAX_LEN: usize = 63;

/// Maximum length of a DNS name (a host).
pub const DNS_NAME_MAX_LEN: usize = 253;

/// Name of the production Environment of every Project.
pub const PRODUCTION_ENVIRONMENT_NAME: &str = "production";

/// Prefix of every build namespace (`kapsa-build-<project>`): where a
/// Project's builds run with the registry's push credentials, out of its
/// tenants' reach. No Project may name a namespace with this prefix.
pub const BUILD_NAMESPACE_PREFIX: &str = "kapsa-build-";

/// The namespace a Project's builds run in: `kapsa-build-<project>`
/// (at most 12 + 40 characters, a DNS label).
pub fn build_namespace(project: &str) -> String {
    format!("{BUILD_NAMESPACE_PREFIX}{project}")
}

/// Prefix of every preview Environment name (`preview-<slug>`).
pub const PREVIEW_ENVIRONMENT_PREFIX: &str = "preview-";

/// Maximum length of an Environment name: it names a Service, a DNS-1035 label.
pub const MAX_ENVIRONMENT_NAME_LEN: usize = DNS_LABEL_MAX_LEN;

/// Maximum length of a branch slug: `preview-<slug>` must be an Environment name.
pub const MAX_BRANCH_SLUG_LEN: usize = MAX_ENVIRONMENT_NAME_LEN - PREVIEW_ENVIRONMENT_PREFIX.len();

/// Characters reserved for the first label of a preview host (a full DNS label).
pub const HOST_LABEL_RESERVE: usize = DNS_LABEL_MAX_LEN;

/// Maximum length of a Project name (also its default Namespace name).
pub const MAX_PROJECT_NAME_LEN: usize = 40;

/// Maximum length of a DomainPool base domain:
/// `253 − (63 + 1 + 40 + 1) = 148`.
pub const MAX_BASE_DOMAIN_LEN: usize =
    DNS_NAME_MAX_LEN - (HOST_LABEL_RESERVE + 1 + MAX_PROJECT_NAME_LEN + 1);

/// Number of hex digits of sha256(branch) appended to a lossy slug.
pub const SLUG_HASH_LEN: usize = 6;

/// Maximum length of a git branch name Kapsa accepts (in CRD fields).
pub const MAX_BRANCH_NAME_LEN: usize = 255;

/// Base used for a hashed slug when nothing of the branch name survives
/// the mapping (e.g. a branch named `日本語`).
const EMPTY_SLUG_BASE: &str = "branch";

/// The DNS-label slug of a git branch name. See the [module docs](self).
///
/// The result is 1–[`MAX_BRANCH_SLUG_LEN`] characters of `[a-z0-9-]`, never
/// starts or ends with `-` and never contains a dot.
///
/// ```
/// use kapsa_api::naming::branch_slug;
/// assert_eq!(branch_slug("fix-login"), "fix-login");
/// let s = branch_slug("feature/Foo_bar");
/// assert!(s.starts_with("feature-foo-bar-") && s.len() == "feature-foo-bar-".len() + 6);
/// ```
pub fn branch_slug(branch: &str) -> String {
    if is_plain_slug(branch) {
        return branch.to_owned();
    }
    hashed_branch_slug(branch)
}

/// The readable slug of a branch: lower case, every run of characters
/// outside `[a-z0-9]` one `-`, no `-` at either end (`feature/Login` →
/// `feature-login`). `None` when nothing survives, when it would have to be
/// truncated (longer than [`MAX_BRANCH_SLUG_LEN`]) or when it looks like a
/// hashed slug. Different branches may share one (`feature/login`,
/// `Feature-Login`): whoever assigns it must resolve that, e.g. with
/// [`hashed_branch_slug`] for all but one.
pub fn readable_branch_slug(branch: &str) -> Option<String> {
    let slug = lossy_slug(branch);
    (!slug.is_empty() && slug.len() <= MAX_BRANCH_SLUG_LEN && !looks_hashed(&slug)).then_some(slug)
}

/// The lower-case `[a-z0-9-]` mapping of a branch name, runs of other
/// characters collapsed to one `-`, trimmed of `-`; not truncated.
fn lossy_slug(branch: &str) -> String {
    let mut slug = String::with_capacity(branch.len());
    for c in branch.chars() {
        let c = c.to_ascii_lowercase();
        let mapped = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if mapped == '-' && (slug.is_empty() || slug.ends_with('-')) {
            continue;
        }
        slug.push(mapped);
    }
    slug.trim_end_matches('-').to_owned()
}

/// The slug of a branch with a hash of the whole name: always distinct for
/// distinct names, and never equal to a readable slug (it ends in `-` and
/// six hex digits, which a readable slug never does).
pub fn hashed_branch_slug(branch: &str) -> String {
    let hash = short_hash(branch);
    let mut base = String::with_capacity(branch.len().min(MAX_BRANCH_SLUG_LEN));
    for c in branch.chars() {
        let c = c.to_ascii_lowercase();
        let mapped = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if mapped == '-' && (base.is_empty() || base.ends_with('-')) {
            continue;
        }
        base.push(mapped);
    }
    // Room for "-" + hash.
    base.truncate(MAX_BRANCH_SLUG_LEN - 1 - SLUG_HASH_LEN);
    let base = base.trim_end_matches('-');
    let base = if base.is_empty() {
        EMPTY_SLUG_BASE
    } else {
        base
    };
    format!("{base}-{hash}")
}

/// The slug a preview of `branch` takes when no other Environment holds it:
/// the readable slug ([`readable_branch_slug`]), or the hashed one when
/// there is none. The operator falls back to [`hashed_branch_slug`] when
/// this one is taken (another branch that slugs alike came first).
pub fn preview_slug(branch: &str) -> String {
    readable_branch_slug(branch).unwrap_or_else(|| hashed_branch_slug(branch))
}

/// The Environment name of the preview for `branch` when that name is free:
/// `preview-<preview_slug>`.
pub fn preview_environment_name(branch: &str) -> String {
    format!("{PREVIEW_ENVIRONMENT_PREFIX}{}", preview_slug(branch))
}

/// The production host of a project: `<project>.<base>`.
pub fn production_host(project: &str, base_domain: &str) -> String {
    format!("{project}.{base_domain}")
}

/// The preview host of a branch of a project when its name is free:
/// `<preview_slug>.<project>.<base>`.
pub fn preview_host(branch: &str, project: &str, base_domain: &str) -> String {
    format!("{}.{project}.{base_domain}", preview_slug(branch))
}

/// Whether a branch glob of `spec.previewEnvironments.branches` matches
/// `branch`: `*` matches any run of characters within one path segment
/// (never `/`), `?` exactly one character other than `/`, everything else
/// itself. The whole name must match.
///
/// ```
/// use kapsa_api::naming::branch_glob_matches;
/// assert!(branch_glob_matches("feature/*", "feature/login"));
/// assert!(!branch_glob_matches("feature/*", "feature/a/b"));
/// assert!(branch_glob_matches("fix-?", "fix-1"));
/// ```
pub fn branch_glob_matches(glob: &str, branch: &str) -> bool {
    let pattern: Vec<char> = glob.chars().collect();
    let text: Vec<char> = branch.chars().collect();
    // Iterative wildcard matching with one backtrack point per `*`; a `*`
    // may not swallow a `/`, so backtracking stops at a segment boundary.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, t));
                p += 1;
            }
            Some('?') if text[t] != '/' => {
                p += 1;
                t += 1;
            }
            Some(&c) if c != '*' && c != '?' && c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) if text[st] != '/' => {
                    star = Some((sp, st + 1));
                    p = sp + 1;
                    t = st + 1;
                }
                _ => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == '*')
}

/// Whether `branch` gets a preview under `globs` (empty: every branch),
/// the production branch never.
pub fn is_preview_branch(globs: &[String], production_branch: &str, branch: &str) -> bool {
    branch != production_branch
        && (globs.is_empty() || globs.iter().any(|g| branch_glob_matches(g, branch)))
}

/// True if `s` is a DNS-1123 label: 1–63 characters of `[a-z0-9-]`, not
/// starting or ending with `-`.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= DNS_LABEL_MAX_LEN
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// True if `s` is a DNS name of at most 253 characters made of DNS labels.
pub fn is_dns_name(s: &str) -> bool {
    s.len() <= DNS_NAME_MAX_LEN && s.split('.').all(is_dns_label)
}

/// True if `branch` can be used unchanged as its own slug: a DNS label of at
/// most [`MAX_BRANCH_SLUG_LEN`] characters with no `--` run, that does not
/// look like a hashed slug (`…-` followed by six hex digits).
fn is_plain_slug(branch: &str) -> bool {
    branch.len() <= MAX_BRANCH_SLUG_LEN
        && is_dns_label(branch)
        && !branch.contains("--")
        && !looks_hashed(branch)
}

/// True if `s` ends in `-` and [`SLUG_HASH_LEN`] lower-case hex digits, the
/// shape of a hashed slug.
fn looks_hashed(s: &str) -> bool {
    let bytes = s.as_bytes();
    if bytes.len() < SLUG_HASH_LEN + 1 {
        return false;
    }
    let (head, tail) = bytes.split_at(bytes.len() - SLUG_HASH_LEN);
    head.last() == Some(&b'-')
        && tail
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// The first [`SLUG_HASH_LEN`] hex digits of sha256(`s`).
fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    let mut out = String::with_capacity(SLUG_HASH_LEN);
    for byte in digest.iter().take(SLUG_HASH_LEN.div_ceil(2)) {
        out.push_str(&format!("{byte:02x}"));
    }
    out.truncate(SLUG_HASH_LEN);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn assert_valid_slug(slug: &str) {
        assert!(is_dns_label(slug), "{slug:?} is not a DNS label");
        assert!(slug.len() <= MAX_BRANCH_SLUG_LEN, "{slug:?} is too long");
        assert!(!slug.contains('.'), "{slug:?} contains a dot");
        let env = format!("{PREVIEW_ENVIRONMENT_PREFIX}{slug}");
        assert!(env.len() <= MAX_ENVIRONMENT_NAME_LEN);
    }

    #[test]
    fn limits_are_consistent() {
        assert_eq!(MAX_BRANCH_SLUG_LEN, 55);
        assert_eq!(MAX_BASE_DOMAIN_LEN, 148);
        assert_eq!(
            HOST_LABEL_RESERVE + 1 + MAX_PROJECT_NAME_LEN + 1 + MAX_BASE_DOMAIN_LEN,
            DNS_NAME_MAX_LEN
        );
        const { assert!(MAX_PROJECT_NAME_LEN <= DNS_LABEL_MAX_LEN) };
        const { assert!(MAX_BASE_DOMAIN_LEN <= DNS_NAME_MAX_LEN) };
        assert!(PRODUCTION_ENVIRONMENT_NAME.len() <= MAX_ENVIRONMENT_NAME_LEN);
    }

    #[test]
    fn longest_hosts_are_valid_dns_names() {
        let project = "p".repeat(MAX_PROJECT_NAME_LEN);
        // A base of exactly 148 characters made of valid labels.
        let mut base = String::new();
        while base.len() < MAX_BASE_DOMAIN_LEN {
            if !base.is_empty() {
                base.push('.');
            }
            let room = MAX_BASE_DOMAIN_LEN - base.len();
            base.push_str(&"b".repeat(room.min(DNS_LABEL_MAX_LEN)));
        }
        assert_eq!(base.len(), MAX_BASE_DOMAIN_LEN);
        let host = preview_host(&"Very/Long_Branch".repeat(30), &project, &base);
        assert!(is_dns_name(&host), "{host}");
        // The reserve covers even a full 63-character label.
        let reserved = format!("{}.{project}.{base}", "x".repeat(HOST_LABEL_RESERVE));
        assert_eq!(reserved.len(), DNS_NAME_MAX_LEN);
        assert!(is_dns_name(&reserved));
        let prod = production_host(&project, &base);
        assert!(is_dns_name(&prod));
    }

    #[test]
    fn plain_branches_are_unchanged() {
        for b in [
            "main",
            "master",
            "develop",
            "fix-login",
            "v2",
            "a",
            "release-2024-01",
        ] {
            assert_eq!(branch_slug(b), b);
        }
        let max = "a".repeat(MAX_BRANCH_SLUG_LEN);
        assert_eq!(branch_slug(&max), max);
    }

    #[test]
    fn lossy_branches_get_a_hash() {
        let s = branch_slug("feature/Foo_bar");
        assert_valid_slug(&s);
        assert!(s.starts_with("feature-foo-bar-"), "{s}");
        assert_eq!(s.len(), "feature-foo-bar-".len() + SLUG_HASH_LEN);
        assert_eq!(s, branch_slug("feature/Foo_bar"), "deterministic");
    }

    #[test]
    fn dots_never_survive() {
        for b in [
            "a..b",
            "v1.2.3",
            "evil.com",
            ".hidden",
            "x.shop.apps.example.com",
            "a.b.c.",
        ] {
            let s = branch_slug(b);
            assert_valid_slug(&s);
        }
        let s = branch_slug("a..b");
        assert!(s.starts_with("a-b-"), "{s}");
    }

    #[test]
    fn unicode_and_empty_results() {
        for b in ["日本語", "ünïcödé/brånch", "🚀", "---", "/", "_", "Ω-Ω"] {
            let s = branch_slug(b);
            assert_valid_slug(&s);
        }
        assert!(branch_slug("日本語").starts_with("branch-"));
        assert!(branch_slug("ünïcödé").starts_with("n-c-d-"));
        assert_ne!(branch_slug("日本語"), branch_slug("中文"));
    }

    #[test]
    fn long_branches_are_truncated_and_hashed() {
        let long = "a".repeat(300);
        let s = branch_slug(&long);
        assert_valid_slug(&s);
        assert_eq!(s.len(), MAX_BRANCH_SLUG_LEN);
        // Two long names with a common prefix differ.
        let other = format!("{}b", "a".repeat(299));
        assert_ne!(branch_slug(&other), s);
        // A 56-character valid label is one too long.
        let s = branch_slug(&"a".repeat(MAX_BRANCH_SLUG_LEN + 1));
        assert_valid_slug(&s);
        // Truncation that ends on a '-' does not leave "--".
        let tricky = format!("{}/{}", "a".repeat(47), "b".repeat(100));
        let s = branch_slug(&tricky);
        assert_valid_slug(&s);
        assert!(!s.contains("--"), "{s}");
    }

    #[test]
    fn names_differing_only_in_case_differ() {
        let a = branch_slug("feature");
        let b = branch_slug("Feature");
        let c = branch_slug("FEATURE");
        assert_eq!(a, "feature");
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_ne!(a, c);
    }

    #[test]
    fn literal_branches_cannot_take_a_hashed_slug() {
        let hashed = branch_slug("Foo");
        assert!(looks_hashed(&hashed));
        // A branch literally named like the hashed slug is itself hashed.
        let literal = branch_slug(&hashed);
        assert_ne!(literal, hashed);
        assert_valid_slug(&literal);
        // Runs of '-' are not plain either ("a--b" vs "a-b").
        assert_ne!(branch_slug("a--b"), branch_slug("a-b"));
        assert_eq!(branch_slug("a-b"), "a-b");
    }

    #[test]
    fn many_similar_branches_do_not_collide() {
        let mut seen = HashSet::new();
        let mut branches = Vec::new();
        for prefix in ["feature", "Feature", "FEATURE", "fix", "feat"] {
            for sep in ["/", "_", "-", ".", "--", "//"] {
                for i in 0..40 {
                    branches.push(format!("{prefix}{sep}{i}"));
                    branches.push(format!("{prefix}{sep}Item{i}"));
                }
            }
        }
        branches.sort();
        branches.dedup();
        for b in &branches {
            let s = branch_slug(b);
            assert_valid_slug(&s);
            assert!(seen.insert(s.clone()), "collision on {b:?} -> {s}");
        }
    }

    #[test]
    fn preview_names_and_hosts() {
        assert_eq!(preview_environment_name("main"), "preview-main");
        let n = preview_environment_name(&"x/".repeat(200));
        assert!(n.len() <= MAX_ENVIRONMENT_NAME_LEN);
        assert!(n.starts_with(PREVIEW_ENVIRONMENT_PREFIX));
        assert_eq!(
            production_host("shop", "apps.example.com"),
            "shop.apps.example.com"
        );
        assert_eq!(
            preview_host("fix-1", "shop", "apps.example.com"),
            "fix-1.shop.apps.example.com"
        );
        // A branch cannot add a label: the host has exactly the labels of
        // "<slug>.other.apps.example.com".
        let h = preview_host("evil.shop", "other", "apps.example.com");
        assert_eq!(h.matches('.').count(), 4, "{h}");
        assert!(
            h.ends_with(".other.apps.example.com") && !h.starts_with("evil.shop."),
            "{h}"
        );
    }

    #[test]
    fn branch_globs() {
        let cases = [
            ("feature/*", "feature/login", true),
            ("feature/*", "feature/", true),
            ("feature/*", "feature/a/b", false),
            ("feature/*", "feature", false),
            ("*", "main", true),
            ("*", "a/b", false),
            ("*/*", "a/b", true),
            ("fix-?", "fix-1", true),
            ("fix-?", "fix-12", false),
            ("fix-?", "fix-/", false),
            ("f*x", "fix", true),
            ("f*x", "fx", true),
            ("f*x", "f/x", false),
            ("*-*-*", "a-b-c", true),
            ("*-*-*", "a-b", false),
            ("release/v*.*", "release/v1.2", true),
            ("main", "main", true),
            ("main", "mainline", false),
            ("*login", "feature-login", true),
            ("**", "anything", true),
            ("**", "a/b", false),
        ];
        for (glob, branch, expected) in cases {
            assert_eq!(
                branch_glob_matches(glob, branch),
                expected,
                "{glob:?} vs {branch:?}"
            );
        }
        assert!(is_preview_branch(&[], "main", "feature/x"));
        assert!(!is_preview_branch(&[], "main", "main"));
        assert!(!is_preview_branch(&["*".into()], "main", "main"));
        assert!(!is_preview_branch(&["feature/*".into()], "main", "fix/x"));
        assert!(is_preview_branch(
            &["feature/*".into(), "fix/*".into()],
            "main",
            "fix/x"
        ));
    }

    #[test]
    fn dns_helpers() {
        assert!(is_dns_label("a"));
        assert!(is_dns_label("a-1"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label("a-"));
        assert!(!is_dns_label("A"));
        assert!(!is_dns_label(""));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_name("apps.example.com"));
        assert!(!is_dns_name("apps..example.com"));
        assert!(!is_dns_name(".example.com"));
    }

    #[test]
    fn short_hash_is_hex_of_sha256() {
        // sha256("") = e3b0c442...
        assert_eq!(short_hash(""), "e3b0c4");
        assert_eq!(short_hash("x").len(), SLUG_HASH_LEN);
    }
}

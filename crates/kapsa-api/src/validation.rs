//! Regular expressions and limits used by the admission rules (OpenAPI
//! `pattern`s and CEL `matches()` calls) of the Kapsa CRDs.
//!
//! All expressions are RE2 (what the Kubernetes API server uses for both
//! `pattern` and CEL) and are written without backslashes (`[.]` instead of
//! `\.`) so that they can be embedded in CEL string literals unchanged.
//!
//! Length limits come from [`crate::naming`]; every string a CEL rule looks
//! at has a `maxLength` and every list a `maxItems`, which keeps the API
//! server's CEL cost estimate bounded.

/// A DNS-1123 label: `[a-z0-9]`, `-` inside, e.g. a Namespace name.
pub const DNS_LABEL: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// A DNS-1035 label (starts with a letter), e.g. a Service name.
pub const DNS_1035_LABEL: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";

/// A DNS-1123 subdomain, e.g. the name of a Secret or ConfigMap.
pub const DNS_SUBDOMAIN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// A lower-case DNS name with at least two labels, each 1–63 characters.
pub const DNS_NAME: &str =
    "^([a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?[.])+[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$";

/// A Go-style duration as CEL's `duration()` parses it: `30s`, `5m`, `1h30m`, `1.5h`.
pub const DURATION: &str = "^([0-9]{1,9}([.][0-9]{1,9})?(ns|us|ms|s|m|h))+$";

/// A container registry host with an optional port, no scheme, no path.
pub const REGISTRY_SERVER: &str = "^([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*|[[][0-9A-Fa-f:.]+[]])(:[0-9]{1,5})?$";

/// A repository path inside a registry: `kapsa`, `team/kapsa`.
pub const REPOSITORY_PATH: &str = "^[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$";

/// A container image reference: `[host[:port]/]path[:tag][@sha256:digest]`.
pub const IMAGE_REFERENCE: &str = "^([A-Za-z0-9][-A-Za-z0-9.]*(:[0-9]{1,5})?/)?[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?(@sha256:[a-f0-9]{64})?$";

/// A full git commit SHA: 40 (SHA-1) or 64 (SHA-256) lower-case hex digits.
pub const COMMIT_SHA: &str = "^([0-9a-f]{40}|[0-9a-f]{64})$";

/// A git URL Kapsa accepts: `https://host[:port]/path`, `ssh://[user@]host[:port]/path`,
/// `user@host:path` (scp-like), and `http://` / `git://` URLs (which a
/// separate rule limits to loopback hosts unless insecure HTTP is opted in).
/// No credentials in the URL: https URLs take no `user@`.
pub const GIT_URL: &str = concat!(
    "^(((https|http|git)://|ssh://([A-Za-z0-9._-]+@)?)",
    "([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*|[[][0-9A-Fa-f:.]+[]])",
    "(:[0-9]{1,5})?/[-A-Za-z0-9._~%+/]+",
    "|[A-Za-z0-9._-]+@",
    "([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*)",
    ":[A-Za-z0-9._~%+/][-A-Za-z0-9._~%+/]*)$"
);

/// An unencrypted git URL (`http://` or `git://`).
pub const GIT_URL_INSECURE: &str = "^(http|git)://";

/// An unencrypted git URL whose host is loopback: `localhost`, `127.x.y.z` or `[::1]`.
pub const GIT_URL_LOOPBACK: &str =
    "^(http|git)://(localhost|127[.][0-9]{1,3}[.][0-9]{1,3}[.][0-9]{1,3}|[[]::1[]])(:[0-9]{1,5})?/";

/// A relative path inside the repository (no leading `/`, no `..` component).
pub const RELATIVE_PATH: &str = "^[-A-Za-z0-9._+@][-A-Za-z0-9._/+@]*$";

/// A `..` path component.
pub const DOT_DOT_COMPONENT: &str = "(^|/)[.][.](/|$)";

/// Characters git forbids in a ref name: control characters, space, `~^:?*[` and `\`.
/// (As a CEL raw string: the backslash must reach RE2 escaped.)
pub const GIT_REF_FORBIDDEN_CHARS: &str = r"[[:cntrl:] ~^:?*[\\]";

/// A branch glob: `[A-Za-z0-9._/*?-]`, not starting with `/` or `-`.
pub const BRANCH_GLOB: &str = "^[A-Za-z0-9._*?][-A-Za-z0-9._/*?]*$";

/// An HTTP path for probes and metrics: starts with `/`, printable ASCII, no spaces.
pub const HTTP_PATH: &str = "^/[!-~]*$";

/// Namespaces a Project may never own.
pub const RESERVED_NAMESPACES: [&str; 5] = [
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "default",
    "kapsa-system",
];

/// Resource names allowed in `spec.runtime.resources.{requests,limits}`.
pub const RUNTIME_RESOURCE_NAMES: [&str; 3] = ["cpu", "memory", "ephemeral-storage"];

/// Maximum length of a git URL.
pub const MAX_GIT_URL_LEN: usize = 2048;
/// Maximum length of a duration string.
pub const MAX_DURATION_LEN: usize = 32;
/// Maximum length of a relative path (contextDir, dockerfile).
pub const MAX_PATH_LEN: usize = 1024;
/// Maximum length of a container image reference.
pub const MAX_IMAGE_LEN: usize = 512;
/// Maximum length of a registry server (253-character host, `:`, 5-digit port).
pub const MAX_SERVER_LEN: usize = 259;
/// Maximum length of a registry repository path.
pub const MAX_REPOSITORY_LEN: usize = 255;
/// Maximum number of base domains in a DomainPool.
pub const MAX_POOL_DOMAINS: usize = 32;
/// Maximum number of branch globs for previews.
pub const MAX_BRANCH_GLOBS: usize = 32;
/// Maximum number of ConfigMaps or Secrets a runtime references.
pub const MAX_ENV_FROM_REFS: usize = 16;
/// Maximum number of releases kept in an Environment's status history.
pub const MAX_RELEASE_HISTORY: usize = 10;
/// Maximum number of conditions on an object.
pub const MAX_CONDITIONS: usize = 32;
/// Maximum number of environments summarised in a Project's status.
pub const MAX_STATUS_ENVIRONMENTS: usize = 128;

/// Quotes `s` as a CEL string literal (single quotes, `\` and `'` escaped).
pub fn cel_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// A CEL list literal of string constants: `['a', 'b']`.
pub fn cel_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| cel_quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The CEL rule "`expr` is a valid git branch name" (git check-ref-format
/// rules, applied to the branch name).
pub fn git_branch_rule(expr: &str) -> String {
    format!(
        "!{expr}.matches({forbidden}) && !{expr}.startsWith('-') && !{expr}.startsWith('/') && !{expr}.startsWith('.') \
         && !{expr}.endsWith('/') && !{expr}.endsWith('.') && !{expr}.endsWith('.lock') && !{expr}.contains('..') \
         && !{expr}.contains('//') && !{expr}.contains('/.') && !{expr}.contains('.lock/') && !{expr}.contains('@{{') \
         && {expr} != '@'",
        forbidden = cel_quote(GIT_REF_FORBIDDEN_CHARS),
    )
}

/// The CEL rule "`expr` is a relative path inside the repository".
pub fn relative_path_rule(expr: &str) -> String {
    format!(
        "{expr}.matches({path}) && !{expr}.matches({dotdot})",
        path = cel_quote(RELATIVE_PATH),
        dotdot = cel_quote(DOT_DOT_COMPONENT),
    )
}

/// The CEL rule "`expr` is a well-formed duration of at least `min`".
/// Guarded so that a malformed duration fails only the format rule.
pub fn min_duration_rule(expr: &str, min: &str) -> String {
    format!(
        "!{expr}.matches({re}) || duration({expr}) >= duration({min})",
        re = cel_quote(DURATION),
        min = cel_quote(min),
    )
}

/// The CEL rule "`expr` matches `re`".
pub fn matches_rule(expr: &str, re: &str) -> String {
    format!("{expr}.matches({})", cel_quote(re))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(cel_quote("a'b\\c"), r"'a\'b\\c'");
        assert_eq!(cel_list(&["x", "y"]), "['x', 'y']");
        assert_eq!(matches_rule("self", "^a$"), "self.matches('^a$')");
    }

    #[test]
    fn regexes_have_no_quotes() {
        for re in [
            DNS_LABEL,
            DNS_1035_LABEL,
            DNS_SUBDOMAIN,
            DNS_NAME,
            DURATION,
            REGISTRY_SERVER,
            REPOSITORY_PATH,
            IMAGE_REFERENCE,
            COMMIT_SHA,
            GIT_URL,
            GIT_URL_INSECURE,
            GIT_URL_LOOPBACK,
            RELATIVE_PATH,
            DOT_DOT_COMPONENT,
            BRANCH_GLOB,
            HTTP_PATH,
        ] {
            assert!(!re.contains('\''), "{re}");
            assert!(!re.contains('\\'), "{re}");
        }
    }

    #[test]
    fn rules_render() {
        let r = git_branch_rule("self");
        assert!(r.contains("@{"), "{r}");
        assert!(r.contains(r"'[[:cntrl:] ~^:?*[\\\\]'"), "{r}");
        assert_eq!(
            min_duration_rule("self", "10s"),
            format!(
                "!self.matches({}) || duration(self) >= duration('10s')",
                cel_quote(DURATION)
            )
        );
        assert!(relative_path_rule("self").starts_with("self.matches("));
    }
}

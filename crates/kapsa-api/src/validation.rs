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

/// A duration: one or more numbers (1–5 digits, optionally `.` and 1–9
/// digits), each followed by a unit `ns`, `us`, `ms`, `s`, `m` or `h`, e.g.
/// `30s`, `5m`, `1h30m`, `1.5h`. A subset of Go's durations (what CEL's
/// `duration()` parses), small enough that `duration()` never overflows
/// within [`MAX_DURATION_LEN`] characters; [`crate::duration::parse`] accepts
/// exactly this language.
pub const DURATION: &str = "^([0-9]{1,5}([.][0-9]{1,9})?(ns|us|ms|s|m|h))+$";

/// A container registry host with an optional port, no scheme, no path.
pub const REGISTRY_SERVER: &str = "^([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*|[[][0-9A-Fa-f:.]+[]])(:[0-9]{1,5})?$";

/// A repository path inside a registry: `kapsa`, `team/kapsa`.
pub const REPOSITORY_PATH: &str = "^[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*$";

/// A container image reference: `[host[:port]/]path[:tag][@sha256:digest]`.
pub const IMAGE_REFERENCE: &str = "^([A-Za-z0-9][-A-Za-z0-9.]*(:[0-9]{1,5})?/)?[a-z0-9]+([._-]+[a-z0-9]+)*(/[a-z0-9]+([._-]+[a-z0-9]+)*)*(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?(@sha256:[a-f0-9]{64})?$";

/// A full git commit SHA: 40 (SHA-1) or 64 (SHA-256) lower-case hex digits.
pub const COMMIT_SHA: &str = "^([0-9a-f]{40}|[0-9a-f]{64})$";

/// A host name or an IPv6 address in brackets, as git URLs take it.
macro_rules! git_host {
    () => {
        "([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*|[[][0-9A-Fa-f:.]+[]])"
    };
}

/// A TCP port 1–65535 without leading zeros.
macro_rules! tcp_port {
    () => {
        "([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
    };
}

/// An ssh user name: it must not start with `-` (an ssh command line could
/// take it for an option) or `.`.
macro_rules! ssh_user {
    () => {
        "[A-Za-z0-9_][A-Za-z0-9._-]*"
    };
}

/// A git URL Kapsa accepts: `https://host[:port]/path`,
/// `ssh://[user@]host[:port]/path`, `user@host:path` (scp-like), and
/// `http://` URLs (which a separate rule limits to loopback hosts unless
/// insecure HTTP is opted in). These are the transports the operator's git
/// client speaks; `git://`, `file://`, local paths and remote helpers are
/// refused by both. No credentials in the URL: https URLs take no `user@`.
pub const GIT_URL: &str = concat!(
    "^(((https|http)://|ssh://(",
    ssh_user!(),
    "@)?)",
    git_host!(),
    "(:",
    tcp_port!(),
    ")?/[-A-Za-z0-9._~%+/]+",
    "|",
    ssh_user!(),
    "@([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?([.][A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*)",
    ":[A-Za-z0-9._~%+/][-A-Za-z0-9._~%+/]*)$"
);

/// An unencrypted git URL (`http://`).
pub const GIT_URL_INSECURE: &str = "^http://";

/// An unencrypted git URL whose host is loopback: `localhost`, `127.x.y.z` or `[::1]`.
pub const GIT_URL_LOOPBACK: &str =
    "^http://(localhost|127[.][0-9]{1,3}[.][0-9]{1,3}[.][0-9]{1,3}|[[]::1[]])(:[0-9]{1,5})?/";

/// A relative path inside the repository (no leading `/`, no `..` component).
pub const RELATIVE_PATH: &str = "^[-A-Za-z0-9._+@][-A-Za-z0-9._/+@]*$";

/// A `..` path component.
pub const DOT_DOT_COMPONENT: &str = "(^|/)[.][.](/|$)";

/// Characters git forbids in a ref name: control characters, space, `~^:?*[` and `\`.
/// (As a CEL raw string: the backslash must reach RE2 escaped.)
pub const GIT_REF_FORBIDDEN_CHARS: &str = r"[[:cntrl:] ~^:?*[\\]";

/// A branch glob: `[A-Za-z0-9._/*?-]`, not starting with `/`, `-` or `.`.
/// [`branch_glob_rule`] adds what else a glob needs to be able to match a
/// valid branch name.
pub const BRANCH_GLOB: &str = "^[A-Za-z0-9_*?][-A-Za-z0-9._/*?]*$";

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

/// The resource names a ResourceQuota's `spec.hard` takes without a `/`
/// (Kubernetes' standard quota resources); `hugepages-<size>` and
/// `requests.hugepages-<size>` are standard too. Names with a `/` are
/// object counts (`count/deployments.apps`), extended resources
/// (`requests.nvidia.com/gpu`) or storage-class scoped
/// (`gold.storageclass.storage.k8s.io/requests.storage`).
pub const QUOTA_RESOURCE_NAMES: [&str; 19] = [
    "cpu",
    "memory",
    "ephemeral-storage",
    "requests.cpu",
    "requests.memory",
    "requests.storage",
    "requests.ephemeral-storage",
    "limits.cpu",
    "limits.memory",
    "limits.ephemeral-storage",
    "pods",
    "resourcequotas",
    "services",
    "replicationcontrollers",
    "secrets",
    "persistentvolumeclaims",
    "configmaps",
    "services.nodeports",
    "services.loadbalancers",
];

/// Quota resources that count objects, so their limit is a whole number.
pub const INTEGER_QUOTA_RESOURCE_NAMES: [&str; 9] = [
    "pods",
    "resourcequotas",
    "services",
    "replicationcontrollers",
    "secrets",
    "persistentvolumeclaims",
    "configmaps",
    "services.nodeports",
    "services.loadbalancers",
];

/// A Kubernetes resource name as a quota takes it (a qualified name): an
/// optional DNS-subdomain prefix and `/`, then 1–63 characters of
/// `[A-Za-z0-9._-]`, starting and ending with a letter or digit.
pub const QUOTA_RESOURCE_NAME: &str = "^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$";

/// Maximum length of a quantity written as a string (e.g. `1500m`, `128Mi`).
pub const MAX_QUANTITY_LEN: usize = 64;
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

/// The CEL rule "`expr` is a valid git branch name": the rules of `git
/// check-ref-format --branch` (no control characters, space, `~^:?*[\`,
/// `..`, `//`, `@{`; no component starting with `.` or ending with `.lock`;
/// not starting with `-` or `/`, not ending with `/` or `.`; not `HEAD`),
/// plus two that git allows but that never mean what they say: `@` (git's
/// shorthand for `HEAD`) and names starting with `refs/` (a branch named
/// `refs/heads/main` is not `main`).
pub fn git_branch_rule(expr: &str) -> String {
    format!(
        "!{expr}.matches({forbidden}) && !{expr}.startsWith('-') && !{expr}.startsWith('/') && !{expr}.startsWith('.') \
         && !{expr}.endsWith('/') && !{expr}.endsWith('.') && !{expr}.endsWith('.lock') && !{expr}.contains('..') \
         && !{expr}.contains('//') && !{expr}.contains('/.') && !{expr}.contains('.lock/') && !{expr}.contains('@{{') \
         && {expr} != '@' && {expr} != 'HEAD' && !{expr}.startsWith('refs/')",
        forbidden = cel_quote(GIT_REF_FORBIDDEN_CHARS),
    )
}

/// Whether `name` is a branch name the CRDs accept (`spec.branch`,
/// `spec.source.git.branch`): [`git_branch_rule`] and at most
/// [`crate::naming::MAX_BRANCH_NAME_LEN`] bytes (the API server counts
/// the CRD's `maxLength` in bytes). A git server may list
/// branches that fail it (git allows longer names); Kapsa cannot name them
/// in an Environment.
pub fn is_valid_branch_name(name: &str) -> bool {
    let forbidden = |c: char| c.is_ascii_control() || " ~^:?*[\\".contains(c);
    !name.is_empty()
        && name.len() <= crate::naming::MAX_BRANCH_NAME_LEN
        && !name.chars().any(forbidden)
        && !name.starts_with(['-', '/', '.'])
        && !name.ends_with(['/', '.'])
        && !name.ends_with(".lock")
        && !["..", "//", "/.", ".lock/", "@{"]
            .iter()
            .any(|s| name.contains(s))
        && name != "@"
        && name != "HEAD"
        && !name.starts_with("refs/")
}

/// The CEL rule "`expr` is a branch glob that can match a valid branch
/// name": [`BRANCH_GLOB`]'s characters, and none of what no branch name has
/// (`..`, `//`, a component starting with `.`, a `.lock` component end, a
/// trailing `/` or `.`). `*` and `?` never match `/`, so these hold for any
/// branch the glob matches.
pub fn branch_glob_rule(expr: &str) -> String {
    format!(
        "{matches} && !{expr}.contains('..') && !{expr}.contains('//') && !{expr}.contains('/.') \
         && !{expr}.contains('.lock/') && !{expr}.endsWith('.lock') && !{expr}.endsWith('/') && !{expr}.endsWith('.')",
        matches = matches_rule(expr, BRANCH_GLOB),
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

/// The CEL rule "`expr` is a well-formed duration of at most `max`",
/// guarded like [`min_duration_rule`].
pub fn max_duration_rule(expr: &str, max: &str) -> String {
    format!(
        "!{expr}.matches({re}) || duration({expr}) <= duration({max})",
        re = cel_quote(DURATION),
        max = cel_quote(max),
    )
}

/// The schema of a Kubernetes quantity in a map named `field` (e.g.
/// `spec.runtime.resources.requests`): an int-or-string that CEL's
/// `isQuantity` accepts and that is not negative. A failure names the map
/// and the key (`spec.runtime.resources.requests[cpu]`).
pub fn quantity_schema(field: &str) -> serde_json::Value {
    serde_json::json!({
        "description": "A Kubernetes quantity, as an integer or a string of at most 64 characters: a non-negative number with an optional suffix m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei or an exponent, e.g. 2, 100m, \"0.5\", 128Mi, 1G. Quote decimals in YAML: an unquoted 0.5 is a floating-point number and is refused.",
        "x-kubernetes-int-or-string": true,
        "maxLength": MAX_QUANTITY_LEN,
        "x-kubernetes-validations": [
            {
                "rule": "isQuantity(string(self))",
                "message": format!("{field}: every value must be a Kubernetes quantity such as 100m, 0.5, 2, 128Mi or 1G (a number with an optional suffix m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei)"),
            },
            {
                "rule": "!isQuantity(string(self)) || !quantity(string(self)).isLessThan(quantity('0'))",
                "message": format!("{field}: a quantity must not be negative"),
            },
        ],
    })
}

/// A rule on a map named `field` that every key `k` satisfies `predicate`
/// (a CEL expression over `k` and `self`). The message names the first
/// offending key the way the API server names map entries
/// (`spec.resourceQuota.hard[cpus]: ...`); `message` is the fallback the
/// API server shows if the message expression cannot be evaluated.
pub fn map_key_rule(field: &str, predicate: &str, message: &str) -> serde_json::Value {
    serde_json::json!({
        "rule": format!("self.all(k, {predicate})"),
        "message": format!("{field}: {message}"),
        "messageExpression": format!(
            "{} + self.filter(k, !({predicate}))[0] + {}",
            cel_quote(&format!("{field}[")),
            cel_quote(&format!("]: {message}")),
        ),
    })
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
            QUOTA_RESOURCE_NAME,
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
        let glob = branch_glob_rule("g");
        assert!(glob.starts_with(&matches_rule("g", BRANCH_GLOB)), "{glob}");
        let branch = git_branch_rule("self");
        assert!(branch.contains("self != 'HEAD'"), "{branch}");
        assert!(branch.contains("!self.startsWith('refs/')"), "{branch}");
    }

    #[test]
    fn integer_quota_resources_are_quota_resources() {
        for name in INTEGER_QUOTA_RESOURCE_NAMES {
            assert!(QUOTA_RESOURCE_NAMES.contains(&name), "{name}");
        }
    }

    #[test]
    fn quantity_schema_names_the_field() {
        let schema = quantity_schema("spec.x");
        assert_eq!(schema["x-kubernetes-int-or-string"], true);
        for rule in schema["x-kubernetes-validations"]
            .as_array()
            .expect("rules")
        {
            assert!(
                rule["message"]
                    .as_str()
                    .expect("message")
                    .starts_with("spec.x: ")
            );
        }
    }
}

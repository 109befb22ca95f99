//! Errors that say what to do: the API server's and the network's failures
//! turned into a sentence with a next step, and an exit code per kind.

use std::fmt;

use super::cluster::Cluster;

/// Exit code of an error without a more specific kind.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code when no API server answers.
pub const EXIT_UNREACHABLE: i32 = 3;
/// Exit code when Kapsa's CRDs are not installed.
pub const EXIT_NO_CRDS: i32 = 4;
/// Exit code when a named Project or Environment does not exist.
pub const EXIT_NOT_FOUND: i32 = 5;
/// Exit code when the API server refuses the request (403).
pub const EXIT_FORBIDDEN: i32 = 6;

/// An error for a person: what happened and what to do, with an exit code.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub code: i32,
}

impl CliError {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code,
        }
    }

    pub fn failure(message: impl Into<String>) -> Self {
        Self::new(EXIT_FAILURE, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(EXIT_NOT_FOUND, message)
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

/// The message printed after `error: `.
pub fn render(err: &anyhow::Error) -> String {
    match err.downcast_ref::<CliError>() {
        Some(cli) => cli.message.clone(),
        None => format!("{err:#}"),
    }
}

/// The process exit code for `err`.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    err.downcast_ref::<CliError>()
        .map_or(EXIT_FAILURE, |cli| cli.code)
}

/// What the CLI was doing when a request failed: `verb` on `resource`
/// (plural, with its group: `projects.kapsa.dev`).
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    pub verb: &'a str,
    pub resource: &'a str,
}

impl<'a> Request<'a> {
    pub const fn new(verb: &'a str, resource: &'a str) -> Self {
        Self { verb, resource }
    }
}

/// Turns a failed request into an error that says what to do.
pub fn explain(err: kube::Error, cluster: &Cluster, request: Request<'_>) -> anyhow::Error {
    anyhow::Error::new(classify(err, cluster, request))
}

fn classify(err: kube::Error, cluster: &Cluster, request: Request<'_>) -> CliError {
    match err {
        kube::Error::Api(status) => {
            let code = status.code;
            let reason = status.reason.clone();
            let message = status.message.clone();
            let type_missing = code == 404
                && status
                    .details
                    .as_ref()
                    .is_none_or(|details| details.name.is_empty());
            if code == 403 {
                forbidden(&message, cluster, request)
            } else if code == 401 {
                CliError::new(
                    EXIT_FORBIDDEN,
                    format!(
                        "the API server at {} did not accept your credentials (401 Unauthorized){}. \
                         Log in again or refresh the credentials of that context, then retry.",
                        cluster.server,
                        cluster.context_note()
                    ),
                )
            } else if type_missing && request.resource.ends_with(".kapsa.dev") {
                crds_missing(cluster, request)
            } else if type_missing {
                CliError::failure(format!(
                    "the API server at {} does not serve {} (404){}. Is the component that \
                     provides it installed?",
                    cluster.server,
                    request.resource,
                    cluster.context_note()
                ))
            } else {
                CliError::failure(format!(
                    "the API server refused to {} {}: {} ({} {})",
                    request.verb,
                    request.resource,
                    if message.is_empty() {
                        "no message"
                    } else {
                        &message
                    },
                    code,
                    reason
                ))
            }
        }
        kube::Error::Auth(auth) => CliError::new(
            EXIT_FORBIDDEN,
            format!(
                "could not get credentials for the cluster{}: {auth}. Check the user of that \
                 context in your kubeconfig (kubectl config view --minify).",
                cluster.context_note()
            ),
        ),
        other if is_transport(&other) => unreachable(cluster, &root_cause(&other)),
        other => CliError::failure(format!(
            "{} {} failed{}: {}",
            request.verb,
            request.resource,
            cluster.context_note(),
            root_cause(&other)
        )),
    }
}

fn is_transport(err: &kube::Error) -> bool {
    matches!(
        err,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_)
    )
}

/// The innermost message of an error chain (e.g. "Connection refused (os
/// error 111)" under the hyper and tower wrappers).
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    let text = current.to_string();
    if text.is_empty() {
        err.to_string()
    } else {
        text
    }
}

/// No API server answered at the kubeconfig's address.
pub fn unreachable(cluster: &Cluster, cause: &str) -> CliError {
    CliError::new(
        EXIT_UNREACHABLE,
        format!(
            "cannot reach the Kubernetes API server at {}{}: {cause}.\n\
             Is the cluster running? For a local one, start it with `kapsa dev up` and \
             `export KUBECONFIG=…` as it prints; for another cluster, pick its context with \
             --context NAME (see `kubectl config get-contexts`).",
            cluster.server,
            cluster.context_note()
        ),
    )
}

fn crds_missing(cluster: &Cluster, request: Request<'_>) -> CliError {
    CliError::new(
        EXIT_NO_CRDS,
        format!(
            "Kapsa is not installed in this cluster: the API server at {}{} does not serve {} \
             (404: Kapsa's CustomResourceDefinitions are missing).\n\
             Install them with `kapsa crds | kubectl apply --server-side -f -` (or \
             deploy/crds/kapsa.yaml), then run the operator (deploy/operator/); for a local try, \
             `kapsa dev up` does both.",
            cluster.server,
            cluster.context_note(),
            request.resource
        ),
    )
}

/// The parts of a 403's message: `User "u" cannot <verb> resource "<r>" in
/// API group "<g>" [in the namespace "<ns>" | at the cluster scope]`.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub user: Option<String>,
    pub verb: String,
    pub resource: String,
    pub scope: Option<String>,
}

/// Reads the verb, resource and scope out of an RBAC refusal message.
pub fn parse_refusal(message: &str) -> Option<Refusal> {
    let user = message
        .split_once("User \"")
        .and_then(|(_, rest)| rest.split_once('"'))
        .map(|(user, _)| user.to_string());
    let (_, rest) = message.split_once(" cannot ")?;
    let (verb, rest) = rest.split_once(' ')?;
    let rest = rest.strip_prefix("resource \"")?;
    let (plural, rest) = rest.split_once('"')?;
    let group = rest
        .split_once("in API group \"")
        .and_then(|(_, r)| r.split_once('"'))
        .map(|(g, _)| g.to_string())
        .unwrap_or_default();
    let scope = if let Some((_, r)) = rest.split_once("in the namespace \"") {
        r.split_once('"')
            .map(|(ns, _)| format!("in namespace {ns}"))
    } else if rest.contains("at the cluster scope") {
        Some("at the cluster scope".to_string())
    } else {
        None
    };
    let resource = if group.is_empty() {
        plural.to_string()
    } else {
        format!("{plural}.{group}")
    };
    Some(Refusal {
        user,
        verb: verb.to_string(),
        resource,
        scope,
    })
}

fn forbidden(message: &str, cluster: &Cluster, request: Request<'_>) -> CliError {
    let text = match parse_refusal(message) {
        Some(refusal) => {
            let who = refusal
                .user
                .as_deref()
                .map_or_else(|| "you".to_string(), |u| format!("user \"{u}\""));
            let scope = refusal
                .scope
                .as_deref()
                .map(|s| format!(" {s}"))
                .unwrap_or_default();
            let namespace_flag = refusal
                .scope
                .as_deref()
                .and_then(|s| s.strip_prefix("in namespace "))
                .map(|ns| format!(" -n {ns}"))
                .unwrap_or_default();
            format!(
                "no permission: {who} may not {verb} {resource}{scope}{context}.\n\
                 Ask a cluster admin for a Role or ClusterRole that allows \"{verb}\" on \
                 \"{resource}\" (bound to you), or use a context that has it. Check with: \
                 kubectl auth can-i {verb} {resource}{namespace_flag}",
                verb = refusal.verb,
                resource = refusal.resource,
                context = cluster.context_note(),
            )
        }
        None => format!(
            "no permission to {} {}{}: {message}. Ask a cluster admin for access, or use \
             another context.",
            request.verb,
            request.resource,
            cluster.context_note()
        ),
    };
    CliError::new(EXIT_FORBIDDEN, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_at_cluster_scope() {
        let r = parse_refusal(
            "projects.kapsa.dev is forbidden: User \"bob\" cannot list resource \"projects\" in API group \"kapsa.dev\" at the cluster scope",
        )
        .unwrap();
        assert_eq!(
            r,
            Refusal {
                user: Some("bob".into()),
                verb: "list".into(),
                resource: "projects.kapsa.dev".into(),
                scope: Some("at the cluster scope".into()),
            }
        );
    }

    #[test]
    fn refusal_in_a_namespace_of_the_core_group() {
        let r = parse_refusal(
            "pods \"web-1\" is forbidden: User \"system:serviceaccount:a:b\" cannot get resource \"pods/log\" in API group \"\" in the namespace \"shop\"",
        )
        .unwrap();
        assert_eq!(r.user.as_deref(), Some("system:serviceaccount:a:b"));
        assert_eq!(r.verb, "get");
        assert_eq!(r.resource, "pods/log");
        assert_eq!(r.scope.as_deref(), Some("in namespace shop"));
    }

    #[test]
    fn other_messages_are_not_refusals() {
        assert_eq!(parse_refusal("quota exceeded"), None);
    }
}

//! `kapsa logs <project>`: the logs of every replica of an Environment's app,
//! each line prefixed by its pod, or with `--build` of its latest build's pod
//! (kpack build steps or a Dockerfile Job).

use std::time::Duration;

use clap::Args;
use futures::{AsyncBufReadExt, TryStreamExt};
use k8s_openapi::api::core::v1::Pod;
use kapsa_api::EnvironmentPhase;
use kube::api::{Api, ListParams, LogParams};
use kube::{Client, ResourceExt};
use tokio::sync::mpsc;

use super::cluster::{Cluster, ClusterArgs, connect_streaming};
use super::error::{CliError, Request, explain, render as render_error};
use super::lookup::{build_namespace, environments, namespace_of, pick_environment, project};
use super::output::emit_line;
use super::status::KPACK_IMAGE_LABEL;

/// Label a Job puts on its Pods.
const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";

#[derive(Args)]
pub struct LogsArgs {
    /// The Project's name.
    project: String,
    /// The Environment: its name (`production`, `preview-login`) or its
    /// branch (`feature/login`). Default: production.
    #[arg(short = 'e', long = "env", value_name = "ENV")]
    env: Option<String>,
    /// The logs of the Environment's latest build instead of its app.
    #[arg(long)]
    build: bool,
    /// Keep streaming new lines.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only lines newer than this, e.g. `30s`, `5m`, `1h30m`.
    #[arg(long, value_name = "DURATION", value_parser = parse_since)]
    since: Option<Duration>,
    /// Only the last N lines of each container.
    #[arg(long, value_name = "N")]
    tail: Option<i64>,
    /// Prefix each line with its RFC 3339 timestamp.
    #[arg(long)]
    timestamps: bool,
    #[command(flatten)]
    cluster: ClusterArgs,
}

fn parse_since(text: &str) -> Result<Duration, String> {
    kapsa_api::duration::parse(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a duration such as 30s, 5m or 1h30m"))
}

/// One container of one pod to read.
#[derive(Clone, Debug)]
struct Source {
    namespace: String,
    pod: String,
    container: String,
    prefix: String,
}

fn sources(pods: &[Pod], with_init_containers: bool) -> Vec<Source> {
    let mut out = Vec::new();
    for pod in pods {
        let spec = pod.spec.clone().unwrap_or_default();
        let mut containers: Vec<String> = Vec::new();
        if with_init_containers {
            containers.extend(
                spec.init_containers
                    .iter()
                    .flatten()
                    .map(|c| c.name.clone()),
            );
        }
        containers.extend(spec.containers.iter().map(|c| c.name.clone()));
        let many = containers.len() > 1;
        for container in containers {
            let prefix = if many {
                format!("[{}/{container}]", pod.name_any())
            } else {
                format!("[{}]", pod.name_any())
            };
            out.push(Source {
                namespace: pod.namespace().unwrap_or_default(),
                pod: pod.name_any(),
                container,
                prefix,
            });
        }
    }
    out
}

/// The Pods API of `source`'s namespace.
fn pods_of(client: &Client, source: &Source) -> Api<Pod> {
    Api::namespaced(client.clone(), &source.namespace)
}

fn params(args: &LogsArgs, container: &str, follow: bool) -> LogParams {
    LogParams {
        container: Some(container.to_string()),
        follow,
        since_seconds: args.since.map(|d| d.as_secs_f64().ceil() as i64),
        tail_lines: args.tail,
        timestamps: args.timestamps,
        ..LogParams::default()
    }
}

async fn list_pods(cluster: &Cluster, api: &Api<Pod>, selector: &str) -> anyhow::Result<Vec<Pod>> {
    let mut pods = api
        .list(&ListParams::default().labels(selector))
        .await
        .map_err(|e| explain(e, cluster, Request::new("list", "pods")))?
        .items;
    pods.sort_by_key(|p| {
        (
            p.metadata.creation_timestamp.as_ref().map(|t| t.0),
            p.name_any(),
        )
    });
    Ok(pods)
}

pub async fn run(args: LogsArgs) -> anyhow::Result<()> {
    let cluster = connect_streaming(&args.cluster).await?;
    let project = project(&cluster, &args.project).await?;
    let project_name = project.name_any();
    let namespace = namespace_of(&project);
    let envs = environments(&cluster, &project).await?;
    let env = pick_environment(&project, &envs, args.env.as_deref())?;
    let env_name = env.name_any();
    let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &namespace);

    let pods = if args.build {
        // kpack names the Image after the Environment and labels its build
        // Pods with it; a Dockerfile build is a Job of the Environment.
        // Builds run in the project's namespace or its build namespace.
        let mut pods = Vec::new();
        for ns in [namespace.clone(), build_namespace(&project_name)] {
            let api: Api<Pod> = Api::namespaced(cluster.client.clone(), &ns);
            let kpack = format!("{KPACK_IMAGE_LABEL}={env_name}");
            let job = format!(
                "kapsa.dev/project={project_name},kapsa.dev/environment={env_name},{JOB_NAME_LABEL}"
            );
            for selector in [kpack, job] {
                match list_pods(&cluster, &api, &selector).await {
                    Ok(found) => pods.extend(found),
                    // Tenants may not see the build namespace.
                    Err(_) if ns != namespace => {}
                    Err(e) => return Err(e),
                }
            }
        }
        pods.sort_by_key(|p| {
            (
                p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                p.namespace(),
                p.name_any(),
            )
        });
        pods.dedup_by_key(|p| (p.namespace(), p.name_any()));
        // The latest build only.
        pods.split_off(pods.len().saturating_sub(1))
    } else {
        list_pods(
            &cluster,
            &api,
            &format!(
                "kapsa.dev/project={project_name},kapsa.dev/environment={env_name},!{KPACK_IMAGE_LABEL},!{JOB_NAME_LABEL}"
            ),
        )
        .await?
    };
    if pods.is_empty() {
        let phase = env
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or(EnvironmentPhase::Pending);
        let message = if args.build {
            format!(
                "no build pod for Environment {env_name} of project {project_name} in namespace \
                 {namespace} or {}: no kpack build or Job Pod exists (finished builds' Pods may \
                 have been cleaned up). Phase: {phase:?}; see `kapsa status {project_name}` for \
                 the build in progress.",
                build_namespace(&project_name)
            )
        } else {
            format!(
                "no app pod for Environment {env_name} of project {project_name} in namespace \
                 {namespace}. Phase: {phase:?}; see why with `kapsa status {project_name}`, or the \
                 build with `kapsa logs {project_name} --build`."
            )
        };
        return Err(CliError::not_found(message).into());
    }
    let sources = sources(&pods, args.build);
    if args.follow {
        follow(&cluster.client, &args, sources, args.build).await
    } else {
        once(&cluster, &args, &sources).await
    }
}

fn log_error(cluster: &Cluster, source: &Source, err: kube::Error) -> String {
    let detail = match &err {
        kube::Error::Api(s) if s.code != 403 && !s.message.is_empty() => s.message.clone(),
        _ => render_error(&explain(err, cluster, Request::new("get", "pods/log"))),
    };
    format!(
        "cannot read the logs of pod {} (container {}): {detail}",
        source.pod, source.container
    )
}

/// A hint for a log request the API server could not pass to the node.
fn kubelet_hint(message: &str) -> &'static str {
    if message.contains("containerLogs") || message.contains(":10250") {
        " The API server could not reach the kubelet of the pod's node, which serves logs: \
         check the node (kubectl get nodes -o wide). Simulated nodes (kwok, as under \
         `kapsa dev up`) run no containers and so have no logs."
    } else {
        ""
    }
}

/// Every container's logs, one after the other, each line prefixed.
async fn once(cluster: &Cluster, args: &LogsArgs, sources: &[Source]) -> anyhow::Result<()> {
    let mut failures = Vec::new();
    let mut read = 0usize;
    for source in sources {
        match pods_of(&cluster.client, source)
            .logs(&source.pod, &params(args, &source.container, false))
            .await
        {
            Ok(text) => {
                read += 1;
                for line in text.lines() {
                    emit_line(&format!("{} {line}", source.prefix));
                }
            }
            Err(err) => failures.push(log_error(cluster, source, err)),
        }
    }
    all_failed_or_warn(read, failures, sources)
}

/// An error when nothing could be read; warnings on stderr otherwise.
fn all_failed_or_warn(
    read: usize,
    failures: Vec<String>,
    sources: &[Source],
) -> anyhow::Result<()> {
    if read == 0
        && let Some(first) = failures.first()
    {
        let others = if failures.len() > 1 {
            format!(" ({} more failed too)", failures.len() - 1)
        } else {
            String::new()
        };
        return Err(CliError::failure(format!(
            "no logs could be read from {} pod(s): {first}{others}.{}",
            pod_count(sources),
            kubelet_hint(first)
        ))
        .into());
    }
    for failure in failures {
        eprintln!("warning: {failure}");
    }
    Ok(())
}

fn pod_count(sources: &[Source]) -> usize {
    let mut pods: Vec<&str> = sources.iter().map(|s| s.pod.as_str()).collect();
    pods.dedup();
    pods.len()
}

/// Streams every container at once (app pods), or one container after the
/// other as each starts (a build's steps), until all end.
async fn follow(
    client: &Client,
    args: &LogsArgs,
    sources: Vec<Source>,
    sequential: bool,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<String, String>>();
    let all = sources.clone();
    let groups: Vec<Vec<Source>> = if sequential {
        vec![sources]
    } else {
        sources.into_iter().map(|s| vec![s]).collect()
    };
    let mut tasks = Vec::new();
    for group in groups {
        let client = client.clone();
        let tx = tx.clone();
        let params: Vec<LogParams> = group
            .iter()
            .map(|s| params(args, &s.container, true))
            .collect();
        tasks.push(tokio::spawn(async move {
            for (source, params) in group.into_iter().zip(params) {
                if sequential {
                    wait_started(&client, &source).await;
                }
                match pods_of(&client, &source)
                    .log_stream(&source.pod, &params)
                    .await
                {
                    Ok(stream) => {
                        let mut lines = stream.lines();
                        loop {
                            match lines.try_next().await {
                                Ok(Some(line)) => {
                                    let _ = tx.send(Ok(format!("{} {line}", source.prefix)));
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    let _ = tx.send(Err(format!(
                                        "the log stream of pod {} (container {}) broke: {e}",
                                        source.pod, source.container
                                    )));
                                    break;
                                }
                            }
                        }
                    }
                    Err(err) => {
                        let _ = tx.send(Err(match &err {
                            kube::Error::Api(s) => format!(
                                "cannot read the logs of pod {} (container {}): {}",
                                source.pod, source.container, s.message
                            ),
                            other => format!(
                                "cannot read the logs of pod {} (container {}): {}",
                                source.pod,
                                source.container,
                                super::error::root_cause(other)
                            ),
                        }));
                    }
                }
            }
        }));
    }
    drop(tx);
    let mut failures = Vec::new();
    let mut lines = 0usize;
    while let Some(item) = rx.recv().await {
        match item {
            Ok(line) => {
                lines += 1;
                emit_line(&line);
            }
            // Before any line, hold failures back: they may be the whole story.
            Err(message) if lines == 0 => failures.push(message),
            Err(message) => eprintln!("warning: {message}"),
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    all_failed_or_warn(lines, failures, &all)
}

/// Waits until `source`'s container has started or finished (a build's
/// steps run one after the other), or the pod is gone.
async fn wait_started(client: &Client, source: &Source) {
    loop {
        let Ok(Some(pod)) = pods_of(client, source).get_opt(&source.pod).await else {
            return;
        };
        let status = pod.status.unwrap_or_default();
        let statuses = status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten());
        let started = statuses.filter(|s| s.name == source.container).any(|s| {
            s.state
                .as_ref()
                .is_some_and(|st| st.running.is_some() || st.terminated.is_some())
        });
        if started || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_go_durations() {
        assert_eq!(parse_since("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_since("1h30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_since("0s").is_err());
        assert!(parse_since("yesterday").is_err());
    }

    #[test]
    fn prefixes_name_the_pod_and_the_container_when_there_are_several() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-1"},
            "spec": {"containers": [{"name": "app"}]}
        }))
        .unwrap();
        let build: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "build-1"},
            "spec": {"initContainers": [{"name": "detect"}], "containers": [{"name": "done"}]}
        }))
        .unwrap();
        let one = sources(std::slice::from_ref(&pod), false);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].prefix, "[web-1]");
        let steps = sources(&[build], true);
        let prefixes: Vec<&str> = steps.iter().map(|s| s.prefix.as_str()).collect();
        assert_eq!(prefixes, ["[build-1/detect]", "[build-1/done]"]);
    }
}

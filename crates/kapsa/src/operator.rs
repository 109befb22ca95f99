//! `kapsa operator`: the operator process, with JSON logs, metrics and leader
//! election.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use k8s_openapi::api::core::v1::Toleration;
use kapsa_api::domain_pool::PodSecurityLevel;
use kapsa_operator::leader::{LeaseConfig, release};
use kapsa_operator::metrics::Metrics;
use kapsa_operator::resources::environment::BuildPods;
use kapsa_operator::{OperatorConfig, run as run_operator};

#[derive(Args)]
pub struct OperatorArgs {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "KAPSA_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Run without leader election (only for a single replica).
    #[arg(long)]
    no_leader_election: bool,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kapsa-system")]
    lease_namespace: String,
    /// This replica's identity in leader election.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Leader election: seconds a lease stays valid after its holder last
    /// renewed it, counted by each replica on its own monotonic clock.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Leader election: seconds the leader keeps failing to renew before it
    /// steps down (stops reconciling); less than the lease duration.
    #[arg(long, default_value_t = 10)]
    renew_deadline_seconds: u64,
    /// Leader election: seconds between two attempts to take or renew the lease.
    #[arg(long, default_value_t = 2)]
    retry_period_seconds: u64,
    /// Reconciles running at once, per controller.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Internal addresses that Projects' git URLs may reach. By default none:
    /// a URL whose host is or resolves to a loopback (127.0.0.0/8, ::1),
    /// link-local (169.254.0.0/16 — cloud metadata —, fe80::/10), private
    /// (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7), unspecified,
    /// multicast or reserved address is refused, and the Project's
    /// SourceReachable condition says so. Values, comma-separated: `none`,
    /// `loopback`, `link-local`, `private`, CIDR networks or single addresses
    /// (`10.20.0.0/16,fd12::/16`), or `all` (no check). Example:
    /// `--allow-internal-git-hosts 10.20.0.0/16` for a git server inside the
    /// company network.
    #[arg(
        long,
        env = "KAPSA_ALLOW_INTERNAL_GIT_HOSTS",
        default_value = "none",
        value_name = "LIST"
    )]
    allow_internal_git_hosts: kapsa_operator::git::HostPolicy,
    /// Pod Security Standard enforced in project namespaces whose DomainPool
    /// sets none (`spec.podSecurity`): restricted, baseline or privileged.
    #[arg(long, env = "KAPSA_POD_SECURITY", default_value = "restricted")]
    pod_security: PodSecurityLevel,
    /// Namespace of the host-ownership table (ConfigMap kapsa-host-owners)
    /// read by the ValidatingAdmissionPolicy of
    /// deploy/admission/host-ownership.yaml. Default: the lease namespace.
    #[arg(long, env = "KAPSA_HOST_OWNERS_NAMESPACE")]
    host_owners_namespace: Option<String>,
    /// Poll every repository at least this often, whatever its
    /// `pollInterval` (which the CRD bounds at 10s or more), e.g. `2s`. For
    /// development and tests; unset honours each Project's interval.
    #[arg(long, env = "KAPSA_MAX_POLL_INTERVAL", value_parser = parse_interval)]
    max_poll_interval: Option<Duration>,
    /// The longest a Project, Environment or DomainPool at rest goes
    /// without a reconcile (a safety net: changes are watched; a reconcile
    /// at rest reads caches only and writes nothing), e.g. `10m`.
    #[arg(long, env = "KAPSA_RESYNC_PERIOD", default_value = "10m", value_parser = parse_resync_period)]
    resync_period: Duration,
    /// The image of Dockerfile build Jobs: rootless BuildKit, run with
    /// `buildctl-daemonless.sh` (a mirror of the upstream image, or a
    /// pinned digest, in production).
    #[arg(
        long,
        env = "KAPSA_BUILDKIT_IMAGE",
        default_value = kapsa_operator::resources::environment::DEFAULT_BUILDKIT_IMAGE
    )]
    buildkit_image: String,
    /// Node labels Dockerfile build Pods must match, `key=value`
    /// (repeatable, or comma-separated), e.g. `node-pool=builds` for nodes
    /// set aside for builds. Default: any node.
    #[arg(long, env = "KAPSA_BUILD_NODE_SELECTOR", value_delimiter = ',', value_parser = parse_label)]
    build_node_selector: Vec<(String, String)>,
    /// A taint Dockerfile build Pods tolerate, as `kubectl taint` writes
    /// it: `key=value:Effect`, `key:Effect` (any value) or `key=value` (any
    /// effect); repeatable, or comma-separated.
    #[arg(long, env = "KAPSA_BUILD_TOLERATIONS", value_delimiter = ',', value_parser = parse_toleration)]
    build_toleration: Vec<Toleration>,
    /// Use registries with `insecure: true` (plain HTTP, or a certificate
    /// nobody checks) that are not on loopback. Off by default: builds
    /// would send push credentials across the network unprotected, and a
    /// tenant's namespaced Registry could ask for that.
    #[arg(long, env = "KAPSA_ALLOW_INSECURE_REGISTRIES")]
    allow_insecure_registries: bool,
    /// Keep no host-ownership table (when that policy is not installed).
    #[arg(long)]
    no_host_owners: bool,
    /// Log as human-readable text instead of JSON.
    #[arg(long)]
    text_logs: bool,
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not key=value"))?;
    if key.is_empty() {
        return Err(format!("{text:?} has no key"));
    }
    Ok((key.to_string(), value.to_string()))
}

fn parse_toleration(text: &str) -> Result<Toleration, String> {
    let (rest, effect) = match text.rsplit_once(':') {
        Some((rest, effect)) => {
            if !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect) {
                return Err(format!(
                    "{text:?}: the effect is NoSchedule, PreferNoSchedule or NoExecute"
                ));
            }
            (rest, Some(effect.to_string()))
        }
        None => (text, None),
    };
    let (key, value) = match rest.split_once('=') {
        Some((key, value)) => (key, Some(value.to_string())),
        None => (rest, None),
    };
    if key.is_empty() {
        return Err(format!("{text:?} has no key"));
    }
    Ok(Toleration {
        key: Some(key.to_string()),
        operator: Some(if value.is_some() { "Equal" } else { "Exists" }.to_string()),
        value,
        effect,
        ..Toleration::default()
    })
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    kapsa_api::duration::parse(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a duration such as 2s, 500ms or 1m"))
}

/// A resync period: 10 s or more (shorter would make a fleet at rest cost
/// real CPU).
fn parse_resync_period(text: &str) -> Result<Duration, String> {
    let period = parse_interval(text)?;
    if period < Duration::from_secs(10) {
        return Err(format!("{text:?} is shorter than 10s"));
    }
    Ok(period)
}

pub fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let host_owners_namespace = (!args.no_host_owners).then(|| {
        args.host_owners_namespace
            .clone()
            .unwrap_or_else(|| args.lease_namespace.clone())
    });
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if args.text_logs {
        builder.init();
    } else {
        builder.json().flatten_event(true).init();
    }
    let identity = args
        .identity
        .unwrap_or_else(|| format!("kapsa-{}", std::process::id()));
    let lease = (!args.no_leader_election).then(|| {
        LeaseConfig::new(args.lease_namespace, "kapsa-operator", identity).with_timing(
            Duration::from_secs(args.lease_duration_seconds),
            Duration::from_secs(args.renew_deadline_seconds),
            Duration::from_secs(args.retry_period_seconds),
        )
    });
    if let Some(lease) = &lease {
        lease
            .validate()
            .map_err(|e| anyhow::anyhow!("leader election: {e}"))?;
    }
    let config = OperatorConfig {
        metrics_addr: Some(args.metrics_addr),
        lease: lease.clone(),
        concurrency: args.concurrency,
        allow_internal_git_hosts: args.allow_internal_git_hosts,
        pod_security: args.pod_security,
        host_owners_namespace,
        max_poll_interval: args.max_poll_interval,
        resync_period: args.resync_period,
        build_pods: BuildPods {
            image: args.buildkit_image,
            node_selector: args.build_node_selector.into_iter().collect(),
            tolerations: args.build_toleration,
        },
        allow_insecure_registries: args.allow_insecure_registries,
    };
    tokio::runtime::Runtime::new()?.block_on(async move {
        let client = kube::Client::try_default().await?;
        let shutdown = async {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
        };
        let result = run_operator(
            client.clone(),
            config,
            Arc::new(Metrics::default()),
            shutdown,
        )
        .await;
        // The controllers have stopped: give the lease up, so that another
        // replica takes over at once instead of waiting it out.
        if let Some(lease) = &lease {
            match tokio::time::timeout(lease.renew_deadline, release(&client, lease)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => tracing::warn!(%error, "releasing the lease failed"),
                Err(_) => tracing::warn!("releasing the lease timed out"),
            }
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_placement_flags_read_like_kubectl_taint() {
        assert_eq!(
            parse_label("node-pool=builds"),
            Ok(("node-pool".into(), "builds".into()))
        );
        assert!(parse_label("node-pool").is_err());
        assert!(parse_label("=builds").is_err());
        let t = parse_toleration("dedicated=builds:NoSchedule").unwrap();
        assert_eq!(
            (
                t.key.as_deref(),
                t.operator.as_deref(),
                t.value.as_deref(),
                t.effect.as_deref()
            ),
            (
                Some("dedicated"),
                Some("Equal"),
                Some("builds"),
                Some("NoSchedule")
            )
        );
        let t = parse_toleration("kapsa.dev/real-node:NoSchedule").unwrap();
        assert_eq!(
            (
                t.key.as_deref(),
                t.operator.as_deref(),
                t.value,
                t.effect.as_deref()
            ),
            (
                Some("kapsa.dev/real-node"),
                Some("Exists"),
                None,
                Some("NoSchedule")
            )
        );
        let t = parse_toleration("dedicated=builds").unwrap();
        assert_eq!((t.operator.as_deref(), t.effect), (Some("Equal"), None));
        assert!(parse_toleration("dedicated=builds:Sometimes").is_err());
        assert!(parse_toleration(":NoSchedule").is_err());
    }

    #[test]
    fn the_default_resync_period_is_the_operators() {
        use clap::Args;
        let command = OperatorArgs::augment_args(clap::Command::new("operator"));
        let default = command
            .get_arguments()
            .find(|a| a.get_id() == "resync_period")
            .and_then(|a| a.get_default_values().first())
            .and_then(|v| v.to_str())
            .expect("--resync-period has a default");
        assert_eq!(
            parse_resync_period(default),
            Ok(kapsa_operator::controllers::RESYNC)
        );
    }

    #[test]
    fn resync_period_is_ten_seconds_or_more() {
        assert_eq!(parse_resync_period("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_resync_period("30s"), Ok(Duration::from_secs(30)));
        assert!(parse_resync_period("5s").is_err());
        assert!(parse_resync_period("0s").is_err());
        assert!(parse_resync_period("soon").is_err());
    }
}

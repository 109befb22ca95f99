//! `kapsa operator`: the operator process, with JSON logs, metrics and leader
//! election.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use kapsa_operator::leader::LeaseConfig;
use kapsa_operator::metrics::Metrics;
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
    /// Reconciles running at once, per controller.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// Log as human-readable text instead of JSON.
    #[arg(long)]
    text_logs: bool,
}

pub fn run(args: OperatorArgs) -> anyhow::Result<()> {
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
    let config = OperatorConfig {
        metrics_addr: Some(args.metrics_addr),
        lease: (!args.no_leader_election).then(|| LeaseConfig {
            namespace: args.lease_namespace,
            name: "kapsa-operator".into(),
            identity,
            duration: Duration::from_secs(15),
        }),
        concurrency: args.concurrency,
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
        run_operator(client, config, Arc::new(Metrics::default()), shutdown).await
    })
}

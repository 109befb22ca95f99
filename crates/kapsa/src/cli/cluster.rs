//! The cluster a verb talks to: the kubeconfig's current context (or
//! `--context`), or the in-cluster configuration inside a Pod.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use kube::Client;
use kube::config::{Config, KubeConfigOptions, Kubeconfig, KubeconfigError};

use super::error::{CliError, EXIT_UNREACHABLE};

/// How long to wait for the API server to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Flags that choose the cluster, shared by every verb that talks to one.
#[derive(Args, Clone, Debug, Default)]
pub struct ClusterArgs {
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
    /// Path of the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

/// A client and what to tell a person about where it points.
pub struct Cluster {
    pub client: Client,
    /// The API server's URL.
    pub server: String,
    /// The kubeconfig context in use, if any (none in a Pod).
    pub context: Option<String>,
}

impl Cluster {
    /// ` (context "NAME")`, or nothing without a context.
    pub fn context_note(&self) -> String {
        self.context
            .as_deref()
            .map(|c| format!(" (context \"{c}\")"))
            .unwrap_or_default()
    }
}

/// Builds the client for `args`. Only reads files: no request is sent yet,
/// so an unreachable server shows up on the first request (and is
/// explained there, see [`super::error::explain`]).
pub async fn connect(args: &ClusterArgs) -> anyhow::Result<Cluster> {
    connect_with(args, Some(CONNECT_TIMEOUT), true).await
}

/// [`connect`] for long-lived requests (`logs -f`): no read timeout.
pub async fn connect_streaming(args: &ClusterArgs) -> anyhow::Result<Cluster> {
    connect_with(args, Some(CONNECT_TIMEOUT), false).await
}

async fn connect_with(
    args: &ClusterArgs,
    connect_timeout: Option<Duration>,
    read_timeout: bool,
) -> anyhow::Result<Cluster> {
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let kubeconfig = match &args.kubeconfig {
        Some(path) => Some(Kubeconfig::read_from(path).map_err(|e| {
            CliError::failure(format!(
                "cannot read the kubeconfig {}: {e}",
                path.display()
            ))
        })?),
        None => match Kubeconfig::read() {
            Ok(kubeconfig) => Some(kubeconfig),
            Err(KubeconfigError::FindPath) => None,
            Err(KubeconfigError::ReadConfig(_, path)) if !path.exists() => None,
            Err(e) => {
                return Err(CliError::failure(format!(
                    "cannot read your kubeconfig: {e}. Fix the file named by $KUBECONFIG \
                     (or ~/.kube/config), or name another with --kubeconfig."
                ))
                .into());
            }
        },
    };
    let (mut config, context) = match kubeconfig {
        Some(kubeconfig) => {
            let context = args
                .context
                .clone()
                .or_else(|| kubeconfig.current_context.clone());
            if let Some(wanted) = &args.context
                && !kubeconfig.contexts.iter().any(|c| &c.name == wanted)
            {
                let known: Vec<&str> = kubeconfig
                    .contexts
                    .iter()
                    .map(|c| c.name.as_str())
                    .collect();
                return Err(CliError::failure(format!(
                    "no context \"{wanted}\" in your kubeconfig; its contexts are: {}. See \
                     `kubectl config get-contexts`.",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
                .into());
            }
            let config = Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| {
                    CliError::failure(format!(
                        "cannot use your kubeconfig{}: {e}. Check it with `kubectl config view \
                         --minify`, or pick another context with --context NAME.",
                        context
                            .as_deref()
                            .map(|c| format!(" (context \"{c}\")"))
                            .unwrap_or_default()
                    ))
                })?;
            (config, context)
        }
        None => match Config::incluster() {
            Ok(config) => (config, None),
            Err(_) => {
                let looked_at = match std::env::var_os("KUBECONFIG") {
                    Some(path) if !path.is_empty() => format!(
                        "$KUBECONFIG names {}, which does not exist",
                        path.to_string_lossy()
                    ),
                    _ => "$KUBECONFIG is unset and ~/.kube/config does not exist".to_string(),
                };
                return Err(CliError::new(
                    EXIT_UNREACHABLE,
                    format!(
                        "no cluster configured: no kubeconfig was found ({looked_at}) and this \
                         is not a Pod. Point KUBECONFIG at your cluster's kubeconfig, or start a \
                         local cluster with `kapsa dev up`."
                    ),
                )
                .into());
            }
        },
    };
    config.connect_timeout = connect_timeout;
    if !read_timeout {
        config.read_timeout = None;
    }
    let server = config.cluster_url.to_string();
    let server = server.trim_end_matches('/').to_string();
    let client = Client::try_from(config).map_err(|e| {
        CliError::failure(format!(
            "cannot set up a client for {server}: {e}. Check the certificates of your \
             kubeconfig's cluster and user."
        ))
    })?;
    Ok(Cluster {
        client,
        server,
        context,
    })
}

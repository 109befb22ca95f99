//! `kapsa open <project>`: print an Environment's URL, and open it in a
//! browser when one can be shown.

use std::io::IsTerminal;

use clap::Args;
use kapsa_api::Environment;
use kapsa_api::Project;
use kube::ResourceExt;
use serde::Serialize;

use super::cluster::{ClusterArgs, connect};
use super::error::CliError;
use super::lookup::{environments, pick_environment, project};
use super::output::{OutputArgs, OutputFormat, emit_line, print_structured};

#[derive(Args)]
pub struct OpenArgs {
    /// The Project's name.
    project: String,
    /// The Environment: its name (`production`, `preview-login`) or its
    /// branch (`feature/login`). Default: production.
    #[arg(short = 'e', long = "env", value_name = "ENV")]
    env: Option<String>,
    /// Only print the URL, never start a browser.
    #[arg(long)]
    no_browser: bool,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Serialize)]
struct Opened {
    project: String,
    environment: String,
    url: String,
}

/// The URL of `env`: its status, else the Project's summary of it, else
/// its host.
pub fn url_of(project: &Project, env: &Environment) -> Option<String> {
    let name = env.name_any();
    env.status
        .as_ref()
        .and_then(|s| s.url.clone())
        .or_else(|| {
            project.status.as_ref().and_then(|s| {
                s.environments
                    .iter()
                    .find(|e| e.name == name)
                    .and_then(|e| e.url.clone())
            })
        })
        .or_else(|| env.spec.host.as_ref().map(|h| format!("https://{h}")))
        .filter(|u| !u.is_empty())
}

/// A browser can be shown: stdout is a terminal (not a script) and, on
/// Linux and the BSDs, there is a graphical session.
fn browser_available() -> bool {
    if !std::io::stdout().is_terminal() {
        return false;
    }
    if cfg!(any(target_os = "macos", target_os = "windows")) {
        return true;
    }
    ["DISPLAY", "WAYLAND_DISPLAY", "BROWSER"]
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()))
}

pub async fn run(args: OpenArgs) -> anyhow::Result<()> {
    let cluster = connect(&args.cluster).await?;
    let project = project(&cluster, &args.project).await?;
    let envs = environments(&cluster, &project).await?;
    let env = pick_environment(&project, &envs, args.env.as_deref())?;
    let project_name = project.name_any();
    let Some(url) = url_of(&project, env) else {
        return Err(CliError::failure(format!(
            "Environment {} of project {project_name} has no URL yet (no host allocated). See why \
             with `kapsa status {project_name}`.",
            env.name_any()
        ))
        .into());
    };
    match args.output.output {
        OutputFormat::Table => emit_line(&url),
        format => print_structured(
            &Opened {
                project: project_name,
                environment: env.name_any(),
                url: url.clone(),
            },
            format,
        )?,
    }
    if !args.no_browser && args.output.output == OutputFormat::Table && browser_available() {
        // A browser is a convenience: failing to start one is not an error.
        if let Err(e) = webbrowser::open(&url) {
            eprintln!("(could not open a browser: {e})");
        }
    }
    Ok(())
}

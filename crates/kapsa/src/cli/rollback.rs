//! `kapsa rollback <project>` and `kapsa unpin <project>`: pin an
//! Environment to a release of its history (`spec.pin.release`), and remove
//! the pin. While pinned, new commits are built but not rolled out (the
//! operator's `Pinned` condition says what is held and what waits); the pin
//! is part of the Environment's spec, so it survives operator restarts.

use clap::Args;
use kapsa_api::Environment;
use kapsa_api::environment::Release;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;
use serde_json::json;

use super::cluster::{ClusterArgs, connect};
use super::error::{CliError, Request, explain};
use super::lookup::{environments, namespace_of, pick_environment, project};
use super::output::{OutputArgs, OutputFormat, emit_line, print_structured, short_commit};

#[derive(Args)]
pub struct RollbackArgs {
    /// The Project's name.
    project: String,
    /// The Environment: its name or its branch. Default: production.
    #[arg(short = 'e', long = "env", value_name = "ENV")]
    env: Option<String>,
    /// The release to run, by its number in the Environment's history
    /// (`kapsa status` lists them). Default: the release before the one
    /// that runs now.
    #[arg(long = "to", value_name = "N")]
    to: Option<i64>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Args)]
pub struct UnpinArgs {
    /// The Project's name.
    project: String,
    /// The Environment: its name or its branch. Default: production.
    #[arg(short = 'e', long = "env", value_name = "ENV")]
    env: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

#[derive(Serialize)]
struct Pinned {
    project: String,
    environment: String,
    /// The release now held, or none after `unpin`.
    release: Option<i64>,
    image: Option<String>,
    commit: Option<String>,
}

/// The release that runs now: the newest of the history whose image is
/// the one deployed.
fn current(history: &[Release], image: Option<&str>) -> Option<usize> {
    history.iter().position(|r| Some(r.image.as_str()) == image)
}

/// The release `rollback` pins: `--to N`, else the one before the release
/// that runs now (skipping releases of the same image, which change
/// nothing).
fn target(env: &Environment, to: Option<i64>) -> Result<&Release, String> {
    let (image, history) = match &env.status {
        Some(s) => (s.image.as_deref(), &s.history[..]),
        None => (None, &[][..]),
    };
    let numbers = || {
        let known: Vec<String> = history
            .iter()
            .filter_map(|r| r.number.map(|n| n.to_string()))
            .collect();
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    };
    if let Some(n) = to {
        return history.iter().find(|r| r.number == Some(n)).ok_or_else(|| {
            format!(
                "Environment {} has no release {n} (releases kept: {})",
                env.name_any(),
                numbers()
            )
        });
    }
    let now = current(history, image).unwrap_or(0);
    let running = history.get(now).map(|r| r.image.as_str());
    history
        .iter()
        .skip(now + 1)
        .find(|r| Some(r.image.as_str()) != running && r.number.is_some())
        .ok_or_else(|| {
            format!(
                "Environment {} has no earlier release to roll back to (releases kept: {}); \
                 name one with --to N",
                env.name_any(),
                numbers()
            )
        })
}

async fn patch_pin(
    cluster: &super::cluster::Cluster,
    env: &Environment,
    pin: serde_json::Value,
) -> anyhow::Result<()> {
    let api: Api<Environment> =
        Api::namespaced(cluster.client.clone(), &env.namespace().unwrap_or_default());
    // A merge patch of spec.pin only: the operator's server-side applies
    // own the rest of the spec and never this field.
    api.patch(
        &env.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"pin": pin}})),
    )
    .await
    .map_err(|e| explain(e, cluster, Request::new("patch", "environments.kapsa.dev")))?;
    Ok(())
}

pub async fn rollback(args: RollbackArgs) -> anyhow::Result<()> {
    let cluster = connect(&args.cluster).await?;
    let project = project(&cluster, &args.project).await?;
    let envs = environments(&cluster, &project).await?;
    let env = pick_environment(&project, &envs, args.env.as_deref())?;
    let release = target(env, args.to).map_err(CliError::not_found)?;
    let number = release.number.expect("target() returns numbered releases");
    patch_pin(&cluster, env, json!({"release": number, "image": null})).await?;
    let result = Pinned {
        project: project.name_any(),
        environment: env.name_any(),
        release: Some(number),
        image: Some(release.image.clone()),
        commit: release.commit.clone(),
    };
    match args.output.output {
        OutputFormat::Table => emit_line(&format!(
            "{}/{} pinned to release {number} (commit {}, {}). New commits are built but not \
             rolled out until `kapsa unpin {}{}`; follow it with `kapsa status {}`.",
            result.project,
            result.environment,
            short_commit(release.commit.as_deref()),
            release.image,
            result.project,
            env_flag(args.env.as_deref()),
            result.project
        )),
        format => print_structured(&result, format)?,
    }
    Ok(())
}

pub async fn unpin(args: UnpinArgs) -> anyhow::Result<()> {
    let cluster = connect(&args.cluster).await?;
    let project = project(&cluster, &args.project).await?;
    let envs = environments(&cluster, &project).await?;
    let env = pick_environment(&project, &envs, args.env.as_deref())?;
    let was = env.spec.pin.clone();
    if was.is_some() {
        patch_pin(&cluster, env, serde_json::Value::Null).await?;
    }
    let result = Pinned {
        project: project.name_any(),
        environment: env.name_any(),
        release: None,
        image: None,
        commit: None,
    };
    match args.output.output {
        OutputFormat::Table => emit_line(&match was {
            Some(_) => format!(
                "{}/{} unpinned: the newest build rolls out (namespace {}).",
                result.project,
                result.environment,
                namespace_of(&project)
            ),
            None => format!(
                "{}/{} was not pinned; nothing changed.",
                result.project, result.environment
            ),
        }),
        format => print_structured(&result, format)?,
    }
    Ok(())
}

fn env_flag(env: Option<&str>) -> String {
    env.map(|e| format!(" --env {e}")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(image: &str, history: &[(i64, &str)]) -> Environment {
        let history: Vec<_> = history
            .iter()
            .map(|(n, i)| json!({"number": n, "image": i, "deployedAt": "2026-01-01T00:00:00Z"}))
            .collect();
        serde_json::from_value(json!({
            "apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment",
            "metadata": {"name": "production", "namespace": "shop"},
            "spec": {"project": "shop", "type": "Production", "branch": "main"},
            "status": {"image": image, "history": history}
        }))
        .unwrap()
    }

    #[test]
    fn rollback_goes_to_the_release_before_the_running_one() {
        let e = env("img3", &[(3, "img3"), (2, "img2"), (1, "img1")]);
        assert_eq!(target(&e, None).unwrap().number, Some(2));
        assert_eq!(target(&e, Some(1)).unwrap().number, Some(1));
        assert!(
            target(&e, Some(9))
                .unwrap_err()
                .contains("releases kept: 3, 2, 1")
        );
        // Release 4 re-ran img2 (a rollback): the one before runs img3.
        let e = env(
            "img2",
            &[(4, "img2"), (3, "img3"), (2, "img2"), (1, "img1")],
        );
        assert_eq!(target(&e, None).unwrap().number, Some(3));
        let e = env("img1", &[(1, "img1")]);
        assert!(target(&e, None).unwrap_err().contains("no earlier release"));
    }
}

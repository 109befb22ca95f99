//! `kapsa projects`: every Project with its host, readiness, commit,
//! Environments and age.

use clap::Args;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::conditions::{READY, find_condition};
use kapsa_api::{EnvironmentType, Project};
use kube::ResourceExt;
use serde::Serialize;

use super::cluster::{ClusterArgs, connect};
use super::lookup::{list_projects, namespace_of};
use super::output::{
    OutputArgs, OutputFormat, age, emit, or_dash, print_structured, render, short_commit, table,
};

#[derive(Args)]
pub struct ProjectsArgs {
    /// Only the Project that owns this namespace.
    #[arg(short = 'n', long = "namespace", value_name = "NAMESPACE")]
    namespace: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// One Project, as `-o json|yaml` prints it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProjectRow {
    pub name: String,
    pub namespace: String,
    pub host: Option<String>,
    /// The Ready condition's status: `True`, `False` or `Unknown`.
    pub ready: String,
    /// The Ready condition's reason and message when it is not `True`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Head of the production branch.
    pub commit: Option<String>,
    pub environments: Vec<EnvironmentRow>,
    pub created: Option<Time>,
    pub age: String,
}

/// One Environment of a Project's status.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentRow {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: Option<EnvironmentType>,
    pub branch: Option<String>,
    pub commit: Option<String>,
    pub url: Option<String>,
    pub ready: bool,
}

pub fn row(project: &Project) -> ProjectRow {
    let status = project.status.clone().unwrap_or_default();
    let ready = find_condition(&status.conditions, READY);
    let ready_status = ready.map_or_else(|| "Unknown".to_string(), |c| format!("{:?}", c.status));
    let not_ok = ready.filter(|c| !c.is_true());
    ProjectRow {
        name: project.name_any(),
        namespace: namespace_of(project),
        host: status.host.clone(),
        ready: ready_status,
        reason: not_ok.map(|c| c.reason.clone()),
        message: not_ok.map(|c| c.message.clone()).filter(|m| !m.is_empty()),
        commit: status.latest_commit.clone(),
        environments: sorted(
            status
                .environments
                .iter()
                .map(|e| EnvironmentRow {
                    name: e.name.clone(),
                    type_: e.type_,
                    branch: e.branch.clone(),
                    commit: e.commit.clone(),
                    url: e.url.clone(),
                    ready: e.ready,
                })
                .collect::<Vec<_>>(),
        ),
        created: project.metadata.creation_timestamp.clone(),
        age: age(project.metadata.creation_timestamp.as_ref()),
    }
}

/// Production first, then by name.
fn sorted(mut environments: Vec<EnvironmentRow>) -> Vec<EnvironmentRow> {
    environments.sort_by(|a, b| {
        let production = |e: &EnvironmentRow| e.type_ != Some(EnvironmentType::Production);
        (production(a), &a.name).cmp(&(production(b), &b.name))
    });
    environments
}

fn environments_cell(row: &ProjectRow) -> String {
    let total = row.environments.len();
    let not_ready = row.environments.iter().filter(|e| !e.ready).count();
    if not_ready == 0 {
        total.to_string()
    } else {
        format!("{total} ({not_ready} not ready)")
    }
}

fn ready_cell(row: &ProjectRow) -> String {
    match &row.reason {
        Some(reason) => format!("{} ({reason})", row.ready),
        None => row.ready.clone(),
    }
}

pub fn render_table(rows: &[ProjectRow]) -> String {
    let mut t = table(["project", "host", "ready", "commit", "environments", "age"]);
    for row in rows {
        t.add_row([
            row.name.clone(),
            or_dash(row.host.as_deref()),
            ready_cell(row),
            short_commit(row.commit.as_deref()),
            environments_cell(row),
            row.age.clone(),
        ]);
    }
    render(&t)
}

pub async fn run(args: ProjectsArgs) -> anyhow::Result<()> {
    let cluster = connect(&args.cluster).await?;
    let rows: Vec<ProjectRow> = list_projects(&cluster)
        .await?
        .iter()
        .map(row)
        .filter(|r| args.namespace.as_deref().is_none_or(|ns| r.namespace == ns))
        .collect();
    match args.output.output {
        OutputFormat::Table if rows.is_empty() => {
            eprintln!(
                "No Projects{}{}. Create one with `kapsa create project NAME --git URL`.",
                args.namespace
                    .as_deref()
                    .map(|ns| format!(" own namespace {ns}"))
                    .unwrap_or_default(),
                cluster.context_note()
            );
            Ok(())
        }
        OutputFormat::Table => {
            emit(&render_table(&rows));
            Ok(())
        }
        format => print_structured(&rows, format),
    }
}

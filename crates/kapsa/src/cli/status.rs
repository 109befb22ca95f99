//! `kapsa status <project>`: the Project and each of its Environments, every
//! condition that is not OK with its reason and message, recent Events, and
//! the build in progress.

use std::collections::BTreeSet;

use clap::Args;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kapsa_api::external::{KPACK_GROUP, KPACK_VERSION, kpack_image};
use kapsa_api::{
    Condition, ConditionStatus, Environment, EnvironmentPhase, EnvironmentType, Project,
};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::{Client, ResourceExt};
use serde::Serialize;
use serde_json::Value;

use super::cluster::{Cluster, ClusterArgs, connect};
use super::error::{Request, explain, render as render_error};
use super::lookup::{build_namespace, environments, namespace_of, project as find_project};
use super::output::{
    OutputArgs, OutputFormat, age, emit, or_dash, print_structured, relative, render, short_commit,
    table,
};
use super::projects::{ProjectRow, row as project_row};

/// Label of the Environment a Kapsa object belongs to.
const ENVIRONMENT_LABEL: &str = "kapsa.dev/environment";
/// Label of the Project a Kapsa object belongs to.
const PROJECT_LABEL: &str = "kapsa.dev/project";
/// Label kpack puts on a Build (and its Pod): the Image it builds.
pub const KPACK_IMAGE_LABEL: &str = "image.kpack.io/image";
/// Condition types whose `True` is the news (the others are OK when `True`).
const TRUE_IS_NEWS: [&str; 2] = ["Stalled", "Degraded"];
/// Condition types worth showing whatever their status: `Pinned` True says
/// what is held back, False that a pin cannot be honoured.
const ALWAYS_NEWS: [&str; 1] = ["Pinned"];

#[derive(Args)]
pub struct StatusArgs {
    /// The Project's name.
    project: String,
    /// How many recent Events to show.
    #[arg(long, value_name = "N", default_value_t = 10)]
    events: usize,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// What `kapsa status -o json|yaml` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusReport {
    pub project: ProjectRow,
    pub git: GitRow,
    pub environments: Vec<EnvironmentStatus>,
    /// Every condition, of the Project or an Environment, that is not OK.
    pub not_ok: Vec<Problem>,
    /// Builds running now.
    pub builds: Vec<BuildInProgress>,
    /// The most recent Events of the Project and its Environments, oldest first.
    pub events: Vec<EventRow>,
    /// What the API server refused to show (403): `<resource> in <namespace>`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub not_shown: Vec<String>,
    /// Other reads that failed, explained.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Serialize)]
pub struct GitRow {
    pub url: String,
    pub branch: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EnvironmentStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub type_: EnvironmentType,
    pub branch: Option<String>,
    /// The commit deployed now.
    pub commit: Option<String>,
    /// The commit the Environment should run (`spec.commit`), when it differs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wanted_commit: Option<String>,
    pub image: Option<String>,
    pub phase: Option<EnvironmentPhase>,
    pub url: Option<String>,
    pub expires_at: Option<Time>,
    /// The release `spec.pin` holds, if pinned.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned_release: Option<i64>,
    /// Its release history, newest first (`kapsa rollback --to N`).
    pub releases: Vec<ReleaseRow>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRow {
    pub number: Option<i64>,
    pub commit: Option<String>,
    pub image: String,
    pub deployed_at: Time,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Problem {
    /// `Project/<name>` or `Environment/<name>`.
    pub object: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    pub reason: String,
    pub message: String,
    pub since: Time,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildInProgress {
    pub environment: String,
    /// `kpack Build`, `kpack Image` or `Job`.
    pub kind: String,
    pub name: String,
    pub commit: Option<String>,
    pub started: Option<Time>,
    pub age: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EventRow {
    pub object: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub reason: String,
    pub message: String,
    pub count: i32,
    pub last_seen: Option<Time>,
}

/// True when `condition` is worth a person's attention.
pub fn not_ok(condition: &Condition) -> bool {
    if ALWAYS_NEWS.contains(&condition.type_.as_str()) {
        true
    } else if TRUE_IS_NEWS.contains(&condition.type_.as_str()) {
        condition.status != ConditionStatus::False
    } else {
        condition.status != ConditionStatus::True
    }
}

fn problems(object: &str, conditions: &[Condition]) -> Vec<Problem> {
    conditions
        .iter()
        .filter(|c| not_ok(c))
        .map(|c| Problem {
            object: object.to_string(),
            type_: c.type_.clone(),
            status: c.status,
            reason: c.reason.clone(),
            message: c.message.clone(),
            since: c.last_transition_time.clone(),
        })
        .collect()
}

fn environment_status(env: &Environment) -> EnvironmentStatus {
    let status = env.status.clone().unwrap_or_default();
    let wanted = env
        .spec
        .commit
        .clone()
        .filter(|c| status.commit.as_ref() != Some(c));
    EnvironmentStatus {
        name: env.name_any(),
        type_: env.spec.type_,
        branch: env.spec.branch.clone(),
        commit: status.commit,
        wanted_commit: wanted,
        image: status.image,
        phase: status.phase,
        url: status.url,
        expires_at: env.spec.expires_at.clone(),
        pinned_release: env.spec.pin.as_ref().and_then(|p| p.release),
        releases: status
            .history
            .iter()
            .map(|r| ReleaseRow {
                number: r.number,
                commit: r.commit.clone(),
                image: r.image.clone(),
                deployed_at: r.deployed_at.clone(),
            })
            .collect(),
    }
}

/// The kpack `Build` kind (`kpack.io/v1alpha2`, plural `builds`): one per
/// build an Image runs.
fn kpack_build() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(KPACK_GROUP, KPACK_VERSION, "Build"),
        "builds",
    )
}

fn condition_status<'a>(object: &'a Value, type_: &str) -> Option<&'a str> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?["status"]
        .as_str()
}

fn condition_time(object: &Value, type_: &str) -> Option<Time> {
    let time = object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)?["lastTransitionTime"]
        .as_str()?;
    time.parse().ok().map(Time)
}

/// What `status` could not read: refused (403) reads by resource and
/// namespace, and other failures explained.
#[derive(Default)]
pub struct Notes {
    hidden: Vec<String>,
    other: Vec<String>,
}

impl Notes {
    /// Records that listing `resource` in `namespace` failed with `err`.
    fn failed(&mut self, cluster: &Cluster, err: kube::Error, resource: &str, namespace: &str) {
        match err {
            kube::Error::Api(s) if s.code == 403 => {
                self.hidden.push(format!("{resource} in {namespace}"));
            }
            e => self.other.push(render_error(&explain(
                e,
                cluster,
                Request::new("list", resource),
            ))),
        }
    }
}

/// Lists `resource` in `namespace`; `Ok(None)` when the cluster does not
/// serve it (kpack not installed).
async fn list_dynamic(
    cluster: &Cluster,
    namespace: &str,
    resource: &ApiResource,
    notes: &mut Notes,
) -> Option<Vec<DynamicObject>> {
    let api: Api<DynamicObject> = Api::namespaced_with(cluster.client.clone(), namespace, resource);
    match api.list(&ListParams::default()).await {
        Ok(list) => Some(list.items),
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => {
            let plural = format!("{}.{}", resource.plural, resource.group);
            notes.failed(cluster, e, &plural, namespace);
            None
        }
    }
}

/// Builds running now in the project's namespace and its build namespace:
/// kpack Builds, kpack Images whose build runs (when the cluster has no
/// Build objects to show), and Jobs (Dockerfile builds).
async fn builds(
    cluster: &Cluster,
    project: &str,
    namespace: &str,
    notes: &mut Notes,
) -> anyhow::Result<Vec<BuildInProgress>> {
    let mut found = Vec::new();
    for namespace in [namespace.to_string(), build_namespace(project)] {
        builds_in(cluster, project, &namespace, notes, &mut found).await?;
    }
    Ok(found)
}

async fn builds_in(
    cluster: &Cluster,
    project: &str,
    namespace: &str,
    notes: &mut Notes,
    found: &mut Vec<BuildInProgress>,
) -> anyhow::Result<()> {
    let mut images_with_builds = BTreeSet::new();
    if let Some(list) = list_dynamic(cluster, namespace, &kpack_build(), notes).await {
        for build in list {
            let value = serde_json::to_value(&build)?;
            let running = !matches!(
                condition_status(&value, "Succeeded"),
                Some("True" | "False")
            );
            if !running {
                continue;
            }
            let image = build.labels().get(KPACK_IMAGE_LABEL).cloned();
            images_with_builds.extend(image.clone());
            found.push(BuildInProgress {
                environment: build
                    .labels()
                    .get(ENVIRONMENT_LABEL)
                    .cloned()
                    .or(image)
                    .unwrap_or_else(|| "-".into()),
                kind: "kpack Build".into(),
                name: build.name_any(),
                commit: value["spec"]["source"]["git"]["revision"]
                    .as_str()
                    .map(String::from),
                age: age(build.metadata.creation_timestamp.as_ref()),
                started: build.metadata.creation_timestamp.clone(),
            });
        }
    }
    if let Some(list) = list_dynamic(cluster, namespace, &kpack_image(), notes).await {
        for image in list {
            if images_with_builds.contains(&image.name_any()) {
                continue;
            }
            let value = serde_json::to_value(&image)?;
            let generation = image.metadata.generation;
            let observed = value["status"]["observedGeneration"].as_i64();
            let ready = condition_status(&value, "Ready");
            let running = ready.is_none_or(|s| s == "Unknown") || observed < generation;
            if !running {
                continue;
            }
            let started = condition_time(&value, "Ready")
                .filter(|_| observed == generation)
                .or_else(|| image.metadata.creation_timestamp.clone());
            found.push(BuildInProgress {
                environment: image
                    .labels()
                    .get(ENVIRONMENT_LABEL)
                    .cloned()
                    .unwrap_or_else(|| image.name_any()),
                kind: "kpack Image".into(),
                name: image.name_any(),
                commit: value["spec"]["source"]["git"]["revision"]
                    .as_str()
                    .map(String::from),
                age: age(started.as_ref()),
                started,
            });
        }
    }
    let jobs: Api<Job> = Api::namespaced(cluster.client.clone(), namespace);
    match jobs
        .list(&ListParams::default().labels(&format!("{PROJECT_LABEL}={project}")))
        .await
    {
        Ok(list) => {
            for job in list.items {
                let status = job.status.clone().unwrap_or_default();
                let finished = status.completion_time.is_some()
                    || status.conditions.iter().flatten().any(|c| {
                        (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True"
                    });
                if finished {
                    continue;
                }
                let started = status
                    .start_time
                    .clone()
                    .or_else(|| job.metadata.creation_timestamp.clone());
                found.push(BuildInProgress {
                    environment: job
                        .labels()
                        .get(ENVIRONMENT_LABEL)
                        .cloned()
                        .unwrap_or_else(|| "-".into()),
                    kind: "Job".into(),
                    name: job.name_any(),
                    commit: job.labels().get("app.kubernetes.io/version").cloned(),
                    age: age(started.as_ref()),
                    started,
                });
            }
        }
        Err(e) => notes.failed(cluster, e, "jobs.batch", namespace),
    }
    Ok(())
}

fn event_time(event: &Event) -> Option<Time> {
    event
        .series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref())
        .map(|t| Time(t.0))
        .or_else(|| event.last_timestamp.clone())
        .or_else(|| event.event_time.as_ref().map(|t| Time(t.0)))
        .or_else(|| event.first_timestamp.clone())
        .or_else(|| event.metadata.creation_timestamp.clone())
}

async fn list_events(api: Api<Event>, selector: &str) -> Result<Vec<Event>, kube::Error> {
    Ok(api
        .list(&ListParams::default().fields(selector))
        .await?
        .items)
}

/// The Events about the Project (kept in `default` for a cluster-scoped
/// object, but read from every namespace when allowed) and its Environments.
async fn events(
    cluster: &Cluster,
    project: &Project,
    namespace: &str,
    limit: usize,
    notes: &mut Notes,
) -> Vec<EventRow> {
    let client: &Client = &cluster.client;
    let name = project.name_any();
    let project_selector = format!("involvedObject.kind=Project,involvedObject.name={name}");
    let mut all = Vec::new();
    let everywhere = list_events(Api::all(client.clone()), &project_selector).await;
    let project_events = match everywhere {
        Ok(list) => Ok(list),
        Err(kube::Error::Api(s)) if s.code == 403 => {
            list_events(
                Api::namespaced(client.clone(), "default"),
                &project_selector,
            )
            .await
        }
        Err(e) => Err(e),
    };
    match project_events {
        Ok(list) => all.extend(list),
        Err(e) => notes.failed(cluster, e, "events", "default"),
    }
    match list_events(
        Api::namespaced(client.clone(), namespace),
        "involvedObject.kind=Environment",
    )
    .await
    {
        Ok(list) => all.extend(list),
        Err(e) => notes.failed(cluster, e, "events", namespace),
    }
    let mut rows: Vec<EventRow> = all
        .into_iter()
        .filter(|e| {
            e.involved_object
                .api_version
                .as_deref()
                .is_none_or(|v| v.starts_with("kapsa.dev/"))
        })
        .map(|e| EventRow {
            object: format!(
                "{}/{}",
                e.involved_object.kind.clone().unwrap_or_default(),
                e.involved_object.name.clone().unwrap_or_default()
            ),
            type_: e.type_.clone().unwrap_or_else(|| "Normal".into()),
            reason: e.reason.clone().unwrap_or_default(),
            message: e
                .message
                .clone()
                .unwrap_or_default()
                .trim()
                .replace('\n', " "),
            count: e
                .series
                .as_ref()
                .and_then(|s| s.count)
                .or(e.count)
                .unwrap_or(1)
                .max(1),
            last_seen: event_time(&e),
        })
        .collect();
    rows.sort_by_key(|r| r.last_seen.as_ref().map(|t| t.0));
    let skip = rows.len().saturating_sub(limit);
    rows.drain(..skip);
    rows
}

pub async fn report(cluster: &Cluster, name: &str, limit: usize) -> anyhow::Result<StatusReport> {
    let project = find_project(cluster, name).await?;
    let namespace = namespace_of(&project);
    let environments = environments(cluster, &project).await?;
    let mut notes = Notes::default();
    let mut not_ok = problems(
        &format!("Project/{name}"),
        project
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default(),
    );
    for env in &environments {
        not_ok.extend(problems(
            &format!("Environment/{}", env.name_any()),
            env.status
                .as_ref()
                .map(|s| s.conditions.as_slice())
                .unwrap_or_default(),
        ));
    }
    let builds = builds(cluster, name, &namespace, &mut notes).await?;
    let events = events(cluster, &project, &namespace, limit, &mut notes).await;
    Ok(StatusReport {
        project: project_row(&project),
        git: GitRow {
            url: project.spec.source.git.url.clone(),
            branch: project.spec.source.git.branch.clone(),
        },
        environments: environments.iter().map(environment_status).collect(),
        not_ok,
        builds,
        events,
        not_shown: notes.hidden,
        notes: notes.other,
    })
}

fn commit_cell(env: &EnvironmentStatus) -> String {
    match &env.wanted_commit {
        Some(wanted) => format!(
            "{} -> {}",
            short_commit(env.commit.as_deref()),
            short_commit(Some(wanted))
        ),
        None => short_commit(env.commit.as_deref()),
    }
}

pub fn render_report(report: &StatusReport) -> String {
    let p = &report.project;
    let mut out = String::new();
    let ready = match &p.reason {
        Some(reason) => format!("{} ({reason})", p.ready),
        None => p.ready.clone(),
    };
    for (key, value) in [
        ("Project", p.name.clone()),
        ("Namespace", p.namespace.clone()),
        ("Host", or_dash(p.host.as_deref())),
        (
            "Git",
            format!("{} (branch {})", report.git.url, report.git.branch),
        ),
        ("Commit", short_commit(p.commit.as_deref())),
        ("Ready", ready),
        ("Age", p.age.clone()),
    ] {
        out.push_str(&format!("{:<11}{value}\n", format!("{key}:")));
    }

    out.push('\n');
    if report.environments.is_empty() {
        out.push_str("Environments: none yet.\n");
    } else {
        out.push_str("Environments:\n");
        let mut t = table([
            "environment",
            "type",
            "branch",
            "commit",
            "phase",
            "url",
            "expires",
        ]);
        for env in &report.environments {
            t.add_row([
                env.name.clone(),
                format!("{:?}", env.type_),
                or_dash(env.branch.as_deref()),
                commit_cell(env),
                env.phase
                    .map_or_else(|| "-".to_string(), |ph| format!("{ph:?}")),
                or_dash(env.url.as_deref()),
                env.expires_at
                    .as_ref()
                    .map_or_else(|| "-".to_string(), relative),
            ]);
        }
        out.push_str(&indent(&render(&t)));
    }

    out.push('\n');
    for env in report
        .environments
        .iter()
        .filter(|e| !e.releases.is_empty())
    {
        out.push_str(&format!("Releases of {}:\n", env.name));
        let mut t = table(["release", "commit", "image", "deployed", ""]);
        for (i, release) in env.releases.iter().enumerate() {
            let mut notes = Vec::new();
            if i == 0 && env.image.as_deref() == Some(release.image.as_str()) {
                notes.push("running");
            }
            if release.number.is_some() && release.number == env.pinned_release {
                notes.push("pinned");
            }
            t.add_row([
                release
                    .number
                    .map_or_else(|| "-".to_string(), |n| format!("v{n}")),
                short_commit(release.commit.as_deref()),
                release.image.clone(),
                relative(&release.deployed_at),
                notes.join(", "),
            ]);
        }
        out.push_str(&indent(&render(&t)));
        out.push('\n');
    }

    if report.builds.is_empty() {
        out.push_str("Build in progress: none.\n");
    } else {
        out.push_str("Build in progress:\n");
        let mut t = table(["environment", "kind", "name", "commit", "age"]);
        for build in &report.builds {
            t.add_row([
                build.environment.clone(),
                build.kind.clone(),
                build.name.clone(),
                short_commit(build.commit.as_deref()),
                build.age.clone(),
            ]);
        }
        out.push_str(&indent(&render(&t)));
    }

    out.push('\n');
    if report.not_ok.is_empty() {
        out.push_str("Conditions: all OK.\n");
    } else {
        out.push_str("Conditions not OK:\n");
        for problem in &report.not_ok {
            out.push_str(&format!(
                "  {} {}={:?} {} ({}): {}\n",
                problem.object,
                problem.type_,
                problem.status,
                problem.reason,
                relative(&problem.since),
                if problem.message.is_empty() {
                    "no message"
                } else {
                    &problem.message
                }
            ));
        }
    }

    out.push('\n');
    if report.events.is_empty() {
        out.push_str("Events: none recent.\n");
    } else {
        out.push_str("Events:\n");
        let mut t = table(["last seen", "type", "reason", "object", "message"]);
        for event in &report.events {
            let seen = age(event.last_seen.as_ref());
            t.add_row([
                if event.count > 1 {
                    format!("{seen} (x{})", event.count)
                } else {
                    seen
                },
                event.type_.clone(),
                event.reason.clone(),
                event.object.clone(),
                event.message.clone(),
            ]);
        }
        out.push_str(&indent(&render(&t)));
    }
    if !report.not_shown.is_empty() {
        out.push_str(&format!(
            "\nNot shown (no permission to list): {}. Check with `kubectl auth can-i list \
             RESOURCE -n NAMESPACE`.\n",
            report.not_shown.join(", ")
        ));
    }
    for note in &report.notes {
        out.push_str(&format!("\nNote: {note}\n"));
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let cluster = connect(&args.cluster).await?;
    let report = report(&cluster, &args.project, args.events).await?;
    match args.output.output {
        OutputFormat::Table => {
            emit(&render_report(&report));
            Ok(())
        }
        format => print_structured(&report, format),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition(type_: &str, status: ConditionStatus) -> Condition {
        Condition::new(
            type_,
            status,
            "Reason",
            "",
            None,
            Time("2026-01-01T00:00:00Z".parse().unwrap()),
        )
    }

    #[test]
    fn ok_means_true_except_where_true_is_the_news() {
        assert!(!not_ok(&condition("Ready", ConditionStatus::True)));
        assert!(not_ok(&condition("Ready", ConditionStatus::False)));
        assert!(not_ok(&condition("Built", ConditionStatus::Unknown)));
        assert!(not_ok(&condition("Pinned", ConditionStatus::True)));
        assert!(not_ok(&condition("Pinned", ConditionStatus::False)));
        assert!(!not_ok(&condition("Stalled", ConditionStatus::False)));
    }
}

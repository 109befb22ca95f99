//! Finding a Project and its Environments by name, with suggestions when
//! the name is wrong.

use kapsa_api::naming::PRODUCTION_ENVIRONMENT_NAME;
use kapsa_api::{Environment, EnvironmentType, Project};
use kube::ResourceExt;
use kube::api::{Api, ListParams};

use super::cluster::Cluster;
use super::error::{CliError, Request, explain};

pub const PROJECTS: Request<'static> = Request::new("list", "projects.kapsa.dev");
pub const ENVIRONMENTS: Request<'static> = Request::new("list", "environments.kapsa.dev");

/// Every Project of the cluster.
pub async fn list_projects(cluster: &Cluster) -> anyhow::Result<Vec<Project>> {
    let api: Api<Project> = Api::all(cluster.client.clone());
    let mut projects = api
        .list(&ListParams::default())
        .await
        .map_err(|e| explain(e, cluster, PROJECTS))?
        .items;
    projects.sort_by_key(|p| p.name_any());
    Ok(projects)
}

/// The Project `name`, or an error that names the closest ones.
pub async fn project(cluster: &Cluster, name: &str) -> anyhow::Result<Project> {
    let api: Api<Project> = Api::all(cluster.client.clone());
    if let Some(project) = api
        .get_opt(name)
        .await
        .map_err(|e| explain(e, cluster, Request::new("get", "projects.kapsa.dev")))?
    {
        return Ok(project);
    }
    // Listing tells a missing Project from missing CRDs (a 404 either way
    // for the get) and gives the names to suggest.
    let names: Vec<String> = list_projects(cluster)
        .await?
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    let message = if names.is_empty() {
        format!(
            "project \"{name}\" not found: there is no Project in this cluster{}. Create one \
             with `kapsa create project NAME --git URL`.",
            cluster.context_note()
        )
    } else {
        format!(
            "project \"{name}\" not found{}.{} List them all with `kapsa projects`.",
            cluster.context_note(),
            did_you_mean(name, &names)
        )
    };
    Err(CliError::not_found(message).into())
}

/// The namespace a Project owns.
pub fn namespace_of(project: &Project) -> String {
    project
        .status
        .as_ref()
        .and_then(|s| s.namespace.clone())
        .or_else(|| project.spec.namespace.clone())
        .unwrap_or_else(|| project.name_any())
}

/// The namespace a Project's builds run in: `kapsa-build-<project>`, where
/// the operator keeps the registry's push credentials out of the tenants'
/// reach ([`kapsa_api::naming::build_namespace`]).
pub fn build_namespace(project: &str) -> String {
    kapsa_api::naming::build_namespace(project)
}

/// The Environments of `project`, production first, then by name.
pub async fn environments(
    cluster: &Cluster,
    project: &Project,
) -> anyhow::Result<Vec<Environment>> {
    let namespace = namespace_of(project);
    let api: Api<Environment> = Api::namespaced(cluster.client.clone(), &namespace);
    let name = project.name_any();
    let mut environments: Vec<Environment> = api
        .list(&ListParams::default())
        .await
        .map_err(|e| explain(e, cluster, ENVIRONMENTS))?
        .items
        .into_iter()
        .filter(|e| e.spec.project == name)
        .collect();
    environments.sort_by_key(|e| {
        (
            e.spec.type_ != EnvironmentType::Production,
            e.name_any() != PRODUCTION_ENVIRONMENT_NAME,
            e.name_any(),
        )
    });
    Ok(environments)
}

/// The Environment `wanted` names among `environments`: by name (`production`,
/// `preview-login`), or by branch (`feature/login`). Without `wanted`, the
/// production Environment.
pub fn pick_environment<'a>(
    project: &Project,
    environments: &'a [Environment],
    wanted: Option<&str>,
) -> anyhow::Result<&'a Environment> {
    let project_name = project.name_any();
    let Some(wanted) = wanted else {
        return environments
            .iter()
            .find(|e| e.spec.type_ == EnvironmentType::Production)
            .ok_or_else(|| {
                CliError::not_found(format!(
                    "project \"{project_name}\" has no production Environment yet{}. See why \
                     with `kapsa status {project_name}`.",
                    listed(environments)
                ))
                .into()
            });
    };
    if let Some(env) = environments.iter().find(|e| e.name_any() == wanted) {
        return Ok(env);
    }
    if let Some(env) = environments
        .iter()
        .find(|e| e.spec.branch.as_deref() == Some(wanted))
    {
        return Ok(env);
    }
    let mut names: Vec<String> = environments.iter().map(ResourceExt::name_any).collect();
    names.extend(environments.iter().filter_map(|e| e.spec.branch.clone()));
    Err(CliError::not_found(format!(
        "project \"{project_name}\" has no Environment \"{wanted}\".{}{}",
        did_you_mean(wanted, &names),
        listed(environments)
    ))
    .into())
}

fn listed(environments: &[Environment]) -> String {
    if environments.is_empty() {
        " It has no Environment at all yet.".to_string()
    } else {
        format!(
            " Its Environments: {}.",
            environments
                .iter()
                .map(ResourceExt::name_any)
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

/// ` Did you mean "a" or "b"?`, or nothing when no name is close.
pub fn did_you_mean(wanted: &str, names: &[String]) -> String {
    let close = suggestions(wanted, names);
    match close.as_slice() {
        [] => String::new(),
        [one] => format!(" Did you mean \"{one}\"?"),
        many => {
            let quoted: Vec<String> = many.iter().map(|n| format!("\"{n}\"")).collect();
            let (last, rest) = quoted.split_last().expect("at least two");
            format!(" Did you mean {} or {last}?", rest.join(", "))
        }
    }
}

/// Up to three names close to `wanted`: a small edit distance, or one
/// containing the other; closest first.
pub fn suggestions(wanted: &str, names: &[String]) -> Vec<String> {
    let limit = (wanted.chars().count() / 3).max(2);
    let mut scored: Vec<(usize, &String)> = names
        .iter()
        .filter(|n| n.as_str() != wanted)
        .filter_map(|name| {
            let distance = strsim::damerau_levenshtein(wanted, name);
            let contains =
                name.contains(wanted) || (wanted.len() >= 3 && wanted.contains(name.as_str()));
            (distance <= limit || contains).then_some((distance, name))
        })
        .collect();
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(3).map(|(_, n)| n.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn close_names_are_suggested_closest_first() {
        let all = names(&["shop", "blog", "shop-api", "inventory"]);
        assert_eq!(suggestions("shpo", &all), names(&["shop"]));
        assert_eq!(suggestions("shop-ap", &all), names(&["shop-api", "shop"]));
        assert_eq!(suggestions("invntory", &all), names(&["inventory"]));
        assert!(suggestions("zzzzzz", &all).is_empty());
    }

    #[test]
    fn did_you_mean_reads_as_a_sentence() {
        assert_eq!(did_you_mean("x", &[]), "");
        assert_eq!(
            did_you_mean("shpo", &names(&["shop"])),
            " Did you mean \"shop\"?"
        );
        assert_eq!(
            did_you_mean("ab", &names(&["abc", "abd", "xab"])),
            " Did you mean \"abc\", \"abd\" or \"xab\"?"
        );
    }
}

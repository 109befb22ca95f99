//! `kapsa create project NAME --git URL …`: writes a Project manifest and
//! applies it (server-side apply, field manager `kapsa-cli`); `--dry-run`
//! only prints it.

use clap::{Args, Subcommand, ValueEnum};
use kapsa_api::naming::{MAX_PROJECT_NAME_LEN, is_dns_label};
use kapsa_api::{ClusterRegistry, Project};
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::{Value, json};

use super::cluster::{Cluster, ClusterArgs, connect};
use super::error::{CliError, Request, explain};
use super::output::{emit, emit_line};

/// Field manager of everything the CLI applies.
pub const FIELD_MANAGER: &str = "kapsa-cli";

#[derive(Subcommand)]
pub enum CreateCommand {
    /// Create (or update) a Project: a git repository that Kapsa builds,
    /// deploys and previews. Prints the YAML it applies.
    Project(CreateProjectArgs),
}

#[derive(Args)]
pub struct CreateProjectArgs {
    /// The Project's name: a DNS label of at most 40 characters (it becomes
    /// the first label of its host and, by default, its namespace).
    name: String,
    /// URL of the git repository (https://, ssh:// or git@host:path).
    #[arg(long, value_name = "URL")]
    git: String,
    /// The production branch (default: main).
    #[arg(long, value_name = "BRANCH")]
    branch: Option<String>,
    /// The DomainPool the host comes from (default: the pool marked default).
    #[arg(long, value_name = "POOL")]
    pool: Option<String>,
    /// Where images are pushed: `ClusterRegistry/NAME`, `Registry/NAME` (in
    /// the project's namespace) or `NAME` (a ClusterRegistry). Default: the
    /// cluster's only ClusterRegistry.
    #[arg(long, value_name = "KIND/NAME")]
    registry: Option<String>,
    /// Give every branch matching this glob a preview Environment, e.g.
    /// 'feature/*'. Repeat for more globs.
    #[arg(long, value_name = "GLOB")]
    previews: Vec<String>,
    /// The port the app listens on (default: 8080).
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// A Secret in the project's namespace with the repository's
    /// credentials (basic-auth or ssh-auth).
    #[arg(long, value_name = "SECRET")]
    git_secret: Option<String>,
    /// The namespace the Project owns (default: its name).
    #[arg(short = 'n', long = "namespace", value_name = "NAMESPACE")]
    namespace: Option<String>,
    /// Only print the manifest; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Take over fields another manager set (server-side apply conflicts).
    #[arg(long)]
    force: bool,
    /// How to print the manifest.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = ManifestFormat::Yaml)]
    output: ManifestFormat,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// `-o` of `create`: the manifest as YAML or JSON.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ManifestFormat {
    Yaml,
    Json,
}

/// A registry reference from `--registry`: `(kind, name)`.
pub fn parse_registry(text: &str) -> Result<(&'static str, String), String> {
    let (kind, name) = match text.split_once('/') {
        Some((kind, name)) => (kind, name),
        None => ("ClusterRegistry", text),
    };
    let kind = match kind.to_ascii_lowercase().as_str() {
        "clusterregistry" | "clusterregistries" => "ClusterRegistry",
        "registry" | "registries" => "Registry",
        _ => {
            return Err(format!(
                "--registry {text}: the kind must be ClusterRegistry or Registry, e.g. \
                 ClusterRegistry/harbor"
            ));
        }
    };
    if name.is_empty() || name.contains('/') {
        return Err(format!(
            "--registry {text}: expected KIND/NAME, e.g. ClusterRegistry/harbor"
        ));
    }
    Ok((kind, name.to_string()))
}

/// The Project manifest the flags describe (only what they set: the
/// operator's defaults apply to the rest).
pub fn manifest(args: &CreateProjectArgs, registry: (&str, &str)) -> anyhow::Result<Value> {
    if !is_dns_label(&args.name) || args.name.len() > MAX_PROJECT_NAME_LEN {
        return Err(CliError::failure(format!(
            "\"{}\" cannot be a Project name: use a DNS label of at most {MAX_PROJECT_NAME_LEN} \
             characters (lower-case letters, digits and '-', not starting or ending with '-'), \
             e.g. shop",
            args.name
        ))
        .into());
    }
    let branch = args
        .branch
        .as_deref()
        .unwrap_or(kapsa_api::project::DEFAULT_BRANCH);
    let mut git = json!({"url": args.git, "branch": branch});
    if let Some(secret) = &args.git_secret {
        git["secretRef"] = json!({"name": secret});
    }
    let mut spec = json!({
        "source": {"git": git},
        "registryRef": {"kind": registry.0, "name": registry.1},
    });
    if let Some(namespace) = &args.namespace {
        spec["namespace"] = json!(namespace);
    }
    if let Some(pool) = &args.pool {
        spec["domainPoolRef"] = json!({"name": pool});
    }
    if let Some(port) = args.port {
        spec["runtime"] = json!({"port": port});
    }
    if !args.previews.is_empty() {
        spec["previewEnvironments"] = json!({"enabled": true, "branches": args.previews});
    }
    let value = json!({
        "apiVersion": kapsa_api::API_VERSION,
        "kind": "Project",
        "metadata": {"name": args.name},
        "spec": spec,
    });
    // The same shape the operator reads: a typo here is a bug, not the user's.
    serde_json::from_value::<Project>(value.clone())
        .map_err(|e| anyhow::anyhow!("the manifest does not parse as a Project: {e}"))?;
    Ok(value)
}

/// `--registry`, or the cluster's only ClusterRegistry.
async fn registry(args: &CreateProjectArgs) -> anyhow::Result<(&'static str, String)> {
    if let Some(text) = &args.registry {
        return parse_registry(text).map_err(|m| CliError::failure(m).into());
    }
    let cluster = connect(&args.cluster).await?;
    let api: Api<ClusterRegistry> = Api::all(cluster.client.clone());
    let names: Vec<String> = api
        .list(&ListParams::default())
        .await
        .map_err(|e| {
            explain(
                e,
                &cluster,
                Request::new("list", "clusterregistries.kapsa.dev"),
            )
        })?
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    match names.as_slice() {
        [one] => Ok(("ClusterRegistry", one.clone())),
        [] => Err(CliError::failure(format!(
            "no ClusterRegistry in this cluster{} to push images to: name a Registry of the \
             project's namespace with --registry Registry/NAME, or ask your platform admin for \
             a ClusterRegistry.",
            cluster.context_note()
        ))
        .into()),
        many => Err(CliError::failure(format!(
            "this cluster has several ClusterRegistries ({}): choose one with --registry \
             ClusterRegistry/NAME.",
            many.join(", ")
        ))
        .into()),
    }
}

fn print_manifest(value: &Value, format: ManifestFormat) -> anyhow::Result<()> {
    match format {
        ManifestFormat::Json => emit_line(&serde_json::to_string_pretty(value)?),
        ManifestFormat::Yaml => emit(&serde_yaml_ng::to_string(value)?),
    }
    Ok(())
}

async fn apply(cluster: &Cluster, args: &CreateProjectArgs, value: &Value) -> anyhow::Result<()> {
    let api: Api<Project> = Api::all(cluster.client.clone());
    let request = Request::new("patch", "projects.kapsa.dev");
    let existed = api
        .get_opt(&args.name)
        .await
        .map_err(|e| explain(e, cluster, Request::new("get", "projects.kapsa.dev")))?
        .is_some();
    let mut params = PatchParams::apply(FIELD_MANAGER);
    if args.force {
        params = params.force();
    }
    match api.patch(&args.name, &params, &Patch::Apply(value)).await {
        Ok(_) => {
            eprintln!(
                "project.kapsa.dev/{} {} (server-side apply, field manager {FIELD_MANAGER}). \
                 Follow it with `kapsa status {}`.",
                args.name,
                if existed { "configured" } else { "created" },
                args.name
            );
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 422 || s.code == 400 => Err(CliError::failure(
            format!("the API server refused the Project: {}", s.message),
        )
        .into()),
        Err(kube::Error::Api(s)) if s.code == 409 => Err(CliError::failure(format!(
            "the Project {} exists and another field manager owns fields this would change: \
             {}. Re-run with --force to take them over.",
            args.name, s.message
        ))
        .into()),
        Err(e) => Err(explain(e, cluster, request)),
    }
}

pub async fn run(command: CreateCommand) -> anyhow::Result<()> {
    let CreateCommand::Project(args) = command;
    let registry = registry(&args).await?;
    let value = manifest(&args, (registry.0, &registry.1))?;
    print_manifest(&value, args.output)?;
    if args.dry_run {
        return Ok(());
    }
    let cluster = connect(&args.cluster).await?;
    apply(&cluster, &args, &value).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: CreateProjectArgs,
    }

    fn args(line: &[&str]) -> CreateProjectArgs {
        let mut argv = vec!["create-project"];
        argv.extend_from_slice(line);
        Wrapper::parse_from(argv).args
    }

    #[test]
    fn registry_forms() {
        assert_eq!(
            parse_registry("harbor"),
            Ok(("ClusterRegistry", "harbor".into()))
        );
        assert_eq!(
            parse_registry("registry/team"),
            Ok(("Registry", "team".into()))
        );
        assert_eq!(
            parse_registry("ClusterRegistry/harbor"),
            Ok(("ClusterRegistry", "harbor".into()))
        );
        assert!(parse_registry("Secret/x").is_err());
        assert!(parse_registry("Registry/").is_err());
    }

    #[test]
    fn manifest_sets_only_what_the_flags_say() {
        let a = args(&[
            "shop",
            "--git",
            "https://github.com/acme/shop.git",
            "--previews",
            "feature/*",
            "--pool",
            "default",
        ]);
        let value = manifest(&a, ("ClusterRegistry", "harbor")).unwrap();
        let project: Project = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(project.name_any(), "shop");
        assert_eq!(project.spec.source.git.branch, "main");
        assert_eq!(project.spec.registry_ref.name, "harbor");
        assert!(project.spec.preview_environments.enabled);
        assert_eq!(project.spec.preview_environments.branches, ["feature/*"]);
        assert!(value["spec"].get("runtime").is_none());
        assert!(value["spec"].get("namespace").is_none());
    }

    #[test]
    fn bad_names_are_refused_before_the_api_server() {
        let a = args(&["Shop_1", "--git", "https://github.com/acme/shop.git"]);
        assert!(manifest(&a, ("ClusterRegistry", "harbor")).is_err());
    }
}

//! The kpack `Image` that builds an Environment, and the image repository
//! it pushes to.

use kapsa_api::project::DEFAULT_BUILDER_NAME;
use kapsa_api::{BuilderKind, Project, RegistrySpec, external};
use kube::ResourceExt;
use kube::core::{ApiResource, DynamicObject};
use serde_json::json;

use super::{EnvironmentInputs, metadata};

/// ServiceAccount kpack builds run as, in the Project's build namespace
/// (created by the Project reconciler, with the copies of the registry's
/// push credentials and the git credentials attached).
pub const BUILDER_SERVICE_ACCOUNT: &str = "kapsa-builder";

/// The image repository of a project in a registry:
/// `<server>/<repository>/<project>`, or `<server>/<project>` without a
/// repository.
pub fn image_repository(registry: &RegistrySpec, project: &str) -> String {
    let server = registry.server.trim_end_matches('/');
    match registry
        .repository
        .as_deref()
        .map(|r| r.trim_matches('/'))
        .filter(|r| !r.is_empty())
    {
        Some(repository) => format!("{server}/{repository}/{project}"),
        None => format!("{server}/{project}"),
    }
}

/// The API resource of a kpack `Image` (`kpack.io/v1alpha2`):
/// [`kapsa_api::external::kpack_image`].
pub fn kpack_image_api_resource() -> ApiResource {
    external::kpack_image()
}

/// The kpack `Image` that builds `commit` of the Environment's branch into
/// `<repository>:<environment>`. One per Environment, so successive builds
/// reuse kpack's cache. `repository` is [`image_repository`].
///
/// It lives in the Project's build namespace (where the push credentials
/// are), named after the Environment. An owner reference cannot cross
/// namespaces, so its controller is the Project (the garbage collector
/// removes it with the Project), and the label
/// [`ENVIRONMENT_UID_LABEL`](super::ENVIRONMENT_UID_LABEL) ties it to its
/// Environment: the Environment prunes it after a switch to a fixed image,
/// the Project once the Environment is gone.
pub fn kpack_image(inputs: &EnvironmentInputs, repository: &str, commit: &str) -> DynamicObject {
    let project = inputs.project;
    let env_name = inputs.environment.name_any();
    let (builder_kind, builder_name) = match &project.spec.build.builder_ref {
        Some(builder) => (builder.kind, builder.name.as_str()),
        None => (BuilderKind::ClusterBuilder, DEFAULT_BUILDER_NAME),
    };
    let builder_kind = external::kpack_builder(builder_kind).kind;
    let mut source = json!({
        "git": {
            "url": project.spec.source.git.url,
            "revision": commit,
        }
    });
    if let Some(dir) = context_dir(project) {
        source["subPath"] = json!(dir);
    }
    let spec = json!({
        "tag": format!("{repository}:{env_name}"),
        "serviceAccountName": BUILDER_SERVICE_ACCOUNT,
        "builder": {"kind": builder_kind, "name": builder_name},
        "source": source,
    });
    let mut image =
        DynamicObject::new(&env_name, &kpack_image_api_resource()).data(json!({ "spec": spec }));
    image.metadata = metadata(inputs, Some(commit));
    image.metadata.namespace = Some(crate::resources::project::build_namespace_name(project));
    image.metadata.owner_references = Some(vec![crate::resources::controller_reference(project)]);
    if let Some(uid) = inputs.environment.uid() {
        image
            .metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert(super::ENVIRONMENT_UID_LABEL.to_string(), uid);
    }
    image
}

fn context_dir(project: &Project) -> Option<&str> {
    project
        .spec
        .source
        .context_dir
        .as_deref()
        .map(|d| d.trim_matches('/'))
        .filter(|d| !d.is_empty() && *d != ".")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::environment::VERSION_LABEL;
    use crate::resources::environment::test_support::*;
    use kapsa_api::{ClusterRegistry, Environment};

    #[test]
    fn image_repository_with_and_without_repository() {
        let registry: ClusterRegistry = load(REGISTRY);
        assert_eq!(
            image_repository(&registry.spec, "shop"),
            "harbor.example.com/team/kapsa/shop"
        );
        let mut spec = registry.spec.clone();
        spec.repository = None;
        assert_eq!(image_repository(&spec, "shop"), "harbor.example.com/shop");
        spec.server = "registry.local:5000".to_owned();
        spec.repository = Some("kapsa".to_owned());
        assert_eq!(
            image_repository(&spec, "blog"),
            "registry.local:5000/kapsa/blog"
        );
    }

    #[test]
    fn kpack_image_with_explicit_builder_and_sub_path() {
        let (p, e) = (project(), environment());
        let registry: ClusterRegistry = load(REGISTRY);
        let repo = image_repository(&registry.spec, "shop");
        let image = kpack_image(&inputs(&p, &e, None), &repo, COMMIT);
        let types = image.types.as_ref().unwrap();
        assert_eq!(types.api_version, "kpack.io/v1alpha2");
        assert_eq!(types.kind, "Image");
        // In the build namespace, controlled by the Project, tied to the
        // Environment by its uid.
        let meta = &image.metadata;
        assert_eq!(meta.name.as_deref(), Some("production"));
        assert_eq!(meta.namespace.as_deref(), Some("kapsa-build-shop"));
        let owners = meta.owner_references.as_ref().expect("owner references");
        assert_eq!(owners.len(), 1);
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].name.as_str()),
            ("Project", "shop")
        );
        assert_eq!(owners[0].controller, Some(true));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(
            labels.get(crate::resources::environment::ENVIRONMENT_UID_LABEL),
            Some(&ENV_UID.to_string())
        );
        assert_eq!(labels[VERSION_LABEL], "3f2a9c1");
        let spec = &image.data["spec"];
        assert_eq!(spec["tag"], "harbor.example.com/team/kapsa/shop:production");
        assert_eq!(spec["serviceAccountName"], BUILDER_SERVICE_ACCOUNT);
        assert_eq!(
            spec["builder"],
            json!({"kind": "Builder", "name": "team-builder"})
        );
        assert_eq!(
            spec["source"]["git"],
            json!({"url": "https://git.example.com/acme/shop.git", "revision": COMMIT})
        );
        assert_eq!(spec["source"]["subPath"], "services/api");
        assert_apply_ready(
            &serde_json::to_value(&image).unwrap(),
            "kpack.io/v1alpha2",
            "Image",
        );
    }

    #[test]
    fn kpack_image_defaults_to_the_default_cluster_builder() {
        let p: Project = load(PROJECT_MINIMAL);
        let e: Environment = load(ENVIRONMENT_MINIMAL);
        let commit = "1234567".repeat(6)[..40].to_owned();
        let image = kpack_image(&inputs(&p, &e, None), "harbor.example.com/blog", &commit);
        let spec = &image.data["spec"];
        assert_eq!(
            spec["builder"],
            json!({"kind": "ClusterBuilder", "name": "default"})
        );
        assert_eq!(spec["tag"], "harbor.example.com/blog:production");
        assert_eq!(spec["source"]["git"]["revision"], commit.as_str());
        assert_eq!(
            spec["source"]["git"]["url"],
            "git@git.example.com:acme/blog.git"
        );
        assert!(spec["source"].get("subPath").is_none());
        assert_eq!(
            image.metadata.labels.as_ref().unwrap()[VERSION_LABEL],
            "1234567"
        );
        assert_eq!(
            image.metadata.namespace.as_deref(),
            Some("kapsa-build-blog")
        );

        // An empty context dir is the repository root.
        let mut p2 = p.clone();
        p2.spec.source.context_dir = Some(String::new());
        let image = kpack_image(&inputs(&p2, &e, None), "r", &commit);
        assert!(image.data["spec"]["source"].get("subPath").is_none());
    }
}

//! Push credentials stay with the builder (tenancy, item 6): a tenant with
//! `edit` in its project namespace can read no Secret that pushes. Builds
//! run in the Project's build namespace (`kapsa-build-<project>`), where the
//! push credentials' copy lives; the project namespace holds only the
//! registry's pull-only credentials. Proved with SubjectAccessReviews and
//! with the tenant's own requests against the real API server.

mod support;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kapsa_api::Environment;
use kapsa_api::naming::build_namespace;
use kapsa_testenv::simulators::kpack::image_resource;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::*;

const PUSH: &str = r#"{"auths":{"registry.example":{"auth":"cHVzaGVyOnB1c2gtc2VjcmV0"}}}"#;
const PULL: &str = r#"{"auths":{"registry.example":{"auth":"cHVsbGVyOnB1bGwtc2VjcmV0"}}}"#;
const TENANT: &str = "tenant-alice";

fn dockerconfig(s: &Secret) -> Option<String> {
    s.data
        .as_ref()?
        .get(".dockerconfigjson")
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

/// Whether the API server's authorizer allows `user` the `verb` on
/// `resource` (of `group`) in `namespace`.
async fn allowed(
    admin: &Client,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            groups: Some(vec!["system:authenticated".into()]),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.into()),
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    Api::<SubjectAccessReview>::all(admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("a SubjectAccessReview")
        .status
        .expect("its status")
        .allowed
}

/// A registry whose push and pull credentials differ.
async fn registry_with_pull_credentials(client: &Client, id: &str) -> Platform {
    let platform = platform(client, id, "HTTP01", false).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), PLATFORM_NAMESPACE);
    for (name, value) in [(format!("{id}-push"), PUSH), (format!("{id}-pull"), PULL)] {
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": PLATFORM_NAMESPACE},
            "type": "kubernetes.io/dockerconfigjson", "stringData": {".dockerconfigjson": value}});
        secrets
            .patch(
                &name,
                &PatchParams::apply("tenancy-test").force(),
                &Patch::Apply(secret),
            )
            .await
            .unwrap();
    }
    Api::<kapsa_api::ClusterRegistry>::all(client.clone())
        .patch(
            &platform.registry,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"pullSecretRef":
                {"name": format!("{id}-pull"), "namespace": PLATFORM_NAMESPACE}}})),
        )
        .await
        .unwrap();
    platform
}

#[tokio::test]
async fn a_tenant_with_edit_can_read_no_push_credentials() {
    let (env, admin) = cluster().await;
    shared_operator().await;
    let platform = registry_with_pull_credentials(&admin, "tny").await;
    let live = live_project(&admin, "tenant-shop", platform, |_| {}).await;
    let ns = live.name.as_str();
    let build_ns = build_namespace(ns);

    // The platform team gives the tenant `edit` in its project namespace.
    create(
        &Api::<RoleBinding>::namespaced(admin.clone(), ns),
        json!({"metadata": {"name": "alice-edits"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": TENANT}]}),
    )
    .await;

    // The build ran in the build namespace, with the push credentials there.
    let images = Api::<DynamicObject>::namespaced_with(admin.clone(), &build_ns, &image_resource());
    let image = images.get("production").await.expect("the kpack Image");
    assert_eq!(image.data["spec"]["serviceAccountName"], "kapsa-builder");
    assert_eq!(image.owner_references()[0].kind, "Project");
    let builder = Api::<ServiceAccount>::namespaced(admin.clone(), &build_ns)
        .get("kapsa-builder")
        .await
        .unwrap();
    let push_copy = Api::<Secret>::namespaced(admin.clone(), &build_ns)
        .get("kapsa-registry")
        .await
        .unwrap();
    assert_eq!(dockerconfig(&push_copy).as_deref(), Some(PUSH));
    assert!(
        builder
            .secrets
            .unwrap_or_default()
            .iter()
            .any(|s| s.name.as_deref() == Some("kapsa-registry"))
    );

    // The project namespace holds the pull-only credentials, which the app
    // pulls with; no builder lives there.
    eventually("the pull-only copy in the project namespace", || async {
        let copy = Api::<Secret>::namespaced(admin.clone(), ns)
            .get_opt("kapsa-registry")
            .await
            .ok()??;
        (dockerconfig(&copy).as_deref() == Some(PULL)).then_some(())
    })
    .await;
    let runtime = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
        .get("kapsa-runtime")
        .await
        .unwrap();
    assert_eq!(
        runtime.image_pull_secrets.unwrap_or_default()[0].name,
        "kapsa-registry"
    );
    assert!(
        Api::<ServiceAccount>::namespaced(admin.clone(), ns)
            .get_opt("kapsa-builder")
            .await
            .unwrap()
            .is_none()
    );

    // SubjectAccessReview as the tenant: everything in its own namespace
    // (the check can fail), nothing in the build namespace.
    for verb in ["get", "list"] {
        assert!(
            allowed(&admin, TENANT, verb, "", "secrets", ns).await,
            "{verb} secrets in {ns}: the tenant's edit role must work, or this test proves nothing"
        );
    }
    for (verb, group, resource) in [
        ("get", "", "secrets"),
        ("list", "", "secrets"),
        ("watch", "", "secrets"),
        ("create", "", "pods"),
        ("create", "", "serviceaccounts/token"),
        ("get", "kpack.io", "images"),
        ("patch", "kpack.io", "images"),
        ("create", "rbac.authorization.k8s.io", "rolebindings"),
    ] {
        assert!(
            !allowed(&admin, TENANT, verb, group, resource, &build_ns).await,
            "the tenant may {verb} {group}/{resource} in {build_ns}"
        );
    }

    // The tenant's own requests agree: the build namespace is closed, and
    // no Secret it can read holds the push credentials.
    let tenant = env.client_as(TENANT, &[]).await;
    match Api::<Secret>::namespaced(tenant.clone(), &build_ns)
        .list(&ListParams::default())
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => panic!("the tenant listed Secrets of {build_ns}: {other:?}"),
    }
    let readable = Api::<Secret>::namespaced(tenant, ns)
        .list(&ListParams::default())
        .await
        .expect("the tenant reads its own Secrets");
    assert!(
        readable
            .items
            .iter()
            .any(|s| dockerconfig(s).as_deref() == Some(PULL)),
        "the tenant sees the pull-only copy"
    );
    for secret in &readable.items {
        assert_ne!(
            dockerconfig(secret).as_deref(),
            Some(PUSH),
            "Secret {ns}/{} holds the push credentials",
            secret.name_any()
        );
    }
}

#[tokio::test]
async fn the_push_copy_and_builder_an_older_kapsa_left_in_the_project_namespace_are_removed() {
    let (_, admin) = cluster().await;
    shared_operator().await;
    let platform = registry_with_pull_credentials(&admin, "mig").await;
    let push_source = Api::<Secret>::namespaced(admin.clone(), PLATFORM_NAMESPACE)
        .get(&format!("{}-push", "mig"))
        .await
        .unwrap();
    let live = live_project(&admin, "migrated", platform, |_| {}).await;
    let ns = live.name.as_str();
    let project = Api::<kapsa_api::Project>::all(admin.clone())
        .get(ns)
        .await
        .unwrap();
    let owner = json!([{"apiVersion": "kapsa.dev/v1alpha1", "kind": "Project", "name": ns,
        "uid": project.uid().unwrap(), "controller": true, "blockOwnerDeletion": true}]);
    let labels = json!({"app.kubernetes.io/managed-by": "kapsa", "kapsa.dev/project": ns});
    // What an older Kapsa left in the project namespace: the builder's
    // ServiceAccount, Role and RoleBinding, and a copy of the push
    // credentials (annotated with the push Secret's version).
    create(
        &Api::<ServiceAccount>::namespaced(admin.clone(), ns),
        json!({"metadata": {"name": "kapsa-builder", "labels": labels, "ownerReferences": owner}}),
    )
    .await;
    create(
        &Api::<Role>::namespaced(admin.clone(), ns),
        json!({"metadata": {"name": "kapsa-builder", "labels": labels, "ownerReferences": owner},
            "rules": []}),
    )
    .await;
    create(
        &Api::<RoleBinding>::namespaced(admin.clone(), ns),
        json!({"metadata": {"name": "kapsa-builder", "labels": labels, "ownerReferences": owner},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kapsa-builder"},
            "subjects": [{"kind": "ServiceAccount", "name": "kapsa-builder", "namespace": ns}]}),
    )
    .await;
    let secrets = Api::<Secret>::namespaced(admin.clone(), ns);
    let version = format!(
        "{}/{}",
        push_source.uid().unwrap(),
        push_source.resource_version().unwrap()
    );
    secrets
        .patch(
            "kapsa-registry",
            &PatchParams::apply("older-kapsa").force(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": "kapsa-registry", "labels": labels, "ownerReferences": owner,
                    "annotations": {"kapsa.dev/source-version": version}},
                "type": "kubernetes.io/dockerconfigjson",
                "stringData": {".dockerconfigjson": PUSH}})),
        )
        .await
        .unwrap();

    // The next reconciles delete them (the copy is made the pull-only one).
    eventually("the old builder objects to be deleted", || async {
        let sa = Api::<ServiceAccount>::namespaced(admin.clone(), ns)
            .get_opt("kapsa-builder")
            .await
            .ok()?;
        let role = Api::<Role>::namespaced(admin.clone(), ns)
            .get_opt("kapsa-builder")
            .await
            .ok()?;
        let binding = Api::<RoleBinding>::namespaced(admin.clone(), ns)
            .get_opt("kapsa-builder")
            .await
            .ok()?;
        (sa.is_none() && role.is_none() && binding.is_none()).then_some(())
    })
    .await;
    eventually("the copy to hold the pull-only credentials", || async {
        let copy = secrets.get_opt("kapsa-registry").await.ok()??;
        (dockerconfig(&copy).as_deref() == Some(PULL)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn the_build_of_a_deleted_environment_is_removed_from_the_build_namespace() {
    let (_, admin) = cluster().await;
    shared_operator().await;
    let live = live_project(
        &admin,
        "builds-gone",
        platform(&admin, "bgone", "HTTP01", false).await,
        |_| {},
    )
    .await;
    let ns = live.name.as_str();
    let images = Api::<DynamicObject>::namespaced_with(
        admin.clone(),
        &build_namespace(ns),
        &image_resource(),
    );
    // A person's Environment (the Project does not own it) builds ...
    let environments = Api::<Environment>::namespaced(admin.clone(), ns);
    create(
        &environments,
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment", "metadata": {"name": "qa"},
            "spec": {"project": ns, "type": "Preview", "branch": "main", "commit": live.commit}}),
    )
    .await;
    let image = eventually("qa's kpack Image in the build namespace", || async {
        images.get_opt("qa").await.ok()?
    })
    .await;
    assert_eq!(
        image.labels().get("kapsa.dev/environment-uid"),
        environments.get("qa").await.unwrap().uid().as_ref()
    );
    // ... and once it is deleted, the Project removes its Image.
    environments
        .delete("qa", &Default::default())
        .await
        .unwrap();
    eventually("qa's kpack Image to be deleted", || async {
        images.get_opt("qa").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        images.get_opt("production").await.unwrap().is_some(),
        "production's Image stays"
    );
}

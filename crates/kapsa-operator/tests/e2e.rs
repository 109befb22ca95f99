//! End to end against the real control plane, with real git repositories on
//! loopback and the kpack and cert-manager simulators: a Project goes live,
//! new commits roll out, failures keep the release serving.

mod support;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::networking::v1::Ingress;
use kapsa_api::{Environment, EnvironmentPhase, Project};
use kapsa_testenv::git_server::GitServer;
use kapsa_testenv::simulators::cert_manager::certificate_resource;
use kapsa_testenv::simulators::kpack::simulated_digest;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde_json::json;
use support::*;

#[tokio::test]
async fn project_goes_live_rolls_out_commits_and_survives_a_failed_build() {
    let (_, client) = cluster().await;
    let metrics = shared_operator().await;
    let platform = platform(&client, "live", "HTTP01", false).await;
    let git = GitServer::start(Some(("deploy".into(), "s3cret-token".into())))
        .await
        .unwrap();
    let repo = git.create_repo("shop").unwrap();
    let first = repo.commit("main", "app.txt", "v1", "first").unwrap();

    let name = "shop";
    let projects: Api<Project> = Api::all(client.clone());
    create(
        &projects,
        project_manifest(name, repo.url(), &platform, Some("shop-git")),
    )
    .await;

    // The developer adds the git credentials to the namespace Kapsa made.
    eventually("the project namespace", || async {
        Api::<Namespace>::all(client.clone())
            .get_opt(name)
            .await
            .ok()
            .flatten()
    })
    .await;
    create(
        &Api::<Secret>::namespaced(client.clone(), name),
        json!({"metadata": {"name": "shop-git"}, "type": "kubernetes.io/basic-auth",
            "stringData": {"username": "deploy", "password": "s3cret-token"}}),
    )
    .await;

    let env = rolled_out(&client, name, &first).await;
    let host = format!("{name}.{}", platform.base);
    let tag = format!("registry.example/kapsa/{name}:production");
    let first_image = format!("{tag}@{}", simulated_digest(repo.url(), &first));
    let status = env.status.clone().unwrap();
    assert_eq!(status.image.as_deref(), Some(first_image.as_str()));
    assert_eq!(
        status.url.as_deref(),
        Some(format!("https://{host}").as_str())
    );
    assert_eq!(env.spec.host.as_deref(), Some(host.as_str()));
    assert_eq!(
        condition_of(&status.conditions, "TLSReady"),
        Some(("True".into(), "CertificateReady".into()))
    );

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), name);
    let deployment = deployments.get("production").await.unwrap();
    assert_eq!(app_image(&deployment), first_image);
    let spec = deployment.spec.clone().unwrap();
    let rolling = spec.strategy.unwrap().rolling_update.unwrap();
    assert_eq!(
        format!("{:?}", rolling.max_unavailable),
        format!(
            "{:?}",
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
        )
    );
    let pod = spec.template.spec.unwrap();
    let container = &pod.containers[0];
    assert_eq!(
        container
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    assert!(container.liveness_probe.is_some());
    let env_from: Vec<String> = container
        .env_from
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| {
            e.config_map_ref
                .map(|c| c.name)
                .or(e.secret_ref.map(|s| s.name))
                .unwrap()
        })
        .collect();
    assert_eq!(env_from, vec!["shop-config", "shop-secrets"]);
    assert_eq!(pod.service_account_name.as_deref(), Some("kapsa-runtime"));

    let ingress = Api::<Ingress>::namespaced(client.clone(), name)
        .get("production")
        .await
        .unwrap();
    assert_eq!(
        ingress.spec.as_ref().unwrap().ingress_class_name.as_deref(),
        Some("nginx")
    );
    assert_eq!(
        ingress.annotations().get("cert-manager.io/cluster-issuer"),
        Some(&platform.issuer)
    );
    assert_eq!(
        ingress.spec.as_ref().unwrap().rules.as_ref().unwrap()[0]
            .host
            .as_deref(),
        Some(host.as_str())
    );

    // The Project aggregates its Environments a moment later.
    let project = eventually("the Project to be Ready", || async {
        let p = projects.get(name).await.ok()?;
        let ready = condition_of(&p.status.clone()?.conditions, "Ready")?;
        (ready.0 == "True").then_some(p)
    })
    .await;
    let pstatus = project.status.clone().unwrap();
    assert_eq!(pstatus.host.as_deref(), Some(host.as_str()));
    assert_eq!(pstatus.latest_commit.as_deref(), Some(first.as_str()));
    assert_eq!(
        condition_of(&pstatus.conditions, "Ready"),
        Some(("True".into(), "ProductionReady".into()))
    );
    assert_eq!(
        condition_of(&pstatus.conditions, "SourceReachable").map(|c| c.0),
        Some("True".into())
    );
    // The registry's push credentials are copied into the build namespace
    // for the builder, never into the project namespace (the registry names
    // no pull-only credentials, so the app pulls with none).
    let copied = Api::<Secret>::namespaced(client.clone(), &format!("kapsa-build-{name}"))
        .get("kapsa-registry")
        .await
        .unwrap();
    assert_eq!(
        copied.type_.as_deref(),
        Some("kubernetes.io/dockerconfigjson")
    );
    assert!(
        Api::<Secret>::namespaced(client.clone(), name)
            .get_opt("kapsa-registry")
            .await
            .unwrap()
            .is_none(),
        "no copy of the push credentials in the project namespace"
    );
    // No secret value reaches the status.
    assert!(
        !serde_json::to_string(&project)
            .unwrap()
            .contains("s3cret-token")
    );

    // A new commit: a new image, rolled out; the old ReplicaSet is kept.
    let second = repo.commit("main", "app.txt", "v2", "second").unwrap();
    let env = rolled_out(&client, name, &second).await;
    let second_image = format!("{tag}@{}", simulated_digest(repo.url(), &second));
    assert_eq!(
        app_image(&deployments.get("production").await.unwrap()),
        second_image
    );
    let history: Vec<_> = env
        .status
        .unwrap()
        .history
        .into_iter()
        .map(|r| r.commit.unwrap())
        .collect();
    assert_eq!(history, vec![second.clone(), first.clone()]);
    let replica_sets = Api::<ReplicaSet>::namespaced(client.clone(), name)
        .list(&ListParams::default())
        .await
        .unwrap();
    let images: Vec<String> = replica_sets
        .items
        .iter()
        .map(|rs| {
            rs.spec
                .as_ref()
                .unwrap()
                .template
                .as_ref()
                .unwrap()
                .spec
                .as_ref()
                .unwrap()
                .containers[0]
                .image
                .clone()
                .unwrap()
        })
        .collect();
    assert!(
        images.contains(&first_image) && images.contains(&second_image),
        "both ReplicaSets remain: {images:?}"
    );

    // A failed build: the release keeps serving, and the condition says why.
    // (The commit is made on a side branch, the simulator told to fail it,
    // and only then does main move to it: no race with the poller.)
    let third = repo
        .commit("broken", "app.txt", "v3-broken", "third")
        .unwrap();
    fail_revisions(&client, &[&third]).await;
    let moved = std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repo.bare_path())
        .args(["update-ref", "refs/heads/main", &third])
        .status()
        .unwrap();
    assert!(moved.success());
    let failed = eventually("the build of the third commit to fail", || async {
        let env = production(&client, name).await?;
        let status = env.status.clone()?;
        (condition_of(&status.conditions, "Built") == Some(("False".into(), "BuildFailed".into())))
            .then_some(status)
    })
    .await;
    assert_eq!(failed.commit.as_deref(), Some(second.as_str()));
    assert_eq!(failed.phase, Some(EnvironmentPhase::Ready));
    assert_eq!(
        condition_of(&failed.conditions, "Ready").map(|c| c.0),
        Some("True".into())
    );
    assert_eq!(
        app_image(&deployments.get("production").await.unwrap()),
        second_image
    );

    // A person edits the image: Kapsa puts it back.
    deployments
        .patch(
            "production",
            &PatchParams { field_manager: Some("kubectl-edit".into()), ..PatchParams::default() },
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": "evil.example/app:latest"}]}}}})),
        )
        .await
        .unwrap();
    eventually("the manual edit to be reverted", || async {
        let d = deployments.get("production").await.ok()?;
        (app_image(&d) == second_image).then_some(())
    })
    .await;
    assert!(metrics.total_writes() > 0);

    // Deleting the Project removes its namespace and everything in it.
    projects
        .delete(name, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the namespace to be gone", || async {
        Api::<Namespace>::all(client.clone())
            .get_opt(name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn dns01_pool_gets_one_wildcard_certificate_per_project() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let platform = platform(&client, "wild", "DNS01", true).await;
    let git = GitServer::start(None).await.unwrap();
    let repo = git.create_repo("api").unwrap();
    let commit = repo.commit("main", "app.txt", "v1", "first").unwrap();
    let name = "wildapi";
    create(
        &Api::<Project>::all(client.clone()),
        project_manifest(name, repo.url(), &platform, None),
    )
    .await;
    rolled_out(&client, name, &commit).await;
    let cert = Api::<DynamicObject>::namespaced_with(client.clone(), name, &certificate_resource())
        .get(&format!("{name}-wildcard"))
        .await
        .unwrap();
    let apex = format!("{name}.{}", platform.base);
    assert_eq!(
        cert.data["spec"]["dnsNames"],
        json!([format!("*.{apex}"), apex])
    );
    let ingress = Api::<Ingress>::namespaced(client.clone(), name)
        .get("production")
        .await
        .unwrap();
    assert!(
        ingress
            .annotations()
            .get("cert-manager.io/cluster-issuer")
            .is_none(),
        "DNS01 needs no ingress-shim"
    );
    let tls = &ingress.spec.unwrap().tls.unwrap()[0];
    assert_eq!(
        tls.secret_name.as_deref(),
        Some(format!("{name}-wildcard-tls").as_str())
    );
}

#[tokio::test]
async fn hosts_never_collide_with_bases_reserved_names_or_foreign_ingresses() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let outer = platform(&client, "outer", "HTTP01", false).await;
    // A second pool whose base is what a Project named `taken` would get on
    // the first; the first pool reserves `www`; a foreign Ingress routes a
    // host under `blog.<base>`.
    let inner_base = format!("taken.{}", outer.base);
    create(
        &Api::<kapsa_api::DomainPool>::all(client.clone()),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "DomainPool", "metadata": {"name": "inner-pool"},
            "spec": {"domains": [inner_base]}}),
    )
    .await;
    Api::<kapsa_api::DomainPool>::all(client.clone())
        .patch(
            &outer.pool,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"reservedNames": ["www", "grafana"]}})),
        )
        .await
        .unwrap();
    create_ignoring_conflict(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": "legacy-blog"}}),
    )
    .await;
    create(
        &Api::<Ingress>::namespaced(client.clone(), "legacy-blog"),
        json!({"metadata": {"name": "blog"}, "spec": {"rules": [{"host": format!("www.blog.{}", outer.base),
            "http": {"paths": [{"path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "blog", "port": {"number": 80}}}}]}}]}}),
    )
    .await;
    let git = GitServer::start(None).await.unwrap();
    let repo = git.create_repo("app").unwrap();
    repo.commit("main", "a", "1", "one").unwrap();
    let projects: Api<Project> = Api::all(client.clone());
    for name in ["taken", "www", "blog"] {
        create(&projects, project_manifest(name, repo.url(), &outer, None)).await;
    }
    let mut inner = project_manifest("web", repo.url(), &outer, None);
    inner["spec"]["domainPoolRef"] = json!({"name": "inner-pool"});
    create(&projects, inner).await;

    for (name, reason, names) in [
        ("taken", "HostIsBase", inner_base.clone()),
        ("www", "HostReserved", outer.pool.clone()),
        ("blog", "HostInUse", "legacy-blog/blog".to_string()),
    ] {
        let (_, got, message) = eventually(&format!("{name}: {reason}"), || async {
            project_condition(&client, name, "DomainAllocated")
                .await
                .filter(|c| c.0 == "False")
        })
        .await;
        assert_eq!(got, reason, "{name}: {message}");
        assert!(message.contains(&names), "{name}: {message}");
        let project = projects.get(name).await.unwrap();
        assert!(
            project.status.unwrap().host.is_none(),
            "{name} gets no host"
        );
    }
    // The base is not blocked: the inner pool's Project gets its host.
    eventually("web's host under the inner base", || async {
        let web = projects.get("web").await.ok()?;
        web.status?
            .host
            .filter(|h| *h == format!("web.{inner_base}"))
    })
    .await;
}

#[tokio::test]
async fn another_projects_or_a_foreign_namespace_is_refused() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let p = platform(&client, "ns", "HTTP01", false).await;
    let git = GitServer::start(None).await.unwrap();
    let repo = git.create_repo("app").unwrap();
    repo.commit("main", "a", "1", "one").unwrap();
    let projects: Api<Project> = Api::all(client.clone());
    create(&projects, project_manifest("owner", repo.url(), &p, None)).await;
    eventually("the owner's namespace", || async {
        Api::<Namespace>::all(client.clone())
            .get_opt("owner")
            .await
            .ok()
            .flatten()
    })
    .await;
    let mut intruder = project_manifest("intruder", repo.url(), &p, None);
    intruder["spec"]["namespace"] = json!("owner");
    create(&projects, intruder).await;
    // A namespace that exists and belongs to no Project is never adopted.
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": "legacy"}}),
    )
    .await;
    let mut squatter = project_manifest("squatter", repo.url(), &p, None);
    squatter["spec"]["namespace"] = json!("legacy");
    create(&projects, squatter).await;
    for name in ["intruder", "squatter"] {
        let (_, reason, _) = eventually(&format!("{name} to be refused"), || async {
            project_condition(&client, name, "Ready")
                .await
                .filter(|c| c.1 == "NamespaceConflict")
        })
        .await;
        assert_eq!(reason, "NamespaceConflict");
    }
    // An Environment made in another namespace cannot serve the Project's hosts.
    let intruding = create(
        &Api::<Environment>::namespaced(client.clone(), "legacy"),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment", "metadata": {"name": "hijack"},
            "spec": {"project": "owner", "type": "Preview", "image": "evil.example/app:1",
                "host": format!("hijack.owner.{}", p.base)}}),
    )
    .await;
    let refused = eventually("the foreign Environment to be refused", || async {
        let env = Api::<Environment>::namespaced(client.clone(), "legacy")
            .get(&intruding.name_any())
            .await
            .ok()?;
        condition_of(&env.status?.conditions, "Ready").filter(|c| c.1 == "WrongNamespace")
    })
    .await;
    assert_eq!(refused.0, "False");
    assert!(
        Api::<Ingress>::namespaced(client.clone(), "legacy")
            .get_opt("hijack")
            .await
            .unwrap()
            .is_none(),
        "no Ingress for a foreign Environment"
    );
    let legacy = Api::<Namespace>::all(client.clone())
        .get("legacy")
        .await
        .unwrap();
    assert!(
        legacy.owner_references().is_empty(),
        "the foreign namespace is untouched"
    );
    let owner_ns = Api::<Namespace>::all(client.clone())
        .get("owner")
        .await
        .unwrap();
    assert_eq!(owner_ns.owner_references()[0].name, "owner");
    // kube-system is refused before it reaches the operator.
    let mut system = project_manifest("system", repo.url(), &p, None);
    system["spec"]["namespace"] = json!("kube-system");
    let err = projects
        .create(
            &Default::default(),
            &serde_json::from_value(system).unwrap(),
        )
        .await
        .expect_err("kube-system is refused at admission");
    assert!(err.to_string().contains("spec.namespace"), "{err}");
}

#[tokio::test]
async fn unreachable_repository_keeps_the_environment_and_says_so() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let p = platform(&client, "gone", "HTTP01", false).await;
    let git = GitServer::start(None).await.unwrap();
    let repo = git.create_repo("app").unwrap();
    let commit = repo.commit("main", "a", "1", "one").unwrap();
    let url = repo.url().to_string();
    let projects: Api<Project> = Api::all(client.clone());
    create(&projects, project_manifest("flaky", &url, &p, None)).await;
    rolled_out(&client, "flaky", &commit).await;
    drop(repo);
    drop(git);
    let (_, reason, _) = eventually("SourceReachable=False", || async {
        project_condition(&client, "flaky", "SourceReachable")
            .await
            .filter(|c| c.0 == "False")
    })
    .await;
    assert_eq!(reason, "Unreachable");
    let env = production(&client, "flaky").await.unwrap();
    assert_eq!(env.spec.commit.as_deref(), Some(commit.as_str()));
    assert_eq!(env.status.unwrap().phase, Some(EnvironmentPhase::Ready));
}

#[tokio::test]
async fn a_missing_registry_is_reported_then_picked_up() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let p = platform(&client, "noreg", "HTTP01", false).await;
    let git = GitServer::start(None).await.unwrap();
    let repo = git.create_repo("app").unwrap();
    let commit = repo.commit("main", "a", "1", "one").unwrap();
    let mut manifest = project_manifest("noreg", repo.url(), &p, None);
    manifest["spec"]["registryRef"] = json!({"kind": "ClusterRegistry", "name": "not-yet"});
    create(&Api::<Project>::all(client.clone()), manifest).await;
    let (_, reason, message) = eventually("RegistryNotFound", || async {
        project_condition(&client, "noreg", "Ready")
            .await
            .filter(|c| c.1 == "RegistryNotFound")
    })
    .await;
    assert!(message.contains("not-yet"), "{message}");
    let built = eventually("the environment to say why it cannot build", || async {
        let status = production(&client, "noreg").await?.status?;
        condition_of(&status.conditions, "Built").filter(|c| c.1 == "RegistryNotFound")
    })
    .await;
    assert_eq!(built.0, "False");
    // The platform team creates it: the Project picks it up without a nudge.
    create(
        &Api::<kapsa_api::ClusterRegistry>::all(client.clone()),
        json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "ClusterRegistry", "metadata": {"name": "not-yet"},
            "spec": {"server": "registry.example", "repository": "late"}}),
    )
    .await;
    assert_eq!(reason, "RegistryNotFound");
    rolled_out(&client, "noreg", &commit).await;
}

/// A new Service is created in the background (the API server makes
/// Services one at a time); one the API server refuses is still named in
/// the Environment's status, stays named (no coming and going while it is
/// retried), keeps the Environment from saying it serves, and is made once
/// the refusal goes.
#[tokio::test]
async fn a_refused_service_is_reported_then_made() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let ns = "svc-refused";
    // An admission policy of the platform team that refuses Services in
    // this namespace (as a quota on Services would).
    refusing_policy(
        &client,
        "svc-refused",
        ns,
        json!({"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
            "resources": ["services"]}),
        "false",
        "the platform allows no Service here yet",
    )
    .await;
    type Binding = k8s_openapi::api::admissionregistration::v1::ValidatingAdmissionPolicyBinding;
    let p = platform(&client, ns, "HTTP01", false).await;
    let git = GitServer::start(None).await.unwrap();
    let repo = git.create_repo("app").unwrap();
    let commit = repo.commit("main", "a", "1", "one").unwrap();
    create(
        &Api::<Project>::all(client.clone()),
        project_manifest(ns, repo.url(), &p, None),
    )
    .await;

    let refused = || async {
        environment_condition(&client, ns, "production", "Applied")
            .await
            .filter(|c| c.0 == "False")
    };
    let (_, reason, message) = eventually("Applied False naming the Service", refused).await;
    assert_eq!(reason, "Refused");
    assert!(message.contains("Service"), "{message}");
    assert!(message.contains("allows no Service here yet"), "{message}");
    // The build and the Deployment go on; the Environment does not say it
    // serves without its Service, and the refusal stays reported while it is
    // retried (one transition, not one per try).
    let deployed = eventually("the Deployment to be available", || async {
        Api::<Deployment>::namespaced(client.clone(), ns)
            .get_opt("production")
            .await
            .ok()
            .flatten()
            .filter(|d| {
                d.status
                    .as_ref()
                    .and_then(|s| s.available_replicas)
                    .unwrap_or(0)
                    > 0
            })
    })
    .await;
    assert!(deployed.metadata.name.is_some());
    let first = production(&client, ns).await.unwrap();
    let since = condition_time(&first, "Applied");
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    let later = production(&client, ns).await.unwrap();
    let status = later.status.clone().unwrap();
    assert_eq!(
        condition_of(&status.conditions, "Applied").map(|c| c.1),
        Some("Refused".to_string())
    );
    assert_eq!(condition_time(&later, "Applied"), since, "Applied flapped");
    assert_ne!(status.phase, Some(EnvironmentPhase::Ready));
    assert_eq!(
        condition_of(&status.conditions, "Ready").map(|c| c.0),
        Some("False".to_string())
    );

    // The policy goes: the Service is made and the release serves.
    Api::<Binding>::all(client.clone())
        .delete("svc-refused", &Default::default())
        .await
        .unwrap();
    rolled_out(&client, ns, &commit).await;
    eventually("Applied True again", || async {
        environment_condition(&client, ns, "production", "Applied")
            .await
            .filter(|c| c.0 == "True")
    })
    .await;
}

fn condition_time(env: &Environment, type_: &str) -> Option<String> {
    env.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| format!("{:?}", c.last_transition_time))
}

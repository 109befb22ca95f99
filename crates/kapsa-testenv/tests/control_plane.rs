//! The test control plane itself, against its real API server: the upstream
//! controllers do their jobs, kwok runs pods, and the simulators answer.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::api::networking::v1::Ingress;
use kapsa_testenv::audit::{self, AuditEvent};
use kapsa_testenv::simulators::cert_manager::{certificate_resource, cluster_issuer_resource};
use kapsa_testenv::simulators::kpack::{self, image_resource, simulated_digest};
use kapsa_testenv::{ControlPlane, ControlPlaneOptions, TestEnv};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(60);

async fn env() -> (&'static TestEnv, Client) {
    let env = kapsa_testenv::shared().await;
    (env, env.client().await)
}

async fn namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
}

async fn create<K>(api: &Api<K>, value: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("valid object");
    api.create(&PostParams::default(), &object)
        .await
        .expect("object created")
}

/// Polls `check` until it returns `Some`, or fails the test after [`TIMEOUT`].
async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    kapsa_testenv::wait::eventually(TIMEOUT, what, check).await
}

fn deployment(name: &str, replicas: i32) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
            }
        }
    })
}

#[tokio::test]
async fn deployment_becomes_available_on_simulated_node() {
    let (env, client) = env().await;
    let ns = env.unique_name("deploy");
    namespace(&client, &ns).await;
    let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    create(&api, deployment("web", 2)).await;
    let available = eventually("the Deployment to become Available", || async {
        let d = api.get("web").await.ok()?;
        let status = d.status?;
        let available = status
            .conditions?
            .into_iter()
            .any(|c| c.type_ == "Available" && c.status == "True");
        (available && status.ready_replicas == Some(2)).then_some(status.available_replicas)
    })
    .await;
    assert_eq!(available, Some(2));
    let pods = Api::<Pod>::namespaced(client, &ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 2);
    for pod in pods.items {
        let spec = pod.spec.unwrap();
        assert_eq!(
            spec.node_name.as_deref(),
            Some(kapsa_testenv::control_plane::FAKE_NODE_NAME)
        );
        assert_eq!(pod.status.unwrap().phase.as_deref(), Some("Running"));
    }
}

#[tokio::test]
async fn deleting_a_namespace_finishes() {
    let (env, client) = env().await;
    let ns = env.unique_name("doomed");
    namespace(&client, &ns).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    create(&cms, json!({"metadata": {"name": "c"}, "data": {"k": "v"}})).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
    eventually("the namespace to be gone", || async {
        namespaces.get_opt(&ns).await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn owned_object_is_garbage_collected_with_its_owner() {
    let (env, client) = env().await;
    let ns = env.unique_name("gc");
    namespace(&client, &ns).await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let owner = create(&cms, json!({"metadata": {"name": "owner"}})).await;
    create(
        &cms,
        json!({"metadata": {"name": "owned", "ownerReferences": [{
            "apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.uid().unwrap()
        }]}}),
    )
    .await;
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    eventually("the owned ConfigMap to be collected", || async {
        cms.get_opt("owned").await.ok()?.is_none().then_some(())
    })
    .await;
}

#[tokio::test]
async fn job_pod_completes() {
    let (env, client) = env().await;
    let ns = env.unique_name("job");
    namespace(&client, &ns).await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    create(
        &jobs,
        json!({"metadata": {"name": "once"}, "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "build", "image": "registry.example/builder:1"}]
        }}}}),
    )
    .await;
    let succeeded = eventually("the Job to complete", || async {
        let status = jobs.get("once").await.ok()?.status?;
        let complete = status
            .conditions?
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True");
        complete.then_some(status.succeeded)
    })
    .await;
    assert_eq!(succeeded, Some(1));
}

fn image(name: &str, revision: &str) -> Value {
    json!({
        "apiVersion": "kpack.io/v1alpha2", "kind": "Image",
        "metadata": {"name": name},
        "spec": {
            "tag": format!("registry.example/kapsa/{name}"),
            "serviceAccountName": "builder",
            "builder": {"kind": "ClusterBuilder", "name": "default"},
            "source": {"git": {"url": "https://git.example/shop.git", "revision": revision}}
        }
    })
}

fn ready_status(object: &DynamicObject) -> Option<(String, Option<String>)> {
    let cond = object.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")?
        .clone();
    Some((
        cond["status"].as_str()?.to_string(),
        cond["reason"].as_str().map(str::to_string),
    ))
}

#[tokio::test]
async fn kpack_simulator_builds_and_fails_images() {
    let (env, client) = env().await;
    let ns = env.unique_name("kpack");
    namespace(&client, &ns).await;
    let images: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &image_resource());
    let commit = "3f2a9c1e3f2a9c1e3f2a9c1e3f2a9c1e3f2a9c1e";
    images
        .create(
            &PostParams::default(),
            &serde_json::from_value(image("shop", commit)).unwrap(),
        )
        .await
        .unwrap();
    let latest = eventually("the simulated build", || async {
        let img = images.get("shop").await.ok()?;
        (ready_status(&img)?.0 == "True").then(|| img.data["status"]["latestImage"].clone())
    })
    .await;
    let expected = format!(
        "registry.example/kapsa/shop@{}",
        simulated_digest("https://git.example/shop.git", commit)
    );
    assert_eq!(latest, json!(expected));

    // A revision listed in the settings fails, and the last good image stays.
    let bad = "badbadbadbadbadbadbadbadbadbadbadbadbadb";
    let settings: Api<ConfigMap> = Api::namespaced(client.clone(), kpack::SETTINGS_NAMESPACE);
    settings
        .patch(
            kpack::SETTINGS_NAME,
            &PatchParams::apply("test").force(),
            &Patch::Apply(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": kpack::SETTINGS_NAME}, "data": {"failRevisions": bad}})),
        )
        .await
        .unwrap();
    images
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"source": {"git": {"revision": bad}}}})),
        )
        .await
        .unwrap();
    let failed = eventually("the failed build", || async {
        let img = images.get("shop").await.ok()?;
        let (status, reason) = ready_status(&img)?;
        (status == "False").then_some((reason, img.data["status"]["latestImage"].clone()))
    })
    .await;
    assert_eq!(failed.0.as_deref(), Some("BuildFailed"));
    assert_eq!(
        failed.1,
        json!(expected),
        "a failed build keeps the last good image"
    );
}

async fn cluster_issuer(client: &Client, name: &str, dns01: bool) {
    let solver = if dns01 {
        json!({"dns01": {"webhook": {}}})
    } else {
        json!({"http01": {"ingress": {}}})
    };
    let issuers: Api<DynamicObject> = Api::all_with(client.clone(), &cluster_issuer_resource());
    let issuer = serde_json::from_value(json!({
        "apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer",
        "metadata": {"name": name},
        "spec": {"acme": {"server": "https://acme.example/directory", "solvers": [solver]}}
    }))
    .unwrap();
    issuers
        .create(&PostParams::default(), &issuer)
        .await
        .unwrap();
}

#[tokio::test]
async fn annotated_ingress_gets_ready_certificate_and_tls_secret() {
    let (env, client) = env().await;
    let ns = env.unique_name("tls");
    let issuer = env.unique_name("http01-issuer");
    namespace(&client, &ns).await;
    cluster_issuer(&client, &issuer, false).await;
    let hosts = ["shop.apps.example.com", "www.shop.apps.example.com"];
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), &ns);
    create(
        &ingresses,
        json!({
            "metadata": {"name": "web", "annotations": {"cert-manager.io/cluster-issuer": issuer}},
            "spec": {
                "ingressClassName": "nginx",
                "tls": [{"hosts": hosts, "secretName": "shop-tls"}],
                "rules": [{"host": hosts[0], "http": {"paths": [{"path": "/", "pathType": "Prefix",
                    "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]
            }
        }),
    )
    .await;
    let certs: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &certificate_resource());
    eventually("a Ready Certificate", || async {
        let cert = certs.get_opt("shop-tls").await.ok()??;
        (ready_status(&cert)?.0 == "True").then_some(())
    })
    .await;
    let secret = Api::<Secret>::namespaced(client.clone(), &ns)
        .get("shop-tls")
        .await
        .unwrap();
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let data: BTreeMap<_, _> = secret.data.unwrap();
    assert!(data.contains_key("tls.key"));
    let pem = &data["tls.crt"].0;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).expect("PEM");
    let cert = pem.parse_x509().expect("an X.509 certificate");
    let san = cert
        .subject_alternative_name()
        .unwrap()
        .expect("SANs")
        .value;
    let mut names: Vec<String> = san
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .collect();
    names.sort();
    assert_eq!(names, hosts.map(String::from).to_vec());
}

#[tokio::test]
async fn wildcard_certificate_needs_a_dns01_issuer() {
    let (env, client) = env().await;
    let ns = env.unique_name("wildcard");
    let http01 = env.unique_name("http01-only");
    let dns01 = env.unique_name("dns01");
    namespace(&client, &ns).await;
    cluster_issuer(&client, &http01, false).await;
    cluster_issuer(&client, &dns01, true).await;
    let certs: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &certificate_resource());
    for (name, issuer) in [("refused", &http01), ("issued", &dns01)] {
        let cert = serde_json::from_value(json!({
            "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": name},
            "spec": {"secretName": name, "dnsNames": ["*.shop.apps.example.com", "shop.apps.example.com"],
                "issuerRef": {"name": issuer, "kind": "ClusterIssuer"}}
        }))
        .unwrap();
        certs.create(&PostParams::default(), &cert).await.unwrap();
    }
    let refused = eventually("the wildcard refusal", || async {
        let (status, reason) = ready_status(&certs.get("refused").await.ok()?)?;
        (status == "False").then_some(reason)
    })
    .await;
    assert_eq!(refused.as_deref(), Some("WildcardRequiresDNS01"));
    eventually("the DNS-01 wildcard certificate", || async {
        let (status, _) = ready_status(&certs.get("issued").await.ok()?)?;
        (status == "True").then_some(())
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(client, &ns);
    assert!(secrets.get_opt("issued").await.unwrap().is_some());
    assert!(secrets.get_opt("refused").await.unwrap().is_none());
}

#[tokio::test]
async fn dropping_a_control_plane_leaves_no_process() {
    let env = kapsa_testenv::shared().await;
    let plane = ControlPlane::start(ControlPlaneOptions {
        state_dir: None,
        assets_dir: Some(env.assets_dir().to_path_buf()),
    })
    .await
    .expect("a second control plane starts");
    let pids = plane.pids();
    let dir = plane.dir().to_path_buf();
    assert!(
        plane.audit_log().is_none(),
        "the audit log is off by default"
    );
    assert!(!dir.join("audit.log").exists());
    assert_eq!(
        pids.len(),
        5,
        "etcd, apiserver, controller-manager, scheduler, kwok"
    );
    for pid in &pids {
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
    drop(plane);
    for pid in &pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived its control plane"
        );
    }
    assert!(!dir.exists(), "the temporary folder is removed");
}

#[tokio::test]
async fn audit_log_attributes_each_request_to_its_user() {
    let (env, admin) = env().await;
    let ns = env.unique_name("audit");
    namespace(&admin, &ns).await;
    let log = env.audit_log();
    let probe = env.client_as("audit-probe", &["system:masters"]).await;
    let mark = log.mark().await;

    let cms: Api<ConfigMap> = Api::namespaced(probe, &ns);
    create(
        &cms,
        json!({"metadata": {"name": "probe"}, "data": {"k": "v"}}),
    )
    .await;
    cms.get("probe").await.unwrap();
    cms.get("probe").await.unwrap();
    // The admin's own requests in between belong to the admin.
    Api::<ConfigMap>::namespaced(admin.clone(), &ns)
        .get("probe")
        .await
        .unwrap();
    cms.patch(
        "probe",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "w"}})),
    )
    .await
    .unwrap();
    cms.delete("probe", &DeleteParams::default()).await.unwrap();

    let events = log.events_since(mark).await;
    let probe_events: Vec<&AuditEvent> =
        events.iter().filter(|e| e.user == "audit-probe").collect();
    let expected: BTreeMap<String, usize> = [
        ("create configmaps", 1),
        ("get configmaps", 2),
        ("patch configmaps", 1),
        ("delete configmaps", 1),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(audit::summary_by(&events, "audit-probe"), expected);
    let verbs: Vec<&str> = probe_events.iter().map(|e| e.verb.as_str()).collect();
    assert_eq!(verbs, ["create", "get", "get", "patch", "delete"]);
    for e in &probe_events {
        assert_eq!(
            (
                e.api_group.as_str(),
                e.resource.as_str(),
                e.subresource.as_str()
            ),
            ("", "configmaps", ""),
            "{e}"
        );
        assert_eq!(
            (e.namespace.as_str(), e.name.as_str()),
            (ns.as_str(), "probe"),
            "{e}"
        );
        assert_eq!(e.stage, "ResponseComplete");
        assert!(
            e.groups.iter().any(|g| g == "system:masters"),
            "{e}: {:?}",
            e.groups
        );
        assert!(!e.audit_id.is_empty() && !e.request_received_timestamp.is_empty());
    }
    let codes: Vec<u16> = probe_events.iter().map(|e| e.response_code).collect();
    assert_eq!(codes, [201, 200, 200, 200, 200]);
    assert_eq!(
        audit::count(&events, |e| e.user == "audit-probe" && e.is_write()),
        3
    );

    let admin_gets: Vec<&AuditEvent> = events
        .iter()
        .filter(|e| {
            e.verb == "get" && e.namespace == ns && e.name == "probe" && e.user != "audit-probe"
        })
        .collect();
    assert_eq!(admin_gets.len(), 1, "{admin_gets:#?}");
    assert_eq!(admin_gets[0].user, "kapsa-admin");
    // The namespace was created before the mark, by the admin.
    assert_eq!(
        audit::count(&events, |e| e.resource == "namespaces"
            && e.name == ns
            && e.is_write()),
        0
    );
}

#[tokio::test]
async fn audit_log_records_a_refused_request() {
    let (env, admin) = env().await;
    let ns = env.unique_name("refused");
    namespace(&admin, &ns).await;
    let cms: Api<ConfigMap> = Api::namespaced(admin, &ns);
    create(&cms, json!({"metadata": {"name": "secret-ish"}})).await;
    let log = env.audit_log();
    let mark = log.mark().await;

    let nobody: Api<ConfigMap> = Api::namespaced(env.client_as("nobody", &[]).await, &ns);
    match nobody.get("secret-ish").await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("a user outside system:masters read a ConfigMap: {other:?}"),
    }

    let events = log.events_since(mark).await;
    let refused: Vec<&AuditEvent> = events.iter().filter(|e| e.user == "nobody").collect();
    assert_eq!(
        refused.len(),
        1,
        "{:#?}",
        audit::summary_by(&events, "nobody")
    );
    let e = refused[0];
    assert_eq!(
        (
            e.verb.as_str(),
            e.resource.as_str(),
            e.namespace.as_str(),
            e.name.as_str()
        ),
        ("get", "configmaps", ns.as_str(), "secret-ish")
    );
    assert_eq!(e.response_code, 403);
    assert!(
        !e.groups.iter().any(|g| g == "system:masters"),
        "{:?}",
        e.groups
    );
    assert!(
        e.groups.iter().any(|g| g == "system:authenticated"),
        "{:?}",
        e.groups
    );

    // Every group of a certificate counts, not only the first.
    let mark = log.mark().await;
    let member: Api<ConfigMap> = Api::namespaced(
        env.client_as("member", &["team-a", "system:masters", "team-b"])
            .await,
        &ns,
    );
    member
        .get("secret-ish")
        .await
        .expect("system:masters may read");
    let events = log.events_since(mark).await;
    let read: Vec<&AuditEvent> = events.iter().filter(|e| e.user == "member").collect();
    assert_eq!(read.len(), 1, "{:#?}", audit::summary_by(&events, "member"));
    assert_eq!(read[0].response_code, 200);
    assert_eq!(
        read[0].groups,
        ["team-a", "system:masters", "team-b", "system:authenticated"]
    );
}

#[tokio::test]
async fn audit_log_lines_appear_within_a_second_and_skip_the_noise() {
    let (env, admin) = env().await;
    let ns = env.unique_name("audit-noise");
    namespace(&admin, &ns).await;
    let log = env.audit_log();
    let user = "policy-probe";
    let client = env.client_as(user, &["system:masters"]).await;
    let mark = log.mark().await;

    // Not logged at all: health, version and discovery endpoints, and reads
    // of Events and Leases.
    for path in [
        "/readyz",
        "/livez",
        "/healthz",
        "/api",
        "/apis",
        "/openapi/v2",
    ] {
        let request = http::Request::get(path).body(Vec::new()).unwrap();
        client.request_text(request).await.unwrap();
    }
    client.apiserver_version().await.unwrap();
    Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap();
    Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), "kube-node-lease")
        .list(&ListParams::default())
        .await
        .unwrap();
    // Logged: a write, and a list of anything else.
    let sent = std::time::Instant::now();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    create(&cms, json!({"metadata": {"name": "sentinel"}})).await;
    let answered = sent.elapsed();
    log.wait_for(mark, Duration::from_secs(1), |events| {
        audit::count(events, |e| e.user == user && e.verb == "create") == 1
    })
    .await
    .unwrap_or_else(|events| {
        panic!(
            "the create was not in the audit log within 1 s: {:#?}",
            audit::summary_by(&events, user)
        )
    });
    let latency = sent.elapsed();
    eprintln!(
        "audit line in the file {:.1} ms after the request was sent ({:.1} ms to answer)",
        latency.as_secs_f64() * 1e3,
        answered.as_secs_f64() * 1e3
    );
    cms.list(&ListParams::default()).await.unwrap();
    let events = log.events_since(mark).await;
    let expected: BTreeMap<String, usize> = [("create configmaps", 1), ("list configmaps", 1)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    assert_eq!(audit::summary_by(&events, user), expected);
}

//! The real lane's foundation (docs/real-lane.md): a real node joined to the
//! test control plane runs an image pushed to the loopback registry, and its
//! teardown leaves the host as it was.
//!
//! Each test runs where the machine can run the lane (Linux, root) and the
//! binaries of `hack/install-real-lane.sh` are built; `KAPSA_REAL_LANE=1`
//! builds them first, `KAPSA_REAL_LANE=0` skips the tests
//! ([`real_node::real_lane_test`]).
//!
//! `KAPSA_REAL_LANE=1 cargo test -p kapsa-testenv --test real_node`

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kapsa_testenv::real_node::{
    self, BRIDGE, ImageFile, REAL_NODE_LABEL, REAL_NODE_TAINT, RealNode, SYSCTLS,
};
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TIMEOUT: Duration = Duration::from_secs(120);

/// One real node at a time: two kubelets on one host would share cgroups.
static ONE_NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn enabled(test: &str) -> bool {
    real_node::real_lane_test(test, &[])
}

fn assets() -> PathBuf {
    real_node::find_real_lane_assets().expect("the real lane's binaries")
}

/// A busybox httpd image serving `/www/index.html` = `page` on port 8080.
fn httpd_image(node: &RealNode, assets: &Path, name: &str, page: &str) -> String {
    let busybox = std::fs::read(assets.join("busybox")).expect("busybox");
    node.push_image(
        name,
        &[
            ImageFile::new("/bin/busybox", busybox, 0o755),
            ImageFile::new("/www/index.html", page, 0o644),
        ],
        &["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"],
    )
    .expect("image pushed")
}

async fn namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("namespace created");
}

/// Applies a Deployment of `image` pinned to the real node, waits until it is
/// Available, and returns its pod's IP and how long it took.
async fn run_on_real_node(client: &Client, ns: &str, image: &str) -> (String, Duration) {
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "nodeSelector": {REAL_NODE_LABEL: "true"},
                    "tolerations": [{"key": REAL_NODE_TAINT, "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
                    "automountServiceAccountToken": false,
                    "enableServiceLinks": false,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "web",
                        "image": image,
                        "ports": [{"containerPort": 8080}],
                        "readinessProbe": {
                            "httpGet": {"path": "/", "port": 8080},
                            "periodSeconds": 1
                        }
                    }]
                }
            }
        }
    }))
    .unwrap();
    let applied = Instant::now();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .expect("deployment created");
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    kapsa_testenv::wait::eventually(TIMEOUT, "the Deployment to be Available", || {
        let deployments = deployments.clone();
        let pods = pods.clone();
        async move {
            let d = deployments.get("web").await.ok()?;
            let available = d
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Available" && c.status == "True");
            if !available {
                return None;
            }
            let list = pods
                .list(&ListParams::default().labels("app=web"))
                .await
                .ok()?;
            list.items
                .into_iter()
                .find_map(|p| p.status?.pod_ip)
                .map(|ip| (ip, applied.elapsed()))
        }
    })
    .await
}

async fn http_get(addr: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

#[tokio::test]
async fn a_deployment_runs_on_the_real_node_and_serves_its_page() {
    if !enabled("a_deployment_runs_on_the_real_node_and_serves_its_page") {
        return;
    }
    let _one = ONE_NODE.lock().await;
    let assets = tokio::task::spawn_blocking(assets).await.unwrap();
    let env = kapsa_testenv::shared().await;
    let client = env.client().await;

    let started = Instant::now();
    let mut node = RealNode::start(env, &assets)
        .await
        .expect("real node Ready");
    let ready = started.elapsed();

    let marker = format!("kapsa-real-lane-marker-{}", std::process::id());
    let image = httpd_image(
        &node,
        &assets,
        "kapsa/web",
        &format!("<html><body>{marker}</body></html>\n"),
    );
    assert!(
        image.starts_with(&format!("{}/kapsa/web@sha256:", node.registry())),
        "{image}"
    );
    let ns = env.unique_name("real-lane");
    namespace(&client, &ns).await;
    let (pod_ip, available) = run_on_real_node(&client, &ns, &image).await;

    let pod = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
        .remove(0);
    assert_eq!(
        pod.spec.and_then(|s| s.node_name).as_deref(),
        Some(node.name()),
        "the pod runs on the real node"
    );
    let response = http_get(&format!("{pod_ip}:8080"))
        .await
        .expect("the pod answers on its IP");
    assert!(response.starts_with("HTTP/1."), "{response}");
    assert!(response.contains(" 200 "), "{response}");
    assert!(response.contains(&marker), "{response}");
    // The API server reaches the kubelet (its serving certificate signed by
    // the cluster CA, the API server's kubelet client certificate):
    // `kubectl exec` runs in the container, `kubectl logs` answers.
    let pod_name = pod.metadata.name.clone().expect("a pod name");
    let kubectl = |args: &[&str]| {
        std::process::Command::new(env.assets_dir().join("kubectl"))
            .arg(format!("--kubeconfig={}", env.kubeconfig_path().display()))
            .args(["-n", &ns])
            .args(args)
            .output()
            .expect("kubectl runs")
    };
    let exec = kubectl(&[
        "exec",
        &pod_name,
        "--",
        "/bin/busybox",
        "cat",
        "/www/index.html",
    ]);
    assert!(
        exec.status.success() && String::from_utf8_lossy(&exec.stdout).contains(&marker),
        "kubectl exec: {}{}",
        String::from_utf8_lossy(&exec.stdout),
        String::from_utf8_lossy(&exec.stderr)
    );
    let logs = kubectl(&["logs", &pod_name]);
    assert!(
        logs.status.success(),
        "kubectl logs: {}",
        String::from_utf8_lossy(&logs.stderr)
    );
    // The node's identity is its own Node's: the Node authorizer refuses it
    // another node's object and Secrets of pods not bound to it.
    let node_client = env
        .client_as(&format!("system:node:{}", node.name()), &["system:nodes"])
        .await;
    let refused = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(node_client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .expect_err("a node may not list Secrets");
    assert!(
        matches!(refused, kube::Error::Api(ref s) if s.code == 403),
        "{refused:?}"
    );
    let other = Api::<k8s_openapi::api::core::v1::Node>::all(node_client)
        .patch(
            kapsa_testenv::control_plane::FAKE_NODE_NAME,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {"stolen": "true"}}})),
        )
        .await
        .expect_err("a node may not change another Node");
    assert!(
        matches!(other, kube::Error::Api(ref s) if s.code == 403 || s.code == 404),
        "{other:?}"
    );
    node.ensure_running()
        .expect("the node's processes still run");
    let rss: Vec<String> = node
        .pids()
        .into_iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            format!("{} {}", field("Name:"), field("VmRSS:"))
        })
        .collect();
    println!("RSS: {}", rss.join(", "));
    println!(
        "timings: node Ready {:.2}s after start (registry, pause image, containerd, kubelet); Deployment applied -> Available {:.2}s; pod {pod_ip} answered",
        ready.as_secs_f64(),
        available.as_secs_f64()
    );

    let stopping = Instant::now();
    node.stop();
    println!("timings: stop {:.2}s", stopping.elapsed().as_secs_f64());
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}

/// What the node could leave behind on the host.
#[derive(Debug, PartialEq, Eq)]
struct HostState {
    processes: BTreeSet<(i32, String)>,
    mounts: BTreeSet<String>,
    links: BTreeSet<String>,
    iptables: BTreeMap<String, BTreeSet<String>>,
    netns: BTreeSet<String>,
    kubepods: Vec<PathBuf>,
    sysctls: Vec<(String, Option<String>)>,
    paths: BTreeMap<String, bool>,
}

const OUR_PROGRAMS: [&str; 8] = [
    "containerd",
    "containerd-shim-runc-v2",
    "kubelet",
    "registry",
    "pause",
    "busybox",
    "httpd",
    "runc",
];

fn host_state(node_dir: Option<&Path>, extra_paths: &[String]) -> HostState {
    let mut processes = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
            continue;
        };
        let comm = comm.trim().to_string();
        // A zombie has released everything but its PID; init reaps the
        // orphaned shims' zombies in its own time.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let zombie = stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if zombie {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let mentions_node = node_dir.is_some_and(|d| {
            let d = d.to_string_lossy();
            String::from_utf8_lossy(&cmdline).contains(d.as_ref())
        });
        // comm is cut at 15 characters.
        if OUR_PROGRAMS
            .iter()
            .any(|p| p.starts_with(&comm) && comm.len() >= 4)
            || mentions_node
        {
            processes.insert((pid, comm));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(1))
        .filter(|m| {
            m.starts_with("/run") || node_dir.is_some_and(|d| m.starts_with(&*d.to_string_lossy()))
        })
        .map(str::to_string)
        .collect();
    let links = std::fs::read_dir("/sys/class/net")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut iptables = BTreeMap::new();
    for command in ["iptables", "ip6tables"] {
        for table in ["filter", "nat", "mangle"] {
            iptables.insert(
                format!("{command} -t {table}"),
                real_node::iptables_rules(command, table),
            );
        }
    }
    let netns = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let sysctls = SYSCTLS
        .iter()
        .map(|s| (s.to_string(), real_node::read_sysctl(s)))
        .collect();
    let paths = [
        "/run/containerd",
        "/run/containerd/s",
        "/var/lib/cni",
        "/var/log/containers",
        "/var/log/pods",
        "/var/lib/kubelet",
        "/var/lib/containerd",
        "/opt/containerd",
        "/etc/cni",
        "/var/run/nri",
        "/usr/libexec/kubernetes",
    ]
    .iter()
    .map(|p| p.to_string())
    .chain(extra_paths.iter().cloned())
    .map(|p| {
        let exists = Path::new(&p).exists();
        (p, exists)
    })
    .collect();
    HostState {
        processes,
        mounts,
        links,
        iptables,
        netns,
        kubepods: real_node::kubepods_cgroups(),
        sysctls,
        paths,
    }
}

#[tokio::test]
async fn teardown_leaves_the_host_as_it_was() {
    if !enabled("teardown_leaves_the_host_as_it_was") {
        return;
    }
    let _one = ONE_NODE.lock().await;
    let assets = tokio::task::spawn_blocking(assets).await.unwrap();
    let env = kapsa_testenv::shared().await;
    let client = env.client().await;

    // kubectl's discovery cache for this API server (the node runs kubectl
    // to delete its Node).
    let extra = vec![format!(
        "{}/.kube/cache/discovery/{}",
        std::env::var("HOME").unwrap_or_default(),
        env.api_server_url()
            .trim_start_matches("https://")
            .replace(':', "_")
    )];
    let before = host_state(None, &extra);
    let mut node = RealNode::start(env, &assets)
        .await
        .expect("real node Ready");
    let node_dir = node.dir().to_path_buf();
    let image = httpd_image(&node, &assets, "kapsa/teardown", "teardown\n");
    let ns = env.unique_name("real-lane-teardown");
    namespace(&client, &ns).await;
    run_on_real_node(&client, &ns, &image).await;

    // While it runs, the host is changed: so the comparison below means something.
    let during = host_state(Some(&node_dir), &extra);
    assert!(during.links.contains(BRIDGE), "{:?}", during.links);
    assert!(!during.kubepods.is_empty());
    assert!(
        during.processes.len() > before.processes.len(),
        "{:?}",
        during.processes
    );
    let pids = node.pids();

    let stopping = Instant::now();
    node.stop();
    let stop_time = stopping.elapsed();
    let after = host_state(Some(&node_dir), &extra);
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;

    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} survived"
        );
    }
    assert!(!node_dir.exists(), "{} is left", node_dir.display());
    assert!(
        after.processes.is_subset(&before.processes),
        "processes left: {:?}",
        after.processes.difference(&before.processes)
    );
    assert_eq!(after.mounts, before.mounts, "mounts");
    assert_eq!(after.links, before.links, "links");
    assert_eq!(after.iptables, before.iptables, "iptables rules and chains");
    assert_eq!(after.netns, before.netns, "/run/netns");
    assert_eq!(after.kubepods, before.kubepods, "kubepods cgroups");
    assert_eq!(after.sysctls, before.sysctls, "sysctls");
    assert_eq!(after.paths, before.paths, "host paths");
    assert_eq!(after, before);
    println!(
        "timings: stop with one pod running {:.2}s",
        stop_time.as_secs_f64()
    );
}

#[tokio::test]
async fn a_failed_start_cleans_up_too() {
    if !enabled("a_failed_start_cleans_up_too") {
        return;
    }
    let _one = ONE_NODE.lock().await;
    let assets = tokio::task::spawn_blocking(assets).await.unwrap();
    let env = kapsa_testenv::shared().await;

    // The real binaries, but a kubelet that exits at once: start fails after
    // the registry and containerd are up.
    let broken = tempfile::tempdir().unwrap();
    for binary in real_node::REAL_LANE_BINARIES {
        if binary != "kubelet" {
            std::os::unix::fs::symlink(assets.join(binary), broken.path().join(binary)).unwrap();
        }
    }
    let kubelet = broken.path().join("kubelet");
    std::fs::write(&kubelet, "#!/bin/sh\necho broken kubelet >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(
        &kubelet,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    let before = host_state(None, &[]);
    let error = RealNode::start(env, broken.path())
        .await
        .expect_err("kubelet exits");
    assert!(error.to_string().contains("kubelet"), "{error}");
    let after = host_state(None, &[]);
    assert_eq!(after, before);
    assert!(
        std::fs::read_dir(std::env::temp_dir().join("kapsa-testenv"))
            .unwrap()
            .flatten()
            .all(|e| !e
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("node-{}-", std::process::id()))),
        "the node's folder is removed"
    );
}

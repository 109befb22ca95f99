//! The perturbation suite, part 2: chaos. Projects converge while
//! everything around the operator fails at seeded random moments:
//!
//! - the operator is SIGKILLed after a random lifetime (0.1 to 3 s: during
//!   its start-up listing, mid-reconcile, or at rest) and started again,
//!   over and over;
//! - meanwhile about half the Projects get a second commit, the preview
//!   branches of a third of them are deleted, and the last quarter of them
//!   is created late in the run;
//! - kube-apiserver is restarted (every watch breaks; one resumed from too
//!   old a resourceVersion gets `410 Gone` and lists again) and so is etcd
//!   (the API server stays up but reads and writes nothing), both while the
//!   operator runs;
//! - the git server answers `503` for a while (polls fail);
//! - the platform's registry push Secret is deleted, then restored.
//!
//! The seed is printed; `KAPSA_CHAOS_SEED=<seed>` replays a run (the same
//! moments and choices; the processes' own timing differs). Quick form
//! (`make test`): 12 Projects, 30 kills. Long form (`KAPSA_PERTURBATION_LONG=1`,
//! or `KAPSA_CHAOS_PROJECTS` and `KAPSA_CHAOS_KILLS`): 50 Projects, 200 kills.
//!
//! The oracle, read from the API server (objects and its audit log), after
//! the last restart: every Project converges (production Ready at its
//! branch's head, a preview Ready for each branch still there and none for a
//! deleted one, the Project's status listing them); no orphan; at most one
//! build per commit and one rollout per deployed commit; every image is the
//! simulator's digest for its commit and the Deployment runs it; every
//! Ingress host is its Project's, which the host-ownership table gives it;
//! Projects alike have the same Kapsa objects; and then no writes at rest.
//! It runs on a control plane of its own (it restarts kube-apiserver and
//! etcd).

use super::*;

use k8s_openapi::api::core::v1::Secret;
use kapsa_testenv::control_plane::{ControlPlane, ControlPlaneOptions};

/// The operator's user (audit log attribution).
const USER_CHAOS: &str = "kapsa-chaos";
/// How long the end state may take after the last restart.
const CHAOS_CONVERGE_TIMEOUT: Duration = Duration::from_secs(300);

/// One Project of the run and what its end state must be.
struct ChaosProject {
    name: String,
    repo: TestRepo,
    /// Preview environments enabled, with a branch made at the start.
    previews: bool,
    /// Its preview branch is deleted mid-run.
    branch_deleted: bool,
    /// main gets a second commit mid-run.
    second_commit: bool,
    /// Every commit main has pointed at, oldest first.
    main_commits: Vec<String>,
    branch_head: Option<String>,
}

impl ChaosProject {
    fn class(&self) -> (bool, bool) {
        (self.previews, self.previews && !self.branch_deleted)
    }

    fn head(&self) -> String {
        self.main_commits.last().cloned().unwrap()
    }

    fn preview(&self) -> String {
        kapsa_api::naming::preview_environment_name(PREVIEW_BRANCH)
    }

    /// The Environments it must end with: name → commit.
    fn expected(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::from([("production".to_string(), self.head())]);
        if self.previews && !self.branch_deleted {
            out.insert(self.preview(), self.branch_head.clone().unwrap());
        }
        out
    }

    /// Whether the API server shows its end state.
    async fn converged(&self, client: &Client) -> bool {
        for (env, commit) in self.expected() {
            if !env_ready(client, &self.name, &env, &commit).await {
                return false;
            }
        }
        if self.branch_deleted
            && !matches!(
                Api::<Environment>::namespaced(client.clone(), &self.name)
                    .get_opt(&self.preview())
                    .await,
                Ok(None)
            )
        {
            return false;
        }
        let Ok(Some(project)) = Api::<Project>::all(client.clone())
            .get_opt(&self.name)
            .await
        else {
            return false;
        };
        let status = project.status.unwrap_or_default();
        status.latest_commit.as_deref() == Some(self.head().as_str())
            && status.environments.len() == self.expected().len()
            && status.environments.iter().all(|e| e.ready)
    }
}

/// What the chaos does right after the kill that ends the operator's
/// `i`-th life, with the operator down; and what it does during a life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disruption {
    /// The last quarter of the Projects is created.
    LateProjects,
    SecondCommits,
    DeleteBranches,
    RestartApiServer,
    GitDown,
    GitUp,
    RestartEtcd,
    DeleteRegistrySecret,
    RestoreRegistrySecret,
}

impl Disruption {
    /// Where each falls among `kills` lives (a fraction of the run).
    fn schedule(kills: usize) -> BTreeMap<usize, Vec<Disruption>> {
        let at = |fraction: f64| ((kills as f64 * fraction) as usize).min(kills - 1);
        let mut out: BTreeMap<usize, Vec<Disruption>> = BTreeMap::new();
        for (fraction, d) in [
            (0.1, Disruption::RestartApiServer),
            (0.2, Disruption::GitDown),
            (0.3, Disruption::GitUp),
            (0.35, Disruption::DeleteRegistrySecret),
            (0.45, Disruption::SecondCommits),
            (0.55, Disruption::RestoreRegistrySecret),
            (0.65, Disruption::DeleteBranches),
            (0.75, Disruption::RestartEtcd),
            (0.85, Disruption::LateProjects),
        ] {
            out.entry(at(fraction)).or_default().push(d);
        }
        out
    }

    /// Whether it happens while the operator runs (rather than while it is
    /// down between two lives).
    fn while_running(self) -> bool {
        matches!(self, Disruption::RestartApiServer | Disruption::RestartEtcd)
    }
}

fn env_number(name: &str) -> Option<usize> {
    std::env::var(name).ok()?.trim().parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let long = std::env::var("KAPSA_PERTURBATION_LONG").is_ok_and(|v| !v.is_empty() && v != "0");
    let projects = env_number("KAPSA_CHAOS_PROJECTS").unwrap_or(if long { 50 } else { 12 });
    let kills = env_number("KAPSA_CHAOS_KILLS")
        .unwrap_or(if long { 200 } else { 30 })
        .max(1);
    let seed = std::env::var("KAPSA_CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!(
        "chaos: {projects} Projects, {kills} kills, seed {seed} (KAPSA_CHAOS_SEED={seed} replays it)"
    );
    let mut rng = fastrand::Rng::with_seed(seed);

    let mut plane = ControlPlane::start_with_audit_log(ControlPlaneOptions::default())
        .await
        .expect("a control plane");
    let audit = plane.audit_log().expect("its audit log");
    let client = plane.client().await.expect("a client");
    kapsa_testenv::simulators::install(&client)
        .await
        .expect("simulators installed");
    let simulators = tokio::spawn(kapsa_testenv::simulators::run(client.clone()));
    install_platform(&client).await;
    let secrets = Api::<Secret>::namespaced(client.clone(), PLATFORM_NAMESPACE);
    let registry_secret = {
        let mut secret = secrets.get(REGISTRY_SECRET).await.expect("the push Secret");
        secret.metadata = kube::api::ObjectMeta {
            name: secret.metadata.name,
            namespace: secret.metadata.namespace,
            ..Default::default()
        };
        secret
    };

    let git = GitServer::start(None).await.expect("git server");
    let mut chaos_projects = Vec::new();
    for i in 0..projects {
        let name = format!("chaos-{i:02}");
        let repo = git.create_repo(&name).expect("repository");
        let first = repo
            .commit("main", "app.txt", format!("v1 of {name}"), "first")
            .unwrap();
        let previews = i % 3 != 0;
        let branch_head = previews.then(|| {
            repo.commit(PREVIEW_BRANCH, "login.txt", "login", "login page")
                .unwrap()
        });
        chaos_projects.push(ChaosProject {
            name,
            repo,
            previews,
            branch_deleted: i % 3 == 2,
            second_commit: rng.bool(),
            main_commits: vec![first],
            branch_head,
        });
    }
    let late = projects - projects / 4;
    create_projects(&client, &chaos_projects[..late]).await;

    let logs = tempfile::Builder::new()
        .prefix("kapsa-chaos-")
        .tempdir()
        .unwrap();
    let kubeconfig = plane
        .kubeconfig_as(USER_CHAOS, &["system:masters"])
        .expect("the operator's kubeconfig");
    let start = |life: usize| {
        Operator::start(
            &kubeconfig,
            logs.path().join(format!("{life:04}.log")),
            None,
            None,
        )
    };
    let begun = audit.mark().await;
    let mut operator = start(0);
    let schedule = Disruption::schedule(kills);
    let mut lifetimes = Vec::new();
    let mut done = Vec::new();
    for life in 0..kills {
        let lifetime = Duration::from_millis(rng.u64(100..=3000));
        lifetimes.push(lifetime);
        let disruptions = schedule.get(&life).cloned().unwrap_or_default();
        let (during, after): (Vec<_>, Vec<_>) =
            disruptions.into_iter().partition(|d| d.while_running());
        let lived = Instant::now();
        for d in during {
            tokio::time::sleep(lifetime / 2).await;
            let down = Duration::from_millis(rng.u64(500..=3000));
            match d {
                Disruption::RestartApiServer => plane.restart_api_server(down).await,
                _ => plane.restart_etcd(down).await,
            }
            .unwrap_or_else(|e| panic!("{d:?}: {e}"));
            done.push(format!("{d:?} (down {down:?}) during life {life}"));
        }
        tokio::time::sleep(lifetime.saturating_sub(lived.elapsed())).await;
        if operator.running() {
            operator.kill();
        } else if operator.stepped_down() {
            // The API server was away longer than the lease's renew
            // deadline: the operator gave up leadership and exited, as it
            // must (its Pod would be restarted).
            done.push(format!("the operator stepped down in life {life}"));
        } else {
            panic!(
                "the operator exited by itself in life {life}; its log:\n{}",
                operator.tail(40)
            );
        }
        for d in after {
            match d {
                Disruption::LateProjects => create_projects(&client, &chaos_projects[late..]).await,
                Disruption::SecondCommits => {
                    for p in chaos_projects.iter_mut().filter(|p| p.second_commit) {
                        let second = p
                            .repo
                            .commit("main", "app.txt", format!("v2 of {}", p.name), "second")
                            .unwrap();
                        p.main_commits.push(second);
                    }
                }
                Disruption::DeleteBranches => {
                    for p in chaos_projects.iter().filter(|p| p.branch_deleted) {
                        p.repo.delete_branch(PREVIEW_BRANCH).unwrap();
                    }
                }
                Disruption::GitDown => git.set_down(true),
                Disruption::GitUp => git.set_down(false),
                Disruption::DeleteRegistrySecret => secrets
                    .delete(REGISTRY_SECRET, &DeleteParams::default())
                    .await
                    .map(|_| ())
                    .expect("deleting the push Secret"),
                Disruption::RestoreRegistrySecret => {
                    secrets
                        .create(&Default::default(), &registry_secret)
                        .await
                        .expect("restoring the push Secret");
                }
                Disruption::RestartApiServer | Disruption::RestartEtcd => unreachable!(),
            }
            done.push(format!("{d:?} after life {life}"));
        }
        operator = start(life + 1);
    }
    git.set_down(false);
    let last_restart = Instant::now();
    eprintln!(
        "chaos: {kills} kills done in {:.0}s (lifetimes {:?} to {:?}); disruptions: {}",
        started.elapsed().as_secs_f64(),
        lifetimes.iter().min().unwrap(),
        lifetimes.iter().max().unwrap(),
        done.join(", ")
    );

    // Convergence after the last restart.
    let deadline = Instant::now() + CHAOS_CONVERGE_TIMEOUT;
    loop {
        let mut waiting = Vec::new();
        for p in &chaos_projects {
            if !p.converged(&client).await {
                waiting.push(p.name.clone());
            }
        }
        if waiting.is_empty() {
            break;
        }
        if !operator.running() || Instant::now() > deadline {
            let environments: Vec<String> = Api::<Environment>::all(client.clone())
                .list(&ListParams::default())
                .await
                .map(|l| {
                    l.items
                        .into_iter()
                        .filter(|e| waiting.contains(&e.namespace().unwrap_or_default()))
                        .map(|e| {
                            format!(
                                "{}/{}: {:?}",
                                e.namespace().unwrap(),
                                e.name_any(),
                                e.status
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let kept = logs.keep();
            panic!(
                "chaos (seed {seed}): {waiting:?} did not converge within {CHAOS_CONVERGE_TIMEOUT:?} of the last restart (operator running: {}); their Environments:\n{}\noperator logs in {}; the last one ends:\n{}",
                operator.running(),
                environments.join("\n"),
                kept.display(),
                operator.tail(40)
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged_in = last_restart.elapsed();

    // No writes at rest (Lease renewals aside).
    let rest_deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mark = audit.mark().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let recent = writes(&audit, mark, USER_CHAOS, false).await;
        if recent.is_empty() {
            break;
        }
        if Instant::now() > rest_deadline {
            panic!(
                "chaos (seed {seed}): writes never stopped after convergence; the last window's:\n{}",
                summary(&recent)
            );
        }
    }
    let total_writes = writes(&audit, begun, USER_CHAOS, true).await.len();

    let resources = listable_resources(&client).await;
    let all = all_objects(&client, &resources).await;
    let mut failures = orphans(&all);
    failures.extend(check_projects(&client, &chaos_projects, &all).await);
    eprintln!(
        "chaos (seed {seed}): {projects} Projects converged {:.1}s after the last of {kills} restarts; {total_writes} operator writes in all; whole test {:.0}s",
        converged_in.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    operator.stop().await;
    simulators.abort();
    if !failures.is_empty() {
        let kept = logs.keep();
        panic!(
            "chaos (seed {seed}) broke the oracle (operator logs kept in {}):\n{}",
            kept.display(),
            failures.join("\n")
        );
    }
}

async fn create_projects(client: &Client, projects: &[ChaosProject]) {
    for p in projects {
        apply_json(
            client,
            &ApiResource::erase::<Project>(&()),
            None,
            project_manifest(&p.name, p.repo.url(), p.previews),
        )
        .await;
    }
}

/// The per-Project oracle: status against children, builds, rollouts,
/// hosts, and the same Kapsa objects for Projects alike.
async fn check_projects(
    client: &Client,
    projects: &[ChaosProject],
    all: &[(ApiResource, ApiCapabilities, Value)],
) -> Vec<String> {
    let mut failures = Vec::new();
    let find = |kind: &str, ns: &str, name: &str| {
        all.iter()
            .find(|(r, _, v)| {
                r.kind == kind && v["metadata"]["namespace"] == ns && v["metadata"]["name"] == name
            })
            .map(|(_, _, v)| v.clone())
    };
    let table = Api::<ConfigMap>::namespaced(client.clone(), PLATFORM_NAMESPACE)
        .get_opt(HOST_OWNERS)
        .await
        .unwrap()
        .and_then(|c| c.data)
        .unwrap_or_default();
    let mut hosts: BTreeMap<String, String> = BTreeMap::new();
    // Kapsa's objects per Project, by kind, namespace role and name.
    let mut shapes: BTreeMap<(bool, bool), (String, BTreeSet<String>)> = BTreeMap::new();
    for p in projects {
        let build_ns = kapsa_api::naming::build_namespace(&p.name);
        let url = p.repo.url();
        let environments = Api::<Environment>::namespaced(client.clone(), &p.name)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items;
        let names: BTreeSet<String> = environments.iter().map(|e| e.name_any()).collect();
        let expected = p.expected();
        if names != expected.keys().cloned().collect() {
            failures.push(format!(
                "{}: Environments {names:?}, expected {:?}",
                p.name,
                expected.keys()
            ));
        }
        for env in &environments {
            let name = env.name_any();
            let Some(commit) = expected.get(&name) else {
                continue;
            };
            let status = env.status.clone().unwrap_or_default();
            let digest = simulated_digest(url, commit);
            if !status
                .image
                .as_deref()
                .is_some_and(|i| i.ends_with(&format!("@{digest}")))
            {
                failures.push(format!(
                    "{}/{name}: image {:?}, expected …@{digest}",
                    p.name, status.image
                ));
            }
            if status.observed_generation != env.metadata.generation {
                failures.push(format!(
                    "{}/{name}: observedGeneration {:?} != generation {:?}",
                    p.name, status.observed_generation, env.metadata.generation
                ));
            }
            // Commits this Environment's branch has pointed at.
            let commits = if name == "production" {
                p.main_commits.len() as i64
            } else {
                1
            };
            match find("Image", &build_ns, &name) {
                Some(image) => {
                    let counter = image["status"]["buildCounter"].as_i64().unwrap_or(0);
                    if counter < 1 || counter > commits {
                        failures.push(format!(
                            "{}/{name}: {counter} builds for {commits} commit(s)",
                            p.name
                        ));
                    }
                    if image["status"]["latestImage"].as_str() != status.image.as_deref() {
                        failures.push(format!(
                            "{}/{name}: Image latestImage {}, the Environment says {:?}",
                            p.name, image["status"]["latestImage"], status.image
                        ));
                    }
                }
                None => failures.push(format!("{}/{name}: no kpack Image", p.name)),
            }
            match find("Deployment", &p.name, &name) {
                Some(d) => {
                    let image = d["spec"]["template"]["spec"]["containers"][0]["image"].as_str();
                    if image != status.image.as_deref() {
                        failures.push(format!(
                            "{}/{name}: Deployment runs {image:?}, the Environment says {:?}",
                            p.name, status.image
                        ));
                    }
                    let rollouts = all
                        .iter()
                        .filter(|(r, _, v)| {
                            r.kind == "ReplicaSet"
                                && v["metadata"]["namespace"] == p.name.as_str()
                                && v["metadata"]["ownerReferences"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .any(|o| {
                                        o["kind"] == "Deployment" && o["name"] == name.as_str()
                                    })
                        })
                        .count() as i64;
                    if rollouts > commits {
                        failures.push(format!(
                            "{}/{name}: {rollouts} rollouts for {commits} commit(s)",
                            p.name
                        ));
                    }
                }
                None => failures.push(format!("{}/{name}: no Deployment", p.name)),
            }
        }
        if p.branch_deleted {
            let preview = p.preview();
            for (kind, ns) in [
                ("Deployment", p.name.as_str()),
                ("Service", p.name.as_str()),
                ("Ingress", p.name.as_str()),
                ("Image", build_ns.as_str()),
            ] {
                if find(kind, ns, &preview).is_some() {
                    failures.push(format!(
                        "{}: the deleted branch's {kind} {ns}/{preview} remains",
                        p.name
                    ));
                }
            }
        }
        // Hosts.
        let host = format!("{}.{BASE}", p.name);
        if table.get(&host) != Some(&p.name) {
            failures.push(format!(
                "{}: host-ownership table gives {host} to {:?}",
                p.name,
                table.get(&host)
            ));
        }
        for (r, _, v) in all {
            if r.kind != "Ingress" || v["metadata"]["namespace"] != p.name.as_str() {
                continue;
            }
            for rule in v["spec"]["rules"].as_array().into_iter().flatten() {
                let Some(h) = rule["host"].as_str() else {
                    continue;
                };
                if h != host && !h.ends_with(&format!(".{host}")) {
                    failures.push(format!("{}: Ingress host {h} is not under {host}", p.name));
                }
                if let Some(other) = hosts.insert(h.to_string(), p.name.clone())
                    && other != p.name
                {
                    failures.push(format!("host {h} served by {other} and {}", p.name));
                }
            }
        }
        // The shape of Kapsa's objects: the same for Projects alike.
        let shape: BTreeSet<String> = all
            .iter()
            .filter(|(r, _, v)| !left_out(r) && kapsa_managed(v))
            .filter_map(|(r, _, v)| {
                let ns = v["metadata"]["namespace"].as_str().unwrap_or_default();
                let role = if ns == p.name {
                    "namespace"
                } else if ns == build_ns {
                    "build namespace"
                } else {
                    return None;
                };
                Some(format!(
                    "{} {role}/{}",
                    r.kind,
                    v["metadata"]["name"].as_str().unwrap_or_default()
                ))
            })
            .collect();
        match shapes.get(&p.class()) {
            None => {
                shapes.insert(p.class(), (p.name.clone(), shape));
            }
            Some((first, expected)) if *expected != shape => failures.push(format!(
                "{}'s Kapsa objects differ from {first}'s: only {}'s: {:?}; only {first}'s: {:?}",
                p.name,
                p.name,
                shape.difference(expected).collect::<Vec<_>>(),
                expected.difference(&shape).collect::<Vec<_>>()
            )),
            Some(_) => {}
        }
    }
    failures
}

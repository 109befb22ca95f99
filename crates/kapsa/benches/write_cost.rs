//! What one write costs the API server, by kind: the CPU time kube-apiserver
//! and etcd spend per request, for the kinds of write the operator makes.
//!
//! `cargo bench -p kapsa --bench write_cost -- [--objects N] [--writes W]
//! [--concurrency C] [--runs R]` (defaults: 500 objects, 2 writes each,
//! 16 at once, 3 runs).
//!
//! Why: on the 2-core machine of `docs/benchmarks.md` the scale bench's
//! phases keep both cores busy, so its ratios follow the CPU the API server
//! spends on each phase's writes, and those differ by kind. This bench
//! measures each kind alone, on one fresh control plane (with the audit log
//! on, as in the scale bench; no operator, no simulators):
//! - `environments/status` and `projects/status`: server-side apply of the
//!   status subresource (field manager `kapsa`, forced), as the operator
//!   writes statuses; each write changes the phase and its conditions, so
//!   none is a no-op;
//! - `environments/status (merge patch)`: the same statuses as a JSON merge
//!   patch, to tell the cost of server-side apply from that of the write;
//! - `environments`: server-side apply of the spec (a new commit each time);
//! - `deployments` and `configmaps`: server-side apply of core objects (a
//!   new annotation or value each time; the Deployments are paused, so no
//!   controller reacts);
//! - `events`: creation of a core/v1 Event, as the operator publishes them.
//!
//! Per kind and run: N objects are made first (not timed), then W writes to
//! each, C at once; **CPU per write** = the CPU time kube-apiserver (and
//! etcd) used from the first write to the last, over the writes. The kinds
//! take turns within a run, in a different order each run. Printed: each
//! run's figures and the medians.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace};
use kapsa_api::{Environment, Project};
use kapsa_testenv::{ControlPlane, ControlPlaneOptions, find_assets};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde_json::{Value, json};

mod common;
use common::{cpu_by_process, cpu_delta, median};

const NAMESPACE: &str = "write-cost";
const MANAGER: &str = "kapsa";

#[derive(Parser, Debug)]
struct Args {
    /// Objects of each kind.
    #[arg(long, default_value_t = 500)]
    objects: usize,
    /// Writes to each object, per kind and run.
    #[arg(long, default_value_t = 2)]
    writes: usize,
    /// Writes in flight (the operator runs 16 reconciles at once per controller).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    EnvironmentStatus,
    EnvironmentStatusMerge,
    ProjectStatus,
    EnvironmentSpec,
    Deployment,
    ConfigMap,
    Event,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::EnvironmentStatus,
        Kind::EnvironmentStatusMerge,
        Kind::ProjectStatus,
        Kind::EnvironmentSpec,
        Kind::Deployment,
        Kind::ConfigMap,
        Kind::Event,
    ];

    fn label(self) -> &'static str {
        match self {
            Kind::EnvironmentStatus => "environments/status (apply)",
            Kind::EnvironmentStatusMerge => "environments/status (merge patch)",
            Kind::ProjectStatus => "projects/status (apply)",
            Kind::EnvironmentSpec => "environments (apply)",
            Kind::Deployment => "deployments (apply)",
            Kind::ConfigMap => "configmaps (apply)",
            Kind::Event => "events (create)",
        }
    }
}

fn name(i: usize) -> String {
    format!("app-{i:04}")
}

fn host(i: usize) -> String {
    format!("{}.apps.example.com", name(i))
}

fn image(i: usize) -> String {
    format!(
        "registry.example.com/kapsa/{}@sha256:{:064x}",
        name(i),
        i as u128 * 7919
    )
}

fn commit(i: usize, write: usize) -> String {
    format!("{:040x}", (i * 1000 + write) as u128 * 104_729)
}

fn condition(type_: &str, ready: bool, reason: &str, message: String, minute: usize) -> Value {
    json!({"type": type_, "status": if ready { "True" } else { "False" }, "reason": reason,
        "message": message, "observedGeneration": 2,
        "lastTransitionTime": format!("2026-01-01T00:{:02}:00Z", minute % 60)})
}

/// An Environment's status as the operator writes it: deploying (even
/// writes) or ready (odd), with the conditions and messages it sets.
fn environment_status(i: usize, write: usize) -> Value {
    let ready = write % 2 == 1;
    let image = image(i);
    let url = format!("https://{}", host(i));
    json!({
        "observedGeneration": 2,
        "phase": if ready { "Ready" } else { "Deploying" },
        "url": url,
        "commit": commit(i, 0),
        "image": image,
        "conditions": [
            condition("Built", true, "BuildSucceeded", format!("image {image}"), write),
            condition("Deployed", ready, if ready { "RolledOut" } else { "RollingOut" },
                format!("{image} is {}", if ready { "available" } else { "rolling out" }), write),
            condition("TLSReady", true, "CertificateReady", "Certificate production-tls is ready".into(), write),
            condition("ReferencesResolved", true, "Found", "every configMapRef and secretRef exists".into(), write),
            condition("Applied", true, "Applied", "the API server accepted every object".into(), write),
            condition("Ready", ready, if ready { "Serving" } else { "Deploying" },
                if ready { format!("{url} serves {image}") } else { "waiting for the rollout".into() }, write),
        ],
    })
}

/// A Project's status as the operator writes it, its production
/// Environment not ready (even writes) or ready (odd).
fn project_status(i: usize, write: usize) -> Value {
    let ready = write % 2 == 1;
    json!({
        "observedGeneration": 1,
        "namespace": name(i),
        "domainPool": "default",
        "baseDomain": "apps.example.com",
        "host": host(i),
        "latestCommit": commit(i, 0),
        "environments": [{"name": "production", "branch": "main", "url": format!("https://{}", host(i)), "ready": ready}],
        "conditions": [
            condition("DomainAllocated", true, "Allocated", format!("{} from DomainPool default", host(i)), write),
            condition("SourceReachable", true, "Reachable", format!("main is at {}", commit(i, 0)), write),
            condition("Implemented", true, "AllImplemented", "every field set is acted on".into(), write),
            condition("Ready", ready, if ready { "Ready" } else { "EnvironmentNotReady" },
                "production: ready".into(), write),
        ],
    })
}

fn project_manifest(i: usize) -> Value {
    json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "Project", "metadata": {"name": name(i)},
        "spec": {"source": {"git": {"url": format!("https://git.example.com/acme/{}.git", name(i)), "branch": "main"}},
            "registryRef": {"kind": "ClusterRegistry", "name": "registry"},
            "runtime": {"port": 8080, "replicas": 1, "healthCheck": {"path": "/healthz"}}}})
}

fn environment_manifest(i: usize, write: usize) -> Value {
    json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment",
        "metadata": {"name": name(i), "namespace": NAMESPACE, "labels": {"app.kubernetes.io/managed-by": "kapsa"}},
        "spec": {"project": name(i), "type": "Production", "branch": "main", "commit": commit(i, write), "host": host(i)}})
}

/// A Deployment shaped like the operator's (one container, probes,
/// resources, a restricted security context), paused so that no controller
/// acts on it.
fn deployment_manifest(i: usize, write: usize) -> Value {
    let labels = json!({"app.kubernetes.io/name": name(i), "kapsa.dev/environment": "production"});
    json!({"apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name(i), "namespace": NAMESPACE, "labels": labels,
            "annotations": {"kapsa.dev/applied-hash": format!("{:016x}", i * 1000 + write)}},
        "spec": {"paused": true, "replicas": 1, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "serviceAccountName": "runtime", "automountServiceAccountToken": false,
                "securityContext": {"runAsNonRoot": true, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [{"name": "app", "image": image(i), "ports": [{"name": "http", "containerPort": 8080}],
                    "env": [{"name": "PORT", "value": "8080"}],
                    "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "initialDelaySeconds": 10},
                    "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
                    "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": false,
                        "capabilities": {"drop": ["ALL"]}}}]}}}})
}

fn config_map_manifest(i: usize, write: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name(i), "namespace": NAMESPACE},
        "data": {"commit": commit(i, write)}})
}

fn event_manifest(i: usize, write: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Event",
        "metadata": {"name": format!("{}.{write:04}", name(i)), "namespace": NAMESPACE},
        "involvedObject": {"apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment", "namespace": NAMESPACE, "name": name(i)},
        "reason": "BuildStarted", "message": format!("building commit {} of branch main", commit(i, write)),
        "type": "Normal", "source": {"component": "kapsa"}, "reportingComponent": "kapsa", "reportingInstance": "kapsa",
        "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:00Z", "count": 1})
}

fn api<K: Resource<DynamicType = ()>>(client: &Client, namespaced: bool) -> Api<DynamicObject> {
    let resource = ApiResource::erase::<K>(&());
    if namespaced {
        Api::namespaced_with(client.clone(), NAMESPACE, &resource)
    } else {
        Api::all_with(client.clone(), &resource)
    }
}

fn dynamic(value: Value) -> anyhow::Result<DynamicObject> {
    Ok(serde_json::from_value(value)?)
}

/// One write of `kind` to object `i` (its `write`-th).
async fn write(client: &Client, kind: Kind, i: usize, write: usize) -> anyhow::Result<()> {
    let apply = PatchParams::apply(MANAGER).force();
    let name = name(i);
    match kind {
        Kind::EnvironmentStatus => {
            let patch = json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "Environment",
                "status": environment_status(i, write)});
            api::<Environment>(client, true)
                .patch_status(&name, &apply, &Patch::Apply(&patch))
                .await?;
        }
        Kind::EnvironmentStatusMerge => {
            let patch = json!({"status": environment_status(i, write)});
            api::<Environment>(client, true)
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Kind::ProjectStatus => {
            let patch = json!({"apiVersion": "kapsa.dev/v1alpha1", "kind": "Project",
                "status": project_status(i, write)});
            api::<Project>(client, false)
                .patch_status(&name, &apply, &Patch::Apply(&patch))
                .await?;
        }
        Kind::EnvironmentSpec => {
            let object = dynamic(environment_manifest(i, write))?;
            api::<Environment>(client, true)
                .patch(&name, &apply, &Patch::Apply(&object))
                .await?;
        }
        Kind::Deployment => {
            let object = dynamic(deployment_manifest(i, write))?;
            api::<Deployment>(client, true)
                .patch(&name, &apply, &Patch::Apply(&object))
                .await?;
        }
        Kind::ConfigMap => {
            let object = dynamic(config_map_manifest(i, write))?;
            api::<ConfigMap>(client, true)
                .patch(&name, &apply, &Patch::Apply(&object))
                .await?;
        }
        Kind::Event => {
            let object = dynamic(event_manifest(i, write))?;
            api::<Event>(client, true)
                .create(&PostParams::default(), &object)
                .await?;
        }
    }
    Ok(())
}

/// Makes the objects the writes go to (Events need none: they are created).
async fn set_up(client: &Client, args: &Args) -> anyhow::Result<()> {
    let apply = PatchParams::apply("write-cost-setup").force();
    api::<Namespace>(client, false)
        .patch(
            NAMESPACE,
            &apply,
            &Patch::Apply(&dynamic(
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}),
            )?),
        )
        .await?;
    let apply = &apply;
    futures::stream::iter(0..args.objects)
        .map(|i| async move {
            let objects: [(Api<DynamicObject>, Value); 4] = [
                (api::<Project>(client, false), project_manifest(i)),
                (api::<Environment>(client, true), environment_manifest(i, 0)),
                (api::<Deployment>(client, true), deployment_manifest(i, 0)),
                (api::<ConfigMap>(client, true), config_map_manifest(i, 0)),
            ];
            for (api, manifest) in objects {
                api.patch(&name(i), apply, &Patch::Apply(&dynamic(manifest)?))
                    .await
                    .with_context(|| format!("making {}", name(i)))?;
            }
            anyhow::Ok(())
        })
        .buffer_unordered(args.concurrency)
        .try_collect::<()>()
        .await
}

struct Measured {
    writes: usize,
    elapsed: Duration,
    /// CPU seconds by process name.
    cpu: BTreeMap<String, f64>,
}

impl Measured {
    fn ms_per_write(&self, process: &str) -> f64 {
        self.cpu.get(process).copied().unwrap_or(0.0) * 1000.0 / self.writes as f64
    }
}

/// W writes to each object, `concurrency` at once; `offset` keeps writes of
/// different runs distinct (so that none is a no-op, and no Event name is
/// reused).
async fn measure(
    plane: &ControlPlane,
    client: &Client,
    args: &Args,
    kind: Kind,
    offset: usize,
) -> anyhow::Result<Measured> {
    let jobs: Vec<(usize, usize)> = (0..args.writes)
        .flat_map(|w| (0..args.objects).map(move |i| (i, offset + w)))
        .collect();
    let writes = jobs.len();
    let before = cpu_by_process(plane, None);
    let started = Instant::now();
    futures::stream::iter(jobs)
        .map(|(i, w)| write(client, kind, i, w))
        .buffer_unordered(args.concurrency)
        .try_collect::<()>()
        .await
        .with_context(|| kind.label())?;
    let elapsed = started.elapsed();
    let cpu = cpu_delta(&cpu_by_process(plane, None), &before);
    Ok(Measured {
        writes,
        elapsed,
        cpu,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.objects > 0 && args.writes > 0 && args.concurrency > 0 && args.runs > 0,
        "--objects, --writes, --concurrency and --runs must be positive"
    );
    let assets = find_assets()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let plane = ControlPlane::start_with_audit_log(ControlPlaneOptions {
            state_dir: None,
            assets_dir: Some(assets),
        })
        .await
        .context("starting the control plane")?;
        let client = plane.client().await?;
        let crds = kapsa_testenv::crds::parse_crds(&kapsa_api::crds_yaml())?;
        kapsa_testenv::crds::install_crds(&client, &crds, "kapsa").await?;
        set_up(&client, &args).await?;
        println!(
            "Kapsa write-cost benchmark: {} objects per kind, {} writes each, {} in flight, {} run(s); CPU per write of kube-apiserver and etcd (audit log on)",
            args.objects, args.writes, args.concurrency, args.runs
        );
        let mut figures: BTreeMap<Kind, Vec<Measured>> = BTreeMap::new();
        for run in 0..args.runs {
            // Each run starts with a different kind, so that no kind is
            // always measured first or right after the same one.
            let mut order = Kind::ALL.to_vec();
            let turns = run % order.len();
            order.rotate_left(turns);
            for kind in order {
                let measured = measure(&plane, &client, &args, kind, 1 + run * args.writes).await?;
                println!(
                    "run {}: {:<36} {:>5} writes in {:>5.2}s ({:>4.0}/s): kube-apiserver {:.2} ms, etcd {:.2} ms per write",
                    run + 1,
                    kind.label(),
                    measured.writes,
                    measured.elapsed.as_secs_f64(),
                    measured.writes as f64 / measured.elapsed.as_secs_f64(),
                    measured.ms_per_write("kube-apiserver"),
                    measured.ms_per_write("etcd"),
                );
                figures.entry(kind).or_default().push(measured);
            }
        }
        println!("\n| write | kube-apiserver CPU per write | etcd CPU per write | writes/s |");
        println!("|---|---|---|---|");
        for (kind, runs) in &figures {
            let of = |f: &dyn Fn(&Measured) -> f64| median(runs.iter().map(f).collect());
            println!(
                "| {} | {:.2} ms | {:.2} ms | {:.0} |",
                kind.label(),
                of(&|m| m.ms_per_write("kube-apiserver")),
                of(&|m| m.ms_per_write("etcd")),
                of(&|m| m.writes as f64 / m.elapsed.as_secs_f64()),
            );
        }
        println!("(medians of {} run(s))", args.runs);
        anyhow::Ok(())
    })
}

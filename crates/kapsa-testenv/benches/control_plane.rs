//! Benchmark: warm start of the local control plane, time for a Deployment to
//! become Available on the simulated node, and teardown time.
//!
//! `cargo bench -p kapsa-testenv --bench control_plane [-- RUNS [audit|compare]]`
//! (default 5 runs, audit log off) prints each run and the medians. `audit`
//! turns the API server's audit log on; `compare` alternates runs without and
//! with it and prints the medians of each, to show what the audit log costs.
//! "Warm" means the binaries are already built and cached; building them is
//! not measured here.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kapsa_testenv::{ControlPlane, ControlPlaneOptions, find_assets};
use kube::api::{Api, PostParams};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn deployment_available(plane: &ControlPlane) -> anyhow::Result<Duration> {
    let client = plane.client().await?;
    let api: Api<Deployment> = Api::namespaced(client, "default");
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bench"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "bench"}},
            "template": {"metadata": {"labels": {"app": "bench"}},
                "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}}
        }
    }))?;
    let started = Instant::now();
    api.create(&PostParams::default(), &deployment).await?;
    loop {
        let status = api.get("bench").await?.status.unwrap_or_default();
        if status.available_replicas == Some(1) {
            return Ok(started.elapsed());
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "not Available in 60s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(Default)]
struct Samples {
    starts: Vec<Duration>,
    availables: Vec<Duration>,
    stops: Vec<Duration>,
}

impl Samples {
    fn print_medians(self, label: &str) {
        println!(
            "median of {} runs{label}: start {:.2}s, deployment available {:.2}s, teardown {:.2}s",
            self.starts.len(),
            median(self.starts).as_secs_f64(),
            median(self.availables).as_secs_f64(),
            median(self.stops).as_secs_f64()
        );
    }
}

async fn run(assets: &std::path::Path, audit: bool, samples: &mut Samples) -> anyhow::Result<()> {
    let options = ControlPlaneOptions {
        state_dir: None,
        assets_dir: Some(assets.to_path_buf()),
    };
    let started = Instant::now();
    let plane = if audit {
        ControlPlane::start_with_audit_log(options).await?
    } else {
        ControlPlane::start(options).await?
    };
    let start = started.elapsed();
    let available = deployment_available(&plane).await?;
    let audit_bytes = plane
        .audit_log()
        .and_then(|log| std::fs::metadata(log.path()).ok())
        .map(|m| m.len());
    let stopping = Instant::now();
    drop(plane);
    let stop = stopping.elapsed();
    print!(
        "audit log {}: start {:.2}s, deployment available {:.2}s, teardown {:.2}s",
        if audit { "on " } else { "off" },
        start.as_secs_f64(),
        available.as_secs_f64(),
        stop.as_secs_f64()
    );
    match audit_bytes {
        Some(bytes) => println!(" ({bytes} bytes of audit log)"),
        None => println!(),
    }
    samples.starts.push(start);
    samples.availables.push(available);
    samples.stops.push(stop);
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runs: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5);
    let compare = args.iter().any(|a| a == "compare");
    let audit = args.iter().any(|a| a == "audit");
    let assets = find_assets()?;
    let (mut off, mut on) = (Samples::default(), Samples::default());
    for n in 1..=runs {
        print!("run {n}: ");
        if compare {
            run(&assets, false, &mut off).await?;
            print!("run {n}: ");
            run(&assets, true, &mut on).await?;
        } else if audit {
            run(&assets, true, &mut on).await?;
        } else {
            run(&assets, false, &mut off).await?;
        }
    }
    if !off.starts.is_empty() {
        off.print_medians(", audit log off");
    }
    if !on.starts.is_empty() {
        on.print_medians(", audit log on");
    }
    Ok(())
}

//! Benchmark: warm start of the local control plane, time for a Deployment to
//! become Available on the simulated node, and teardown time.
//!
//! `cargo bench -p kapsa-testenv --bench control_plane [-- RUNS]` (default 5
//! runs) prints each run and the medians. "Warm" means the binaries are
//! already built and cached; building them is not measured here.

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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let runs: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let assets = find_assets()?;
    let (mut starts, mut availables, mut stops) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=runs {
        let started = Instant::now();
        let plane = ControlPlane::start(ControlPlaneOptions {
            state_dir: None,
            assets_dir: Some(assets.clone()),
        })
        .await?;
        let start = started.elapsed();
        let available = deployment_available(&plane).await?;
        let stopping = Instant::now();
        drop(plane);
        let stop = stopping.elapsed();
        println!(
            "run {run}: start {:.2}s, deployment available {:.2}s, teardown {:.2}s",
            start.as_secs_f64(),
            available.as_secs_f64(),
            stop.as_secs_f64()
        );
        starts.push(start);
        availables.push(available);
        stops.push(stop);
    }
    println!(
        "median of {runs}: start {:.2}s, deployment available {:.2}s, teardown {:.2}s",
        median(starts).as_secs_f64(),
        median(availables).as_secs_f64(),
        median(stops).as_secs_f64()
    );
    Ok(())
}

//! `kapsa dev up|down`: a local control plane (real etcd, kube-apiserver,
//! controller-manager and scheduler; kwok nodes; kpack, cert-manager and
//! gateway simulators) with Kapsa's CRDs installed, and, where the machine
//! can run it, the real lane (docs/real-lane.md): a real node, a registry
//! and Traefik on loopback, so the demo's app answers real requests.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use kapsa_testenv::{ControlPlane, ControlPlaneOptions};

use crate::demo;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::os::unix::process::CommandExt;

/// What `kapsa dev up` prints once the API server answers; scripts rely on it.
const EXPORT_PREFIX: &str = "export KUBECONFIG=";

#[derive(Subcommand)]
pub enum DevCommand {
    /// Start the local control plane and print `export KUBECONFIG=<path>`.
    /// Stays in the foreground until Ctrl-C or SIGTERM, then tears it all down.
    Up(UpArgs),
    /// Stop a control plane started with `kapsa dev up --detach`.
    Down(StateDirArg),
}

#[derive(Args)]
pub struct StateDirArg {
    /// Folder for the control plane's data, logs and kubeconfig
    /// [default: $XDG_STATE_HOME/kapsa/dev or ~/.local/state/kapsa/dev].
    #[arg(long, env = "KAPSA_DEV_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Args)]
pub struct UpArgs {
    #[command(flatten)]
    state: StateDirArg,
    /// Leave it running in the background and return once it is ready.
    #[arg(long)]
    detach: bool,
    /// Do not run Kapsa's operator (to run your own build of it against the
    /// printed KUBECONFIG instead; give it `--allow-internal-git-hosts
    /// loopback` for git repositories served on this machine). The operator
    /// that `dev up` runs allows loopback git hosts.
    #[arg(long)]
    no_operator: bool,
    /// Also set up a platform and a git repository, and show a Project going
    /// live and a new commit rolling out.
    #[arg(long, conflicts_with = "no_operator")]
    demo: bool,
    /// The real lane (a real node, a registry on its pods' bridge, Traefik
    /// on loopback; Linux and root): `auto` (default) runs it when the
    /// machine can and its binaries are built already, `on` builds them if
    /// needed (about 20 minutes once) and fails if the machine cannot,
    /// `off` never.
    #[arg(long, value_enum, default_value_t = RealLane::Auto)]
    real_lane: RealLane,
}

/// When `kapsa dev up` runs the real lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RealLane {
    Auto,
    On,
    Off,
}

pub fn run(command: DevCommand) -> anyhow::Result<()> {
    match command {
        DevCommand::Up(args) => {
            let state_dir = state_dir(args.state.state_dir)?;
            let options = UpOptions {
                operator: !args.no_operator,
                demo: args.demo,
                real_lane: args.real_lane,
            };
            if args.detach {
                up_detached(&state_dir, options)
            } else {
                init_logging();
                tokio::runtime::Runtime::new()?.block_on(up_foreground(&state_dir, options))
            }
        }
        DevCommand::Down(args) => down(&state_dir(args.state_dir)?),
    }
}

fn init_logging() {
    // kube-client logs every failed request at ERROR, and a starting API
    // server refuses connections and answers 500 for a few seconds: waiting
    // for it is not an error. Whoever makes a request reports a failure that
    // matters (the control plane's start, the operator's reconcile errors),
    // so the per-request lines stay out of the terminal (RUST_LOG overrides).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube=warn,kube_client::client::builder=off")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn state_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = match given {
        Some(dir) => dir,
        None => match std::env::var_os("XDG_STATE_HOME") {
            Some(state) => PathBuf::from(state).join("kapsa/dev"),
            None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                .join(".local/state/kapsa/dev"),
        },
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(std::path::absolute(&dir)?)
}

fn pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("kapsa-dev.pid")
}

fn running_pid(state_dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(state_dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    kill(Pid::from_raw(pid), None).ok().map(|_| pid)
}

#[derive(Clone, Copy)]
struct UpOptions {
    operator: bool,
    demo: bool,
    real_lane: RealLane,
}

async fn up_foreground(state_dir: &Path, options: UpOptions) -> anyhow::Result<()> {
    if let Some(pid) = running_pid(state_dir) {
        bail!(
            "a control plane already runs from {} (pid {pid}); stop it with `kapsa dev down --state-dir {}`",
            state_dir.display(),
            state_dir.display()
        );
    }
    std::fs::write(pid_file(state_dir), std::process::id().to_string())?;
    let result = serve(state_dir, options).await;
    let _ = std::fs::remove_file(pid_file(state_dir));
    result
}

async fn serve(state_dir: &Path, options: UpOptions) -> anyhow::Result<()> {
    let started = Instant::now();
    let plane = ControlPlane::start(ControlPlaneOptions {
        state_dir: Some(state_dir.join("control-plane")),
        assets_dir: None,
    })
    .await
    .context("starting the control plane")?;
    let client = plane.client().await?;
    // The simulators' CRDs first: the real lane's cert-manager replaces the
    // simulator's cert-manager CRDs with its own.
    kapsa_testenv::simulators::install(&client).await?;
    let lane = match start_real_lane(&plane, &client, state_dir, options.real_lane).await {
        Ok(lane) => lane,
        Err(error) => {
            drop(plane);
            return Err(error);
        }
    };
    if let Some(lane) = &lane {
        // Before KUBECONFIG, which `--detach` waits for.
        println!("export KAPSA_INGRESS_HTTP={}", lane.traefik.http_address());
        println!(
            "export KAPSA_INGRESS_HTTPS={}",
            lane.traefik.https_address()
        );
        println!("export KAPSA_ACME_CA={}", lane.acme.acme_ca().display());
        println!("export KAPSA_REGISTRY={}", lane.node.registry());
    }
    println!("{EXPORT_PREFIX}{}", plane.kubeconfig_path().display());
    let kubeconfig = plane.kubeconfig_path().to_path_buf();
    let crds = kapsa_testenv::crds::parse_crds(&kapsa_api::crds_yaml())?;
    kapsa_testenv::crds::install_crds(&client, &crds, "kapsa").await?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "control plane ready with Kapsa's CRDs and the kpack and cert-manager simulators; Ctrl-C stops it"
    );
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    // The lane's registry is plain HTTP on the pods' bridge (where build
    // Pods reach it), not on loopback.
    let lane_registry = lane.is_some();
    let operator = {
        let client = client.clone();
        async move {
            if !options.operator {
                return futures::future::pending().await;
            }
            // The demo's git repository is served on loopback.
            let config = kapsa_operator::OperatorConfig {
                allow_internal_git_hosts: kapsa_operator::git::HostPolicy::loopback(),
                allow_insecure_registries: lane_registry,
                ..Default::default()
            };
            let metrics = std::sync::Arc::new(kapsa_operator::metrics::Metrics::default());
            let stop = async move {
                let _ = stop_rx.await;
            };
            if let Err(error) = kapsa_operator::run(client, config, metrics, stop).await {
                tracing::error!(%error, "the operator stopped");
            }
        }
    };
    let demo = async {
        if !options.demo {
            return futures::future::pending().await;
        }
        let demo_lane = lane.as_ref().map(|l| demo::Lane {
            registry: l.node.registry().to_string(),
            ingress_http: l.traefik.http_address().to_string(),
            ingress_https: l.traefik.https_address().to_string(),
            acme_ca: l.acme.acme_ca().to_path_buf(),
        });
        match demo::run(&client, &kubeconfig, demo_lane).await {
            // Keep the repository served so that polling goes on.
            Ok(served) => {
                futures::future::pending::<()>().await;
                drop(served);
            }
            Err(error) => tracing::error!("the demo failed: {error:#}"),
        }
        futures::future::pending().await
    };
    tokio::select! {
        _ = kapsa_testenv::simulators::run(client.clone()) => {}
        _ = operator => {}
        _ = demo => {}
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        _ = terminate.recv() => tracing::info!("terminated"),
    }
    let _ = stop_tx.send(());
    if let Some(mut lane) = lane {
        tracing::info!("stopping the real lane");
        drop(lane.builds);
        drop(lane.acme);
        drop(lane.traefik);
        lane.node.stop();
    }
    tracing::info!("stopping the control plane");
    drop(plane);
    Ok(())
}

/// The real lane while it runs.
struct Lane {
    node: kapsa_testenv::real_node::RealNode,
    traefik: kapsa_testenv::traefik::Traefik,
    acme: kapsa_testenv::acme_lane::AcmeLane,
    builds: kapsa_testenv::simulators::kpack::RealImages,
}

/// Starts the real lane as `mode` says, or says why it does not.
async fn start_real_lane(
    plane: &ControlPlane,
    client: &kube::Client,
    state_dir: &Path,
    mode: RealLane,
) -> anyhow::Result<Option<Lane>> {
    use kapsa_testenv::real_node::{self, RealNode};
    if mode == RealLane::Off {
        return Ok(None);
    }
    if let Some(reason) = real_node::unsupported_reason() {
        if mode == RealLane::On {
            bail!("--real-lane on, but {reason}");
        }
        eprintln!("real lane: off ({reason}); the kwok lane simulates nodes");
        return Ok(None);
    }
    // `auto` builds nothing: the install scripts only report their caches.
    let found = if mode == RealLane::Auto {
        (
            real_node::built_real_lane_assets(),
            kapsa_testenv::traefik::built_traefik(),
            kapsa_testenv::acme_lane::built_cert_manager(),
        )
    } else {
        (
            real_node::find_real_lane_assets(),
            kapsa_testenv::traefik::find_traefik(),
            kapsa_testenv::acme_lane::find_cert_manager(),
        )
    };
    let (assets, traefik_folder, cert_manager_folder) = match found {
        (Ok(assets), Ok(traefik), Ok(cert_manager)) => (assets, traefik, cert_manager),
        _ if mode == RealLane::Auto => {
            eprintln!(
                "real lane: off (its binaries are not built yet; `kapsa dev up --real-lane on` builds them once, about 20 minutes)"
            );
            return Ok(None);
        }
        (assets, traefik, cert_manager) => (
            assets.context("the real lane's node binaries")?,
            traefik.context("Traefik")?,
            cert_manager.context("cert-manager and Pebble")?,
        ),
    };
    let address = kapsa_testenv::acme_lane::lane_address()?;
    let node = RealNode::start(plane, &assets)
        .await
        .context("starting the real node")?;
    let traefik = kapsa_testenv::traefik::Traefik::start(
        client,
        plane.api_server_url(),
        &plane.dir().join("pki/ca.crt"),
        &traefik_folder,
        &state_dir.join("traefik"),
        false,
        address,
    )
    .await
    .context("starting Traefik")?;
    let acme = kapsa_testenv::acme_lane::AcmeLane::start(
        client,
        kapsa_testenv::acme_lane::AcmeLaneOptions {
            kubeconfig: plane.kubeconfig_path().to_path_buf(),
            folder: cert_manager_folder,
            dir: state_dir.join("acme"),
            ingress_address: address,
            ingress_class: kapsa_testenv::traefik::INGRESS_CLASS.to_string(),
            images: node.image_pusher(),
        },
    )
    .await
    .context("starting cert-manager and Pebble")?;
    // Builds in the node's registry push a real image: busybox httpd
    // serving the commit (the kpack simulator builds nothing from sources).
    let builds = node.build_commit_pages()?;
    eprintln!(
        "real lane: a real node ({}), a registry on the pods' bridge ({}), Traefik ({} and {}) and cert-manager with Pebble ({}) on loopback",
        node.name(),
        node.registry(),
        traefik.http_address(),
        traefik.https_address(),
        acme.directory()
    );
    Ok(Some(Lane {
        node,
        traefik,
        acme,
        builds,
    }))
}

fn up_detached(state_dir: &Path, options: UpOptions) -> anyhow::Result<()> {
    if let Some(pid) = running_pid(state_dir) {
        bail!(
            "a control plane already runs from {} (pid {pid})",
            state_dir.display()
        );
    }
    let log_path = state_dir.join("kapsa-dev.log");
    let log = std::fs::File::create(&log_path)?;
    let mut command = std::process::Command::new(std::env::current_exe()?);
    command.args(["dev", "up", "--state-dir"]).arg(state_dir);
    if !options.operator {
        command.arg("--no-operator");
    }
    if options.demo {
        command.arg("--demo");
    }
    command.args([
        "--real-lane",
        match options.real_lane {
            RealLane::Auto => "auto",
            RealLane::On => "on",
            RealLane::Off => "off",
        },
    ]);
    let mut child = command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group, so the terminal's Ctrl-C does not reach it.
        .process_group(0)
        .spawn()
        .context("starting the background control plane")?;
    eprintln!(
        "starting in the background (log: {}); the first start builds the control-plane binaries",
        log_path.display()
    );
    let mut reader = BufReader::new(std::fs::File::open(&log_path)?);
    let mut line = String::new();
    let deadline = Instant::now() + Duration::from_secs(90 * 60);
    loop {
        line.clear();
        let position = reader.stream_position()?;
        if reader.read_line(&mut line)? > 0 && line.ends_with('\n') {
            if line.starts_with(EXPORT_PREFIX) {
                print!("{line}");
                return Ok(());
            }
            if line.starts_with("export ") {
                print!("{line}");
                continue;
            }
            eprint!("  {line}");
            continue;
        }
        // A partial line: read it again once it is complete.
        reader.seek(SeekFrom::Start(position))?;
        if let Some(status) = child.try_wait()? {
            bail!(
                "the background control plane exited ({status}); see {}",
                log_path.display()
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!(
                "the control plane was not ready in time; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn down(state_dir: &Path) -> anyhow::Result<()> {
    let Some(pid) = running_pid(state_dir) else {
        eprintln!("no control plane runs from {}", state_dir.display());
        return Ok(());
    };
    let pid = Pid::from_raw(pid);
    kill(pid, Signal::SIGTERM)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while kill(pid, None).is_ok() {
        if Instant::now() > deadline {
            kill(pid, Signal::SIGKILL)?;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(pid_file(state_dir));
    eprintln!("stopped the control plane in {}", state_dir.display());
    Ok(())
}

//! The `kapsa` binary's interface, as scripts use it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn kapsa() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kapsa"))
}

#[test]
fn crds_prints_the_committed_crds() {
    let output = kapsa().arg("crds").output().expect("kapsa runs");
    assert!(output.status.success());
    let committed = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/crds/kapsa.yaml"),
    )
    .expect("deploy/crds/kapsa.yaml");
    assert_eq!(
        String::from_utf8(output.stdout).unwrap(),
        committed,
        "`kapsa crds` and deploy/crds/kapsa.yaml differ: run `make crds`"
    );
}

fn alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// `kapsa dev up --detach` prints `export KUBECONFIG=<absolute path>` once the
/// API server answers and returns; the control plane then serves Kapsa's CRDs;
/// `kapsa dev down` stops every process.
#[test]
fn dev_up_detach_then_down() {
    let assets = kapsa_testenv::find_assets().expect("control-plane binaries");
    let state = tempfile::tempdir().unwrap();
    let output = kapsa()
        .args(["dev", "up", "--real-lane", "off", "--detach", "--state-dir"])
        .arg(state.path())
        .env("KUBEBUILDER_ASSETS", &assets)
        .stdin(Stdio::null())
        .output()
        .expect("kapsa dev up runs");
    assert!(
        output.status.success(),
        "dev up failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let kubeconfig = stdout
        .lines()
        .find_map(|l| l.strip_prefix("export KUBECONFIG="))
        .expect("an export KUBECONFIG= line");
    assert!(Path::new(kubeconfig).is_absolute() && Path::new(kubeconfig).exists());
    let pid = std::fs::read_to_string(state.path().join("kapsa-dev.pid")).expect("a pid file");
    let pid = pid.trim().to_string();
    assert!(alive(&pid));

    // The CRDs are installed a moment after the export line.
    let mut established = false;
    for _ in 0..100 {
        let get = Command::new(assets.join("kubectl"))
            .args([
                "--kubeconfig",
                kubeconfig,
                "get",
                "projects.kapsa.dev",
                "-o",
                "name",
            ])
            .output()
            .unwrap();
        if get.status.success() {
            established = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        established,
        "Kapsa's CRDs are served by the dev control plane"
    );
    // Waiting for a starting API server is not an error: the terminal shows
    // progress and real problems only.
    let log = std::fs::read_to_string(state.path().join("kapsa-dev.log")).unwrap();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.contains("500 Internal Server Error"))
        .collect();
    assert!(
        errors.is_empty(),
        "dev up logged errors:\n{}",
        errors.join("\n")
    );

    let down = kapsa()
        .args(["dev", "down", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(down.status.success());
    assert!(!alive(&pid), "the dev process is gone");
    let leftovers = Command::new("pgrep")
        .args(["-f", &state.path().display().to_string()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&leftovers.stdout).trim().is_empty(),
        "no control-plane process outlives `kapsa dev down`"
    );
}

/// Killing `kapsa dev up` outright (SIGKILL: no chance to clean up) still
/// leaves no control-plane process behind: each child dies with its parent.
#[test]
fn killed_dev_up_leaves_no_process() {
    use std::io::{BufRead, BufReader};
    let assets = kapsa_testenv::find_assets().expect("control-plane binaries");
    let state = tempfile::tempdir().unwrap();
    let mut child = kapsa()
        .args([
            "dev",
            "up",
            "--real-lane",
            "off",
            "--no-operator",
            "--state-dir",
        ])
        .arg(state.path())
        .env("KUBEBUILDER_ASSETS", &assets)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("kapsa dev up starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("export KUBECONFIG="), "{line}");
    let pattern = state.path().display().to_string();
    let running = |pattern: &str| {
        let out = Command::new("pgrep")
            .args(["-f", pattern])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    assert!(
        running(&pattern) >= 5,
        "etcd, apiserver, controller-manager, scheduler and kwok run"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let mut left = running(&pattern);
    for _ in 0..50 {
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        left = running(&pattern);
    }
    assert_eq!(
        left, 0,
        "control-plane processes outlived a killed `kapsa dev up`"
    );
}

//! One control plane per test binary, shared by its tests.
//!
//! Starting a control plane costs seconds; a test costs milliseconds. So each
//! test binary starts one on first use and its tests share it, each in its own
//! namespace or with its own name prefix ([`TestEnv::unique_name`]).
//!
//! Each `#[tokio::test]` has its own runtime, and a client must not outlive the
//! runtime it was made in. The control plane and the simulators therefore live
//! on a thread of their own with its own runtime, and tests make their own
//! clients with [`TestEnv::client`]. The processes die with the test binary
//! (see [`crate::process`]).
//!
//! Its API server writes an audit log ([`TestEnv::audit_log`]), so tests can
//! count what a client did, as the API server saw it; give the client under
//! test an identity of its own with [`TestEnv::client_as`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use kube::Client;
use tokio::sync::OnceCell;

use crate::audit::AuditLog;
use crate::control_plane::{
    ControlPlane, ControlPlaneOptions, client_from_kubeconfig, user_kubeconfig,
};

/// A handle on the shared control plane of this test binary.
#[derive(Debug)]
pub struct TestEnv {
    dir: PathBuf,
    api_server_url: String,
    kubeconfig_path: PathBuf,
    assets_dir: PathBuf,
    pids: Vec<u32>,
    audit_log: AuditLog,
}

impl TestEnv {
    /// A new admin client, for the calling test's runtime.
    pub async fn client(&self) -> Client {
        client_from_kubeconfig(&self.kubeconfig_path)
            .await
            .expect("a client for the shared test control plane")
    }

    /// A new client authenticated as `user` in `groups` (a client certificate
    /// signed by the control plane's CA), for the calling test's runtime. See
    /// [`ControlPlane::client_as`].
    pub async fn client_as(&self, user: &str, groups: &[&str]) -> Client {
        client_from_kubeconfig(&self.kubeconfig_as(user, groups))
            .await
            .expect("a client for the shared test control plane")
    }

    /// A kubeconfig for `user` in `groups`, to run a separate process (the
    /// operator's binary, say) under that identity.
    pub fn kubeconfig_as(&self, user: &str, groups: &[&str]) -> PathBuf {
        user_kubeconfig(&self.dir, &self.api_server_url, user, groups)
            .unwrap_or_else(|e| panic!("a kubeconfig for {user} {groups:?}: {e}"))
    }

    /// The API server's audit log: every request, by user (see
    /// [`crate::audit`]).
    pub fn audit_log(&self) -> AuditLog {
        self.audit_log.clone()
    }

    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    pub fn api_server_url(&self) -> &str {
        &self.api_server_url
    }

    /// Folder of the upstream binaries (kubectl among them).
    pub fn assets_dir(&self) -> &Path {
        &self.assets_dir
    }

    /// Process ids of the control plane's processes.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// A DNS-label-safe name unique within this test binary's run.
    pub fn unique_name(&self, prefix: &str) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::Relaxed))
    }
}

static SHARED: OnceCell<TestEnv> = OnceCell::const_new();

/// The shared control plane, with the kpack and cert-manager simulators
/// installed and running. Panics (failing the test) if it cannot start.
pub async fn shared() -> &'static TestEnv {
    SHARED
        .get_or_init(|| async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            std::thread::Builder::new()
                .name("kapsa-testenv".into())
                .spawn(move || host_control_plane(tx))
                .expect("spawning the test control plane thread");
            match rx.await {
                Ok(Ok(env)) => env,
                Ok(Err(e)) => panic!("the test control plane did not start: {e}"),
                Err(_) => panic!("the test control plane thread died while starting"),
            }
        })
        .await
}

fn host_control_plane(ready: tokio::sync::oneshot::Sender<Result<TestEnv, String>>) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    runtime.block_on(async move {
        let started = async {
            let plane = ControlPlane::start_with_audit_log(ControlPlaneOptions::default()).await?;
            let client = plane.client().await?;
            crate::simulators::install(&client).await?;
            Ok::<_, crate::control_plane::Error>((plane, client))
        };
        match started.await {
            Ok((plane, client)) => {
                let env = TestEnv {
                    dir: plane.dir().to_path_buf(),
                    api_server_url: plane.api_server_url().to_string(),
                    kubeconfig_path: plane.kubeconfig_path().to_path_buf(),
                    assets_dir: plane.assets_dir().to_path_buf(),
                    pids: plane.pids(),
                    audit_log: plane.audit_log().expect("started with the audit log on"),
                };
                let _ = ready.send(Ok(env));
                // Runs for the rest of the test binary; the plane is never dropped.
                crate::simulators::run(client).await;
                drop(plane);
            }
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
            }
        }
    });
}

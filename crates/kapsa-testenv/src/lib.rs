//! A real, local Kubernetes control plane for Kapsa's tests and `kapsa dev`.
//!
//! - [`control_plane`]: etcd, kube-apiserver, kube-controller-manager,
//!   kube-scheduler and kwok (simulated nodes, so pods get scheduled and
//!   become Running/Ready) from the official upstream binaries, on free
//!   loopback ports, torn down on drop.
//! - [`simulators`]: kpack, BuildKit, cert-manager and Gateway API
//!   SIMULATORS for what needs a container runtime or the internet.
//! - [`shared`]: one control plane per test binary, with an audit log.
//! - [`audit`]: the API server's audit log, read back: what each user did.

pub mod acme_lane;
pub mod audit;
pub mod buildkit;
pub mod control_plane;
pub mod crds;
pub mod git_server;
pub mod hostile_git;
pub mod http_get;
pub mod pki;
pub mod process;
pub mod real_node;
pub mod shared;
pub mod simulators;
pub mod traefik;
pub mod wait;

pub use audit::{AuditEvent, AuditLog, AuditMark};
pub use control_plane::{
    ControlPlane, ControlPlaneOptions, Error, Result, client_from_kubeconfig, find_assets,
};
pub use shared::{TestEnv, shared};

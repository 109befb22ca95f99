//! Kapsa's operator: a Project becomes a namespace, a production Environment
//! and (later) previews; an Environment becomes a build, a Deployment, a
//! Service and an Ingress with TLS.
//!
//! - [`resources`]: pure functions from desired state to Kubernetes objects;
//! - [`controllers`]: one reconciler per resource, each a pipeline of
//!   dereference (caches only) → plan (pure) → apply and prune → status;
//! - [`children`]: what plans are made of (wanted, observed, to delete);
//! - [`apply`]: server-side apply that writes only on change, and prune;
//! - [`status`]: the one status write per reconcile, and its Events;
//! - [`git`] and [`poller`]: refs-only polling of repositories;
//! - [`domains`]: host allocation from DomainPools;
//! - [`run`]: caches, controllers, leader election, metrics.

pub mod apply;
pub mod children;
pub mod compact;
pub mod context;
pub mod controllers;
pub mod domains;
pub mod error;
pub mod events;
pub mod fault;
pub mod git;
pub mod hosts;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod poller;
pub mod references;
pub mod resources;
pub mod run;
pub mod status;
pub mod synced;

pub use run::{OperatorConfig, run};

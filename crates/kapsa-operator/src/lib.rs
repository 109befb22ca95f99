//! Kapsa's operator: a Project becomes a namespace, a production Environment
//! and (later) previews; an Environment becomes a build, a Deployment, a
//! Service and an Ingress with TLS.
//!
//! - [`resources`]: pure functions from desired state to Kubernetes objects;
//! - [`controllers`]: one reconciler per resource, each a pipeline of
//!   dereference → validate → build → apply → status;
//! - [`apply`]: server-side apply that writes only on change;
//! - [`git`] and [`poller`]: refs-only polling of repositories;
//! - [`domains`]: host allocation from DomainPools;
//! - [`run`]: caches, controllers, leader election, metrics.

pub mod apply;
pub mod context;
pub mod controllers;
pub mod domains;
pub mod error;
pub mod git;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod poller;
pub mod references;
pub mod resources;
pub mod run;

pub use run::{OperatorConfig, run};

//! `/metrics` (OpenMetrics text), `/healthz` and `/readyz`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::metrics::Metrics;

async fn render_metrics(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.encode(),
    )
}

/// What `/healthz` and `/readyz` report.
#[derive(Default)]
pub struct Health {
    /// The caches, once the operator leads and has started them (replaced
    /// when it starts again in-process, e.g. for a newly installed API).
    pub stores: std::sync::RwLock<Option<crate::context::Stores>>,
    dead: AtomicBool,
    /// Waiting for the leader Lease: ready to take over. A standby replica
    /// reports ready, or a rolling update (maxUnavailable 0) would wait for
    /// a new pod that cannot lead until the old one goes, and a
    /// PodDisruptionBudget would refuse to evict the leader.
    standby: AtomicBool,
}

impl Health {
    /// Ready: standing by for the Lease, or every cache had its first full
    /// listing (reconciles run).
    pub fn ready(&self) -> bool {
        self.alive() && (self.standing_by() || self.current_stores().is_some_and(|s| s.ready()))
    }

    /// Whether this replica waits for the leader Lease.
    pub fn standing_by(&self) -> bool {
        self.standby.load(Ordering::Relaxed)
    }

    pub fn set_standby(&self, standby: bool) {
        self.standby.store(standby, Ordering::Relaxed);
    }

    /// The caches in use now, if any.
    pub fn current_stores(&self) -> Option<crate::context::Stores> {
        self.stores
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reports `stores` from now on.
    pub fn set_stores(&self, stores: crate::context::Stores) {
        *self
            .stores
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(stores);
    }

    /// Alive: no controller loop has died.
    pub fn alive(&self) -> bool {
        !self.dead.load(Ordering::Relaxed)
    }

    pub fn mark_dead(&self) {
        self.dead.store(true, Ordering::Relaxed);
    }
}

fn answer(ok: bool, what: &'static str) -> (StatusCode, &'static str) {
    if ok {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, what)
    }
}

pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    let (for_health, for_ready) = (health.clone(), health);
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route(
            "/healthz",
            get(move || {
                let ok = for_health.alive();
                async move { answer(ok, "a controller loop has stopped") }
            }),
        )
        .route(
            "/readyz",
            get(move || {
                let unsynced = for_ready
                    .current_stores()
                    .map(|s| s.unsynced().join(", "))
                    .unwrap_or_else(|| "all (not leading yet)".into());
                let ok = for_ready.ready();
                let standby = for_ready.standing_by();
                async move {
                    if ok && standby {
                        (
                            StatusCode::OK,
                            "ok: standing by for the leader Lease".to_string(),
                        )
                    } else if ok {
                        (StatusCode::OK, "ok".to_string())
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("caches not synced: {unsynced}"),
                        )
                    }
                }
            }),
        )
        .with_state(metrics);
    if let Err(error) = axum::serve(listener, app).await {
        tracing::error!(%error, "the metrics server stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_before_the_caches_and_not_alive_once_a_loop_died() {
        let health = Health::default();
        assert!(health.alive());
        assert!(!health.ready(), "no caches yet");
        health.mark_dead();
        assert!(!health.alive());
        assert!(!health.ready());
        assert_eq!(answer(false, "x").0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer(true, "x"), (StatusCode::OK, "ok"));
    }
}

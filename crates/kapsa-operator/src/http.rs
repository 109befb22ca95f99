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
    /// The caches, once the operator leads and has started them.
    pub stores: std::sync::OnceLock<crate::context::Stores>,
    dead: AtomicBool,
}

impl Health {
    /// Ready: every cache had its first full listing (reconciles run).
    pub fn ready(&self) -> bool {
        self.alive() && self.stores.get().is_some_and(|s| s.ready())
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
                    .stores
                    .get()
                    .map(|s| s.unsynced().join(", "))
                    .unwrap_or_else(|| "all (not leading yet)".into());
                let ok = for_ready.ready();
                async move {
                    if ok {
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

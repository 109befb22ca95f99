//! Prometheus metrics of the operator, served at `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconcileLabels {
    controller: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    controller: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_duration: Family<ControllerLabels, Histogram>,
    writes: Family<KindLabels, Counter>,
    git_polls: Family<ResultLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    live_reads: Family<KindLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kapsa");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        let reconcile_duration =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            });
        registry.register(
            "reconcile_duration_seconds",
            "Time a reconcile takes",
            reconcile_duration.clone(),
        );
        let writes = Family::<KindLabels, Counter>::default();
        registry.register(
            "api_writes",
            "Writes (server-side applies and status patches) to the API server by kind",
            writes.clone(),
        );
        let git_polls = Family::<ResultLabels, Counter>::default();
        registry.register("git_polls", "Git remote polls by result", git_polls.clone());
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Failed reconciles by controller and the pipeline step that failed (Dereference, Apply, Prune, Status)",
            failures.clone(),
        );
        let live_reads = Family::<KindLabels, Counter>::default();
        registry.register(
            "live_reads",
            "Reads that bypass the caches, by kind (only a changed registry credentials Secret)",
            live_reads.clone(),
        );
        Self {
            registry,
            failures,
            live_reads,
            reconciles,
            reconcile_duration,
            writes,
            git_polls,
        }
    }
}

impl Metrics {
    pub fn record_reconcile(&self, controller: &str, ok: bool, took: Duration) {
        let result = if ok { "success" } else { "error" };
        self.reconciles
            .get_or_create(&ReconcileLabels {
                controller: controller.into(),
                result: result.into(),
            })
            .inc();
        self.reconcile_duration
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn record_write(&self, kind: &str) {
        self.writes
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn record_failure(&self, controller: &str, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                controller: controller.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn record_live_read(&self, kind: &str) {
        self.live_reads
            .get_or_create(&KindLabels { kind: kind.into() })
            .inc();
    }

    pub fn record_git_poll(&self, result: &str) {
        self.git_polls
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .inc();
    }

    /// Total writes so far, all kinds (for tests and benchmarks).
    pub fn total_writes(&self) -> u64 {
        // The family has no iterator; the text encoding is the public view.
        self.encode()
            .lines()
            .filter(|l| l.starts_with("kapsa_api_writes_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

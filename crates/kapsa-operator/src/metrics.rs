//! Prometheus metrics of the operator, served at `/metrics`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: String,
}

/// The phases of an Environment, as the `phase` label of `kapsa_previews`.
pub const PREVIEW_PHASES: [&str; 5] = ["Pending", "Building", "Deploying", "Ready", "Failed"];

pub struct Metrics {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_duration: Family<ControllerLabels, Histogram>,
    writes: Family<KindLabels, Counter>,
    git_polls: Family<ResultLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    live_reads: Family<KindLabels, Counter>,
    git_poll_duration: Family<ResultLabels, Histogram>,
    git_poll_failures: Family<ReasonLabels, Counter>,
    previews: Family<PhaseLabels, Gauge>,
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
        let git_poll_duration = Family::<ResultLabels, Histogram>::new_with_constructor(|| {
            // 5 ms … ~41 s: a loopback listing to a listing at its timeout.
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register(
            "git_poll_duration_seconds",
            "Time one git poll of a Project takes (listing and merge check, not the wait for a slot), by result",
            git_poll_duration.clone(),
        );
        let git_poll_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "git_poll_failures",
            "Failed git polls and merge checks by reason (the git error's reason, CredentialsUnusable, NotPolled, or MergeCheck<reason>)",
            git_poll_failures.clone(),
        );
        let previews = Family::<PhaseLabels, Gauge>::default();
        for phase in PREVIEW_PHASES {
            // Every phase is exported, zero included.
            let _ = previews.get_or_create(&PhaseLabels {
                phase: phase.into(),
            });
        }
        registry.register(
            "previews",
            "Preview Environments by phase (an Environment without a phase yet counts as Pending)",
            previews.clone(),
        );
        Self {
            registry,
            git_poll_duration,
            git_poll_failures,
            previews,
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

    /// How long one git poll took, by its result (`success`, `failure`,
    /// `refused`, `credentials_error`).
    pub fn record_git_poll_duration(&self, result: &str, took: Duration) {
        self.git_poll_duration
            .get_or_create(&ResultLabels {
                result: result.into(),
            })
            .observe(took.as_secs_f64());
    }

    /// A failed git poll or merge check, by reason: a `GitError::reason()`,
    /// `CredentialsUnusable`, `NotPolled`, or `MergeCheck` followed by the
    /// merge check's git error reason.
    pub fn record_git_poll_failure(&self, reason: &str) {
        self.git_poll_failures
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc();
    }

    /// Sets the preview Environments gauge: how many there are in each
    /// phase. Phases not given are set to zero; unknown phases are ignored.
    pub fn set_previews<'a>(&self, counts: impl IntoIterator<Item = (&'a str, i64)>) {
        let mut values = [0i64; PREVIEW_PHASES.len()];
        for (phase, count) in counts {
            if let Some(i) = PREVIEW_PHASES.iter().position(|p| *p == phase) {
                values[i] += count;
            }
        }
        for (phase, value) in PREVIEW_PHASES.iter().zip(values) {
            self.previews
                .get_or_create(&PhaseLabels {
                    phase: (*phase).into(),
                })
                .set(value);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    #[test]
    fn git_poll_and_preview_families_are_encoded() {
        let metrics = Metrics::default();
        metrics.record_reconcile("project", true, Duration::from_millis(3));
        metrics.record_write("Deployment");
        metrics.record_failure("project", "Apply");
        metrics.record_live_read("Secret");
        metrics.record_git_poll("success");
        metrics.record_git_poll_duration("success", Duration::from_millis(12));
        metrics.record_git_poll_duration("failure", Duration::from_secs(3));
        metrics.record_git_poll_failure("Timeout");
        metrics.record_git_poll_failure("Timeout");
        metrics.record_git_poll_failure("MergeCheckUnreachable");
        metrics.set_previews([("Ready", 3), ("Failed", 1), ("Bogus", 7)]);
        let text = metrics.encode();

        for family in [
            "# TYPE kapsa_git_poll_duration_seconds histogram",
            "# TYPE kapsa_git_poll_failures counter",
            "# TYPE kapsa_previews gauge",
            // The existing families stay.
            "# TYPE kapsa_git_polls counter",
            "# TYPE kapsa_reconciles counter",
            "# TYPE kapsa_reconcile_duration_seconds histogram",
            "# TYPE kapsa_api_writes counter",
            "# TYPE kapsa_reconcile_failures counter",
            "# TYPE kapsa_live_reads counter",
        ] {
            assert!(text.contains(family), "{family} missing from:\n{text}");
        }
        assert_eq!(
            sample(
                &text,
                "kapsa_git_poll_duration_seconds_count{result=\"success\"}"
            ),
            Some(1.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "kapsa_git_poll_duration_seconds_sum{result=\"failure\"}"
            ),
            Some(3.0),
            "{text}"
        );
        assert_eq!(
            sample(&text, "kapsa_git_poll_failures_total{reason=\"Timeout\"}"),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "kapsa_git_poll_failures_total{reason=\"MergeCheckUnreachable\"}"
            ),
            Some(1.0),
            "{text}"
        );
        for (phase, value) in [
            ("Pending", 0.0),
            ("Building", 0.0),
            ("Deploying", 0.0),
            ("Ready", 3.0),
            ("Failed", 1.0),
        ] {
            assert_eq!(
                sample(&text, &format!("kapsa_previews{{phase=\"{phase}\"}}")),
                Some(value),
                "{phase}: {text}"
            );
        }
        assert!(!text.contains("Bogus"), "{text}");

        // A later count replaces the earlier one; a phase left out is zero.
        metrics.set_previews([("Pending", 2)]);
        let text = metrics.encode();
        assert_eq!(
            sample(&text, "kapsa_previews{phase=\"Pending\"}"),
            Some(2.0)
        );
        assert_eq!(sample(&text, "kapsa_previews{phase=\"Ready\"}"), Some(0.0));
    }
}

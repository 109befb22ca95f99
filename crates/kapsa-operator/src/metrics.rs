//! Prometheus metrics of the operator, served at `/metrics`.

use std::time::Duration;

use kapsa_api::conditions::{BUILT, find_condition};
use kapsa_api::{Condition, ConditionStatus};
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EnvironmentLabels {
    r#type: String,
    phase: String,
}

/// The phases of an Environment, as the `phase` label of `kapsa_previews`
/// and `kapsa_environments`.
pub const PREVIEW_PHASES: [&str; 5] = ["Pending", "Building", "Deploying", "Ready", "Failed"];

/// The types of an Environment, as the `type` label of `kapsa_environments`.
pub const ENVIRONMENT_TYPES: [&str; 2] = ["Production", "Preview"];

/// The controllers, as the `controller` label of the reconcile series
/// (`controllers/project`, `controllers/environment`, and the status
/// controllers of `controllers/platform`).
pub const CONTROLLERS: [&str; 5] = [
    "project",
    "environment",
    "domainpool",
    "clusterregistry",
    "registry",
];

/// The `result` label of `kapsa_reconciles_total`.
pub const RECONCILE_RESULTS: [&str; 2] = ["success", "error"];

/// The `result` label of `kapsa_git_polls_total` and
/// `kapsa_git_poll_duration_seconds`.
pub const GIT_POLL_RESULTS: [&str; 4] = ["success", "failure", "credentials_error", "refused"];

/// The `result` label of `kapsa_builds_total`.
pub const BUILD_RESULTS: [&str; 3] = ["started", "succeeded", "failed"];

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
    environments: Family<EnvironmentLabels, Gauge>,
    builds: Family<ResultLabels, Counter>,
    leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("kapsa");
        // Series whose label values are known in advance are exported from
        // the start, at zero: a rate or a ratio over them is 0, not empty,
        // and the first increment is not lost to `rate()`.
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        for controller in CONTROLLERS {
            for result in RECONCILE_RESULTS {
                let _ = reconciles.get_or_create(&ReconcileLabels {
                    controller: controller.into(),
                    result: result.into(),
                });
            }
        }
        registry.register(
            "reconciles",
            "Reconciles by controller and result",
            reconciles.clone(),
        );
        let reconcile_duration =
            Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            });
        for controller in CONTROLLERS {
            let _ = reconcile_duration.get_or_create(&ControllerLabels {
                controller: controller.into(),
            });
        }
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
        for result in GIT_POLL_RESULTS {
            let _ = git_polls.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        registry.register("git_polls", "Git remote polls by result", git_polls.clone());
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Failed reconciles by controller and the pipeline step that failed (Dereference, Apply, Prune, Status)",
            failures.clone(),
        );
        let live_reads = Family::<KindLabels, Counter>::default();
        let _ = live_reads.get_or_create(&KindLabels {
            kind: "Secret".into(),
        });
        registry.register(
            "live_reads",
            "Reads that bypass the caches, by kind (only a changed registry credentials Secret)",
            live_reads.clone(),
        );
        let git_poll_duration = Family::<ResultLabels, Histogram>::new_with_constructor(|| {
            // 5 ms … ~41 s: a loopback listing to a listing at its timeout.
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        for result in GIT_POLL_RESULTS {
            let _ = git_poll_duration.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
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
        let environments = Family::<EnvironmentLabels, Gauge>::default();
        for type_ in ENVIRONMENT_TYPES {
            for phase in PREVIEW_PHASES {
                // Every combination is exported, zero included.
                let _ = environments.get_or_create(&EnvironmentLabels {
                    r#type: type_.into(),
                    phase: phase.into(),
                });
            }
        }
        registry.register(
            "environments",
            "Environments by type (Production, Preview) and phase (an Environment without a phase yet counts as Pending)",
            environments.clone(),
        );
        let builds = Family::<ResultLabels, Counter>::default();
        for result in BUILD_RESULTS {
            let _ = builds.get_or_create(&ResultLabels {
                result: result.into(),
            });
        }
        registry.register(
            "builds",
            "Builds by result (started, succeeded, failed), counted when Kapsa writes an Environment's Built condition",
            builds.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease (or runs without leader election), else 0",
            leader.clone(),
        );
        Self {
            registry,
            environments,
            builds,
            leader,
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

    /// Sets the Environments gauge: how many there are of each type
    /// (`Production`, `Preview`) in each phase. Combinations not given are
    /// set to zero; unknown types or phases are ignored.
    pub fn set_environments<'a>(
        &self,
        counts: impl IntoIterator<Item = ((&'a str, &'a str), i64)>,
    ) {
        let mut values = [[0i64; PREVIEW_PHASES.len()]; ENVIRONMENT_TYPES.len()];
        for ((type_, phase), count) in counts {
            if let (Some(t), Some(p)) = (
                ENVIRONMENT_TYPES.iter().position(|x| *x == type_),
                PREVIEW_PHASES.iter().position(|x| *x == phase),
            ) {
                values[t][p] += count;
            }
        }
        for (type_, row) in ENVIRONMENT_TYPES.iter().zip(values) {
            for (phase, value) in PREVIEW_PHASES.iter().zip(row) {
                self.environments
                    .get_or_create(&EnvironmentLabels {
                        r#type: (*type_).into(),
                        phase: (*phase).into(),
                    })
                    .set(value);
            }
        }
    }

    /// Counts the build that a change of an Environment's `Built` condition
    /// from `before` to `after` (the status Kapsa just wrote) tells of, if
    /// any (see [`build_result`]).
    pub fn record_build_transition(&self, before: &[Condition], after: &[Condition]) {
        if let Some(result) = build_result(before, after) {
            self.builds
                .get_or_create(&ResultLabels {
                    result: result.into(),
                })
                .inc();
        }
    }

    /// Sets `kapsa_leader`: whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// The `kapsa_leader` gauge itself, for leader election to keep up to
    /// date ([`crate::leader::LeaseConfig::report_leadership`]).
    pub fn leader_gauge(&self) -> Gauge {
        self.leader.clone()
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

/// The build a change of an Environment's `Built` condition tells of, as the
/// `result` label of `kapsa_builds_total`: `before` is the status Kapsa read,
/// `after` the one it wrote. The reasons come from the Environment plan:
///
/// - `started`: `Unknown`, reason `Building`, with the message `building
///   commit <sha>` that a build of a new commit starts with; counted when the
///   (status, reason) pair changes, or when the commit in that message does
///   (a push during a build starts another build: the same rule as the
///   `BuildStarted` Event);
/// - `succeeded`: the pair changes to `True`, `BuildSucceeded`;
/// - `failed`: the pair changes to `False`, `BuildFailed` (the build ran and
///   failed). A build that cannot start (`BuilderNotFound`,
///   `KpackNotInstalled`, a registry problem, `NotImplemented`) is no build.
///
/// A fixed image (`FixedImage`), waiting (`WaitingForCommit`,
/// `WaitingForBuildNamespace`) and a condition that did not change count
/// nothing, so a reconcile that rewrites nothing counts nothing.
pub fn build_result(before: &[Condition], after: &[Condition]) -> Option<&'static str> {
    let new = find_condition(after, BUILT)?;
    let old = find_condition(before, BUILT);
    let pair_changed = old.is_none_or(|old| (old.status, &old.reason) != (new.status, &new.reason));
    match (new.status, new.reason.as_str()) {
        (ConditionStatus::Unknown, "Building")
            if new.message.starts_with("building commit")
                && (pair_changed || old.is_some_and(|old| old.message != new.message)) =>
        {
            Some("started")
        }
        (ConditionStatus::True, "BuildSucceeded") if pair_changed => Some("succeeded"),
        (ConditionStatus::False, "BuildFailed") if pair_changed => Some("failed"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

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

    /// The sample names the encoding exports, from its `# TYPE` lines: a
    /// counter `F` is sampled as `F_total`, a histogram as `F_bucket`,
    /// `F_sum` and `F_count`, a gauge as `F`.
    fn exported_series(text: &str) -> std::collections::BTreeSet<String> {
        let mut series = std::collections::BTreeSet::new();
        for line in text.lines() {
            let mut words = line.split(' ');
            let (Some("#"), Some("TYPE"), Some(family), Some(type_)) =
                (words.next(), words.next(), words.next(), words.next())
            else {
                continue;
            };
            let suffixes: &[&str] = match type_ {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            series.extend(suffixes.iter().map(|s| format!("{family}{s}")));
        }
        series
    }

    fn condition(status: ConditionStatus, reason: &str, message: &str) -> Vec<Condition> {
        vec![Condition::new(
            BUILT,
            status,
            reason,
            message,
            Some(1),
            Time(Timestamp::now()),
        )]
    }

    #[test]
    fn environments_are_exported_by_type_and_phase_zero_included() {
        let metrics = Metrics::default();
        let text = metrics.encode();
        assert!(text.contains("# TYPE kapsa_environments gauge"), "{text}");
        for type_ in ENVIRONMENT_TYPES {
            for phase in PREVIEW_PHASES {
                assert_eq!(
                    sample(
                        &text,
                        &format!("kapsa_environments{{type=\"{type_}\",phase=\"{phase}\"}}")
                    ),
                    Some(0.0),
                    "{type_} {phase}: {text}"
                );
            }
        }

        metrics.set_environments([
            (("Production", "Ready"), 4),
            (("Preview", "Building"), 2),
            (("Preview", "Building"), 1),
            (("Bogus", "Ready"), 9),
            (("Preview", "Bogus"), 9),
        ]);
        let text = metrics.encode();
        let value = |type_: &str, phase: &str| {
            sample(
                &text,
                &format!("kapsa_environments{{type=\"{type_}\",phase=\"{phase}\"}}"),
            )
        };
        assert_eq!(value("Production", "Ready"), Some(4.0), "{text}");
        assert_eq!(value("Preview", "Building"), Some(3.0), "{text}");
        assert_eq!(value("Preview", "Ready"), Some(0.0), "{text}");
        assert_eq!(value("Production", "Failed"), Some(0.0), "{text}");
        assert!(!text.contains("Bogus"), "{text}");

        // A later count replaces the earlier one; a combination left out is zero.
        metrics.set_environments([(("Preview", "Failed"), 1)]);
        let text = metrics.encode();
        let value = |type_: &str, phase: &str| {
            sample(
                &text,
                &format!("kapsa_environments{{type=\"{type_}\",phase=\"{phase}\"}}"),
            )
        };
        assert_eq!(value("Production", "Ready"), Some(0.0), "{text}");
        assert_eq!(value("Preview", "Failed"), Some(1.0), "{text}");
    }

    #[test]
    fn leader_is_zero_until_set_and_follows_its_gauge() {
        let metrics = Metrics::default();
        let text = metrics.encode();
        assert!(text.contains("# TYPE kapsa_leader gauge"), "{text}");
        assert_eq!(sample(&text, "kapsa_leader"), Some(0.0), "{text}");
        metrics.set_leader(true);
        assert_eq!(sample(&metrics.encode(), "kapsa_leader"), Some(1.0));
        // Leader election holds a clone of the gauge: the same value.
        metrics.leader_gauge().set(0);
        assert_eq!(sample(&metrics.encode(), "kapsa_leader"), Some(0.0));
    }

    #[test]
    fn builds_are_counted_by_result_zero_included() {
        let metrics = Metrics::default();
        let text = metrics.encode();
        assert!(text.contains("# TYPE kapsa_builds counter"), "{text}");
        for result in BUILD_RESULTS {
            assert_eq!(
                sample(&text, &format!("kapsa_builds_total{{result=\"{result}\"}}")),
                Some(0.0),
                "{result}: {text}"
            );
        }
        let waiting = condition(ConditionStatus::Unknown, "WaitingForCommit", "head unknown");
        let building = condition(ConditionStatus::Unknown, "Building", "building commit aaa");
        let built = condition(ConditionStatus::True, "BuildSucceeded", "image x@sha256:1");
        let failed = condition(ConditionStatus::False, "BuildFailed", "the build failed");
        metrics.record_build_transition(&waiting, &building);
        metrics.record_build_transition(&building, &built);
        metrics.record_build_transition(&built, &building);
        metrics.record_build_transition(&building, &failed);
        // Unchanged: nothing.
        metrics.record_build_transition(&failed, &failed);
        metrics.record_build_transition(&building, &building);
        let text = metrics.encode();
        for (result, value) in [("started", 2.0), ("succeeded", 1.0), ("failed", 1.0)] {
            assert_eq!(
                sample(&text, &format!("kapsa_builds_total{{result=\"{result}\"}}")),
                Some(value),
                "{result}: {text}"
            );
        }
    }

    #[test]
    fn build_results_follow_the_built_condition() {
        use ConditionStatus::{False, True, Unknown};
        let none: Vec<Condition> = Vec::new();
        let c = condition;
        let building_a = c(Unknown, "Building", "building commit aaa");
        let building_b = c(Unknown, "Building", "building commit bbb");
        let no_image = c(Unknown, "Building", "the build reports no image");
        let succeeded = c(True, "BuildSucceeded", "image x@sha256:1");
        let succeeded_again = c(True, "BuildSucceeded", "image x@sha256:2");
        let failed = c(False, "BuildFailed", "the build of commit aaa failed");
        let fixed = c(True, "FixedImage", "image nginx");
        let no_builder = c(
            False,
            "BuilderNotFound",
            "ClusterBuilder \"x\" does not exist",
        );
        let waiting = c(
            Unknown,
            "WaitingForCommit",
            "the branch's head is not known yet",
        );

        // A build starts: first condition, or from any other state.
        assert_eq!(build_result(&none, &building_a), Some("started"));
        assert_eq!(build_result(&waiting, &building_a), Some("started"));
        assert_eq!(build_result(&succeeded, &building_a), Some("started"));
        assert_eq!(build_result(&failed, &building_a), Some("started"));
        assert_eq!(build_result(&fixed, &building_a), Some("started"));
        // A push during a build starts another one; the same build read again
        // does not, nor does a build that reports no image yet.
        assert_eq!(build_result(&building_a, &building_b), Some("started"));
        assert_eq!(build_result(&building_a, &building_a), None);
        assert_eq!(build_result(&building_a, &no_image), None);
        // It ends.
        assert_eq!(build_result(&building_a, &succeeded), Some("succeeded"));
        assert_eq!(build_result(&no_image, &succeeded), Some("succeeded"));
        assert_eq!(build_result(&building_a, &failed), Some("failed"));
        assert_eq!(build_result(&none, &succeeded), Some("succeeded"));
        // (status, reason) unchanged: nothing, whatever the message.
        assert_eq!(build_result(&succeeded, &succeeded), None);
        assert_eq!(build_result(&succeeded, &succeeded_again), None);
        assert_eq!(build_result(&failed, &failed), None);
        // Not builds: a fixed image, waiting, a build that cannot start, no
        // Built condition.
        assert_eq!(build_result(&none, &fixed), None);
        assert_eq!(build_result(&succeeded, &fixed), None);
        assert_eq!(build_result(&none, &waiting), None);
        assert_eq!(build_result(&building_a, &no_builder), None);
        assert_eq!(build_result(&building_a, &none), None);
        assert_eq!(build_result(&none, &none), None);
        // Other conditions play no part.
        let mut with_ready = succeeded.clone();
        with_ready.push(Condition::new(
            "Ready",
            True,
            "Serving",
            "serving",
            Some(1),
            Time(Timestamp::now()),
        ));
        assert_eq!(build_result(&succeeded, &with_ready), None);
        assert_eq!(build_result(&building_a, &with_ready), Some("succeeded"));
    }

    /// Every `kapsa_*` series the Grafana dashboard queries is one the
    /// operator exports: the dashboard cannot drift from the code.
    #[test]
    fn the_grafana_dashboard_queries_only_exported_series() {
        const DASHBOARD: &str = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/grafana/kapsa-operator-dashboard.json"
        ));
        let dashboard: serde_json::Value =
            serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
        fn exprs<'a>(value: &'a serde_json::Value, out: &mut Vec<&'a str>) {
            match value {
                serde_json::Value::Object(map) => {
                    for (key, value) in map {
                        match (key.as_str(), value) {
                            ("expr", serde_json::Value::String(expr)) => out.push(expr),
                            _ => exprs(value, out),
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter().for_each(|v| exprs(v, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        exprs(&dashboard, &mut found);
        assert!(found.len() >= 8, "too few queries: {found:?}");

        // The families whose label values are open-ended (the kind written,
        // the step or git error that failed) appear with their first
        // sample; every other one is exported from the start.
        let metrics = Metrics::default();
        let at_start = exported_series(&metrics.encode());
        metrics.record_write("Deployment");
        metrics.record_failure("project", "Apply");
        metrics.record_git_poll_failure("Timeout");
        let exported = exported_series(&metrics.encode());
        assert_eq!(
            exported.difference(&at_start).collect::<Vec<_>>(),
            [
                "kapsa_api_writes_total",
                "kapsa_git_poll_failures_total",
                "kapsa_reconcile_failures_total"
            ],
            "which families are exported before their first sample"
        );
        let mut used = std::collections::BTreeSet::new();
        for expr in &found {
            let mut rest = *expr;
            while let Some(at) = rest.find("kapsa_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                used.insert(name);
            }
        }
        assert!(!used.is_empty(), "the dashboard queries no kapsa_ series");
        for name in &used {
            assert!(
                exported.contains(name),
                "the dashboard queries {name}, which the operator does not export; it exports {exported:?}"
            );
        }
        // And every family that matters on a dashboard is on it.
        for family in [
            "kapsa_reconciles_total",
            "kapsa_reconcile_duration_seconds_bucket",
            "kapsa_reconcile_failures_total",
            "kapsa_git_polls_total",
            "kapsa_git_poll_failures_total",
            "kapsa_git_poll_duration_seconds_bucket",
            "kapsa_builds_total",
            "kapsa_environments",
            "kapsa_leader",
            "kapsa_api_writes_total",
        ] {
            assert!(
                used.contains(family),
                "the dashboard does not show {family}"
            );
        }
    }
}

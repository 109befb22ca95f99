//! Kubernetes Events (`events.k8s.io/v1`), published as series.
//!
//! The first Event of a series is created whole; a repeat within
//! [`SERIES_WINDOW`] only bumps the series' count and last observed time
//! with a small merge patch. What is remembered of a series is its key's
//! digest, its Event's name and how often it was seen (under a hundred
//! bytes), not the Event itself: kube-runtime's `Recorder` keeps every
//! Event of the window whole and goes over all of them on every publish,
//! which at 1,000 Projects was 6.3 MB of the operator's heap.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType};
use sha2::{Digest, Sha256};

/// How long after its last repeat a series is still continued rather than
/// started again (kube-runtime's and client-go's window alike).
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// How often the series past their window are forgotten.
const FORGET_EVERY: Duration = Duration::from_secs(60);

/// A series' Event (in the namespace of the object it is about) and how
/// often it was seen.
struct Series {
    name: String,
    count: i32,
    last: Instant,
}

struct Remembered {
    series: HashMap<[u8; 16], Series>,
    forgotten: Instant,
}

/// Publishes Events for one reporting controller (and instance).
pub struct Publisher {
    client: kube::Client,
    controller: String,
    instance: String,
    remembered: Mutex<Remembered>,
}

/// What a publish does at the API server.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Create a new Event with this name.
    Create { name: String },
    /// Continue the series of this Event to this count.
    Continue { name: String, count: i32 },
}

impl Publisher {
    /// `instance` defaults to the controller's name (as kube-runtime does).
    pub fn new(client: kube::Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.unwrap_or_else(|| controller.to_owned()),
            remembered: Mutex::new(Remembered {
                series: HashMap::new(),
                forgotten: Instant::now(),
            }),
        }
    }

    /// The series an Event belongs to: its type, reason, action and related
    /// object, and the object it is about.
    fn key(event: &Event, regarding: &ObjectReference) -> [u8; 16] {
        let mut digest = Sha256::new();
        let mut field = |value: Option<&str>| {
            let value = value.unwrap_or("\u{0}");
            digest.update((value.len() as u64).to_le_bytes());
            digest.update(value.as_bytes());
        };
        field(Some(match event.type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }));
        field(Some(&event.reason));
        field(Some(&event.action));
        for reference in std::iter::once(Some(regarding)).chain([event.secondary.as_ref()]) {
            let reference = reference.cloned().unwrap_or_default();
            field(reference.api_version.as_deref());
            field(reference.kind.as_deref());
            field(reference.namespace.as_deref());
            field(reference.name.as_deref());
            field(reference.uid.as_deref());
        }
        let digest = digest.finalize();
        let mut key = [0; 16];
        key.copy_from_slice(&digest[..16]);
        key
    }

    /// How many series are remembered (for tests and the benchmark).
    pub fn remembered(&self) -> usize {
        self.remembered
            .lock()
            .map(|r| r.series.len())
            .unwrap_or_default()
    }

    /// What to do for a series at `now`, forgetting series past their
    /// window at most once a [`FORGET_EVERY`].
    fn step(&self, key: &[u8; 16], regarding: &ObjectReference, now: Instant) -> Step {
        let Ok(mut remembered) = self.remembered.lock() else {
            return Step::Create {
                name: event_name(regarding, &self.controller),
            };
        };
        if now.saturating_duration_since(remembered.forgotten) >= FORGET_EVERY {
            remembered.forgotten = now;
            remembered
                .series
                .retain(|_, series| now.saturating_duration_since(series.last) < SERIES_WINDOW);
        }
        match remembered.series.get(key) {
            Some(series) if now.saturating_duration_since(series.last) < SERIES_WINDOW => {
                Step::Continue {
                    name: series.name.clone(),
                    count: series.count.saturating_add(1),
                }
            }
            _ => Step::Create {
                name: event_name(regarding, &self.controller),
            },
        }
    }

    fn remember(&self, key: [u8; 16], name: String, count: i32, now: Instant) {
        if let Ok(mut remembered) = self.remembered.lock() {
            remembered.series.insert(
                key,
                Series {
                    name,
                    count,
                    last: now,
                },
            );
        }
    }

    /// Publishes `event` about `regarding`: a new Event, or the next count
    /// of its series. A series whose Event is gone (expired at the API
    /// server, or deleted) starts again with a new one.
    pub async fn publish(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let key = Self::key(event, regarding);
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let events: Api<K8sEvent> = Api::namespaced(self.client.clone(), namespace);
        let now = Instant::now();
        let step = self.step(&key, regarding, now);
        if let Step::Continue { name, count } = &step {
            let patch = serde_json::json!({
                "series": {"count": count, "lastObservedTime": MicroTime(Timestamp::now())}
            });
            match events
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    self.remember(key, name.clone(), *count, now);
                    return Ok(());
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => return Err(error),
            }
        }
        let name = match step {
            Step::Create { name } => name,
            Step::Continue { .. } => event_name(regarding, &self.controller),
        };
        let whole = K8sEvent {
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            event_time: Some(MicroTime(Timestamp::now())),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            note: event.note.clone(),
            metadata: ObjectMeta {
                namespace: Some(namespace.to_owned()),
                name: Some(name.clone()),
                ..Default::default()
            },
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(
                match event.type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .to_owned(),
            ),
            ..Default::default()
        };
        events.create(&PostParams::default(), &whole).await?;
        self.remember(key, name, 1, now);
        Ok(())
    }
}

/// A new Event's name: the object's name and the time in nanoseconds, as
/// client-go and kube-runtime name theirs.
fn event_name(regarding: &ObjectReference, controller: &str) -> String {
    format!(
        "{}.{:x}",
        regarding.name.as_deref().unwrap_or(controller),
        Timestamp::now().as_nanosecond()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(reason: &str, action: &str, warning: bool) -> Event {
        Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some("a note".into()),
            action: action.into(),
            secondary: None,
        }
    }

    fn object(kind: &str, namespace: &str, name: &str, uid: &str) -> ObjectReference {
        ObjectReference {
            api_version: Some("kapsa.dev/v1alpha1".into()),
            kind: Some(kind.into()),
            namespace: Some(namespace.into()),
            name: Some(name.into()),
            uid: Some(uid.into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_series_is_its_event_and_object_and_nothing_else() {
        let shop = object("Environment", "shop", "production", "u1");
        let key = Publisher::key(&event("Built", "Built-1", false), &shop);
        assert_eq!(
            key,
            Publisher::key(&event("Built", "Built-1", false), &shop)
        );
        for other in [
            Publisher::key(&event("Built", "Built-2", false), &shop),
            Publisher::key(&event("Built", "Built-1", true), &shop),
            Publisher::key(&event("Failed", "Built-1", false), &shop),
            Publisher::key(
                &event("Built", "Built-1", false),
                &object("Environment", "shop", "production", "u2"),
            ),
            Publisher::key(
                &event("Built", "Built-1", false),
                &object("Environment", "blog", "production", "u1"),
            ),
            Publisher::key(
                &event("Built", "Built-1", false),
                &object("Project", "shop", "production", "u1"),
            ),
        ] {
            assert_ne!(key, other);
        }
        // Fields are delimited: moving a character between two changes it.
        assert_ne!(
            Publisher::key(&event("ab", "c", false), &shop),
            Publisher::key(&event("a", "bc", false), &shop)
        );
    }

    #[tokio::test]
    async fn a_repeat_continues_its_series_until_the_window_ends() {
        // No request is made: `step` and `remember` are the bookkeeping.
        let client =
            kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap()))
                .unwrap();
        let publisher = Publisher::new(client, "kapsa", None);
        let shop = object("Environment", "shop", "production", "u1");
        let key = Publisher::key(&event("Built", "Built-1", false), &shop);
        let start = Instant::now();
        let Step::Create { name } = publisher.step(&key, &shop, start) else {
            panic!("the first Event of a series is created");
        };
        assert!(name.starts_with("production."), "{name}");
        publisher.remember(key, name.clone(), 1, start);
        let later = start + Duration::from_secs(60);
        assert_eq!(
            publisher.step(&key, &shop, later),
            Step::Continue {
                name: name.clone(),
                count: 2
            }
        );
        publisher.remember(key, name.clone(), 2, later);
        // Past the window from the last repeat, a new series, and the old
        // one is forgotten.
        let past = later + SERIES_WINDOW;
        assert!(matches!(
            publisher.step(&key, &shop, past),
            Step::Create { .. }
        ));
        assert_eq!(publisher.remembered(), 0);
    }
}

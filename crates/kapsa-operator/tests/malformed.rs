//! One malformed object cannot stop the operator: a Project written under an
//! older, looser schema (so the API server holds it, but Kapsa's types cannot
//! read it) is reported and skipped, and every other Project still goes live.
//!
//! A test binary of its own: it swaps a CRD's schema for a moment.

mod support;

use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kapsa_api::Project;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::json;
use support::*;

const CRD: &str = "projects.kapsa.dev";

#[tokio::test]
async fn a_malformed_project_is_reported_and_skipped_and_the_others_go_live() {
    let (_, client) = cluster().await;
    shared_operator().await;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());

    // An older schema that accepts anything, for as long as it takes to
    // write one Project Kapsa's types cannot read (spec.source is a string).
    let original = crds.get(CRD).await.unwrap();
    let mut loose = original.clone();
    for version in &mut loose.spec.versions {
        version.schema = Some(
            serde_json::from_value(json!({"openAPIV3Schema": {
                "type": "object", "x-kubernetes-preserve-unknown-fields": true}}))
            .unwrap(),
        );
        version.additional_printer_columns = None;
    }
    loose.metadata.managed_fields = None;
    crds.replace(CRD, &PostParams::default(), &loose)
        .await
        .expect("the loose schema");
    let resource = kube::api::ApiResource::from_gvk(&GroupVersionKind::gvk(
        "kapsa.dev",
        "v1alpha1",
        "Project",
    ));
    let raw: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let broken: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "kapsa.dev/v1alpha1", "kind": "Project",
        "metadata": {"name": "broken"},
        "spec": {"source": "https://example.com/not-an-object.git", "runtime": {"port": "eighty"}}
    }))
    .unwrap();
    eventually("the malformed Project to be written", || async {
        raw.create(&PostParams::default(), &broken).await.ok()
    })
    .await;

    // The schema is restored; the stored object stays as it was written.
    let mut restored = crds.get(CRD).await.unwrap();
    restored.spec = original.spec.clone();
    restored.metadata.managed_fields = None;
    crds.replace(CRD, &PostParams::default(), &restored)
        .await
        .expect("the schema restored");
    eventually(
        "the restored schema to refuse a malformed Project",
        || async {
            let mut probe = broken.clone();
            probe.metadata.name = Some("probe".into());
            raw.create(&PostParams::default(), &probe).await.err()
        },
    )
    .await;

    // Reported: a Warning Event on the object.
    let events: Api<Event> = Api::all(client.clone());
    let event = eventually("a Malformed Event about the broken Project", || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("Malformed")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("broken")
            })
    })
    .await;
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert!(
        event
            .note
            .as_deref()
            .is_some_and(|n| n.contains("cannot be read")),
        "{event:?}"
    );

    // Every other Project still goes live, created after the broken one.
    let live = live_project(
        &client,
        "healthy",
        platform(&client, "healthy", "HTTP01", false).await,
        |_| {},
    )
    .await;
    assert_eq!(live.name, "healthy");
    // The broken one was never acted on: no namespace, no status.
    let stored = raw.get("broken").await.unwrap();
    assert!(stored.data.get("status").is_none_or(|s| s.is_null()));
    assert!(
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .get_opt("broken")
            .await
            .unwrap()
            .is_none()
    );

    // Deleting it is fine too: the operator carries on.
    raw.delete("broken", &Default::default()).await.unwrap();
    let project = Api::<Project>::all(client.clone())
        .get("healthy")
        .await
        .unwrap();
    assert!(project.status.is_some());
}

/// Kapsa's Events are series (`crate::events`): a repeat bumps the count of
/// the Event already made; another reason, or the same one about another
/// object, is an Event of its own; a series whose Event was deleted starts
/// again with a new Event rather than failing.
#[tokio::test]
async fn events_repeat_as_series_and_a_lost_one_is_made_again() {
    use k8s_openapi::api::core::v1::{Namespace, ObjectReference};
    use kube::runtime::events::{Event as Planned, EventType};

    let (_, client) = cluster().await;
    let namespace = "events-series";
    create_ignoring_conflict(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": namespace}}),
    )
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), namespace);
    let publisher = kapsa_operator::events::Publisher::new(client.clone(), "kapsa", None);
    let about = |name: &str| ObjectReference {
        api_version: Some("kapsa.dev/v1alpha1".into()),
        kind: Some("Environment".into()),
        namespace: Some(namespace.into()),
        name: Some(name.into()),
        uid: Some(format!("uid-{name}")),
        ..Default::default()
    };
    let planned = |reason: &str| Planned {
        type_: EventType::Normal,
        reason: reason.into(),
        note: Some(format!("{reason} happened")),
        action: format!("{reason}-0"),
        secondary: None,
    };
    let of = |list: &[Event], object: &str, reason: &str| -> Vec<Event> {
        list.iter()
            .filter(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object)
            })
            .cloned()
            .collect()
    };

    for _ in 0..3 {
        publisher
            .publish(&planned("Built"), &about("production"))
            .await
            .unwrap();
    }
    publisher
        .publish(&planned("Deployed"), &about("production"))
        .await
        .unwrap();
    publisher
        .publish(&planned("Built"), &about("preview"))
        .await
        .unwrap();
    let list = events.list(&ListParams::default()).await.unwrap().items;
    let built = of(&list, "production", "Built");
    assert_eq!(built.len(), 1, "one Event for three repeats: {built:?}");
    let series = built[0].series.as_ref().expect("the repeats are a series");
    assert_eq!(series.count, 3);
    assert_eq!(built[0].note.as_deref(), Some("Built happened"));
    assert_eq!(built[0].reporting_controller.as_deref(), Some("kapsa"));
    assert_eq!(of(&list, "production", "Deployed").len(), 1);
    let other = of(&list, "preview", "Built");
    assert_eq!(other.len(), 1);
    assert!(other[0].series.is_none(), "seen once, no series");
    assert_eq!(publisher.remembered(), 3);

    // Someone deletes the Event: the next repeat makes a new one.
    let lost = built[0].metadata.name.clone().unwrap();
    events.delete(&lost, &Default::default()).await.unwrap();
    publisher
        .publish(&planned("Built"), &about("production"))
        .await
        .unwrap();
    let list = events.list(&ListParams::default()).await.unwrap().items;
    let built = of(&list, "production", "Built");
    assert_eq!(built.len(), 1, "{built:?}");
    assert_ne!(built[0].metadata.name.as_ref(), Some(&lost));
    assert!(built[0].series.is_none(), "a new series: {built:?}");
    publisher
        .publish(&planned("Built"), &about("production"))
        .await
        .unwrap();
    let again = events
        .get(built[0].metadata.name.as_deref().unwrap())
        .await
        .unwrap();
    assert_eq!(again.series.map(|s| s.count), Some(2));
}

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

//! Leader election on a real Lease: one leader at a time, takeover after
//! expiry.

mod support;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kapsa_operator::leader::{LeaseConfig, try_acquire};
use kube::api::Api;
use support::*;

fn config(identity: &str, duration: Duration) -> LeaseConfig {
    LeaseConfig {
        namespace: PLATFORM_NAMESPACE.into(),
        name: "kapsa-operator-test".into(),
        identity: identity.into(),
        duration,
    }
}

#[tokio::test]
async fn one_leader_at_a_time_and_takeover_after_expiry() {
    let (_, client) = cluster().await;
    let a = config("replica-a", Duration::from_secs(2));
    let b = config("replica-b", Duration::from_secs(2));
    assert!(
        try_acquire(&client, &a).await.unwrap(),
        "the first replica leads"
    );
    assert!(!try_acquire(&client, &b).await.unwrap(), "the second waits");
    assert!(try_acquire(&client, &a).await.unwrap(), "the leader renews");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        try_acquire(&client, &b).await.unwrap(),
        "an expired lease is taken over"
    );
    assert!(
        !try_acquire(&client, &a).await.unwrap(),
        "the old leader does not take it back"
    );
    let lease = Api::<Lease>::namespaced(client.clone(), PLATFORM_NAMESPACE)
        .get("kapsa-operator-test")
        .await
        .unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
}

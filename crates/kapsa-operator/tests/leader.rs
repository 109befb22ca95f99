//! Leader election on a real Lease: one leader at a time, takeover after
//! expiry as each replica measures it on its own monotonic clock (so a
//! wall clock an hour off changes nothing), takeover at once of a released
//! lease, and a leader that steps down (`run` returns) before anyone may
//! take over when it cannot renew.

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use k8s_openapi::jiff::SignedDuration;
use kapsa_operator::leader::{LeaseConfig, release, try_acquire};
use kapsa_operator::metrics::Metrics;
use kapsa_operator::{OperatorConfig, run};
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use support::*;
use tokio::time::Instant;

const DURATION: Duration = Duration::from_secs(3);
const RENEW_DEADLINE: Duration = Duration::from_secs(2);
const RETRY: Duration = Duration::from_millis(500);
/// How often a candidate tries in these tests, and the slack allowed for a
/// loaded machine on top of the rule's own bounds.
const POLL: Duration = Duration::from_millis(100);
const SLACK: Duration = Duration::from_millis(1500);

fn replica(lease: &str, identity: &str) -> LeaseConfig {
    LeaseConfig::new(PLATFORM_NAMESPACE, lease, identity).with_timing(
        DURATION,
        RENEW_DEADLINE,
        RETRY,
    )
}

async fn lease_spec(client: &Client, name: &str) -> k8s_openapi::api::coordination::v1::LeaseSpec {
    Api::<Lease>::namespaced(client.clone(), PLATFORM_NAMESPACE)
        .get(name)
        .await
        .unwrap()
        .spec
        .unwrap()
}

/// Tries every [`POLL`] until `replica` leads; the instant it did.
async fn leads_by(client: &Client, replica: &LeaseConfig, limit: Instant) -> Option<Instant> {
    while Instant::now() < limit {
        if try_acquire(client, replica).await.unwrap() {
            return Some(Instant::now());
        }
        tokio::time::sleep(POLL).await;
    }
    None
}

#[tokio::test]
async fn one_leader_at_a_time_and_takeover_after_expiry() {
    let (env, client) = cluster().await;
    let name = env.unique_name("lease-basic");
    let a = replica(&name, "replica-a");
    let b = replica(&name, "replica-b");
    assert!(
        try_acquire(&client, &a).await.unwrap(),
        "the first replica leads"
    );
    assert!(!try_acquire(&client, &b).await.unwrap(), "the second waits");
    assert!(try_acquire(&client, &a).await.unwrap(), "the leader renews");
    let last_renewal = Instant::now();
    let taken = leads_by(
        &client,
        &b,
        last_renewal + DURATION + Duration::from_secs(10),
    )
    .await
    .expect("an expired lease is taken over");
    let waited = taken - last_renewal;
    assert!(
        waited >= DURATION && waited <= DURATION + POLL + SLACK,
        "taken over {waited:?} after the last renewal (lease {DURATION:?})"
    );
    assert!(
        !try_acquire(&client, &a).await.unwrap(),
        "the old leader does not take it back"
    );
    let spec = lease_spec(&client, &name).await;
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
}

/// A leader whose wall clock is `leader_offset` off, a candidate whose is
/// `candidate_offset` off: while the leader renews, the candidate never
/// leads; once the leader stops, the candidate leads one lease duration
/// after the last renewal, not an hour early or late.
async fn skewed(
    client: Client,
    name: String,
    leader_offset: SignedDuration,
    candidate_offset: SignedDuration,
) {
    let case = format!("leader {leader_offset:?} off, candidate {candidate_offset:?} off");
    let leader = replica(&name, "leader").with_clock_offset(leader_offset);
    let candidate = replica(&name, "candidate").with_clock_offset(candidate_offset);
    assert!(
        try_acquire(&client, &leader).await.unwrap(),
        "{case}: the leader leads"
    );
    let live_until = Instant::now() + 2 * DURATION;
    let mut next_renewal = Instant::now() + RETRY;
    while Instant::now() < live_until {
        assert!(
            !try_acquire(&client, &candidate).await.unwrap(),
            "{case}: the candidate stole a live lease"
        );
        if Instant::now() >= next_renewal {
            assert!(
                try_acquire(&client, &leader).await.unwrap(),
                "{case}: the leader renews"
            );
            next_renewal += RETRY;
        }
        tokio::time::sleep(POLL).await;
    }
    // The leader renews one last time, then dies.
    assert!(
        try_acquire(&client, &leader).await.unwrap(),
        "{case}: the leader renews"
    );
    let last_renewal = Instant::now();
    let taken = leads_by(
        &client,
        &candidate,
        last_renewal + DURATION + Duration::from_secs(10),
    )
    .await
    .unwrap_or_else(|| panic!("{case}: the expired lease was not taken over"));
    let waited = taken - last_renewal;
    assert!(
        waited >= DURATION && waited <= DURATION + POLL + SLACK,
        "{case}: taken over {waited:?} after the last renewal (lease {DURATION:?})"
    );
    println!("{case}: taken over {waited:?} after the last renewal");
    assert!(
        !try_acquire(&client, &leader).await.unwrap(),
        "{case}: the old leader does not take it back"
    );
    let spec = lease_spec(&client, &name).await;
    assert_eq!(spec.holder_identity.as_deref(), Some("candidate"), "{case}");
    // The candidate wrote its own (skewed) clock: the timestamps are there,
    // and no decision read them.
    let written = spec.renew_time.unwrap().0;
    let off = written.duration_since(k8s_openapi::jiff::Timestamp::now()) - candidate_offset;
    assert!(
        off.abs() < SignedDuration::from_mins(1),
        "{case}: renewTime {written}"
    );
}

#[tokio::test]
async fn a_wall_clock_an_hour_off_neither_steals_a_live_lease_nor_outlives_its_expiry() {
    let (env, client) = cluster().await;
    let hour = SignedDuration::from_hours(1);
    let zero = SignedDuration::ZERO;
    let cases = [(zero, hour), (zero, -hour), (hour, zero), (-hour, zero)];
    futures::future::join_all(cases.into_iter().map(|(leader, candidate)| {
        skewed(
            client.clone(),
            env.unique_name("lease-skew"),
            leader,
            candidate,
        )
    }))
    .await;
}

#[tokio::test]
async fn a_released_lease_is_taken_over_at_once() {
    let (env, client) = cluster().await;
    let name = env.unique_name("lease-release");
    // Long leases: only the release can explain a prompt takeover.
    let a = LeaseConfig::new(PLATFORM_NAMESPACE, &name, "replica-a");
    let b = LeaseConfig::new(PLATFORM_NAMESPACE, &name, "replica-b");
    assert!(try_acquire(&client, &a).await.unwrap());
    assert!(
        !try_acquire(&client, &b).await.unwrap(),
        "the lease is held"
    );
    assert!(
        release(&client, &a).await.unwrap(),
        "the leader releases it"
    );
    let spec = lease_spec(&client, &name).await;
    assert_eq!(spec.holder_identity, None);
    assert_eq!(spec.lease_transitions, Some(0));
    assert!(
        try_acquire(&client, &b).await.unwrap(),
        "taken over at once"
    );
    assert!(
        !release(&client, &a).await.unwrap(),
        "a replica releases only its own lease"
    );
    let spec = lease_spec(&client, &name).await;
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
    assert!(
        !try_acquire(&client, &a).await.unwrap(),
        "and it stays taken"
    );
}

/// Runs the operator as `client` with leader election; the join handle
/// yields the instant `run` returned.
fn operator(client: Client, lease: LeaseConfig) -> tokio::task::JoinHandle<Instant> {
    tokio::spawn(async move {
        let config = OperatorConfig {
            lease: Some(lease),
            ..OperatorConfig::default()
        };
        run(
            client,
            config,
            Arc::new(Metrics::default()),
            futures::future::pending(),
        )
        .await
        .expect("the operator to stop cleanly");
        Instant::now()
    })
}

async fn wait_for_holder(client: &Client, name: &str, holder: &str) {
    let leases = Api::<Lease>::namespaced(client.clone(), PLATFORM_NAMESPACE);
    eventually(&format!("{holder} to hold {name}"), || async {
        let lease = leases.get_opt(name).await.ok()??;
        (lease.spec?.holder_identity.as_deref() == Some(holder)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_leader_refused_its_renewals_stops_before_anyone_takes_over() {
    let (env, admin) = cluster().await;
    let name = env.unique_name("lease-refused");
    // The operator runs as a user of its own, allowed everything through a
    // ClusterRoleBinding that the test then deletes: every renewal (and
    // everything else) is refused from then on.
    let user = format!("kapsa-{name}");
    let bindings: Api<ClusterRoleBinding> = Api::all(admin.clone());
    create(
        &bindings,
        serde_json::json!({"metadata": {"name": user},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}),
    )
    .await;
    let leader = LeaseConfig::new(PLATFORM_NAMESPACE, &name, "leader").with_timing(
        Duration::from_secs(6),
        Duration::from_secs(3),
        RETRY,
    );
    let candidate = LeaseConfig::new(PLATFORM_NAMESPACE, &name, "candidate").with_timing(
        Duration::from_secs(6),
        Duration::from_secs(3),
        RETRY,
    );
    let running = operator(env.client_as(&user, &[]).await, leader);
    wait_for_holder(&admin, &name, "leader").await;

    // The candidate tries all along; it must not lead while the leader may.
    let trying = {
        let admin = admin.clone();
        tokio::spawn(async move {
            leads_by(&admin, &candidate, Instant::now() + Duration::from_secs(60)).await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !running.is_finished(),
        "the leader keeps leading while it renews"
    );
    assert!(
        !trying.is_finished(),
        "the candidate waits while the leader renews"
    );

    let revoked = Instant::now();
    bindings
        .delete(&user, &DeleteParams::default())
        .await
        .unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the leader to step down")
        .unwrap();
    let taken = trying.await.unwrap().expect("the candidate to take over");
    assert!(
        stopped < taken,
        "the old leader stopped {:?} after the new one took over",
        stopped.saturating_duration_since(taken)
    );
    assert!(
        stopped - revoked <= Duration::from_secs(3) + RETRY + SLACK,
        "stepped down {:?} after its renewals were refused (renew deadline 3s)",
        stopped - revoked
    );
    let margin = taken - stopped;
    println!(
        "stepped down {:?} after the refusal, {margin:?} before the takeover",
        stopped - revoked
    );
}

#[tokio::test]
async fn a_leader_whose_lease_another_replica_holds_stops_at_once() {
    let (env, admin) = cluster().await;
    let name = env.unique_name("lease-lost");
    let leader = LeaseConfig::new(PLATFORM_NAMESPACE, &name, "leader").with_timing(
        Duration::from_secs(15),
        Duration::from_secs(10),
        RETRY,
    );
    let running = operator(admin.clone(), leader);
    wait_for_holder(&admin, &name, "leader").await;
    // Another client writes itself in as the holder (as a replica that
    // wrongly believed the lease expired would).
    let leases = Api::<Lease>::namespaced(admin.clone(), PLATFORM_NAMESPACE);
    let taken = loop {
        let mut lease = leases.get(&name).await.unwrap();
        lease.spec.as_mut().unwrap().holder_identity = Some("usurper".into());
        match leases.replace(&name, &PostParams::default(), &lease).await {
            Ok(_) => break Instant::now(),
            // The leader renewed in between: again.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => panic!("taking the lease: {e}"),
        }
    };
    let stopped = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("the leader to step down")
        .unwrap();
    assert!(
        stopped - taken <= RETRY + SLACK,
        "stepped down {:?} after losing the lease (not at the renew deadline)",
        stopped - taken
    );
    assert_eq!(
        lease_spec(&admin, &name).await.holder_identity.as_deref(),
        Some("usurper"),
        "the old leader did not take it back"
    );
}

/// A replica waiting for the Lease is ready (to take over): otherwise a
/// rolling update with maxUnavailable 0 would wait forever for a new pod
/// that cannot lead while the old one runs, and the PodDisruptionBudget
/// would never let the leader be evicted. It reports kapsa_leader 0 until
/// it leads.
#[tokio::test]
async fn a_standby_replica_is_ready_and_not_the_leader() {
    let (env, client) = cluster().await;
    let name = env.unique_name("lease-standby");
    let holder = LeaseConfig::new(PLATFORM_NAMESPACE, &name, "holder");
    assert!(try_acquire(&client, &holder).await.unwrap());
    let addr: std::net::SocketAddr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = OperatorConfig {
        lease: Some(replica(&name, "standby")),
        metrics_addr: Some(addr),
        ..operator_config()
    };
    let operator = tokio::spawn(run(
        client.clone(),
        config,
        Arc::new(Metrics::default()),
        futures::future::pending(),
    ));
    let get = |path: &'static str| async move {
        let response = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
        let code = response.status().as_u16();
        Some((code, response.text().await.ok()?))
    };
    let leader_sample = |metrics: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with("kapsa_leader "))
            .map(str::to_string)
    };
    let (code, body) = eventually("/readyz of the standby", || get("/readyz")).await;
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("standing by"), "{body}");
    let (_, metrics) = get("/metrics").await.unwrap();
    assert_eq!(leader_sample(&metrics).as_deref(), Some("kapsa_leader 0"));

    // The holder goes: the standby leads, and says so.
    assert!(release(&client, &holder).await.unwrap());
    eventually("the standby to lead and be ready", || async {
        let (code, body) = get("/readyz").await?;
        let (_, metrics) = get("/metrics").await?;
        (code == 200
            && body == "ok"
            && leader_sample(&metrics).as_deref() == Some("kapsa_leader 1"))
        .then_some(())
    })
    .await;
    operator.abort();
}

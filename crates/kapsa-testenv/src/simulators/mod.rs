//! SIMULATORS for the systems Kapsa integrates with that need a container
//! runtime, which these machines lack: kpack (image builds), BuildKit
//! (Dockerfile build Jobs), cert-manager (TLS certificates) and a Gateway API
//! implementation (Gateway, ListenerSet and HTTPRoute status; it waits until
//! a test installs the Gateway API CRDs). They implement the same API objects
//! with the same meaning, so Kapsa cannot tell the difference through the API,
//! but they build nothing, talk to no certificate authority and route no
//! traffic. Everything they write says "simulator" (field manager, condition
//! messages, labels, logs, the Gateway API `controllerName`).

pub mod build_jobs;
pub mod cert_manager;
pub mod gateway;
pub mod kpack;

use kube::Client;
use kube::api::PatchParams;

use crate::control_plane::Result;
use crate::crds::{install_crds, parse_crds};

/// Field manager of every write the simulators make.
pub const FIELD_MANAGER: &str = "kapsa-testenv-simulator";

/// Installs both simulators' CRDs and their configuration namespace.
pub async fn install(client: &Client) -> Result<()> {
    let mut crds = parse_crds(include_str!("../../crds/kpack-simulator.yaml"))?;
    crds.extend(parse_crds(include_str!(
        "../../crds/cert-manager-simulator.yaml"
    ))?);
    install_crds(client, &crds, FIELD_MANAGER).await?;
    kpack::install(client).await
}

/// Runs every simulator until the future is dropped (the Gateway API one
/// idles until the Gateway API CRDs are served).
pub async fn run(client: Client) {
    tracing::info!("starting the kpack, BuildKit, cert-manager and Gateway API simulators");
    tokio::join!(
        kpack::run(client.clone()),
        build_jobs::run(client.clone()),
        cert_manager::run(client.clone()),
        gateway::run(client.clone())
    );
}

/// The current time in the RFC 3339 form Kubernetes uses.
/// A cache of every object of `resource` (managed fields dropped), and
/// the watch stream that fills it: it fills only while the stream is
/// polled.
pub fn reflect_dynamic(
    client: &Client,
    resource: &kube::api::ApiResource,
) -> (
    kube::runtime::reflector::Store<kube::api::DynamicObject>,
    impl futures::Stream<
        Item = kube::runtime::watcher::Result<
            kube::runtime::watcher::Event<kube::api::DynamicObject>,
        >,
    > + Send
    + use<>,
) {
    use kube::ResourceExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let writer = reflector::store::Writer::new(resource.clone());
    let store = writer.as_reader();
    let stream = watcher(
        kube::Api::<kube::api::DynamicObject>::all_with(client.clone(), resource),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(|o: &mut kube::api::DynamicObject| o.managed_fields_mut().clear())
    .reflect(writer);
    (store, stream)
}

pub(crate) fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A condition in the shape kpack and cert-manager use.
pub(crate) fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    message: &str,
) -> serde_json::Value {
    serde_json::json!({
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now_rfc3339(),
    })
}

/// Parameters of the simulators' merge patches.
pub(crate) fn write_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    }
}

//! The xDS control plane: the registry, weights and health included, for
//! any gRPC client (grpc-go, grpc-java, grpc-core's Python/C++/Ruby,
//! grpc-js) and for Envoy, over the v3 Aggregated Discovery Service in its
//! state-of-the-world form.
//!
//! - [`resources`]: the pure mapping from the controller's view to
//!   Listener / Cluster / ClusterLoadAssignment, versioned by content;
//! - [`session`]: one stream's protocol (subscriptions, nonces, ACK/NACK);
//! - [`server`]: the tonic service around sessions;
//! - [`bootstrap`]: the bootstrap file a client needs;
//! - [`metrics`]: streams, pushes, ACKs and NACKs for `/metrics`.
//!
//! Every replica serves it, leader or not, from its own store: etcd sees
//! one watch per controller however many clients subscribe. Snapshots are
//! built once per store change and shared by every stream.
//!
//! Static stability: no snapshot exists before the store's first full
//! sync, so nothing (in particular no empty assignment) is sent by a
//! controller that does not know yet; while etcd is unreachable the store
//! keeps its last state, and so does the snapshot.

pub mod bootstrap;
pub mod metrics;
pub mod resources;
pub mod server;
pub mod session;

use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::store::Store;
use crate::view::ServicesView;
pub use metrics::XdsMetrics;
pub use resources::Snapshot;
pub use server::Limits;

/// The one place this module reads the store: the whole view once it has
/// synced, `None` before. (The same view `/services` renders.)
fn read_view(store: &Store) -> Option<ServicesView> {
    store
        .synced()
        .then(|| store.view(None, None, Instant::now()))
}

/// Builds a snapshot on every store change and publishes it when it
/// differs from the last one; `max_unhealthy_ratio` as in
/// [`Snapshot::build`]. Ends when `cancel` is cancelled.
pub fn spawn_snapshots(
    store: Arc<Store>,
    max_unhealthy_ratio: f64,
    metrics: Arc<XdsMetrics>,
    cancel: CancellationToken,
) -> (
    watch::Receiver<Option<Arc<Snapshot>>>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(None::<Arc<Snapshot>>);
    let task = tokio::spawn(async move {
        let mut generation = store.subscribe();
        // Services warned about as oversized (once each, again if one
        // shrinks and grows past the limit again).
        let mut warned = std::collections::BTreeSet::new();
        loop {
            generation.mark_unchanged();
            if let Some(view) = read_view(&store) {
                let snap = Snapshot::build(&view, max_unhealthy_ratio);
                let same = tx
                    .borrow()
                    .as_ref()
                    .is_some_and(|old| old.same_content(&snap));
                if !same {
                    debug!(
                        revision = snap.revision,
                        eds = %snap.of(resources::Kind::Endpoint).version,
                        "xds snapshot"
                    );
                    let big = snap.oversized(resources::GRPC_DEFAULT_MAX_RECV);
                    metrics.oversized.set(big.len() as i64);
                    for (service, bytes) in &big {
                        if !warned.contains(*service) {
                            warn!(%service, bytes, limit = resources::GRPC_DEFAULT_MAX_RECV,
                                  "xds assignment larger than gRPC clients' default receive limit: clients with the default refuse it and reconnect; raise their limit or split the service (docs/xds.md)");
                        }
                    }
                    warned = big.iter().map(|(s, _)| s.to_string()).collect();
                    tx.send_replace(Some(Arc::new(snap)));
                    metrics.snapshots.inc();
                }
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                changed = generation.changed() => if changed.is_err() { break },
            }
        }
    });
    (rx, task)
}

/// Serves ADS on `listener` until `shutdown`, from `snapshots`, naming
/// itself `control_plane` in responses and counting in `metrics`.
///
/// # Errors
/// The transport failing (not a client's bad request: that only ends its
/// stream).
pub async fn serve(
    listener: TcpListener,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    control_plane: String,
    metrics: Arc<XdsMetrics>,
    limits: Limits,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    match listener.local_addr() {
        Ok(addr) => info!(listen = %addr, "serving xDS (ADS, state of the world)"),
        Err(e) => info!(error = %e, "serving xDS (ADS, state of the world)"),
    }
    let ads =
        server::Ads::new(snapshots, control_plane, shutdown.clone(), metrics).with_limits(limits);
    tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        // Dead clients are noticed even when no update flows.
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .add_service(AggregatedDiscoveryServiceServer::new(ads))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown.cancelled_owned(),
        )
        .await
}

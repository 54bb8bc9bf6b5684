//! The gRPC side of ADS: one task per stream running a [`Session`] over
//! the stream's requests and the snapshot channel. Bad input ends the
//! stream with a status that says what was wrong; nothing here panics.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, info_span, warn, Instrument};

use super::metrics::XdsMetrics;
use super::resources::Snapshot;
use super::session::Session;

/// Responses queued per stream before the session waits for the client to
/// read (backpressure, not buffering without bound).
const QUEUE: usize = 16;

/// The ADS service: every stream reads the same snapshot channel.
#[derive(Debug, Clone)]
pub struct Ads {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    control_plane: String,
    shutdown: CancellationToken,
    streams: Arc<AtomicUsize>,
    metrics: Arc<XdsMetrics>,
}

impl Ads {
    /// A service pushing `snapshots`, naming itself `control_plane` in
    /// every response, counting in `metrics`; streams end when `shutdown`
    /// is cancelled.
    pub fn new(
        snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
        control_plane: String,
        shutdown: CancellationToken,
        metrics: Arc<XdsMetrics>,
    ) -> Self {
        Self {
            snapshots,
            control_plane,
            shutdown,
            streams: Arc::new(AtomicUsize::new(0)),
            metrics,
        }
    }

    /// Streams open now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }
}

type Out = mpsc::Sender<Result<DiscoveryResponse, Status>>;

async fn send(
    tx: &Out,
    cancel: &CancellationToken,
    msg: Result<DiscoveryResponse, Status>,
) -> bool {
    tokio::select! {
        () = cancel.cancelled() => false,
        r = tx.send(msg) => r.is_ok(),
    }
}

async fn serve_stream(
    mut inbound: Streaming<DiscoveryRequest>,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    mut session: Session,
    tx: Out,
    cancel: CancellationToken,
    metrics: &XdsMetrics,
) {
    // Responses are only ever computed from the latest snapshot: a slow
    // client skips intermediate ones, never gets them out of order.
    snapshots.mark_unchanged();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tx.closed() => break,
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    let snap = snapshots.borrow().clone();
                    match session.on_request(req, snap.as_deref()) {
                        Ok(Some(resp)) => if !send(&tx, &cancel, Ok(resp)).await { break },
                        Ok(None) => {}
                        Err(status) => {
                            metrics.bad_requests.inc();
                            warn!(node = session.node().unwrap_or(""), error = %status.message(), "xds bad request; ending the stream");
                            let _ = send(&tx, &cancel, Err(status)).await;
                            break;
                        }
                    }
                }
                Ok(None) => {
                    debug!(node = session.node().unwrap_or(""), "xds stream closed by the client");
                    break;
                }
                Err(status) => {
                    metrics.bad_requests.inc();
                    warn!(node = session.node().unwrap_or(""), code = ?status.code(), error = %status.message(), "xds stream failed");
                    let _ = send(&tx, &cancel, Err(Status::invalid_argument(format!(
                        "unreadable DiscoveryRequest: {}", status.message()
                    )))).await;
                    break;
                }
            },
            changed = snapshots.changed() => {
                if changed.is_err() { break }
                let snap = snapshots.borrow_and_update().clone();
                if let Some(snap) = snap {
                    for resp in session.on_snapshot(&snap) {
                        if !send(&tx, &cancel, Ok(resp)).await { return }
                    }
                }
            }
        }
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(QUEUE);
        let session = Session::new(&self.control_plane).with_metrics(self.metrics.clone());
        let streams = self.streams.clone();
        let metrics = self.metrics.clone();
        let open = streams.fetch_add(1, Ordering::Relaxed) + 1;
        metrics.streams.inc();
        info!(%peer, open, "xds stream opened");
        let span = info_span!("xds_stream", %peer);
        tokio::spawn(
            {
                let snapshots = self.snapshots.clone();
                let cancel = self.shutdown.clone();
                async move {
                    serve_stream(inbound, snapshots, session, tx, cancel, &metrics).await;
                    metrics.streams.dec();
                    let open = streams.fetch_sub(1, Ordering::Relaxed) - 1;
                    info!(open, "xds stream ended");
                }
            }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "incremental (delta) xDS is not served here; use state-of-the-world ADS (StreamAggregatedResources)",
        ))
    }
}

//! The gRPC side of ADS: one task per stream running a [`Session`] over
//! the stream's requests and the snapshot channel. Bad input ends the
//! stream with a status that says what was wrong; nothing here panics.
//!
//! Memory per subscriber is bounded whatever the client does:
//! - a response to a new snapshot is built only when the transport can
//!   take it, from the snapshot current then: a slow client skips
//!   intermediate versions and nothing is queued twice; at most one
//!   response per resource type waits (the outbox), and one sits in the
//!   channel to the transport;
//! - a client that reads nothing for [`Limits::write_timeout`] while a
//!   response waits is disconnected (`DEADLINE_EXCEEDED`);
//! - streams are capped per connection (HTTP/2 `SETTINGS_MAX_CONCURRENT_STREAMS`)
//!   and in total ([`Limits::max_streams`]; past it `RESOURCE_EXHAUSTED`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// Responses in the channel between a stream's task and the transport:
/// one; what waits behind it is the outbox, one per type.
const QUEUE: usize = 1;

/// The xDS server's bounds (see the module docs); each is a controller
/// flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// ADS streams open at once, all connections together.
    pub max_streams: usize,
    /// ADS streams open at once on one HTTP/2 connection.
    pub max_streams_per_connection: u32,
    /// A client that takes no response for this long while one waits is
    /// disconnected.
    pub write_timeout: Duration,
}

impl Default for Limits {
    /// 10,000 streams (a fleet's gRPC clients each hold one; each stream
    /// costs a task and at most a few responses); 100 per connection
    /// (a client opens one ADS stream, a proxy a handful; 100 is HTTP/2's
    /// recommended minimum); 30 s to take a response (keep-alive pings
    /// are answered within 10 s or the connection is dropped anyway).
    fn default() -> Self {
        Self {
            max_streams: 10_000,
            max_streams_per_connection: 100,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// The ADS service: every stream reads the same snapshot channel.
#[derive(Debug, Clone)]
pub struct Ads {
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    control_plane: String,
    shutdown: CancellationToken,
    streams: Arc<AtomicUsize>,
    metrics: Arc<XdsMetrics>,
    limits: Limits,
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
            limits: Limits::default(),
        }
    }

    /// The same service with these bounds.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Streams open now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }
}

type Out = mpsc::Sender<Result<DiscoveryResponse, Status>>;

/// Responses waiting to be written, at most one per resource type: a newer
/// one replaces the older in place (the session already counts the newer
/// nonce and version as the ones sent, so the client never sees the older).
#[derive(Default)]
struct Outbox(VecDeque<DiscoveryResponse>);

impl Outbox {
    fn put(&mut self, resp: DiscoveryResponse) {
        match self.0.iter_mut().find(|r| r.type_url == resp.type_url) {
            Some(slot) => *slot = resp,
            None => self.0.push_back(resp),
        }
    }
}

/// Why a stream's inbound side failed, as a client's own doing or not:
/// a client that goes away (reset, cancel, connection closed) is a
/// disconnect, not a bad request.
fn is_disconnect(status: &Status) -> bool {
    use tonic::Code;
    match status.code() {
        Code::Cancelled | Code::Unavailable | Code::DeadlineExceeded => true,
        // h2 reports a reset or a closed connection as Unknown with the
        // transport's words.
        Code::Unknown | Code::Internal => {
            let m = status.message().to_ascii_lowercase();
            [
                "reset",
                "closed",
                "broken pipe",
                "connection",
                "cancel",
                "eof",
            ]
            .iter()
            .any(|w| m.contains(w))
        }
        _ => false,
    }
}

async fn serve_stream(
    mut inbound: Streaming<DiscoveryRequest>,
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    mut session: Session,
    tx: Out,
    cancel: CancellationToken,
    metrics: &XdsMetrics,
    write_timeout: Duration,
) {
    // Responses are only ever computed from the latest snapshot: a slow
    // client skips intermediate ones, never gets them out of order.
    snapshots.mark_unchanged();
    let mut outbox = Outbox::default();
    // A snapshot came that this stream has not answered yet.
    let mut dirty = false;
    // Since when a response has waited for the client to take it.
    let mut waiting_since: Option<tokio::time::Instant> = None;
    loop {
        if outbox.0.is_empty() && !dirty {
            waiting_since = None;
        } else if waiting_since.is_none() {
            waiting_since = Some(tokio::time::Instant::now());
        }
        let stall = async {
            match waiting_since {
                Some(t) => tokio::time::sleep_until(t + write_timeout).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tx.closed() => {
                metrics.disconnects.inc();
                debug!(node = session.node().unwrap_or(""), "xds client went away");
                break;
            }
            () = stall => {
                metrics.slow_disconnects.inc();
                warn!(node = session.node().unwrap_or(""), waited = ?write_timeout,
                      "xds client took no response for the write timeout; disconnecting it");
                let _ = tx.try_send(Err(Status::deadline_exceeded(format!(
                    "no response taken for {write_timeout:?}: disconnected"
                ))));
                break;
            }
            permit = tx.reserve(), if !outbox.0.is_empty() || dirty => match permit {
                Ok(permit) => {
                    if dirty {
                        dirty = false;
                        let snap = snapshots.borrow_and_update().clone();
                        if let Some(snap) = snap {
                            for resp in session.on_snapshot(&snap) {
                                outbox.put(resp);
                            }
                        }
                    }
                    if let Some(resp) = outbox.0.pop_front() {
                        permit.send(Ok(resp));
                    }
                    waiting_since = None;
                }
                Err(_) => break,
            },
            msg = inbound.message() => match msg {
                Ok(Some(req)) => {
                    let snap = snapshots.borrow().clone();
                    match session.on_request(req, snap.as_deref()) {
                        Ok(Some(resp)) => outbox.put(resp),
                        Ok(None) => {}
                        Err(status) => {
                            metrics.bad_requests.inc();
                            warn!(node = session.node().unwrap_or(""), error = %status.message(), "xds bad request; ending the stream");
                            let _ = tx.try_send(Err(status));
                            break;
                        }
                    }
                }
                Ok(None) => {
                    metrics.disconnects.inc();
                    debug!(node = session.node().unwrap_or(""), "xds stream closed by the client");
                    break;
                }
                Err(status) if is_disconnect(&status) => {
                    metrics.disconnects.inc();
                    debug!(node = session.node().unwrap_or(""), code = ?status.code(), error = %status.message(), "xds client went away");
                    break;
                }
                Err(status) => {
                    metrics.bad_requests.inc();
                    warn!(node = session.node().unwrap_or(""), code = ?status.code(),
                          error = %status.message().chars().take(200).collect::<String>(), "xds stream failed");
                    let _ = tx.try_send(Err(Status::invalid_argument(format!(
                        "unreadable DiscoveryRequest: {}", status.message().chars().take(200).collect::<String>()
                    ))));
                    break;
                }
            },
            changed = snapshots.changed(), if !dirty => {
                if changed.is_err() { break }
                // Built when the transport can take it, from the snapshot
                // current then.
                dirty = true;
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
        // Taken before the stream counts: past the cap, refuse.
        let open = self.streams.fetch_add(1, Ordering::Relaxed) + 1;
        if open > self.limits.max_streams {
            self.streams.fetch_sub(1, Ordering::Relaxed);
            self.metrics.refused_streams.inc();
            warn!(%peer, max = self.limits.max_streams, "xds stream refused: too many streams");
            return Err(Status::resource_exhausted(format!(
                "this controller serves at most {} xDS streams at once; try another replica or later",
                self.limits.max_streams
            )));
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let session = Session::new(&self.control_plane).with_metrics(self.metrics.clone());
        let streams = self.streams.clone();
        let metrics = self.metrics.clone();
        let write_timeout = self.limits.write_timeout;
        metrics.streams.inc();
        info!(%peer, open, "xds stream opened");
        let span = info_span!("xds_stream", %peer);
        tokio::spawn(
            {
                let snapshots = self.snapshots.clone();
                let cancel = self.shutdown.clone();
                async move {
                    serve_stream(
                        inbound,
                        snapshots,
                        session,
                        tx,
                        cancel,
                        &metrics,
                        write_timeout,
                    )
                    .await;
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

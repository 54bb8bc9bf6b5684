//! How calls reach one endpoint: hyper's HTTP/2 sender on a connection the
//! balancer dialled itself, or a tonic `Channel`.
//!
//! A tonic `Channel` is a buffer task in front of hyper's connection task:
//! every call hops to the buffer task, then to the connection task, and a
//! wake-up crosses threads at each hop. The balancer already does what the
//! `Channel` adds on top of hyper (it reconnects an endpoint itself, and
//! bounds a call by its deadline), so for plaintext endpoints it holds
//! hyper's sender and skips that hop: issue 14 measured the plain sender at
//! 1.04-1.22x a `Channel`'s calls per second on the same server.
//!
//! A `Channel` stays for TLS endpoints. A plaintext endpoint's first
//! connection is dialled once and shared (`Conn::Dialing`): calls made
//! before it is up wait for that same dial, so a new endpoint gets one
//! connection, not one per caller.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use etcd_lb_registry::schema::Addr;
use futures::future::{BoxFuture, FutureExt, Shared};
use http::uri::{Authority, Scheme};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::ServiceExt;
use tracing::debug;

use crate::balance::BoxError;

/// HTTP/2 keepalive: a PING after this long without frames...
pub(crate) const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// ...that must be answered within this, or the connection is dropped.
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A request that never left this process: the connection was closed
/// before it could be handed to it, so sending it elsewhere is always safe.
#[derive(Debug, thiserror::Error)]
#[error("connection closed before the call was sent: {0}")]
pub struct NotSent(#[source] pub hyper::Error);

/// A request that waited for its endpoint's first connection, which could
/// not be made: never sent.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect: {0}")]
pub struct NotConnected(pub Arc<str>);

/// An endpoint's first connection being dialled, shared by every call
/// that comes before it is up.
type Dial = Shared<BoxFuture<'static, Result<H2, Arc<str>>>>;

/// One endpoint's transport; cheap to clone (every clone shares the one
/// connection).
#[derive(Clone, Debug)]
pub(crate) enum Conn {
    /// tonic's `Channel` (TLS).
    Channel(Channel),
    /// A plaintext endpoint's first connection, still being dialled.
    Dialing(Dial),
    /// hyper's sender on a plaintext HTTP/2 connection the balancer
    /// dialled; its connection task ends when the last clone is dropped.
    H2(H2),
}

/// hyper's HTTP/2 sender and the origin its requests need.
#[derive(Clone, Debug)]
pub(crate) struct H2 {
    send: SendRequest<Body>,
    authority: Authority,
}

impl Conn {
    /// Whether calls on it are bounded by their `grpc-timeout` below the
    /// balancer (a `Channel` enforces it; hyper's sender does not).
    pub(crate) fn enforces_deadline(&self) -> bool {
        matches!(self, Conn::Channel(_))
    }

    /// Sends one request. An error that [`crate::retry::not_sent`]
    /// recognises means it was never sent.
    pub(crate) async fn send(
        self,
        req: http::Request<Body>,
    ) -> Result<http::Response<Body>, BoxError> {
        match self {
            // Boxed: a `Channel`'s future is large, and every call's
            // future (TLS or not) would be as large as it.
            Conn::Channel(channel) => Ok(Box::pin(channel.oneshot(req)).await?),
            Conn::H2(h2) => h2.send(req).await,
            Conn::Dialing(dial) => match dial.await {
                Ok(h2) => h2.send(req).await,
                Err(why) => Err(NotConnected(why).into()),
            },
        }
    }

    /// Whether the server is draining this connection (it sent GOAWAY, or
    /// the connection closed): it takes no new stream, while streams
    /// already open on it may still finish. Not known for a `Channel`
    /// (it reconnects by itself): false. A call that waited for its
    /// endpoint's first dial keeps the `Dialing` handle: once that dial is
    /// done, its connection answers.
    pub(crate) fn draining(&self) -> bool {
        match self {
            Conn::H2(h2) => h2.send.is_closed(),
            Conn::Dialing(dial) => matches!(dial.peek(), Some(Ok(h2)) if h2.send.is_closed()),
            Conn::Channel(_) => false,
        }
    }

    /// Whether a GOAWAY on this connection is invisible here: a `Channel`
    /// (TLS) reconnects by itself, so a probe on it after the server's
    /// GOAWAY goes to a new connection, which a draining server refuses.
    pub(crate) fn hides_goaway(&self) -> bool {
        matches!(self, Conn::Channel(_))
    }

    /// The connection itself, once dialled.
    pub(crate) async fn ready(self) -> Result<Conn, String> {
        match self {
            Conn::Dialing(dial) => dial.await.map(Conn::H2).map_err(|e| e.to_string()),
            conn => Ok(conn),
        }
    }
}

impl H2 {
    /// Dials `addr` in plaintext (TCP without Nagle's delay), with the
    /// HTTP/2 handshake bounded by `timeout` too, and drives the connection
    /// on a task of its own.
    pub(crate) async fn dial(addr: &Addr, timeout: Duration) -> Result<Self, BoxError> {
        let authority: Authority = addr.as_str().parse()?;
        let dial = async {
            let tcp = tokio::net::TcpStream::connect(addr.as_str()).await?;
            tcp.set_nodelay(true)?;
            let (send, conn) = hyper::client::conn::http2::Builder::new(BoxingExecutor)
                .timer(TokioTimer::new())
                .keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .handshake::<_, Body>(TokioIo::new(etcd_lb_registry::coalesce::Coalesce::new(tcp)))
                .await?;
            Ok::<_, BoxError>((send, conn))
        };
        let (send, conn) = tokio::time::timeout(timeout, dial)
            .await
            .map_err(|_| format!("no HTTP/2 connection within {timeout:?}"))??;
        let peer = addr.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(addr = %peer, error = %e, "connection ended");
            }
        });
        Ok(Self { send, authority })
    }

    async fn send(mut self, req: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        // A generated client hands over a path; HTTP/2 wants the origin
        // too (`:scheme`, `:authority`), as tonic's `AddOrigin` adds it.
        // No `user-agent` is added (gRPC makes it optional; a caller can
        // set one as metadata): inserting it grew every request's header
        // map, a reallocation per call.
        let (mut head, body) = req.into_parts();
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        head.uri = http::Uri::from_parts(uri)?;
        match self
            .send
            .try_send_request(http::Request::from_parts(head, body))
            .await
        {
            Ok(resp) => Ok(resp.map(Body::new)),
            Err(e) if e.message().is_some() => Err(NotSent(e.into_error()).into()),
            Err(e) => Err(e.into_error().into()),
        }
    }
}

/// For the health probe, which takes any gRPC transport.
impl tower::Service<http::Request<Body>> for Conn {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // `send` readies a `Channel` itself; hyper's HTTP/2 sender is
        // always ready (a closed connection shows when sending).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(req))
    }
}

/// Spawns hyper's per-request futures boxed. hyper hands its executor one
/// enum for the connection task and for the two small tasks of every
/// request (its body pipe and its response), so each is as large as the
/// connection's whole state; spawned as it is, tokio copies that into the
/// task and again at each stage change, 2,500-3,000 instructions of
/// `memcpy` per call under callgrind. Boxed, the copy happens once.
/// (tonic's `Channel` boxes them too.)
#[derive(Clone, Copy, Debug)]
struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}

/// Makes an endpoint's connections: hyper's own for plaintext, a tonic
/// `Channel` for TLS (and for the lazy first one).
#[derive(Clone, Debug)]
pub(crate) struct Dialer {
    addr: Addr,
    endpoint: Endpoint,
    tls: bool,
    timeout: Duration,
}

impl Dialer {
    /// `endpoint` carries the TLS settings, connect timeout and keepalive
    /// a `Channel` to `addr` uses.
    pub(crate) fn new(addr: &Addr, endpoint: Endpoint, tls: bool, timeout: Duration) -> Self {
        Self {
            addr: addr.clone(),
            endpoint,
            tls,
            timeout,
        }
    }

    /// A connection that calls can be sent on now: for TLS a `Channel`
    /// that connects on its first call; for plaintext a dial started now,
    /// that calls wait for (it must be polled: the balancer's background
    /// connect awaits it, calls or none).
    pub(crate) fn lazy(&self) -> Conn {
        if self.tls {
            return Conn::Channel(self.endpoint.connect_lazy());
        }
        let (addr, timeout) = (self.addr.clone(), self.timeout);
        let dial = async move {
            H2::dial(&addr, timeout)
                .await
                .map_err(|e| Arc::from(format!("connect: {e}")))
        };
        Conn::Dialing(dial.boxed().shared())
    }

    /// Whether a failed [`Dialer::lazy`] connection is worth keeping for
    /// the next try: a `Channel` reconnects by itself, a failed dial stays
    /// failed.
    pub(crate) fn reuses_lazy(&self) -> bool {
        self.tls
    }

    /// A fresh connection, connected now: hyper's for plaintext; for TLS a
    /// lazy `Channel` (the health probe that follows connects it).
    pub(crate) async fn dial(&self) -> Result<Conn, String> {
        self.lazy().ready().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call sent while its endpoint's first connection was still being
    /// dialled holds that `Dialing` handle for its whole life. When the
    /// server later drains the connection (GOAWAY), the handle must say
    /// so: the per-try watch reads it to tell a draining connection from
    /// a silent one. (CI caught the race: the first call of a new
    /// endpoint, abandoned across its server's drain.)
    #[tokio::test]
    async fn a_call_that_waited_for_the_dial_sees_the_servers_goaway() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = Addr::from_socket(listener.local_addr().unwrap());
        let (drain, drained) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            let mut drained = std::pin::pin!(drained);
            let mut streams = Vec::new();
            loop {
                tokio::select! {
                    accepted = conn.accept() => match accepted {
                        Some(Ok(stream)) => streams.push(stream),
                        _ => break,
                    },
                    _ = &mut drained => conn.graceful_shutdown(),
                }
            }
        });
        let dialer = Dialer::new(
            &addr,
            Endpoint::from_shared(addr.uri()).unwrap(),
            false,
            Duration::from_secs(5),
        );
        let conn = dialer.lazy();
        assert!(matches!(conn, Conn::Dialing(_)));
        // A call in flight on it, as the slow call is.
        let call = tokio::spawn(
            conn.clone().send(
                http::Request::post("/greet.Greet/Morning")
                    .body(Body::empty())
                    .unwrap(),
            ),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!conn.draining(), "nothing drains yet");
        drain.send(()).unwrap();
        let started = std::time::Instant::now();
        while !conn.draining() {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the GOAWAY never showed through the dialling handle"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        call.abort();
    }
}

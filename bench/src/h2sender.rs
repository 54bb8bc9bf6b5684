//! Scenario 1's variant (d): Greet over hyper's HTTP/2 `SendRequest` on one
//! connection, without tonic's `Channel` (no buffer task in front of the
//! connection task). Not a client anyone should use: no reconnect, no TLS,
//! no balancing. It is the ceiling a balancer that holds hyper's sender per
//! endpoint could approach, measured beside the `Channel` it would replace
//! (issue 14, point 2).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use etcd_lb_registry::schema::Addr;
use http::uri::{Authority, Scheme};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// A tower service over one HTTP/2 connection's sender.
#[derive(Clone)]
pub struct H2Sender {
    send: SendRequest<tonic::body::Body>,
    authority: Authority,
}

impl H2Sender {
    /// Connects to `addr` (TCP, no Nagle delay) and drives the connection
    /// on a task of its own.
    pub async fn connect(addr: &Addr) -> anyhow::Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr.to_string()).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await?;
        tokio::spawn(conn);
        Ok(Self {
            send,
            authority: addr.to_string().parse()?,
        })
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for H2Sender {
    type Response = http::Response<tonic::body::Body>;
    type Error = hyper::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.send.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<tonic::body::Body>) -> Self::Future {
        // tonic hands over a path; hyper's HTTP/2 client wants the whole URI.
        let mut parts = req.uri().clone().into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(self.authority.clone());
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
        let sent = self.send.send_request(req);
        Box::pin(async move { Ok(sent.await?.map(tonic::body::Body::new)) })
    }
}

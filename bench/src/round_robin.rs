//! Scenario 1's variant (e): plain tonic `Channel`s to three servers, taken
//! in turn, with nothing else: no discovery, weights, retries or health.
//! It is what three connections cost a client that does no balancing work,
//! so (c)/(e) is the balancer's own cost over three servers, where (c)/(a)
//! (DESIGN's measure) also counts spreading the same calls over three
//! connections and three servers on the same cores.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::transport::Channel;
use tower::ServiceExt;

/// Round robin over plain channels.
#[derive(Clone)]
pub struct RoundRobin {
    channels: Arc<[Channel]>,
    next: Arc<AtomicUsize>,
}

impl RoundRobin {
    /// Takes `channels` in turn, one call each.
    pub fn new(channels: Vec<Channel>) -> Self {
        Self {
            channels: channels.into(),
            next: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for RoundRobin {
    type Response = http::Response<tonic::body::Body>;
    type Error = tonic::transport::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each call readies the channel it is given (`oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        Box::pin(self.channels[i].clone().oneshot(req))
    }
}

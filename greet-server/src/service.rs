//! The Greet service itself: the same replies as the original Go server.

use std::time::Duration;

use greet_proto::{Greet, GreetRequest, GreetResponse};
use tonic::{Request, Response, Status};

/// Answers `Good morning, <name>` / `Good night, <name>`, signed with the
/// advertised address so clients can see who answered.
#[derive(Debug, Clone)]
pub struct GreetService {
    from: String,
    latency: Duration,
}

impl GreetService {
    /// `from` is the address clients reach this server at.
    pub fn new(from: impl Into<String>) -> Self {
        Self {
            from: from.into(),
            latency: Duration::ZERO,
        }
    }

    /// Makes every call take at least `latency` (simulated work).
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    async fn work(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

#[tonic::async_trait]
impl Greet for GreetService {
    async fn morning(&self, req: Request<GreetRequest>) -> Result<Response<GreetResponse>, Status> {
        let name = req.into_inner().name;
        tracing::debug!(%name, "morning");
        self.work().await;
        Ok(Response::new(GreetResponse {
            message: format!("Good morning, {name}"),
            from: self.from.clone(),
        }))
    }

    async fn night(&self, req: Request<GreetRequest>) -> Result<Response<GreetResponse>, Status> {
        let name = req.into_inner().name;
        tracing::debug!(%name, "night");
        self.work().await;
        Ok(Response::new(GreetResponse {
            message: format!("Good night, {name}"),
            from: self.from.clone(),
        }))
    }
}

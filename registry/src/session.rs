//! The one etcd session layer: a lazily connected client whose every call
//! is bounded, used by the registrar, the watcher and the controller's
//! election.
//!
//! What it owns, so that no loop writes it again:
//! - connecting lazily, and proving the connection with a real request
//!   ([`EtcdConfig::connect`]: `Client::connect` alone succeeds where
//!   nothing listens);
//! - a time bound on every call ([`Session::call`], [`Session::bounded`]);
//! - dropping the client after etcd refused its auth token (expired, or
//!   issued before etcd restarted: simple tokens live in etcd's memory), so
//!   the next call logs in afresh. etcd-client re-authenticates by itself
//!   only for a refused unary call; a refused stream fails on its first
//!   message.
//!
//! Errors are [`EtcdError`], the one error type for etcd operations; module
//! errors wrap it.

use std::future::Future;
use std::time::Duration;

use etcd_client::Client;
use tokio::time::timeout;

use crate::etcd::{is_auth_token_error, EtcdConfig, EtcdError};

/// The default bound of one call.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection to etcd that dials on first use and again after a failure
/// that calls for it.
pub struct Session {
    etcd: EtcdConfig,
    client: Option<Client>,
    timeout: Duration,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("etcd", &self.etcd)
            .field("connected", &self.client.is_some())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Session {
    /// A session that has not connected yet; calls bounded by
    /// [`REQUEST_TIMEOUT`].
    pub fn new(etcd: EtcdConfig) -> Self {
        Self {
            etcd,
            client: None,
            timeout: REQUEST_TIMEOUT,
        }
    }

    /// The same session with another bound per call (a list of big pages
    /// needs more than a keep-alive).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The bound of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The configuration this session dials with.
    pub fn config(&self) -> &EtcdConfig {
        &self.etcd
    }

    /// The connected client, dialing first when there is none.
    ///
    /// # Errors
    /// etcd unreachable, TLS or auth refused, or no answer in time.
    pub async fn client(&mut self) -> Result<Client, EtcdError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let c = self.etcd.connect().await?;
        self.client = Some(c.clone());
        Ok(c)
    }

    /// Runs one request on the client, bounded by the session's timeout.
    ///
    /// # Errors
    /// Connecting failed, etcd refused, or no answer in time. A refused
    /// auth token also drops the client: the next call connects again.
    pub async fn call<T, F, Fut>(&mut self, request: F) -> Result<T, EtcdError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let client = self.client().await?;
        self.bounded(request(client)).await
    }

    /// Bounds any etcd future (a stream's next message, a ping) like a call.
    ///
    /// # Errors
    /// As [`Session::call`], without the connect.
    pub async fn bounded<T>(
        &mut self,
        fut: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        match timeout(self.timeout, fut).await {
            Err(_) => Err(EtcdError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(self.check(e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Passes an error read from a stream outside [`Session::bounded`]
    /// through the same check (drops the client on a refused token).
    pub fn check(&mut self, e: etcd_client::Error) -> EtcdError {
        if is_auth_token_error(&e) {
            self.client = None;
        }
        EtcdError::Client(e)
    }

    /// Drops the client: the next call dials again (after a silent member,
    /// say, so that a balanced channel may land elsewhere).
    pub fn reset(&mut self) {
        self.client = None;
    }

    /// Whether a client is held now.
    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }
}

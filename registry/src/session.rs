//! The one etcd session layer: a lazily connected client whose every call
//! is bounded, used by the registrar, the watcher and the controller's
//! election.
//!
//! What it owns, so that no loop writes it again:
//! - connecting lazily, and proving the connection with a real request
//!   ([`EtcdConfig::connect`]: `Client::connect` alone succeeds where
//!   nothing listens);
//! - a time bound on every call ([`Session::call`], [`Session::bounded`]);
//! - one member at a time, as etcd's own Go client pins one: the session
//!   starts at a random endpoint (so a fleet spreads over the members) and
//!   moves to the next after a failure that points at the member (it cannot
//!   be reached, does not answer in time, or answers Unavailable, which is
//!   how a member without a leader refuses require-leader calls).
//!   etcd-client's balanced channel would instead spread one caller's calls
//!   and streams over every member, so a member cut off from its peers fails
//!   a share of every sequence of calls and nothing steers away from it;
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
use crate::failpoints;

/// The default bound of one call.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// [`failpoints::ETCD_SLOW_ANSWER`]'s delay when it names none.
const SLOW_ANSWER: Duration = Duration::from_millis(200);

/// A connection to etcd that dials on first use and again after a failure
/// that calls for it.
pub struct Session {
    etcd: EtcdConfig,
    client: Option<Client>,
    timeout: Duration,
    /// Index (modulo the endpoint count) of the member to dial next.
    member: usize,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("etcd", &self.etcd)
            .field("connected", &self.client.is_some())
            .field("member", &self.endpoint())
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Session {
    /// A session that has not connected yet; calls bounded by
    /// [`REQUEST_TIMEOUT`].
    pub fn new(etcd: EtcdConfig) -> Self {
        let member = rand::random_range(0..etcd.endpoints.len().max(1));
        Self {
            etcd,
            client: None,
            timeout: REQUEST_TIMEOUT,
            member,
        }
    }

    /// The endpoint this session uses (or dials next).
    pub fn endpoint(&self) -> Option<&str> {
        let n = self.etcd.endpoints.len();
        (n > 0).then(|| self.etcd.endpoints[self.member % n].as_str())
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
        let mut one = self.etcd.clone();
        if let Some(ep) = self.endpoint() {
            one.endpoints = vec![ep.to_owned()];
        }
        match one.connect().await {
            Ok(c) => {
                self.client = Some(c.clone());
                Ok(c)
            }
            Err(e) => {
                self.next_member();
                Err(e)
            }
        }
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
        // In-code fault (c): the answer is held before it is used.
        let slow = failpoints::fire_delay(failpoints::ETCD_SLOW_ANSWER, SLOW_ANSWER);
        let fut = async move {
            let answer = fut.await;
            if let Some(delay) = slow {
                tokio::time::sleep(delay).await;
            }
            answer
        };
        match timeout(self.timeout, fut).await {
            Err(_) => {
                // A member that does not answer in time: try the next.
                self.reset();
                Err(EtcdError::Timeout(self.timeout))
            }
            Ok(Err(e)) => Err(self.check(e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    /// Passes an error read from a stream outside [`Session::bounded`]
    /// through the same check: a refused token drops the client (the next
    /// call logs in again); Unavailable (no leader, shutting down) moves to
    /// the next member.
    pub fn check(&mut self, e: etcd_client::Error) -> EtcdError {
        if is_member_trouble(&e) {
            self.reset();
        } else if is_auth_token_error(&e) {
            self.client = None;
        }
        EtcdError::Client(e)
    }

    /// Drops the client and moves to the next member: the next call dials
    /// it (after a silent member, say, or a watch etcd cancelled for want of
    /// a leader).
    pub fn reset(&mut self) {
        self.client = None;
        self.next_member();
    }

    fn next_member(&mut self) {
        self.member = self.member.wrapping_add(1);
    }

    /// Whether a client is held now.
    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }
}

/// Whether an error says the member itself cannot serve now (etcd answers
/// Unavailable for "no leader" to require-leader calls, and while stopping).
fn is_member_trouble(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_moves_to_the_next_member_and_wraps() {
        let mut s = Session::new(EtcdConfig::plain(["a:1", "b:2", "c:3"]));
        let first = s.endpoint().map(str::to_owned);
        let mut seen = vec![first.clone()];
        for _ in 0..3 {
            s.reset();
            seen.push(s.endpoint().map(str::to_owned));
        }
        assert_eq!(seen[3], first, "three resets come back round");
        seen.truncate(3);
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 3, "every member in turn: {seen:?}");
    }

    #[test]
    fn unavailable_moves_on_and_a_refused_token_logs_in_again() {
        let mut s = Session::new(EtcdConfig::plain(["a:1", "b:2"]));
        let before = s.endpoint().map(str::to_owned);
        let _ = s.check(etcd_client::Error::GRpcStatus(tonic::Status::unavailable(
            "etcdserver: no leader",
        )));
        assert_ne!(s.endpoint().map(str::to_owned), before);
        let now = s.endpoint().map(str::to_owned);
        let _ = s.check(etcd_client::Error::GRpcStatus(
            tonic::Status::unauthenticated("etcdserver: invalid auth token"),
        ));
        assert_eq!(
            s.endpoint().map(str::to_owned),
            now,
            "same member, new login"
        );
    }
}

//! The one lease keeper: grants a lease and keeps it alive in a task of its
//! own, for the registrar and the controller's election.
//!
//! Why a task of its own: keep-alives must not wait for whatever the owner
//! is doing. A registrar stuck in a slow claim, or an election blocked in
//! `campaign`, would otherwise let its lease expire while it waits.
//!
//! The rules (etcd's, and what they mean for the owner):
//! - a ping every TTL/3 on the keep-alive stream, reading every answer;
//! - an answer with TTL 0, or "lease not found", means etcd forgot the
//!   lease: [`LeaseState::Lost`], for good;
//! - the lease is known alive until the *send* time of the last answered
//!   ping plus two thirds of the TTL ([`LeaseState::Valid`]). When that
//!   passes without a newer answer the state turns [`LeaseState::Unsure`]
//!   and the keeper dials the next member, while a third of the TTL is left
//!   to save the lease. A later
//!   answer with TTL > 0 makes it valid again.
//!
//! Dropping the keeper stops the pings; the lease then expires with its TTL
//! unless the owner revokes it.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::backoff::Backoff;
use crate::etcd::{EtcdConfig, EtcdError};
use crate::failpoints;
use crate::session::Session;

/// What the keeper knows about its lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseState {
    /// Answered pings prove the lease alive until then.
    Valid {
        /// Send time of the last answered ping plus two thirds of the TTL.
        until: Instant,
    },
    /// No answered ping for two thirds of the TTL: the lease may be gone.
    /// The keeper is dialing again.
    Unsure,
    /// etcd forgot the lease (TTL 0 or not found). Final.
    Lost,
}

impl LeaseState {
    /// Whether the lease is proven alive at `now`.
    pub fn is_valid(&self, now: Instant) -> bool {
        matches!(self, Self::Valid { until } if now < *until)
    }
}

/// Whether etcd says a lease is not found, on keep-alive or on a write with
/// the lease (not only as a TTL-0 answer).
pub fn is_lease_not_found(e: &EtcdError) -> bool {
    match e {
        EtcdError::Client(etcd_client::Error::LeaseKeepAliveError(msg)) => {
            msg.contains("not found")
        }
        EtcdError::Client(etcd_client::Error::GRpcStatus(status)) => {
            status.code() == tonic::Code::NotFound || status.message().contains("lease not found")
        }
        _ => false,
    }
}

/// A lease kept alive in the background.
#[derive(Debug)]
pub struct LeaseKeeper {
    id: i64,
    ttl: Duration,
    state: watch::Receiver<LeaseState>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl LeaseKeeper {
    /// Grants a lease of `ttl` (whole seconds, at least etcd's 2 s) through
    /// `session`, then keeps it alive on a connection of its own.
    ///
    /// # Errors
    /// The grant failed or was not answered in time.
    pub async fn grant(session: &mut Session, ttl: Duration) -> Result<Self, EtcdError> {
        let secs = ttl.as_secs().max(2) as i64;
        let sent = Instant::now();
        let granted = session
            .call(|mut c| async move { c.lease_grant(secs, None).await })
            .await?;
        let ttl = Duration::from_secs(granted.ttl().max(1) as u64);
        debug!(lease = granted.id(), ?ttl, "lease granted");
        Ok(Self::keep(
            session.config().clone(),
            session.timeout(),
            granted.id(),
            ttl,
            sent,
        ))
    }

    /// Keeps an existing lease alive, known alive as of `proven_at` (its
    /// grant, or the send time of its last answered ping).
    pub fn keep(
        etcd: EtcdConfig,
        request_timeout: Duration,
        id: i64,
        ttl: Duration,
        proven_at: Instant,
    ) -> Self {
        let validity = ttl * 2 / 3;
        let (tx, state) = watch::channel(LeaseState::Valid {
            until: proven_at + validity,
        });
        let cancel = CancellationToken::new();
        let span = tracing::info_span!("lease", lease = %format_args!("{id:x}"));
        let session = Session::new(etcd).with_timeout(request_timeout);
        let task = tokio::spawn(run(session, id, ttl, tx, cancel.clone()).instrument(span));
        Self {
            id,
            ttl,
            state,
            cancel,
            task: Some(task),
        }
    }

    /// The lease id.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The TTL etcd granted.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Watches the lease's state.
    pub fn state(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// The state now.
    pub fn current(&self) -> LeaseState {
        *self.state.borrow()
    }

    /// Stops the pings and waits (briefly) for the task to end. The lease
    /// expires with its TTL unless revoked.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        let Some(mut task) = self.task.take() else {
            return;
        };
        if tokio::time::timeout(Duration::from_secs(1), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Why one connected stretch of pinging ended.
enum Ended {
    Cancelled,
    Lost,
    /// Two thirds of the TTL without an answer.
    Silent,
}

async fn run(
    mut session: Session,
    id: i64,
    ttl: Duration,
    tx: watch::Sender<LeaseState>,
    cancel: CancellationToken,
) {
    let period = (ttl / 3).max(Duration::from_millis(200));
    let mut backoff = Backoff::new(Duration::from_millis(100), period);
    loop {
        let ended = tokio::select! {
            () = cancel.cancelled() => return,
            () = until_invalid(&tx) => {
                // No answer for two thirds of the TTL: a third is left to
                // save the lease, perhaps through another member.
                mark_unsure(&tx, id);
                session.reset();
                continue;
            }
            r = connected(&mut session, id, ttl, period, &tx, &mut backoff) => r,
        };
        let delay = match ended {
            Ok(Ended::Cancelled) => return,
            Ok(Ended::Lost) => {
                info!(lease = id, "etcd no longer knows the lease");
                tx.send_replace(LeaseState::Lost);
                return;
            }
            Err(e) if is_lease_not_found(&e) => {
                info!(lease = id, error = %e, "etcd no longer knows the lease");
                tx.send_replace(LeaseState::Lost);
                return;
            }
            Ok(Ended::Silent) => {
                // The member may be cut off: dial the next one at once.
                mark_unsure(&tx, id);
                session.reset();
                Duration::ZERO
            }
            Err(e) => {
                // (The session already moved on from a member that timed
                // out or answered Unavailable.)
                debug!(lease = id, error = %e, "keep-alive failed; retrying");
                backoff.next_delay()
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Resolves when the lease's validity has passed without a newer answer
/// (never while not valid). Follows the state: each answered ping moves the
/// deadline, so on a healthy etcd this never resolves. (Armed once, it
/// fired two thirds of the TTL after every grant: issue 33.)
async fn until_invalid(tx: &watch::Sender<LeaseState>) {
    let mut rx = tx.subscribe();
    loop {
        let state = *rx.borrow_and_update();
        let changed = match state {
            LeaseState::Valid { until } => tokio::select! {
                () = tokio::time::sleep_until(until) => return,
                r = rx.changed() => r,
            },
            _ => rx.changed().await,
        };
        if changed.is_err() {
            // The sender is borrowed for as long as this runs; cannot happen.
            std::future::pending::<()>().await;
        }
    }
}

fn mark_unsure(tx: &watch::Sender<LeaseState>, id: i64) {
    tx.send_if_modified(|s| {
        if matches!(s, LeaseState::Valid { .. }) {
            warn!(
                lease = id,
                "keep-alives unanswered for two thirds of the TTL; dialing again"
            );
            *s = LeaseState::Unsure;
            true
        } else {
            false
        }
    });
}

/// One keep-alive stream: pings every `period`, answers update the state.
async fn connected(
    session: &mut Session,
    id: i64,
    ttl: Duration,
    period: Duration,
    tx: &watch::Sender<LeaseState>,
    backoff: &mut Backoff,
) -> Result<Ended, EtcdError> {
    let validity = ttl * 2 / 3;
    let (mut keeper, mut stream) = session
        .call(|mut c| async move { c.lease_keep_alive(id).await })
        .await?;
    // Send times of the pings not answered yet, oldest first: etcd answers
    // in order.
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // The oldest unanswered ping bounds how long we wait for silence.
        let silent_at = sent.front().map(|t| *t + validity);
        tokio::select! {
            _ = ticker.tick() => {
                sent.push_back(Instant::now());
                session.bounded(keeper.keep_alive()).await?;
            }
            msg = stream.message() => {
                let resp = match msg {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err(EtcdError::StreamEnded("keep-alive")),
                    Err(e) => return Err(session.check(e)),
                };
                // In-code fault (b): the answer never arrived (its ping
                // stays unanswered; the next answer is taken for it).
                if failpoints::fire(failpoints::KEEPALIVE_ANSWER_LOST).is_some() {
                    continue;
                }
                let at = sent.pop_front().unwrap_or_else(Instant::now);
                if resp.ttl() <= 0 {
                    return Ok(Ended::Lost);
                }
                backoff.reset();
                let until = at + validity;
                tx.send_if_modified(|s| {
                    let newer = !matches!(s, LeaseState::Valid { until: u } if *u >= until);
                    if newer {
                        *s = LeaseState::Valid { until };
                    }
                    newer
                });
            }
            () = async {
                match silent_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            } => return Ok(Ended::Silent),
        }
        if tx.is_closed() {
            return Ok(Ended::Cancelled);
        }
    }
}

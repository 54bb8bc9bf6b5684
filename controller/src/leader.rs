//! Leader election over etcd: several replicas, one deleter.
//!
//! Uses etcd's election API (`campaign` blocks until this replica owns the
//! election's oldest key; `leader` says who does; `resign` hands over) on a
//! client of its own, without a request timeout that would cut the
//! blocking campaign. The election key lives on a lease kept alive by the
//! registry's lease keeper ([`registry::lease`]: a ping every TTL/3 on a
//! connection of its own, TTL 0 = lost, validity from the send time of
//! answered pings).
//!
//! Safety, in two layers:
//! - [`Leadership::valid_until`] is the send time of the last answered ping
//!   plus two thirds of the TTL: when etcd stops answering, the reconciler
//!   stops deleting well before the lease can have expired and another
//!   replica can have won;
//! - every deletion is a transaction that also compares the leader key's
//!   create revision ([`crate::reconcile::delete_if_unchanged`]), so a
//!   deposed leader's late write fails in etcd itself.
//!
//! When the leader dies its lease expires and the next campaigner wins
//! within one TTL. On shutdown the leader resigns, so the next one takes
//! over at once.

use std::pin::pin;
use std::time::Duration;

use etcd_client::{ElectionClient, LeaderKey, ResignOptions};
use registry::backoff::Backoff;
use registry::etcd::{EtcdConfig, EtcdError};
use registry::lease::{LeaseKeeper, LeaseState};
use registry::session::Session;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

/// Bound of each request other than the campaign.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

/// Proof of leadership, attached to every deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The election key this replica owns (`<name>/<lease hex>`).
    pub key: Vec<u8>,
    /// Its create revision: the deletion transaction compares it.
    pub create_revision: i64,
    /// The election lease.
    pub lease: i64,
    /// Delete nothing at or after this instant: the lease may be gone.
    pub valid_until: Instant,
}

impl Leadership {
    /// Whether deleting is still safe at `now`.
    pub fn is_valid(&self, now: Instant) -> bool {
        now < self.valid_until
    }
}

/// What the elector publishes: this replica's leadership, if any, and the
/// current leader's id as etcd last said (for the view).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaderState {
    /// Set while this replica leads.
    pub me: Option<Leadership>,
    /// The leader's id (its campaign value), if known.
    pub leader_id: Option<String>,
}

impl LeaderState {
    /// This replica's leadership when it is still valid at `now`.
    pub fn valid(&self, now: Instant) -> Option<&Leadership> {
        self.me.as_ref().filter(|l| l.is_valid(now))
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("election lease {0:x} lost")]
    LeaseLost(i64),
    #[error("leadership not renewed in time")]
    Expired,
    #[error("another replica holds the election key now")]
    Deposed,
    #[error("campaign answered without a leader key")]
    NoLeaderKey,
}

/// Runs the election until `cancel`; publishes [`LeaderState`].
///
/// `id` is this replica's campaign value (shown as the leader's id).
pub fn spawn(
    etcd: EtcdConfig,
    name: String,
    ttl: Duration,
    id: String,
    cancel: CancellationToken,
) -> (watch::Receiver<LeaderState>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(LeaderState::default());
    let span = info_span!("election", name = %name, id = %id);
    let task = tokio::spawn(
        async move {
            let mut backoff = Backoff::new(Duration::from_millis(200), ttl / 2);
            // No request timeout on this client: it would cut the blocking
            // campaign. (A refused auth token drops the session's client.)
            let mut sess = Session::new(etcd).with_timeout(REQUEST_TIMEOUT);
            loop {
                let res = session(&mut sess, &name, ttl, &id, &tx, &cancel).await;
                tx.send_modify(|s| s.me = None);
                match res {
                    Ok(()) => break,
                    Err(e) => debug!(error = %e, "election session ended; retrying"),
                }
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(backoff.next_delay()) => {}
                }
                if backoff.attempts() > 8 {
                    backoff.reset();
                }
            }
            tx.send_modify(|s| s.me = None);
        }
        .instrument(span),
    );
    (rx, task)
}

/// Who leads now (the campaign value), or `None` when nobody does.
async fn current_leader(election: &mut ElectionClient, name: &str) -> Option<String> {
    let resp = timeout(REQUEST_TIMEOUT, election.leader(name))
        .await
        .ok()?
        .ok()?;
    resp.kv()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

/// One lease, one campaign; returns Ok only when cancelled.
async fn session(
    sess: &mut Session,
    name: &str,
    ttl: Duration,
    id: &str,
    tx: &watch::Sender<LeaderState>,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let client = sess.client().await?;
    let keeper = LeaseKeeper::grant(sess, ttl).await?;
    let lease = keeper.id();
    let mut lease_state = keeper.state();
    let mut election = client.election_client();
    let mut lookup = client.election_client();
    let mut campaign = pin!(election.campaign(name, id, lease));
    let mut leader_key: Option<LeaderKey> = None;
    let mut valid_until = match keeper.current() {
        LeaseState::Valid { until } => until,
        _ => Instant::now(),
    };
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    debug!(lease = format!("{lease:x}"), "campaigning");

    let result = loop {
        tokio::select! {
            () = cancel.cancelled() => break Ok(()),
            won = &mut campaign, if leader_key.is_none() => {
                let key = match won {
                    Ok(mut resp) => match resp.take_leader() {
                        Some(k) => k,
                        None => break Err(SessionError::NoLeaderKey),
                    },
                    Err(e) => break Err(sess.check(e).into()),
                };
                info!(lease = format!("{lease:x}"), key = %String::from_utf8_lossy(key.key()),
                      revision = key.rev(), "elected leader");
                let me = Leadership {
                    key: key.key().to_vec(),
                    create_revision: key.rev(),
                    lease,
                    valid_until,
                };
                tx.send_modify(|s| {
                    s.me = Some(me);
                    s.leader_id = Some(id.to_owned());
                });
                leader_key = Some(key);
            }
            _ = tick.tick() => {
                let current = current_leader(&mut lookup, name).await;
                if leader_key.is_some() && current.as_deref().is_some_and(|c| c != id) {
                    // Someone deleted our key and another replica won.
                    break Err(SessionError::Deposed);
                }
                if current.is_some() {
                    tx.send_modify(|s| s.leader_id = current);
                }
            }
            changed = lease_state.changed() => {
                if changed.is_err() {
                    break Err(SessionError::LeaseLost(lease));
                }
                match *lease_state.borrow_and_update() {
                    LeaseState::Lost => break Err(SessionError::LeaseLost(lease)),
                    // Unanswered: valid_until passes by itself below.
                    LeaseState::Unsure => {}
                    LeaseState::Valid { until } => {
                        valid_until = until;
                        if leader_key.is_some() {
                            tx.send_modify(|s| {
                                if let Some(me) = s.me.as_mut() {
                                    me.valid_until = valid_until;
                                }
                            });
                        }
                    }
                }
            }
            () = tokio::time::sleep_until(valid_until), if leader_key.is_some() => {
                break Err(SessionError::Expired);
            }
        }
    };

    // Leaving: stop claiming first, then hand over (bounded).
    tx.send_modify(|s| s.me = None);
    if let (Some(_), Err(e)) = (&leader_key, &result) {
        warn!(error = %e, "leadership lost; deleting nothing until elected again");
    }
    if let Some(key) = leader_key {
        match timeout(
            REQUEST_TIMEOUT,
            lookup.resign(Some(ResignOptions::new().with_leader(key))),
        )
        .await
        {
            Ok(Ok(_)) => info!("resigned leadership"),
            Ok(Err(e)) => debug!(error = %e, "resign failed; the lease expiry hands over"),
            Err(_) => debug!("resign timed out; the lease expiry hands over"),
        }
    }
    keeper.stop().await;
    let _ = sess
        .call(|mut c| async move { c.lease_revoke(lease).await })
        .await;
    result
}

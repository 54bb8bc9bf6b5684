//! Leader election over etcd: several replicas, one deleter.
//!
//! Uses etcd's election API (`campaign` blocks until this replica owns the
//! election's oldest key; `leader` says who does; `resign` hands over) over
//! the registry's one etcd session layer: every call but the blocking
//! campaign goes through a [`Session`] (bounded, one member at a time, a
//! refused token logs in again), and the election key lives on a lease kept
//! by the registry's [`LeaseKeeper`], the same one the registrar uses.
//!
//! Safety, in two layers:
//! - [`Leadership::valid_until`] is the lease keeper's proof: the send time
//!   of the last answered ping plus two thirds of the TTL (see
//!   [`LeaseState::Valid`]): when etcd stops answering, the reconciler
//!   stops deleting well before the lease can have expired and another
//!   replica can have won;
//! - every deletion is a transaction that also compares the leader key's
//!   create revision ([`crate::reconcile::delete_if_unchanged`]), so a
//!   deposed leader's late write fails in etcd itself.
//!
//! "Am I still the leader" is decided by the election key this replica
//! won and its create revision, never by the campaign value: two replicas
//! may campaign with the same value, and a key deleted from outside (an
//! operator, a wiped prefix) must end the term even when nobody else holds
//! the election. The term ends, and the replica campaigns again, when
//! - its key is gone or was re-created (checked on winning and on every
//!   ping),
//! - or a guarded write came back "not leader" ([`StepDown`]).
//!
//! When the leader dies its lease expires and the next campaigner wins
//! within one TTL. On shutdown the leader resigns, so the next one takes
//! over at once.
//!
//! Every replica has a unique, readable [`identity`]: the pod name or the
//! hostname plus a random part. It is the campaign value, so `/readyz`
//! and the logs say which replica leads.

use std::pin::pin;
use std::time::Duration;

use etcd_client::{LeaderKey, ResignOptions};
use etcd_lb_registry::backoff::Backoff;
use etcd_lb_registry::etcd::{EtcdConfig, EtcdError};
use etcd_lb_registry::lease::{LeaseKeeper, LeaseState};
use etcd_lb_registry::session::Session;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

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

/// This replica's identity: `name` (the pod name in Kubernetes), else the
/// hostname, plus a random suffix, so that two replicas started alike (the
/// same pod template, PID 1, the same `--listen`) never share one.
pub fn identity(name: Option<&str>) -> String {
    let base = name
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
        .or_else(hostname)
        .unwrap_or_else(|| "controller".to_owned());
    format!("{base}-{:08x}", rand::random::<u32>())
}

/// The host's name, from `HOSTNAME` or the kernel (a `FROM scratch` image
/// has no `hostname` binary and often no `HOSTNAME` variable).
fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

/// Ends the current term from outside the elector: the reconciler calls
/// [`StepDown::not_leader`] when etcd refused a deletion because the
/// election key is no longer this replica's. Cheap to clone.
#[derive(Debug, Clone)]
pub struct StepDown(mpsc::Sender<i64>);

impl StepDown {
    /// Etcd said `leadership` no longer holds: end that term (a later term,
    /// with another create revision, is not affected) and campaign again.
    pub fn not_leader(&self, leadership: &Leadership) {
        // Full means a step-down is already queued: nothing to add.
        let _ = self.0.try_send(leadership.create_revision);
    }
}

/// Why one term (one lease, one campaign) ended.
#[derive(Debug, thiserror::Error)]
enum TermError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("election lease {0:x} lost")]
    LeaseLost(i64),
    #[error("leadership not renewed in time")]
    Expired,
    #[error("the election key is gone or no longer ours")]
    Deposed,
    #[error("a guarded write found the election key changed")]
    Refused,
    #[error("campaign answered without a leader key")]
    NoLeaderKey,
}

/// Runs the election until `cancel`; publishes [`LeaderState`].
///
/// `id` is this replica's campaign value (shown as the leader's id); see
/// [`identity`]. The [`StepDown`] handle ends a term etcd refused.
pub fn spawn(
    etcd: EtcdConfig,
    name: String,
    ttl: Duration,
    id: String,
    cancel: CancellationToken,
) -> (
    watch::Receiver<LeaderState>,
    StepDown,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = watch::channel(LeaderState::default());
    let (step_tx, mut refused) = mpsc::channel(1);
    let step_down = StepDown(step_tx);
    // Held by the task, so `refused` never reports "closed".
    let keep_open = step_down.clone();
    let span = info_span!("election", name = %name, id = %id);
    let task = tokio::spawn(
        async move {
            let _keep_open = keep_open;
            let mut backoff = Backoff::new(Duration::from_millis(200), ttl / 2);
            let mut session = Session::new(etcd);
            let election = Election {
                name: &name,
                id: &id,
                ttl,
                tx: &tx,
            };
            loop {
                let res = election.term(&mut session, &mut refused, &cancel).await;
                tx.send_modify(|s| s.me = None);
                match res {
                    Ok(()) => break,
                    // (The session already dropped a refused token or moved
                    // on from a member that failed.)
                    Err(e) => debug!(error = %e, "election term ended; campaigning again"),
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
    (rx, step_down, task)
}

/// What every term of one replica's election shares.
struct Election<'a> {
    name: &'a str,
    id: &'a str,
    ttl: Duration,
    tx: &'a watch::Sender<LeaderState>,
}

/// Whether `key` still exists with `create_revision`: the election's own
/// answer to "is this term still mine" (the oldest key under the name
/// leads, and no key created later can be older). Errors are not answers:
/// an unreachable etcd ends the term through `valid_until` instead.
async fn still_held(session: &mut Session, key: &LeaderKey) -> Result<bool, EtcdError> {
    let k = key.key().to_vec();
    let resp = session
        .call(|mut c| async move { c.get(k, None).await })
        .await?;
    Ok(resp
        .kvs()
        .first()
        .is_some_and(|kv| kv.create_revision() == key.rev()))
}

/// Who leads now (the campaign value), or `None` when nobody does or etcd
/// did not say.
async fn current_leader(session: &mut Session, name: &str) -> Option<String> {
    let name = name.to_owned();
    let resp = session
        .call(|mut c| async move { c.leader(name).await })
        .await
        .ok()?;
    resp.kv()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
}

impl Election<'_> {
    /// One term: a lease kept by [`LeaseKeeper`], one campaign, and the
    /// leadership it wins; returns Ok only when cancelled.
    async fn term(
        &self,
        session: &mut Session,
        refused: &mut mpsc::Receiver<i64>,
        cancel: &CancellationToken,
    ) -> Result<(), TermError> {
        let keeper = LeaseKeeper::grant(session, self.ttl).await?;
        let lease = keeper.id();
        let result = self
            .campaign_and_lead(session, &keeper, refused, cancel)
            .await;
        // Leaving: stop claiming first, then hand over (bounded).
        self.tx.send_modify(|s| s.me = None);
        let (result, leader_key) = result;
        if let (Some(_), Err(e)) = (&leader_key, &result) {
            warn!(error = %e, "leadership lost; deleting nothing until elected again, campaigning");
        }
        if let Some(key) = leader_key {
            let resign = ResignOptions::new().with_leader(key);
            match session
                .call(|mut c| async move { c.resign(Some(resign)).await })
                .await
            {
                Ok(_) => info!("resigned leadership"),
                Err(e) => debug!(error = %e, "resign failed; the lease expiry hands over"),
            }
        }
        keeper.stop().await;
        let _ = session
            .call(|mut c| async move { c.lease_revoke(lease).await })
            .await;
        result
    }

    /// Campaigns on `keeper`'s lease and leads until the term ends; returns
    /// why, with the leader key won (if any) for the resignation.
    async fn campaign_and_lead(
        &self,
        session: &mut Session,
        keeper: &LeaseKeeper,
        refused: &mut mpsc::Receiver<i64>,
        cancel: &CancellationToken,
    ) -> (Result<(), TermError>, Option<LeaderKey>) {
        let lease = keeper.id();
        let mut lease_state = keeper.state();
        // The campaign blocks until this replica leads: it runs on a clone
        // of the session's client, unbounded (a bound would cut it).
        let mut election = match session.client().await {
            Ok(c) => c.election_client(),
            Err(e) => return (Err(e.into()), None),
        };
        // A refusal queued in an earlier term says nothing about this one.
        while refused.try_recv().is_ok() {}
        let mut campaign = pin!(election.campaign(self.name, self.id, lease));
        let mut leader_key: Option<LeaderKey> = None;
        let mut valid_until = match keeper.current() {
            LeaseState::Valid { until } => until,
            _ => Instant::now(),
        };
        let mut tick = tokio::time::interval(self.ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        debug!(lease = format!("{lease:x}"), "campaigning");

        let result = loop {
            tokio::select! {
                () = cancel.cancelled() => break Ok(()),
                won = &mut campaign, if leader_key.is_none() => {
                    let key = match won {
                        Ok(mut resp) => match resp.take_leader() {
                            Some(k) => k,
                            None => break Err(TermError::NoLeaderKey),
                        },
                        Err(e) => break Err(TermError::Etcd(session.check(e))),
                    };
                    // The campaign also returns when this replica's own key
                    // was deleted while it waited: that is no term at all.
                    match still_held(session, &key).await {
                        Ok(true) => {}
                        Ok(false) => break Err(TermError::Deposed),
                        Err(e) => break Err(e.into()),
                    }
                    info!(lease = format!("{lease:x}"), key = %String::from_utf8_lossy(key.key()),
                          revision = key.rev(), "elected leader");
                    let me = Leadership {
                        key: key.key().to_vec(),
                        create_revision: key.rev(),
                        lease,
                        valid_until,
                    };
                    self.tx.send_modify(|s| {
                        s.me = Some(me);
                        s.leader_id = Some(self.id.to_owned());
                    });
                    leader_key = Some(key);
                }
                _ = tick.tick() => {
                    if let Some(key) = &leader_key {
                        // Only a definite "gone" ends the term here; etcd not
                        // answering ends it through `valid_until`.
                        if let Ok(false) = still_held(session, key).await {
                            break Err(TermError::Deposed);
                        }
                    }
                    let current = current_leader(session, self.name).await;
                    if current.is_some() {
                        self.tx.send_modify(|s| s.leader_id = current);
                    }
                }
                Some(revision) = refused.recv(), if leader_key.is_some() => {
                    if leader_key.as_ref().is_some_and(|k| k.rev() == revision) {
                        break Err(TermError::Refused);
                    }
                }
                changed = lease_state.changed() => {
                    if changed.is_err() {
                        break Err(TermError::LeaseLost(lease));
                    }
                    let state = *lease_state.borrow_and_update();
                    match state {
                        LeaseState::Lost => break Err(TermError::LeaseLost(lease)),
                        // Unsure: the last proof stands until it runs out.
                        LeaseState::Unsure => {}
                        LeaseState::Valid { until } => {
                            valid_until = until;
                            if leader_key.is_some() {
                                self.tx.send_modify(|s| {
                                    if let Some(me) = s.me.as_mut() {
                                        me.valid_until = valid_until;
                                    }
                                });
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(valid_until), if leader_key.is_some() => {
                    break Err(TermError::Expired);
                }
            }
        };
        (result, leader_key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_from_one_source_differ_and_read_well() {
        let a = identity(Some("controller-7d9f8-x2v4q"));
        let b = identity(Some("controller-7d9f8-x2v4q"));
        assert_ne!(a, b, "the random part tells replicas apart");
        assert!(a.starts_with("controller-7d9f8-x2v4q-"), "{a}");
        let blank = identity(Some("  "));
        let host = identity(None);
        assert!(
            !blank.starts_with('-') && !host.starts_with('-'),
            "{blank} {host}"
        );
        assert_eq!(
            blank.rsplit_once('-').map(|(h, _)| h),
            host.rsplit_once('-').map(|(h, _)| h),
            "a blank name falls back to the hostname"
        );
    }
}

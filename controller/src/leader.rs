//! Leader election over etcd: several replicas, one deleter.
//!
//! Uses etcd's election API (`campaign` blocks until this replica owns the
//! election's oldest key; `leader` says who does; `resign` hands over) on a
//! client of its own, without a request timeout that would cut the
//! blocking campaign. The election key lives on a lease this module keeps
//! alive itself (a ping every TTL/3, reading every answer: TTL 0 means etcd
//! forgot the lease).
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

use std::collections::VecDeque;
use std::pin::pin;
use std::time::Duration;

use etcd_client::{Client, ElectionClient, KvClient, LeaderKey, ResignOptions};
use registry::backoff::Backoff;
use registry::etcd::{is_auth_token_error, EtcdConfig, EtcdError};
use tokio::sync::{mpsc, watch};
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

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error(transparent)]
    Connect(#[from] EtcdError),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("election lease {0:x} lost")]
    LeaseLost(i64),
    #[error("keep-alive stream ended")]
    Ended,
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
            let mut client: Option<Client> = None;
            loop {
                let res = session(
                    &etcd,
                    &mut client,
                    &name,
                    ttl,
                    &id,
                    &tx,
                    &mut refused,
                    &cancel,
                )
                .await;
                tx.send_modify(|s| s.me = None);
                match res {
                    Ok(()) => break,
                    Err(e) => {
                        debug!(error = %e, "election session ended; retrying");
                        // A refused auth token (etcd restarted and forgot
                        // it) is not cured on the same client: log in again.
                        if matches!(&e, SessionError::Connect(_))
                            || matches!(&e, SessionError::Etcd(e) if is_auth_token_error(e))
                        {
                            client = None;
                        }
                    }
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

async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, SessionError> {
    timeout(REQUEST_TIMEOUT, fut)
        .await
        .map_err(|_| SessionError::Timeout(REQUEST_TIMEOUT))?
        .map_err(SessionError::from)
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

/// Whether `key` still exists with `create_revision`: the election's own
/// answer to "is this term still mine" (the oldest key under the name
/// leads, and no key created later can be older). Errors are not answers:
/// an unreachable etcd ends the term through `valid_until` instead.
async fn still_held(kv: &mut KvClient, key: &LeaderKey) -> Result<bool, SessionError> {
    let resp = bounded(kv.get(key.key(), None)).await?;
    Ok(resp
        .kvs()
        .first()
        .is_some_and(|kv| kv.create_revision() == key.rev()))
}

/// One lease, one campaign; returns Ok only when cancelled.
#[allow(clippy::too_many_arguments)]
async fn session(
    etcd: &EtcdConfig,
    client: &mut Option<Client>,
    name: &str,
    ttl: Duration,
    id: &str,
    tx: &watch::Sender<LeaderState>,
    refused: &mut mpsc::Receiver<i64>,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    if client.is_none() {
        *client = Some(etcd.connect().await?);
    }
    let client = client.as_mut().expect("set above");
    let ttl_secs = ttl.as_secs().max(2) as i64;
    let lease = bounded(client.lease_grant(ttl_secs, None)).await?.id();
    let (mut keeper, mut answers) = bounded(client.lease_keep_alive(lease)).await?;
    let mut election = client.election_client();
    let mut lookup = client.election_client();
    let mut kv = client.kv_client();
    // A refusal queued in an earlier term says nothing about this one.
    while refused.try_recv().is_ok() {}
    let mut campaign = pin!(election.campaign(name, id, lease));
    let mut leader_key: Option<LeaderKey> = None;
    // Send times of pings not answered yet, oldest first.
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut valid_until = Instant::now() + ttl * 2 / 3;
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
                    Err(e) => break Err(e.into()),
                };
                // The campaign also returns when this replica's own key
                // was deleted while it waited: that is no term at all.
                match still_held(&mut kv, &key).await {
                    Ok(true) => {}
                    Ok(false) => break Err(SessionError::Deposed),
                    Err(e) => break Err(e),
                }
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
                sent.push_back(Instant::now());
                if let Err(e) = bounded(keeper.keep_alive()).await {
                    break Err(e);
                }
                if let Some(key) = &leader_key {
                    // Only a definite "gone" ends the term here; etcd not
                    // answering ends it through `valid_until`.
                    if let Ok(false) = still_held(&mut kv, key).await {
                        break Err(SessionError::Deposed);
                    }
                }
                let current = current_leader(&mut lookup, name).await;
                if current.is_some() {
                    tx.send_modify(|s| s.leader_id = current);
                }
            }
            Some(revision) = refused.recv(), if leader_key.is_some() => {
                if leader_key.as_ref().is_some_and(|k| k.rev() == revision) {
                    break Err(SessionError::Refused);
                }
            }
            answer = answers.message() => {
                match answer {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        let at = sent.pop_front().unwrap_or_else(Instant::now);
                        let granted = Duration::from_secs(r.ttl() as u64).min(ttl);
                        valid_until = at + granted * 2 / 3;
                        if leader_key.is_some() {
                            tx.send_modify(|s| {
                                if let Some(me) = s.me.as_mut() {
                                    me.valid_until = valid_until;
                                }
                            });
                        }
                    }
                    Ok(Some(_)) => break Err(SessionError::LeaseLost(lease)),
                    Ok(None) => break Err(SessionError::Ended),
                    Err(e) => break Err(e.into()),
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
        warn!(error = %e, "leadership lost; deleting nothing until elected again, campaigning");
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
    let _ = timeout(REQUEST_TIMEOUT, client.lease_revoke(lease)).await;
    result
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

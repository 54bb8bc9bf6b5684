//! The reconcile loop: level-triggered, one pass per `--probe-interval`.
//!
//! Each pass compares what etcd holds (the store, kept by the watcher) with
//! what probes see now, so a missed event costs nothing: the next pass sees
//! the same keys again. A pass
//! 1. takes every key with the mod revision it has now,
//! 2. probes every address (bounded concurrency, each probe bounded),
//! 3. looks up the remaining TTL of every lease (for the view),
//! 4. plans: what is stale, per service within the budget, nothing at all
//!    for a service whose safety valve tripped,
//! 5. deletes, on the leader only, each key in a transaction that compares
//!    the key's mod revision *as probed* and the leader key's create
//!    revision, so neither a re-registration nor a deposed leader can be
//!    hurt.
//!
//! Nothing is decided before the watcher's first full list: an empty store
//! must never look like "everything vanished".

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use etcd_lb_registry::etcd::{EtcdConfig, EtcdError};
use etcd_lb_registry::failpoints;
use etcd_lb_registry::session::Session;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::config::Config;
use crate::leader::{LeaderState, Leadership, StepDown};
use crate::metrics::{Metrics, ProbeLabels};
use crate::policy::Policy;
use crate::probe::Prober;
use crate::store::Store;

/// Failpoint (only with the `failpoints` feature), a broken build that
/// breaks (f) no deletion of a live server: the leader deletes a stale key
/// without comparing its mod revision, so a server that registered again
/// after the probe loses its fresh key (the leader fence stays).
pub const FAILPOINT_DELETE_UNFENCED: &str = "controller-delete-unfenced";
/// Failpoint (only with the `failpoints` feature): `return(ms)` holds each
/// deletion that long (default 3000 ms) between the pass's plan and its
/// transaction, as a leader stalled there (a pause, a slow etcd) would. It
/// breaks nothing by itself: it is the case the mod-revision fence is for.
pub const FAILPOINT_DELETE_DELAY: &str = "controller-delete-delay";

/// Lease lookups in flight at once.
const LEASE_LOOKUPS: usize = 16;

/// What a guarded deletion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The key was deleted.
    Deleted,
    /// The key was rewritten or removed since it was probed: kept.
    Changed,
    /// This replica no longer owns the election key: nothing written.
    NotLeader,
}

/// Deletes `key` only if its mod revision is still `mod_revision` and the
/// election key of `leadership` still has its create revision: one
/// transaction, so a server that re-registered after the probe, or a
/// replica that lost the election, never removes anything.
///
/// The transaction goes through `session`, so it is bounded like every
/// etcd call and a refused token or a member without a leader is handled
/// in one place.
///
/// # Errors
/// etcd unreachable, failing or not answering in time; nothing was
/// deleted then.
pub async fn delete_if_unchanged(
    session: &mut Session,
    key: &str,
    mod_revision: i64,
    leadership: &Leadership,
) -> Result<DeleteOutcome, EtcdError> {
    let leader_fence = Compare::create_revision(
        leadership.key.clone(),
        CompareOp::Equal,
        leadership.create_revision,
    );
    let fences = if failpoints::fire(FAILPOINT_DELETE_UNFENCED).is_some() {
        vec![leader_fence]
    } else {
        vec![
            Compare::mod_revision(key, CompareOp::Equal, mod_revision),
            leader_fence,
        ]
    };
    let txn = Txn::new()
        .when(fences)
        .and_then([TxnOp::delete(key, None)])
        .or_else([TxnOp::get(leadership.key.clone(), None)]);
    let resp = session
        .call(|mut c| async move { c.txn(txn).await })
        .await?;
    if resp.succeeded() {
        return Ok(DeleteOutcome::Deleted);
    }
    let still_leader = resp.op_responses().iter().any(|r| match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .is_some_and(|kv| kv.create_revision() == leadership.create_revision),
        _ => false,
    });
    Ok(if still_leader {
        DeleteOutcome::Changed
    } else {
        DeleteOutcome::NotLeader
    })
}

/// The loop's state: store, metrics, prober, and its own etcd session for
/// deletions and lease lookups.
pub struct Reconciler {
    cfg: Config,
    session: Session,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    prober: Prober,
    leader: watch::Receiver<LeaderState>,
    step_down: StepDown,
    etcd_failing: bool,
    sweep_failing: bool,
}

impl Reconciler {
    /// A reconciler over `store`, deleting only while `leader` says so;
    /// a deletion refused for leadership ends the term through `step_down`.
    pub fn new(
        cfg: Config,
        etcd: EtcdConfig,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        leader: watch::Receiver<LeaderState>,
        step_down: StepDown,
    ) -> Self {
        Self {
            prober: Prober::new(cfg.probe_timeout, cfg.tls.clone()),
            cfg,
            session: Session::new(etcd),
            store,
            metrics,
            leader,
            step_down,
            etcd_failing: false,
            sweep_failing: false,
        }
    }

    /// Runs passes every probe interval until `cancel`. A pass in progress
    /// is abandoned on cancel (each deletion is one transaction, so there
    /// is nothing half-done).
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.cfg.probe_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let pass = self.store.passes() + 1;
            tokio::select! {
                () = cancel.cancelled() => break,
                () = async {
                    self.pass().await;
                    self.sweep_overrides().await;
                }
                .instrument(info_span!("pass", n = pass)) => {}
            }
        }
    }

    /// Whether etcd can be reached now (dialing if needed); logs once when
    /// that changes.
    async fn connected(&mut self) -> bool {
        match self.session.client().await {
            Ok(_) => {
                if self.etcd_failing {
                    info!("etcd reachable again");
                    self.etcd_failing = false;
                }
                true
            }
            Err(e) => {
                if !self.etcd_failing {
                    warn!(error = %e, "etcd unreachable: no lease lookups or deletions until it answers");
                    self.etcd_failing = true;
                } else {
                    debug!(error = %e, "etcd still unreachable");
                }
                false
            }
        }
    }

    /// One reconcile pass.
    pub async fn pass(&mut self) {
        if !self.store.synced() {
            debug!("not synced with etcd yet; probing nothing");
            return;
        }
        let targets = self.store.targets();
        let addrs: HashSet<_> = targets.iter().map(|t| t.addr.clone()).collect();
        self.prober.retain(|a| addrs.contains(a));
        let prober = &self.prober;
        let results: Vec<_> = futures::stream::iter(targets)
            .map(|t| async move {
                let outcome = prober.probe(&t.addr).await;
                (t, outcome)
            })
            .buffer_unordered(self.cfg.probe_concurrency.max(1))
            .collect()
            .await;
        for (t, o) in &results {
            self.metrics
                .probes
                .get_or_create(&ProbeLabels {
                    result: o.label().to_owned(),
                })
                .inc();
            if !o.is_alive() {
                debug!(service = %t.service, addr = %t.addr, outcome = ?o, "probe failed");
            }
        }
        let leases: HashSet<i64> = results
            .iter()
            .map(|(t, _)| t.lease)
            .filter(|l| *l != 0)
            .collect();
        self.store
            .record(results, Instant::now(), SystemTime::now());
        self.metrics.passes.inc();
        self.lookup_leases(leases).await;

        let policy = Policy {
            dead_after: self.cfg.dead_after,
            budget: self.cfg.max_deletions_per_pass,
            max_unhealthy_ratio: self.cfg.max_unhealthy_ratio,
        };
        let plan = self.store.plan(&policy, Instant::now(), SystemTime::now());
        for (service, valve) in &plan.tripped {
            warn!(%service, dead = valve.dead, members = valve.members, withheld = valve.withheld,
                  "safety valve: most members look dead at once; deleting nothing for this service (the controller may be cut off)");
            self.metrics.count_valve_trip(service.as_str());
        }
        for service in &plan.cleared {
            info!(%service, "safety valve closed; deletions resume");
        }
        if let Some(valve) = &plan.global_tripped {
            warn!(dead = valve.dead, members = valve.members, withheld = valve.withheld,
                  "global safety valve: most members across services look dead at once; deleting nothing at all (the controller is likely cut off)");
            self.metrics.global_valve_trips.inc();
        }
        if plan.global_cleared {
            info!("global safety valve closed; deletions resume");
        }
        if plan.deferred > 0 {
            info!(
                deferred = plan.deferred,
                "more stale entries than the per-pass budget; the rest waits for later passes"
            );
        }
        if plan.deletions.is_empty() {
            return;
        }
        let Some(leadership) = self.leader.borrow().valid(Instant::now()).cloned() else {
            debug!(
                stale = plan.deletions.len(),
                "not the leader; leaving stale entries to it"
            );
            return;
        };
        for d in plan.deletions {
            if !leadership.is_valid(Instant::now())
                || self.leader.borrow().valid(Instant::now()).is_none()
            {
                warn!("leadership expired during the pass; stopping deletions");
                return;
            }
            if !self.connected().await {
                return;
            }
            if let Some(delay) =
                failpoints::fire_delay(FAILPOINT_DELETE_DELAY, Duration::from_secs(3))
            {
                tokio::time::sleep(delay).await;
            }
            match delete_if_unchanged(&mut self.session, &d.key, d.mod_revision, &leadership).await
            {
                Ok(DeleteOutcome::Deleted) => {
                    info!(service = %d.service, addr = %d.addr, key = %d.key,
                          mod_revision = d.mod_revision, reason = d.reason.as_str(),
                          "deleted stale registration");
                    self.metrics.count_deletion(d.service.as_str(), d.reason);
                }
                Ok(DeleteOutcome::Changed) => {
                    info!(service = %d.service, addr = %d.addr, key = %d.key,
                          "kept: the key changed after its probe (re-registered)");
                    self.metrics.deletions_skipped.inc();
                }
                Ok(DeleteOutcome::NotLeader) => {
                    warn!(election_revision = leadership.create_revision,
                          "the election key is no longer ours; stopping deletions and campaigning again");
                    self.step_down.not_leader(&leadership);
                    return;
                }
                Err(e) => {
                    // (The session already moved on from a member that
                    // timed out or had no leader.)
                    warn!(key = %d.key, error = %e, "deletion failed; retrying next pass");
                    return;
                }
            }
        }
    }

    /// On the leader, removes operators' overrides that can never apply
    /// again ([`crate::hygiene`]), fenced like the deletions, and counts
    /// them.
    async fn sweep_overrides(&mut self) {
        let Some(leadership) = self.leader.borrow().valid(Instant::now()).cloned() else {
            return;
        };
        if !self.connected().await {
            return;
        }
        let swept = crate::hygiene::sweep(
            &mut self.session,
            &self.cfg.root,
            &self.cfg.overrides_root,
            crate::hygiene::SWEEP_PER_PASS,
            &leadership,
        )
        .await;
        for (_, why) in &swept.removed {
            self.metrics.count_override_removal(*why);
        }
        if swept.not_leader {
            self.step_down.not_leader(&leadership);
        }
        match swept.failed {
            None => {}
            Some(e) if !self.sweep_failing => {
                // Once per failing stretch: a controller without rights on
                // the overrides prefix would say it every pass.
                warn!(error = %e, "override sweep failed; retrying every pass (said once until it works)");
                self.sweep_failing = true;
                return;
            }
            Some(e) => {
                debug!(error = %e, "override sweep still failing");
                return;
            }
        }
        if self.sweep_failing {
            info!("override sweep works again");
            self.sweep_failing = false;
        }
    }

    async fn lookup_leases(&mut self, leases: HashSet<i64>) {
        if leases.is_empty() {
            return;
        }
        // The lookups only feed the view's `ttl`: bound them as a whole so a
        // hanging etcd never delays the pass's decisions.
        let budget = self.cfg.probe_interval.max(Duration::from_secs(1));
        let deadline = tokio::time::sleep(budget);
        if !matches!(timeout(budget, self.connected()).await, Ok(true)) {
            return;
        }
        let Ok(client) = self.session.client().await else {
            return;
        };
        // Concurrent lookups on clones of the session's client, each
        // bounded like a session call.
        let bound = self.session.timeout();
        let ttls: HashMap<i64, i64> = futures::stream::iter(leases)
            .map(|id| {
                let mut c = client.clone();
                async move {
                    let r = timeout(bound, c.lease_time_to_live(id, None)).await;
                    match r {
                        Ok(Ok(resp)) => Some((id, resp.ttl())),
                        _ => None,
                    }
                }
            })
            .buffer_unordered(LEASE_LOOKUPS)
            .take_until(deadline)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        self.store.record_lease_ttls(&ttls, Instant::now());
    }
}

//! What a harness run records: etcd events under the prefix, every client
//! view change, every call, every fault and server mark, all timed by one
//! clock (a monotonic [`Duration`] since the run's start).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// An endpoint set: address -> weight.
pub type EndpointSet = BTreeMap<String, u32>;

/// A put or a delete of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// Put (create or update).
    Put,
    /// Delete (explicit or lease expiry).
    Delete,
}

/// One etcd event under the prefix, as the recorder saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdEvent {
    /// When the recorder saw it.
    pub at: Duration,
    /// The event's mod revision.
    pub revision: i64,
    /// The endpoint address (the key suffix).
    pub addr: String,
    /// Put or delete.
    pub kind: EventKind,
    /// The value's weight (puts of a valid value only).
    pub weight: Option<u32>,
}

/// A client's view after one change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewChange {
    /// When the client's balancer changed.
    pub at: Duration,
    /// Which client.
    pub client: u32,
    /// The discovery's revision then.
    pub revision: i64,
    /// The endpoints with their weights.
    pub endpoints: EndpointSet,
}

/// One call, start to end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Call {
    /// Which client.
    pub client: u32,
    /// The server that answered (its reply says), if any.
    pub endpoint: Option<String>,
    /// When the call started.
    pub start: Duration,
    /// When it ended.
    pub end: Duration,
    /// Whether it succeeded.
    pub ok: bool,
    /// The error, on failure.
    pub message: String,
}

/// The faults the nemesis injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum FaultKind {
    /// SIGKILL an etcd member, restart it later with its data.
    EtcdKill,
    /// SIGSTOP an etcd member, SIGCONT later.
    EtcdPause,
    /// Cut an etcd member off from its peers (its clients still reach
    /// it), rejoin later.
    EtcdIsolate,
    /// Compact etcd's history at the current revision (physical), then
    /// defragment one member.
    EtcdCompact,
    /// SIGKILL a server, restart it at the same address.
    ServerKill,
    /// SIGTERM a server (it drains and deregisters), restart it.
    ServerDrain,
    /// SIGSTOP a server, SIGCONT later.
    ServerPause,
    /// SIGKILL the leading controller replica (the one etcd's election
    /// names; a replica by index when none leads), restart it.
    ControllerKill,
    /// SIGSTOP the leading controller replica, SIGCONT later: a leader
    /// that wakes after its election lease may have lapsed, with a plan
    /// made before it slept (what the deletion fence is for).
    ControllerPause,
    /// Delete one server's key, as a person or a stray script would; its
    /// live server must register again. Not drawn by the nemesis (not in
    /// [`FaultKind::ALL`]); excuses nothing.
    KeyDelete,
    /// Rewrite every registered key in one transaction (weight halved, same
    /// lease): one revision with an event per server, for the failpoint
    /// that cuts a watch stream between two events of one revision. Not
    /// drawn by the nemesis; excuses nothing.
    MultiKeyWrite,
    /// Stop every etcd member, lose their data and restore it from the
    /// snapshot taken earlier in the run (`etcdctl snapshot save`, then
    /// `etcdctl snapshot restore` under the same names, peer URLs and
    /// cluster token): revisions go back, keys written since the snapshot
    /// are gone, keys deleted since come back with their leases.
    EtcdRestore,
    /// Stop every etcd member, lose their data and start them empty:
    /// revisions start again from 1 and every key and lease is gone.
    EtcdWipe,
}

impl FaultKind {
    /// Every kind.
    pub const ALL: [FaultKind; 11] = [
        FaultKind::EtcdKill,
        FaultKind::EtcdPause,
        FaultKind::EtcdIsolate,
        FaultKind::EtcdCompact,
        FaultKind::ServerKill,
        FaultKind::ServerDrain,
        FaultKind::ServerPause,
        FaultKind::ControllerKill,
        FaultKind::ControllerPause,
        FaultKind::EtcdRestore,
        FaultKind::EtcdWipe,
    ];

    /// Whether it hits etcd (rather than a server).
    pub fn is_etcd(self) -> bool {
        matches!(
            self,
            FaultKind::EtcdKill
                | FaultKind::EtcdPause
                | FaultKind::EtcdIsolate
                | FaultKind::EtcdCompact
                | FaultKind::EtcdRestore
                | FaultKind::EtcdWipe
        )
    }

    /// Whether etcd's data is lost (and maybe restored from a snapshot):
    /// its revisions go back, so the checker reads the history in epochs
    /// ([`History::epochs`]).
    pub fn loses_data(self) -> bool {
        matches!(self, FaultKind::EtcdRestore | FaultKind::EtcdWipe)
    }

    /// Whether it hits a greet-server (its window excuses that server's
    /// failed calls, absence from etcd and deletion by the controller).
    pub fn is_server(self) -> bool {
        matches!(
            self,
            FaultKind::ServerKill | FaultKind::ServerDrain | FaultKind::ServerPause
        )
    }

    /// Whether it hits a controller replica (it excuses nothing: the
    /// servers and etcd are untouched).
    pub fn is_controller(self) -> bool {
        matches!(self, FaultKind::ControllerKill | FaultKind::ControllerPause)
    }
}

/// A fault, from injection to heal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultMark {
    /// What.
    pub kind: FaultKind,
    /// On what: an etcd member (`etcd-<i>`), a server address or a
    /// controller replica (`controller-<i>`).
    pub target: String,
    /// Injected.
    pub start: Duration,
    /// Healed (process restarted or continued); `None`: never healed.
    pub end: Option<Duration>,
}

/// Something a server did, as the harness saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerEvent {
    /// Process started.
    Started,
    /// SIGTERM sent: it drains (weight 0), then deregisters.
    Drain,
    /// It exited after a drain (its lease revoked, key deleted).
    Deregistered,
}

/// A server mark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerMark {
    /// When.
    pub at: Duration,
    /// The server's address.
    pub server: String,
    /// What.
    pub event: ServerEvent,
}

/// A deletion the leading controller made, as its own log line says
/// (`deleted stale registration`, written after the fenced transaction
/// succeeded).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerDeletion {
    /// When the controller logged it (its wall-clock timestamp mapped onto
    /// the run's clock); the transaction committed just before.
    pub at: Duration,
    /// Which replica (`controller-<i>`).
    pub controller: String,
    /// The deleted key's address.
    pub addr: String,
    /// The key's mod revision the decision was based on (the fence).
    pub mod_revision: i64,
    /// Why (`unreachable`, `no_lease_unreachable`, `invalid_value`).
    pub reason: String,
}

/// Everything one run recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// The seed the schedule came from.
    pub seed: u64,
    /// etcd events, in revision order.
    pub etcd: Vec<EtcdEvent>,
    /// View changes of every client, in time order per client.
    pub views: Vec<ViewChange>,
    /// Calls, in end order.
    pub calls: Vec<Call>,
    /// Faults, in start order.
    pub faults: Vec<FaultMark>,
    /// Server marks.
    pub servers: Vec<ServerMark>,
    /// Deletions by the controllers (empty in worlds without them).
    #[serde(default)]
    pub deletions: Vec<ControllerDeletion>,
    /// Revision ranges (inclusive) whose events the recorder does not know
    /// one by one: before its first list, and between the last revision it
    /// watched and a relist after compaction. etcd's state at a revision in
    /// a gap is unknown; at and after the relist it is exact again.
    #[serde(default)]
    pub gaps: Vec<(i64, i64)>,
    /// When recording stopped.
    pub end: Duration,
    /// Failpoint firings by name, in this process (the clients) and in the
    /// logs of the servers and controllers (those alive at the end, and
    /// the controllers replaced during the run): evidence that a fault set
    /// inside the code happened.
    #[serde(default)]
    pub failpoint_hits: BTreeMap<String, u64>,
    /// Where etcd's history started again ([`FaultKind::EtcdRestore`],
    /// [`FaultKind::EtcdWipe`]), in the order the recorder listed the new
    /// data: revisions from one epoch's first event on belong to the new
    /// history and may repeat revisions of the old one.
    #[serde(default)]
    pub epochs: Vec<Epoch>,
    /// Deletes the recorder saw that were delete requests, not a lease's
    /// end: the key's lease outlived the delete (or it had none). In this
    /// world only a controller's fenced transaction deletes so; the
    /// checker judges those that no logged deletion names ([`Self::deletions`]
    /// miss a deletion whose log line was lost with its process).
    #[serde(default)]
    pub explicit_deletes: Vec<ExplicitDelete>,
    /// Clients that learn endpoints over xDS (not from etcd): client ->
    /// the controller replica serving them (`controller-<i>`). They record
    /// calls but no views.
    #[serde(default)]
    pub xds_clients: BTreeMap<u32, String>,
}

/// A delete request under the prefix, as the recorder classified it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplicitDelete {
    /// When the recorder saw the delete.
    pub at: Duration,
    /// The epoch of etcd's history it happened in.
    pub epoch: usize,
    /// The delete's revision.
    pub revision: i64,
    /// The deleted key's address.
    pub addr: String,
    /// The key's lease (alive after the delete), 0 for none.
    pub lease: i64,
}

/// The start of a new etcd history, as the recorder listed it after a loss
/// of etcd's data: every key listed is recorded as a put from
/// [`Epoch::first_event`] on (and every key gone as a delete).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// When the recorder listed the new data.
    pub at: Duration,
    /// The index in [`History::etcd`] of the epoch's first event.
    pub first_event: usize,
    /// The list's revision: the new history's state is known from here on
    /// (below it, in this epoch, it is not).
    pub revision: i64,
}

impl History {
    /// etcd's state (address -> weight, valid puts only) after every event
    /// the recorder saw by time `at`.
    pub fn etcd_state_at(&self, at: Duration) -> EndpointSet {
        let mut state = EndpointSet::new();
        for e in self.etcd.iter().filter(|e| e.at <= at) {
            match (e.kind, e.weight) {
                (EventKind::Put, Some(w)) => {
                    state.insert(e.addr.clone(), w);
                }
                _ => {
                    state.remove(&e.addr);
                }
            }
        }
        state
    }

    /// etcd's state (address -> weight, valid puts only) at revision
    /// `revision`, folding every recorded event up to it in revision order;
    /// `None` when the revision lies in one of the recorder's gaps
    /// ([`History::gaps`]), where that state is unknown.
    ///
    /// With losses of etcd's data ([`History::epochs`]) this is the first
    /// epoch's state; [`History::etcd_state_in_epoch`] reads the others.
    pub fn etcd_state_at_revision(&self, revision: i64) -> Option<EndpointSet> {
        self.etcd_state_in_epoch(0, revision)
    }

    /// The epoch (0 before any loss of etcd's data) of the `i`-th event of
    /// [`History::etcd`].
    pub fn epoch_of_event(&self, i: usize) -> usize {
        self.epochs.iter().filter(|e| e.first_event <= i).count()
    }

    /// The epoch the recorder was in at time `at`.
    pub fn epoch_at(&self, at: Duration) -> usize {
        self.epochs.iter().filter(|e| e.at <= at).count()
    }

    /// Each event's position in etcd's histories: (epoch, revision), which
    /// orders events across losses of etcd's data as revisions alone do
    /// not.
    pub fn positions(&self) -> Vec<(usize, i64)> {
        (0..self.etcd.len())
            .map(|i| (self.epoch_of_event(i), self.etcd[i].revision))
            .collect()
    }

    /// etcd's state at `revision` of epoch `epoch` (see
    /// [`History::etcd_state_at_revision`]); `None` where it is unknown: in
    /// a recorder gap, or in an epoch after the first below the revision of
    /// the recorder's list of the new data. The gaps are revision ranges
    /// without an epoch, so a gap of one epoch leaves the same revisions of
    /// the others unjudged too (lenient, never stricter).
    pub fn etcd_state_in_epoch(&self, epoch: usize, revision: i64) -> Option<EndpointSet> {
        if epoch == 0 {
            let first = self
                .epochs
                .first()
                .map_or(self.etcd.len(), |e| e.first_event);
            return fold_at_revision(&self.etcd[..first], &self.gaps, revision);
        }
        let start = self.epochs.get(epoch - 1)?;
        if revision < start.revision {
            return None;
        }
        let end = self
            .epochs
            .get(epoch)
            .map_or(self.etcd.len(), |e| e.first_event);
        fold_at_revision(&self.etcd[start.first_event..end], &self.gaps, revision)
    }

    /// etcd's final state.
    pub fn etcd_final(&self) -> EndpointSet {
        self.etcd_state_at(Duration::MAX)
    }

    /// When the last fault healed (`None`: no fault; `Some(MAX)`: one never
    /// healed).
    pub fn last_heal(&self) -> Option<Duration> {
        self.faults
            .iter()
            .map(|f| f.end.unwrap_or(Duration::MAX))
            .max()
    }

    /// Faults by kind.
    pub fn faults_by_kind(&self) -> BTreeMap<FaultKind, usize> {
        let mut m = BTreeMap::new();
        for f in &self.faults {
            *m.entry(f.kind).or_default() += 1;
        }
        m
    }
}

/// etcd's state at `revision` from `events` of one history, folded in
/// revision order; `None` in a gap.
fn fold_at_revision(
    events: &[EtcdEvent],
    gaps: &[(i64, i64)],
    revision: i64,
) -> Option<EndpointSet> {
    if gaps.iter().any(|(lo, hi)| (*lo..=*hi).contains(&revision)) {
        return None;
    }
    let mut events: Vec<&EtcdEvent> = events.iter().filter(|e| e.revision <= revision).collect();
    // A relist records puts at their own mod revisions and deletes at
    // the list's revision, after later events: fold in revision order.
    events.sort_by_key(|e| e.revision);
    let mut state = EndpointSet::new();
    for e in events {
        match (e.kind, e.weight) {
            (EventKind::Put, Some(w)) => {
                state.insert(e.addr.clone(), w);
            }
            _ => {
                state.remove(&e.addr);
            }
        }
    }
    Some(state)
}

/// The run's one clock: monotonic, plus the wall-clock time of its start
/// so a timestamp another process wrote (a controller's log line) can be
/// placed on it.
#[derive(Debug, Clone, Copy)]
pub struct Clock(Instant, SystemTime);

impl Clock {
    /// Starts now.
    pub fn start() -> Self {
        Self(Instant::now(), SystemTime::now())
    }

    /// Time since the start.
    pub fn now(&self) -> Duration {
        self.0.elapsed()
    }

    /// The run time of a wall-clock instant (zero before the start). Off
    /// by whatever the wall clock was stepped during the run, which on a
    /// machine keeping time by small NTP slews is far below the bounds.
    pub fn at_wall(&self, wall: SystemTime) -> Duration {
        wall.duration_since(self.1).unwrap_or_default()
    }
}

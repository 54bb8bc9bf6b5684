//! Reads a [`History`] and reports every violation of the invariants in
//! `docs/robustness.md`, with its time and context.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::history::{EndpointSet, EventKind, FaultKind, FaultMark, History, ViewChange};

/// The bounds the invariants are checked with.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// (b): how long after the last heal and the last etcd event every view
    /// must equal etcd's final state.
    pub quiescence: Duration,
    /// (d): how long after an endpoint's deletion or weight-0 put reached
    /// etcd a call may still start on it.
    pub stale_call: Duration,
    /// How late the recorder may see an etcd event compared with a client
    /// (both watch the same etcd; either may be first).
    pub recorder_slack: Duration,
    /// A fault window counts this long after its heal (connections
    /// re-established, a restarted etcd member caught up).
    pub fault_margin: Duration,
    /// (f): how long before its deletion a controller's decision may have
    /// been made (a probe pass: the world's 300 ms interval, 250 ms
    /// timeout, and the pass's own time).
    pub controller_lag: Duration,
    /// (g): how long a live server may be missing from etcd, counted from
    /// the deletion or from the end of the last fault that excuses it.
    pub registration: Duration,
    /// How long after a loss of etcd's data ([`FaultKind::loses_data`])
    /// healed its consequences may still show in the clients: a view's
    /// revision going back (a), a view holding keys the new data lacks
    /// (h) and calls to them (d): the library's watcher keeps such keys for
    /// its wipe grace (10 s) while their servers register again, so a
    /// client does not empty its view (static stability). The grace plus
    /// the margin and the recorder's slack.
    pub data_loss: Duration,
    /// The servers' lease TTL: after a restore, a key of a dead process
    /// comes back with its lease, which lives one TTL from the restored
    /// leader's election; the server's new process takes the address over
    /// only then (g).
    pub lease_ttl: Duration,
    /// (d) for an xDS client: how long after a fault of the controller
    /// replica serving it (kill, pause) its assignment may still be the
    /// one from before: the replica's restart and its first pass, and
    /// grpcio's backoff before it opens its ADS stream again (1 s, then
    /// 1.6 times more, jittered).
    pub xds_reconnect: Duration,
    /// (e) for an xDS client: how far its assignment may trail etcd (etcd
    /// -> the controller's watch -> its xDS push -> grpcio), so that "no
    /// server was healthy" may have held for it up to this long before
    /// the call (the design's target is p99 < 100 ms on an idle machine).
    pub xds_lag: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            quiescence: Duration::from_secs(5),
            stale_call: Duration::from_secs(1),
            recorder_slack: Duration::from_secs(2),
            fault_margin: Duration::from_secs(1),
            controller_lag: Duration::from_secs(1),
            registration: Duration::from_secs(2),
            data_loss: Duration::from_secs(13),
            lease_ttl: Duration::from_secs(4),
            xds_reconnect: Duration::from_secs(5),
            xds_lag: Duration::from_millis(500),
        }
    }
}

/// The invariants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Invariant {
    /// (a) a client's view revisions never go back.
    MonotonicRevision,
    /// (b) after quiescence every view equals etcd's final state.
    Convergence,
    /// (c) during an etcd fault a view loses no endpoint etcd still holds.
    StaticStability,
    /// (d) no call starts on an endpoint long after it left etcd.
    NoStaleCall,
    /// (e) no call fails while a server is healthy, except the allowed cases.
    NoFailedCall,
    /// (f) the controller never deletes a live, answering server's key.
    NoLiveDeletion,
    /// (g) a live server is never missing from etcd long while etcd has
    /// quorum.
    LiveRegistered,
    /// (h) each view equals etcd's state at the view's own revision.
    ViewAtRevision,
}

/// One violation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Which invariant.
    pub invariant: Invariant,
    /// When (run clock).
    pub at: Duration,
    /// Which client, if one.
    pub client: Option<u32>,
    /// What happened.
    pub context: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} at {:?}", self.invariant, self.at)?;
        if let Some(c) = self.client {
            write!(f, " client {c}")?;
        }
        write!(f, ": {}", self.context)
    }
}

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Every violation, in invariant then time order.
    pub violations: Vec<Violation>,
    /// Checks that could not be made (why).
    pub skipped: Vec<String>,
}

impl Report {
    /// Violations of one invariant.
    pub fn of(&self, inv: Invariant) -> Vec<&Violation> {
        self.violations
            .iter()
            .filter(|v| v.invariant == inv)
            .collect()
    }
}

/// Checks every invariant.
pub fn check(h: &History, b: &Bounds) -> Report {
    let mut r = Report::default();
    monotonic(h, b, &mut r);
    convergence(h, b, &mut r);
    static_stability(h, b, &mut r);
    stale_calls(h, b, &mut r);
    failed_calls(h, b, &mut r);
    live_deletions(h, b, &mut r);
    live_registered(h, b, &mut r);
    views_at_revision(h, b, &mut r);
    r
}

/// Each client's view changes in time order.
fn views_by_client(h: &History) -> BTreeMap<u32, Vec<&ViewChange>> {
    let mut m: BTreeMap<u32, Vec<&ViewChange>> = BTreeMap::new();
    for v in &h.views {
        m.entry(v.client).or_default().push(v);
    }
    for vs in m.values_mut() {
        vs.sort_by_key(|v| v.at);
    }
    m
}

fn overlaps(f: &FaultMark, from: Duration, to: Duration, margin: Duration) -> bool {
    let end = f.end.map_or(Duration::MAX, |e| e.saturating_add(margin));
    f.start <= to && from <= end
}

/// The losses of etcd's data, in start order.
fn data_losses(h: &History) -> Vec<&FaultMark> {
    h.faults.iter().filter(|f| f.kind.loses_data()).collect()
}

fn monotonic(h: &History, b: &Bounds, r: &mut Report) {
    let losses = data_losses(h);
    for (client, views) in views_by_client(h) {
        // Each loss of etcd's data lets each client's revision go back
        // once, from the loss's start to W after its heal.
        let mut used = vec![false; losses.len()];
        for w in views.windows(2) {
            if w[1].revision < w[0].revision {
                let excuse = losses
                    .iter()
                    .enumerate()
                    .position(|(i, f)| !used[i] && overlaps(f, w[1].at, w[1].at, b.data_loss));
                if let Some(i) = excuse {
                    used[i] = true;
                    continue;
                }
                r.violations.push(Violation {
                    invariant: Invariant::MonotonicRevision,
                    at: w[1].at,
                    client: Some(client),
                    context: format!(
                        "view went back from revision {} (at {:?}) to {}",
                        w[0].revision, w[0].at, w[1].revision
                    ),
                });
            }
        }
    }
}

fn convergence(h: &History, b: &Bounds, r: &mut Report) {
    let heal = h.last_heal().unwrap_or_default();
    let last_event = h.etcd.iter().map(|e| e.at).max().unwrap_or_default();
    // After a loss of etcd's data a client keeps keys the new data lacks
    // for its wipe grace: the view settles only W after the heal.
    let loss = data_losses(h)
        .iter()
        .map(|f| {
            f.end
                .map_or(Duration::MAX, |e| e.saturating_add(b.data_loss))
        })
        .max()
        .unwrap_or_default();
    let settled = heal.max(last_event).max(loss);
    if settled.saturating_add(b.quiescence) > h.end {
        r.skipped.push(format!(
            "convergence: the run ended at {:?}, before {:?} of quiescence after {settled:?}",
            h.end, b.quiescence
        ));
        return;
    }
    let want = h.etcd_final();
    for (client, views) in views_by_client(h) {
        let have = views
            .last()
            .map(|v| v.endpoints.clone())
            .unwrap_or_default();
        if have != want {
            r.violations.push(Violation {
                invariant: Invariant::Convergence,
                at: h.end,
                client: Some(client),
                context: format!(
                    "final view {have:?} (since {:?}) != etcd's final state {want:?} (settled at {settled:?})",
                    views.last().map(|v| v.at).unwrap_or_default()
                ),
            });
        }
    }
}

fn static_stability(h: &History, b: &Bounds, r: &mut Report) {
    let windows: Vec<&FaultMark> = h.faults.iter().filter(|f| f.kind.is_etcd()).collect();
    for (client, views) in views_by_client(h) {
        // When, and at which view revision, each address last entered this
        // client's view.
        let mut added: BTreeMap<&str, (Duration, i64)> = BTreeMap::new();
        let mut prev: Option<&ViewChange> = None;
        for v in views {
            for a in v.endpoints.keys() {
                if prev.is_none_or(|p| !p.endpoints.contains_key(a)) {
                    added.insert(a, (v.at, v.revision));
                }
            }
            if let Some(p) = prev {
                for a in p.endpoints.keys().filter(|a| !v.endpoints.contains_key(*a)) {
                    let Some(f) = windows
                        .iter()
                        .find(|f| overlaps(f, v.at, v.at, b.fault_margin))
                    else {
                        continue;
                    };
                    let (since, since_rev) = added.get(a.as_str()).copied().unwrap_or_default();
                    let since = since.saturating_sub(b.recorder_slack);
                    // Evidence of a delete in etcd: by revision (after the
                    // address entered the view, at or before the view's
                    // revision), or, the view's revision being read beside
                    // the balancer rather than with it, by the recorder's
                    // time within the slack.
                    // Revisions compare within an epoch of etcd's history:
                    // in the epoch the address entered the view, after the
                    // revision it entered at; in a later epoch (etcd lost
                    // its data since, and the view kept the address across
                    // the loss), anywhere in it; either way at or before
                    // the view's revision, and no later than the recorder's
                    // epoch R after the view (found by seed 2005: an
                    // address kept across three restores was deleted in the
                    // last one's history, seen by a late recorder).
                    let first = h.epoch_at(since);
                    let last = h.epoch_at(v.at + b.recorder_slack);
                    let deleted = h.etcd.iter().enumerate().any(|(i, e)| {
                        let k = h.epoch_of_event(i);
                        &e.addr == a
                            && e.kind == EventKind::Delete
                            && (((first..=last).contains(&k)
                                && (k > first || e.revision > since_rev)
                                && e.revision <= v.revision)
                                || (e.at >= since && e.at <= v.at + b.recorder_slack))
                    });
                    if !deleted {
                        r.violations.push(Violation {
                            invariant: Invariant::StaticStability,
                            at: v.at,
                            client: Some(client),
                            context: format!(
                                "{a} left the view (revision {}) during {:?} of {} ({:?}..{:?}) with no delete in etcd",
                                v.revision, f.kind, f.target, f.start, f.end
                            ),
                        });
                    }
                }
            }
            prev = Some(v);
        }
    }
}

fn stale_calls(h: &History, b: &Bounds, r: &mut Report) {
    let positions = h.positions();
    for c in h.calls.iter().filter(|c| c.ok) {
        let Some(ep) = &c.endpoint else { continue };
        // Each event with its position (epoch, revision) in etcd's
        // histories.
        let events: Vec<_> = h
            .etcd
            .iter()
            .zip(&positions)
            .filter(|(e, _)| &e.addr == ep)
            .collect();
        // The last time the endpoint left etcd (delete or weight 0) more than
        // the bound before the call started.
        let Some(&(gone, gone_pos)) = events
            .iter()
            .filter(|(e, _)| {
                (e.kind == EventKind::Delete || e.weight.is_none_or(|w| w == 0))
                    && e.at + b.stale_call < c.start
            })
            .max_by_key(|(e, _)| e.at)
        else {
            continue;
        };
        let back = events.iter().any(|(e, pos)| {
            e.kind == EventKind::Put
                && e.weight.is_some_and(|w| w > 0)
                && *pos > gone_pos
                && e.at <= c.start + b.recorder_slack
        });
        // A loss of etcd's data counts W after its heal: the client keeps
        // keys the new data lacks for its wipe grace, and calls them.
        // That allowance ends W after the heal (the call itself must start
        // by then), where the other etcd faults excuse any call after a
        // removal they overlap.
        let etcd_faulted = h.faults.iter().any(|f| {
            if f.kind.loses_data() {
                overlaps(f, gone.at, c.start, b.data_loss)
                    && overlaps(f, c.start, c.start, b.data_loss)
            } else {
                f.kind.is_etcd() && overlaps(f, gone.at, c.start, b.fault_margin)
            }
        });
        // An xDS client learns of the removal from its controller replica:
        // while that replica is down or paused (and until the client has
        // its stream again) it keeps the assignment it had.
        let serving = h.xds_clients.get(&c.client);
        let xds_stale = h.faults.iter().any(|f| {
            f.kind.is_controller()
                && Some(&f.target) == serving
                && overlaps(f, gone.at, c.start, b.xds_reconnect)
        });
        let etcd_faulted = etcd_faulted || xds_stale;
        if !back && !etcd_faulted {
            r.violations.push(Violation {
                invariant: Invariant::NoStaleCall,
                at: c.start,
                client: Some(c.client),
                context: format!(
                    "call answered by {ep} started {:?} after its {} at revision {} reached etcd (at {:?})",
                    c.start - gone.at,
                    if gone.kind == EventKind::Delete { "delete" } else { "weight-0 put" },
                    gone.revision,
                    gone.at
                ),
            });
        }
    }
}

fn failed_calls(h: &History, b: &Bounds, r: &mut Report) {
    let servers: BTreeSet<&str> = h
        .etcd
        .iter()
        .map(|e| e.addr.as_str())
        .chain(
            h.faults
                .iter()
                .filter(|f| f.kind.is_server())
                .map(|f| f.target.as_str()),
        )
        .collect();
    for c in h.calls.iter().filter(|c| !c.ok) {
        let (from, to) = (c.start.saturating_sub(b.fault_margin), c.end);
        let server_faults: Vec<&FaultMark> = h
            .faults
            .iter()
            .filter(|f| f.kind.is_server() && overlaps(f, from, to, b.fault_margin))
            .collect();
        let named: Vec<&str> = servers
            .iter()
            .copied()
            .filter(|s| c.message.contains(s))
            .collect();
        // Allowed: the call overlaps a fault on the server it names, or it
        // names none and overlaps a fault on any server.
        let cut_by_fault = server_faults
            .iter()
            .any(|f| named.is_empty() || named.contains(&f.target.as_str()));
        if cut_by_fault {
            continue;
        }
        let healthy_at = |t: Duration| -> Vec<String> {
            h.etcd_state_at(t)
                .into_iter()
                .filter(|(a, w)| *w > 0 && !server_faults.iter().any(|f| &f.target == a))
                .map(|(a, _)| a)
                .collect()
        };
        let healthy = healthy_at(c.start);
        if healthy.is_empty() {
            continue;
        }
        // An xDS client's assignment trails etcd: none healthy at any
        // moment up to the lag before the call also allows it.
        if h.xds_clients.contains_key(&c.client) {
            let from = c.start.saturating_sub(b.xds_lag);
            let empty_then = std::iter::once(from)
                .chain(
                    h.etcd
                        .iter()
                        .map(|e| e.at)
                        .filter(|t| (from..=c.start).contains(t)),
                )
                .any(|t| healthy_at(t).is_empty());
            if empty_then {
                continue;
            }
        }
        r.violations.push(Violation {
            invariant: Invariant::NoFailedCall,
            at: c.start,
            client: Some(c.client),
            context: format!(
                "call failed ({:?}..{:?}): {:?}; healthy servers then: {healthy:?}",
                c.start, c.end, c.message
            ),
        });
    }
}

fn live_deletions(h: &History, b: &Bounds, r: &mut Report) {
    for d in &h.deletions {
        // The decision came from probes up to the lag before the deletion;
        // a fault on this server since then (plus the margin after its
        // heal, for a restarted process to answer) excuses it.
        let from = decided_from(h, b, d.at, &d.controller);
        let excused = h.faults.iter().any(|f| {
            f.kind.is_server() && f.target == d.addr && overlaps(f, from, d.at, b.fault_margin)
        });
        if !excused {
            r.violations.push(Violation {
                invariant: Invariant::NoLiveDeletion,
                at: d.at,
                client: None,
                context: format!(
                    "{} deleted {} (fenced on revision {}, reason {}) with no fault on that server since {from:?}",
                    d.controller, d.addr, d.mod_revision, d.reason
                ),
            });
        }
    }
    // Delete requests the recorder saw that no logged deletion names (its
    // log line lost with its process, a leader SIGKILLed between the
    // transaction and the line): judged the same way, from the recorder's
    // time (within R of the transaction), the deleter unknown, so a fault
    // of any controller replica may have delayed the decision.
    for x in &h.explicit_deletes {
        let logged = h
            .deletions
            .iter()
            .any(|d| d.addr == x.addr && d.at.abs_diff(x.at) <= b.recorder_slack);
        // The harness deleting the key by hand (a KeyDelete fault, in
        // fixed plans) is not a controller's deletion.
        let by_hand = h.faults.iter().any(|f| {
            f.kind == FaultKind::KeyDelete
                && f.target == x.addr
                && overlaps(
                    f,
                    x.at.saturating_sub(b.recorder_slack),
                    x.at,
                    b.fault_margin,
                )
        });
        if logged || by_hand {
            continue;
        }
        let from = h
            .faults
            .iter()
            .filter(|f| f.kind.is_controller())
            .map(|f| decided_from(h, b, x.at, &f.target))
            .fold(decided_from(h, b, x.at, ""), Duration::min)
            .saturating_sub(b.recorder_slack);
        let excused = h.faults.iter().any(|f| {
            f.kind.is_server() && f.target == x.addr && overlaps(f, from, x.at, b.fault_margin)
        });
        if !excused {
            let kills: Vec<String> = h
                .faults
                .iter()
                .filter(|f| f.kind == FaultKind::ControllerKill)
                .filter(|f| {
                    overlaps(
                        f,
                        x.at.saturating_sub(b.recorder_slack),
                        x.at + b.recorder_slack,
                        b.fault_margin,
                    )
                })
                .map(|f| format!("{} at {:?}", f.target, f.start))
                .collect();
            r.violations.push(Violation {
                invariant: Invariant::NoLiveDeletion,
                at: x.at,
                client: None,
                context: format!(
                    "{} deleted at revision {} (epoch {}) by a delete request (its lease {:x} outlived it) that no controller logged (controller kills around it: {kills:?}), with no fault on that server since {from:?}",
                    x.addr, x.revision, x.epoch, x.lease
                ),
            });
        }
    }
}

/// The earliest a deletion at `at` by `controller` may have been decided:
/// L before it, and, when an etcd fault or a fault of that controller
/// (plus the margin) overlaps that stretch, L before that fault's start,
/// repeated while windows chain. A decision made before an etcd outage or
/// a pause is committed after it, fenced on the revision it saw: the key
/// it deletes is still the incarnation it judged, so a server fault on it
/// before the outage or pause explains the deletion.
fn decided_from(h: &History, b: &Bounds, at: Duration, controller: &str) -> Duration {
    let mut from = at.saturating_sub(b.controller_lag);
    loop {
        let earlier = h
            .faults
            .iter()
            .filter(|f| f.kind.is_etcd() || (f.kind.is_controller() && f.target == controller))
            .filter(|f| overlaps(f, from, at, b.fault_margin))
            .map(|f| f.start.saturating_sub(b.controller_lag))
            .min();
        match earlier {
            Some(e) if e < from => from = e,
            _ => return from,
        }
    }
}

/// `[from, to)` minus every window in `excuses`: the parts left.
fn uncovered(
    from: Duration,
    to: Duration,
    excuses: &[(Duration, Duration)],
) -> Vec<(Duration, Duration)> {
    let mut parts = vec![(from, to)];
    for &(lo, hi) in excuses {
        parts = parts
            .into_iter()
            .flat_map(|(a, z)| {
                if hi <= a || z <= lo {
                    return vec![(a, z)];
                }
                let mut v = Vec::new();
                if a < lo {
                    v.push((a, lo));
                }
                if hi < z {
                    v.push((hi, z));
                }
                v
            })
            .collect();
    }
    parts
}

fn live_registered(h: &History, b: &Bounds, r: &mut Report) {
    // Only servers the history says were started are judged, from their
    // first start on.
    let mut first_start: BTreeMap<&str, Duration> = BTreeMap::new();
    for m in h
        .servers
        .iter()
        .filter(|m| m.event == crate::history::ServerEvent::Started)
    {
        first_start.entry(m.server.as_str()).or_insert(m.at);
    }
    for (&addr, &started) in &first_start {
        // Absence in etcd as the recorder saw it: from a delete (or a
        // weight-0 or invalid put) to the next put with weight > 0.
        let positions = h.positions();
        let mut events: Vec<_> = h
            .etcd
            .iter()
            .zip(&positions)
            .filter(|(e, _)| e.addr == addr)
            .collect();
        events.sort_by_key(|(_, pos)| **pos);
        let events = events.into_iter().map(|(e, _)| e);
        let mut absences = Vec::new();
        let mut gone: Option<Duration> = None;
        for e in events {
            let present = e.kind == EventKind::Put && e.weight.is_some_and(|w| w > 0);
            match (present, gone) {
                (true, Some(d)) => {
                    absences.push((d, e.at.max(d)));
                    gone = None;
                }
                (false, None) => gone = Some(e.at),
                _ => {}
            }
        }
        if let Some(d) = gone {
            absences.push((d, h.end));
        }
        // Excused: before the server's start, faults on this server (its
        // drain included), and etcd faults (no quorum promised, and the
        // recorder may lag), each plus the margin and, for etcd, the
        // recorder's slack.
        let mut excuses: Vec<(Duration, Duration)> = vec![(Duration::ZERO, started)];
        for f in &h.faults {
            let end = f.end.unwrap_or(Duration::MAX);
            if f.kind.is_server() && f.target == addr {
                excuses.push((f.start, end.saturating_add(b.fault_margin)));
            } else if f.kind.is_etcd() {
                // After a restore a dead process's key may come back on its
                // lease (with weight 0 if it was draining) and hold the
                // address for a TTL before the live process takes over.
                let ttl = if f.kind.loses_data() {
                    b.lease_ttl
                } else {
                    Duration::ZERO
                };
                excuses.push((
                    f.start,
                    end.saturating_add(b.fault_margin + b.recorder_slack + ttl),
                ));
            }
        }
        for (from, to) in absences {
            for (a, z) in uncovered(from, to, &excuses) {
                if z - a > b.registration {
                    r.violations.push(Violation {
                        invariant: Invariant::LiveRegistered,
                        at: a,
                        client: None,
                        context: format!(
                            "{addr} missing from etcd {from:?}..{to:?}, of which {a:?}..{z:?} ({:?}) with no fault excusing it",
                            z - a
                        ),
                    });
                }
            }
        }
    }
}

/// etcd's states a view at `revision` seen at `at` may be compared with:
/// one per epoch the client may be in (from the recorder's epoch W before
/// `at`, the client having been slow to notice a loss of etcd's data, to
/// its epoch R after, the recorder having been slow to list the new data);
/// `None` when any of them is unknown there.
fn candidate_states(
    h: &History,
    b: &Bounds,
    at: Duration,
    revision: i64,
) -> Option<Vec<EndpointSet>> {
    let lo = h.epoch_at(at.saturating_sub(b.data_loss));
    let hi = h.epoch_at(at + b.recorder_slack);
    (lo..=hi)
        .map(|e| h.etcd_state_in_epoch(e, revision))
        .collect()
}

fn views_at_revision(h: &History, b: &Bounds, r: &mut Report) {
    let losses = data_losses(h);
    for (client, views) in views_by_client(h) {
        // A mismatch is an episode of consecutive views that differ from
        // etcd at their revisions; it may last only as long as the
        // quiescence bound (the view's revision is read beside the
        // balancer, so a view may be a moment ahead of its endpoints), or,
        // when it starts within W after a loss of etcd's data, W (the
        // client keeps keys the new data lacks for its wipe grace).
        let mut episode: Option<&ViewChange> = None;
        let report = |first: &ViewChange, until: Duration, r: &mut Report| {
            let after_loss = losses
                .iter()
                .any(|f| overlaps(f, first.at, first.at, b.data_loss));
            let allowed = if after_loss {
                b.data_loss
            } else {
                b.quiescence
            };
            if until.saturating_sub(first.at) > allowed {
                let want = candidate_states(h, b, first.at, first.revision).unwrap_or_default();
                r.violations.push(Violation {
                    invariant: Invariant::ViewAtRevision,
                    at: first.at,
                    client: Some(client),
                    context: format!(
                        "view {:?} at revision {} != etcd's state there {want:?}, for {:?} (until {until:?})",
                        first.endpoints,
                        first.revision,
                        until - first.at
                    ),
                });
            }
        };
        for v in views {
            // Revision 0: not synced yet; a revision in a recorder gap:
            // etcd's state there unknown. Neither judged.
            let mismatch = v.revision > 0
                && candidate_states(h, b, v.at, v.revision)
                    .is_some_and(|want| !want.contains(&v.endpoints));
            match (mismatch, episode) {
                (true, None) => episode = Some(v),
                (false, Some(first)) => {
                    report(first, v.at, r);
                    episode = None;
                }
                _ => {}
            }
        }
        if let Some(first) = episode {
            report(first, h.end, r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{
        Call, ControllerDeletion, EtcdEvent, EventKind, FaultKind, ServerEvent, ServerMark,
    };

    const A: &str = "127.0.0.1:1001";
    const B: &str = "127.0.0.1:1002";

    fn s(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn put(at: u64, revision: i64, addr: &str, w: u32) -> EtcdEvent {
        EtcdEvent {
            at: s(at),
            revision,
            addr: addr.into(),
            kind: EventKind::Put,
            weight: Some(w),
        }
    }

    fn del(at: u64, revision: i64, addr: &str) -> EtcdEvent {
        EtcdEvent {
            at: s(at),
            revision,
            addr: addr.into(),
            kind: EventKind::Delete,
            weight: None,
        }
    }

    fn view(at: u64, client: u32, revision: i64, eps: &[&str]) -> ViewChange {
        ViewChange {
            at: s(at),
            client,
            revision,
            endpoints: eps.iter().map(|a| (a.to_string(), 100)).collect(),
        }
    }

    fn call(client: u32, ep: Option<&str>, start: u64, end: u64, ok: bool, msg: &str) -> Call {
        Call {
            client,
            endpoint: ep.map(Into::into),
            start: s(start),
            end: s(end),
            ok,
            message: msg.into(),
        }
    }

    fn fault(kind: FaultKind, target: &str, start: u64, end: u64) -> FaultMark {
        FaultMark {
            kind,
            target: target.into(),
            start: s(start),
            end: Some(s(end)),
        }
    }

    /// Two servers, two clients that see them, calls to both, an etcd
    /// member killed for two seconds (nothing shrinks), a server killed and
    /// restarted (one failed call naming it, overlapping the fault), a
    /// drain of B: weight 0 at 10 s, delete at 11 s, re-put at 14 s; calls
    /// stop going to B while it is gone; quiet from 14 s to 40 s.
    fn clean() -> History {
        let mut h = History {
            seed: 1,
            end: s(40_000),
            ..Default::default()
        };
        h.etcd = vec![
            put(0, 2, A, 100),
            put(0, 3, B, 100),
            put(10_000, 4, B, 0),
            del(11_000, 5, B),
            put(14_000, 6, B, 100),
        ];
        for c in 0..2 {
            h.views.push(view(100, c, 3, &[A, B]));
            let mut drained = view(10_010, c, 4, &[A, B]);
            drained.endpoints.insert(B.into(), 0);
            h.views.push(drained);
            h.views.push(view(11_010, c, 5, &[A]));
            h.views.push(view(14_010, c, 6, &[A, B]));
        }
        for t in (200..40_000).step_by(100) {
            let ep = if (10_000..14_000).contains(&t) || t % 200 == 0 {
                A
            } else {
                B
            };
            h.calls
                .push(call(((t / 100) % 2) as u32, Some(ep), t, t + 5, true, ""));
        }
        h.calls.push(call(
            0,
            None,
            3_050,
            3_100,
            false,
            "status: Unavailable, message: \"127.0.0.1:1001: connection reset\"",
        ));
        h.faults = vec![
            fault(FaultKind::EtcdKill, "etcd-0", 1_000, 3_000),
            fault(FaultKind::ServerKill, A, 3_000, 3_500),
            fault(FaultKind::ServerDrain, B, 10_000, 14_000),
        ];
        h
    }

    #[test]
    fn a_clean_history_passes() {
        let r = check(&clean(), &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
        assert!(r.skipped.is_empty(), "{r:#?}");
    }

    #[test]
    fn a_view_going_back_in_revision_is_flagged() {
        let mut h = clean();
        // Client 1 sees revision 6, then an older view at revision 5 (as
        // etcd was then, so only the going back is wrong).
        h.views.push(view(20_000, 1, 5, &[A]));
        h.views.push(view(20_100, 1, 6, &[A, B]));
        let r = check(&h, &Bounds::default());
        let v = r.of(Invariant::MonotonicRevision);
        assert_eq!(v.len(), 1, "{r:#?}");
        assert_eq!((v[0].at, v[0].client), (s(20_000), Some(1)));
        assert_eq!(r.violations.len(), 1, "only that: {r:#?}");
    }

    #[test]
    fn a_view_that_never_converges_is_flagged() {
        let mut h = clean();
        // Client 0 never sees B come back.
        h.views.retain(|v| !(v.client == 0 && v.revision == 6));
        let r = check(&h, &Bounds::default());
        let v = r.of(Invariant::Convergence);
        assert_eq!(v.len(), 1, "{r:#?}");
        assert_eq!(v[0].client, Some(0));
        assert!(v[0].context.contains(B), "{}", v[0]);
        assert_eq!(r.violations.len(), 1, "only that: {r:#?}");
    }

    #[test]
    fn convergence_is_not_judged_without_quiescence() {
        let mut h = clean();
        h.end = s(17_000);
        let r = check(&h, &Bounds::default());
        assert!(r.of(Invariant::Convergence).is_empty());
        assert_eq!(r.skipped.len(), 1, "{r:#?}");
    }

    #[test]
    fn a_view_shrinking_during_an_etcd_outage_is_flagged() {
        let mut h = clean();
        // Client 1 empties its view while etcd-0 is down (the "empty the
        // set on an outage" mutation), and refills it when etcd is back.
        h.views.push(view(1_500, 1, 3, &[]));
        h.views.push(view(3_200, 1, 3, &[A, B]));
        let r = check(&h, &Bounds::default());
        let v = r.of(Invariant::StaticStability);
        assert_eq!(v.len(), 2, "A and B left: {r:#?}");
        assert!(v.iter().all(|v| v.at == s(1_500) && v.client == Some(1)));
        assert_eq!(r.violations.len(), 2, "only those: {r:#?}");
    }

    /// Found by seed 118 (at f18860a): a killed server's old lease expired
    /// (delete at revision 15) during an isolation of the member the
    /// recorder watched, so the recorder saw the delete 2.8 s after the
    /// clients did, past the time slack; the delete's revision shows the
    /// clients right. The history (views, etcd events, faults; calls
    /// dropped) is kept as it was recorded.
    #[test]
    fn seed_118_a_late_recorder_is_not_a_violation() {
        let h: History = serde_json::from_str(include_str!("../tests/data/seed118.json")).unwrap();
        let r = check(&h, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
        // Without the revision evidence it would be flagged: the same shrink
        // with the view's revision below the delete's is.
        let mut h = h;
        for v in h.views.iter_mut().filter(|v| v.revision == 15) {
            v.revision = 14;
        }
        let r = check(&h, &Bounds::default());
        assert_eq!(r.of(Invariant::StaticStability).len(), 2, "{r:#?}");
    }

    /// Found by seed 2005 (on branch h38-nemesis, the first version of
    /// the epochs): three restores of etcd's data at 13-15 s, 18-20 s and
    /// 21-23 s; client 0 kept 127.0.0.1:22188 in its view across all
    /// three (its revision never went back: each new history had passed
    /// its revision by the time it relisted), and dropped it at 27.69 s at
    /// revision 21, when its old lease expired after a SIGKILL; the
    /// recorder, on etcd-2 cut off from its peers at 27.2 s, saw that
    /// delete 2.06 s later, just past R. The delete's revision shows the
    /// client right, but revision evidence was taken only when the address
    /// had entered the view in the same epoch. The history (views, etcd
    /// events, faults, epochs; calls dropped) is kept as recorded.
    #[test]
    fn seed_2005_an_address_kept_across_restores_is_judged_in_the_new_epoch() {
        let h: History = serde_json::from_str(include_str!("../tests/data/seed2005.json")).unwrap();
        assert_eq!(h.epochs.len(), 3);
        let r = check(&h, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
        // The same shrink at a revision below the delete's is flagged.
        let mut h = h;
        for v in h
            .views
            .iter_mut()
            .filter(|v| v.client == 0 && v.revision == 21)
        {
            v.revision = 20;
        }
        let r = check(&h, &Bounds::default());
        assert_eq!(r.of(Invariant::StaticStability).len(), 1, "{r:#?}");
    }

    #[test]
    fn a_call_to_a_deleted_endpoint_3s_later_is_flagged() {
        let mut h = clean();
        // B was deleted at 11 s; with it never back, a call it answers
        // at 14 s is 3 s late.
        h.etcd.retain(|e| e.revision != 6);
        h.views.retain(|v| v.revision != 6);
        h.calls
            .retain(|c| !(c.endpoint.as_deref() == Some(B) && c.start > s(10_000)));
        h.calls.push(call(1, Some(B), 14_000, 14_005, true, ""));
        let r = check(&h, &Bounds::default());
        let v = r.of(Invariant::NoStaleCall);
        assert_eq!(v.len(), 1, "{r:#?}");
        assert_eq!((v[0].at, v[0].client), (s(14_000), Some(1)));
        assert!(v[0].context.contains("delete at revision 5"), "{}", v[0]);
        assert_eq!(r.violations.len(), 1, "only that: {r:#?}");
    }

    /// Found by seed 229 (at 012648a): a killed server's old lease expired
    /// (delete) and its restarted process registered again one revision
    /// later; the recorder got both in one watch response, so both carry
    /// the same time, and "came back" must be judged by revision, not by
    /// a later time.
    #[test]
    fn seed_229_a_re_put_in_the_same_response_as_the_delete_is_a_return() {
        let mut h = clean();
        h.etcd.push(del(20_000, 7, A));
        h.etcd.push(put(20_000, 8, A, 100));
        for c in 0..2 {
            h.views.push(view(20_005, c, 7, &[B]));
            h.views.push(view(20_006, c, 8, &[A, B]));
        }
        h.calls.retain(|c| c.start < s(20_000));
        h.calls.push(call(0, Some(A), 22_000, 22_005, true, ""));
        let r = check(&h, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
    }

    #[test]
    fn a_call_to_a_drained_endpoint_is_flagged() {
        let mut h = clean();
        // B drained (weight 0) at 10 s; calls it answers up to 11 s are
        // within the bound, one at 11.5 s is not.
        h.calls.push(call(0, Some(B), 10_900, 10_905, true, ""));
        h.calls.push(call(0, Some(B), 10_999, 11_005, true, ""));
        let r = check(&h, &Bounds::default());
        assert!(r.violations.is_empty(), "{r:#?}");
        h.calls.push(call(1, Some(B), 11_500, 11_505, true, ""));
        let r = check(&h, &Bounds::default());
        let v = r.of(Invariant::NoStaleCall);
        assert_eq!(v.len(), 1, "{r:#?}");
        assert!(
            v[0].context.contains("weight-0 put at revision 4"),
            "{}",
            v[0]
        );
    }

    #[test]
    fn a_failed_call_with_healthy_servers_is_flagged() {
        let mut h = clean();
        // No server fault near 20 s; both servers registered.
        h.calls
            .push(call(1, None, 20_000, 20_010, false, "no endpoint"));
        // A failure naming A during the kill of A is allowed, but one
        // naming B during the kill of A is not.
        h.calls
            .push(call(0, None, 3_100, 3_200, false, "127.0.0.1:1001 reset"));
        h.calls
            .push(call(0, None, 3_300, 3_400, false, "127.0.0.1:1002 reset"));
        let r = check(&h, &Bounds::default());
        let v = r.of(Invariant::NoFailedCall);
        assert_eq!(v.len(), 2, "{r:#?}");
        assert_eq!((v[0].at, v[0].client), (s(20_000), Some(1)));
        assert_eq!((v[1].at, v[1].client), (s(3_300), Some(0)));
        assert!(v[0].context.contains(A) && v[0].context.contains(B));
        assert_eq!(r.violations.len(), 2, "only those: {r:#?}");
    }

    #[test]
    fn a_failed_call_with_no_healthy_server_is_allowed() {
        let mut h = clean();
        h.etcd.push(del(30_000, 7, A));
        h.etcd.push(del(30_000, 8, B));
        h.calls.retain(|c| c.start < s(30_000));
        for c in 0..2 {
            h.views.push(view(30_010, c, 8, &[]));
        }
        h.calls
            .push(call(0, None, 31_000, 31_001, false, "no endpoint"));
        let r = check(&h, &Bounds::default());
        assert!(r.violations.is_empty(), "{r:#?}");
    }

    fn deletion(at: u64, addr: &str, mod_revision: i64) -> ControllerDeletion {
        ControllerDeletion {
            at: s(at),
            controller: "controller-0".into(),
            addr: addr.into(),
            mod_revision,
            reason: "unreachable".into(),
        }
    }

    fn started(at: u64, addr: &str) -> ServerMark {
        ServerMark {
            at: s(at),
            server: addr.into(),
            event: ServerEvent::Started,
        }
    }

    /// The mutation (f) exists for: a controller deleting a key whose
    /// server answers (deleting without the probe evidence, or a deposed
    /// leader's stale plan applied without the fence).
    #[test]
    fn a_deletion_of_a_live_server_is_flagged() {
        let mut h = clean();
        // A killed 3.0-3.5 s: deleting it at 3.2 s, and up to the margin
        // after its restart, is the controller's job.
        h.deletions.push(deletion(3_200, A, 2));
        h.deletions.push(deletion(4_400, A, 2));
        let r = check(&h, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
        // A deleted at 20 s, no fault anywhere near: flagged. So is one at
        // 6 s, 2.5 s after A's kill healed (past the lag and the margin).
        h.deletions.push(deletion(20_000, A, 2));
        h.deletions.push(deletion(6_000, A, 2));
        // B deleted during A's kill: the fault is on another server.
        h.deletions.push(deletion(3_300, B, 3));
        let r = check(&h, &Bounds::default());
        let mut v = r.of(Invariant::NoLiveDeletion);
        v.sort_by_key(|v| v.at);
        let at: Vec<_> = v.iter().map(|v| v.at).collect();
        assert_eq!(at, vec![s(3_300), s(6_000), s(20_000)], "{r:#?}");
        assert!(v[0].context.contains(B), "{}", v[0]);
        assert_eq!(r.violations.len(), 3, "only those: {r:#?}");
    }

    /// The mutation (g) exists for: a server that does not register again
    /// after its key was deleted (a registrar that stops watching its key,
    /// or gives up), while etcd is healthy.
    #[test]
    fn a_live_server_missing_from_etcd_is_flagged() {
        let mut h = clean();
        h.servers = vec![started(0, A), started(0, B)];
        // B's drain (10-14 s) excuses its absence 11-14 s.
        let r = check(&h, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
        // A deleted at 20 s and back only at 25 s, no fault: 5 s missing.
        let mut bad = h.clone();
        bad.etcd.push(del(20_000, 7, A));
        bad.etcd.push(put(25_000, 8, A, 100));
        for c in 0..2 {
            bad.views.push(view(20_005, c, 7, &[B]));
            bad.views.push(view(25_005, c, 8, &[A, B]));
        }
        bad.calls
            .retain(|c| !(c.endpoint.as_deref() == Some(A) && c.start > s(20_000)));
        let r = check(&bad, &Bounds::default());
        let v = r.of(Invariant::LiveRegistered);
        assert_eq!(v.len(), 1, "{r:#?}");
        assert_eq!(v[0].at, s(20_000));
        assert!(v[0].context.contains(A), "{}", v[0]);
        assert_eq!(r.violations.len(), 1, "only that: {r:#?}");
        // Back within the bound: fine.
        let mut quick = bad.clone();
        quick.etcd.last_mut().unwrap().at = s(21_500);
        for v in quick.views.iter_mut().filter(|v| v.revision == 8) {
            v.at = s(21_505);
        }
        let r = check(&quick, &Bounds::default());
        assert_eq!(r.of(Invariant::LiveRegistered), Vec::<&Violation>::new());
        // An etcd member killed 19-22 s: etcd may have had no quorum and
        // the recorder may lag; 22 s + margin + slack = 25 s excuses it.
        let mut outage = bad.clone();
        outage
            .faults
            .push(fault(FaultKind::EtcdKill, "etcd-1", 19_000, 22_000));
        let r = check(&outage, &Bounds::default());
        assert_eq!(r.of(Invariant::LiveRegistered), Vec::<&Violation>::new());
        // A controller fault excuses nothing.
        let mut ctl = bad;
        ctl.faults.push(fault(
            FaultKind::ControllerPause,
            "controller-0",
            19_000,
            22_000,
        ));
        let r = check(&ctl, &Bounds::default());
        assert_eq!(r.of(Invariant::LiveRegistered).len(), 1, "{r:#?}");
    }

    /// The mutation (h) exists for: a watch event dropped (or a watch
    /// resumed from a revision past undelivered events). Client 1 misses
    /// A's delete at revision 7; when C registers at revision 8 its view
    /// says revision 8 but still holds A. A relist 7 s later repairs it, so
    /// convergence (b) alone would pass.
    #[test]
    fn a_dropped_watch_event_is_flagged() {
        const C: &str = "127.0.0.1:1003";
        let mut h = clean();
        h.etcd.push(del(20_000, 7, A));
        h.etcd.push(put(25_000, 8, C, 100));
        h.views.push(view(20_005, 0, 7, &[B]));
        h.views.push(view(25_005, 0, 8, &[B, C]));
        h.views.push(view(25_005, 1, 8, &[A, B, C]));
        h.views.push(view(32_000, 1, 8, &[B, C]));
        h.calls.retain(|c| c.start < s(20_000));
        let r = check(&h, &Bounds::default());
        let v = r.of(Invariant::ViewAtRevision);
        assert_eq!(v.len(), 1, "{r:#?}");
        assert_eq!((v[0].at, v[0].client), (s(25_005), Some(1)));
        assert!(v[0].context.contains("revision 8"), "{}", v[0]);
        assert!(r.of(Invariant::Convergence).is_empty(), "{r:#?}");
        // Repaired within the bound (a view a moment ahead of its
        // endpoints): not a violation.
        let mut quick = h.clone();
        quick.views.last_mut().unwrap().at = s(25_300);
        let r = check(&quick, &Bounds::default());
        assert!(r.of(Invariant::ViewAtRevision).is_empty(), "{r:#?}");
        // Never repaired: flagged until the end, and (b) fails too.
        let mut never = h.clone();
        never.views.pop();
        let r = check(&never, &Bounds::default());
        assert_eq!(r.of(Invariant::ViewAtRevision).len(), 1, "{r:#?}");
        assert_eq!(r.of(Invariant::Convergence).len(), 1, "{r:#?}");
        // Where the recorder does not know etcd's state (a gap before a
        // relist), nothing is judged.
        let mut gap = h;
        gap.gaps.push((7, 8));
        let r = check(&gap, &Bounds::default());
        assert!(r.of(Invariant::ViewAtRevision).is_empty(), "{r:#?}");
    }

    const C: &str = "127.0.0.1:1003";

    /// `clean()` plus a restore of etcd's data at 20-21 s from a snapshot
    /// taken at revision 3 (A and B at weight 100). Before it, C registered
    /// at revision 7 (16 s), which the restore loses. The recorder lists the
    /// new data at 21.2 s (revision 3: A, B; C gone): epoch 1. In the new
    /// history A's weight goes to 50 at revision 4, a revision that in the
    /// old history was B's weight-0 put. Both clients notice the loss at
    /// 21.5 s (their revision goes back from 7 to 3, C kept for the wipe
    /// grace) and follow; they drop C at 31.5 s. Calls to C go on until
    /// 31 s.
    fn restored() -> History {
        let mut h = clean();
        h.end = s(60_000);
        h.servers = vec![started(0, A), started(0, B)];
        h.etcd.push(put(16_000, 7, C, 100));
        h.faults
            .push(fault(FaultKind::EtcdRestore, "etcd", 20_000, 21_000));
        h.epochs.push(crate::history::Epoch {
            at: s(21_200),
            first_event: h.etcd.len(),
            revision: 3,
        });
        h.etcd.push(del(21_200, 3, C));
        h.etcd.push(put(21_200, 2, A, 100));
        h.etcd.push(put(21_200, 3, B, 100));
        h.etcd.push(put(23_000, 4, A, 50));
        for c in 0..2 {
            h.views.push(view(16_010, c, 7, &[A, B, C]));
            h.views.push(view(21_500, c, 3, &[A, B, C]));
            let mut a50 = view(23_010, c, 4, &[A, B, C]);
            a50.endpoints.insert(A.into(), 50);
            h.views.push(a50.clone());
            a50.at = s(31_500);
            a50.endpoints.remove(C);
            h.views.push(a50);
        }
        h.calls.retain(|c| c.start < s(16_000));
        for t in (16_100..31_000).step_by(100) {
            h.calls.push(call(0, Some(C), t, t + 5, true, ""));
        }
        for t in (16_050..60_000).step_by(100) {
            h.calls.push(call(1, Some(A), t, t + 5, true, ""));
        }
        h
    }

    /// A loss of etcd's data read in epochs: the history above passes, and
    /// it passes only because the checker reads revisions per epoch and
    /// the fault's window grants the allowances of docs/robustness.md.
    #[test]
    fn a_restore_of_etcd_data_is_read_in_epochs() {
        let h = restored();
        let r = check(&h, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
        assert!(r.skipped.is_empty(), "{r:#?}");
        // Read as one history, revision 4 is B's drain: both clients' views
        // at revision 4 and later would not match (h).
        assert_eq!(
            h.etcd_state_at_revision(4).unwrap().get(B),
            Some(&0),
            "the old history's revision 4"
        );
        assert_eq!(
            h.etcd_state_in_epoch(1, 4).unwrap().get(A),
            Some(&50),
            "the new history's revision 4"
        );
        assert_eq!(h.etcd_state_in_epoch(1, 2), None, "below the new list");
        // Without the fault's window there is no allowance: each client's
        // revision going back is (a), the calls to C after it left etcd at
        // the restore are (d), and the views keeping C are (h) (judged
        // against the new epoch without the grace).
        let mut unmarked = h.clone();
        unmarked.faults.retain(|f| !f.kind.loses_data());
        let r = check(&unmarked, &Bounds::default());
        assert_eq!(r.of(Invariant::MonotonicRevision).len(), 2, "{r:#?}");
        assert!(!r.of(Invariant::NoStaleCall).is_empty(), "{r:#?}");
        assert_eq!(r.of(Invariant::ViewAtRevision).len(), 2, "{r:#?}");
    }

    /// (a) after a loss of data: one going back per client per loss,
    /// within W of its heal.
    #[test]
    fn a_second_going_back_after_a_restore_is_flagged() {
        let mut h = restored();
        // Client 0 goes back again at 24 s (to revision 3 of the new
        // history, as it was then): a second going back for one loss.
        h.views.push(view(24_000, 0, 3, &[A, B, C]));
        h.views.push(view(24_100, 0, 4, &[A, B, C]));
        for v in h
            .views
            .iter_mut()
            .filter(|v| v.client == 0 && v.revision == 4)
        {
            v.endpoints.insert(A.into(), 50);
        }
        let r = check(&h, &Bounds::default());
        let v = r.of(Invariant::MonotonicRevision);
        assert_eq!(v.len(), 1, "{r:#?}");
        assert_eq!((v[0].at, v[0].client), (s(24_000), Some(0)));
        assert_eq!(r.violations.len(), 1, "only that: {r:#?}");
        // Going back 14 s after the heal: past W.
        let mut late = restored();
        for v in late.views.iter_mut().filter(|v| v.client == 1) {
            if v.revision == 3 {
                v.at = s(35_000);
            }
        }
        late.views.sort_by_key(|v| v.at);
        let r = check(&late, &Bounds::default());
        assert_eq!(r.of(Invariant::MonotonicRevision).len(), 1, "{r:#?}");
    }

    /// (h) and (b) after a loss of data: a client that noticed the loss
    /// but then missed an event of the new history is flagged past W.
    #[test]
    fn a_dropped_event_after_a_restore_is_flagged() {
        let mut h = restored();
        // Client 1 misses A's weight change at revision 4 of the new
        // history and holds A at 100 at revision 4 to the end.
        for v in h
            .views
            .iter_mut()
            .filter(|v| v.client == 1 && v.revision == 4)
        {
            v.endpoints.insert(A.into(), 100);
        }
        let r = check(&h, &Bounds::default());
        let v = r.of(Invariant::ViewAtRevision);
        assert_eq!(v.len(), 1, "{r:#?}");
        // The episode began when the view still held C (the wipe grace).
        assert_eq!((v[0].at, v[0].client), (s(21_500), Some(1)));
        assert_eq!(r.of(Invariant::Convergence).len(), 1, "{r:#?}");
        // Repaired 12.5 s after the episode began (within W, as the wipe
        // grace allows): passes.
        let mut repaired = h.clone();
        repaired.views.push({
            let mut v = view(34_000, 1, 4, &[A, B]);
            v.endpoints.insert(A.into(), 50);
            v
        });
        repaired.views.sort_by_key(|v| v.at);
        let r = check(&repaired, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
    }

    /// (d) after a loss of data: calls to a key the new data lacks are
    /// allowed for W after the heal (the wipe grace), not after.
    #[test]
    fn a_call_long_after_a_restore_lost_its_key_is_flagged() {
        let mut h = restored();
        h.calls.push(call(0, Some(C), 33_000, 33_005, true, ""));
        let r = check(&h, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
        h.calls.push(call(0, Some(C), 36_000, 36_005, true, ""));
        let r = check(&h, &Bounds::default());
        let v = r.of(Invariant::NoStaleCall);
        assert_eq!(v.len(), 1, "{r:#?}");
        assert_eq!(v[0].at, s(36_000));
        assert_eq!(r.violations.len(), 1, "only that: {r:#?}");
    }

    /// (g) after a restore: a server may be missing for M + R + TTL after
    /// the heal (a dead process's key come back on its lease holds the
    /// address until that lease expires), then G.
    #[test]
    fn a_server_missing_long_after_a_restore_is_flagged() {
        let h = restored();
        // A's resurrected key expires at 26 s; A registers again at 28.5 s:
        // 21 s + 1 + 2 + 4 = 28 s, then 0.5 s. Fine.
        let ok = |back: u64| {
            let mut h = h.clone();
            h.etcd.push(del(26_000, 5, A));
            h.etcd.push(put(back, 6, A, 50));
            for c in 0..2 {
                let mut v = view(26_010, c, 5, &[B]);
                v.revision = 5;
                h.views.push(v);
                let mut v = view(back + 10, c, 6, &[A, B]);
                v.endpoints.insert(A.into(), 50);
                h.views.push(v);
            }
            h.views.sort_by_key(|v| v.at);
            h.calls
                .retain(|c| !(c.endpoint.as_deref() == Some(A) && c.start > s(26_000)));
            h
        };
        let r = check(&ok(28_500), &Bounds::default());
        assert_eq!(
            r.of(Invariant::LiveRegistered),
            Vec::<&Violation>::new(),
            "{r:#?}"
        );
        // Back only at 31 s: 3 s past the excuse.
        let r = check(&ok(31_000), &Bounds::default());
        let v = r.of(Invariant::LiveRegistered);
        assert_eq!(v.len(), 1, "{r:#?}");
        assert_eq!(v[0].at, s(28_000));
    }

    /// (f): a decision made before an etcd outage, or before the deleting
    /// controller was paused, may be committed after it (fenced on the
    /// revision it saw): a fault of the server before the outage explains
    /// the deletion. A pause of another replica does not.
    #[test]
    fn a_deletion_decided_before_an_outage_is_judged_from_then() {
        let mut h = clean();
        // A killed 3.0-3.5 s (clean); deleted at 9.5 s: flagged alone.
        h.deletions.push(deletion(9_500, A, 2));
        let r = check(&h, &Bounds::default());
        assert_eq!(r.of(Invariant::NoLiveDeletion).len(), 1, "{r:#?}");
        // etcd-1 isolated 4-9 s: the decision may date from 3 s.
        let mut outage = h.clone();
        outage
            .faults
            .push(fault(FaultKind::EtcdIsolate, "etcd-1", 4_000, 9_000));
        let r = check(&outage, &Bounds::default());
        assert_eq!(
            r.of(Invariant::NoLiveDeletion),
            Vec::<&Violation>::new(),
            "{r:#?}"
        );
        // The deleting replica paused 4-9 s: the same.
        let mut paused = h.clone();
        paused.faults.push(fault(
            FaultKind::ControllerPause,
            "controller-0",
            4_000,
            9_000,
        ));
        let r = check(&paused, &Bounds::default());
        assert_eq!(
            r.of(Invariant::NoLiveDeletion),
            Vec::<&Violation>::new(),
            "{r:#?}"
        );
        // Another replica paused: no excuse.
        let mut other = h;
        other.faults.push(fault(
            FaultKind::ControllerPause,
            "controller-1",
            4_000,
            9_000,
        ));
        let r = check(&other, &Bounds::default());
        assert_eq!(r.of(Invariant::NoLiveDeletion).len(), 1, "{r:#?}");
    }

    fn explicit(at: u64, revision: i64, addr: &str) -> crate::history::ExplicitDelete {
        crate::history::ExplicitDelete {
            at: s(at),
            epoch: 0,
            revision,
            addr: addr.into(),
            lease: 0x7f,
        }
    }

    /// A deletion whose log line was lost (its leader SIGKILLed between
    /// the transaction and the line): the recorder saw a delete request
    /// (the key's lease outlived it) that no logged deletion names, and it
    /// is judged as (f) judges logged ones.
    #[test]
    fn an_unlogged_deletion_of_a_live_server_is_flagged() {
        let mut h = clean();
        // A's key deleted at 20 s by a request, logged: judged once, as
        // the logged deletion (not twice).
        h.explicit_deletes.push(explicit(20_005, 7, A));
        h.deletions.push(deletion(20_000, A, 2));
        let r = check(&h, &Bounds::default());
        assert_eq!(r.of(Invariant::NoLiveDeletion).len(), 1, "{r:#?}");
        // The same without its log line, a controller killed just after:
        // still flagged, from the recorder, naming the kill.
        h.deletions.clear();
        h.faults.push(fault(
            FaultKind::ControllerKill,
            "controller-0",
            20_010,
            21_000,
        ));
        let r = check(&h, &Bounds::default());
        let v = r.of(Invariant::NoLiveDeletion);
        assert_eq!(v.len(), 1, "{r:#?}");
        assert_eq!(v[0].at, s(20_005));
        assert!(v[0].context.contains("no controller logged"), "{}", v[0]);
        assert!(v[0].context.contains("controller-0"), "{}", v[0]);
        assert_eq!(r.violations.len(), 1, "only that: {r:#?}");
        // An unlogged delete request of A during A's kill: the
        // controller's job.
        let mut dead = clean();
        dead.explicit_deletes.push(explicit(3_300, 4, A));
        let r = check(&dead, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
        // The harness's own hand delete of A (a KeyDelete fault, fixed
        // plans only) is nobody's deletion to judge; a hand delete of B
        // excuses nothing for A.
        let mut by_hand = clean();
        by_hand.explicit_deletes.push(explicit(20_005, 7, A));
        by_hand
            .faults
            .push(fault(FaultKind::KeyDelete, A, 20_000, 20_004));
        let r = check(&by_hand, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
        by_hand.faults.last_mut().expect("pushed").target = B.into();
        let r = check(&by_hand, &Bounds::default());
        assert_eq!(r.of(Invariant::NoLiveDeletion).len(), 1, "{r:#?}");
    }

    /// (d) for an xDS client (client 2, served by controller-1): it
    /// learns of a removal through its controller replica, so a pause of
    /// that replica (plus the reconnect bound) excuses its calls to a
    /// removed endpoint; a pause of the other replica does not, and
    /// neither excuses the library's clients.
    #[test]
    fn an_xds_client_is_excused_only_by_its_own_controller() {
        let mut h = clean();
        h.xds_clients.insert(2, "controller-1".into());
        // B deleted at 11 s (clean); never back in this history.
        h.etcd.retain(|e| e.revision != 6);
        h.views.retain(|v| v.revision != 6);
        h.calls
            .retain(|c| !(c.endpoint.as_deref() == Some(B) && c.start > s(10_000)));
        h.calls.push(call(2, Some(B), 14_000, 14_005, true, ""));
        let r = check(&h, &Bounds::default());
        assert_eq!(r.of(Invariant::NoStaleCall).len(), 1, "{r:#?}");
        // Its replica paused 10.5-12 s: 14 s is within 5 s of the heal.
        let mut paused = h.clone();
        paused.faults.push(fault(
            FaultKind::ControllerPause,
            "controller-1",
            10_500,
            12_000,
        ));
        let r = check(&paused, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
        // The other replica paused: flagged.
        let mut other = h.clone();
        other.faults.push(fault(
            FaultKind::ControllerPause,
            "controller-0",
            10_500,
            12_000,
        ));
        let r = check(&other, &Bounds::default());
        assert_eq!(r.of(Invariant::NoStaleCall).len(), 1, "{r:#?}");
        // A library client's call then: flagged even with the pause.
        paused
            .calls
            .push(call(1, Some(B), 14_100, 14_105, true, ""));
        let r = check(&paused, &Bounds::default());
        let v = r.of(Invariant::NoStaleCall);
        assert_eq!(v.len(), 1, "{r:#?}");
        assert_eq!(v[0].client, Some(1));
    }

    /// (e) for an xDS client: etcd empty 30 ms before its failed call is
    /// allowed (its assignment trails etcd by up to 0.5 s); for a library
    /// client it is not, and neither is an emptiness 0.6 s before.
    #[test]
    fn an_xds_client_may_fail_just_after_etcd_was_empty() {
        let mut h = clean();
        h.xds_clients.insert(2, "controller-1".into());
        h.etcd.push(del(30_000, 7, A));
        h.etcd.push(del(30_000, 8, B));
        h.etcd.push(put(30_030, 9, A, 100));
        h.etcd.push(put(30_040, 10, B, 100));
        for c in 0..2 {
            h.views.push(view(30_005, c, 8, &[]));
            h.views.push(view(30_045, c, 10, &[A, B]));
        }
        h.calls.retain(|c| c.start < s(30_000));
        h.calls
            .push(call(2, None, 30_060, 30_061, false, "UNAVAILABLE: empty"));
        let r = check(&h, &Bounds::default());
        assert_eq!(r.violations, vec![], "{r:#?}");
        let mut library = h.clone();
        library.calls.last_mut().unwrap().client = 1;
        let r = check(&library, &Bounds::default());
        assert_eq!(r.of(Invariant::NoFailedCall).len(), 1, "{r:#?}");
        let mut later = h;
        let c = later.calls.last_mut().unwrap();
        (c.start, c.end) = (s(30_700), s(30_701));
        let r = check(&later, &Bounds::default());
        assert_eq!(r.of(Invariant::NoFailedCall).len(), 1, "{r:#?}");
    }

    #[test]
    fn uncovered_cuts_windows_out() {
        let w = |a: u64, z: u64| (s(a), s(z));
        assert_eq!(uncovered(s(0), s(10), &[]), vec![w(0, 10)]);
        assert_eq!(
            uncovered(s(0), s(10), &[w(2, 3), w(5, 12)]),
            vec![w(0, 2), w(3, 5)]
        );
        assert_eq!(uncovered(s(0), s(10), &[w(0, 10)]), vec![]);
    }

    #[test]
    fn history_round_trips_through_json() {
        let h = clean();
        let text = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<History>(&text).unwrap(), h);
    }
}

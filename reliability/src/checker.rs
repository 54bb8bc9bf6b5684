//! Reads a [`History`] and reports every violation of the invariants in
//! `docs/robustness.md`, with its time and context.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::history::{EventKind, FaultMark, History, ViewChange};

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
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            quiescence: Duration::from_secs(5),
            stale_call: Duration::from_secs(1),
            recorder_slack: Duration::from_secs(2),
            fault_margin: Duration::from_secs(1),
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
    monotonic(h, &mut r);
    convergence(h, b, &mut r);
    static_stability(h, b, &mut r);
    stale_calls(h, b, &mut r);
    failed_calls(h, b, &mut r);
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

fn monotonic(h: &History, r: &mut Report) {
    for (client, views) in views_by_client(h) {
        for w in views.windows(2) {
            if w[1].revision < w[0].revision {
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
    let settled = heal.max(last_event);
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
                    let deleted = h.etcd.iter().any(|e| {
                        &e.addr == a
                            && e.kind == EventKind::Delete
                            && ((e.revision > since_rev && e.revision <= v.revision)
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
    for c in h.calls.iter().filter(|c| c.ok) {
        let Some(ep) = &c.endpoint else { continue };
        let events: Vec<_> = h.etcd.iter().filter(|e| &e.addr == ep).collect();
        // The last time the endpoint left etcd (delete or weight 0) more than
        // the bound before the call started.
        let Some(gone) = events
            .iter()
            .filter(|e| {
                (e.kind == EventKind::Delete || e.weight.is_none_or(|w| w == 0))
                    && e.at + b.stale_call < c.start
            })
            .max_by_key(|e| e.at)
        else {
            continue;
        };
        let back = events.iter().any(|e| {
            e.kind == EventKind::Put
                && e.weight.is_some_and(|w| w > 0)
                && e.revision > gone.revision
                && e.at <= c.start + b.recorder_slack
        });
        let etcd_faulted = h
            .faults
            .iter()
            .any(|f| f.kind.is_etcd() && overlaps(f, gone.at, c.start, b.fault_margin));
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
        let at_start = h.etcd_state_at(c.start);
        let healthy: Vec<&String> = at_start
            .iter()
            .filter(|(a, w)| **w > 0 && !server_faults.iter().any(|f| &f.target == *a))
            .map(|(a, _)| a)
            .collect();
        if healthy.is_empty() {
            continue;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Call, EtcdEvent, EventKind, FaultKind};

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
        // Client 1 sees revision 6, then an older view at revision 5.
        h.views.push(view(20_000, 1, 5, &[A, B]));
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

    #[test]
    fn history_round_trips_through_json() {
        let h = clean();
        let text = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<History>(&text).unwrap(), h);
    }
}

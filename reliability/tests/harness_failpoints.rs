//! The harness against the real code broken on purpose, and faults injected
//! inside it, through failpoints (tikv's `fail`; docs/robustness.md,
//! "Failpoints"). `cargo test` builds the registry, greet-server and the
//! controller with their `failpoints` feature (this crate's
//! dev-dependencies ask for it); a spawned binary built without it makes
//! the run fail rather than pass.
//!
//! Broken builds: each run must be flagged by the invariant its defect
//! breaks, or the checker cannot see that defect in the real code. In-code
//! faults: the correct code must keep every invariant through them, and
//! each run shows that its failpoint fired.
//!
//! Failpoints set in this process (the clients') are global to it: the
//! world runs such a run alone (`reliability::failpoints`).

use std::time::Duration;

use anyhow::Result;
use reliability::checker::{check, Bounds, Invariant, Report};
use reliability::failpoints::{Failpoints, CONTROLLER_DELETE_DELAY, CONTROLLER_DELETE_UNFENCED};
use reliability::history::{FaultKind, History};
use reliability::nemesis::Step;
use reliability::world::{run, WorldConfig};

/// Runs a world with `failpoints` and a fixed `plan`; prints what the
/// checker found.
async fn world(failpoints: Failpoints, plan: Vec<Step>) -> Result<(History, Report)> {
    world_with(failpoints, plan, |_| {}).await
}

/// [`world`], with the configuration changed by `tweak` first.
async fn world_with(
    failpoints: Failpoints,
    plan: Vec<Step>,
    tweak: impl FnOnce(&mut WorldConfig),
) -> Result<(History, Report)> {
    let mut cfg = WorldConfig::new(0, Duration::ZERO);
    cfg.quiet = Duration::from_secs(6);
    cfg.plan = Some(plan);
    cfg.failpoints = failpoints;
    tweak(&mut cfg);
    let h = run(&cfg).await?;
    let r = check(&h, &Bounds::default());
    eprintln!(
        "failpoints fired {:?}; faults {:?}; calls {} ({} failed); deletions {}; violations {}",
        h.failpoint_hits,
        h.faults_by_kind(),
        h.calls.len(),
        h.calls.iter().filter(|c| !c.ok).count(),
        h.deletions.len(),
        r.violations.len()
    );
    for v in &r.violations {
        eprintln!("{v}");
    }
    Ok((h, r))
}

fn fired(h: &History, name: &str) -> u64 {
    h.failpoint_hits.get(name).copied().unwrap_or(0)
}

/// A broken build under `plan`: its failpoint `name` fired at least `min`
/// times and `invariant` flags what it broke.
async fn caught(
    failpoints: Failpoints,
    plan: Vec<Step>,
    name: &str,
    min: u64,
    invariant: Invariant,
) -> Result<()> {
    let (h, r) = world(failpoints, plan).await?;
    assert!(fired(&h, name) >= min, "{name}: {:?}", h.failpoint_hits);
    assert!(
        !r.of(invariant).is_empty(),
        "{invariant:?} flags {name}: {r:#?}"
    );
    Ok(())
}

/// The correct code under an in-code fault: `name` fired and every
/// invariant held, none skipped.
fn kept(h: &History, r: &Report, name: &str) {
    assert!(fired(h, name) >= 1, "{name}: {:?}", h.failpoint_hits);
    assert!(r.violations.is_empty(), "{r:#?}");
    assert!(r.skipped.is_empty(), "{:?}", r.skipped);
}

fn clients(list: &str) -> Failpoints {
    Failpoints {
        clients: list.into(),
        ..Default::default()
    }
}

#[test]
fn the_harness_names_the_controllers_failpoints_as_the_controller_does() {
    assert_eq!(
        CONTROLLER_DELETE_UNFENCED,
        controller::reconcile::FAILPOINT_DELETE_UNFENCED
    );
    assert_eq!(
        CONTROLLER_DELETE_DELAY,
        controller::reconcile::FAILPOINT_DELETE_DELAY
    );
    // Built with failpoints (a name no code evaluates: harmless).
    let probe = "harness-failpoints-probe";
    etcd_lb_registry::failpoints::set(probe, "return").expect("failpoints compiled in");
    etcd_lb_registry::failpoints::remove(probe);
}

// ---- Broken builds: the checker must flag each one. ----

/// The library's reflector drops the first delete event it is sent
/// (`watch-drop-delete=1*return`, so one client of the two); server 0 is
/// killed for 12 s, its key goes (the controller deletes it or its lease
/// expires) and that client holds the dead server at revisions where etcd
/// no longer has it, until the restarted server registers: (h).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflector_that_drops_a_delete_event_is_caught() -> Result<()> {
    let (h, r) = world(
        clients("watch-drop-delete=1*return"),
        vec![Step::new(FaultKind::ServerKill, 0, 12_000, 1_000)],
    )
    .await?;
    assert_eq!(fired(&h, "watch-drop-delete"), 1, "{:?}", h.failpoint_hits);
    assert!(
        !r.of(Invariant::ViewAtRevision).is_empty(),
        "the dropped delete is flagged: {r:#?}"
    );
    Ok(())
}

/// The library's reflector resumes every watch one revision too far (the
/// last revision + 2 after a list or a progress notice;
/// `watch-resume-skip=return`). Its first watch already starts past the
/// next revision, which is server 0's deletion after its kill: both
/// clients hold the dead server at revisions where etcd no longer has it,
/// until the restarted server registers: (h).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_resumed_from_the_wrong_revision_is_caught() -> Result<()> {
    caught(
        clients("watch-resume-skip=return"),
        vec![Step::new(FaultKind::ServerKill, 0, 12_000, 1_000)],
        "watch-resume-skip",
        2,
        Invariant::ViewAtRevision,
    )
    .await
}

/// The library's reflector reports every key removed when its watch fails
/// (`watch-empty-on-outage=return`); each etcd member is killed in turn
/// for 2 s, so each client's member is among them: (c) flags every
/// address its view lost while etcd still held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reflector_that_empties_the_view_on_an_outage_is_caught() -> Result<()> {
    caught(
        clients("watch-empty-on-outage=return"),
        (0..3)
            .map(|m| Step::new(FaultKind::EtcdKill, m, 2_000, 1_000))
            .collect(),
        "watch-empty-on-outage",
        1,
        Invariant::StaticStability,
    )
    .await
}

/// greet-server does not register again when its key vanishes
/// (`registrar-no-reregister=return` in every server); server 0's key is
/// deleted by hand while it runs: (g) flags server 0 missing from etcd.
/// (`in_code_faults_slow_etcd_answers_keep_every_invariant` deletes a key
/// the same way with the correct server, which registers again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_does_not_register_again_is_caught() -> Result<()> {
    caught(
        Failpoints {
            servers: "registrar-no-reregister=return".into(),
            ..Default::default()
        },
        vec![Step::new(FaultKind::KeyDelete, 0, 0, 4_000)],
        "registrar-no-reregister",
        1,
        Invariant::LiveRegistered,
    )
    .await
}

/// The leading controller's deletions are held 5 s between plan and
/// transaction (`controller-delete-delay=return(5000)`) and sent without
/// the mod-revision compare (`controller-delete-unfenced=return`). Server 0
/// is killed for 3 s: the leader plans its deletion about 1.3 s in, the
/// restarted server registers again once its old lease expires (within
/// 4 s of the kill), and the unfenced deletion lands about 6.3 s in, on
/// the fresh registration of a live, answering server: (f).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_deleting_without_its_fence_is_caught() -> Result<()> {
    caught(
        Failpoints {
            controllers: "controller-delete-delay=return(5000);controller-delete-unfenced=return"
                .into(),
            ..Default::default()
        },
        vec![Step::new(FaultKind::ServerKill, 0, 3_000, 8_000)],
        CONTROLLER_DELETE_UNFENCED,
        1,
        Invariant::NoLiveDeletion,
    )
    .await
}

/// The same delayed deletion with the fence: the transaction compares the
/// mod revision the plan saw, finds the fresh registration and keeps it.
/// Every invariant holds, so the (f) above is the fence's absence alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fence_keeps_a_delayed_deletion_off_a_fresh_registration() -> Result<()> {
    let (h, r) = world(
        Failpoints {
            controllers: "controller-delete-delay=return(5000)".into(),
            ..Default::default()
        },
        vec![Step::new(FaultKind::ServerKill, 0, 3_000, 8_000)],
    )
    .await?;
    kept(&h, &r, CONTROLLER_DELETE_DELAY);
    Ok(())
}

// ---- In-code faults: the correct code keeps every invariant. ----

/// In-code fault (a): the clients' watch streams are cut between two
/// events of one revision in 80 % of the responses of two events or more
/// (`watch-cut-mid-revision=80%return`). Four rewrites of every key in one
/// transaction, 6 s apart (weights halved each time), make revisions of
/// three events each. The servers' 90 s lease (their registrars confirm
/// the key every 30 s, writing their own weight back) keeps each rewrite
/// in place past the quiescence bound, so an event lost to a cut would
/// show as (h) (seen: with the resume after a partial revision made to
/// skip it, this test fails). The reflector resumes from the revision it
/// saw in part and applies the rest: every invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_code_fault_a_watch_cut_mid_revision_keeps_every_invariant() -> Result<()> {
    let (h, r) = world_with(
        clients("watch-cut-mid-revision=80%return"),
        (0..4)
            .map(|_| Step::new(FaultKind::MultiKeyWrite, 0, 0, 6_000))
            .collect(),
        |cfg| cfg.ttl = "90s",
    )
    .await?;
    kept(&h, &r, "watch-cut-mid-revision");
    Ok(())
}

/// In-code fault (b): every greet-server loses 30 % of its keep-alive
/// answers (`keepalive-answer-lost=30%return`), through a member kill and
/// a server kill: leases are kept (etcd got the pings), keys stay, nothing
/// is flagged. The server stays down 5.5 s, past its old lease's expiry
/// (4 s TTL, etcd checks every 0.5 s), so its restart registers on a free
/// address. With a 0.5 s kill the restarted process waited behind the old
/// key (as designed) and, once in a CI run, claimed it 2.5 s after it
/// expired, past (g)'s 2 s: inferred (no logs were kept) to be a claim
/// held back while lost answers left its own lease unproven, which the
/// registrar waits out before writing. That case is named in
/// docs/robustness.md, not tested here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_code_fault_b_lost_keepalive_answers_keep_every_invariant() -> Result<()> {
    let (h, r) = world(
        Failpoints {
            servers: "keepalive-answer-lost=30%return".into(),
            ..Default::default()
        },
        vec![
            Step::new(FaultKind::EtcdKill, 1, 2_000, 3_000),
            Step::new(FaultKind::ServerKill, 2, 5_500, 6_000),
        ],
    )
    .await?;
    kept(&h, &r, "keepalive-answer-lost");
    Ok(())
}

/// In-code fault (c): every etcd answer to the clients' discovery and to
/// the servers' registration comes 250 ms late
/// (`etcd-slow-answer=return(250)`), through a key deleted by hand (the
/// server registers again), a member kill and a server kill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_code_fault_c_slow_etcd_answers_keep_every_invariant() -> Result<()> {
    let slow = "etcd-slow-answer=return(250)";
    let (h, r) = world(
        Failpoints {
            clients: slow.into(),
            servers: slow.into(),
            ..Default::default()
        },
        vec![
            Step::new(FaultKind::KeyDelete, 0, 0, 3_000),
            Step::new(FaultKind::EtcdKill, 2, 2_000, 3_000),
            Step::new(FaultKind::ServerKill, 1, 500, 3_000),
        ],
    )
    .await?;
    kept(&h, &r, "etcd-slow-answer");
    Ok(())
}

//! The harness sees broken clients and controllers end to end. First, client 0 of a world is
//! [`Mutant::EmptyOnOutage`] (it watches etcd member 0 only and empties its
//! view when the stream fails). Killing member 0 for 3 s must be flagged as
//! a static-stability violation of client 0 (and its calls failing with
//! servers up as failed-call violations), and only client 0: the library's
//! client beside it keeps every invariant through the same outage.

use std::time::Duration;

use anyhow::Result;
use reliability::checker::{check, Bounds, Invariant};
use reliability::history::FaultKind;
use reliability::nemesis::Step;
use reliability::world::{run, Mutant, WorldConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_empties_its_view_on_an_outage_is_caught() -> Result<()> {
    let mut cfg = WorldConfig::new(0, Duration::ZERO);
    cfg.mutant = Some(Mutant::EmptyOnOutage);
    cfg.quiet = Duration::from_secs(6);
    cfg.plan = Some(vec![Step::new(FaultKind::EtcdKill, 0, 3000, 1000)]);
    let h = run(&cfg).await?;
    let r = check(&h, &Bounds::default());
    for v in &r.violations {
        eprintln!("{v}");
    }
    let shrunk = r.of(Invariant::StaticStability);
    assert!(!shrunk.is_empty(), "the mutant's shrink is flagged: {r:#?}");
    // Its calls fail with an empty view while all three servers are up.
    assert!(!r.of(Invariant::NoFailedCall).is_empty(), "{r:#?}");
    assert!(
        r.violations.iter().all(|v| v.client == Some(0)),
        "only the mutant breaks invariants: {r:#?}"
    );
    Ok(())
}

/// Client 0 is [`Mutant::IgnoreDrains`]; server 0 is drained with a 3 s
/// `--drain` (it keeps answering for 3 s after its weight-0 put): the
/// mutant's calls it answers more than 1 s after the put are flagged as
/// stale calls; the library's client beside it keeps every invariant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_ignores_drains_is_caught() -> Result<()> {
    let mut cfg = WorldConfig::new(0, Duration::ZERO);
    cfg.mutant = Some(Mutant::IgnoreDrains);
    cfg.drain = "3s";
    cfg.quiet = Duration::from_secs(6);
    cfg.plan = Some(vec![Step::new(FaultKind::ServerDrain, 0, 2000, 1000)]);
    let h = run(&cfg).await?;
    let r = check(&h, &Bounds::default());
    for v in &r.violations {
        eprintln!("{v}");
    }
    assert!(
        !r.of(Invariant::NoStaleCall).is_empty(),
        "the mutant's calls to a drained server are flagged: {r:#?}"
    );
    assert!(
        r.violations.iter().all(|v| v.client == Some(0)),
        "only the mutant breaks invariants: {r:#?}"
    );
    Ok(())
}

/// Client 0 is [`Mutant::DropFirstDelete`]; server 0 is killed for 9 s:
/// its key goes (the controller deletes it, or its lease expires), the
/// mutant drops that delete while its revision moves past it, and holds the
/// dead server until the restarted one registers again. Its view differs
/// from etcd at its own revision for longer than the quiescence bound:
/// flagged by (h) for client 0 only, although the view converges in the
/// end (so (b) alone would not see it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_drops_a_watch_event_is_caught() -> Result<()> {
    let mut cfg = WorldConfig::new(0, Duration::ZERO);
    cfg.mutant = Some(Mutant::DropFirstDelete);
    cfg.quiet = Duration::from_secs(6);
    cfg.plan = Some(vec![Step::new(FaultKind::ServerKill, 0, 9000, 1000)]);
    let h = run(&cfg).await?;
    let r = check(&h, &Bounds::default());
    for v in &r.violations {
        eprintln!("{v}");
    }
    let v = r.of(Invariant::ViewAtRevision);
    assert!(!v.is_empty(), "the dropped delete is flagged: {r:#?}");
    assert!(r.of(Invariant::Convergence).is_empty(), "{r:#?}");
    assert!(
        r.violations.iter().all(|v| v.client == Some(0)),
        "only the mutant breaks invariants: {r:#?}"
    );
    Ok(())
}

/// [`Mutant::BlindControllers`]: the controllers' probes cannot succeed
/// (1 µs timeout) and their safety valve is off, so the leader deletes
/// servers that answer. No fault is injected: every deletion is flagged by
/// (f), and nothing is blamed on a client; and so is every one again with
/// the log lines dropped from the history, from the recorder's delete
/// requests alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_deletes_live_servers_is_caught() -> Result<()> {
    let mut cfg = WorldConfig::new(0, Duration::ZERO);
    cfg.mutant = Some(Mutant::BlindControllers);
    cfg.quiet = Duration::from_secs(6);
    cfg.plan = Some(vec![]);
    let h = run(&cfg).await?;
    let r = check(&h, &Bounds::default());
    for v in &r.violations {
        eprintln!("{v}");
    }
    assert!(!h.deletions.is_empty(), "the blind controller deleted");
    assert_eq!(
        r.of(Invariant::NoLiveDeletion).len(),
        h.deletions.len(),
        "every deletion of a live server is flagged: {r:#?}"
    );
    assert!(
        r.violations.iter().all(|v| v.client.is_none()),
        "no client is blamed: {r:#?}"
    );
    // The same run with every log line lost (as when a leader is killed
    // between its transaction and its line): the recorder saw each
    // deletion as a delete request (the key's lease outlived it), and (f)
    // judges those instead.
    assert!(
        !h.explicit_deletes.is_empty(),
        "the recorder classified the deletes: {:?}",
        h.explicit_deletes
    );
    let mut unlogged = h.clone();
    unlogged.deletions.clear();
    let r = check(&unlogged, &Bounds::default());
    assert_eq!(
        r.of(Invariant::NoLiveDeletion).len(),
        h.explicit_deletes.len(),
        "every unlogged deletion of a live server is flagged: {r:#?}"
    );
    Ok(())
}

//! etcd's data lost under load (issue 36's "etcd wiped and restored"): a
//! fixed plan in the harness's world (3 etcd members, 3 greet-servers, 2
//! controllers, 2 clients). First writes the snapshot taken at the start
//! does not hold: server 0 killed long enough for the controller to delete
//! its key and restarted (a new lease and key), server 1 drained and
//! restarted (its old lease revoked, a new one). Then every member is
//! stopped and restored from that snapshot (revisions go back; server 0's
//! and 1's old keys and leases come back, their new ones are gone), and
//! later wiped empty. Every invariant of docs/robustness.md must hold,
//! read in epochs, with the allowances a loss of data gets; and the loss
//! must have been seen: two epochs recorded, every client's revision gone
//! back.

use std::time::Duration;

use anyhow::Result;
use reliability::checker::{check, Bounds};
use reliability::history::FaultKind;
use reliability::nemesis::Step;
use reliability::world::{run, WorldConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restored_and_wiped_under_load_keeps_every_invariant() -> Result<()> {
    let mut cfg = WorldConfig::new(0, Duration::ZERO);
    cfg.quiet = Duration::from_secs(6);
    cfg.plan = Some(vec![
        Step::new(FaultKind::ServerKill, 0, 2500, 1500),
        Step::new(FaultKind::ServerDrain, 1, 300, 1500),
        Step::new(FaultKind::EtcdRestore, 0, 500, 7000),
        Step::new(FaultKind::EtcdWipe, 0, 300, 3000),
    ]);
    let h = run(&cfg).await?;
    let r = check(&h, &Bounds::default());
    eprintln!(
        "faults {:?}, calls {} ({} failed), etcd events {}, epochs {:?}, controller deletions {}",
        h.faults_by_kind(),
        h.calls.len(),
        h.calls.iter().filter(|c| !c.ok).count(),
        h.etcd.len(),
        h.epochs,
        h.deletions.len(),
    );
    for e in &h.etcd {
        eprintln!("etcd {e:?}");
    }
    for f in &h.faults {
        eprintln!("fault {f:?}");
    }
    for v in &r.violations {
        eprintln!("{v}");
    }
    assert_eq!(h.epochs.len(), 2, "the recorder listed each new history");
    for client in 0..cfg.clients {
        let revs: Vec<i64> = h
            .views
            .iter()
            .filter(|v| v.client == client)
            .map(|v| v.revision)
            .collect();
        assert!(
            revs.windows(2).any(|w| w[1] < w[0]),
            "client {client}'s revision went back: {revs:?}"
        );
    }
    assert!(r.violations.is_empty(), "{r:#?}");
    assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    Ok(())
}

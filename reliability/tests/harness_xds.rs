//! A grpcio client over xDS in the harness's world (issue 36: "and, where
//! it adds coverage, grpcio over xDS"): beside the library's two clients,
//! a python3 grpcio client (gRPC's C core, its built-in xDS) gets its
//! endpoints from the last controller replica's ADS server, and its calls
//! are recorded and judged by (d) (no call long after a drain or delete
//! reached etcd: here it travels etcd -> controller -> xDS -> grpcio) and
//! (e) (no failed call while a server is healthy). Two fixed tracks: a
//! drain, a kill past `--dead-after` (the controller deletes the key) and
//! both controller fault kinds on one; an etcd member kill and a restore
//! of etcd's data on the other, overlapping them.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use reliability::checker::{check, Bounds};
use reliability::history::FaultKind;
use reliability::nemesis::Step;
use reliability::world::{run, WorldConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_over_xds_keeps_every_invariant() -> Result<()> {
    let mut cfg = WorldConfig::new(0, Duration::ZERO);
    cfg.xds_client = true;
    cfg.quiet = Duration::from_secs(6);
    cfg.tracks = Some(vec![
        vec![
            Step::new(FaultKind::ServerDrain, 0, 300, 1500),
            Step::new(FaultKind::ServerKill, 1, 2500, 1500),
            Step::new(FaultKind::ControllerKill, 0, 2000, 1500),
            Step::new(FaultKind::ControllerPause, 0, 2000, 1500),
        ],
        vec![
            Step::new(FaultKind::EtcdKill, 0, 2000, 2000),
            Step::new(FaultKind::EtcdRestore, 0, 500, 2000),
        ],
    ]);
    let h = run(&cfg).await?;
    let r = check(&h, &Bounds::default());
    let xds: Vec<_> = h.calls.iter().filter(|c| c.client == 2).collect();
    eprintln!(
        "faults {:?}, calls {} ({} failed), xDS client calls {} ({} failed), controller deletions {}",
        h.faults_by_kind(),
        h.calls.len(),
        h.calls.iter().filter(|c| !c.ok).count(),
        xds.len(),
        xds.iter().filter(|c| !c.ok).count(),
        h.deletions.len(),
    );
    for v in &r.violations {
        eprintln!("{v}");
    }
    assert_eq!(h.xds_clients.len(), 1, "{:?}", h.xds_clients);
    assert!(xds.len() > 300, "the xDS client ran: {}", xds.len());
    let answered: BTreeSet<_> = xds.iter().filter_map(|c| c.endpoint.as_deref()).collect();
    assert_eq!(answered.len(), 3, "every server answered it: {answered:?}");
    assert!(r.violations.is_empty(), "{r:#?}");
    assert!(r.skipped.is_empty(), "{:?}", r.skipped);
    Ok(())
}

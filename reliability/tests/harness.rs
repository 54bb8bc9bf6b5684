//! The robustness harness (issue 36) on a bounded number of seeds, so CI
//! runs it: each seed's world (3 etcd members, 3 greet-servers, 2 clients
//! under load) gets 20 s of random faults and 8 s of quiet, and its history
//! must satisfy every invariant of docs/robustness.md. Longer runs:
//! `harness --seed <n> --runs <k> --duration 30s`.

use std::time::Duration;

use anyhow::Result;
use reliability::checker::{check, Bounds};
use reliability::world::{run, WorldConfig};

/// The seeds CI runs (any seed found failing is added here once fixed).
const SEEDS: [u64; 2] = [1, 2];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_fault_schedules_keep_every_invariant() -> Result<()> {
    let mut bad = Vec::new();
    for seed in SEEDS {
        let h = run(&WorldConfig::new(seed, Duration::from_secs(20))).await?;
        let r = check(&h, &Bounds::default());
        eprintln!(
            "seed {seed}: faults {:?}, calls {} ({} failed), violations {}",
            h.faults_by_kind(),
            h.calls.len(),
            h.calls.iter().filter(|c| !c.ok).count(),
            r.violations.len()
        );
        assert!(h.calls.len() > 1000, "seed {seed}: the load ran");
        assert!(!h.faults.is_empty(), "seed {seed}: faults were injected");
        assert!(r.skipped.is_empty(), "seed {seed}: {:?}", r.skipped);
        bad.extend(
            r.violations
                .into_iter()
                .map(|v| format!("seed {seed}: {v}")),
        );
    }
    assert!(bad.is_empty(), "violations:\n{}", bad.join("\n"));
    Ok(())
}

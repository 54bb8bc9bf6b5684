//! The robustness harness (issue 36) on a bounded number of seeds, so CI
//! runs it: each seed's world (3 etcd members, 3 greet-servers, 2
//! controller replicas, 2 clients under load) gets 20 s of random faults
//! and 8 s of quiet, and its history must satisfy every invariant of
//! docs/robustness.md, (a) to (h). Longer runs:
//! `harness --seed <n> --runs <k> --duration 30s`.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Result;
use reliability::checker::{check, Bounds};
use reliability::history::FaultKind;
use reliability::world::{run, WorldConfig};

/// The seeds CI runs (any seed found failing is added here once fixed).
/// Together their schedules (two tracks side by side since the kinds that
/// lose etcd's data joined) draw every fault kind (asserted below): 1 has
/// two restores of etcd's data from a snapshot, an etcd member kill, pauses
/// and a compaction beside server kills, drains and controller leader
/// kills; 2 etcd member kills and isolations beside server kills long
/// enough for the controller to delete the dead server's key and a
/// controller leader paused; 3 a wipe of etcd's data, isolations and
/// compactions beside drains, server pauses and controller faults.
const SEEDS: [u64; 3] = [1, 2, 3];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_fault_schedules_keep_every_invariant() -> Result<()> {
    let mut bad = Vec::new();
    let mut kinds = BTreeSet::new();
    let mut deletions = 0;
    for seed in SEEDS {
        // Logs are kept, and the history beside them when the seed fails,
        // so a failure seen once (CI's machine, its load) can be read and
        // rechecked: `harness --recheck <dir>`.
        let dir = std::env::temp_dir().join(format!("harness-ci-{}-{seed}", std::process::id()));
        let mut cfg = WorldConfig::new(seed, Duration::from_secs(20));
        cfg.log_dir = Some(dir.clone());
        let h = run(&cfg).await?;
        let r = check(&h, &Bounds::default());
        if r.violations.is_empty() {
            let _ = std::fs::remove_dir_all(&dir);
        } else {
            std::fs::write(dir.join(format!("{seed}.json")), serde_json::to_vec(&h)?)?;
            eprintln!("seed {seed}: history and logs kept in {}", dir.display());
        }
        eprintln!(
            "seed {seed}: faults {:?}, calls {} ({} failed), controller deletions {}, violations {}",
            h.faults_by_kind(),
            h.calls.len(),
            h.calls.iter().filter(|c| !c.ok).count(),
            h.deletions.len(),
            r.violations.len()
        );
        assert!(h.calls.len() > 1000, "seed {seed}: the load ran");
        assert!(!h.faults.is_empty(), "seed {seed}: faults were injected");
        assert!(r.skipped.is_empty(), "seed {seed}: {:?}", r.skipped);
        kinds.extend(h.faults.iter().map(|f| f.kind));
        deletions += h.deletions.len();
        bad.extend(
            r.violations
                .into_iter()
                .map(|v| format!("seed {seed}: {v}")),
        );
    }
    assert!(bad.is_empty(), "violations:\n{}", bad.join("\n"));
    assert_eq!(
        kinds,
        FaultKind::ALL.into_iter().collect(),
        "the CI seeds draw every fault kind"
    );
    // Servers killed for 2-2.4 s (seeds 2 and 3) outlive the controllers'
    // 1 s --dead-after: (f) judged real deletions, and the harvest of the
    // controllers' logs works.
    assert!(deletions > 0, "the controllers deleted a dead server's key");
    Ok(())
}

//! Scenario 2: weight accuracy, smoothness and the picker's cost.

use std::time::Instant;

use etcd_lb::scheduler::Scheduler;
use rand::{Rng, SeedableRng};

use crate::stats::Table;

/// Max absolute share error and whether every run respected its bound.
fn accuracy(weights: &[u32], picks: usize) -> (f64, usize, bool) {
    let mut s = Scheduler::new();
    for (i, w) in weights.iter().enumerate() {
        s.set(i, *w);
    }
    let mut counts = vec![0u64; weights.len()];
    let mut longest = vec![0usize; weights.len()];
    let (mut last, mut run) = (usize::MAX, 0);
    for _ in 0..picks {
        let Some(k) = s.pick_plain() else { break };
        counts[k] += 1;
        run = if k == last { run + 1 } else { 1 };
        last = k;
        longest[k] = longest[k].max(run);
    }
    let sum: f64 = weights.iter().map(|w| f64::from(*w)).sum();
    let err = weights
        .iter()
        .zip(&counts)
        .map(|(w, c)| (*c as f64 / picks as f64 - f64::from(*w) / sum).abs())
        .fold(0.0, f64::max);
    let positive: Vec<u32> = weights.iter().copied().filter(|w| *w > 0).collect();
    let w_min = positive.iter().copied().min().unwrap_or(1);
    let ok = positive.len() < 2
        || weights
            .iter()
            .zip(&longest)
            .all(|(w, l)| *l <= (f64::from(*w) / f64::from(w_min)).ceil() as usize + 1);
    (err, longest.into_iter().max().unwrap_or(0), ok)
}

/// Runs the scenario.
pub fn run() -> Vec<Table> {
    const PICKS: usize = 100_000;
    let mut t = Table::new(
        "2a. Weight accuracy and smoothness (100,000 picks)",
        &[
            "weights",
            "max share error",
            "longest run",
            "runs within ceil(w/w_min)+1",
        ],
    );
    let mut worst = 0.0f64;
    let mut all_ok = true;
    for set in [vec![1, 1, 1], vec![100, 200, 300], vec![1, 10_000]] {
        let (err, run, ok) = accuracy(&set, PICKS);
        worst = worst.max(err);
        all_ok &= ok;
        t.row(vec![
            format!("{set:?}"),
            format!("{:.4}%", err * 100.0),
            run.to_string(),
            ok.to_string(),
        ]);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (mut rnd_err, mut rnd_run, mut rnd_ok) = (0.0f64, 0, true);
    for _ in 0..50 {
        let n = rng.random_range(2..=20);
        let set: Vec<u32> = (0..n).map(|_| rng.random_range(0..=1000)).collect();
        if set.iter().all(|w| *w == 0) {
            continue;
        }
        let (err, run, ok) = accuracy(&set, PICKS);
        rnd_err = rnd_err.max(err);
        rnd_run = rnd_run.max(run);
        rnd_ok &= ok;
    }
    worst = worst.max(rnd_err);
    all_ok &= rnd_ok;
    t.row(vec![
        "50 random sets (2-20 endpoints, 0..=1000, seed 7)".into(),
        format!("{:.4}%", rnd_err * 100.0),
        rnd_run.to_string(),
        rnd_ok.to_string(),
    ]);
    t.note(format!(
        "Targets: error <= 0.5% -> {}; runs bounded -> {}",
        if worst <= 0.005 { "met" } else { "MISSED" },
        if all_ok { "met" } else { "MISSED" }
    ));

    let mut cost = Table::new(
        "2b. Picker cost (EDF scheduler, ns per pick, and per weight change)",
        &["endpoints", "ns/pick", "ns/change"],
    );
    for n in [3usize, 100, 10_000] {
        let mut s = Scheduler::new();
        for i in 0..n {
            s.set(i, 1 + (i as u32 % 300));
        }
        let iters = 2_000_000;
        let t0 = Instant::now();
        let mut sink = 0usize;
        for _ in 0..iters {
            sink = sink.wrapping_add(s.pick_plain().unwrap_or(0));
        }
        let per_pick = t0.elapsed().as_nanos() as f64 / iters as f64;
        let changes = 200_000;
        let t0 = Instant::now();
        for i in 0..changes {
            s.set(i % n, 1 + (i as u32 % 500));
        }
        let per_change = t0.elapsed().as_nanos() as f64 / changes as f64;
        std::hint::black_box(sink);
        cost.row(vec![
            n.to_string(),
            format!("{per_pick:.0}"),
            format!("{per_change:.0}"),
        ]);
    }
    cost.note("Both are O(log n): a binary heap with lazy deletion.");
    vec![t, cost]
}

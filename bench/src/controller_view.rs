//! Scenario 6: the controller's `GET /services` under 64 concurrent
//! requests, at 1,000 and 10,000 members.
//!
//! The measurement itself lives with the controller
//! (`controller/benches/services.rs`: real etcd, the controller in-process,
//! live health-checked members); this runs it for the sizes and encodings
//! the targets name and gathers its rows into one table, so
//! `greet-bench all` covers every scenario.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::stats::Table;

/// Runs the scenario (needs `cargo`, as the documented command does).
pub fn run(secs: f64) -> Result<Table> {
    let mut t = Table::new(
        format!("6. Controller view: GET /services, 64 concurrent requests, {secs:.0}s per row (controller/benches/services.rs)"),
        &["members", "response", "requests", "errors", "req/s", "p50 ms", "p99 ms"],
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut p99_10k_gzip = None;
    for (members, live, gzip, label) in [
        ("1000", "1", "raw", "gzip (not inflated)"),
        ("1000", "1", "off", "plain JSON"),
        ("10000", "0", "raw", "gzip (not inflated)"),
        ("10000", "0", "off", "plain JSON"),
    ] {
        let out = Command::new(&cargo)
            .args(["bench", "-q", "-p", "controller", "--bench", "services"])
            .env("BENCH_MEMBERS", members)
            .env("BENCH_LIVE", live)
            .env("BENCH_GZIP", gzip)
            .env("BENCH_CONCURRENCY", "64")
            .env("BENCH_SECS", format!("{secs}"))
            .env("RUST_LOG", "warn")
            .output()
            .context("running cargo bench -p controller --bench services")?;
        if !out.status.success() {
            bail!(
                "controller bench failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // | members | concurrency | requests | errors | seconds | req/s | MB/s | p50 | p90 | p99 | max |
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| {members} |")))
            .context("no result row in the controller bench's output")?;
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        if cells.len() < 11 {
            bail!("unexpected row: {row}");
        }
        if members == "10000" && gzip == "raw" {
            p99_10k_gzip = cells[9].parse::<f64>().ok();
        }
        t.row(vec![
            members.into(),
            label.into(),
            cells[2].into(),
            cells[3].into(),
            cells[5].into(),
            cells[7].into(),
            cells[9].into(),
        ]);
    }
    t.note(match p99_10k_gzip {
        Some(p) => format!(
            "Target p99 < 50 ms at 10,000 members: {p:.1} ms with gzip -> {}; plain JSON moves 3.3 MB per response (see its row).",
            if p < 50.0 { "met" } else { "MISSED" }
        ),
        None => "Target p99 < 50 ms at 10,000 members: no figure".into(),
    });
    Ok(t)
}

//! Scenario 6: the controller's `GET /services` under 64 concurrent
//! requests, at 1,000 and 10,000 members, and at `--members` (default
//! 100,000) in pages of 500 and whole with gzip.
//!
//! The measurement itself lives with the controller
//! (`controller/benches/services.rs`: real etcd, the controller in-process,
//! live health-checked members); this runs it for the sizes and encodings
//! the targets name and gathers its rows into one table, so
//! `greet-bench all` covers every scenario.

use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::stats::Table;

/// One run of the controller's bench.
struct Cell {
    members: usize,
    live: bool,
    gzip: &'static str,
    /// Members per page (`?limit=`), or the whole view.
    page: Option<usize>,
    label: &'static str,
    /// The target's p99 bound in ms and what it is, if this row has one.
    target: Option<(f64, &'static str)>,
}

/// Runs the scenario (needs `cargo`, as the documented command does).
pub fn run(secs: f64, members: usize) -> Result<Table> {
    let mut t = Table::new(
        format!("6. Controller view: GET /services, 64 concurrent requests, {secs:.0}s per row (controller/benches/services.rs)"),
        &["members", "response", "requests", "errors", "req/s", "p50 ms", "p99 ms"],
    );
    let mut cells = vec![
        Cell {
            members: 1000,
            live: true,
            gzip: "raw",
            page: None,
            label: "gzip (not inflated)",
            target: None,
        },
        Cell {
            members: 1000,
            live: true,
            gzip: "off",
            page: None,
            label: "plain JSON",
            target: None,
        },
        Cell {
            members: 10_000,
            live: false,
            gzip: "raw",
            page: None,
            label: "gzip (not inflated)",
            target: Some((50.0, "p99 < 50 ms at 10,000 members, gzip")),
        },
        Cell {
            members: 10_000,
            live: false,
            gzip: "off",
            page: None,
            label: "plain JSON",
            target: None,
        },
    ];
    if members > 10_000 {
        cells.push(Cell {
            members,
            live: false,
            gzip: "off",
            page: Some(500),
            label: "pages of 500, plain JSON",
            target: Some((50.0, "p99 < 50 ms per page at --members, 64 readers")),
        });
        cells.push(Cell {
            members,
            live: false,
            gzip: "raw",
            page: None,
            label: "gzip (not inflated)",
            target: Some((100.0, "p99 < 100 ms for the whole view (gzip) at --members")),
        });
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    for cell in cells {
        let out = Command::new(&cargo)
            .args(["bench", "-q", "-p", "controller", "--bench", "services"])
            .env("BENCH_MEMBERS", cell.members.to_string())
            .env("BENCH_LIVE", if cell.live { "1" } else { "0" })
            .env("BENCH_GZIP", cell.gzip)
            .env("BENCH_PAGE", cell.page.unwrap_or(0).to_string())
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
        let row = result_row(&String::from_utf8_lossy(&out.stdout))?;
        let p99: Option<f64> = row.get("p99 ms").and_then(|v| v.parse().ok());
        t.row(vec![
            cell.members.to_string(),
            cell.label.into(),
            row.get("requests").cloned().unwrap_or_default(),
            row.get("errors").cloned().unwrap_or_default(),
            row.get("req/s").cloned().unwrap_or_default(),
            row.get("p50 ms").cloned().unwrap_or_default(),
            row.get("p99 ms").cloned().unwrap_or_default(),
        ]);
        if let Some((bound, what)) = cell.target {
            t.note(match p99 {
                Some(p) => format!(
                    "Target {what}: {p:.1} ms -> {}",
                    if p < bound { "met" } else { "MISSED" }
                ),
                None => format!("Target {what}: no figure"),
            });
        }
    }
    t.note("Plain JSON moves the whole view per response (3.3 MB at 10,000 members).");
    Ok(t)
}

/// The controller bench's result row, by its header's column names.
fn result_row(text: &str) -> Result<std::collections::HashMap<String, String>> {
    let split = |l: &str| -> Vec<String> {
        l.trim()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect()
    };
    let mut lines = text.lines();
    let header = lines
        .by_ref()
        .find(|l| l.starts_with("| members |"))
        .context("no result table in the controller bench's output")?;
    let names = split(header);
    let row = lines
        .find(|l| l.starts_with("| ") && l.chars().nth(2).is_some_and(|c| c.is_ascii_digit()))
        .context("no result row in the controller bench's output")?;
    let cells = split(row);
    if cells.len() != names.len() {
        bail!("unexpected row {row:?} under {header:?}");
    }
    Ok(names.into_iter().zip(cells).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_row_reads_columns_by_name() {
        let text = "\nGET /services under load (...)\n\
            | members | page | concurrency | requests | errors | seconds | req/s | view MB/s | p50 ms | p90 ms | p99 ms | max ms |\n\
            |---|---|---|---|---|---|---|---|---|---|---|---|\n\
            | 100000 | 500 | 64 | 42741 | 0 | 10.0 | 4270 | 714.5 | 14.57 | 20.51 | 29.95 | 106.38 |\n\
            target: p99 < 50 ms -> met\n";
        let row = result_row(text).unwrap();
        assert_eq!(row["requests"], "42741");
        assert_eq!(row["p99 ms"], "29.95");
        assert_eq!(row["p50 ms"], "14.57");
        assert!(result_row("no table here").is_err());
    }
}

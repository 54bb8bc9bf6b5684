//! `/services/stream` at scale: many subscribers over a large store share
//! one render per change, get the whole view once and compact changes
//! after, and the subscriber count is capped (503 with a JSON error).

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::*;
use etcd_client::{Txn, TxnOp};
use etcd_lb_testkit::Etcd;
use serde_json::Value;

const SERVICES: usize = 100;
const PER_SERVICE: usize = 100;
const STREAMS: usize = 50;
const CHANGES: usize = 3;

/// A controller that probes once and never deletes during the test.
fn quiet() -> controller::Config {
    controller::Config {
        probe_interval: Duration::from_secs(3600),
        dead_after: Duration::from_secs(3600),
        ..fast_config()
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn renders(ctl: &Ctl) -> Result<f64> {
    let text = ctl.metrics().await?;
    sample(&text, "controller_view_renders_total", "").context("controller_view_renders_total")
}

fn svc(i: usize) -> String {
    format!("svc_{i:03}")
}

fn member(i: usize) -> String {
    format!("127.0.0.1:{}", 20_000 + i)
}

fn value(addr: &str) -> String {
    format!(r#"{{"addr":"{addr}","version":"v1","weight":100}}"#)
}

/// Defect 2: 50 streams over a 10,000-member store. Before the fix every
/// subscriber woken by a change rendered the whole view itself and was sent
/// all of it (megabytes) per change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_streams_over_ten_thousand_members_share_one_render_per_change() -> Result<()> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    for s in 0..SERVICES {
        let ops: Vec<TxnOp> = (0..PER_SERVICE)
            .map(|m| TxnOp::put(key(&svc(s), &member(m)), value(&member(m)), None))
            .collect();
        // etcd allows 128 operations per transaction by default.
        client.txn(Txn::new().and_then(ops)).await?;
    }
    let ctl = Ctl::start(&etcd, quiet()).await?;
    let total = SERVICES * PER_SERVICE;
    etcd_lb_testkit::eventually(
        Duration::from_secs(30),
        "the whole store in the view",
        || async {
            let (_, v) = ctl.get("/services").await.ok()?;
            let n: usize = v["services"]
                .as_array()?
                .iter()
                .map(|s| s["members"].as_array().map_or(0, Vec::len))
                .sum();
            (n == total).then_some(())
        },
    )
    .await?;

    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let resp = ctl.http.get(ctl.url("/services/stream")).send().await?;
        ensure!(resp.status() == 200, "stream refused: {}", resp.status());
        streams.push((resp, Vec::new()));
    }
    for (resp, buf) in &mut streams {
        let first = next_event(resp, buf, Duration::from_secs(30)).await?;
        let view: Value = serde_json::from_str(&first.data)?;
        let n: usize = view["services"]
            .as_array()
            .context("services")?
            .iter()
            .map(|s| s["members"].as_array().map_or(0, Vec::len))
            .sum();
        ensure!(
            first.event == "services" && n == total,
            "first event: {} with {n} members",
            first.event
        );
    }
    let rss_connected = rss_kib();
    let before = renders(&ctl).await?;

    let mut biggest = 0usize;
    for c in 0..CHANGES {
        let addr = format!("127.0.0.1:{}", 30_000 + c);
        put_plain(&client, &key(&svc(c), &addr), &value(&addr)).await?;
        for (i, (resp, buf)) in streams.iter_mut().enumerate() {
            let mut seen = false;
            for _ in 0..10 {
                let ev = next_event(resp, buf, Duration::from_secs(20)).await?;
                biggest = biggest.max(ev.data.len());
                if ev.data.contains(&addr) {
                    seen = true;
                    break;
                }
            }
            ensure!(seen, "stream {i} never saw change {c}");
        }
    }
    let after = renders(&ctl).await?;
    let grown_mib = rss_kib().saturating_sub(rss_connected) / 1024;
    println!(
        "{STREAMS} streams, {total} members, {CHANGES} changes: {} renders, biggest change event {biggest} bytes, RSS grew {grown_mib} MiB",
        after - before
    );
    ensure!(
        after - before <= CHANGES as f64,
        "{} renders for {CHANGES} changes: subscribers render on their own",
        after - before
    );
    ensure!(
        biggest < 64 * 1024,
        "a change event of {biggest} bytes: the whole view is sent per change"
    );
    ensure!(
        grown_mib < 200,
        "memory grew {grown_mib} MiB while streaming {CHANGES} changes"
    );
    ctl.stop().await
}

/// Subscribers beyond `max_streams` get 503 with a JSON error; a closed
/// stream frees its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_cap_are_refused_with_a_json_503() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ctl = Ctl::start(
        &etcd,
        controller::Config {
            max_streams: 2,
            ..quiet()
        },
    )
    .await?;
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut resp = ctl.http.get(ctl.url("/services/stream")).send().await?;
        ensure!(resp.status() == 200);
        let mut buf = Vec::new();
        next_event(&mut resp, &mut buf, Duration::from_secs(10)).await?;
        open.push(resp);
    }
    let refused = ctl.http.get(ctl.url("/services/stream")).send().await?;
    ensure!(
        refused.status() == 503,
        "third stream: {}",
        refused.status()
    );
    let body: Value = refused.json().await?;
    ensure!(
        body["status"] == 503 && body["error"].as_str().is_some_and(|e| e.contains("stream")),
        "{body}"
    );

    drop(open.pop());
    etcd_lb_testkit::eventually(
        Duration::from_secs(10),
        "a place freed by a closed stream",
        || async {
            let r = ctl
                .http
                .get(ctl.url("/services/stream"))
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await?;
    ctl.stop().await
}

//! Benchmark: `GET /services` with many registered members under
//! concurrent load (issue 4, point 7). Prints a table; asserts nothing.
//!
//! ```text
//! cargo bench -p controller --bench services
//! BENCH_MEMBERS=10000 BENCH_LIVE=0 BENCH_CONCURRENCY=64 BENCH_SECS=10 cargo bench -p controller --bench services
//! BENCH_MEMBERS=100000 BENCH_LIVE=0 BENCH_PAGE=500 BENCH_GZIP=off cargo bench -p controller --bench services
//! BENCH_MEMBERS=100000 BENCH_LIVE=0 BENCH_GZIP=raw cargo bench -p controller --bench services
//! ```
//!
//! `BENCH_PAGE=N` makes every worker walk the view in pages
//! (`/services?limit=N`, then `continue=` until the last page) instead of
//! fetching it whole; latencies are per page.
//!
//! `BENCH_GZIP` picks what the load client does: `decode` (default: asks
//! for gzip and inflates every body, like a browser), `raw` (asks for gzip
//! and reads the compressed bytes without inflating them, like a proxy:
//! measures the server rather than the co-located client's inflate CPU), or
//! `off` (plain JSON).
//!
//! `BENCH_LIVE=0` registers addresses where nothing listens instead of live
//! endpoints (10,000 live endpoints in one process would need more file
//! descriptors than a default limit allows); the view is just as large.
//!
//! Set-up, all on loopback: a real etcd; one in-process gRPC health server
//! listening on `BENCH_MEMBERS` ports (so every member is alive and probed
//! for real); one key per port on a shared long lease with JSON values of
//! varied weights and versions; the controller in-process via
//! `controller::run`. Once every member shows healthy, `BENCH_CONCURRENCY`
//! workers hammer `GET /services` for `BENCH_SECS` seconds while the
//! controller keeps probing in the background (as in production).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_testkit::Etcd;
use serde_json::Value;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

fn main() -> Result<()> {
    // Cargo passes `--bench`; any other argument is a filter we ignore.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(bench())
}

async fn bench() -> Result<()> {
    let members = etcd_lb_testkit::env_u64("BENCH_MEMBERS", 1000)? as usize;
    let concurrency = etcd_lb_testkit::env_u64("BENCH_CONCURRENCY", 64)? as usize;
    let secs = etcd_lb_testkit::env_u64("BENCH_SECS", 10)?;
    let live = etcd_lb_testkit::env_u64("BENCH_LIVE", 1)? != 0;
    let page = etcd_lb_testkit::env_u64("BENCH_PAGE", 0)? as usize;
    let gzip = std::env::var("BENCH_GZIP").unwrap_or_else(|_| "decode".to_owned());
    anyhow::ensure!(
        ["decode", "raw", "off"].contains(&gzip.as_str()),
        "BENCH_GZIP must be decode, raw or off"
    );

    eprintln!("setting up: etcd, {members} keys (live endpoints: {live})");
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;

    // One health server on `members` loopback ports.
    let mut listeners = Vec::with_capacity(members);
    let mut addrs = Vec::with_capacity(members);
    for i in 0..members {
        if live {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(l.local_addr()?.to_string());
            listeners.push(TcpListenerStream::new(l));
        } else {
            // Distinct loopback addresses where nothing listens, past
            // 40,000 members too (all of 127.0.0.0/8 is loopback).
            addrs.push(format!(
                "127.0.{}.1:{}",
                1 + i / 40_000,
                20_000 + i % 40_000
            ));
        }
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let stop_health = CancellationToken::new();
    let incoming = futures::stream::select_all(listeners);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health_service)
            .serve_with_incoming_shutdown(incoming, stop_health.clone().cancelled_owned()),
    );

    // In transactions (etcd_lb_testkit::put_in_txns): one put per request made the
    // set-up alone take over ten minutes at 100,000 members.
    let lease = client.lease_grant(3600, None).await?.id();
    let setup = Instant::now();
    let kvs = addrs.iter().enumerate().map(|(i, addr)| {
        let value = serde_json::json!({
            "addr": addr,
            "version": format!("1.{}.0", i % 7),
            "weight": 50 + (i % 10) * 25,
        });
        (
            format!("/ns/bench_service_{}/{addr}", i % 4),
            value.to_string(),
        )
    });
    etcd_lb_testkit::put_in_txns(&client, kvs, Some(lease)).await?;
    eprintln!("{members} keys put in {:.1?}", setup.elapsed());

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let shutdown = CancellationToken::new();
    let cfg = controller::Config {
        dead_after: Duration::from_secs(3600),
        ..controller::Config::new("/ns/")
    };
    let ctl = tokio::spawn(controller::run(
        cfg,
        EtcdConfig::plain([etcd.endpoint()]),
        listener,
        shutdown.clone(),
    ));

    let probe_http = reqwest::Client::new();
    let mut builder = reqwest::Client::builder().pool_max_idle_per_host(concurrency);
    if gzip != "decode" {
        builder = builder.no_gzip();
    }
    if gzip == "raw" {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::ACCEPT_ENCODING,
            reqwest::header::HeaderValue::from_static("gzip"),
        );
        builder = builder.default_headers(headers);
    }
    let http = builder.build()?;
    let url = format!("{base}/services");
    // Every member probed once: at 100,000 dead addresses a pass takes a
    // while; allow a second per 500 members, at least two minutes.
    let started = Instant::now();
    let ready_by = started + Duration::from_secs((members as u64 / 500).max(120));
    let bytes = loop {
        if let Ok(resp) = probe_http.get(&url).send().await {
            if let Ok(body) = resp.bytes().await {
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                let healthy: usize = v["services"]
                    .as_array()
                    .map(|s| {
                        s.iter()
                            .flat_map(|s| s["members"].as_array().cloned().unwrap_or_default())
                            .filter(|m| {
                                if live {
                                    m["healthy"] == true
                                } else {
                                    !m["healthy"].is_null()
                                }
                            })
                            .count()
                    })
                    .unwrap_or(0);
                if healthy == members {
                    break body.len();
                }
            }
        }
        anyhow::ensure!(
            Instant::now() < ready_by,
            "the controller did not see all members healthy in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "all {members} members probed in the view {:.1?} after the controller started ({bytes} bytes of JSON); warming up",
        started.elapsed()
    );

    let page = (page > 0).then_some(page);
    run_load(&http, &url, page, concurrency, Duration::from_secs(1)).await?;
    let (mut lat, elapsed, errors) =
        run_load(&http, &url, page, concurrency, Duration::from_secs(secs)).await?;
    lat.sort_unstable();
    let pct = |p: f64| -> Duration {
        if lat.is_empty() {
            return Duration::ZERO;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i]
    };
    let ms = |d: Duration| format!("{:.2}", d.as_secs_f64() * 1000.0);
    println!();
    let what = match page {
        Some(n) => format!("GET /services?limit={n}&continue=... (page walks)"),
        None => "GET /services".to_owned(),
    };
    println!(
        "{what} under load (controller in-process, release build, loopback, live endpoints: {live}, client gzip: {gzip})"
    );
    println!(
        "| members | page | concurrency | requests | errors | seconds | req/s | view MB/s | p50 ms | p90 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    // A page carries about its share of the whole view's bytes.
    let per_request = match page {
        Some(n) => bytes * n.min(members) / members.max(1),
        None => bytes,
    };
    println!(
        "| {members} | {} | {concurrency} | {} | {errors} | {:.1} | {:.0} | {:.1} | {} | {} | {} | {} |",
        page.map_or("whole".to_owned(), |n| n.to_string()),
        lat.len(),
        elapsed.as_secs_f64(),
        lat.len() as f64 / elapsed.as_secs_f64(),
        (lat.len() * per_request) as f64 / elapsed.as_secs_f64() / 1e6,
        ms(pct(0.50)),
        ms(pct(0.90)),
        ms(pct(0.99)),
        ms(lat.last().copied().unwrap_or_default()),
    );
    // Issue 4: p99 < 50 ms for the whole view up to 10,000 members and per
    // page at any size; issue 14: the whole view (gzip) < 100 ms beyond.
    let bound = if page.is_none() && members > 10_000 {
        100
    } else {
        50
    };
    println!(
        "target: p99 < {bound} ms -> {}",
        if pct(0.99) < Duration::from_millis(bound) {
            "met"
        } else {
            "NOT met"
        }
    );

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), ctl).await;
    stop_health.cancel();
    Ok(())
}

/// The next page's token of a page body (`"continue":"..."` near its end),
/// without parsing the page.
fn next_token(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let at = text.rfind("\"continue\":\"")? + "\"continue\":\"".len();
    let end = text[at..].find('"')?;
    Some(text[at..at + end].to_owned())
}

/// `concurrency` workers, each issuing requests back to back until
/// `duration` is over (walking pages of `page` members when set); returns
/// every latency, the elapsed time and the number of failed requests.
async fn run_load(
    http: &reqwest::Client,
    url: &str,
    page: Option<usize>,
    concurrency: usize,
    duration: Duration,
) -> Result<(Vec<Duration>, Duration, usize)> {
    let start = Instant::now();
    let end = start + duration;
    let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let http = http.clone();
        let url = url.to_owned();
        let errors = errors.clone();
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut token: Option<String> = None;
            while Instant::now() < end {
                let target = match (page, &token) {
                    (None, _) => url.clone(),
                    (Some(n), None) => format!("{url}?limit={n}"),
                    (Some(n), Some(t)) => format!("{url}?limit={n}&continue={t}"),
                };
                let t = Instant::now();
                let ok = match http.get(&target).send().await {
                    Ok(r) if r.status().is_success() => match r.bytes().await {
                        Ok(body) => {
                            if page.is_some() {
                                token = next_token(&body);
                            }
                            true
                        }
                        Err(_) => false,
                    },
                    _ => {
                        token = None;
                        false
                    }
                };
                if ok {
                    lat.push(t.elapsed());
                } else {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.context("load worker")?);
    }
    let errors = errors.load(std::sync::atomic::Ordering::Relaxed);
    Ok((all, start.elapsed(), errors))
}

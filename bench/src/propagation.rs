//! Scenarios 3 and 5: how fast an etcd change reaches the balancer, beside
//! etcd's own put -> watch-event latency measured by a bare watcher in the
//! same run; and how the resolver copes with 10,000 endpoints.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use etcd_client::{Client, WatchOptions};
use etcd_lb::{Balancer, BalancerConfig, Discovery, DiscoveryConfig};
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::schema::ServiceName;
use etcd_lb_testkit::Etcd;
use tokio_util::sync::CancellationToken;

use crate::stats::{percentiles, rss_bytes, us, Percentiles, Table};

fn value(addr: &str, weight: u32) -> String {
    format!(r#"{{"addr":"{addr}","version":"1.0.0","weight":{weight}}}"#)
}

/// A balancer fed from etcd for `service`; lazily connected channels (the
/// endpoints need not be live: this measures resolver and picker).
async fn resolver(etcd: &Etcd, service: &str) -> Result<(Balancer, Discovery, CancellationToken)> {
    let cancel = CancellationToken::new();
    let balancer = Balancer::new(BalancerConfig {
        eager_connect: false,
        ..BalancerConfig::new(service)
    });
    let discovery = Discovery::spawn(
        EtcdConfig::plain([etcd.endpoint()]),
        DiscoveryConfig::new(ServiceName::new(service)?),
        balancer.clone(),
        cancel.clone(),
    );
    Ok((balancer, discovery, cancel))
}

/// How long after `t0` (a write) the bare watch saw an event, and the
/// balancer changed (at most 10 s each).
async fn arrivals(
    bare: &mut etcd_client::WatchStream,
    changes: &mut tokio::sync::watch::Receiver<u64>,
    t0: Instant,
) -> Result<(Duration, Duration)> {
    let bare_wait = async {
        loop {
            let r = bare.message().await?.context("bare watch ended")?;
            if !r.events().is_empty() {
                return Ok::<_, anyhow::Error>(t0.elapsed());
            }
        }
    };
    let bal_wait = async {
        changes.changed().await?;
        Ok::<_, anyhow::Error>(t0.elapsed())
    };
    let (a, b) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(bare_wait, bal_wait)
    })
    .await
    .context("a change did not arrive within 10 s")?;
    Ok((a?, b?))
}

/// Times `n` changes: etcd write -> bare watch event, and -> balancer change.
async fn measure(
    client: &mut Client,
    balancer: &Balancer,
    service: &str,
    n: usize,
    base_port: u32,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let prefix = format!("/ns/{service}/");
    let mut bare = client
        .watch(prefix.as_str(), Some(WatchOptions::new().with_prefix()))
        .await?;
    let _created = bare.message().await?;
    let mut changes = balancer.changes();
    let (mut etcd_lat, mut bal_lat) = (Vec::new(), Vec::new());
    for i in 0..n {
        let addr = format!("127.0.0.1:{}", base_port + (i / 3) as u32);
        let key = format!("{prefix}{addr}");
        changes.borrow_and_update();
        let t0 = Instant::now();
        match i % 3 {
            0 => client.put(key, value(&addr, 100), None).await.map(|_| ())?,
            1 => client.put(key, value(&addr, 250), None).await.map(|_| ())?,
            _ => client.delete(key, None).await.map(|_| ())?,
        }
        let (a, b) = arrivals(&mut bare, &mut changes, t0).await?;
        etcd_lat.push(a);
        bal_lat.push(b);
    }
    Ok((etcd_lat, bal_lat))
}

fn row(name: &str, p: &Percentiles) -> Vec<String> {
    vec![
        name.into(),
        p.n.to_string(),
        us(p.p50_us),
        us(p.p99_us),
        us(p.max_us),
    ]
}

/// Scenario 3.
pub async fn propagation(samples: usize) -> Result<Table> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    let (balancer, discovery, cancel) = resolver(&etcd, "prop").await?;
    discovery.wait_synced(Duration::from_secs(10)).await?;
    // Warm-up.
    measure(&mut client, &balancer, "prop", 30, 20_000).await?;
    let (e, b) = measure(&mut client, &balancer, "prop", samples, 30_000).await?;
    cancel.cancel();
    let (mut t, pb, pa) = beside_the_floor(
        format!("3. Propagation: etcd put/delete/weight change -> picker updated ({samples} samples, 1/3 each)"),
        ["etcd alone: put -> bare watch event", "put -> balancer updated"],
        &e,
        &b,
    );
    t.note(format!(
        "Targets: p99 < 50 ms -> {}; client adds < 5 ms at p99 -> {}",
        if pb.p99_us < 50_000.0 {
            "met"
        } else {
            "MISSED"
        },
        if pa.p99_us < 5_000.0 { "met" } else { "MISSED" }
    ));
    Ok(t)
}

/// A table of etcd's own latency (the floor), the balancer's, and what the
/// balancer adds per sample; with the balancer's and the added percentiles
/// for the caller's targets.
fn beside_the_floor(
    title: String,
    labels: [&str; 2],
    floor: &[Duration],
    ours: &[Duration],
) -> (Table, Percentiles, Percentiles) {
    let (pe, pb) = (percentiles(floor), percentiles(ours));
    let added: Vec<Duration> = ours
        .iter()
        .zip(floor)
        .map(|(b, e)| b.saturating_sub(*e))
        .collect();
    let pa = percentiles(&added);
    let mut t = Table::new(title, &["path", "samples", "p50", "p99", "max"]);
    t.row(row(labels[0], &pe));
    t.row(row(labels[1], &pb));
    t.row(row("added by the client (per sample)", &pa));
    (t, pb, pa)
}

/// Scenario 10: an operator's override (a drain, then its removal) ->
/// the client's picker re-weighed, beside etcd's own put -> watch-event
/// latency on the overrides prefix, in the same run.
pub async fn overrides(samples: usize) -> Result<Table> {
    use etcd_lb_registry::overrides::{self, EndpointOverride, Incarnation};
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    let service = ServiceName::new("ovr")?;
    let lease = client.lease_grant(600, None).await?.id();
    let addrs: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", 21_000 + i))
        .collect();
    for a in &addrs {
        let opts = etcd_client::PutOptions::new().with_lease(lease);
        client
            .put(format!("/ns/ovr/{a}"), value(a, 100), Some(opts))
            .await?;
    }
    let (balancer, discovery, cancel) = resolver(&etcd, "ovr").await?;
    discovery.wait_synced(Duration::from_secs(10)).await?;
    let root = overrides::DEFAULT_ROOT;
    let mut bare = client
        .watch(
            overrides::service_prefix(root, &service),
            Some(WatchOptions::new().with_prefix()),
        )
        .await?;
    let _created = bare.message().await?;
    let mut changes = balancer.changes();
    let (mut etcd_lat, mut bal_lat) = (Vec::new(), Vec::new());
    let drain = EndpointOverride {
        drain: true,
        weight: None,
        incarnation: Some(Incarnation::Lease(lease)),
        reason: "bench".into(),
        by: "bench".into(),
        at: overrides::now_rfc3339(),
        expires: None,
    }
    .to_json();
    let warmup = 20;
    for i in 0..samples + warmup {
        let addr = etcd_lb_registry::schema::Addr::new(&addrs[(i / 2) % 3])?;
        let key = overrides::endpoint_key(root, &service, &addr);
        changes.borrow_and_update();
        let t0 = Instant::now();
        if i % 2 == 0 {
            client.put(key, drain.as_str(), None).await?;
        } else {
            client.delete(key, None).await?;
        }
        let (a, b) = arrivals(&mut bare, &mut changes, t0).await?;
        let want = if i % 2 == 0 { 0 } else { 100 };
        anyhow::ensure!(
            balancer.weight_of(&addr) == Some(want),
            "after the change {addr} weighs {:?}, not {want}",
            balancer.weight_of(&addr)
        );
        if i >= warmup {
            etcd_lat.push(a);
            bal_lat.push(b);
        }
    }
    cancel.cancel();
    let (mut t, pb, _) = beside_the_floor(
        format!("10. Override -> picker: an operator's drain put or removed -> the client re-weighed ({samples} samples, half each)"),
        [
            "etcd alone: put/delete -> bare watch event",
            "override -> picker re-weighed",
        ],
        &etcd_lat,
        &bal_lat,
    );
    t.note(format!(
        "Target: p99 < 200 ms -> {}",
        if pb.p99_us < 200_000.0 {
            "met"
        } else {
            "MISSED"
        }
    ));
    Ok(t)
}

/// Puts `n` endpoints under `service` (in transactions: testkit).
async fn register_many(client: &mut Client, service: &str, n: usize) -> Result<()> {
    let lease = client.lease_grant(600, None).await?.id();
    let kvs = (0..n).map(|i| {
        let addr = format!(
            "127.{}.{}.{}:3000",
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255
        );
        (
            format!("/ns/{service}/{addr}"),
            value(&addr, 1 + (i as u32 % 300)),
        )
    });
    etcd_lb_testkit::put_in_txns(client, kvs, Some(lease)).await
}

/// Scenario 5.
pub async fn scale(n: usize) -> Result<Table> {
    let etcd = Etcd::start().await?;
    let mut client = etcd.client().await?;
    register_many(&mut client, "big", n).await?;
    register_many(&mut client, "small", 10).await?;

    let rss_before = rss_bytes(None);
    let t0 = Instant::now();
    let (big, discovery, cancel) = resolver(&etcd, "big").await?;
    // When the reflector has the whole list (before the balancer has it).
    let listed = tokio::spawn({
        let discovery = discovery.clone();
        async move {
            while !discovery.state().synced {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            t0.elapsed()
        }
    });
    discovery.wait_synced(Duration::from_secs(60)).await?;
    let sync = t0.elapsed();
    let listed = listed.await?;
    let rss_after = rss_bytes(None);
    anyhow::ensure!(big.len() == n, "synced {} of {n}", big.len());
    // Picks work at this size.
    let (small, d2, cancel2) = resolver(&etcd, "small").await?;
    d2.wait_synced(Duration::from_secs(10)).await?;

    let (_, at_big) = measure(&mut client, &big, "big", 300, 40_000).await?;
    let (_, at_small) = measure(&mut client, &small, "small", 300, 40_000).await?;
    cancel.cancel();
    cancel2.cancel();
    let (pb, ps) = (percentiles(&at_big), percentiles(&at_small));

    let mut t = Table::new(
        format!("5. Scale: {n} endpoints under one prefix (lazily connected channels)"),
        &["measure", "value"],
    );
    t.row(vec![
        "initial sync (connect, paged list, balancer filled)".into(),
        format!("{:.0} ms", sync.as_secs_f64() * 1e3),
    ]);
    t.row(vec![
        "  of which: paged list done (reflector synced)".into(),
        format!("{:.0} ms", listed.as_secs_f64() * 1e3),
    ]);
    t.row(vec![
        "process RSS after sync".into(),
        format!("{:.1} MB", rss_after as f64 / 1e6),
    ]);
    t.row(vec![
        "RSS added by the resolver".into(),
        format!(
            "{:.1} MB",
            rss_after.saturating_sub(rss_before) as f64 / 1e6
        ),
    ]);
    t.row(vec![
        format!("one change at {n}: p50 / p99"),
        format!("{} / {}", us(pb.p50_us), us(pb.p99_us)),
    ]);
    t.row(vec![
        "one change at 10: p50 / p99".into(),
        format!("{} / {}", us(ps.p50_us), us(ps.p99_us)),
    ]);
    t.row(vec![
        format!("ratio p50 at {n} / at 10"),
        format!("{:.2}", pb.p50_us / ps.p50_us.max(1.0)),
    ]);
    t.note(format!(
        "Targets: sync < 1 s -> {}; RSS < 150 MB -> {}; a change costs about the same at {n} as at 10 (O(log n)) -> ratio {:.2}",
        if sync < Duration::from_secs(1) { "met" } else { "MISSED" },
        if rss_after < 150_000_000 { "met" } else { "MISSED" },
        pb.p50_us / ps.p50_us.max(1.0)
    ));
    Ok(t)
}

//! The xDS port against hostile and stuck peers, on the real binary
//! (issue 33, points 2-4): subscribers that never read, junk type URLs,
//! clients that just leave, and the stream caps. Memory is the binary's
//! resident set (`VmRSS`) before and after; each bound is in
//! docs/surfaces.md.

mod common;

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use common::{fill, CtlProc as Controller};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use etcd_lb_testkit::{eventually, Etcd};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::Streaming;

const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const SVC: &str = "big";
const MIB: f64 = 1024.0 * 1024.0;

/// One connection with small flow-control windows: a stream that is
/// never read stops the server's writes after 64 KiB.
async fn tight_channel(xds: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(xds.to_owned())?
        .initial_stream_window_size(Some(65_535))
        .initial_connection_window_size(Some(16 * 1024 * 1024))
        .connect()
        .await?)
}

async fn open(
    channel: Channel,
) -> Result<(mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>)> {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let stream = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

fn request(type_url: &str, names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "bounds-test".into(),
            ..Default::default()
        }),
        type_url: type_url.into(),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// 100 EDS subscribers on one connection that never read, over 1,000
/// endpoints, while 25 weights change: the controller keeps at most one
/// pending response per subscriber and type, so its memory grows by less
/// than 64 MiB (on the old 16-slot queue of copies: 15 -> 231 MB).
#[tokio::test(flavor = "multi_thread")]
async fn stuck_eds_subscribers_cost_bounded_memory() -> Result<()> {
    let etcd = Etcd::start().await?;
    fill(&etcd, SVC, 1000, 100).await?;
    let ctl = Controller::spawn(&etcd, &[])?;
    ctl.wait_ready().await?;
    let before = ctl.rss_mib()?;

    let channel = tight_channel(&ctl.xds).await?;
    let mut streams = Vec::new();
    for _ in 0..100 {
        let (tx, rx) = open(channel.clone()).await?;
        tx.send(request(EDS, &[SVC])).await?;
        streams.push((tx, rx)); // never read
    }
    let mut c = etcd.client().await?;
    for round in 0..25u32 {
        let addr = format!("127.0.0.2:{}", 20_000 + round);
        c.put(
            format!("/ns/{SVC}/{addr}"),
            format!(
                r#"{{"addr":"{addr}","version":"1.0.0","weight":{}}}"#,
                200 + round
            ),
            None,
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = ctl.rss_mib()?;
    ensure!(
        after - before < 64.0,
        "controller RSS grew {before:.1} -> {after:.1} MiB with 100 stuck subscribers"
    );
    // The controller still serves a well-behaved client.
    let (tx, mut rx) = open(tight_channel(&ctl.xds).await?).await?;
    tx.send(request(EDS, &[SVC])).await?;
    let resp = tokio::time::timeout(Duration::from_secs(10), rx.message())
        .await
        .context("no EDS response while stuck subscribers are open")??
        .context("stream ended")?;
    ensure!(
        resp.resources.len() == 1,
        "{} resources",
        resp.resources.len()
    );
    println!("stuck subscribers: controller RSS {before:.1} -> {after:.1} MiB");
    drop(streams);
    Ok(())
}

/// One stream sending 1,000 requests with distinct 200 KB unknown type
/// URLs: nothing of them is kept, one line is logged, the requests are
/// counted (old code: RSS 14 -> 210 MB and 200 MB of log).
#[tokio::test(flavor = "multi_thread")]
async fn junk_type_urls_are_counted_not_kept_or_logged_whole() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ctl = Controller::spawn(&etcd, &[])?;
    ctl.wait_ready().await?;
    let before = ctl.rss_mib()?;
    let log_before = ctl.proc.log().len();

    let channel = Endpoint::from_shared(ctl.xds.clone())?.connect().await?;
    let (tx, mut rx) = open(channel).await?;
    let pad = "x".repeat(200 * 1024);
    for i in 0..1000 {
        tx.send(request(&format!("type.googleapis.com/junk.{i}.{pad}"), &[]))
            .await?;
    }
    // The stream is still up and nothing came back for junk.
    let got = tokio::time::timeout(Duration::from_secs(1), rx.message()).await;
    ensure!(got.is_err(), "a response or an end for junk types: {got:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = ctl.rss_mib()?;
    let logged = ctl.proc.log().len() - log_before;
    println!("junk types: RSS {before:.1} -> {after:.1} MiB, {logged} bytes of log");
    ensure!(
        after - before < 64.0,
        "RSS grew {before:.1} -> {after:.1} MiB for junk type URLs"
    );
    ensure!(
        (logged as f64) < MIB,
        "{logged} bytes of log for junk type URLs"
    );
    eventually(
        Duration::from_secs(30),
        "1,000 unknown types counted",
        || async {
            ctl.metric("controller_xds_unknown_type_requests_total")
                .await
                .ok()
                .filter(|n| *n >= 1000.0)
        },
    )
    .await?;
    drop(tx);
    Ok(())
}

/// Clients that open streams and close their connections are
/// disconnects, not bad requests (old code: +1 bad request and a WARN per
/// stream); past `--xds-max-streams` a stream is refused with
/// RESOURCE_EXHAUSTED, and a closed one frees its place.
#[tokio::test(flavor = "multi_thread")]
async fn disconnects_are_not_bad_requests_and_streams_are_capped() -> Result<()> {
    let etcd = Etcd::start().await?;
    fill(&etcd, SVC, 3, 100).await?;
    let ctl = Controller::spawn(&etcd, &["--xds-max-streams", "5"])?;
    ctl.wait_ready().await?;

    for _ in 0..20 {
        let channel = Endpoint::from_shared(ctl.xds.clone())?.connect().await?;
        let (tx, mut rx) = open(channel).await?;
        tx.send(request(EDS, &[SVC])).await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), rx.message()).await;
        drop((tx, rx)); // the channel (its connection) goes with them
    }
    eventually(
        Duration::from_secs(10),
        "20 disconnects counted",
        || async {
            ctl.metric("controller_xds_disconnects_total")
                .await
                .ok()
                .filter(|n| *n >= 1.0)
        },
    )
    .await
    .with_context(|| ctl.proc.log())?;
    let bad = ctl.metric("controller_xds_bad_requests_total").await?;
    ensure!(
        bad == 0.0,
        "{bad} bad requests counted for clients that left:\n{}",
        ctl.proc.log()
    );

    // The cap: five streams held, the sixth refused.
    eventually(Duration::from_secs(10), "no stream open", || async {
        ctl.metric("controller_xds_streams")
            .await
            .ok()
            .filter(|n| *n == 0.0)
    })
    .await?;
    let channel = Endpoint::from_shared(ctl.xds.clone())?.connect().await?;
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(open(channel.clone()).await?);
    }
    let refused = open(channel.clone()).await;
    let code = refused
        .err()
        .and_then(|e| e.downcast_ref::<tonic::Status>().map(|s| s.code()));
    ensure!(
        code == Some(tonic::Code::ResourceExhausted),
        "the sixth stream: {code:?}"
    );
    held.pop();
    eventually(Duration::from_secs(10), "a place freed", || async {
        ctl.metric("controller_xds_streams")
            .await
            .ok()
            .filter(|n| *n <= 4.0)
    })
    .await?;
    ensure!(
        open(channel).await.is_ok(),
        "a freed place was not reusable"
    );
    Ok(())
}

/// A subscriber that takes no response for `--xds-write-timeout` while
/// one waits is disconnected: its stream task, session and pending
/// responses are released and counted (what the transport already holds,
/// at most one response, goes when the client reads or its connection
/// closes).
#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_that_stops_reading_is_disconnected_after_the_write_timeout() -> Result<()> {
    let etcd = Etcd::start().await?;
    fill(&etcd, SVC, 1000, 100).await?;
    let ctl = Controller::spawn(&etcd, &["--xds-write-timeout", "2s"])?;
    ctl.wait_ready().await?;
    let (tx, mut rx) = open(tight_channel(&ctl.xds).await?).await?;
    tx.send(request(EDS, &[SVC])).await?;
    let mut c = etcd.client().await?;
    for round in 0..5u32 {
        let addr = format!("127.0.0.2:{}", 20_000 + round);
        c.put(
            format!("/ns/{SVC}/{addr}"),
            format!(
                r#"{{"addr":"{addr}","version":"1.0.0","weight":{}}}"#,
                300 + round
            ),
            None,
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eventually(
        Duration::from_secs(15),
        "a slow disconnect counted",
        || async {
            ctl.metric("controller_xds_slow_disconnects_total")
                .await
                .ok()
                .filter(|n| *n >= 1.0)
        },
    )
    .await
    .with_context(|| ctl.proc.log())?;
    // Reading now drains what was sent, then the end.
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.message()).await? {
            Ok(Some(_)) => continue,
            Ok(None) => break None,
            Err(status) => break Some(status.code()),
        }
    };
    // DEADLINE_EXCEEDED when the channel to the transport had room for it;
    // otherwise the stream ends after what was already handed over.
    ensure!(
        matches!(end, None | Some(tonic::Code::DeadlineExceeded)),
        "the stuck stream ended with {end:?}"
    );
    ensure!(
        ctl.metric("controller_xds_streams").await? == 0.0,
        "the disconnected stream still counts as open"
    );
    Ok(())
}

//! The xDS server straight over its ADS stream, with envoy-types' tonic
//! client against a real etcd and real greet-servers: the protocol
//! (nonces, ACK/NACK, absent resources, subscription changes, bad
//! requests), agreement with `/services`, and static stability (nothing
//! before the first sync, nothing empty while etcd is down).

mod common;

use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use common::{fast_config, greet_server, Ctl};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::{address, HealthStatus, Node};
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::rpc;
use etcd_client::PutOptions;
use etcd_lb_testkit::{eventually, free_port, Etcd, Proc};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const SVC: &str = "greet_service";

/// One ADS stream.
struct Ads {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl Ads {
    async fn open(xds: &str) -> Result<Self> {
        let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await?;
        let (tx, rx) = mpsc::channel(16);
        let rx = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Self { tx, rx })
    }

    async fn send(&self, type_url: &str, names: &[&str], version: &str, nonce: &str) -> Result<()> {
        self.send_req(DiscoveryRequest {
            node: Some(Node {
                id: "test-node".into(),
                ..Default::default()
            }),
            type_url: type_url.into(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.into(),
            response_nonce: nonce.into(),
            ..Default::default()
        })
        .await
    }

    async fn send_req(&self, req: DiscoveryRequest) -> Result<()> {
        self.tx.send(req).await.context("stream closed")
    }

    async fn next(&mut self, limit: Duration) -> Result<Option<DiscoveryResponse>> {
        match tokio::time::timeout(limit, self.rx.message()).await {
            Err(_) => Ok(None),
            Ok(r) => Ok(Some(r?.context("stream ended")?)),
        }
    }

    async fn expect(&mut self, what: &str) -> Result<DiscoveryResponse> {
        self.next(Duration::from_secs(15))
            .await?
            .with_context(|| format!("no response: {what}"))
    }

    /// ACKs `r`.
    async fn ack(&self, r: &DiscoveryResponse, names: &[&str]) -> Result<()> {
        self.send(&r.type_url, names, &r.version_info, &r.nonce)
            .await
    }
}

fn assignments(r: &DiscoveryResponse) -> Result<Vec<ClusterLoadAssignment>> {
    r.resources
        .iter()
        .map(|a| Ok(ClusterLoadAssignment::decode(a.value.as_slice())?))
        .collect()
}

/// (addr, weight, health) of an assignment's endpoints, sorted by addr.
fn members(cla: &ClusterLoadAssignment) -> Vec<(String, u32, HealthStatus)> {
    let mut out: Vec<_> = cla
        .endpoints
        .iter()
        .flat_map(|l| l.lb_endpoints.iter())
        .filter_map(|e| {
            let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                return None;
            };
            let Some(address::Address::SocketAddress(sa)) = ep.address.as_ref()?.address.as_ref()
            else {
                return None;
            };
            let port = match sa.port_specifier {
                Some(envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(p)) => p,
                _ => 0,
            };
            Some((
                format!("{}:{port}", sa.address),
                e.load_balancing_weight.map_or(0, |w| w.value),
                HealthStatus::try_from(e.health_status).unwrap_or(HealthStatus::Unknown),
            ))
        })
        .collect();
    out.sort();
    out
}

fn xds_config(port: u16) -> controller::Config {
    controller::Config {
        xds_listen: Some(format!("127.0.0.1:{port}").parse().expect("addr")),
        ..fast_config()
    }
}

async fn wait_listening(addr: &str) -> Result<()> {
    eventually(Duration::from_secs(15), "listening", || async {
        std::net::TcpStream::connect(addr).ok().map(drop)
    })
    .await
}

async fn reweight(etcd: &Etcd, addr: &str, weight: u32) -> Result<()> {
    let mut c = etcd.client().await?;
    let key = common::key(SVC, addr);
    let r = c.get(key.clone(), None).await?;
    let kv = r.kvs().first().context("no key")?;
    let mut v: serde_json::Value = serde_json::from_slice(kv.value())?;
    v["weight"] = weight.into();
    c.put(
        key,
        v.to_string(),
        Some(PutOptions::new().with_lease(kv.lease())),
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn ads_protocol_acks_nacks_nonces_absence_and_subscriptions() -> Result<()> {
    let etcd = Etcd::start().await?;
    let (p1, p2) = (free_port(), free_port());
    let _s1 = greet_server(&etcd, p1, &["--weight", "100"])?;
    let _s2 = greet_server(&etcd, p2, &["--weight", "200"])?;
    let (a1, a2) = (format!("127.0.0.1:{p1}"), format!("127.0.0.1:{p2}"));
    wait_listening(&a1).await?;
    wait_listening(&a2).await?;
    let xds_port = free_port();
    let ctl = Ctl::start(&etcd, xds_config(xds_port)).await?;
    let xds = format!("127.0.0.1:{xds_port}");
    for a in [&a1, &a2] {
        ctl.wait_member(SVC, a, Duration::from_secs(15), "probed healthy", |m| {
            m["healthy"] == true
        })
        .await?;
    }

    let mut ads = Ads::open(&xds).await?;
    // LDS and CDS wildcard (empty names).
    ads.send(LDS, &[], "", "").await?;
    let lds = ads.expect("LDS").await?;
    ensure!(lds.type_url == LDS && lds.resources.len() == 1, "{lds:?}");
    let l = Listener::decode(lds.resources[0].value.as_slice())?;
    ensure!(l.name == SVC && l.api_listener.is_some());
    ads.ack(&lds, &[]).await?;
    ads.send(CDS, &[], "", "").await?;
    let cds = ads.expect("CDS").await?;
    let c = Cluster::decode(cds.resources[0].value.as_slice())?;
    ensure!(
        c.name == SVC
            && c.typed_extension_protocol_options
                .contains_key("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    );
    ads.ack(&cds, &[]).await?;

    // EDS for a service and one that does not exist: only the first.
    ads.send(EDS, &[SVC, "nope"], "", "").await?;
    let eds = ads.expect("EDS").await?;
    let got = assignments(&eds)?;
    ensure!(
        got.len() == 1 && got[0].cluster_name == SVC,
        "absent resource sent: {got:?}"
    );
    ensure!(
        eventually_weights(&members(&got[0]), &[(&a1, 100), (&a2, 200)]),
        "{:?}",
        members(&got[0])
    );
    ads.ack(&eds, &[SVC, "nope"]).await?;

    // A change is pushed with a new version and nonce.
    reweight(&etcd, &a1, 300).await?;
    let eds2 = ads.expect("EDS after a reweight").await?;
    ensure!(
        eds2.type_url == EDS && eds2.version_info != eds.version_info && eds2.nonce != eds.nonce
    );
    ensure!(
        members(&assignments(&eds2)?[0])
            .iter()
            .any(|(a, w, _)| *a == a1 && *w == 300),
        "{:?}",
        members(&assignments(&eds2)?[0])
    );

    // NACK: nothing is resent for the rejected version.
    ads.send_req(DiscoveryRequest {
        type_url: EDS.into(),
        resource_names: vec![SVC.into(), "nope".into()],
        version_info: eds.version_info.clone(),
        response_nonce: eds2.nonce.clone(),
        error_detail: Some(rpc::Status {
            code: 3,
            message: "test rejects this".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await?;
    // A stale nonce (the first EDS response's) asking for nothing is
    // ignored whole: the subscription stays.
    ads.send(EDS, &[], &eds.version_info, &eds.nonce).await?;
    if let Some(r) = ads.next(Duration::from_millis(800)).await? {
        bail!(
            "a NACK or a stale request got a response: {} {:?}",
            r.type_url,
            assignments(&r).map(|a| a.iter().map(members).collect::<Vec<_>>())
        );
    }
    // The next change still reaches the (unchanged) subscription.
    reweight(&etcd, &a1, 50).await?;
    let eds3 = ads.expect("EDS after NACK").await?;
    ensure!(eds3.type_url == EDS, "{eds3:?}");
    ensure!(members(&assignments(&eds3)?[0])
        .iter()
        .any(|(a, w, _)| *a == a1 && *w == 50));
    ads.ack(&eds3, &[SVC, "nope"]).await?;

    // Subscription change: drop the service -> nothing sent on change.
    ads.send(EDS, &["nope"], &eds3.version_info, &eds3.nonce)
        .await?;
    reweight(&etcd, &a1, 60).await?;
    // LDS and CDS are wildcard and did not change, EDS only asks for
    // "nope": a weight change must not produce any response.
    ensure!(
        ads.next(Duration::from_millis(800)).await?.is_none(),
        "push to an unsubscribed resource"
    );

    // Unknown type_url: warned and ignored; the stream lives on.
    ads.send(
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
        &["x"],
        "",
        "",
    )
    .await?;
    ads.send(EDS, &[SVC], &eds3.version_info, &eds3.nonce)
        .await?;
    let eds4 = ads.expect("EDS after an unknown type").await?;
    ensure!(eds4.type_url == EDS && assignments(&eds4)?.len() == 1);

    // No type_url: the stream ends with INVALID_ARGUMENT.
    ads.send("", &[], "", "").await?;
    match tokio::time::timeout(Duration::from_secs(5), ads.rx.message()).await? {
        Err(status) => ensure!(status.code() == tonic::Code::InvalidArgument, "{status:?}"),
        Ok(other) => bail!("expected INVALID_ARGUMENT, got {other:?}"),
    }

    // Delta xDS: a clear UNIMPLEMENTED.
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await?;
    let (_tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let delta = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await;
    ensure!(
        matches!(&delta, Err(s) if s.code() == tonic::Code::Unimplemented),
        "{delta:?}"
    );

    // Garbage on the wire: a clear error for that stream, the server lives.
    garbage(&xds).await?;
    let mut again = Ads::open(&xds).await?;
    again.send(CDS, &[], "", "").await?;
    again.expect("CDS after garbage").await?;

    // What happened is in /metrics: pushes, ACKs, the NACK, the streams
    // ended for bad input, the stream still open; promtool accepts it.
    let text = ctl.metrics().await?;
    etcd_lb_testkit::metrics::promtool_check(&text)?;
    let eds = r#"type="eds""#;
    let at_least = |name: &str, labels: &str, n: f64| -> Result<()> {
        let v = common::sample(&text, name, labels);
        ensure!(
            v.is_some_and(|v| v >= n),
            "{name}{labels} = {v:?}, want >= {n}\n{text}"
        );
        Ok(())
    };
    at_least("controller_xds_responses_total", eds, 4.0)?;
    at_least("controller_xds_acks_total", eds, 1.0)?;
    at_least("controller_xds_nacks_total", eds, 1.0)?;
    at_least("controller_xds_bad_requests_total", "", 2.0)?;
    at_least("controller_xds_streams", "", 1.0)?;
    at_least("controller_xds_snapshots_total", "", 1.0)?;
    ctl.stop().await
}

fn eventually_weights(got: &[(String, u32, HealthStatus)], want: &[(&str, u32)]) -> bool {
    want.iter()
        .all(|(a, w)| got.iter().any(|(ga, gw, _)| ga == a && gw == w))
}

/// Sends bytes that are not a DiscoveryRequest on an ADS stream.
async fn garbage(xds: &str) -> Result<()> {
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    #[derive(Default)]
    struct Raw;
    struct RawEnc;
    struct RawDec;
    impl Encoder for RawEnc {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            use bytes::BufMut;
            dst.put_slice(&item);
            Ok(())
        }
    }
    impl Decoder for RawDec {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
            use bytes::Buf;
            let mut v = vec![0; src.remaining()];
            src.copy_to_slice(&mut v);
            Ok(Some(v))
        }
    }
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))?
        .connect()
        .await?;
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
    );
    // Field 4 (type_url) claims 200 bytes and has 3: not a message.
    let req = tonic::Request::new(tokio_stream::iter(vec![vec![
        0x22, 0xc8, 0x01, b'a', b'b', b'c',
    ]]));
    let mut resp = grpc.streaming(req, path, Raw).await?.into_inner();
    match tokio::time::timeout(Duration::from_secs(5), resp.message()).await? {
        Err(status) => {
            ensure!(status.code() == tonic::Code::InvalidArgument, "{status:?}");
            ensure!(
                status.message().contains("unreadable DiscoveryRequest"),
                "{status:?}"
            );
        }
        Ok(other) => bail!("garbage got {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn services_view_and_xds_agree_on_members_weights_and_health() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ports = [free_port(), free_port(), free_port()];
    let _s0 = greet_server(&etcd, ports[0], &["--weight", "100"])?;
    let _s1 = greet_server(&etcd, ports[1], &["--weight", "0"])?;
    let mut s2 = greet_server(&etcd, ports[2], &["--weight", "300"])?;
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    for a in &addrs {
        wait_listening(a).await?;
    }
    let xds_port = free_port();
    let cfg = controller::Config {
        // Keep the killed server's key: its health is what is compared.
        dead_after: Duration::from_secs(600),
        ..xds_config(xds_port)
    };
    let ctl = Ctl::start(&etcd, cfg).await?;
    for a in &addrs {
        ctl.wait_member(SVC, a, Duration::from_secs(15), "probed", |m| {
            m["last_probe"].is_string()
        })
        .await?;
    }
    s2.kill();
    ctl.wait_member(
        SVC,
        &addrs[2],
        Duration::from_secs(15),
        "killed one failing",
        |m| m["status"] == "failed",
    )
    .await?;

    let mut ads = Ads::open(&format!("127.0.0.1:{xds_port}")).await?;
    ads.send(EDS, &[SVC], "", "").await?;
    let mut latest = ads.expect("EDS").await?;
    // Take the newest state (a probe pass may have landed in between).
    while let Some(r) = ads.next(Duration::from_millis(600)).await? {
        latest = r;
    }
    let xds = members(&assignments(&latest)?[0]);
    let (_, view) = ctl.get(&format!("/services/{SVC}")).await?;
    let view_members = view["members"].as_array().context("members")?;
    ensure!(
        xds.len() == view_members.len(),
        "xds {xds:?} vs view {view}"
    );
    for m in view_members {
        let addr = m["addr"].as_str().unwrap_or_default();
        let (_, w, h) = xds
            .iter()
            .find(|(a, _, _)| a == addr)
            .context("member missing in xds")?;
        let weight = m["weight"].as_u64().unwrap_or(0) as u32;
        ensure!(*w == weight.max(1), "{addr}: weight {w} vs {weight}");
        let want = match (weight, m["status"].as_str()) {
            (0, _) => HealthStatus::Draining,
            (_, Some("failed")) => HealthStatus::Unhealthy,
            (_, Some("serving")) => HealthStatus::Healthy,
            other => bail!("unexpected member state {other:?}: {m}"),
        };
        ensure!(*h == want, "{addr}: xds says {h:?}, /services says {m}");
    }
    ensure!(
        xds.iter().any(|(_, _, h)| *h == HealthStatus::Draining)
            && xds.iter().any(|(_, _, h)| *h == HealthStatus::Unhealthy),
        "want one draining and one unhealthy member: xds {xds:?}, view {view}"
    );
    ctl.stop().await
}

/// A greet-server on a short lease, so an etcd outage outlives it.
fn short_lease_server(etcd: &Etcd, port: u16, weight: u32) -> Result<Proc> {
    Proc::spawn(
        &format!("greet-server:{port}"),
        etcd_lb_testkit::bin_path("greet-server"),
        &[
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--etcd-endpoints".to_owned(),
            etcd.endpoint(),
            "--ttl".to_owned(),
            "2s".to_owned(),
            "--weight".to_owned(),
            weight.to_string(),
        ],
        &[],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_before_the_first_sync_and_nothing_empty_while_etcd_is_down() -> Result<()> {
    let mut etcd = Etcd::start().await?;
    let ports = [free_port(), free_port()];
    let _s: Vec<Proc> = ports
        .iter()
        .zip([100, 200])
        .map(|(p, w)| short_lease_server(&etcd, *p, w))
        .collect::<Result<_>>()?;
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    for a in &addrs {
        wait_listening(a).await?;
    }
    // Both registered before etcd goes away.
    eventually(Duration::from_secs(15), "both registered", || async {
        let mut c = etcd.client().await.ok()?;
        let r = c
            .get(
                format!("/ns/{SVC}/"),
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .ok()?;
        (r.kvs().len() == 2).then_some(())
    })
    .await?;

    // A controller started while etcd is down answers nothing.
    etcd.stop();
    let xds_port = free_port();
    let xds = format!("127.0.0.1:{xds_port}");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let ctl = Ctl::spawn_on(&etcd, xds_config(xds_port), listener)?;
    wait_listening(&xds).await?;
    let mut ads = Ads::open(&xds).await?;
    ads.send(CDS, &[], "", "").await?;
    ads.send(EDS, &[SVC], "", "").await?;
    ensure!(
        ads.next(Duration::from_secs(2)).await?.is_none(),
        "a controller that never synced answered"
    );

    // etcd back: the first answers carry the whole fleet.
    etcd.restart(false).await?;
    let mut seen = Vec::new();
    let first = ads.expect("CDS or EDS after the first sync").await?;
    seen.push(first);
    while seen.iter().all(|r| r.type_url != EDS) {
        seen.push(ads.expect("EDS after the first sync").await?);
    }
    let eds = seen.iter().find(|r| r.type_url == EDS).context("eds")?;
    ensure!(
        members(&assignments(eds)?[0]).len() == 2,
        "{:?}",
        members(&assignments(eds)?[0])
    );
    for r in &seen {
        ads.ack(r, if r.type_url == EDS { &[SVC] } else { &[] })
            .await?;
    }

    // etcd down longer than the servers' 2 s TTL: whatever is pushed
    // meanwhile (probe results) still holds both members.
    etcd.stop();
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while tokio::time::Instant::now() < until {
        if let Some(r) = ads.next(Duration::from_millis(500)).await? {
            ensure!(
                !r.resources.is_empty(),
                "an empty {} was pushed while etcd was down",
                r.type_url
            );
            if r.type_url == EDS {
                let m = members(&assignments(&r)?[0]);
                ensure!(
                    m.len() == 2,
                    "a shrunk assignment while etcd was down: {m:?}"
                );
            }
            ads.ack(&r, if r.type_url == EDS { &[SVC] } else { &[] })
                .await?;
        }
    }

    // etcd back: changes flow again. (The servers re-register on their
    // own and may rewrite their values, so the change is a new member.)
    etcd.restart(false).await?;
    let p3 = free_port();
    let _s3 = short_lease_server(&etcd, p3, 300)?;
    let a3 = format!("127.0.0.1:{p3}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = ads.expect("EDS after etcd returned").await?;
        if r.type_url == EDS {
            let m = members(&assignments(&r)?[0]);
            ensure!(m.len() >= 2, "shrunk after etcd returned: {m:?}");
            if m.iter().any(|(a, w, _)| *a == a3 && *w == 300) {
                break;
            }
        }
        ads.ack(&r, if r.type_url == EDS { &[SVC] } else { &[] })
            .await?;
        ensure!(
            tokio::time::Instant::now() < deadline,
            "the new member never arrived"
        );
    }
    ctl.stop().await
}

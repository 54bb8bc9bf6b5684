//! `controller drain|undrain|weight|overrides` end to end (issue 35): the
//! real controller binary writes an override beside the registry, a
//! client of the library under load sends the drained endpoint no new
//! call within 1 s and fails no call, undrain brings it back; an override
//! follows the registration it was made for unless --sticky; bad input
//! says what is wrong.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::{fast_config, greet_server, operate as ctl_cmd, Ctl};
use envoy_types::pb::envoy::config::core::v3::HealthStatus;
use envoy_types::pb::envoy::config::endpoint::v3::{lb_endpoint, ClusterLoadAssignment};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use etcd_lb::{BalancerConfig, CancellationToken, DiscoveryConfig, EtcdConfig, ServiceName};
use etcd_lb_testkit::{eventually, free_port, Etcd};
use greet_proto::{GreetClient, GreetRequest};
use prost::Message;

const SVC: &str = "greet_service";

/// Calls back to back on a few tasks, recording (time, server, ok).
type Log = Arc<Mutex<Vec<(Instant, String, bool)>>>;

fn load(balancer: etcd_lb::Balancer, stop: CancellationToken) -> Log {
    let log: Log = Arc::default();
    for _ in 0..4 {
        let (mut client, log, stop) = (
            GreetClient::new(balancer.clone()),
            log.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let r = client.morning(GreetRequest { name: "op".into() }).await;
                let entry = match r {
                    Ok(r) => (Instant::now(), r.into_inner().from, true),
                    Err(s) => (Instant::now(), s.message().to_owned(), false),
                };
                log.lock().unwrap().push(entry);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
    }
    log
}

fn since(log: &Log, t: Instant) -> (HashMap<String, usize>, Vec<String>) {
    let mut by = HashMap::new();
    let mut failed = Vec::new();
    for (at, who, ok) in log.lock().unwrap().iter().filter(|(at, ..)| *at >= t) {
        let _ = at;
        if *ok {
            *by.entry(who.clone()).or_default() += 1;
        } else {
            failed.push(who.clone());
        }
    }
    (by, failed)
}

#[tokio::test(flavor = "multi_thread")]
async fn drain_under_load_moves_calls_in_a_second_and_undrain_brings_them_back() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ports = [free_port(), free_port()];
    let _servers: Vec<_> = ports
        .iter()
        .map(|p| greet_server(&etcd, *p, &[]))
        .collect::<Result<_>>()?;
    let (a, b) = (
        format!("127.0.0.1:{}", ports[0]),
        format!("127.0.0.1:{}", ports[1]),
    );
    let stop = CancellationToken::new();
    let (balancer, discovery) = etcd_lb::connect(
        EtcdConfig::plain([etcd.endpoint()]),
        DiscoveryConfig::new(ServiceName::new(SVC)?),
        BalancerConfig::default(),
        stop.clone(),
    );
    discovery.wait_synced(Duration::from_secs(10)).await?;
    eventually(Duration::from_secs(15), "both servers seen", || async {
        (balancer.len() == 2).then_some(())
    })
    .await?;
    let log = load(balancer.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (code, out, err) = ctl_cmd(
        &etcd,
        &["drain", SVC, &a, "--reason", "maintenance", "--by", "ops"],
    )?;
    ensure!(code == 0, "drain: {code} {out} {err}");
    ensure!(out.contains("drained") && out.contains("lease"), "{out}");
    let drained_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (by, failed) = since(&log, drained_at + Duration::from_secs(1));
    ensure!(
        failed.is_empty(),
        "calls failed during the drain: {failed:?}"
    );
    ensure!(
        by.get(&a).copied().unwrap_or(0) == 0,
        "the drained endpoint got calls: {by:?}"
    );
    ensure!(
        by.get(&b).copied().unwrap_or(0) > 50,
        "the other got too few: {by:?}"
    );

    let (code, out, _) = ctl_cmd(&etcd, &["overrides", SVC])?;
    ensure!(
        code == 0
            && out.contains(&a)
            && out.contains("drain")
            && out.contains("ops")
            && out.contains("maintenance"),
        "{out}"
    );
    let (code, out, _) = ctl_cmd(&etcd, &["overrides", "--json"])?;
    let rows: serde_json::Value = serde_json::from_str(&out)?;
    ensure!(
        code == 0
            && rows[0]["effective_weight"] == 0
            && rows[0]["registered_weight"] == 100
            && rows[0]["applies"] == "yes",
        "{rows}"
    );

    let (code, out, err) = ctl_cmd(&etcd, &["undrain", SVC, &a])?;
    ensure!(code == 0, "undrain: {out} {err}");
    let back_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (by, failed) = since(&log, back_at + Duration::from_secs(1));
    ensure!(failed.is_empty(), "calls failed after undrain: {failed:?}");
    ensure!(
        by.get(&a).copied().unwrap_or(0) > 20,
        "the endpoint did not come back: {by:?}"
    );
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_override_follows_its_registration_unless_sticky_and_bad_input_says_why() -> Result<()> {
    let etcd = Etcd::start().await?;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut server = greet_server(&etcd, port, &[])?;
    let stop = CancellationToken::new();
    let (balancer, discovery) = etcd_lb::connect(
        EtcdConfig::plain([etcd.endpoint()]),
        DiscoveryConfig::new(ServiceName::new(SVC)?),
        BalancerConfig::default(),
        stop.clone(),
    );
    discovery.wait_synced(Duration::from_secs(10)).await?;
    let parsed: etcd_lb::Addr = addr.parse()?;
    let weight = |want: u32| {
        let (balancer, parsed) = (balancer.clone(), parsed.clone());
        async move {
            eventually(
                Duration::from_secs(15),
                &format!("weight {want}"),
                || async { (balancer.weight_of(&parsed) == Some(want)).then_some(()) },
            )
            .await
        }
    };
    weight(100).await?;

    let (code, out, err) = ctl_cmd(&etcd, &["weight", SVC, &addr, "7"])?;
    ensure!(code == 0, "{out} {err}");
    weight(7).await?;

    // A new process at the address (new lease): the override lapses, and
    // the listing says why.
    server.signal(nix::sys::signal::Signal::SIGTERM)?;
    server.wait_exit(Duration::from_secs(20)).await?;
    let _server = greet_server(&etcd, port, &[])?;
    weight(100)
        .await
        .context("the override outlived its registration")?;
    let (_, out, _) = ctl_cmd(&etcd, &["overrides", SVC])?;
    ensure!(out.contains("other_incarnation"), "{out}");

    // Sticky: any registration at the address.
    let (code, out, err) = ctl_cmd(&etcd, &["drain", SVC, &addr, "--sticky"])?;
    ensure!(code == 0 && out.contains("sticky"), "{out} {err}");
    weight(0).await?;

    // Bad input.
    let (code, _, err) = ctl_cmd(&etcd, &["drain", SVC, "127.0.0.1:1"])?;
    ensure!(
        code == 1 && err.contains("nothing is registered") && err.contains("--force"),
        "{code} {err}"
    );
    let (code, out, _) = ctl_cmd(&etcd, &["drain", SVC, "127.0.0.1:1", "--force"])?;
    ensure!(code == 0 && out.contains("pre-staged"), "{out}");
    let (code, _, err) = ctl_cmd(&etcd, &["weight", SVC, &addr, "20000"])?;
    ensure!(
        code == 2 && err.contains("above the maximum"),
        "{code} {err}"
    );
    let (code, _, err) = ctl_cmd(&etcd, &["drain", "Bad Name", &addr])?;
    ensure!(code == 2, "{code} {err}");
    let (code, _, err) = ctl_cmd(&etcd, &["undrain", SVC, "127.0.0.1:2"])?;
    ensure!(code == 2 && err.contains("no override"), "{code} {err}");
    stop.cancel();
    Ok(())
}

/// The health and weight xDS gives `port`'s endpoint of `SVC` now (a fresh
/// ADS stream's first EDS response).
async fn eds_of(xds: &str, port: u16) -> Result<Option<(HealthStatus, u32)>> {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}")).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(DiscoveryRequest {
        type_url: "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment".into(),
        resource_names: vec![SVC.into()],
        ..Default::default()
    })
    .await?;
    let mut stream = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let resp = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await??
        .context("no EDS response")?;
    for any in &resp.resources {
        let cla = ClusterLoadAssignment::decode(any.value.as_slice())?;
        for l in &cla.endpoints {
            for e in &l.lb_endpoints {
                let Some(lb_endpoint::HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    continue;
                };
                let text = format!("{ep:?}");
                if text.contains(&format!("PortValue({port})")) {
                    let health =
                        HealthStatus::try_from(e.health_status).unwrap_or(HealthStatus::Unknown);
                    return Ok(Some((
                        health,
                        l.load_balancing_weight.map_or(0, |w| w.value),
                    )));
                }
            }
        }
    }
    Ok(None)
}

/// `/services` shows registered and effective weights and the override
/// (who, why, whether it applies); xDS clients get the effective weight
/// (a drain as DRAINING), from the same view.
#[tokio::test(flavor = "multi_thread")]
async fn the_view_and_xds_apply_the_override() -> Result<()> {
    let etcd = Etcd::start().await?;
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let _server = greet_server(&etcd, port, &[])?;
    let xds_port = free_port();
    let xds = format!("127.0.0.1:{xds_port}");
    let ctl = Ctl::start(
        &etcd,
        controller::Config {
            xds_listen: Some(xds.parse()?),
            ..fast_config()
        },
    )
    .await?;
    ctl.wait_member(
        SVC,
        &addr,
        Duration::from_secs(15),
        "the server probed",
        |m| m["healthy"] == true,
    )
    .await?;
    ensure!(
        eds_of(&xds, port).await? == Some((HealthStatus::Healthy, 100)),
        "before: {:?}",
        eds_of(&xds, port).await?
    );

    let (code, out, err) = ctl_cmd(
        &etcd,
        &["drain", SVC, &addr, "--reason", "disk", "--by", "ops"],
    )?;
    ensure!(code == 0, "{out} {err}");
    let m = ctl
        .wait_member(
            SVC,
            &addr,
            Duration::from_secs(10),
            "the drain in the view",
            |m| m["weight"] == 0,
        )
        .await?;
    ensure!(
        m["registered_weight"] == 100
            && m["override"]["drain"] == true
            && m["override"]["by"] == "ops"
            && m["override"]["reason"] == "disk"
            && m["override"]["applies"] == "yes",
        "{m}"
    );
    eventually(Duration::from_secs(10), "DRAINING over xDS", || async {
        eds_of(&xds, port)
            .await
            .ok()
            .flatten()
            .filter(|(h, _)| *h == HealthStatus::Draining)
    })
    .await?;

    let (code, _, _) = ctl_cmd(&etcd, &["weight", SVC, &addr, "40"])?;
    ensure!(code == 0);
    eventually(Duration::from_secs(10), "weight 40 over xDS", || async {
        eds_of(&xds, port)
            .await
            .ok()
            .flatten()
            .filter(|w| *w == (HealthStatus::Healthy, 40))
    })
    .await?;
    let (code, _, _) = ctl_cmd(&etcd, &["undrain", SVC, &addr])?;
    ensure!(code == 0);
    let m = ctl
        .wait_member(
            SVC,
            &addr,
            Duration::from_secs(10),
            "the override gone",
            |m| m["weight"] == 100 && m.get("override").is_none(),
        )
        .await?;
    ensure!(m["registered_weight"] == 100, "{m}");
    ctl.stop().await
}

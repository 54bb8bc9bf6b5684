//! Drains never cut a call: a server that drains (SIGTERM: weight 0, then
//! GOAWAY, then it finishes what it has) while a slow call runs on it
//! answers that call, and the client takes nothing on the draining
//! connection (a refused health check there) as proof of death. Against
//! the real greet-server binary and a real etcd, with the balancer fed by
//! discovery as greet-client's is.

use std::time::{Duration, Instant};

use anyhow::Result;
use etcd_lb::{Balancer, BalancerConfig, Discovery, DiscoveryConfig, RetryPolicy};
use etcd_lb::{CancellationToken, EtcdConfig, ServiceName};
use etcd_lb_testkit::{bin_path, free_port, Etcd, Proc};
use greet_proto::paths::{MORNING, NIGHT};
use greet_proto::{GreetClient, GreetRequest};
use nix::sys::signal::Signal;

fn server(etcd: &Etcd, port: u16, extra: &[&str]) -> Result<Proc> {
    let mut args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--etcd-endpoints",
        &etcd.endpoint(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(
        &format!("server:{port}"),
        bin_path("greet-server"),
        &args,
        &[("RUST_LOG", "info")],
    )
}

/// greet-client's balancer with default flags, fed by discovery.
async fn client(etcd: &Etcd, servers: usize, cancel: &CancellationToken) -> Result<Balancer> {
    client_with(etcd, servers, cancel, None).await
}

/// The same, speaking TLS to the servers when `tls` is given.
async fn client_with(
    etcd: &Etcd,
    servers: usize,
    cancel: &CancellationToken,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<Balancer> {
    let bal = Balancer::new(BalancerConfig {
        retry: RetryPolicy::idempotent([MORNING, NIGHT]),
        tls,
        ..BalancerConfig::new("greet_service")
    });
    let discovery = Discovery::spawn(
        EtcdConfig::plain([etcd.endpoint()]),
        DiscoveryConfig::new(ServiceName::new("greet_service")?),
        bal.clone(),
        cancel.clone(),
    );
    discovery.wait_synced(Duration::from_secs(10)).await?;
    let started = Instant::now();
    while bal.endpoints().iter().filter(|e| e.weight > 0).count() < servers {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(20),
            "servers never registered: {:?}",
            bal.endpoints()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(bal)
}

async fn call(bal: &Balancer, timeout: Duration) -> Result<String, tonic::Status> {
    let mut c = GreetClient::new(bal.clone());
    let mut req = tonic::Request::new(GreetRequest { name: "t".into() });
    req.set_timeout(timeout);
    c.morning(req).await.map(|r| r.into_inner().from)
}

/// A 4 s call in flight on a server (started with `tls_args` more) that
/// gets SIGTERM 1.5 s in (`--drain 1s`, so its GOAWAY comes at 2.5 s):
/// it must complete, answered once.
async fn slow_call_across_drain(
    tls_args: &[&str],
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<()> {
    let etcd = Etcd::start().await?;
    let port = free_port();
    let mut args = vec![
        "--latency",
        "4s",
        "--drain",
        "1s",
        "--shutdown-timeout",
        "20s",
    ];
    args.extend_from_slice(tls_args);
    let mut srv = server(&etcd, port, &args)?;
    let cancel = CancellationToken::new();
    let bal = client_with(&etcd, 1, &cancel, tls).await?;
    let started = Instant::now();
    let running = tokio::spawn({
        let bal = bal.clone();
        async move { call(&bal, Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    srv.signal(Signal::SIGTERM)?;
    let answer = running.await?;
    let took = started.elapsed();
    let code = srv.wait_exit(Duration::from_secs(20)).await?;
    cancel.cancel();
    assert_eq!(
        answer.as_deref().map_err(|s| s.to_string()),
        Ok(format!("127.0.0.1:{port}").as_str()),
        "the call completes across the drain\nserver log:\n{}",
        srv.log()
    );
    assert!(
        took < Duration::from_millis(5500),
        "answered once, not sent again: {took:?}"
    );
    assert_eq!(code, Some(0), "the server exits cleanly");
    Ok(())
}

/// Issue 34, point 2 (must-show 4, first half): the slow call completes.
/// Before the fix the per-try health check sent after the GOAWAY was
/// refused, the client gave the call up as lost and its retry found only
/// the draining server.
#[tokio::test]
async fn a_slow_call_in_flight_across_its_servers_drain_completes() -> Result<()> {
    slow_call_across_drain(&[], None).await
}

/// The same over TLS: there the balancer's connection is a tonic
/// `Channel`, which hides its connection's GOAWAY and reconnects by itself,
/// so the health check sent after the drain's GOAWAY goes to a listener
/// already closed and is refused. A refusal is not silence: the call runs
/// on to its answer (a silent peer is still cut by the probe's timeout,
/// a dead one by keepalive).
#[tokio::test]
async fn a_slow_call_in_flight_across_its_tls_servers_drain_completes() -> Result<()> {
    let pki = etcd_lb_testkit::Pki::new("drain-ca")?;
    let leaf = pki.issue("greet-server")?;
    let (cert, key) = (
        leaf.cert.display().to_string(),
        leaf.key.display().to_string(),
    );
    let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(
        tonic::transport::Certificate::from_pem(std::fs::read(&pki.ca)?),
    );
    slow_call_across_drain(&["--tls-cert", &cert, "--tls-key", &key], Some(tls)).await
}

/// Must-show 4, second half: a rolling restart (SIGTERM, wait for the
/// exit, start again on the same port) of three servers whose calls take
/// 2 s, under steady load: no call fails, and none is sent twice (a
/// call abandoned on a draining connection and retried elsewhere would
/// take twice as long).
#[tokio::test]
async fn a_rolling_restart_of_slow_servers_loses_no_call() -> Result<()> {
    let etcd = Etcd::start().await?;
    let ports = [free_port(), free_port(), free_port()];
    let flags = [
        "--latency",
        "2s",
        "--drain",
        "1s",
        "--shutdown-timeout",
        "20s",
    ];
    let mut servers: Vec<Proc> = ports
        .iter()
        .map(|p| server(&etcd, *p, &flags))
        .collect::<Result<_>>()?;
    let cancel = CancellationToken::new();
    let bal = client(&etcd, 3, &cancel).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for _ in 0..6 {
        let (bal, stop) = (bal.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut longest) = (0, Vec::new(), Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                match call(&bal, Duration::from_secs(10)).await {
                    Ok(_) => ok += 1,
                    Err(s) => failed.push(s.to_string()),
                }
                longest = longest.max(started.elapsed());
            }
            (ok, failed, longest)
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, port) in ports.iter().enumerate() {
        servers[i].signal(Signal::SIGTERM)?;
        let code = servers[i].wait_exit(Duration::from_secs(30)).await?;
        assert_eq!(
            code,
            Some(0),
            "server {i} exits cleanly:\n{}",
            servers[i].log()
        );
        servers[i] = server(&etcd, *port, &flags)?;
        // Back in the registry and the balancer before the next one goes.
        let started = Instant::now();
        while bal
            .endpoints()
            .iter()
            .filter(|e| e.weight > 0 && e.up)
            .count()
            < 3
        {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(20),
                "{:?}",
                bal.endpoints()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed, mut longest) = (0, Vec::new(), Duration::ZERO);
    for t in load {
        let (o, f, l) = t.await?;
        ok += o;
        failed.extend(f);
        longest = longest.max(l);
    }
    cancel.cancel();
    eprintln!(
        "rolling restart: {ok} calls ok, {} failed, longest {longest:?}",
        failed.len()
    );
    assert!(failed.is_empty(), "no call lost: {failed:?}");
    assert!(
        longest < Duration::from_millis(3500),
        "no call abandoned and sent again: the longest took {longest:?}"
    );
    assert!(ok >= 30, "the load ran: {ok}");
    Ok(())
}

//! Shared helpers of the reliability tests: spawn the real binaries with a
//! given set of etcd endpoints, read the client's load report, and look at
//! the registry in etcd.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use etcd_client::{Client, GetOptions};
use etcd_lb_testkit::{bin_path, eventually, Proc};
use serde_json::Value;

/// The registry prefix every test here uses (the default service).
pub const PREFIX: &str = "/ns/greet_service/";

/// Builds an argument vector.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A greet-server on `127.0.0.1:port`, registering in `endpoints`
/// (comma-separated), with extra flags and env.
pub fn server(endpoints: &str, port: u16, extra: &[&str], envs: &[(&str, &str)]) -> Result<Proc> {
    let mut a = args(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--etcd-endpoints",
        endpoints,
        "--drain",
        "1s",
    ]);
    a.extend(args(extra));
    let mut env = vec![("RUST_LOG", "info")];
    env.extend_from_slice(envs);
    Proc::spawn(
        &format!("server:{port}"),
        bin_path("greet-server"),
        &a,
        &env,
    )
}

/// greet-client in load mode for `duration` at `concurrency`, JSON report.
pub fn bench(
    endpoints: &str,
    concurrency: u32,
    duration: Duration,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Result<Proc> {
    let mut a = args(&[
        "bench",
        "--json",
        "--concurrency",
        &concurrency.to_string(),
        "--duration",
        &format!("{}ms", duration.as_millis()),
        "--etcd-endpoints",
        endpoints,
    ]);
    a.extend(args(extra));
    let mut env = vec![("RUST_LOG", "info")];
    env.extend_from_slice(envs);
    Proc::spawn("greet-client", bin_path("greet-client"), &a, &env)
}

/// greet-client in its default mode (a Morning+Night round every
/// `interval`, printing who answered).
pub fn greeter(
    endpoints: &str,
    interval: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Result<Proc> {
    let mut a = args(&["--interval", interval, "--etcd-endpoints", endpoints]);
    a.extend(args(extra));
    let mut env = vec![("RUST_LOG", "info")];
    env.extend_from_slice(envs);
    Proc::spawn("greet-client", bin_path("greet-client"), &a, &env)
}

/// A controller on `127.0.0.1:port` with fast probes.
pub fn controller(endpoints: &str, port: u16, dead_after: &str) -> Result<Proc> {
    let a = args(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--etcd-endpoints",
        endpoints,
        "--probe-interval",
        "500ms",
        "--probe-timeout",
        "400ms",
        "--dead-after",
        dead_after,
        "--election-ttl",
        "3s",
    ]);
    Proc::spawn(
        &format!("controller:{port}"),
        bin_path("controller"),
        &a,
        &[("RUST_LOG", "info")],
    )
}

/// Waits for a load run to end and parses its JSON report.
pub async fn report(p: &mut Proc, limit: Duration) -> Result<Value> {
    let code = p.wait_exit(limit).await?;
    ensure!(code == Some(0), "client failed ({code:?}):\n{}", p.log());
    p.json_report()
}

/// Calls the report credits to `addr`.
pub fn calls_of(report: &Value, addr: &str) -> u64 {
    report["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["addr"] == addr)
        .and_then(|e| e["calls"].as_u64())
        .unwrap_or(0)
}

/// Keys under `prefix` now.
pub async fn keys(c: &Client, prefix: &str) -> Result<BTreeSet<String>> {
    let mut c = c.clone();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        c.get(
            prefix,
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ),
    )
    .await
    .context("etcd get timed out")??;
    Ok(r.kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
        .collect())
}

/// The registry key of a server on `127.0.0.1:port`.
pub fn key_of(port: u16) -> String {
    format!("{PREFIX}127.0.0.1:{port}")
}

/// Waits until the keys under [`PREFIX`] are exactly `want`.
pub async fn wait_keys(c: &Client, want: &BTreeSet<String>, limit: Duration) -> Result<()> {
    eventually(limit, &format!("registry keys to be {want:?}"), || async {
        let have = keys(c, PREFIX).await.ok()?;
        (&have == want).then_some(())
    })
    .await
}

/// The ports' keys, as a set.
pub fn key_set(ports: &[u16]) -> BTreeSet<String> {
    ports.iter().map(|p| key_of(*p)).collect()
}

/// A plain HTTP/1.0 GET on loopback: (status, body). Enough for the
/// controller's JSON view without pulling an HTTP client into this crate.
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    http_request(port, "GET", path).await
}

/// Any method, no body (HTTP/1.0 on loopback): (status, body).
pub async fn http_request(port: u16, method: &str, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(
            format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        anyhow::Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .context("HTTP GET timed out")??;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A controller with extra flags and env (TLS, auth).
pub fn controller_with(
    endpoints: &str,
    port: u16,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> Result<Proc> {
    let mut a = args(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--etcd-endpoints",
        endpoints,
        "--probe-interval",
        "500ms",
        "--probe-timeout",
        "400ms",
        "--dead-after",
        "3s",
        "--election-ttl",
        "3s",
    ]);
    a.extend(args(extra));
    let mut env = vec![("RUST_LOG", "info")];
    env.extend_from_slice(envs);
    Proc::spawn(
        &format!("controller:{port}"),
        bin_path("controller"),
        &a,
        &env,
    )
}

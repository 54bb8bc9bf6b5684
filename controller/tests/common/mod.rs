//! Shared helpers of the controller's integration tests: an in-process
//! controller on `127.0.0.1:0`, greet-server processes, a "legacy" server
//! without a health service, and HTTP/etcd polling helpers.

#![allow(dead_code)]

use std::time::Duration;

use anyhow::{Context, Result};
use controller::Config;
use etcd_client::{Client, PutOptions};
use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_testkit::{eventually, free_port, put_in_txns, Etcd, Proc};
use greet_proto::GreetServer;
use greet_server::GreetService;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// Short timings so tests finish quickly.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(200);
pub const DEAD_AFTER: Duration = Duration::from_secs(2);

/// A test config: fast probes, short election TTL.
pub fn fast_config() -> Config {
    Config {
        probe_interval: PROBE_INTERVAL,
        probe_timeout: PROBE_INTERVAL,
        dead_after: DEAD_AFTER,
        election_ttl: Duration::from_secs(3),
        shutdown_timeout: Duration::from_secs(3),
        ..Config::new("/ns/")
    }
}

/// A controller running in this process.
pub struct Ctl {
    pub base: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), controller::Error>>,
    pub http: reqwest::Client,
}

impl Ctl {
    /// Starts `run` on `127.0.0.1:0` and waits until `/readyz` is 200.
    pub async fn start(etcd: &Etcd, cfg: Config) -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        Self::start_on(etcd, cfg, listener).await
    }

    /// Starts `run` on a listener the test bound itself.
    pub async fn start_on(
        etcd: &Etcd,
        cfg: Config,
        listener: tokio::net::TcpListener,
    ) -> Result<Self> {
        let ctl = Self::spawn_on(etcd, cfg, listener)?;
        ctl.wait_ready().await?;
        Ok(ctl)
    }

    /// Starts `run` on `listener` without waiting for it to be ready (for
    /// listeners that share an address: every one must be served before
    /// any request through it can be sure to be answered).
    pub fn spawn_on(etcd: &Etcd, cfg: Config, listener: tokio::net::TcpListener) -> Result<Self> {
        etcd_lb_registry::logging::init(etcd_lb_registry::logging::LogFormat::Text);
        let base = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(controller::run(
            cfg,
            EtcdConfig::plain([etcd.endpoint()]),
            listener,
            shutdown.clone(),
        ));
        Ok(Self {
            base,
            shutdown,
            task,
            http: reqwest::Client::new(),
        })
    }

    pub async fn wait_ready(&self) -> Result<()> {
        eventually(Duration::from_secs(15), "controller ready", || async {
            let r = self.http.get(self.url("/readyz")).send().await.ok()?;
            (r.status() == 200).then_some(())
        })
        .await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// GET returning (status, JSON body).
    pub async fn get(&self, path: &str) -> Result<(u16, Value)> {
        get_json(&self.http, &self.url(path)).await
    }

    /// GET /metrics as text.
    pub async fn metrics(&self) -> Result<String> {
        Ok(self
            .http
            .get(self.url("/metrics"))
            .send()
            .await?
            .text()
            .await?)
    }

    /// The member `addr` of `service` in `/services`, if present.
    pub async fn member(&self, service: &str, addr: &str) -> Result<Option<Value>> {
        let (_, v) = self.get("/services").await?;
        Ok(find_member(&v, service, addr))
    }

    /// Waits until member `addr` satisfies `pred`.
    pub async fn wait_member(
        &self,
        service: &str,
        addr: &str,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let pred = &pred;
        eventually(limit, what, || async move {
            self.member(service, addr)
                .await
                .ok()
                .flatten()
                .filter(|m| pred(m))
        })
        .await
    }

    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("controller did not stop within 10 s")???;
        Ok(())
    }
}

pub async fn get_json(http: &reqwest::Client, url: &str) -> Result<(u16, Value)> {
    let r = http.get(url).send().await?;
    let status = r.status().as_u16();
    let body = r.text().await?;
    let v = serde_json::from_str(&body).with_context(|| format!("{url}: not JSON: {body}"))?;
    Ok((status, v))
}

pub fn find_member(view: &Value, service: &str, addr: &str) -> Option<Value> {
    view["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == service)?["members"]
        .as_array()?
        .iter()
        .find(|m| m["addr"] == addr)
        .cloned()
}

/// The value of a sample line `name{labels} value` (labels exactly as
/// rendered, or `""` for none).
pub fn sample(metrics: &str, name: &str, labels: &str) -> Option<f64> {
    let head = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    metrics.lines().find_map(|l| {
        let (h, v) = l.rsplit_once(' ')?;
        (h == head).then(|| v.parse().ok()).flatten()
    })
}

pub fn key(service: &str, addr: &str) -> String {
    format!("/ns/{service}/{addr}")
}

/// A greet-server process on `port` with a lease far longer than any test,
/// so only the controller can remove its key.
pub fn greet_server(etcd: &Etcd, port: u16, extra: &[&str]) -> Result<Proc> {
    let mut args = vec![
        "--listen".to_owned(),
        format!("127.0.0.1:{port}"),
        "--etcd-endpoints".to_owned(),
        etcd.endpoint(),
        "--ttl".to_owned(),
        "300s".to_owned(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(
        &format!("greet-server:{port}"),
        etcd_lb_testkit::bin_path("greet-server"),
        &args,
        &[("RUST_LOG", "info")],
    )
}

/// Waits until `key` exists in etcd; returns its mod revision.
pub async fn wait_key(client: &Client, key: &str, limit: Duration) -> Result<i64> {
    eventually(limit, &format!("{key} in etcd"), || {
        let mut c = client.clone();
        async move {
            let r = c.get(key, None).await.ok()?;
            r.kvs().first().map(|kv| kv.mod_revision())
        }
    })
    .await
}

/// Whether `key` exists in etcd.
pub async fn exists(client: &Client, key: &str) -> Result<bool> {
    let mut c = client.clone();
    Ok(!c.get(key, None).await?.kvs().is_empty())
}

/// Waits until `key` is gone from etcd.
pub async fn wait_gone(client: &Client, key: &str, limit: Duration) -> Result<()> {
    eventually(limit, &format!("{key} to be deleted"), || {
        let c = client.clone();
        async move { (!exists(&c, key).await.ok()?).then_some(()) }
    })
    .await
}

/// Puts `value` under `key` with no lease.
pub async fn put_plain(client: &Client, key: &str, value: &str) -> Result<i64> {
    let mut c = client.clone();
    let r = c.put(key, value, None::<PutOptions>).await?;
    Ok(r.header().map_or(0, |h| h.revision()))
}

/// A Greet server with no health service (like the original Go servers),
/// in this process; its health check answers UNIMPLEMENTED.
pub async fn legacy_server() -> Result<(String, CancellationToken)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let stop = CancellationToken::new();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let server = tonic::transport::Server::builder()
        .add_service(GreetServer::new(GreetService::new(addr.clone())))
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    tokio::spawn(server);
    Ok((addr, stop))
}

/// An address on loopback where nothing listens.
pub fn dead_addr() -> String {
    format!("127.0.0.1:{}", etcd_lb_testkit::free_port())
}

/// One server-sent event: its name and its data.
pub struct Sse {
    pub event: String,
    pub data: String,
}

/// Reads the next event (skipping keep-alive comments), within `limit`.
pub async fn next_event(
    resp: &mut reqwest::Response,
    buf: &mut Vec<u8>,
    limit: Duration,
) -> Result<Sse> {
    loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let block: Vec<u8> = buf.drain(..end + 2).collect();
            let block = String::from_utf8(block).context("SSE block is not UTF-8")?;
            let mut event = String::from("message");
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim().to_owned();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.strip_prefix(' ').unwrap_or(d));
                }
            }
            if data.is_empty() {
                continue;
            }
            return Ok(Sse { event, data });
        }
        let chunk = tokio::time::timeout(limit, resp.chunk())
            .await
            .context("no SSE data in time")??
            .context("stream ended")?;
        buf.extend_from_slice(&chunk);
    }
}

/// The controller binary on free ports, HTTP and xDS.
pub struct CtlProc {
    pub proc: Proc,
    pub http: String,
    pub xds: String,
}

impl CtlProc {
    pub fn spawn(etcd: &Etcd, extra: &[&str]) -> Result<Self> {
        let (http, xds) = (free_port(), free_port());
        let mut args: Vec<String> = [
            "--listen",
            &format!("127.0.0.1:{http}"),
            "--xds-listen",
            &format!("127.0.0.1:{xds}"),
            "--etcd-endpoints",
            &etcd.endpoint(),
            // Probes of a thousand closed ports are not what is measured.
            "--probe-interval",
            "10s",
            "--probe-timeout",
            "100ms",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(
            &format!("controller:{http}"),
            env!("CARGO_BIN_EXE_controller"),
            &args,
            &[("RUST_LOG", "info")],
        )?;
        Ok(Self {
            proc,
            http: format!("http://127.0.0.1:{http}"),
            xds: format!("http://127.0.0.1:{xds}"),
        })
    }

    pub fn rss_mib(&self) -> Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))?;
        let kb: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .context("no VmRSS")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kb / 1024.0)
    }

    pub async fn metric(&self, name: &str) -> Result<f64> {
        let text = reqwest::get(format!("{}/metrics", self.http))
            .await?
            .text()
            .await?;
        Ok(sample(&text, name, "").unwrap_or(0.0))
    }

    pub async fn wait_ready(&self) -> Result<()> {
        eventually(Duration::from_secs(20), "controller ready", || async {
            reqwest::get(format!("{}/readyz", self.http))
                .await
                .ok()
                .filter(|r| r.status().is_success())
        })
        .await
        .map(|_| ())
        .with_context(|| self.proc.log())
    }
}

/// `n` lease-less members of `service` on closed loopback ports.
pub async fn fill(etcd: &Etcd, service: &str, n: u16, weight: u32) -> Result<()> {
    let c = etcd.client().await?;
    let kvs: Vec<(String, String)> = (0..n)
        .map(|i| {
            let addr = format!("127.0.0.{}:{}", 2 + i / 1000, 20_000 + i % 1000);
            (
                format!("/ns/{service}/{addr}"),
                format!(r#"{{"addr":"{addr}","version":"1.0.0","weight":{weight}}}"#),
            )
        })
        .collect();
    put_in_txns(&c, kvs, None).await?;
    Ok(())
}

/// Runs `controller <args>` (the operator's commands of the real binary)
/// against `etcd`: (exit code, stdout, stderr).
pub fn operate(etcd: &Etcd, args: &[&str]) -> Result<(i32, String, String)> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_controller"))
        .args(args)
        .env("ETCD_ENDPOINTS", etcd.endpoint())
        .output()?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// [`operate`], failing unless it exits 0; its standard output.
pub fn operate_ok(etcd: &Etcd, args: &[&str]) -> Result<String> {
    let (code, out, err) = operate(etcd, args)?;
    anyhow::ensure!(code == 0, "controller {args:?} exited {code}: {err}");
    Ok(out)
}

/// A client of the library for `service`, synced with etcd; cancel the
/// token to stop it.
pub async fn library_client(
    etcd: &Etcd,
    service: &str,
) -> Result<(etcd_lb::Balancer, etcd_lb::Discovery, CancellationToken)> {
    let cancel = CancellationToken::new();
    let (balancer, discovery) = etcd_lb::connect(
        EtcdConfig::plain([etcd.endpoint()]),
        etcd_lb::DiscoveryConfig::new(etcd_lb::ServiceName::new(service)?),
        etcd_lb::BalancerConfig::default(),
        cancel.clone(),
    );
    discovery.wait_synced(Duration::from_secs(10)).await?;
    Ok((balancer, discovery, cancel))
}

/// `n` greet-servers (see [`greet_server`]) on free ports, registered:
/// the processes and their addresses.
pub async fn registered_servers(etcd: &Etcd, n: usize) -> Result<(Vec<Proc>, Vec<String>)> {
    let client = etcd.client().await?;
    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..n {
        let port = free_port();
        procs.push(greet_server(etcd, port, &[])?);
        addrs.push(format!("127.0.0.1:{port}"));
    }
    for a in &addrs {
        wait_key(&client, &key("greet_service", a), Duration::from_secs(15)).await?;
    }
    Ok((procs, addrs))
}

/// A controller replica (the binary) with fast probes (200 ms, dead after
/// 2 s) and an election TTL of `ttl`; `extra` flags on top. The process and
/// its HTTP base URL.
pub fn replica(etcd: &Etcd, ttl: Duration, extra: &[&str]) -> Result<(Proc, String)> {
    let port = free_port();
    let mut args: Vec<String> = [
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--etcd-endpoints",
        &etcd.endpoint(),
        "--probe-interval",
        "200ms",
        "--probe-timeout",
        "200ms",
        "--dead-after",
        "2s",
        "--election-ttl",
        &format!("{}s", ttl.as_secs()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let proc = Proc::spawn(
        &format!("controller:{port}"),
        env!("CARGO_BIN_EXE_controller"),
        &args,
        &[("RUST_LOG", "info,controller=debug")],
    )?;
    Ok((proc, format!("http://127.0.0.1:{port}")))
}

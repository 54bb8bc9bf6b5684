//! greet-client binary: flags, logs, signals; the library does the work.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use etcd_lb::metrics::ClientMetrics;
use etcd_lb::{Balancer, BalancerConfig, Discovery, DiscoveryConfig, RetryPolicy};
use greet_client::config::{Args, Command};
use greet_client::greet_retry_policy;
use greet_client::load::{self, LoadSpec};
use greet_proto::{GreetClient, GreetRequest};
use tokio_util::sync::CancellationToken;

/// mimalloc instead of glibc malloc: every call allocates and frees small
/// blocks across the balancer, h2 and hyper; as in greet-server, where it
/// cut the instructions per call by a tenth (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = args.runtime().context("starting the runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let common = &args.common;
    etcd_lb_registry::logging::init(common.log_format);
    let etcd = common.etcd.resolve().context("etcd settings")?;
    let root = match etcd_lb_registry::schema::normalize_root(&common.prefix) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: --prefix: {e}");
            std::process::exit(2);
        }
    };

    let tls = match common.tls.resolve() {
        Ok(tls) => tls,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };

    let cancel = CancellationToken::new();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = ClientMetrics::register(&mut registry);
    if let Some(addr) = common.metrics_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on --metrics-listen {addr}"))?;
        tracing::info!(metrics = %listener.local_addr()?, "serving metrics");
        let registry = Arc::new(registry);
        let render = Arc::new(move || {
            let mut out = String::new();
            if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
                tracing::warn!(error = %e, "encoding metrics failed");
            }
            out
        });
        let stop = cancel.clone();
        tokio::spawn(async move {
            if let Err(e) = etcd_lb_registry::metrics_http::serve(listener, render, stop).await {
                tracing::warn!(error = %e, "metrics server failed");
            }
        });
    }
    let balancer = Balancer::new(BalancerConfig {
        retry: RetryPolicy {
            per_try_timeout: Some(common.per_try_timeout).filter(|t| !t.is_zero()),
            ..greet_retry_policy()
        },
        retry_budget: Some(common.retry_budget()),
        outlier: common.outlier(),
        slow_start: common.slow_start,
        picker: common.picker(),
        hedging: common.hedging(),
        tls,
        metrics: common.metrics_listen.map(|_| metrics),
        ..BalancerConfig::new(common.service.as_str())
    });
    let discovery = Discovery::spawn(
        etcd,
        DiscoveryConfig {
            root,
            version_req: common.version_req.clone(),
            ..DiscoveryConfig::new(common.service.clone())
        },
        balancer.clone(),
        cancel.clone(),
    );
    if let Err(e) = discovery.wait_synced(common.sync_timeout).await {
        tracing::warn!(%e, "calling anyway (calls fail until endpoints appear)");
    }

    let result = match &args.command {
        Some(Command::Bench(b)) => {
            let spec = LoadSpec {
                concurrency: b.concurrency as usize,
                requests: b.requests,
                duration: b.duration,
                name: common.name.clone(),
                timeout: common.timeout,
            };
            let report = load::run(&balancer, &spec).await;
            if b.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        None => greet_loop(&balancer, &args).await,
    };
    cancel.cancel();
    result
}

/// The original client's loop: Morning then Night, print who answered.
async fn greet_loop(balancer: &Balancer, args: &Args) -> anyhow::Result<()> {
    let mut client = GreetClient::new(balancer.clone());
    let mut round = 0u64;
    let mut ticker = tokio::time::interval(args.interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        if args.count.is_some_and(|c| round >= c) {
            return Ok(());
        }
        round += 1;
        for night in [false, true] {
            let mut req = tonic::Request::new(GreetRequest {
                name: args.common.name.clone(),
            });
            req.set_timeout(args.common.timeout);
            let result = if night {
                client.night(req).await
            } else {
                client.morning(req).await
            };
            match result {
                Ok(resp) => {
                    let r = resp.into_inner();
                    println!("{} (from {})", r.message, r.from);
                }
                Err(status) => {
                    println!("call failed: {:?}: {}", status.code(), status.message());
                }
            }
        }
    }
}

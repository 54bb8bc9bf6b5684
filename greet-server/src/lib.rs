//! greet-server: serve Greet, stay registered in etcd, leave in order.
//!
//! [`run`] is the whole server given a bound listener and a shutdown signal,
//! so tests run it in-process on port 0 and `main` only parses flags and
//! turns signals into the shutdown token.
//!
//! Shutdown order (each step bounded): health NOT_SERVING; weight 0 in
//! etcd (draining); keep serving for `drain` so every client sees it; stop
//! accepting and finish in-flight calls; revoke the lease (the key goes with
//! it); return.

#![forbid(unsafe_code)]

pub mod authority;
pub mod config;
pub mod metrics;
pub mod service;
pub mod shards;

use std::sync::Arc;
use std::time::Duration;

use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::registrar::{Registrar, RegistrarConfig};
use etcd_lb_registry::schema::Addr;
use greet_proto::GreetServer;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tracing::{info, info_span, warn, Instrument};

pub use config::{Args, Config};
pub use service::{Fault, GreetService, Stall};

/// Errors that end the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener's address could not be read.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The registration could not be set up.
    #[error(transparent)]
    Registrar(#[from] etcd_lb_registry::registrar::RegistrarError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The metrics listener could not be bound.
    #[error("metrics listener {addr}: {source}")]
    MetricsListen {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The reflection service could not be built from the descriptors.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// A serving thread could not start or failed.
    #[error(transparent)]
    Shard(#[from] shards::ShardError),
}

/// How long to wait for etcd to confirm the drain weight before draining
/// anyway (clients also see the server's health and GOAWAY).
const DRAIN_WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound for revoking the lease at the end.
const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves Greet and the gRPC health service on `listener`, registered in
/// etcd, until `shutdown` is cancelled; then drains and deregisters.
///
/// # Errors
/// The listener or the gRPC server failing; etcd trouble is never an error
/// here (the registrar retries forever).
pub async fn run(
    cfg: Config,
    etcd: EtcdConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let local = listener.local_addr()?;
    let advertise = cfg
        .advertise
        .clone()
        .unwrap_or_else(|| Addr::from_socket(local));
    let span = info_span!("greet_server", service = %cfg.service, addr = %advertise);
    async move {
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<GreetServer<GreetService>>().await;
        health.set_service_status("", ServingStatus::Serving).await;

        // Reflection (v1, and v1alpha for older grpcurl) lists Greet and
        // health, so grpcurl needs no `.proto`.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(greet_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        // Bound before registering, so a taken port fails the start with
        // nothing written to etcd.
        let metrics = Arc::new(metrics::ServerMetrics::new());
        let stop_metrics = CancellationToken::new();
        if let Some(addr) = cfg.metrics_listen {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| Error::MetricsListen { addr, source })?;
            info!(metrics = %listener.local_addr()?, "serving metrics");
            let render = {
                let metrics = metrics.clone();
                Arc::new(move || metrics.render())
            };
            let stop = stop_metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = etcd_lb_registry::metrics_http::serve(listener, render, stop).await {
                    warn!(error = %e, "metrics server failed");
                }
            });
        }
        let _stop_metrics = stop_metrics.drop_guard();

        let registrar = Registrar::spawn(
            etcd,
            RegistrarConfig {
                root: cfg.root.clone(),
                service: cfg.service.clone(),
                addr: advertise.clone(),
                version: cfg.version.clone(),
                weight: cfg.weight,
                ttl: cfg.ttl,
            },
        )?;
        tokio::spawn(metrics.clone().follow_registration(registrar.status()));

        let stop_accepting = CancellationToken::new();
        let abandon = CancellationToken::new();
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = cfg.tls.clone() {
            builder = builder.tls_config(tls)?;
        }
        let router = builder
            .layer(metrics::MetricsLayer::new(metrics))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(GreetServer::new(
                GreetService::new(advertise.to_string())
                    .with_latency(cfg.latency)
                    .with_fault(service::Fault::new(cfg.fault.0, cfg.fault.1, cfg.fault.2))
                    .with_stall(service::Stall::new(cfg.stall.0, cfg.stall.1)),
            ));
        // Each serving thread runs its connections on its own runtime (see
        // `shards`).
        let serve_shard = move |incoming: shards::ShardIncoming, stop: CancellationToken| {
            // Below h2: clients that send an address list as :authority
            // (grpcio over `ipv4:a,b,c`) are answered too (see `authority`).
            let incoming = incoming
                .map(|conn| conn.map(|c| authority::ListAuthority::new(etcd_lb_registry::coalesce::Coalesce::new(c))));
            router
                .clone()
                .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        };
        let server = shards::serve(
            incoming,
            cfg.io_threads,
            serve_shard,
            stop_accepting.clone(),
            abandon.clone(),
        );
        let mut server = tokio::spawn(server);
        info!(listen = %local, io_threads = cfg.io_threads, "serving");

        tokio::select! {
            () = shutdown.cancelled() => {}
            res = &mut server => {
                // The server ended on its own: an error; still deregister.
                registrar.deregister(DEREGISTER_TIMEOUT).await;
                return match res {
                    Ok(r) => r.map_err(Error::from),
                    Err(join) => Err(Error::Io(std::io::Error::other(join))),
                };
            }
        }

        info!(drain = ?cfg.drain, "shutting down: draining");
        health.set_service_status("", ServingStatus::NotServing).await;
        health.set_not_serving::<GreetServer<GreetService>>().await;
        if !matches!(registrar.set_weight(0, DRAIN_WRITE_TIMEOUT).await, Ok(true)) {
            warn!("could not confirm weight 0 in etcd; draining anyway");
        }
        tokio::time::sleep(cfg.drain).await;

        info!("stopping: no new connections, finishing in-flight calls");
        stop_accepting.cancel();
        match tokio::time::timeout(cfg.shutdown_timeout, &mut server).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => warn!(error = %e, "gRPC server ended with an error"),
            Ok(Err(e)) => warn!(error = %e, "gRPC server task failed"),
            Err(_) => {
                warn!(timeout = ?cfg.shutdown_timeout, "in-flight calls did not finish in time; abandoning them");
                abandon.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut server).await;
            }
        }
        registrar.deregister(DEREGISTER_TIMEOUT).await;
        info!("stopped");
        Ok(())
    }
    .instrument(span)
    .await
}

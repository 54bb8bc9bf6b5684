//! A server's registration tied to the server's lifetime, so the order a
//! rollout needs is code, not a comment: register while serving; on
//! shutdown put weight 0 (draining) and keep serving for `drain` so every
//! client sees it; then stop the server (no new connections, in-flight
//! calls finish within `shutdown_timeout`); then revoke the lease, which
//! deletes the key.
//!
//! Clients see a weight change through their etcd watch in milliseconds
//! (DESIGN's propagation target is p99 < 50 ms on loopback); `drain`
//! defaults to 2 s to cover a client whose watch is reconnecting. A client
//! that still picks this server after the drain gets its calls retried
//! elsewhere: the listener is closed, so nothing was sent.

use std::future::Future;
use std::time::Duration;

use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::registrar::{Registrar, RegistrarConfig, RegistrarError};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tracing::{info, warn};

/// How long each step of [`serve_registered`]'s shutdown may take.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Keep serving this long after weight 0 reached etcd, so clients move
    /// away before the listener closes. Default 2 s.
    pub drain: Duration,
    /// After the drain, wait at most this long for in-flight calls, then
    /// give up on them. Default 30 s (Kubernetes' default grace period).
    pub shutdown_timeout: Duration,
    /// Wait at most this long for etcd to confirm weight 0, and again for
    /// the lease's revocation; past it the key expires with its TTL.
    /// Default 5 s.
    pub etcd_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            drain: Duration::from_secs(2),
            shutdown_timeout: Duration::from_secs(30),
            etcd_timeout: Duration::from_secs(5),
        }
    }
}

/// Why [`serve_registered`] returned an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError<E> {
    /// The registration could not start (a wildcard address, a bad weight
    /// or TTL); the server was never started.
    #[error(transparent)]
    Registrar(#[from] RegistrarError),
    /// The server itself failed; the registration was removed.
    #[error("server failed: {0}")]
    Server(E),
    /// In-flight calls were still running `shutdown_timeout` after the
    /// server was told to stop; the registration was removed.
    #[error("in-flight calls did not finish within {0:?} of the stop")]
    ShutdownTimeout(Duration),
}

/// Runs `server` registered in etcd until `shutdown` completes, then drains,
/// stops it and deregisters (see the module docs for the order and why).
///
/// `server` receives the future that tells it to stop accepting: hand it
/// to tonic's `serve_with_shutdown` / `serve_with_incoming_shutdown`.
/// Registration starts before the server does and never blocks it: the
/// server serves while etcd is unreachable and is registered once etcd
/// answers.
///
/// # Errors
/// See [`ServeError`]. If the server ends by itself, its result is
/// returned after deregistering.
///
/// # Panics
/// Outside a Tokio runtime.
pub async fn serve_registered<F, Fut, E>(
    etcd: EtcdConfig,
    cfg: RegistrarConfig,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()>,
    server: F,
) -> Result<(), ServeError<E>>
where
    F: FnOnce(WaitForCancellationFutureOwned) -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let registrar = Registrar::spawn(etcd, cfg)?;
    let stop = CancellationToken::new();
    let server = server(stop.clone().cancelled_owned());
    tokio::pin!(server);
    tokio::pin!(shutdown);

    tokio::select! {
        result = &mut server => {
            warn!("the server ended by itself; deregistering");
            registrar.deregister(opts.etcd_timeout).await;
            return result.map_err(ServeError::Server);
        }
        () = &mut shutdown => {}
    }

    // Keep serving (poll the server) through the drain.
    info!(drain = ?opts.drain, "shutting down: draining (weight 0)");
    let drained = async {
        if !matches!(registrar.set_weight(0, opts.etcd_timeout).await, Ok(true)) {
            warn!("could not confirm weight 0 in etcd; draining anyway");
        }
        tokio::time::sleep(opts.drain).await;
    };
    tokio::select! {
        result = &mut server => {
            warn!("the server ended during the drain; deregistering");
            registrar.deregister(opts.etcd_timeout).await;
            return result.map_err(ServeError::Server);
        }
        () = drained => {}
    }

    info!("stopping: no new connections, finishing in-flight calls");
    stop.cancel();
    let finished = tokio::time::timeout(opts.shutdown_timeout, &mut server).await;
    registrar.deregister(opts.etcd_timeout).await;
    info!("deregistered");
    match finished {
        Ok(result) => result.map_err(ServeError::Server),
        Err(_) => Err(ServeError::ShutdownTimeout(opts.shutdown_timeout)),
    }
}

/// Completes on the first SIGTERM or SIGINT (what Kubernetes and Ctrl-C
/// send), for [`serve_registered`]'s `shutdown`. A second signal exits the
/// process at once with code 130.
///
/// # Errors
/// The signal handlers cannot be installed.
///
/// # Panics
/// Outside a Tokio runtime.
pub fn shutdown_signal() -> std::io::Result<WaitForCancellationFutureOwned> {
    Ok(etcd_lb_registry::shutdown::on_signals()?.cancelled_owned())
}

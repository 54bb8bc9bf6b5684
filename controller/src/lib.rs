//! The controller: keeps the registry in etcd honest and shows it.
//!
//! Kubernetes-operator-like without CRDs: the etcd key space is the schema.
//! The pieces, each in its module:
//! - `store`: the watcher's copy of `<prefix>` joined with probe results;
//! - `policy`: what is stale, the safety valves and the budget (pure);
//! - `view`: the JSON view's types and the one way members are counted;
//! - `probe`: the gRPC health check (any gRPC answer proves "up");
//! - [`reconcile`]: the level-triggered pass that decides what is stale and
//!   deletes it, guarded, bounded, and held back by the safety valve;
//! - [`leader`]: etcd election, so only one replica deletes;
//! - `http`: the read-only JSON view, live page and metrics endpoint;
//! - `metrics`: the Prometheus registry;
//! - [`config`]: flags and their validation;
//! - [`xds`]: the xDS control plane (`--xds-listen`) for any gRPC client
//!   and Envoy.
//!
//! [`run`] is the whole controller given a bound listener and a shutdown
//! token, so tests run it in-process on `127.0.0.1:0`; `main` only parses
//! flags, sets up logs and turns signals into the token.

#![forbid(unsafe_code)]

pub mod config;
pub(crate) mod http;
pub mod hygiene;
pub mod leader;
pub(crate) mod member;
pub(crate) mod metrics;
pub mod operator;
pub(crate) mod policy;
pub(crate) mod probe;
pub mod reconcile;
pub(crate) mod store;
pub(crate) mod view;
pub mod xds;

use std::sync::Arc;

use etcd_lb_registry::etcd::EtcdConfig;
use etcd_lb_registry::watcher::{Watcher, WatcherConfig};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

pub use config::{Args, Budget, Config};

/// Errors that end the controller.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listener failed.
    #[error("HTTP listener: {0}")]
    Io(#[from] std::io::Error),
    /// The xDS listener could not be bound.
    #[error("xDS listener on {addr}: {source}")]
    XdsListen {
        /// `--xds-listen`.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs the controller until `shutdown` is cancelled: watches
/// `cfg.root`, probes and reconciles, campaigns for leadership, and serves
/// the HTTP view on `listener`. Shutdown is bounded by
/// `cfg.shutdown_timeout`: open streams end, the leader resigns so a
/// standby takes over at once.
///
/// # Errors
/// Only the HTTP server failing; etcd trouble is never an error here (every
/// loop retries, and the view keeps the last known state).
pub async fn run(
    cfg: Config,
    etcd: EtcdConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let local = listener.local_addr()?;
    let xds_listener = match cfg.xds_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::XdsListen { addr, source })?,
        ),
        None => None,
    };
    let id = leader::identity(cfg.name.as_deref());
    let span = info_span!("controller", %id, prefix = %cfg.root);
    async move {
        let tasks = CancellationToken::new();
        let store = Arc::new(store::Store::new());
        // Operators' overrides: every view and xDS snapshot applies them.
        // The registry's events reach the store only once the overrides'
        // first list is in: neither `/services` nor xDS ever shows a
        // drained endpoint at its registered weight.
        let (overrides_in, mut overrides_ready) = tokio::sync::watch::channel(false);
        tokio::spawn(follow_overrides(
            etcd_lb_registry::overrides::spawn_watch(
                etcd.clone(),
                cfg.overrides_root.clone(),
                None,
                tasks.clone(),
            ),
            store.clone(),
            overrides_in,
            tasks.clone(),
        ));
        let metrics = Arc::new(metrics::Metrics::new());

        let watcher = Watcher::new(etcd.clone(), WatcherConfig::all(&cfg.root));
        let (mut events, watch_state, watch_task) = watcher.spawn(tasks.clone());
        let applier = {
            let store = store.clone();
            let mut state = watch_state.clone();
            let cancel = tasks.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    _ = overrides_ready.wait_for(|r| *r) => {}
                }
                loop {
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        ev = events.recv() => match ev {
                            Some(ev) => store.apply(ev, Instant::now()),
                            None => break,
                        },
                        changed = state.changed() => {
                            if changed.is_err() { break }
                            let s = state.borrow_and_update().clone();
                            if s.synced && store.synced() {
                                store.observe_revision(s.revision);
                            }
                        }
                    }
                }
            })
        };

        let (leader_rx, step_down, leader_task) = leader::spawn(
            etcd.clone(),
            cfg.election_key.clone(),
            cfg.election_ttl,
            id.clone(),
            tasks.clone(),
        );
        let reconciler = reconcile::Reconciler::new(
            cfg.clone(),
            etcd,
            store.clone(),
            metrics.clone(),
            leader_rx.clone(),
            step_down,
        );
        let reconcile_task = tokio::spawn(reconciler.run(tasks.clone()));

        // xDS: every replica, from the same store as the HTTP view.
        let xds_task = xds_listener.map(|l| {
            let (snapshots, builder) = xds::spawn_snapshots(
                store.clone(),
                cfg.max_unhealthy_ratio,
                metrics.xds.clone(),
                tasks.clone(),
            );
            let server = tokio::spawn(xds::serve(
                l,
                snapshots,
                id.clone(),
                metrics.xds.clone(),
                cfg.xds_limits,
                shutdown.clone(),
            ));
            (builder, server)
        });

        let state = Arc::new(http::AppState::new(
            store,
            metrics,
            watch_state,
            leader_rx,
            id.clone(),
            shutdown.clone(),
        )
        .with_max_streams(cfg.max_streams));
        let app = http::router(state);
        info!(listen = %local, "serving the HTTP view");
        let listener = http::io::WriteTimeoutListener::new(listener, cfg.http_write_timeout);
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned());
        let mut server = tokio::spawn(async move { server.await });

        let served = tokio::select! {
            () = shutdown.cancelled() => None,
            res = &mut server => Some(res),
        };
        info!("shutting down");
        tasks.cancel();
        let deadline = cfg.shutdown_timeout;
        let background = async {
            let _ = leader_task.await;
            let _ = reconcile_task.await;
            let _ = applier.await;
            let _ = watch_task.await;
            if let Some((builder, server)) = xds_task {
                let _ = builder.await;
                match server.await {
                    Ok(Err(e)) => warn!(error = %e, "xDS server failed"),
                    Err(e) => warn!(error = %e, "xDS server task failed"),
                    Ok(Ok(())) => {}
                }
            }
        };
        if tokio::time::timeout(deadline, background).await.is_err() {
            warn!(timeout = ?deadline, "background tasks did not stop in time");
        }
        let result = match served {
            Some(res) => res,
            None => match tokio::time::timeout(deadline, &mut server).await {
                Ok(res) => res,
                Err(_) => {
                    warn!(timeout = ?deadline, "HTTP connections did not close in time; dropping them");
                    server.abort();
                    Ok(Ok(()))
                }
            },
        };
        info!("stopped");
        match result {
            Ok(r) => r.map_err(Error::from),
            Err(join) => Err(Error::Io(std::io::Error::other(join))),
        }
    }
    .instrument(span)
    .await
}

/// Hands the overrides to the store on every change, and again when one
/// expires (so the views and xDS show the registered weight again). The
/// first hand-over waits for the first list (bounded), then says so on
/// `first_in` (the registry's events wait for it).
async fn follow_overrides(
    mut rx: tokio::sync::watch::Receiver<Arc<etcd_lb_registry::overrides::OverrideMap>>,
    store: Arc<store::Store>,
    first_in: tokio::sync::watch::Sender<bool>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let wait = etcd_lb_registry::overrides::FIRST_LIST_WAIT;
    tokio::select! {
        () = cancel.cancelled() => return,
        listed = etcd_lb_registry::overrides::first_list(&mut rx, wait) => if !listed {
            tracing::warn!(?wait, "operators' overrides not listed in time (etcd unreachable, or no read permission on the overrides prefix); showing registered weights until they are");
        },
    }
    store.set_overrides(rx.borrow_and_update().clone());
    first_in.send_replace(true);
    loop {
        let map = rx.borrow_and_update().clone();
        let next_expiry =
            etcd_lb_registry::overrides::next_expiry(map.values(), std::time::SystemTime::now());
        store.set_overrides(map);
        let expiry = async {
            match next_expiry {
                Some(d) => tokio::time::sleep(d + std::time::Duration::from_millis(1)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = rx.changed() => if changed.is_err() { return },
            () = expiry => {}
        }
    }
}

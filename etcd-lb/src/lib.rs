//! etcd-lb: reach a gRPC service registered in etcd, balanced by the
//! weights its servers advertise, from any tonic client; and register a
//! server so others reach it.
//!
//! The schema is the registry's: `/ns/<service>/<host:port>` holding
//! `{"addr","version","weight"}` (or a plain address, as the original Go
//! tutorial's servers write) on a lease the server keeps alive.
//!
//! - [`connect`] starts a client: a [`Discovery`] that lists and watches a
//!   service's prefix and feeds a [`Balancer`] (static stability: while
//!   etcd is unreachable it keeps the last endpoints);
//! - [`Balancer`] is the `tower::Service` a generated tonic client wraps:
//!   smooth weighted round-robin ([`scheduler`], O(log n)) that passes over
//!   a far more loaded endpoint ([`picker`], [`load`]; or [`Picker::RoundRobin`]),
//!   weight 0 as draining, retries by [`RetryPolicy`] within a
//!   [`RetryBudgetConfig`], optional [`hedge`]s for idempotent calls,
//!   [`outlier`] ejection with a panic threshold, and unary and streaming
//!   calls alike;
//! - [`serve_registered`] runs a server registered for its lifetime:
//!   register, and on shutdown drain (weight 0), stop, deregister; the
//!   [`Registrar`] underneath is there for servers that need finer control;
//! - [`overrides`]: operators' drains and weights (`controller drain`),
//!   applied by discovery;
//! - [`metrics`]: Prometheus metrics in a registry the application owns.
//!
//! Both need a Tokio runtime (they spawn tasks; called outside one they
//! panic). The library logs through `tracing` and installs no subscriber:
//! install one (e.g. `tracing_subscriber::fmt::init()`) to see why a server
//! was skipped or etcd was not reached.
//!
//! A client of some service `echo` registered in etcd:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use etcd_lb::{BalancerConfig, CancellationToken, DiscoveryConfig, EtcdConfig, RetryPolicy, ServiceName};
//!
//! let (balancer, discovery) = etcd_lb::connect(
//!     EtcdConfig::plain(["127.0.0.1:2379"]),
//!     DiscoveryConfig::new(ServiceName::new("echo")?),
//!     BalancerConfig { retry: RetryPolicy::idempotent(["/echo.Echo/Say"]), ..Default::default() },
//!     CancellationToken::new(),
//! );
//! discovery.wait_synced(Duration::from_secs(5)).await?; // says why not: etcd not reached, ...
//! // let mut client = EchoClient::new(balancer);  // any generated tonic client
//! # Ok(()) }
//! ```
//!
//! `examples/echo/src/main.rs` (in the repository) runs both sides against
//! a real etcd: servers that register, a client that balances unary and
//! streaming calls over them, and a drain; `examples/echo/src/bin/`
//! holds the README's two snippets as programs, run by its tests.

#![forbid(unsafe_code)]

pub mod balance;
mod body;
pub mod budget;
pub mod conn;
pub mod discover;
pub mod hedge;
pub mod load;
pub mod metrics;
pub mod outlier;
pub mod overrides;
pub mod picker;
pub mod retry;
pub mod scheduler;
pub mod serve;
mod watch;

pub use balance::{Balancer, BalancerConfig, EndpointInfo};
pub use budget::RetryBudgetConfig;
pub use discover::{connect, Discovery, DiscoveryConfig, NotSynced};
pub use hedge::HedgingConfig;
pub use load::LoadConfig;
pub use outlier::OutlierConfig;
pub use picker::Picker;
pub use retry::RetryPolicy;
pub use serve::{serve_registered, shutdown_signal, ServeError, ServeOptions};

/// The registry underneath: schema, registrar, reflector, etcd session.
pub use etcd_lb_registry as registry;
pub use etcd_lb_registry::etcd::EtcdConfig;
pub use etcd_lb_registry::registrar::{
    Registrar, RegistrarConfig, RegistrarError, RegistrationStatus,
};
pub use etcd_lb_registry::schema::{Addr, ServiceName};
/// Stops a [`Discovery`] (and anything else spawned with it) when cancelled.
pub use tokio_util::sync::CancellationToken;

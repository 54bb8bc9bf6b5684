//! etcd-lb: reach a gRPC service registered in etcd, balanced by the
//! weights its servers advertise, from any tonic client; and register a
//! server so others reach it.
//!
//! The schema is the registry's: `/ns/<service>/<host:port>` holding
//! `{"addr","version","weight"}` (or a plain address, as the original Go
//! tutorial's servers write) on a lease the server keeps alive.
//!
//! - [`Discovery`] lists and watches a service's prefix and feeds a
//!   [`Balancer`] (static stability: while etcd is unreachable it keeps the
//!   last endpoints);
//! - [`Balancer`] is the `tower::Service` a generated tonic client wraps:
//!   smooth weighted round-robin ([`scheduler`], O(log n)) that passes over
//!   a far more loaded endpoint ([`picker`], [`load`]; or [`Picker::RoundRobin`]),
//!   weight 0 as draining, retries by [`RetryPolicy`] within a
//!   [`RetryBudgetConfig`], optional [`hedge`]s for idempotent calls,
//!   [`outlier`] ejection with a panic threshold, and unary and streaming
//!   calls alike;
//! - [`Registrar`] registers a server and keeps it registered (re-registers
//!   when the key vanishes, drains with [`Registrar::set_weight`]);
//! - [`metrics`]: Prometheus metrics in a registry the application owns.
//!
//! A client of some service `echo` registered in etcd:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use etcd_lb::{Balancer, BalancerConfig, CancellationToken, Discovery, DiscoveryConfig};
//! use etcd_lb::{EtcdConfig, RetryPolicy, ServiceName};
//!
//! let balancer = Balancer::new(BalancerConfig {
//!     retry: RetryPolicy::idempotent(["/echo.Echo/Say"]),
//!     ..BalancerConfig::new("echo")
//! });
//! let etcd = EtcdConfig::plain(["127.0.0.1:2379"]);
//! let cfg = DiscoveryConfig::new(ServiceName::new("echo")?);
//! let discovery = Discovery::spawn(etcd, cfg, balancer.clone(), CancellationToken::new());
//! discovery.wait_synced(Duration::from_secs(5)).await;
//! // let mut client = EchoClient::new(balancer);  // any generated tonic client
//! # Ok(()) }
//! ```
//!
//! `examples/echo.rs` runs both sides (servers that register, a client that
//! balances unary and streaming calls over them) against a real etcd.

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
pub mod picker;
pub mod retry;
pub mod scheduler;
mod watch;

pub use balance::{Balancer, BalancerConfig, EndpointInfo};
pub use budget::RetryBudgetConfig;
pub use discover::{Discovery, DiscoveryConfig};
pub use hedge::HedgingConfig;
pub use load::LoadConfig;
pub use outlier::OutlierConfig;
pub use picker::Picker;
pub use retry::RetryPolicy;

/// The registry underneath: schema, registrar, reflector, etcd session.
pub use etcd_lb_registry as registry;
pub use etcd_lb_registry::etcd::EtcdConfig;
pub use etcd_lb_registry::registrar::{Registrar, RegistrarConfig};
pub use etcd_lb_registry::schema::{Addr, ServiceName};
/// Stops a [`Discovery`] (and anything else spawned with it) when cancelled.
pub use tokio_util::sync::CancellationToken;

//! The registry: everything server, client and controller share about etcd.
//!
//! - [`schema`]: keys, values and their validation (the contract);
//! - [`etcd`]: how to reach etcd (endpoints, TLS, auth);
//! - [`session`]: the one etcd session (lazy connect, bounded calls,
//!   re-login after a refused token) every loop uses;
//! - [`lease`]: the one lease keeper (registrar and election);
//! - [`overrides`]: operators' drains and weights beside the registry;
//! - [`registrar`]: keeping one endpoint registered on a lease;
//! - [`watcher`]: the list+watch reflector of a prefix, as events;
//! - [`health`]: whether an address answers gRPC (balancer and controller);
//! - [`grpc_status`]: a call's status as it passes, for metrics;
//! - [`failpoints`]: faults injected inside the code for the robustness
//!   harness (only under the `failpoints` feature);
//! - [`backoff`]: the jittered exponential backoff of every reconnecting loop.

#![forbid(unsafe_code)]

pub mod backoff;
pub mod coalesce;
pub mod etcd;
pub mod failpoints;
pub mod grpc_status;
pub mod grpc_tls;
pub mod health;
pub mod lease;
pub mod logging;
#[cfg(feature = "metrics-http")]
pub mod metrics_http;
pub mod overrides;
pub mod registrar;
pub mod schema;
pub mod session;
pub mod shutdown;
pub mod watcher;

pub use schema::{Addr, Endpoint, Member, SchemaError, ServiceName, ValueKind};

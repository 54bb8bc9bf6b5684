//! greet-client: reach a service registered in etcd, balanced by weight.
//!
//! - [`scheduler`]: smooth weighted round-robin (EDF), O(log n);
//! - [`balance`]: the `tower::Service` a generated tonic client wraps;
//! - [`retry`]: which failed calls go again;
//! - [`budget`]: how many retries, as a share of recent calls;
//! - [`outlier`]: which failing endpoints sit out for a while;
//! - [`discover`]: feeds the balancer from etcd through the registry's
//!   reflector, with version selection and freshness logging;
//! - [`metrics`]: Prometheus metrics in a registry the application owns.

#![forbid(unsafe_code)]

pub mod balance;
pub mod budget;
pub mod discover;
pub mod metrics;
pub mod outlier;
pub mod retry;
pub mod scheduler;

pub use balance::{Balancer, BalancerConfig, EndpointInfo};
pub use budget::RetryBudgetConfig;
pub use discover::{Discovery, DiscoveryConfig};
pub use outlier::OutlierConfig;
pub use retry::RetryPolicy;
pub mod config;
pub mod load;

//! greet-client: the Greet client binary's parts. The discovery and the
//! balancer it runs are the [`etcd_lb`] library, which knows nothing of
//! Greet; what is Greet's lives here:
//!
//! - [`config`]: the command line (clap, with `GREET_*` env fallbacks);
//! - [`load`]: the load generator behind `greet-client bench`;
//! - [`greet_retry_policy`]: Greet's methods are idempotent.

#![forbid(unsafe_code)]

pub mod config;
pub mod load;

use etcd_lb::RetryPolicy;

/// Greet's two methods are idempotent: retried on `UNAVAILABLE`.
pub fn greet_retry_policy() -> RetryPolicy {
    RetryPolicy::idempotent([greet_proto::paths::MORNING, greet_proto::paths::NIGHT])
}

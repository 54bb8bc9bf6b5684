//! Operator overrides, as the client library applies them: discovery
//! keeps its service's overrides current
//! ([`etcd_lb_registry::overrides::spawn_watch`]) and weighs each endpoint
//! with [`etcd_lb_registry::overrides::effective_weight`], as the
//! controller's view and xDS do. `controller drain|weight` writes them.

pub use etcd_lb_registry::overrides::{
    effective_weight, Applies, EndpointOverride, Incarnation, OverrideMap,
};

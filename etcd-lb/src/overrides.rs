//! Operator overrides, as the client library applies them: discovery
//! keeps its service's overrides and version split current
//! ([`etcd_lb_registry::overrides::spawn_watch`]), weighs each endpoint
//! with [`etcd_lb_registry::overrides::effective_weight`] and, while the
//! service is split, every endpoint with
//! [`etcd_lb_registry::overrides::split_weights`], as the controller's
//! view and xDS do. `controller drain|weight|split` writes them.

pub use etcd_lb_registry::overrides::{
    effective_weight, split_weights, Applies, EndpointOverride, Incarnation, Lane, OverrideMap,
    Overrides, Split, SplitApplies, Weighed,
};

//! What the xDS server did, for `/metrics`: streams open, responses pushed,
//! ACKs and NACKs by resource type, bad requests, snapshots published.
//! A NACK means a client refused what this controller sent and runs on an
//! older version: the series to alert on.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::resources::Kind;

/// The resource type of a response, ACK or NACK: `type="lds"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeName {
    /// lds (listeners), cds (clusters) or eds (load assignments).
    pub r#type: String,
}

/// Counters and gauges of the xDS server, shared by every stream.
#[derive(Debug, Default)]
pub struct XdsMetrics {
    /// ADS streams open now.
    pub streams: Gauge,
    /// Responses pushed, by type.
    pub responses: Family<TypeName, Counter>,
    /// Responses a client accepted, by type.
    pub acks: Family<TypeName, Counter>,
    /// Responses a client rejected, by type.
    pub nacks: Family<TypeName, Counter>,
    /// Streams ended for a request this server cannot read.
    pub bad_requests: Counter,
    /// Streams that ended because the client went away or closed its side
    /// (reset, connection closed, end of stream).
    pub disconnects: Counter,
    /// Streams ended because the client took no response for the write
    /// timeout.
    pub slow_disconnects: Counter,
    /// Streams refused because the server was at its stream cap.
    pub refused_streams: Counter,
    /// Requests for a resource type this server does not serve.
    pub unknown_types: Counter,
    /// Assignments larger than gRPC clients' default 4 MiB receive limit.
    pub oversized: Gauge,
    /// Snapshots published (one per change of what clients would be sent).
    pub snapshots: Counter,
}

impl XdsMetrics {
    fn of(family: &Family<TypeName, Counter>, kind: Kind) {
        family
            .get_or_create(&TypeName {
                r#type: kind.as_str().to_owned(),
            })
            .inc();
    }

    /// Counts one response pushed.
    pub fn pushed(&self, kind: Kind) {
        Self::of(&self.responses, kind);
    }

    /// Counts one ACK.
    pub fn acked(&self, kind: Kind) {
        Self::of(&self.acks, kind);
    }

    /// Counts one NACK.
    pub fn nacked(&self, kind: Kind) {
        Self::of(&self.nacks, kind);
    }

    /// Adds the families to a scrape's registry.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "controller_xds_streams",
            "ADS streams open now",
            self.streams.clone(),
        );
        r.register(
            "controller_xds_responses",
            "xDS responses pushed to clients, by resource type",
            self.responses.clone(),
        );
        r.register(
            "controller_xds_acks",
            "xDS responses clients accepted, by resource type",
            self.acks.clone(),
        );
        r.register(
            "controller_xds_nacks",
            "xDS responses clients rejected (they keep their last accepted version), by resource type",
            self.nacks.clone(),
        );
        r.register(
            "controller_xds_disconnects",
            "ADS streams ended by the client going away (not counted as bad requests)",
            self.disconnects.clone(),
        );
        r.register(
            "controller_xds_slow_disconnects",
            "ADS streams ended because the client took no response for --xds-write-timeout",
            self.slow_disconnects.clone(),
        );
        r.register(
            "controller_xds_refused_streams",
            "ADS streams refused at --xds-max-streams",
            self.refused_streams.clone(),
        );
        r.register(
            "controller_xds_unknown_type_requests",
            "xDS requests for a resource type this server does not serve (ignored)",
            self.unknown_types.clone(),
        );
        r.register(
            "controller_xds_oversized_assignments",
            "ClusterLoadAssignments larger than gRPC clients' default 4 MiB receive limit (see docs/xds.md)",
            self.oversized.clone(),
        );
        r.register(
            "controller_xds_bad_requests",
            "ADS streams ended for a request this server cannot read",
            self.bad_requests.clone(),
        );
        r.register(
            "controller_xds_snapshots",
            "xDS snapshots published (one per change of what clients would be sent)",
            self.snapshots.clone(),
        );
    }
}

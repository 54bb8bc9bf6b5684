//! One ADS stream's state of the world (SotW) protocol, as a pure state
//! machine: requests and new snapshots in, responses out. The stream
//! plumbing is in [`super::server`].
//!
//! The rules (xDS protocol, gRPC A27, and what go-control-plane does):
//! - per resource type a subscription: named resources, or the wildcard
//!   (`*`, or an empty list on LDS/CDS, the legacy wildcard);
//! - every response carries a fresh nonce; a request whose
//!   `response_nonce` is not the latest one sent for its type is stale and
//!   ignored whole (its names included);
//! - a request with `error_detail` is a NACK: the client stays on the last
//!   version it accepted, nothing is resent until the content changes, and
//!   the rejection is logged once per version;
//! - the first request of a type is always answered (once a snapshot
//!   exists: before the first sync nothing is sent, so a client is never
//!   told "nothing exists" by a controller that does not know yet); later
//!   ones only when the subscription changed;
//! - a response holds the subscribed resources that exist: for LDS and
//!   CDS absence means "deleted" (so an empty response is sent), for EDS an
//!   absent assignment is simply not sent, and an EDS response with nothing
//!   in it is never sent;
//! - a new snapshot is pushed to a subscription only when the resources it
//!   selects changed (its response version is a hash of exactly those).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tonic::Status;
use tracing::{debug, warn};

use super::metrics::XdsMetrics;
use super::resources::{Kind, Resources, Snapshot};

/// What a subscription asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Names {
    /// Every resource of the type.
    Wildcard,
    /// These, by name.
    Only(BTreeSet<String>),
}

impl Names {
    fn from_request(kind: Kind, names: &[String]) -> Self {
        if names.iter().any(|n| n == "*") || (names.is_empty() && kind.empty_is_wildcard()) {
            Self::Wildcard
        } else {
            Self::Only(names.iter().cloned().collect())
        }
    }

    fn is_empty(&self) -> bool {
        matches!(self, Self::Only(n) if n.is_empty())
    }
}

/// One type's subscription on the stream.
#[derive(Debug)]
struct Subscription {
    names: Names,
    /// Version of the latest response sent for the current names (reset
    /// when they change, so the new selection is always sent).
    sent: Option<String>,
    /// Nonce of the latest response sent: only a request carrying it is
    /// current.
    nonce: Option<String>,
    /// The latest version the client accepted.
    acked: Option<String>,
    /// The version whose rejection was logged (logged once).
    nacked: Option<String>,
}

/// The protocol state of one ADS stream.
#[derive(Debug)]
pub struct Session {
    /// This replica, sent as `control_plane.identifier`.
    control_plane: String,
    /// The client's node id, from its first request.
    node: Option<String>,
    subs: BTreeMap<Kind, Subscription>,
    nonce: u64,
    /// Whether an unknown type URL was warned about on this stream (once:
    /// a client sending a thousand junk types costs one line, and the URLs
    /// are not kept).
    warned_unknown: bool,
    /// Shared with every stream of the server.
    metrics: Arc<XdsMetrics>,
}

impl Session {
    /// A fresh stream served by replica `control_plane`.
    pub fn new(control_plane: &str) -> Self {
        Self {
            control_plane: control_plane.to_owned(),
            node: None,
            subs: BTreeMap::new(),
            nonce: 0,
            warned_unknown: false,
            metrics: Arc::default(),
        }
    }

    /// Counts this stream's pushes, ACKs and NACKs in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<XdsMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// The client's node id, once it said it.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The version the client accepted last for `kind`.
    pub fn acked(&self, kind: Kind) -> Option<&str> {
        self.subs.get(&kind).and_then(|s| s.acked.as_deref())
    }

    /// Handles one request; `snapshot` is the current one (`None` before
    /// the controller's first sync).
    ///
    /// # Errors
    /// A request without a `type_url`: on an ADS stream there is no way to
    /// tell what it asks for, so the stream ends with `INVALID_ARGUMENT`.
    pub fn on_request(
        &mut self,
        req: DiscoveryRequest,
        snapshot: Option<&Snapshot>,
    ) -> Result<Option<DiscoveryResponse>, Status> {
        if self.node.is_none() {
            if let Some(node) = &req.node {
                self.node = Some(node.id.clone());
            }
        }
        if req.type_url.is_empty() {
            return Err(Status::invalid_argument(
                "DiscoveryRequest without type_url: an ADS request must name its resource type",
            ));
        }
        let Some(kind) = Kind::from_type_url(&req.type_url) else {
            self.metrics.unknown_types.inc();
            if !self.warned_unknown {
                self.warned_unknown = true;
                warn!(
                    node = self.node.as_deref().unwrap_or(""),
                    type_url = %req.type_url.chars().take(120).collect::<String>(),
                    len = req.type_url.len(),
                    "xds request for a resource type this server does not serve (it serves Listener, Cluster and ClusterLoadAssignment); ignored, and later ones on this stream only counted"
                );
            }
            return Ok(None);
        };
        let names = Names::from_request(kind, &req.resource_names);
        let Some(sub) = self.subs.get_mut(&kind) else {
            debug!(kind = kind.as_str(), ?names, "xds subscribed");
            self.subs.insert(
                kind,
                Subscription {
                    names,
                    sent: None,
                    nonce: None,
                    // A client reconnecting says what it has (from another
                    // replica, or before a restart).
                    acked: (!req.version_info.is_empty()).then(|| req.version_info.clone()),
                    nacked: None,
                },
            );
            return Ok(snapshot.and_then(|s| self.respond(kind, s)));
        };
        if !req.response_nonce.is_empty() && Some(&req.response_nonce) != sub.nonce.as_ref() {
            debug!(kind = kind.as_str(), nonce = %req.response_nonce, "xds stale nonce ignored");
            return Ok(None);
        }
        match &req.error_detail {
            Some(err) if !req.response_nonce.is_empty() => {
                self.metrics.nacked(kind);
                let rejected = sub.sent.clone();
                if sub.nacked != rejected {
                    warn!(
                        node = self.node.as_deref().unwrap_or(""),
                        kind = kind.as_str(),
                        rejected = rejected.as_deref().unwrap_or(""),
                        kept = %req.version_info,
                        error = %err.message,
                        "xds client rejected an update (NACK); it keeps its last accepted version"
                    );
                    sub.nacked = rejected;
                }
            }
            _ if !req.response_nonce.is_empty() => {
                self.metrics.acked(kind);
                if sub.acked.as_deref() != Some(req.version_info.as_str()) {
                    debug!(kind = kind.as_str(), version = %req.version_info, "xds ack");
                }
                sub.acked = Some(req.version_info.clone());
            }
            _ => {}
        }
        // A request without a nonce on a live subscription (a client that
        // never got a response) counts as a subscription change.
        let changed = sub.names != names || req.response_nonce.is_empty();
        if !changed {
            return Ok(None);
        }
        debug!(kind = kind.as_str(), ?names, "xds subscription changed");
        sub.names = names;
        sub.sent = None;
        Ok(snapshot.and_then(|s| self.respond(kind, s)))
    }

    /// The responses a new snapshot calls for: one per subscription whose
    /// selected resources changed.
    pub fn on_snapshot(&mut self, snapshot: &Snapshot) -> Vec<DiscoveryResponse> {
        let kinds: Vec<Kind> = self.subs.keys().copied().collect();
        kinds
            .into_iter()
            .filter_map(|k| self.respond(k, snapshot))
            .collect()
    }

    /// A response for `kind` if the selected resources differ from what was
    /// sent last, and there is something a client may be sent.
    fn respond(&mut self, kind: Kind, snapshot: &Snapshot) -> Option<DiscoveryResponse> {
        let sub = self.subs.get_mut(&kind)?;
        let all = snapshot.of(kind);
        let (version, resources) = match &sub.names {
            Names::Wildcard => (all.version.clone(), all.by_name.values().cloned().collect()),
            Names::Only(names) => {
                let picked: Vec<(&str, u64)> = names
                    .iter()
                    .filter_map(|n| all.hashes.get(n).map(|h| (n.as_str(), *h)))
                    .collect();
                let resources = picked
                    .iter()
                    .filter_map(|(n, _)| all.by_name.get(*n).cloned())
                    .collect::<Vec<_>>();
                (Resources::version_of(picked), resources)
            }
        };
        if sub.sent.as_ref() == Some(&version) {
            return None;
        }
        if kind == Kind::Endpoint && resources.is_empty() {
            // Absent assignments are not sent (and an empty EDS response
            // would tell nothing).
            return None;
        }
        if sub.names.is_empty() {
            return None;
        }
        self.nonce += 1;
        let nonce = self.nonce.to_string();
        // Debug, not info: with a thousand subscribers one change is a
        // thousand pushes.
        debug!(
            node = self.node.as_deref().unwrap_or(""),
            kind = kind.as_str(),
            %version,
            %nonce,
            resources = resources.len(),
            "xds push"
        );
        sub.sent = Some(version.clone());
        sub.nonce = Some(nonce.clone());
        self.metrics.pushed(kind);
        Some(DiscoveryResponse {
            version_info: version,
            resources,
            type_url: kind.type_url().to_owned(),
            nonce,
            control_plane: Some(ControlPlane {
                identifier: self.control_plane.clone(),
            }),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xds::metrics::TypeName;
    use crate::xds::resources::{CLUSTER, ENDPOINT, LISTENER};
    use envoy_types::pb::google::rpc;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    fn snap(services: &[&str]) -> Snapshot {
        use envoy_types::pb::google::protobuf::Any;
        let mk = |kind: &str| {
            Resources::from_map(
                services
                    .iter()
                    .map(|s| {
                        (
                            s.to_string(),
                            (
                                Any {
                                    type_url: kind.to_owned(),
                                    value: s.as_bytes().to_vec(),
                                },
                                s.len() as u64,
                            ),
                        )
                    })
                    .collect(),
            )
        };
        Snapshot {
            revision: 1,
            kinds: [mk(LISTENER), mk(CLUSTER), mk(ENDPOINT)],
        }
    }

    fn req(type_url: &str, names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names: names.iter().map(|s| s.to_string()).collect(),
            version_info: version.to_owned(),
            response_nonce: nonce.to_owned(),
            ..Default::default()
        }
    }

    #[test]
    fn nothing_before_the_first_snapshot_then_everything_asked() {
        let mut s = Session::new("c");
        assert!(s
            .on_request(req(CLUSTER, &[], "", ""), None)
            .unwrap()
            .is_none());
        let out = s.on_snapshot(&snap(&["a", "b"]));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].resources.len(), 2, "empty CDS names: wildcard");
    }

    #[test]
    fn ack_nack_and_stale_nonces() {
        let metrics = Arc::new(XdsMetrics::default());
        let mut s = Session::new("c").with_metrics(metrics.clone());
        let count = |f: &Family<TypeName, Counter>| {
            f.get_or_create(&TypeName {
                r#type: "eds".into(),
            })
            .get()
        };
        let s1 = snap(&["a"]);
        let r = s
            .on_request(req(ENDPOINT, &["a"], "", ""), Some(&s1))
            .unwrap()
            .unwrap();
        // ACK: nothing more to send.
        assert!(s
            .on_request(req(ENDPOINT, &["a"], &r.version_info, &r.nonce), Some(&s1))
            .unwrap()
            .is_none());
        assert_eq!(s.acked(Kind::Endpoint), Some(r.version_info.as_str()));
        let s2 = snap(&["a", "b"]);
        // Only "a" is subscribed and "a" did not change: nothing.
        assert!(s.on_snapshot(&s2).is_empty());
        let r2 = s
            .on_request(
                req(ENDPOINT, &["a", "b"], &r.version_info, &r.nonce),
                Some(&s2),
            )
            .unwrap()
            .unwrap();
        assert_eq!(r2.resources.len(), 2);
        // A late request with the old nonce is stale: ignored whole.
        assert!(s
            .on_request(req(ENDPOINT, &["zzz"], "", &r.nonce), Some(&s2))
            .unwrap()
            .is_none());
        // NACK: the client stays on its version; nothing resent.
        let mut nack = req(ENDPOINT, &["a", "b"], &r.version_info, &r2.nonce);
        nack.error_detail = Some(rpc::Status {
            code: 3,
            message: "bad".into(),
            ..Default::default()
        });
        assert!(s.on_request(nack, Some(&s2)).unwrap().is_none());
        assert_eq!(s.acked(Kind::Endpoint), Some(r.version_info.as_str()));
        // Two pushes; the ACK and the request that acked r while changing
        // names; one NACK. The stale request counts as nothing.
        assert_eq!(count(&metrics.responses), 2);
        assert_eq!(count(&metrics.acks), 2);
        assert_eq!(count(&metrics.nacks), 1);
    }

    #[test]
    fn a_subscription_change_with_nothing_to_send_keeps_the_nonce() {
        let mut s = Session::new("c");
        let s1 = snap(&["a"]);
        let r = s
            .on_request(req(ENDPOINT, &["a"], "", ""), Some(&s1))
            .unwrap()
            .unwrap();
        assert!(s
            .on_request(
                req(ENDPOINT, &["nope"], &r.version_info, &r.nonce),
                Some(&s1)
            )
            .unwrap()
            .is_none());
        let back = s
            .on_request(req(ENDPOINT, &["a"], &r.version_info, &r.nonce), Some(&s1))
            .unwrap();
        assert!(
            back.is_some(),
            "the nonce of the last response is still current"
        );
    }

    #[test]
    fn absent_resources() {
        let mut s = Session::new("c");
        let s1 = snap(&["a"]);
        assert!(s
            .on_request(req(ENDPOINT, &["nope"], "", ""), Some(&s1))
            .unwrap()
            .is_none());
        let l = s
            .on_request(req(LISTENER, &["nope"], "", ""), Some(&s1))
            .unwrap()
            .unwrap();
        assert!(
            l.resources.is_empty(),
            "LDS: absent means not in the response"
        );
    }

    #[test]
    fn bad_types() {
        let mut s = Session::new("c");
        assert!(s.on_request(req("", &[], "", ""), None).is_err());
        assert!(s
            .on_request(
                req("type.googleapis.com/x.Y", &[], "", ""),
                Some(&snap(&[]))
            )
            .unwrap()
            .is_none());
    }
}

//! The xDS resources of one view of the registry: for every service `S`, a
//! Listener `S` -> Cluster `S` -> ClusterLoadAssignment `S`.
//!
//! The mapping was measured with the real clients (grpcio 1.85 and Envoy
//! 1.40, see `docs/xds.md`): gRPC's default xDS policy weights
//! *localities* and ignores endpoint weights, Envoy's round-robin weights
//! *endpoints* and ignores locality weights unless told otherwise, so every
//! member gets a locality of its own carrying its weight, and the same
//! weight on its endpoint. Both fields must be at least 1 (Envoy rejects
//! 0), so a draining member (weight 0) keeps weight 1 and says `DRAINING`,
//! which both clients skip for new calls.
//!
//! Invariants: building is a pure function of the view; resources come out
//! sorted by name, so equal views give byte-equal resources and equal
//! versions on every replica.

use std::collections::{BTreeMap, HashMap};

use envoy_types::pb::envoy::config::cluster::v3::{cluster, Cluster};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source, socket_address, Address, AggregatedConfigSource, ApiVersion,
    ConfigSource, HealthStatus, Http2ProtocolOptions, Locality, Metadata, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener};
use envoy_types::pb::envoy::config::route::v3::{
    route, route_action, route_match, Route, RouteAction, RouteConfiguration, RouteMatch,
    VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager, http_filter, HttpConnectionManager, HttpFilter,
};
use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
    http_protocol_options, HttpProtocolOptions,
};
use envoy_types::pb::google::protobuf::{value, Any, Duration, Struct, UInt32Value, Value};
use prost::{Message, Name};

use crate::view::{MemberView, ServicesView};

/// `type_url` of Listener (LDS).
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// `type_url` of Cluster (CDS).
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// `type_url` of ClusterLoadAssignment (EDS).
pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The namespace of our endpoint metadata (`filter_metadata`), holding
/// `version` and `key`.
pub const METADATA_NAMESPACE: &str = "greet-etcd";

/// The resource types this server knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Listeners.
    Listener,
    /// Clusters.
    Cluster,
    /// Load assignments.
    Endpoint,
}

impl Kind {
    /// Every kind, in the order a client needs them.
    pub const ALL: [Kind; 3] = [Kind::Listener, Kind::Cluster, Kind::Endpoint];

    /// The kind of `type_url`, `None` for a type this server does not serve.
    pub fn from_type_url(url: &str) -> Option<Self> {
        match url {
            LISTENER => Some(Self::Listener),
            CLUSTER => Some(Self::Cluster),
            ENDPOINT => Some(Self::Endpoint),
            _ => None,
        }
    }

    /// The `type_url`.
    pub fn type_url(self) -> &'static str {
        match self {
            Self::Listener => LISTENER,
            Self::Cluster => CLUSTER,
            Self::Endpoint => ENDPOINT,
        }
    }

    /// Whether an empty `resource_names` subscribes to everything (the
    /// legacy wildcard of LDS and CDS); EDS clients always name clusters.
    pub fn empty_is_wildcard(self) -> bool {
        !matches!(self, Self::Endpoint)
    }

    /// Short name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Listener => "lds",
            Self::Cluster => "cds",
            Self::Endpoint => "eds",
        }
    }
}

/// The resources of one kind with their version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resources {
    /// A hash of the resources' content: equal content, equal version, on
    /// every replica and across restarts.
    pub version: String,
    /// By name.
    pub by_name: BTreeMap<String, Any>,
    /// Each resource's content hash. Not a hash of the encoding: prost
    /// encodes map fields (the metadata `Struct`) in a random order, so
    /// equal resources can encode differently.
    pub hashes: BTreeMap<String, u64>,
}

/// gRPC clients' default limit on one received message: 4 MiB, less a
/// little for the response around the assignment. At about 120 bytes per
/// endpoint an assignment reaches it near 35,000 endpoints in one
/// service; past it raise the clients' limit (grpc-go
/// `grpc.MaxCallRecvMsgSize`, grpc-java `maxInboundMessageSize`, grpcio
/// `grpc.max_receive_message_length`) or split the service.
pub const GRPC_DEFAULT_MAX_RECV: usize = 4 * 1024 * 1024 - 1024;

/// Every resource of one view.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The etcd revision the view reflected.
    pub revision: i64,
    /// Listeners, clusters and assignments.
    pub kinds: [Resources; 3],
}

impl Snapshot {
    /// The resources of `kind`.
    pub fn of(&self, kind: Kind) -> &Resources {
        &self.kinds[kind as usize]
    }

    /// Services whose assignment is larger than `limit` bytes encoded,
    /// with its size: a gRPC client with that receive limit (grpc-go,
    /// grpc-java and grpc-core default to [`GRPC_DEFAULT_MAX_RECV`]) would
    /// refuse the response and reconnect in a loop.
    pub fn oversized(&self, limit: usize) -> Vec<(&str, usize)> {
        self.of(Kind::Endpoint)
            .by_name
            .iter()
            .filter(|(_, any)| any.value.len() > limit)
            .map(|(name, any)| (name.as_str(), any.value.len()))
            .collect()
    }

    /// Whether every kind has the same versions as `other`.
    pub fn same_content(&self, other: &Snapshot) -> bool {
        self.kinds
            .iter()
            .zip(other.kinds.iter())
            .all(|(a, b)| a.version == b.version)
    }

    /// Builds every resource from `view`. `max_unhealthy_ratio` is the
    /// controller's safety valve (`--max-unhealthy-ratio`): when more
    /// than that share of a service's members fail probes at once (and
    /// more than one), the controller is more likely cut off from them
    /// than they are all dead, so their failures are not passed on
    /// (sent as `UNKNOWN`, which clients use): a partitioned controller
    /// must not make every client stop calling. Envoy's panic threshold
    /// does the same on its side.
    pub fn build(view: &ServicesView, max_unhealthy_ratio: f64) -> Self {
        let mut listeners = BTreeMap::new();
        let mut clusters = BTreeMap::new();
        let mut endpoints = BTreeMap::new();
        for s in &view.services {
            let name = s.name.to_string();
            let l = pack(listener(&name));
            let lh = fnv(&l.value);
            listeners.insert(name.clone(), (l, lh));
            let c = pack(cluster(&name));
            let ch = fnv(&c.value);
            clusters.insert(name.clone(), (c, ch));
            let failing = s
                .members
                .iter()
                .filter(|m| m.weight.is_some() && health_of(m) == HealthStatus::Unhealthy)
                .count();
            let valid = s.members.iter().filter(|m| m.weight.is_some()).count();
            let members: Vec<MemberView> =
                if failing > 1 && failing as f64 > max_unhealthy_ratio * valid as f64 {
                    s.members
                        .iter()
                        .cloned()
                        .map(|mut m| {
                            if health_of(&m) == HealthStatus::Unhealthy {
                                m.healthy = None;
                                m.status = "unknown";
                            }
                            m
                        })
                        .collect()
                } else {
                    s.members.clone()
                };
            let e = pack(assignment(&name, &members));
            endpoints.insert(name.clone(), (e, members_hash(&members)));
        }
        Self {
            revision: view.revision,
            kinds: [
                Resources::from_map(listeners),
                Resources::from_map(clusters),
                Resources::from_map(endpoints),
            ],
        }
    }
}

/// FNV-1a: stable across processes and Rust releases (std's hasher
/// promises neither).
fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The content of an assignment: what [`assignment`] reads of each member.
fn members_hash(members: &[MemberView]) -> u64 {
    let mut text = String::new();
    for m in members {
        use std::fmt::Write;
        let _ = write!(
            text,
            "{}\0{:?}\0{:?}\0{:?}\0{}\0",
            m.addr,
            m.weight,
            health_of(m),
            m.version,
            m.key
        );
    }
    fnv(text.as_bytes())
}

impl Resources {
    /// The resources by name, each with its content hash.
    pub fn from_map(resources: BTreeMap<String, (Any, u64)>) -> Self {
        let hashes: BTreeMap<String, u64> = resources
            .iter()
            .map(|(n, (_, h))| (n.clone(), *h))
            .collect();
        Self {
            version: Self::version_of(hashes.iter().map(|(n, h)| (n.as_str(), *h))),
            by_name: resources.into_iter().map(|(n, (a, _))| (n, a)).collect(),
            hashes,
        }
    }

    /// The version of a set of resources given as (name, content hash),
    /// in name order.
    pub fn version_of<'a>(resources: impl IntoIterator<Item = (&'a str, u64)>) -> String {
        let mut bytes = Vec::new();
        for (name, h) in resources {
            bytes.extend_from_slice(name.as_bytes());
            bytes.push(0);
            bytes.extend_from_slice(&h.to_le_bytes());
        }
        format!("{:016x}", fnv(&bytes))
    }
}

fn pack<T: Message + Name>(m: T) -> Any {
    Any {
        type_url: T::type_url(),
        value: m.encode_to_vec(),
    }
}

/// Listener `name`: an `api_listener` whose HTTP connection manager routes
/// every path to cluster `name`, router filter last (gRPC requires it).
pub fn listener(name: &str) -> Listener {
    let route_config = RouteConfiguration {
        name: name.to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: name.to_owned(),
            domains: vec!["*".to_owned()],
            routes: vec![Route {
                r#match: Some(RouteMatch {
                    path_specifier: Some(route_match::PathSpecifier::Prefix(String::new())),
                    ..Default::default()
                }),
                action: Some(route::Action::Route(RouteAction {
                    cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                        name.to_owned(),
                    )),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_owned(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::RouteConfig(
            route_config,
        )),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(
                pack(Router::default()),
            )),
            ..Default::default()
        }],
        ..Default::default()
    };
    Listener {
        name: name.to_owned(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack(hcm)),
        }),
        ..Default::default()
    }
}

/// Cluster `name`: EDS over ADS, round robin, and HTTP/2 upstream (Envoy
/// otherwise speaks HTTP/1.1 to the servers and every gRPC call fails;
/// gRPC clients ignore the field).
pub fn cluster(name: &str) -> Cluster {
    let h2 = HttpProtocolOptions {
        upstream_protocol_options: Some(
            http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                http_protocol_options::ExplicitHttpConfig {
                    protocol_config: Some(
                        http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                            Http2ProtocolOptions::default(),
                        ),
                    ),
                },
            ),
        ),
        ..Default::default()
    };
    Cluster {
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                ..Default::default()
            }),
            service_name: String::new(),
        }),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        typed_extension_protocol_options: HashMap::from([(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_owned(),
            pack(h2),
        )]),
        ..Default::default()
    }
}

/// How a member's state reaches clients.
pub fn health_of(m: &MemberView) -> HealthStatus {
    match (m.weight, m.healthy, m.status) {
        (Some(0), _, _) => HealthStatus::Draining,
        // Alive but NOT_SERVING: the server is shutting down (it drains).
        (_, _, "not_serving") => HealthStatus::Draining,
        (_, Some(false), _) => HealthStatus::Unhealthy,
        (_, Some(true), _) => HealthStatus::Healthy,
        (_, None, _) => HealthStatus::Unknown,
    }
}

/// The members of `name` that clients can be told about: those with a
/// valid value. Each in a locality of its own (`sub_zone` = its address)
/// carrying its weight, its endpoint carrying the same weight, its
/// health, and `version` and `key` as metadata.
pub fn assignment(name: &str, members: &[MemberView]) -> ClusterLoadAssignment {
    let endpoints = members
        .iter()
        .filter_map(|m| {
            let weight = m.weight?;
            let (host, port) = split_addr(&m.addr)?;
            let weight = Some(UInt32Value {
                value: weight.max(1),
            });
            let metadata = Metadata {
                filter_metadata: HashMap::from([(
                    METADATA_NAMESPACE.to_owned(),
                    Struct {
                        fields: [
                            ("version", m.version.clone().unwrap_or_default()),
                            ("key", m.key.clone()),
                        ]
                        .into_iter()
                        .map(|(k, v)| {
                            (
                                k.to_owned(),
                                Value {
                                    kind: Some(value::Kind::StringValue(v)),
                                },
                            )
                        })
                        .collect(),
                    },
                )]),
                ..Default::default()
            };
            Some(LocalityLbEndpoints {
                locality: Some(Locality {
                    sub_zone: m.addr.clone(),
                    ..Default::default()
                }),
                load_balancing_weight: weight,
                lb_endpoints: vec![LbEndpoint {
                    health_status: health_of(m) as i32,
                    metadata: Some(metadata),
                    load_balancing_weight: weight,
                    host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                        address: Some(Address {
                            address: Some(address::Address::SocketAddress(SocketAddress {
                                address: host,
                                port_specifier: Some(socket_address::PortSpecifier::PortValue(
                                    port,
                                )),
                                ..Default::default()
                            })),
                        }),
                        ..Default::default()
                    })),
                }],
                ..Default::default()
            })
        })
        .collect();
    ClusterLoadAssignment {
        cluster_name: name.to_owned(),
        endpoints,
        ..Default::default()
    }
}

/// `host:port` or `[v6]:port` into the parts a SocketAddress holds.
fn split_addr(addr: &str) -> Option<(String, u32)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host.to_owned(), port.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(
        addr: &str,
        weight: Option<u32>,
        healthy: Option<bool>,
        status: &'static str,
    ) -> MemberView {
        MemberView {
            addr: addr.to_owned(),
            key: format!("/ns/s/{addr}"),
            version: Some("1.2.3".to_owned()),
            weight,
            registered_weight: weight,
            r#override: None,
            lane: None,
            kind: "json",
            lease: None,
            ttl: None,
            healthy,
            status,
            status_detail: None,
            last_probe: None,
            consecutive_failures: 0,
            mod_revision: 1,
            problems: vec![],
        }
    }

    #[test]
    fn one_locality_per_member_with_its_weight() {
        let cla = assignment(
            "s",
            &[
                member("127.0.0.1:1", Some(100), Some(true), "serving"),
                member("[::1]:2", Some(0), Some(true), "serving"),
                member("127.0.0.1:3", None, None, "unknown"),
                member("127.0.0.1:4", Some(300), Some(false), "failed"),
            ],
        );
        assert_eq!(cla.endpoints.len(), 3, "the invalid member is left out");
        let w: Vec<u32> = cla
            .endpoints
            .iter()
            .map(|l| l.load_balancing_weight.unwrap().value)
            .collect();
        assert_eq!(w, [100, 1, 300]);
        let hs: Vec<i32> = cla
            .endpoints
            .iter()
            .map(|l| l.lb_endpoints[0].health_status)
            .collect();
        assert_eq!(
            hs,
            [
                HealthStatus::Healthy as i32,
                HealthStatus::Draining as i32,
                HealthStatus::Unhealthy as i32
            ]
        );
        let Some(lb_endpoint::HostIdentifier::Endpoint(e)) =
            &cla.endpoints[1].lb_endpoints[0].host_identifier
        else {
            panic!("no endpoint")
        };
        let Some(address::Address::SocketAddress(sa)) = &e.address.as_ref().unwrap().address else {
            panic!("no socket address")
        };
        assert_eq!(sa.address, "::1");
        let md = &cla.endpoints[0].lb_endpoints[0]
            .metadata
            .as_ref()
            .unwrap()
            .filter_metadata[METADATA_NAMESPACE];
        assert_eq!(
            md.fields["key"].kind,
            Some(value::Kind::StringValue("/ns/s/127.0.0.1:1".into()))
        );
    }

    #[test]
    fn most_members_failing_at_once_is_not_passed_on() {
        use crate::view::{Counts, ServiceView};
        use etcd_lb_registry::schema::ServiceName;
        let view = |failing: usize| ServicesView {
            revision: 1,
            safety_valve: None,
            invalid_keys: vec![],
            services: vec![ServiceView {
                name: ServiceName::new("s").unwrap(),
                counts: Counts::default(),
                split: None,
                safety_valve: None,
                members: (0..4)
                    .map(|i| {
                        let addr = format!("127.0.0.1:{}", i + 1);
                        if i < failing {
                            member(&addr, Some(100), Some(false), "failed")
                        } else {
                            member(&addr, Some(100), Some(true), "serving")
                        }
                    })
                    .collect(),
            }],
        };
        let health = |failing| {
            let snap = Snapshot::build(&view(failing), 0.5);
            let cla = ClusterLoadAssignment::decode(
                snap.of(Kind::Endpoint).by_name["s"].value.as_slice(),
            )
            .unwrap();
            cla.endpoints
                .iter()
                .map(|l| l.lb_endpoints[0].health_status)
                .filter(|h| *h == HealthStatus::Unhealthy as i32)
                .count()
        };
        assert_eq!(health(1), 1);
        assert_eq!(health(2), 2, "half is not more than half");
        assert_eq!(
            health(3),
            0,
            "3 of 4 failing: the controller is likely cut off"
        );
    }

    /// A service whose assignment passes gRPC's default 4 MiB receive
    /// limit is named, with its size; at about 120 bytes per endpoint that
    /// is near 35,000 endpoints (issue 33, point 9).
    #[test]
    fn assignments_past_the_clients_receive_limit_are_named() {
        let big: Vec<MemberView> = (0..40_000u32)
            .map(|i| {
                member(
                    &format!("10.{}.{}.{}:50051", i >> 16, (i >> 8) & 255, i & 255),
                    Some(100),
                    Some(true),
                    "serving",
                )
            })
            .collect();
        let view = ServicesView {
            revision: 1,
            safety_valve: None,
            services: vec![
                crate::view::ServiceView {
                    name: etcd_lb_registry::schema::ServiceName::new("big").unwrap(),
                    members: big,
                    counts: Default::default(),
                    safety_valve: None,
                    split: None,
                },
                crate::view::ServiceView {
                    name: etcd_lb_registry::schema::ServiceName::new("small").unwrap(),
                    members: vec![member("127.0.0.1:1", Some(1), Some(true), "serving")],
                    counts: Default::default(),
                    safety_valve: None,
                    split: None,
                },
            ],
            invalid_keys: vec![],
        };
        let snap = Snapshot::build(&view, 0.5);
        let over = snap.oversized(GRPC_DEFAULT_MAX_RECV);
        assert_eq!(over.len(), 1, "{over:?}");
        assert_eq!(over[0].0, "big");
        assert!(over[0].1 > GRPC_DEFAULT_MAX_RECV);
        let per_endpoint = over[0].1 / 40_000;
        assert!(
            (80..200).contains(&per_endpoint),
            "{per_endpoint} bytes per endpoint"
        );
    }

    #[test]
    fn versions_follow_content_only() {
        let m = |w| {
            vec![
                member("127.0.0.1:1", Some(w), Some(true), "serving"),
                member("127.0.0.1:2", Some(5), None, "unknown"),
            ]
        };
        let enc = |w| {
            let a = pack(assignment("x", &m(w)));
            Resources::from_map(BTreeMap::from([("x".to_owned(), (a, members_hash(&m(w))))]))
        };
        // Equal content, equal version (although the encodings may
        // differ in map order); other content, other version.
        assert_eq!(enc(1).version, enc(1).version);
        assert_ne!(enc(1).version, enc(2).version);
    }
}

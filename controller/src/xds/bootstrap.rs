//! The bootstrap file a gRPC client reads (`GRPC_XDS_BOOTSTRAP`, or its
//! contents in `GRPC_XDS_BOOTSTRAP_CONFIG`) to find this control plane.
//! The format is gRPC's (gRFC A27): `xds_servers` with plaintext
//! credentials and `xds_v3`, and the node the client says it is.
//!
//! The server also asks for `ignore_resource_deletion` (gRFC A53): a client
//! keeps a Listener or Cluster it holds when an answer lacks it, instead of
//! failing every call with "does not exist". A controller restarted onto a
//! wiped or restored etcd, synced before the servers have registered again,
//! answers without the service, and cannot know the client held it (its
//! watcher's wipe grace covers only a process that saw the old data); the
//! servers run all along, so the client should call on (static stability,
//! as the client library does). Found by the robustness harness (seed 2106
//! with `--xds`); the cost, as A53 says, is that a service removed for good
//! stays in clients that hold it until they restart (its endpoints, gone,
//! fail to connect).

use serde_json::{json, Value};

/// What a client's bootstrap names.
#[derive(Debug, Clone)]
pub struct Bootstrap {
    /// `host:port` of a controller's `--xds-listen` (in Kubernetes: the
    /// controller's Service).
    pub server: String,
    /// The client's node id (shown in the controller's logs).
    pub node_id: String,
    /// The client's node cluster (free text for the control plane).
    pub node_cluster: String,
}

impl Bootstrap {
    /// The JSON document.
    pub fn to_json(&self) -> Value {
        json!({
            "xds_servers": [{
                "server_uri": self.server,
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3", "ignore_resource_deletion"],
            }],
            "node": {
                "id": self.node_id,
                "cluster": self.node_cluster,
                "locality": {},
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_what_grpc_reads() {
        let b = Bootstrap {
            server: "ctl:18000".into(),
            node_id: "n".into(),
            node_cluster: "c".into(),
        }
        .to_json();
        assert_eq!(b["xds_servers"][0]["server_uri"], "ctl:18000");
        assert_eq!(b["xds_servers"][0]["channel_creds"][0]["type"], "insecure");
        assert_eq!(b["xds_servers"][0]["server_features"][0], "xds_v3");
        assert_eq!(
            b["xds_servers"][0]["server_features"][1],
            "ignore_resource_deletion"
        );
        assert_eq!(b["node"]["id"], "n");
    }
}

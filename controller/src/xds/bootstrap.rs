//! The bootstrap file a gRPC client reads (`GRPC_XDS_BOOTSTRAP`, or its
//! contents in `GRPC_XDS_BOOTSTRAP_CONFIG`) to find this control plane.
//! The format is gRPC's (gRFC A27): `xds_servers` with plaintext
//! credentials and `xds_v3`, and the node the client says it is.

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
                "server_features": ["xds_v3"],
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
        assert_eq!(b["node"]["id"], "n");
    }
}

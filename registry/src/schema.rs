//! The etcd schema: the one contract every crate obeys.
//!
//! Keys are `<root><service>/<addr>` (root defaults to `/ns/`), for example
//! `/ns/greet_service/10.0.0.7:3000`. The key suffix is the endpoint's
//! identity. Values are JSON objects `{"addr", "version", "weight"}`; a value
//! that is not JSON at all is a *legacy* entry written by the original Go
//! servers (a plain `host:port`), and readers then trust the key alone.
//!
//! Invariants kept here, so no reader or writer has to remember them:
//! - the key suffix is authoritative; a different `addr` in the value is a
//!   reported mismatch, never a redirect;
//! - `weight` is an integer in `0..=MAX_WEIGHT`, default [`DEFAULT_WEIGHT`];
//! - unknown fields survive a read-modify-write (forward compatibility);
//! - parsing never panics, whatever the bytes.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The key root the original tutorial used (`"/" + "ns" + "/"`).
pub const DEFAULT_ROOT: &str = "/ns/";
/// The weight of an entry that does not say, and of every legacy entry.
pub const DEFAULT_WEIGHT: u32 = 100;
/// The largest weight accepted; bigger values are invalid, not clamped, so a
/// typo never silently takes all the traffic.
pub const MAX_WEIGHT: u32 = 10_000;
/// Values larger than this are invalid without being parsed: registry values
/// are a few dozen bytes, and a hostile megabyte must not cost a parse.
pub const MAX_VALUE_LEN: usize = 64 * 1024;

/// Why a key, name or value was rejected. The message is shown to operators.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// A service name outside `[a-z0-9_.-]{1,63}`.
    #[error("invalid service name {0:?}: want 1 to 63 characters of [a-z0-9_.-]")]
    ServiceName(String),
    /// An address that is not `host:port`.
    #[error("invalid address {addr:?}: {reason}")]
    Addr {
        /// The rejected text.
        addr: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A key outside the schema's layout.
    #[error("invalid key {key:?}: {reason}")]
    Key {
        /// The key, lossily decoded.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A value that is JSON but not a valid endpoint.
    #[error("invalid value: {0}")]
    Value(String),
}

/// Shorthand for results of this module.
pub type Result<T, E = SchemaError> = std::result::Result<T, E>;

/// A validated service name: `[a-z0-9_.-]{1,63}`, so it can never contain
/// the `/` that separates it from the address in a key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct ServiceName(String);

impl ServiceName {
    /// Validates `name`.
    pub fn new(name: &str) -> Result<Self> {
        let ok = (1..=63).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.-".contains(&b));
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(SchemaError::ServiceName(name.to_owned()))
        }
    }

    /// The name as written in keys.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ServiceName {
    type Err = SchemaError;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

/// A validated endpoint address, `host:port`: an IPv4 address, a bracketed
/// IPv6 address or a DNS name, and a port in 1..=65535. It is an endpoint's
/// identity, so it is kept exactly as written (no normalisation that could
/// make two processes disagree about which key is theirs). Shared, not
/// owned: the balancer clones the picked address on every call, so a clone
/// is a reference count, not an allocation.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Addr(Arc<str>);

impl Serialize for Addr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl Addr {
    /// Validates `addr`.
    pub fn new(addr: &str) -> Result<Self> {
        let err = |reason| SchemaError::Addr {
            addr: addr.chars().take(300).collect(),
            reason,
        };
        if addr.len() > 261 {
            return Err(err("too long"));
        }
        if let Ok(sa) = SocketAddr::from_str(addr) {
            if sa.port() == 0 {
                return Err(err("port 0"));
            }
            if let SocketAddr::V6(v6) = sa {
                // Zones and flow info have no place in a registry key.
                if v6.scope_id() != 0 || addr.contains('%') {
                    return Err(err("IPv6 zone not allowed"));
                }
            }
            return Ok(Self(addr.into()));
        }
        let (host, port) = addr.rsplit_once(':').ok_or_else(|| err("missing :port"))?;
        if host.starts_with('[') {
            return Err(err("bad bracketed IPv6 address"));
        }
        if host.contains(':') {
            return Err(err("IPv6 addresses must be in brackets"));
        }
        let port: u16 = port.parse().map_err(|_| err("bad port"))?;
        if port == 0 {
            return Err(err("port 0"));
        }
        if host.parse::<IpAddr>().is_ok() {
            // Parsed as IP but not as a socket address: cannot happen for v4,
            // but keep the branch total.
            return Ok(Self(addr.into()));
        }
        if !valid_dns_name(host) {
            return Err(err("bad host name"));
        }
        Ok(Self(addr.into()))
    }

    /// The address as written in keys and dialled by clients.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Builds an address from a socket address, bracketing IPv6.
    ///
    /// A listener's `local_addr()` may be a wildcard (`0.0.0.0:3000`), which
    /// no client can dial: [`Addr::dialable`] says whether it is, and the
    /// registrar refuses to advertise one that is not.
    pub fn from_socket(sa: SocketAddr) -> Self {
        Self(sa.to_string().into())
    }

    /// Why clients could not dial this address, if they could not: a
    /// wildcard host (`0.0.0.0`, `[::]`) or port 0. Host names are taken
    /// as given.
    pub fn dialable(&self) -> std::result::Result<(), &'static str> {
        match SocketAddr::from_str(&self.0) {
            Ok(sa) if sa.ip().is_unspecified() => Err(
                "a wildcard address (0.0.0.0 or [::]) names no host a client can dial; advertise the address clients reach (in Kubernetes, the pod IP)",
            ),
            Ok(sa) if sa.port() == 0 => Err("port 0 is not a port a client can dial; advertise the port the listener got"),
            _ => Ok(()),
        }
    }

    /// `http://<addr>`, the URI a gRPC channel dials.
    pub fn uri(&self) -> String {
        format!("http://{}", self.0)
    }

    /// Whether the host part is an IPv6 literal.
    pub fn is_ipv6(&self) -> bool {
        self.0.starts_with('[')
            && self.0[1..]
                .split_once(']')
                .is_some_and(|(h, _)| h.parse::<Ipv6Addr>().is_ok())
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Addr {
    type Err = SchemaError;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

fn valid_dns_name(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The key prefix of a root, normalised to start and end with `/`.
///
/// # Errors
/// A root that is empty once slashes are trimmed.
pub fn normalize_root(root: &str) -> Result<String> {
    let trimmed = root.trim_matches('/');
    if trimmed.is_empty() {
        return Err(SchemaError::Key {
            key: root.to_owned(),
            reason: "root must not be empty",
        });
    }
    Ok(format!("/{trimmed}/"))
}

/// `<root><service>/`: the prefix a client lists and watches.
pub fn service_prefix(root: &str, service: &ServiceName) -> String {
    format!("{root}{service}/")
}

/// `<root><service>/<addr>`: the key a server owns.
pub fn key(root: &str, service: &ServiceName, addr: &Addr) -> String {
    format!("{root}{service}/{addr}")
}

/// Splits a key under `root` into service and address.
///
/// # Errors
/// Keys outside `root`, with a bad service name, a bad address, or extra
/// path segments.
pub fn parse_key(root: &str, key: &[u8]) -> Result<(ServiceName, Addr)> {
    let bad = |reason| SchemaError::Key {
        key: String::from_utf8_lossy(&key[..key.len().min(300)]).into_owned(),
        reason,
    };
    let key_str = std::str::from_utf8(key).map_err(|_| bad("not UTF-8"))?;
    let rest = key_str
        .strip_prefix(root)
        .ok_or_else(|| bad("outside the root"))?;
    let (service, addr) = rest
        .split_once('/')
        .ok_or_else(|| bad("want <root><service>/<addr>"))?;
    if addr.contains('/') {
        return Err(bad("address must not contain '/'"));
    }
    let service = ServiceName::new(service).map_err(|_| bad("bad service name"))?;
    let addr = Addr::new(addr).map_err(|_| bad("bad address"))?;
    Ok((service, addr))
}

/// The JSON value a server writes.
///
/// Unknown fields are kept in `extra` and written back, so a newer writer's
/// fields survive an older writer's update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The address; equals the key suffix when written by this project.
    pub addr: String,
    /// A free string, semver by convention.
    #[serde(default)]
    pub version: String,
    /// Relative share of new calls; 0 means draining.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Fields this version does not know, preserved on write.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_weight() -> u32 {
    DEFAULT_WEIGHT
}

impl Endpoint {
    /// A value for `addr` with no extra fields.
    pub fn new(addr: &Addr, version: impl Into<String>, weight: u32) -> Self {
        Self {
            addr: addr.to_string(),
            version: version.into(),
            weight,
            extra: Map::new(),
        }
    }

    /// The JSON bytes to put in etcd.
    ///
    /// # Errors
    /// A weight above [`MAX_WEIGHT`]: writers must not produce what readers
    /// reject.
    pub fn to_json(&self) -> Result<String> {
        if self.weight > MAX_WEIGHT {
            return Err(SchemaError::Value(format!(
                "weight {} above {MAX_WEIGHT}",
                self.weight
            )));
        }
        serde_json::to_string(self).map_err(|e| SchemaError::Value(e.to_string()))
    }
}

/// Whether a value was JSON or a legacy plain address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueKind {
    /// `{"addr", "version", "weight"}`.
    Json,
    /// A plain `host:port`, as the original Go servers write.
    Legacy,
}

/// What a reader makes of one key and its value: the key's address, the
/// value's metadata, and the problems worth reporting (none of which stop
/// the entry from being used).
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The address from the key: the endpoint's identity.
    pub addr: Addr,
    /// The version from the value, `""` for legacy entries.
    pub version: String,
    /// The weight from the value, [`DEFAULT_WEIGHT`] for legacy entries.
    pub weight: u32,
    /// JSON or legacy.
    pub kind: ValueKind,
    /// Non-fatal findings, e.g. the value's `addr` differs from the key.
    pub problems: Vec<String>,
}

/// Interprets a value stored under the key whose suffix is `addr`.
///
/// # Errors
/// [`SchemaError::Value`] with the reason, for values that are JSON but not
/// a valid endpoint, or that are not text at all, or are too large.
pub fn parse_value(addr: &Addr, value: &[u8]) -> Result<Member> {
    if value.len() > MAX_VALUE_LEN {
        return Err(SchemaError::Value(format!(
            "{} bytes, more than the {MAX_VALUE_LEN} allowed",
            value.len()
        )));
    }
    let text = std::str::from_utf8(value)
        .map_err(|_| SchemaError::Value("not UTF-8".to_owned()))?
        .trim();
    let json: Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            // A bracketed IPv6 address (`[fd00::7]:3000`, what an original
            // Go server on IPv6 writes) starts like JSON but is a legacy
            // value; so is anything else that is a valid address.
            if Addr::new(text).is_ok() {
                return Ok(legacy(addr, text));
            }
            if text.starts_with('{') || text.starts_with('[') || text.starts_with('"') {
                // Meant to be JSON, but broken: not a legacy address.
                return Err(SchemaError::Value(format!("malformed JSON: {e}")));
            }
            return Ok(legacy(addr, text));
        }
    };
    let Value::Object(mut obj) = json else {
        return Err(SchemaError::Value(format!(
            "JSON {} where an object is required",
            json_type(&json)
        )));
    };
    let weight = match obj.remove("weight") {
        None | Some(Value::Null) => DEFAULT_WEIGHT,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(w) if w <= u64::from(MAX_WEIGHT) => w as u32,
            Some(w) => return Err(SchemaError::Value(format!("weight {w} above {MAX_WEIGHT}"))),
            None => {
                return Err(SchemaError::Value(format!(
                    "weight {n} is not an integer in 0..={MAX_WEIGHT}"
                )))
            }
        },
        Some(other) => {
            return Err(SchemaError::Value(format!(
                "weight is a {}, want an integer",
                json_type(&other)
            )))
        }
    };
    let version = match obj.remove("version") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(SchemaError::Value(format!(
                "version is a {}, want a string",
                json_type(&other)
            )))
        }
    };
    let mut problems = Vec::new();
    match obj.remove("addr") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == addr.as_str() => {}
        Some(Value::String(s)) => problems.push(mismatch(addr, &s)),
        Some(other) => {
            return Err(SchemaError::Value(format!(
                "addr is a {}, want a string",
                json_type(&other)
            )))
        }
    }
    Ok(Member {
        addr: addr.clone(),
        version,
        weight,
        kind: ValueKind::Json,
        problems,
    })
}

fn legacy(addr: &Addr, text: &str) -> Member {
    let mut problems = vec!["legacy value (plain address, not JSON)".to_owned()];
    if text != addr.as_str() {
        problems.push(mismatch(addr, text));
    }
    Member {
        addr: addr.clone(),
        version: String::new(),
        weight: DEFAULT_WEIGHT,
        kind: ValueKind::Legacy,
        problems,
    }
}

fn mismatch(addr: &Addr, value_addr: &str) -> String {
    let shown: String = value_addr.chars().take(100).collect();
    format!("value addr {shown:?} differs from key addr {addr:?}; the key wins")
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> Addr {
        Addr::new(s).unwrap()
    }

    #[test]
    fn service_names() {
        for ok in ["greet_service", "a", "a.b-c_1", &"x".repeat(63)] {
            assert!(ServiceName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Greet", "a/b", "a b", &"x".repeat(64), "é"] {
            assert!(ServiceName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addresses() {
        for ok in [
            "10.0.0.7:3000",
            "127.0.0.1:1",
            "[::1]:3000",
            "[2001:db8::1]:443",
            "greet-0.greet.svc:3000",
            "localhost:65535",
        ] {
            assert!(Addr::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "10.0.0.7",
            "10.0.0.7:0",
            "10.0.0.7:65536",
            "::1:3000",
            "[::1:3000",
            "[fe80::1%eth0]:3000",
            "host name:80",
            "-bad.example:80",
            "a/b:80",
            ":80",
        ] {
            assert!(Addr::new(bad).is_err(), "{bad}");
        }
        assert!(addr("[::1]:3000").is_ipv6());
        assert!(!addr("10.0.0.1:3000").is_ipv6());
    }

    #[test]
    fn keys_round_trip() {
        let s = ServiceName::new("greet_service").unwrap();
        for a in ["10.0.0.7:3000", "[::1]:3000", "svc.example:80"] {
            let k = key(DEFAULT_ROOT, &s, &addr(a));
            assert_eq!(
                parse_key(DEFAULT_ROOT, k.as_bytes()).unwrap(),
                (s.clone(), addr(a))
            );
        }
        assert_eq!(
            key(DEFAULT_ROOT, &s, &addr("10.0.0.7:3000")),
            "/ns/greet_service/10.0.0.7:3000"
        );
        for bad in [
            "/ns/greet_service",
            "/ns/greet_service/",
            "/other/greet_service/1.2.3.4:5",
            "/ns/Greet/1.2.3.4:5",
            "/ns/greet_service/1.2.3.4:5/extra",
            "/ns//1.2.3.4:5",
        ] {
            assert!(parse_key(DEFAULT_ROOT, bad.as_bytes()).is_err(), "{bad}");
        }
        assert!(parse_key(DEFAULT_ROOT, b"/ns/a/\xff:1").is_err());
    }

    #[test]
    fn roots_normalise() {
        assert_eq!(normalize_root("/ns/").unwrap(), "/ns/");
        assert_eq!(normalize_root("ns").unwrap(), "/ns/");
        assert_eq!(normalize_root("/a/b").unwrap(), "/a/b/");
        assert!(normalize_root("//").is_err());
    }

    #[test]
    fn json_values() {
        let a = addr("10.0.0.7:3000");
        let m = parse_value(
            &a,
            br#"{"addr":"10.0.0.7:3000","version":"1.4.2","weight":7}"#,
        )
        .unwrap();
        assert_eq!(
            (m.weight, m.version.as_str(), m.kind),
            (7, "1.4.2", ValueKind::Json)
        );
        assert!(m.problems.is_empty());

        let m = parse_value(&a, br#"{"addr":"10.0.0.7:3000"}"#).unwrap();
        assert_eq!((m.weight, m.version.as_str()), (DEFAULT_WEIGHT, ""));

        let m = parse_value(&a, br#"{"addr":"10.9.9.9:1","weight":0,"x":[1]}"#).unwrap();
        assert_eq!(m.weight, 0);
        assert_eq!(m.addr, a, "the key suffix wins");
        assert_eq!(m.problems.len(), 1);
        assert!(m.problems[0].contains("differs"));
    }

    #[test]
    fn legacy_values() {
        let a = addr("127.0.0.1:3000");
        let m = parse_value(&a, b"127.0.0.1:3000").unwrap();
        assert_eq!(m.kind, ValueKind::Legacy);
        assert_eq!((m.weight, m.version.as_str()), (DEFAULT_WEIGHT, ""));
        assert_eq!(m.problems.len(), 1);
        let m = parse_value(&a, b"127.0.0.1:3001").unwrap();
        assert_eq!(m.kind, ValueKind::Legacy);
        assert_eq!(m.problems.len(), 2);

        // An original Go server on IPv6 writes a bracketed plain address.
        let v6 = addr("[fd00::7]:3000");
        let m = parse_value(&v6, b"[fd00::7]:3000").unwrap();
        assert_eq!((m.kind, m.weight), (ValueKind::Legacy, DEFAULT_WEIGHT));
        assert_eq!(m.problems.len(), 1, "{:?}", m.problems);
        let m = parse_value(&v6, b"[::1]:3000").unwrap();
        assert_eq!(m.kind, ValueKind::Legacy);
        assert_eq!(m.problems.len(), 2, "mismatch reported");
        // Broken JSON arrays are still invalid, not legacy.
        assert!(parse_value(&v6, b"[1, 2").is_err());
    }

    #[test]
    fn invalid_values_say_why() {
        let a = addr("127.0.0.1:3000");
        for (v, why) in [
            (&br#"{"weight":"100"}"#[..], "weight is a string"),
            (br#"{"weight":-1}"#, "not an integer"),
            (br#"{"weight":10001}"#, "above"),
            (br#"{"weight":1.5}"#, "not an integer"),
            (br#"{"version":3}"#, "version is a number"),
            (br#"{"addr":true}"#, "addr is a boolean"),
            (br#"[1,2]"#, "array"),
            (br#"42"#, "number"),
            (br#"{"addr":"#, "malformed JSON"),
            (b"\xff\xfe", "UTF-8"),
        ] {
            let err = parse_value(&a, v).unwrap_err().to_string();
            assert!(err.contains(why), "{err} should mention {why}");
        }
        let nested = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse_value(&a, nested.as_bytes()).is_err());
        let huge = vec![b' '; MAX_VALUE_LEN + 1];
        assert!(parse_value(&a, &huge)
            .unwrap_err()
            .to_string()
            .contains("bytes"));
    }

    #[test]
    fn unknown_fields_survive_a_rewrite() {
        let raw = r#"{"addr":"1.2.3.4:5","version":"1","weight":5,"zone":"a","labels":{"x":1}}"#;
        let mut ep: Endpoint = serde_json::from_str(raw).unwrap();
        ep.weight = 0;
        let out: Value = serde_json::from_str(&ep.to_json().unwrap()).unwrap();
        assert_eq!(out["zone"], "a");
        assert_eq!(out["labels"]["x"], 1);
        assert_eq!(out["weight"], 0);
        let mut too_heavy = ep.clone();
        too_heavy.weight = MAX_WEIGHT + 1;
        assert!(too_heavy.to_json().is_err());
    }

    fn arb_addr() -> impl Strategy<Value = Addr> {
        prop_oneof![
            any::<(std::net::Ipv4Addr, u16)>()
                .prop_map(|(ip, p)| Addr::from_socket(SocketAddr::new(ip.into(), p.max(1)))),
            any::<(std::net::Ipv6Addr, u16)>()
                .prop_map(|(ip, p)| Addr::from_socket(SocketAddr::new(ip.into(), p.max(1)))),
            (
                "[a-z][a-z0-9-]{0,20}[a-z0-9](\\.[a-z][a-z0-9]{0,10}){0,3}",
                1u16..
            )
                .prop_map(|(h, p)| Addr::new(&format!("{h}:{p}")).unwrap()),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(key in proptest::collection::vec(any::<u8>(), 0..200),
                                       value in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_key(DEFAULT_ROOT, &key);
            let _ = parse_value(&Addr::new("1.2.3.4:5").unwrap(), &value);
            if let Ok(s) = std::str::from_utf8(&key) {
                let _ = Addr::new(s);
                let _ = ServiceName::new(s);
            }
        }

        #[test]
        fn arbitrary_json_never_panics(s in "[\\[\\]{}\":,0-9a-z .-]{0,200}") {
            let _ = parse_value(&Addr::new("1.2.3.4:5").unwrap(), s.as_bytes());
        }

        #[test]
        fn valid_endpoints_round_trip(addr in arb_addr(),
                                      service in "[a-z0-9_.-]{1,63}",
                                      version in ".{0,20}",
                                      weight in 0..=MAX_WEIGHT) {
            let service = ServiceName::new(&service).unwrap();
            let k = key(DEFAULT_ROOT, &service, &addr);
            let (s2, a2) = parse_key(DEFAULT_ROOT, k.as_bytes()).unwrap();
            prop_assert_eq!(&s2, &service);
            prop_assert_eq!(&a2, &addr);
            let ep = Endpoint::new(&addr, version.clone(), weight);
            let json = ep.to_json().unwrap();
            let m = parse_value(&a2, json.as_bytes()).unwrap();
            prop_assert_eq!(m.addr, addr);
            prop_assert_eq!(m.version, version);
            prop_assert_eq!(m.weight, weight);
            prop_assert_eq!(m.kind, ValueKind::Json);
            prop_assert!(m.problems.is_empty());
            let back: Endpoint = serde_json::from_str(&json).unwrap();
            prop_assert_eq!(back, ep);
        }
    }
}

//! Property tests of everything that parses outside input, run by
//! `cargo test` (the libFuzzer targets in `fuzz/` go further, for a bounded
//! time, where a nightly toolchain is available):
//! - registry keys and values: arbitrary bytes and arbitrary JSON trees never
//!   panic, the weight rule is exactly "absent, null or an integer
//!   0..=10000", accepted keys round-trip;
//! - the binaries' command lines: arbitrary flag soups are either a clean
//!   usage error or a config whose checks do not panic;
//! - the controller's HTTP parameters, against the real binary: any service
//!   name and query gives 200, 400 or 404, never a 5xx or a dead process.

mod common;

use std::time::Duration;

use clap::Parser;
use common::{controller, http_get};
use etcd_lb_registry::schema::{self, Addr, ValueKind, DEFAULT_ROOT, MAX_WEIGHT};
use etcd_lb_testkit::{eventually, free_port, Etcd};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use serde_json::{json, Map, Value};

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{0,6}", inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// What the schema says about a `weight` field.
fn weight_oracle(w: Option<&Value>) -> Option<u32> {
    match w {
        None | Some(Value::Null) => Some(schema::DEFAULT_WEIGHT),
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|w| *w <= u64::from(MAX_WEIGHT))
            .map(|w| w as u32),
        Some(_) => None,
    }
}

fn addr() -> Addr {
    Addr::new("127.0.0.1:3000").expect("valid")
}

proptest! {
    #![proptest_config(PropConfig::with_cases(2000))]

    #[test]
    fn any_bytes_as_value_or_key(value in prop::collection::vec(any::<u8>(), 0..2048),
                                 key in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(m) = schema::parse_value(&addr(), &value) {
            prop_assert_eq!(m.addr, addr());
            prop_assert!(m.weight <= MAX_WEIGHT);
        }
        if let Ok((s, a)) = schema::parse_key(DEFAULT_ROOT, &key) {
            let built = schema::key(DEFAULT_ROOT, &s, &a);
            prop_assert_eq!(built.as_bytes(), &key[..]);
        }
    }

    #[test]
    fn any_json_value_follows_the_weight_rule(mut obj in prop::collection::btree_map("[a-z]{0,6}", arb_json(), 0..6),
                                              weight in prop::option::of(arb_json()),
                                              version in prop::option::of(prop_oneof![".{0,8}".prop_map(Value::String), arb_json()])) {
        if let Some(w) = &weight { obj.insert("weight".into(), w.clone()); }
        if let Some(v) = &version { obj.insert("version".into(), v.clone()); }
        obj.remove("addr");
        let raw = serde_json::to_vec(&Value::Object(obj.clone().into_iter().collect::<Map<_, _>>()))
            .expect("serialisable");
        let got = schema::parse_value(&addr(), &raw);
        let version_ok = matches!(obj.get("version"), None | Some(Value::Null) | Some(Value::String(_)));
        match (weight_oracle(obj.get("weight")), version_ok) {
            (Some(w), true) if raw.len() <= schema::MAX_VALUE_LEN => {
                let m = got.expect("valid by the schema");
                prop_assert_eq!(m.weight, w);
                prop_assert_eq!(m.kind, ValueKind::Json);
            }
            _ => prop_assert!(got.is_err(), "{}", String::from_utf8_lossy(&raw)),
        }
    }

    #[test]
    fn any_json_document_never_panics(v in arb_json()) {
        let raw = serde_json::to_vec(&v).expect("serialisable");
        let got = schema::parse_value(&addr(), &raw);
        if !v.is_object() {
            // Only objects are endpoints; anything else JSON is invalid.
            prop_assert!(got.is_err());
        }
    }

    #[test]
    fn text_that_is_not_json_is_a_legacy_entry(text in "[0-9a-z.:-]{1,40}") {
        prop_assume!(serde_json::from_str::<Value>(&text).is_err());
        let m = schema::parse_value(&addr(), text.as_bytes()).expect("legacy");
        prop_assert_eq!(m.kind, ValueKind::Legacy);
        prop_assert_eq!(m.weight, schema::DEFAULT_WEIGHT);
    }
}

const FLAGS: &[&str] = &[
    "--listen",
    "--advertise",
    "--service",
    "--prefix",
    "--weight",
    "--ttl",
    "--drain",
    "--latency",
    "--etcd-endpoints",
    "--etcd-ca",
    "--etcd-cert",
    "--etcd-key",
    "--etcd-user",
    "--etcd-password-file",
    "--interval",
    "--count",
    "--timeout",
    "--slow-start",
    "--version-req",
    "--concurrency",
    "--requests",
    "--duration",
    "--probe-interval",
    "--probe-timeout",
    "--dead-after",
    "--max-deletions-per-pass",
    "--max-unhealthy-ratio",
    "--election-ttl",
    "--log-format",
    "bench",
    "--json",
];

fn arb_argv() -> impl Strategy<Value = Vec<String>> {
    let word = prop_oneof![
        prop::sample::select(FLAGS).prop_map(str::to_owned),
        prop::sample::select(
            &[
                "0",
                "1",
                "-1",
                "2s",
                "1ms",
                "0s",
                "10001",
                "15%",
                "200%",
                "0.5",
                "nan",
                "[::1]:0",
                "127.0.0.1:3000",
                "0.0.0.0:1",
                "/",
                "//",
                "a,b,,",
                "json",
                "^1.2",
                "",
            ][..]
        )
        .prop_map(str::to_owned),
        ".{0,16}",
    ];
    prop::collection::vec(word, 0..10)
}

#[test]
fn command_lines_never_panic() {
    let mut runner = TestRunner::new(PropConfig::with_cases(3000));
    runner
        .run(&arb_argv(), |argv| {
            let server = std::iter::once("greet-server".to_owned()).chain(argv.clone());
            if let Ok(a) = greet_server::Args::try_parse_from(server) {
                let _ = a.config();
            }
            let client = std::iter::once("greet-client".to_owned()).chain(argv.clone());
            let _ = greet_client::config::Args::try_parse_from(client);
            let ctl = std::iter::once("controller".to_owned()).chain(argv);
            if let Ok(a) = controller::config::Args::try_parse_from(ctl) {
                let _ = a.config();
            }
            Ok(())
        })
        .expect("no panic on any command line");
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_http_parameters_never_5xx() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let port = free_port();
    let mut ctl = controller(&etcd.endpoint(), port, "3s")?;
    eventually(Duration::from_secs(20), "controller ready", || async {
        (http_get(port, "/readyz").await.ok()?.0 == 200).then_some(())
    })
    .await?;
    let strategy = (
        prop_oneof![
            "[a-z0-9_.-]{1,63}",
            ".{0,80}",
            Just("greet_service".to_owned())
        ],
        prop::collection::vec((".{0,10}", ".{0,10}"), 0..4),
        prop::sample::select(&["/services/", "/services"][..]),
    );
    let mut runner = TestRunner::new(PropConfig::default());
    for _ in 0..300 {
        let (name, query, base) = strategy
            .new_tree(&mut runner)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .current();
        let mut path = if base == "/services/" {
            format!("/services/{}", encode(&name))
        } else {
            "/services".to_owned()
        };
        if !query.is_empty() {
            let q: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
                .collect();
            path = format!("{path}?{}", q.join("&"));
        }
        let (status, body) = http_get(port, &path).await?;
        assert!(
            [200, 400, 404].contains(&status),
            "GET {path}: {status} {body}"
        );
    }
    assert!(ctl.is_running(), "{}", ctl.log());
    assert!(!ctl.log().contains("panicked"), "{}", ctl.log());
    Ok(())
}

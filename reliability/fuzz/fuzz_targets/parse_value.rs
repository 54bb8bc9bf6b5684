//! Any bytes as a registry value: never a panic, and whatever is accepted
//! keeps the schema's invariants (the key's address wins, weight in range).

#![no_main]

#[path = "../../../registry/src/schema.rs"]
#[allow(dead_code)]
mod schema;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let addr = schema::Addr::new("127.0.0.1:3000").expect("a valid address");
    if let Ok(m) = schema::parse_value(&addr, data) {
        assert_eq!(m.addr, addr, "the key's address wins");
        assert!(
            m.weight <= schema::MAX_WEIGHT,
            "weight {} in range",
            m.weight
        );
        if m.kind == schema::ValueKind::Json {
            // What a reader accepts, a writer can write back.
            let ep = schema::Endpoint::new(&m.addr, m.version.clone(), m.weight);
            let json = ep.to_json().expect("an accepted weight is writable");
            let again = schema::parse_value(&addr, json.as_bytes()).expect("round trip");
            assert_eq!((again.weight, again.version), (m.weight, m.version));
        }
    }
});

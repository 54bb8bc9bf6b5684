//! Any bytes as a registry key: never a panic, and every accepted key is
//! exactly the key the schema would build from its parts.

#![no_main]

#[path = "../../../registry/src/schema.rs"]
#[allow(dead_code)]
mod schema;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((service, addr)) = schema::parse_key(schema::DEFAULT_ROOT, data) {
        let built = schema::key(schema::DEFAULT_ROOT, &service, &addr);
        assert_eq!(built.as_bytes(), data, "parse_key and key agree");
    }
});

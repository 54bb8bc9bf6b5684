//! End-to-end checks live in `tests/`; this crate has no library code.

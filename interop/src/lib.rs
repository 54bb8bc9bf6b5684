//! Interop with the original Go tutorial code lives in `tests/` and `go/`; this crate has no library code.

//! Reliability and security tests (issue 7) live in `tests/`; this crate has no code of its own.

//! Placeholder; see issue 4.

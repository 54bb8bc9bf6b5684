//! Reliability and security tests (issue 7) live in `tests/`. The library
//! holds the robustness harness of issue 36: a recorded [`history`], the
//! [`checker`] of its invariants (docs/robustness.md), and the [`world`] a
//! run happens in with its [`nemesis`], and the [`failpoints`] a run may set
//! inside the real code.

pub mod checker;
pub mod failpoints;
pub mod history;
pub mod nemesis;
pub mod world;

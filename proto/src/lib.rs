//! `greet.proto`, compiled at build time.
//!
//! The proto has no `package` line, exactly like the original Go tutorial, so
//! the generated paths are `/Greet/Morning` and `/Greet/Night` and servers and
//! clients of either implementation talk to each other on the wire.

#![allow(clippy::all, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/_.rs"));

/// The gRPC method paths as they appear on the wire; pinned by a test, because
/// mixed fleets of original Go servers and ours depend on them.
pub mod paths {
    /// `Greet.Morning`.
    pub const MORNING: &str = "/Greet/Morning";
    /// `Greet.Night`.
    pub const NIGHT: &str = "/Greet/Night";
}

/// The encoded `FileDescriptorSet` of `greet.proto`, for gRPC server
/// reflection: with it, `grpcurl list`, `describe` and calls work without the
/// `.proto` at hand.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/greet_descriptor.bin"));

pub use greet_client::GreetClient;
pub use greet_server::{Greet, GreetServer};

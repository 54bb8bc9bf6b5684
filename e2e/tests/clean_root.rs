//! "Two commands on a fresh machine" proven where nothing was installed
//! before: `e2e/clean-root.sh` makes a minbase Debian bookworm root, shows
//! that `setup.sh check` fails there (and names protobuf-compiler), runs
//! `setup.sh demo`, checks that protoc compiles a proto importing the
//! well-known types and that a C compiler is there, builds etcd-client
//! (whose build script needs both) inside the root, and shows that the
//! check catches a missing libprotobuf-dev, the package a machine with
//! earlier installs hid (issue 32).
//!
//! Needs root, debootstrap (scripts/setup.sh installs it) and Debian's
//! mirror, as CI has. It fails rather than skips when they are missing:
//! this claim must not pass by not running.

use std::process::Command;

#[test]
fn setup_demo_leaves_what_the_build_needs_in_a_clean_bookworm_root() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clean-root.sh");
    let out = Command::new(script)
        .output()
        .expect("run e2e/clean-root.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "clean-root.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for step in [
        "bare-root check failed as it should",
        "check after setup.sh demo: ok",
        "etcd-client built in the clean root: ok",
        "check without libprotobuf-dev failed as it should, naming it",
        "clean-root: ok",
    ] {
        assert!(
            stdout.contains(step),
            "missing step {step:?}:\n{stdout}\n{stderr}"
        );
    }
}

//! The container images, built without a Docker daemon: buildah builds the
//! Dockerfile's three targets from static musl binaries made here
//! (`scripts/build-images.sh --from-host`), writes them as docker-archive
//! tarballs (what `kind load image-archive` takes), and this test checks
//! each image's config (entrypoint, user, ports) and contents: one layer
//! holding one static binary, which runs.
//!
//! Needs buildah, musl-gcc and the x86_64-unknown-linux-musl Rust target
//! (`scripts/setup.sh` installs them). Where they are missing the test
//! fails on CI (`CI` set) and is skipped with a message elsewhere. The
//! release build goes to its own target dir (`<target>/images`), so it
//! never waits on the lock of the build that runs the tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives in the workspace")
        .to_path_buf()
}

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn musl_target_installed() -> bool {
    Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("x86_64-unknown-linux-musl"))
}

/// `<target>` of the running test (`<target>/<profile>/deps/<test>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.ancestors()
        .nth(3)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The files in a tar archive.
fn tar_list(tar: &Path) -> Vec<String> {
    run(Command::new("tar").arg("-tf").arg(tar))
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn images_build_without_a_daemon_and_run_their_binary() {
    let mut missing = Vec::new();
    if !have("buildah", "--version") {
        missing.push("buildah (apt-get install buildah)");
    }
    if !have("musl-gcc", "--version") {
        missing.push("musl-gcc (apt-get install musl-tools)");
    }
    if !musl_target_installed() {
        missing.push("the Rust target (rustup target add x86_64-unknown-linux-musl)");
    }
    if !missing.is_empty() {
        let msg = format!(
            "the image build needs {}; ./scripts/setup.sh installs them",
            missing.join(", ")
        );
        if std::env::var_os("CI").is_some() {
            panic!("{msg}");
        }
        eprintln!("SKIPPED images_build_without_a_daemon_and_run_their_binary: {msg}");
        return;
    }

    let version = env!("CARGO_PKG_VERSION");
    let out = tempfile::tempdir().expect("temp dir");
    // Niced: the release build shares the machine with timing-sensitive
    // tests running in parallel.
    let printed = run(Command::new("nice")
        .args(["-n", "19", "bash"])
        .arg(repo_root().join("scripts/build-images.sh"))
        .args(["--builder", "buildah", "--from-host", "--no-load", "--out"])
        .arg(out.path())
        .env("CARGO_TARGET_DIR", target_dir().join("images")));

    for bin in ["greet-server", "greet-client", "controller"] {
        let reference = format!("localhost/greet-etcd/{bin}:{version}");
        assert!(
            printed.lines().any(|l| l == reference),
            "the script prints {reference}:\n{printed}"
        );

        // The image config, as buildah stored it.
        let inspect = run(Command::new("buildah").args([
            "--storage-driver",
            "vfs",
            "inspect",
            "--type",
            "image",
            &reference,
        ]));
        let v: Value = serde_json::from_str(&inspect).expect("buildah inspect prints JSON");
        let config = &v["OCIv1"]["config"];
        assert_eq!(
            config["Entrypoint"],
            serde_json::json!([format!("/{bin}")]),
            "{bin}"
        );
        assert!(
            config["Cmd"].is_null(),
            "{bin}: no Cmd, the manifests pass args"
        );
        assert_eq!(config["User"], "65532:65532", "{bin}: non-root");
        let layers = v["OCIv1"]["rootfs"]["diff_ids"].as_array().map(Vec::len);
        assert_eq!(layers, Some(1), "{bin}: FROM scratch plus the binary");

        // The docker-archive: one layer with one file, the binary, which is
        // static (it runs here with no loader or libc from the image).
        let archive = out.path().join(format!("{bin}.tar"));
        let files = tar_list(&archive);
        let layer = files
            .iter()
            .find(|f| f.ends_with(".tar") || f.ends_with("/layer.tar"))
            .unwrap_or_else(|| panic!("{bin}: a layer in {files:?}"));
        let unpacked = tempfile::tempdir().expect("temp dir");
        run(Command::new("tar")
            .arg("-xf")
            .arg(&archive)
            .arg("-C")
            .arg(unpacked.path())
            .arg(layer));
        let layer_path = unpacked.path().join(layer);
        let contents: Vec<String> = tar_list(&layer_path)
            .into_iter()
            .filter(|f| !f.ends_with('/'))
            .collect();
        assert_eq!(contents, [bin], "{bin}: the layer holds only the binary");
        run(Command::new("tar")
            .arg("-xf")
            .arg(&layer_path)
            .arg("-C")
            .arg(unpacked.path()));
        let exe = unpacked.path().join(bin);
        let ldd = Command::new("ldd").arg(&exe).output();
        if let Ok(ldd) = ldd {
            let text = String::from_utf8_lossy(&ldd.stdout).to_string()
                + &String::from_utf8_lossy(&ldd.stderr);
            assert!(
                text.contains("not a dynamic executable") || text.contains("statically linked"),
                "{bin} is static: {text}"
            );
        }
        let help = run(Command::new(&exe).arg("--version"));
        assert!(help.contains(version), "{bin} --version: {help}");
    }
}

//! The docs a newcomer reads: they name the tutorial this project grew
//! from by its title, and point at nothing outside the repository (a path
//! on one build machine means nothing to a reader).

use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives in the workspace")
        .to_path_buf()
}

fn markdown(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable dir").flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() && name != "target" && name != ".git" {
            markdown(&path, out);
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

#[test]
fn docs_name_the_tutorial_by_title_and_no_machine_paths() {
    let mut files = Vec::new();
    markdown(&repo_root(), &mut files);
    assert!(files.len() >= 4, "found {files:?}");
    let mut titled = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).expect("utf-8 docs");
        for bad in ["/work/", "shared/origin", "/root/", "/tmp/"] {
            assert!(
                !text.contains(bad),
                "{} names a path outside the repository ({bad})",
                f.display()
            );
        }
        if text.contains("gRPC接入etcd") {
            titled += 1;
        }
    }
    assert!(
        titled >= 2,
        "README and docs/interop.md name the tutorial by its title"
    );
}

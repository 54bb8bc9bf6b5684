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

/// Every relative link in every Markdown file points at a file or folder
/// that exists (anchors at a heading of the target page), so moving a page
/// cannot leave a dead link behind.
#[test]
fn relative_links_in_the_docs_resolve() {
    let mut files = Vec::new();
    markdown(&repo_root(), &mut files);
    let mut checked = 0;
    let mut dead = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("utf-8 docs");
        for target in links(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = target.split_once('#').unwrap_or((target.as_str(), ""));
            let dest = if path.is_empty() {
                f.clone()
            } else {
                f.parent().expect("a file has a folder").join(path)
            };
            checked += 1;
            if !dest.exists() {
                dead.push(format!("{}: {target} (no such file)", f.display()));
            } else if !anchor.is_empty() && dest.extension().is_some_and(|e| e == "md") {
                let page = std::fs::read_to_string(&dest).expect("utf-8 docs");
                if !headings(&page).iter().any(|h| h == anchor) {
                    dead.push(format!("{}: {target} (no such heading)", f.display()));
                }
            }
        }
    }
    assert!(
        checked >= 10,
        "only {checked} links found: is the parser broken?"
    );
    assert!(dead.is_empty(), "dead links:\n{}", dead.join("\n"));
}

/// The targets of `[text](target)` links, outside code blocks.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            rest = &rest[i + 2..];
            if let Some(end) = rest.find(')') {
                out.push(rest[..end].trim().to_owned());
                rest = &rest[end..];
            }
        }
    }
    out
}

/// GitHub's anchors of a page's headings: lowercase, spaces to dashes,
/// punctuation dropped.
fn headings(page: &str) -> Vec<String> {
    page.lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// The README starts where a newcomer starts: what it is, the two
/// commands and the library within the first screenful, and no longer
/// than a page; the reference lives in docs/.
#[test]
fn the_readme_is_a_start_not_a_reference() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README");
    let lines: Vec<&str> = readme.lines().collect();
    let line_of = |needle: &str| lines.iter().position(|l| l.contains(needle));
    let demo = line_of("./scripts/demo.sh").expect("the demo command");
    let test = line_of("./scripts/test.sh").expect("the test command");
    assert!(
        demo < 25 && test < 25,
        "the two commands come first (lines {demo}, {test})"
    );
    let dep = line_of("etcd-lb = \"").expect("the dependency line");
    assert!(
        dep < 50,
        "the dependency line is on the first screens (line {dep})"
    );
    assert!(
        lines.len() <= 150,
        "the README has {} lines; the reference belongs in docs/",
        lines.len()
    );
    let ci = std::fs::read_to_string(repo_root().join(".ci/run")).expect(".ci/run");
    assert!(
        ci.contains("./scripts/test.sh"),
        ".ci/run runs the README's test command"
    );
}

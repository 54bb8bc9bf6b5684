//! A network partition between one server and its clients while that
//! server still reaches etcd, in network namespaces this test makes itself.
//!
//! Topology (three namespaces joined by three veth pairs, /30 each, in
//! 10.244.7.0/24, which gets a blackhole route in the root namespace first
//! so nothing for it can leave the machine):
//!
//! ```text
//!   e (etcd)  .1 ---- .2  s (partitioned server, advertises .9:3000)
//!   e         .5 ---- .6  c (controller, client, two more servers on c's loopback)
//!   s         .9 ---- .10 c
//! ```
//!
//! Cutting the s–c link leaves s talking to etcd and c talking to etcd, but
//! c cannot reach s: the controller must find s dead and remove it, the
//! client must stop picking it without a failed call; healing brings s back.
//! Nothing here addresses a namespace's IP from the root namespace: every
//! probe of the namespaces runs inside them (`ip netns exec`).

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use etcd_lb_testkit::{bin_path, eventually, Proc};

const SUBNET: &str = "10.244.7.0/24";

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Namespaces, links and the blackhole route; all removed on drop.
struct Net {
    prefix: String,
    blackhole: bool,
}

impl Net {
    fn ns(&self, n: &str) -> String {
        format!("{}{n}", self.prefix)
    }

    fn create() -> Result<Self> {
        let mut net = Self {
            prefix: format!("gp{}", std::process::id() % 100_000),
            blackhole: false,
        };
        ip(&["route", "add", "blackhole", SUBNET])?;
        net.blackhole = true;
        for n in ["e", "s", "c"] {
            ip(&["netns", "add", &net.ns(n)])?;
            ip(&["-n", &net.ns(n), "link", "set", "lo", "up"])?;
        }
        for (a, a_ip, b, b_ip, tag) in [
            ("e", "10.244.7.1/30", "s", "10.244.7.2/30", "es"),
            ("e", "10.244.7.5/30", "c", "10.244.7.6/30", "ec"),
            ("s", "10.244.7.9/30", "c", "10.244.7.10/30", "sc"),
        ] {
            let (ia, ib) = (
                format!("{}{a}{tag}", net.prefix),
                format!("{}{b}{tag}", net.prefix),
            );
            ip(&[
                "link",
                "add",
                &ia,
                "netns",
                &net.ns(a),
                "type",
                "veth",
                "peer",
                "name",
                &ib,
                "netns",
                &net.ns(b),
            ])?;
            ip(&["-n", &net.ns(a), "addr", "add", a_ip, "dev", &ia])?;
            ip(&["-n", &net.ns(b), "addr", "add", b_ip, "dev", &ib])?;
            ip(&["-n", &net.ns(a), "link", "set", &ia, "up"])?;
            ip(&["-n", &net.ns(b), "link", "set", &ib, "up"])?;
        }
        Ok(net)
    }

    /// Takes the s–c link down (or up) from inside s.
    fn link_sc(&self, up: bool) -> Result<()> {
        let dev = format!("{}ssc", self.prefix);
        ip(&[
            "-n",
            &self.ns("s"),
            "link",
            "set",
            &dev,
            if up { "up" } else { "down" },
        ])
    }

    fn spawn(&self, n: &str, name: &str, program: &std::path::Path, args: &[&str]) -> Result<Proc> {
        let mut all: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            self.ns(n),
            program.display().to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        Proc::spawn(name, "ip", &all, &[("RUST_LOG", "info")])
    }

    /// `curl` from inside namespace `n`.
    fn curl(&self, n: &str, url: &str) -> Option<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(n),
                "curl",
                "-sf",
                "--max-time",
                "2",
                url,
            ])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in ["e", "s", "c"] {
            let _ = ip(&["netns", "del", &self.ns(n)]);
        }
        if self.blackhole {
            let _ = ip(&["route", "del", "blackhole", SUBNET]);
        }
    }
}

fn namespaces_allowed() -> bool {
    let probe = format!("gpprobe{}", std::process::id());
    let ok = ip(&["netns", "add", &probe]).is_ok();
    if ok {
        let _ = ip(&["netns", "del", &probe]);
    }
    ok
}

#[tokio::test]
async fn a_partitioned_server_is_removed_and_comes_back_when_healed() -> Result<()> {
    if !namespaces_allowed() {
        eprintln!("SKIPPED: this machine does not allow network namespaces (needs root and CAP_NET_ADMIN)");
        return Ok(());
    }
    let net = Net::create()?;
    let data = tempfile::tempdir()?;

    let _etcd = net.spawn(
        "e",
        "etcd",
        std::path::Path::new("etcd"),
        &[
            "--data-dir",
            &data.path().join("etcd").display().to_string(),
            "--listen-client-urls",
            "http://10.244.7.1:2379,http://10.244.7.5:2379",
            "--advertise-client-urls",
            "http://10.244.7.1:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "default=http://127.0.0.1:2380",
        ],
    )?;
    let server = bin_path("greet-server");
    let etcd_from_c = "10.244.7.5:2379";
    // TTL far longer than the test: only the controller can remove keys.
    let common = ["--ttl", "300s", "--drain", "0s"];
    let partitioned = net.spawn(
        "s",
        "server-s",
        &server,
        &[
            &[
                "--listen",
                "0.0.0.0:3000",
                "--advertise",
                "10.244.7.9:3000",
                "--etcd-endpoints",
                "10.244.7.1:2379",
            ][..],
            &common,
        ]
        .concat(),
    )?;
    let _c1 = net.spawn(
        "c",
        "server-c1",
        &server,
        &[
            &[
                "--listen",
                "127.0.0.1:3001",
                "--etcd-endpoints",
                etcd_from_c,
            ][..],
            &common,
        ]
        .concat(),
    )?;
    let _c2 = net.spawn(
        "c",
        "server-c2",
        &server,
        &[
            &[
                "--listen",
                "127.0.0.1:3002",
                "--etcd-endpoints",
                etcd_from_c,
            ][..],
            &common,
        ]
        .concat(),
    )?;
    let controller = net.spawn(
        "c",
        "controller",
        &bin_path("controller"),
        &[
            "--etcd-endpoints",
            etcd_from_c,
            "--listen",
            "127.0.0.1:8080",
            "--probe-interval",
            "300ms",
            "--probe-timeout",
            "250ms",
            "--dead-after",
            "3s",
            "--election-ttl",
            "5s",
        ],
    )?;
    let client = net.spawn(
        "c",
        "client",
        &bin_path("greet-client"),
        &["--etcd-endpoints", etcd_from_c, "--interval", "50ms"],
    )?;

    let healthy = |addr: &'static str| {
        let net = &net;
        move || {
            let view = net.curl("c", "http://127.0.0.1:8080/services/greet_service");
            async move {
                let v: serde_json::Value = serde_json::from_str(&view?).ok()?;
                v["members"]
                    .as_array()?
                    .iter()
                    .any(|m| m["addr"] == addr && m["healthy"] == true)
                    .then_some(())
            }
        }
    };
    eventually(
        Duration::from_secs(30),
        "all three servers healthy in the view",
        || {
            let net = &net;
            let view = net.curl("c", "http://127.0.0.1:8080/services/greet_service");
            async move {
                let v: serde_json::Value = serde_json::from_str(&view?).ok()?;
                let ok = v["members"]
                    .as_array()?
                    .iter()
                    .filter(|m| m["healthy"] == true)
                    .count();
                (ok == 3).then_some(())
            }
        },
    )
    .await
    .with_context(|| {
        format!(
            "view: {:?}\ncontroller:\n{}\nserver-s:\n{}",
            net.curl("c", "http://127.0.0.1:8080/services"),
            controller.log(),
            partitioned.log()
        )
    })?;
    eventually(
        Duration::from_secs(15),
        "the client reaching the namespaced server",
        || async {
            client
                .log()
                .contains("(from 10.244.7.9:3000)")
                .then_some(())
        },
    )
    .await
    .with_context(|| client.log())?;

    // Cut s off from c; s still talks to etcd.
    net.link_sc(false)?;
    let cut_at = client.log().len();
    eventually(
        Duration::from_secs(20),
        "the controller to remove the partitioned server",
        || async {
            controller
                .log()
                .contains("deleted stale registration")
                .then_some(())
        },
    )
    .await
    .with_context(|| controller.log())?;
    assert!(
        controller.log().contains("10.244.7.9:3000"),
        "the deletion names the partitioned server:\n{}",
        controller.log()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = client.log()[cut_at..].to_owned();
    assert!(
        !during.contains("call failed"),
        "no failed call during the partition:\n{during}"
    );
    let late = &during[during.len() / 2..];
    assert!(
        !late.contains("(from 10.244.7.9:3000)"),
        "the client stopped picking it:\n{late}"
    );
    assert!(late.contains("Good morning"), "and kept calling the others");
    assert!(
        partitioned.log().contains("registering again") || partitioned.log().contains("registered")
    );

    // Heal: it answers probes again and is back in the view and in rotation.
    net.link_sc(true)?;
    let healed_at = client.log().len();
    eventually(
        Duration::from_secs(30),
        "the healed server back and healthy",
        healthy("10.244.7.9:3000"),
    )
    .await
    .with_context(|| controller.log())?;
    eventually(
        Duration::from_secs(20),
        "the client calling it again",
        || async {
            client.log()[healed_at..]
                .contains("(from 10.244.7.9:3000)")
                .then_some(())
        },
    )
    .await
    .with_context(|| client.log())?;
    assert!(!client.log()[healed_at..].contains("call failed"));
    Ok(())
}

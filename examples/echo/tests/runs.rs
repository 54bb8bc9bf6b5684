//! The example runs against a real etcd, as a user would run it.

use std::process::Command;

use etcd_lb_testkit::Etcd;

#[tokio::test(flavor = "multi_thread")]
async fn the_echo_example_registers_balances_streams_and_drains() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let out = tokio::task::spawn_blocking({
        let endpoint = etcd.endpoint();
        move || {
            Command::new(env!("CARGO_BIN_EXE_echo-example"))
                .arg(endpoint)
                .output()
        }
    })
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the example failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim())?;
    let by_server = report["by_server"].as_object().expect("by_server");
    let mut counts: Vec<u64> = by_server.values().filter_map(|v| v.as_u64()).collect();
    counts.sort_unstable();
    // Weights 100, 200, 300 over 600 calls: 100/200/300 on an idle
    // machine. The default (load-aware) picker passes over an endpoint
    // that looks far slower for a moment, so on a loaded one a few calls
    // move (CI saw 98/201/301, then 102/205/293): within 2 % of the calls
    // (12) per server, which equal shares (200 each) are far outside.
    // Weights within 1 % are issue 34's bar over 30,000 calls, held by
    // greet-client's test of that size and the scheduler's unit tests.
    assert_eq!(counts.iter().sum::<u64>(), 600, "{report}");
    for (got, want) in counts.iter().zip([100u64, 200, 300]) {
        assert!(got.abs_diff(want) <= 12, "{report}");
    }
    assert_eq!(report["chat_replies"], 5, "{report}");
    assert_eq!(report["calls_to_drained_after_drain"], 0, "{report}");

    // Deregistered on the way out: nothing left under the prefix.
    let mut client = etcd.client().await?;
    let left = client
        .get(
            "/ns/echo/",
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    assert_eq!(left.count(), 0, "keys left after the example stopped");
    Ok(())
}

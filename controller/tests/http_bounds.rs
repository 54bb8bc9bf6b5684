//! The HTTP view against readers that stop reading (issue 33, point 8), on
//! the real binary: `/services/stream` readers whose sockets take nothing
//! are disconnected after `--http-write-timeout`, freeing their places
//! under `--max-streams`, and while they hang on the controller holds
//! references to one shared render, not a copy each.

mod common;

use std::time::Duration;

use anyhow::{ensure, Result};
use common::{fill, CtlProc};
use etcd_lb_testkit::{eventually, Etcd};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

/// A reader that asks for the stream and never reads, with a receive
/// buffer of 4 KiB, so the controller's writes stall after a few KiB.
async fn stalled_reader(http: &str) -> Result<TcpStream> {
    let addr: std::net::SocketAddr = http.trim_start_matches("http://").parse()?;
    let socket = TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(addr).await?;
    stream
        .write_all(b"GET /services/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await?;
    Ok(stream)
}

async fn stream_status(http: &str) -> Result<u16> {
    let resp = reqwest::Client::new()
        .get(format!("{http}/services/stream"))
        .send()
        .await?;
    Ok(resp.status().as_u16())
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_readers_that_stop_reading_are_cut_and_their_places_freed() -> Result<()> {
    let etcd = Etcd::start().await?;
    fill(&etcd, "big", 1000, 100).await?;
    let ctl = CtlProc::spawn(
        &etcd,
        &["--max-streams", "20", "--http-write-timeout", "6s"],
    )?;
    ctl.wait_ready().await?;
    let before = ctl.rss_mib()?;

    let mut readers = Vec::new();
    for _ in 0..20 {
        readers.push(stalled_reader(&ctl.http).await?);
    }
    // Each change of one weight sends the whole service (1,000 members,
    // some 400 KB) to every reader: the kernel's buffers fill and the
    // controller's writes stall.
    let writer = tokio::spawn({
        let c = etcd.client().await?;
        async move {
            for w in 1..200u32 {
                let addr = "127.0.0.2:20000";
                let v = format!(r#"{{"addr":"{addr}","version":"1.0.0","weight":{w}}}"#);
                if c.kv_client()
                    .put(format!("/ns/big/{addr}"), v, None)
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Every place is taken now.
    eventually(Duration::from_secs(3), "the cap reached", || async {
        stream_status(&ctl.http).await.ok().filter(|s| *s == 503)
    })
    .await?;
    let during = ctl.rss_mib()?;
    // The stalled writes time out; the places come back.
    eventually(
        Duration::from_secs(20),
        "a place freed by the write timeout",
        || async { stream_status(&ctl.http).await.ok().filter(|s| *s == 200) },
    )
    .await?;
    println!("stalled stream readers: RSS {before:.1} -> {during:.1} MiB while 20 hung");
    ensure!(
        during - before < 64.0,
        "RSS grew {before:.1} -> {during:.1} MiB with 20 stalled readers"
    );
    writer.abort();
    drop(readers);
    Ok(())
}

//! The gRPC port against hostile and late peers (issue 33), the real binary
//! on a real etcd:
//! - HPACK bombs (points 1): header blocks that decode to far more than h2
//!   would ever accept leave the server up, answering, and within 64 MiB of
//!   its peak memory before them;
//! - a client that connects after the server stopped accepting (point 6)
//!   is refused or answered at once, never left hanging.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use common::morning;
use etcd_lb_testkit::{eventually, free_port, Etcd, Proc};
use greet_proto::GreetClient;
use nix::sys::signal::Signal;

fn server(etcd: &Etcd, port: u16, extra: &[&str]) -> Result<Proc> {
    common::server(&etcd.endpoint(), port, extra, &[])
}

async fn serving(srv: &Proc, port: u16) -> Result<()> {
    eventually(
        Duration::from_secs(10),
        "the server answers",
        || async move { morning(port).await.ok() },
    )
    .await
    .with_context(|| srv.log())?;
    Ok(())
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(srv: &Proc) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", srv.pid()))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("VmHWM")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

// --- HTTP/2 and HPACK written out by hand, as an attacker would ---

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const MAX_FRAME: usize = 16_384;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix under `mask`.
fn int(mask: u8, n: u32, mut v: usize, out: &mut Vec<u8>) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(mask | v as u8);
        return;
    }
    out.push(mask | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128 + 128) as u8);
        v /= 128;
    }
    out.push(v as u8);
}

/// A literal header with incremental indexing and a new name.
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x40);
    int(0, 7, name.len(), out);
    out.extend_from_slice(name);
    int(0, 7, value.len(), out);
    out.extend_from_slice(value);
}

/// A gRPC request's pseudo-headers and content-type.
fn request_start(authority: &[u8], out: &mut Vec<u8>) {
    out.push(0x83); // :method POST
    out.push(0x86); // :scheme http
    literal(b":path", b"/Greet/Morning", out);
    literal(b":authority", authority, out);
    literal(b"content-type", b"application/grpc", out);
    literal(b"te", b"trailers", out);
}

/// A header block split into HEADERS and CONTINUATION frames.
fn header_frames(stream: u32, end_stream: bool, block: &[u8]) -> Vec<u8> {
    let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME).collect();
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let mut flags = if i == 0 && end_stream { END_STREAM } else { 0 };
        if i == chunks.len() - 1 {
            flags |= END_HEADERS;
        }
        out.extend(frame(kind, flags, stream, chunk));
    }
    out
}

/// Sends `bytes` on a fresh connection after the preface and an empty
/// SETTINGS, then reads whatever comes back until the server closes or 3 s
/// pass. Write errors (the server closed early) are fine.
fn send_raw(port: u16, bytes: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut all = PREFACE.to_vec();
    all.extend(frame(0x4, 0, 0, &[]));
    all.extend_from_slice(bytes);
    let _ = s.write_all(&all);
    let _ = s.shutdown(Shutdown::Write);
    let mut got = Vec::new();
    let mut sink = [0u8; 4096];
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        match s.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&sink[..n]),
        }
    }
    Ok(got)
}

/// The error code of the first GOAWAY among the frames a server sent.
fn goaway(mut bytes: &[u8]) -> Option<u32> {
    while bytes.len() >= 9 {
        let len =
            (usize::from(bytes[0]) << 16) | (usize::from(bytes[1]) << 8) | usize::from(bytes[2]);
        let payload = bytes.get(9..9 + len)?;
        if bytes[3] == 0x7 && len >= 8 {
            return Some(u32::from_be_bytes(payload[4..8].try_into().ok()?));
        }
        bytes = &bytes[9 + len..];
    }
    None
}

/// A block of pseudo-headers, one big entry in the dynamic table, and
/// `refs` one-byte references to it: each decodes to the whole entry.
fn reference_bomb(
    authority: &[u8],
    size_update: Option<usize>,
    entry: usize,
    refs: usize,
) -> Vec<u8> {
    let mut block = Vec::new();
    if let Some(size) = size_update {
        int(0x20, 5, size, &mut block);
    }
    request_start(authority, &mut block);
    literal(b"x-bomb", &vec![b'a'; entry], &mut block);
    // The newest entry is index 62 (the first after the static table).
    block.extend(std::iter::repeat_n(0x80 | 62, refs));
    block
}

/// Fires `bomb` (a list of byte strings, each sent on its own connection)
/// at a fresh server; the server must survive, answer the next call, and
/// its peak memory must grow by less than 64 MiB.
async fn survives(name: &str, bombs: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
    let etcd = Etcd::start().await?;
    let port = free_port();
    let mut srv = server(&etcd, port, &[])?;
    serving(&srv, port).await?;
    let before = peak_rss(&srv)?;
    let mut answers = Vec::new();
    for bomb in bombs {
        let bomb = bomb.clone();
        answers.push(tokio::task::spawn_blocking(move || send_raw(port, &bomb)).await??);
    }
    ensure!(srv.is_running(), "{name}: the server died:\n{}", srv.log());
    morning(port)
        .await
        .with_context(|| format!("{name}: the next call after the bomb\n{}", srv.log()))?;
    let after = peak_rss(&srv)?;
    let grown = after.saturating_sub(before);
    let codes: Vec<Option<u32>> = answers.iter().map(|a| goaway(a)).collect();
    eprintln!("{name}: peak RSS {before} -> {after} bytes; GOAWAY codes {codes:?}");
    ensure!(
        grown < 64 << 20,
        "{name}: peak memory grew by {} MiB ({before} -> {after} bytes)",
        grown >> 20
    );
    srv.signal(Signal::SIGKILL)?;
    Ok(answers)
}

/// The first bomb: 24 KB of one-byte references to a 4 KB entry
/// (about 96 MB decoded), on the connection's first request.
#[tokio::test]
async fn hpack_bomb_of_indexed_references_is_refused() -> Result<()> {
    let block = reference_bomb(b"127.0.0.1:1", None, 4000, 24_000);
    survives("24 KB of references", &[header_frames(1, true, &block)]).await?;
    Ok(())
}

/// The same within one frame (16 KiB, so no size limit on the compressed
/// block catches it), after a first request with an address list as
/// `:authority` (grpcio's `ipv4:a,b,c`), when every block is decoded.
#[tokio::test]
async fn hpack_bomb_after_an_address_list_is_refused() -> Result<()> {
    let mut bytes = Vec::new();
    let mut first = Vec::new();
    request_start(b"127.0.0.1:1,127.0.0.1:2", &mut first);
    bytes.extend(header_frames(1, false, &first));
    bytes.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\0"));
    let block = reference_bomb(b"127.0.0.1:1,127.0.0.1:2", None, 4000, 16_000);
    bytes.extend(header_frames(3, true, &block));
    // Many connections at once would multiply it: ten in a row.
    let answers = survives(
        "16 KB of references after an address list",
        &vec![bytes; 10],
    )
    .await?;
    // The connection is closed with an HTTP/2 error, not left hanging.
    for a in answers {
        ensure!(
            goaway(&a).is_some_and(|code| code != 0),
            "no GOAWAY with an error: {a:?}"
        );
    }
    Ok(())
}

/// The second bomb: a table-size update to 1,000,000 (HTTP/2
/// allows 4096 here), a 100 KB entry, and references to it.
#[tokio::test]
async fn hpack_table_size_update_above_4096_is_refused() -> Result<()> {
    let block = reference_bomb(b"127.0.0.1:1", Some(1_000_000), 100_000, 2_000);
    survives("table size 1,000,000", &[header_frames(1, true, &block)]).await?;
    Ok(())
}

/// The third bomb: about 1 MB of HEADERS + CONTINUATION frames of
/// references (about 4 GB decoded; it aborted the server).
#[tokio::test]
async fn hpack_megabyte_of_continuations_is_refused() -> Result<()> {
    let block = reference_bomb(b"127.0.0.1:1,127.0.0.1:2", None, 4000, 1_000_000);
    survives("1 MB of continuations", &[header_frames(1, true, &block)]).await?;
    Ok(())
}

/// Point 6: once the server has logged that it stops accepting, a client
/// that connects (its view of the registry lags) is refused at once, or
/// answered at once; while a slow call in flight still finishes.
#[tokio::test]
async fn a_late_client_during_drain_is_refused_or_answered_at_once() -> Result<()> {
    let etcd = Etcd::start().await?;
    let port = free_port();
    let mut srv = server(&etcd, port, &["--latency", "3s", "--drain", "300ms"])?;
    eventually(
        Duration::from_secs(10),
        "the server listens",
        || async move {
            GreetClient::connect(format!("http://127.0.0.1:{port}"))
                .await
                .ok()
        },
    )
    .await
    .with_context(|| srv.log())?;
    let slow = tokio::spawn(morning(port));
    tokio::time::sleep(Duration::from_millis(300)).await;
    srv.signal(Signal::SIGTERM)?;
    eventually(Duration::from_secs(5), "the stop line", || {
        let log = srv.log();
        async move { log.contains("stopping: no new connections").then_some(()) }
    })
    .await?;

    // For a second after the stop line, every connection attempt is
    // refused, or gets an answer (SETTINGS, a reset, a close) within
    // 500 ms; by the end of it connections are refused.
    let outcomes = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
        let mut outcomes = Vec::new();
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            let outcome = match TcpStream::connect(("127.0.0.1", port)) {
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => "refused".to_owned(),
                Err(e) => format!("connect error {e}"),
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_millis(500)))?;
                    let mut hello = PREFACE.to_vec();
                    hello.extend(frame(0x4, 0, 0, &[]));
                    let _ = s.write_all(&hello);
                    let mut buf = [0u8; 64];
                    match s.read(&mut buf) {
                        Ok(0) => "closed".to_owned(),
                        Ok(_) => "answered".to_owned(),
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            "hung for 500 ms".to_owned()
                        }
                        Err(e) => format!("reset ({e})"),
                    }
                }
            };
            outcomes.push(outcome);
            if Instant::now() > until {
                return Ok(outcomes);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await??;
    ensure!(
        !outcomes.iter().any(|o| o.starts_with("hung")),
        "a late client was left hanging: {outcomes:?}\n{}",
        srv.log()
    );
    ensure!(
        outcomes.last().is_some_and(|o| o == "refused"),
        "the listener is still open after the stop line: {outcomes:?}"
    );
    let from = slow.await?.context("the in-flight call")?;
    ensure!(from == format!("127.0.0.1:{port}"), "answered by {from}");
    let code = srv.wait_exit(Duration::from_secs(10)).await?;
    ensure!(code == Some(0), "exit {code:?}\n{}", srv.log());
    Ok(())
}

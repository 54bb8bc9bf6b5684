//! A fixed number of calls through one client variant, for counting the
//! client's instructions per call (`bench/instructions.sh` runs this under
//! callgrind twice, at two call counts, and divides the difference). Wall
//! time on a shared 2-core machine moves by 10-30 % between runs;
//! instruction counts repeat to a fraction of a percent, so they compare
//! two builds, or two variants, honestly (issue 14).

use std::time::Duration;

use clap::ValueEnum;
use etcd_lb_registry::schema::Addr;
use greet_proto::{GreetClient, GreetRequest};

/// Which client makes the calls (the variants of scenario 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Variant {
    /// (a) a plain tonic `Channel`.
    Plain,
    /// (b) the balancer over the one server (retryable calls, per-try
    /// timeout, as greet-client runs it).
    Balancer,
    /// (d) hyper's HTTP/2 sender on one connection.
    H2,
}

/// Serves Greet in-process until killed, printing the address first.
pub async fn serve() -> anyhow::Result<()> {
    let addr = crate::overhead::start_server().await?;
    println!("{addr}");
    std::future::pending::<()>().await;
    Ok(())
}

/// Makes `calls` Morning calls to `target` through `variant`, `concurrency`
/// at a time, after 200 warm-up calls, each with `timeout` as its
/// `grpc-timeout` if given (greet-client sets one on every call); prints
/// how many failed.
pub async fn run(
    target: &Addr,
    variant: Variant,
    calls: u64,
    concurrency: usize,
    timeout: Option<Duration>,
) -> anyhow::Result<()> {
    match variant {
        Variant::Plain => {
            let ch = crate::overhead::plain_channel(target).await?;
            drive(GreetClient::new(ch), calls, concurrency, timeout).await
        }
        Variant::Balancer => {
            // Connecting happens in the warm-up, which both call counts
            // share, so it drops out of the difference.
            let b = crate::overhead::balancer(std::slice::from_ref(target));
            drive(GreetClient::new(b), calls, concurrency, timeout).await
        }
        Variant::H2 => {
            let s = crate::h2sender::H2Sender::connect(target).await?;
            drive(GreetClient::new(s), calls, concurrency, timeout).await
        }
    }
}

async fn drive<T>(
    client: GreetClient<T>,
    calls: u64,
    concurrency: usize,
    timeout: Option<Duration>,
) -> anyhow::Result<()>
where
    T: crate::timed::Transport,
{
    let one = |mut c: GreetClient<T>, n: u64| async move {
        let mut failed = 0u64;
        for _ in 0..n {
            let mut req = tonic::Request::new(GreetRequest {
                name: "bench".into(),
            });
            if let Some(t) = timeout {
                req.set_timeout(t);
            }
            if c.morning(req).await.is_err() {
                failed += 1;
            }
        }
        failed
    };
    let warm = one(client.clone(), 200).await;
    let concurrency = concurrency.max(1) as u64;
    let tasks: Vec<_> = (0..concurrency)
        .map(|i| {
            // Spread the remainder so exactly `calls` are made.
            let n = calls / concurrency + u64::from(i < calls % concurrency);
            tokio::spawn(one(client.clone(), n))
        })
        .collect();
    let mut failed = warm;
    for t in tasks {
        failed += t.await?;
    }
    println!("failed {failed}");
    Ok(())
}

//! greet-server binary: flags, logs, signals; the rest is [`greet_server::run`].

use anyhow::Context;
use clap::Parser;
use greet_server::Args;

/// mimalloc instead of glibc malloc: a call allocates and frees a few dozen
/// small blocks across h2, hyper and tonic, and the allocator was about 14 %
/// of the server's instructions per call (`git show bfe6b6d:docs/benchmarks-earlier.md`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    etcd_lb_registry::logging::init(args.log_format);
    // Only with the `failpoints` feature (the harness); ignored otherwise.
    etcd_lb_registry::failpoints::setup_from_env().context("FAILPOINTS")?;
    let cfg = match args.config() {
        Ok(cfg) => cfg,
        Err(msg) => {
            eprintln!("error: {msg}");
            std::process::exit(2);
        }
    };
    let etcd = args.etcd.resolve().context("etcd settings")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;

    let shutdown =
        etcd_lb_registry::shutdown::on_signals().context("installing signal handlers")?;

    greet_server::run(cfg, etcd, listener, shutdown).await?;
    Ok(())
}

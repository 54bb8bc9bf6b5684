//! greet-server binary: flags, logs, signals; the rest is [`greet_server::run`].

use anyhow::Context;
use clap::Parser;
use greet_server::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    registry::logging::init(args.log_format);
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

    let shutdown = registry::shutdown::on_signals().context("installing signal handlers")?;

    greet_server::run(cfg, etcd, listener, shutdown).await?;
    Ok(())
}

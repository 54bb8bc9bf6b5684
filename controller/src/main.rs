//! controller binary: flags, logs, signals; the rest is [`controller::run`].

use anyhow::Context;
use clap::Parser;
use controller::config::Command;
use controller::Args;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Command::XdsBootstrap {
        server,
        node_id,
        node_cluster,
    }) = &args.command
    {
        let node_id = node_id.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME")
                .ok()
                .filter(|h| !h.is_empty())
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_owned())
                .unwrap_or_default();
            format!("greet-etcd-client-{host}")
        });
        let doc = controller::xds::bootstrap::Bootstrap {
            server: server.clone(),
            node_id,
            node_cluster: node_cluster.clone(),
        }
        .to_json();
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    etcd_lb_registry::logging::init(args.log_format);
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

    controller::run(cfg, etcd, listener, shutdown).await?;
    Ok(())
}

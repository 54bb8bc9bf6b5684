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
    if let Some(cmd) = &args.command {
        return operate(&args, cmd).await;
    }
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

    controller::run(cfg, etcd, listener, shutdown).await?;
    Ok(())
}

/// The operator's subcommands (drain, undrain, weight, split, unsplit,
/// overrides); errors
/// exit 1 with the reason, bad arguments 2.
async fn operate(args: &Args, cmd: &Command) -> anyhow::Result<()> {
    use controller::operator::{self, Change, OperatorError, SplitChange};
    let (root, overrides_root) = match args.roots() {
        Ok(roots) => roots,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let etcd = args.etcd.resolve().context("etcd settings")?;
    let change = |weight, how: &controller::config::OverrideArgs| Change {
        weight,
        reason: how.reason.clone(),
        by: how.by.clone(),
        for_: how.for_,
        sticky: how.sticky,
        force: how.force,
    };
    let result = match cmd {
        Command::Drain { service, addr, how } => {
            operator::set(
                &etcd,
                &root,
                &overrides_root,
                service,
                addr,
                change(None, how),
            )
            .await
        }
        Command::Weight {
            service,
            addr,
            weight,
            how,
        } => {
            operator::set(
                &etcd,
                &root,
                &overrides_root,
                service,
                addr,
                change(Some(*weight), how),
            )
            .await
        }
        Command::Undrain { service, addr } => {
            operator::clear(&etcd, &overrides_root, service, addr).await
        }
        Command::Split {
            service,
            clear: true,
            ..
        }
        | Command::Unsplit { service } => operator::unsplit(&etcd, &overrides_root, service).await,
        Command::Split {
            service,
            lanes,
            how,
            ..
        } => {
            operator::split(
                &etcd,
                &root,
                &overrides_root,
                service,
                SplitChange {
                    lanes: lanes.clone(),
                    reason: how.reason.clone(),
                    by: how.by.clone(),
                    for_: how.for_,
                    force: how.force,
                },
            )
            .await
        }
        Command::Overrides { service, json } => {
            operator::list(&etcd, &root, &overrides_root, service.as_deref())
                .await
                .map(|listing| {
                    if *json {
                        listing.to_json()
                    } else {
                        operator::table(&listing)
                    }
                })
        }
        // Answered before anything else in main.
        Command::XdsBootstrap { .. } => Ok(String::new()),
    };
    match result {
        Ok(out) => {
            println!("{}", out.trim_end());
            Ok(())
        }
        Err(e @ OperatorError::Usage(_)) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

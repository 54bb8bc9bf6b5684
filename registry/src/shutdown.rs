//! Signals to a shutdown token, the same way in every binary.
//!
//! The first SIGTERM or SIGINT cancels the token, so the process leaves in
//! order (drain, stop, deregister); a second one exits at once with code
//! 130, for an operator who does not want to wait.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// Installs the handlers and returns the token the first signal cancels.
///
/// # Errors
/// The handlers cannot be installed (no Tokio runtime with signal support).
pub fn on_signals() -> std::io::Result<CancellationToken> {
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let token = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::info!("signal received; shutting down (a second signal exits at once)");
        token.cancel();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    Ok(shutdown)
}

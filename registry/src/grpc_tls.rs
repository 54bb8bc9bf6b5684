//! TLS for the gRPC traffic between clients (and the controller's probes)
//! and servers: flags shared by every binary, and the one place that turns
//! an address into a dialable endpoint, `http://` or `https://`.
//!
//! Off unless configured: servers take `--tls-cert`/`--tls-key`, dialers
//! take `--tls-ca` (the CA that signed the servers' certificates, whose
//! names must cover the registered addresses, IP SANs included).

use std::path::PathBuf;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::schema::Addr;

/// Server side: the certificate and key a server presents.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ServerTlsArgs {
    /// Serve gRPC over TLS with this certificate (PEM); needs --tls-key.
    #[cfg_attr(
        feature = "cli",
        arg(long = "tls-cert", env = "GREET_TLS_CERT", requires = "tls_key")
    )]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[cfg_attr(
        feature = "cli",
        arg(long = "tls-key", env = "GREET_TLS_KEY", requires = "tls_cert")
    )]
    pub tls_key: Option<PathBuf>,
}

/// Client side: the CA to verify servers with.
#[derive(Debug, Clone, Default)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ClientTlsArgs {
    /// Dial servers over TLS, verifying them with this CA (PEM).
    #[cfg_attr(
        feature = "cli",
        arg(long = "tls-ca", env = "GREET_TLS_CA", global = true)
    )]
    pub tls_ca: Option<PathBuf>,
}

fn read(path: &PathBuf, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

impl ServerTlsArgs {
    /// The server TLS settings, read now so a bad path fails at start-up.
    ///
    /// # Errors
    /// Unreadable files.
    pub fn resolve(&self) -> Result<Option<ServerTlsConfig>, String> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(ServerTlsConfig::new().identity(
                Identity::from_pem(read(cert, "TLS certificate")?, read(key, "TLS key")?),
            ))),
            _ => Ok(None),
        }
    }
}

impl ClientTlsArgs {
    /// The client TLS settings, read now so a bad path fails at start-up.
    ///
    /// # Errors
    /// An unreadable CA file.
    pub fn resolve(&self) -> Result<Option<ClientTlsConfig>, String> {
        self.tls_ca
            .as_ref()
            .map(|ca| {
                Ok(ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read(ca, "TLS CA")?)))
            })
            .transpose()
    }
}

/// The endpoint to dial `addr` at: plain HTTP/2, or TLS verified against
/// the configured CA (server name: the address's host).
///
/// # Errors
/// An address that does not form a URI, or TLS settings tonic rejects.
pub fn endpoint(
    addr: &Addr,
    tls: Option<&ClientTlsConfig>,
) -> Result<Endpoint, tonic::transport::Error> {
    match tls {
        None => Endpoint::from_shared(addr.uri()),
        Some(tls) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(tls.clone()),
    }
}

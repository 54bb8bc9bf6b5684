//! How every binary reaches etcd: endpoints, TLS and auth, from flags or env.
//!
//! Secrets never come from a plain command-line flag (it would show in `ps`):
//! the password is read from `ETCD_PASSWORD` or from `--etcd-password-file`.
//! Connecting does not prove etcd is up (etcd-client connects lazily), so
//! [`EtcdConfig::connect`] checks with a real request.

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

/// Errors reaching etcd or reading its credentials: the one error type of
/// etcd operations ([`crate::session::Session`] returns it; module errors
/// wrap it).
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// The flags or files describing the connection are unusable.
    #[error("etcd configuration: {0}")]
    Config(String),
    /// etcd did not answer or refused.
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    /// etcd did not answer in time.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// A stream (watch, keep-alive) ended without an error.
    #[error("the etcd {0} stream ended")]
    StreamEnded(&'static str),
}

/// The etcd connection flags shared by every binary (`#[command(flatten)]`).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated (`host:port` or URLs).
    #[cfg_attr(
        feature = "cli",
        arg(
            long = "etcd-endpoints",
            global = true,
            env = "ETCD_ENDPOINTS",
            value_delimiter = ',',
            default_value = "127.0.0.1:2379"
        )
    )]
    pub endpoints: Vec<String>,
    /// CA certificate (PEM) to verify etcd's server certificate; enables TLS.
    #[cfg_attr(feature = "cli", arg(long = "etcd-ca", global = true, env = "ETCD_CA"))]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-cert auth; needs --etcd-key.
    #[cfg_attr(
        feature = "cli",
        arg(long = "etcd-cert", global = true, env = "ETCD_CERT", requires = "key")
    )]
    pub cert: Option<PathBuf>,
    /// Client private key (PEM); needs --etcd-cert.
    #[cfg_attr(
        feature = "cli",
        arg(long = "etcd-key", global = true, env = "ETCD_KEY", requires = "cert")
    )]
    pub key: Option<PathBuf>,
    /// etcd user; the password comes from ETCD_PASSWORD or --etcd-password-file.
    #[cfg_attr(
        feature = "cli",
        arg(long = "etcd-user", global = true, env = "ETCD_USER")
    )]
    pub user: Option<String>,
    /// File holding the etcd password (its first line).
    #[cfg_attr(
        feature = "cli",
        arg(long = "etcd-password-file", global = true, env = "ETCD_PASSWORD_FILE")
    )]
    pub password_file: Option<PathBuf>,
}

impl Default for EtcdArgs {
    fn default() -> Self {
        Self {
            endpoints: vec!["127.0.0.1:2379".to_owned()],
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
        }
    }
}

impl EtcdArgs {
    /// Args for plain endpoints, as tests and tools use.
    pub fn plain(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Reads certificates and secrets now, so a bad path fails at start-up
    /// with a clear message rather than on the first reconnect.
    ///
    /// # Errors
    /// Unreadable files, a user without password, no endpoints.
    pub fn resolve(&self) -> Result<EtcdConfig, EtcdError> {
        let endpoints: Vec<String> = self
            .endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(EtcdError::Config("no etcd endpoints given".into()));
        }
        let read = |p: &PathBuf, what: &str| {
            std::fs::read(p)
                .map_err(|e| EtcdError::Config(format!("cannot read {what} {}: {e}", p.display())))
        };
        let tls = if self.ca.is_some() || self.cert.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca, "CA certificate")?));
            }
            if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
                tls = tls.identity(Identity::from_pem(
                    read(cert, "client certificate")?,
                    read(key, "client key")?,
                ));
            }
            Some(tls)
        } else {
            None
        };
        let auth = match &self.user {
            None => None,
            Some(user) => {
                let password = match (&self.password_file, std::env::var("ETCD_PASSWORD")) {
                    (Some(file), _) => {
                        let raw = read(file, "password file")?;
                        String::from_utf8_lossy(&raw)
                            .lines()
                            .next()
                            .unwrap_or_default()
                            .to_owned()
                    }
                    (None, Ok(pw)) => pw,
                    (None, Err(_)) => {
                        return Err(EtcdError::Config(format!(
                            "--etcd-user {user} needs a password: set ETCD_PASSWORD or --etcd-password-file"
                        )))
                    }
                };
                Some((user.clone(), password))
            }
        };
        Ok(EtcdConfig {
            endpoints,
            tls,
            auth,
            require_leader: false,
        })
    }
}

/// A resolved, ready-to-dial etcd configuration (cheap to clone).
#[derive(Clone)]
pub struct EtcdConfig {
    /// Endpoints as given.
    pub endpoints: Vec<String>,
    tls: Option<TlsOptions>,
    auth: Option<(String, String)>,
    require_leader: bool,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls.is_some())
            .field("user", &self.auth.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// How long one connection attempt, and the request that proves it, may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl EtcdConfig {
    /// Plain endpoints, no TLS, no auth.
    pub fn plain(endpoints: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            auth: None,
            require_leader: false,
        }
    }

    /// The etcd user these settings log in as, if any.
    pub fn user(&self) -> Option<&str> {
        self.auth.as_ref().map(|(u, _)| u.as_str())
    }

    /// The same settings with etcd's require-leader option: requests (and
    /// watches) fail on a member cut off from the leader instead of serving
    /// stale data, so the caller can fail over to another member.
    pub fn require_leader(mut self) -> Self {
        self.require_leader = true;
        self
    }

    fn options(&self) -> ConnectOptions {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            // HTTP/2 pings find a dead etcd member in seconds rather than
            // waiting for TCP to give up. Not more often than every 5 s:
            // etcd's --grpc-keepalive-min-time (default 5 s) answers faster
            // pings with GOAWAY "too_many_pings" and drops the connection.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(self.require_leader);
        if let Some(tls) = &self.tls {
            opts = opts.with_tls(tls.clone());
        }
        if let Some((user, password)) = &self.auth {
            opts = opts.with_user(user.clone(), password.clone());
        }
        opts
    }

    /// Dials etcd and proves it answers (a `status` call: `connect` alone
    /// succeeds even where nothing listens).
    ///
    /// # Errors
    /// etcd unreachable, TLS or auth refused, or no answer within
    /// [`CONNECT_TIMEOUT`].
    pub async fn connect(&self) -> Result<Client, EtcdError> {
        let attempt = async {
            let mut client = Client::connect(&self.endpoints, Some(self.options())).await?;
            client.status().await?;
            Ok::<_, EtcdError>(client)
        };
        // Twice the connect timeout: TCP connect plus one request.
        tokio::time::timeout(CONNECT_TIMEOUT * 2, attempt)
            .await
            .map_err(|_| EtcdError::Timeout(CONNECT_TIMEOUT * 2))?
    }
}

/// Whether etcd refused a request's auth token (expired, or issued before
/// etcd restarted: simple tokens live in etcd's memory).
///
/// etcd-client logs in again by itself only when a unary call is refused;
/// a refused stream (watch, keep-alive) is opened fine and fails on its
/// first message, so callers must then reconnect, which logs in afresh.
pub fn is_auth_token_error(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unauthenticated
                || status.message().contains("invalid auth token")
        }
        etcd_client::Error::LeaseKeepAliveError(msg) | etcd_client::Error::WatchError(msg) => {
            msg.contains("invalid auth token")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_without_password_is_a_clear_error() {
        let args = EtcdArgs {
            user: Some("svc".into()),
            password_file: Some("/nonexistent/pw".into()),
            ..EtcdArgs::default()
        };
        let err = args.resolve().unwrap_err().to_string();
        assert!(err.contains("password file"), "{err}");
    }

    #[test]
    fn refused_tokens_are_recognised() {
        let refused = etcd_client::Error::GRpcStatus(tonic::Status::unauthenticated(
            "etcdserver: invalid auth token",
        ));
        assert!(is_auth_token_error(&refused));
        let unknown = etcd_client::Error::GRpcStatus(tonic::Status::unknown(
            "etcdserver: invalid auth token",
        ));
        assert!(is_auth_token_error(&unknown));
        let denied = etcd_client::Error::GRpcStatus(tonic::Status::permission_denied(
            "etcdserver: permission denied",
        ));
        assert!(!is_auth_token_error(&denied));
    }

    #[test]
    fn empty_endpoints_are_rejected() {
        let args = EtcdArgs::plain([" ", ""]);
        assert!(args.resolve().is_err());
        let ok = EtcdArgs::plain(["127.0.0.1:2379", " 127.0.0.1:2380 "])
            .resolve()
            .unwrap();
        assert_eq!(ok.endpoints, ["127.0.0.1:2379", "127.0.0.1:2380"]);
    }
}

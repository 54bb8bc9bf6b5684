//! Test certificates made at test time, and an etcd that demands them.
//!
//! [`Pki`] is a throw-away certificate authority in a temp dir (made with
//! the `openssl` command-line tool, so no extra crate is built): P-256 keys
//! in PKCS#8, v3 certificates with the extensions rustls and Go insist on
//! (SANs for 127.0.0.1 and localhost, EKU server+client auth). Nothing is
//! ever committed. [`SecureEtcd`] is a single etcd member serving clients
//! over TLS with client-certificate auth (`--client-cert-auth`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::{etcd_command, free_port};

/// A certificate and its private key, PEM files.
#[derive(Debug, Clone)]
pub struct CertPair {
    /// The certificate.
    pub cert: PathBuf,
    /// The PKCS#8 private key.
    pub key: PathBuf,
}

/// A throw-away CA in a temp dir.
pub struct Pki {
    dir: tempfile::TempDir,
    /// The CA certificate (PEM).
    pub ca: PathBuf,
    ca_key: PathBuf,
    config: PathBuf,
}

const CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
";

const LEAF_EXT: &str = "\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
";

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (is the openssl CLI installed?)")?;
    ensure!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Pki {
    /// Makes a new CA named `name`.
    pub fn new(name: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("testkit-pki").tempdir()?;
        let config = dir.path().join("openssl.cnf");
        std::fs::write(&config, CONFIG)?;
        std::fs::write(dir.path().join("leaf.ext"), LEAF_EXT)?;
        let p = dir.path();
        genkey(p, "ca.key")?;
        openssl(
            p,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                "ca.key",
                "-sha256",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-config",
                "openssl.cnf",
                "-extensions",
                "v3_ca",
                "-out",
                "ca.crt",
            ],
        )?;
        Ok(Self {
            ca: p.join("ca.crt"),
            ca_key: p.join("ca.key"),
            config,
            dir,
        })
    }

    /// A certificate for `cn` (also valid for 127.0.0.1 and localhost), for
    /// either side of a TLS connection. etcd takes a client certificate's
    /// CN as the user name when auth is on.
    pub fn issue(&self, cn: &str) -> Result<CertPair> {
        let p = self.dir.path();
        let stem: String = cn
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let key = format!("{stem}.key");
        let csr = format!("{stem}.csr");
        let crt = format!("{stem}.crt");
        genkey(p, &key)?;
        openssl(
            p,
            &[
                "req",
                "-new",
                "-key",
                &key,
                "-subj",
                &format!("/CN={cn}"),
                "-config",
                &self.config.to_string_lossy(),
                "-out",
                &csr,
            ],
        )?;
        let serial = format!("0x{:016x}", rand_serial());
        openssl(
            p,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &self.ca.to_string_lossy(),
                "-CAkey",
                &self.ca_key.to_string_lossy(),
                "-set_serial",
                &serial,
                "-days",
                "2",
                "-sha256",
                "-extfile",
                "leaf.ext",
                "-out",
                &crt,
            ],
        )?;
        Ok(CertPair {
            cert: p.join(crt),
            key: p.join(key),
        })
    }

    /// etcd-client TLS options trusting this CA, presenting `identity`.
    pub fn tls_options(&self, identity: Option<&CertPair>) -> Result<TlsOptions> {
        let mut tls =
            TlsOptions::new().ca_certificate(Certificate::from_pem(std::fs::read(&self.ca)?));
        if let Some(id) = identity {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(&id.cert)?,
                std::fs::read(&id.key)?,
            ));
        }
        Ok(tls)
    }
}

fn genkey(dir: &Path, out: &str) -> Result<()> {
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            out,
        ],
    )
}

/// A positive 63-bit serial, unique enough for a test CA.
fn rand_serial() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    (h.finish() >> 1).max(1)
}

/// One etcd member serving clients over TLS and requiring a client
/// certificate signed by the test CA. Killed on drop.
pub struct SecureEtcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `127.0.0.1:<port>` for clients (TLS).
    pub client_port: u16,
    /// A client identity etcd accepts (CN `root`, so it acts as root once
    /// auth is on).
    pub root_identity: CertPair,
}

impl SecureEtcd {
    /// Starts etcd with a server certificate from `pki` and waits until it
    /// answers a client presenting a certificate from the same CA.
    pub async fn start(pki: &Pki) -> Result<Self> {
        let server = pki.issue("etcd-server")?;
        let root_identity = pki.issue("root")?;
        let dir = tempfile::Builder::new()
            .prefix("testkit-etcd-tls")
            .tempdir()?;
        let client_port = free_port();
        let peer_port = free_port();
        let client = format!("https://127.0.0.1:{client_port}");
        let peer = format!("http://127.0.0.1:{peer_port}");
        let log_path = dir.path().join("etcd.log");
        let log = std::fs::File::create(&log_path)?;
        let child = etcd_command(
            "secure",
            &dir.path().join("data"),
            &client,
            &peer,
            &format!("secure={peer}"),
            &log,
        )?
        .arg("--cert-file")
        .arg(&server.cert)
        .arg("--key-file")
        .arg(&server.key)
        .arg("--trusted-ca-file")
        .arg(&pki.ca)
        .arg("--client-cert-auth")
        .spawn()
        .context("starting etcd")?;
        let mut etcd = Self {
            child: Some(child),
            dir,
            client_port,
            root_identity,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = etcd
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("etcd exited with {status}; log: {}", etcd.log());
            }
            let attempt = async {
                let mut c = etcd.client(pki).await.ok()?;
                c.status().await.ok()
            };
            if tokio::time::timeout(Duration::from_secs(3), attempt)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                return Ok(etcd);
            }
            if Instant::now() > deadline {
                bail!("TLS etcd not ready within 20 s; log: {}", etcd.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The client endpoint as a URL, `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.client_port)
    }

    /// The client endpoint, `127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// etcd's own log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// A client with the root identity.
    pub async fn client(&self, pki: &Pki) -> Result<Client> {
        let opts = ConnectOptions::new().with_tls(pki.tls_options(Some(&self.root_identity))?);
        Ok(Client::connect([self.url()], Some(opts)).await?)
    }
}

impl Drop for SecureEtcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

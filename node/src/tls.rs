//! TLS material: the server certificate and key, from PEM files (`--tls-cert`, `--tls-key`) or
//! self-signed with rcgen and kept in the data dir, its SHA-256 fingerprint, renewal of the
//! self-signed certificate before it expires and reload of the files on SIGHUP, both without a
//! restart. Owns the current certificate; rustls asks for it on every handshake.
//!
//! The self-signed certificate is ECDSA P-256 and valid for 13 days, because browsers accept a
//! certificate by hash (WebTransport `serverCertificateHashes`) only if it is ECDSA and valid for
//! at most 14 days.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};

/// ALPN for the J-IM binary protocol inside TLS.
pub const ALPN_KEFU_TCP: &[u8] = b"kefu-tcp/1";

/// Validity of a self-signed certificate.
pub const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(13 * 24 * 3600);
/// A self-signed certificate is replaced when less than this is left.
pub const RENEW_BEFORE: Duration = Duration::from_secs(3 * 24 * 3600);

enum Source {
    SelfSigned { dir: PathBuf, validity: Duration },
    Files { cert: PathBuf, key: PathBuf },
}

struct Current {
    key: Arc<CertifiedKey>,
    fingerprint: String,
    expires: Option<SystemTime>,
}

/// The server's certificate, swappable at run time.
pub struct CertStore {
    source: Source,
    current: RwLock<Current>,
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertStore").field("fingerprint", &self.fingerprint()).finish()
    }
}

impl CertStore {
    /// Loads the configured PEM files, or the self-signed certificate in `data_dir/tls` (making
    /// one if there is none or it is due for renewal).
    pub fn load(data_dir: &Path, cert: Option<&Path>, key: Option<&Path>) -> anyhow::Result<Arc<CertStore>> {
        let source = match (cert, key) {
            (Some(cert), Some(key)) => Source::Files { cert: cert.to_path_buf(), key: key.to_path_buf() },
            (None, None) => Source::SelfSigned { dir: data_dir.join("tls"), validity: SELF_SIGNED_VALIDITY },
            _ => bail!("--tls-cert and --tls-key go together"),
        };
        Self::with_source(source)
    }

    fn with_source(source: Source) -> anyhow::Result<Arc<CertStore>> {
        let current = read(&source, SystemTime::now())?;
        Ok(Arc::new(CertStore { source, current: RwLock::new(current) }))
    }

    /// SHA-256 of the certificate's DER, as colon-separated upper-case hex.
    pub fn fingerprint(&self) -> String {
        self.current.read().unwrap_or_else(|e| e.into_inner()).fingerprint.clone()
    }

    /// When the self-signed certificate expires (`None` for configured files).
    pub fn expires(&self) -> Option<SystemTime> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).expires
    }

    /// Re-reads the files, or renews the self-signed certificate if it is due at `now`. New
    /// handshakes use the result; open connections keep theirs. Returns whether it changed.
    pub fn reload(&self, now: SystemTime) -> anyhow::Result<bool> {
        let next = read(&self.source, now)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        let changed = next.fingerprint != current.fingerprint;
        *current = next;
        Ok(changed)
    }

    /// A rustls server config that takes its certificate from this store.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap_or_else(|_| unreachable!("ring supports the default protocol versions"))
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// A TLS 1.3-only rustls config (QUIC) that takes its certificate from this store.
    pub fn server_config_tls13(self: &Arc<Self>, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap_or_else(|_| unreachable!("ring supports TLS 1.3"))
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(self) as Arc<dyn ResolvesServerCert>);
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    /// Keeps the self-signed certificate fresh: checks every `every` until `shutdown`.
    pub async fn renew_loop(self: Arc<Self>, every: Duration, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if matches!(self.source, Source::SelfSigned { .. }) {
                match self.reload(SystemTime::now()) {
                    Ok(true) => tracing::info!(fingerprint = %self.fingerprint(), "renewed the self-signed certificate"),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "renewing the self-signed certificate failed"),
                }
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()).key))
    }
}

fn read(source: &Source, now: SystemTime) -> anyhow::Result<Current> {
    match source {
        Source::Files { cert, key } => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .with_context(|| format!("reading {}", cert.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("parsing {}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
            build(certs, key, None)
        }
        Source::SelfSigned { dir, validity } => self_signed(dir, *validity, now),
    }
}

fn build(certs: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>, expires: Option<SystemTime>) -> anyhow::Result<Current> {
    let first = certs.first().context("no certificate in the file")?;
    let fingerprint = hex_colons(&Sha256::digest(first.as_ref()));
    let signing = rustls::crypto::ring::sign::any_supported_type(&key).context("unsupported private key")?;
    Ok(Current { key: Arc::new(CertifiedKey::new(certs, signing)), fingerprint, expires })
}

/// The self-signed pair in `dir`, made anew when missing or when less than RENEW_BEFORE is left.
fn self_signed(dir: &Path, validity: Duration, now: SystemTime) -> anyhow::Result<Current> {
    let (cert_path, key_path, expiry_path) = (dir.join("self-signed.pem"), dir.join("self-signed.key"), dir.join("self-signed.expires"));
    let expires =
        std::fs::read_to_string(&expiry_path).ok().and_then(|s| s.trim().parse::<u64>().ok()).map(|s| UNIX_EPOCH + Duration::from_secs(s));
    let renew_before = RENEW_BEFORE.min(validity / 2);
    if let Some(expires) = expires.filter(|e| *e > now + renew_before) {
        if let (Ok(cert), Ok(key)) = (CertificateDer::from_pem_file(&cert_path), PrivateKeyDer::from_pem_file(&key_path)) {
            return build(vec![cert], key, Some(expires));
        }
    }
    std::fs::create_dir_all(dir)?;
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()])?;
    let start = time::OffsetDateTime::from(now) - time::Duration::minutes(5);
    params.not_before = start;
    params.not_after = start + time::Duration::try_from(validity)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "kefu self-signed");
    let cert = params.self_signed(&key_pair)?;
    std::fs::write(&cert_path, cert.pem())?;
    write_private(&key_path, key_pair.serialize_pem().as_bytes())?;
    let expires = now - Duration::from_secs(300) + validity;
    std::fs::write(&expiry_path, expires.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs().to_string())?;
    let key = PrivateKeyDer::from_pem_slice(key_pair.serialize_pem().as_bytes()).context("re-reading the new key")?;
    build(vec![cert.der().clone()], key, Some(expires))
}

/// Writes a secret file: created with mode 0600 (never readable by others, not even for a moment),
/// fsynced, and its directory fsynced, so that it survives a crash as written. Replaces the file.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_beside(path);
    write_new_private(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// Like [`write_private`], but never replaces an existing file (another process may be making
/// the same one): returns false when `path` already existed.
pub fn create_private(path: &Path, bytes: &[u8]) -> std::io::Result<bool> {
    let tmp = temp_beside(path);
    write_new_private(&tmp, bytes)?;
    // A hard link fails when the target exists, so the file appears whole or not at all.
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => sync_dir(path).map(|()| true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

fn temp_beside(path: &Path) -> std::path::PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{}.tmp", std::process::id(), rand::random::<u32>()))
}

fn write_new_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn sync_dir(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn hex_colons(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_kept_then_renewed_before_expiry() {
        let dir = std::env::temp_dir().join(format!("kefu-tls-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = CertStore::with_source(Source::SelfSigned { dir: dir.clone(), validity: SELF_SIGNED_VALIDITY }).unwrap();
        let first = store.fingerprint();
        assert_eq!(first.len(), 32 * 3 - 1);
        let expires = store.expires().unwrap();
        let left = expires.duration_since(SystemTime::now()).unwrap();
        assert!(left <= Duration::from_secs(14 * 24 * 3600), "browsers refuse hashes of longer-lived certificates");
        // A restart keeps the same certificate.
        let again = CertStore::with_source(Source::SelfSigned { dir: dir.clone(), validity: SELF_SIGNED_VALIDITY }).unwrap();
        assert_eq!(again.fingerprint(), first);
        // Nothing to do today; eleven days on, it is renewed in place.
        assert!(!store.reload(SystemTime::now()).unwrap());
        assert!(store.reload(SystemTime::now() + Duration::from_secs(11 * 24 * 3600)).unwrap());
        assert_ne!(store.fingerprint(), first);
        let _ = std::fs::remove_dir_all(dir);
    }
}

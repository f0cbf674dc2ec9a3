//! The mesh's mutual TLS: every node presents a certificate signed by the cluster CA and accepts
//! only peers that do the same. In the dev profile, a node without cluster certificates makes a
//! CA in its data dir (`mesh/ca.pem`, `mesh/ca.key`) unless `--cluster-ca` names one, and signs
//! its own node certificate with the CA key found next to the CA certificate. The prod profile
//! needs all three files and never makes keys.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{Config, Profile};

/// The CA's subject; a dev node re-creates it to sign with the CA key, so it never changes.
const CA_NAME: &str = "kefu cluster CA";
/// Node certificates made in dev live this long.
const DEV_VALIDITY_DAYS: i64 = 365;

/// This node's mesh credentials.
pub struct Identity {
    /// The cluster CA every peer must chain to.
    pub ca: CertificateDer<'static>,
    /// This node's certificate chain.
    pub chain: Vec<CertificateDer<'static>>,
    /// Its key.
    pub key: PrivateKeyDer<'static>,
    /// Where the CA certificate was read from (other dev nodes can be pointed at it).
    pub ca_path: PathBuf,
}

impl Identity {
    /// Reads the configured files, or (dev) makes what is missing.
    pub fn load(config: &Config) -> anyhow::Result<Identity> {
        let dir = config.data_dir.join("mesh");
        match (&config.cluster_ca, &config.node_cert, &config.node_key) {
            (Some(ca), Some(cert), Some(key)) => Identity::read(ca, cert, key),
            // In prod a node signs its own certificate only with a given CA whose key lies
            // beside it (`ca.key`: a deploy hands both to every machine, whose id is known only
            // when it starts); it never makes a CA.
            (None, None, None) if config.profile == Profile::Prod => {
                bail!("the prod profile needs --cluster-ca (with its ca.key beside it), or --cluster-ca, --node-cert and --node-key, to join a mesh")
            }
            (ca, None, None) => {
                let ca_path = match ca {
                    Some(ca) => ca.clone(),
                    None => {
                        make_ca(&dir)?;
                        dir.join("ca.pem")
                    }
                };
                let ca_key = ca_path.with_file_name("ca.key");
                let (cert, key) = (dir.join("node.pem"), dir.join("node.key"));
                let stamp = dir.join("node.ca");
                // A node certificate is made again when the CA it was made for changed.
                let ca_pem = std::fs::read_to_string(&ca_path).with_context(|| format!("reading the cluster CA {}", ca_path.display()))?;
                let current = std::fs::read_to_string(&stamp).ok();
                if !cert.exists() || current.as_deref() != Some(ca_pem.as_str()) {
                    sign_node(&ca_key, &config.node_id, &cert, &key)?;
                    std::fs::write(&stamp, &ca_pem)?;
                }
                Identity::read(&ca_path, &cert, &key)
            }
            _ => bail!("--node-cert and --node-key go together, with --cluster-ca"),
        }
    }

    fn read(ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<Identity> {
        let ca_cert = CertificateDer::from_pem_file(ca).with_context(|| format!("reading the cluster CA {}", ca.display()))?;
        let chain = CertificateDer::pem_file_iter(cert)
            .with_context(|| format!("reading the node certificate {}", cert.display()))?
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading the node key {}", key.display()))?;
        Ok(Identity { ca: ca_cert, chain, key, ca_path: ca.to_path_buf() })
    }

    fn roots(&self) -> anyhow::Result<Arc<rustls::RootCertStore>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).context("the cluster CA is not a usable trust anchor")?;
        Ok(Arc::new(roots))
    }

    /// The server side: TLS 1.3, ALPN `kefu-mesh/1`, client certificate required.
    pub fn server_config(&self) -> anyhow::Result<quinn::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(self.roots()?, Arc::clone(&provider)).build()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![schema::mesh::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        config.transport_config(transport());
        Ok(config)
    }

    /// The client side: the peer must chain to the cluster CA and be named by its node id.
    pub fn client_config(&self) -> anyhow::Result<quinn::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        tls.alpn_protocols = vec![schema::mesh::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport());
        Ok(config)
    }
}

/// Mesh connections: kept alive every second, given up after 5 s of silence (the membership's
/// own timers decide about the peer; this only frees a dead connection), wide windows for
/// catch-up over long links.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(std::time::Duration::from_secs(1)));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(std::time::Duration::from_secs(5)).ok());
    t.max_concurrent_bidi_streams(1024u32.into());
    t.max_concurrent_uni_streams(16u32.into());
    t.stream_receive_window((8u32 * 1024 * 1024).into());
    t.receive_window((32u32 * 1024 * 1024).into());
    t.send_window(32 * 1024 * 1024);
    Arc::new(t)
}

/// Whether the certificate `conn`'s peer presented names `node` (a DNS subject alternative name,
/// which is how node certificates carry the node id). The chain was already verified against the
/// cluster CA by the handshake; this binds the id a peer claims in its hello to that certificate.
pub fn names(conn: &quinn::Connection, node: &str) -> bool {
    let Some(identity) = conn.peer_identity() else { return false };
    let Ok(chain) = identity.downcast::<Vec<CertificateDer<'static>>>() else { return false };
    chain.first().is_some_and(|leaf| der_names(leaf.as_ref(), node))
}

/// Whether DER certificate bytes hold `name` as a dNSName (context tag 2, short length).
fn der_names(der: &[u8], name: &str) -> bool {
    let Ok(len) = u8::try_from(name.len()) else { return false };
    if name.is_empty() || len > 127 {
        return false;
    }
    let mut pattern = vec![0x82, len];
    pattern.extend_from_slice(name.as_bytes());
    der.windows(pattern.len()).any(|w| w == pattern.as_slice())
}

fn ca_params() -> anyhow::Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, CA_NAME);
    params.distinguished_name.push(rcgen::DnType::OrganizationName, "kefu");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let start = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
    params.not_before = start;
    params.not_after = start + time::Duration::days(10 * 365);
    Ok(params)
}

/// Makes `dir/ca.pem` and `dir/ca.key` unless they exist.
pub fn make_ca(dir: &Path) -> anyhow::Result<()> {
    let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
    if cert.exists() && key.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dir)?;
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let ca = ca_params()?.self_signed(&key_pair)?;
    crate::tls::write_private(&key, key_pair.serialize_pem().as_bytes())?;
    std::fs::write(&cert, ca.pem())?;
    Ok(())
}

/// Signs a node certificate for `node_id` with the CA key at `ca_key`.
fn sign_node(ca_key: &Path, node_id: &str, cert: &Path, key: &Path) -> anyhow::Result<()> {
    let ca_key_pem = std::fs::read_to_string(ca_key)
        .with_context(|| format!("no cluster certificates given and no CA key at {} to make them with", ca_key.display()))?;
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem)?;
    // The issuer is identified by its subject name, which `ca_params` always builds the same.
    let issuer = rcgen::Issuer::new(ca_params()?, ca_key);
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec![node_id.to_string()])?;
    params.distinguished_name.push(rcgen::DnType::CommonName, node_id);
    let start = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
    params.not_before = start;
    params.not_after = start + time::Duration::days(DEV_VALIDITY_DAYS);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let signed = params.signed_by(&key_pair, &issuer)?;
    if let Some(dir) = cert.parent() {
        std::fs::create_dir_all(dir)?;
    }
    crate::tls::write_private(key, key_pair.serialize_pem().as_bytes())?;
    std::fs::write(cert, signed.pem())?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn node_certificates_name_their_node_and_no_other() {
        let dir = std::env::temp_dir().join(format!("kefu-mesh-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        make_ca(&dir).unwrap();
        let (cert, key) = (dir.join("node.pem"), dir.join("node.key"));
        sign_node(&dir.join("ca.key"), "fra-1", &cert, &key).unwrap();
        let der = CertificateDer::from_pem_file(&cert).unwrap();
        assert!(der_names(der.as_ref(), "fra-1"));
        assert!(!der_names(der.as_ref(), "fra-2"));
        assert!(!der_names(der.as_ref(), "fra"), "a prefix is not the name");
        assert!(!der_names(der.as_ref(), ""));
        let _ = std::fs::remove_dir_all(dir);
    }
}

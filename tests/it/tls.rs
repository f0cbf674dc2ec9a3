//! TLS over TCP: ALPN picks the protocol, no ALPN sniffs, an unknown ALPN is refused; the
//! self-signed certificate's fingerprint is printed; configured PEM files reload on SIGHUP.

use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::json;
use sha2::{Digest, Sha256};
use tests::{tls_connect, Client, TcpClient, TestNode, WsClient};

use crate::{bin, node};

fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

#[tokio::test]
async fn kefu_tcp_alpn_speaks_jim_binary_and_chats_with_plain_tcp() -> anyhow::Result<()> {
    let n = node().await;
    let cert = n.self_signed_cert()?;
    assert_eq!(n.fingerprint, fingerprint(cert.as_ref()), "the printed fingerprint is the certificate's SHA-256");
    let tls = tls_connect(n.tls, &[b"kefu-tcp/1"], cert).await?;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"kefu-tcp/1"[..]));
    let mut secure = TcpClient::over(tls);
    secure.login("secure", "pw").await?;
    let mut plain = n.tcp_login("plain").await?;
    assert_eq!(secure.chat(json!({"chatType": 2, "to": "plain", "content": "over tls"})).await?["code"], 10000);
    assert_eq!(plain.recv_cmd(11).await?["data"]["content"], "over tls");
    plain.chat(json!({"chatType": 2, "to": "secure", "content": "back"})).await?;
    assert_eq!(secure.recv_cmd(11).await?["data"]["content"], "back");
    assert_eq!(secure.last_mask, 0xD1, "the same framing as the plain port");
    Ok(())
}

#[tokio::test]
async fn wss_and_https_through_http_alpn() -> anyhow::Result<()> {
    let n = node().await;
    let cert = n.self_signed_cert()?;
    let tls = tls_connect(n.tls, &[b"http/1.1"], cert.clone()).await?;
    let mut wss = WsClient::connect_over("wss://localhost/?username=wss-user&password=pw", tls).await?;
    assert_eq!(wss.recv_cmd(6).await?["code"], 10007);
    let mut plain = n.tcp_login("plain2").await?;
    wss.chat(json!({"chatType": 2, "to": "plain2", "content": "via wss"})).await?;
    assert_eq!(plain.recv_cmd(11).await?["data"]["content"], "via wss");

    // HTTPS: a raw HTTP/1.1 request over TLS.
    let mut tls = tls_connect(n.tls, &[b"http/1.1"], cert).await?;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"GET /api/user/online?userid=plain2 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await?;
    let mut response = String::new();
    tls.read_to_string(&mut response).await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains(r#"{"code":10019,"msg":"online 用户在线"}"#), "{response}");
    Ok(())
}

#[tokio::test]
async fn no_alpn_is_sniffed_and_unknown_alpn_is_refused() -> anyhow::Result<()> {
    let n = node().await;
    let cert = n.self_signed_cert()?;
    let mut sniffed = TcpClient::over(tls_connect(n.tls, &[], cert.clone()).await?);
    sniffed.login("sniffed", "pw").await?;
    sniffed.send(json!({"cmd": 13})).await?;
    sniffed.recv_cmd(13).await?;
    let refused = tls_connect(n.tls, &[b"imap"], cert).await;
    assert!(refused.is_err(), "a client offering only protocols the node does not speak is refused");
    // The node goes on.
    n.tcp_login("after").await?;
    Ok(())
}

#[tokio::test]
async fn configured_certificate_reloads_on_sighup() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let make = || -> anyhow::Result<String> {
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])?.self_signed(&key)?;
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok(cert.pem())
    };
    let first = make()?;
    let n = TestNode::builder(bin()).arg("--tls-cert", cert_path.display()).arg("--tls-key", key_path.display()).start().await?;
    let first = CertificateDer::from_pem_slice(first.as_bytes())?;
    assert_eq!(n.fingerprint, fingerprint(first.as_ref()));
    tls_connect(n.tls, &[b"kefu-tcp/1"], first.clone()).await?;

    let second = CertificateDer::from_pem_slice(make()?.as_bytes())?;
    n.hangup()?;
    // New handshakes present the new certificate (and no longer the old one).
    tests::eventually(Duration::from_secs(5), || async { tls_connect(n.tls, &[b"kefu-tcp/1"], second.clone()).await.ok() }).await?;
    assert!(tls_connect(n.tls, &[b"kefu-tcp/1"], first).await.is_err());
    Ok(())
}

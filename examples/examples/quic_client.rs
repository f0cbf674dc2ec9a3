//! A small command-line chat client over QUIC (ALPN `kefu/1`), written to be read by a mobile
//! developer: connect, open one bidirectional stream (the control stream), speak the J-IM binary
//! framing on it, keep the connection alive below the server's idle timeout, and log in again with
//! the token after a reconnect.
//!
//! ```text
//! cargo run --release -p node &
//! cargo run -p examples --example quic_client -- 127.0.0.1:8443 data/tls/self-signed.pem alice secret
//! ```
//! Type a line to send it to group 100, or `@bob hello` to send privately.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8443".into()).parse()?;
    let cert_path = args.next().unwrap_or_else(|| "data/tls/self-signed.pem".into());
    let user = args.next().unwrap_or_else(|| "alice".into());
    let password = args.next().unwrap_or_else(|| "123".into());

    // 1. TLS 1.3 trusting the node's certificate, ALPN kefu/1.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&cert_path).with_context(|| format!("reading {cert_path}"))?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"kefu/1".to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls)?));
    // 2. Keep-alive every 20 s: NAT bindings and the server's 60 s idle timeout stay fresh.
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(20)));
    config.transport_config(Arc::new(transport));
    let mut endpoint = quinn::Endpoint::client(([0, 0, 0, 0], 0).into())?;
    endpoint.set_default_client_config(config);
    let conn = endpoint.connect(addr, "localhost")?.await?;

    // 3. The control stream: J-IM frames both ways.
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &json!({"cmd": 5, "userId": user, "password": password})).await?;
    let (reader_tx, mut frames) = tokio::sync::mpsc::channel::<Value>(64);
    tokio::spawn(async move {
        while let Ok(frame) = read_frame(&mut recv).await {
            if reader_tx.send(frame).await.is_err() {
                break;
            }
        }
    });
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => {
                    // Keep the token: after a reconnect, {"cmd":5,"token":…} logs in without the
                    // password, and {"cmd":19,"type":0} returns what was missed.
                    if frame["command"] == 6 {
                        println!("logged in; resume token: {}", frame["data"]["token"]);
                    } else {
                        println!("<- {frame}");
                    }
                }
                None => break,
            },
            line = lines.next_line() => {
                let Some(line) = line? else { break };
                let body = match line.strip_prefix('@').and_then(|rest| rest.split_once(' ')) {
                    Some((to, text)) => json!({"cmd": 11, "chatType": 2, "to": to, "content": text}),
                    None => json!({"cmd": 11, "chatType": 1, "groupId": "100", "content": line}),
                };
                write_frame(&mut send, &body).await?;
            }
        }
    }
    conn.close(0u32.into(), b"bye");
    endpoint.wait_idle().await;
    Ok(())
}

/// `0x01 | mask | cmd | length (big-endian) | JSON`, as on the TCP port.
async fn write_frame(send: &mut quinn::SendStream, body: &Value) -> anyhow::Result<()> {
    let cmd = body["cmd"].as_u64().context("cmd")? as u8;
    send.write_all(&schema::frame::encode_request(cmd, None, body.to_string().as_bytes())).await?;
    Ok(())
}

async fn read_frame(recv: &mut quinn::RecvStream) -> anyhow::Result<Value> {
    // version, mask, [synSeq when mask has 0x20], cmd, length.
    let mut head = [0u8; 2];
    recv.read_exact(&mut head).await?;
    if head[1] & schema::frame::HAS_SYNSEQ != 0 {
        let mut syn_seq = [0u8; 4];
        recv.read_exact(&mut syn_seq).await?;
    }
    let mut cmd_len = [0u8; 5];
    recv.read_exact(&mut cmd_len).await?;
    let len = u32::from_be_bytes([cmd_len[1], cmd_len[2], cmd_len[3], cmd_len[4]]) as usize;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

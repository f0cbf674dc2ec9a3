//! Measures resume-after-reconnect over QUIC: a phone that lost its connection opens a new one
//! (new local port), logs in with its token and fetches what it missed. Prints the median and
//! 99th percentile of the whole step over `--rounds` reconnects (default 200).
//!
//! ```text
//! cargo run --release -p node -- --data-dir /tmp/kefu-resume &
//! cargo run --release -p examples --example quic_resume -- 127.0.0.1:8443 /tmp/kefu-resume/tls/self-signed.pem
//! ```

use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use serde_json::json;
use tests::{quic_client_config, Client, TcpClient};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let addr = args.first().map(String::as_str).unwrap_or("127.0.0.1:8443").parse()?;
    let cert =
        CertificateDer::from_pem_file(args.get(1).map(String::as_str).unwrap_or("data/tls/self-signed.pem")).context("certificate")?;
    let rounds: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(200);
    let config = quic_client_config(&[b"kefu/1"], cert)?;

    let open = |config: quinn::ClientConfig| async move {
        let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
        endpoint.set_default_client_config(config);
        let conn = endpoint.connect(addr, "localhost")?.await?;
        let (send, recv) = conn.open_bi().await?;
        Ok::<_, anyhow::Error>((endpoint, conn, TcpClient::over(tokio::io::join(recv, send))))
    };
    let (endpoint, conn, mut first) = open(config.clone()).await?;
    let token = first.login("resumer", "pw").await?["data"]["token"].as_str().context("token")?.to_string();
    conn.close(0u32.into(), b"lost signal");
    endpoint.wait_idle().await;

    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let (endpoint, conn, mut client) = open(config.clone()).await?;
        client.send(json!({"cmd": 5, "token": token})).await?;
        anyhow::ensure!(client.recv_cmd(6).await?["code"] == 10007, "token login failed");
        client.send(json!({"cmd": 19, "type": 0})).await?;
        client.recv_cmd(20).await?;
        samples.push(started.elapsed());
        conn.close(0u32.into(), b"again");
        endpoint.wait_idle().await;
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "resume over QUIC (handshake + token login + offline fetch), {rounds} rounds: p50 {:.2} ms, p99 {:.2} ms",
        ms(at(0.5)),
        ms(at(0.99))
    );
    Ok(())
}

//! Interop with an independent QUIC implementation: Python's aioquic speaks kefu/1 to the node
//! and chats with a TCP user. `.ci/run` installs aioquic into a virtualenv; set `KEFU_PYTHON` to
//! use another interpreter.

use std::path::Path;
use std::process::Stdio;

use serde_json::json;
use tests::Client;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::node;

fn python() -> String {
    std::env::var("KEFU_PYTHON").unwrap_or_else(|_| {
        let dir = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
        format!("{dir}/kefu-venv/bin/python")
    })
}

#[tokio::test]
async fn aioquic_client_chats_with_a_tcp_user() -> anyhow::Result<()> {
    let python = python();
    anyhow::ensure!(Path::new(&python).exists(), "{python} missing: run .ci/run (it makes the virtualenv with aioquic)");
    let n = node().await;
    let mut desk = n.tcp_login("desk").await?;
    let ca = n.data_dir().join("tls/self-signed.pem");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/aioquic_kefu.py");
    let mut child = tokio::process::Command::new(&python)
        .arg(script)
        .args(["127.0.0.1", &n.quic.port().to_string(), &ca.display().to_string(), "phone", "desk"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line()).await??;
    assert_eq!(ready.as_deref(), Some("READY"));
    assert_eq!(desk.recv_cmd(11).await?["data"]["content"], "from aioquic");
    desk.chat(json!({"chatType": 2, "to": "phone", "content": "to aioquic"})).await?;
    let got = tokio::time::timeout(std::time::Duration::from_secs(20), lines.next_line()).await??;
    assert_eq!(got.as_deref(), Some("GOT to aioquic"));
    assert!(child.wait().await?.success());
    Ok(())
}

#[tokio::test]
async fn aioquic_http3_request_to_the_v1_api() -> anyhow::Result<()> {
    let python = python();
    anyhow::ensure!(Path::new(&python).exists(), "{python} missing: run .ci/run (it makes the virtualenv with aioquic)");
    let n = node().await;
    let ca = n.data_dir().join("tls/self-signed.pem");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("interop/aioquic_h3.py");
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::process::Command::new(&python)
            .arg(script)
            .args(["127.0.0.1", &n.quic.port().to_string(), &ca.display().to_string()])
            .output(),
    )
    .await??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success() && stdout.trim() == "OK", "h3 client: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

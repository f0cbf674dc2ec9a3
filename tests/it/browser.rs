//! Our demo page in a real headless Chromium: two tabs log in and chat (group, private, history).
//! Needs Debian's chromium and `npm ci` in tests/browser, both of which `.ci/run` installs.

use std::path::Path;

use serde_json::json;
use tests::Client;

use crate::node;

#[tokio::test]
async fn demo_page_chats_between_two_tabs() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    anyhow::ensure!(dir.join("node_modules/playwright-core").exists(), "run `npm ci --prefix tests/browser` first (.ci/run does)");
    anyhow::ensure!(Path::new("/usr/bin/chromium").exists(), "install Debian's chromium first (.ci/run does)");
    let n = node().await;
    let out = tokio::process::Command::new("node")
        .arg(dir.join("demo_chat.mjs"))
        .arg(format!("{}/", n.http()))
        .current_dir(&dir)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success() && stdout.contains("demo chat ok"), "browser test failed\nstdout: {stdout}\nstderr: {stderr}");
    Ok(())
}

#[tokio::test]
async fn chromium_webtransport_chats_with_a_websocket_user() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    anyhow::ensure!(dir.join("node_modules/playwright-core").exists(), "run `npm ci --prefix tests/browser` first (.ci/run does)");
    anyhow::ensure!(Path::new("/usr/bin/chromium").exists(), "install Debian's chromium first (.ci/run does)");
    let n = node().await;
    let mut ws = n.ws_login("wsuser").await?;
    let mut browser = tokio::process::Command::new("node")
        .arg(dir.join("webtransport.mjs"))
        .args([format!("{}/", n.http()), n.quic.port().to_string(), n.fingerprint.clone(), "wsuser".to_string()])
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    // The wait covers Chromium's start, the page and the WebTransport handshake, which on a busy
    // machine take most of it; the browser ending first (an error) stops it at once.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    let got = loop {
        tokio::select! {
            got = ws.recv_cmd(11) => match got {
                Ok(v) => break Some(v),
                // A quiet 10 s (the client's receive timeout) is not an answer yet.
                Err(e) if e.downcast_ref::<tokio::time::error::Elapsed>().is_some() && tokio::time::Instant::now() < deadline => {}
                Err(_) => break None,
            },
            _ = browser.wait() => break None,
        }
    };
    let got = match got {
        Some(v) => v,
        None => {
            let out = browser.wait_with_output().await?;
            anyhow::bail!(
                "no message from the browser\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    assert_eq!((got["data"]["from"].as_str(), got["data"]["content"].as_str()), (Some("wtuser"), Some("from webtransport")));
    ws.chat(json!({"chatType": 2, "to": "wtuser", "content": "to webtransport"})).await?;
    let out = browser.wait_with_output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(30), out)
        .await
        .map_err(|_| anyhow::anyhow!("the browser did not finish within 30 s"))??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(stdout.trim() == "got to webtransport", "browser: {stdout}\nstderr: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Customer service end to end (issue: customer service §6): the widget on a host page of another
/// origin, agents in the console. Screenshots go to `target/browser-artifacts/support/`.
#[tokio::test]
async fn widget_and_console_carry_a_customer_service_day() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("browser");
    anyhow::ensure!(dir.join("node_modules/playwright-core").exists(), "run `npm ci --prefix tests/browser` first (.ci/run does)");
    anyhow::ensure!(Path::new("/usr/bin/chromium").exists(), "install Debian's chromium first (.ci/run does)");
    let n = node().await;
    let artifacts = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("browser-artifacts/support");
    let run = tokio::process::Command::new("node").arg(dir.join("support.mjs")).arg(n.http()).arg(&artifacts).current_dir(&dir).output();
    // Alone the flows take 30-50 s; beside the rest of the suite on a slow day they took 185 s
    // (every wait inside is bounded at 20 s, so this is only the outer deadline).
    let out = tokio::time::timeout(std::time::Duration::from_secs(480), run)
        .await
        .map_err(|_| anyhow::anyhow!("the browser flows did not finish within 480 s"))??;
    // The flows' step log (each step with its start time) is kept beside the screenshots, passed
    // or not, to see where a slow run spent its time.
    let _ = std::fs::write(artifacts.join("steps.log"), &out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        out.status.success() && stdout.contains("support ok"),
        "browser flows failed (screenshots in {})\nstdout: {stdout}\nstderr: {stderr}",
        artifacts.display()
    );
    Ok(())
}

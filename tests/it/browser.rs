//! Our demo page in a real headless Chromium: two tabs log in and chat (group, private, history).
//! Needs Debian's chromium and `npm ci` in tests/browser, both of which `.ci/run` installs.

use std::path::Path;

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

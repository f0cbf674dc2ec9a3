//! The admin port: health, readiness, Prometheus metrics; and a clean shutdown on SIGTERM.

use serde_json::json;
use tests::Client;

use crate::node;

#[tokio::test]
async fn health_ready_and_metrics() -> anyhow::Result<()> {
    let mut n = node().await;
    let admin = format!("http://{}", n.admin);
    assert_eq!(reqwest::get(format!("{admin}/healthz")).await?.status(), 200);
    assert_eq!(reqwest::get(format!("{admin}/readyz")).await?.status(), 200);
    let mut tcp = n.tcp_login("m1").await?;
    let _ws = n.ws_login("m2").await?;
    tcp.chat(json!({"chatType": 1, "groupId": "100", "content": "count me"})).await?;
    let text = reqwest::get(format!("{admin}/metrics")).await?.text().await?;
    assert!(text.contains("kefu_connections{transport=\"tcp\"} 1"), "{text}");
    assert!(text.contains("kefu_connections{transport=\"ws\"} 1"), "{text}");
    assert!(text.contains("kefu_messages_in_total 1"), "{text}");
    assert!(text.contains("kefu_messages_out_total 2"), "two group members got it: {text}");
    assert!(text.contains("# TYPE kefu_commit_seconds histogram"));
    assert!(!text.contains("kefu_commit_seconds_count 0"), "commits were timed");
    assert!(n.terminate().await?, "SIGTERM exits cleanly");
    Ok(())
}

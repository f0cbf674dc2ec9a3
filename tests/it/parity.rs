//! One scenario over each transport: every command must behave the same on TCP and WebSocket.

use serde_json::{json, Value};
use tests::Client;

use crate::{node, normalize};

/// Runs the scenario with two clients of one transport and returns every frame they saw,
/// normalised.
async fn scenario<C: Client>(mut a: C, mut b: C, pa: &str, pb: &str) -> anyhow::Result<Vec<Value>> {
    let mut seen = Vec::new();
    let requests = [
        (true, json!({"cmd": 13})),
        (true, json!({"cmd": 11, "chatType": 2, "to": pb, "content": "one"})),
        (true, json!({"cmd": 11, "chatType": 1, "groupId": "100", "content": "two"})),
        (true, json!({"cmd": 7, "groupId": "room"})),
        (true, json!({"cmd": 17, "userId": pa, "type": 2})),
        (true, json!({"cmd": 19, "type": 1, "fromUserId": pb})),
        (true, json!({"cmd": 15, "id": "does-not-exist"})),
        (true, json!({"cmd": 11, "chatType": 9})),
        (true, json!({"cmd": 104, "to": pb, "seq": 0})),
    ];
    for (expect_reply, req) in requests {
        a.send(req.clone()).await?;
        if expect_reply {
            // Heartbeat (13), chat (12), join (9 notice), users (18), messages (20), recall (16),
            // bad chat (12), sync (105).
            let reply_cmd = match req["cmd"].as_u64().unwrap_or(0) {
                11 => 12,
                7 => 9,
                15 => 16,
                17 => 18,
                19 => 20,
                104 => 105,
                c => c,
            };
            seen.push(a.recv_cmd(reply_cmd).await?);
        }
    }
    seen.push(b.recv_cmd(11).await?);
    seen.push(b.recv_cmd(11).await?);
    Ok(seen.into_iter().map(|v| rename(normalize(v), pa, pb)).collect())
}

/// Replaces the per-transport user names with fixed ones.
fn rename(v: Value, pa: &str, pb: &str) -> Value {
    let text = v.to_string().replace(pa, "USER_A").replace(pb, "USER_B");
    serde_json::from_str(&text).unwrap_or(v)
}

#[tokio::test]
async fn tcp_and_websocket_behave_the_same() -> anyhow::Result<()> {
    let n = node().await;
    let tcp = scenario(n.tcp_login("ta").await?, n.tcp_login("tb").await?, "ta", "tb").await?;
    let n2 = node().await;
    let ws = scenario(n2.ws_login("ta").await?, n2.ws_login("tb").await?, "ta", "tb").await?;
    assert_eq!(tcp.len(), ws.len());
    for (t, w) in tcp.iter().zip(&ws) {
        assert_eq!(t, w);
    }
    assert_eq!(tcp[1]["code"], 10000);
    assert_eq!(tcp[6]["code"], 11002, "recall of an unknown id");
    assert_eq!(tcp[7]["code"], 10002, "bad chatType");
    Ok(())
}

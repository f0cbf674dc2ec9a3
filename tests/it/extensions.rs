//! kefu's extensions (cmd 100+): typing, delivery and read receipts, sync from a seq cursor.

use serde_json::json;
use tests::Client;

use crate::node;

#[tokio::test]
async fn typing_receipts_and_sync() -> anyhow::Result<()> {
    let n = node().await;
    let mut a = n.tcp_login("xa").await?;
    let mut b = n.ws_login("xb").await?;

    a.send(json!({"cmd": 100, "to": "xb"})).await?;
    assert_eq!(b.recv_cmd(100).await?, json!({"command": 100, "data": {"from": "xa", "to": "xb"}}));
    a.send(json!({"cmd": 101, "to": "xb"})).await?;
    assert_eq!(b.recv_cmd(101).await?["data"]["from"], "xa");
    b.send(json!({"cmd": 100, "groupId": "100"})).await?;
    assert_eq!(a.recv_cmd(100).await?["data"]["groupId"], "100");

    for i in 1..=3 {
        a.chat(json!({"chatType": 2, "to": "xb", "content": format!("s{i}")})).await?;
    }
    b.send(json!({"cmd": 103, "to": "xa", "seq": 2})).await?;
    assert_eq!(a.recv_cmd(103).await?["data"], json!({"from": "xb", "to": "xa", "seq": 2}));
    b.send(json!({"cmd": 102, "to": "xa", "seq": 3})).await?;
    assert_eq!(a.recv_cmd(102).await?["data"]["seq"], 3);

    b.send(json!({"cmd": 104, "to": "xa", "seq": 1, "count": 1})).await?;
    let sync = b.recv_cmd(105).await?;
    assert_eq!(sync["code"], 10000);
    assert_eq!(sync["data"]["conversation"], "p:xa:xb");
    assert_eq!(sync["data"]["messages"][0]["seq"], 2);
    assert_eq!(sync["data"]["more"], true);

    // Not a member: no typing into or syncing a foreign group.
    a.send(json!({"cmd": 104, "groupId": "elsewhere", "seq": 0})).await?;
    assert_eq!(a.recv_cmd(105).await?["code"], 11001);
    Ok(())
}

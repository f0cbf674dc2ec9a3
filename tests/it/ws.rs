//! WebSocket with a real WebSocket client: query-string login, the demo page's requests (numbers
//! as strings), TEXT and BINARY in, TEXT out, PING/PONG, and the close handshake.

use serde_json::json;
use tests::{Client, WsClient};
use tokio_tungstenite::tungstenite::Message;

use crate::node;

#[tokio::test]
async fn query_login_then_demo_page_traffic() -> anyhow::Result<()> {
    let n = node().await;
    // Any path works, as in J-IM.
    let mut a = WsClient::connect(&format!("{}/any/path?username=wa&password=123", n.ws())).await?;
    let notice = a.recv().await?;
    assert_eq!(notice["command"], 9, "join notice before the login reply");
    assert_eq!(a.recv().await?["code"], 10007);
    let mut b = n.ws_login("wb").await?;

    // Exactly the demo page's requests.
    a.send(json!({"cmd":17,"type":"0","userId":"wa"})).await?;
    let users = a.recv_cmd(18).await?;
    let online: Vec<&str> = users["data"]["groups"][0]["users"].as_array().unwrap().iter().map(|u| u["userId"].as_str().unwrap()).collect();
    assert_eq!(online, ["wa", "wb"]);
    a.send(json!({"cmd":19,"type":"0","userId":"wa"})).await?;
    assert_eq!(a.recv_cmd(20).await?["code"], 10016);
    a.send(json!({"from":"wa","to":"wb","cmd":11,"createTime":1700000000000u64,"chatType":"2","msgType":"0","content":"ping"})).await?;
    assert_eq!(a.recv_cmd(12).await?["code"], 10000);
    assert_eq!(b.recv_cmd(11).await?["data"]["content"], "ping");
    // BINARY frames carry the same JSON.
    b.send_message(Message::binary(
        json!({"from":"wb","createTime":1,"cmd":11,"groupId":"100","chatType":"1","msgType":"0","content":"bin"}).to_string().into_bytes(),
    ))
    .await?;
    assert_eq!(a.recv_cmd(11).await?["data"]["content"], "bin");
    assert_eq!(b.recv_cmd(12).await?["code"], 10000);
    Ok(())
}

#[tokio::test]
async fn ping_gets_pong_and_close_is_a_clean_handshake() -> anyhow::Result<()> {
    let n = node().await;
    let mut c = n.ws_login("pinger").await?;
    c.send_message(Message::Ping(b"abc".to_vec().into())).await?;
    loop {
        match c.next_message().await? {
            Some(Message::Pong(p)) => {
                assert_eq!(&p[..], b"abc");
                break;
            }
            Some(_) => continue,
            None => anyhow::bail!("closed before the pong"),
        }
    }
    // cmd 14 over WebSocket: the 10021 text, then a close frame.
    c.send(json!({"cmd": 14})).await?;
    assert_eq!(c.recv_cmd(14).await?, json!({"code":10021,"command":14,"msg":"close ok! 关闭成功"}));
    assert!(matches!(c.next_message().await?, Some(Message::Close(_))), "a proper close frame follows");

    // A close frame from the client is answered with a close frame (a clean handshake).
    let mut d = n.ws_login("closer").await?;
    d.send_message(Message::Close(None)).await?;
    loop {
        match d.next_message().await? {
            Some(Message::Close(_)) | None => break,
            Some(_) => continue,
        }
    }
    Ok(())
}

#[tokio::test]
async fn ws_without_credentials_can_log_in_with_cmd_5() -> anyhow::Result<()> {
    let n = node().await;
    let mut c = WsClient::connect(&format!("{}/", n.ws())).await?;
    c.send(json!({"cmd": 11, "chatType": 2, "to": "x", "content": "too early"})).await?;
    assert_eq!(c.recv_cmd(12).await?["code"], 11010, "not logged in");
    c.login("late", "pw").await?;
    assert_eq!(c.chat(json!({"chatType": 2, "to": "x", "content": "now"})).await?["code"], 10001, "stored for the offline recipient");
    Ok(())
}

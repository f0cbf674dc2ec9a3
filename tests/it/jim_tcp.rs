//! Byte-level J-IM exchanges over TCP, the way the J-IM Java client talks.

use serde_json::json;
use tests::Client;

use crate::node;

#[tokio::test]
async fn login_chat_group_users_history_heartbeat_close() -> anyhow::Result<()> {
    let n = node().await;
    let mut a = n.tcp().await?;
    // The documented example frame, byte for byte (client mask 0xD1 as in JIM-PROTOCOL §2.4).
    let body = br#"{"cmd":5,"password":"123","userId":"hello_client"}"#;
    let mut wire = vec![0x01, 0xD1, 0x05, 0, 0, 0, body.len() as u8];
    wire.extend_from_slice(body);
    a.write_raw(&wire).await?;
    // Join notice (9) comes before the login reply (6), as in J-IM.
    let (cmd, notice) = a.recv_frame().await?;
    assert_eq!(cmd, 9);
    assert_eq!(a.last_mask, 0xD1, "server frames carry J-IM's output mask");
    assert_eq!(
        notice,
        json!({"code":10011,"command":9,"group":"100","msg":"join group ok! 加入群组成功!","user":{"nick":"hello_client","status":"online","userId":"hello_client"}})
    );
    let (cmd, login) = a.recv_frame().await?;
    assert_eq!((cmd, login["code"].as_u64(), login["msg"].as_str()), (6, Some(10007), Some("ok 登录成功!")));

    let mut b = n.tcp_login("bob").await?;
    assert_eq!(a.recv_cmd(9).await?["user"]["userId"], "bob", "existing members hear about the new one");

    // Private chat: pushed to the recipient, then the sender's reply.
    let reply = a.chat(json!({"chatType": 2, "to": "bob", "content": "hi bob", "msgType": 0})).await?;
    assert_eq!(reply["code"], 10000);
    assert_eq!(reply["msg"], "ok 发送成功");
    assert_eq!(reply["data"]["seq"], 1);
    let push = b.recv_cmd(11).await?;
    assert_eq!(push["data"]["from"], "hello_client");
    assert_eq!(push["data"]["nick"], "hello_client", "nick rides on every chat message");
    assert_eq!(push["data"]["content"], "hi bob");
    assert_eq!(push["data"]["id"], reply["data"]["id"]);
    assert!(push.get("code").is_none(), "a chat push has no code, as J-IM");

    // Group chat: every member connection, the sender's included.
    let reply = b.chat(json!({"chatType": "1", "groupId": "100", "content": "hello group"})).await?;
    assert_eq!(reply["code"], 10000);
    assert_eq!(a.recv_cmd(11).await?["data"]["content"], "hello group");
    assert_eq!(b.recv_cmd(11).await?["data"]["content"], "hello group", "the sender gets its own group message");

    // Users: the group with its online members.
    a.send(json!({"cmd": 17, "type": 0, "userId": "hello_client"})).await?;
    let users = a.recv_cmd(18).await?;
    assert_eq!(users["code"], 10005);
    let group = &users["data"]["groups"][0];
    assert_eq!(group["groupId"], "100");
    let ids: Vec<&str> = group["users"].as_array().unwrap().iter().map(|u| u["userId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["bob", "hello_client"]);

    // Type 1 lists only offline members, type 2 everyone.
    let mut gone = n.tcp_login("gone").await?;
    gone.send(json!({"cmd": 14})).await?;
    gone.closed().await?;
    assert_eq!(b.recv_cmd(10).await?["data"]["user"]["userId"], "gone", "exit notice to the remaining members");
    a.send(json!({"cmd": 17, "type": 1, "userId": "hello_client"})).await?;
    let offline = a.recv_cmd(18).await?;
    assert_eq!(offline["code"], 10006);
    let ids: Vec<&str> = offline["data"]["groups"][0]["users"].as_array().unwrap().iter().map(|u| u["userId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["gone"]);
    a.send(json!({"cmd": 17, "type": 2, "userId": "hello_client"})).await?;
    let all = a.recv_cmd(18).await?;
    assert_eq!(all["code"], 10003);
    assert_eq!(all["data"]["groups"][0]["users"].as_array().unwrap().len(), 3);

    // History, private and group.
    b.send(json!({"cmd": 19, "type": 1, "fromUserId": "hello_client", "userId": "bob"})).await?;
    let history = b.recv_cmd(20).await?;
    assert_eq!(history["code"], 10018);
    assert_eq!(history["data"]["friends"]["hello_client"][0]["content"], "hi bob");
    b.send(json!({"cmd": 19, "type": 1, "groupId": "100", "userId": "bob"})).await?;
    assert_eq!(b.recv_cmd(20).await?["data"]["groups"]["100"][0]["content"], "hello group");

    // Heartbeat.
    a.send(json!({"cmd": 13, "hbbyte": "-127"})).await?;
    assert_eq!(a.recv_cmd(13).await?, json!({"command":13,"data":{"hbbyte":-128}}));

    // Close: the 10021 reply, then the server drops the connection; bob hears the exit notice.
    a.send(json!({"cmd": 14})).await?;
    assert_eq!(a.recv_cmd(14).await?, json!({"code":10021,"command":14,"msg":"close ok! 关闭成功"}));
    a.closed().await?;
    let exit = b.recv_cmd(10).await?;
    assert_eq!(
        exit,
        json!({"command":10,"data":{"group":"100","user":{"nick":"hello_client","status":"offline","userId":"hello_client"}}})
    );
    Ok(())
}

#[tokio::test]
async fn syn_seq_is_echoed_with_mask_f1() -> anyhow::Result<()> {
    let n = node().await;
    let mut c = n.tcp().await?;
    c.send_frame(13, Some(7), b"{\"cmd\":13}").await?;
    let (cmd, _) = c.recv_frame().await?;
    assert_eq!(cmd, 13);
    assert_eq!(c.last_mask, 0xF1);
    assert_eq!(c.last_syn_seq, Some(7));
    Ok(())
}

#[tokio::test]
async fn handshake_over_tcp_answers_hbyte() -> anyhow::Result<()> {
    let n = node().await;
    let mut c = n.tcp().await?;
    c.send(json!({"cmd": 1})).await?;
    assert_eq!(c.recv().await?, json!({"command":2,"data":{"hbyte":-127}}));
    Ok(())
}

#[tokio::test]
async fn idempotent_client_id_stores_and_delivers_once() -> anyhow::Result<()> {
    let n = node().await;
    let mut a = n.tcp_login("a").await?;
    let mut b = n.tcp_login("b").await?;
    let first = a.chat(json!({"chatType": 2, "to": "b", "content": "once", "id": "key-1"})).await?;
    let second = a.chat(json!({"chatType": 2, "to": "b", "content": "once", "id": "key-1"})).await?;
    assert_eq!(first["data"], second["data"], "the repeat gets the original id and seq");
    assert_eq!(b.recv_cmd(11).await?["data"]["clientId"], "key-1");
    // The next push b sees is the next message, not the duplicate.
    a.chat(json!({"chatType": 2, "to": "b", "content": "next"})).await?;
    assert_eq!(b.recv_cmd(11).await?["data"]["content"], "next");
    b.send(json!({"cmd": 19, "type": 1, "fromUserId": "a"})).await?;
    let history = b.recv_cmd(20).await?;
    assert_eq!(history["data"]["friends"]["a"].as_array().unwrap().len(), 2);
    Ok(())
}

#[tokio::test]
async fn a_client_id_is_per_conversation() -> anyhow::Result<()> {
    // Clients that number their messages per conversation send "k1" to everyone they talk to.
    let n = node().await;
    let mut alice = n.tcp_login("alice").await?;
    let mut bob = n.tcp_login("bob").await?;
    let mut carol = n.tcp_login("carol").await?;
    let to_bob = alice.chat(json!({"chatType": 2, "to": "bob", "content": "hi bob", "id": "k1"})).await?;
    let to_carol = alice.chat(json!({"chatType": 2, "to": "carol", "content": "hi carol", "id": "k1"})).await?;
    assert_eq!(to_bob["data"]["conversation"], "p:alice:bob");
    assert_eq!(to_carol["code"], 10000, "{to_carol}");
    assert_eq!(to_carol["data"]["conversation"], "p:alice:carol", "another conversation is another message");
    assert_eq!(to_carol["data"]["seq"], 1);
    assert_ne!(to_carol["data"]["id"], to_bob["data"]["id"]);
    assert_eq!(carol.recv_cmd(11).await?["data"]["content"], "hi carol");
    assert_eq!(bob.recv_cmd(11).await?["data"]["content"], "hi bob");
    // In a group too, and a repeat within one conversation is still the first copy.
    let in_group = alice.chat(json!({"chatType": 1, "groupId": "100", "content": "hi all", "id": "k1"})).await?;
    assert_eq!(in_group["data"]["conversation"], "g:100");
    let again = alice.chat(json!({"chatType": 2, "to": "carol", "content": "hi carol", "id": "k1"})).await?;
    assert_eq!(again["data"], to_carol["data"]);
    Ok(())
}

#[tokio::test]
async fn token_from_login_authenticates_a_new_connection() -> anyhow::Result<()> {
    let n = node().await;
    let mut a = n.tcp().await?;
    let reply = a.login("tok", "pw").await?;
    let token = reply["data"]["token"].as_str().unwrap().to_string();
    let mut again = n.tcp().await?;
    again.send(json!({"cmd": 3, "token": token})).await?;
    let auth = again.recv_cmd(4).await?;
    assert_eq!(auth["code"], 10009);
    again.send(json!({"cmd": 17, "userId": "tok"})).await?;
    assert_eq!(again.recv_cmd(18).await?["data"]["userId"], "tok");
    let mut forged = n.tcp().await?;
    forged.send(json!({"cmd": 3, "token": format!("{token}x")})).await?;
    assert_eq!(forged.recv_cmd(4).await?["code"], 10010);
    Ok(())
}

#[tokio::test]
async fn wrong_password_fails_and_closes() -> anyhow::Result<()> {
    let n = node().await;
    n.tcp_login("owner").await?;
    let mut c = n.tcp().await?;
    c.send(json!({"cmd": 5, "userId": "owner", "password": "not-it"})).await?;
    assert_eq!(c.recv_cmd(6).await?, json!({"code":10008,"command":6,"msg":"login failed ! 登录失败!"}));
    c.closed().await?;
    Ok(())
}

#[tokio::test]
async fn pipelined_chats_are_answered_in_request_order() -> anyhow::Result<()> {
    let n = node().await;
    let mut b = n.tcp_login("sink").await?;
    let mut a = n.tcp_login("pipe").await?;
    a.clear_backlog(); // its own join notice
    for i in 0..100 {
        a.send(json!({"cmd": 11, "chatType": 2, "to": "sink", "content": format!("{i}")})).await?;
    }
    // A request of another kind after them waits for them: its reply comes last.
    a.send(json!({"cmd": 13})).await?;
    for i in 0..100u64 {
        let reply = a.recv().await?;
        assert_eq!((reply["command"].as_u64(), reply["data"]["seq"].as_u64()), (Some(12), Some(i + 1)));
    }
    assert_eq!(a.recv().await?["command"], 13);
    for i in 0..100u64 {
        assert_eq!(b.recv_cmd(11).await?["data"]["seq"], i + 1, "one order at the recipient");
    }
    Ok(())
}

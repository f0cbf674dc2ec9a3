//! Bad input (JIM-PROTOCOL §10): protocol errors get a final error frame and a close; request
//! errors get a reply and the connection stays; other connections are never affected.

use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use serde_json::json;
use tests::{Client, TestNode};
use tokio_tungstenite::tungstenite::Message;

use crate::{bin, node};

/// Checks that a fresh client can still log in and chat: the node went on.
async fn node_is_fine(n: &TestNode) -> anyhow::Result<()> {
    let mut c = n.tcp_login("still-fine").await?;
    assert_eq!(c.chat(json!({"chatType": 2, "to": "x", "content": "ok"})).await?["command"], 12);
    Ok(())
}

#[tokio::test]
async fn header_errors_close_with_jim_codes() -> anyhow::Result<()> {
    let n = node().await;
    let mut bystander = n.tcp_login("bystander").await?;
    // A first byte other than 0x01 is sniffed as HTTP (as in J-IM), so each case follows a valid
    // frame on an established binary connection.
    let cases: [(&[u8], u64); 4] = [
        (&[0x02, 0, 11, 0, 0, 0, 2, b'{', b'}'], 10013),
        (&[0x01, 0, 77, 0, 0, 0, 2, b'{', b'}'], 10014),
        (&[0x01, 0, 11, 0xFF, 0xFF, 0xFF, 0xFE], 11006),
        (&[0x01, 0, 11, 0x00, 0x30, 0x00, 0x00], 11005), // 3 MiB > 2 MiB
    ];
    for (bytes, code) in cases {
        let mut c = n.tcp().await?;
        c.send(json!({"cmd": 13})).await?;
        c.recv_cmd(13).await?;
        c.write_raw(bytes).await?;
        let (cmd, reply) = c.recv_frame().await?;
        assert_eq!((cmd, reply["code"].as_u64()), (0, Some(code)), "{bytes:?}");
        c.closed().await?;
    }
    bystander.send(json!({"cmd": 13})).await?;
    bystander.recv_cmd(13).await?;
    node_is_fine(&n).await
}

#[tokio::test]
async fn request_errors_reply_and_keep_the_connection() -> anyhow::Result<()> {
    let n = node().await;
    let mut c = n.tcp_login("reqerr").await?;
    c.send_frame(11, None, b"{not json").await?;
    assert_eq!(c.recv_cmd(12).await?["code"], 10002);
    c.send(json!({"cmd": 11, "to": "x", "content": "no chatType"})).await?;
    assert_eq!(c.recv_cmd(12).await?["code"], 10002);
    c.send(json!({"cmd": 11, "chatType": 2, "to": ["wrong", "type"], "content": "x"})).await?;
    assert_eq!(c.recv_cmd(12).await?["code"], 10002);
    c.send(json!({"cmd": 19, "type": 1})).await?;
    assert_eq!(c.recv_cmd(20).await?["code"], 10015, "history needs fromUserId or groupId");
    c.send(json!({"cmd": 17})).await?;
    assert_eq!(c.recv_cmd(18).await?["code"], 10004, "missing userId");
    // A known command byte the server only sends (cmd 20) is J-IM's "unknown cmd" reply.
    c.send_frame(20, None, b"{}").await?;
    assert_eq!(c.recv_cmd(0).await?["code"], 10017);
    c.send(json!({"cmd": 13})).await?;
    c.recv_cmd(13).await?;
    Ok(())
}

#[tokio::test]
async fn websocket_garbage_unknown_cmd_and_oversize() -> anyhow::Result<()> {
    let n = node().await;
    let mut c = n.ws_login("wsbad").await?;
    c.send_message(Message::text("this is not json")).await?;
    assert_eq!(c.recv_cmd(0).await?, json!({"code":10017,"command":0,"msg":"cmd failed! 未知的cmd命令!"}));
    c.send(json!({"cmd": 99})).await?;
    assert_eq!(c.recv_cmd(0).await?["code"], 10017);
    c.send(json!({"cmd": 11, "chatType": "x"})).await?;
    assert_eq!(c.recv_cmd(12).await?["code"], 10002);
    // Over 512 KiB: an error frame, then a close frame with 1009.
    let big = "x".repeat(600 * 1024);
    c.send_message(Message::text(big)).await?;
    let mut code = None;
    while let Some(m) = c.next_message().await? {
        match m {
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(t.as_str())?;
                if v["code"] == 11005 {
                    code = Some(11005);
                }
            }
            Message::Close(frame) => {
                assert_eq!(frame.map(|f| u16::from(f.code)), Some(1009));
                break;
            }
            _ => {}
        }
    }
    assert_eq!(code, Some(11005));
    node_is_fine(&n).await
}

#[tokio::test]
async fn half_frame_then_stall_is_closed_by_the_idle_timeout() -> anyhow::Result<()> {
    // Cheap hashing: a debug-build login at the default cost takes longer than this test's 1 s
    // idle timeout on a loaded machine, and the healthy client's clock starts at its login frame.
    let n = TestNode::builder(bin()).arg("--heartbeat-timeout", 1).arg("--argon2-memory-kib", 64).arg("--argon2-passes", 1).start().await?;
    let mut staller = n.tcp().await?;
    staller.write_raw(&[0x01, 0x00, 11, 0, 0, 0, 50, b'{']).await?;
    let mut healthy = n.tcp_login("healthy").await?;
    // The healthy client keeps talking (every 300 ms, bounded to 10 rounds) while the stalled
    // one waits for its fate.
    let keep_talking = async {
        for _ in 0..10 {
            healthy.send(json!({"cmd": 13})).await?;
            healthy.recv_cmd(13).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok::<_, anyhow::Error>(())
    };
    let stalled = async {
        let (_, reply) = staller.recv_frame().await?;
        assert_eq!(reply["code"], 11011, "closed with the heartbeat-timeout code");
        staller.closed().await
    };
    let (talked, stalled) = tokio::join!(keep_talking, stalled);
    stalled?;
    talked?;
    Ok(())
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_and_others_go_on() -> anyhow::Result<()> {
    let n = node().await;
    // Logs in, then never reads again.
    let mut deaf = n.tcp_login("deaf").await?;
    let mut talker = n.tcp_login("talker").await?;
    let mut friend = n.tcp_login("friend").await?;
    let big = "y".repeat(64 * 1024);
    let mut dropped = false;
    // Bounded: at most 600 messages of 64 KiB (~38 MiB) before the deaf client must be gone.
    for i in 0..600 {
        talker.send(json!({"cmd": 11, "chatType": 2, "to": "deaf", "content": big})).await?;
        let reply = talker.recv_cmd(12).await?;
        assert!(reply["code"] == 10000 || reply["code"] == 10001, "{reply}");
        if reply["code"] == 10001 {
            dropped = true;
            break;
        }
        if i % 50 == 0 {
            talker.send(json!({"cmd": 11, "chatType": 2, "to": "friend", "content": "still here"})).await?;
            talker.recv_cmd(12).await?;
            assert_eq!(friend.recv_cmd(11).await?["data"]["content"], "still here");
        }
    }
    assert!(dropped, "the node went on queueing for a client that never reads");
    let _ = deaf.write_raw(b"").await;
    node_is_fine(&n).await
}

/// Random and mutated frames against a live node: it never falls over, and a well-formed client
/// on the same node keeps being served.
#[tokio::test]
async fn random_and_mutated_frames_never_break_the_node() -> anyhow::Result<()> {
    let n = node().await;
    let mut witness = n.tcp_login("witness").await?;
    let valid = schema::frame::encode_request(11, None, br#"{"cmd":11,"chatType":2,"to":"witness","content":"x"}"#);
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = (proptest::collection::vec(any::<u8>(), 0..64), 0usize..valid.len(), any::<u8>(), any::<bool>());
    let mut inputs = Vec::new();
    for _ in 0..64 {
        let (random, at, byte, mutate) = strategy.new_tree(&mut runner).map_err(|e| anyhow::anyhow!("{e}"))?.current();
        let bytes = if mutate {
            let mut v = valid.clone();
            v[at] = byte;
            v
        } else {
            let mut v = vec![0x01];
            v.extend(random);
            v
        };
        inputs.push(bytes);
    }
    for bytes in inputs {
        let mut c = n.tcp().await?;
        c.send(json!({"cmd": 5, "userId": "fuzz", "password": "pw"})).await?;
        c.recv_cmd(6).await?;
        c.write_raw(&bytes).await?;
        // Whatever the node answers (or whether it closes), it must keep serving others.
        let _ = tokio::time::timeout(Duration::from_millis(100), c.recv()).await;
    }
    witness.send(json!({"cmd": 13})).await?;
    witness.recv_cmd(13).await?;
    node_is_fine(&n).await
}

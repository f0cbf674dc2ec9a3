//! QUIC with ALPN kefu/1 (quinn as the client): J-IM binary framing on bidirectional streams,
//! chat with a TCP user, connection migration, token resume, and bad input.

use std::time::Duration;

use serde_json::json;
use tests::{quic_connect, quic_stream, Client, TestNode};

use crate::{bin, node};

#[tokio::test]
async fn quic_user_chats_with_tcp_user() -> anyhow::Result<()> {
    let n = node().await;
    let (_endpoint, conn) = quic_connect(n.quic, &[b"kefu/1"], n.self_signed_cert()?).await?;
    let mut mobile = quic_stream(&conn).await?;
    mobile.login("mobile", "pw").await?;
    let mut desk = n.tcp_login("desk").await?;
    assert_eq!(mobile.chat(json!({"chatType": 2, "to": "desk", "content": "from the phone"})).await?["code"], 10000);
    assert_eq!(desk.recv_cmd(11).await?["data"]["content"], "from the phone");
    desk.chat(json!({"chatType": 2, "to": "mobile", "content": "pushed on the stream"})).await?;
    assert_eq!(mobile.recv_cmd(11).await?["data"]["content"], "pushed on the stream");
    let metrics = reqwest::get(format!("http://{}/metrics", n.admin)).await?.text().await?;
    assert!(metrics.contains("kefu_connections{transport=\"quic\"} 1"), "{metrics}");
    Ok(())
}

#[tokio::test]
async fn session_survives_connection_migration() -> anyhow::Result<()> {
    let n = node().await;
    let (endpoint, conn) = quic_connect(n.quic, &[b"kefu/1"], n.self_signed_cert()?).await?;
    let mut mobile = quic_stream(&conn).await?;
    mobile.login("roamer", "pw").await?;
    let mut desk = n.tcp_login("desk2").await?;
    let before = endpoint.local_addr()?;
    // The phone moves to another network: a new local UDP socket, same connection.
    endpoint.rebind(std::net::UdpSocket::bind("127.0.0.1:0")?)?;
    assert_ne!(endpoint.local_addr()?, before);
    mobile.send(json!({"cmd": 13})).await?;
    mobile.recv_cmd(13).await?;
    desk.chat(json!({"chatType": 2, "to": "roamer", "content": "after the move"})).await?;
    assert_eq!(mobile.recv_cmd(11).await?["data"]["content"], "after the move");
    Ok(())
}

#[tokio::test]
async fn reconnect_with_token_gets_missed_messages_once() -> anyhow::Result<()> {
    let n = node().await;
    let cert = n.self_signed_cert()?;
    let (endpoint, conn) = quic_connect(n.quic, &[b"kefu/1"], cert.clone()).await?;
    let mut mobile = quic_stream(&conn).await?;
    let token = mobile.login("sleeper", "pw").await?["data"]["token"].as_str().unwrap().to_string();
    conn.close(0u32.into(), b"tunnel");
    endpoint.wait_idle().await;
    let mut desk = n.tcp_login("desk3").await?;
    for i in 0..3 {
        let reply = desk.chat(json!({"chatType": 2, "to": "sleeper", "content": format!("missed {i}")})).await?;
        assert_eq!(reply["code"], 10001, "the phone is offline");
    }
    // A new connection from a new address, resumed with the token: no password.
    let (_endpoint2, conn2) = quic_connect(n.quic, &[b"kefu/1"], cert).await?;
    let mut resumed = quic_stream(&conn2).await?;
    resumed.send(json!({"cmd": 5, "token": token})).await?;
    assert_eq!(resumed.recv_cmd(6).await?["code"], 10007);
    resumed.send(json!({"cmd": 19, "type": 0})).await?;
    let missed: Vec<String> = resumed.recv_cmd(20).await?["data"]["friends"]["desk3"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(missed, ["missed 0", "missed 1", "missed 2"], "in order");
    resumed.send(json!({"cmd": 19, "type": 0})).await?;
    assert_eq!(resumed.recv_cmd(20).await?["data"]["friends"], json!({}), "exactly once");
    Ok(())
}

#[tokio::test]
async fn bad_input_on_quic_streams() -> anyhow::Result<()> {
    let n = TestNode::builder(bin()).arg("--heartbeat-timeout", 1).start().await?;
    let cert = n.self_signed_cert()?;
    // Garbage on the control stream: an error frame, then the stream ends.
    let (_e1, conn) = quic_connect(n.quic, &[b"kefu/1"], cert.clone()).await?;
    let mut garbage = quic_stream(&conn).await?;
    garbage.write_raw(&[0x01, 0x00, 0x63, 0, 0, 0, 2, b'{', b'}']).await?;
    let (cmd, reply) = garbage.recv_frame().await?;
    assert_eq!((cmd, reply["code"].as_u64()), (0, Some(10014)));
    garbage.closed().await?;
    // A stream opened that never sends a full frame is closed by the idle timeout.
    let mut silent = quic_stream(&conn).await?;
    silent.write_raw(&[0x01]).await?;
    assert_eq!(silent.recv_frame().await?.1["code"], 11011);
    // A forged resume token: login refused, stream closed.
    let mut forged = quic_stream(&conn).await?;
    forged.send(json!({"cmd": 5, "token": "v1.Zm9yZ2Vk.9999999999.bm90LWEtc2lnbmF0dXJl"})).await?;
    assert_eq!(forged.recv_cmd(6).await?["code"], 10008);
    forged.closed().await?;
    // A wrong ALPN is refused in the handshake.
    assert!(quic_connect(n.quic, &[b"h9"], cert).await.is_err());
    Ok(())
}

#[tokio::test]
async fn stream_limit_holds_and_others_are_served() -> anyhow::Result<()> {
    let n = node().await;
    let cert = n.self_signed_cert()?;
    // A client opening many streams is held to the limit (16): no stream ever finishes here, so
    // no credit comes back and the 17th open never completes.
    let (_e2, greedy) = quic_connect(n.quic, &[b"kefu/1"], cert.clone()).await?;
    let mut opened = Vec::new();
    for _ in 0..64 {
        match tokio::time::timeout(Duration::from_millis(300), greedy.open_bi()).await {
            Ok(Ok((mut send, recv))) => {
                send.write_all(&schema::frame::encode_request(13, None, b"{}")).await?;
                opened.push((send, recv)); // kept open: credit only returns when streams end
            }
            _ => break,
        }
    }
    assert_eq!(opened.len(), 16);
    let (_e3, fine) = quic_connect(n.quic, &[b"kefu/1"], cert).await?;
    let mut fine = quic_stream(&fine).await?;
    fine.login("fine", "pw").await?;
    Ok(())
}

#[tokio::test]
async fn typing_indicators_travel_as_datagrams() -> anyhow::Result<()> {
    let n = node().await;
    let (_endpoint, conn) = quic_connect(n.quic, &[b"kefu/1"], n.self_signed_cert()?).await?;
    let mut mobile = quic_stream(&conn).await?;
    mobile.login("typist", "pw").await?;
    let mut desk = n.tcp_login("reader").await?;
    assert!(conn.max_datagram_size().is_some(), "the node offers datagrams");
    // Phone → desk: a typing frame in a datagram. Datagrams may be lost, so resend (bounded).
    let typing = schema::frame::encode_request(100, None, json!({"cmd": 100, "to": "reader"}).to_string().as_bytes());
    let mut got = None;
    for _ in 0..25 {
        conn.send_datagram(typing.clone().into())?;
        if let Ok(Ok(v)) = tokio::time::timeout(Duration::from_millis(200), desk.recv_cmd(100)).await {
            got = Some(v);
            break;
        }
    }
    let got = got.expect("a typing datagram arrived within 25 tries");
    assert_eq!(got["data"]["from"], "typist");
    // Desk → phone: the push arrives as a datagram, not on the stream.
    desk.send(json!({"cmd": 100, "to": "typist"})).await?;
    let datagram = tokio::time::timeout(Duration::from_secs(5), conn.read_datagram()).await??;
    let mut buf = bytes::BytesMut::from(&datagram[..]);
    let frame = schema::frame::decode(&mut buf, 4096)?.unwrap();
    assert_eq!(frame.cmd, schema::Command::TypingStart);
    let body: serde_json::Value = serde_json::from_slice(&frame.body)?;
    assert_eq!(body["data"]["from"], "reader");
    // Chat still flows on the stream.
    desk.chat(json!({"chatType": 2, "to": "typist", "content": "done typing?"})).await?;
    assert_eq!(mobile.recv_cmd(11).await?["data"]["content"], "done typing?");
    Ok(())
}

#[tokio::test]
async fn resume_in_zero_rtt_then_chat_after_the_handshake() -> anyhow::Result<()> {
    let n = node().await;
    let config = tests::quic_client_config(&[b"kefu/1"], n.self_signed_cert()?)?;
    let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
    endpoint.set_default_client_config(config);
    // First visit: a full handshake, a login, a session ticket.
    let conn = endpoint.connect(n.quic, "localhost")?.await?;
    let mut phone = quic_stream(&conn).await?;
    let token = phone.login("early", "pw").await?["data"]["token"].as_str().unwrap().to_string();
    phone.send(json!({"cmd": 13})).await?;
    phone.recv_cmd(13).await?;
    conn.close(0u32.into(), b"bye");
    let mut desk = n.tcp_login("desk4").await?;
    // Second visit: the token login and a chat are sent before the handshake completes.
    let (conn, accepted) = endpoint.connect(n.quic, "localhost")?.into_0rtt().map_err(|_| anyhow::anyhow!("no 0-RTT ticket"))?;
    let (send, recv) = conn.open_bi().await?;
    let mut phone = tests::TcpClient::over(tokio::io::join(recv, send));
    phone.send(json!({"cmd": 5, "token": token})).await?;
    phone.send(json!({"cmd": 11, "chatType": 2, "to": "desk4", "content": "sent early"})).await?;
    assert!(accepted.await, "the node accepted 0-RTT");
    assert_eq!(phone.recv_cmd(6).await?["code"], 10007);
    assert_eq!(phone.recv_cmd(12).await?["code"], 10000);
    assert_eq!(desk.recv_cmd(11).await?["data"]["content"], "sent early");
    Ok(())
}

//! Limits that hold for every request (issue: production profile §5–§6): the login queue's busy
//! answer, history page and offset caps, the per-connection read limit, the HTTP API's per-IP
//! limit, the per-IP connection cap, and kicks that reach every node.

use std::time::Duration;

use serde_json::{json, Value};
use tests::cluster::Cluster;
use tests::{Client, TcpClient, TestNode};

use crate::bin;

#[tokio::test]
async fn logins_past_the_queue_are_answered_busy_and_succeed_when_retried() -> anyhow::Result<()> {
    // One waiting place: a burst of new users' logins (each a hash at the default cost) overflows.
    let n = TestNode::builder(bin()).arg("--login-queue", 1).start().await?;
    let mut logins = Vec::new();
    for i in 0..12 {
        let addr = n.jim;
        logins.push(tokio::spawn(async move {
            let mut busy = 0;
            loop {
                let mut c = TcpClient::connect(addr).await?;
                c.send(json!({"cmd": 5, "userId": format!("burst{i}"), "password": "pw"})).await?;
                let reply = c.recv_cmd(6).await?;
                match reply["code"].as_u64() {
                    Some(10007) => return Ok::<_, anyhow::Error>(busy),
                    Some(11015) => {
                        assert!(reply["msg"].as_str().unwrap().starts_with("busy"), "{reply}");
                        busy += 1;
                        anyhow::ensure!(busy < 1000, "never got in");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    _ => anyhow::bail!("unexpected {reply}"),
                }
            }
        }));
    }
    let mut busy = 0;
    for l in logins {
        busy += l.await??;
    }
    assert!(busy > 0, "a full queue answers busy instead of waiting");
    Ok(())
}

#[tokio::test]
async fn history_pages_and_offsets_are_capped_and_reads_are_rate_limited() -> anyhow::Result<()> {
    let n = TestNode::builder(bin())
        .arg("--history-max", 5)
        .arg("--history-max-offset", 20)
        .arg("--read-rate", 1)
        .arg("--read-burst", 3)
        .start()
        .await?;
    let mut a = n.tcp_login("hist-a").await?;
    for i in 0..8 {
        a.chat(json!({"chatType": 2, "to": "hist-b", "content": format!("m{i}")})).await?;
    }
    a.clear_backlog();
    a.send(json!({"cmd": 19, "type": 1, "userId": "hist-a", "fromUserId": "hist-b", "count": 50})).await?;
    let page = a.recv_cmd(20).await?;
    assert_eq!(page["data"]["friends"]["hist-b"].as_array().map(Vec::len), Some(5), "count capped: {page}");
    a.send(json!({"cmd": 19, "type": 1, "userId": "hist-a", "fromUserId": "hist-b", "offset": 21})).await?;
    assert_eq!(a.recv_cmd(20).await?["code"], 10020, "offset bounded");
    // Three reads are the burst; the fourth in the same second is limited, a chat is not.
    a.send(json!({"cmd": 17, "userId": "hist-a", "type": 0})).await?;
    assert_ne!(a.recv_cmd(18).await?["code"], 11004, "the third read");
    a.send(json!({"cmd": 17, "userId": "hist-a", "type": 0})).await?;
    assert_eq!(a.recv_cmd(18).await?["code"], 11004);
    let chat = a.chat(json!({"chatType": 2, "to": "hist-b", "content": "still fine"})).await?;
    assert_eq!(chat["code"], 10001);
    // The HTTP page is capped the same way.
    let v1: Value = reqwest::get(format!("{}/v1/conversations/p:hist-a:hist-b/messages?limit=50", n.http())).await?.json().await?;
    assert_eq!(v1["messages"].as_array().map(Vec::len), Some(5));
    Ok(())
}

#[tokio::test]
async fn the_http_api_is_limited_per_ip_and_connections_per_ip_are_capped() -> anyhow::Result<()> {
    let n = TestNode::builder(bin()).arg("--api-rate", 2).arg("--max-conns-per-ip", 2).start().await?;
    let http = reqwest::Client::new();
    let mut codes = Vec::new();
    for _ in 0..8 {
        let r = http.get(format!("{}/v1/presence", n.http())).send().await?;
        codes.push(r.status().as_u16());
        if r.status() == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
            assert_eq!(r.json::<Value>().await?["code"], 11004);
        }
    }
    assert_eq!(&codes[..4], [200, 200, 200, 200], "a burst of twice the rate: {codes:?}");
    assert!(codes[4..].contains(&429), "{codes:?}");
    // reqwest keeps one connection; drop it so the cap counts only the clients below.
    drop(http);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (_one, _two) = loop {
        // The HTTP connection above may take a moment to be closed on the node's side.
        if let (Ok(one), Ok(two)) = (n.tcp_login("cap1").await, n.tcp_login("cap2").await) {
            break (one, two);
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "two connections were never admitted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut third = n.tcp().await?;
    third.send(json!({"cmd": 13})).await.ok();
    third.closed().await?;
    Ok(())
}

#[tokio::test]
async fn a_kick_closes_the_users_sessions_on_every_node() -> anyhow::Result<()> {
    let c = Cluster::start(bin(), &crate::cluster::REGIONS, &[]).await?;
    let mut at_fra = c.node(1).tcp_login("kicked").await?;
    let mut at_sin = c.node(2).tcp_login("kicked").await?;
    // /api/user/close at iad reaches the sessions at fra and sin.
    let closed: Value = reqwest::get(format!("{}/api/user/close?userid=kicked", c.node(0).http())).await?.json().await?;
    assert_eq!(closed["code"], 10021);
    for s in [&mut at_fra, &mut at_sin] {
        assert_eq!(tokio::time::timeout(Duration::from_secs(10), s.recv_cmd(14)).await??["code"], 10021);
        s.closed().await?;
    }
    Ok(())
}

#[tokio::test]
async fn callers_with_the_api_key_are_limited_per_key_and_the_others_per_ip() -> anyhow::Result<()> {
    // --api-rate 1: two a second (burst 2) per IP without the key, ten times that with it.
    let n = TestNode::builder(bin()).arg("--profile", "prod").arg("--api-key", "0123456789abcdef").arg("--api-rate", 1).start().await?;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/presence", n.http());
    let mut with_key = Vec::new();
    for _ in 0..60 {
        with_key.push(http.get(&url).header("x-api-key", "0123456789abcdef").send().await?.status().as_u16());
    }
    assert!(with_key[..20].iter().all(|c| *c == 200), "the key's burst is 20: {with_key:?}");
    assert!(with_key[20..].contains(&429), "{with_key:?}");
    // A caller guessing the key has the per-IP budget, and is told 429 once it is spent.
    let mut guesses = Vec::new();
    for _ in 0..6 {
        guesses.push(http.get(&url).header("x-api-key", "wrong").send().await?.status().as_u16());
    }
    assert_eq!(&guesses[..2], [401, 401], "{guesses:?}");
    assert!(guesses[2..].contains(&429), "{guesses:?}");
    Ok(())
}

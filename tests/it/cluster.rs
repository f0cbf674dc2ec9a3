//! Several nodes in several regions as one service (issue 5): cross-node chat and presence,
//! roaming, the owner killed under load, a partition healed under load, a new node catching up.
//! Every cluster is real node processes on loopback, linked through the harness's UDP relays.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{json, Value};
use tests::cluster::Cluster;
use tests::{eventually, Client};

use crate::bin;

pub const REGIONS: [(&str, &str); 3] = [("iad-1", "iad"), ("fra-1", "fra"), ("sin-1", "sin")];

async fn three() -> Cluster {
    Cluster::start(bin(), &REGIONS, &[]).await.expect("cluster starts")
}

/// The users `node` reports online, through `/v1/presence`.
async fn online_at(c: &Cluster, i: usize) -> HashSet<String> {
    let Ok(r) = reqwest::get(format!("{}/v1/presence", c.node(i).http())).await else { return HashSet::new() };
    let Ok(v) = r.json::<Value>().await else { return HashSet::new() };
    v["online"].as_array().map(|a| a.iter().filter_map(|u| u.as_str().map(str::to_string)).collect()).unwrap_or_default()
}

/// The user a join (cmd 9, flat) or exit (cmd 10, under `data`) notice is about.
fn notice_user(notice: &Value) -> Option<&str> {
    notice["user"]["userId"].as_str().or_else(|| notice["data"]["user"]["userId"].as_str())
}

#[tokio::test]
async fn cross_node_chat_presence_typing_and_recall() -> anyhow::Result<()> {
    let c = three().await;
    let mut alice = c.node(0).tcp_login("alice").await?;
    let mut bob = c.node(1).ws_login("bob").await?;
    let mut carol = c.node(2).tcp_login("carol").await?;
    // J-IM's join notice of group 100 reaches members at the other nodes.
    loop {
        let notice = alice.recv_cmd(9).await?;
        if notice_user(&notice) == Some("carol") {
            break;
        }
    }

    // Presence converges on every node within 2 s.
    let everyone: HashSet<String> = ["alice", "bob", "carol"].map(String::from).into();
    for i in 0..3 {
        eventually(Duration::from_secs(2), || async { (online_at(&c, i).await == everyone).then_some(()) }).await?;
    }
    // cmd 17 at iad sees bob (at fra) online.
    alice.send(json!({"cmd": 17, "userId": "bob", "type": 0})).await?;
    assert_eq!(alice.recv_cmd(18).await?["data"]["status"], "online");

    // Private chat across nodes, both ways.
    let ack = alice.chat(json!({"chatType": 2, "to": "bob", "content": "hello from iad", "id": "a1"})).await?;
    assert_eq!(ack["code"], 10000, "bob is online at another node: {ack}");
    let got = bob.recv_cmd(11).await?;
    assert_eq!((got["data"]["content"].as_str(), got["data"]["from"].as_str()), (Some("hello from iad"), Some("alice")));
    let ack = bob.chat(json!({"chatType": 2, "to": "alice", "content": "hi from fra"})).await?;
    assert_eq!(ack["code"], 10000);
    assert_eq!(alice.recv_cmd(11).await?["data"]["content"], "hi from fra");

    // Group chat: every member, wherever connected, gets it once; the sender's echo too.
    let ack = carol.chat(json!({"chatType": 1, "groupId": "100", "content": "group from sin"})).await?;
    assert_eq!(ack["code"], 10000);
    let seq = ack["data"]["seq"].as_u64().unwrap();
    let got = [alice.recv_cmd(11).await?, bob.recv_cmd(11).await?, carol.recv_cmd(11).await?];
    for m in got {
        assert_eq!((m["data"]["content"].as_str(), m["data"]["seq"].as_u64()), (Some("group from sin"), Some(seq)), "{m}");
    }

    // Typing and a read receipt cross nodes.
    alice.send(json!({"cmd": 100, "chatType": 2, "to": "bob"})).await?;
    assert_eq!(bob.recv_cmd(100).await?["data"]["from"], "alice");
    bob.send(json!({"cmd": 103, "chatType": 2, "to": "alice", "seq": 1})).await?;
    assert_eq!(alice.recv_cmd(103).await?["data"]["from"], "bob");

    // Recall at iad of a group message: the members at fra and sin are told.
    let sent = alice.chat(json!({"chatType": 1, "groupId": "100", "content": "oops"})).await?;
    let id = sent["data"]["id"].as_str().unwrap().to_string();
    assert_eq!(bob.recv_cmd(11).await?["data"]["content"], "oops");
    assert_eq!(carol.recv_cmd(11).await?["data"]["content"], "oops");
    // The message must reach iad's replica before iad can recall it (it may be owned elsewhere).
    eventually(Duration::from_secs(5), || async {
        let ms = c.messages(0, "g:100").await.ok()?;
        ms.iter().any(|m| m["id"] == id.as_str()).then_some(())
    })
    .await?;
    alice.send(json!({"cmd": 15, "id": id})).await?;
    assert_eq!(alice.recv_cmd(16).await?["code"], 10000);
    assert_eq!(bob.recv_cmd(16).await?["data"]["id"], id.as_str());
    assert_eq!(carol.recv_cmd(16).await?["data"]["id"], id.as_str());
    // ... and the recall replicates: every node's copy is recalled.
    for i in 0..3 {
        eventually(Duration::from_secs(5), || async {
            let ms = c.messages(i, "g:100").await.ok()?;
            ms.iter().any(|m| m["id"] == id.as_str() && m["recalled"] == true).then_some(())
        })
        .await?;
    }

    // Some of those sends were sequenced by a node other than the sender's (forwarded).
    let mut forwarded = 0.0;
    for i in 0..3 {
        forwarded += c.metric(i, "kefu_mesh_forwarded_total").await?;
    }
    assert!(forwarded > 0.0, "no send was forwarded to its owner");

    // bob leaves: the others see it within 2 s, and group members elsewhere get the exit notice.
    bob.send(json!({"cmd": 14})).await?;
    loop {
        let notice = carol.recv_cmd(10).await?;
        if notice_user(&notice) == Some("bob") {
            break;
        }
    }
    for i in [0, 2] {
        eventually(Duration::from_secs(2), || async { (!online_at(&c, i).await.contains("bob")).then_some(()) }).await?;
    }
    Ok(())
}

#[tokio::test]
async fn roaming_user_gets_offline_messages_once_and_the_same_history() -> anyhow::Result<()> {
    let c = three().await;
    // dave registers at iad and goes offline.
    let mut dave = c.node(0).tcp_login("dave").await?;
    dave.send(json!({"cmd": 14})).await?;
    dave.closed().await?;
    let mut erin = c.node(0).tcp_login("erin").await?;
    let mut ids = Vec::new();
    for i in 0..5 {
        let ack = erin.chat(json!({"chatType": 2, "to": "dave", "content": format!("p{i}")})).await?;
        assert_eq!(ack["code"], 10001, "dave is offline everywhere: {ack}");
        ids.push(ack["data"]["id"].as_str().unwrap().to_string());
    }
    for i in 0..3 {
        assert_eq!(erin.chat(json!({"chatType": 1, "groupId": "100", "content": format!("g{i}")})).await?["code"], 10000);
    }
    // The user record and the messages reach sin.
    eventually(Duration::from_secs(5), || async {
        let ok = reqwest::get(format!("{}/v1/users/dave", c.node(2).http())).await.ok()?.status() == 200;
        (ok && c.messages(2, "p:dave:erin").await.ok()?.len() == 5).then_some(())
    })
    .await?;

    // dave logs in at sin with the password he registered with at iad.
    let mut roamer = c.node(2).ws_login("dave").await?;
    roamer.send(json!({"cmd": 19, "type": 0, "userId": "dave"})).await?;
    let offline = roamer.recv_cmd(20).await?;
    let private: Vec<String> =
        offline["data"]["friends"]["erin"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(private, ids, "each private message once, in order");
    let group: Vec<&str> = offline["data"]["groups"]["100"].as_array().unwrap().iter().map(|m| m["content"].as_str().unwrap()).collect();
    assert_eq!(group, ["g0", "g1", "g2"]);
    roamer.send(json!({"cmd": 19, "type": 0, "userId": "dave"})).await?;
    assert_eq!(roamer.recv_cmd(20).await?["data"]["friends"], json!({}), "not offered twice");

    // History at sin matches iad's.
    roamer.send(json!({"cmd": 19, "type": 1, "userId": "dave", "fromUserId": "erin"})).await?;
    let history = roamer.recv_cmd(20).await?;
    let at_sin: Vec<(u64, String)> = history["data"]["friends"]["erin"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["seq"].as_u64().unwrap(), m["id"].as_str().unwrap().to_string()))
        .collect();
    let at_iad: Vec<(u64, String)> =
        c.messages(0, "p:dave:erin").await?.iter().map(|m| (m["seq"].as_u64().unwrap(), m["id"].as_str().unwrap().to_string())).collect();
    assert_eq!(at_sin, at_iad);

    // The cursor moved at sin replicates: once fra has applied everything sin wrote, logging in
    // at fra offers nothing again.
    c.caught_up(Duration::from_secs(10)).await?;
    let mut third = c.node(1).tcp_login("dave").await?;
    third.send(json!({"cmd": 19, "type": 0, "userId": "dave"})).await?;
    let again = third.recv_cmd(20).await?;
    assert_eq!(
        (again["data"]["friends"].clone(), again["data"]["groups"].clone()),
        (json!({}), json!({})),
        "read in sin, not offered in fra"
    );
    Ok(())
}

#[tokio::test]
async fn a_replica_behind_what_the_user_has_seen_fetches_the_gap_from_the_owner() -> anyhow::Result<()> {
    let c = three().await;
    // erin's conversation with frank is owned by iad (0); frank is online at fra (1) and then
    // asks at sin (2), whose link to iad is slow: the cursor moved at fra reaches sin before the
    // messages from iad do.
    let frank = c.user_owned_by("frank", "erin", 0);
    let mut erin = c.node(0).tcp_login("erin").await?;
    let mut at_fra = c.node(1).tcp_login(&frank).await?;
    let mut at_sin = c.node(2).tcp_login(&frank).await?;
    // frank's presence reaches iad (a delta every 100 ms) before the slow link is set up.
    eventually(Duration::from_secs(5), || async { online_at(&c, 0).await.contains(&frank).then_some(()) }).await?;
    c.link(2, 0, tests::cluster::LinkSettings { delay: Duration::from_millis(900), ..Default::default() });
    let ack = erin.chat(json!({"chatType": 2, "to": frank, "content": "seen at fra"})).await?;
    assert_eq!(ack["code"], 10000);
    let seq = ack["data"]["seq"].as_u64().unwrap();
    assert_eq!(at_fra.recv_cmd(11).await?["data"]["seq"], seq);
    // fra's cursor moves (a read receipt, committed before erin is told of it) and reaches sin,
    // while iad's copy of the message is still on its slow way there.
    at_fra.send(json!({"cmd": 103, "chatType": 2, "to": "erin", "seq": seq})).await?;
    erin.recv_cmd(103).await?;
    eventually(Duration::from_secs(5), || async {
        let head = c.metric(1, "kefu_store_head_revision").await.ok()?;
        (c.metric_line(2, "kefu_mesh_applied_revision{peer=\"fra-1\"}").await.ok()? >= head).then_some(())
    })
    .await?;
    at_sin.send(json!({"cmd": 19, "type": 1, "userId": frank, "fromUserId": "erin"})).await?;
    let history = at_sin.recv_cmd(20).await?;
    let seqs: Vec<u64> =
        history["data"]["friends"]["erin"].as_array().map(|a| a.iter().filter_map(|m| m["seq"].as_u64()).collect()).unwrap_or_default();
    assert_eq!(seqs, vec![seq], "sin answered with what frank has already seen");
    Ok(())
}

/// What one sender got acknowledged: (client id, server id, seq), and how many retryable answers.
#[derive(Default)]
struct Sent {
    acked: Vec<(String, String, u64)>,
    retryable: usize,
}

/// Sends `count` group messages from `user`, `pace` apart, each with a client id, resending on
/// the retryable status until it is acknowledged. Bounded: gives up after `within`.
async fn send_load(
    mut client: tests::TcpClient,
    user: String,
    group: &'static str,
    count: usize,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pace: Duration,
    within: Duration,
) -> anyhow::Result<Sent> {
    let deadline = tokio::time::Instant::now() + within;
    let mut sent = Sent::default();
    for k in 0..count {
        let client_id = format!("{user}-{k}");
        loop {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "{user}: message {k} not acknowledged in time");
            client.send(json!({"cmd": 11, "chatType": 1, "groupId": group, "content": format!("m{k}"), "id": client_id})).await?;
            let reply = tokio::time::timeout(Duration::from_secs(10), client.recv_cmd(12)).await??;
            match reply["code"].as_u64() {
                Some(10000) => {
                    let d = &reply["data"];
                    sent.acked.push((client_id.clone(), d["id"].as_str().unwrap().to_string(), d["seq"].as_u64().unwrap()));
                    acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    break;
                }
                Some(11007) => {
                    sent.retryable += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => anyhow::bail!("{user}: unexpected reply {reply}"),
            }
        }
        // Drop the pushes of the group traffic this sender is not checking.
        client.clear_backlog();
        tokio::time::sleep(pace).await;
    }
    Ok(sent)
}

/// Every node has every acknowledged message, all nodes hold the same (seq, id) sequence, seqs
/// run 1..n without a gap, and no client id was stored twice.
async fn converged(c: &Cluster, conv: &str, acked: &[(String, String, u64)]) -> anyhow::Result<()> {
    let want: HashSet<&str> = acked.iter().map(|(_, id, _)| id.as_str()).collect();
    for i in 0..c.nodes.len() {
        eventually(Duration::from_secs(30), || async {
            let have: HashSet<String> =
                c.messages(i, conv).await.ok()?.iter().filter_map(|m| m["id"].as_str().map(str::to_string)).collect();
            want.iter().all(|id| have.contains(*id)).then_some(())
        })
        .await
        .map_err(|e| anyhow::anyhow!("node {} is missing acknowledged messages: {e}", c.nodes[i].id))?;
    }
    // Once every node has everything every other wrote, every copy must be the same.
    c.caught_up(Duration::from_secs(30)).await?;
    let reference: Vec<(u64, String, String)> = c
        .messages(0, conv)
        .await?
        .iter()
        .map(|m| (m["seq"].as_u64().unwrap(), m["id"].as_str().unwrap().to_string(), m["clientId"].as_str().unwrap_or("").to_string()))
        .collect();
    for i in 1..c.nodes.len() {
        let other: Vec<(u64, String, String)> = c
            .messages(i, conv)
            .await?
            .iter()
            .map(|m| (m["seq"].as_u64().unwrap(), m["id"].as_str().unwrap().to_string(), m["clientId"].as_str().unwrap_or("").to_string()))
            .collect();
        assert_eq!(other, reference, "node {} holds another order", c.nodes[i].id);
    }
    let seqs: Vec<u64> = reference.iter().map(|(s, _, _)| *s).collect();
    assert_eq!(seqs, (1..=reference.len() as u64).collect::<Vec<_>>(), "one gap-free seq order");
    let client_ids: Vec<&str> = reference.iter().map(|(_, _, c)| c.as_str()).filter(|c| !c.is_empty()).collect();
    assert_eq!(client_ids.len(), client_ids.iter().collect::<HashSet<_>>().len(), "a client id stored twice");
    for (client_id, id, seq) in acked {
        let stored = &reference[(*seq - 1) as usize];
        assert_eq!((&stored.1, &stored.2), (id, client_id), "the acknowledged seq holds the acknowledged message");
    }
    Ok(())
}

#[tokio::test]
async fn owner_killed_under_load_loses_nothing_and_keeps_one_order() -> anyhow::Result<()> {
    let mut c = three().await;
    let owner = c.owner_of("g:100");
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Everyone logs in before anyone sends (see the partition test below).
    let mut clients = Vec::new();
    for i in (0..3).filter(|i| *i != owner) {
        for s in 0..2 {
            let user = format!("load{i}x{s}");
            clients.push((c.node(i).tcp_login(&user).await?, user));
        }
    }
    let mut senders = Vec::new();
    for (client, user) in clients {
        senders.push(tokio::spawn(send_load(client, user, "100", 60, acked.clone(), Duration::from_millis(10), Duration::from_secs(90))));
    }
    eventually(Duration::from_secs(30), || async { (acked.load(std::sync::atomic::Ordering::Relaxed) >= 40).then_some(()) }).await?;
    c.kill(owner).await?;
    // Down long enough for the others to notice (suspect after three missed beats).
    let other = (owner + 1) % 3;
    eventually(Duration::from_secs(10), || async { (c.metric(other, "kefu_mesh_peer_up").await.ok()? < 2.0).then_some(()) }).await?;
    c.restart(owner).await?;
    let mut all = Vec::new();
    let mut retryable = 0;
    for s in senders {
        let sent = s.await??;
        retryable += sent.retryable;
        all.extend(sent.acked);
    }
    assert_eq!(all.len(), 240);
    assert!(retryable > 0, "sends while the owner was down were answered retryable");
    c.wait_ready(Duration::from_secs(30)).await?;
    converged(&c, "g:100", &all).await
}

#[tokio::test]
async fn a_client_id_is_per_conversation_across_nodes() -> anyhow::Result<()> {
    let c = three().await;
    let mut alice = c.node(0).tcp_login("kalice").await?;
    let mut bob = c.node(1).tcp_login("kbob").await?;
    let mut carol = c.node(2).tcp_login("kcarol").await?;
    let to_bob = alice.chat(json!({"chatType": 2, "to": "kbob", "content": "hi bob", "id": "k1"})).await?;
    let to_carol = alice.chat(json!({"chatType": 2, "to": "kcarol", "content": "hi carol", "id": "k1"})).await?;
    // 10001: stored, and the recipient not yet seen online here (presence travels every 100 ms).
    assert!(to_carol["code"] == 10000 || to_carol["code"] == 10001, "{to_carol}");
    assert_eq!(to_carol["data"]["conversation"], "p:kalice:kcarol");
    assert_ne!(to_carol["data"]["id"], to_bob["data"]["id"]);
    assert_eq!(bob.recv_cmd(11).await?["data"]["content"], "hi bob");
    assert_eq!(carol.recv_cmd(11).await?["data"]["content"], "hi carol");
    // A retry of the carol message sent from another node is still the first copy.
    let mut elsewhere = c.node(1).tcp_login("kalice").await?;
    let again = elsewhere.chat(json!({"chatType": 2, "to": "kcarol", "content": "hi carol", "id": "k1"})).await?;
    assert_eq!(again["data"], to_carol["data"]);
    // Every node stores both, once each.
    for i in 0..3 {
        for (conv, content) in [("p:kalice:kbob", "hi bob"), ("p:kalice:kcarol", "hi carol")] {
            eventually(Duration::from_secs(10), || async {
                let have = c.messages(i, conv).await.ok()?;
                (have.len() == 1 && have[0]["content"] == content).then_some(())
            })
            .await?;
        }
    }
    Ok(())
}

#[tokio::test]
async fn partition_under_load_heals_without_loss_and_cut_off_sends_are_retryable() -> anyhow::Result<()> {
    let c = three().await;
    let owner = c.owner_of("g:100");
    let cut = (owner + 1) % 3;
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Everyone logs in before anyone sends: a password login takes a second or more in a debug
    // build, and a sender that finished before the cut would be offline when it comes.
    let mut clients = Vec::new();
    for i in 0..3 {
        clients.push(c.node(i).tcp_login(&format!("part{i}")).await?);
    }
    let mut senders = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let load = send_load(client, format!("part{i}"), "100", 60, acked.clone(), Duration::from_millis(25), Duration::from_secs(90));
        senders.push((i, tokio::spawn(load)));
    }
    eventually(Duration::from_secs(30), || async { (acked.load(std::sync::atomic::Ordering::Relaxed) >= 20).then_some(()) }).await?;
    let region = c.nodes[cut].region.clone();
    let cut_user = format!("part{cut}");
    // Its presence reached the owner (a delta every 100 ms; the first acks can come sooner).
    eventually(Duration::from_secs(5), || async { online_at(&c, owner).await.contains(&cut_user).then_some(()) }).await?;
    c.partition(&region);
    // Once the cut-off node counts as down (3 s), its users are offline for the others.
    eventually(Duration::from_secs(6), || async { (!online_at(&c, owner).await.contains(&cut_user)).then_some(()) }).await?;
    // And the cut-off sender has met the retryable answer.
    eventually(Duration::from_secs(10), || async { (c.metric(cut, "kefu_mesh_forward_failures_total").await.ok()? >= 1.0).then_some(()) })
        .await?;
    c.heal(&region);
    // After the heal its presence comes back (a fresh snapshot).
    eventually(Duration::from_secs(8), || async { online_at(&c, owner).await.contains(&cut_user).then_some(()) }).await?;
    let mut all = Vec::new();
    for (i, s) in senders {
        let sent = s.await??;
        if i == cut {
            assert!(sent.retryable > 0, "sends from the cut-off region to the owner got the retryable status");
        }
        all.extend(sent.acked);
    }
    assert_eq!(all.len(), 180);
    converged(&c, "g:100", &all).await
}

#[tokio::test]
async fn a_new_node_with_an_empty_database_catches_up_before_it_is_ready() -> anyhow::Result<()> {
    let mut c = Cluster::configure(bin(), &REGIONS, &[("--peer-down-after", "1")]).await?;
    c.launch(0).await?;
    c.launch(1).await?;
    c.wait_ready(Duration::from_secs(30)).await?;
    // A group owned by one of the running nodes.
    let group: &'static str = ["100", "200", "300", "400", "500"].into_iter().find(|g| c.owner_of(&format!("g:{g}")) != 2).unwrap();
    let mut writer = c.node(0).tcp_login("writer").await?;
    join(&mut writer, group).await?;
    let mut ids = Vec::new();
    for i in 0..600 {
        // With peers counted down after 1 s, a loaded machine can time a forward out (11007):
        // resend with the same client id, as documented; the owner stores it once.
        let body = json!({"chatType": 1, "groupId": group, "content": format!("history {i}"), "id": format!("history-{i}")});
        let mut ack = writer.chat(body.clone()).await?;
        for _ in 0..20 {
            if ack["code"] != 11007 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            ack = writer.chat(body.clone()).await?;
        }
        assert_eq!(ack["code"], 10000, "{ack}");
        ids.push(ack["data"]["id"].as_str().unwrap().to_string());
        writer.clear_backlog();
    }
    c.launch(2).await?;
    // The first moment sin says it is ready, it has every message already.
    eventually(Duration::from_secs(30), || async { c.is_ready(2).await.then_some(()) }).await?;
    let have: Vec<String> = c.messages(2, &format!("g:{group}")).await?.iter().map(|m| m["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(have, ids, "ready before the catch-up was done");
    // The user who wrote them can log in there too: users and memberships came along.
    let mut again = c.node(2).tcp_login("writer").await?;
    again.send(json!({"cmd": 19, "type": 1, "userId": "writer", "groupId": group, "count": 5})).await?;
    assert_eq!(again.recv_cmd(20).await?["data"]["groups"][group].as_array().map(Vec::len), Some(5));
    // A member of a cluster still stops cleanly on SIGTERM.
    assert!(c.node_mut(2).terminate().await?, "SIGTERM exits cleanly");
    Ok(())
}

#[tokio::test]
async fn a_node_with_a_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let c = Cluster::start(bin(), &REGIONS[..2], &[]).await?;
    let iad_mesh = c.node(0).mesh.expect("mesh port");
    // A node that claims to be fra-1 but made its own CA (no --cluster-ca) dials iad directly.
    let rogue = tests::TestNode::builder(bin())
        .arg("--node-id", "fra-1")
        .arg("--region", "fra")
        .arg("--mesh-addr", "127.0.0.1:0")
        .arg("--peer", format!("iad-1@iad={iad_mesh}"))
        .start()
        .await?;
    refused_while_fra_stays(&c, &rogue).await
}

/// iad refuses the outsider's connection (the metric rises), its user never shows up at iad,
/// and the real fra-1 is still connected.
async fn refused_while_fra_stays(c: &Cluster, outsider: &tests::TestNode) -> anyhow::Result<()> {
    let _mallory = outsider.tcp_login("mallory").await?;
    eventually(Duration::from_secs(10), || async { (c.metric(0, "kefu_mesh_handshakes_refused_total").await.ok()? >= 1.0).then_some(()) })
        .await?;
    // bob's presence, which comes after mallory's attempt, reaches iad; mallory's never does.
    let _bob = c.node(1).tcp_login("bob").await?;
    eventually(Duration::from_secs(2), || async { online_at(c, 0).await.contains("bob").then_some(()) }).await?;
    assert!(!online_at(c, 0).await.contains("mallory"), "a node that is not what it claims got its presence in");
    Ok(())
}

#[tokio::test]
async fn prod_refuses_a_mesh_without_cluster_certificates() -> anyhow::Result<()> {
    let started = tests::TestNode::builder(bin())
        .arg("--profile", "prod")
        .arg("--api-key", "k")
        .arg("--mesh-addr", "127.0.0.1:0")
        .arg("--peer", "fra-1=127.0.0.1:9")
        .start()
        .await;
    assert!(started.is_err(), "prod started a mesh with keys it made itself");
    Ok(())
}

#[tokio::test]
async fn lossy_links_still_deliver_everything_in_order() -> anyhow::Result<()> {
    let c = three().await;
    let mut members = Vec::new();
    for (i, name) in ["lx", "ly", "lz"].iter().enumerate() {
        members.push(c.node(i).tcp_login(name).await?);
    }
    // 10 % of packets dropped on every link, both ways: QUIC's retransmission must hide it.
    c.all_links(tests::cluster::LinkSettings { drop: 0.10, ..Default::default() });
    let mut sent = Vec::new();
    for k in 0..60 {
        let from = k % 3;
        // A forward that lost too many packets in a row may time out (11007): resend with the
        // same client id, as documented; the owner stores it once.
        for attempt in 0..5 {
            let body = json!({"chatType": 1, "groupId": "100", "content": format!("lossy {k}"), "id": format!("loss-{k}")});
            let ack = members[from].chat(body).await?;
            if ack["code"] == 10000 {
                sent.push(ack["data"]["seq"].as_u64().unwrap());
                break;
            }
            assert!(ack["code"] == 11007 && attempt < 4, "{ack}");
        }
    }
    assert_eq!(sent.len(), 60);
    // Every member, at every node, got every acknowledged message once, in seq order.
    for m in &mut members {
        let mut got = Vec::new();
        while got.len() < sent.len() {
            let push = tokio::time::timeout(Duration::from_secs(20), m.recv_cmd(11)).await??;
            if push["data"]["content"].as_str().is_some_and(|c| c.starts_with("lossy")) {
                got.push(push["data"]["seq"].as_u64().unwrap());
            }
        }
        let mut want = sent.clone();
        want.sort_unstable();
        assert_eq!(got, want, "one order, nothing missing, nothing twice");
    }
    // Over every directed link (one link alone may carry too few packets to be sure to lose one).
    let (mut carried, mut dropped) = (0, 0);
    for (a, b) in [(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)] {
        let (cc, dd) = c.link_counts(a, b);
        carried += cc;
        dropped += dd;
    }
    assert!(dropped > 0 && carried > dropped, "the relays dropped packets: {carried} carried, {dropped} dropped");
    Ok(())
}

#[tokio::test]
async fn catch_up_of_large_messages_is_cut_into_frames_that_fit() -> anyhow::Result<()> {
    let mut c = Cluster::start(bin(), &REGIONS[..2], &[("--msg-rate", "1000"), ("--msg-burst", "1000")]).await?;
    let peer = c.user_owned_by("big", "sender", 0);
    let conv = schema::ConversationId::private("sender", &peer);
    let mut sender = c.node(0).tcp_login("sender").await?;
    // fra is down, so it will read them back from iad's database when it returns.
    c.kill(1).await?;
    // 12 messages of 1.5 MB: 18 MB, more than one mesh frame may carry (16 MiB).
    let big = "b".repeat(1_500_000);
    for _ in 0..12 {
        assert_eq!(sender.chat(json!({"chatType": 2, "to": peer, "content": big})).await?["code"], 10001);
    }
    c.restart(1).await?;
    eventually(Duration::from_secs(60), || async { (c.messages(1, conv.as_str()).await.ok()?.len() == 12).then_some(()) }).await?;
    Ok(())
}

/// Joins `group` and waits for that group's join notice (the login's notices of other groups may
/// already be waiting).
async fn join(client: &mut tests::TcpClient, group: &str) -> anyhow::Result<()> {
    client.send(json!({"cmd": 7, "groupId": group})).await?;
    loop {
        let notice = client.recv_cmd(9).await?;
        if notice["group"] == group || notice["data"]["group"] == group {
            return Ok(());
        }
    }
}

#[tokio::test]
async fn a_group_joined_at_one_node_works_for_the_same_user_at_another() -> anyhow::Result<()> {
    let c = Cluster::start(bin(), &REGIONS[..2], &[]).await?;
    let mut at_fra = c.node(1).tcp_login("gus").await?;
    let mut at_iad = c.node(0).tcp_login("gus").await?;
    join(&mut at_iad, "777").await?;
    // Once the membership has reached fra, gus's session there can send to the group and gets
    // its messages.
    let mut other = c.node(0).tcp_login("hal").await?;
    join(&mut other, "777").await?;
    let mut ack = json!(null);
    for _ in 0..50 {
        ack = at_fra.chat(json!({"chatType": 1, "groupId": "777", "content": "from fra"})).await?;
        if ack["code"] == 10000 {
            break;
        }
        assert_eq!(ack["code"], 11001, "forbidden until the membership arrives: {ack}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ack["data"]["conversation"], "g:777");
    assert_eq!(other.recv_cmd(11).await?["data"]["content"], "from fra");
    let ack = other.chat(json!({"chatType": 1, "groupId": "777", "content": "to fra"})).await?;
    assert_eq!(ack["code"], 10000);
    loop {
        let m = at_fra.recv_cmd(11).await?;
        if m["data"]["content"] == "to fra" {
            break;
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_node_that_lost_its_database_is_followed_again_from_the_start() -> anyhow::Result<()> {
    let mut c = Cluster::start(bin(), &REGIONS[..2], &[]).await?;
    // fra sequences a conversation and writes enough that iad's position in fra's stream is well
    // past anything a new database reaches soon.
    let target = c.user_owned_by("lost", "wiper", 1);
    let conv = schema::ConversationId::private("wiper", &target);
    let mut w = c.node(1).tcp_login("wiper").await?;
    for i in 0..30 {
        assert_eq!(w.chat(json!({"chatType": 2, "to": target, "content": format!("before {i}")})).await?["code"], 10001);
    }
    eventually(Duration::from_secs(10), || async { (c.messages(0, conv.as_str()).await.ok()?.len() == 30).then_some(()) }).await?;
    drop(w);
    c.kill(1).await?;
    c.wipe_database(1)?;
    c.restart(1).await?;
    c.wait_ready(Duration::from_secs(30)).await?;
    // fra got its own history back from iad before it was ready, so it goes on at seq 31 rather
    // than handing out seq 1 again; and what it sequences now reaches iad.
    assert_eq!(c.messages(1, conv.as_str()).await?.len(), 30);
    let mut w = c.node(1).tcp_login("wiper").await?;
    let ack = w.chat(json!({"chatType": 2, "to": target, "content": "after the wipe"})).await?;
    assert_eq!((ack["code"].as_u64(), ack["data"]["seq"].as_u64()), (Some(10001), Some(31)), "{ack}");
    eventually(Duration::from_secs(10), || async { (c.messages(0, conv.as_str()).await.ok()?.len() == 31).then_some(()) }).await?;
    Ok(())
}

#[tokio::test]
async fn a_cluster_certificate_for_one_node_cannot_speak_for_another() -> anyhow::Result<()> {
    let c = Cluster::start(bin(), &REGIONS[..2], &[]).await?;
    let iad_mesh = c.node(0).mesh.expect("mesh port");
    // A genuine cluster certificate, for a node called evil-1.
    let evil = tests::TestNode::builder(bin())
        .arg("--node-id", "evil-1")
        .arg("--mesh-addr", "127.0.0.1:0")
        .arg("--cluster-ca", c.ca_cert().display())
        .arg("--peer", format!("iad-1@iad={iad_mesh}"))
        .start()
        .await?;
    let mesh_dir = evil.data_dir().join("mesh");
    // The same certificate, used to claim to be fra-1.
    let impostor = tests::TestNode::builder(bin())
        .arg("--node-id", "fra-1")
        .arg("--region", "fra")
        .arg("--mesh-addr", "127.0.0.1:0")
        .arg("--cluster-ca", c.ca_cert().display())
        .arg("--node-cert", mesh_dir.join("node.pem").display())
        .arg("--node-key", mesh_dir.join("node.key").display())
        .arg("--peer", format!("iad-1@iad={iad_mesh}"))
        .start()
        .await?;
    refused_while_fra_stays(&c, &impostor).await
}

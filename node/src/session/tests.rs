//! The session loop and the dispatcher on a node on its own (`cluster::SingleNode`), with each
//! session driven through channels instead of a socket: a real store in a temporary directory,
//! the real hub and fan-out, no transport.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Sink, Stream};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::{run, Inbound, Outgoing};
use crate::auth::{HashCost, LoginThrottle, Tokens};
use crate::cluster::SingleNode;
use crate::config::Config;
use crate::dispatch::Core;
use crate::hub::Hub;
use crate::metrics::{Metrics, Transport};
use crate::store::Store;

/// A node on its own, without ports: the core and its fan-out.
async fn single_node(dir: &std::path::Path) -> Arc<Core> {
    let mut config = Config::for_tests(dir);
    // The cheapest hash: these tests are about sessions, not passwords.
    config.password_hash_cost = HashCost { memory_kib: 8, passes: 1 };
    let metrics = Arc::new(Metrics::default());
    let (store, feed) = Store::open(dir, "solo", Arc::clone(&metrics)).await.unwrap();
    let core = Arc::new(Core {
        throttle: LoginThrottle::new(config.login_failures_per_minute),
        hub: Arc::new(Hub::new(Arc::clone(&metrics))),
        tokens: Tokens::load_or_create(&dir.join("token.key"), config.token_ttl).unwrap(),
        certs: crate::tls::CertStore::load(dir, None, None).unwrap(),
        logins: crate::auth::LoginCache::new(config.token_ttl, 100),
        config,
        store,
        metrics,
        ready: Arc::new(AtomicBool::new(true)),
        passwords: crate::auth::PasswordPool::new(1, 16),
        conns: crate::limits::ConnLimit::new(0),
        api_per_ip: crate::limits::KeyedBuckets::new(0),
        api_per_key: crate::limits::KeyedBuckets::new(0),
        cluster: Arc::new(SingleNode),
        mesh: None,
        support: crate::support::Support::new(std::time::Duration::from_secs(60)),
    });
    tokio::spawn(crate::fanout::run(Arc::clone(&core), feed, tokio_util::sync::CancellationToken::new()));
    core
}

/// A session whose client is a pair of channels.
struct Session {
    requests: mpsc::Sender<Inbound>,
    frames: mpsc::Receiver<Outgoing>,
    backlog: Vec<Value>,
}

impl Session {
    fn start(core: &Arc<Core>) -> Session {
        let (requests, inbound) = mpsc::channel::<Inbound>(64);
        let (outbound, frames) = mpsc::channel::<Outgoing>(1024);
        let inbound: std::pin::Pin<Box<dyn Stream<Item = Inbound> + Send>> =
            Box::pin(futures_util::stream::unfold(inbound, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }));
        let outbound: std::pin::Pin<Box<dyn Sink<Outgoing, Error = ()> + Send>> =
            Box::pin(futures_util::sink::unfold(outbound, |tx, item: Outgoing| async move {
                tx.send(item).await.map_err(drop)?;
                Ok::<_, ()>(tx)
            }));
        tokio::spawn(run(Arc::clone(core), Transport::Ws, ([127, 0, 0, 1], 1).into(), inbound, outbound, None));
        Session { requests, frames, backlog: Vec::new() }
    }

    async fn send(&self, body: Value) {
        let body = Bytes::from(body.to_string());
        self.requests.send(Inbound::Request { cmd: None, syn_seq: 0, body }).await.unwrap();
    }

    /// The next frame with `command`; others are kept for later.
    async fn recv(&mut self, command: u64) -> Value {
        if let Some(i) = self.backlog.iter().position(|f| f["command"] == command) {
            return self.backlog.remove(i);
        }
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(10), self.frames.recv()).await.unwrap().unwrap();
            let Outgoing::Frame { body, .. } = frame else { panic!("the session closed while waiting for {command}") };
            let v: Value = serde_json::from_slice(&body).unwrap();
            if v["command"] == command {
                return v;
            }
            self.backlog.push(v);
        }
    }

    async fn login(&mut self, user: &str) {
        self.send(json!({"cmd": 5, "userId": user, "password": "pw"})).await;
        assert_eq!(self.recv(6).await["code"], 10007);
    }
}

#[tokio::test]
async fn a_private_message_reaches_the_recipients_session_and_the_sender_gets_its_seq() {
    let dir = tempfile::tempdir().unwrap();
    let core = single_node(dir.path()).await;
    let (mut alice, mut bob) = (Session::start(&core), Session::start(&core));
    alice.login("alice").await;
    bob.login("bob").await;
    alice.send(json!({"cmd": 11, "chatType": 2, "to": "bob", "content": "hi", "id": "a1"})).await;
    let ack = alice.recv(12).await;
    assert_eq!((ack["code"].as_u64(), ack["data"]["seq"].as_u64()), (Some(10000), Some(1)), "{ack}");
    let push = bob.recv(11).await;
    assert_eq!((push["data"]["content"].as_str(), push["data"]["from"].as_str()), (Some("hi"), Some("alice")));
    // The same client id again: the first copy's seq, and no second push.
    alice.send(json!({"cmd": 11, "chatType": 2, "to": "bob", "content": "hi", "id": "a1"})).await;
    assert_eq!(alice.recv(12).await["data"]["seq"], 1);
    alice.send(json!({"cmd": 13})).await;
    alice.recv(13).await;
    assert!(bob.backlog.iter().all(|f| f["command"] != 11));
}

#[tokio::test]
async fn pipelined_sends_are_answered_and_sequenced_in_request_order() {
    let dir = tempfile::tempdir().unwrap();
    let core = single_node(dir.path()).await;
    let mut alice = Session::start(&core);
    alice.login("alice").await;
    for k in 0..50 {
        alice.send(json!({"cmd": 11, "chatType": 2, "to": "carol", "content": format!("m{k}"), "id": format!("p{k}")})).await;
    }
    for k in 0..50u64 {
        let ack = alice.recv(12).await;
        assert_eq!(ack["data"]["clientId"], format!("p{k}"));
        assert_eq!(ack["data"]["seq"], k + 1);
    }
}

#[tokio::test]
async fn a_bad_body_gets_a_reply_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let core = single_node(dir.path()).await;
    let mut alice = Session::start(&core);
    // Not logged in yet: a chat is refused (11010), and the session stays.
    alice.send(json!({"cmd": 11, "chatType": 2, "to": "bob", "content": "early"})).await;
    assert_eq!(alice.recv(12).await["code"], 11010);
    alice.login("alice").await;
    alice.send(json!({"cmd": 11, "chatType": 9, "content": "nowhere"})).await;
    let reply = alice.recv(12).await;
    assert_ne!(reply["code"], 10000, "{reply}");
    alice.send(json!({"cmd": 13})).await;
    alice.recv(13).await;
}

#[tokio::test]
async fn a_group_message_reaches_every_online_member_once_the_sender_included() {
    let dir = tempfile::tempdir().unwrap();
    let core = single_node(dir.path()).await;
    let mut members = Vec::new();
    for name in ["gx", "gy", "gz"] {
        let mut s = Session::start(&core);
        s.login(name).await;
        members.push(s);
    }
    members[0].send(json!({"cmd": 11, "chatType": 1, "groupId": "100", "content": "all"})).await;
    assert_eq!(members[0].recv(12).await["code"], 10000);
    for m in &mut members {
        let push = m.recv(11).await;
        assert_eq!(push["data"]["content"], "all");
        m.send(json!({"cmd": 13})).await;
        m.recv(13).await;
        assert!(m.backlog.iter().all(|f| f["command"] != 11), "a second push");
    }
}

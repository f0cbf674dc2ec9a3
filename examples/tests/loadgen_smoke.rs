//! Smoke test of the load generator: a few connections and a few messages against a real node
//! (started in-process), asserting that every message was acknowledged and delivered exactly
//! once. No timing is asserted.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

use std::sync::{Arc, Mutex};

use examples::loadgen::worker;
use serde_json::{json, Value};

async fn run(scenario: &str, transport: &str, count: u64, messages: u64) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let mut config = node::Config::for_tests(dir.path());
    config.msg_rate = 1_000_000;
    config.msg_burst = 1_000_000;
    config.default_groups = vec![];
    config.password_hash_cost = node::auth::HashCost { memory_kib: 64, passes: 1 };
    let node = node::start(config).await.unwrap();
    let cfg = json!({
        "scenario": scenario, "transport": transport, "addr": node.jim_addr.to_string(), "bind": "127.0.0.1",
        "first": 0, "count": count, "duration": 60, "messages": messages, "rate": 0, "window": 8, "worker": 0,
    });
    let reports: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = Arc::clone(&reports);
    worker::run_with(cfg, async {}, Arc::new(move |v| sink.lock().unwrap().push(v))).await.unwrap();
    node.shutdown().await;
    let reports = reports.lock().unwrap();
    assert_eq!(reports.first().unwrap()["type"], "ready");
    reports.iter().rev().find(|v| v["type"] == "result").cloned().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_over_tcp_delivers_every_message_once() {
    let r = run("chat", "tcp", 8, 200).await;
    assert_eq!(
        (r["sent"].as_u64(), r["acked"].as_u64(), r["delivered"].as_u64(), r["errors"].as_u64()),
        (Some(200), Some(200), Some(200), Some(0)),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_over_websocket_delivers_every_message_once() {
    let r = run("chat", "ws", 4, 100).await;
    assert_eq!(
        (r["sent"].as_u64(), r["acked"].as_u64(), r["delivered"].as_u64(), r["errors"].as_u64()),
        (Some(100), Some(100), Some(100), Some(0)),
        "{r}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_fan_out_reaches_every_member_once() {
    // Five members; the first sends 20 messages; everyone, the sender included, gets each once.
    let r = run("group", "tcp", 5, 20).await;
    assert_eq!((r["acked"].as_u64(), r["delivered"].as_u64(), r["errors"].as_u64()), (Some(20), Some(100), Some(0)), "{r}");
}

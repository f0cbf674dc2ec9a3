//! Mesh benchmarks (issue 5), on real node processes linked through the harness's UDP relays:
//!
//! - `latency`: cross-node delivery time with the relays adding `--delay-ms` (40) one way, for a
//!   conversation sequenced by the sender's node and for one sequenced by the recipient's node,
//!   next to the same-node time as a baseline. The overhead is what the mesh adds above the delay.
//! - `bandwidth`: mesh bytes per replicated message in a three-node cluster.
//! - `catchup`: a region cut off while `--catchup` (20000) messages are written elsewhere, then
//!   healed: messages replayed per second until its replica has caught up.
//!
//! ```text
//! cargo build --release -p node -p examples --examples
//! target/release/examples/mesh_bench [latency|bandwidth|catchup|all] [--delay-ms 40] [--messages 500] [--catchup 20000]
//! ```

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tests::cluster::{Cluster, LinkSettings};
use tests::{Client, TcpClient};

/// Benchmarks measure the mesh, not the per-connection rate limit.
const UNLIMITED: [(&str, &str); 2] = [("--msg-rate", "1000000"), ("--msg-burst", "1000000")];

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let what = args.get(1).filter(|a| !a.starts_with("--")).cloned().unwrap_or_else(|| "all".into());
    let bin = examples::sibling_node_binary();
    anyhow::ensure!(bin.exists(), "{} is missing: run `cargo build --release -p node` first", bin.display());
    if what == "latency" || what == "all" {
        latency(&bin, Duration::from_millis(arg(&args, "--delay-ms", 40)), arg(&args, "--messages", 500) as usize).await?;
    }
    if what == "bandwidth" || what == "all" {
        bandwidth(&bin, arg(&args, "--messages", 2000) as usize).await?;
    }
    if what == "catchup" || what == "all" {
        catchup(&bin, arg(&args, "--catchup", 20000) as usize).await?;
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Sends `n` private messages one at a time from `from` to `to`, timing each from the send to
/// its arrival at `to`, and to the sender's success reply. Milliseconds, sorted.
async fn one_way(from: &mut TcpClient, to: &mut TcpClient, peer: &str, n: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut times, mut acks) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n {
        let started = Instant::now();
        from.send(json!({"cmd": 11, "chatType": 2, "to": peer, "content": format!("t{i}")})).await?;
        let (got, ack) = tokio::join!(
            async {
                let r = to.recv_cmd(11).await;
                (r, started.elapsed())
            },
            async {
                let r = from.recv_cmd(12).await;
                (r, started.elapsed())
            }
        );
        got.0?;
        times.push(got.1.as_secs_f64() * 1000.0);
        let (reply, took) = ack;
        anyhow::ensure!(reply?["code"] == 10000, "send failed");
        acks.push(took.as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    times.sort_by(f64::total_cmp);
    acks.sort_by(f64::total_cmp);
    Ok((times, acks))
}

/// One latency case: `sender` at node `from` sends to a recipient at node `to` whose conversation
/// with the sender node `owner` sequences (the recipient's name is picked from `base` for that).
async fn case(
    c: &Cluster,
    sender: &str,
    from: usize,
    base: &str,
    to: usize,
    owner: usize,
    n: usize,
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let recipient = c.user_owned_by(base, sender, owner);
    let mut s = c.node(from).tcp_login(sender).await?;
    let mut r = c.node(to).tcp_login(&recipient).await?;
    // Let the recipient's presence reach the other node first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    one_way(&mut s, &mut r, &recipient, n).await
}

async fn latency(bin: &std::path::Path, delay: Duration, n: usize) -> anyhow::Result<()> {
    let c = Cluster::start(bin, &[("iad-1", "iad"), ("fra-1", "fra")], &UNLIMITED).await?;
    c.all_links(LinkSettings { delay, ..LinkSettings::default() });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = delay.as_secs_f64() * 1000.0;
    // Same node: sender and recipient at iad, iad owns the conversation.
    let base = case(&c, "s1", 0, "local", 0, 0, n).await?;
    // Across regions, sequenced by the sender's node: one crossing (owner → recipient's node).
    let sender_owned = case(&c, "s2", 0, "far", 1, 0, n).await?;
    // Across regions, sequenced by the recipient's node: one crossing (forward to the owner).
    let recipient_owned = case(&c, "s3", 0, "near", 1, 1, n).await?;
    // Both users at fra, the conversation owned by iad: forward there, ship back.
    let both_far = case(&c, "s4", 1, "away", 1, 0, n).await?;
    println!("latency: {n} messages each, relay delay {d} ms one way (delivery = send to arrival; reply = send to the sender's 10000)");
    for (name, crossings, (t, a)) in [
        ("same node", 0.0, &base),
        ("cross, sender's node owns", 1.0, &sender_owned),
        ("cross, recipient's node owns", 1.0, &recipient_owned),
        ("same region, owner elsewhere", 2.0, &both_far),
    ] {
        let (p50, p99) = (percentile(t, 0.5), percentile(t, 0.99));
        let over = if crossings == 0.0 {
            String::new()
        } else {
            format!("  overhead above {crossings:.0} x delay: p50 {:.2} ms p99 {:.2} ms", p50 - crossings * d, p99 - crossings * d)
        };
        println!("  {name:<30} delivery p50 {p50:.2} ms p99 {p99:.2} ms  reply p50 {:.2} ms{over}", percentile(a, 0.5));
    }
    Ok(())
}

async fn bandwidth(bin: &std::path::Path, n: usize) -> anyhow::Result<()> {
    let c = Cluster::start(bin, &[("iad-1", "iad"), ("fra-1", "fra"), ("sin-1", "sin")], &UNLIMITED).await?;
    let peer = c.user_owned_by("bw", "writer", 0);
    let mut w = c.node(0).tcp_login("writer").await?;
    // Quiet mesh first: heartbeats and presence are measured separately.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = sum_metric(&c, "kefu_mesh_bytes_sent_total").await?;
    let applied_before = sum_metric(&c, "kefu_mesh_changes_applied_total").await?;
    let t0 = Instant::now();
    let content = "x".repeat(100);
    for _ in 0..n {
        let ack = w.chat(json!({"chatType": 2, "to": peer, "content": content})).await?;
        anyhow::ensure!(ack["code"] == 10001, "unexpected reply {ack}");
    }
    // Wait until both replicas have everything.
    let conv = schema::ConversationId::private("writer", &peer);
    for i in 1..3 {
        while c.messages(i, conv.as_str()).await?.len() < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let elapsed = t0.elapsed();
    let after = sum_metric(&c, "kefu_mesh_bytes_sent_total").await?;
    let applied = sum_metric(&c, "kefu_mesh_changes_applied_total").await? - applied_before;
    // The idle traffic of the same period (heartbeats every 250 ms each way on 6 links).
    let idle_before = sum_metric(&c, "kefu_mesh_bytes_sent_total").await?;
    tokio::time::sleep(elapsed).await;
    let idle = sum_metric(&c, "kefu_mesh_bytes_sent_total").await? - idle_before;
    let per_message = (after - before - idle) / n as f64;
    println!(
        "bandwidth: {n} private messages of 100 content bytes, 3 nodes: {:.0} mesh bytes per message in all ({:.0} per receiving node), \
         frame payload only (QUIC/UDP headers not counted); idle heartbeat traffic {:.0} B/s subtracted; {:.2} rows applied per message",
        per_message,
        per_message / 2.0,
        idle / elapsed.as_secs_f64(),
        applied / n as f64
    );
    Ok(())
}

async fn sum_metric(c: &Cluster, name: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for i in 0..c.nodes.len() {
        total += c.metric(i, name).await?;
    }
    Ok(total)
}

async fn catchup(bin: &std::path::Path, n: usize) -> anyhow::Result<()> {
    let c = Cluster::start(bin, &[("iad-1", "iad"), ("fra-1", "fra")], &UNLIMITED).await?;
    c.partition("fra");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Written at iad while fra is cut off: 50 writers, each in its own conversation owned by iad.
    let writers = 50;
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for w in 0..writers {
        let user = format!("cw{w}");
        let peer = c.user_owned_by(&format!("cr{w}x"), &user, 0);
        let mut client = c.node(0).tcp_login(&user).await?;
        let done = Arc::clone(&done);
        let per = n / writers;
        tasks.push(tokio::spawn(async move {
            for i in 0..per {
                let ack = client.chat(json!({"chatType": 2, "to": peer, "content": format!("catch-up {i}")})).await?;
                anyhow::ensure!(ack["code"] == 10001, "unexpected reply {ack}");
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let written = done.load(Ordering::Relaxed);
    println!("catchup: {written} messages written at iad in {:.1} s while fra was cut off", t0.elapsed().as_secs_f64());
    let applied_before = c.metric(1, "kefu_mesh_changes_applied_total").await?;
    c.heal("fra");
    let healed = Instant::now();
    // The first batch marks the reconnection; the lag reaching zero marks the end.
    let mut first: Option<Instant> = None;
    loop {
        let applied = c.metric(1, "kefu_mesh_changes_applied_total").await?;
        if first.is_none() && applied > applied_before {
            first = Some(Instant::now());
        }
        let lag = c.metric(1, "kefu_mesh_replication_lag_revisions").await?;
        if first.is_some() && lag == 0.0 && applied - applied_before >= written as f64 {
            break;
        }
        anyhow::ensure!(healed.elapsed() < Duration::from_secs(120), "fra did not catch up within 120 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let end = Instant::now();
    let start = first.unwrap_or(healed);
    let replay = end.duration_since(start).as_secs_f64();
    println!(
        "catchup: reconnected {:.2} s after the heal; {written} messages replayed in {replay:.2} s = {:.0} messages/s",
        start.duration_since(healed).as_secs_f64(),
        written as f64 / replay
    );
    Ok(())
}

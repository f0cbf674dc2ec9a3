//! Login storm benchmark (issue 10 §5), on a real release node process with its default
//! password cost (argon2id, 19 MiB, 2 passes): `--chatters` logged-in users chat in pairs while
//! `--logins` new users log in with passwords (the dev profile registers each, so every first
//! login hashes), `--concurrency` at a time; then the same users log in again (a reconnect storm,
//! as J-IM clients send the password on every connect). A login answered busy (11015) or
//! retryable (11007) is retried after 100 ms and counted.
//!
//! Reports per phase: wall time, login latency, busy answers, the chatters' send→delivery
//! latency while it ran, node CPU seconds, and the node's RSS before, after `--rss-after` (3000)
//! new users, and at the end.
//!
//! ```text
//! cargo build --release -p node -p examples --examples
//! target/release/examples/login_storm [--logins 10000] [--concurrency 200] [--chatters 20] [--rate 20] [--rss-after 3000]
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde_json::json;
use tests::{Client, TcpClient, TestNode};

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// User time plus system time of a process, in seconds, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // sysconf(_SC_CLK_TCK) has no preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

/// Chat latency (µs) of the pairs while `running`; returns the histogram when told to stop.
async fn chat(
    node: &TestNode,
    pairs: usize,
    rate: u64,
    running: Arc<AtomicBool>,
) -> anyhow::Result<tokio::task::JoinHandle<Histogram<u64>>> {
    let mut tasks = Vec::new();
    let epoch = Instant::now();
    for p in 0..pairs {
        let mut from = node.tcp().await?;
        from.login(&format!("chat-a{p}"), "pw").await?;
        let mut to = node.tcp().await?;
        to.login(&format!("chat-b{p}"), "pw").await?;
        let running = Arc::clone(&running);
        let sender = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate.max(1)));
            let mut k = 0u64;
            while running.load(Ordering::Relaxed) {
                tick.tick().await;
                let sent = epoch.elapsed().as_micros() as u64;
                let body =
                    json!({"cmd": 11, "chatType": 2, "to": format!("chat-b{p}"), "content": sent.to_string(), "id": format!("c{p}-{k}")});
                if from.send(body).await.is_err() {
                    break;
                }
                let _ = from.recv_cmd(12).await;
                from.clear_backlog();
                k += 1;
            }
        });
        let receiver = tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!());
            while let Ok(Ok(push)) = tokio::time::timeout(Duration::from_secs(5), to.recv_cmd(11)).await {
                if let Some(sent) = push["data"]["content"].as_str().and_then(|c| c.parse::<u64>().ok()) {
                    let _ = h.record(epoch.elapsed().as_micros() as u64 - sent);
                }
            }
            h
        });
        tasks.push((sender, receiver));
    }
    Ok(tokio::spawn(async move {
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| unreachable!());
        for (s, r) in tasks {
            let _ = s.await;
            if let Ok(h) = r.await {
                let _ = all.add(&h);
            }
        }
        all
    }))
}

/// Logs users `0..logins` in with passwords, `concurrency` at a time; a busy or retryable answer
/// is retried. Returns (login latency µs, busy answers, RSS KiB after `rss_after` logins).
async fn storm(node: &TestNode, logins: u64, concurrency: u64, rss_after: u64) -> anyhow::Result<(Histogram<u64>, u64, Option<u64>)> {
    let addr = node.jim;
    let next = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(AtomicU64::new(0));
    let rss_mark = Arc::new(std::sync::Mutex::new(None));
    let pid = node.pid();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (next, done, busy, rss_mark) = (Arc::clone(&next), Arc::clone(&done), Arc::clone(&busy), Arc::clone(&rss_mark));
        workers.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= logins {
                    return Ok::<_, anyhow::Error>(h);
                }
                let started = Instant::now();
                for attempt in 0.. {
                    anyhow::ensure!(attempt < 10_000, "login {i} never succeeded");
                    let mut c = TcpClient::connect(addr).await?;
                    c.send(json!({"cmd": 5, "userId": format!("storm{i}"), "password": format!("pw-{i}")})).await?;
                    let reply = tokio::time::timeout(Duration::from_secs(120), c.recv_cmd(6)).await??;
                    match reply["code"].as_u64() {
                        Some(10007) => break,
                        Some(11015 | 11007) => {
                            busy.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        _ => anyhow::bail!("login {i}: {reply}"),
                    }
                }
                let _ = h.record(started.elapsed().as_micros() as u64);
                if done.fetch_add(1, Ordering::Relaxed) + 1 == rss_after {
                    *rss_mark.lock().unwrap_or_else(|e| e.into_inner()) = pid.and_then(tests::rss_kib);
                }
            }
        }));
    }
    let mut all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!());
    for w in workers {
        all.add(&w.await??)?;
    }
    let mark = *rss_mark.lock().unwrap_or_else(|e| e.into_inner());
    Ok((all, busy.load(Ordering::Relaxed), mark))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (logins, concurrency, chatters, rate, rss_after) = (
        arg(&args, "--logins", 10_000),
        arg(&args, "--concurrency", 200),
        arg(&args, "--chatters", 20),
        arg(&args, "--rate", 20),
        arg(&args, "--rss-after", 3000),
    );
    let bin = examples::sibling_node_binary();
    anyhow::ensure!(bin.exists(), "{} is missing: run `cargo build --release -p node` first", bin.display());
    let node = TestNode::start(&bin).await?;
    let pid = node.pid().unwrap_or_default();
    let rss_start = tests::rss_kib(pid);
    let running = Arc::new(AtomicBool::new(true));
    let chat_handle = chat(&node, (chatters / 2).max(1) as usize, rate, Arc::clone(&running)).await?;
    let mut phases = Vec::new();
    for phase in ["new users", "the same users again"] {
        let cpu0 = cpu_seconds(pid);
        let started = Instant::now();
        let (latency, busy, rss_mark) = storm(&node, logins, concurrency, rss_after).await?;
        let wall = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid) - cpu0;
        let rss_end = tests::rss_kib(pid);
        eprintln!(
            "{phase}: {logins} logins in {wall:.1} s ({:.0}/s), login p50 {:.0} ms p99 {:.0} ms, {busy} busy answers, node CPU {cpu:.1} s, RSS {} → {:?} after {rss_after} → {:?} KiB",
            logins as f64 / wall,
            ms(&latency, 0.5),
            ms(&latency, 0.99),
            rss_start.unwrap_or(0),
            rss_mark,
            rss_end,
        );
        phases.push(json!({
            "phase": phase, "logins": logins, "wall_s": wall, "logins_per_s": logins as f64 / wall,
            "login_p50_ms": ms(&latency, 0.5), "login_p99_ms": ms(&latency, 0.99), "busy": busy, "node_cpu_s": cpu,
            "rss_kib_start": rss_start, "rss_kib_after_mark": rss_mark, "rss_kib_end": rss_end,
        }));
    }
    running.store(false, Ordering::Relaxed);
    let chat_latency = chat_handle.await?;
    let result = json!({
        "logins": logins, "concurrency": concurrency, "chatters": chatters, "rate_per_pair": rate, "phases": phases,
        "chat_messages": chat_latency.len(), "chat_p50_ms": ms(&chat_latency, 0.5), "chat_p99_ms": ms(&chat_latency, 0.99),
        "chat_max_ms": chat_latency.max() as f64 / 1000.0,
    });
    eprintln!(
        "chat during both storms: {} messages, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        chat_latency.len(),
        ms(&chat_latency, 0.5),
        ms(&chat_latency, 0.99),
        chat_latency.max() as f64 / 1000.0
    );
    println!("{result}");
    Ok(())
}

//! The load generator behind `examples/examples/loadgen.rs`: the parent (node start, prefill,
//! worker processes, merging, the JSON result) lives here; `worker` runs connections.

pub mod opts;
pub mod worker;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use self::opts::Opts;

/// The command line: a scenario and its options, or `__worker CONFIG` in a worker process.
pub async fn main(args: Vec<String>) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("__worker") => worker::run(args.get(1).context("worker config")?).await,
        _ => {
            // `--help` prints every option and exits 0; a bad option exits 2 with the reason.
            let cli = <opts::Cli as clap::Parser>::try_parse_from(std::iter::once("loadgen".to_string()).chain(args))
                .unwrap_or_else(|e| e.exit());
            run(cli.scenario.name(), Opts::from_cli(&cli)).await
        }
    }
}

/// The node under test: started here, or given by address (and optionally pid).
struct Node {
    addr: String,
    quic_addr: Option<String>,
    ca: Option<String>,
    pid: Option<u32>,
    child: Option<Child>,
    _data: Option<tempfile_dir::TempDir>,
}

mod tempfile_dir {
    /// A directory removed on drop (the examples do not depend on the tempfile crate).
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn node_binary(opts: &Opts) -> PathBuf {
    if let Some(bin) = opts.str("node-bin") {
        return PathBuf::from(bin);
    }
    crate::sibling_node_binary()
}

async fn start_node(opts: &Opts, data: &std::path::Path) -> anyhow::Result<(Child, String, String, u32, Duration)> {
    let bin = node_binary(opts);
    let started = Instant::now();
    let mut command = Command::new(&bin);
    command
        .args(["--data-dir", &data.display().to_string(), "--jim-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .args(["--tls-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
        // Benchmark settings: no per-connection rate limit, cheap password hashes unless asked
        // otherwise (logins are not what is measured), no default group, no idle timeout.
        .args(["--msg-rate", "100000000", "--msg-burst", "100000000", "--default-groups", "", "--heartbeat-timeout", "0"])
        .args(["--login-failures-per-minute", "0"]);
    match opts.num("argon2-memory-kib", 64) {
        0 => {}
        kib => drop(command.args(["--argon2-memory-kib", &kib.to_string(), "--argon2-passes", "1"])),
    }
    let mut child = command
        .env("KEFU_LOG", "warn")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} (build it with cargo build --release -p node)", bin.display()))?;
    let pid = child.id().context("node pid")?;
    let mut lines = BufReader::new(child.stdout.take().context("node stdout")?).lines();
    let (mut addr, mut quic) = (None, None);
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await?? {
        if let Some(rest) = line.strip_prefix("kefu-node listening jim=") {
            addr = rest.split_whitespace().next().map(str::to_string);
        }
        if let Some(rest) = line.strip_prefix("kefu-node listening quic=") {
            quic = rest.split_whitespace().next().map(str::to_string);
        }
        if line.starts_with("kefu-node ready") {
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let addr = addr.context("node did not print its address")?;
    // Process start to the first accepted connection: a heartbeat answered.
    let mut c = tests::TcpClient::connect(addr.parse()?).await?;
    use tests::Client as _;
    c.send(json!({"cmd": 13})).await?;
    c.recv_cmd(13).await?;
    Ok((child, addr, quic.context("node did not print its QUIC address")?, pid, started.elapsed()))
}

fn new_data_dir(tag: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("kefu-loadgen-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Fills a data dir with `total` private messages over `conversations` conversations, each
/// `content_len` bytes, through the store's import path. Conversation k is between reader
/// lg{k % readers} and peer{k}, so every reader takes part in conversations/readers of them.
async fn prefill(dir: &std::path::Path, total: u64, conversations: u64, content_len: usize, readers: u64) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let metrics = std::sync::Arc::new(node::metrics::Metrics::default());
    let (store, _feed) = node::store::Store::open(dir, "prefill", metrics).await?;
    let per_conv = total.div_ceil(conversations.max(1));
    let content: String = "x".repeat(content_len);
    let now = node::store::now_ms();
    let mut batch = Vec::with_capacity(20_000);
    let mut done = 0u64;
    let mut last_report = Instant::now();
    'outer: for seq in 1..=per_conv {
        for k in 0..conversations {
            if done >= total {
                break 'outer;
            }
            let (a, b) = (format!("lg{}", k % readers.max(1)), format!("peer{k}"));
            batch.push(node::store::StoredMessage {
                conversation: schema::ConversationId::private(&a, &b),
                seq,
                id: node::store::new_message_id(),
                client_id: None,
                sender: if seq % 2 == 0 { a.clone() } else { b.clone() },
                recipient: Some(if seq % 2 == 0 { b } else { a }),
                group_id: None,
                chat_type: 2,
                msg_type: 0,
                content: content.clone(),
                extras: None,
                nick: None,
                avatar: None,
                created_at: now - (per_conv - seq) as i64,
                origin: "prefill".into(),
                recalled_at: None,
            });
            done += 1;
            if batch.len() == batch.capacity() {
                store.import(std::mem::replace(&mut batch, Vec::with_capacity(20_000))).await?;
                if last_report.elapsed() > Duration::from_secs(2) {
                    eprintln!("prefill: {done}/{total} messages ({:.0}/s)", done as f64 / started.elapsed().as_secs_f64());
                    last_report = Instant::now();
                }
            }
        }
    }
    if !batch.is_empty() {
        store.import(batch).await?;
    }
    // The node opens this database next: the writer must be gone first.
    store.close().await;
    Ok(started.elapsed())
}

fn dir_size(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir).map(|rd| rd.filter_map(Result::ok).filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum()).unwrap_or(0)
}

async fn run(scenario: &str, opts: Opts) -> anyhow::Result<()> {
    let duration = Duration::from_secs(opts.num("duration", 60));
    let procs = opts.num("procs", 1).max(1);
    let transport = opts.str("transport").unwrap_or("tcp").to_string();
    let mut result = json!({ "scenario": scenario, "transport": transport, "procs": procs, "machine": machine() });

    let mut node = match opts.str("node") {
        Some(addr) => Node {
            addr: addr.to_string(),
            quic_addr: opts.str("quic").map(str::to_string),
            ca: opts.str("ca").map(str::to_string),
            pid: opts.str("node-pid").and_then(|p| p.parse().ok()),
            child: None,
            _data: None,
        },
        None => {
            let dir = new_data_dir(scenario)?;
            if scenario == "history" || scenario == "coldstart" {
                let (total, convs, len) = if scenario == "coldstart" {
                    let mb = opts.num("prefill-mb", 1024);
                    (mb * 1024 * 1024 / 1100, 10_000, 1000)
                } else {
                    (opts.num("prefill", 1_000_000), opts.num("conversations", 10_000), 100)
                };
                let took = prefill(&dir, total, convs, len as usize, opts.num("readers", 100)).await?;
                result["prefill"] =
                    json!({ "messages": total, "conversations": convs, "seconds": took.as_secs_f64(), "db_bytes": dir_size(&dir) });
                eprintln!("prefill: {total} messages in {:.1}s, database {} MB", took.as_secs_f64(), dir_size(&dir) / 1_000_000);
            }
            if scenario == "coldstart" {
                return coldstart(&opts, &dir, result).await;
            }
            let (child, addr, quic, pid, startup) = start_node(&opts, &dir).await?;
            result["startup_ms"] = json!(startup.as_secs_f64() * 1000.0);
            let ca = dir.join("tls/self-signed.pem").display().to_string();
            Node { addr, quic_addr: Some(quic), ca: Some(ca), pid: Some(pid), child: Some(child), _data: Some(tempfile_dir::TempDir(dir)) }
        }
    };
    let rss_before = node.pid.and_then(tests::rss_kib);
    // The anonymous part too: the file-backed rest (the binary's resident pages) differs between
    // builds by more than a megabyte, which a percentage over the start would count.
    let anon_before = node.pid.and_then(tests::rss_anon_kib);

    // Split the users over the workers.
    let (users, per_worker_cfg): (u64, Box<dyn Fn(u64) -> Value>) = match scenario {
        "idle" => {
            // --login 0 measures bare connections (no user bound), to separate the two costs.
            let login = opts.num("login", 1) != 0;
            let spread_ms = opts.num("spread-ms", 0);
            (opts.num("conns", 1000), Box::new(move |_| json!({ "login": login, "spread_ms": spread_ms })))
        }
        "chat" => {
            let pairs = opts.num("pairs", 100);
            let (msgs, rate) = (opts.num("messages", 100_000), opts.num("rate", 0));
            let p = procs;
            (2 * pairs, Box::new(move |_| json!({ "messages": msgs / p, "rate": rate / p, "window": 32 })))
        }
        "group" => {
            let (msgs, rate) = (opts.num("messages", 100), opts.num("rate", 0));
            (opts.num("members", 1000), Box::new(move |w| json!({ "messages": if w == 0 { msgs } else { 0 }, "rate": rate, "window": 8 })))
        }
        "history" => {
            let (reads, convs, readers) = (opts.num("reads", 10_000), opts.num("conversations", 10_000), opts.num("readers", 100));
            let p = procs;
            (readers, Box::new(move |_| json!({ "reads": reads / p, "conversations": convs, "readers_total": readers })))
        }
        "churn" => {
            let (cycles, rate) = (opts.num("cycles", 1000), opts.num("rate", 200));
            let p = procs;
            (0, Box::new(move |_| json!({ "cycles": cycles / p, "rate": rate / p })))
        }
        _ => bail!("unknown scenario"),
    };
    let per = users.div_ceil(procs);
    let mut workers = Vec::new();
    for w in 0..procs {
        let first = w * per;
        let count = per.min(users.saturating_sub(first));
        let mut cfg = per_worker_cfg(w);
        cfg["scenario"] = json!(scenario);
        cfg["transport"] = json!(transport);
        cfg["addr"] = json!(node.addr);
        cfg["quic_addr"] = json!(node.quic_addr);
        cfg["ca"] = json!(node.ca);
        cfg["bind"] = json!(format!("127.0.0.{}", 2 + w));
        cfg["first"] = json!(first);
        cfg["count"] = json!(count);
        cfg["duration"] = json!(duration.as_secs());
        cfg["worker"] = json!(w);
        let child = Command::new(std::env::current_exe()?)
            .arg("__worker")
            .arg(cfg.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        workers.push(child);
    }
    // Wait until every worker has its connections logged in.
    let mut readers = Vec::new();
    let connect_started = Instant::now();
    for w in &mut workers {
        let mut lines = BufReader::new(w.stdout.take().context("worker stdout")?).lines();
        loop {
            let line = tokio::time::timeout(duration + Duration::from_secs(120), lines.next_line())
                .await??
                .context("worker exited before it was ready")?;
            let v: Value = serde_json::from_str(&line)?;
            if v["type"] == "ready" {
                break;
            }
        }
        readers.push(lines);
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    eprintln!("all {users} connections logged in after {connect_secs:.1}s");
    // Let the node settle before reading its memory.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_ready = node.pid.and_then(tests::rss_kib);
    result["connect_seconds"] = json!(connect_secs);
    result["rss_kib"] = json!({ "before": rss_before, "ready": rss_ready });
    if let (Some(b), Some(r)) = (rss_before, rss_ready) {
        if users > 0 {
            result["rss_bytes_per_connection"] = json!((r.saturating_sub(b) * 1024) as f64 / users as f64);
        }
    }

    for w in &mut workers {
        if let Some(stdin) = w.stdin.as_mut() {
            stdin.write_all(b"go\n").await?;
        }
    }
    let started = Instant::now();
    let cpu_before = node.pid.and_then(cpu_ticks);
    // Progress from every worker, merged once a second.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, Value)>(1024);
    for (i, mut lines) in readers.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send((i, v)).await;
                }
            }
        });
    }
    drop(tx);
    let mut last: Vec<Value> = vec![json!({}); workers.len()];
    let mut finals: Vec<Option<Value>> = vec![None; workers.len()];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let hard_stop = tokio::time::sleep(duration + Duration::from_secs(30));
    tokio::pin!(hard_stop);
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some((i, v)) if v["type"] == "result" => finals[i] = Some(v),
                Some((i, v)) => last[i] = v,
                None => break,
            },
            _ = tick.tick() => {
                let sum = |k: &str| last.iter().chain(finals.iter().flatten()).map(|v| v[k].as_u64().unwrap_or(0)).sum::<u64>();
                eprint!("\r[{:>4.0}s] sent={} acked={} delivered={} errors={}   ", started.elapsed().as_secs_f64(), sum("sent"), sum("acked"), sum("delivered"), sum("errors"));
                let _ = std::io::stderr().flush();
            }
            _ = &mut hard_stop => { eprintln!("\nhard stop"); break; }
        }
        if finals.iter().all(Option::is_some) {
            break;
        }
    }
    eprintln!();
    let elapsed = started.elapsed().as_secs_f64();
    let rss_after = node.pid.and_then(tests::rss_kib);
    result["rss_kib"]["after"] = json!(rss_after);
    let node_cpu = node.pid.and_then(cpu_ticks).zip(cpu_before).map(|(a, b)| a.saturating_sub(b) as f64 / TICKS_PER_SECOND);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut totals = json!({});
    for v in finals.iter().flatten() {
        for k in ["sent", "acked", "delivered", "errors", "ops"] {
            totals[k] = json!(totals[k].as_u64().unwrap_or(0) + v[k].as_u64().unwrap_or(0));
        }
        if let Some(b64) = v["hist"].as_str() {
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64)?;
            let h: Histogram<u64> = Deserializer::new().deserialize(&mut &bytes[..])?;
            hist.add(h)?;
        }
        if let Some(s) = v["seconds"].as_f64() {
            totals["worker_seconds"] = json!(totals["worker_seconds"].as_f64().unwrap_or(0.0).max(s));
        }
    }
    let secs = totals["worker_seconds"].as_f64().unwrap_or(elapsed).max(1e-9);
    let q = |p: f64| hist.value_at_quantile(p) as f64 / 1000.0;
    result["totals"] = totals.clone();
    result["seconds"] = json!(secs);
    result["latency_ms"] =
        json!({ "count": hist.len(), "p50": q(0.5), "p99": q(0.99), "p999": q(0.999), "max": hist.max() as f64 / 1000.0 });
    let rate = |k: &str| totals[k].as_u64().unwrap_or(0) as f64 / secs;
    result["rates_per_second"] = json!({ "acked": rate("acked"), "delivered": rate("delivered"), "ops": rate("ops") });
    // The node's CPU (user + system) over the run: per delivered message, and as a share of one core.
    let delivered = totals["delivered"].as_u64().unwrap_or(0);
    let mut cpu_text = String::new();
    if let Some(cpu) = node_cpu {
        let percent = 100.0 * cpu / elapsed.max(1e-9);
        let per_delivery = if delivered > 0 { cpu * 1e6 / delivered as f64 } else { f64::NAN };
        result["node_cpu"] = json!({ "seconds": cpu, "percent_of_a_core": percent, "us_per_delivery": per_delivery });
        cpu_text = format!(", node CPU {percent:.0} % ({per_delivery:.1} µs per delivery)");
    }
    let errors = totals["errors"].as_u64().unwrap_or(0);
    // After an idle run: the node's RSS once every connection is closed (the workers exit), 2 s
    // and 20 s later, to see how much of the connections' memory comes back.
    if scenario == "idle" {
        for w in &mut workers {
            let _ = w.kill().await;
        }
        if let Some(pid) = node.pid {
            tokio::time::sleep(Duration::from_secs(2)).await;
            result["rss_kib"]["closed_2s"] = json!(tests::rss_kib(pid));
            tokio::time::sleep(Duration::from_secs(18)).await;
            result["rss_kib"]["closed_20s"] = json!(tests::rss_kib(pid));
            result["rss_anon_kib"] = json!({ "before": anon_before, "closed_20s": tests::rss_anon_kib(pid) });
        }
    }

    let summary = match scenario {
        "idle" => format!(
            "idle: {users} {transport} connections, {:.0} B RSS each ({} KiB → {} KiB; all closed: {} KiB after 2 s, {} KiB after 20 s; \
             anonymous {} KiB → {} KiB after 20 s), errors {errors}",
            result["rss_bytes_per_connection"].as_f64().unwrap_or(f64::NAN),
            rss_before.unwrap_or(0),
            rss_ready.unwrap_or(0),
            result["rss_kib"]["closed_2s"].as_u64().unwrap_or(0),
            result["rss_kib"]["closed_20s"].as_u64().unwrap_or(0),
            anon_before.unwrap_or(0),
            result["rss_anon_kib"]["closed_20s"].as_u64().unwrap_or(0),
        ),
        "chat" | "group" => format!(
            "{scenario}: {:.0} acked/s, {:.0} delivered/s, latency p50 {:.2} ms p99 {:.2} ms p999 {:.2} ms, errors {errors}{cpu_text}",
            rate("acked"),
            rate("delivered"),
            q(0.5),
            q(0.99),
            q(0.999)
        ),
        _ => format!(
            "{scenario}: {:.0} ops/s, latency p50 {:.3} ms p99 {:.3} ms p999 {:.3} ms, errors {errors}",
            rate("ops"),
            q(0.5),
            q(0.99),
            q(0.999)
        ),
    };
    if let Some(out) = opts.str("out") {
        std::fs::write(out, serde_json::to_string_pretty(&result)?)?;
    }
    println!("{}", serde_json::to_string(&result)?);
    println!("{summary}");
    if let Some(saved) = opts.str("compare") {
        let text = std::fs::read_to_string(saved).with_context(|| format!("reading the saved result {saved}"))?;
        let before: Value = serde_json::from_str(&text).with_context(|| format!("{saved}: not a loadgen result"))?;
        println!("compared with {saved} (before → now):");
        for line in opts::compare(&before, &result) {
            println!("  {line}");
        }
    }
    for mut w in workers {
        let _ = w.kill().await;
    }
    if let Some(mut child) = node.child.take() {
        let _ = child.kill().await;
    }
    if errors > 0 {
        bail!("{errors} errors");
    }
    Ok(())
}

/// Cold start: time from process start to the first answered request, and idle RSS, three times.
async fn coldstart(opts: &Opts, dir: &std::path::Path, mut result: Value) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    for _ in 0..3 {
        let (mut child, _addr, _quic, pid, startup) = start_node(opts, dir).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss = tests::rss_kib(pid);
        runs.push(json!({ "startup_ms": startup.as_secs_f64() * 1000.0, "idle_rss_kib": rss }));
        let _ = child.kill().await;
    }
    let mut startups: Vec<f64> = runs.iter().filter_map(|r| r["startup_ms"].as_f64()).collect();
    startups.sort_by(f64::total_cmp);
    let mut rss: Vec<u64> = runs.iter().filter_map(|r| r["idle_rss_kib"].as_u64()).collect();
    rss.sort_unstable();
    result["runs"] = json!(runs);
    result["median_startup_ms"] = json!(startups.get(1));
    result["median_idle_rss_kib"] = json!(rss.get(1));
    let _ = std::fs::remove_dir_all(dir);
    println!("{}", serde_json::to_string(&result)?);
    println!(
        "coldstart: median {:.1} ms from process start to first answered request, idle RSS {} KiB, database {} MB",
        startups.get(1).copied().unwrap_or(f64::NAN),
        rss.get(1).copied().unwrap_or(0),
        result["prefill"]["db_bytes"].as_u64().unwrap_or(0) / 1_000_000
    );
    Ok(())
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()))
    });
    json!({ "cpus": cpus, "mem_kib": mem_kib })
}

/// The process's CPU time so far (user + system), in clock ticks, from `/proc/<pid>/stat`.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after its end.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ, which Linux fixes at 100 for userspace).
const TICKS_PER_SECOND: f64 = 100.0;

//! A worker process: opens its share of the connections from its own source address, logs them
//! in, reports ready, waits for "go" on stdin, runs the scenario, and prints progress and a final
//! result (counts and an HDR histogram of latencies in microseconds) as JSON lines.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::serialization::{Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    acked: AtomicU64,
    delivered: AtomicU64,
    errors: AtomicU64,
    ops: AtomicU64,
}

/// Sending half of a client connection.
enum Tx {
    Tcp(OwnedWriteHalf),
    Quic(quinn::SendStream),
    Ws(SplitSink<Ws, Message>),
}

/// Receiving half.
enum Rx {
    Tcp(OwnedReadHalf, BytesMut),
    Quic(quinn::RecvStream, BytesMut),
    Ws(SplitStream<Ws>),
}

impl Tx {
    async fn send(&mut self, body: &Value) -> anyhow::Result<()> {
        let text = body.to_string();
        match self {
            Tx::Tcp(w) => {
                let cmd = body["cmd"].as_u64().unwrap_or(0) as u8;
                w.write_all(&schema::frame::encode_request(cmd, None, text.as_bytes())).await?;
            }
            Tx::Quic(w) => {
                let cmd = body["cmd"].as_u64().unwrap_or(0) as u8;
                w.write_all(&schema::frame::encode_request(cmd, None, text.as_bytes())).await?;
            }
            Tx::Ws(w) => w.send(Message::text(text)).await?,
        }
        Ok(())
    }
}

impl Rx {
    /// The next frame: command and body.
    async fn recv(&mut self) -> anyhow::Result<(u8, Bytes)> {
        match self {
            Rx::Tcp(r, buf) => loop {
                if let Some(f) = schema::frame::decode(buf, usize::MAX >> 1).map_err(|e| anyhow::anyhow!("{e}"))? {
                    return Ok((f.cmd.code(), f.body));
                }
                if r.read_buf(buf).await? == 0 {
                    bail!("closed");
                }
            },
            Rx::Quic(r, buf) => loop {
                if let Some(f) = schema::frame::decode(buf, usize::MAX >> 1).map_err(|e| anyhow::anyhow!("{e}"))? {
                    return Ok((f.cmd.code(), f.body));
                }
                if r.read_buf(buf).await? == 0 {
                    bail!("closed");
                }
            },
            Rx::Ws(s) => loop {
                match s.next().await {
                    Some(Ok(Message::Text(t))) => {
                        let body = Bytes::from(t);
                        let v: Value = serde_json::from_slice(&body)?;
                        return Ok((v["command"].as_u64().unwrap_or(0) as u8, body));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(e.into()),
                    None => bail!("closed"),
                }
            },
        }
    }

    /// Frames until one with command `cmd`.
    async fn until(&mut self, cmd: u8) -> anyhow::Result<Bytes> {
        loop {
            let (c, body) = self.recv().await?;
            if c == cmd {
                return Ok(body);
            }
        }
    }
}

fn tcp_socket(bind: IpAddr) -> anyhow::Result<tokio::net::TcpSocket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    // Lets thousands of sockets share a source address without reserving a port at bind time.
    set_bind_address_no_port(&socket)?;
    socket.bind(&SocketAddr::new(bind, 0).into())?;
    socket.set_nonblocking(true)?;
    socket.set_nodelay(true)?;
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}

fn set_bind_address_no_port(socket: &socket2::Socket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // setsockopt with a valid fd, a pointer to a live c_int and its exact size.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One QUIC endpoint (one UDP socket) per worker, shared by all its connections.
static QUIC: tokio::sync::OnceCell<quinn::Endpoint> = tokio::sync::OnceCell::const_new();

async fn quic_endpoint(cfg: &Value) -> anyhow::Result<&'static quinn::Endpoint> {
    QUIC.get_or_try_init(|| async {
        use rustls::pki_types::pem::PemObject;
        let root = rustls::pki_types::CertificateDer::from_pem_file(cfg["ca"].as_str().context("ca")?)?;
        let config = tests::quic_client_config(&[b"kefu/1"], root)?;
        let bind: IpAddr = cfg["bind"].as_str().unwrap_or("127.0.0.1").parse()?;
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
        // One socket carries every connection of this worker: the same large buffer as the node's.
        node::transport::quic::enlarge_recv_buffer(&socket, node::transport::quic::UDP_RECV_BUFFER);
        socket.bind(&SocketAddr::new(bind, 0).into())?;
        let runtime = quinn::default_runtime().context("runtime")?;
        let mut endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket.into(), runtime)?;
        endpoint.set_default_client_config(config);
        Ok::<_, anyhow::Error>(endpoint)
    })
    .await
}

async fn connect(cfg: &Value, user: &str) -> anyhow::Result<(Tx, Rx)> {
    if cfg["transport"] == "quic" {
        let addr: SocketAddr = cfg["quic_addr"].as_str().context("quic_addr")?.parse()?;
        let conn = quic_endpoint(cfg).await?.connect(addr, "localhost")?.await?;
        let (send, recv) = conn.open_bi().await?;
        let (mut tx, mut rx) = (Tx::Quic(send), Rx::Quic(recv, BytesMut::with_capacity(512)));
        if cfg["login"] == false {
            tx.send(&json!({"cmd": 13})).await?;
            rx.until(13).await?;
            return Ok((tx, rx));
        }
        log_in(&mut tx, &mut rx, user).await?;
        return Ok((tx, rx));
    }
    let addr: SocketAddr = cfg["addr"].as_str().context("addr")?.parse()?;
    let bind: IpAddr = cfg["bind"].as_str().unwrap_or("127.0.0.1").parse()?;
    let stream = tcp_socket(bind)?.connect(addr).await?;
    let (mut tx, mut rx) = if cfg["transport"] == "ws" {
        let mut config = WebSocketConfig::default();
        config.read_buffer_size = 4096;
        config.write_buffer_size = 0;
        let (ws, _) = tokio_tungstenite::client_async_with_config(format!("ws://{addr}/"), stream, Some(config)).await?;
        let (sink, stream) = ws.split();
        (Tx::Ws(sink), Rx::Ws(stream))
    } else {
        let (r, w) = stream.into_split();
        (Tx::Tcp(w), Rx::Tcp(r, BytesMut::with_capacity(512)))
    };
    if cfg["login"] == false {
        // A session without a user: one heartbeat makes the node start it.
        tx.send(&json!({"cmd": 13})).await?;
        rx.until(13).await?;
        return Ok((tx, rx));
    }
    log_in(&mut tx, &mut rx, user).await?;
    Ok((tx, rx))
}

/// Logs `user` in; a busy answer (11015: the node's password-hashing queue is full, as when
/// thousands of connections log in at once) is retried after 100 ms, for five minutes at most
/// (10,000 logins with the default argon2 take about two on this machine).
async fn log_in(tx: &mut Tx, rx: &mut Rx, user: &str) -> anyhow::Result<()> {
    let login = json!({"cmd": 5, "userId": user, "password": "pw"});
    for _ in 0..3000 {
        tx.send(&login).await?;
        let reply: Value = serde_json::from_slice(&rx.until(6).await?)?;
        match reply["code"].as_u64() {
            Some(10007) => return Ok(()),
            Some(11015) => tokio::time::sleep(Duration::from_millis(100)).await,
            _ => bail!("login failed: {reply}"),
        }
    }
    bail!("login of {user} still busy after five minutes")
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// Where a worker's progress and result lines go.
pub type Report = Arc<dyn Fn(Value) + Send + Sync>;

/// Runs the worker described by `cfg` (JSON) as a process: "ready" and results on stdout, "go"
/// awaited on stdin.
pub async fn run(cfg: &str) -> anyhow::Result<()> {
    let cfg: Value = serde_json::from_str(cfg)?;
    let go = async {
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if line.trim() == "go" {
                break;
            }
        }
    };
    run_with(cfg, go, Arc::new(|v: Value| println!("{v}"))).await
}

/// Runs a worker: connects, reports ready, waits for `go`, runs the scenario, reports progress
/// every second and the result at the end.
pub async fn run_with(cfg: Value, go: impl std::future::Future<Output = ()>, report: Report) -> anyhow::Result<()> {
    let scenario = cfg["scenario"].as_str().unwrap_or_default().to_string();
    let first = cfg["first"].as_u64().unwrap_or(0);
    let count = cfg["count"].as_u64().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(cfg["duration"].as_u64().unwrap_or(60)) + Duration::from_secs(600);
    let counters = Arc::new(Counters::default());
    let hist = Arc::new(Mutex::new(new_hist()));

    // Connect and log in, 256 at a time (64 for QUIC, whose handshakes cost more CPU).
    let gate = Arc::new(Semaphore::new(if cfg["transport"] == "quic" { 64 } else { 256 }));
    let mut pending = Vec::new();
    for i in first..first + count {
        let (cfg, gate) = (cfg.clone(), Arc::clone(&gate));
        let scenario = scenario.clone();
        pending.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let user = format!("lg{i}");
            let (mut tx, mut rx) = connect(&cfg, &user).await?;
            if scenario == "group" {
                tx.send(&json!({"cmd": 7, "groupId": "lgbench"})).await?;
                // Requests are answered in order: the heartbeat reply means the join is done.
                tx.send(&json!({"cmd": 13})).await?;
                rx.until(13).await?;
            }
            Ok::<_, anyhow::Error>((i, tx, rx))
        }));
    }
    let mut conns = Vec::with_capacity(pending.len());
    for p in pending {
        conns.push(p.await??);
    }
    report(json!({"type": "ready", "conns": conns.len()}));
    go.await;
    let started = Instant::now();
    let progress = {
        let (counters, report) = (Arc::clone(&counters), Arc::clone(&report));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                report(snapshot(&counters, None, 0.0));
            }
        })
    };

    match scenario.as_str() {
        "idle" => idle(conns, Duration::from_millis(cfg["spread_ms"].as_u64().unwrap_or(0)), &counters).await,
        "chat" => chat(conns, &cfg, &counters, &hist, deadline).await,
        "group" => group(conns, &cfg, &counters, &hist, deadline).await,
        "history" => history(conns, &cfg, &counters, &hist).await,
        "churn" => churn(&cfg, &counters, &hist, deadline).await,
        _ => bail!("unknown scenario {scenario}"),
    }
    progress.abort();
    // QUIC connections end with a CONNECTION_CLOSE the node sees at once (a worker that is killed
    // leaves them open at the node until its idle timeout).
    if let Some(endpoint) = QUIC.get() {
        endpoint.close(0u32.into(), b"done");
        let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    }
    let hist = hist.lock().map(|h| h.clone()).unwrap_or_else(|_| new_hist());
    report(snapshot(&counters, Some(&hist), started.elapsed().as_secs_f64()));
    Ok(())
}

fn snapshot(c: &Counters, hist: Option<&Histogram<u64>>, seconds: f64) -> Value {
    let mut v = json!({
        "type": if hist.is_some() { "result" } else { "progress" },
        "sent": c.sent.load(Relaxed), "acked": c.acked.load(Relaxed), "delivered": c.delivered.load(Relaxed),
        "errors": c.errors.load(Relaxed), "ops": c.ops.load(Relaxed), "seconds": seconds,
    });
    if let Some(h) = hist {
        let mut buf = Vec::new();
        if V2Serializer::new().serialize(h, &mut buf).is_ok() {
            v["hist"] = json!(base64::engine::general_purpose::STANDARD.encode(buf));
        }
    }
    v
}

/// Every connection answers one heartbeat: proves they are all alive. The heartbeats go out evenly
/// over `spread` (all at once when it is zero).
async fn idle(conns: Vec<(u64, Tx, Rx)>, spread: Duration, counters: &Arc<Counters>) {
    let mut tasks = Vec::new();
    let (start, n) = (Instant::now(), conns.len().max(1) as f64);
    for (k, (_, mut tx, mut rx)) in conns.into_iter().enumerate() {
        let counters = Arc::clone(counters);
        let due = start + spread.mul_f64(k as f64 / n);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(due.into()).await;
            let ok = async {
                tx.send(&json!({"cmd": 13})).await?;
                rx.until(13).await?;
                Ok::<_, anyhow::Error>(())
            };
            let failure = match tokio::time::timeout(Duration::from_secs(30), ok).await {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!("heartbeat failed: {e:#}")),
                Err(_) => Some("heartbeat not answered within 30 s".to_string()),
            };
            match failure {
                None => drop(counters.ops.fetch_add(1, Relaxed)),
                // The first few reasons go to stderr: a closed connection and a late answer call
                // for different fixes.
                Some(reason) => {
                    if counters.errors.fetch_add(1, Relaxed) < 3 {
                        eprintln!("{reason}");
                    }
                }
            }
            (tx, rx)
        }));
    }
    // Keep the connections open until every heartbeat is in.
    let mut kept = Vec::new();
    for t in tasks {
        if let Ok(pair) = t.await {
            kept.push(pair);
        }
    }
    drop(kept);
}

/// Reads pushes and replies: counts acks and deliveries, records delivery latency from the send
/// time carried in the content.
fn spawn_reader(
    mut rx: Rx,
    counters: Arc<Counters>,
    hist: Arc<Mutex<Histogram<u64>>>,
    acks: Arc<tokio::sync::Semaphore>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut local = new_hist();
        let mut flushed = Instant::now();
        while let Ok((cmd, body)) = rx.recv().await {
            match cmd {
                11 => {
                    counters.delivered.fetch_add(1, Relaxed);
                    if let Some(sent) = sent_at(&body) {
                        let _ = local.record(now_us().saturating_sub(sent).max(1));
                    }
                }
                12 => {
                    let ok = body.windows(12).any(|w| w == b"\"code\":10000" || w == b"\"code\":10001");
                    if ok {
                        counters.acked.fetch_add(1, Relaxed);
                    } else {
                        counters.errors.fetch_add(1, Relaxed);
                    }
                    acks.add_permits(1);
                }
                _ => {}
            }
            if flushed.elapsed() > Duration::from_millis(500) {
                if let Ok(mut h) = hist.lock() {
                    let _ = h.add(&local);
                }
                local.reset();
                flushed = Instant::now();
            }
        }
        if let Ok(mut h) = hist.lock() {
            let _ = h.add(&local);
        }
    })
}

/// When a pushed chat was sent (µs since the epoch): the number its content starts with
/// (`{sent}:{i}`). Found by scanning the body for `"content":"` rather than parsing the JSON, which
/// was most of the load generator's own time per delivery in the fan-out (10,000 receivers).
fn sent_at(body: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"content\":\"";
    let start = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = body[start..].iter().take_while(|b| b.is_ascii_digit()).count();
    if body.get(start + digits) != Some(&b':') {
        return None;
    }
    std::str::from_utf8(&body[start..start + digits]).ok()?.parse().ok()
}

/// Sends `messages` chats from `tx` to `target` at `rate` per second (0 = as fast as the window
/// of unacknowledged sends allows), the first `phase` (a fraction of one interval) after the start.
#[allow(clippy::too_many_arguments)]
async fn send_loop(
    mut tx: Tx,
    target: Value,
    messages: u64,
    rate: f64,
    phase: f64,
    window: Arc<Semaphore>,
    counters: Arc<Counters>,
    deadline: Instant,
) -> Tx {
    let interval = if rate > 0.0 { Some(Duration::from_secs_f64(1.0 / rate)) } else { None };
    let start = Instant::now();
    for i in 0..messages {
        if Instant::now() > deadline {
            break;
        }
        if let Some(iv) = interval {
            let due = start + iv.mul_f64(i as f64 + phase);
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(permit) = window.acquire().await else { break };
        permit.forget();
        let mut body = target.clone();
        body["cmd"] = json!(11);
        body["content"] = json!(format!("{}:{i}", now_us()));
        if tx.send(&body).await.is_err() {
            counters.errors.fetch_add(1, Relaxed);
            break;
        }
        counters.sent.fetch_add(1, Relaxed);
    }
    tx
}

async fn chat(conns: Vec<(u64, Tx, Rx)>, cfg: &Value, counters: &Arc<Counters>, hist: &Arc<Mutex<Histogram<u64>>>, deadline: Instant) {
    let senders = conns.len().max(1) as u64;
    let per = cfg["messages"].as_u64().unwrap_or(0) / senders;
    let rate = cfg["rate"].as_f64().unwrap_or(0.0) / senders as f64;
    let window = cfg["window"].as_u64().unwrap_or(32) as usize;
    let mut readers = Vec::new();
    let mut sends = Vec::new();
    for (k, (i, tx, rx)) in conns.into_iter().enumerate() {
        // Senders are spread evenly over one interval: started in step, a rate of 5,000/s from
        // 100 senders would arrive as 50 bursts of 100, not as a steady stream.
        let phase = k as f64 / senders as f64;
        let partner = if i % 2 == 0 { i + 1 } else { i - 1 };
        let acks = Arc::new(Semaphore::new(window));
        readers.push(spawn_reader(rx, Arc::clone(counters), Arc::clone(hist), Arc::clone(&acks)));
        let target = json!({"chatType": 2, "to": format!("lg{partner}")});
        sends.push(tokio::spawn(send_loop(tx, target, per, rate, phase, acks, Arc::clone(counters), deadline)));
    }
    let mut txs = Vec::new();
    for s in sends {
        if let Ok(tx) = s.await {
            txs.push(tx);
        }
    }
    // Wait (bounded) for the last deliveries and acks.
    let expected = counters.sent.load(Relaxed);
    let until = Instant::now() + Duration::from_secs(30);
    while (counters.acked.load(Relaxed) + counters.errors.load(Relaxed) < expected
        || counters.delivered.load(Relaxed) < counters.acked.load(Relaxed))
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in readers {
        r.abort();
        let _ = r.await;
    }
    drop(txs);
}

async fn group(conns: Vec<(u64, Tx, Rx)>, cfg: &Value, counters: &Arc<Counters>, hist: &Arc<Mutex<Histogram<u64>>>, deadline: Instant) {
    let messages = cfg["messages"].as_u64().unwrap_or(0);
    let rate = cfg["rate"].as_f64().unwrap_or(0.0);
    let window = cfg["window"].as_u64().unwrap_or(8) as usize;
    let mut readers = Vec::new();
    let mut sender = None;
    let acks = Arc::new(Semaphore::new(window));
    for (n, (_, tx, rx)) in conns.into_iter().enumerate() {
        readers.push(spawn_reader(rx, Arc::clone(counters), Arc::clone(hist), Arc::clone(&acks)));
        if n == 0 && messages > 0 {
            sender = Some(tx);
        } else {
            std::mem::forget(tx); // keep the connection open; the process exits at the end
        }
    }
    if let Some(tx) = sender {
        let target = json!({"chatType": 1, "groupId": "lgbench"});
        let _tx = send_loop(tx, target, messages, rate, 0.0, acks, Arc::clone(counters), deadline).await;
        let until = Instant::now() + Duration::from_secs(30);
        while counters.acked.load(Relaxed) < counters.sent.load(Relaxed) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Deliveries keep arriving after the last ack; wait until they stop growing (bounded).
    let mut last = u64::MAX;
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = counters.delivered.load(Relaxed);
        if now == last {
            break;
        }
        last = now;
    }
    for r in readers {
        r.abort();
        let _ = r.await;
    }
}

async fn history(conns: Vec<(u64, Tx, Rx)>, cfg: &Value, counters: &Arc<Counters>, hist: &Arc<Mutex<Histogram<u64>>>) {
    let readers = conns.len().max(1) as u64;
    let per = cfg["reads"].as_u64().unwrap_or(0) / readers;
    let conversations = cfg["conversations"].as_u64().unwrap_or(1).max(1);
    let readers_total = cfg["readers_total"].as_u64().unwrap_or(readers).max(1);
    let mut tasks = Vec::new();
    for (i, mut tx, mut rx) in conns {
        let (counters, hist) = (Arc::clone(counters), Arc::clone(hist));
        tasks.push(tokio::spawn(async move {
            let mut local = new_hist();
            for r in 0..per {
                // One of this reader's prefilled conversations (with peer{k}, k ≡ i mod readers),
                // spread over all of them.
                let own = (conversations / readers_total).max(1);
                let k = i + readers_total * ((r * 104_729 + i * 7919) % own);
                let started = Instant::now();
                let ok = async {
                    tx.send(&json!({"cmd": 19, "type": 1, "fromUserId": format!("peer{k}"), "count": 50})).await?;
                    rx.until(20).await
                };
                match ok.await {
                    Ok(body) => {
                        let _ = local.record(started.elapsed().as_micros().max(1) as u64);
                        // Each read must really return the newest 50 of a prefilled conversation.
                        let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                        if v["data"]["friends"][format!("peer{k}")].as_array().map(Vec::len) == Some(50) {
                            counters.ops.fetch_add(1, Relaxed);
                        } else {
                            counters.errors.fetch_add(1, Relaxed);
                        }
                    }
                    Err(_) => {
                        counters.errors.fetch_add(1, Relaxed);
                        break;
                    }
                }
            }
            if let Ok(mut h) = hist.lock() {
                let _ = h.add(&local);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

async fn churn(cfg: &Value, counters: &Arc<Counters>, hist: &Arc<Mutex<Histogram<u64>>>, deadline: Instant) {
    let cycles = cfg["cycles"].as_u64().unwrap_or(0);
    let rate = cfg["rate"].as_f64().unwrap_or(100.0).max(1.0);
    let worker = cfg["worker"].as_u64().unwrap_or(0);
    let gate = Arc::new(Semaphore::new(512));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..cycles {
        if Instant::now() > deadline {
            break;
        }
        tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / rate)).into()).await;
        let (cfg, counters, hist, gate) = (cfg.clone(), Arc::clone(counters), Arc::clone(hist), Arc::clone(&gate));
        tasks.push(tokio::spawn(async move {
            let Ok(_permit) = gate.acquire_owned().await else { return };
            let started = Instant::now();
            let user = format!("churn{worker}-{}", i % 1000);
            match connect(&cfg, &user).await {
                Ok((mut tx, mut rx)) => {
                    let elapsed = started.elapsed().as_micros().max(1) as u64;
                    if let Ok(mut h) = hist.lock() {
                        let _ = h.record(elapsed);
                    }
                    counters.ops.fetch_add(1, Relaxed);
                    let _ = tx.send(&json!({"cmd": 14})).await;
                    let _ = tokio::time::timeout(Duration::from_secs(5), rx.until(14)).await;
                }
                Err(_) => {
                    counters.errors.fetch_add(1, Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

// Not `tests`: that name is the test-harness crate this file uses.
#[cfg(test)]
mod unit {
    use super::sent_at;

    #[test]
    fn the_send_time_is_read_from_a_pushed_chat() {
        let push = br#"{"command":11,"data":{"from":"lg1","content":"1733350000123456:7","createTime":1}}"#;
        assert_eq!(sent_at(push), Some(1_733_350_000_123_456));
        assert_eq!(sent_at(br#"{"data":{"content":"hello"}}"#), None);
        assert_eq!(sent_at(br#"{"data":{"content":"12"}}"#), None);
        assert_eq!(sent_at(b"{}"), None);
    }
}

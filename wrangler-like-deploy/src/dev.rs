//! `kefu dev`: nodes in several regions on this machine, with a dev cluster CA, the mesh between
//! them and one router in front, all under `.kefu/state`. Ctrl-C (SIGINT) or SIGTERM stops every
//! process it started; a node or the router that dies on its own stops the rest too, so nothing
//! outlives it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::config::App;
use crate::ui;

/// `kefu dev`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Regions (comma separated; default kefu.toml's, else iad,fra,sin).
    #[arg(long, value_delimiter = ',')]
    pub regions: Option<Vec<String>>,
    /// Nodes in each region (default kefu.toml's, else 1).
    #[arg(long)]
    pub nodes_per_region: Option<u32>,
    /// The router's HTTP and WebSocket port (0: any free one).
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    /// The router's J-IM binary TCP port (0: any free one).
    #[arg(long, default_value_t = 8788)]
    pub tcp_port: u16,
    /// The node executable (default: `kefu-node` beside this one, else this executable itself).
    #[arg(long)]
    pub node_bin: Option<PathBuf>,
    /// State directory (default .kefu/state beside kefu.toml, or in the working directory).
    #[arg(long)]
    pub state: Option<PathBuf>,
}

/// A started node.
struct DevNode {
    id: String,
    region: String,
    jim: String,
    tls: String,
    quic: String,
    admin: String,
    mesh: u16,
    child: Child,
}

/// Runs `kefu dev` until a signal.
pub fn run(args: DevArgs, app: Option<&App>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?.block_on(run_async(args, app))
}

/// The router of `kefu dev` (this executable with `KEFU_RUN_AS=router`).
pub fn router_main() -> anyhow::Result<()> {
    edge_router::main()
}

/// The data dirs under a dev state dir: (node id, dir), by id.
pub fn node_dirs(state: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(state.join("nodes"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
        .collect();
    out.sort();
    out
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A port free for both TCP and UDP (TLS and QUIC share one number on a node).
fn free_shared_port() -> anyhow::Result<u16> {
    for _ in 0..50 {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        let port = tcp.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no port free for both TCP and UDP")
}

fn node_command(args: &DevArgs) -> anyhow::Result<(PathBuf, bool)> {
    if let Some(bin) = &args.node_bin {
        return Ok((bin.clone(), false));
    }
    let me = std::env::current_exe()?;
    let beside = me.with_file_name("kefu-node");
    if beside.is_file() {
        return Ok((beside, false));
    }
    Ok((me, true))
}

async fn run_async(args: DevArgs, app: Option<&App>) -> anyhow::Result<()> {
    ui::banner();
    let base = match app {
        Some(a) => a.dir().to_path_buf(),
        None => std::env::current_dir()?,
    };
    let state = args.state.clone().unwrap_or_else(|| base.join(".kefu").join("state"));
    std::fs::create_dir_all(state.join("logs"))?;
    let lock_file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(state.join("dev.lock"))?;
    if lock_file.try_lock().is_err() {
        bail!("another `kefu dev` runs on {} — stop it first, or pass --state", state.display());
    }
    let regions: Vec<String> =
        args.regions.clone().or_else(|| app.map(|a| a.regions.clone())).unwrap_or_else(|| ["iad", "fra", "sin"].map(String::from).to_vec());
    if regions.is_empty() {
        bail!("--regions names none");
    }
    let per_region = args.nodes_per_region.or(app.map(|a| a.nodes_per_region)).unwrap_or(1).max(1);
    let ca = state.join("ca");
    node::mesh::tls::make_ca(&ca)?;
    // The nodes' environment: kefu.toml's vars, then .dev.vars (local secrets) over them.
    let mut env = app.map(|a| a.vars.clone()).unwrap_or_default();
    env.extend(crate::config::dev_vars(&base)?);
    let ids: Vec<(String, String, u16)> = regions
        .iter()
        .flat_map(|r| (1..=per_region).map(move |i| (format!("{r}-{i}"), r.clone())))
        .map(|(id, r)| free_udp_port().map(|p| (id, r, p)))
        .collect::<anyhow::Result<_>>()?;
    let (bin, as_self) = node_command(&args)?;
    ui::step(&format!("Starting {} node(s) in {} with {}", ids.len(), regions.join(", "), bin.display()));
    let mut nodes: Vec<DevNode> = Vec::new();
    let started = start_nodes(&ids, &bin, as_self, &state, &ca, &env, &mut nodes).await;
    if let Err(e) = started {
        stop_all(&mut nodes, None).await;
        return Err(e);
    }
    // The router, once every node reports ready (its mesh is up).
    let router = match start_router(&args, &state, &regions, &nodes).await {
        Ok(r) => r,
        Err(e) => {
            stop_all(&mut nodes, None).await;
            return Err(e);
        }
    };
    let (mut router_child, http, tcp) = router;
    print_table(&nodes, &http, &tcp);
    let summary = serde_json::json!({
        "pid": std::process::id(),
        "router": {"http": http, "tcp": tcp, "pid": router_child.id()},
        "nodes": nodes.iter().map(|n| serde_json::json!({
            "id": n.id, "region": n.region, "jim": n.jim, "tls": n.tls, "quic": n.quic, "admin": n.admin, "mesh": n.mesh,
            "pid": n.child.id(),
        })).collect::<Vec<_>>(),
    });
    std::fs::write(state.join("dev.json"), serde_json::to_string_pretty(&summary)?)?;
    ui::record("dev", summary);
    println!("Ready on http://{http}");
    let why = wait_for_stop(&mut nodes, &mut router_child).await;
    eprintln!("{why}: stopping every node and the router");
    stop_all(&mut nodes, Some(&mut router_child)).await;
    let _ = std::fs::remove_file(state.join("dev.json"));
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn start_nodes(
    ids: &[(String, String, u16)],
    bin: &Path,
    as_self: bool,
    state: &Path,
    ca: &Path,
    env: &std::collections::BTreeMap<String, String>,
    nodes: &mut Vec<DevNode>,
) -> anyhow::Result<()> {
    for (id, region, mesh) in ids {
        let shared = free_shared_port()?;
        let data = state.join("nodes").join(id);
        let mut cmd = Command::new(bin);
        cmd.args(["--profile", "dev", "--node-id", id, "--region", region])
            .arg("--data-dir")
            .arg(&data)
            .args(["--jim-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
            .args(["--tls-addr", &format!("127.0.0.1:{shared}"), "--quic-addr", &format!("127.0.0.1:{shared}")])
            .args(["--mesh-addr", &format!("127.0.0.1:{mesh}")])
            .arg("--cluster-ca")
            .arg(ca.join("ca.pem"))
            .args(["--replay-writes", "true", "--drain-timeout", "2"]);
        for (other, other_region, other_mesh) in ids.iter().filter(|(o, _, _)| o != id) {
            cmd.args(["--peer", &format!("{other}@{other_region}=127.0.0.1:{other_mesh}")]);
        }
        cmd.envs(env.iter());
        if as_self {
            cmd.env("KEFU_RUN_AS", "node");
        }
        let log = std::fs::File::create(state.join("logs").join(format!("{id}.log")))?;
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::from(log)).kill_on_drop(true);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let (mut jim, mut admin) = (String::new(), String::new());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = tokio::time::timeout(left, lines.next_line())
                .await
                .map_err(|_| anyhow::anyhow!("node {id} did not start within 60 s"))??;
            let Some(line) = line else {
                nodes.push(DevNode {
                    id: id.clone(),
                    region: region.clone(),
                    jim,
                    tls: String::new(),
                    quic: String::new(),
                    admin,
                    mesh: *mesh,
                    child,
                });
                bail!("node {id} exited while starting: see {}", state.join("logs").join(format!("{id}.log")).display());
            };
            if let Some(v) = word_value(&line, "jim=") {
                jim = v;
            }
            if let Some(v) = word_value(&line, "admin=") {
                admin = v;
            }
            if line.starts_with("kefu-node ready") {
                break;
            }
        }
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let addr = format!("127.0.0.1:{shared}");
        nodes.push(DevNode { id: id.clone(), region: region.clone(), jim, tls: addr.clone(), quic: addr, admin, mesh: *mesh, child });
    }
    // Ready: every node has its peers and is caught up.
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in nodes.iter() {
        loop {
            let ok = http.get(format!("http://{}/readyz", n.admin)).send().await.is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("node {} did not become ready within 60 s", n.id);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

async fn start_router(args: &DevArgs, state: &Path, regions: &[String], nodes: &[DevNode]) -> anyhow::Result<(Child, String, String)> {
    let mut toml = format!(
        "# Written by `kefu dev`.\nlisten = \"127.0.0.1:{}\"\ntcp_listen = \"127.0.0.1:{}\"\nregion = \"{}\"\nfallback = [{}]\npoll_ms = 500\n",
        args.port,
        args.tcp_port,
        regions[0],
        regions.iter().skip(1).map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", ")
    );
    for n in nodes {
        toml.push_str(&format!(
            "\n[[nodes]]\nid = \"{}\"\nregion = \"{}\"\nhttp = \"{}\"\nadmin = \"{}\"\nquic = \"{}\"\n",
            n.id, n.region, n.jim, n.admin, n.quic
        ));
    }
    let path = state.join("router.toml");
    std::fs::write(&path, toml)?;
    let log = std::fs::File::create(state.join("logs").join("router.log"))?;
    let mut child = Command::new(std::env::current_exe()?)
        .env("KEFU_RUN_AS", "router")
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("starting the router")?;
    let mut lines = BufReader::new(child.stdout.take().context("no stdout")?).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .map_err(|_| anyhow::anyhow!("the router did not start within 30 s"))??
        .with_context(|| {
            format!("the router exited: see {} (is port {} taken? pass --port)", state.join("logs/router.log").display(), args.port)
        })?;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let (http, tcp) = (word_value(&line, "http=").unwrap_or_default(), word_value(&line, "tcp=").unwrap_or_default());
    // Until the router's health polls have every region.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    for region in regions {
        loop {
            let answer = client.get(format!("http://{http}/v1/connect?region={region}")).send().await;
            let got: Option<serde_json::Value> = match answer {
                Ok(r) if r.status().is_success() => r.json().await.ok(),
                _ => None,
            };
            if got.is_some_and(|v| v["region"] == region.as_str()) {
                break;
            }
            if Instant::now() > deadline {
                bail!("the router has no healthy node in {region} after 30 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok((child, http, tcp))
}

/// The value of the `name=value` word of a process's "listening" line (`name` with its `=`).
fn word_value(line: &str, name: &str) -> Option<String> {
    line.split_whitespace().find_map(|w| w.strip_prefix(name)).map(str::to_string)
}

fn print_table(nodes: &[DevNode], http: &str, tcp: &str) {
    println!();
    let head = ["node", "region", "J-IM (tcp/http/ws)", "TLS (tcp)", "QUIC (udp)", "admin", "mesh (udp)"];
    println!("{:<8} {:<7} {:<22} {:<22} {:<22} {:<22} {}", head[0], head[1], head[2], head[3], head[4], head[5], head[6]);
    for n in nodes {
        println!("{:<8} {:<7} {:<22} {:<22} {:<22} {:<22} 127.0.0.1:{}", n.id, n.region, n.jim, n.tls, n.quic, n.admin, n.mesh);
    }
    println!("{:<8} {:<7} http://{http}  J-IM tcp {tcp}", "router", "-");
    println!();
}

/// Until SIGINT, SIGTERM, or a process of ours exits on its own; says which.
async fn wait_for_stop(nodes: &mut [DevNode], router: &mut Child) -> String {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => return format!("cannot watch SIGTERM ({e})"),
    };
    let any_node = async {
        loop {
            for n in nodes.iter_mut() {
                if let Ok(Some(status)) = n.child.try_wait() {
                    return format!("node {} exited ({status})", n.id);
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted".to_string(),
        _ = term.recv() => "SIGTERM".to_string(),
        status = router.wait() => format!("the router exited ({status:?})"),
        why = any_node => why,
    }
}

/// SIGTERM to every process (a node drains and says goodbye to its peers), then SIGKILL to any
/// still running after 5 s; waits for all of them.
async fn stop_all(nodes: &mut [DevNode], router: Option<&mut Child>) {
    let mut children: Vec<&mut Child> = nodes.iter_mut().map(|n| &mut n.child).collect();
    if let Some(r) = router {
        children.push(r);
    }
    for c in children.iter() {
        if let Some(pid) = c.id() {
            terminate(pid);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for c in children.iter_mut() {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, c.wait()).await.is_err() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
    let _ = tokio::io::stdout().flush().await;
}

/// Sends SIGTERM to `pid`.
#[allow(unsafe_code)]
fn terminate(pid: u32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill(2) takes two integers and touches no memory of ours; `pid` is a child we
    // started and have not yet reaped, so the number cannot name another process.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
}

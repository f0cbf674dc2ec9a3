//! Node configuration: every setting is a flag, an environment variable `KEFU_<NAME>` and a key
//! in an optional TOML file (`--config`), in that order of precedence, then the default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;

/// Which rules apply: `dev` registers unknown users on first login and waives the API key;
/// `prod` refuses unknown users and requires the API key for the HTTP APIs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Local development and the J-IM demo page.
    Dev,
    /// Production.
    Prod,
}

/// What an acknowledged message survives. `disk` (the default) fsyncs the WAL at every commit:
/// a success reply means the message is on disk, through kill -9, a kernel crash or a power loss.
/// `process` leaves the flush to the OS (SQLite's `synchronous = NORMAL` in WAL mode): a killed
/// node loses nothing, but a power loss or kernel crash can lose the last commits it
/// acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Survives power loss: an fsync per commit.
    #[default]
    Disk,
    /// Survives the process dying, not the machine: no fsync per commit.
    Process,
}

/// Command-line flags. Every field is optional here so that the file can fill what the flags and
/// environment leave out.
#[derive(Debug, Default, Parser)]
#[command(name = "kefu-node", version, about = "kefu chat node: J-IM compatible TCP, WebSocket and HTTP on one port")]
pub struct Flags {
    /// An operator's command instead of running the node.
    #[command(subcommand)]
    pub tool: Option<crate::tools::Tool>,
    /// TOML file with any of the settings below (keys in snake_case, e.g. data_dir).
    #[arg(long, env = "KEFU_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the libSQL database and the token key.
    #[arg(long, env = "KEFU_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// dev or prod.
    #[arg(long, env = "KEFU_PROFILE", value_enum)]
    pub profile: Option<Profile>,
    /// The J-IM port: binary TCP, HTTP and WebSocket, sniffed.
    #[arg(long, env = "KEFU_JIM_ADDR", value_parser = bind_addr)]
    pub jim_addr: Option<SocketAddr>,
    /// Health, readiness and Prometheus metrics.
    #[arg(long, env = "KEFU_ADMIN_ADDR", value_parser = bind_addr)]
    pub admin_addr: Option<SocketAddr>,
    /// The J-IM port's protocols inside TLS (ALPN kefu-tcp/1, h2, http/1.1).
    #[arg(long, env = "KEFU_TLS_ADDR", value_parser = bind_addr)]
    pub tls_addr: Option<SocketAddr>,
    /// QUIC (UDP): ALPN kefu/1, J-IM binary framing on bidirectional streams.
    #[arg(long, env = "KEFU_QUIC_ADDR", value_parser = bind_addr)]
    pub quic_addr: Option<SocketAddr>,
    /// Seconds without packets before a QUIC connection is closed (clients keep alive below it).
    #[arg(long, env = "KEFU_QUIC_IDLE_TIMEOUT")]
    pub quic_idle_timeout: Option<u64>,
    /// What an acknowledged message survives: disk (default: power loss too) or process (kill -9
    /// only; a power loss can lose the last acknowledged commits).
    #[arg(long, env = "KEFU_DURABILITY", value_enum)]
    pub durability: Option<Durability>,
    /// PEM certificate chain; without it (and --tls-key) a self-signed one is made in the data dir.
    #[arg(long, env = "KEFU_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert. Both files are read again on SIGHUP.
    #[arg(long, env = "KEFU_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Seconds without traffic before a connection is closed; 0 turns the check off.
    #[arg(long, env = "KEFU_HEARTBEAT_TIMEOUT")]
    pub heartbeat_timeout: Option<u64>,
    /// Threads that run the connections; 0 (the default) is one per core less the one the store's
    /// writer thread keeps busy, at least one.
    #[arg(long, env = "KEFU_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Customer service: seconds an assigned agent may be offline before their open
    /// conversations go back to the queue (default 60).
    #[arg(long, env = "KEFU_REASSIGN_AFTER")]
    pub reassign_after: Option<u64>,
    /// Key for the HTTP APIs (`X-Api-Key` header or `Authorization: Bearer`). Required in prod.
    #[arg(long, env = "KEFU_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// File holding the API key (its first line), instead of --api-key.
    #[arg(long, env = "KEFU_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// The cluster's token key file: one key per line (hex or base64, 32 bytes or more); the
    /// first signs, all verify. Every node gets the same file. `kefu-node token-key new|rotate|
    /// retire FILE` makes and rotates it. Default: made once beside the dev cluster CA (or in the
    /// data dir); required in prod with peers.
    #[arg(long, env = "KEFU_TOKEN_KEY_FILE")]
    pub token_key_file: Option<PathBuf>,
    /// The token keys themselves, comma separated, instead of --token-key-file (a secret).
    #[arg(long, env = "KEFU_TOKEN_KEY", hide_env_values = true)]
    pub token_key: Option<String>,
    /// Lets the dev profile (auto-registration, no API key) listen on a non-loopback address.
    #[arg(long, env = "KEFU_ALLOW_DEV_PUBLIC", num_args = 0..=1, default_missing_value = "true")]
    pub allow_dev_public: Option<bool>,
    /// Chat, typing and receipt requests allowed per second on one connection.
    #[arg(long, env = "KEFU_MSG_RATE")]
    pub msg_rate: Option<u32>,
    /// Burst allowance above msg_rate.
    #[arg(long, env = "KEFU_MSG_BURST")]
    pub msg_burst: Option<u32>,
    /// History (cmd 19), user (cmd 17) and sync (cmd 104) requests allowed per second on one
    /// connection.
    #[arg(long, env = "KEFU_READ_RATE")]
    pub read_rate: Option<u32>,
    /// Burst allowance above read_rate.
    #[arg(long, env = "KEFU_READ_BURST")]
    pub read_burst: Option<u32>,
    /// Largest `count` of a history page (cmd 19, sync, `/v1/.../messages`); larger asks get this.
    #[arg(long, env = "KEFU_HISTORY_MAX")]
    pub history_max: Option<u32>,
    /// Largest `offset` of a history request (deep offsets scan the whole conversation).
    #[arg(long, env = "KEFU_HISTORY_MAX_OFFSET")]
    pub history_max_offset: Option<u32>,
    /// HTTP API requests allowed per second per client IP, and per API key (0: no limit).
    #[arg(long, env = "KEFU_API_RATE")]
    pub api_rate: Option<u32>,
    /// Concurrent connections allowed from one IP address on the client ports (0: no limit;
    /// default 1000 in prod, none in dev).
    #[arg(long, env = "KEFU_MAX_CONNS_PER_IP")]
    pub max_conns_per_ip: Option<usize>,
    /// Failed logins allowed per client IP per minute before logins from it are refused.
    #[arg(long, env = "KEFU_LOGIN_FAILURES_PER_MINUTE")]
    pub login_failures_per_minute: Option<u32>,
    /// Seconds after sending during which a message can be recalled.
    #[arg(long, env = "KEFU_RECALL_WINDOW")]
    pub recall_window: Option<u64>,
    /// Groups every newly registered user joins (comma separated; dev default "100").
    #[arg(long, env = "KEFU_DEFAULT_GROUPS", value_delimiter = ',')]
    pub default_groups: Option<Vec<String>>,
    /// Lifetime of login tokens, in seconds.
    #[arg(long, env = "KEFU_TOKEN_TTL")]
    pub token_ttl: Option<u64>,
    /// Name of this node, stored as the origin of the messages it sequences (default: made once
    /// and kept in the data dir; FLY_MACHINE_ID on Fly).
    #[arg(long, env = "KEFU_NODE_ID")]
    pub node_id: Option<String>,
    /// This node's region (default `local`; FLY_REGION on Fly).
    #[arg(long, env = "KEFU_REGION")]
    pub region: Option<String>,
    /// UDP address of the mesh between nodes (default 127.0.0.1:7443). Only bound with peers.
    #[arg(long, env = "KEFU_MESH_ADDR", value_parser = bind_addr)]
    pub mesh_addr: Option<SocketAddr>,
    /// A peer node: `ID=HOST:PORT`, or `ID@REGION=HOST:PORT` when it is in another region.
    /// Repeatable; the environment variable takes a comma-separated list.
    #[arg(long = "peer", env = "KEFU_PEERS", value_delimiter = ',')]
    pub peers: Option<Vec<String>>,
    /// Finds the peers in DNS: TXT records of NAME list `ID REGION` pairs (Fly's
    /// `vms.<app>.internal`); each peer is reached at `ID.vm.<app>.internal` on the mesh port.
    #[arg(long, env = "KEFU_PEERS_DNS")]
    pub peers_dns: Option<String>,
    /// PEM certificate of the cluster CA every node's certificate is signed by.
    #[arg(long, env = "KEFU_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// PEM certificate of this node, signed by the cluster CA, with the node id as its name.
    #[arg(long, env = "KEFU_NODE_CERT")]
    pub node_cert: Option<PathBuf>,
    /// PEM key of --node-cert.
    #[arg(long, env = "KEFU_NODE_KEY")]
    pub node_key: Option<PathBuf>,
    /// Seconds without heartbeats before a peer counts as down (its users offline; default 3).
    #[arg(long, env = "KEFU_PEER_DOWN_AFTER")]
    pub peer_down_after: Option<f64>,
    /// Milliseconds a send forwarded to its conversation's owner may take before the sender gets
    /// the retryable status 11007 (default 3000).
    #[arg(long, env = "KEFU_FORWARD_TIMEOUT_MS")]
    pub forward_timeout_ms: Option<u64>,
    /// Groups with more online members than this get no join/exit notices (cmd 9/10).
    #[arg(long, env = "KEFU_PRESENCE_NOTICE_LIMIT")]
    pub presence_notice_limit: Option<usize>,
    /// Answer sends over HTTP (`POST /v1/messages`, `/api/message/send`) for a conversation
    /// sequenced in another region with `fly-replay: region=<its region>`, for Fly's proxy to
    /// replay there; on by itself when `FLY_REGION` is set (the node runs behind Fly's proxy).
    /// Behind a proxy the HTTP API's per-IP limit reads the client's IP from `Fly-Client-IP`.
    #[arg(long, env = "KEFU_REPLAY_WRITES", num_args = 0..=1, default_missing_value = "true")]
    pub replay_writes: Option<bool>,
    /// Seconds a stopping node (SIGTERM) gives its sessions to finish the sends they have in
    /// flight before it exits.
    #[arg(long, env = "KEFU_DRAIN_TIMEOUT")]
    pub drain_timeout: Option<u64>,
    /// Password logins waiting for the hashing pool (one thread per core) before further ones
    /// are answered busy (11015).
    #[arg(long, env = "KEFU_LOGIN_QUEUE")]
    pub login_queue: Option<usize>,
    /// Memory of new argon2id password hashes, KiB (default 19456, OWASP's recommendation).
    #[arg(long, env = "KEFU_ARGON2_MEMORY_KIB")]
    pub argon2_memory_kib: Option<u32>,
    /// Passes of new argon2id password hashes (default 2).
    #[arg(long, env = "KEFU_ARGON2_PASSES")]
    pub argon2_passes: Option<u32>,
}

/// The same settings as read from the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    data_dir: Option<PathBuf>,
    profile: Option<Profile>,
    jim_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
    tls_addr: Option<SocketAddr>,
    quic_addr: Option<SocketAddr>,
    quic_idle_timeout: Option<u64>,
    durability: Option<Durability>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    heartbeat_timeout: Option<u64>,
    worker_threads: Option<usize>,
    reassign_after: Option<u64>,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    token_key_file: Option<PathBuf>,
    token_key: Option<String>,
    allow_dev_public: Option<bool>,
    msg_rate: Option<u32>,
    msg_burst: Option<u32>,
    read_rate: Option<u32>,
    read_burst: Option<u32>,
    history_max: Option<u32>,
    history_max_offset: Option<u32>,
    api_rate: Option<u32>,
    max_conns_per_ip: Option<usize>,
    login_failures_per_minute: Option<u32>,
    recall_window: Option<u64>,
    default_groups: Option<Vec<String>>,
    token_ttl: Option<u64>,
    node_id: Option<String>,
    region: Option<String>,
    mesh_addr: Option<SocketAddr>,
    peers: Option<Vec<String>>,
    peers_dns: Option<String>,
    cluster_ca: Option<PathBuf>,
    node_cert: Option<PathBuf>,
    node_key: Option<PathBuf>,
    peer_down_after: Option<f64>,
    forward_timeout_ms: Option<u64>,
    argon2_memory_kib: Option<u32>,
    argon2_passes: Option<u32>,
    login_queue: Option<usize>,
    drain_timeout: Option<u64>,
    replay_writes: Option<bool>,
    presence_notice_limit: Option<usize>,
}

/// Where the token keys come from.
#[derive(Debug, Clone)]
pub enum TokenKeys {
    /// The keys themselves (`--token-key`, `KEFU_TOKEN_KEY`).
    Given(String),
    /// A key file that must exist.
    File(PathBuf),
    /// Dev, or a single node: `token.key` beside the cluster CA given, else in the data dir,
    /// made once.
    Default,
}

/// The API key in a file: its first line, trimmed.
fn read_api_key(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the API key file {}", path.display()))?;
    let key = text.lines().next().unwrap_or_default().trim().to_string();
    if key.len() < 16 {
        bail!("the API key in {} is {} characters; use 16 or more (kefu-node keys new DIR makes one)", path.display(), key.len());
    }
    Ok(key)
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the database and keys live.
    pub data_dir: PathBuf,
    /// dev or prod.
    pub profile: Profile,
    /// J-IM port.
    pub jim_addr: SocketAddr,
    /// Admin port.
    pub admin_addr: SocketAddr,
    /// TLS port.
    pub tls_addr: SocketAddr,
    /// QUIC port (UDP).
    pub quic_addr: SocketAddr,
    /// QUIC idle timeout.
    pub quic_idle_timeout: Duration,
    /// What an acknowledged message survives.
    pub durability: Durability,
    /// Configured certificate and key files.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// Idle timeout; `None` = off.
    pub heartbeat_timeout: Option<Duration>,
    /// Runtime worker threads (resolved: never 0).
    pub worker_threads: usize,
    /// How long an assigned agent may be offline before their conversations are requeued.
    pub reassign_after: Duration,
    /// API key for the HTTP APIs.
    pub api_key: Option<String>,
    /// Where the token keys come from.
    pub token_keys: TokenKeys,
    /// Per-connection request rate.
    pub msg_rate: u32,
    /// Per-connection burst.
    pub msg_burst: u32,
    /// Per-connection read request rate.
    pub read_rate: u32,
    /// Per-connection read burst.
    pub read_burst: u32,
    /// Largest history page.
    pub history_max: u32,
    /// Largest history offset.
    pub history_max_offset: u32,
    /// HTTP API requests per second per IP and per key; 0 = off.
    pub api_rate: u32,
    /// Concurrent connections per client IP; 0 = off.
    pub max_conns_per_ip: usize,
    /// Failed logins per IP per minute.
    pub login_failures_per_minute: u32,
    /// Recall window.
    pub recall_window: Duration,
    /// Groups new users join.
    pub default_groups: Vec<String>,
    /// Token lifetime.
    pub token_ttl: Duration,
    /// This node's name.
    pub node_id: String,
    /// This node's region.
    pub region: String,
    /// Mesh UDP address.
    pub mesh_addr: SocketAddr,
    /// Configured peers.
    pub peers: Vec<PeerConfig>,
    /// DNS name listing the peers.
    pub peers_dns: Option<String>,
    /// Cluster CA file.
    pub cluster_ca: Option<PathBuf>,
    /// Node certificate file.
    pub node_cert: Option<PathBuf>,
    /// Node key file.
    pub node_key: Option<PathBuf>,
    /// A peer silent this long is down.
    pub peer_down_after: Duration,
    /// Longest wait for the owner of a conversation to answer a forwarded send.
    pub forward_timeout: Duration,
    /// Cost of new password hashes.
    pub password_hash_cost: crate::auth::HashCost,
    /// Password logins queued for the hashing pool before more are answered busy.
    pub login_queue: usize,
    /// How long a stopping node drains.
    pub drain_timeout: Duration,
    /// Send HTTP writes for other regions' conversations back with `fly-replay`.
    pub replay_writes: bool,
    /// Largest online group that still gets join/exit notices.
    pub presence_notice_limit: usize,
}

impl Config {
    /// Resolves flags (already merged with the environment by clap) over the optional file.
    pub fn resolve(flags: Flags) -> anyhow::Result<Config> {
        let file = match &flags.config {
            Some(path) => read_file(path)?,
            None => FileSettings::default(),
        };
        let profile = flags.profile.or(file.profile).unwrap_or(Profile::Dev);
        let default_groups = flags.default_groups.or(file.default_groups).unwrap_or_else(|| match profile {
            Profile::Dev => vec!["100".to_string()],
            Profile::Prod => vec![],
        });
        let default_groups: Vec<String> = default_groups.into_iter().filter(|g| !g.is_empty()).collect();
        if let Some(bad) = default_groups.iter().find(|g| !schema::jim::valid_id(g)) {
            bail!("default group {bad:?} is not a valid group id");
        }
        let config = Config {
            data_dir: flags.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("./data")),
            profile,
            jim_addr: flags.jim_addr.or(file.jim_addr).unwrap_or_else(|| ([127, 0, 0, 1], 8888).into()),
            admin_addr: flags.admin_addr.or(file.admin_addr).unwrap_or_else(|| ([127, 0, 0, 1], 9090).into()),
            tls_addr: flags.tls_addr.or(file.tls_addr).unwrap_or_else(|| ([127, 0, 0, 1], 8443).into()),
            quic_addr: flags.quic_addr.or(file.quic_addr).unwrap_or_else(|| ([127, 0, 0, 1], 8443).into()),
            quic_idle_timeout: Duration::from_secs(flags.quic_idle_timeout.or(file.quic_idle_timeout).unwrap_or(60).max(1)),
            durability: flags.durability.or(file.durability).unwrap_or_default(),
            tls_files: match (flags.tls_cert.or(file.tls_cert), flags.tls_key.or(file.tls_key)) {
                (Some(cert), Some(key)) => Some((cert, key)),
                (None, None) => None,
                _ => bail!("--tls-cert and --tls-key go together"),
            },
            heartbeat_timeout: match flags.heartbeat_timeout.or(file.heartbeat_timeout).unwrap_or(120) {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
            worker_threads: match flags.worker_threads.or(file.worker_threads).unwrap_or(0) {
                0 => default_worker_threads(),
                n => n,
            },
            reassign_after: Duration::from_secs(flags.reassign_after.or(file.reassign_after).unwrap_or(60)),
            api_key: match (flags.api_key.or(file.api_key).filter(|k| !k.is_empty()), flags.api_key_file.or(file.api_key_file)) {
                (Some(_), Some(_)) => bail!("--api-key and --api-key-file: give one"),
                (Some(key), None) => Some(key),
                (None, Some(path)) => Some(read_api_key(&path)?),
                (None, None) => None,
            },
            token_keys: match (flags.token_key.or(file.token_key).filter(|k| !k.is_empty()), flags.token_key_file.or(file.token_key_file)) {
                (Some(_), Some(_)) => bail!("--token-key and --token-key-file: give one"),
                (Some(keys), None) => TokenKeys::Given(keys),
                (None, Some(path)) => TokenKeys::File(path),
                (None, None) => TokenKeys::Default,
            },
            msg_rate: flags.msg_rate.or(file.msg_rate).unwrap_or(200).max(1),
            msg_burst: flags.msg_burst.or(file.msg_burst).unwrap_or(400).max(1),
            read_rate: flags.read_rate.or(file.read_rate).unwrap_or(20).max(1),
            read_burst: flags.read_burst.or(file.read_burst).unwrap_or(40).max(1),
            history_max: flags.history_max.or(file.history_max).unwrap_or(100).clamp(1, schema::jim::MAX_PAGE),
            history_max_offset: flags.history_max_offset.or(file.history_max_offset).unwrap_or(10_000),
            api_rate: flags.api_rate.or(file.api_rate).unwrap_or(200),
            max_conns_per_ip: flags.max_conns_per_ip.or(file.max_conns_per_ip).unwrap_or(match profile {
                Profile::Dev => 0,
                Profile::Prod => 1000,
            }),
            login_failures_per_minute: flags.login_failures_per_minute.or(file.login_failures_per_minute).unwrap_or(10),
            recall_window: Duration::from_secs(flags.recall_window.or(file.recall_window).unwrap_or(120)),
            default_groups,
            token_ttl: Duration::from_secs(flags.token_ttl.or(file.token_ttl).unwrap_or(7 * 24 * 3600)),
            node_id: String::new(),
            region: flags
                .region
                .or(file.region)
                .or_else(|| std::env::var("FLY_REGION").ok())
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "local".to_string()),
            mesh_addr: flags.mesh_addr.or(file.mesh_addr).unwrap_or_else(|| ([127, 0, 0, 1], 7443).into()),
            peers: Vec::new(),
            peers_dns: flags.peers_dns.or(file.peers_dns).filter(|d| !d.is_empty()),
            cluster_ca: flags.cluster_ca.or(file.cluster_ca),
            node_cert: flags.node_cert.or(file.node_cert),
            node_key: flags.node_key.or(file.node_key),
            peer_down_after: Duration::from_secs_f64(flags.peer_down_after.or(file.peer_down_after).unwrap_or(3.0).clamp(0.5, 3600.0)),
            forward_timeout: Duration::from_millis(flags.forward_timeout_ms.or(file.forward_timeout_ms).unwrap_or(3000).max(1)),
            presence_notice_limit: flags.presence_notice_limit.or(file.presence_notice_limit).unwrap_or(500),
            login_queue: flags.login_queue.or(file.login_queue).unwrap_or(256).max(1),
            drain_timeout: Duration::from_secs(flags.drain_timeout.or(file.drain_timeout).unwrap_or(10).max(1)),
            replay_writes: flags
                .replay_writes
                .or(file.replay_writes)
                .unwrap_or_else(|| std::env::var("FLY_REGION").is_ok_and(|r| !r.is_empty())),
            password_hash_cost: crate::auth::HashCost {
                memory_kib: flags.argon2_memory_kib.or(file.argon2_memory_kib).unwrap_or(crate::auth::HashCost::default().memory_kib),
                passes: flags.argon2_passes.or(file.argon2_passes).unwrap_or(crate::auth::HashCost::default().passes),
            },
        };
        if config.profile == Profile::Prod && config.api_key.is_none() {
            bail!("the prod profile needs --api-key or --api-key-file (or KEFU_API_KEY) for the HTTP APIs");
        }
        if config.profile == Profile::Dev && !flags.allow_dev_public.or(file.allow_dev_public).unwrap_or(false) {
            for (name, addr) in [("--jim-addr", config.jim_addr), ("--tls-addr", config.tls_addr), ("--quic-addr", config.quic_addr)] {
                if !addr.ip().is_loopback() {
                    bail!(
                        "{name} {addr} is not a loopback address, and the dev profile registers unknown users on first login and \
                         leaves the HTTP APIs open; use --profile prod (see README), or --allow-dev-public if you mean it"
                    );
                }
            }
        }
        let mut config = config;
        config.node_id = match flags.node_id.or(file.node_id).or_else(|| std::env::var("FLY_MACHINE_ID").ok()).filter(|n| !n.is_empty()) {
            Some(id) => id,
            None => stored_node_id(&config.data_dir)?,
        };
        if !valid_node_id(&config.node_id) {
            bail!("node id {:?}: use letters, digits and '-' (it is the peer's TLS name)", config.node_id);
        }
        for spec in flags.peers.or(file.peers).unwrap_or_default().iter().filter(|p| !p.is_empty()) {
            let peer = PeerConfig::parse(spec, &config.region)?;
            if peer.id == config.node_id {
                continue; // The same peer list can be given to every node.
            }
            if config.peers.iter().any(|p| p.id == peer.id) {
                bail!("peer {} is given twice", peer.id);
            }
            config.peers.push(peer);
        }
        Ok(config)
    }

    /// A configuration for tests and examples: dev profile, ports chosen by the OS.
    pub fn for_tests(data_dir: &Path) -> Config {
        let flags = Flags {
            data_dir: Some(data_dir.to_path_buf()),
            jim_addr: Some(([127, 0, 0, 1], 0).into()),
            admin_addr: Some(([127, 0, 0, 1], 0).into()),
            tls_addr: Some(([127, 0, 0, 1], 0).into()),
            quic_addr: Some(([127, 0, 0, 1], 0).into()),
            ..Flags::default()
        };
        // The flags above are valid by construction.
        Config::resolve(flags).unwrap_or_else(|e| unreachable!("{e}"))
    }
}

/// One runtime worker per core, less the core the store's writer thread keeps busy under load
/// (on two cores, two workers beside the writer and the clients measured a fifth more node CPU per
/// message at 5,000 msg/s and a sixth less throughput flat out; BENCHMARKS.md), at least one.
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

/// A listening address given as a flag: `IP:PORT`, or `NAME:PORT` resolved once at start (an
/// IPv4 address first) — Fly's UDP services must bind `fly-global-services`, a name in
/// `/etc/hosts`.
fn bind_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(text)
        .map_err(|e| format!("{text}: not IP:PORT nor a name that resolves ({e})"))?
        .collect();
    addrs.iter().find(|a| a.is_ipv4()).or(addrs.first()).copied().ok_or_else(|| format!("{text}: the name has no address"))
}

/// A peer as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// Node id (also its TLS name).
    pub id: String,
    /// Region.
    pub region: String,
    /// `HOST:PORT` of its mesh endpoint.
    pub addr: String,
}

impl PeerConfig {
    /// Parses `ID=HOST:PORT` or `ID@REGION=HOST:PORT`; without a region the peer is in
    /// `default_region`.
    pub fn parse(spec: &str, default_region: &str) -> anyhow::Result<PeerConfig> {
        let (name, addr) = spec.split_once('=').with_context(|| format!("peer {spec:?}: expected ID=HOST:PORT"))?;
        let (id, region) = match name.split_once('@') {
            Some((id, region)) => (id, region),
            None => (name, default_region),
        };
        if !valid_node_id(id) || region.is_empty() || !addr.contains(':') {
            bail!("peer {spec:?}: expected ID=HOST:PORT or ID@REGION=HOST:PORT");
        }
        Ok(PeerConfig { id: id.to_string(), region: region.to_string(), addr: addr.to_string() })
    }
}

/// Node ids double as TLS names: letters, digits and '-', not starting or ending with '-'.
pub fn valid_node_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

/// The node id kept in `data_dir/node-id`, made on first start.
fn stored_node_id(data_dir: &Path) -> anyhow::Result<String> {
    let path = data_dir.join("node-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim().to_string();
        if valid_node_id(&id) {
            return Ok(id);
        }
    }
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating data dir {}", data_dir.display()))?;
    let id = format!("n-{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff);
    std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

fn read_file(path: &Path) -> anyhow::Result<FileSettings> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn durability_is_disk_unless_process_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Config::for_tests(dir.path()).durability, Durability::Disk);
        let flags = Flags { data_dir: Some(dir.path().to_path_buf()), durability: Some(Durability::Process), ..Flags::default() };
        assert_eq!(Config::resolve(flags).unwrap().durability, Durability::Process);
        assert!(toml::from_str::<FileSettings>("durability = \"process\"").is_ok());
        assert!(toml::from_str::<FileSettings>("durability = \"memory\"").is_err(), "an unknown mode is refused");
    }

    #[test]
    fn the_runtime_gets_a_worker_per_core_but_the_writer_s_unless_told_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(Config::for_tests(dir.path()).worker_threads, cores.saturating_sub(1).max(1));
        let flags = |n| Flags { data_dir: Some(dir.path().to_path_buf()), worker_threads: Some(n), ..Flags::default() };
        assert_eq!(Config::resolve(flags(3)).unwrap().worker_threads, 3);
        assert_eq!(Config::resolve(flags(0)).unwrap().worker_threads, cores.saturating_sub(1).max(1), "0 is the default");
        assert_eq!(toml::from_str::<FileSettings>("worker_threads = 2").unwrap().worker_threads, Some(2));
    }

    #[test]
    fn flags_win_over_file_and_defaults_fill_the_rest() {
        let dir = std::env::temp_dir().join(format!("kefu-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("kefu.toml");
        let data = dir.join("from-file");
        std::fs::write(&file, format!("data_dir = {:?}\nheartbeat_timeout = 0\nmsg_rate = 5\n", data.display().to_string())).unwrap();
        let flags = Flags { config: Some(file.clone()), msg_rate: Some(9), ..Flags::default() };
        let c = Config::resolve(flags).unwrap();
        assert_eq!(c.data_dir, data);
        assert!(c.node_id.starts_with("n-"), "made and kept in the data dir");
        let again = Config::resolve(Flags { config: Some(file.clone()), ..Flags::default() }).unwrap();
        assert_eq!(again.node_id, c.node_id, "stable across restarts");
        assert_eq!(c.heartbeat_timeout, None);
        assert_eq!(c.msg_rate, 9);
        assert_eq!(c.jim_addr.to_string(), "127.0.0.1:8888");
        assert_eq!(c.default_groups, vec!["100".to_string()]);
        std::fs::write(&file, "nonsense_key = 1\n").unwrap();
        assert!(Config::resolve(Flags { config: Some(file), ..Flags::default() }).is_err());
        assert!(Config::resolve(Flags { profile: Some(Profile::Prod), ..Flags::default() }).is_err(), "prod needs an API key");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn peers_parse_with_and_without_a_region() {
        assert_eq!(bind_addr("localhost:8443").unwrap().to_string(), "127.0.0.1:8443");
        assert_eq!(bind_addr("[::]:7443").unwrap().to_string(), "[::]:7443");
        assert!(bind_addr("no-such-host.invalid:1").is_err());
        let p = PeerConfig::parse("fra-1@fra=10.0.0.2:7443", "iad").unwrap();
        assert_eq!((p.id.as_str(), p.region.as_str(), p.addr.as_str()), ("fra-1", "fra", "10.0.0.2:7443"));
        let p = PeerConfig::parse("iad-2=host.internal:7443", "iad").unwrap();
        assert_eq!(p.region, "iad");
        for bad in ["nohost", "=1.2.3.4:1", "a b=1.2.3.4:1", "x@=1.2.3.4:1", "x=noport"] {
            assert!(PeerConfig::parse(bad, "iad").is_err(), "{bad}");
        }
    }
}

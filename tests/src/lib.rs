//! The test harness: starts real `kefu-node` processes on loopback with temporary data dirs,
//! kills (SIGKILL) and restarts them, and speaks to them through real J-IM TCP and WebSocket
//! clients. Used by the integration tests in `it/` and by the examples.

pub mod client;
pub mod cluster;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub use client::{Client, TcpClient, WsClient};

/// How long a node may take to print its ports.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A node process under test. Killed when dropped.
pub struct TestNode {
    /// The J-IM port (TCP, HTTP, WebSocket).
    pub jim: SocketAddr,
    /// The admin port.
    pub admin: SocketAddr,
    /// The TLS port.
    pub tls: SocketAddr,
    /// The QUIC port (UDP).
    pub quic: SocketAddr,
    /// The mesh port (UDP), when the node has peers.
    pub mesh: Option<SocketAddr>,
    /// The TLS certificate's SHA-256 fingerprint as the node printed it.
    pub fingerprint: String,
    /// Milliseconds the node reported from process start to ready.
    pub startup_ms: u64,
    bin: PathBuf,
    args: Vec<String>,
    data: tempfile::TempDir,
    child: Child,
}

/// Builds a node with extra flags.
pub struct NodeBuilder {
    bin: PathBuf,
    args: Vec<String>,
}

impl NodeBuilder {
    /// Adds a flag and its value.
    pub fn arg(mut self, flag: &str, value: impl ToString) -> NodeBuilder {
        self.args.push(flag.to_string());
        self.args.push(value.to_string());
        self
    }

    /// Starts the node with a fresh data dir.
    pub async fn start(self) -> anyhow::Result<TestNode> {
        let data = tempfile::Builder::new().prefix("kefu-test-").tempdir()?;
        self.start_in(data).await
    }

    /// Starts the node with `data` as its data dir.
    pub async fn start_in(self, data: tempfile::TempDir) -> anyhow::Result<TestNode> {
        let s = spawn(&self.bin, data.path(), &self.args).await?;
        Ok(TestNode {
            jim: s.jim,
            admin: s.admin,
            tls: s.tls,
            quic: s.quic,
            mesh: s.mesh,
            fingerprint: s.fingerprint,
            startup_ms: s.startup_ms,
            bin: self.bin,
            args: self.args,
            data,
            child: s.child,
        })
    }
}

impl TestNode {
    /// A builder for the node binary at `bin` (pass `env!("CARGO_BIN_EXE_test-node")`).
    pub fn builder(bin: impl AsRef<Path>) -> NodeBuilder {
        NodeBuilder { bin: bin.as_ref().to_path_buf(), args: Vec::new() }
    }

    /// Starts a node with the defaults (dev profile, ports chosen by the OS).
    pub async fn start(bin: impl AsRef<Path>) -> anyhow::Result<TestNode> {
        TestNode::builder(bin).start().await
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// `http://127.0.0.1:port`.
    pub fn http(&self) -> String {
        format!("http://{}", self.jim)
    }

    /// `ws://127.0.0.1:port`.
    pub fn ws(&self) -> String {
        format!("ws://{}", self.jim)
    }

    /// Kills the process with SIGKILL and waits for it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Starts the process again on the same data dir (new ports).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        let _ = self.kill().await;
        let s = spawn(&self.bin, self.data.path(), &self.args).await?;
        self.child = s.child;
        self.jim = s.jim;
        self.admin = s.admin;
        self.tls = s.tls;
        self.quic = s.quic;
        self.mesh = s.mesh;
        self.fingerprint = s.fingerprint;
        self.startup_ms = s.startup_ms;
        Ok(())
    }

    /// Sends SIGTERM and waits for a clean exit; returns whether it exited with success.
    pub async fn terminate(&mut self) -> anyhow::Result<bool> {
        let pid = self.child.id().ok_or_else(|| anyhow!("already exited"))?;
        let rc = signal(pid, libc::SIGTERM);
        if rc != 0 {
            bail!("kill failed");
        }
        let status = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await??;
        Ok(status.success())
    }

    /// Waits up to `within` for the process to exit on its own (after a signal sent elsewhere);
    /// returns whether it exited with success.
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<bool> {
        let status = tokio::time::timeout(within, self.child.wait()).await??;
        Ok(status.success())
    }

    /// Resident set size of the node process, in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib(self.child.id()?)
    }

    /// A TCP client connected to the J-IM port.
    pub async fn tcp(&self) -> anyhow::Result<TcpClient> {
        TcpClient::connect(self.jim).await
    }

    /// A TCP client that logged in as `user`.
    pub async fn tcp_login(&self, user: &str) -> anyhow::Result<TcpClient> {
        let mut c = self.tcp().await?;
        c.login(user, "pw").await?;
        Ok(c)
    }

    /// A WebSocket client logged in through the query string, as the J-IM demo page does.
    pub async fn ws_login(&self, user: &str) -> anyhow::Result<WsClient> {
        let mut c = WsClient::connect(&format!("{}/?username={user}&password=pw", self.ws())).await?;
        c.recv_cmd(6).await?;
        Ok(c)
    }
}

fn signal(pid: u32, sig: i32) -> i32 {
    let Ok(pid) = i32::try_from(pid) else { return -1 };
    // kill(2) has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, sig)
    }
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// The anonymous part of a process's RSS (heap and stacks, not the mapped binary), KiB.
pub fn rss_anon_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "RssAnon:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct Spawned {
    child: Child,
    jim: SocketAddr,
    admin: SocketAddr,
    tls: SocketAddr,
    quic: SocketAddr,
    mesh: Option<SocketAddr>,
    fingerprint: String,
    startup_ms: u64,
}

async fn spawn(bin: &Path, data: &Path, extra: &[String]) -> anyhow::Result<Spawned> {
    let mut cmd = Command::new(bin);
    cmd.arg("--data-dir")
        .arg(data)
        .args(["--jim-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0", "--tls-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
        .args(extra);
    cmd.env_remove("KEFU_CONFIG").env("KEFU_LOG", std::env::var("KEFU_LOG").unwrap_or_else(|_| "warn".into()));
    cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).stdin(Stdio::null()).kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let (mut jim, mut admin, mut tls, mut quic, mut fingerprint, mut startup) = (None, None, None, None, String::new(), 0);
    let mut mesh = None;
    let read = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.strip_prefix("kefu-node listening jim=") {
                jim = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            } else if let Some(rest) = line.strip_prefix("kefu-node listening admin=") {
                admin = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            } else if let Some(rest) = line.strip_prefix("kefu-node listening quic=") {
                quic = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            } else if let Some(rest) = line.strip_prefix("kefu-node listening tls=") {
                tls = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            } else if let Some(rest) = line.strip_prefix("kefu-node listening mesh=") {
                mesh = rest.split_whitespace().next().and_then(|a| a.parse().ok());
            } else if let Some(rest) = line.strip_prefix("kefu-node tls fingerprint sha256=") {
                fingerprint = rest.trim().to_string();
            } else if line.starts_with("kefu-node ready") {
                startup = line.rsplit("startup_ms=").next().and_then(|v| v.trim().parse().ok()).unwrap_or(0);
                return Ok::<_, anyhow::Error>(());
            }
        }
        bail!("the node exited before it was ready")
    };
    tokio::time::timeout(START_TIMEOUT, read).await.context("node start timed out")??;
    // Keep draining stdout so the node never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    match (jim, admin, tls, quic) {
        (Some(jim), Some(admin), Some(tls), Some(quic)) => {
            Ok(Spawned { child, jim, admin, tls, quic, mesh, fingerprint, startup_ms: startup })
        }
        _ => bail!("the node did not print its ports"),
    }
}

/// A TLS connection to `addr` offering `alpn`, trusting only `root` (e.g. the node's
/// self-signed certificate), with `localhost` as the server name.
pub async fn tls_connect(
    addr: SocketAddr,
    alpn: &[&[u8]],
    root: rustls::pki_types::CertificateDer<'static>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    Ok(connector.connect(name, tcp).await?)
}

/// A QUIC client config offering `alpn`, trusting only `root`, keeping alive every 20 s, ready
/// to resume with 0-RTT on a later connection made with the same config.
pub fn quic_client_config(alpn: &[&[u8]], root: rustls::pki_types::CertificateDer<'static>) -> anyhow::Result<quinn::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root)?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tls.enable_early_data = true;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(20)));
    config.transport_config(std::sync::Arc::new(transport));
    Ok(config)
}

/// A QUIC client endpoint on 127.0.0.1 connected to `addr` with `alpn`, trusting only `root`.
pub async fn quic_connect(
    addr: SocketAddr,
    alpn: &[&[u8]],
    root: rustls::pki_types::CertificateDer<'static>,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let config = quic_client_config(alpn, root)?;
    let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
    endpoint.set_default_client_config(config);
    let conn = endpoint.connect(addr, "localhost")?.await?;
    Ok((endpoint, conn))
}

/// A J-IM client on a new bidirectional stream of a QUIC connection.
pub async fn quic_stream(conn: &quinn::Connection) -> anyhow::Result<TcpClient> {
    let (send, recv) = conn.open_bi().await?;
    Ok(TcpClient::over(tokio::io::join(recv, send)))
}

impl TestNode {
    /// The node's self-signed certificate (from its data dir).
    pub fn self_signed_cert(&self) -> anyhow::Result<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        Ok(rustls::pki_types::CertificateDer::from_pem_file(self.data_dir().join("tls/self-signed.pem"))?)
    }

    /// Sends SIGHUP (reload the TLS certificate).
    pub fn hangup(&self) -> anyhow::Result<()> {
        let pid = self.child.id().ok_or_else(|| anyhow!("exited"))?;
        if signal(pid, libc::SIGHUP) != 0 {
            bail!("kill failed");
        }
        Ok(())
    }
}

/// Polls `check` until it returns `Some`, or fails after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("condition not met within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

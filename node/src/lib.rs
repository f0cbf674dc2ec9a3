//! kefu's node: one process that speaks J-IM's binary TCP, WebSocket and HTTP on one port (and
//! TLS, QUIC, HTTP/3), stores every message in an embedded libSQL file, serves the admin port,
//! and with peers configured joins the mesh that makes several nodes one service.
//!
//! Layout (see ARCHITECTURE.md): `transport` frames bytes, `session` runs one connection,
//! `dispatch` carries out commands, `hub` knows who is connected, `store` owns the database,
//! `fanout` delivers what the store committed, `mesh` links the node to its peers.

pub mod accounts;
pub mod admin;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod dispatch;
pub mod fanout;
pub mod hub;
pub mod limits;
pub mod memory;
pub mod mesh;
pub mod metrics;
pub mod session;
pub mod store;
pub mod support;
pub mod tls;
pub mod tools;
pub mod transport;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

use crate::auth::LoginThrottle;
use crate::dispatch::Core;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::Store;

/// A running node.
pub struct NodeHandle {
    /// Where the J-IM port listens.
    pub jim_addr: SocketAddr,
    /// Where the admin port listens.
    pub admin_addr: SocketAddr,
    /// Where the TLS port listens.
    pub tls_addr: SocketAddr,
    /// Where the QUIC endpoint listens (UDP).
    pub quic_addr: SocketAddr,
    /// Where the mesh listens (UDP), when the node has peers.
    pub mesh_addr: Option<SocketAddr>,
    core: Arc<Core>,
    shutdown: CancellationToken,
    accepting: CancellationToken,
    tasks: TaskTracker,
    /// Held while the node runs: one process per data dir.
    _data_lock: std::fs::File,
}

/// Opens the store, binds the ports and starts serving.
pub async fn start(mut config: Config) -> anyhow::Result<NodeHandle> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let data_lock = lock_data_dir(&config.data_dir)?;
    let metrics = Arc::new(Metrics::default());
    let (store, feed) = Store::open_with(&config.data_dir, &config.node_id, Arc::clone(&metrics), config.durability)
        .await
        .context("opening the database")?;
    let jim = TcpListener::bind(config.jim_addr).await.with_context(|| format!("binding the J-IM port {}", config.jim_addr))?;
    let admin = TcpListener::bind(config.admin_addr).await.with_context(|| format!("binding the admin port {}", config.admin_addr))?;
    let tls_listener = TcpListener::bind(config.tls_addr).await.with_context(|| format!("binding the TLS port {}", config.tls_addr))?;
    let (cert, key) = match &config.tls_files {
        Some((cert, key)) => (Some(cert.as_path()), Some(key.as_path())),
        None => (None, None),
    };
    let certs = tls::CertStore::load(&config.data_dir, cert, key).context("loading the TLS certificate")?;
    let quic =
        transport::quic::endpoint(config.quic_addr, &certs, transport::quic::QuicSettings { idle_timeout: config.quic_idle_timeout })
            .with_context(|| format!("binding the QUIC port {}", config.quic_addr))?;
    if let Some(name) = config.peers_dns.clone() {
        let found =
            mesh::dns::peers(&name, config.mesh_addr.port(), &config.node_id).await.with_context(|| format!("finding peers in {name}"))?;
        for peer in found {
            if !config.peers.iter().any(|p| p.id == peer.id) {
                config.peers.push(peer);
            }
        }
        tracing::info!(peers = config.peers.len(), dns = %name, "peers found in DNS");
    }
    let tokens = auth::tokens_for(&config).context("loading the token key")?;
    let hash_threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let hub = Arc::new(Hub::new(Arc::clone(&metrics)));
    let ready = Arc::new(AtomicBool::new(false));
    // Customer-service calls other nodes send to this one's router.
    let (support_calls, support_inbox) = tokio::sync::mpsc::channel(256);
    let local = Arc::new(mesh::Local {
        store: store.clone(),
        hub: Arc::clone(&hub),
        metrics: Arc::clone(&metrics),
        ready: Arc::clone(&ready),
        notice_limit: config.presence_notice_limit,
        support_calls,
    });
    let mesh = mesh::Mesh::bind(&config, local).context("starting the mesh")?;
    let support = support::Support::new(config.reassign_after);
    let core = Arc::new(Core {
        support,
        throttle: LoginThrottle::new(config.login_failures_per_minute),
        passwords: auth::PasswordPool::new(hash_threads, config.login_queue),
        // About 100 bytes an entry: at most ~25 MB however many users log in within a token lifetime.
        logins: auth::LoginCache::new(config.token_ttl, 250_000),
        conns: limits::ConnLimit::new(config.max_conns_per_ip),
        api_per_ip: limits::KeyedBuckets::new(config.api_rate),
        api_per_key: limits::KeyedBuckets::new(config.api_rate.saturating_mul(10)),
        hub,
        config,
        store,
        tokens,
        metrics,
        ready,
        certs: Arc::clone(&certs),
        cluster: match &mesh {
            Some(mesh) => Arc::new(Arc::clone(mesh)),
            None => Arc::new(cluster::SingleNode),
        },
        mesh: mesh.clone(),
    });
    let shutdown = CancellationToken::new();
    // Cancelled first on SIGTERM: no new connections while the open ones drain.
    let accepting = shutdown.child_token();
    let tasks = TaskTracker::new();
    tasks.spawn(fanout::run(Arc::clone(&core), feed, shutdown.clone()));
    tasks.spawn(support::run(Arc::clone(&core), support_inbox, shutdown.clone()));
    tasks.spawn(support::webhooks::run(Arc::clone(&core), shutdown.clone()));
    let handle = NodeHandle {
        jim_addr: jim.local_addr()?,
        admin_addr: admin.local_addr()?,
        tls_addr: tls_listener.local_addr()?,
        quic_addr: quic.local_addr()?,
        mesh_addr: match &mesh {
            Some(mesh) => Some(mesh.local_addr()?),
            None => None,
        },
        core: Arc::clone(&core),
        shutdown: shutdown.clone(),
        accepting: accepting.clone(),
        tasks: tasks.clone(),
        _data_lock: data_lock,
    };
    let certs_for_tls = Arc::clone(&certs);
    tasks.spawn(transport::tls::serve_tls(
        Arc::clone(&core),
        tls_listener,
        certs_for_tls,
        accepting.clone(),
        shutdown.clone(),
        tasks.clone(),
    ));
    tasks.spawn(transport::quic::serve_quic(Arc::clone(&core), quic, accepting.clone(), shutdown.clone(), tasks.clone()));
    tasks.spawn(Arc::clone(&certs).renew_loop(Duration::from_secs(3600), shutdown.clone()));
    tasks.spawn(transport::serve_jim(Arc::clone(&core), jim, accepting.clone(), shutdown.clone(), tasks.clone()));
    let admin_router = admin::router(Arc::clone(&core));
    let admin_shutdown = shutdown.clone();
    tasks.spawn(async move {
        let served = axum::serve(admin, admin_router).with_graceful_shutdown(async move { admin_shutdown.cancelled().await }).await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin server failed");
        }
    });
    match &mesh {
        // Ready once the initial catch-up with the peers is done (the mesh's timer decides).
        Some(mesh) => mesh::start(mesh, &shutdown, &tasks),
        None => core.ready.store(true, Ordering::Release),
    }
    Ok(handle)
}

/// Takes the data dir's lock (`node.lock`), held until the file is dropped: one node, or one
/// operator's command, at a time.
pub fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating data dir {}", dir.display()))?;
    let path = dir.join("node.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!("another kefu-node is using the data dir {}", dir.display()),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

impl NodeHandle {
    /// The node's shared state (for embedding and tests).
    pub fn core(&self) -> &Arc<Core> {
        &self.core
    }

    /// Stops gracefully, within the drain timeout: stops accepting (and says not ready), lets
    /// every session finish the sends it has in flight and send their replies, then the close
    /// frame (J-IM's cmd 14), says goodbye to the peers (who count this node down at once), and
    /// waits for the tasks; the store's writer commits what it was given before it stops.
    pub async fn shutdown(self) {
        let started = tokio::time::Instant::now();
        let deadline = started + self.core.config.drain_timeout;
        // Not ready from here on (/readyz), but still sequencing: what the sessions already sent
        // is committed and acknowledged.
        self.accepting.cancel();
        self.core.hub.drain_all();
        // Sessions end once their in-flight sends are answered; leave the last second of the
        // budget for the rest.
        let sessions_by = deadline.checked_sub(Duration::from_secs(1)).unwrap_or(deadline).max(started);
        while self.core.hub.connection_count() > 0 && tokio::time::Instant::now() < sessions_by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.core.hub.connection_count();
        if left > 0 {
            tracing::warn!(left, "sessions still open at the drain timeout; closing them");
        }
        // A session leaves the hub just before its socket flushes and closes: give the sockets a
        // moment (connections that never logged in are not waited for past it).
        let flushed_by = (tokio::time::Instant::now() + Duration::from_millis(500)).min(deadline);
        while self.core.metrics.open_connections_total() > 0 && tokio::time::Instant::now() < flushed_by {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.core.ready.store(false, Ordering::Release);
        if let Some(mesh) = &self.core.mesh {
            mesh.goodbye(Duration::from_millis(500)).await;
        }
        self.shutdown.cancel();
        self.tasks.close();
        let rest = deadline.saturating_duration_since(tokio::time::Instant::now()).max(Duration::from_millis(500));
        if tokio::time::timeout(rest, self.tasks.wait()).await.is_err() {
            tracing::warn!("some tasks did not finish within the drain timeout");
        }
    }
}

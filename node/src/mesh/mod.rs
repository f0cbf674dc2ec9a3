//! The mesh: QUIC connections between nodes (ALPN `kefu-mesh/1`, mutual TLS with the cluster CA)
//! that make several nodes one service (DESIGN §7).
//!
//! Each node dials every configured peer and keeps that connection up (reconnecting with
//! backoff). On its own connection it sends its heartbeats, presence and relayed pushes (one
//! control stream), subscribes to the peer's change stream (one stream), and forwards sends for
//! conversations the peer owns (a stream per request). So every pair of nodes has two
//! connections, one dialled by each, and each node receives a peer's changes on the connection it
//! dialled itself. The rules (membership, replication, readiness) live in `membership` and
//! `replication`, without I/O; this module moves bytes.

pub mod dns;
pub mod membership;
pub mod replica;
pub mod replication;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::stream::{FuturesOrdered, StreamExt};
use schema::mesh::{self, ChangeBatch, RelayTarget, V1};
use schema::message::{NewMessage, StoredMessage};
use schema::placement::{self, NodeSpec};
use schema::{ConversationId, Status};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::Hub;
use crate::hub::Push;
use crate::metrics::Metrics;
use crate::store::Store;
use membership::{Membership, PeerState};
use replication::{Accept, CatchUp, Step};

/// Heartbeat interval on the control stream.
pub const BEAT: Duration = Duration::from_millis(250);
/// How often presence changes are gathered and shipped (deltas are batched over this window).
pub const PRESENCE_EVERY: Duration = Duration::from_millis(100);
/// Largest change frame this node sends (half the receiver's limit, so a batch of large messages
/// is split rather than refused).
const FRAME_BUDGET: usize = mesh::MAX_FRAME / 2;
/// Frames queued for one peer's control stream before relays to it are dropped.
const CONTROL_QUEUE: usize = 8192;
/// How long a peer that said hello with another node list keeps this node from sequencing: a
/// configured peer retries every 2 s at most, so a peer that still disagrees renews it well
/// before it runs out, and one that stopped dialling (fixed or gone) is forgotten.
const DISAGREEMENT_HOLDS: Duration = Duration::from_secs(10);
/// How long a `Cover` lasts unless renewed (the asking node renews it every second).
const COVER_LASTS: Duration = Duration::from_secs(3);
/// How far before the named time a `Cover` starts passing messages on: clocks of two nodes differ.
const COVER_MARGIN_MS: i64 = 5_000;
/// Messages per `Covered` frame, and pages of them passed on at once for one `Cover`.
const COVER_PAGE: u32 = 1000;
const COVER_PAGES: usize = 20;

/// QUIC close code: the node lists differ.
const CLOSE_LISTS_DIFFER: u32 = 2;
/// QUIC close code of a node that is stopping: its peers count it down at once.
const CLOSE_GOODBYE: u32 = 3;
/// QUIC close code: the certificate names another node.
const CLOSE_WRONG_NAME: u32 = 1;

/// What the mesh works with of its node: handles to state owned elsewhere (the store by its
/// writer, the hub by the sessions, readiness by the mesh's timer, which sets it). The mesh never
/// reaches the dispatcher.
pub struct Local {
    /// The store.
    pub store: Store,
    /// Who is connected here.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Caught up with the mesh (set by the mesh's timer).
    pub ready: Arc<AtomicBool>,
    /// Groups with more online members here than this get no join or exit notices.
    pub notice_limit: usize,
    /// Customer-service calls from other nodes, for the router task here.
    pub support_calls: mpsc::Sender<crate::cluster::RemoteCall>,
}

/// A send waiting for its owner's answer.
type Forwarding = (NewMessage, oneshot::Sender<Result<StoredMessage, Status>>);

/// Sends queued for one peer's forwarding stream; beyond it sends are answered retryable.
const FORWARD_QUEUE: usize = 8192;
/// Forwarded sends an owner has taken from one stream and not answered yet; it reads no further
/// until some are answered.
const FORWARDS_IN_FLIGHT: usize = 4096;

/// A configured peer and its connection.
struct Peer {
    spec: NodeSpec,
    addr: String,
    /// The connection this node dialled.
    conn: Mutex<Option<quinn::Connection>>,
    /// Frames for the control stream of that connection.
    control: Mutex<Option<mpsc::Sender<Arc<Vec<u8>>>>>,
    /// Sends for the forwarding stream of that connection.
    forwards: Mutex<Option<mpsc::Sender<Forwarding>>>,
    /// Presence deltas for this peer were dropped: it gets a full snapshot next.
    presence_stale: AtomicBool,
    /// Newest revision of the peer applied here.
    applied: AtomicU64,
    /// Newest revision the peer reported.
    head: AtomicU64,
    /// Commit time of the newest applied batch, epoch ms (for the lag metric).
    applied_at_ms: AtomicI64,
    /// When that batch was applied here, epoch ms.
    applied_here_ms: AtomicI64,
}

impl Peer {
    /// The queue of the control stream, while connected.
    fn control_tx(&self) -> Option<mpsc::Sender<Arc<Vec<u8>>>> {
        self.control.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The queue of the forwarding stream, while connected.
    fn forward_tx(&self) -> Option<mpsc::Sender<Forwarding>> {
        self.forwards.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[derive(Default)]
struct Stats {
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    forwarded: AtomicU64,
    forward_failures: AtomicU64,
    changes_applied: AtomicU64,
    relays_dropped: AtomicU64,
    handshakes_refused: AtomicU64,
    lists_differ: AtomicU64,
}

/// The running mesh of this node.
pub struct Mesh {
    /// This node.
    pub me: NodeSpec,
    /// Every configured node, this one included: the input of placement.
    pub nodes: Vec<NodeSpec>,
    /// `placement::fingerprint` of `nodes`, said in every hello.
    fingerprint: String,
    /// Nodes that said hello with another node list (or refused ours), and when last.
    disagreeing: Mutex<HashMap<String, Instant>>,
    peers: BTreeMap<String, Arc<Peer>>,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    membership: Mutex<Membership>,
    catchup: Mutex<CatchUp>,
    /// This node's store, hub and readiness.
    local: Arc<Local>,
    /// What this node holds of conversations sequenced elsewhere.
    pub replica: replica::Replica,
    /// Peers this node passes another node's messages on to, because they cannot reach it:
    /// (peer, origin) → until when.
    covering: Mutex<HashMap<(String, String), Instant>>,
    /// This node's head revision once a second, for the last ten minutes (epoch ms, revision):
    /// where to start passing messages on from for a `Cover` that names a time.
    heads: Mutex<std::collections::VecDeque<(i64, u64)>>,
    boot: u64,
    forward_timeout: Duration,
    /// Held while presence is gathered and queued, so a snapshot and the deltas around it go out
    /// in the order they were taken.
    presence: tokio::sync::Mutex<()>,
    stats: Stats,
}

impl Mesh {
    /// Binds the mesh endpoint when the configuration names peers; `None` for a single node.
    pub fn bind(config: &Config, local: Arc<Local>) -> anyhow::Result<Option<Arc<Mesh>>> {
        if config.peers.is_empty() {
            return Ok(None);
        }
        let identity = tls::Identity::load(config)?;
        let endpoint = quinn::Endpoint::server(identity.server_config()?, config.mesh_addr)
            .with_context(|| format!("binding the mesh port {}", config.mesh_addr))?;
        let me = NodeSpec { id: config.node_id.clone(), region: config.region.clone() };
        let mut nodes = vec![me.clone()];
        let mut peers = BTreeMap::new();
        for p in &config.peers {
            let spec = NodeSpec { id: p.id.clone(), region: p.region.clone() };
            nodes.push(spec.clone());
            peers.insert(
                p.id.clone(),
                Arc::new(Peer {
                    spec,
                    addr: p.addr.clone(),
                    conn: Mutex::new(None),
                    control: Mutex::new(None),
                    forwards: Mutex::new(None),
                    presence_stale: AtomicBool::new(false),
                    applied: AtomicU64::new(0),
                    head: AtomicU64::new(0),
                    applied_at_ms: AtomicI64::new(0),
                    applied_here_ms: AtomicI64::new(0),
                }),
            );
        }
        let ids: Vec<String> = peers.keys().cloned().collect();
        Ok(Some(Arc::new(Mesh {
            local,
            me,
            fingerprint: placement::fingerprint(&nodes),
            disagreeing: Mutex::new(HashMap::new()),
            nodes,
            membership: Mutex::new(Membership::new(ids.iter().map(String::as_str), BEAT, config.peer_down_after)),
            catchup: Mutex::new(CatchUp::new(ids.iter().map(String::as_str), Instant::now(), config.peer_down_after)),
            peers,
            endpoint,
            client: identity.client_config()?,
            replica: replica::Replica::default(),
            covering: Mutex::new(HashMap::new()),
            heads: Mutex::new(std::collections::VecDeque::new()),
            boot: rand::random(),
            forward_timeout: config.forward_timeout,
            presence: tokio::sync::Mutex::new(()),
            stats: Stats::default(),
        })))
    }

    /// The UDP address the mesh listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The node that sequences `conversation`: a function of the configured nodes only, so every
    /// node agrees and a partition cannot make a second sequencer (DESIGN §7).
    pub fn owner(&self, conversation: &ConversationId) -> &NodeSpec {
        placement::owner(conversation.as_str(), &self.nodes).unwrap_or(&self.me)
    }

    /// Whether every node heard from lately has the same node list as this one. While one does
    /// not, this node sequences nothing and is not ready: the two lists could name two owners
    /// for one conversation.
    pub fn agrees(&self) -> bool {
        let mut disagreeing = self.disagreeing.lock().unwrap_or_else(|e| e.into_inner());
        disagreeing.retain(|_, at| at.elapsed() < DISAGREEMENT_HOLDS);
        disagreeing.is_empty()
    }

    /// Notes that `node` has another node list (`theirs` nodes long, 0 when unknown).
    fn disagrees(&self, node: &str, theirs: usize) {
        let first = self.disagreeing.lock().unwrap_or_else(|e| e.into_inner()).insert(node.to_string(), Instant::now()).is_none();
        self.stats.lists_differ.fetch_add(1, Ordering::Relaxed);
        if first {
            tracing::error!(
                peer = %node,
                ours = self.nodes.len(),
                theirs,
                "a peer has another node list: refused, and this node sequences nothing until the lists agree"
            );
        }
    }

    /// Notes that `node` has the same node list.
    fn agrees_with(&self, node: &str) {
        if self.disagreeing.lock().unwrap_or_else(|e| e.into_inner()).remove(node).is_some() {
            tracing::info!(peer = %node, "a peer's node list agrees now");
        }
    }

    fn hello(&self) -> V1 {
        V1::Hello {
            node: self.me.id.clone(),
            region: self.me.region.clone(),
            boot: self.boot,
            fingerprint: self.fingerprint.clone(),
            nodes: self.nodes.len(),
        }
    }

    fn lock_membership(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.membership.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A peer's state.
    pub fn peer_state(&self, peer: &str) -> PeerState {
        self.lock_membership().state(peer)
    }

    fn connection(&self, peer: &str) -> Option<quinn::Connection> {
        let p = self.peers.get(peer)?;
        let conn = p.conn.lock().unwrap_or_else(|e| e.into_inner()).clone();
        conn.filter(|c| c.close_reason().is_none())
    }

    /// Sends `message` to `owner` on the forwarding stream and waits for its commit there (and
    /// for the message to reach this node's replica, so local pushes precede the reply as they do
    /// on the owner). The send is queued now, before the returned future is polled: sends
    /// submitted one after another reach the owner, and are sequenced, in that order. When the
    /// owner is not up from here, the send goes through a peer that is, which passes it on
    /// (DESIGN §7: through any peer). Any failure to hear back in time is `Retryable`: the
    /// sender resends with the same client id, which the owner deduplicates.
    pub fn submit_forward(
        self: &Arc<Self>,
        owner: &str,
        message: NewMessage,
    ) -> impl std::future::Future<Output = Result<StoredMessage, Status>> + Send + 'static {
        let reachable = |p: &str| self.peer_state(p) == PeerState::Up && self.connection(p).is_some();
        let route = if reachable(owner) {
            owner.to_string()
        } else {
            self.peers.keys().find(|p| p.as_str() != owner && reachable(p)).cloned().unwrap_or_else(|| owner.to_string())
        };
        self.forward_on(&route, message)
    }

    /// Sends `message` on `peer`'s forwarding stream (the owner, or a peer passing it on).
    fn forward_on(
        self: &Arc<Self>,
        peer: &str,
        message: NewMessage,
    ) -> impl std::future::Future<Output = Result<StoredMessage, Status>> + Send + 'static {
        let started = Instant::now();
        let queue = if self.peer_state(peer) == PeerState::Down { None } else { self.peers.get(peer).and_then(|p| p.forward_tx()) };
        let queued = queue.and_then(|tx| {
            let (reply, answer) = oneshot::channel();
            // Full (8192 sends waiting for one peer) or disconnected: retryable, like a timeout.
            tx.try_send((message, reply)).ok().map(|()| answer)
        });
        let mesh = Arc::clone(self);
        async move {
            let fail = |status| {
                mesh.stats.forward_failures.fetch_add(1, Ordering::Relaxed);
                Err(status)
            };
            let Some(answer) = queued else { return fail(Status::Retryable) };
            let stored = match tokio::time::timeout(mesh.forward_timeout, answer).await {
                Ok(Ok(Ok(m))) => m,
                Ok(Ok(Err(status))) => return fail(status),
                Ok(Err(_)) | Err(_) => return fail(Status::Retryable),
            };
            mesh.stats.forwarded.fetch_add(1, Ordering::Relaxed);
            let left = mesh.forward_timeout.saturating_sub(started.elapsed()).max(Duration::from_millis(100));
            mesh.replica.wait_for(&stored.conversation, stored.seq, left).await;
            Ok(stored)
        }
    }

    /// Where to fetch `conversation`'s messages from: its owner first, then every other connected
    /// peer (any of them may have it); peers that are up before suspect or down ones, so a cut
    /// link does not hold the fill up for a whole timeout first.
    fn sources(&self, conversation: &ConversationId) -> Vec<String> {
        let owner = &self.owner(conversation).id;
        let mut sources: Vec<(bool, bool, String)> = self
            .peers
            .keys()
            .filter(|id| self.connection(id).is_some())
            .map(|id| (self.peer_state(id) != PeerState::Up, id != owner, id.clone()))
            .collect();
        sources.sort();
        sources.into_iter().map(|(_, _, id)| id).collect()
    }

    /// Renews or starts passing `origin`'s messages on to `peer`. A new cover first passes on what
    /// `origin` sequenced from about `since_ms`.
    async fn cover(&self, local: &Local, peer: &str, origin: String, since_ms: i64) {
        if origin == self.me.id || origin == peer || !self.peers.contains_key(&origin) {
            return;
        }
        let key = (peer.to_string(), origin.clone());
        let started = self.covering.lock().unwrap_or_else(|e| e.into_inner()).insert(key, Instant::now() + COVER_LASTS).is_none();
        if !started {
            return;
        }
        tracing::info!(peer, origin = %origin, "a peer cannot reach a node; passing that node's messages on to it");
        let from = since_ms - COVER_MARGIN_MS;
        let mut after = {
            let heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
            heads.iter().rev().find(|(at, _)| *at <= from).map_or(0, |(_, rev)| *rev)
        };
        for _ in 0..COVER_PAGES {
            let Ok(page) = local.store.sequenced_by(&origin, after, COVER_PAGE).await else { return };
            let Some(last) = page.last().map(|(rev, _)| *rev) else { return };
            after = last;
            self.pass_on(peer, page.into_iter().map(|(_, m)| m).collect());
        }
    }

    /// The peers this node passes `origin`'s messages on to now.
    fn covered_peers(&self, origin: &str) -> Vec<String> {
        let now = Instant::now();
        let mut covering = self.covering.lock().unwrap_or_else(|e| e.into_inner());
        covering.retain(|_, until| *until > now);
        covering.keys().filter(|(_, o)| o == origin).map(|(p, _)| p.clone()).collect()
    }

    /// Queues messages for `peer`'s control stream, each conversation's in seq order.
    fn pass_on(&self, peer: &str, mut messages: Vec<StoredMessage>) {
        messages.sort_by(|a, b| (&a.conversation, a.seq).cmp(&(&b.conversation, b.seq)));
        if !self.send_to(peer, &V1::Covered { messages }) {
            self.stats.relays_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes messages a peer passed on: each conversation through the replica (pushed and stored
    /// in order), and a gap left behind is filled in the background.
    async fn take_covered(
        self: &Arc<Self>,
        local: &Arc<Local>,
        messages: Vec<StoredMessage>,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let mut by_conversation: BTreeMap<ConversationId, Vec<StoredMessage>> = BTreeMap::new();
        for m in messages {
            by_conversation.entry(m.conversation.clone()).or_default().push(m);
        }
        for (conversation, list) in by_conversation {
            match self.replica.take(local, &conversation, list).await {
                Ok(true) => self.fill_in_background(local, conversation, tasks, shutdown),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "storing messages a peer passed on failed"),
            }
        }
    }

    /// Fills `conversation`'s gap from the owner or any peer, in a tracked task.
    fn fill_in_background(
        self: &Arc<Self>,
        local: &Arc<Local>,
        conversation: ConversationId,
        tasks: &TaskTracker,
        shutdown: &CancellationToken,
    ) {
        let (local, mesh, shutdown) = (Arc::clone(local), Arc::clone(self), shutdown.clone());
        tasks.spawn(async move {
            let fill = mesh.replica.fill_gap(
                &local,
                conversation.clone(),
                || mesh.sources(&conversation),
                |peer, after| mesh.fetch_since(peer, &conversation, after, 1000),
            );
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = fill => {}
            }
        });
    }

    /// Once a second: records the head revision, and asks the peers that are up to pass on the
    /// messages of each peer that is not.
    fn renew_covers(&self, now_ms: i64, head: u64) {
        {
            let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
            heads.push_back((now_ms, head));
            while heads.len() > 600 {
                heads.pop_front();
            }
        }
        let states: Vec<(String, PeerState)> = self.lock_membership().states().map(|(p, s)| (p.to_string(), s)).collect();
        for (origin, state) in &states {
            if *state == PeerState::Up {
                continue;
            }
            let since_ms = self.peers.get(origin).map_or(0, |p| p.applied_at_ms.load(Ordering::Relaxed));
            for (via, via_state) in &states {
                if via != origin && *via_state == PeerState::Up {
                    self.send_to(via, &V1::Cover { origin: origin.clone(), since_ms });
                }
            }
        }
    }

    /// Makes this node's copy of `conversation` reach `wanted`, fetching what is missing from
    /// the owner or any peer that has it (pushed to local sessions in order, then stored).
    /// Returns whether it reaches that far.
    pub async fn fill(&self, conversation: &ConversationId, wanted: u64) -> bool {
        let sources = self.sources(conversation);
        self.replica
            .fill(&self.local, conversation, wanted, &sources, |peer, after| self.fetch_since(peer, conversation, after, 1000))
            .await
    }

    /// Asks `peer` for `conversation`'s messages after `after`.
    async fn fetch_since(&self, peer: String, conversation: &ConversationId, after: u64, limit: u32) -> anyhow::Result<Vec<StoredMessage>> {
        let conn = self.connection(&peer).context("no connection to the peer")?;
        let request = V1::Since { conversation: conversation.clone(), after, limit };
        match tokio::time::timeout(self.forward_timeout, self.request(&conn, &request)).await?? {
            V1::Messages { messages } => Ok(messages),
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }

    /// Carries out a customer-service call at `conversation`'s owner.
    pub async fn support_call(&self, conversation: &ConversationId, call: serde_json::Value) -> crate::cluster::CallResult {
        let owner = self.owner(conversation).id.clone();
        let Some(conn) = self.connection(&owner) else { return Err((503, format!("{owner} is not reachable; retry"))) };
        match tokio::time::timeout(self.forward_timeout, self.request(&conn, &V1::SupportCall { call })).await {
            Ok(Ok(V1::SupportAnswer { result })) => result,
            Ok(Ok(other)) => Err((502, format!("unexpected answer from {owner}: {other:?}"))),
            Ok(Err(e)) => Err((503, format!("{owner}: {e}; retry"))),
            Err(_) => Err((503, format!("{owner} did not answer in time; retry"))),
        }
    }

    async fn request(&self, conn: &quinn::Connection, request: &V1) -> anyhow::Result<V1> {
        let (mut send, mut recv) = conn.open_bi().await?;
        self.write(&mut send, request).await?;
        send.finish()?;
        self.read(&mut recv).await?.context("the peer closed the stream without answering")
    }

    /// Pushes a frame to the matching connections of every other node (typing, receipts, join and
    /// exit notices, recalls). Best effort, like the push itself: a peer that is down or too far
    /// behind misses it.
    pub fn relay(&self, to: RelayTarget, command: u8, body: &[u8]) {
        let frame = V1::Relay { to, command, body: String::from_utf8_lossy(body).into_owned() };
        self.broadcast(Arc::new(mesh::encode(&frame)));
    }

    /// Queues a frame on the control stream to `peer`, if connected.
    fn send_to(&self, peer: &str, msg: &V1) -> bool {
        let tx = self.peers.get(peer).and_then(|p| p.control_tx());
        tx.is_some_and(|tx| tx.try_send(Arc::new(mesh::encode(msg))).is_ok())
    }

    /// `peer` is down: its users are offline here, and the exit notices this node holds for them
    /// go out.
    fn went_down(&self, local: &Local, peer: &str) {
        for (user, gone) in local.hub.drop_remote(&self.me.id, peer) {
            self.announce_exit(local, &user, gone);
        }
    }

    /// Says goodbye: closes every mesh connection with the goodbye code (peers count this node
    /// down at once) and waits, up to `within`, for the close to reach them.
    pub async fn goodbye(&self, within: Duration) {
        self.endpoint.close(CLOSE_GOODBYE.into(), b"shutdown");
        let _ = tokio::time::timeout(within, self.endpoint.wait_idle()).await;
    }

    /// Queues this node's full presence for `peer`, in order with the deltas.
    async fn send_snapshot(&self, local: &Local, peer: &str) {
        let _order = self.presence.lock().await;
        self.queue_snapshot(local, peer);
    }

    /// Queues a full presence snapshot for `peer` (the caller holds the presence lock). If the
    /// queue cannot take all of it, the peer is marked to get one later.
    fn queue_snapshot(&self, local: &Local, peer: &str) {
        let Some(p) = self.peers.get(peer) else { return };
        p.presence_stale.store(false, Ordering::Release);
        for frame in snapshot_frames(local.hub.online_users()) {
            if !self.send_to(peer, &frame) {
                p.presence_stale.store(true, Ordering::Release);
                return;
            }
        }
    }

    fn broadcast(&self, frame: Arc<Vec<u8>>) {
        for peer in self.peers.values() {
            if let Some(tx) = peer.control_tx() {
                if tx.try_send(Arc::clone(&frame)).is_err() {
                    self.stats.relays_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Queues presence deltas for every peer. A peer whose queue cannot take them is marked to
    /// get a full snapshot instead once it has room, so its view never stays wrong.
    fn broadcast_presence(&self, frames: &[V1]) {
        let encoded: Vec<Arc<Vec<u8>>> = frames.iter().map(|f| Arc::new(mesh::encode(f))).collect();
        for peer in self.peers.values() {
            let Some(tx) = peer.control_tx() else { continue };
            if peer.presence_stale.load(Ordering::Acquire) {
                continue;
            }
            for frame in &encoded {
                if tx.try_send(Arc::clone(frame)).is_err() {
                    peer.presence_stale.store(true, Ordering::Release);
                    break;
                }
            }
        }
    }

    /// Sends a full snapshot to each peer whose deltas were dropped, once its queue has room.
    fn repair_presence(&self, local: &Local) {
        for (id, peer) in &self.peers {
            if !peer.presence_stale.load(Ordering::Acquire) {
                continue;
            }
            let room = peer.control_tx().map_or(0, |tx| tx.capacity());
            if room >= CONTROL_QUEUE / 2 {
                self.queue_snapshot(local, id);
            }
        }
    }

    async fn write(&self, send: &mut quinn::SendStream, msg: &V1) -> anyhow::Result<()> {
        let frame = mesh::encode(msg);
        self.write_raw(send, &frame).await
    }

    async fn write_raw(&self, send: &mut quinn::SendStream, frame: &[u8]) -> anyhow::Result<()> {
        send.write_all(frame).await?;
        self.stats.bytes_out.fetch_add(frame.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Reads one frame; `None` at a clean end of stream.
    async fn read(&self, recv: &mut quinn::RecvStream) -> anyhow::Result<Option<V1>> {
        let mut header = [0u8; 4];
        match recv.read_exact(&mut header).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let len = mesh::frame_len(header)?;
        let mut body = vec![0u8; len];
        recv.read_exact(&mut body).await?;
        self.stats.bytes_in.fetch_add(4 + len as u64, Ordering::Relaxed);
        Ok(Some(mesh::decode(&body)?))
    }

    /// `peer`'s change stream has reached the head it reported.
    fn mark_caught_up(&self, peer: &str) {
        self.catchup.lock().unwrap_or_else(|e| e.into_inner()).caught_up(peer);
    }

    /// Whether the initial catch-up is done (or given up on for unreachable peers).
    fn caught_up(&self, now: Instant) -> bool {
        let mut catchup = self.catchup.lock().unwrap_or_else(|e| e.into_inner());
        catchup.ready(now, |p| self.connection(p).is_some())
    }

    /// Sends a held exit notice that fell to this node: to the group's members here and at every
    /// other node.
    fn announce_exit(&self, local: &Local, user: &str, gone: crate::hub::WentOffline) {
        for (group, push) in local.hub.exit_pushes(user, gone.nick, &gone.groups, local.notice_limit) {
            local.hub.send_group(&group, &push, None);
            self.relay(RelayTarget::Group(group), push.command, &push.body);
        }
    }

    /// Prometheus text for the mesh.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        let states: Vec<(String, PeerState)> = self.lock_membership().states().map(|(p, s)| (p.to_string(), s)).collect();
        out.push_str("# HELP kefu_mesh_peer_up Whether a peer is up (1), suspect (0.5) or down (0).\n# TYPE kefu_mesh_peer_up gauge\n");
        for (p, s) in &states {
            let v = match s {
                PeerState::Up => "1",
                PeerState::Suspect => "0.5",
                PeerState::Down => "0",
            };
            let _ = writeln!(out, "kefu_mesh_peer_up{{peer=\"{p}\"}} {v}");
        }
        out.push_str(
            "# HELP kefu_mesh_replication_lag_revisions Revisions of a peer's change stream not yet applied here.\n\
             # TYPE kefu_mesh_replication_lag_revisions gauge\n",
        );
        for (id, p) in &self.peers {
            let lag = p.head.load(Ordering::Relaxed).saturating_sub(p.applied.load(Ordering::Relaxed));
            let _ = writeln!(out, "kefu_mesh_replication_lag_revisions{{peer=\"{id}\"}} {lag}");
        }
        out.push_str(
            "# HELP kefu_mesh_applied_revision Newest revision of a peer's change stream applied here.\n\
             # TYPE kefu_mesh_applied_revision gauge\n",
        );
        for (id, p) in &self.peers {
            let _ = writeln!(out, "kefu_mesh_applied_revision{{peer=\"{id}\"}} {}", p.applied.load(Ordering::Relaxed));
        }
        out.push_str(
            "# HELP kefu_mesh_replication_lag_seconds Commit at the peer to apply here, for the newest applied batch.\n\
             # TYPE kefu_mesh_replication_lag_seconds gauge\n",
        );
        for (id, p) in &self.peers {
            let lag = (p.applied_here_ms.load(Ordering::Relaxed) - p.applied_at_ms.load(Ordering::Relaxed)).max(0);
            let _ = writeln!(out, "kefu_mesh_replication_lag_seconds{{peer=\"{id}\"}} {}", lag as f64 / 1000.0);
        }
        for (name, help, v) in [
            ("kefu_mesh_bytes_sent_total", "Bytes of mesh frames sent.", &self.stats.bytes_out),
            ("kefu_mesh_bytes_received_total", "Bytes of mesh frames received.", &self.stats.bytes_in),
            ("kefu_mesh_forwarded_total", "Sends forwarded to their owner and committed there.", &self.stats.forwarded),
            ("kefu_mesh_forward_failures_total", "Forwarded sends answered retryable.", &self.stats.forward_failures),
            ("kefu_mesh_changes_applied_total", "Rows applied from peers' change streams.", &self.stats.changes_applied),
            ("kefu_mesh_relays_dropped_total", "Relayed pushes dropped for a peer that was away or behind.", &self.stats.relays_dropped),
            (
                "kefu_mesh_handshakes_refused_total",
                "Incoming mesh connections refused (no valid cluster certificate, or one naming another node).",
                &self.stats.handshakes_refused,
            ),
            (
                "kefu_mesh_node_list_mismatches_total",
                "Mesh hellos refused, given or received, because the two nodes' configured node lists differ.",
                &self.stats.lists_differ,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        }
        out
    }
}

/// Users per presence frame: a snapshot of a node with a million sessions must not exceed the
/// frame limit, so it goes out as a snapshot frame followed by additions.
const PRESENCE_CHUNK: usize = 20_000;

/// A full presence snapshot as frames: the first replaces, the rest add.
fn snapshot_frames(online: Vec<String>) -> Vec<V1> {
    let mut frames: Vec<V1> = online
        .chunks(PRESENCE_CHUNK)
        .enumerate()
        .map(|(i, chunk)| V1::Presence { snapshot: i == 0, online: chunk.to_vec(), offline: vec![], announced: vec![] })
        .collect();
    if frames.is_empty() {
        frames.push(V1::Presence { snapshot: true, online: vec![], offline: vec![], announced: vec![] });
    }
    frames
}

/// Starts the mesh's tasks: accepting peers, dialling each peer, and the timers.
pub fn start(mesh: &Arc<Mesh>, shutdown: &CancellationToken, tasks: &TaskTracker) {
    let local = &mesh.local;
    local.hub.track_presence();
    tasks.spawn(accept_loop(Arc::clone(local), Arc::clone(mesh), shutdown.clone(), tasks.clone()));
    for peer in mesh.peers.values() {
        tasks.spawn(dial_loop(Arc::clone(local), Arc::clone(mesh), Arc::clone(peer), shutdown.clone(), tasks.clone()));
    }
    tasks.spawn(timer_loop(Arc::clone(local), Arc::clone(mesh), shutdown.clone()));
}

async fn timer_loop(local: Arc<Local>, mesh: Arc<Mesh>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(PRESENCE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for tick in 0u64.. {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let now = Instant::now();
        if tick % 10 == 0 {
            mesh.renew_covers(crate::store::now_ms(), local.store.head());
        }
        let transitions = mesh.lock_membership().tick(now);
        for t in transitions {
            tracing::warn!(peer = %t.peer, from = t.from.name(), to = t.to.name(), "mesh peer state changed");
            if t.to == PeerState::Down {
                mesh.went_down(&local, &t.peer);
            }
        }
        {
            let _order = mesh.presence.lock().await;
            let changes = local.hub.take_presence_changes();
            if !changes.is_empty() {
                let (online, offline): (Vec<_>, Vec<_>) = changes.into_iter().partition(|(_, on, _)| *on);
                let online: Vec<String> = online.into_iter().map(|(u, _, _)| u).collect();
                let mut frames = Vec::new();
                for chunk in online.chunks(PRESENCE_CHUNK) {
                    frames.push(V1::Presence { snapshot: false, online: chunk.to_vec(), offline: vec![], announced: vec![] });
                }
                for chunk in offline.chunks(PRESENCE_CHUNK) {
                    let announced = chunk.iter().filter(|(_, _, a)| *a).map(|(u, _, _)| u.clone()).collect();
                    let offline = chunk.iter().map(|(u, _, _)| u.clone()).collect();
                    frames.push(V1::Presence { snapshot: false, online: vec![], offline, announced });
                }
                mesh.broadcast_presence(&frames);
            }
            mesh.repair_presence(&local);
        }
        if !local.ready.load(Ordering::Acquire) && mesh.caught_up(now) {
            tracing::info!("mesh catch-up done; ready");
            local.ready.store(true, Ordering::Release);
        }
    }
}

// -- the dialling side ------------------------------------------------------------------------

async fn dial_loop(local: Arc<Local>, mesh: Arc<Mesh>, peer: Arc<Peer>, shutdown: CancellationToken, tasks: TaskTracker) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = async {
            let addr = tokio::net::lookup_host(&peer.addr).await?.next().with_context(|| format!("{} resolves to nothing", peer.addr))?;
            let connecting = mesh.endpoint.connect_with(mesh.client.clone(), addr, &peer.spec.id)?;
            let conn = tokio::time::timeout(Duration::from_secs(5), connecting).await.context("handshake timed out")??;
            anyhow::Ok(conn)
        };
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = attempt => r,
        };
        match result {
            Ok(conn) => {
                backoff = Duration::from_millis(100);
                tracing::info!(peer = %peer.spec.id, "mesh connected");
                tokio::select! {
                    _ = shutdown.cancelled() => {
                        conn.close(CLOSE_GOODBYE.into(), b"shutdown");
                        return;
                    }
                    r = run_outbound(&local, &mesh, &peer, conn.clone(), &shutdown, &tasks) => {
                        if let Err(e) = r {
                            tracing::info!(peer = %peer.spec.id, error = %e, "mesh connection ended");
                        }
                    }
                }
                if let Some(quinn::ConnectionError::ApplicationClosed(close)) = conn.close_reason() {
                    if close.error_code == quinn::VarInt::from_u32(CLOSE_LISTS_DIFFER) {
                        mesh.disagrees(&peer.spec.id, 0);
                    }
                    if close.error_code == quinn::VarInt::from_u32(CLOSE_GOODBYE) {
                        tracing::info!(peer = %peer.spec.id, "mesh peer is stopping");
                        if let Some(t) = mesh.lock_membership().left(&peer.spec.id) {
                            mesh.went_down(&local, &t.peer);
                        }
                    }
                }
                *peer.control.lock().unwrap_or_else(|e| e.into_inner()) = None;
                *peer.forwards.lock().unwrap_or_else(|e| e.into_inner()) = None;
                *peer.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                conn.close(0u32.into(), b"reconnecting");
            }
            Err(e) => tracing::debug!(peer = %peer.spec.id, error = %e, "mesh dial failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Runs one dialled connection until it fails: the control stream and the subscription.
async fn run_outbound(
    local: &Arc<Local>,
    mesh: &Arc<Mesh>,
    peer: &Arc<Peer>,
    conn: quinn::Connection,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<()> {
    *peer.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn.clone());
    let mut control = conn.open_uni().await?;
    mesh.write(&mut control, &mesh.hello()).await?;
    let (tx, mut rx) = mpsc::channel::<Arc<Vec<u8>>>(CONTROL_QUEUE);
    {
        // The snapshot and the switch to the new queue happen together: every delta taken after
        // the snapshot goes to this queue, behind it.
        let _order = mesh.presence.lock().await;
        for frame in snapshot_frames(local.hub.online_users()) {
            mesh.write(&mut control, &frame).await?;
        }
        *peer.control.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        peer.presence_stale.store(false, Ordering::Release);
    }
    let subscription = subscribe(local, mesh, peer, &conn, shutdown, tasks);
    let (forward_tx, forward_rx) = mpsc::channel(FORWARD_QUEUE);
    *peer.forwards.lock().unwrap_or_else(|e| e.into_inner()) = Some(forward_tx);
    let forwarding = forward_loop(mesh, &conn, forward_rx);
    let control_loop = async {
        let mut beat = tokio::time::interval(BEAT);
        loop {
            tokio::select! {
                frame = rx.recv() => match frame {
                    Some(frame) => mesh.write_raw(&mut control, &frame).await?,
                    None => return anyhow::Ok(()),
                },
                _ = beat.tick() => mesh.write(&mut control, &V1::Beat { at_ms: crate::store::now_ms() }).await?,
            }
        }
    };
    tokio::select! {
        r = subscription => r,
        r = control_loop => r,
        r = forwarding => r,
        e = conn.closed() => Err(e.into()),
    }
}

/// The forwarding stream to a peer: writes the queued sends in queue order, each numbered, and
/// hands each answer to its sender. Ends (and every unanswered sender hears nothing, so it
/// answers retryable) when the connection does.
async fn forward_loop(mesh: &Mesh, conn: &quinn::Connection, mut queue: mpsc::Receiver<Forwarding>) -> anyhow::Result<()> {
    let (mut send, mut recv) = conn.open_bi().await?;
    mesh.write(&mut send, &V1::ForwardStream).await?;
    let waiting: Mutex<HashMap<u64, oneshot::Sender<Result<StoredMessage, Status>>>> = Mutex::new(HashMap::new());
    let writing = async {
        let mut next = 0u64;
        while let Some((message, reply)) = queue.recv().await {
            next += 1;
            waiting.lock().unwrap_or_else(|e| e.into_inner()).insert(next, reply);
            mesh.write(&mut send, &V1::Forward { message, id: next }).await?;
        }
        anyhow::Ok(())
    };
    let reading = async {
        loop {
            let Some(frame) = mesh.read(&mut recv).await? else { anyhow::bail!("the peer ended the forwarding stream") };
            let V1::Forwarded { result, id } = frame else { anyhow::bail!("expected an answer to a forwarded send") };
            let reply = waiting.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
            if let Some(reply) = reply {
                let _ = reply.send(result.map_err(|code| Status::from_code(code).unwrap_or(Status::Retryable)));
            }
        }
    };
    tokio::select! {
        r = writing => r,
        r = reading => r,
    }
}

/// Follows the peer's change stream from the newest revision of it applied here.
async fn subscribe(
    local: &Arc<Local>,
    mesh: &Arc<Mesh>,
    peer: &Arc<Peer>,
    conn: &quinn::Connection,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> anyhow::Result<()> {
    let mut applied = local.store.peer_applied(&peer.spec.id).await?;
    peer.applied.store(applied, Ordering::Relaxed);
    let (mut send, mut recv) = conn.open_bi().await?;
    mesh.write(&mut send, &V1::Subscribe { node: mesh.me.id.clone(), after: applied }).await?;
    loop {
        let Some(frame) = mesh.read(&mut recv).await? else { anyhow::bail!("the peer ended the change stream") };
        let V1::Changes(batch) = frame else { anyhow::bail!("expected a change batch") };
        // The peer serves a subscription only after it accepted this node's hello.
        mesh.agrees_with(&peer.spec.id);
        peer.head.store(batch.head, Ordering::Relaxed);
        if batch.head < applied {
            // The peer holds less than was already applied from it: its database was replaced
            // (same node id, new volume). It resends everything; start counting again.
            tracing::warn!(peer = %peer.spec.id, applied, head = batch.head, "a peer's database is new; following it from the start");
            local.store.forget_peer(&peer.spec.id).await?;
            applied = 0;
        }
        match replication::accept(applied, batch.after, batch.upto) {
            Accept::Apply => {
                for change in &batch.changes {
                    // A user online here who joined a group at another node gets its messages
                    // here too from now on.
                    if let schema::mesh::Change::Member { group_id, user_id, removed: false, .. } = change {
                        local.hub.join(user_id, group_id);
                    }
                }
                let (upto, head, at_ms, n) = (batch.upto, batch.head, batch.at_ms, batch.changes.len());
                // Peers that cannot reach this one get its messages from here.
                let covered = mesh.covered_peers(&peer.spec.id);
                let passing: Vec<StoredMessage> = if covered.is_empty() {
                    Vec::new()
                } else {
                    batch
                        .changes
                        .iter()
                        .filter_map(|c| match c {
                            schema::mesh::Change::Message(m) if m.origin == peer.spec.id => Some(m.clone()),
                            _ => None,
                        })
                        .collect()
                };
                let gaps = mesh.replica.receive(local, &peer.spec.id, batch).await?;
                if !passing.is_empty() {
                    for p in &covered {
                        mesh.pass_on(p, passing.clone());
                    }
                }
                for conversation in gaps {
                    mesh.fill_in_background(local, conversation, tasks, shutdown);
                }
                applied = upto;
                peer.applied.store(applied, Ordering::Relaxed);
                peer.applied_at_ms.store(at_ms, Ordering::Relaxed);
                peer.applied_here_ms.store(crate::store::now_ms(), Ordering::Relaxed);
                mesh.stats.changes_applied.fetch_add(n as u64, Ordering::Relaxed);
                if upto >= head {
                    mesh.mark_caught_up(&peer.spec.id);
                }
            }
            Accept::Duplicate => {
                if batch.head <= applied {
                    mesh.mark_caught_up(&peer.spec.id);
                }
            }
            Accept::Gap => anyhow::bail!("gap in the change stream after revision {applied}"),
        }
    }
}

// -- the accepting side -----------------------------------------------------------------------

async fn accept_loop(local: Arc<Local>, mesh: Arc<Mesh>, shutdown: CancellationToken, tasks: TaskTracker) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            i = mesh.endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let (local, mesh, shutdown, inner) = (Arc::clone(&local), Arc::clone(&mesh), shutdown.clone(), tasks.clone());
        tasks.spawn(async move {
            let conn = match incoming.await {
                Ok(conn) => conn,
                Err(e) => {
                    mesh.stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
                    return tracing::warn!(error = %e, "mesh handshake refused");
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => conn.close(CLOSE_GOODBYE.into(), b"shutdown"),
                _ = serve_inbound(local, mesh, conn.clone(), shutdown.clone(), inner) => {}
            }
        });
    }
}

/// Serves a peer's connection: its hello first, and only once that is accepted its control
/// stream and its requests.
async fn serve_inbound(local: Arc<Local>, mesh: Arc<Mesh>, conn: quinn::Connection, shutdown: CancellationToken, tasks: TaskTracker) {
    let Ok(mut control) = conn.accept_uni().await else { return };
    let Some(peer) = accept_hello(&mesh, &conn, &mut control).await else { return };
    let streams = TaskTracker::new();
    streams.spawn(read_control(Arc::clone(&local), Arc::clone(&mesh), peer, control, shutdown, tasks));
    loop {
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                // A peer has one control stream per connection.
                Ok(_) => tracing::warn!("a second control stream on a mesh connection; ignored"),
                Err(_) => break,
            },
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => drop(streams.spawn(serve_request(Arc::clone(&local), Arc::clone(&mesh), send, recv))),
                Err(_) => break,
            },
        }
    }
    streams.close();
}

/// Reads and checks the hello on a peer's control stream: the certificate must name the node
/// it says it is, and its node list must be this node's. Returns the peer's id, or closes the
/// connection.
async fn accept_hello(mesh: &Mesh, conn: &quinn::Connection, recv: &mut quinn::RecvStream) -> Option<String> {
    match mesh.read(recv).await {
        Ok(Some(V1::Hello { node, .. })) if !tls::names(conn, &node) => {
            mesh.stats.handshakes_refused.fetch_add(1, Ordering::Relaxed);
            conn.close(CLOSE_WRONG_NAME.into(), b"certificate names another node");
            tracing::warn!(peer = %node, "a node said hello with a certificate that does not name it; closed");
            None
        }
        Ok(Some(V1::Hello { node, fingerprint, nodes, .. })) if !fingerprint.is_empty() && fingerprint != mesh.fingerprint => {
            mesh.disagrees(&node, nodes);
            conn.close(CLOSE_LISTS_DIFFER.into(), b"the node lists differ");
            None
        }
        Ok(Some(V1::Hello { node, region, boot, fingerprint, .. })) if mesh.peers.contains_key(&node) => {
            if fingerprint.is_empty() {
                // A node from before fingerprints (a rolling upgrade): it cannot say its list.
                tracing::warn!(peer = %node, "a peer did not say its node list (an older version); make sure the lists agree");
            }
            tracing::debug!(peer = %node, region = %region, boot, "mesh hello");
            mesh.agrees_with(&node);
            Some(node)
        }
        Ok(Some(V1::Hello { node, .. })) => {
            // Same fingerprint but not configured here: only this node itself could be that.
            tracing::warn!(peer = %node, "a node that is not in the peer list dialled in; closed");
            conn.close(CLOSE_WRONG_NAME.into(), b"not a configured peer");
            None
        }
        _ => {
            tracing::warn!("a mesh control stream did not start with a hello");
            conn.close(CLOSE_WRONG_NAME.into(), b"no hello");
            None
        }
    }
}

/// A peer's control stream after its hello: heartbeats, presence and relayed pushes.
async fn read_control(
    local: Arc<Local>,
    mesh: Arc<Mesh>,
    peer: String,
    mut recv: quinn::RecvStream,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    loop {
        let frame = match mesh.read(&mut recv).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return,
            Err(e) => return tracing::debug!(peer = %peer, error = %e, "mesh control stream ended"),
        };
        let transition = mesh.lock_membership().heard(&peer, Instant::now());
        if let Some(t) = transition {
            tracing::info!(peer = %t.peer, from = t.from.name(), "mesh peer up");
            if t.from == PeerState::Down {
                // Its presence was dropped when it went down: ask for all of it again.
                mesh.send_to(&peer, &V1::Resync);
            }
        }
        match frame {
            V1::Beat { .. } => {}
            V1::Resync => mesh.send_snapshot(&local, &peer).await,
            V1::Cover { origin, since_ms } => mesh.cover(&local, &peer, origin, since_ms).await,
            V1::Covered { messages } => mesh.take_covered(&local, messages, &tasks, &shutdown).await,
            V1::Presence { snapshot, online, offline, announced } => {
                for (user, gone) in local.hub.remote_presence(&mesh.me.id, &peer, snapshot, &online, &offline, &announced) {
                    mesh.announce_exit(&local, &user, gone);
                }
            }
            // A kick (cmd 14 as admin, /api/user/close) relayed as the close frame: the user's
            // sessions here close with it.
            V1::Relay { to: RelayTarget::User(u), command, .. } if command == schema::Command::CloseReq.code() => {
                local.hub.kick_user(&u, schema::Status::CloseOk);
            }
            V1::Relay { to, command, body } => {
                let push = Arc::new(Push { command, body: body.into_bytes().into(), delivery: None });
                match &to {
                    RelayTarget::User(u) => drop(local.hub.send_user(u, &push, None)),
                    RelayTarget::Group(g) => drop(local.hub.send_group(g, &push, None)),
                }
            }
            other => tracing::warn!(peer = %peer, frame = ?other, "unexpected frame on a control stream"),
        }
    }
}

/// A request stream: a subscription, a forwarded send, or a gap fill.
async fn serve_request(local: Arc<Local>, mesh: Arc<Mesh>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let request = match mesh.read(&mut recv).await {
        Ok(Some(request)) => request,
        _ => return,
    };
    let answer = match request {
        V1::Subscribe { node, after } => {
            if let Err(e) = serve_changes(&local, &mesh, &node, after, &mut send).await {
                tracing::debug!(peer = %node, error = %e, "change stream ended");
            }
            return;
        }
        V1::ForwardStream => return serve_forwards(&local, &mesh, send, recv).await,
        V1::Forward { message, id } => answer_forward(&local, &mesh, message, id, None).await,
        V1::Since { conversation, after, limit } => match local.store.since(&conversation, after, limit.min(1000)).await {
            Ok(messages) => V1::Messages { messages },
            Err(_) => V1::Error { status: Status::Retryable.code() },
        },
        V1::SupportCall { call } => {
            let (tx, rx) = oneshot::channel();
            let result = match local.support_calls.try_send((call, tx)) {
                Ok(()) => match tokio::time::timeout(mesh.forward_timeout, rx).await {
                    Ok(Ok(result)) => result,
                    _ => Err((503, "the router did not answer in time; retry".to_string())),
                },
                Err(_) => Err((503, "the router is busy; retry".to_string())),
            };
            V1::SupportAnswer { result }
        }
        _ => V1::Error { status: Status::BadRequest.code() },
    };
    if mesh.write(&mut send, &answer).await.is_ok() {
        let _ = send.finish();
    }
}

/// Checks a forwarded send and queues it for the writer now (so sends are sequenced in the order
/// they arrived); the future resolves to the answer after the commit.
/// `permit`, when given, is the place in the write queue reserved for it.
fn answer_forward(
    local: &Local,
    mesh: &Arc<Mesh>,
    message: NewMessage,
    id: u64,
    permit: Option<crate::store::WritePermit>,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = V1> + Send>> {
    let owner = mesh.owner(&message.conversation).id.clone();
    if owner != mesh.me.id {
        // A peer that cannot reach the owner sent it here: pass it on, straight to the owner
        // (never through a third node), in the order it came.
        let passed = mesh.forward_on(&owner, message);
        return Box::pin(async move {
            let result = passed.await.map_err(Status::code);
            V1::Forwarded { result, id }
        });
    }
    let refused = if !(local.ready.load(Ordering::Acquire) && mesh.agrees()) {
        // Not caught up yet (this node may not hold the newest seq it gave out before), or a
        // peer has another node list.
        Some(Status::Retryable)
    } else {
        None
    };
    let appended = refused.is_none().then(|| {
        local.metrics.messages_in.fetch_add(1, Ordering::Relaxed);
        let appended: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> = match permit {
            Some(permit) => Box::pin(permit.append(message)),
            None => Box::pin(local.store.submit_append(message, None)),
        };
        appended
    });
    Box::pin(async move {
        let result = match appended {
            None => Err(refused.unwrap_or(Status::Retryable).code()),
            Some(appended) => match appended.await {
                Ok(delivery) => Ok(StoredMessage::clone(&delivery.message)),
                Err(e) => {
                    tracing::warn!(error = %e, "forwarded append failed");
                    Err(Status::Retryable.code())
                }
            },
        };
        V1::Forwarded { result, id }
    })
}

/// A peer's forwarding stream: each send is queued for the writer as it arrives, and answered in
/// the same order once committed. At most `FORWARDS_IN_FLIGHT` are waiting at a time.
async fn serve_forwards(local: &Arc<Local>, mesh: &Arc<Mesh>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    // Reading is not cancel-safe, so it runs on its own and hands whole frames over.
    let (frames_tx, mut frames) = mpsc::channel::<V1>(1024);
    let reading = async {
        while let Ok(Some(frame)) = mesh.read(&mut recv).await {
            if frames_tx.send(frame).await.is_err() {
                break;
            }
        }
        drop(frames_tx);
    };
    // Owns `frames`: when it stops early, the reader's next hand-over fails and it stops too.
    let answering = async move {
        let mut in_flight = FuturesOrdered::new();
        let mut open = true;
        while open || !in_flight.is_empty() {
            tokio::select! {
                frame = frames.recv(), if open && in_flight.len() < FORWARDS_IN_FLIGHT => match frame {
                    Some(V1::Forward { message, id }) => {
                        // A place in the write queue first, so that a full queue cannot let the
                        // next send overtake this one.
                        let permit = match mesh.owner(&message.conversation).id == mesh.me.id {
                            true => local.store.reserve().await.ok(),
                            false => None,
                        };
                        in_flight.push_back(answer_forward(local, mesh, message, id, permit));
                    }
                    Some(other) => {
                        tracing::warn!(frame = ?other, "unexpected frame on a forwarding stream");
                        open = false;
                    }
                    None => open = false,
                },
                Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                    if mesh.write(&mut send, &answer).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = send.finish();
    };
    tokio::join!(reading, answering);
}

/// Streams this node's changes after `after` to `subscriber`: backfill from the database, then
/// the live tail, forever.
async fn serve_changes(
    local: &Arc<Local>,
    mesh: &Arc<Mesh>,
    subscriber: &str,
    after: u64,
    send: &mut quinn::SendStream,
) -> anyhow::Result<()> {
    // Subscribe to the tail before reading the head, so no commit falls between the two.
    let mut tail = local.store.subscribe_changes();
    let mut sent = after;
    if after > local.store.head() {
        // The subscriber has seen more of this node than this database holds: it is a new
        // database under the same node id (a lost volume). Everything is sent again.
        tracing::warn!(peer = %subscriber, after, head = local.store.head(), "a peer is ahead of this database; resending all of it");
        sent = 0;
    }
    let mut announced = false;
    loop {
        // Backfill: everything this node has, its own changes and what it applied from others.
        while let Some((lo, mut hi)) = replication::next_backfill(sent, local.store.head()) {
            // A range whose frame would be over the limit (large messages) is halved until it fits.
            let frame = loop {
                // Everything, the subscriber's own messages included: it may have lost them.
                let changes = local.store.changes_between(lo, hi).await?;
                let batch = ChangeBatch { after: lo, upto: hi, head: local.store.head(), at_ms: crate::store::now_ms(), changes };
                let frame = mesh::encode(&V1::Changes(batch));
                if frame.len() <= FRAME_BUDGET || hi - lo <= 1 {
                    break frame;
                }
                hi = lo + (hi - lo) / 2;
            };
            mesh.write_raw(send, &frame).await?;
            sent = hi;
            announced = true;
        }
        if !announced {
            // Nothing to send: say so, so the subscriber knows it has caught up.
            let batch = ChangeBatch { after: sent, upto: sent, head: sent, at_ms: crate::store::now_ms(), changes: vec![] };
            mesh.write(send, &V1::Changes(batch)).await?;
            announced = true;
        }
        // Live: each commit as it happens, this node's own changes only. A commit with nothing
        // for this subscriber (it applied rows from peers) is not sent on its own: the next batch
        // that is sent covers its range, or an empty one does after a quiet second, so the
        // subscriber's watermark stays exact without a frame per commit.
        let mut wire = sent;
        let mut quiet = tokio::time::interval(Duration::from_secs(1));
        quiet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let batch = tokio::select! {
                batch = tail.recv() => match batch {
                    Ok(batch) => batch,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(()),
                },
                _ = quiet.tick() => {
                    if wire < sent {
                        let out = ChangeBatch { after: wire, upto: sent, head: local.store.head(), at_ms: crate::store::now_ms(), changes: vec![] };
                        mesh.write(send, &V1::Changes(out)).await?;
                        wire = sent;
                    }
                    continue;
                }
            };
            match replication::on_tail(sent, batch.after, batch.upto) {
                Step::Skip => {}
                Step::Send => {
                    let changes: Vec<_> = batch
                        .changes
                        .iter()
                        .filter(|(local, c)| replication::ships_live(*local, c, subscriber))
                        .map(|(_, c)| c.clone())
                        .collect();
                    sent = batch.upto;
                    if changes.is_empty() {
                        continue;
                    }
                    let out = ChangeBatch {
                        after: wire.min(batch.after),
                        upto: batch.upto,
                        head: local.store.head(),
                        at_ms: batch.at_ms,
                        changes,
                    };
                    let frame = mesh::encode(&V1::Changes(out));
                    if frame.len() > FRAME_BUDGET {
                        // Too large for one frame: the backfill path cuts it into ranges that fit.
                        break;
                    }
                    mesh.write_raw(send, &frame).await?;
                    wire = sent;
                }
                Step::Backfill { .. } => break,
            }
        }
        // Whatever was skipped quietly is covered by the backfill that follows.
        sent = wire;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn large_snapshots_are_cut_into_frames_under_the_limit() {
        let users: Vec<String> = (0..45_000).map(|i| format!("user-{i:08}")).collect();
        let frames = snapshot_frames(users.clone());
        assert_eq!(frames.len(), 3);
        let mut seen = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            let V1::Presence { snapshot, online, .. } = f else { panic!("not presence") };
            assert_eq!(*snapshot, i == 0, "only the first replaces");
            assert!(mesh::encode(f).len() < mesh::MAX_FRAME);
            seen.extend(online.iter().cloned());
        }
        assert_eq!(seen, users);
        assert!(matches!(&snapshot_frames(vec![])[..], [V1::Presence { snapshot: true, .. }]), "an empty node still says so");
    }
}

//! Storage: the only module with SQL. Owns the libSQL database: one writer thread that applies
//! every write in batches (one transaction and one fsync per batch, sized by the backlog, not a
//! timer), and a few reader connections. WAL mode, so readers never wait for the writer.
//!
//! The writer assigns each message its per-conversation `seq`, deduplicates by the sender's
//! client id, and after COMMIT hands the committed events, in commit order, to the `feed`
//! channel. Every row it writes also gets the node's next *revision*; each committed
//! transaction's changes go to an in-memory tail (`subscribe_changes`) and can be read again by
//! revision range (`changes_between`): that is what the mesh ships to other nodes. Changes from
//! other nodes come back in through `apply`, with the peer's stream position in the same
//! transaction. Whoever drains the feed (the fan-out) delivers them and then answers the sender, so a
//! success reply always follows the commit and recipients see one order per conversation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libsql::{params, Connection, Value};
use schema::mesh::{Change, ChangeBatch};
pub use schema::message::{NewMessage, Record, StoredMessage, UserRecord};
use schema::ConversationId;
use tokio::sync::{broadcast, mpsc, oneshot, Mutex};

use crate::config::Durability;
use crate::metrics::Metrics;

/// Most operations applied in one transaction. Flat out, a batch touches each busy
/// conversation's leaf of the table and of its index once however many of its messages it holds,
/// so larger batches write fewer WAL pages per message: 4,096 against 2,048 delivered 6 % more
/// with 200 senders (BENCHMARKS.md, 2026-12-04). Below saturation batches are as large as the
/// backlog, so this only matters flat out.
const MAX_BATCH: usize = 4096;
/// Capacity of the write queue; senders wait when it is full (backpressure, nothing dropped).
const WRITE_QUEUE: usize = 8192;
/// Reader connections.
const READERS: usize = 4;
/// Conversations whose newest seq the writer keeps in memory; past that the map starts over
/// after a commit (a conversation not in it costs one indexed `MAX(seq)` read on its next
/// message), so a node that has seen millions of conversations does not keep one entry for each.
const SEQS_KEPT: usize = if cfg!(test) { 8 } else { 65_536 };
/// Longest a fire-and-forget cursor move waits before it is written (merged with later ones).
const CURSOR_DELAY: Duration = Duration::from_millis(100);
/// After this long without work, a connection gives its SQLite page cache back (`shrink_memory`):
/// a wave of 10,000 logins fills the writer's and the readers' caches (2 MiB each at most), which
/// otherwise stay allocated after every client has gone. The pages are in the OS's file cache, so
/// the first reads after that cost a copy each, not a disk read.
pub const IDLE_SHRINK: Duration = Duration::from_secs(5);

/// A storage failure. Every one is reported to the client as retryable: nothing was half-stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// libSQL reported an error.
    #[error("database: {0}")]
    Db(#[from] libsql::Error),
    /// The writer thread is gone (the node is shutting down).
    #[error("the writer has stopped")]
    Closed,
    /// A stored value could not be decoded.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A recall that was committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Recalled {
    /// The message as it is now (recalled).
    pub message: StoredMessage,
    /// Who recalled it.
    pub by: String,
}

/// Why a recall was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecallRefusal {
    /// No such message.
    NotFound,
    /// Not the sender, and not an agent or admin.
    Forbidden,
    /// Past the window.
    Expired,
}

/// An event the writer hands to the fan-out after commit, in commit order.
#[derive(Debug)]
pub enum Committed {
    /// A message was appended (or was a duplicate of an earlier one, which is not delivered again).
    Message {
        /// The message.
        message: Arc<StoredMessage>,
        /// Whether this was a repeat of a client id already stored.
        duplicate: bool,
        /// The connection the send came in on, as the submitter named it (the fan-out gives the
        /// sender's other connections a copy, not this one).
        from_conn: Option<u64>,
        /// The sender's reply, answered by the fan-out after delivery.
        reply: oneshot::Sender<Result<Delivery>>,
    },
    /// A message sequenced by another node was stored here for the first time: pushed to local
    /// connections, in commit order with everything else.
    Replica(Arc<StoredMessage>),
    /// A user's tokens were revoked (password changed, banned, deleted, logged out), here or at
    /// another node: their sessions here end.
    SignedOut(String),
    /// A user joined or left a group (here or at another node): the hub follows, so a removed
    /// member stops receiving at once.
    Membership {
        /// The group.
        group: String,
        /// The user.
        user: String,
        /// Whether they are a member now.
        member: bool,
    },
    /// A write in a batch that changed memberships was committed: answered by the fan-out, after
    /// the batch's memberships were applied to the hub.
    Flag {
        /// The write's result.
        flag: bool,
        /// The requester's reply.
        reply: oneshot::Sender<Result<bool>>,
    },
    /// A message was recalled.
    Recall {
        /// What was recalled.
        recalled: Arc<Recalled>,
        /// The requester's reply.
        reply: oneshot::Sender<Result<Arc<Recalled>, RecallRefusal>>,
    },
}

/// What happened to an appended message, as the sender learns it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub message: Arc<StoredMessage>,
    /// For a private message: whether the recipient had a connection to push to.
    pub recipient_online: bool,
}

/// What one committed transaction changed, as the mesh ships it: revisions `(after, upto]`. A
/// change is `local` when this node made it (a send, a login, a cursor move here) rather than
/// applied it from a peer.
#[derive(Debug)]
pub struct LocalBatch {
    /// Exclusive lower bound.
    pub after: u64,
    /// Inclusive upper bound.
    pub upto: u64,
    /// Commit time, epoch ms.
    pub at_ms: i64,
    /// The changes, in revision order, each flagged local or not.
    pub changes: Vec<(bool, Change)>,
}

/// Capacity of the in-memory change tail; a subscriber that falls further behind reads from the
/// database instead.
const CHANGE_TAIL: usize = 1024;

enum WriteOp {
    Append(NewMessage, Option<u64>, oneshot::Sender<Result<Delivery>>),
    Cursor {
        user: String,
        conversation: ConversationId,
        delivered: u64,
        read: u64,
        reply: oneshot::Sender<Result<bool>>,
    },
    Recall {
        id: String,
        by: String,
        privileged: bool,
        now_ms: i64,
        window_ms: i64,
        reply: oneshot::Sender<Result<Arc<Recalled>, RecallRefusal>>,
    },
    EditUser(String, UserEdit, oneshot::Sender<Result<Option<UserRecord>>>),
    EditRecord(String, String, RecordEdit, oneshot::Sender<Result<Option<Record>>>),
    Outbox(LocalOp, oneshot::Sender<Result<bool>>),
    CreateGroup {
        group: String,
        name: Option<String>,
        closed: bool,
        members: Vec<String>,
        reply: oneshot::Sender<Result<bool>>,
    },
    SetMember {
        group: String,
        user: String,
        member: bool,
        reply: oneshot::Sender<Result<bool>>,
    },
    Join {
        group: String,
        name: Option<String>,
        user: String,
        reply: oneshot::Sender<Result<bool>>,
    },
    Import(Vec<StoredMessage>, oneshot::Sender<Result<bool>>),
    Apply(String, ChangeBatch, oneshot::Sender<Result<bool>>),
    ForgetPeer(String, oneshot::Sender<Result<bool>>),
    /// Cursor moves are waiting in [`PendingCursors`] (sent once per empty → non-empty).
    CursorsWaiting,
    /// The store has been idle for IDLE_SHRINK: give the page cache back (from `watch_idle`),
    /// answered when done (or dropped when the writer was not idle after all).
    Shrink(oneshot::Sender<()>),
}

/// A webhook delivery waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// Delivery id (`X-Kefu-Delivery`).
    pub id: String,
    /// The inbox whose secret signs it.
    pub inbox: String,
    /// Where it goes.
    pub url: String,
    /// The JSON body.
    pub body: String,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When to try next, epoch ms.
    pub next_at: i64,
}

/// A change to this node's own tables, the webhook outbox and `support_pending` (no revision,
/// never replicated).
#[derive(Debug)]
pub enum LocalOp {
    /// New deliveries.
    Add(Vec<OutboxRow>),
    /// Delivered: gone.
    Done(String),
    /// A customer-service message was handled (see `support_pending`).
    Handled(ConversationId, u64),
    /// Failed: try again at `next_at`.
    Retry {
        /// Delivery id.
        id: String,
        /// Failed attempts now.
        attempts: u32,
        /// Next try, epoch ms.
        next_at: i64,
    },
}

/// A reserved place in the write queue ([`Store::reserve`]).
pub struct WritePermit(mpsc::OwnedPermit<WriteOp>);

impl WritePermit {
    /// Queues a peer's change batch now; the future resolves after its commit. See [`Store::apply`].
    pub fn apply(self, peer: &str, batch: ChangeBatch) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        self.0.send(WriteOp::Apply(peer.to_string(), batch, tx));
        async move { rx.await.map_err(|_| StoreError::Closed)?.map(drop) }
    }

    /// Queues an append now; the future resolves after its commit and delivery. See
    /// [`Store::submit_append`].
    pub fn append(self, message: NewMessage) -> impl std::future::Future<Output = Result<Delivery>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        self.0.send(WriteOp::Append(message, None, tx));
        async move { rx.await.map_err(|_| StoreError::Closed)? }
    }

    /// Queues an import now; the future resolves after its commit. See [`Store::import`].
    pub fn import(self, messages: Vec<StoredMessage>) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        self.0.send(WriteOp::Import(messages, tx));
        async move { rx.await.map_err(|_| StoreError::Closed)?.map(drop) }
    }
}

/// Fire-and-forget delivered-cursor moves waiting for the writer, merged by max (the floor by
/// min), keyed by (user, conversation). Sessions add to it without waking the writer thread for
/// each push; the first move into an empty map sends one [`WriteOp::CursorsWaiting`], and the
/// writer writes them all CURSOR_DELAY later.
#[derive(Default)]
struct PendingCursors {
    moves: std::sync::Mutex<CursorMoves>,
}

/// (user, conversation) → (delivered, floor).
type CursorMoves = HashMap<(String, ConversationId), (u64, u64)>;

impl PendingCursors {
    /// Merges one move; true when the map was empty (the writer must be told).
    fn add(&self, user: &str, conversation: &ConversationId, delivered: u64, floor: u64) -> bool {
        let mut moves = self.moves.lock().unwrap_or_else(|e| e.into_inner());
        let first = moves.is_empty();
        let e = moves.entry((user.to_string(), conversation.clone())).or_insert((0, u64::MAX));
        e.0 = e.0.max(delivered);
        e.1 = e.1.min(floor);
        first
    }

    fn len(&self) -> usize {
        self.moves.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn take(&self) -> CursorMoves {
        std::mem::take(&mut *self.moves.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A cheap, cloneable handle to the store.
#[derive(Clone)]
pub struct Store {
    writer: mpsc::Sender<WriteOp>,
    cursors: Arc<PendingCursors>,
    changes: broadcast::Sender<Arc<LocalBatch>>,
    head: Arc<AtomicU64>,
    readers: Arc<Readers>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

/// The reader connections. The database is opened in SQLite's multi-thread mode (no lock per
/// connection), so a connection, and every statement and row set made from it, is used only
/// while its lock is held: nothing from a reader may outlive its guard.
struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

/// Every IDLE_SHRINK, if nothing was written since the last tick, gives the page caches back:
/// the readers' here, the writer's by a [`WriteOp::Shrink`]. Once per idle spell, unless reads
/// have filled the caches again by REFILL since. Reads do not end a spell: the node's own timers
/// read every second or two (the webhook outbox, unhandled support messages, the routing lists),
/// so a store that waited for reads to stop would never shrink; a read after a shrink costs a
/// copy from the OS's file cache per page. `wrote` is set by every write batch. Holds the
/// writer's queue weakly so that it never keeps the writer from closing; ends when the store is
/// gone.
async fn watch_idle(readers: std::sync::Weak<Readers>, writer: mpsc::WeakSender<WriteOp>, wrote: Arc<AtomicBool>) {
    /// How much reads must have put back in the caches since the last shrink to shrink again.
    const REFILL: i64 = 512 * 1024;
    // What SQLite held right after the last shrink of this spell.
    let mut floor: Option<i64> = None;
    loop {
        tokio::time::sleep(IDLE_SHRINK).await;
        let Some(readers) = readers.upgrade() else { return };
        if wrote.swap(false, Ordering::Relaxed) {
            floor = None;
            continue;
        }
        if floor.is_some_and(|f| sqlite_memory_used() <= f + REFILL) {
            continue;
        }
        for conn in &readers.conns {
            // A reader in use is not idle: it is left for the next spell.
            if let Ok(conn) = conn.try_lock() {
                if let Err(e) = shrink(&conn).await {
                    tracing::debug!(error = %e, "a reader kept its page cache");
                }
            }
        }
        let (done, shrunk) = oneshot::channel();
        // A full queue is a busy writer, not an idle one.
        if writer.upgrade().is_some_and(|writer| writer.try_send(WriteOp::Shrink(done)).is_ok()) {
            let _ = shrunk.await;
        }
        floor = Some(sqlite_memory_used());
    }
}

/// Bytes SQLite has allocated in this process (page caches, statements, schemas), for
/// `/metrics`.
pub fn sqlite_memory_used() -> i64 {
    // sqlite3_memory_used takes no arguments and only reads SQLite's own counter (kept under its
    // mutex); it is callable at any time from any thread.
    #[allow(unsafe_code)]
    unsafe {
        libsql::ffi::sqlite3_memory_used()
    }
}

/// Frees what `conn`'s page cache holds (SQLite's `sqlite3_db_release_memory`).
async fn shrink(conn: &Connection) -> Result<()> {
    drop(conn.query("PRAGMA shrink_memory", ()).await?);
    Ok(())
}

impl Store {
    /// Opens (creating) `dir/kefu.db`, applies migrations, starts the writer thread, and returns
    /// the handle and the receiving end of the commit feed.
    pub async fn open(dir: &Path, origin: &str, metrics: Arc<Metrics>) -> anyhow::Result<(Store, mpsc::Receiver<Committed>)> {
        Store::open_with(dir, origin, metrics, Durability::Disk).await
    }

    /// [`Store::open`] with a chosen durability (`process`: no fsync per commit).
    pub async fn open_with(
        dir: &Path,
        origin: &str,
        metrics: Arc<Metrics>,
        durability: Durability,
    ) -> anyhow::Result<(Store, mpsc::Receiver<Committed>)> {
        std::fs::create_dir_all(dir)?;
        // Multi-thread mode (no per-connection mutex): each connection is used by one thread at a
        // time, the writer's by its thread, a reader's under its lock, so SQLite's lock and unlock
        // around every bind and step (about 5 % of the writer's time flat out) buys nothing.
        let flags = libsql::OpenFlags::default() | libsql::OpenFlags::from_bits_retain(libsql::ffi::SQLITE_OPEN_NOMUTEX);
        let db = libsql::Builder::new_local(dir.join("kefu.db")).flags(flags).build().await?;
        let writer_conn = db.connect()?;
        configure(&writer_conn, Some(durability)).await?;
        migrate(&writer_conn).await?;
        let mut conns = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let conn = db.connect()?;
            configure(&conn, None).await?;
            conns.push(Mutex::new(conn));
        }
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let (feed_tx, feed_rx) = mpsc::channel(WRITE_QUEUE);
        let rev = newest_rev(&writer_conn).await?;
        let head = Arc::new(AtomicU64::new(rev));
        let (changes, _) = broadcast::channel(CHANGE_TAIL);
        let cursors = Arc::new(PendingCursors::default());
        let wrote = Arc::new(AtomicBool::new(false));
        let writer = Writer {
            rev,
            committed_rev: rev,
            pending_changes: Vec::new(),
            signed_out: Vec::new(),
            memberships: Vec::new(),
            changes: changes.clone(),
            head: Arc::clone(&head),
            conn: writer_conn,
            seqs: HashMap::new(),
            origin: origin.to_string(),
            feed: feed_tx,
            metrics,
            stmts: Vec::new(),
            pending_cursors: Arc::clone(&cursors),
            wrote: Arc::clone(&wrote),
            _db: db,
        };
        let thread = std::thread::Builder::new().name("kefu-writer".into()).spawn(move || {
            // Timers only: the writer does no I/O through tokio, and without an I/O driver its
            // runtime parks on a condvar, so waking it is a futex call rather than an eventfd
            // write and an epoll_wait.
            let rt = match tokio::runtime::Builder::new_current_thread().enable_time().build() {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "cannot start the writer runtime"),
            };
            rt.block_on(writer.run(rx));
        })?;
        let thread = Arc::new(std::sync::Mutex::new(Some(thread)));
        let readers = Arc::new(Readers { conns, next: AtomicUsize::new(0) });
        tokio::spawn(watch_idle(Arc::downgrade(&readers), tx.downgrade(), wrote));
        Ok((Store { writer: tx, cursors, changes, head, readers, thread }, feed_rx))
    }

    /// Stops the writer once everything queued is committed, and waits for it (it checkpoints the
    /// WAL on the way out), so another process can open the database right after. Every other
    /// clone of this handle must be dropped first, or the writer keeps running.
    pub async fn close(self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(self);
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    async fn send(&self, op: WriteOp) -> Result<()> {
        self.writer.send(op).await.map_err(|_| StoreError::Closed)
    }

    /// Appends a message. Resolves after commit and delivery.
    pub async fn append(&self, message: NewMessage) -> Result<Delivery> {
        self.submit_append(message, None).await
    }

    /// Queues a message for the writer now, before the returned future is first polled, so that
    /// messages submitted one after another get their seqs in that order even when the futures
    /// are polled out of order (a session keeps several in flight). Only when the write queue is
    /// full (8192 operations) does the future wait for room, and order among such waiters follows
    /// the queue's fairness. `from_conn` comes back with the commit ([`Committed::Message`]).
    pub fn submit_append(
        &self,
        message: NewMessage,
        from_conn: Option<u64>,
    ) -> impl std::future::Future<Output = Result<Delivery>> + Send + 'static {
        let (tx, rx) = oneshot::channel();
        let (waiting, closed) = match self.writer.try_send(WriteOp::Append(message, from_conn, tx)) {
            Ok(()) => (None, false),
            Err(mpsc::error::TrySendError::Full(op)) => (Some(op), false),
            Err(mpsc::error::TrySendError::Closed(_)) => (None, true),
        };
        let writer = self.writer.clone();
        async move {
            if closed {
                return Err(StoreError::Closed);
            }
            if let Some(op) = waiting {
                writer.send(op).await.map_err(|_| StoreError::Closed)?;
            }
            rx.await.map_err(|_| StoreError::Closed)?
        }
    }

    /// Moves a user's delivered cursor to `delivered` after live pushes that started at seq
    /// `floor`, but only if the user has had everything before `floor` (the user's own messages
    /// aside): a push must not carry the cursor past earlier messages the user has not had (they
    /// stay offline messages). Fire and forget: merged in memory without waking the writer for
    /// each push (one wake when none were waiting), and written CURSOR_DELAY after the first.
    pub fn advance_cursor_live(&self, user: &str, conversation: &ConversationId, floor: u64, delivered: u64) -> Result<()> {
        if self.cursors.add(user, conversation, delivered, floor) {
            match self.writer.try_send(WriteOp::CursorsWaiting) {
                // A full queue means the writer is busy: it looks at the map after each batch.
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(StoreError::Closed),
            }
        }
        Ok(())
    }

    /// Moves a user's cursors forward and waits for the commit, so the next read sees it.
    pub async fn advance_cursor_committed(&self, user: &str, conversation: &ConversationId, delivered: u64, read: u64) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Cursor { user: user.to_string(), conversation: conversation.clone(), delivered, read, reply: tx }).await?;
        rx.await.map_err(|_| StoreError::Closed)?.map(drop)
    }

    /// Recalls message `id` on behalf of `by`.
    pub async fn recall(
        &self,
        id: &str,
        by: &str,
        privileged: bool,
        now_ms: i64,
        window: Duration,
    ) -> Result<Result<Arc<Recalled>, RecallRefusal>> {
        let (tx, rx) = oneshot::channel();
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        self.send(WriteOp::Recall { id: id.to_string(), by: by.to_string(), privileged, now_ms, window_ms, reply: tx }).await?;
        rx.await.map_err(|_| StoreError::Closed)
    }

    /// Creates a user unless one with that id exists; with `revive`, a deleted user's id can be
    /// taken again (the admin API), without it not (registration on first login must not bring
    /// back a user an admin deleted). Returns whether it was created.
    pub async fn create_user(&self, user: UserRecord, revive: bool) -> Result<bool> {
        let id = user.user_id.clone();
        let created = self
            .edit_user(&id, move |current| match current {
                Some(c) if !c.deleted || !revive => None,
                // The new row's epoch continues the old one's: tokens of the deleted user stay refused.
                current => Some(UserRecord { token_epoch: current.map_or(0, |c| c.token_epoch + 1), ..user.clone() }),
            })
            .await?;
        Ok(created.is_some())
    }

    /// Changes a user's row in one step of the writer: `edit` gets the current row (a deleted
    /// one included) and returns the new one, or `None` to leave it. The store gives the new
    /// row its version. Returns the row written, if any.
    pub async fn edit_user(
        &self,
        user_id: &str,
        edit: impl Fn(Option<&UserRecord>) -> Option<UserRecord> + Send + Sync + 'static,
    ) -> Result<Option<UserRecord>> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::EditUser(user_id.to_string(), Box::new(edit), tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Changes a record in one step of the writer: `edit` gets the current record and returns
    /// the next (scope, body), or `None` to leave it. The store gives the new version. Returns the
    /// record written, if any.
    pub async fn edit_record(
        &self,
        kind: &str,
        id: &str,
        edit: impl Fn(Option<&Record>) -> Option<(String, String)> + Send + Sync + 'static,
    ) -> Result<Option<Record>> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::EditRecord(kind.to_string(), id.to_string(), Box::new(edit), tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Changes this node's own tables (webhook outbox, unhandled customer-service messages).
    pub async fn local(&self, op: LocalOp) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Outbox(op, tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Customer-service messages not handled yet, oldest first, at most `limit`.
    pub async fn support_pending(&self, limit: u32) -> Result<Vec<StoredMessage>> {
        let conn = self.reader().await;
        let rows = conn.query(SUPPORT_PENDING.as_str(), params![i64::from(limit)]).await?;
        collect_messages(rows).await
    }

    /// Deliveries due at `now`, oldest first, at most `limit`.
    pub async fn outbox_due(&self, now: i64, limit: u32) -> Result<Vec<OutboxRow>> {
        let conn = self.reader().await;
        let mut rows = conn
            .query(
                "SELECT id, inbox, url, body, attempts, next_at FROM webhook_outbox WHERE next_at <= ?1 ORDER BY next_at LIMIT ?2",
                params![now, i64::from(limit)],
            )
            .await?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await? {
            out.push(OutboxRow {
                id: row.get(0)?,
                inbox: row.get(1)?,
                url: row.get(2)?,
                body: row.get(3)?,
                attempts: u32::try_from(row.get::<i64>(4)?).unwrap_or(u32::MAX),
                next_at: row.get(5)?,
            });
        }
        Ok(out)
    }

    /// A record by kind and id.
    pub async fn record(&self, kind: &str, id: &str) -> Result<Option<Record>> {
        let conn = self.reader().await;
        let sql = format!("SELECT {RECORD_COLS} FROM records WHERE kind = ?1 AND id = ?2");
        let mut rows = conn.query(&sql, params![kind, id]).await?;
        let Some(row) = rows.next().await? else { return Ok(None) };
        Ok(Some(record_from_row(&row, 0)?))
    }

    /// The records of a kind (under one scope, if given), in id order.
    pub async fn records(&self, kind: &str, scope: Option<&str>) -> Result<Vec<Record>> {
        let conn = self.reader().await;
        let mut rows = match scope {
            Some(scope) => {
                let sql = format!("SELECT {RECORD_COLS} FROM records WHERE kind = ?1 AND scope = ?2 ORDER BY id");
                conn.query(&sql, params![kind, scope]).await?
            }
            None => conn.query(&format!("SELECT {RECORD_COLS} FROM records WHERE kind = ?1 ORDER BY id"), params![kind]).await?,
        };
        let mut out = Vec::new();
        while let Some(row) = rows.next().await? {
            out.push(record_from_row(&row, 0)?);
        }
        Ok(out)
    }

    /// Adds `user` to `group` (creating the group). Returns whether the user was new to it. A new
    /// member's offline cursor starts at the group's newest message.
    pub async fn join_group(&self, group: &str, name: Option<String>, user: &str) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Join { group: group.to_string(), name, user: user.to_string(), reply: tx }).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Creates a group from the admin API with its access rule and first members. Returns false
    /// (and changes nothing) if the group exists.
    pub async fn create_group(&self, group: &str, name: Option<String>, closed: bool, members: Vec<String>) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::CreateGroup { group: group.to_string(), name, closed, members, reply: tx }).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Adds `user` to, or removes them from, an existing group. Returns whether anything changed
    /// (false: already so, or no such group).
    pub async fn set_member(&self, group: &str, user: &str, member: bool) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::SetMember { group: group.to_string(), user: user.to_string(), member, reply: tx }).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Reserves a place in the write queue, so that what is then written through the permit is
    /// queued at once, in the order the permits are used (the mesh's replica decides what to push
    /// and queues the same rows under one lock, so pushes and stores agree).
    pub async fn reserve(&self) -> Result<WritePermit> {
        self.writer.clone().reserve_owned().await.map(WritePermit).map_err(|_| StoreError::Closed)
    }

    /// Stores messages that were sequenced elsewhere (an import of old history, a replica), keeping
    /// their ids and seqs; ones already present are left alone. Nothing is pushed to anyone.
    /// Every conversation is stored as a prefix: a message whose predecessor is missing here is
    /// left out (it comes again from its owner, or with a gap fill).
    pub async fn import(&self, messages: Vec<StoredMessage>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Import(messages, tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?.map(drop)
    }

    /// Applies a batch of a peer's change stream and records that everything of `peer` up to
    /// `batch.upto` is applied, in one transaction. Messages new here are handed to the fan-out
    /// (as [`Committed::Replica`]) in commit order. As with [`Store::import`], a message whose
    /// predecessor is missing here is left out.
    pub async fn apply(&self, peer: &str, batch: ChangeBatch) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Apply(peer.to_string(), batch, tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?.map(drop)
    }

    /// Forgets how far `peer`'s change stream was applied (its database was replaced): the next
    /// subscription starts from the beginning.
    pub async fn forget_peer(&self, peer: &str) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::ForgetPeer(peer.to_string(), tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?.map(drop)
    }

    /// The newest committed revision.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// The live tail of committed change batches.
    pub fn subscribe_changes(&self) -> broadcast::Receiver<Arc<LocalBatch>> {
        self.changes.subscribe()
    }

    /// How far `peer`'s change stream has been applied here.
    pub async fn peer_applied(&self, peer: &str) -> Result<u64> {
        let conn = self.reader().await;
        let mut rows = conn.query("SELECT applied FROM mesh_peers WHERE peer = ?1", params![peer]).await?;
        Ok(match rows.next().await? {
            Some(row) => row.get::<u64>(0)?,
            None => 0,
        })
    }

    /// Every row written here with a revision in `(after, upto]`, in revision order.
    pub async fn changes_between(&self, after: u64, upto: u64) -> Result<Vec<Change>> {
        let conn = self.reader().await;
        let (lo, hi) = (to_i64(after), to_i64(upto));
        let mut out: Vec<(i64, Change)> = Vec::new();
        let sql = format!("SELECT rev, {USER_COLS} FROM users WHERE rev > ?1 AND rev <= ?2");
        let mut rows = conn.query(&sql, params![lo, hi]).await?;
        while let Some(row) = rows.next().await? {
            out.push((row.get(0)?, Change::User(user_from_row(&row, 1)?)));
        }
        drop(rows);
        let mut rows = conn
            .query("SELECT rev, group_id, name, access, updated_at, updated_by FROM groups WHERE rev > ?1 AND rev <= ?2", params![lo, hi])
            .await?;
        while let Some(row) = rows.next().await? {
            let change = Change::Group {
                group_id: row.get(1)?,
                name: row.get(2)?,
                access: row.get(3)?,
                updated_at: row.get(4)?,
                updated_by: row.get(5)?,
            };
            out.push((row.get(0)?, change));
        }
        drop(rows);
        let mut rows = conn
            .query(
                "SELECT rev, group_id, user_id, removed, changed_at, changed_by FROM group_members WHERE rev > ?1 AND rev <= ?2",
                params![lo, hi],
            )
            .await?;
        while let Some(row) = rows.next().await? {
            let change = Change::Member {
                group_id: row.get(1)?,
                user_id: row.get(2)?,
                removed: row.get::<i64>(3)? != 0,
                changed_at: row.get(4)?,
                changed_by: row.get(5)?,
            };
            out.push((row.get(0)?, change));
        }
        drop(rows);
        let sql = format!("SELECT rev, {RECORD_COLS} FROM records WHERE rev > ?1 AND rev <= ?2");
        let mut rows = conn.query(&sql, params![lo, hi]).await?;
        while let Some(row) = rows.next().await? {
            out.push((row.get(0)?, Change::Record(record_from_row(&row, 1)?)));
        }
        drop(rows);
        let sql = format!("SELECT {MSG_COLS}, m.rev FROM messages m WHERE m.rev > ?1 AND m.rev <= ?2");
        let mut rows = conn.query(&sql, params![lo, hi]).await?;
        while let Some(row) = rows.next().await? {
            out.push((row.get(16)?, Change::Message(message_from_row(&row)?)));
        }
        drop(rows);
        let mut rows = conn
            .query("SELECT rev, user_id, conversation, delivered, read FROM cursors WHERE rev > ?1 AND rev <= ?2", params![lo, hi])
            .await?;
        while let Some(row) = rows.next().await? {
            let conversation = conversation_at(&row, 2)?;
            out.push((row.get(0)?, Change::Cursor { user_id: row.get(1)?, conversation, delivered: row.get(3)?, read: row.get(4)? }));
        }
        drop(rows);
        let mut rows = conn
            .query(
                "SELECT rev, message_id, conversation, seq, recalled_by, recalled_at FROM recalls WHERE rev > ?1 AND rev <= ?2",
                params![lo, hi],
            )
            .await?;
        while let Some(row) = rows.next().await? {
            let conversation = conversation_at(&row, 2)?;
            out.push((
                row.get(0)?,
                Change::Recall { message_id: row.get(1)?, conversation, seq: row.get(3)?, by: row.get(4)?, at_ms: row.get(5)? },
            ));
        }
        drop(rows);
        out.sort_by_key(|(rev, _)| *rev);
        Ok(out.into_iter().map(|(_, c)| c).collect())
    }

    /// The newest seq of a conversation stored here.
    pub async fn newest_seq(&self, conversation: &ConversationId) -> Result<u64> {
        let conn = self.reader().await;
        let mut rows = conn.query(NEWEST_SEQ, params![conversation.as_str()]).await?;
        Ok(match rows.next().await? {
            Some(row) => row.get(0)?,
            None => 0,
        })
    }

    /// The conversations of `user` (only `only`, when given) whose newest message here is older
    /// than what the user has been shown: their cursors, or `seen`. Each with the newest seq here
    /// and the seq wanted.
    pub async fn behind(&self, user: &str, only: Option<&ConversationId>, seen: u64) -> Result<Vec<(ConversationId, u64, u64)>> {
        let conn = self.reader().await;
        let mut rows = conn
            .query(
                "SELECT c.conversation, COALESCE((SELECT MAX(m.seq) FROM messages m WHERE m.conversation = c.conversation), 0), \
                 MAX(c.delivered, c.read) FROM cursors c WHERE c.user_id = ?1 AND (?2 IS NULL OR c.conversation = ?2)",
                params![user, only.map(|c| c.as_str().to_string())],
            )
            .await?;
        let mut out = Vec::new();
        let mut found = false;
        while let Some(row) = rows.next().await? {
            let conv: String = row.get(0)?;
            let Some(conv) = ConversationId::parse(&conv) else { continue };
            let (local, cursor): (u64, u64) = (row.get(1)?, row.get(2)?);
            let wanted = if only.is_some() { cursor.max(seen) } else { cursor };
            found = true;
            if local < wanted {
                out.push((conv, local, wanted));
            }
        }
        drop(rows);
        drop(conn);
        if let (Some(conv), false) = (only, found) {
            let local = self.newest_seq(conv).await?;
            if local < seen {
                out.push((conv.clone(), local, seen));
            }
        }
        Ok(out)
    }

    async fn reader(&self) -> tokio::sync::MutexGuard<'_, Connection> {
        let i = self.readers.next.fetch_add(1, Ordering::Relaxed) % self.readers.conns.len();
        self.readers.conns[i].lock().await
    }

    /// A user by id.
    pub async fn user(&self, user_id: &str) -> Result<Option<UserRecord>> {
        let conn = self.reader().await;
        let sql = format!("SELECT {USER_COLS} FROM users WHERE user_id = ?1 AND deleted = 0");
        let mut rows = conn.query(&sql, params![user_id]).await?;
        let Some(row) = rows.next().await? else { return Ok(None) };
        Ok(Some(user_from_row(&row, 0)?))
    }

    /// Users in id order after `after` (deleted ones left out), at most `limit`.
    pub async fn users(&self, after: &str, limit: u32) -> Result<Vec<UserRecord>> {
        let conn = self.reader().await;
        let sql = format!("SELECT {USER_COLS} FROM users WHERE user_id > ?1 AND deleted = 0 ORDER BY user_id LIMIT ?2");
        let mut rows = conn.query(&sql, params![after, limit]).await?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await? {
            out.push(user_from_row(&row, 0)?);
        }
        Ok(out)
    }

    /// The groups a user belongs to, with their names.
    pub async fn user_groups(&self, user_id: &str) -> Result<Vec<(String, Option<String>)>> {
        let conn = self.reader().await;
        let mut rows = conn
            .query(
                "SELECT g.group_id, g.name FROM group_members m JOIN groups g ON g.group_id = m.group_id \
                 WHERE m.user_id = ?1 AND m.removed = 0 ORDER BY g.group_id",
                params![user_id],
            )
            .await?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await? {
            out.push((row.get(0)?, row.get(1)?));
        }
        Ok(out)
    }

    /// A group's name, if the group exists.
    pub async fn group(&self, group_id: &str) -> Result<Option<Option<String>>> {
        Ok(self.group_info(group_id).await?.map(|g| g.name))
    }

    /// A group's name and access rule, if the group exists.
    pub async fn group_info(&self, group_id: &str) -> Result<Option<GroupInfo>> {
        let conn = self.reader().await;
        let mut rows = conn.query("SELECT name, access FROM groups WHERE group_id = ?1", params![group_id]).await?;
        match rows.next().await? {
            Some(row) => {
                let access: String = row.get(1)?;
                Ok(Some(GroupInfo { name: row.get(0)?, closed: access == "closed" }))
            }
            None => Ok(None),
        }
    }

    /// A group's members with their nick and avatar.
    pub async fn group_members(&self, group_id: &str) -> Result<Vec<(String, Option<String>, Option<String>)>> {
        let conn = self.reader().await;
        let mut rows = conn
            .query(
                "SELECT m.user_id, u.nick, u.avatar FROM group_members m LEFT JOIN users u ON u.user_id = m.user_id \
                 WHERE m.group_id = ?1 AND m.removed = 0 ORDER BY m.user_id",
                params![group_id],
            )
            .await?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await? {
            out.push((row.get(0)?, row.get(1)?, row.get(2)?));
        }
        Ok(out)
    }

    /// Whether `user` is a member of `group`.
    pub async fn is_member(&self, group_id: &str, user_id: &str) -> Result<bool> {
        let conn = self.reader().await;
        let mut rows = conn
            .query("SELECT 1 FROM group_members WHERE group_id = ?1 AND user_id = ?2 AND removed = 0", params![group_id, user_id])
            .await?;
        Ok(rows.next().await?.is_some())
    }

    /// The peers of every private conversation of `user`.
    pub async fn contacts(&self, user_id: &str) -> Result<Vec<String>> {
        let conn = self.reader().await;
        let mut rows = conn
            .query(
                "SELECT conversation FROM cursors WHERE user_id = ?1 AND conversation LIKE 'p:%' ORDER BY conversation",
                params![user_id],
            )
            .await?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await? {
            let conv: String = row.get(0)?;
            if let Some(peer) = ConversationId::parse(&conv).and_then(|c| c.peer_of(user_id).map(str::to_string)) {
                out.push(peer);
            }
        }
        Ok(out)
    }

    /// Messages `user` has not had delivered, oldest first per conversation, at most `limit`;
    /// only in `only` when given. Excludes the user's own messages.
    pub async fn offline(&self, user_id: &str, only: Option<&ConversationId>, limit: u32) -> Result<Vec<StoredMessage>> {
        off_the_workers(self.read_offline(user_id, only, limit)).await
    }

    async fn read_offline(&self, user_id: &str, only: Option<&ConversationId>, limit: u32) -> Result<Vec<StoredMessage>> {
        let conn = self.reader().await;
        let sql = format!(
            "SELECT {MSG_COLS} FROM cursors c JOIN messages m ON m.conversation = c.conversation AND m.seq > c.delivered \
             WHERE c.user_id = ?1 AND m.sender != ?1 AND (?2 IS NULL OR c.conversation = ?2) \
             AND (c.conversation NOT LIKE 'g:%' OR EXISTS (SELECT 1 FROM group_members gm \
                  WHERE gm.group_id = substr(c.conversation, 3) AND gm.user_id = ?1 AND gm.removed = 0)) \
             ORDER BY m.conversation, m.seq LIMIT ?3"
        );
        let only = only.map(|c| c.as_str().to_string());
        let rows = conn.query(&sql, params![user_id, only, limit]).await?;
        collect_messages(rows).await
    }

    /// History of one conversation. Without a time range: the newest `count` messages before
    /// skipping `offset` from the newest end; with one: the oldest `count` in the range after
    /// `offset`. Always returned oldest first.
    pub async fn history(
        &self,
        conversation: &ConversationId,
        begin: Option<i64>,
        end: Option<i64>,
        offset: u32,
        count: u32,
    ) -> Result<Vec<StoredMessage>> {
        off_the_workers(self.read_history(conversation, begin, end, offset, count)).await
    }

    async fn read_history(
        &self,
        conversation: &ConversationId,
        begin: Option<i64>,
        end: Option<i64>,
        offset: u32,
        count: u32,
    ) -> Result<Vec<StoredMessage>> {
        let conn = self.reader().await;
        let conv = conversation.as_str();
        let rows = if begin.is_none() && end.is_none() {
            let sql = format!("SELECT {MSG_COLS} FROM messages m WHERE m.conversation = ?1 ORDER BY m.seq DESC LIMIT ?2 OFFSET ?3");
            let rows = conn.query(&sql, params![conv, count, offset]).await?;
            let mut out = collect_messages(rows).await?;
            out.reverse();
            return Ok(out);
        } else {
            let sql = format!(
                "SELECT {MSG_COLS} FROM messages m WHERE m.conversation = ?1 AND m.created_at >= ?2 AND m.created_at <= ?3 ORDER BY m.seq LIMIT ?4 OFFSET ?5"
            );
            conn.query(&sql, params![conv, begin.unwrap_or(0), end.unwrap_or(i64::MAX), count, offset]).await?
        };
        collect_messages(rows).await
    }

    /// Messages of a conversation with `seq > after`, oldest first, at most `limit`.
    pub async fn since(&self, conversation: &ConversationId, after: u64, limit: u32) -> Result<Vec<StoredMessage>> {
        off_the_workers(self.read_since(conversation, after, limit)).await
    }

    async fn read_since(&self, conversation: &ConversationId, after: u64, limit: u32) -> Result<Vec<StoredMessage>> {
        let conn = self.reader().await;
        let sql = format!("SELECT {MSG_COLS} FROM messages m WHERE m.conversation = ?1 AND m.seq > ?2 ORDER BY m.seq LIMIT ?3");
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = conn.query(&sql, params![conversation.as_str(), after, limit]).await?;
        collect_messages(rows).await
    }

    /// Messages sequenced by `origin` and stored here with a revision above `after`, in revision
    /// order, at most `limit` (what a peer that cannot reach `origin` asks this node to pass on).
    /// Each with its revision here.
    pub async fn sequenced_by(&self, origin: &str, after: u64, limit: u32) -> Result<Vec<(u64, StoredMessage)>> {
        let conn = self.reader().await;
        let sql = format!("SELECT {MSG_COLS}, m.rev FROM messages m WHERE m.rev > ?1 AND m.origin = ?2 ORDER BY m.rev LIMIT ?3");
        let mut rows = conn.query(&sql, params![to_i64(after), origin, limit]).await?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await? {
            out.push((row.get::<u64>(16)?, message_from_row(&row)?));
        }
        Ok(out)
    }

    /// A message by server id.
    pub async fn message(&self, id: &str) -> Result<Option<StoredMessage>> {
        let conn = self.reader().await;
        let rows = conn.query(BY_ID.as_str(), params![id]).await?;
        Ok(collect_messages(rows).await?.pop())
    }
}

const MSG_COLS: &str = "m.conversation, m.seq, m.id, m.client_id, m.sender, m.recipient, m.group_id, m.chat_type, m.msg_type, \
                        m.content, m.extras, m.nick, m.avatar, m.created_at, m.origin, m.recalled_at";

/// The newest seq of a conversation (0 when it has none).
const NEWEST_SEQ: &str = "SELECT COALESCE(MAX(seq), 0) FROM messages WHERE conversation = ?1";
/// Inserts a message sequenced here; a clash on (conversation, seq) or id is an error.
const INSERT_MESSAGE: &str = "INSERT INTO messages (conversation, seq, id, client_id, sender, recipient, group_id, chat_type, msg_type, \
     content, extras, nick, avatar, created_at, origin, recalled_at, rev) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";
/// The columns [`user_from_row`] reads, in order.
const RECORD_COLS: &str = "kind, id, scope, body, updated_at, updated_by";

fn record_from_row(row: &libsql::Row, at: i32) -> Result<Record> {
    Ok(Record {
        kind: row.get(at)?,
        id: row.get(at + 1)?,
        scope: row.get(at + 2)?,
        body: row.get(at + 3)?,
        updated_at: row.get(at + 4)?,
        updated_by: row.get(at + 5)?,
    })
}

const USER_COLS: &str = "user_id, password_hash, nick, avatar, role, banned, deleted, token_epoch, updated_at, updated_by";

fn user_from_row(row: &libsql::Row, at: i32) -> Result<UserRecord> {
    Ok(UserRecord {
        user_id: row.get(at)?,
        password_hash: row.get(at + 1)?,
        nick: row.get(at + 2)?,
        avatar: row.get(at + 3)?,
        role: row.get(at + 4)?,
        banned: row.get::<i64>(at + 5)? != 0,
        deleted: row.get::<i64>(at + 6)? != 0,
        token_epoch: row.get(at + 7)?,
        updated_at: row.get(at + 8)?,
        updated_by: row.get(at + 9)?,
    })
}

/// A group's definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// Name.
    pub name: Option<String>,
    /// Members only (joined through the admin API), instead of open to any J-IM join.
    pub closed: bool,
}

/// How a user row changes ([`Store::edit_user`]).
type UserEdit = Box<dyn Fn(Option<&UserRecord>) -> Option<UserRecord> + Send + Sync>;
/// Given the current record, the next (scope, body), or `None` to leave it.
type RecordEdit = Box<dyn Fn(Option<&Record>) -> Option<(String, String)> + Send + Sync>;

/// Inserts a message sequenced elsewhere, leaving one already present alone.
const INSERT_MESSAGE_IF_NEW: &str = "INSERT OR IGNORE INTO messages (conversation, seq, id, client_id, sender, recipient, group_id, chat_type, \
     msg_type, content, extras, nick, avatar, created_at, origin, recalled_at, rev) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";

/// The parameters of [`INSERT_MESSAGE`] and [`INSERT_MESSAGE_IF_NEW`], in column order.
fn row_values(m: &StoredMessage, rev: i64) -> Vec<Value> {
    vec![
        m.conversation.as_str().into(),
        to_i64(m.seq).into(),
        m.id.as_str().into(),
        m.client_id.clone().into(),
        m.sender.as_str().into(),
        m.recipient.clone().into(),
        m.group_id.clone().into(),
        i64::from(m.chat_type).into(),
        m.msg_type.into(),
        m.content.as_str().into(),
        m.extras.clone().into(),
        m.nick.clone().into(),
        m.avatar.clone().into(),
        m.created_at.into(),
        m.origin.as_str().into(),
        m.recalled_at.into(),
        rev.into(),
    ]
}

/// The conversation id in column `i`, refused if it is neither shape.
fn conversation_at(row: &libsql::Row, i: i32) -> Result<ConversationId> {
    let conv: String = row.get(i)?;
    ConversationId::parse(&conv).ok_or_else(|| StoreError::Corrupt(format!("conversation id {conv:?}")))
}

fn message_from_row(row: &libsql::Row) -> Result<StoredMessage> {
    let conversation = conversation_at(row, 0)?;
    let chat_type: i64 = row.get(7)?;
    Ok(StoredMessage {
        conversation,
        seq: row.get(1)?,
        id: row.get(2)?,
        client_id: row.get(3)?,
        sender: row.get(4)?,
        recipient: row.get(5)?,
        group_id: row.get(6)?,
        chat_type: u8::try_from(chat_type).map_err(|_| StoreError::Corrupt(format!("chat type {chat_type}")))?,
        msg_type: row.get(8)?,
        content: row.get(9)?,
        extras: row.get(10)?,
        nick: row.get(11)?,
        avatar: row.get(12)?,
        created_at: row.get(13)?,
        origin: row.get(14)?,
        recalled_at: row.get(15)?,
    })
}

async fn collect_messages(mut rows: libsql::Rows) -> Result<Vec<StoredMessage>> {
    let mut out = Vec::new();
    while let Some(row) = rows.next().await? {
        out.push(message_from_row(&row)?);
    }
    Ok(out)
}

async fn configure(conn: &Connection, writer: Option<Durability>) -> Result<()> {
    // journal_mode returns a row, so it runs as a query and the rows are dropped at once.
    drop(conn.query("PRAGMA journal_mode = WAL", ()).await?);
    conn.busy_timeout(Duration::from_secs(5))?;
    if let Some(durability) = writer {
        // FULL: the WAL is fsynced at every commit, so an acknowledged message survives power loss
        // as well as kill -9. Group commit makes that one fsync per batch. NORMAL (opt-in): the
        // WAL reaches the OS at every commit and the disk at checkpoints, which survives kill -9
        // but not a power loss.
        conn.execute(
            match durability {
                Durability::Disk => "PRAGMA synchronous = FULL",
                Durability::Process => "PRAGMA synchronous = NORMAL",
            },
            (),
        )
        .await?;
        // After a checkpoint the WAL file is cut back to 64 MiB instead of keeping its largest size.
        drop(conn.query("PRAGMA journal_size_limit = 67108864", ()).await?);
    }
    Ok(())
}

/// The migrations applied to the database in `dir` (version → when, ms since the epoch); empty
/// when there is no database yet. Reads only.
pub async fn applied_migrations(dir: &Path) -> anyhow::Result<Vec<(u32, i64)>> {
    let path = dir.join("kefu.db");
    if !path.exists() {
        return Ok(Vec::new());
    }
    let db = libsql::Builder::new_local(path).build().await?;
    let conn = db.connect()?;
    let mut rows = match conn.query("SELECT version, applied_at FROM schema_migrations ORDER BY version", ()).await {
        Ok(rows) => rows,
        // A database that no node has opened yet.
        Err(_) => return Ok(Vec::new()),
    };
    let mut out = Vec::new();
    while let Some(row) = rows.next().await? {
        out.push((row.get::<u32>(0)?, row.get::<i64>(1)?));
    }
    Ok(out)
}

/// Applies the pending migrations to the database in `dir` (creating it), as a node does at
/// start, under the data dir's lock (it refuses while a node runs there). Returns the versions
/// it applied.
pub async fn apply_migrations(dir: &Path) -> anyhow::Result<Vec<u32>> {
    std::fs::create_dir_all(dir)?;
    let _lock = crate::lock_data_dir(dir)?;
    let before: Vec<u32> = applied_migrations(dir).await?.into_iter().map(|(v, _)| v).collect();
    let db = libsql::Builder::new_local(dir.join("kefu.db")).build().await?;
    let conn = db.connect()?;
    configure(&conn, Some(Durability::Disk)).await?;
    migrate(&conn).await?;
    Ok(schema::migrations::MIGRATIONS.iter().map(|m| m.version).filter(|v| !before.contains(v)).collect())
}

async fn migrate(conn: &Connection) -> Result<()> {
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)",
        (),
    )
    .await?;
    for m in schema::migrations::MIGRATIONS {
        let mut rows = conn.query("SELECT 1 FROM schema_migrations WHERE version = ?1", params![m.version]).await?;
        let applied = rows.next().await?.is_some();
        drop(rows);
        if applied {
            continue;
        }
        let tx = conn.transaction().await?;
        tx.execute_batch(m.sql).await?;
        tx.execute("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)", params![m.version, m.name, now_ms()])
            .await?;
        tx.commit().await?;
        tracing::info!(version = m.version, name = m.name, "applied migration");
    }
    Ok(())
}

/// Runs a read that may be slow (history, offline, sync: sized by the client) without holding up
/// an async worker: libSQL runs a query on the calling thread, so a long scan would stall every
/// task queued on that worker (heartbeats, pushes). On the multi-threaded runtime the worker's
/// other tasks move to another thread while this one reads; elsewhere (unit tests) it just runs.
async fn off_the_workers<F: std::future::Future>(read: F) -> F::Output {
    let handle = tokio::runtime::Handle::current();
    if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread {
        tokio::task::block_in_place(|| handle.block_on(read))
    } else {
        read.await
    }
}

/// Wall-clock time in epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// The message a sender already sent under a client id in a conversation.
static BY_CLIENT_ID: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!("SELECT {MSG_COLS} FROM messages m WHERE m.sender = ?1 AND m.conversation = ?2 AND m.client_id = ?3")
});

/// The customer-service messages not yet handled, oldest first. CROSS JOIN keeps the small
/// `support_pending` table as the outer loop: a plain JOIN let SQLite walk every message in the
/// database (probing `support_pending` for each) to avoid a sort, a full scan every 2 s.
static SUPPORT_PENDING: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {MSG_COLS} FROM support_pending p CROSS JOIN messages m ON m.conversation = p.conversation AND m.seq = p.seq \
         ORDER BY m.created_at LIMIT ?1"
    )
});

/// A message by its server id.
static BY_ID: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| format!("SELECT {MSG_COLS} FROM messages m WHERE m.id = ?1"));

/// A new server message id: UUIDv7 as 32 lowercase hex digits (time-ordered, J-IM's shape).
pub fn new_message_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

struct Writer {
    conn: Connection,
    /// Newest seq per conversation, loaded on first use. Only the writer assigns seqs.
    seqs: HashMap<ConversationId, u64>,
    origin: String,
    feed: mpsc::Sender<Committed>,
    metrics: Arc<Metrics>,
    /// Prepared statements, by the address and length of their SQL text: the hot inserts are
    /// parsed once, not once per row, and finding one is a short scan of pointers rather than
    /// hashing the text twice per statement run. A `const` text may have an address per place it
    /// is used, so it may be prepared once per place: bounded by the code, and harmless.
    stmts: Vec<(&'static str, libsql::Statement)>,
    /// Cursor moves waiting to be written (CURSOR_DELAY after the first), merged by max (the
    /// floor by min).
    pending_cursors: Arc<PendingCursors>,
    /// Set by every batch (see [`watch_idle`]).
    wrote: Arc<AtomicBool>,
    /// Newest revision handed out (in the open transaction, or committed).
    rev: u64,
    /// Newest committed revision.
    committed_rev: u64,
    /// What the open transaction changed, for the mesh.
    pending_changes: Vec<(bool, Change)>,
    /// Users whose tokens the open transaction revoked ([`Committed::SignedOut`] after commit).
    signed_out: Vec<String>,
    /// Memberships the open transaction changed: (group, user, member now).
    memberships: Vec<(String, String, bool)>,
    /// The live tail of committed changes.
    changes: broadcast::Sender<Arc<LocalBatch>>,
    /// `committed_rev`, for readers.
    head: Arc<AtomicU64>,
    _db: libsql::Database,
}

/// What one op produced inside the transaction, answered after commit.
enum Done {
    Append(Arc<StoredMessage>, bool, Option<u64>, oneshot::Sender<Result<Delivery>>),
    Recall(Result<Arc<Recalled>, RecallRefusal>, oneshot::Sender<Result<Arc<Recalled>, RecallRefusal>>),
    Flag(bool, oneshot::Sender<Result<bool>>),
    User(Option<UserRecord>, oneshot::Sender<Result<Option<UserRecord>>>),
    Record(Option<Record>, oneshot::Sender<Result<Option<Record>>>),
    /// Messages new to this node, applied from a peer.
    Replicas(Vec<Arc<StoredMessage>>, oneshot::Sender<Result<bool>>),
    Nothing,
}

impl Writer {
    /// A statement from the cache, prepared on first use.
    async fn cached(&mut self, sql: &'static str) -> Result<&libsql::Statement> {
        let i = match self.stmts.iter().position(|(s, _)| std::ptr::eq(*s, sql)) {
            Some(i) => i,
            None => {
                let stmt = self.conn.prepare(sql).await?;
                self.stmts.push((sql, stmt));
                self.stmts.len() - 1
            }
        };
        Ok(&self.stmts[i].1)
    }

    /// Runs a statement from the cache.
    async fn exec(&mut self, sql: &'static str, params: impl libsql::params::IntoParams) -> Result<u64> {
        let stmt = self.cached(sql).await?;
        let result = stmt.execute(params).await;
        stmt.reset();
        Ok(result? as u64)
    }

    /// Reads messages with a statement from the cache.
    async fn lookup(&mut self, sql: &'static str, params: impl libsql::params::IntoParams) -> Result<Vec<StoredMessage>> {
        let stmt = self.cached(sql).await?;
        let result = match stmt.query(params).await {
            Ok(rows) => collect_messages(rows).await,
            Err(e) => Err(e.into()),
        };
        stmt.reset();
        result
    }

    /// Runs a statement that writes one row with the next revision, which `params` puts in its
    /// place. A statement that changes no row (an ignored insert, a cursor that did not move)
    /// gives the revision back: the head is read back after a restart as the newest revision of
    /// any row, so a revision no row holds would be handed out again after a crash while a peer
    /// may have applied past it, and that peer would never get the row. Returns the rows changed.
    async fn write_row<P: libsql::params::IntoParams>(&mut self, sql: &'static str, params: impl FnOnce(i64) -> P) -> Result<u64> {
        self.rev += 1;
        let n = self.exec(sql, params(to_i64(self.rev))).await?;
        if n == 0 {
            self.rev -= 1;
        }
        Ok(n)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut cursor_deadline: Option<tokio::time::Instant> = None;
        loop {
            // recv_many gives 0 only once the queue is closed and empty.
            let closed = match cursor_deadline {
                None => rx.recv_many(&mut batch, MAX_BATCH).await == 0,
                Some(deadline) => tokio::select! {
                    n = rx.recv_many(&mut batch, MAX_BATCH) => n == 0,
                    _ = tokio::time::sleep_until(deadline) => false,
                },
            };
            // At most one in the queue at a time (the watcher waits for its answer).
            if let Some(i) = batch.iter().position(|op| matches!(op, WriteOp::Shrink(_))) {
                let WriteOp::Shrink(done) = batch.remove(i) else { unreachable!("matched above") };
                // Only when the shrink is all there is: anything else means the store is not idle.
                if batch.is_empty() && !closed && cursor_deadline.is_none() && self.pending_cursors.len() == 0 {
                    if let Err(e) = shrink(&self.conn).await {
                        tracing::debug!(error = %e, "the writer kept its page cache");
                    }
                    let _ = done.send(());
                    continue;
                }
            }
            // Fire-and-forget cursor moves are merged in memory (by max) and written CURSOR_DELAY
            // after the first of them (or when MAX_BATCH are waiting): one push to each of 10,000
            // group members must not cost 10,000 transactions, and a busy conversation's cursor
            // is one row write per CURSOR_DELAY, not one per message.
            batch.retain(|op| !matches!(op, WriteOp::CursorsWaiting));
            let waiting = self.pending_cursors.len();
            let due = cursor_deadline.is_some_and(|d| d <= tokio::time::Instant::now());
            let write_cursors = closed || due || waiting >= MAX_BATCH;
            if waiting > 0 && cursor_deadline.is_none() {
                cursor_deadline = Some(tokio::time::Instant::now() + CURSOR_DELAY);
            }
            if batch.is_empty() && !write_cursors {
                continue;
            }
            if write_cursors {
                cursor_deadline = None;
            }
            if batch.is_empty() && waiting == 0 {
                if closed {
                    self.checkpoint().await;
                    return;
                }
                continue;
            }
            self.wrote.store(true, Ordering::Relaxed);
            let started = Instant::now();
            let ops = batch.len() + if write_cursors { waiting } else { 0 };
            match self.apply(&mut batch, write_cursors).await {
                Ok(done) => {
                    self.metrics.commit(started.elapsed(), ops);
                    self.publish_changes();
                    let memberships_changed = !self.memberships.is_empty();
                    let signed_out = std::mem::take(&mut self.signed_out).into_iter().map(Committed::SignedOut);
                    let memberships = std::mem::take(&mut self.memberships)
                        .into_iter()
                        .map(|(group, user, member)| Committed::Membership { group, user, member });
                    // Membership changes reach the fan-out before anything of the batch is
                    // answered, and then the batch's plain answers go through it too: once a
                    // group's creation or a join is answered, the hub has applied it, so a notice
                    // pushed right after reaches every member online here.
                    let events: Vec<Committed> = memberships.chain(signed_out).collect();
                    for event in events {
                        if self.feed.send(event).await.is_err() {
                            break;
                        }
                    }
                    self.publish(done, memberships_changed).await;
                    if self.seqs.len() > SEQS_KEPT {
                        self.seqs = HashMap::new();
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, ops, "write batch failed; every op in it is answered retryable");
                    // Seqs and revisions handed out inside the failed transaction were not stored.
                    self.seqs.clear();
                    self.rev = self.committed_rev;
                    self.pending_changes.clear();
                    self.signed_out.clear();
                    self.memberships.clear();
                    for op in batch.drain(..) {
                        fail(op);
                    }
                }
            }
            batch.clear();
            if closed {
                self.checkpoint().await;
                return;
            }
        }
    }

    /// Folds the WAL back into the database file before the writer exits.
    async fn checkpoint(&self) {
        if let Ok(rows) = self.conn.query("PRAGMA wal_checkpoint(TRUNCATE)", ()).await {
            drop(rows);
        }
    }

    /// Hands what the committed transaction changed to the mesh's subscribers.
    fn publish_changes(&mut self) {
        if self.rev == self.committed_rev {
            return;
        }
        let batch =
            LocalBatch { after: self.committed_rev, upto: self.rev, at_ms: now_ms(), changes: std::mem::take(&mut self.pending_changes) };
        self.committed_rev = self.rev;
        self.head.store(self.rev, Ordering::Release);
        // No subscriber is fine: peers read from the database when they connect.
        let _ = self.changes.send(Arc::new(batch));
    }

    /// Runs `batch` (and the merged cursor moves, when `with_cursors`) in one transaction.
    async fn apply(&mut self, batch: &mut Vec<WriteOp>, with_cursors: bool) -> Result<Vec<Done>> {
        let mut done = Vec::with_capacity(batch.len());
        self.exec("BEGIN IMMEDIATE", ()).await?;
        // Ops are only taken out of `batch` once the transaction has committed, so a failure can
        // still answer each of them.
        let cursors = if with_cursors { self.pending_cursors.take() } else { HashMap::new() };
        let result = async {
            for ((user, conversation), (delivered, floor)) in &cursors {
                self.upsert_cursor_from(user, conversation, *delivered, 0, *floor, true).await?;
            }
            for op in batch.iter() {
                done.push(self.apply_one(op).await?);
            }
            self.exec("COMMIT", ()).await?;
            Ok::<_, StoreError>(())
        }
        .await;
        if let Err(e) = result {
            let _ = self.conn.execute("ROLLBACK", ()).await;
            return Err(e);
        }
        // Attach the reply channels, which stayed with the ops.
        for (op, d) in batch.drain(..).zip(done.iter_mut()) {
            match (op, d) {
                (WriteOp::Append(_, from, reply), Done::Append(_, _, conn, slot)) => {
                    *slot = reply;
                    *conn = from;
                }
                (WriteOp::Recall { reply, .. }, Done::Recall(_, slot)) => *slot = reply,
                (WriteOp::EditUser(_, _, reply), Done::User(_, slot)) => *slot = reply,
                (WriteOp::EditRecord(_, _, _, reply), Done::Record(_, slot)) => *slot = reply,
                (WriteOp::Outbox(_, reply), Done::Flag(_, slot)) => *slot = reply,
                (WriteOp::Join { reply, .. }, Done::Flag(_, slot)) => *slot = reply,
                (WriteOp::CreateGroup { reply, .. }, Done::Flag(_, slot)) => *slot = reply,
                (WriteOp::SetMember { reply, .. }, Done::Flag(_, slot)) => *slot = reply,
                (WriteOp::Cursor { reply, .. }, Done::Flag(_, slot)) => *slot = reply,
                (WriteOp::Import(_, reply), Done::Flag(_, slot)) => *slot = reply,
                (WriteOp::Apply(_, _, reply), Done::Replicas(_, slot)) => *slot = reply,
                (WriteOp::ForgetPeer(_, reply), Done::Flag(_, slot)) => *slot = reply,
                _ => {}
            }
        }
        Ok(done)
    }

    async fn apply_one(&mut self, op: &WriteOp) -> Result<Done> {
        Ok(match op {
            // Taken out of the batch before it is applied.
            WriteOp::CursorsWaiting | WriteOp::Shrink(_) => Done::Nothing,
            WriteOp::Append(msg, _, _) => {
                let (stored, duplicate) = self.append(msg).await?;
                Done::Append(Arc::new(stored), duplicate, None, oneshot::channel().0)
            }
            WriteOp::Cursor { user, conversation, delivered, read, .. } => {
                self.upsert_cursor(user, conversation, *delivered, *read, true).await?;
                Done::Flag(true, oneshot::channel().0)
            }
            WriteOp::Recall { id, by, privileged, now_ms, window_ms, .. } => {
                let outcome = self.recall(id, by, *privileged, *now_ms, *window_ms).await?;
                Done::Recall(outcome, oneshot::channel().0)
            }
            WriteOp::EditUser(id, edit, _) => {
                let current = self.read_user(id).await?;
                let written = match edit(current.as_ref()) {
                    Some(mut next) => {
                        next.user_id = id.clone();
                        next.updated_at = now_ms().max(current.as_ref().map_or(0, |c| c.updated_at + 1));
                        next.updated_by = self.origin.clone();
                        self.put_user(current.as_ref(), next, true).await?
                    }
                    None => None,
                };
                Done::User(written, oneshot::channel().0)
            }
            WriteOp::EditRecord(kind, id, edit, _) => {
                let current = self.read_record(kind, id).await?;
                let written = match edit(current.as_ref()) {
                    Some((scope, body)) => {
                        let next = Record {
                            kind: kind.clone(),
                            id: id.clone(),
                            scope,
                            body,
                            updated_at: now_ms().max(current.as_ref().map_or(0, |c| c.updated_at + 1)),
                            updated_by: self.origin.clone(),
                        };
                        self.put_record(current.as_ref(), next, true).await?
                    }
                    None => None,
                };
                Done::Record(written, oneshot::channel().0)
            }
            WriteOp::Outbox(op, _) => {
                let n = match op {
                    LocalOp::Add(rows) => {
                        let mut n = 0;
                        for r in rows {
                            n += self
                                .exec(
                                    "INSERT OR IGNORE INTO webhook_outbox (id, inbox, url, body, attempts, next_at, created_at) \
                                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                                    params![
                                        r.id.as_str(),
                                        r.inbox.as_str(),
                                        r.url.as_str(),
                                        r.body.as_str(),
                                        i64::from(r.attempts),
                                        r.next_at,
                                        now_ms()
                                    ],
                                )
                                .await?;
                        }
                        n
                    }
                    LocalOp::Done(id) => self.exec("DELETE FROM webhook_outbox WHERE id = ?1", params![id.as_str()]).await?,
                    LocalOp::Handled(conversation, seq) => {
                        self.exec(
                            "DELETE FROM support_pending WHERE conversation = ?1 AND seq = ?2",
                            params![conversation.as_str(), to_i64(*seq)],
                        )
                        .await?
                    }
                    LocalOp::Retry { id, attempts, next_at } => {
                        self.exec(
                            "UPDATE webhook_outbox SET attempts = ?2, next_at = ?3 WHERE id = ?1",
                            params![id.as_str(), i64::from(*attempts), *next_at],
                        )
                        .await?
                    }
                };
                Done::Flag(n > 0, oneshot::channel().0)
            }
            WriteOp::Import(messages, _) => {
                for m in messages {
                    self.insert_replica(m).await?;
                }
                Done::Flag(true, oneshot::channel().0)
            }
            WriteOp::CreateGroup { group, name, closed, members, .. } => {
                if self.group_exists(group).await? {
                    return Ok(Done::Flag(false, oneshot::channel().0));
                }
                let access = if *closed { "closed" } else { "open" };
                let version = (now_ms(), self.origin.clone());
                self.put_group(group, name.clone(), access, version, true).await?;
                for user in members {
                    self.join_here(group, user).await?;
                }
                Done::Flag(true, oneshot::channel().0)
            }
            WriteOp::SetMember { group, user, member, .. } => {
                if !self.group_exists(group).await? {
                    return Ok(Done::Flag(false, oneshot::channel().0));
                }
                let changed = if *member { self.join_here(group, user).await? } else { self.remove_member(group, user).await? };
                Done::Flag(changed, oneshot::channel().0)
            }
            WriteOp::Join { group, name, user, .. } => {
                self.insert_group(group, name.clone(), true).await?;
                Done::Flag(self.join_here(group, user).await?, oneshot::channel().0)
            }
            WriteOp::ForgetPeer(peer, _) => {
                let n = self.exec("DELETE FROM mesh_peers WHERE peer = ?1", params![peer.as_str()]).await?;
                Done::Flag(n > 0, oneshot::channel().0)
            }
            WriteOp::Apply(peer, batch, _) => {
                let mut fresh = Vec::new();
                for change in &batch.changes {
                    if let Some(m) = self.apply_change(change).await? {
                        fresh.push(m);
                    }
                }
                self.exec(
                    "INSERT INTO mesh_peers (peer, applied, updated_at) VALUES (?1, ?2, ?3) \
                     ON CONFLICT (peer) DO UPDATE SET applied = MAX(applied, excluded.applied), updated_at = excluded.updated_at",
                    params![peer.as_str(), to_i64(batch.upto), now_ms()],
                )
                .await?;
                Done::Replicas(fresh, oneshot::channel().0)
            }
        })
    }

    /// Applies one change from a peer. Returns the message if it is new here.
    async fn apply_change(&mut self, change: &Change) -> Result<Option<Arc<StoredMessage>>> {
        match change {
            Change::Message(m) => {
                if self.insert_replica(m).await? {
                    return Ok(Some(Arc::new(m.clone())));
                }
                if let Some(at) = m.recalled_at {
                    self.mark_recalled(&m.conversation, m.seq, at).await?;
                }
            }
            Change::User(u) => {
                let current = self.read_user(&u.user_id).await?;
                self.put_user(current.as_ref(), u.clone(), false).await?;
            }
            Change::Record(r) => {
                let current = self.read_record(&r.kind, &r.id).await?;
                self.put_record(current.as_ref(), r.clone(), false).await?;
            }
            Change::Group { group_id, name, access, updated_at, updated_by } => {
                self.put_group(group_id, name.clone(), access, (*updated_at, updated_by.clone()), false).await?;
            }
            Change::Member { group_id, user_id, removed, changed_at, changed_by } => {
                self.put_member(group_id, user_id, !removed, (*changed_at, changed_by.clone()), false).await?;
            }
            Change::Cursor { user_id, conversation, delivered, read } => {
                self.upsert_cursor(user_id, conversation, *delivered, *read, false).await?;
            }
            Change::Recall { message_id, conversation, seq, by, at_ms } => {
                self.insert_recall(message_id, conversation, *seq, by, *at_ms, false).await?;
                self.mark_recalled(conversation, *seq, *at_ms).await?;
            }
        }
        Ok(None)
    }

    /// Sets a message's recall time unless it has an earlier one.
    async fn mark_recalled(&mut self, conversation: &ConversationId, seq: u64, at_ms: i64) -> Result<()> {
        self.write_row(
                "UPDATE messages SET recalled_at = ?3, rev = ?4 WHERE conversation = ?1 AND seq = ?2 AND (recalled_at IS NULL OR recalled_at > ?3)",
                |rev| params![conversation.as_str(), to_i64(seq), at_ms, rev],
            )
            .await?;
        Ok(())
    }

    /// Records who recalled a message and when, once; the row goes to the mesh.
    async fn insert_recall(&mut self, id: &str, conversation: &ConversationId, seq: u64, by: &str, at_ms: i64, local: bool) -> Result<()> {
        let n = self
            .write_row(
                "INSERT OR IGNORE INTO recalls (message_id, conversation, seq, recalled_by, recalled_at, rev) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                |rev| params![id, conversation.as_str(), to_i64(seq), by, at_ms, rev],
            )
            .await?;
        if n > 0 {
            let change = Change::Recall { message_id: id.to_string(), conversation: conversation.clone(), seq, by: by.to_string(), at_ms };
            self.pending_changes.push((local, change));
        }
        Ok(())
    }

    /// A record as it is now.
    async fn read_record(&mut self, kind: &str, id: &str) -> Result<Option<Record>> {
        let sql = format!("SELECT {RECORD_COLS} FROM records WHERE kind = ?1 AND id = ?2");
        let mut rows = self.conn.query(&sql, params![kind, id]).await?;
        let Some(row) = rows.next().await? else { return Ok(None) };
        Ok(Some(record_from_row(&row, 0)?))
    }

    /// Writes `next` unless `current` is as new (last writer wins). Returns the record written.
    async fn put_record(&mut self, current: Option<&Record>, next: Record, local: bool) -> Result<Option<Record>> {
        if current.is_some_and(|c| !next.newer_than(c)) {
            return Ok(None);
        }
        let r = &next;
        self.write_row(
            "INSERT INTO records (kind, id, scope, body, updated_at, updated_by, rev) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
             ON CONFLICT (kind, id) DO UPDATE SET scope = excluded.scope, body = excluded.body, \
             updated_at = excluded.updated_at, updated_by = excluded.updated_by, rev = excluded.rev",
            |rev| params![r.kind.as_str(), r.id.as_str(), r.scope.as_str(), r.body.as_str(), r.updated_at, r.updated_by.as_str(), rev],
        )
        .await?;
        self.pending_changes.push((local, Change::Record(next.clone())));
        Ok(Some(next))
    }

    /// The user row as it is, a tombstone included.
    async fn read_user(&mut self, id: &str) -> Result<Option<UserRecord>> {
        let sql = format!("SELECT {USER_COLS} FROM users WHERE user_id = ?1");
        let mut rows = self.conn.query(&sql, params![id]).await?;
        let Some(row) = rows.next().await? else { return Ok(None) };
        Ok(Some(user_from_row(&row, 0)?))
    }

    /// Merges `next` into the user row `current` (last writer wins; the token epoch by max) and
    /// writes the result if it changed anything. A raised epoch signs the user out here. Returns
    /// the row written.
    async fn put_user(&mut self, current: Option<&UserRecord>, next: UserRecord, local: bool) -> Result<Option<UserRecord>> {
        let merged = match current {
            None => next,
            Some(c) if next.newer_than(c) => UserRecord { token_epoch: next.token_epoch.max(c.token_epoch), ..next },
            Some(c) if next.token_epoch > c.token_epoch => UserRecord { token_epoch: next.token_epoch, ..c.clone() },
            Some(_) => return Ok(None),
        };
        let u = &merged;
        self.write_row(
            "INSERT INTO users (user_id, password_hash, nick, avatar, role, created_at, banned, deleted, token_epoch, updated_at, \
             updated_by, rev) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) ON CONFLICT (user_id) DO UPDATE SET \
             password_hash = excluded.password_hash, nick = excluded.nick, avatar = excluded.avatar, role = excluded.role, \
             banned = excluded.banned, deleted = excluded.deleted, token_epoch = excluded.token_epoch, \
             updated_at = excluded.updated_at, updated_by = excluded.updated_by, rev = excluded.rev",
            |rev| {
                params![
                    u.user_id.as_str(),
                    u.password_hash.as_str(),
                    u.nick.clone(),
                    u.avatar.clone(),
                    u.role.as_str(),
                    now_ms(),
                    i64::from(u.banned),
                    i64::from(u.deleted),
                    to_i64(u.token_epoch),
                    u.updated_at,
                    u.updated_by.as_str(),
                    rev
                ]
            },
        )
        .await?;
        let was = current.map(|c| (c.token_epoch, c.banned, c.deleted));
        if was.is_some_and(|(epoch, banned, deleted)| {
            merged.token_epoch > epoch || (merged.banned && !banned) || (merged.deleted && !deleted)
        }) {
            self.signed_out.push(merged.user_id.clone());
        }
        self.pending_changes.push((local, Change::User(merged.clone())));
        Ok(Some(merged))
    }

    /// Makes an open group with version 0 unless it exists (a J-IM join, a default group).
    async fn insert_group(&mut self, group: &str, name: Option<String>, local: bool) -> Result<()> {
        if !self.group_exists(group).await? {
            self.put_group(group, name, "open", (0, String::new()), local).await?;
        }
        Ok(())
    }

    async fn group_exists(&mut self, group: &str) -> Result<bool> {
        let mut rows = self.conn.query("SELECT 1 FROM groups WHERE group_id = ?1", params![group]).await?;
        Ok(rows.next().await?.is_some())
    }

    /// Writes a group's definition if its version is newer than the stored one (or there is none).
    async fn put_group(&mut self, group: &str, name: Option<String>, access: &str, version: (i64, String), local: bool) -> Result<()> {
        let mut rows = self.conn.query("SELECT updated_at, updated_by FROM groups WHERE group_id = ?1", params![group]).await?;
        let current: Option<(i64, String)> = match rows.next().await? {
            Some(row) => Some((row.get(0)?, row.get(1)?)),
            None => None,
        };
        drop(rows);
        if current.as_ref().is_some_and(|c| version <= *c) {
            return Ok(());
        }
        let access = if access == "closed" { "closed" } else { "open" };
        let n = self
            .write_row(
                "INSERT INTO groups (group_id, name, created_at, access, updated_at, updated_by, rev) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
                 ON CONFLICT (group_id) DO UPDATE SET name = excluded.name, access = excluded.access, \
                 updated_at = excluded.updated_at, updated_by = excluded.updated_by, rev = excluded.rev",
                |rev| params![group, name.clone(), now_ms(), access, version.0, version.1.as_str(), rev],
            )
            .await?;
        if n > 0 {
            let change = Change::Group {
                group_id: group.to_string(),
                name,
                access: access.to_string(),
                updated_at: version.0,
                updated_by: version.1,
            };
            self.pending_changes.push((local, change));
        }
        Ok(())
    }

    /// A membership's state (member or not) and version, if it was ever written.
    async fn read_member(&mut self, group: &str, user: &str) -> Result<Option<(bool, (i64, String))>> {
        let mut rows = self
            .conn
            .query("SELECT removed, changed_at, changed_by FROM group_members WHERE group_id = ?1 AND user_id = ?2", params![group, user])
            .await?;
        let Some(row) = rows.next().await? else { return Ok(None) };
        Ok(Some((row.get::<i64>(0)? == 0, (row.get(1)?, row.get(2)?))))
    }

    /// Adds a member here (a join or the admin API). Returns whether they were not one before.
    /// A new member's offline cursor starts at the group's newest message.
    async fn join_here(&mut self, group: &str, user: &str) -> Result<bool> {
        let added = self.change_member_here(group, user, true).await?;
        if added {
            let conv = ConversationId::group(group);
            let newest = self.newest_seq(&conv).await?;
            self.upsert_cursor(user, &conv, newest, newest, true).await?;
        }
        Ok(added)
    }

    /// Removes a member here. Returns whether they were one.
    async fn remove_member(&mut self, group: &str, user: &str) -> Result<bool> {
        self.change_member_here(group, user, false).await
    }

    /// A membership change made at this node, with a version above the stored one.
    async fn change_member_here(&mut self, group: &str, user: &str, member: bool) -> Result<bool> {
        let current = self.read_member(group, user).await?;
        let is_member = current.as_ref().is_some_and(|(m, _)| *m);
        if is_member == member {
            return Ok(false);
        }
        let after = current.map_or(0, |(_, (at, _))| at + 1);
        self.put_member(group, user, member, (now_ms().max(after), self.origin.clone()), true).await
    }

    /// Writes a membership if its version is newer than the stored one (a version-0 join, from
    /// before versions, only when there is none), and tells the fan-out when it changed state.
    /// Returns whether it changed state.
    async fn put_member(&mut self, group: &str, user: &str, member: bool, version: (i64, String), local: bool) -> Result<bool> {
        let current = self.read_member(group, user).await?;
        if current.as_ref().is_some_and(|(_, v)| version <= *v) {
            return Ok(false);
        }
        let n = self
            .write_row(
                "INSERT INTO group_members (group_id, user_id, joined_at, removed, changed_at, changed_by, rev) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (group_id, user_id) DO UPDATE SET removed = excluded.removed, \
                 changed_at = excluded.changed_at, changed_by = excluded.changed_by, rev = excluded.rev",
                |rev| params![group, user, now_ms(), i64::from(!member), version.0, version.1.as_str(), rev],
            )
            .await?;
        if n == 0 {
            return Ok(false);
        }
        let change = Change::Member {
            group_id: group.to_string(),
            user_id: user.to_string(),
            removed: !member,
            changed_at: version.0,
            changed_by: version.1,
        };
        self.pending_changes.push((local, change));
        let was = current.is_some_and(|(m, _)| m);
        if was != member {
            self.memberships.push((group.to_string(), user.to_string(), member));
        }
        Ok(was != member)
    }

    async fn upsert_cursor(&mut self, user: &str, conversation: &ConversationId, delivered: u64, read: u64, local: bool) -> Result<()> {
        self.upsert_cursor_from(user, conversation, delivered, read, 0, local).await
    }

    /// Merges a cursor move by max; a move from live pushes that started at `floor` only if the
    /// user has had every message before `floor` (all that lie between the delivered cursor and
    /// `floor` are the user's own, which are never offered as offline); 0: always.
    async fn upsert_cursor_from(
        &mut self,
        user: &str,
        conversation: &ConversationId,
        delivered: u64,
        read: u64,
        floor: u64,
        local: bool,
    ) -> Result<()> {
        let n = self
            .write_row(
                "INSERT INTO cursors (user_id, conversation, delivered, read, rev) VALUES (?1, ?2, ?3, ?4, ?5) \
                 ON CONFLICT (user_id, conversation) DO UPDATE SET delivered = MAX(delivered, excluded.delivered), \
                 read = MAX(read, excluded.read), rev = excluded.rev \
                 WHERE (excluded.delivered > cursors.delivered OR excluded.read > cursors.read) \
                 AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.conversation = ?2 AND m.seq > cursors.delivered AND m.seq < ?6 \
                 AND m.sender != ?1)",
                |rev| params![user, conversation.as_str(), to_i64(delivered), to_i64(read), rev, to_i64(floor)],
            )
            .await?;
        if n > 0 {
            let change = Change::Cursor { user_id: user.to_string(), conversation: conversation.clone(), delivered, read };
            self.pending_changes.push((local, change));
        }
        Ok(())
    }

    /// Stores a message sequenced elsewhere unless it is here already, or its predecessor is not:
    /// this node holds every conversation as a prefix `1..n`, so offline reads (`seq > cursor`)
    /// never skip a hole, and every change stream carries a conversation in seq order. Returns
    /// whether it was stored. Never a local change: another node sequenced it.
    async fn insert_replica(&mut self, m: &StoredMessage) -> Result<bool> {
        let newest = self.newest_seq(&m.conversation).await?;
        if m.seq > newest + 1 {
            return Ok(false);
        }
        if self.write_row(INSERT_MESSAGE_IF_NEW, |rev| row_values(m, rev)).await? == 0 {
            return Ok(false);
        }
        self.add_private_participants(m).await?;
        // The sequencer's cache follows what was stored (this node may own the conversation
        // later, after a configuration change).
        self.seqs.insert(m.conversation.clone(), newest.max(m.seq));
        self.pending_changes.push((false, Change::Message(m.clone())));
        Ok(true)
    }

    async fn newest_seq(&mut self, conv: &ConversationId) -> Result<u64> {
        if let Some(seq) = self.seqs.get(conv) {
            return Ok(*seq);
        }
        let mut rows = self.conn.query(NEWEST_SEQ, params![conv.as_str()]).await?;
        let seq: u64 = match rows.next().await? {
            Some(row) => row.get(0)?,
            None => 0,
        };
        drop(rows);
        self.seqs.insert(conv.clone(), seq);
        Ok(seq)
    }

    async fn append(&mut self, msg: &NewMessage) -> Result<(StoredMessage, bool)> {
        if let Some(client_id) = &msg.client_id {
            let params = params![msg.sender.as_str(), msg.conversation.as_str(), client_id.as_str()];
            if let Some(existing) = self.lookup(BY_CLIENT_ID.as_str(), params).await?.pop() {
                return Ok((existing, true));
            }
        }
        let seq = self.newest_seq(&msg.conversation).await? + 1;
        let stored = StoredMessage::sequenced(msg, seq, new_message_id(), now_ms(), &self.origin);
        self.write_row(INSERT_MESSAGE, |rev| row_values(&stored, rev)).await?;
        // newest_seq left the conversation's entry in the map: no new key per message.
        match self.seqs.get_mut(&stored.conversation) {
            Some(newest) => *newest = seq,
            None => drop(self.seqs.insert(stored.conversation.clone(), seq)),
        }
        // Both sides of a private chat take part in the conversation from its first message; later
        // messages need no cursor rows.
        if seq == 1 {
            self.add_private_participants(&stored).await?;
        }
        if stored.group_id.as_deref().is_some_and(|g| g.starts_with(schema::conversation::SUPPORT_GROUP_PREFIX)) {
            self.exec(
                "INSERT OR IGNORE INTO support_pending (conversation, seq) VALUES (?1, ?2)",
                params![stored.conversation.as_str(), to_i64(seq)],
            )
            .await?;
        }
        self.pending_changes.push((true, Change::Message(stored.clone())));
        Ok((stored, false))
    }

    /// Gives both sides of a private message a cursor row: from then on they take part in the
    /// conversation (its messages count as offline for them). Group messages need none. Every
    /// node derives these rows itself, so they keep revision 0 and are not shipped.
    async fn add_private_participants(&mut self, m: &StoredMessage) -> Result<()> {
        if let Some(recipient) = &m.recipient {
            self.exec(
                "INSERT OR IGNORE INTO cursors (user_id, conversation, delivered, read) VALUES (?1, ?3, 0, 0), (?2, ?3, 0, 0)",
                params![m.sender.as_str(), recipient.as_str(), m.conversation.as_str()],
            )
            .await?;
        }
        Ok(())
    }

    async fn recall(
        &mut self,
        id: &str,
        by: &str,
        privileged: bool,
        now_ms: i64,
        window_ms: i64,
    ) -> Result<Result<Arc<Recalled>, RecallRefusal>> {
        let Some(mut message) = self.lookup(BY_ID.as_str(), params![id]).await?.pop() else { return Ok(Err(RecallRefusal::NotFound)) };
        if message.sender != by && !privileged {
            return Ok(Err(RecallRefusal::Forbidden));
        }
        if message.recalled_at.is_none() {
            if !privileged && now_ms.saturating_sub(message.created_at) > window_ms {
                return Ok(Err(RecallRefusal::Expired));
            }
            self.mark_recalled(&message.conversation, message.seq, now_ms).await?;
            self.insert_recall(id, &message.conversation, message.seq, by, now_ms, true).await?;
            message.recalled_at = Some(now_ms);
        }
        Ok(Ok(Arc::new(Recalled { message, by: by.to_string() })))
    }

    /// Hands the batch's results on: messages and recalls to the fan-out, which answers them
    /// after the pushes; plain answers directly, or through the fan-out after the batch's
    /// membership changes when `memberships_changed`.
    async fn publish(&self, done: Vec<Done>, memberships_changed: bool) {
        for d in done {
            let event = match d {
                Done::Append(message, duplicate, from_conn, reply) => Committed::Message { message, duplicate, from_conn, reply },
                Done::Recall(Ok(recalled), reply) => Committed::Recall { recalled, reply },
                Done::Recall(Err(refusal), reply) => {
                    let _ = reply.send(Err(refusal));
                    continue;
                }
                Done::Flag(flag, reply) if memberships_changed => Committed::Flag { flag, reply },
                Done::Flag(flag, reply) => {
                    let _ = reply.send(Ok(flag));
                    continue;
                }
                Done::User(user, reply) => {
                    let _ = reply.send(Ok(user));
                    continue;
                }
                Done::Record(record, reply) => {
                    let _ = reply.send(Ok(record));
                    continue;
                }
                Done::Replicas(messages, reply) => {
                    for m in messages {
                        if self.feed.send(Committed::Replica(m)).await.is_err() {
                            return;
                        }
                    }
                    let _ = reply.send(Ok(true));
                    continue;
                }
                Done::Nothing => continue,
            };
            // The fan-out only stops at shutdown; then the replies are dropped and senders see
            // Closed, which they report as retryable.
            if self.feed.send(event).await.is_err() {
                return;
            }
        }
    }
}

/// The newest revision of any row.
async fn newest_rev(conn: &Connection) -> Result<u64> {
    let mut newest = 0u64;
    for table in ["users", "groups", "group_members", "messages", "cursors", "recalls", "records"] {
        let mut rows = conn.query(&format!("SELECT COALESCE(MAX(rev), 0) FROM {table}"), ()).await?;
        if let Some(row) = rows.next().await? {
            newest = newest.max(row.get::<u64>(0)?);
        }
    }
    Ok(newest)
}

fn fail(op: WriteOp) {
    let retry = || StoreError::Closed;
    match op {
        WriteOp::Append(_, _, reply) => drop(reply.send(Err(retry()))),
        WriteOp::EditUser(_, _, reply) => drop(reply.send(Err(retry()))),
        WriteOp::EditRecord(_, _, _, reply) => drop(reply.send(Err(retry()))),
        WriteOp::Join { reply, .. }
        | WriteOp::CreateGroup { reply, .. }
        | WriteOp::SetMember { reply, .. }
        | WriteOp::Import(_, reply)
        | WriteOp::Outbox(_, reply)
        | WriteOp::Apply(_, _, reply)
        | WriteOp::ForgetPeer(_, reply)
        | WriteOp::Cursor { reply, .. } => drop(reply.send(Err(retry()))),
        WriteOp::Recall { .. } | WriteOp::CursorsWaiting | WriteOp::Shrink(_) => {}
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    fn user(id: &str) -> UserRecord {
        UserRecord::new(id, "x".into(), None, None, "user")
    }

    #[tokio::test]
    async fn a_store_with_process_durability_keeps_what_it_acknowledged_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut feed) = Store::open_with(dir.path(), "n1", Arc::new(Metrics::default()), Durability::Process).await.unwrap();
        let conv = ConversationId::private("a", "b");
        let sent = NewMessage {
            conversation: conv.clone(),
            client_id: None,
            sender: "a".into(),
            recipient: Some("b".into()),
            group_id: None,
            chat_type: 2,
            msg_type: 0,
            content: "kept".into(),
            extras: None,
            nick: None,
            avatar: None,
        };
        // The fan-out answers the sender once the commit reaches it; here the test plays it.
        let appended = tokio::spawn({
            let store = store.clone();
            async move { store.append(sent).await.unwrap() }
        });
        match tokio::time::timeout(Duration::from_secs(5), feed.recv()).await.unwrap() {
            Some(Committed::Message { message, reply, .. }) => drop(reply.send(Ok(Delivery { message, recipient_online: false }))),
            other => panic!("expected the message, got {:?}", other.map(|_| "another event")),
        }
        let delivery = appended.await.unwrap();
        store.close().await;
        let (store, _feed) = Store::open(dir.path(), "n1", Arc::new(Metrics::default())).await.unwrap();
        let back = store.message(&delivery.message.id).await.unwrap().unwrap();
        assert_eq!((back.seq, back.content.as_str()), (1, "kept"));
    }

    #[tokio::test]
    async fn seqs_go_on_after_the_writer_lets_its_map_of_newest_seqs_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut feed) = Store::open(dir.path(), "n1", Arc::new(Metrics::default())).await.unwrap();
        // The fan-out's part: every committed message answered.
        tokio::spawn(async move {
            while let Some(event) = feed.recv().await {
                if let Committed::Message { message, reply, .. } = event {
                    drop(reply.send(Ok(Delivery { message, recipient_online: false })));
                }
            }
        });
        let chat = |to: &str| NewMessage {
            conversation: ConversationId::private("a", to),
            client_id: None,
            sender: "a".into(),
            recipient: Some(to.into()),
            group_id: None,
            chat_type: 2,
            msg_type: 0,
            content: "x".into(),
            extras: None,
            nick: None,
            avatar: None,
        };
        // Three rounds over more conversations than the writer keeps (SEQS_KEPT is 8 in tests):
        // each round's seqs follow the last, whether the map still held the conversation or not.
        let peers: Vec<String> = (0..3 * SEQS_KEPT).map(|i| format!("p{i}")).collect();
        for round in 1..=3u64 {
            for peer in &peers {
                assert_eq!(store.append(chat(peer)).await.unwrap().message.seq, round, "{peer} in round {round}");
            }
        }
        store.close().await;
    }

    /// Waits until what SQLite holds has fallen back to within a quarter of the fill since `before`,
    /// reading one user every 100 ms meanwhile as the node's own timers do (they must not keep the
    /// caches full).
    async fn caches_given_back(store: &Store, before: i64, busy: i64, what: &str) {
        assert!(busy > before + 512 * 1024, "{what} filled the cache: {before} -> {busy}");
        let deadline = Instant::now() + IDLE_SHRINK * 4;
        while sqlite_memory_used() > before + (busy - before) / 4 {
            assert!(
                Instant::now() < deadline,
                "{what}: still {} bytes after {:?} idle ({before} -> {busy})",
                sqlite_memory_used(),
                IDLE_SHRINK * 4
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(store.user("idle-0").await.unwrap().is_some());
        }
    }

    #[tokio::test]
    async fn an_idle_store_gives_its_page_caches_back() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _feed) = Store::open(dir.path(), "n1", Arc::new(Metrics::default())).await.unwrap();
        // Writes alone (in batches) fill the writer's cache, and only the writer can give it back
        // (10,000 users: about 0.9 MB here).
        let before = sqlite_memory_used();
        let ids: Vec<String> = (0..10_000).map(|i| format!("idle-{i}")).collect();
        let created = futures_util::future::join_all(ids.iter().map(|id| store.create_user(user(id), false))).await;
        assert!(created.into_iter().all(|c| c.unwrap()));
        caches_given_back(&store, before, sqlite_memory_used(), "the writes").await;
        // Then reads alone fill the readers' caches.
        let before = sqlite_memory_used();
        for id in &ids {
            assert!(store.user(id).await.unwrap().is_some());
        }
        caches_given_back(&store, before, sqlite_memory_used(), "the reads").await;
    }

    #[tokio::test]
    async fn unhandled_support_messages_are_read_from_their_table_not_by_scanning_every_message() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _feed) = Store::open(dir.path(), "n1", Arc::new(Metrics::default())).await.unwrap();
        let conn = store.reader().await;
        let mut rows = conn.query(&format!("EXPLAIN QUERY PLAN {}", SUPPORT_PENDING.as_str()), params![10]).await.unwrap();
        let mut plan = Vec::new();
        while let Some(row) = rows.next().await.unwrap() {
            plan.push(row.get::<String>(3).unwrap());
        }
        assert_eq!(plan.first().map(String::as_str), Some("SCAN p"), "{plan:?}");
        assert!(plan.iter().any(|step| step.starts_with("SEARCH m USING PRIMARY KEY")), "{plan:?}");
    }

    #[tokio::test]
    async fn a_write_that_changes_nothing_takes_no_revision_so_the_head_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _feed) = Store::open(dir.path(), "n1", Arc::new(Metrics::default())).await.unwrap();
        assert!(store.create_user(user("a"), false).await.unwrap());
        let head = store.head();
        // The same user again, and a cursor move that is no move: nothing written, no revision.
        assert!(!store.create_user(user("a"), false).await.unwrap());
        let conv = ConversationId::group("g");
        store.advance_cursor_committed("a", &conv, 3, 0).await.unwrap();
        let moved = store.head();
        store.advance_cursor_committed("a", &conv, 2, 0).await.unwrap();
        assert_eq!(store.head(), moved, "a cursor that does not move takes no revision");
        assert_eq!(moved, head + 1);
        store.close().await;
        // What a peer applied up to is what the node reads back as its head after a restart.
        let (store, _feed) = Store::open(dir.path(), "n1", Arc::new(Metrics::default())).await.unwrap();
        assert_eq!(store.head(), moved);
    }

    #[tokio::test]
    async fn records_are_last_writer_wins_listed_by_scope_and_shipped_with_their_revision() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _feed) = Store::open(dir.path(), "n1", Arc::new(Metrics::default())).await.unwrap();
        let written = store.edit_record("conversation", "c1", |_| Some(("queued".into(), "{\"n\":1}".into()))).await.unwrap().unwrap();
        assert_eq!((written.updated_by.as_str(), written.scope.as_str()), ("n1", "queued"));
        // An edit sees the current record and may leave it.
        let left = store.edit_record("conversation", "c1", |c| c.filter(|c| c.scope == "open").map(|_| (String::new(), String::new())));
        assert!(left.await.unwrap().is_none());
        let moved = store.edit_record("conversation", "c1", |_| Some(("open".into(), "{\"n\":2}".into()))).await.unwrap().unwrap();
        assert!(moved.updated_at > written.updated_at, "each version is above the last");
        assert!(store.records("conversation", Some("queued")).await.unwrap().is_empty());
        assert_eq!(store.records("conversation", Some("open")).await.unwrap(), vec![moved.clone()]);
        // A peer's older version loses, a newer one wins.
        let older = Record { body: "{\"n\":0}".into(), updated_at: moved.updated_at - 1, updated_by: "n2".into(), ..moved.clone() };
        let newer = Record { body: "{\"n\":3}".into(), updated_at: moved.updated_at + 1, updated_by: "n2".into(), ..moved.clone() };
        let batch =
            |after, r: &Record| ChangeBatch { after, upto: after + 1, head: after + 1, at_ms: 0, changes: vec![Change::Record(r.clone())] };
        store.apply("n2", batch(0, &older)).await.unwrap();
        assert_eq!(store.record("conversation", "c1").await.unwrap(), Some(moved.clone()));
        store.apply("n2", batch(1, &newer)).await.unwrap();
        assert_eq!(store.record("conversation", "c1").await.unwrap(), Some(newer.clone()));
        // What this node wrote goes out with its revisions (the peer's row is not re-shipped as ours
        // by the live tail, but a backfill reads it from the table like any row).
        let shipped = store.changes_between(0, store.head()).await.unwrap();
        assert!(shipped.contains(&Change::Record(newer)), "{shipped:?}");
    }

    /// A user change from a peer, as the change stream carries it.
    fn batch_of(after: u64, user: UserRecord) -> ChangeBatch {
        ChangeBatch { after, upto: after + 1, head: after + 1, at_ms: now_ms(), changes: vec![Change::User(user)] }
    }

    #[tokio::test]
    async fn user_rows_merge_by_last_writer_and_the_token_epoch_by_max_and_a_raised_epoch_signs_out() {
        let dir = tempfile::tempdir().unwrap();
        let (store, mut feed) = Store::open(dir.path(), "n1", Arc::new(Metrics::default())).await.unwrap();
        let base = UserRecord { updated_at: 100, updated_by: "n2".into(), ..user("u") };
        store.apply("n2", batch_of(0, base.clone())).await.unwrap();
        // Newer: replaces the row, and the raised epoch signs the user out here.
        let newer = UserRecord { nick: Some("new".into()), token_epoch: 2, updated_at: 200, ..base.clone() };
        store.apply("n2", batch_of(1, newer)).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(5), feed.recv()).await.unwrap() {
            Some(Committed::SignedOut(u)) => assert_eq!(u, "u"),
            other => panic!("expected a sign-out, got {:?}", other.map(|_| "another event")),
        }
        // Older: its fields lose, but a higher epoch in it still counts.
        let older = UserRecord { nick: Some("old".into()), token_epoch: 5, updated_at: 150, ..base.clone() };
        store.apply("n3", batch_of(0, older)).await.unwrap();
        let now = store.user("u").await.unwrap().unwrap();
        assert_eq!((now.nick.as_deref(), now.token_epoch, now.updated_at), (Some("new"), 5, 200));
        // Equal versions: the node id breaks the tie, the same way at every node.
        let tie = UserRecord { nick: Some("tie".into()), token_epoch: 5, updated_at: 200, updated_by: "n9".into(), ..base.clone() };
        store.apply("n3", batch_of(1, tie)).await.unwrap();
        assert_eq!(store.user("u").await.unwrap().unwrap().nick.as_deref(), Some("tie"));
        // A local edit always gets a version above the current one, even with the clock behind.
        let edited = store.edit_user("u", |c| Some(UserRecord { role: "agent".into(), ..c.unwrap().clone() })).await.unwrap().unwrap();
        assert!(edited.updated_at > 200 && edited.updated_by == "n1");
        store.close().await;
    }

    /// A slow history read (a deep offset over a long conversation) must not hold the async
    /// worker it runs on: on a runtime with one worker, another task keeps running while the
    /// read scans.
    #[test]
    fn a_slow_read_leaves_the_other_tasks_on_its_worker_running() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = runtime.block_on(async {
            let (store, _feed) = Store::open(dir.path(), "n1", Arc::new(Metrics::default())).await.unwrap();
            let new = schema::message::NewMessage {
                conversation: ConversationId::group("big"),
                client_id: None,
                sender: "u".into(),
                recipient: None,
                group_id: Some("big".into()),
                chat_type: 1,
                msg_type: 0,
                content: "x".repeat(200),
                extras: None,
                nick: None,
                avatar: None,
            };
            for chunk in 0..20u64 {
                let batch =
                    (1..=5_000).map(|i| StoredMessage::sequenced(&new, chunk * 5_000 + i, new_message_id(), i as i64, "n2")).collect();
                store.import(batch).await.unwrap();
            }
            store
        });
        let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
        // Both tasks are spawned, so both run on the runtime's only worker.
        let ticker = {
            let (ticks, reading) = (Arc::clone(&ticks), Arc::clone(&reading));
            runtime.spawn(async move {
                while reading.load(Ordering::Relaxed) {
                    ticks.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        let reader = {
            let (store, ticks, reading) = (store.clone(), Arc::clone(&ticks), Arc::clone(&reading));
            runtime.spawn(async move {
                while ticks.load(Ordering::Relaxed) == 0 {
                    tokio::task::yield_now().await;
                }
                let before = ticks.load(Ordering::Relaxed);
                // A time-range page at a deep offset scans the rows before it.
                let page = store.history(&ConversationId::group("big"), Some(0), Some(i64::MAX), 99_990, 10).await.unwrap();
                let during = ticks.load(Ordering::Relaxed) - before;
                reading.store(false, Ordering::Relaxed);
                (page.len(), during)
            })
        };
        let (len, during) = runtime.block_on(reader).unwrap();
        runtime.block_on(ticker).unwrap();
        assert_eq!(len, 10);
        assert!(during > 0, "the other task on the only worker made no progress while the read ran");
        runtime.block_on(store.close());
    }
}

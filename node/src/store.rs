//! Storage: the only module with SQL. Owns the libSQL database: one writer thread that applies
//! every write in batches (one transaction and one fsync per batch, sized by the backlog, not a
//! timer), and a few reader connections. WAL mode, so readers never wait for the writer.
//!
//! The writer assigns each message its per-conversation `seq`, deduplicates by the sender's
//! client id, and after COMMIT hands the committed events, in commit order, to the `feed`
//! channel. Whoever drains the feed (the fan-out) delivers them and then answers the sender, so a
//! success reply always follows the commit and recipients see one order per conversation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use libsql::{params, Connection, Value};
use schema::jim::ChatBody;
use schema::ConversationId;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::metrics::Metrics;

/// Most operations applied in one transaction.
const MAX_BATCH: usize = 2048;
/// Capacity of the write queue; senders wait when it is full (backpressure, nothing dropped).
const WRITE_QUEUE: usize = 8192;
/// Reader connections.
const READERS: usize = 4;
/// Longest a fire-and-forget cursor move waits for a transaction to ride along with.
const CURSOR_DELAY: Duration = Duration::from_millis(100);

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

/// A message to append.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// The conversation.
    pub conversation: ConversationId,
    /// The sender's idempotency key.
    pub client_id: Option<String>,
    /// The authenticated sender.
    pub sender: String,
    /// Recipient of a private message.
    pub recipient: Option<String>,
    /// Group of a group message.
    pub group_id: Option<String>,
    /// 1 group, 2 private.
    pub chat_type: u8,
    /// J-IM msgType.
    pub msg_type: i64,
    /// Content.
    pub content: String,
    /// Extras, as JSON text.
    pub extras: Option<String>,
    /// Sender's nick at send time.
    pub nick: Option<String>,
    /// Sender's avatar at send time.
    pub avatar: Option<String>,
}

/// A committed message.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredMessage {
    /// The conversation.
    pub conversation: ConversationId,
    /// Position in the conversation.
    pub seq: u64,
    /// Server id (UUIDv7, 32 hex).
    pub id: String,
    /// Sender's idempotency key.
    pub client_id: Option<String>,
    /// Sender.
    pub sender: String,
    /// Private recipient.
    pub recipient: Option<String>,
    /// Group.
    pub group_id: Option<String>,
    /// 1 group, 2 private.
    pub chat_type: u8,
    /// J-IM msgType.
    pub msg_type: i64,
    /// Content.
    pub content: String,
    /// Extras as JSON text.
    pub extras: Option<String>,
    /// Sender's nick.
    pub nick: Option<String>,
    /// Sender's avatar.
    pub avatar: Option<String>,
    /// Commit time, epoch ms.
    pub created_at: i64,
    /// The node that sequenced it.
    pub origin: String,
    /// When it was recalled, epoch ms.
    pub recalled_at: Option<i64>,
}

impl StoredMessage {
    /// The J-IM view; a recalled message has its content removed.
    pub fn to_chat_body(&self) -> ChatBody {
        let recalled = self.recalled_at.is_some();
        ChatBody {
            avatar: self.avatar.clone(),
            chat_type: self.chat_type,
            client_id: self.client_id.clone(),
            cmd: schema::Command::ChatReq.code(),
            content: if recalled { String::new() } else { self.content.clone() },
            create_time: self.created_at,
            extras: if recalled { None } else { self.extras.as_deref().and_then(|e| serde_json::from_str(e).ok()) },
            from: self.sender.clone(),
            group_id: self.group_id.clone(),
            id: self.id.clone(),
            msg_type: self.msg_type,
            nick: self.nick.clone(),
            recalled,
            seq: self.seq,
            to: self.recipient.clone(),
        }
    }
}

/// A user row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    /// Id.
    pub user_id: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Display name.
    pub nick: Option<String>,
    /// Avatar URL.
    pub avatar: Option<String>,
    /// "user", "agent" or "admin".
    pub role: String,
}

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
        /// The sender's reply, answered by the fan-out after delivery.
        reply: oneshot::Sender<Result<Delivery>>,
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

enum WriteOp {
    Append(NewMessage, oneshot::Sender<Result<Delivery>>),
    Cursor {
        user: String,
        conversation: ConversationId,
        delivered: u64,
        read: u64,
        reply: Option<oneshot::Sender<Result<bool>>>,
    },
    Recall {
        id: String,
        by: String,
        privileged: bool,
        now_ms: i64,
        window_ms: i64,
        reply: oneshot::Sender<Result<Arc<Recalled>, RecallRefusal>>,
    },
    CreateUser(UserRecord, oneshot::Sender<Result<bool>>),
    Join {
        group: String,
        name: Option<String>,
        user: String,
        reply: oneshot::Sender<Result<bool>>,
    },
    Import(Vec<StoredMessage>, oneshot::Sender<Result<bool>>),
}

/// A cheap, cloneable handle to the store.
#[derive(Clone)]
pub struct Store {
    writer: mpsc::Sender<WriteOp>,
    readers: Arc<Readers>,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

struct Readers {
    conns: Vec<Mutex<Connection>>,
    next: AtomicUsize,
}

impl Store {
    /// Opens (creating) `dir/kefu.db`, applies migrations, starts the writer thread, and returns
    /// the handle and the receiving end of the commit feed.
    pub async fn open(dir: &Path, origin: &str, metrics: Arc<Metrics>) -> anyhow::Result<(Store, mpsc::Receiver<Committed>)> {
        std::fs::create_dir_all(dir)?;
        let db = libsql::Builder::new_local(dir.join("kefu.db")).build().await?;
        let writer_conn = db.connect()?;
        configure(&writer_conn, true).await?;
        migrate(&writer_conn).await?;
        let mut conns = Vec::with_capacity(READERS);
        for _ in 0..READERS {
            let conn = db.connect()?;
            configure(&conn, false).await?;
            conns.push(Mutex::new(conn));
        }
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let (feed_tx, feed_rx) = mpsc::channel(WRITE_QUEUE);
        let writer = Writer {
            conn: writer_conn,
            seqs: HashMap::new(),
            origin: origin.to_string(),
            feed: feed_tx,
            metrics,
            stmts: HashMap::new(),
            pending_cursors: HashMap::new(),
            _db: db,
        };
        let thread = std::thread::Builder::new().name("kefu-writer".into()).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, "cannot start the writer runtime"),
            };
            rt.block_on(writer.run(rx));
        })?;
        let thread = Arc::new(std::sync::Mutex::new(Some(thread)));
        Ok((Store { writer: tx, readers: Arc::new(Readers { conns, next: AtomicUsize::new(0) }), thread }, feed_rx))
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
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Append(message, tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Moves a user's cursors forward (never back). Fire and forget: applied with the next batch.
    pub async fn advance_cursor(&self, user: &str, conversation: &ConversationId, delivered: u64, read: u64) -> Result<()> {
        self.send(WriteOp::Cursor { user: user.to_string(), conversation: conversation.clone(), delivered, read, reply: None }).await
    }

    /// Moves a user's cursors forward and waits for the commit, so the next read sees it.
    pub async fn advance_cursor_committed(&self, user: &str, conversation: &ConversationId, delivered: u64, read: u64) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Cursor { user: user.to_string(), conversation: conversation.clone(), delivered, read, reply: Some(tx) }).await?;
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

    /// Creates a user unless one with that id exists. Returns whether it was created.
    pub async fn create_user(&self, user: UserRecord) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::CreateUser(user, tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Adds `user` to `group` (creating the group). Returns whether the user was new to it. A new
    /// member's offline cursor starts at the group's newest message.
    pub async fn join_group(&self, group: &str, name: Option<String>, user: &str) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Join { group: group.to_string(), name, user: user.to_string(), reply: tx }).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Stores messages that were sequenced elsewhere (an import of old history, a replica), keeping
    /// their ids and seqs; ones already present are left alone. Nothing is pushed to anyone.
    pub async fn import(&self, messages: Vec<StoredMessage>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        self.send(WriteOp::Import(messages, tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?.map(drop)
    }

    async fn reader(&self) -> tokio::sync::MutexGuard<'_, Connection> {
        let i = self.readers.next.fetch_add(1, Ordering::Relaxed) % self.readers.conns.len();
        self.readers.conns[i].lock().await
    }

    /// A user by id.
    pub async fn user(&self, user_id: &str) -> Result<Option<UserRecord>> {
        let conn = self.reader().await;
        let mut rows =
            conn.query("SELECT user_id, password_hash, nick, avatar, role FROM users WHERE user_id = ?1", params![user_id]).await?;
        let Some(row) = rows.next().await? else { return Ok(None) };
        Ok(Some(UserRecord { user_id: row.get(0)?, password_hash: row.get(1)?, nick: row.get(2)?, avatar: row.get(3)?, role: row.get(4)? }))
    }

    /// The groups a user belongs to, with their names.
    pub async fn user_groups(&self, user_id: &str) -> Result<Vec<(String, Option<String>)>> {
        let conn = self.reader().await;
        let mut rows = conn
            .query("SELECT g.group_id, g.name FROM group_members m JOIN groups g ON g.group_id = m.group_id WHERE m.user_id = ?1 ORDER BY g.group_id", params![user_id])
            .await?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().await? {
            out.push((row.get(0)?, row.get(1)?));
        }
        Ok(out)
    }

    /// A group's name, if the group exists.
    pub async fn group(&self, group_id: &str) -> Result<Option<Option<String>>> {
        let conn = self.reader().await;
        let mut rows = conn.query("SELECT name FROM groups WHERE group_id = ?1", params![group_id]).await?;
        match rows.next().await? {
            Some(row) => Ok(Some(row.get(0)?)),
            None => Ok(None),
        }
    }

    /// A group's members with their nick and avatar.
    pub async fn group_members(&self, group_id: &str) -> Result<Vec<(String, Option<String>, Option<String>)>> {
        let conn = self.reader().await;
        let mut rows = conn
            .query(
                "SELECT m.user_id, u.nick, u.avatar FROM group_members m LEFT JOIN users u ON u.user_id = m.user_id WHERE m.group_id = ?1 ORDER BY m.user_id",
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
        let mut rows = conn.query("SELECT 1 FROM group_members WHERE group_id = ?1 AND user_id = ?2", params![group_id, user_id]).await?;
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
        let conn = self.reader().await;
        let sql = format!(
            "SELECT {MSG_COLS} FROM cursors c JOIN messages m ON m.conversation = c.conversation AND m.seq > c.delivered \
             WHERE c.user_id = ?1 AND m.sender != ?1 AND (?2 IS NULL OR c.conversation = ?2) ORDER BY m.conversation, m.seq LIMIT ?3"
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
        let conn = self.reader().await;
        let sql = format!("SELECT {MSG_COLS} FROM messages m WHERE m.conversation = ?1 AND m.seq > ?2 ORDER BY m.seq LIMIT ?3");
        let after = i64::try_from(after).unwrap_or(i64::MAX);
        let rows = conn.query(&sql, params![conversation.as_str(), after, limit]).await?;
        collect_messages(rows).await
    }

    /// A message by server id.
    pub async fn message(&self, id: &str) -> Result<Option<StoredMessage>> {
        let conn = self.reader().await;
        let sql = format!("SELECT {MSG_COLS} FROM messages m WHERE m.id = ?1");
        let rows = conn.query(&sql, params![id]).await?;
        Ok(collect_messages(rows).await?.pop())
    }
}

const MSG_COLS: &str = "m.conversation, m.seq, m.id, m.client_id, m.sender, m.recipient, m.group_id, m.chat_type, m.msg_type, \
                        m.content, m.extras, m.nick, m.avatar, m.created_at, m.origin, m.recalled_at";

/// Inserts a message sequenced here; a clash on (conversation, seq) or id is an error.
const INSERT_MESSAGE: &str = "INSERT INTO messages (conversation, seq, id, client_id, sender, recipient, group_id, chat_type, msg_type, \
     content, extras, nick, avatar, created_at, origin, recalled_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)";
/// Inserts a message sequenced elsewhere, leaving one already present alone.
const INSERT_MESSAGE_IF_NEW: &str = "INSERT OR IGNORE INTO messages (conversation, seq, id, client_id, sender, recipient, group_id, chat_type, \
     msg_type, content, extras, nick, avatar, created_at, origin, recalled_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)";

/// The parameters of [`INSERT_MESSAGE`] and [`INSERT_MESSAGE_IF_NEW`], in column order.
fn row_values(m: &StoredMessage) -> Vec<Value> {
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
    ]
}

fn message_from_row(row: &libsql::Row) -> Result<StoredMessage> {
    let conv: String = row.get(0)?;
    let conversation = ConversationId::parse(&conv).ok_or_else(|| StoreError::Corrupt(format!("conversation id {conv:?}")))?;
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

async fn configure(conn: &Connection, writer: bool) -> Result<()> {
    // journal_mode returns a row, so it runs as a query and the rows are dropped at once.
    drop(conn.query("PRAGMA journal_mode = WAL", ()).await?);
    conn.busy_timeout(Duration::from_secs(5))?;
    if writer {
        // FULL: the WAL is fsynced at every commit, so an acknowledged message survives power loss
        // as well as kill -9. Group commit makes that one fsync per batch.
        conn.execute("PRAGMA synchronous = FULL", ()).await?;
        // After a checkpoint the WAL file is cut back to 64 MiB instead of keeping its largest size.
        drop(conn.query("PRAGMA journal_size_limit = 67108864", ()).await?);
    }
    Ok(())
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

/// Wall-clock time in epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

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
    /// Prepared statements, by SQL text: the hot inserts are parsed once, not once per row.
    stmts: HashMap<&'static str, libsql::Statement>,
    /// Cursor moves waiting for the next transaction, merged by max.
    pending_cursors: HashMap<(String, ConversationId), (u64, u64)>,
    _db: libsql::Database,
}

/// What one op produced inside the transaction, answered after commit.
enum Done {
    Append(Arc<StoredMessage>, bool, oneshot::Sender<Result<Delivery>>),
    Recall(Result<Arc<Recalled>, RecallRefusal>, oneshot::Sender<Result<Arc<Recalled>, RecallRefusal>>),
    Flag(bool, oneshot::Sender<Result<bool>>),
    Nothing,
}

impl Writer {
    /// Runs a statement from the cache, preparing it on first use.
    async fn exec(&mut self, sql: &'static str, params: impl libsql::params::IntoParams) -> Result<u64> {
        if !self.stmts.contains_key(sql) {
            let stmt = self.conn.prepare(sql).await?;
            self.stmts.insert(sql, stmt);
        }
        let Some(stmt) = self.stmts.get(sql) else { return Err(StoreError::Corrupt("statement cache".into())) };
        let result = stmt.execute(params).await;
        stmt.reset();
        Ok(result? as u64)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<WriteOp>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut cursor_deadline: Option<tokio::time::Instant> = None;
        loop {
            let received = match cursor_deadline {
                None => rx.recv_many(&mut batch, MAX_BATCH).await,
                Some(deadline) => tokio::select! {
                    n = rx.recv_many(&mut batch, MAX_BATCH) => n,
                    _ = tokio::time::sleep_until(deadline) => usize::MAX,
                },
            };
            let closed = received == 0;
            // Fire-and-forget cursor moves are merged in memory (by max) and written with the
            // next batch that has real work, or after CURSOR_DELAY: one push to each of 10,000
            // group members must not cost 10,000 transactions.
            batch.retain(|op| match op {
                WriteOp::Cursor { user, conversation, delivered, read, reply: None } => {
                    let e = self.pending_cursors.entry((user.clone(), conversation.clone())).or_default();
                    e.0 = e.0.max(*delivered);
                    e.1 = e.1.max(*read);
                    false
                }
                _ => true,
            });
            let due = cursor_deadline.is_some_and(|d| d <= tokio::time::Instant::now());
            if batch.is_empty() && !closed && !due && self.pending_cursors.len() < MAX_BATCH {
                if !self.pending_cursors.is_empty() && cursor_deadline.is_none() {
                    cursor_deadline = Some(tokio::time::Instant::now() + CURSOR_DELAY);
                }
                continue;
            }
            cursor_deadline = None;
            if batch.is_empty() && self.pending_cursors.is_empty() {
                if closed {
                    self.checkpoint().await;
                    return;
                }
                continue;
            }
            let started = Instant::now();
            let ops = batch.len() + self.pending_cursors.len();
            match self.apply(&mut batch).await {
                Ok(done) => {
                    self.metrics.commit(started.elapsed(), ops);
                    self.publish(done).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, ops, "write batch failed; every op in it is answered retryable");
                    // Seqs handed out inside the failed transaction were not stored.
                    self.seqs.clear();
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

    async fn apply(&mut self, batch: &mut Vec<WriteOp>) -> Result<Vec<Done>> {
        let mut done = Vec::with_capacity(batch.len());
        self.conn.execute("BEGIN IMMEDIATE", ()).await?;
        // Ops are only taken out of `batch` once the transaction has committed, so a failure can
        // still answer each of them.
        let cursors = std::mem::take(&mut self.pending_cursors);
        let result = async {
            for ((user, conversation), (delivered, read)) in &cursors {
                self.upsert_cursor(user, conversation, *delivered, *read).await?;
            }
            for op in batch.iter() {
                done.push(self.apply_one(op).await?);
            }
            self.conn.execute("COMMIT", ()).await?;
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
                (WriteOp::Append(_, reply), Done::Append(_, _, slot)) => *slot = reply,
                (WriteOp::Recall { reply, .. }, Done::Recall(_, slot)) => *slot = reply,
                (WriteOp::CreateUser(_, reply), Done::Flag(_, slot)) => *slot = reply,
                (WriteOp::Join { reply, .. }, Done::Flag(_, slot)) => *slot = reply,
                (WriteOp::Cursor { reply: Some(reply), .. }, Done::Flag(_, slot)) => *slot = reply,
                (WriteOp::Import(_, reply), Done::Flag(_, slot)) => *slot = reply,
                _ => {}
            }
        }
        Ok(done)
    }

    async fn apply_one(&mut self, op: &WriteOp) -> Result<Done> {
        Ok(match op {
            WriteOp::Append(msg, _) => {
                let (stored, duplicate) = self.append(msg).await?;
                Done::Append(Arc::new(stored), duplicate, oneshot::channel().0)
            }
            WriteOp::Cursor { user, conversation, delivered, read, reply } => {
                self.upsert_cursor(user, conversation, *delivered, *read).await?;
                if reply.is_some() {
                    Done::Flag(true, oneshot::channel().0)
                } else {
                    Done::Nothing
                }
            }
            WriteOp::Recall { id, by, privileged, now_ms, window_ms, .. } => {
                let outcome = self.recall(id, by, *privileged, *now_ms, *window_ms).await?;
                Done::Recall(outcome, oneshot::channel().0)
            }
            WriteOp::CreateUser(user, _) => {
                let n = self
                    .exec(
                        "INSERT OR IGNORE INTO users (user_id, password_hash, nick, avatar, role, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![user.user_id.as_str(), user.password_hash.as_str(), user.nick.clone(), user.avatar.clone(), user.role.as_str(), now_ms()],
                    )
                    .await?;
                Done::Flag(n > 0, oneshot::channel().0)
            }
            WriteOp::Import(messages, _) => {
                self.import(messages).await?;
                Done::Flag(true, oneshot::channel().0)
            }
            WriteOp::Join { group, name, user, .. } => {
                self.exec(
                    "INSERT OR IGNORE INTO groups (group_id, name, created_at) VALUES (?1, ?2, ?3)",
                    params![group.as_str(), name.clone(), now_ms()],
                )
                .await?;
                let added = self
                    .exec(
                        "INSERT OR IGNORE INTO group_members (group_id, user_id, joined_at) VALUES (?1, ?2, ?3)",
                        params![group.as_str(), user.as_str(), now_ms()],
                    )
                    .await?;
                if added > 0 {
                    let conv = ConversationId::group(group);
                    let newest = self.newest_seq(&conv).await?;
                    self.exec(
                        "INSERT INTO cursors (user_id, conversation, delivered, read) VALUES (?1, ?2, ?3, ?3) ON CONFLICT DO NOTHING",
                        params![user.as_str(), conv.as_str(), to_i64(newest)],
                    )
                    .await?;
                }
                Done::Flag(added > 0, oneshot::channel().0)
            }
        })
    }

    async fn upsert_cursor(&mut self, user: &str, conversation: &ConversationId, delivered: u64, read: u64) -> Result<()> {
        self.exec(
            "INSERT INTO cursors (user_id, conversation, delivered, read) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT (user_id, conversation) DO UPDATE SET delivered = MAX(delivered, excluded.delivered), read = MAX(read, excluded.read)",
            params![user, conversation.as_str(), to_i64(delivered), to_i64(read)],
        )
        .await?;
        Ok(())
    }

    async fn import(&mut self, messages: &[StoredMessage]) -> Result<()> {
        for m in messages {
            self.exec(INSERT_MESSAGE_IF_NEW, row_values(m)).await?;
            self.add_private_participants(m).await?;
            // The sequencer's own cache must not fall behind what was imported.
            let newest = self.newest_seq(&m.conversation).await?;
            if m.seq > newest {
                self.seqs.insert(m.conversation.clone(), m.seq);
            }
        }
        Ok(())
    }

    async fn newest_seq(&mut self, conv: &ConversationId) -> Result<u64> {
        if let Some(seq) = self.seqs.get(conv) {
            return Ok(*seq);
        }
        let mut rows =
            self.conn.query("SELECT COALESCE(MAX(seq), 0) FROM messages WHERE conversation = ?1", params![conv.as_str()]).await?;
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
            let sql = format!("SELECT {MSG_COLS} FROM messages m WHERE m.sender = ?1 AND m.client_id = ?2");
            let rows = self.conn.query(&sql, params![msg.sender.as_str(), client_id.as_str()]).await?;
            if let Some(existing) = collect_messages(rows).await?.pop() {
                return Ok((existing, true));
            }
        }
        let seq = self.newest_seq(&msg.conversation).await? + 1;
        let stored = StoredMessage {
            conversation: msg.conversation.clone(),
            seq,
            id: new_message_id(),
            client_id: msg.client_id.clone(),
            sender: msg.sender.clone(),
            recipient: msg.recipient.clone(),
            group_id: msg.group_id.clone(),
            chat_type: msg.chat_type,
            msg_type: msg.msg_type,
            content: msg.content.clone(),
            extras: msg.extras.clone(),
            nick: msg.nick.clone(),
            avatar: msg.avatar.clone(),
            created_at: now_ms(),
            origin: self.origin.clone(),
            recalled_at: None,
        };
        self.exec(INSERT_MESSAGE, row_values(&stored)).await?;
        self.seqs.insert(stored.conversation.clone(), seq);
        // Both sides of a private chat take part in the conversation from its first message; later
        // messages need no cursor rows.
        if seq == 1 {
            self.add_private_participants(&stored).await?;
        }
        Ok((stored, false))
    }

    /// Gives both sides of a private message a cursor row: from then on they take part in the
    /// conversation (its messages count as offline for them). Group messages need none.
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
        let sql = format!("SELECT {MSG_COLS} FROM messages m WHERE m.id = ?1");
        let rows = self.conn.query(&sql, params![id]).await?;
        let Some(mut message) = collect_messages(rows).await?.pop() else { return Ok(Err(RecallRefusal::NotFound)) };
        if message.sender != by && !privileged {
            return Ok(Err(RecallRefusal::Forbidden));
        }
        if message.recalled_at.is_none() {
            if !privileged && now_ms.saturating_sub(message.created_at) > window_ms {
                return Ok(Err(RecallRefusal::Expired));
            }
            self.exec("UPDATE messages SET recalled_at = ?1 WHERE id = ?2", params![now_ms, id]).await?;
            self.exec(
                "INSERT OR IGNORE INTO recalls (message_id, conversation, seq, recalled_by, recalled_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![id, message.conversation.as_str(), to_i64(message.seq), by, now_ms],
            )
            .await?;
            message.recalled_at = Some(now_ms);
        }
        Ok(Ok(Arc::new(Recalled { message, by: by.to_string() })))
    }

    async fn publish(&self, done: Vec<Done>) {
        for d in done {
            let event = match d {
                Done::Append(message, duplicate, reply) => Committed::Message { message, duplicate, reply },
                Done::Recall(Ok(recalled), reply) => Committed::Recall { recalled, reply },
                Done::Recall(Err(refusal), reply) => {
                    let _ = reply.send(Err(refusal));
                    continue;
                }
                Done::Flag(flag, reply) => {
                    let _ = reply.send(Ok(flag));
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

fn fail(op: WriteOp) {
    let retry = || StoreError::Closed;
    match op {
        WriteOp::Append(_, reply) => drop(reply.send(Err(retry()))),
        WriteOp::CreateUser(_, reply) | WriteOp::Join { reply, .. } | WriteOp::Import(_, reply) => drop(reply.send(Err(retry()))),
        WriteOp::Cursor { reply: Some(reply), .. } => drop(reply.send(Err(retry()))),
        WriteOp::Recall { .. } | WriteOp::Cursor { reply: None, .. } => {}
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

//! The hub: which users are online on this node, through which connections, and which online
//! users are in which group. Owns that map; sessions register and unregister themselves, and the
//! fan-out pushes through it.
//!
//! Hot path: `send_user` and `send_group` run once per delivered message. They offer the push to
//! each connection's mailbox under the hub's lock, never across an await, and never block: a
//! connection whose mailbox is full is a slow consumer and is closed (its messages stay stored and
//! are offered to it as offline messages when it comes back).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use schema::jim::{self, UserView};
use schema::message::StoredMessage;
use schema::{Command, ConversationId, Status};

use crate::metrics::{Metrics, Transport};

/// Frames queued per connection before it counts as a slow consumer.
pub const QUEUE_PER_CONNECTION: usize = 1024;
/// Bytes queued per connection before it counts as a slow consumer, whatever the frame count.
pub const QUEUE_BYTES_PER_CONNECTION: usize = 4 * 1024 * 1024;

/// A frame on its way to connections. One allocation per message, shared by every recipient;
/// a queue slot holds only the pointer.
pub type SharedPush = Arc<Push>;

/// A frame on its way to one connection. The body is shared between all recipients.
#[derive(Debug, Clone)]
pub struct Push {
    /// The command of the frame.
    pub command: u8,
    /// The JSON body.
    pub body: Bytes,
    /// For a chat message: the conversation and seq, so the session can move the user's
    /// delivered cursor once the frame is written.
    pub delivery: Option<(ConversationId, u64)>,
}

/// The handle a session registers: cheap to clone, one small shared allocation per connection.
#[derive(Debug, Clone)]
pub struct Conn {
    /// Unique per node.
    pub id: u64,
    /// Transport.
    pub transport: Transport,
    mailbox: Arc<Mailbox>,
}

impl Conn {
    /// Closes the session with `status` as the last frame it sends (the first reason given wins).
    pub fn close(&self, status: Status) {
        let mut mail = self.mailbox.lock();
        mail.close.get_or_insert(status);
        wake(mail);
    }

    fn offer(&self, push: &SharedPush) -> Result<(), Refused> {
        let len = push.body.len();
        let mut mail = self.mailbox.lock();
        if mail.gone {
            return Err(Refused::Gone);
        }
        if mail.pushes.len() >= QUEUE_PER_CONNECTION || mail.bytes + len > QUEUE_BYTES_PER_CONNECTION {
            return Err(Refused::Full);
        }
        mail.pushes.push_back(Arc::clone(push));
        mail.bytes += len;
        wake(mail);
        Ok(())
    }
}

/// Wakes the session if it waits for mail, after letting go of its mailbox (the woken task may
/// run on another thread and lock it at once).
fn wake(mut mail: MutexGuard<'_, MailState>) {
    let waker = mail.waker.take();
    drop(mail);
    if let Some(w) = waker {
        w.wake();
    }
}

/// What a session is told: pushes to write, or to close. Replaces a channel plus a cancellation
/// token per connection (about 1 KB of an idle connection's memory) with one lock and a queue that
/// holds no allocation while empty.
#[derive(Debug, Default)]
struct Mailbox {
    state: Mutex<MailState>,
}

#[derive(Debug, Default)]
struct MailState {
    pushes: VecDeque<SharedPush>,
    /// Body bytes offered and not yet written: those in `pushes` and those the session took.
    bytes: usize,
    /// Set to close the session, with the status of its last frame.
    close: Option<Status>,
    /// The session's task while it waits for mail; taken by the first push that wakes it, so a
    /// burst of pushes costs one wake-up.
    waker: Option<Waker>,
    /// The session ended: nothing more is queued.
    gone: bool,
}

impl Mailbox {
    fn lock(&self) -> MutexGuard<'_, MailState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MailState {
    /// Every queued push, leaving no buffer behind; `None` if there is none.
    fn take_pushes(&mut self) -> Option<VecDeque<SharedPush>> {
        (!self.pushes.is_empty()).then(|| std::mem::take(&mut self.pushes))
    }
}

/// Why offering a push to a connection failed.
enum Refused {
    /// Its mailbox is over a bound: a slow consumer.
    Full,
    /// Its session has ended.
    Gone,
}

/// The session's end of its mailbox. Dropping it (the session ended) refuses further pushes and
/// frees those still queued.
#[derive(Debug)]
pub struct Inbox {
    mailbox: Arc<Mailbox>,
}

/// What [`Inbox::poll_mail`] found.
#[derive(Debug)]
pub enum Mail {
    /// Close with this status (pushes still queued are not written; they are stored and offered
    /// as offline messages next time).
    Close(Status),
    /// Pushes to write, oldest first.
    Pushes(VecDeque<SharedPush>),
}

impl Inbox {
    /// The mail waiting, or `Pending` with the task registered for the next.
    pub fn poll_mail(&self, cx: &mut Context<'_>) -> Poll<Mail> {
        let mut mail = self.mailbox.lock();
        if let Some(status) = mail.close {
            return Poll::Ready(Mail::Close(status));
        }
        if let Some(pushes) = mail.take_pushes() {
            return Poll::Ready(Mail::Pushes(pushes));
        }
        match &mail.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => mail.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// The pushes queued now, if any, without waiting.
    pub fn take_pushes(&self) -> Option<VecDeque<SharedPush>> {
        self.mailbox.lock().take_pushes()
    }

    /// Whether no push is queued.
    pub fn is_empty(&self) -> bool {
        self.mailbox.lock().pushes.is_empty()
    }

    /// `bytes` of pushes the session took were written: they no longer count against the bound.
    pub fn written(&self, bytes: usize) {
        let mut mail = self.mailbox.lock();
        mail.bytes = mail.bytes.saturating_sub(bytes);
    }
}

impl Drop for Inbox {
    fn drop(&mut self) {
        let mut mail = self.mailbox.lock();
        mail.gone = true;
        mail.waker = None;
        let pushes = std::mem::take(&mut mail.pushes);
        drop(mail);
        drop(pushes);
    }
}

#[derive(Default)]
struct UserEntry {
    conns: Vec<Conn>,
    groups: HashSet<Arc<str>>,
    nick: Option<String>,
    avatar: Option<String>,
}

/// A hash table's memory handed back once it is three-quarters empty: after a wave of
/// disconnects the hub's tables would otherwise keep their peak size for the node's life (a
/// table never shrinks by itself). Halving at a quarter full keeps the cost amortised: a table
/// shrinks again only after half of what is left has gone.
trait ShrinkIfSparse {
    fn shrink_if_sparse(&mut self);
}

/// Tables smaller than this are left as they are.
const SHRINK_FROM: usize = 1024;

/// The size to shrink a table of `len` entries and room for `capacity` to, if it should shrink.
fn sparse_target(len: usize, capacity: usize) -> Option<usize> {
    (capacity >= SHRINK_FROM && len * 4 <= capacity).then_some(len * 2)
}

impl<K: Eq + std::hash::Hash, V> ShrinkIfSparse for HashMap<K, V> {
    fn shrink_if_sparse(&mut self) {
        if let Some(target) = sparse_target(self.len(), self.capacity()) {
            self.shrink_to(target);
        }
    }
}

impl<K: Eq + std::hash::Hash> ShrinkIfSparse for HashSet<K> {
    fn shrink_if_sparse(&mut self) {
        if let Some(target) = sparse_target(self.len(), self.capacity()) {
            self.shrink_to(target);
        }
    }
}

#[derive(Default)]
struct Inner {
    users: HashMap<Arc<str>, UserEntry>,
    /// Online members of each group.
    groups: HashMap<Arc<str>, HashSet<Arc<str>>>,
}

impl Inner {
    /// Takes `user` from `group`'s online members; a group with none left goes.
    fn remove_member(&mut self, group: &str, user: &str) {
        let Some(members) = self.groups.get_mut(group) else { return };
        members.remove(user);
        if members.is_empty() {
            self.groups.remove(group);
            self.groups.shrink_if_sparse();
        } else {
            members.shrink_if_sparse();
        }
    }
}

/// Users online at other nodes, as their presence messages tell (DESIGN §7: each node owns the
/// entries of the sessions it holds).
#[derive(Default)]
struct Remote {
    by_node: HashMap<String, HashSet<Arc<str>>>,
    /// Per user, on how many other nodes they are online.
    count: HashMap<Arc<str>, usize>,
}

impl Remote {
    fn add(&mut self, node: &str, user: &str) {
        let set = self.by_node.entry(node.to_string()).or_default();
        let key: Arc<str> = user.into();
        if set.insert(key.clone()) {
            *self.count.entry(key).or_default() += 1;
        }
    }

    fn remove(&mut self, node: &str, user: &str) {
        let Some(set) = self.by_node.get_mut(node) else { return };
        if set.remove(user) {
            set.shrink_if_sparse();
            self.release(user);
        }
    }

    fn drop_node(&mut self, node: &str) {
        for user in self.by_node.remove(node).unwrap_or_default() {
            self.release(&user);
        }
    }

    /// One node fewer has `user` online.
    fn release(&mut self, user: &str) {
        if let Some(n) = self.count.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                self.count.remove(user);
                self.count.shrink_if_sparse();
            }
        }
    }
}

/// The node's view of who is connected here, and of who is online at the other nodes.
pub struct Hub {
    inner: Mutex<Inner>,
    remote: Mutex<Remote>,
    /// Users whose local presence changed since the mesh last shipped it (only when tracking),
    /// each with whether this node sent the exit notice of their going offline.
    dirty: Mutex<HashMap<Arc<str>, bool>>,
    /// Exits: notices held back, and what other nodes said lately of users going offline.
    exits: Mutex<Exits>,
    track: std::sync::atomic::AtomicBool,
    /// Set once the node is stopping ([`Hub::drain_all`]).
    draining: std::sync::atomic::AtomicBool,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
}

/// An exit notice this node held back: the user's last session here closed while they were
/// online at another node. It is sent when the user is online nowhere, by the node with the
/// smallest id among those that held theirs back, unless one of the others sent it.
struct HeldExit {
    gone: WentOffline,
    since: std::time::Instant,
}

/// What a node said of a user going offline there lately: whether it sent the exit notice.
struct OfflineAt {
    node: String,
    announced: bool,
    at: std::time::Instant,
}

/// The exit bookkeeping of the hub, under one lock.
#[derive(Default)]
struct Exits {
    held: HashMap<Arc<str>, HeldExit>,
    /// Per user, the nodes that said lately the user went offline there (explicit deltas only).
    said: HashMap<Arc<str>, Vec<OfflineAt>>,
}

impl Exits {
    fn expire(&mut self, now: std::time::Instant) {
        self.held.retain(|_, h| now.duration_since(h.since) < HOLD_EXIT);
        self.said.retain(|_, list| {
            list.retain(|o| now.duration_since(o.at) < HOLD_EXIT);
            !list.is_empty()
        });
    }

    /// Whether this node (`me`) sends `user`'s held notice once they are online nowhere: no other
    /// node sent it, and no node with a smaller id held its own back.
    fn mine(&self, me: &str, user: &str) -> bool {
        let said = self.said.get(user).map(Vec::as_slice).unwrap_or_default();
        !said.iter().any(|o| o.announced) && said.iter().all(|o| me < o.node.as_str())
    }
}

/// How long a held exit notice waits for the user to go offline everywhere, and how long what
/// other nodes said is remembered.
const HOLD_EXIT: std::time::Duration = std::time::Duration::from_secs(60);

/// What `unregister` reports when a user's last connection went away.
#[derive(Debug)]
pub struct WentOffline {
    /// The groups the user was in, whose remaining members get an exit notice.
    pub groups: Vec<Arc<str>>,
    /// The user's nick.
    pub nick: Option<String>,
}

impl Hub {
    /// An empty hub.
    pub fn new(metrics: Arc<Metrics>) -> Hub {
        Hub {
            inner: Mutex::new(Inner::default()),
            remote: Mutex::default(),
            dirty: Mutex::default(),
            exits: Mutex::default(),
            track: std::sync::atomic::AtomicBool::new(false),
            draining: std::sync::atomic::AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            metrics,
        }
    }

    /// Starts recording local presence changes for the mesh to ship.
    pub fn track_presence(&self) {
        self.track.store(true, Ordering::Release);
    }

    fn mark_dirty(&self, user: &Arc<str>) {
        if self.track.load(Ordering::Acquire) {
            self.dirty.lock().unwrap_or_else(|e| e.into_inner()).entry(user.clone()).or_insert(false);
        }
    }

    /// Takes the users whose local presence changed, each with whether they are online here now
    /// and whether this node sent the notice of their exit.
    pub fn take_presence_changes(&self) -> Vec<(String, bool, bool)> {
        let dirty = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        let inner = self.lock();
        dirty.into_iter().map(|(u, announced)| (u.to_string(), inner.users.contains_key(&u), announced)).collect()
    }

    fn remote(&self) -> std::sync::MutexGuard<'_, Remote> {
        self.remote.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exits(&self) -> std::sync::MutexGuard<'_, Exits> {
        self.exits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `user`'s last session here closed (`unregister` said so). Returns the exit notice to send
    /// now, or `None` when it is held back because they are online at another node (it is then
    /// sent by whichever node the rules pick, when they are online nowhere).
    pub fn left(&self, me: &str, user: &str, gone: WentOffline) -> Option<WentOffline> {
        let key: Arc<str> = user.into();
        let mut exits = self.exits();
        exits.expire(std::time::Instant::now());
        let elsewhere = self.is_online_elsewhere(user);
        if self.track.load(Ordering::Acquire) {
            self.dirty.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), !elsewhere);
        }
        if !elsewhere {
            return Some(gone);
        }
        exits.held.insert(key, HeldExit { gone, since: std::time::Instant::now() });
        drop(exits);
        // What the others said while this was being decided counts too.
        self.settle(me, std::iter::once(user)).pop().map(|(_, gone)| gone)
    }

    /// The held exit notices that this node (`me`) sends now, for `users` whose presence changed:
    /// those online nowhere any more that the rules give to this node. Held notices of users
    /// online nowhere that another node sends are dropped.
    fn settle<'a>(&self, me: &str, users: impl Iterator<Item = &'a str>) -> Vec<(String, WentOffline)> {
        let mut out = Vec::new();
        for user in users {
            if self.is_online_anywhere(user) {
                continue;
            }
            let mut exits = self.exits();
            let mine = exits.mine(me, user);
            let Some(h) = exits.held.remove(user) else { continue };
            if mine {
                out.push((user.to_string(), h.gone));
            }
        }
        out
    }

    /// Applies a presence message from `node` (see `schema::mesh::V1::Presence`). Returns the
    /// exit notices this node (`me`) held back and sends now.
    pub fn remote_presence(
        &self,
        me: &str,
        node: &str,
        snapshot: bool,
        online: &[String],
        offline: &[String],
        announced: &[String],
    ) -> Vec<(String, WentOffline)> {
        let mut gone: Vec<String> = offline.to_vec();
        {
            let mut remote = self.remote();
            if snapshot {
                // Whoever the snapshot leaves out went offline there, unannounced.
                let before = remote.by_node.get(node).cloned().unwrap_or_default();
                remote.drop_node(node);
                remote.by_node.entry(node.to_string()).or_default();
                gone.extend(before.iter().filter(|u| !online.iter().any(|o| o.as_str() == &***u)).map(|u| u.to_string()));
            }
            for u in online {
                remote.add(node, u);
            }
            for u in offline {
                remote.remove(node, u);
            }
        }
        {
            let now = std::time::Instant::now();
            let mut exits = self.exits();
            exits.expire(now);
            for u in online {
                if let Some(list) = exits.said.get_mut(u.as_str()) {
                    list.retain(|o| o.node != node);
                }
            }
            // Only explicit offlines say whether that node held its notice: a user a snapshot
            // leaves out (the node restarted, say) went offline without one there.
            for u in offline {
                let list = exits.said.entry(u.as_str().into()).or_default();
                list.retain(|o| o.node != node);
                list.push(OfflineAt { node: node.to_string(), announced: announced.contains(u), at: now });
            }
        }
        self.settle(me, gone.iter().map(String::as_str))
    }

    /// Forgets everything `node` said (it is down). Returns the exit notices this node (`me`)
    /// held back and sends now.
    pub fn drop_remote(&self, me: &str, node: &str) -> Vec<(String, WentOffline)> {
        let users: Vec<String> = self.remote().by_node.get(node).map(|s| s.iter().map(|u| u.to_string()).collect()).unwrap_or_default();
        self.remote().drop_node(node);
        self.settle(me, users.iter().map(String::as_str))
    }

    /// Whether `user` is online here or at any other node.
    pub fn is_online_anywhere(&self, user: &str) -> bool {
        self.is_online(user) || self.is_online_elsewhere(user)
    }

    /// Whether `user` has a session at another node.
    pub fn is_online_elsewhere(&self, user: &str) -> bool {
        self.remote().count.contains_key(user)
    }

    /// Users online anywhere in the cluster, sorted.
    pub fn online_users_everywhere(&self) -> Vec<String> {
        let mut users: HashSet<String> = self.lock().users.keys().map(|u| u.to_string()).collect();
        users.extend(self.remote().count.keys().map(|u| u.to_string()));
        let mut users: Vec<String> = users.into_iter().collect();
        users.sort();
        users
    }

    /// The other nodes where `user` is online, sorted.
    pub fn remote_nodes_of(&self, user: &str) -> Vec<String> {
        let mut nodes: Vec<String> =
            self.remote().by_node.iter().filter(|(_, users)| users.contains(user)).map(|(n, _)| n.clone()).collect();
        nodes.sort();
        nodes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection handle and the inbox its session reads.
    pub fn connection(&self, transport: Transport) -> (Conn, Inbox) {
        let mailbox = Arc::new(Mailbox::default());
        let conn = Conn { id: self.next_id.fetch_add(1, Ordering::Relaxed), transport, mailbox: Arc::clone(&mailbox) };
        (conn, Inbox { mailbox })
    }

    /// Binds `conn` to `user`, online in `groups`.
    pub fn register(&self, user: &str, conn: Conn, groups: &[String], nick: Option<String>, avatar: Option<String>) {
        let mut inner = self.lock();
        let user: Arc<str> = user.into();
        let group_keys: Vec<Arc<str>> = groups.iter().map(|g| Arc::from(g.as_str())).collect();
        for g in &group_keys {
            inner.groups.entry(g.clone()).or_default().insert(user.clone());
        }
        let entry = inner.users.entry(user.clone()).or_default();
        let first = entry.conns.is_empty();
        // Most users have one connection: no room kept for three more.
        entry.conns.reserve_exact(1);
        entry.conns.push(conn);
        entry.groups.extend(group_keys);
        entry.nick = nick;
        entry.avatar = avatar;
        drop(inner);
        if first {
            self.exits().held.remove(&user);
            self.mark_dirty(&user);
        }
    }

    /// Marks an online user as a member of `group`.
    pub fn join(&self, user: &str, group: &str) {
        let mut inner = self.lock();
        let Some((key, _)) = inner.users.get_key_value(user) else { return };
        let key = key.clone();
        let group: Arc<str> = group.into();
        inner.groups.entry(group.clone()).or_default().insert(key.clone());
        if let Some(entry) = inner.users.get_mut(&key) {
            entry.groups.insert(group);
        }
    }

    /// Takes `group` from an online user's groups (they left or were removed): pushes to the
    /// group no longer reach them here.
    pub fn leave(&self, user: &str, group: &str) {
        let mut inner = self.lock();
        inner.remove_member(group, user);
        if let Some(entry) = inner.users.get_mut(user) {
            entry.groups.remove(group);
        }
    }

    /// Unbinds a connection. Returns the user's groups if it was their last connection here.
    pub fn unregister(&self, user: &str, conn_id: u64) -> Option<WentOffline> {
        let mut inner = self.lock();
        let entry = inner.users.get_mut(user)?;
        entry.conns.retain(|c| c.id != conn_id);
        if !entry.conns.is_empty() {
            return None;
        }
        // The presence change is marked by `left`, with whether the exit was announced.
        let (key, entry) = inner.users.remove_entry(user)?;
        for g in &entry.groups {
            inner.remove_member(g, &key);
        }
        inner.users.shrink_if_sparse();
        Some(WentOffline { groups: entry.groups.into_iter().collect(), nick: entry.nick })
    }

    /// Whether online user `user` is a member of `group` as far as this node knows.
    pub fn in_group(&self, user: &str, group: &str) -> bool {
        self.lock().users.get(user).is_some_and(|e| e.groups.contains(group))
    }

    /// Whether joins and exits in `group` are announced to its members: not in groups with more
    /// than `limit` members online here, where the notices alone would cost O(members²) pushes as
    /// everyone logs in.
    pub fn announces(&self, group: &str, limit: usize) -> bool {
        self.online_in_group(group) <= limit
    }

    /// How many members of `group` are online here.
    pub fn online_in_group(&self, group: &str) -> usize {
        self.lock().groups.get(group).map_or(0, HashSet::len)
    }

    /// Whether `user` has a connection here.
    pub fn is_online(&self, user: &str) -> bool {
        self.lock().users.contains_key(user)
    }

    /// Online users, sorted.
    pub fn online_users(&self) -> Vec<String> {
        let mut users: Vec<String> = self.lock().users.keys().map(|u| u.to_string()).collect();
        users.sort();
        users
    }

    /// Connections of `user`, by transport name.
    pub fn terminals(&self, user: &str) -> Vec<&'static str> {
        self.lock().users.get(user).map(|e| e.conns.iter().map(|c| c.transport.name()).collect()).unwrap_or_default()
    }

    /// Pushes to every connection of `user` except connection `skip`. Returns how many
    /// connections took it. Offering never blocks, so it happens under the lock, without cloning
    /// connection handles.
    pub fn send_user(&self, user: &str, push: &SharedPush, skip: Option<u64>) -> usize {
        let inner = self.lock();
        let Some(entry) = inner.users.get(user) else { return 0 };
        entry.conns.iter().filter(|c| Some(c.id) != skip && self.offer(c, push)).count()
    }

    /// Pushes to every connection of every online member of `group`, except connection `skip`.
    pub fn send_group(&self, group: &str, push: &SharedPush, skip: Option<u64>) -> usize {
        let inner = self.lock();
        let Some(members) = inner.groups.get(group) else { return 0 };
        members
            .iter()
            .filter_map(|u| inner.users.get(u))
            .flat_map(|e| e.conns.iter())
            .filter(|c| Some(c.id) != skip && self.offer(c, push))
            .count()
    }

    /// Pushes a committed chat message to the connections here that should see it: the recipient
    /// of a private message and the sender's other connections (`skip` is the one it was sent
    /// from, if here), every online member of a group (the sender's connections included, as
    /// J-IM echoes). Returns how many of the recipient's connections took it. One serialisation
    /// per message, shared by every connection.
    pub fn deliver(&self, message: &StoredMessage, skip: Option<u64>) -> usize {
        let body = jim::push(Command::ChatReq, &message.to_chat_body());
        let push = Arc::new(Push {
            command: Command::ChatReq.code(),
            body: body.into(),
            delivery: Some((message.conversation.clone(), message.seq)),
        });
        let (delivered, copies) = match (&message.recipient, &message.group_id) {
            (Some(to), _) if *to == message.sender => (self.send_user(to, &push, None), 0),
            (Some(to), _) => (self.send_user(to, &push, None), self.send_user(&message.sender, &push, skip)),
            (None, Some(group)) => (self.send_group(group, &push, None), 0),
            (None, None) => (0, 0),
        };
        self.metrics.messages_out.fetch_add((delivered + copies) as u64, Ordering::Relaxed);
        delivered
    }

    /// The exit notices of `user` for `groups`, one per group that announces joins and exits
    /// (at most `limit` members online here, where the notices alone would not cost O(members²)).
    pub fn exit_pushes(&self, user: &str, nick: Option<String>, groups: &[Arc<str>], limit: usize) -> Vec<(String, SharedPush)> {
        let view = UserView { avatar: None, nick, status: "offline", user_id: user.to_string() };
        groups
            .iter()
            .filter(|g| self.announces(g, limit))
            .map(|g| {
                let push =
                    Arc::new(Push { command: Command::ExitGroupNotify.code(), body: jim::exit_notify(g, &view).into(), delivery: None });
                (g.to_string(), push)
            })
            .collect()
    }

    fn offer(&self, conn: &Conn, push: &SharedPush) -> bool {
        match conn.offer(push) {
            Ok(()) => true,
            Err(Refused::Full) => {
                self.metrics.slow_consumers.fetch_add(1, Ordering::Relaxed);
                conn.close(Status::SlowConsumer);
                false
            }
            Err(Refused::Gone) => false,
        }
    }

    /// Closes every connection of `user` with `status` as the last frame. Returns how many.
    pub fn kick_user(&self, user: &str, status: Status) -> usize {
        let conns: Vec<Conn> = self.lock().users.get(user).map(|e| e.conns.clone()).unwrap_or_default();
        for c in &conns {
            c.close(status);
        }
        conns.len()
    }

    /// The node is stopping: closes every connection; sessions carry out what their clients
    /// already sent before they close ([`Hub::is_draining`]).
    pub fn drain_all(&self) {
        self.draining.store(true, Ordering::Release);
        self.kick_all(Status::CloseOk);
    }

    /// Whether the node is stopping.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Logged-in connections here.
    pub fn connection_count(&self) -> usize {
        self.lock().users.values().map(|e| e.conns.len()).sum()
    }

    /// Closes every connection (shutdown).
    pub fn kick_all(&self, status: Status) {
        let conns: Vec<Conn> = self.lock().users.values().flat_map(|e| e.conns.clone()).collect();
        for c in &conns {
            c.close(status);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    const NODES: [&str; 3] = ["n1", "n2", "n3"];

    /// Three nodes' hubs with user `u` online at each, each knowing the others have it.
    fn three() -> (Vec<Hub>, Vec<Conn>) {
        let hubs: Vec<Hub> = NODES.iter().map(|_| Hub::new(Arc::new(Metrics::default()))).collect();
        let mut conns = Vec::new();
        for (i, h) in hubs.iter().enumerate() {
            h.track_presence();
            let (c, _queue) = h.connection(Transport::Tcp);
            h.register("u", c.clone(), &[], None, None);
            conns.push(c);
            for other in NODES.iter().filter(|n| **n != NODES[i]) {
                h.remote_presence(NODES[i], other, false, &["u".into()], &[], &[]);
            }
        }
        (hubs, conns)
    }

    /// Node `i`'s last session of `u` closes: whether it sends the notice at once, and whether it
    /// said so in its presence change.
    fn close(hubs: &[Hub], conns: &[Conn], i: usize) -> (bool, bool) {
        let gone = hubs[i].unregister("u", conns[i].id).unwrap();
        let sent = hubs[i].left(NODES[i], "u", gone).is_some();
        let changes = hubs[i].take_presence_changes();
        assert_eq!(changes.len(), 1);
        (sent, changes[0].2)
    }

    /// Node `from`'s offline of `u` reaches node `to`: how many notices `to` sends then.
    fn tell(hubs: &[Hub], from: usize, to: usize, announced: bool) -> usize {
        let announced: Vec<String> = if announced { vec!["u".into()] } else { vec![] };
        hubs[to].remote_presence(NODES[to], NODES[from], false, &[], &["u".into()], &announced).len()
    }

    #[test]
    fn one_after_the_other_the_last_node_sends_the_notice() {
        let (hubs, conns) = three();
        let mut sent = 0;
        for i in 0..3 {
            let (now, announced) = close(&hubs, &conns, i);
            sent += usize::from(now);
            for to in (0..3).filter(|to| *to != i) {
                sent += tell(&hubs, i, to, announced);
            }
        }
        assert_eq!(sent, 1);
    }

    #[test]
    fn of_the_nodes_that_held_it_back_the_smallest_id_sends_it() {
        let (hubs, conns) = three();
        // n1 closes first and holds its notice; its offline reaches n2 and n3.
        let (now, announced) = close(&hubs, &conns, 0);
        assert!(!now && !announced);
        let mut sent = tell(&hubs, 0, 1, false) + tell(&hubs, 0, 2, false);
        // n2 and n3 close at the same moment, each still seeing the other: both hold.
        let closed: Vec<(bool, bool)> = [1, 2].map(|i| close(&hubs, &conns, i)).into();
        sent += closed.iter().filter(|(now, _)| *now).count();
        for (from, to) in [(1, 0), (1, 2), (2, 0), (2, 1)] {
            sent += tell(&hubs, from, to, false);
        }
        assert_eq!(sent, 1, "exactly one node sends the exit notice");
    }

    #[test]
    fn the_tables_give_their_memory_back_once_the_users_are_gone() {
        let hub = Hub::new(Arc::new(Metrics::default()));
        let group = ["g".to_string()];
        let conns: Vec<(String, Conn)> = (0..20_000)
            .map(|i| {
                let (c, _inbox) = hub.connection(Transport::Tcp);
                let user = format!("u{i}");
                hub.register(&user, c.clone(), &group, None, None);
                (user, c)
            })
            .collect();
        let peak = hub.lock().users.capacity();
        assert!(peak >= 20_000);
        // All but 10 leave; those still online are still reached through the group.
        for (user, c) in &conns[10..] {
            hub.unregister(user, c.id);
        }
        let inner = hub.lock();
        assert_eq!(inner.users.len(), 10);
        assert!(inner.users.capacity() < SHRINK_FROM, "{} of {peak} kept", inner.users.capacity());
        let members = &inner.groups["g"];
        assert_eq!(members.len(), 10);
        assert!(members.capacity() < SHRINK_FROM);
        assert!(conns[..10].iter().all(|(user, _)| members.contains(user.as_str()) && inner.users.contains_key(user.as_str())));
    }
}

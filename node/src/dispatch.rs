//! The dispatcher: one place where every command is carried out, whatever transport it came in
//! on. It takes a parsed request and the session's state, and returns the replies for this
//! connection; effects on other connections go through the hub, effects on data through the store.
//! It never touches a socket.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use schema::jim::{self, ChatAck, ChatReq, GroupView, LoginReq, MessageQuery, Request, Target, UserFilter, UserInfo, UserView};
use schema::{Command, ConversationId, Status};
use serde_json::json;

use crate::auth::{self, LoginThrottle, Tokens};
use crate::cluster::Cluster;
use crate::config::{Config, Profile};
use crate::hub::{Conn, Hub, Push, SharedPush};
use crate::limits::TokenBucket;
use crate::mesh::Mesh;
use crate::metrics::Metrics;
use crate::store::{self, NewMessage, RecallRefusal, Store, StoredMessage, UserRecord};
use schema::mesh::RelayTarget;

/// Everything a node shares between its connections. Cheap to reach through an `Arc`.
pub struct Core {
    /// Settings.
    pub config: Config,
    /// Storage.
    pub store: Store,
    /// Local connections and presence.
    pub hub: Arc<Hub>,
    /// Token issuer.
    pub tokens: Tokens,
    /// Failed-login throttle.
    pub throttle: LoginThrottle,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Set once the node accepts connections (with peers: once caught up, by the mesh).
    pub ready: Arc<AtomicBool>,
    /// Password hashing and checking: a fixed pool (one thread per core, memory reused) behind a
    /// bounded queue; past it, logins are answered busy (11015).
    pub passwords: auth::PasswordPool,
    /// Recent successful password checks: a reconnect with the same password costs a MAC.
    pub logins: auth::LoginCache,
    /// Concurrent connections per client IP.
    pub conns: crate::limits::ConnLimit,
    /// HTTP API requests per client IP, of callers without the API key.
    pub api_per_ip: crate::limits::KeyedBuckets<std::net::IpAddr>,
    /// HTTP API requests with the API key (ten times the per-IP rate: one key serves a fleet).
    pub api_per_key: crate::limits::KeyedBuckets<String>,
    /// The TLS certificate (reloaded on SIGHUP, renewed when self-signed).
    pub certs: Arc<crate::tls::CertStore>,
    /// The rest of the cluster, as the dispatcher sees it (the mesh, or a node on its own).
    pub cluster: Arc<dyn Cluster>,
    /// The mesh to the other nodes, for its own management (metrics, readiness); `None` for a
    /// single node. Commands go through `cluster`.
    pub mesh: Option<Arc<Mesh>>,
    /// Customer service: the router's inputs.
    pub support: crate::support::Support,
}

/// The authenticated user of a session.
#[derive(Debug, Clone)]
pub struct UserCtx {
    /// User id.
    pub id: String,
    /// Display name.
    pub nick: Option<String>,
    /// Avatar URL.
    pub avatar: Option<String>,
    /// Role: user, agent or admin.
    pub role: String,
}

impl UserCtx {
    fn view(&self, online: bool) -> UserView {
        UserView { avatar: self.avatar.clone(), nick: self.nick.clone(), status: status_name(online), user_id: self.id.clone() }
    }

    fn privileged(&self) -> bool {
        self.role == "agent" || self.role == "admin"
    }
}

/// The seqs of one conversation pushed live to a connection.
#[derive(Debug, Clone, Copy)]
pub struct Live {
    /// The first: offline reads leave out everything from there on, because this connection
    /// already has it.
    pub floor: u64,
    /// The newest (the delivered cursor follows it once the messages before `floor` were read).
    pub high: u64,
}

/// Per-connection state the dispatcher reads and updates.
pub struct SessionState {
    /// This connection's handle in the hub.
    pub conn: Conn,
    /// The client's address.
    pub peer: SocketAddr,
    /// Set by a successful login.
    pub user: Option<UserCtx>,
    /// Per conversation, what was pushed live to this connection.
    pub live: HashMap<ConversationId, Live>,
    bucket: TokenBucket,
    /// History, user and sync lookups: reads cost the node more than a chat.
    reads: TokenBucket,
}

impl SessionState {
    /// A fresh, unauthenticated session.
    pub fn new(core: &Core, conn: Conn, peer: SocketAddr) -> SessionState {
        SessionState {
            conn,
            peer,
            user: None,
            live: HashMap::new(),
            bucket: TokenBucket::new(core.config.msg_rate, core.config.msg_burst),
            reads: TokenBucket::new(core.config.read_rate, core.config.read_burst),
        }
    }
}

/// A frame for this connection.
#[derive(Debug, Clone)]
pub struct Reply {
    /// Command of the frame.
    pub command: u8,
    /// JSON body.
    pub body: Bytes,
}

/// What the session does after a request.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Frames to send, in order.
    pub replies: Vec<Reply>,
    /// Close the connection after sending them.
    pub close: bool,
}

impl Outcome {
    fn reply(command: Command, body: Vec<u8>) -> Outcome {
        Outcome { replies: vec![Reply { command: command.code(), body: body.into() }], close: false }
    }

    fn status(command: Command, status: Status) -> Outcome {
        Outcome::reply(command, jim::status_reply(command, status))
    }

    fn closing(mut self) -> Outcome {
        self.close = true;
        self
    }

    fn none() -> Outcome {
        Outcome::default()
    }
}

/// A customer-service visitor talks in their own conversation (a closed group the node made) and
/// nowhere else: no private chats, no joining or leaving groups.
fn visitor_may(req: &Request) -> bool {
    match req {
        // Chats are checked in `begin_chat`, which every chat from a session goes through.
        Request::Typing { target, .. } | Request::Receipt { target, .. } | Request::Sync { target, .. } => {
            matches!(target, Target::Group(_))
        }
        Request::JoinGroup { .. } | Request::LeaveGroup { .. } | Request::Close { user_id: Some(_) } | Request::Recall { .. } => false,
        Request::GetMessage(q) => q.group.is_some(),
        Request::GetUser { .. } => false,
        _ => true,
    }
}

fn status_name(online: bool) -> &'static str {
    if online {
        "online"
    } else {
        "offline"
    }
}

/// A chat on its way through the store: resolves to the cmd 12 reply body.
pub type PendingChat = std::pin::Pin<Box<dyn std::future::Future<Output = Vec<u8>> + Send>>;

/// Who a send is from: a logged-in session, or an API caller naming the sender.
pub struct Sender<'a> {
    /// Sender id.
    pub id: &'a str,
    /// Nick carried on the message.
    pub nick: Option<String>,
    /// Avatar carried on the message.
    pub avatar: Option<String>,
    /// The sender has a session here, so the hub knows their groups (as of now: a member
    /// removed a moment ago is no longer in them); otherwise the store is asked.
    pub in_hub: bool,
    /// The sender's connection here, if the send came from a session: the sender's other
    /// connections, on every node, get a copy of a private message; this one gets the reply.
    pub conn: Option<u64>,
}

impl Core {
    /// Whether this node is ready and may hand out seqs: caught up with the mesh, and agreeing
    /// with every peer it hears from on the configured node list (DESIGN §7).
    pub fn may_sequence(&self) -> bool {
        self.ready.load(Ordering::Acquire) && self.cluster.agrees()
    }

    /// Carries out one request.
    pub async fn handle(&self, s: &mut SessionState, req: Request) -> Outcome {
        match req {
            Request::Handshake => Outcome::reply(Command::HandshakeResp, jim::handshake_reply()),
            Request::Heartbeat => Outcome::reply(Command::HeartbeatReq, jim::heartbeat_reply()),
            Request::Login(login) => self.login(s, login, Command::LoginResp).await,
            Request::Auth { token } => {
                let login = LoginReq { user_id: None, password: None, token: Some(token), nick: None };
                self.login(s, login, Command::AuthResp).await
            }
            req => {
                let Some(user) = s.user.clone() else {
                    return Outcome::status(reply_command(&req), Status::NotLoggedIn);
                };
                self.handle_user(s, &user, req).await
            }
        }
    }

    async fn handle_user(&self, s: &mut SessionState, user: &UserCtx, req: Request) -> Outcome {
        // Chats are limited in `begin_chat`, the one path every chat from a session takes.
        let limited = matches!(req, Request::Typing { .. } | Request::Receipt { .. } | Request::Recall { .. });
        if limited && !s.bucket.take(Instant::now()) {
            return Outcome::status(reply_command(&req), Status::RateLimited);
        }
        let read = matches!(req, Request::GetMessage(_) | Request::GetUser { .. } | Request::Sync { .. });
        if read && !s.reads.take(Instant::now()) {
            return Outcome::status(reply_command(&req), Status::RateLimited);
        }
        if user.role == "visitor" && !visitor_may(&req) {
            return Outcome::status(reply_command(&req), Status::Forbidden);
        }
        match req {
            Request::Chat(chat) => match self.begin_chat(s, chat) {
                Ok(pending) => Outcome::reply(Command::ChatResp, pending.await),
                Err(reply) => Outcome::reply(Command::ChatResp, reply),
            },
            Request::JoinGroup { group_id, name } => self.join(user, &group_id, name).await,
            Request::LeaveGroup { group_id } => {
                let status = match self.leave_group(&group_id, &user.id, user.nick.clone()).await {
                    Ok(true) => Status::Ok,
                    Ok(false) => Status::NotFound,
                    Err(e) => return self.retryable(Command::LeaveGroupResp, e),
                };
                Outcome::status(Command::LeaveGroupResp, status)
            }
            Request::Close { user_id } => match user_id {
                Some(other) if other != user.id && user.role != "admin" => Outcome::status(Command::CloseReq, Status::Forbidden),
                Some(other) if other != user.id => {
                    self.kick_everywhere(&other);
                    Outcome::status(Command::CloseReq, Status::CloseOk)
                }
                Some(_) => {
                    // Every connection of this user, on every node, including this one, which
                    // closes below.
                    self.kick_everywhere(&user.id);
                    Outcome::status(Command::CloseReq, Status::CloseOk).closing()
                }
                None => Outcome::status(Command::CloseReq, Status::CloseOk).closing(),
            },
            Request::Recall { id } => self.recall(s, user, &id).await,
            Request::GetUser { user_id, filter } => self.get_user(s, user, &user_id, filter).await,
            Request::GetMessage(query) => self.get_messages(s, user, query).await,
            Request::Typing { target, started } => {
                let command = if started { Command::TypingStart } else { Command::TypingStop };
                if let Err(status) = self.check_target(user, &target).await {
                    return Outcome::status(command, status);
                }
                let data = target_json(&user.id, &target, None);
                let push = Arc::new(Push { command: command.code(), body: jim::push(command, &data).into(), delivery: None });
                self.push_to_target(&target, &push, Some(s.conn.id));
                Outcome::none()
            }
            Request::Receipt { target, seq, read } => {
                let command = if read { Command::ReadReceipt } else { Command::DeliveryReceipt };
                let conv = match self.check_target(user, &target).await {
                    Ok(conv) => conv,
                    Err(status) => return Outcome::status(command, status),
                };
                let result = self.store.advance_cursor_committed(&user.id, &conv, seq, if read { seq } else { 0 }).await;
                if result.is_err() {
                    return Outcome::status(command, Status::Retryable);
                }
                let data = target_json(&user.id, &target, Some(seq));
                let push = Arc::new(Push { command: command.code(), body: jim::push(command, &data).into(), delivery: None });
                self.push_to_target(&target, &push, Some(s.conn.id));
                Outcome::none()
            }
            Request::Sync { target, after, limit } => {
                let conv = match self.check_target(user, &target).await {
                    Ok(conv) => conv,
                    Err(status) => return Outcome::status(Command::SyncResp, status),
                };
                self.fill_gaps(&user.id, Some(&conv), after).await;
                let limit = limit.min(self.config.history_max);
                match self.store.since(&conv, after, limit + 1).await {
                    Ok(mut messages) => {
                        let more = messages.len() > limit as usize;
                        messages.truncate(limit as usize);
                        let bodies: Vec<_> = messages.iter().map(StoredMessage::to_chat_body).collect();
                        let data = json!({ "conversation": conv.as_str(), "messages": bodies, "more": more });
                        Outcome::reply(Command::SyncResp, jim::resp(Command::SyncResp, Status::Ok, Some(data)))
                    }
                    Err(e) => self.retryable(Command::SyncResp, e),
                }
            }
            Request::Handshake | Request::Heartbeat | Request::Login(_) | Request::Auth { .. } => {
                unreachable!("handled before login is required")
            }
        }
    }

    fn retryable(&self, command: Command, error: store::StoreError) -> Outcome {
        tracing::warn!(error = %error, command = command.code(), "storage error");
        Outcome::status(command, Status::Retryable)
    }

    // -- login ---------------------------------------------------------------------------------

    async fn login(&self, s: &mut SessionState, req: LoginReq, command: Command) -> Outcome {
        let (ok_status, fail_status) = match command {
            Command::AuthResp => (Status::AuthOk, Status::AuthFailed),
            _ => (Status::LoginOk, Status::LoginFailed),
        };
        let ip = s.peer.ip();
        if !self.throttle.allows(ip, Instant::now()) {
            return Outcome::status(command, Status::LoginThrottled).closing();
        }
        let record = match self.authenticate(&req).await {
            Ok(Some(record)) => record,
            Ok(None) => {
                self.throttle.failed(ip, Instant::now());
                // J-IM closes the connection after a failed login.
                return Outcome::status(command, fail_status).closing();
            }
            Err(LoginError::Busy) => return Outcome::status(command, Status::Busy),
            Err(LoginError::Store(e)) => return self.retryable(command, e),
        };
        if let Some(current) = &s.user {
            let status = if current.id == record.user_id { ok_status } else { fail_status };
            return Outcome::status(command, status);
        }
        let groups = match self.store.user_groups(&record.user_id).await {
            Ok(groups) => groups,
            Err(e) => return self.retryable(command, e),
        };
        let group_ids: Vec<String> = groups.into_iter().map(|(g, _)| g).collect();
        let epoch = record.token_epoch;
        let user = UserCtx { id: record.user_id, nick: record.nick, avatar: record.avatar, role: record.role };
        self.hub.register(&user.id, s.conn.clone(), &group_ids, user.nick.clone(), user.avatar.clone());
        // A ban or password change that committed while this login was checked found no session
        // here to end: look again now that the session is registered.
        match self.store.user(&user.id).await {
            Ok(Some(now)) if !now.banned && now.token_epoch == epoch => {}
            Ok(_) => {
                self.hub.unregister(&user.id, s.conn.id);
                return Outcome::status(command, fail_status).closing();
            }
            Err(e) => {
                self.hub.unregister(&user.id, s.conn.id);
                return self.retryable(command, e);
            }
        }
        // J-IM sends the join notice of every group to the group (the user included) before the
        // login reply.
        let view = user.view(true);
        for g in group_ids.iter().filter(|g| self.announces(g)) {
            let push = Arc::new(Push { command: Command::JoinGroupNotify.code(), body: jim::join_notify(g, &view).into(), delivery: None });
            self.push_everywhere(RelayTarget::Group(g.clone()), &push, None);
        }
        let token = self.tokens.issue(&user.id, epoch, SystemTime::now());
        let data = json!({ "token": token, "userId": user.id });
        tracing::info!(user = %user.id, transport = s.conn.transport.name(), "logged in");
        if user.privileged() {
            // An agent coming online may take queued conversations at once.
            self.support.wake();
        }
        s.user = Some(user);
        Outcome::reply(command, jim::resp(command, ok_status, Some(data)))
    }

    /// The user a token names, if it is valid now: a token from before the user's last password
    /// change, ban or logout is refused.
    pub async fn user_for_token(&self, token: &str) -> Result<Option<UserRecord>, store::StoreError> {
        let Some(claims) = self.tokens.verify(token, SystemTime::now()) else { return Ok(None) };
        Ok(self.store.user(&claims.user).await?.filter(|r| !r.banned && claims.epoch >= r.token_epoch))
    }

    /// The user the credentials name, `None` if they are wrong. The dev profile registers an
    /// unknown user with the given password.
    async fn authenticate(&self, req: &LoginReq) -> Result<Option<UserRecord>, LoginError> {
        if let Some(token) = &req.token {
            let user = self.user_for_token(token).await?;
            return Ok(user.filter(|r| req.user_id.as_ref().is_none_or(|u| *u == r.user_id)));
        }
        let (Some(user_id), Some(password)) = (&req.user_id, &req.password) else { return Ok(None) };
        if password.is_empty() {
            return Ok(None);
        }
        if let Some(record) = self.store.user(user_id).await? {
            if record.banned {
                return Ok(None);
            }
            return Ok(self.check_password(user_id, password, &record.password_hash).await?.then_some(record));
        }
        if self.config.profile == Profile::Prod {
            return Ok(None);
        }
        let Ok(password_hash) = self.passwords.hash(password, self.config.password_hash_cost).await? else { return Ok(None) };
        let nick = Some(req.nick.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| user_id.clone()));
        let record = UserRecord::new(user_id, password_hash, nick, None, "user");
        if self.store.create_user(record.clone(), false).await? {
            // The next login with this password is a MAC, like any checked one.
            self.logins.remember(user_id, password, &record.password_hash, Instant::now());
            for g in &self.config.default_groups {
                self.store.join_group(g, Some(g.clone()), user_id).await?;
            }
            tracing::info!(user = %user_id, "registered on first login (dev profile)");
            return Ok(Some(record));
        }
        // Someone registered the same id at the same moment: check against theirs.
        match self.store.user(user_id).await? {
            Some(existing) if self.check_password(user_id, password, &existing.password_hash).await? => Ok(Some(existing)),
            _ => Ok(None),
        }
    }

    /// Checks a password against a stored hash: a MAC if this check succeeded within the token
    /// lifetime, else argon2 on the pool (and remembered when it succeeds).
    async fn check_password(&self, user: &str, password: &str, stored_hash: &str) -> Result<bool, LoginError> {
        let now = Instant::now();
        if self.logins.knows(user, password, stored_hash, now) {
            return Ok(true);
        }
        let ok = self.passwords.verify(password, stored_hash).await?;
        if ok {
            self.logins.remember(user, password, stored_hash, now);
        }
        Ok(ok)
    }

    // -- groups --------------------------------------------------------------------------------

    async fn join(&self, user: &UserCtx, group: &str, name: Option<String>) -> Outcome {
        // A closed group takes members through the admin API only; to anyone else it is not there.
        match self.store.group_info(group).await {
            // Customer-service conversations (always closed) are made by the node, never by a join.
            Ok(None) if crate::support::is_support_group(group) => return Outcome::status(Command::JoinGroupResp, Status::JoinGroupFailed),
            Ok(Some(info)) if info.closed => match self.store.is_member(group, &user.id).await {
                Ok(true) => {}
                Ok(false) => return Outcome::status(Command::JoinGroupResp, Status::JoinGroupFailed),
                Err(e) => return self.retryable(Command::JoinGroupResp, e),
            },
            Ok(_) => {}
            Err(e) => return self.retryable(Command::JoinGroupResp, e),
        }
        if let Err(e) = self.store.join_group(group, name, &user.id).await {
            return self.retryable(Command::JoinGroupResp, e);
        }
        self.hub.join(&user.id, group);
        // As J-IM 3.x: no direct reply on success; the notice (which the joiner gets too) is it.
        // In a group too large to announce joins in, only the joiner gets it.
        let body = jim::join_notify(group, &user.view(true));
        if !self.announces(group) {
            return Outcome::reply(Command::JoinGroupNotify, body);
        }
        let push = Arc::new(Push { command: Command::JoinGroupNotify.code(), body: body.into(), delivery: None });
        self.push_everywhere(RelayTarget::Group(group.to_string()), &push, None);
        Outcome::none()
    }

    /// Takes `user` out of `group` (cmd 106, the admin API) and tells the other members with
    /// J-IM's exit notice. Returns false if they were not a member. Their sessions at every node
    /// stop receiving the group as the removal arrives there.
    pub async fn leave_group(&self, group: &str, user: &str, nick: Option<String>) -> Result<bool, store::StoreError> {
        if !self.store.set_member(group, user, false).await? {
            return Ok(false);
        }
        if !self.announces(group) {
            return Ok(true);
        }
        let view = UserView { avatar: None, nick, status: status_name(self.hub.is_online_anywhere(user)), user_id: user.to_string() };
        let push = Arc::new(Push { command: Command::ExitGroupNotify.code(), body: jim::exit_notify(group, &view).into(), delivery: None });
        self.push_everywhere(RelayTarget::Group(group.to_string()), &push, None);
        Ok(true)
    }

    /// Whether joins and exits in `group` are announced to its members: not in groups with more
    /// online members than the configured limit, where the notices alone would cost O(members²)
    /// pushes as everyone logs in.
    fn announces(&self, group: &str) -> bool {
        self.hub.announces(group, self.config.presence_notice_limit)
    }

    /// The user's last session here closed: the exit notice goes out now if they are online
    /// nowhere else, or is held until they are (the mesh then decides which node sends it).
    pub fn went_offline(&self, user: &str, gone: crate::hub::WentOffline) {
        if let Some(gone) = self.hub.left(self.cluster.node_id(), user, gone) {
            self.notify_exit(user, gone.nick, &gone.groups);
        }
    }

    /// Tells the remaining members of `groups` that `user` went offline.
    pub fn notify_exit(&self, user: &str, nick: Option<String>, groups: &[Arc<str>]) {
        for (g, push) in self.hub.exit_pushes(user, nick, groups, self.config.presence_notice_limit) {
            self.push_everywhere(RelayTarget::Group(g), &push, None);
        }
    }

    // -- chat ----------------------------------------------------------------------------------

    /// Sends a chat message and returns the cmd 12 reply body. Shared by every transport and by
    /// the HTTP APIs.
    pub async fn send_chat(&self, sender: &Sender<'_>, chat: ChatReq) -> Vec<u8> {
        let member = match (&chat.target, sender.in_hub) {
            (Target::Group(g), false) => match self.store.is_member(g, sender.id).await {
                Ok(member) => Some(member),
                Err(_) => return jim::status_reply(Command::ChatResp, Status::Retryable),
            },
            _ => None,
        };
        match self.prepare_chat(sender, chat, member) {
            Ok(pending) => pending.await,
            Err(reply) => reply,
        }
    }

    /// Checks a chat and hands it to the store; the returned future, which owns everything it
    /// needs, resolves to the cmd 12 reply body once the message is committed and pushed. A
    /// session keeps several in flight. `member` answers the group check for a sender the hub
    /// does not know.
    pub fn prepare_chat(&self, sender: &Sender<'_>, chat: ChatReq, member: Option<bool>) -> Result<PendingChat, Vec<u8>> {
        let fail = |status| jim::status_reply(Command::ChatResp, status);
        let (conversation, recipient, group_id, chat_type) = match &chat.target {
            Target::User(to) => (ConversationId::private(sender.id, to), Some(to.clone()), None, 2),
            Target::Group(g) => {
                // The hub follows joins and removals here and at the other nodes.
                let member = if sender.in_hub { self.hub.in_group(sender.id, g) } else { member.unwrap_or(false) };
                if !member {
                    return Err(fail(Status::Forbidden));
                }
                (ConversationId::group(g), None, Some(g.clone()), 1)
            }
        };
        let message = NewMessage {
            conversation,
            client_id: chat.client_id,
            sender: sender.id.to_string(),
            recipient,
            group_id,
            chat_type,
            msg_type: chat.msg_type,
            content: chat.content,
            extras: chat.extras.map(|e| serde_json::Value::Object(e).to_string()),
            nick: sender.nick.clone(),
            avatar: sender.avatar.clone(),
        };
        if !self.cluster.owns(&message.conversation) {
            // Another node sequences this conversation: forward (queued now, in request order),
            // and answer after its commit.
            let recipient_online = message.recipient.as_deref().is_some_and(|r| self.hub.is_online_anywhere(r));
            let forwarded = self.cluster.forward(message, sender.conn);
            return Ok(Box::pin(async move {
                match forwarded.await {
                    Ok(m) => chat_ack(&m, recipient_online),
                    Err(status) => fail(status),
                }
            }));
        }
        if !self.may_sequence() {
            // An owner sequences only once it has caught up with the mesh (after losing its
            // database it would otherwise hand out seqs that were already taken) and while no
            // peer has another node list (which could make that peer an owner too).
            return Err(fail(Status::Retryable));
        }
        self.metrics.messages_in.fetch_add(1, Ordering::Relaxed);
        // Queued now, in request order: pipelined sends get their seqs in the order they came.
        let appended = self.store.submit_append(message, sender.conn);
        Ok(Box::pin(async move {
            match appended.await {
                Ok(delivery) => chat_ack(&delivery.message, delivery.recipient_online),
                Err(e) => {
                    tracing::warn!(error = %e, "append failed");
                    fail(Status::Retryable)
                }
            }
        }))
    }

    /// Starts a chat from a logged-in session: rate limit, membership, then the pending commit.
    pub fn begin_chat(&self, s: &mut SessionState, chat: ChatReq) -> Result<PendingChat, Vec<u8>> {
        let Some(user) = s.user.as_ref() else { return Err(jim::status_reply(Command::ChatResp, Status::NotLoggedIn)) };
        if user.role == "visitor" && !matches!(chat.target, Target::Group(_)) {
            return Err(jim::status_reply(Command::ChatResp, Status::Forbidden));
        }
        if !s.bucket.take(Instant::now()) {
            return Err(jim::status_reply(Command::ChatResp, Status::RateLimited));
        }
        let sender = Sender { id: &user.id, nick: user.nick.clone(), avatar: user.avatar.clone(), in_hub: true, conn: Some(s.conn.id) };
        self.prepare_chat(&sender, chat, None)
    }

    async fn recall(&self, s: &SessionState, user: &UserCtx, id: &str) -> Outcome {
        // A group's messages are its members' business: an agent may recall others' messages,
        // but only in groups they are in (admins anywhere).
        match self.store.message(id).await {
            Ok(Some(m)) => {
                if m.group_id.as_ref().is_some_and(|g| user.role != "admin" && !self.hub.in_group(&user.id, g)) {
                    return Outcome::status(Command::CancelMsgResp, Status::Forbidden);
                }
            }
            Ok(None) => return Outcome::status(Command::CancelMsgResp, Status::NotFound),
            Err(e) => return self.retryable(Command::CancelMsgResp, e),
        }
        let result = self.store.recall(id, &user.id, user.privileged(), store::now_ms(), self.config.recall_window).await;
        let status = match result {
            Ok(Ok(recalled)) => {
                let m = &recalled.message;
                let data = recall_json(m, &recalled.by);
                let push = Arc::new(Push {
                    command: Command::CancelMsgResp.code(),
                    body: jim::push(Command::CancelMsgResp, &data).into(),
                    delivery: None,
                });
                let skip = Some(s.conn.id);
                match (&m.recipient, &m.group_id) {
                    (Some(to), _) if *to == m.sender => self.push_everywhere(RelayTarget::User(to.clone()), &push, skip),
                    (Some(to), _) => {
                        self.push_everywhere(RelayTarget::User(m.sender.clone()), &push, skip);
                        self.push_everywhere(RelayTarget::User(to.clone()), &push, skip);
                    }
                    (None, Some(group)) => self.push_everywhere(RelayTarget::Group(group.clone()), &push, skip),
                    (None, None) => {}
                }
                return Outcome::reply(Command::CancelMsgResp, jim::resp(Command::CancelMsgResp, Status::Ok, Some(data)));
            }
            Ok(Err(RecallRefusal::NotFound)) => Status::NotFound,
            Ok(Err(RecallRefusal::Forbidden)) => Status::Forbidden,
            Ok(Err(RecallRefusal::Expired)) => Status::RecallExpired,
            Err(e) => return self.retryable(Command::CancelMsgResp, e),
        };
        Outcome::status(Command::CancelMsgResp, status)
    }

    /// Checks that `user` may act in the conversation `target` names, and returns it.
    async fn check_target(&self, user: &UserCtx, target: &Target) -> Result<ConversationId, Status> {
        match target {
            Target::User(peer) => Ok(ConversationId::private(&user.id, peer)),
            Target::Group(g) if self.hub.in_group(&user.id, g) => Ok(ConversationId::group(g)),
            Target::Group(_) => Err(Status::Forbidden),
        }
    }

    fn push_to_target(&self, target: &Target, push: &SharedPush, skip: Option<u64>) {
        match target {
            Target::User(peer) => self.push_everywhere(RelayTarget::User(peer.clone()), push, None),
            Target::Group(g) => self.push_everywhere(RelayTarget::Group(g.clone()), push, skip),
        }
    }

    /// Closes every session of `user` on every node (cmd 14 as admin, `/api/user/close`); best
    /// effort at nodes this one cannot reach. Returns how many closed here.
    pub fn kick_everywhere(&self, user: &str) -> usize {
        let here = self.hub.kick_user(user, Status::CloseOk);
        let close = jim::status_reply(Command::CloseReq, Status::CloseOk);
        self.cluster.relay(RelayTarget::User(user.to_string()), Command::CloseReq.code(), &close);
        here
    }

    /// Pushes a frame to the matching connections here (except connection `skip`) and relays it
    /// to every other node, which pushes it to its own.
    pub fn push_everywhere(&self, to: RelayTarget, push: &SharedPush, skip: Option<u64>) {
        match &to {
            RelayTarget::User(u) => drop(self.hub.send_user(u, push, skip)),
            RelayTarget::Group(g) => drop(self.hub.send_group(g, push, skip)),
        }
        self.cluster.relay(to, push.command, &push.body);
    }

    /// Pushes a committed chat message to the connections on this node that should see it: the
    /// recipient of a private message and the sender's other connections (every device shows the
    /// same conversation; `skip` is the connection it was sent from, if here), every online member
    /// of a group (the sender's connections included, as J-IM echoes). Returns how many of the
    /// recipient's connections took it.
    pub fn deliver_local(&self, message: &StoredMessage, skip: Option<u64>) -> usize {
        self.hub.deliver(message, skip)
    }

    /// Makes sure this node's replica of the user's conversations holds everything the user has
    /// already been shown (their cursors, or `seen` the client names): a conversation owned
    /// elsewhere whose local copy is behind is fetched first, from its owner or any peer that has
    /// it (roaming, DESIGN §7).
    async fn fill_gaps(&self, user: &str, only: Option<&ConversationId>, seen: u64) {
        if self.mesh.is_none() {
            // A node on its own has every conversation whole.
            return;
        }
        let behind = match self.store.behind(user, only, seen).await {
            Ok(behind) => behind,
            Err(e) => return tracing::warn!(error = %e, "checking the replica for gaps failed"),
        };
        for (conv, _local, wanted) in behind {
            if !self.cluster.fill(&conv, wanted).await {
                tracing::warn!(conversation = %conv.as_str(), wanted, "no peer could fill the replica's gap; answering from the replica");
            }
        }
    }

    // -- queries -------------------------------------------------------------------------------

    async fn get_user(&self, s: &SessionState, me: &UserCtx, user_id: &str, filter: UserFilter) -> Outcome {
        let status = match filter {
            UserFilter::Online => Status::GetOnlineUsersOk,
            UserFilter::Offline => Status::GetOfflineUsersOk,
            UserFilter::All => Status::GetUserOk,
        };
        let fail = || Outcome::status(Command::GetUserResp, Status::GetUserFailed);
        if user_id != me.id {
            let Ok(record) = self.store.user(user_id).await else { return fail() };
            let online = self.hub.is_online_anywhere(user_id);
            let Some(record) = record else { return fail() };
            let info = UserInfo {
                avatar: record.avatar,
                friends: vec![],
                groups: vec![],
                nick: record.nick,
                status: status_name(online),
                terminal: None,
                user_id: record.user_id,
            };
            return Outcome::reply(Command::GetUserResp, jim::resp(Command::GetUserResp, status, Some(info)));
        }
        let mut groups = Vec::new();
        let Ok(my_groups) = self.store.user_groups(&me.id).await else { return fail() };
        for (group_id, name) in my_groups {
            let Ok(members) = self.store.group_members(&group_id).await else { return fail() };
            let views: Vec<UserView> = members
                .into_iter()
                .map(|(id, nick, avatar)| {
                    let online = self.hub.is_online_anywhere(&id);
                    UserView { avatar, nick, status: status_name(online), user_id: id }
                })
                .collect();
            groups.push(group_view(group_id, name, views, filter));
        }
        let Ok(contacts) = self.store.contacts(&me.id).await else { return fail() };
        let mut friends = Vec::new();
        if !contacts.is_empty() {
            let views = contacts
                .into_iter()
                .map(|id| {
                    let online = self.hub.is_online_anywhere(&id);
                    UserView { avatar: None, nick: None, status: status_name(online), user_id: id }
                })
                .collect();
            friends.push(group_view("contacts".to_string(), Some("contacts".to_string()), views, filter));
        }
        let info = UserInfo {
            avatar: me.avatar.clone(),
            friends,
            groups,
            nick: me.nick.clone(),
            status: "online",
            terminal: Some(s.conn.transport.name()),
            user_id: me.id.clone(),
        };
        Outcome::reply(Command::GetUserResp, jim::resp(Command::GetUserResp, status, Some(info)))
    }

    async fn get_messages(&self, s: &mut SessionState, me: &UserCtx, q: MessageQuery) -> Outcome {
        let fail = || Outcome::status(Command::GetMessageResp, Status::GetMessageFailed);
        if q.user_id.as_ref().is_some_and(|u| *u != me.id) {
            return fail();
        }
        let conversation = match (&q.group, &q.peer) {
            (Some(g), _) if !self.hub.in_group(&me.id, g) => return Outcome::status(Command::GetMessageResp, Status::Forbidden),
            (Some(g), _) => Some(ConversationId::group(g)),
            (None, Some(peer)) => Some(ConversationId::private(&me.id, peer)),
            (None, None) => None,
        };
        if q.offset > self.config.history_max_offset {
            // J-IM's code for invalid request parameters: a deep offset scans the conversation.
            return Outcome::status(Command::GetMessageResp, Status::InvalidVerification);
        }
        self.fill_gaps(&me.id, conversation.as_ref(), 0).await;
        let result = if q.history {
            let Some(conv) = &conversation else { return fail() };
            let count = q.count.unwrap_or(jim::DEFAULT_PAGE).min(self.config.history_max);
            self.store.history(conv, q.begin, q.end, q.offset, count).await
        } else {
            self.store.offline(&me.id, conversation.as_ref(), q.count.unwrap_or(jim::MAX_PAGE)).await
        };
        let mut messages = match result {
            Ok(m) => m,
            Err(e) => return self.retryable(Command::GetMessageResp, e),
        };
        if !q.history {
            messages.retain(|m| s.live.get(&m.conversation).is_none_or(|live| m.seq < live.floor));
            let mut newest: BTreeMap<&ConversationId, u64> = BTreeMap::new();
            for m in &messages {
                let e = newest.entry(&m.conversation).or_default();
                *e = (*e).max(m.seq);
            }
            for (conv, seq) in newest {
                if let Err(e) = self.store.advance_cursor_committed(&me.id, conv, seq, 0).await {
                    return self.retryable(Command::GetMessageResp, e);
                }
                // What this connection had live after them counts now that the cursor reaches it.
                if let Some(live) = s.live.get(conv) {
                    let _ = self.store.advance_cursor_live(&me.id, conv, live.floor, live.high);
                }
            }
        }
        let mut friends: BTreeMap<String, Vec<jim::ChatBody>> = BTreeMap::new();
        let mut groups: BTreeMap<String, Vec<jim::ChatBody>> = BTreeMap::new();
        for m in &messages {
            let body = m.to_chat_body();
            match (&m.group_id, m.conversation.peer_of(&me.id)) {
                (Some(g), _) => groups.entry(g.clone()).or_default().push(body),
                (None, Some(peer)) => friends.entry(peer.to_string()).or_default().push(body),
                (None, None) => {}
            }
        }
        let status = if q.history { Status::GetHistoryMessageOk } else { Status::GetOfflineMessageOk };
        let data = json!({ "friends": friends, "groups": groups, "userId": me.id });
        Outcome::reply(Command::GetMessageResp, jim::resp(Command::GetMessageResp, status, Some(data)))
    }
}

fn group_view(group_id: String, name: Option<String>, members: Vec<UserView>, filter: UserFilter) -> GroupView {
    let online = members.iter().filter(|u| u.status == "online").count() as u32;
    let users = members
        .into_iter()
        .filter(|u| match filter {
            UserFilter::Online => u.status == "online",
            UserFilter::Offline => u.status == "offline",
            UserFilter::All => true,
        })
        .collect();
    GroupView { avatar: None, group_id, name, online, users }
}

/// The cmd 12 success reply for a committed message. J-IM answers a private message to an
/// offline user with 10001; kefu has stored it and will deliver it when the user comes back.
fn chat_ack(m: &StoredMessage, recipient_online: bool) -> Vec<u8> {
    let ack = ChatAck { client_id: m.client_id.as_deref(), conversation: m.conversation.as_str(), id: &m.id, seq: m.seq };
    let status = if m.chat_type == 2 && !recipient_online { Status::Offline } else { Status::Ok };
    jim::resp(Command::ChatResp, status, Some(ack))
}

/// The body of a recall notice and reply (cmd 16).
fn recall_json(m: &StoredMessage, by: &str) -> serde_json::Value {
    json!({
        "chatType": m.chat_type,
        "conversation": m.conversation.as_str(),
        "from": m.sender,
        "groupId": m.group_id,
        "id": m.id,
        "recalledAt": m.recalled_at,
        "recalledBy": by,
        "seq": m.seq,
        "to": m.recipient,
    })
}

fn target_json(from: &str, target: &Target, seq: Option<u64>) -> serde_json::Value {
    let mut data = json!({ "from": from });
    match target {
        Target::User(to) => data["to"] = json!(to),
        Target::Group(g) => data["groupId"] = json!(g),
    }
    if let Some(seq) = seq {
        data["seq"] = json!(seq);
    }
    data
}

/// The command of the reply a request gets.
fn reply_command(req: &Request) -> Command {
    match req {
        Request::Handshake => Command::HandshakeResp,
        Request::Auth { .. } => Command::AuthResp,
        Request::Login(_) => Command::LoginResp,
        Request::JoinGroup { .. } => Command::JoinGroupResp,
        Request::Chat(_) => Command::ChatResp,
        Request::Heartbeat => Command::HeartbeatReq,
        Request::Close { .. } => Command::CloseReq,
        Request::Recall { .. } => Command::CancelMsgResp,
        Request::GetUser { .. } => Command::GetUserResp,
        Request::GetMessage(_) => Command::GetMessageResp,
        Request::Typing { started: true, .. } => Command::TypingStart,
        Request::Typing { started: false, .. } => Command::TypingStop,
        Request::Receipt { read: true, .. } => Command::ReadReceipt,
        Request::Receipt { read: false, .. } => Command::DeliveryReceipt,
        Request::Sync { .. } => Command::SyncResp,
        Request::LeaveGroup { .. } => Command::LeaveGroupResp,
    }
}

/// Why a login could not be decided.
enum LoginError {
    /// Storage failed: retryable.
    Store(store::StoreError),
    /// The password pool's queue is full: busy, retry.
    Busy,
}

impl From<store::StoreError> for LoginError {
    fn from(e: store::StoreError) -> LoginError {
        LoginError::Store(e)
    }
}

impl From<auth::PoolError> for LoginError {
    fn from(e: auth::PoolError) -> LoginError {
        match e {
            auth::PoolError::Busy => LoginError::Busy,
            auth::PoolError::Stopped => LoginError::Store(store::StoreError::Closed),
        }
    }
}

//! Customer service on the IM core: inboxes, visitors, agents and conversations (each a closed
//! group holding its visitor and its assignee), the queue and who takes what (`routing.rs`, pure),
//! and the `cmd 108` pushes that keep widgets and consoles current. The rows are store records
//! (`model.rs`), so they replicate like every other row.
//!
//! Owns the router task: one per node, but only the node that owns [`ROUTING_KEY`] assigns (and
//! makes every change to conversations and agents, see [`Call`]), so capacity is counted in one
//! place and each record has one writer. It handles the messages waiting in the store's
//! `support_pending` (the fan-out wakes it after a commit in a `cs-` group), other nodes' calls,
//! local changes, and looks again once a second, which also picks up changes replicated from
//! other nodes and agents coming and going.

pub mod hours;
pub mod model;
pub mod routing;
pub mod webhooks;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use schema::jim;
use schema::mesh::RelayTarget;
use schema::{Command, ConversationId};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Notify};

use crate::dispatch::Core;
use crate::hub::Push;
use crate::store::{now_ms, Record, StoreError, StoredMessage, UserRecord};
use model::{Agent, AgentStatus, Canned, Conversation, Event, Inbox, Status, Visitor};

/// The conversation whose owner node runs the router (a name no group can clash with).
pub const ROUTING_KEY: &str = "cs:router";
/// Group ids of customer-service conversations start with this.
pub const GROUP_PREFIX: &str = schema::conversation::SUPPORT_GROUP_PREFIX;
/// How often the router looks again without being woken.
const TICK: Duration = Duration::from_secs(1);
/// How often messages whose handling failed are tried again.
const RETRY: Duration = Duration::from_secs(2);
/// Unhandled messages read at once.
const PENDING_BATCH: u32 = 1000;

/// Why a customer-service request was refused.
#[derive(Debug, thiserror::Error)]
pub enum SupportError {
    /// No such thing.
    #[error("{0}")]
    NotFound(String),
    /// A field is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The caller may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// Storage failed; retry.
    #[error("storage: {0}")]
    Store(#[from] StoreError),
}

impl SupportError {
    /// The HTTP status it answers with (also how it travels between nodes).
    pub fn status(&self) -> u16 {
        match self {
            SupportError::NotFound(_) => 404,
            SupportError::Invalid(_) => 400,
            SupportError::Forbidden(_) => 403,
            SupportError::Store(_) => 503,
        }
    }

    /// Back from a status and reason another node sent.
    fn from_status(status: u16, reason: String) -> SupportError {
        match status {
            404 => SupportError::NotFound(reason),
            400 => SupportError::Invalid(reason),
            403 => SupportError::Forbidden(reason),
            _ => SupportError::Store(StoreError::Corrupt(reason)),
        }
    }
}

type Result<T, E = SupportError> = std::result::Result<T, E>;

/// The router's inputs, shared with the dispatcher's `Core`.
pub struct Support {
    wake: Notify,
    /// Messages committed here in `cs-` groups wait in the store's `support_pending`.
    pending: Notify,
    /// Wakes the webhook deliverer.
    pub webhooks: Notify,
    /// How long an assignee may be offline before their conversations go back to the queue.
    pub grace: Duration,
}

impl Support {
    /// The router's inputs.
    pub fn new(grace: Duration) -> Support {
        Support { wake: Notify::new(), pending: Notify::new(), webhooks: Notify::new(), grace }
    }

    /// A message was committed here in a `cs-` group (the fan-out calls this; never blocks): its
    /// `support_pending` row, committed with it, is the queue the router task reads.
    pub fn message_committed(&self) {
        self.pending.notify_one();
    }

    /// Something changed that may let the router assign.
    pub fn wake(&self) {
        self.wake.notify_one();
    }
}

/// Whether a group is a customer-service conversation.
pub fn is_support_group(group: &str) -> bool {
    group.starts_with(GROUP_PREFIX)
}

// -- the model in the store -------------------------------------------------------------------

fn parse<T: serde::de::DeserializeOwned>(r: &Record) -> Result<T> {
    serde_json::from_str(&r.body).map_err(|e| SupportError::Store(StoreError::Corrupt(format!("{} {}: {e}", r.kind, r.id))))
}

fn body<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

async fn get<T: serde::de::DeserializeOwned>(core: &Core, kind: &str, id: &str) -> Result<Option<T>> {
    match core.store.record(kind, id).await? {
        Some(r) => Ok(Some(parse(&r)?)),
        None => Ok(None),
    }
}

async fn list<T: serde::de::DeserializeOwned>(core: &Core, kind: &str, scope: Option<&str>) -> Result<Vec<T>> {
    core.store.records(kind, scope).await?.iter().map(parse).collect()
}

/// Writes a record whose scope is derived from it, unless `edit` leaves it (returns false).
async fn edit<T>(
    core: &Core,
    kind: &'static str,
    id: &str,
    edit: impl Fn(Option<T>) -> Option<T> + Send + Sync + 'static,
) -> Result<Option<T>>
where
    T: serde::de::DeserializeOwned + serde::Serialize + Scoped + Send + 'static,
{
    let written = core
        .store
        .edit_record(kind, id, move |current| {
            let current = match current.map(|r| serde_json::from_str::<T>(&r.body)) {
                Some(Ok(c)) => Some(c),
                Some(Err(_)) => return None,
                None => None,
            };
            edit(current).map(|next| (next.scope(), body(&next)))
        })
        .await?;
    written.as_ref().map(parse).transpose()
}

/// What a record is listed under (by default nothing: the kind alone).
trait Scoped {
    fn scope(&self) -> String {
        String::new()
    }
}

impl Scoped for Inbox {}

impl Scoped for Visitor {
    fn scope(&self) -> String {
        self.inbox.clone()
    }
}

impl Scoped for Agent {}

impl Scoped for Conversation {
    fn scope(&self) -> String {
        self.status.name().to_string()
    }
}

impl Scoped for Canned {}

impl Scoped for Event {
    fn scope(&self) -> String {
        self.conversation.clone()
    }
}

/// Changes a conversation with `f` (which returns false to leave it) and tells its visitor and
/// the agents. Returns the conversation as written, or `None` if `f` left it.
async fn update(core: &Core, id: &str, f: impl Fn(&mut Conversation) -> bool + Send + Sync + 'static) -> Result<Option<Conversation>> {
    let written = edit::<Conversation>(core, model::CONVERSATION, id, move |c| {
        let mut c = c?;
        f(&mut c).then_some(c)
    })
    .await?;
    if let Some(c) = &written {
        let position = queue_position(core, c).await.unwrap_or(None);
        announce(core, c, position).await;
        core.support.wake();
    }
    Ok(written)
}

async fn add_event(core: &Core, conversation: &str, kind: &str, by: Option<&str>, text: String) -> Result<Event> {
    let event = Event {
        id: model::random_hex(12),
        conversation: conversation.to_string(),
        kind: kind.to_string(),
        by: by.map(str::to_string),
        text,
        at: now_ms(),
    };
    let e = event.clone();
    edit::<Event>(core, model::EVENT, &event.id, move |current| current.is_none().then(|| e.clone())).await?;
    if kind == "note" {
        // Notes go to the agents only, never to the conversation's group.
        let data = json!({ "note": event });
        push_to_agents(core, &data).await;
    }
    Ok(event)
}

// -- inboxes and agents ---------------------------------------------------------------------

/// An inbox to create (`POST /v1/inboxes`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewInbox {
    /// Shown to visitors.
    pub name: String,
    /// Refuse unverified `setUser` calls.
    #[serde(default)]
    pub hmac_required: bool,
    /// The first line a visitor sees.
    #[serde(default)]
    pub greeting: Option<String>,
    /// Shown when no agent is available.
    #[serde(default)]
    pub away_message: Option<String>,
    /// Ask for a rating after resolution (default on).
    #[serde(default)]
    pub csat: Option<bool>,
    /// Business hours.
    #[serde(default)]
    pub hours: Option<hours::Hours>,
    /// Webhook URLs.
    #[serde(default)]
    pub webhooks: Vec<String>,
    /// The agents who take its conversations (empty: every agent).
    #[serde(default)]
    pub agents: Vec<String>,
}

/// Fields to change on an inbox (`PATCH /v1/inboxes/{id}`); absent ones stay.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboxPatch {
    /// Shown to visitors.
    #[serde(default)]
    pub name: Option<String>,
    /// Refuse unverified `setUser` calls.
    #[serde(default)]
    pub hmac_required: Option<bool>,
    /// The first line a visitor sees.
    #[serde(default)]
    pub greeting: Option<String>,
    /// Shown when no agent is available.
    #[serde(default)]
    pub away_message: Option<String>,
    /// Ask for a rating after resolution.
    #[serde(default)]
    pub csat: Option<bool>,
    /// Business hours (`null` clears them: always open).
    #[serde(default, deserialize_with = "present")]
    pub hours: Option<Option<hours::Hours>>,
    /// Webhook URLs (replaces the list).
    #[serde(default)]
    pub webhooks: Option<Vec<String>>,
    /// The agents who take its conversations (replaces the list; empty: every agent).
    #[serde(default)]
    pub agents: Option<Vec<String>>,
}

/// A field given as `null` is `Some(None)`, an absent one `None`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

fn check_inbox(i: &Inbox) -> Result<()> {
    if i.name.trim().is_empty() || i.name.len() > 200 {
        return Err(SupportError::Invalid("name: 1 to 200 characters".into()));
    }
    if let Some(h) = &i.hours {
        h.validate().map_err(SupportError::Invalid)?;
    }
    if i.agents.len() > 1000 || i.agents.iter().any(|a| !schema::jim::valid_id(a)) {
        return Err(SupportError::Invalid("agents: at most 1,000 user ids".into()));
    }
    if i.webhooks.len() > 10 {
        return Err(SupportError::Invalid("webhooks: at most 10 URLs".into()));
    }
    for url in &i.webhooks {
        let ok = url.parse::<axum::http::Uri>().is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if !ok {
            return Err(SupportError::Invalid(format!("webhook {url:?}: an http or https URL")));
        }
    }
    Ok(())
}

fn apply_patch(mut next: Inbox, patch: &InboxPatch) -> Inbox {
    if let Some(v) = &patch.name {
        next.name = v.trim().to_string();
    }
    if let Some(v) = patch.hmac_required {
        next.hmac_required = v;
    }
    if let Some(v) = &patch.greeting {
        next.greeting = Some(v.clone()).filter(|g| !g.is_empty());
    }
    if let Some(v) = &patch.away_message {
        next.away_message = Some(v.clone()).filter(|g| !g.is_empty());
    }
    if let Some(v) = patch.csat {
        next.csat = v;
    }
    if let Some(v) = &patch.hours {
        next.hours = v.clone();
    }
    if let Some(v) = &patch.webhooks {
        next.webhooks = v.clone();
    }
    if let Some(v) = &patch.agents {
        next.agents = v.clone();
    }
    next
}

/// Changes an inbox's settings (in one step of the writer: two patches never lose each other's
/// fields).
pub async fn patch_inbox(core: &Core, id: &str, patch: InboxPatch) -> Result<Inbox> {
    check_inbox(&apply_patch(inbox(core, id).await?, &patch))?;
    let written = edit::<Inbox>(core, model::INBOX, id, move |c| c.map(|c| apply_patch(c, &patch))).await?;
    written.ok_or_else(|| SupportError::NotFound(format!("no inbox {id}")))
}

/// Creates an inbox with a new website token and HMAC secret.
pub async fn create_inbox(core: &Core, new: NewInbox) -> Result<Inbox> {
    let name = new.name.trim().to_string();
    let inbox = Inbox {
        id: format!("in-{}", model::random_hex(8)),
        name,
        website_token: model::random_hex(12),
        hmac_secret: model::random_hex(32),
        hmac_required: new.hmac_required,
        greeting: new.greeting,
        away_message: new.away_message,
        csat: new.csat.unwrap_or(true),
        hours: new.hours,
        webhooks: new.webhooks,
        webhook_secret: model::random_hex(32),
        agents: new.agents,
    };
    check_inbox(&inbox)?;
    let i = inbox.clone();
    edit::<Inbox>(core, model::INBOX, &inbox.id, move |c| c.is_none().then(|| i.clone())).await?;
    Ok(inbox)
}

/// Every inbox.
pub async fn inboxes(core: &Core) -> Result<Vec<Inbox>> {
    list(core, model::INBOX, None).await
}

/// An inbox by id.
pub async fn inbox(core: &Core, id: &str) -> Result<Inbox> {
    get(core, model::INBOX, id).await?.ok_or_else(|| SupportError::NotFound(format!("no inbox {id}")))
}

async fn inbox_by_token(core: &Core, token: &str) -> Result<Inbox> {
    let all = inboxes(core).await?;
    all.into_iter()
        .find(|i| crate::auth::constant_time_eq(i.website_token.as_bytes(), token.as_bytes()))
        .ok_or_else(|| SupportError::NotFound("no inbox with that website token".into()))
}

/// Settings to change for an agent (`PUT /v1/agents/{id}`); absent ones stay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentPatch {
    /// Most open conversations at once.
    #[serde(default)]
    pub limit: Option<u32>,
    /// `online` or `busy`.
    #[serde(default)]
    pub status: Option<AgentStatus>,
    /// Teams (replaces the list).
    #[serde(default)]
    pub teams: Option<Vec<String>>,
}

async fn do_set_agent(core: &Core, id: &str, patch: AgentPatch) -> Result<Agent> {
    let user = core.store.user(id).await?.ok_or_else(|| SupportError::NotFound(format!("no user {id}")))?;
    if user.role != "agent" && user.role != "admin" {
        return Err(SupportError::Invalid(format!("{id} has role {}; agents need role agent or admin", user.role)));
    }
    if patch.limit.is_some_and(|l| l > 1000) {
        return Err(SupportError::Invalid("limit: 0 to 1000".into()));
    }
    let uid = id.to_string();
    let written = edit::<Agent>(core, model::AGENT, id, move |current| {
        let mut a = current.unwrap_or_else(|| Agent::new(&uid));
        if let Some(l) = patch.limit {
            a.limit = l;
        }
        if let Some(s) = patch.status {
            a.status = s;
        }
        if let Some(t) = &patch.teams {
            a.teams = t.clone();
        }
        Some(a)
    })
    .await?;
    core.support.wake();
    written.ok_or_else(|| SupportError::Store(StoreError::Corrupt(format!("agent {id}"))))
}

/// Every agent with whether they are online (a session open anywhere) and their open load.
pub async fn agents(core: &Core) -> Result<Vec<Value>> {
    let agents: Vec<Agent> = list(core, model::AGENT, None).await?;
    let open: Vec<Conversation> = list(core, model::CONVERSATION, Some(Status::Open.name())).await?;
    Ok(agents
        .iter()
        .map(|a| {
            let load = open.iter().filter(|c| c.assignee.as_deref() == Some(&a.id)).count();
            json!({
                "id": a.id, "limit": a.limit, "teams": a.teams, "open": load,
                "status": effective_status(core, a),
            })
        })
        .collect())
}

/// The teams named on agents, each with its members and how many of them take conversations now.
pub async fn teams(core: &Core) -> Result<Vec<Value>> {
    let agents: Vec<Agent> = list(core, model::AGENT, None).await?;
    let mut teams: std::collections::BTreeMap<&str, Vec<&Agent>> = std::collections::BTreeMap::new();
    for a in &agents {
        for t in &a.teams {
            teams.entry(t.as_str()).or_default().push(a);
        }
    }
    Ok(teams
        .into_iter()
        .map(|(name, members)| {
            let online = members.iter().filter(|a| effective_status(core, a) == "online").count();
            json!({ "name": name, "agents": members.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), "online": online })
        })
        .collect())
}

fn effective_status(core: &Core, a: &Agent) -> &'static str {
    match (core.hub.is_online_anywhere(&a.id), a.status) {
        (false, _) => "offline",
        (true, AgentStatus::Online) => "online",
        (true, AgentStatus::Busy) => "busy",
    }
}

/// The agents' ids.
async fn agent_ids(core: &Core) -> Vec<String> {
    match list::<Agent>(core, model::AGENT, None).await {
        Ok(agents) => agents.into_iter().map(|a| a.id).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "reading the agents failed");
            Vec::new()
        }
    }
}

// -- the widget -----------------------------------------------------------------------------

/// What a widget sends when it starts (`POST /v1/widget/session`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WidgetStart {
    /// The inbox's website token.
    pub inbox: String,
    /// An anonymous visitor the widget already has.
    #[serde(default)]
    pub visitor: Option<String>,
    /// Its secret.
    #[serde(default)]
    pub secret: Option<String>,
    /// The host site's user (`kefu.setUser`).
    #[serde(default)]
    pub user: Option<HostUser>,
}

/// The host site's user, as `kefu.setUser(id, {name, email, identifier_hash})` gives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostUser {
    /// The host site's user id.
    pub id: String,
    /// Name.
    #[serde(default)]
    pub name: Option<String>,
    /// Email.
    #[serde(default)]
    pub email: Option<String>,
    /// Hex HMAC-SHA256 of `id` keyed with the inbox secret.
    #[serde(default)]
    pub identifier_hash: Option<String>,
}

/// Starts (or continues) a widget: the visitor, a token to log in with, the conversation.
pub async fn widget_session(core: &Core, start: WidgetStart) -> Result<Value> {
    let inbox = inbox_by_token(core, &start.inbox).await?;
    let mut secret = None;
    let (visitor_id, identifier) = match &start.user {
        Some(u) if u.identifier_hash.as_deref().is_some_and(|h| model::identifier_hash_ok(&inbox.hmac_secret, &u.id, h)) => {
            (model::verified_visitor_id(&inbox.id, &u.id), Some(u.id.clone()))
        }
        Some(_) if inbox.hmac_required => return Err(SupportError::Forbidden("identifier_hash does not match the user id".into())),
        _ => match (&start.visitor, &start.secret) {
            (Some(v), Some(s)) if anonymous_visitor_ok(core, &inbox, v, s).await? => (v.clone(), None),
            _ => {
                let s = model::random_hex(24);
                secret = Some(s);
                (format!("v-{}", model::random_hex(12)), None)
            }
        },
    };
    let name = start.user.as_ref().and_then(|u| u.name.clone());
    let email = start.user.as_ref().and_then(|u| u.email.clone());
    let visitor = Visitor {
        id: visitor_id.clone(),
        inbox: inbox.id.clone(),
        identifier,
        secret_sha256: secret.as_deref().map(model::sha256_hex),
        name: name.clone(),
        email: email.clone(),
    };
    let user = ensure_visitor_user(core, &visitor).await?;
    edit::<Visitor>(core, model::VISITOR, &visitor_id, move |current| match current {
        None => Some(visitor.clone()),
        Some(mut c) if (name.is_some() && c.name != name) || (email.is_some() && c.email != email) => {
            c.name = name.clone().or(c.name);
            c.email = email.clone().or(c.email);
            Some(c)
        }
        Some(_) => None,
    })
    .await?;
    let conversation = ensure_conversation(core, &inbox, &visitor_id).await?;
    let token = core.tokens.issue(&visitor_id, user.token_epoch, SystemTime::now());
    let position = queue_position(core, &conversation).await?;
    let mut out = json!({
        "visitor": visitor_id,
        "token": token,
        "conversation": visitor_view(&conversation, position),
        "inbox": { "name": inbox.name, "greeting": inbox.greeting, "awayMessage": inbox.away_message, "csat": inbox.csat },
        "agentsOnline": any_agent_available(core).await,
        "open": inbox.hours.as_ref().is_none_or(|h| h.is_open(now_ms())),
    });
    if let Some(s) = secret {
        out["secret"] = json!(s);
    }
    Ok(out)
}

async fn anonymous_visitor_ok(core: &Core, inbox: &Inbox, id: &str, secret: &str) -> Result<bool> {
    let Some(v) = get::<Visitor>(core, model::VISITOR, id).await? else { return Ok(false) };
    let hash = model::sha256_hex(secret);
    Ok(v.inbox == inbox.id && v.secret_sha256.as_deref().is_some_and(|h| crate::auth::constant_time_eq(h.as_bytes(), hash.as_bytes())))
}

/// The kefu user a visitor logs in as: role `visitor`, no password (tokens only).
async fn ensure_visitor_user(core: &Core, v: &Visitor) -> Result<UserRecord> {
    if let Some(u) = core.store.user(&v.id).await? {
        if u.role != "visitor" {
            return Err(SupportError::Forbidden(format!("{} is not a visitor", v.id)));
        }
        return Ok(u);
    }
    let nick = v.name.clone().or_else(|| Some("Visitor".to_string()));
    core.store.create_user(UserRecord::new(&v.id, String::new(), nick, None, "visitor"), false).await?;
    core.store
        .user(&v.id)
        .await?
        .filter(|u| u.role == "visitor")
        .ok_or_else(|| SupportError::Forbidden(format!("{} is not a visitor", v.id)))
}

async fn ensure_conversation(core: &Core, inbox: &Inbox, visitor: &str) -> Result<Conversation> {
    let id = model::conversation_id(&inbox.id, visitor);
    if !core.store.create_group(&id, Some(inbox.name.clone()), true, vec![visitor.to_string()]).await? {
        // It exists: it must be a closed group holding the visitor, as this node makes them.
        let closed = core.store.group_info(&id).await?.is_some_and(|g| g.closed);
        if !closed {
            return Err(SupportError::Forbidden(format!("group {id} exists and is not a customer-service conversation")));
        }
        core.store.set_member(&id, visitor, true).await?;
    }
    match call(core, Call::Open { inbox: inbox.id.clone(), visitor: visitor.to_string() }).await {
        Ok(record) => {
            serde_json::from_value(record).map_err(|e| SupportError::Store(StoreError::Corrupt(format!("conversation {id}: {e}"))))
        }
        // The router's node is out of reach: a new record made here can only meet another new
        // one, so the widget still starts.
        Err(SupportError::Store(_)) => open_conversation(core, &inbox.id, visitor).await,
        Err(e) => Err(e),
    }
}

/// The conversation record of (inbox, visitor), made if there is none.
async fn open_conversation(core: &Core, inbox: &str, visitor: &str) -> Result<Conversation> {
    let id = model::conversation_id(inbox, visitor);
    let fresh = Conversation {
        id: id.clone(),
        inbox: inbox.to_string(),
        visitor: visitor.to_string(),
        status: Status::New,
        assignee: None,
        team: None,
        last_agent: None,
        labels: Vec::new(),
        created_at: now_ms(),
        queued_at: 0,
        resolved_at: None,
        snoozed_until: None,
        csat: None,
        away_replied_at: None,
    };
    edit::<Conversation>(core, model::CONVERSATION, &id, move |c| c.is_none().then(|| fresh.clone())).await?;
    get(core, model::CONVERSATION, &id).await?.ok_or_else(|| SupportError::NotFound(format!("no conversation {id}")))
}

async fn any_agent_available(core: &Core) -> bool {
    list::<Agent>(core, model::AGENT, None)
        .await
        .map(|agents| agents.iter().any(|a| a.status == AgentStatus::Online && core.hub.is_online_anywhere(&a.id)))
        .unwrap_or(false)
}

/// A visitor's own conversation, for a visitor token.
pub async fn visitor_conversation(core: &Core, visitor: &str) -> Result<Value> {
    let v: Visitor = get(core, model::VISITOR, visitor).await?.ok_or_else(|| SupportError::NotFound(format!("no visitor {visitor}")))?;
    let id = model::conversation_id(&v.inbox, visitor);
    let c: Conversation =
        get(core, model::CONVERSATION, &id).await?.ok_or_else(|| SupportError::NotFound(format!("no conversation {id}")))?;
    let position = queue_position(core, &c).await?;
    let mut view = visitor_view(&c, position);
    let inbox = inbox(core, &v.inbox).await?;
    view["agentsOnline"] = json!(any_agent_available(core).await);
    view["open"] = json!(inbox.hours.as_ref().is_none_or(|h| h.is_open(now_ms())));
    Ok(view)
}

async fn queue_position(core: &Core, c: &Conversation) -> Result<Option<usize>> {
    if c.status != Status::Queued {
        return Ok(None);
    }
    let queued: Vec<Conversation> = list(core, model::CONVERSATION, Some(Status::Queued.name())).await?;
    let waiting: Vec<routing::Waiting<'_>> = queued.iter().map(|q| waiting(q, &[])).collect();
    Ok(routing::positions(&waiting).into_iter().find(|(id, _)| *id == c.id).map(|(_, p)| p))
}

/// What a visitor may see of their conversation: no notes, no labels, no team.
fn visitor_view(c: &Conversation, position: Option<usize>) -> Value {
    let mut v = json!({ "id": c.id, "status": c.status, "agent": c.assignee, "rated": c.csat.is_some() });
    if let Some(p) = position {
        v["queuePosition"] = json!(p);
    }
    v
}

/// The offline form: the visitor's name and email kept, the message sent into their conversation
/// as theirs (so it queues like any first message, and an agent sees it when one comes online).
pub async fn offline_message(core: &Core, visitor: &str, name: Option<String>, email: Option<String>, message: &str) -> Result<Value> {
    let message = message.trim();
    if message.is_empty() || message.len() > 10_000 {
        return Err(SupportError::Invalid("message: 1 to 10,000 characters".into()));
    }
    if name.as_ref().is_some_and(|n| n.len() > 200) || email.as_ref().is_some_and(|e| e.len() > 320 || !e.contains('@')) {
        return Err(SupportError::Invalid("name: at most 200 characters; email: an address".into()));
    }
    let v: Visitor = get(core, model::VISITOR, visitor).await?.ok_or_else(|| SupportError::NotFound(format!("no visitor {visitor}")))?;
    let (n, e) = (name.clone(), email.clone());
    edit::<Visitor>(core, model::VISITOR, visitor, move |c| {
        let mut c = c?;
        c.name = n.clone().or(c.name);
        c.email = e.clone().or(c.email);
        Some(c)
    })
    .await?;
    let id = model::conversation_id(&v.inbox, visitor);
    let stored = post(core, visitor, name.clone(), &id, message, false).await?;
    if let Ok(inbox) = inbox(core, &v.inbox).await {
        let data = json!({ "conversation": id, "visitor": { "id": visitor, "name": name, "email": email }, "message": message });
        webhooks::emit(core, &inbox, "visitor.offline_message", data, None).await;
    }
    Ok(json!({ "conversation": id, "message": stored }))
}

/// Sends `text` into a conversation as `from` through the dispatcher (so it is sequenced by the
/// conversation's owner like any chat). `trusted` skips the membership check, for the inbox's own
/// replies. Returns the success reply's data (id, seq).
async fn post(core: &Core, from: &str, nick: Option<String>, conversation: &str, text: &str, trusted: bool) -> Result<Value> {
    let sender = crate::dispatch::Sender { id: from, nick, avatar: None, in_hub: false, conn: None };
    let chat = jim::ChatReq {
        client_id: None,
        from: None,
        target: jim::Target::Group(conversation.to_string()),
        msg_type: 0,
        content: text.to_string(),
        extras: None,
    };
    let reply = if trusted {
        match core.prepare_chat(&sender, chat, Some(true)) {
            Ok(pending) => pending.await,
            Err(reply) => reply,
        }
    } else {
        core.send_chat(&sender, chat).await
    };
    let reply: Value = serde_json::from_slice(&reply).unwrap_or_default();
    if reply["code"] != 10000 {
        return Err(SupportError::Store(StoreError::Corrupt(format!("the message was not stored: {reply}"))));
    }
    Ok(reply["data"].clone())
}

/// Queues a webhook event about a conversation for its inbox's URLs.
async fn event(core: &Core, c: &Conversation, name: &str, data: Value) {
    event_keyed(core, c, name, data, None).await;
}

/// [`event`] with a key that makes the same event the same delivery (see [`webhooks::emit`]).
async fn event_keyed(core: &Core, c: &Conversation, name: &str, mut data: Value, key: Option<&str>) {
    let Ok(inbox) = inbox(core, &c.inbox).await else { return };
    if inbox.webhooks.is_empty() {
        return;
    }
    if let Ok(view) = agent_view(core, c).await {
        data["conversation"] = view;
    }
    webhooks::emit(core, &inbox, name, data, key).await;
}

async fn do_rate(core: &Core, visitor: &str, rating: u8, comment: Option<String>) -> Result<Conversation> {
    if !(1..=5).contains(&rating) {
        return Err(SupportError::Invalid("rating: 1 to 5".into()));
    }
    let v: Visitor = get(core, model::VISITOR, visitor).await?.ok_or_else(|| SupportError::NotFound(format!("no visitor {visitor}")))?;
    let id = model::conversation_id(&v.inbox, visitor);
    let written = update(core, &id, move |c| {
        if c.status != Status::Resolved || c.csat.is_some() {
            return false;
        }
        c.csat = Some(model::Csat { rating, comment: comment.clone(), at: now_ms() });
        true
    })
    .await?;
    let c = written.ok_or_else(|| SupportError::Invalid("only a resolved conversation is rated, and only once".into()))?;
    event(core, &c, "csat.submitted", json!({ "rating": rating, "comment": c.csat.as_ref().and_then(|x| x.comment.clone()) })).await;
    Ok(c)
}

// -- agents' actions ------------------------------------------------------------------------

/// Conversations, newest first, filtered by status, inbox and assignee, at most `limit`.
pub async fn conversations(
    core: &Core,
    status: Option<Status>,
    inbox: Option<&str>,
    assignee: Option<&str>,
    limit: usize,
) -> Result<Vec<Value>> {
    let mut out: Vec<Conversation> = Vec::new();
    for s in status.map_or(Status::ALL.to_vec(), |s| vec![s]) {
        out.extend(list::<Conversation>(core, model::CONVERSATION, Some(s.name())).await?);
    }
    out.retain(|c| inbox.is_none_or(|i| c.inbox == i) && assignee.is_none_or(|a| c.assignee.as_deref() == Some(a)));
    out.sort_by_key(|c| std::cmp::Reverse(c.queued_at.max(c.created_at)));
    out.truncate(limit);
    let mut views = Vec::with_capacity(out.len());
    for c in &out {
        views.push(agent_view(core, c).await?);
    }
    Ok(views)
}

/// One conversation with its visitor, messages and events (notes and activity).
pub async fn conversation(core: &Core, id: &str) -> Result<Value> {
    let c: Conversation =
        get(core, model::CONVERSATION, id).await?.ok_or_else(|| SupportError::NotFound(format!("no conversation {id}")))?;
    let mut view = agent_view(core, &c).await?;
    let mut events: Vec<Event> = list(core, model::EVENT, Some(id)).await?;
    events.sort_by_key(|e| e.at);
    let messages = core.store.history(&ConversationId::group(id), None, None, 0, 200).await?;
    view["events"] = json!(events);
    view["messages"] = json!(messages.iter().map(StoredMessage::to_chat_body).collect::<Vec<_>>());
    Ok(view)
}

async fn agent_view(core: &Core, c: &Conversation) -> Result<Value> {
    let visitor: Option<Visitor> = get(core, model::VISITOR, &c.visitor).await?;
    let mut v = serde_json::to_value(c).unwrap_or_default();
    v["visitorName"] = json!(visitor.as_ref().and_then(|v| v.name.clone()));
    v["visitorEmail"] = json!(visitor.as_ref().and_then(|v| v.email.clone()));
    v["verified"] = json!(visitor.as_ref().is_some_and(|v| v.identifier.is_some()));
    Ok(v)
}

/// Where a transfer goes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    /// To this agent.
    #[serde(default)]
    pub agent: Option<String>,
    /// Or back to the queue for this team.
    #[serde(default)]
    pub team: Option<String>,
    /// A note for the agents (never shown to the visitor).
    #[serde(default)]
    pub note: Option<String>,
}

async fn do_transfer(core: &Core, id: &str, by: &str, to: Transfer) -> Result<Value> {
    let before: Conversation =
        get(core, model::CONVERSATION, id).await?.ok_or_else(|| SupportError::NotFound(format!("no conversation {id}")))?;
    let line = match (&to.agent, &to.team) {
        (Some(agent), None) => {
            let known: Option<Agent> = get(core, model::AGENT, agent).await?;
            if known.is_none() {
                return Err(SupportError::NotFound(format!("no agent {agent}")));
            }
            format!("transferred to {agent} by {by}")
        }
        (None, Some(team)) => {
            let agents: Vec<Agent> = list(core, model::AGENT, None).await?;
            if !agents.iter().any(|a| a.teams.iter().any(|t| t == team)) {
                return Err(SupportError::NotFound(format!("no agent is in team {team}")));
            }
            format!("transferred to team {team} by {by}")
        }
        _ => return Err(SupportError::Invalid("give one of agent or team".into())),
    };
    let mut added = false;
    if let Some(new) = &to.agent {
        // A member first, so that nothing the visitor writes once it is theirs misses them.
        added = core.store.set_member(id, new, true).await?;
    }
    let (agent, team) = (to.agent.clone(), to.team.clone());
    let after = update(core, id, move |c| {
        if c.status == Status::Resolved {
            return false;
        }
        c.last_agent = c.assignee.take().or(c.last_agent.take());
        match (&agent, &team) {
            (Some(a), _) => {
                c.status = Status::Open;
                c.assignee = Some(a.clone());
                c.team = None;
            }
            (None, t) => {
                c.status = Status::Queued;
                c.team = t.clone();
                c.queued_at = now_ms();
                // Not back to the agent who passed it on.
                c.last_agent = None;
            }
        }
        true
    })
    .await?;
    let Some(after) = after else {
        if let (true, Some(new)) = (added, &to.agent) {
            drop_member_unless_assigned(core, id, new).await?;
        }
        return Err(SupportError::Invalid(format!("{id} is resolved")));
    };
    if let Some(old) = before.assignee.as_deref().filter(|old| after.assignee.as_deref() != Some(*old)) {
        drop_member_unless_assigned(core, id, old).await?;
    }
    if let Some(note) = to.note.filter(|n| !n.trim().is_empty()) {
        add_event(core, id, "note", Some(by), note).await?;
    }
    add_event(core, id, "activity", Some(by), line).await?;
    if let Some(agent) = &after.assignee {
        event(core, &after, "conversation.assigned", json!({ "agent": agent, "by": by })).await;
    }
    agent_view(core, &after).await
}

/// Takes `agent` out of a conversation's group unless, as the record stands now, it is theirs
/// (a transfer back to them may have landed meanwhile).
async fn drop_member_unless_assigned(core: &Core, id: &str, agent: &str) -> Result<()> {
    let now: Option<Conversation> = get(core, model::CONVERSATION, id).await?;
    if now.is_some_and(|c| c.assignee.as_deref() == Some(agent)) {
        return Ok(());
    }
    core.leave_group(id, agent, None).await?;
    Ok(())
}

/// Assigns a conversation to an agent (an admin's or the API's choice, past the agent's limit).
pub async fn assign(core: &Core, id: &str, by: &str, agent: &str) -> Result<Value> {
    transfer(core, id, by, Transfer { agent: Some(agent.to_string()), team: None, note: None }).await
}

/// Hands a conversation to another agent, or to a team's queue, with an optional note.
pub async fn transfer(core: &Core, id: &str, by: &str, to: Transfer) -> Result<Value> {
    call(core, Call::Transfer { id: id.to_string(), by: by.to_string(), to }).await
}

/// Resolves a conversation: its agent's capacity frees, the visitor is asked for a rating.
pub async fn resolve(core: &Core, id: &str, by: &str) -> Result<Value> {
    call(core, Call::Resolve { id: id.to_string(), by: by.to_string() }).await
}

/// Snoozes a conversation until `until` (epoch ms) or the visitor's next message.
pub async fn snooze(core: &Core, id: &str, by: &str, until: Option<i64>) -> Result<Value> {
    call(core, Call::Snooze { id: id.to_string(), by: by.to_string(), until }).await
}

/// Replaces a conversation's labels.
pub async fn set_labels(core: &Core, id: &str, labels: Vec<String>) -> Result<Value> {
    call(core, Call::Labels { id: id.to_string(), labels }).await
}

/// Records the visitor's rating of a resolved conversation, once; returns the conversation.
pub async fn rate(core: &Core, visitor: &str, rating: u8, comment: Option<String>) -> Result<Value> {
    call(core, Call::Rate { visitor: visitor.to_string(), rating, comment }).await
}

/// Makes a user with role `agent` or `admin` a customer-service agent, or changes their settings.
pub async fn set_agent(core: &Core, id: &str, patch: AgentPatch) -> Result<Value> {
    call(core, Call::SetAgent { id: id.to_string(), patch }).await
}

/// A change to conversations or agents. Records are last-writer-wins between nodes, so two nodes
/// editing one conversation at once would lose an edit: every change is made by the node that
/// runs the router (the owner of [`ROUTING_KEY`]), where each edit reads and writes the current
/// record in one step of that node's writer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "snake_case")]
pub enum Call {
    /// See [`transfer`].
    Transfer {
        /// Conversation.
        id: String,
        /// Who asks.
        by: String,
        /// Where to.
        to: Transfer,
    },
    /// See [`resolve`].
    Resolve {
        /// Conversation.
        id: String,
        /// Who asks.
        by: String,
    },
    /// See [`snooze`].
    Snooze {
        /// Conversation.
        id: String,
        /// Who asks.
        by: String,
        /// Until, epoch ms.
        until: Option<i64>,
    },
    /// See [`set_labels`].
    Labels {
        /// Conversation.
        id: String,
        /// The labels.
        labels: Vec<String>,
    },
    /// See [`rate`].
    Rate {
        /// The visitor.
        visitor: String,
        /// 1 to 5.
        rating: u8,
        /// Optional comment.
        comment: Option<String>,
    },
    /// See [`set_agent`].
    SetAgent {
        /// The agent.
        id: String,
        /// The changes.
        patch: AgentPatch,
    },
    /// Makes the conversation record of (inbox, visitor) unless there is one.
    Open {
        /// Inbox id.
        inbox: String,
        /// Visitor id.
        visitor: String,
    },
    /// A message was committed in a conversation (at its owner): queue, reopen, webhook.
    Message {
        /// The message.
        message: StoredMessage,
    },
}

/// Carries out `c` here if this node runs the router, else at the node that does.
async fn call(core: &Core, c: Call) -> Result<Value> {
    let key = ConversationId::group(ROUTING_KEY);
    if core.cluster.owns(&key) {
        return execute(core, c).await;
    }
    let json = serde_json::to_value(&c).map_err(|e| SupportError::Invalid(e.to_string()))?;
    core.cluster.call_owner(&key, json).await.map_err(|(status, reason)| SupportError::from_status(status, reason))
}

async fn execute(core: &Core, c: Call) -> Result<Value> {
    let value = |v: std::result::Result<Value, serde_json::Error>| v.map_err(|e| SupportError::Invalid(e.to_string()));
    match c {
        Call::Transfer { id, by, to } => do_transfer(core, &id, &by, to).await,
        Call::Resolve { id, by } => do_resolve(core, &id, &by).await,
        Call::Snooze { id, by, until } => do_snooze(core, &id, &by, until).await,
        Call::Labels { id, labels } => do_set_labels(core, &id, labels).await,
        Call::Rate { visitor, rating, comment } => value(serde_json::to_value(do_rate(core, &visitor, rating, comment).await?)),
        Call::SetAgent { id, patch } => value(serde_json::to_value(do_set_agent(core, &id, patch).await?)),
        Call::Open { inbox, visitor } => value(serde_json::to_value(open_conversation(core, &inbox, &visitor).await?)),
        Call::Message { message } => on_message(core, &message).await.map(|()| Value::Null),
    }
}

/// A remote call's answer for the wire.
async fn answer_remote(core: &Core, call: Value) -> crate::cluster::CallResult {
    let c: Call = serde_json::from_value(call).map_err(|e| (400, format!("not a call: {e}")))?;
    execute(core, c).await.map_err(|e| (e.status(), e.to_string()))
}

async fn do_resolve(core: &Core, id: &str, by: &str) -> Result<Value> {
    let after = update(core, id, move |c| {
        if c.status == Status::Resolved {
            return false;
        }
        c.status = Status::Resolved;
        c.resolved_at = Some(now_ms());
        c.last_agent = c.assignee.take().or(c.last_agent.take());
        c.team = None;
        true
    })
    .await?;
    let Some(after) = after else { return Err(SupportError::Invalid(format!("{id} is resolved already, or unknown"))) };
    add_event(core, id, "activity", Some(by), format!("resolved by {by}")).await?;
    event(core, &after, "conversation.resolved", json!({ "by": by })).await;
    agent_view(core, &after).await
}

async fn do_snooze(core: &Core, id: &str, by: &str, until: Option<i64>) -> Result<Value> {
    let after = update(core, id, move |c| {
        if c.status != Status::Open {
            return false;
        }
        c.status = Status::Snoozed;
        c.snoozed_until = until;
        true
    })
    .await?
    .ok_or_else(|| SupportError::Invalid(format!("only an open conversation is snoozed; {id} is not")))?;
    add_event(core, id, "activity", Some(by), format!("snoozed by {by}")).await?;
    agent_view(core, &after).await
}

/// Adds an internal note.
pub async fn note(core: &Core, id: &str, by: &str, text: &str) -> Result<Event> {
    let text = text.trim();
    if text.is_empty() || text.len() > 10_000 {
        return Err(SupportError::Invalid("note: 1 to 10,000 characters".into()));
    }
    if get::<Conversation>(core, model::CONVERSATION, id).await?.is_none() {
        return Err(SupportError::NotFound(format!("no conversation {id}")));
    }
    add_event(core, id, "note", Some(by), text.to_string()).await
}

async fn do_set_labels(core: &Core, id: &str, labels: Vec<String>) -> Result<Value> {
    if labels.len() > 50 || labels.iter().any(|l| l.is_empty() || l.len() > 64) {
        return Err(SupportError::Invalid("labels: at most 50, each 1 to 64 characters".into()));
    }
    let after = update(core, id, move |c| {
        if c.labels == labels {
            return false;
        }
        c.labels = labels.clone();
        true
    })
    .await?;
    match after {
        Some(c) => agent_view(core, &c).await,
        None => conversation(core, id).await,
    }
}

/// The canned replies, by code.
pub async fn canned(core: &Core) -> Result<Vec<Canned>> {
    Ok(list::<Canned>(core, model::CANNED, None).await?.into_iter().filter(|c| !c.removed).collect())
}

/// Sets (or, with `None`, removes) a canned reply.
pub async fn set_canned(core: &Core, code: &str, text: Option<String>) -> Result<Value> {
    let valid = !code.is_empty() && code.len() <= 32 && code.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(SupportError::Invalid("code: 1 to 32 letters, digits, - or _".into()));
    }
    if text.as_ref().is_some_and(|t| t.trim().is_empty() || t.len() > 5000) {
        return Err(SupportError::Invalid("text: 1 to 5,000 characters".into()));
    }
    let next = Canned { code: code.to_string(), text: text.clone().unwrap_or_default(), removed: text.is_none() };
    let n = next.clone();
    edit::<Canned>(core, model::CANNED, code, move |c| (c.as_ref() != Some(&n)).then(|| n.clone())).await?;
    Ok(json!(next))
}

// -- pushes ---------------------------------------------------------------------------------

fn support_push(data: &Value) -> Arc<Push> {
    Arc::new(Push { command: Command::SupportEvent.code(), body: jim::push(Command::SupportEvent, data).into(), delivery: None })
}

async fn push_to_agents(core: &Core, data: &Value) {
    let push = support_push(data);
    for agent in agent_ids(core).await {
        core.push_everywhere(RelayTarget::User(agent), &push, None);
    }
}

/// Tells the visitor (their view) and every agent (the full view) that a conversation changed.
async fn announce(core: &Core, c: &Conversation, position: Option<usize>) {
    let visitor = support_push(&json!({ "conversation": visitor_view(c, position) }));
    core.push_everywhere(RelayTarget::User(c.visitor.clone()), &visitor, None);
    match agent_view(core, c).await {
        Ok(view) => push_to_agents(core, &json!({ "conversation": view })).await,
        Err(e) => tracing::warn!(error = %e, "reading a conversation for the agents failed"),
    }
}

// -- the router -----------------------------------------------------------------------------

/// A queued conversation for the router; `inboxes` gives its inbox's agents.
fn waiting<'a>(c: &'a Conversation, inboxes: &'a [Inbox]) -> routing::Waiting<'a> {
    let agents = inboxes.iter().find(|i| i.id == c.inbox).map_or(&[][..], |i| &i.agents[..]);
    routing::Waiting {
        id: &c.id,
        inbox: &c.inbox,
        agents,
        queued_at: c.queued_at,
        team: c.team.as_deref(),
        prefer: c.last_agent.as_deref(),
    }
}

/// Runs the router until shutdown; `calls` are other nodes' changes for this one to make.
pub async fn run(core: Arc<Core>, mut calls: mpsc::Receiver<crate::cluster::RemoteCall>, shutdown: tokio_util::sync::CancellationToken) {
    let mut state = RouterState::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Its first tick is now: what a crash left unhandled goes first.
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some((c, reply)) = calls.recv() => {
                // Another node's change, made here in order with the router's own.
                drop(reply.send(answer_remote(&core, c).await));
                continue;
            }
            // Messages first; the changes they make wake the router for one pass after them.
            _ = core.support.pending.notified() => {
                handle_pending(&core).await;
                continue;
            }
            _ = retry.tick() => {
                handle_pending(&core).await;
                continue;
            }
            _ = core.support.wake.notified() => {}
            _ = tick.tick() => {}
        }
        if core.cluster.owns(&ConversationId::group(ROUTING_KEY)) {
            if let Err(e) = route(&core, &mut state).await {
                tracing::warn!(error = %e, "routing failed");
            }
        }
    }
}

/// Handles the messages waiting in `support_pending`, oldest first; one that fails stays there
/// for the next round.
async fn handle_pending(core: &Core) {
    match core.store.support_pending(PENDING_BATCH).await {
        Ok(left) => {
            for m in left {
                handle(core, &m).await;
            }
        }
        Err(e) => tracing::warn!(error = %e, "reading unhandled customer-service messages failed"),
    }
}

/// Handles a message and marks it handled; one that fails stays for the retry.
async fn handle(core: &Core, m: &StoredMessage) {
    match call(core, Call::Message { message: m.clone() }).await {
        Ok(_) => {
            if let Err(e) = core.store.local(crate::store::LocalOp::Handled(m.conversation.clone(), m.seq)).await {
                tracing::warn!(error = %e, "marking a customer-service message handled failed");
            }
        }
        Err(e) => tracing::warn!(error = %e, "customer-service message hook failed"),
    }
}

/// What the router remembers between passes.
#[derive(Default)]
struct RouterState {
    /// Since when each assignee has been offline (epoch ms).
    offline_since: HashMap<String, i64>,
    /// The queue position each visitor was last told.
    told: HashMap<String, usize>,
}

/// A message in a conversation (at its owner, once): the webhook; and when the visitor wrote, a
/// new conversation joins the queue, a resolved or snoozed one reopens, and outside business
/// hours or with nobody online the out-of-office reply goes out (at most once a day).
async fn on_message(core: &Core, m: &StoredMessage) -> Result<()> {
    let Some(group) = m.group_id.as_deref() else { return Ok(()) };
    // Not here yet (its record is still on its way from the node that made it): try again later.
    let Some(c) = get::<Conversation>(core, model::CONVERSATION, group).await? else {
        return Err(SupportError::NotFound(format!("no conversation record for {group} yet")));
    };
    let message = m.to_chat_body();
    // Keyed by the message: handling it again (after a crash) queues the same delivery again,
    // which the outbox keeps once.
    let key = format!("message.created/{}/{}", m.conversation.as_str(), m.seq);
    event_keyed(core, &c, "message.created", json!({ "message": message, "fromVisitor": m.sender == c.visitor }), Some(&key)).await;
    if m.sender != c.visitor {
        return Ok(());
    }
    let before = c.status;
    let after = update(core, group, |c| match c.status {
        Status::New | Status::Resolved => {
            c.status = Status::Queued;
            c.queued_at = now_ms();
            c.resolved_at = None;
            c.csat = None;
            true
        }
        Status::Snoozed => {
            c.status = Status::Open;
            c.snoozed_until = None;
            true
        }
        Status::Queued | Status::Open => false,
    })
    .await?;
    if let (Status::New, Some(c)) = (before, &after) {
        event(core, c, "conversation.created", json!({})).await;
    }
    away_reply(core, &c).await
}

/// Tells the visitor nobody is there, if so, at most once a day per conversation.
async fn away_reply(core: &Core, c: &Conversation) -> Result<()> {
    const DAY_MS: i64 = 24 * 3600 * 1000;
    let inbox = inbox(core, &c.inbox).await?;
    let now = now_ms();
    let open = inbox.hours.as_ref().is_none_or(|h| h.is_open(now));
    if open && any_agent_available(core).await {
        return Ok(());
    }
    if c.away_replied_at.is_some_and(|t| now - t < DAY_MS) {
        return Ok(());
    }
    let marked = update(core, &c.id, move |c| {
        if c.away_replied_at.is_some_and(|t| now - t < DAY_MS) {
            return false;
        }
        c.away_replied_at = Some(now);
        true
    })
    .await?;
    if marked.is_some() {
        let text =
            inbox.away_message.clone().unwrap_or_else(|| "We are away right now; we will answer here as soon as we are back.".into());
        post(core, &inbox.id, Some(inbox.name.clone()), &c.id, &text, true).await?;
    }
    Ok(())
}

/// One pass: snoozes that are due, assignees gone too long, then the queue.
async fn route(core: &Core, state: &mut RouterState) -> Result<()> {
    let now = now_ms();
    let agents: Vec<Agent> = list(core, model::AGENT, None).await?;
    for c in list::<Conversation>(core, model::CONVERSATION, Some(Status::Snoozed.name())).await? {
        if c.snoozed_until.is_some_and(|t| t <= now) {
            update(core, &c.id, |c| {
                let due = c.status == Status::Snoozed;
                if due {
                    c.status = Status::Open;
                    c.snoozed_until = None;
                }
                due
            })
            .await?;
        }
    }
    let open: Vec<Conversation> = list(core, model::CONVERSATION, Some(Status::Open.name())).await?;
    state.offline_since.retain(|a, _| !core.hub.is_online_anywhere(a));
    let grace = i64::try_from(core.support.grace.as_millis()).unwrap_or(i64::MAX);
    for c in &open {
        let Some(a) = c.assignee.as_deref() else { continue };
        if core.hub.is_online_anywhere(a) {
            continue;
        }
        let since = *state.offline_since.entry(a.to_string()).or_insert(now);
        if routing::gone_too_long(since, now, grace) {
            let agent = a.to_string();
            let moved = update(core, &c.id, move |c| {
                if c.status != Status::Open || c.assignee.as_deref() != Some(&agent) {
                    return false;
                }
                c.status = Status::Queued;
                c.last_agent = c.assignee.take();
                true
            })
            .await?;
            if moved.is_some() {
                drop_member_unless_assigned(core, &c.id, a).await?;
                add_event(core, &c.id, "activity", None, format!("{a} went offline; back in the queue")).await?;
            }
        }
    }
    // A snoozed conversation comes back to its agent: it counts toward their load.
    let mut open: Vec<Conversation> = list(core, model::CONVERSATION, Some(Status::Open.name())).await?;
    open.extend(list::<Conversation>(core, model::CONVERSATION, Some(Status::Snoozed.name())).await?);
    let queued: Vec<Conversation> = list(core, model::CONVERSATION, Some(Status::Queued.name())).await?;
    let seats: Vec<routing::Seat<'_>> = agents
        .iter()
        .map(|a| routing::Seat {
            id: &a.id,
            available: a.status == AgentStatus::Online && core.hub.is_online_anywhere(&a.id),
            open: u32::try_from(open.iter().filter(|c| c.assignee.as_deref() == Some(a.id.as_str())).count()).unwrap_or(u32::MAX),
            limit: a.limit,
            last_assigned_at: a.last_assigned_at,
            teams: &a.teams,
        })
        .collect();
    let all_inboxes = inboxes(core).await?;
    let waiting: Vec<routing::Waiting<'_>> = queued.iter().map(|c| waiting(c, &all_inboxes)).collect();
    let plan = routing::plan(&waiting, &seats, now);
    for (conversation, agent) in &plan {
        // A member first, so that nothing the visitor writes once it is assigned misses them.
        let added = core.store.set_member(conversation, agent, true).await?;
        let who = agent.to_string();
        let assigned = update(core, conversation, move |c| {
            if c.status != Status::Queued {
                return false;
            }
            c.status = Status::Open;
            c.assignee = Some(who.clone());
            c.team = None;
            true
        })
        .await?;
        let Some(assigned) = assigned else {
            if added {
                drop_member_unless_assigned(core, conversation, agent).await?;
            }
            continue;
        };
        // The agent it had before (a reopened or requeued conversation) is no longer in it.
        if let Some(before) = assigned.last_agent.as_deref().filter(|b| *b != *agent) {
            drop_member_unless_assigned(core, conversation, before).await?;
        }
        let who = agent.to_string();
        edit::<Agent>(core, model::AGENT, agent, move |a| {
            let mut a = a.unwrap_or_else(|| Agent::new(&who));
            a.last_assigned_at = now;
            Some(a)
        })
        .await?;
        add_event(core, conversation, "activity", None, format!("assigned to {agent}")).await?;
        event(core, &assigned, "conversation.assigned", json!({ "agent": agent })).await;
    }
    // The rest of the queue learns where it stands.
    let still: Vec<routing::Waiting<'_>> = waiting.iter().filter(|w| !plan.iter().any(|(c, _)| *c == w.id)).cloned().collect();
    let positions = routing::positions(&still);
    state.told.retain(|id, _| positions.iter().any(|(c, _)| c == id));
    for (id, position) in positions {
        if state.told.get(id) == Some(&position) {
            continue;
        }
        if let Some(c) = queued.iter().find(|c| c.id == id) {
            let push = support_push(&json!({ "conversation": visitor_view(c, Some(position)) }));
            core.push_everywhere(RelayTarget::User(c.visitor.clone()), &push, None);
            state.told.insert(id.to_string(), position);
        }
    }
    Ok(())
}

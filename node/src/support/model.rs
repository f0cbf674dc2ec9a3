//! The customer-service model: inboxes, visitors, agents, conversations and their events, as
//! typed values over the store's records (`schema::message::Record`: kind, id, scope, JSON body).
//! No I/O here; `support/mod.rs` reads and writes them through the store.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Record kinds.
pub const INBOX: &str = "inbox";
/// A visitor (the kefu user a widget logs in as).
pub const VISITOR: &str = "visitor";
/// An agent's settings (limit, status, teams).
pub const AGENT: &str = "agent";
/// A conversation; its scope is its status, so the router reads only the live ones.
pub const CONVERSATION: &str = "conversation";
/// A note or an activity line of a conversation (scope: the conversation).
pub const EVENT: &str = "event";
/// A canned reply (id: its short code).
pub const CANNED: &str = "canned";

/// A website or app whose visitors chat with the agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inbox {
    /// Id.
    pub id: String,
    /// Shown to visitors.
    pub name: String,
    /// Public: the widget's `data-inbox`.
    pub website_token: String,
    /// Secret: the key of `identifier_hash`.
    pub hmac_secret: String,
    /// Refuse `setUser` without a valid `identifier_hash`.
    #[serde(default)]
    pub hmac_required: bool,
    /// The first line a visitor sees.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub greeting: Option<String>,
    /// Shown when no agent is available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub away_message: Option<String>,
    /// Ask for a rating after resolution.
    #[serde(default = "yes")]
    pub csat: bool,
    /// When agents are there; none: always.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hours: Option<super::hours::Hours>,
    /// Where events are posted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<String>,
    /// Signs the webhook posts.
    #[serde(default)]
    pub webhook_secret: String,
    /// The agents who take its conversations; empty: every agent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agents: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Someone on the inbox's site: anonymous (an id and a secret the widget keeps) or verified (the
/// host site's user id, proven by `identifier_hash`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Visitor {
    /// The kefu user id (`v-…`).
    pub id: String,
    /// The inbox.
    pub inbox: String,
    /// The host site's user id, for a verified visitor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifier: Option<String>,
    /// SHA-256 (hex) of an anonymous visitor's secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sha256: Option<String>,
    /// Name the visitor or the host site gave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Email the visitor or the host site gave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// An agent's customer-service settings (the kefu user's role says they are an agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    /// The kefu user id.
    pub id: String,
    /// Concurrent open conversations at most.
    pub limit: u32,
    /// `online` (takes conversations while a console is open) or `busy` (keeps theirs, takes none).
    pub status: AgentStatus,
    /// Teams the agent is in.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub teams: Vec<String>,
    /// When the agent was last given a conversation (epoch ms): ties go to the one idle longest.
    #[serde(default)]
    pub last_assigned_at: i64,
}

/// Default concurrent-conversation limit of an agent.
pub const DEFAULT_LIMIT: u32 = 3;

impl Agent {
    /// An agent with the default settings.
    pub fn new(id: &str) -> Agent {
        Agent { id: id.to_string(), limit: DEFAULT_LIMIT, status: AgentStatus::Online, teams: Vec::new(), last_assigned_at: 0 }
    }
}

/// What the agent chose; `offline` is whenever no session of theirs is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    /// Takes new conversations.
    Online,
    /// Keeps the open ones, takes no new ones.
    Busy,
}

/// Where a conversation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The widget opened it; the visitor has not written yet (not routed).
    New,
    /// Waiting for an agent.
    Queued,
    /// Assigned.
    Open,
    /// Done; a visitor message reopens it.
    Resolved,
    /// Put aside until a time or the next visitor message.
    Snoozed,
}

impl Status {
    /// The record scope.
    pub fn name(self) -> &'static str {
        match self {
            Status::New => "new",
            Status::Queued => "queued",
            Status::Open => "open",
            Status::Resolved => "resolved",
            Status::Snoozed => "snoozed",
        }
    }

    /// Every status, for listing all.
    pub const ALL: [Status; 5] = [Status::New, Status::Queued, Status::Open, Status::Resolved, Status::Snoozed];
}

/// A rating after resolution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Csat {
    /// 1 to 5.
    pub rating: u8,
    /// Optional comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// When, epoch ms.
    pub at: i64,
}

/// A visitor's conversation with the inbox: a closed group of the same id holding the visitor
/// and the agents assigned. One per (inbox, visitor), reopened by the visitor's next message, so
/// the visitor keeps one history on every device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conversation {
    /// Id, also the group id (`cs-…`).
    pub id: String,
    /// The inbox.
    pub inbox: String,
    /// The visitor.
    pub visitor: String,
    /// Where it stands.
    pub status: Status,
    /// The agent it is assigned to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignee: Option<String>,
    /// The team it was transferred to (only its agents take it from the queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// The last agent it was assigned to (a reopened conversation goes back to them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_agent: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// When it was created, epoch ms.
    pub created_at: i64,
    /// When it (last) joined the queue: the queue's order.
    #[serde(default)]
    pub queued_at: i64,
    /// When it was last resolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_at: Option<i64>,
    /// A snoozed conversation comes back to its agent at this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snoozed_until: Option<i64>,
    /// The visitor's rating, once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csat: Option<Csat>,
    /// When the out-of-office reply was last sent (at most once a day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub away_replied_at: Option<i64>,
}

/// A note (agents only; never sent to the visitor) or an activity line (assigned, transferred,
/// resolved …) of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Id.
    pub id: String,
    /// The conversation.
    pub conversation: String,
    /// `note` or `activity`.
    pub kind: String,
    /// Who wrote it (an agent), or who caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The text.
    pub text: String,
    /// When, epoch ms.
    pub at: i64,
}

/// A canned reply: `/code` in the console's reply box offers its text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Canned {
    /// Short code.
    pub code: String,
    /// The reply.
    pub text: String,
    /// A removed reply stays as a tombstone so that the removal replicates.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
}

/// The conversation of a visitor with an inbox: the same id on every node and device.
pub fn conversation_id(inbox: &str, visitor: &str) -> String {
    format!("{}{}", schema::conversation::SUPPORT_GROUP_PREFIX, short_hash(&[inbox, visitor]))
}

/// The visitor id of a verified host-site user: the same on every node and device.
pub fn verified_visitor_id(inbox: &str, identifier: &str) -> String {
    format!("v-{}", short_hash(&[inbox, identifier]))
}

fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    hex(&h.finalize()[..12])
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random id or secret: `bytes` random bytes in hex.
pub fn random_hex(bytes: usize) -> String {
    hex(&(0..bytes).map(|_| rand::random::<u8>()).collect::<Vec<_>>())
}

/// SHA-256 in hex (of a random secret: no slow hash needed).
pub fn sha256_hex(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// Whether `hash` is the hex HMAC-SHA256 of `identifier` keyed with `secret` (constant time).
pub fn identifier_hash_ok(secret: &str, identifier: &str, hash: &str) -> bool {
    use hmac::{Hmac, Mac};
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
    mac.update(identifier.as_bytes());
    let Some(given) = unhex(hash) else { return false };
    mac.verify_slice(&given).is_ok()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn identifier_hash_is_the_hex_hmac_of_the_id() {
        // HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog"), a published vector.
        let hash = "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8";
        assert!(identifier_hash_ok("key", "The quick brown fox jumps over the lazy dog", hash));
        assert!(identifier_hash_ok("key", "The quick brown fox jumps over the lazy dog", &hash.to_uppercase()));
        assert!(!identifier_hash_ok("key", "The quick brown fox jumps over the lazy cat", hash));
        assert!(!identifier_hash_ok("key", "x", "zz"));
        assert!(!identifier_hash_ok("key", "x", "abc"));
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(conversation_id("i1", "v-1"), conversation_id("i1", "v-1"));
        assert_ne!(conversation_id("i1", "v-1"), conversation_id("i2", "v-1"));
        assert_ne!(verified_visitor_id("i1", "ab"), verified_visitor_id("i1a", "b"));
        assert_eq!(conversation_id("i", "v").len(), 27);
        assert!(schema::jim::valid_id(&conversation_id("i", "v")));
    }
}

//! Stored messages and users as one node hands them to another: the rows the store keeps and the
//! mesh replicates. Field names are short on purpose only where the JSON is on the mesh's hot path.

use serde::{Deserialize, Serialize};

use crate::jim::ChatBody;
use crate::ConversationId;

/// A message to append: what a sender asked for, before the owner gives it an id and a seq.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewMessage {
    /// The conversation.
    pub conversation: ConversationId,
    /// The sender's idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The authenticated sender.
    pub sender: String,
    /// Recipient of a private message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// Group of a group message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// 1 group, 2 private.
    pub chat_type: u8,
    /// J-IM msgType.
    pub msg_type: i64,
    /// Content.
    pub content: String,
    /// Extras, as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extras: Option<String>,
    /// Sender's nick at send time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nick: Option<String>,
    /// Sender's avatar at send time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
}

/// A committed message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The conversation.
    pub conversation: ConversationId,
    /// Position in the conversation.
    pub seq: u64,
    /// Server id (UUIDv7, 32 hex).
    pub id: String,
    /// Sender's idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Sender.
    pub sender: String,
    /// Private recipient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipient: Option<String>,
    /// Group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// 1 group, 2 private.
    pub chat_type: u8,
    /// J-IM msgType.
    pub msg_type: i64,
    /// Content.
    pub content: String,
    /// Extras as JSON text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extras: Option<String>,
    /// Sender's nick.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nick: Option<String>,
    /// Sender's avatar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// Commit time, epoch ms.
    pub created_at: i64,
    /// The node that sequenced it.
    pub origin: String,
    /// When it was recalled, epoch ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recalled_at: Option<i64>,
}

impl StoredMessage {
    /// The message `new` becomes once the owner has sequenced it.
    pub fn sequenced(new: &NewMessage, seq: u64, id: String, created_at: i64, origin: &str) -> StoredMessage {
        StoredMessage {
            conversation: new.conversation.clone(),
            seq,
            id,
            client_id: new.client_id.clone(),
            sender: new.sender.clone(),
            recipient: new.recipient.clone(),
            group_id: new.group_id.clone(),
            chat_type: new.chat_type,
            msg_type: new.msg_type,
            content: new.content.clone(),
            extras: new.extras.clone(),
            nick: new.nick.clone(),
            avatar: new.avatar.clone(),
            created_at,
            origin: origin.to_string(),
            recalled_at: None,
        }
    }

    /// The J-IM view; a recalled message has its content removed.
    pub fn to_chat_body(&self) -> ChatBody {
        let recalled = self.recalled_at.is_some();
        ChatBody {
            avatar: self.avatar.clone(),
            chat_type: self.chat_type,
            client_id: self.client_id.clone(),
            cmd: crate::Command::ChatReq.code(),
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRecord {
    /// Id.
    pub user_id: String,
    /// argon2id PHC string.
    pub password_hash: String,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nick: Option<String>,
    /// Avatar URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar: Option<String>,
    /// "user", "agent" or "admin".
    pub role: String,
    /// Banned users cannot log in.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub banned: bool,
    /// A deleted user's row stays as a tombstone (so the deletion replicates); the id can be
    /// created again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// Tokens carry the epoch they were issued in; bumping it (password change, ban, delete,
    /// logout) refuses every earlier token. Merged by max.
    #[serde(default)]
    pub token_epoch: u64,
    /// The row's version for last-writer-wins between nodes: when it was last changed (epoch ms,
    /// always above the previous version) and by which node (ties).
    #[serde(default)]
    pub updated_at: i64,
    /// See `updated_at`.
    #[serde(default)]
    pub updated_by: String,
}

impl UserRecord {
    /// A new user with no version yet (the store gives it one when it writes it).
    pub fn new(user_id: &str, password_hash: String, nick: Option<String>, avatar: Option<String>, role: &str) -> UserRecord {
        UserRecord {
            user_id: user_id.to_string(),
            password_hash,
            nick,
            avatar,
            role: role.to_string(),
            banned: false,
            deleted: false,
            token_epoch: 0,
            updated_at: 0,
            updated_by: String::new(),
        }
    }

    /// Whether this version replaces `other` (last writer wins; the node id breaks ties).
    pub fn newer_than(&self, other: &UserRecord) -> bool {
        (self.updated_at, self.updated_by.as_str()) > (other.updated_at, other.updated_by.as_str())
    }
}

/// A record of the product built on the IM core (customer service: an inbox, a visitor, a
/// conversation, a note …): a kind, an id unique within the kind, a scope to list by, and a JSON
/// body the node's typed model reads. Last writer wins between nodes, as for a user row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// What it is (`inbox`, `visitor`, `conversation`, …).
    pub kind: String,
    /// Id, unique within the kind.
    pub id: String,
    /// What it is listed under (a conversation's inbox, a note's conversation), or empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub scope: String,
    /// The JSON body.
    pub body: String,
    /// Version: epoch ms of the change, always above the previous version.
    pub updated_at: i64,
    /// Version: the node that made the change (ties).
    pub updated_by: String,
}

impl Record {
    /// Whether this version replaces `other` (last writer wins; the node id breaks ties).
    pub fn newer_than(&self, other: &Record) -> bool {
        (self.updated_at, self.updated_by.as_str()) > (other.updated_at, other.updated_by.as_str())
    }
}

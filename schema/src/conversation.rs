//! Conversation ids: `p:<a>:<b>` for a private chat (the two user ids sorted by byte order, as
//! J-IM's `String.compareTo` sorts them) and `g:<groupId>` for a group.

use std::fmt;
use std::sync::Arc;

/// The id of a conversation. Cheap to clone.
/// Groups whose id starts with this are customer-service conversations: the node that sequences
/// a message in one also records it for its customer-service handling (queueing, webhooks).
pub const SUPPORT_GROUP_PREFIX: &str = "cs-";

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConversationId(Arc<str>);

/// What a conversation id names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConversationKind<'a> {
    /// A private chat between two users (sorted).
    Private(&'a str, &'a str),
    /// A group.
    Group(&'a str),
}

impl ConversationId {
    /// The private conversation between `a` and `b`, whichever order they come in.
    pub fn private(a: &str, b: &str) -> ConversationId {
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        ConversationId(format!("p:{lo}:{hi}").into())
    }

    /// The conversation of group `group_id`.
    pub fn group(group_id: &str) -> ConversationId {
        ConversationId(format!("g:{group_id}").into())
    }

    /// Parses a stored id; `None` if it is neither shape.
    pub fn parse(s: &str) -> Option<ConversationId> {
        let id = ConversationId(s.into());
        id.kind()?;
        Some(id)
    }

    /// What this id names. User ids may not contain `:` (login refuses them), so the split is
    /// unambiguous.
    pub fn kind(&self) -> Option<ConversationKind<'_>> {
        if let Some(group) = self.0.strip_prefix("g:") {
            return Some(ConversationKind::Group(group));
        }
        let rest = self.0.strip_prefix("p:")?;
        let (a, b) = rest.split_once(':')?;
        Some(ConversationKind::Private(a, b))
    }

    /// The other participant of a private conversation, seen from `me`.
    pub fn peer_of<'a>(&'a self, me: &str) -> Option<&'a str> {
        match self.kind()? {
            ConversationKind::Private(a, b) if a == me => Some(b),
            ConversationKind::Private(a, b) if b == me => Some(a),
            _ => None,
        }
    }

    /// The id as stored and sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for ConversationId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ConversationId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<ConversationId, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        ConversationId::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("not a conversation id: {s:?}")))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn private_ids_are_sorted() {
        assert_eq!(ConversationId::private("bob", "alice").as_str(), "p:alice:bob");
        assert_eq!(ConversationId::private("alice", "bob"), ConversationId::private("bob", "alice"));
        let id = ConversationId::private("u2", "u1");
        assert_eq!(id.peer_of("u1"), Some("u2"));
        assert_eq!(id.peer_of("u3"), None);
        assert_eq!(ConversationId::group("100").kind(), Some(ConversationKind::Group("100")));
        assert!(ConversationId::parse("x:1").is_none());
    }
}

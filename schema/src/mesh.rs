//! The mesh protocol between nodes (QUIC, ALPN `kefu-mesh/1`, mutual TLS). Every frame is a
//! version envelope around one message, so a node can refuse what it does not understand instead
//! of misreading it: today only `V1` exists.
//!
//! Streams (all opened by the dialling node on its own connection to a peer):
//! - one unidirectional *control* stream: `Hello`, then `Beat`, `Presence`, `Relay`, `Cover` and
//!   `Covered` frames;
//! - one bidirectional *subscribe* stream: the dialler sends `Subscribe { after }` and the peer
//!   answers with `Changes` batches, forever: first its backlog, then each commit as it happens;
//! - one bidirectional *forwarding* stream: `ForwardStream`, then `Forward` frames, each
//!   answered on the same stream by a `Forwarded` with its id, in order;
//! - one bidirectional stream per request: `Since` → `Messages` (or a lone `Forward`).
//!
//! A frame on the wire is a 4-byte big-endian length and that many bytes of JSON.

use serde::{Deserialize, Serialize};

use crate::message::{NewMessage, Record, StoredMessage, UserRecord};
use crate::ConversationId;

/// ALPN of the mesh.
pub const ALPN: &[u8] = b"kefu-mesh/1";
/// Largest frame accepted (a change batch is cut well below it).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// A frame: a version and its message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Envelope {
    /// Version 1.
    V1(V1),
}

/// Where a relayed push goes on the receiving node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RelayTarget {
    /// Every connection of a user.
    User(String),
    /// Every online member of a group.
    Group(String),
}

/// Version 1 of the mesh messages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t")]
pub enum V1 {
    /// First frame of a control stream: who is dialling. `boot` changes on every start, so a peer
    /// can tell a restart from a reconnect.
    Hello {
        /// Node id.
        node: String,
        /// Region.
        region: String,
        /// Random per process start.
        boot: u64,
        /// [`crate::placement::fingerprint`] of the sender's configured node list: a node that
        /// hears another one refuses the peer (a hello without it is from a node too old to say).
        #[serde(default)]
        fingerprint: String,
        /// How many nodes that list has (for the operator's log when the lists differ).
        #[serde(default)]
        nodes: usize,
    },
    /// Liveness, sent every beat interval on the control stream.
    Beat {
        /// Sender's wall clock, epoch ms.
        at_ms: i64,
    },
    /// Users whose sessions the sender holds. A snapshot replaces everything known of the sender;
    /// otherwise `online` are added and `offline` removed.
    Presence {
        /// Whether this replaces the sender's whole entry.
        snapshot: bool,
        /// Users now online at the sender.
        online: Vec<String>,
        /// Users no longer online at the sender.
        offline: Vec<String>,
        /// Those of `offline` whose exit notice the sender sent (it saw them online nowhere
        /// else). A node that held its own notice back for one of them drops it; for the others,
        /// of the nodes that held theirs back, the one with the smallest id sends it.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        announced: Vec<String>,
    },
    /// Asks the receiver to send its full presence again (the sender had marked it down and
    /// dropped its entries).
    Resync,
    /// A frame to push to local connections (typing, receipts, join/exit and recall notices).
    Relay {
        /// Who gets it.
        to: RelayTarget,
        /// Command code of the frame.
        command: u8,
        /// JSON body of the frame.
        body: String,
    },
    /// On a control stream: the sender cannot reach `origin` and asks the receiver to pass on
    /// the messages `origin` sequenced, the ones committed there since `since_ms` (origin's clock,
    /// give or take) at once and new ones as they arrive, for a few seconds; renewed while the
    /// sender still cannot reach it.
    Cover {
        /// The node the sender cannot reach.
        origin: String,
        /// Epoch ms: pass on what `origin` committed from about then.
        since_ms: i64,
    },
    /// On a control stream: messages passed on for a `Cover`, each conversation's in seq order.
    Covered {
        /// The messages.
        messages: Vec<StoredMessage>,
    },
    /// Asks for the peer's changes with a revision above `after`, then for every later change.
    Subscribe {
        /// The subscribing node.
        node: String,
        /// The newest revision of the peer already applied.
        after: u64,
    },
    /// Changes with revisions in `(after, upto]`, in revision order.
    Changes(ChangeBatch),
    /// First frame of a forwarding stream: `Forward` frames follow, each answered by a
    /// `Forwarded` with its id. The owner sequences them in the order they arrive, so a
    /// session's pipelined sends keep their order end to end.
    ForwardStream,
    /// A send for a conversation the receiver owns (on a forwarding stream, or alone on a
    /// request stream).
    Forward {
        /// The message, with the sender already authenticated by the forwarding node.
        message: NewMessage,
        /// Numbers the sends of one forwarding stream, 1, 2, 3 … (0 on a request stream).
        #[serde(default, skip_serializing_if = "is_zero")]
        id: u64,
    },
    /// The owner's answer to `Forward`: the committed message, or a status code.
    Forwarded {
        /// Committed message, or the status the sender gets.
        result: Result<StoredMessage, u32>,
        /// The id of the `Forward` it answers.
        #[serde(default, skip_serializing_if = "is_zero")]
        id: u64,
    },
    /// Asks for a conversation's messages after a seq (a gap fill).
    Since {
        /// The conversation.
        conversation: ConversationId,
        /// Messages with a greater seq.
        after: u64,
        /// At most this many.
        limit: u32,
    },
    /// The answer to `Since`.
    Messages {
        /// Oldest first.
        messages: Vec<StoredMessage>,
    },
    /// Asks the node that runs customer service's router to make a change there (so that every
    /// change to a conversation is made by one writer): a `support::Call` as JSON.
    SupportCall {
        /// The call.
        call: serde_json::Value,
    },
    /// The answer to `SupportCall`: the result, or an HTTP-like status and a reason.
    SupportAnswer {
        /// The result.
        result: Result<serde_json::Value, (u16, String)>,
    },
    /// A request could not be served.
    Error {
        /// kefu status code.
        status: u32,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_i64(n: &i64) -> bool {
    *n == 0
}

fn open() -> String {
    "open".to_string()
}

fn is_open(access: &str) -> bool {
    access == "open"
}

/// A slice of a node's change stream. Every row a node writes gets the next revision of that
/// node; a subscriber that applied a batch has everything up to `upto`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeBatch {
    /// Exclusive lower bound.
    pub after: u64,
    /// Inclusive upper bound.
    pub upto: u64,
    /// The sender's newest revision when it sent this (lag = head - upto).
    pub head: u64,
    /// When the newest change in the batch was committed, epoch ms.
    pub at_ms: i64,
    /// The changed rows.
    pub changes: Vec<Change>,
}

/// One changed row. Applying a change is idempotent and commutative: messages are keyed by
/// (conversation, seq), cursors merge by max, everything else is insert-once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "k")]
pub enum Change {
    /// A message (new, or recalled since).
    Message(StoredMessage),
    /// A user.
    User(UserRecord),
    /// A group. Last writer wins by (`updated_at`, `updated_by`); a group made by a J-IM join
    /// has version 0, so a definition from the admin API replaces it.
    Group {
        /// Group id.
        group_id: String,
        /// Name.
        name: Option<String>,
        /// `open` (anyone may join, J-IM's behaviour) or `closed` (members only).
        #[serde(default = "open", skip_serializing_if = "is_open")]
        access: String,
        /// Version: epoch ms of the change.
        #[serde(default, skip_serializing_if = "is_zero_i64")]
        updated_at: i64,
        /// Version: the node that made the change (ties).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        updated_by: String,
    },
    /// A group membership, or its removal. Last writer wins by (`changed_at`, `changed_by`).
    Member {
        /// Group id.
        group_id: String,
        /// Member.
        user_id: String,
        /// The user left or was removed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        removed: bool,
        /// Version: epoch ms of the change (0: a join from before versions, insert-once).
        #[serde(default, skip_serializing_if = "is_zero_i64")]
        changed_at: i64,
        /// Version: the node that made the change (ties).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        changed_by: String,
    },
    /// A user's cursors in a conversation.
    Cursor {
        /// User.
        user_id: String,
        /// Conversation.
        conversation: ConversationId,
        /// Delivered up to.
        delivered: u64,
        /// Read up to.
        read: u64,
    },
    /// A recall.
    Recall {
        /// The recalled message.
        message_id: String,
        /// Its conversation.
        conversation: ConversationId,
        /// Its seq.
        seq: u64,
        /// Who recalled it.
        by: String,
        /// When, epoch ms.
        at_ms: i64,
    },
    /// A record of the customer-service model. Last writer wins by (`updated_at`, `updated_by`).
    /// A node from before records cannot read a batch holding one: upgrade every node first.
    Record(Record),
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Longer than [`MAX_FRAME`].
    #[error("mesh frame of {0} bytes is over the limit")]
    TooLarge(usize),
    /// Not a known version or not valid JSON for it.
    #[error("undecodable mesh frame: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Encodes `msg` as a length-prefixed V1 frame.
pub fn encode(msg: &V1) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    // Serialising these types cannot fail: every map key is a string.
    serde_json::to_writer(&mut out, &EnvelopeRef::V1(msg)).unwrap_or_else(|e| unreachable!("{e}"));
    let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// The body length a frame header announces, checked against the limit.
pub fn frame_len(header: [u8; 4]) -> Result<usize, MeshError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(MeshError::TooLarge(len));
    }
    Ok(len)
}

/// Decodes a frame body (without its length prefix).
pub fn decode(body: &[u8]) -> Result<V1, MeshError> {
    let Envelope::V1(msg) = serde_json::from_slice(body)?;
    Ok(msg)
}

#[derive(Serialize)]
enum EnvelopeRef<'a> {
    V1(&'a V1),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_the_wire_shape_is_pinned() {
        let hello = V1::Hello { node: "iad-1".into(), region: "iad".into(), boot: 7, fingerprint: "00ff".into(), nodes: 3 };
        let frame = encode(&hello);
        assert_eq!(&frame[4..], br#"{"V1":{"t":"Hello","node":"iad-1","region":"iad","boot":7,"fingerprint":"00ff","nodes":3}}"#);
        assert_eq!(frame_len(frame[..4].try_into().unwrap()).unwrap(), frame.len() - 4);
        assert_eq!(decode(&frame[4..]).unwrap(), hello);

        let batch = V1::Changes(ChangeBatch {
            after: 3,
            upto: 5,
            head: 9,
            at_ms: 1,
            changes: vec![
                Change::Cursor { user_id: "u".into(), conversation: ConversationId::group("g"), delivered: 2, read: 1 },
                Change::Member { group_id: "g".into(), user_id: "u".into(), removed: false, changed_at: 0, changed_by: String::new() },
                Change::Member { group_id: "g".into(), user_id: "v".into(), removed: true, changed_at: 5, changed_by: "iad-1".into() },
                Change::Group { group_id: "g".into(), name: None, access: "closed".into(), updated_at: 5, updated_by: "iad-1".into() },
            ],
        });
        assert_eq!(decode(&encode(&batch)[4..]).unwrap(), batch);
        let record = Change::Record(Record {
            kind: "inbox".into(),
            id: "i1".into(),
            scope: String::new(),
            body: "{}".into(),
            updated_at: 5,
            updated_by: "iad-1".into(),
        });
        assert_eq!(
            serde_json::to_string(&record).unwrap(),
            r#"{"k":"Record","kind":"inbox","id":"i1","body":"{}","updated_at":5,"updated_by":"iad-1"}"#
        );
        let fwd = V1::Forwarded { result: Err(11007), id: 0 };
        assert_eq!(&encode(&fwd)[4..], br#"{"V1":{"t":"Forwarded","result":{"Err":11007}}}"#);
        assert_eq!(decode(&encode(&fwd)[4..]).unwrap(), fwd);
        let numbered = V1::Forwarded { result: Err(11007), id: 9 };
        assert_eq!(&encode(&numbered)[4..], br#"{"V1":{"t":"Forwarded","result":{"Err":11007},"id":9}}"#);
        assert_eq!(&encode(&V1::ForwardStream)[4..], br#"{"V1":{"t":"ForwardStream"}}"#);
        let call = V1::SupportCall { call: serde_json::json!({"call": "resolve", "id": "cs-1", "by": "ann"}) };
        assert_eq!(&encode(&call)[4..], br#"{"V1":{"t":"SupportCall","call":{"by":"ann","call":"resolve","id":"cs-1"}}}"#);
        let answer = V1::SupportAnswer { result: Err((404, "no conversation cs-1".into())) };
        assert_eq!(&encode(&answer)[4..], br#"{"V1":{"t":"SupportAnswer","result":{"Err":[404,"no conversation cs-1"]}}}"#);
        assert_eq!(decode(&encode(&answer)[4..]).unwrap(), answer);
    }

    #[test]
    fn a_hello_from_before_fingerprints_reads_as_an_empty_one() {
        let old = br#"{"V1":{"t":"Hello","node":"iad-1","region":"iad","boot":7}}"#;
        let V1::Hello { fingerprint, nodes, .. } = decode(old).unwrap() else { panic!("not a hello") };
        assert_eq!((fingerprint.as_str(), nodes), ("", 0));
    }

    #[test]
    fn unknown_versions_and_oversize_frames_are_refused() {
        assert!(decode(br#"{"V2":{"t":"Beat","at_ms":1}}"#).is_err());
        assert!(decode(br#"{"V1":{"t":"Nope"}}"#).is_err());
        assert!(decode(b"\xff\x00").is_err());
        assert!(matches!(frame_len(((MAX_FRAME + 1) as u32).to_be_bytes()), Err(MeshError::TooLarge(_))));
    }
}

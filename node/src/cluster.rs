//! The seam between this node and the rest of the cluster. The dispatcher and the fan-out see
//! only this trait: who sequences a conversation, sending a message to its owner, relaying a
//! push to the other nodes, filling this node's copy of a conversation, and what happens after a
//! local commit. `SingleNode` is a node on its own (it owns everything, there is nobody to relay
//! to); the mesh (`crate::mesh::Mesh`) is the other implementation.
//!
//! Owns nothing itself; it never touches a socket or SQL.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use schema::mesh::RelayTarget;
use schema::message::{NewMessage, StoredMessage};
use schema::{ConversationId, Status};

/// A send on its way to its owner: the committed message, or the status the sender gets.
pub type Forwarded = Pin<Box<dyn Future<Output = Result<StoredMessage, Status>> + Send>>;

/// A fill of this node's copy of a conversation: whether it reaches what was asked.
pub type Filled<'a> = Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// The answer to a customer-service call: its result, or a status (HTTP-like) and a reason.
pub type CallResult = Result<serde_json::Value, (u16, String)>;

/// A customer-service call from another node, with where its answer goes.
pub type RemoteCall = (serde_json::Value, tokio::sync::oneshot::Sender<CallResult>);

/// A customer-service call on its way to the node that runs the router.
pub type Called<'a> = Pin<Box<dyn Future<Output = CallResult> + Send + 'a>>;

/// What the dispatcher needs from the cluster.
pub trait Cluster: Send + Sync {
    /// This node's id ("" for a node on its own).
    fn node_id(&self) -> &str;

    /// Whether this node sequences `conversation`.
    fn owns(&self, conversation: &ConversationId) -> bool;

    /// The region of the node that sequences `conversation`; `None` on a node on its own.
    fn home_region(&self, conversation: &ConversationId) -> Option<String>;

    /// Whether every node heard from agrees with this one on the node list (a node that does
    /// not sequences nothing).
    fn agrees(&self) -> bool;

    /// Sends `message` to its owner, queued now (sends submitted one after another are
    /// sequenced in that order); resolves after the owner's commit and the message's arrival
    /// here. `from_conn` is the sending connection here, which gets the reply instead of a copy.
    fn forward(&self, message: NewMessage, from_conn: Option<u64>) -> Forwarded;

    /// Pushes a frame to the matching sessions of every other node (best effort).
    fn relay(&self, to: RelayTarget, command: u8, body: &[u8]);

    /// Makes this node's copy of `conversation` (sequenced elsewhere) reach `wanted`.
    fn fill<'a>(&'a self, conversation: &'a ConversationId, wanted: u64) -> Filled<'a>;

    /// A message this node sequenced was committed.
    fn committed_here(&self, conversation: &ConversationId, seq: u64);

    /// Whether messages sequenced elsewhere are pushed by the cluster as they arrive (otherwise
    /// the fan-out pushes them after they are stored, as for an import on a node on its own).
    fn pushes_replicas(&self) -> bool;

    /// Carries out a customer-service call at the node that owns `conversation` (only asked when
    /// this node does not).
    fn call_owner<'a>(&'a self, conversation: &'a ConversationId, call: serde_json::Value) -> Called<'a>;
}

/// A node on its own.
#[derive(Debug, Default)]
pub struct SingleNode;

impl Cluster for SingleNode {
    fn node_id(&self) -> &str {
        ""
    }

    fn home_region(&self, _conversation: &ConversationId) -> Option<String> {
        None
    }

    fn owns(&self, _conversation: &ConversationId) -> bool {
        true
    }

    fn agrees(&self) -> bool {
        true
    }

    fn forward(&self, _message: NewMessage, _from_conn: Option<u64>) -> Forwarded {
        // Never called: this node owns every conversation.
        Box::pin(async { Err(Status::Retryable) })
    }

    fn relay(&self, _to: RelayTarget, _command: u8, _body: &[u8]) {}

    fn fill<'a>(&'a self, _conversation: &'a ConversationId, _wanted: u64) -> Filled<'a> {
        Box::pin(async { true })
    }

    fn committed_here(&self, _conversation: &ConversationId, _seq: u64) {}

    fn pushes_replicas(&self) -> bool {
        false
    }

    fn call_owner<'a>(&'a self, _: &'a ConversationId, _: serde_json::Value) -> Called<'a> {
        // A node on its own owns everything; nothing is ever sent elsewhere.
        Box::pin(async { Err((503, "no other node".to_string())) })
    }
}

/// The mesh as the cluster.
impl Cluster for Arc<crate::mesh::Mesh> {
    fn node_id(&self) -> &str {
        &self.me.id
    }

    fn owns(&self, conversation: &ConversationId) -> bool {
        self.owner(conversation).id == self.me.id
    }

    fn home_region(&self, conversation: &ConversationId) -> Option<String> {
        Some(self.owner(conversation).region.clone())
    }

    fn agrees(&self) -> bool {
        crate::mesh::Mesh::agrees(self)
    }

    fn forward(&self, message: NewMessage, from_conn: Option<u64>) -> Forwarded {
        let owner = self.owner(&message.conversation).id.clone();
        // The replica's push of the committed message skips the sending connection.
        let own = message.recipient.is_some().then(|| self.replica.expect_own(&message, from_conn)).flatten();
        let forwarded = self.submit_forward(&owner, message);
        let mesh = Arc::clone(self);
        Box::pin(async move {
            let answer = forwarded.await;
            // Pushed by now, or never (a failure, or a repeat the owner deduplicated).
            if let Some(own) = own {
                mesh.replica.forget_own(own);
            }
            answer
        })
    }

    fn relay(&self, to: RelayTarget, command: u8, body: &[u8]) {
        crate::mesh::Mesh::relay(self, to, command, body);
    }

    fn fill<'a>(&'a self, conversation: &'a ConversationId, wanted: u64) -> Filled<'a> {
        if self.owns(conversation) {
            return Box::pin(async { true });
        }
        Box::pin(crate::mesh::Mesh::fill(self, conversation, wanted))
    }

    fn committed_here(&self, conversation: &ConversationId, seq: u64) {
        self.replica.note_local(conversation, seq);
    }

    fn pushes_replicas(&self) -> bool {
        true
    }

    fn call_owner<'a>(&'a self, conversation: &'a ConversationId, call: serde_json::Value) -> Called<'a> {
        Box::pin(self.support_call(conversation, call))
    }
}

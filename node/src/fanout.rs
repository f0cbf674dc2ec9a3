//! The fan-out: drains the store's commit feed, in commit order, and pushes each committed
//! message sequenced here to the connections on this node that should see it, then answers the
//! sender. Because one task does this in feed order, every recipient sees one order per
//! conversation, and a sender's success reply always comes after the commit and after the push.
//! Messages replicated from other nodes are pushed by the mesh's replica as they arrive, in seq
//! order, before they are stored; the feed pushes only messages imported without a mesh.
//!
//! Hot path: one JSON serialisation per message, shared by every recipient; no logging per
//! message; no awaits except on the feed.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::dispatch::Core;
use crate::store::{Committed, Delivery};

/// Runs until the store's writer stops or the node shuts down.
pub async fn run(core: Arc<Core>, mut feed: mpsc::Receiver<Committed>, shutdown: tokio_util::sync::CancellationToken) {
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = feed.recv() => match event {
                Some(event) => event,
                None => return,
            },
        };
        match event {
            Committed::Message { message, duplicate, from_conn, reply } => {
                if !duplicate {
                    core.cluster.committed_here(&message.conversation, message.seq);
                }
                let delivered = if duplicate { 0 } else { core.deliver_local(&message, from_conn) };
                if !duplicate && message.group_id.as_deref().is_some_and(crate::support::is_support_group) {
                    core.support.message_committed();
                }
                // Online means a connection here took the push (a slow consumer that was just
                // dropped does not count), or a session at another node.
                let recipient_online = message
                    .recipient
                    .as_deref()
                    .is_some_and(|r| (if duplicate { core.hub.is_online(r) } else { delivered > 0 }) || core.hub.is_online_elsewhere(r));
                let _ = reply.send(Ok(Delivery { message, recipient_online }));
            }
            // With a mesh, the replica pushed it before it was queued for storing.
            Committed::Replica(message) => {
                if !core.cluster.pushes_replicas() {
                    core.deliver_local(&message, None);
                }
            }
            Committed::Membership { group, user, member: true } => core.hub.join(&user, &group),
            Committed::Membership { group, user, member: false } => core.hub.leave(&user, &group),
            Committed::SignedOut(user) => drop(core.hub.kick_user(&user, schema::Status::SignedOut)),
            Committed::Flag { flag, reply } => drop(reply.send(Ok(flag))),
            // The requester's dispatcher tells the members, skipping the requesting connection,
            // which gets the reply instead.
            Committed::Recall { recalled, reply } => drop(reply.send(Ok(recalled))),
        }
    }
}

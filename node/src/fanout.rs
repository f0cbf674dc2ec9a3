//! The fan-out: drains the store's commit feed, in commit order, and pushes each committed
//! event to the connections that should see it, then answers the sender. Because one task does
//! this in feed order, every recipient sees one order per conversation, and a sender's success
//! reply always comes after the commit and after the push.
//!
//! Hot path: one JSON serialisation per message, shared by every recipient; no logging per
//! message; no awaits except on the feed.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use schema::jim;
use schema::Command;
use tokio::sync::mpsc;

use crate::dispatch::Core;
use crate::hub::Push;
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
            Committed::Message { message, duplicate, reply } => {
                let mut recipient_online = message.recipient.as_deref().is_some_and(|r| core.hub.is_online(r));
                if !duplicate {
                    let body = jim::push(Command::ChatReq, &message.to_chat_body());
                    let push = Arc::new(Push {
                        command: Command::ChatReq.code(),
                        body: body.into(),
                        delivery: Some((message.conversation.clone(), message.seq)),
                    });
                    let delivered = match (&message.recipient, &message.group_id) {
                        (Some(to), _) => core.hub.send_user(to, &push, None),
                        (None, Some(group)) => core.hub.send_group(group, &push, None),
                        (None, None) => 0,
                    };
                    if message.recipient.is_some() {
                        recipient_online = delivered > 0;
                    }
                    core.metrics.messages_out.fetch_add(delivered as u64, Ordering::Relaxed);
                }
                let _ = reply.send(Ok(Delivery { message, recipient_online }));
            }
            // The requester's dispatcher tells the members, skipping the requesting connection,
            // which gets the reply instead.
            Committed::Recall { recalled, reply } => drop(reply.send(Ok(recalled))),
        }
    }
}

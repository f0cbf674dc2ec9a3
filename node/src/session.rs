//! The session loop: one per connection, whatever the transport. It reads typed inbound items
//! from the transport adapter, has the dispatcher carry them out, writes replies and the pushes
//! queued for it by the hub, enforces the idle (heartbeat) timeout and the write timeout, and on
//! exit unregisters from the hub and tells the user's groups.
//!
//! Transport adapters only turn bytes into [`Inbound`] and [`Outgoing`] into bytes; the loop is
//! generic over `Stream + Sink`, so every transport behaves the same.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, Sink, SinkExt, Stream, StreamExt};
use schema::jim::{self, Request};
use schema::{Command, ConversationId, Status};
use tokio::time::Instant;
use tracing::Instrument;

use crate::dispatch::{Core, Live, Outcome, Reply, SessionState};
use crate::hub::{Inbox, Mail, SharedPush};
use crate::metrics::Transport;

/// How long one write may block before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a transport hands to the session.
#[derive(Debug)]
pub enum Inbound {
    /// A request body. `cmd` is the TCP header's command; `None` on WebSocket, where the JSON
    /// carries it.
    Request {
        /// Command from the frame header, if the transport has one.
        cmd: Option<Command>,
        /// synSeq to echo on the replies.
        syn_seq: i32,
        /// The JSON body.
        body: Bytes,
    },
    /// The peer asked to close (a WebSocket close frame).
    Close,
    /// The byte stream cannot be decoded: send a final error frame and close.
    ProtocolError(Status),
}

/// What the session hands to a transport.
#[derive(Debug)]
pub enum Outgoing {
    /// A J-IM frame.
    Frame {
        /// Command.
        command: u8,
        /// synSeq; 0 for none.
        syn_seq: i32,
        /// JSON body.
        body: Bytes,
    },
    /// Close the connection cleanly, with a reason where the transport can carry one.
    Close(Status),
}

/// One session, run to its end by the returned future. `first` is a request to carry out before
/// reading (the WebSocket query-string login). A plain function, not an `async fn`: the session is
/// set up when it is called, and the future keeps only what the loop needs (an async fn would also
/// keep its arguments beside what they were moved into).
pub fn run<I, O>(
    core: Arc<Core>,
    transport: Transport,
    peer: SocketAddr,
    inbound: I,
    outbound: O,
    first: Option<Box<Request>>,
) -> impl std::future::Future<Output = ()>
where
    I: Stream<Item = Inbound> + Unpin,
    O: Sink<Outgoing> + Unpin,
{
    let (conn, inbox) = core.hub.connection(transport);
    let span = tracing::info_span!("conn", id = conn.id, transport = transport.name(), %peer);
    let state = SessionState::new(&core, conn, peer);
    let mut session =
        Session { core: Arc::clone(&core), state, outbound, inbox, pending_cursors: HashMap::new(), inflight: FuturesOrdered::new() };
    async move {
        let _gauge = core.metrics.connection(transport);
        let end = session.drive(inbound, first).await;
        tracing::debug!(?end, "session ended");
        // Out of the hub before the socket closes: once the client sees the close, the APIs
        // already say it is offline.
        session.finish();
        // Flush what is buffered (the final frame, a WebSocket close reply) and close the write
        // side; bounded, since a client that stopped reading may never take it.
        let _ = tokio::time::timeout(WRITE_TIMEOUT, session.outbound.close()).await;
    }
    .instrument(span)
}

struct Session<O> {
    core: Arc<Core>,
    state: SessionState,
    outbound: O,
    /// Pushes the hub queued for this connection, and the order to close.
    inbox: Inbox,
    /// Delivered cursors not yet handed to the store, newest seq per conversation.
    pending_cursors: HashMap<ConversationId, u64>,
    /// Chats sent and not yet committed, with their synSeq; replies go out in request order.
    inflight: FuturesOrdered<InFlight>,
}

type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = (i32, Vec<u8>)> + Send>>;

/// How long a session of a stopping node waits for more of what its client is sending before it
/// closes.
const DRAIN_QUIET: Duration = Duration::from_millis(100);

/// Chats one connection may have waiting for their commit; beyond it the session stops reading.
const MAX_INFLIGHT: usize = 64;

/// Why a session ended (logged at debug level).
#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug
enum End {
    PeerGone,
    Closed,
    Kicked(Status),
    Protocol(Status),
    Idle,
    WriteFailed,
}

/// What woke the session up.
enum Event {
    Kicked(Status),
    Push(VecDeque<SharedPush>),
    ChatDone(i32, Vec<u8>),
    Inbound(Option<Inbound>),
    Idle,
}

impl<O: Sink<Outgoing> + Unpin> Session<O> {
    /// The loop. An idle connection sits in `next_event`, whose future is small; everything that
    /// happens after an event is in the boxed `on_event`, which exists only while it runs.
    async fn drive<I: Stream<Item = Inbound> + Unpin>(&mut self, mut inbound: I, first: Option<Box<Request>>) -> End {
        let timeout = self.core.config.heartbeat_timeout;
        let far = Duration::from_secs(365 * 24 * 3600);
        let idle = tokio::time::sleep(timeout.unwrap_or(far));
        tokio::pin!(idle);
        if let Some(req) = first {
            let outcome = Box::pin(self.core.handle(&mut self.state, *req)).await;
            if let Some(end) = Box::pin(self.deliver(outcome, 0)).await {
                return end;
            }
        }
        loop {
            let event = tokio::select! {
                biased;
                mail = std::future::poll_fn(|cx| self.inbox.poll_mail(cx)) => match mail {
                    Mail::Close(status) => Event::Kicked(status),
                    Mail::Pushes(pushes) => Event::Push(pushes),
                },
                Some((syn_seq, reply)) = self.inflight.next(), if !self.inflight.is_empty() => Event::ChatDone(syn_seq, reply),
                item = inbound.next(), if self.inflight.len() < MAX_INFLIGHT => Event::Inbound(item),
                _ = &mut idle, if timeout.is_some() => Event::Idle,
            };
            if matches!(event, Event::Push(_) | Event::Inbound(_)) {
                idle.as_mut().reset(Instant::now() + timeout.unwrap_or(far));
            }
            if matches!(event, Event::Kicked(_)) && self.core.hub.is_draining() {
                // The node is stopping: what the client has already sent, and what it is still
                // sending until it pauses for DRAIN_QUIET, is carried out (and answered) before
                // the close frame, so nothing it sent is left unread. The node's drain timeout
                // bounds a client that never pauses.
                while let Ok(Some(item)) = tokio::time::timeout(DRAIN_QUIET, inbound.next()).await {
                    if self.inflight.len() >= MAX_INFLIGHT {
                        if let Some(end) = Box::pin(self.drain_inflight()).await {
                            return end;
                        }
                    }
                    if let Some(end) = Box::pin(self.on_event(Event::Inbound(Some(item)))).await {
                        return end;
                    }
                }
            }
            if let Some(end) = Box::pin(self.on_event(event)).await {
                return end;
            }
        }
    }

    async fn on_event(&mut self, event: Event) -> Option<End> {
        match event {
            Event::Kicked(status) => {
                // Sends already taken are answered first (a node stopping, a user kicked): each
                // is committed and acknowledged, or answered retryable.
                if let Some(end) = Box::pin(self.drain_inflight()).await {
                    return Some(end);
                }
                // The frame is best effort: a slow consumer may not take it.
                self.close_with(Command::CloseReq, status).await;
                Some(End::Kicked(status))
            }
            Event::Push(pushes) => {
                if !self.write_pushes(pushes).await {
                    return Some(End::WriteFailed);
                }
                if self.inbox.is_empty() && !self.pending_cursors.is_empty() {
                    self.flush_cursors();
                }
                None
            }
            Event::ChatDone(syn_seq, reply) => {
                // Every chat reply that is already ready leaves with this one, in one write.
                if !self.write_queued().await {
                    return Some(End::WriteFailed);
                }
                let mut next = Some((syn_seq, reply));
                while let Some((syn_seq, reply)) = next.take() {
                    let frame = Outgoing::Frame { command: Command::ChatResp.code(), syn_seq, body: reply.into() };
                    if !self.feed(frame).await {
                        return Some(End::WriteFailed);
                    }
                    next = self.inflight.next().now_or_never().flatten();
                }
                if !self.flush().await {
                    return Some(End::WriteFailed);
                }
                None
            }
            Event::Inbound(None) => {
                Box::pin(self.drain_inflight()).await;
                Some(End::PeerGone)
            }
            Event::Inbound(Some(Inbound::Request { cmd, syn_seq, body })) => {
                let outcome = match jim::parse_request(cmd, &body) {
                    // Chats from a logged-in session are pipelined: the next request is read while
                    // this one waits for its commit.
                    Ok(Request::Chat(chat)) if self.state.user.is_some() => match self.core.begin_chat(&mut self.state, chat) {
                        Ok(pending) => {
                            self.inflight.push_back(Box::pin(async move { (syn_seq, pending.await) }));
                            return None;
                        }
                        Err(reply) => {
                            Outcome { replies: vec![Reply { command: Command::ChatResp.code(), body: reply.into() }], close: false }
                        }
                    },
                    // Anything else waits for the chats before it, so replies keep the order of
                    // the requests.
                    Ok(req) => {
                        if let Some(end) = Box::pin(self.drain_inflight()).await {
                            return Some(end);
                        }
                        // Boxed: the dispatcher's future is large and lives only while a request
                        // is handled.
                        Box::pin(self.core.handle(&mut self.state, req)).await
                    }
                    Err(e) => {
                        if let Some(end) = Box::pin(self.drain_inflight()).await {
                            return Some(end);
                        }
                        Outcome { replies: vec![Reply { command: e.command.code(), body: e.reply().into() }], close: false }
                    }
                };
                self.deliver(outcome, syn_seq).await
            }
            // A WebSocket close from the client: tungstenite has already queued the close reply,
            // so no frame can precede it; closing flushes it.
            Event::Inbound(Some(Inbound::Close)) => Some(End::Closed),
            Event::Inbound(Some(Inbound::ProtocolError(status))) => {
                self.core.metrics.protocol_errors.fetch_add(1, Ordering::Relaxed);
                self.close_with(Command::Unknown, status).await;
                Some(End::Protocol(status))
            }
            Event::Idle => {
                self.close_with(Command::CloseReq, Status::HeartbeatTimeout).await;
                Some(End::Idle)
            }
        }
    }

    /// Waits for every chat in flight and writes its reply.
    async fn drain_inflight(&mut self) -> Option<End> {
        while let Some((syn_seq, reply)) = self.inflight.next().await {
            let outcome = Outcome { replies: vec![Reply { command: Command::ChatResp.code(), body: reply.into() }], close: false };
            if let Some(end) = self.deliver(outcome, syn_seq).await {
                return Some(end);
            }
        }
        None
    }

    /// Writes the pushes already queued (so notifications raised while handling a request go
    /// out before its reply, as in J-IM), then the replies.
    async fn deliver(&mut self, outcome: Outcome, syn_seq: i32) -> Option<End> {
        if !self.write_queued().await {
            return Some(End::WriteFailed);
        }
        for reply in outcome.replies {
            if !self.send(Outgoing::Frame { command: reply.command, syn_seq, body: reply.body }).await {
                return Some(End::WriteFailed);
            }
        }
        if outcome.close {
            let _ = self.send(Outgoing::Close(Status::CloseOk)).await;
            return Some(End::Closed);
        }
        None
    }

    /// Writes the pushes queued now, if any; false if the client is gone.
    async fn write_queued(&mut self) -> bool {
        match self.inbox.take_pushes() {
            Some(pushes) => self.write_pushes(pushes).await,
            None => true,
        }
    }

    /// Writes the pushes taken from the inbox with one flush (the sink writes early past 64 KiB):
    /// one syscall for many frames under fan-out load.
    async fn write_pushes(&mut self, pushes: VecDeque<SharedPush>) -> bool {
        let mut bytes = 0;
        for push in &pushes {
            bytes += push.body.len();
            let frame = Outgoing::Frame { command: push.command, syn_seq: 0, body: push.body.clone() };
            if !self.feed(frame).await {
                return false;
            }
        }
        if !self.flush().await {
            return false;
        }
        self.inbox.written(bytes);
        // Deliveries count only once the flush succeeded: a cursor must never pass a message
        // that did not reach the socket.
        for push in &pushes {
            if let Some((conv, seq)) = &push.delivery {
                self.delivered(conv, *seq);
            }
        }
        true
    }

    /// Records that a chat push reached the socket, for the offline cursor. The conversation id
    /// is copied only the first time a conversation is seen.
    fn delivered(&mut self, conv: &ConversationId, seq: u64) {
        match self.state.live.get_mut(conv) {
            Some(live) => live.high = live.high.max(seq),
            None => {
                self.state.live.insert(conv.clone(), Live { floor: seq, high: seq });
            }
        }
        match self.pending_cursors.get_mut(conv) {
            Some(pending) => *pending = (*pending).max(seq),
            None => {
                self.pending_cursors.insert(conv.clone(), seq);
            }
        }
    }

    /// Sends a final status frame and a close (both best effort: the client may be gone).
    async fn close_with(&mut self, command: Command, status: Status) {
        let _ = self.write_status(command, status).await;
        let _ = self.send(Outgoing::Close(status)).await;
    }

    async fn write_status(&mut self, command: Command, status: Status) -> bool {
        self.send(Outgoing::Frame { command: command.code(), syn_seq: 0, body: jim::status_reply(command, status).into() }).await
    }

    /// Buffers a frame (writing earlier ones if the buffer is full); false if the client is gone
    /// or does not read within WRITE_TIMEOUT.
    async fn feed(&mut self, item: Outgoing) -> bool {
        matches!(tokio::time::timeout(WRITE_TIMEOUT, self.outbound.feed(item)).await, Ok(Ok(())))
    }

    /// Writes everything buffered, under the same timeout.
    async fn flush(&mut self) -> bool {
        matches!(tokio::time::timeout(WRITE_TIMEOUT, self.outbound.flush()).await, Ok(Ok(())))
    }

    async fn send(&mut self, item: Outgoing) -> bool {
        self.feed(item).await && self.flush().await
    }

    /// Hands the delivered cursors to the store, coalesced: under load many pushes make one
    /// cursor write.
    fn flush_cursors(&mut self) {
        let Some(user) = self.state.user.as_ref().map(|u| u.id.clone()) else {
            self.pending_cursors.clear();
            return;
        };
        for (conv, seq) in self.pending_cursors.drain() {
            let floor = self.state.live.get(&conv).map_or(seq, |live| live.floor);
            if self.core.store.advance_cursor_live(&user, &conv, floor, seq).is_err() {
                return;
            }
        }
    }

    fn finish(&mut self) {
        let core = Arc::clone(&self.core);
        let Some(user) = self.state.user.take() else { return };
        for (conv, seq) in self.pending_cursors.drain() {
            let floor = self.state.live.get(&conv).map_or(seq, |live| live.floor);
            let _ = core.store.advance_cursor_live(&user.id, &conv, floor, seq);
        }
        if let Some(gone) = core.hub.unregister(&user.id, self.state.conn.id) {
            core.went_offline(&user.id, gone);
        }
    }
}

#[cfg(test)]
mod tests;

//! The replica: what this node does with messages that other nodes sequenced. It owns, per
//! conversation, how far this node's copy reaches without a hole (`have`), and the forwarders
//! waiting for their message to arrive here. Dedupe, ordering and gap filling live here together.
//!
//! Rules (DESIGN §7): a conversation's messages are pushed to local sessions in seq order, each
//! once; a message ahead of a gap is neither pushed nor stored (the store keeps every
//! conversation as a prefix) but fetched again, with the gap, from the owner or any peer that
//! has it; so a delivered cursor, which follows pushes, never passes a seq this node has not
//! stored or queued for storing. The decision to push and the queueing of the rows for the
//! writer happen under one lock, so the writer stores in the order sessions were pushed to.
//!
//! `Ledger` is the bookkeeping without I/O; `Replica` wraps it with the store, the hub and the
//! fetches. Never does: hold its lock across an await; push a seq twice or out of order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use schema::mesh::{Change, ChangeBatch};
use schema::message::StoredMessage;
use schema::ConversationId;
use tokio::sync::oneshot;

use super::Local;
use crate::store::StoreError;

/// What to do with a message from the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// The next one: push it, store it.
    Take,
    /// Already pushed or stored here.
    Duplicate,
    /// A gap before it: leave it (it is fetched again with the gap).
    Ahead,
}

#[derive(Debug, Clone, Copy, Default)]
struct Reach {
    /// Every seq up to this one is stored here or queued for storing (and was pushed).
    have: u64,
    /// The newest seq heard of (at least `have`).
    seen: u64,
    /// A gap fill is running.
    filling: bool,
}

/// Per conversation, how far this node's copy reaches. No I/O.
#[derive(Debug, Default)]
pub struct Ledger {
    convs: HashMap<ConversationId, Reach>,
}

impl Ledger {
    /// Whether `conversation` has been seen since start.
    pub fn knows(&self, conversation: &ConversationId) -> bool {
        self.convs.contains_key(conversation)
    }

    /// Starts following `conversation` from what the database holds (`stored`), unless it is
    /// followed already.
    pub fn start(&mut self, conversation: &ConversationId, stored: u64) {
        self.convs.entry(conversation.clone()).or_insert(Reach { have: stored, seen: stored, filling: false });
    }

    /// The rule for a message `seq` of `conversation` (started, or taken as empty).
    pub fn admit(&mut self, conversation: &ConversationId, seq: u64) -> Admit {
        let r = self.convs.entry(conversation.clone()).or_default();
        r.seen = r.seen.max(seq);
        if seq <= r.have {
            Admit::Duplicate
        } else if seq == r.have + 1 {
            r.have = seq;
            Admit::Take
        } else {
            Admit::Ahead
        }
    }

    /// A message this node sequenced itself was committed.
    pub fn note_local(&mut self, conversation: &ConversationId, seq: u64) {
        if let Some(r) = self.convs.get_mut(conversation) {
            r.have = r.have.max(seq);
            r.seen = r.seen.max(seq);
        }
    }

    /// How far the copy reaches, if followed.
    pub fn have(&self, conversation: &ConversationId) -> Option<u64> {
        self.convs.get(conversation).map(|r| r.have)
    }

    /// Forgets `conversation` (a write of it failed): it starts again from the database.
    pub fn forget(&mut self, conversation: &ConversationId) {
        self.convs.remove(conversation);
    }

    /// Claims the fill of `conversation`'s gap: `Some((have, seen))` when there is one and no
    /// fill is running (the caller must call [`Ledger::end_fill`] or [`Ledger::end_fill_if_whole`]).
    pub fn begin_fill(&mut self, conversation: &ConversationId) -> Option<(u64, u64)> {
        let r = self.convs.get_mut(conversation)?;
        if r.filling || r.seen <= r.have {
            return None;
        }
        r.filling = true;
        Some((r.have, r.seen))
    }

    /// The gap still left, while a fill runs.
    pub fn gap(&self, conversation: &ConversationId) -> Option<(u64, u64)> {
        self.convs.get(conversation).filter(|r| r.seen > r.have).map(|r| (r.have, r.seen))
    }

    /// Ends the fill of `conversation` if no gap is left (a message ahead of a new gap may have
    /// come while it ran). Returns whether it ended.
    pub fn end_fill_if_whole(&mut self, conversation: &ConversationId) -> bool {
        match self.convs.get_mut(conversation) {
            Some(r) if r.seen > r.have => false,
            Some(r) => {
                r.filling = false;
                true
            }
            None => true,
        }
    }

    /// The fill of `conversation` gave up: the next message ahead of the gap starts another.
    pub fn end_fill(&mut self, conversation: &ConversationId) {
        if let Some(r) = self.convs.get_mut(conversation) {
            r.filling = false;
        }
    }
}

/// A forwarder waiting for its replica to reach a seq.
type Waiter = (u64, oneshot::Sender<()>);

/// A private message sent from a connection here and forwarded to its owner: when it comes back
/// through the replica, the sender's other connections get a copy, this one does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnSend {
    conversation: ConversationId,
    sender: String,
    client_id: Option<String>,
    conn: u64,
}

/// Forwarded sends remembered per (conversation, sender) at most; older ones are forgotten (their
/// sending connection would get a copy too, which J-IM clients ignore).
const OWN_SENDS: usize = 1024;

/// The replica of conversations sequenced elsewhere.
#[derive(Default)]
pub struct Replica {
    ledger: Mutex<Ledger>,
    waiters: Mutex<HashMap<ConversationId, Vec<Waiter>>>,
    waiting: AtomicBool,
    own: Mutex<HashMap<(ConversationId, String), std::collections::VecDeque<OwnSend>>>,
}

/// Attempts to fill one gap in the background before waiting for the next message ahead.
const FILL_ROUNDS: u32 = 12;

impl Replica {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers that connection `conn` here sent `message` (private, being forwarded).
    pub fn expect_own(&self, message: &schema::message::NewMessage, conn: Option<u64>) -> Option<OwnSend> {
        let own = OwnSend {
            conversation: message.conversation.clone(),
            sender: message.sender.clone(),
            client_id: message.client_id.clone(),
            conn: conn?,
        };
        let mut sends = self.own.lock().unwrap_or_else(|e| e.into_inner());
        let list = sends.entry((own.conversation.clone(), own.sender.clone())).or_default();
        if list.len() >= OWN_SENDS {
            list.pop_front();
        }
        list.push_back(own.clone());
        Some(own)
    }

    /// Forgets a forwarded send that failed.
    pub fn forget_own(&self, own: OwnSend) {
        let mut sends = self.own.lock().unwrap_or_else(|e| e.into_inner());
        let key = (own.conversation.clone(), own.sender.clone());
        if let Some(list) = sends.get_mut(&key) {
            if let Some(i) = list.iter().position(|o| *o == own) {
                list.remove(i);
            }
            if list.is_empty() {
                sends.remove(&key);
            }
        }
    }

    /// The connection here that sent `m`, if it was sent here: matched by client id, or else the
    /// oldest send without one (this node's sends reach the owner, and come back, in order).
    fn sent_from(&self, m: &StoredMessage) -> Option<u64> {
        m.recipient.as_ref()?;
        let mut sends = self.own.lock().unwrap_or_else(|e| e.into_inner());
        let key = (m.conversation.clone(), m.sender.clone());
        let list = sends.get_mut(&key)?;
        let i = list.iter().position(|o| o.client_id == m.client_id)?;
        let own = list.remove(i)?;
        if list.is_empty() {
            sends.remove(&key);
        }
        Some(own.conn)
    }

    /// Takes a batch of a peer's change stream: pushes its messages that come next, in order,
    /// queues the batch for the writer, and waits for the commit. Returns the conversations left
    /// with a gap, for the caller to fill.
    pub async fn receive(&self, local: &Local, peer: &str, batch: ChangeBatch) -> Result<Vec<ConversationId>, StoreError> {
        let mut conversations: Vec<ConversationId> = messages_of(&batch).map(|m| m.conversation.clone()).collect();
        conversations.sort();
        conversations.dedup();
        self.start_all(local, conversations.iter()).await?;
        let permit = local.store.reserve().await?;
        let mut gaps: Vec<ConversationId> = Vec::new();
        let mut reached: Vec<(ConversationId, u64)> = Vec::new();
        let committed = {
            let mut ledger = self.ledger();
            for m in messages_of(&batch) {
                match ledger.admit(&m.conversation, m.seq) {
                    Admit::Take => {
                        local.hub.deliver(m, self.sent_from(m));
                        reached.push((m.conversation.clone(), m.seq));
                    }
                    Admit::Duplicate => {}
                    Admit::Ahead if !gaps.contains(&m.conversation) => gaps.push(m.conversation.clone()),
                    Admit::Ahead => {}
                }
            }
            // Queued while the lock is held: a batch pushed after this one is stored after it.
            permit.apply(peer, batch)
        };
        self.wake_all(reached);
        if let Err(e) = committed.await {
            // What was pushed may not be stored: follow these conversations from the database
            // again (a message may then be pushed twice, never skipped).
            let mut ledger = self.ledger();
            for c in &conversations {
                ledger.forget(c);
            }
            return Err(e);
        }
        Ok(gaps)
    }

    /// Takes messages of one conversation that a peer passed on: pushes and stores those that
    /// come next. Returns whether a gap is left before some of them.
    pub async fn take(&self, local: &Local, conversation: &ConversationId, messages: Vec<StoredMessage>) -> Result<bool, StoreError> {
        self.take_fetched(local, conversation, messages).await?;
        Ok(self.ledger().gap(conversation).is_some())
    }

    /// Takes messages fetched for a gap (oldest first): pushes and stores those that come next.
    /// Returns how far the conversation now reaches.
    async fn take_fetched(&self, local: &Local, conversation: &ConversationId, fetched: Vec<StoredMessage>) -> Result<u64, StoreError> {
        self.start_all(local, [conversation]).await?;
        let permit = local.store.reserve().await?;
        let (committed, have) = {
            let mut ledger = self.ledger();
            let mut taken = Vec::new();
            for m in fetched {
                if m.conversation == *conversation && ledger.admit(conversation, m.seq) == Admit::Take {
                    local.hub.deliver(&m, self.sent_from(&m));
                    taken.push(m);
                }
            }
            let have = ledger.have(conversation).unwrap_or(0);
            // Queued while the lock is held, as in `receive`.
            (permit.import(taken), have)
        };
        self.wake(conversation, have);
        if let Err(e) = committed.await {
            self.ledger().forget(conversation);
            return Err(e);
        }
        Ok(have)
    }

    /// Starts following the conversations not followed yet, from the database.
    async fn start_all<'a>(&self, local: &Local, conversations: impl IntoIterator<Item = &'a ConversationId>) -> Result<(), StoreError> {
        let mut new: Vec<&ConversationId> = Vec::new();
        {
            let ledger = self.ledger();
            for c in conversations {
                if !ledger.knows(c) && !new.contains(&c) {
                    new.push(c);
                }
            }
        }
        for c in new {
            let stored = local.store.newest_seq(c).await?;
            self.ledger().start(c, stored);
        }
        Ok(())
    }

    /// A message this node sequenced was committed (so it is not pushed again when a peer's
    /// backfill brings it back).
    pub fn note_local(&self, conversation: &ConversationId, seq: u64) {
        self.ledger().note_local(conversation, seq);
    }

    /// Fills `conversation` up to `wanted` (or its known gap when `wanted` is 0) from the owner
    /// or any peer that has it: `fetch` asks one peer for the messages after a seq, and is
    /// tried on `sources` in order. Returns whether the copy reaches that far now.
    pub async fn fill<F, Fut>(&self, local: &Local, conversation: &ConversationId, wanted: u64, sources: &[String], fetch: F) -> bool
    where
        F: Fn(String, u64) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Vec<StoredMessage>>>,
    {
        if self.start_all(local, [conversation]).await.is_err() {
            return false;
        }
        for source in sources {
            // Each answer is at most a page; a bounded number of pages per source.
            for _ in 0..64 {
                let (have, target) = {
                    let ledger = self.ledger();
                    let have = ledger.have(conversation).unwrap_or(0);
                    (have, wanted.max(ledger.gap(conversation).map_or(0, |g| g.1)))
                };
                if have >= target {
                    return true;
                }
                let fetched = match fetch(source.clone(), have).await {
                    Ok(fetched) if !fetched.is_empty() => fetched,
                    Ok(_) => break,
                    Err(e) => {
                        tracing::debug!(peer = %source, conversation = %conversation.as_str(), error = %e, "a gap fill from a peer failed");
                        break;
                    }
                };
                match self.take_fetched(local, conversation, fetched).await {
                    Ok(now) if now > have => {}
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "storing a gap fill failed");
                        return false;
                    }
                }
            }
        }
        let ledger = self.ledger();
        let target = wanted.max(ledger.gap(conversation).map_or(0, |g| g.1));
        ledger.have(conversation).unwrap_or(0) >= target
    }

    /// Fills the gap of `conversation` in the background: a bounded number of rounds over
    /// `sources()` with backoff. A message still missing after that arrives with its owner's
    /// stream, or is asked for again when a later message shows the gap again.
    pub async fn fill_gap<S, F, Fut>(&self, local: &Local, conversation: ConversationId, sources: S, fetch: F)
    where
        S: Fn() -> Vec<String>,
        F: Fn(String, u64) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Vec<StoredMessage>>>,
    {
        let Some((have, seen)) = self.ledger().begin_fill(&conversation) else { return };
        tracing::debug!(conversation = %conversation.as_str(), have, seen, "a replica gap; fetching it");
        let mut backoff = Duration::from_millis(100);
        for _ in 0..FILL_ROUNDS {
            if self.fill(local, &conversation, 0, &sources(), &fetch).await {
                if self.ledger().end_fill_if_whole(&conversation) {
                    return;
                }
                continue;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        tracing::info!(conversation = %conversation.as_str(), "no peer could fill a replica gap yet; it waits for the owner's stream");
        self.ledger().end_fill(&conversation);
    }

    /// Waits until this node has pushed `conversation` up to `seq`, or `timeout`.
    pub async fn wait_for(&self, conversation: &ConversationId, seq: u64, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        {
            let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
            waiters.entry(conversation.clone()).or_default().push((seq, tx));
            self.waiting.store(true, Ordering::Release);
        }
        // The message may have arrived before the waiter was registered.
        if let Some(have) = self.ledger().have(conversation) {
            self.wake(conversation, have);
        }
        let _ = tokio::time::timeout(timeout, rx).await;
    }

    fn wake_all(&self, reached: Vec<(ConversationId, u64)>) {
        if !self.waiting.load(Ordering::Acquire) {
            return;
        }
        for (c, have) in reached {
            self.wake(&c, have);
        }
    }

    fn wake(&self, conversation: &ConversationId, have: u64) {
        if !self.waiting.load(Ordering::Acquire) {
            return;
        }
        let mut waiters = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(list) = waiters.get_mut(conversation) {
            let mut i = 0;
            while i < list.len() {
                if list[i].0 <= have {
                    let (_, tx) = list.swap_remove(i);
                    let _ = tx.send(());
                } else {
                    i += 1;
                }
            }
            if list.is_empty() {
                waiters.remove(conversation);
            }
        }
        waiters.retain(|_, l| {
            l.retain(|(_, tx)| !tx.is_closed());
            !l.is_empty()
        });
        self.waiting.store(!waiters.is_empty(), Ordering::Release);
    }
}

/// The messages of a change batch, in order.
fn messages_of(batch: &ChangeBatch) -> impl Iterator<Item = &StoredMessage> {
    batch.changes.iter().filter_map(|c| match c {
        Change::Message(m) => Some(m),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conv() -> ConversationId {
        ConversationId::group("g")
    }

    #[test]
    fn a_message_ahead_of_a_gap_waits_for_it_and_nothing_is_taken_twice() {
        let mut l = Ledger::default();
        l.start(&conv(), 18);
        // A backfill from a peer brings 20 before the owner's stream brings 19.
        assert_eq!(l.admit(&conv(), 20), Admit::Ahead);
        assert_eq!(l.have(&conv()), Some(18), "20 is neither pushed nor stored");
        assert_eq!(l.begin_fill(&conv()), Some((18, 20)));
        assert_eq!(l.begin_fill(&conv()), None, "one fill at a time");
        assert_eq!(l.admit(&conv(), 19), Admit::Take);
        assert_eq!(l.admit(&conv(), 20), Admit::Take, "20 follows once 19 is there");
        assert_eq!(l.admit(&conv(), 20), Admit::Duplicate);
        assert_eq!(l.admit(&conv(), 19), Admit::Duplicate);
        assert_eq!(l.gap(&conv()), None);
        assert!(l.end_fill_if_whole(&conv()));
        assert_eq!(l.begin_fill(&conv()), None, "no gap, no fill");
    }

    #[test]
    fn a_fill_that_found_nothing_is_asked_for_again_by_the_next_message_ahead() {
        let mut l = Ledger::default();
        l.start(&conv(), 5);
        assert_eq!(l.admit(&conv(), 9), Admit::Ahead);
        assert_eq!(l.begin_fill(&conv()), Some((5, 9)));
        assert!(!l.end_fill_if_whole(&conv()), "the gap is still there");
        l.end_fill(&conv());
        assert_eq!(l.admit(&conv(), 10), Admit::Ahead);
        assert_eq!(l.begin_fill(&conv()), Some((5, 10)));
        // A write that failed makes the conversation start from the database again.
        l.forget(&conv());
        assert!(!l.knows(&conv()));
    }

    #[test]
    fn local_commits_move_the_copy_so_a_backfill_of_them_is_not_pushed_again() {
        let mut l = Ledger::default();
        l.start(&conv(), 30);
        l.note_local(&conv(), 31);
        assert_eq!(l.admit(&conv(), 31), Admit::Duplicate);
        assert_eq!(l.admit(&conv(), 32), Admit::Take);
        // A conversation never followed starts from the database when it is first seen.
        let other = ConversationId::group("h");
        l.note_local(&other, 4);
        assert!(!l.knows(&other));
    }
}

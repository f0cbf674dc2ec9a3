//! The replication protocol's rules, without I/O and with the clock passed in.
//!
//! Every row a node writes gets the node's next revision. A peer subscribes with the newest
//! revision of this node it has applied, and this node sends what is newer: from the database
//! while the subscriber is behind (a restart, a partition, a new empty node), then from the
//! in-memory tail of commits once it has caught up. Batches cover contiguous revision ranges, so
//! the subscriber's watermark is exact and survives restarts (it is committed with the rows).
//!
//! Live batches carry only this node's own changes (the sends it sequenced, its logins, cursor
//! moves and joins): every other node gets those straight from their origin, so a message crosses
//! each link once. Backfill from the database carries everything this node has, including what it
//! applied from others and what the subscriber itself wrote (it may have lost its database), so a
//! node that was away gets the whole state from whichever peer it reaches first.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use schema::mesh::Change;

/// Revisions per backfill batch.
pub const BACKFILL_CHUNK: u64 = 2048;

/// What to do with a live batch `(after, upto]` for a subscriber that has everything up to `sent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send it.
    Send,
    /// The subscriber already has it.
    Skip,
    /// Read `(after, upto]` from the database first (the tail moved on without this subscriber),
    /// then look at the batch again.
    Backfill {
        /// Exclusive.
        after: u64,
        /// Inclusive.
        upto: u64,
    },
}

/// The rule for a live batch.
pub fn on_tail(sent: u64, after: u64, upto: u64) -> Step {
    if upto <= sent {
        Step::Skip
    } else if after <= sent {
        Step::Send
    } else {
        Step::Backfill { after: sent, upto: after.min(sent + BACKFILL_CHUNK) }
    }
}

/// The next backfill range for a subscriber at `sent` when the node's head is `head`, if any.
pub fn next_backfill(sent: u64, head: u64) -> Option<(u64, u64)> {
    (sent < head).then(|| (sent, head.min(sent + BACKFILL_CHUNK)))
}

/// Whether a change goes out in a live batch to `subscriber`: only this node's own changes, and
/// never a message back to the node that sequenced it.
pub fn ships_live(local: bool, change: &Change, subscriber: &str) -> bool {
    match change {
        Change::Message(m) => local && m.origin != subscriber,
        _ => local,
    }
}

/// What a subscriber does with a batch `(after, upto]` when it has applied up to `applied`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Apply it (overlaps are harmless: applying is idempotent).
    Apply,
    /// Already applied.
    Duplicate,
    /// Revisions `(applied, after]` are missing: subscribe again from `applied`.
    Gap,
}

/// The subscriber's rule.
pub fn accept(applied: u64, after: u64, upto: u64) -> Accept {
    if upto <= applied {
        Accept::Duplicate
    } else if after <= applied {
        Accept::Apply
    } else {
        Accept::Gap
    }
}

/// Whether the node has caught up with the mesh and may report ready. A peer counts once its
/// subscription has reached the head it reported; a peer that cannot be reached counts once the
/// node has waited `grace` for it (a whole region may be down; the node must still serve).
#[derive(Debug)]
pub struct CatchUp {
    started: Instant,
    grace: Duration,
    peers: BTreeMap<String, bool>,
    done: bool,
}

impl CatchUp {
    /// Nothing caught up yet.
    pub fn new<'a>(peers: impl IntoIterator<Item = &'a str>, started: Instant, grace: Duration) -> CatchUp {
        let peers: BTreeMap<String, bool> = peers.into_iter().map(|p| (p.to_string(), false)).collect();
        let done = peers.is_empty();
        CatchUp { started, grace, peers, done }
    }

    /// `peer`'s subscription reached the head the peer reported.
    pub fn caught_up(&mut self, peer: &str) {
        if let Some(c) = self.peers.get_mut(peer) {
            *c = true;
        }
    }

    /// Whether the node is ready at `now`; `reachable` says whether a peer has a live connection.
    /// Once ready, always ready.
    pub fn ready(&mut self, now: Instant, reachable: impl Fn(&str) -> bool) -> bool {
        if !self.done {
            let waited = now.saturating_duration_since(self.started) >= self.grace;
            self.done = self.peers.iter().all(|(p, caught)| *caught || (waited && !reachable(p)));
        }
        self.done
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use schema::message::StoredMessage;
    use schema::ConversationId;

    use super::*;

    #[test]
    fn live_batches_are_sent_skipped_or_backfilled() {
        assert_eq!(on_tail(10, 10, 12), Step::Send);
        assert_eq!(on_tail(11, 10, 12), Step::Send, "overlap is resent whole; applying is idempotent");
        assert_eq!(on_tail(12, 10, 12), Step::Skip);
        assert_eq!(on_tail(5, 10, 12), Step::Backfill { after: 5, upto: 10 });
        assert_eq!(on_tail(0, 100_000, 100_001), Step::Backfill { after: 0, upto: BACKFILL_CHUNK });
        assert_eq!(next_backfill(0, 5), Some((0, 5)));
        assert_eq!(next_backfill(5, 5), None);
        assert_eq!(next_backfill(1, 1 + 3 * BACKFILL_CHUNK), Some((1, 1 + BACKFILL_CHUNK)));
    }

    #[test]
    fn subscribers_apply_in_order_and_notice_gaps() {
        assert_eq!(accept(10, 10, 15), Accept::Apply);
        assert_eq!(accept(12, 10, 15), Accept::Apply);
        assert_eq!(accept(15, 10, 15), Accept::Duplicate);
        assert_eq!(accept(9, 10, 15), Accept::Gap);
    }

    #[test]
    fn only_own_changes_go_live_and_never_back_to_their_sequencer() {
        let m = StoredMessage {
            conversation: ConversationId::group("g"),
            seq: 1,
            id: "x".into(),
            client_id: None,
            sender: "u".into(),
            recipient: None,
            group_id: Some("g".into()),
            chat_type: 1,
            msg_type: 0,
            content: "hi".into(),
            extras: None,
            nick: None,
            avatar: None,
            created_at: 0,
            origin: "iad-1".into(),
            recalled_at: None,
        };
        let change = Change::Message(m);
        assert!(ships_live(true, &change, "fra-1"));
        assert!(!ships_live(true, &change, "iad-1"));
        assert!(!ships_live(false, &change, "fra-1"));
        let cursor = Change::Member { group_id: "g".into(), user_id: "u".into(), removed: false, changed_at: 0, changed_by: String::new() };
        assert!(ships_live(true, &cursor, "iad-1"));
        assert!(!ships_live(false, &cursor, "iad-1"));
    }

    #[test]
    fn ready_after_catching_up_or_waiting_out_an_unreachable_peer() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(3);
        let mut c = CatchUp::new(["a", "b"], t0, grace);
        c.caught_up("a");
        assert!(!c.ready(t0 + Duration::from_secs(1), |_| false), "b may still answer");
        assert!(!c.ready(t0 + Duration::from_secs(5), |p| p == "b"), "b is reachable: wait for its catch-up");
        assert!(c.ready(t0 + Duration::from_secs(5), |_| false), "b is unreachable after the grace time");
        assert!(c.ready(t0, |_| true), "stays ready");
        assert!(CatchUp::new([], t0, grace).ready(t0, |_| true), "a single node is ready at once");
        let mut d = CatchUp::new(["a"], t0, grace);
        d.caught_up("a");
        assert!(d.ready(t0, |_| true));
    }
}

//! Who in the mesh is alive, as this node sees it. No I/O and no clock of its own: callers pass
//! `now`, so the rules are tested with made-up times.
//!
//! A peer is `Up` while its heartbeats arrive; `Suspect` after three beat intervals without one
//! (still counted: its users stay online, sends to it are still tried); `Down` after the
//! configured timeout (its users are dropped from the presence view). A peer never heard from
//! since this node started is `Down`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A peer's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Heartbeats arrive.
    Up,
    /// Three beats missed.
    Suspect,
    /// Silent for the down timeout, or never heard from.
    Down,
}

impl PeerState {
    /// Name for metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            PeerState::Up => "up",
            PeerState::Suspect => "suspect",
            PeerState::Down => "down",
        }
    }
}

/// A change of a peer's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The peer.
    pub peer: String,
    /// Old state.
    pub from: PeerState,
    /// New state.
    pub to: PeerState,
}

#[derive(Debug)]
struct Entry {
    state: PeerState,
    last_heard: Option<Instant>,
}

/// The membership table.
#[derive(Debug)]
pub struct Membership {
    beat: Duration,
    down_after: Duration,
    peers: BTreeMap<String, Entry>,
}

impl Membership {
    /// Every peer starts `Down` (never heard from).
    pub fn new<'a>(peers: impl IntoIterator<Item = &'a str>, beat: Duration, down_after: Duration) -> Membership {
        let peers = peers.into_iter().map(|p| (p.to_string(), Entry { state: PeerState::Down, last_heard: None })).collect();
        Membership { beat, down_after: down_after.max(beat * 3), peers }
    }

    /// A heartbeat (or any frame) from `peer` at `now`. Returns the transition to `Up`, if any.
    pub fn heard(&mut self, peer: &str, now: Instant) -> Option<Transition> {
        let entry = self.peers.get_mut(peer)?;
        entry.last_heard = Some(entry.last_heard.map_or(now, |t| t.max(now)));
        let from = entry.state;
        entry.state = PeerState::Up;
        (from != PeerState::Up).then(|| Transition { peer: peer.to_string(), from, to: PeerState::Up })
    }

    /// Applies the timers at `now`; returns what changed.
    pub fn tick(&mut self, now: Instant) -> Vec<Transition> {
        let mut out = Vec::new();
        for (peer, entry) in &mut self.peers {
            let Some(last) = entry.last_heard else { continue };
            let silent = now.saturating_duration_since(last);
            let to = if silent >= self.down_after {
                PeerState::Down
            } else if silent >= self.beat * 3 {
                PeerState::Suspect
            } else {
                PeerState::Up
            };
            if to != entry.state {
                out.push(Transition { peer: peer.clone(), from: entry.state, to });
                entry.state = to;
            }
        }
        out
    }

    /// `peer` said goodbye (it is stopping): down now, without waiting for its beats to stop.
    pub fn left(&mut self, peer: &str) -> Option<Transition> {
        let entry = self.peers.get_mut(peer)?;
        let from = entry.state;
        entry.state = PeerState::Down;
        entry.last_heard = None;
        (from != PeerState::Down).then(|| Transition { peer: peer.to_string(), from, to: PeerState::Down })
    }

    /// A peer's state (`Down` for an unknown peer).
    pub fn state(&self, peer: &str) -> PeerState {
        self.peers.get(peer).map_or(PeerState::Down, |e| e.state)
    }

    /// Every peer and its state.
    pub fn states(&self) -> impl Iterator<Item = (&str, PeerState)> {
        self.peers.iter().map(|(p, e)| (p.as_str(), e.state))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    const BEAT: Duration = Duration::from_millis(300);

    #[test]
    fn up_suspect_down_and_back() {
        let t0 = Instant::now();
        let mut m = Membership::new(["a", "b"], BEAT, Duration::from_secs(3));
        assert_eq!(m.state("a"), PeerState::Down, "never heard from");
        assert!(m.tick(t0 + Duration::from_secs(60)).is_empty(), "silence from a peer never heard is no news");
        let up = m.heard("a", t0).unwrap();
        assert_eq!((up.from, up.to), (PeerState::Down, PeerState::Up));
        assert!(m.heard("a", t0 + BEAT).is_none(), "already up");
        assert!(m.tick(t0 + BEAT * 3).is_empty(), "two beats missed is fine");
        let t = m.tick(t0 + BEAT * 4);
        assert_eq!(t, vec![Transition { peer: "a".into(), from: PeerState::Up, to: PeerState::Suspect }]);
        assert!(m.tick(t0 + Duration::from_millis(3000)).is_empty(), "not yet down");
        let t = m.tick(t0 + BEAT + Duration::from_secs(3));
        assert_eq!(t, vec![Transition { peer: "a".into(), from: PeerState::Suspect, to: PeerState::Down }]);
        assert_eq!(m.state("b"), PeerState::Down);
        let back = m.heard("a", t0 + Duration::from_secs(10)).unwrap();
        assert_eq!((back.from, back.to), (PeerState::Down, PeerState::Up));
        assert!(m.heard("stranger", t0).is_none(), "unknown peers are ignored");
    }

    #[test]
    fn an_old_beat_does_not_move_the_clock_back() {
        let t0 = Instant::now();
        let mut m = Membership::new(["a"], BEAT, Duration::from_secs(3));
        m.heard("a", t0 + Duration::from_secs(2));
        m.heard("a", t0);
        assert!(m.tick(t0 + Duration::from_millis(2500)).is_empty());
    }
}

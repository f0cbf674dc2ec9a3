//! Who takes which queued conversation: pure, with the clock passed in. The agent with the
//! fewest open conversations under their limit gets the oldest queued one; ties go to the agent
//! idle longest (given a conversation least recently). A reopened conversation goes back to its
//! last agent when they can take it; one transferred to a team waits for that team's agents.

/// An agent as the router sees them.
#[derive(Debug, Clone)]
pub struct Seat<'a> {
    /// Agent id.
    pub id: &'a str,
    /// Online (a session open somewhere) and not busy.
    pub available: bool,
    /// Open conversations assigned now.
    pub open: u32,
    /// Most open conversations at once.
    pub limit: u32,
    /// When they were last given one (epoch ms).
    pub last_assigned_at: i64,
    /// Their teams.
    pub teams: &'a [String],
}

/// A queued conversation.
#[derive(Debug, Clone)]
pub struct Waiting<'a> {
    /// Conversation id.
    pub id: &'a str,
    /// Its inbox: each inbox is a queue of its own.
    pub inbox: &'a str,
    /// The agents of its inbox; empty: every agent.
    pub agents: &'a [String],
    /// When it joined the queue (epoch ms): the order.
    pub queued_at: i64,
    /// Only this team's agents take it.
    pub team: Option<&'a str>,
    /// Give it to this agent if they can take it (its last agent).
    pub prefer: Option<&'a str>,
}

/// The assignments to make now, oldest queued first: (conversation, agent).
pub fn plan<'a>(queue: &[Waiting<'a>], seats: &[Seat<'a>], now: i64) -> Vec<(&'a str, &'a str)> {
    let mut seats: Vec<Seat<'a>> = seats.iter().filter(|s| s.available).cloned().collect();
    let mut order: Vec<&Waiting<'a>> = queue.iter().collect();
    order.sort_by_key(|w| (w.queued_at, w.id));
    let mut out = Vec::new();
    for w in order {
        let fits = |s: &Seat<'_>| {
            s.open < s.limit
                && w.team.is_none_or(|t| s.teams.iter().any(|x| x == t))
                && (w.agents.is_empty() || w.agents.iter().any(|a| a == s.id))
        };
        let preferred = w.prefer.and_then(|p| seats.iter().position(|s| s.id == p && fits(s)));
        let chosen = preferred.or_else(|| {
            seats.iter().enumerate().filter(|(_, s)| fits(s)).min_by_key(|(_, s)| (s.open, s.last_assigned_at, s.id)).map(|(i, _)| i)
        });
        if let Some(i) = chosen {
            seats[i].open += 1;
            seats[i].last_assigned_at = now;
            out.push((w.id, seats[i].id));
        }
    }
    out
}

/// Where each queued conversation stands in its inbox's queue (1 = next), in queue order.
pub fn positions<'a>(queue: &[Waiting<'a>]) -> Vec<(&'a str, usize)> {
    let mut order: Vec<&Waiting<'a>> = queue.iter().collect();
    order.sort_by_key(|w| (w.queued_at, w.id));
    let mut ahead: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    order
        .into_iter()
        .map(|w| {
            let n = ahead.entry(w.inbox).or_default();
            *n += 1;
            (w.id, *n)
        })
        .collect()
}

/// Whether an assignee offline since `since` (epoch ms) has been gone past the grace period.
pub fn gone_too_long(since: i64, now: i64, grace_ms: i64) -> bool {
    now - since >= grace_ms
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seat<'a>(id: &'a str, open: u32, limit: u32, last: i64) -> Seat<'a> {
        Seat { id, available: true, open, limit, last_assigned_at: last, teams: &[] }
    }

    fn waiting(id: &str, at: i64) -> Waiting<'_> {
        Waiting { id, inbox: "shop", agents: &[], queued_at: at, team: None, prefer: None }
    }

    #[test]
    fn three_agents_of_limit_two_take_six_of_seven_evenly_and_one_waits() {
        let seats = [seat("a", 0, 2, 0), seat("b", 0, 2, 0), seat("c", 0, 2, 0)];
        let queue: Vec<Waiting<'_>> =
            ["v1", "v2", "v3", "v4", "v5", "v6", "v7"].iter().enumerate().map(|(i, id)| waiting(id, i as i64)).collect();
        let plan = plan(&queue, &seats, 100);
        assert_eq!(plan.len(), 6);
        for agent in ["a", "b", "c"] {
            assert_eq!(plan.iter().filter(|(_, a)| *a == agent).count(), 2, "{plan:?}");
        }
        assert!(!plan.iter().any(|(c, _)| *c == "v7"), "the newest waits: {plan:?}");
    }

    #[test]
    fn the_fewest_open_wins_then_the_one_idle_longest() {
        let seats = [seat("busy", 2, 5, 0), seat("recent", 1, 5, 50), seat("idle", 1, 5, 10)];
        assert_eq!(plan(&[waiting("x", 1)], &seats, 100), vec![("x", "idle")]);
        // Full or unavailable agents take nothing.
        let seats = [seat("full", 2, 2, 0), Seat { available: false, ..seat("away", 0, 2, 0) }];
        assert!(plan(&[waiting("x", 1)], &seats, 100).is_empty());
    }

    #[test]
    fn the_oldest_queued_goes_first_whatever_the_list_order() {
        let seats = [seat("a", 1, 2, 0)];
        assert_eq!(plan(&[waiting("new", 9), waiting("old", 3)], &seats, 100), vec![("old", "a")]);
        assert_eq!(positions(&[waiting("new", 9), waiting("old", 3)]), vec![("old", 1), ("new", 2)]);
    }

    #[test]
    fn a_reopened_conversation_goes_back_to_its_agent_and_a_team_waits_for_its_own() {
        let sales = ["sales".to_string()];
        let seats = [seat("a", 0, 2, 0), Seat { teams: &sales, ..seat("b", 1, 2, 0) }];
        let back = Waiting { prefer: Some("b"), ..waiting("r", 1) };
        assert_eq!(plan(&[back], &seats, 100), vec![("r", "b")]);
        let team = Waiting { team: Some("sales"), ..waiting("t", 1) };
        assert_eq!(plan(std::slice::from_ref(&team), &seats, 100), vec![("t", "b")]);
        assert!(plan(&[team], &seats[..1], 100).is_empty());
    }

    #[test]
    fn an_inbox_with_its_own_agents_is_a_queue_of_its_own() {
        let bank_agents = ["b".to_string()];
        let seats = [seat("a", 0, 5, 0), seat("b", 1, 5, 0)];
        // The bank's conversation waits for its own agent even though "a" is freer.
        let bank = Waiting { inbox: "bank", agents: &bank_agents, ..waiting("x", 1) };
        assert_eq!(plan(std::slice::from_ref(&bank), &seats, 100), vec![("x", "b")]);
        assert!(plan(std::slice::from_ref(&bank), &seats[..1], 100).is_empty());
        // Positions count only the same inbox's queue.
        let queue = [waiting("s1", 1), Waiting { inbox: "bank", ..waiting("b1", 2) }, waiting("s2", 3)];
        assert_eq!(positions(&queue), vec![("s1", 1), ("b1", 1), ("s2", 2)]);
    }

    #[test]
    fn an_assignee_is_replaced_only_after_the_grace_period() {
        assert!(!gone_too_long(50, 100, 60));
        assert!(gone_too_long(40, 100, 60));
    }
}

//! Placement: which node owns (sequences) a conversation. A pure function of the conversation id
//! and the *configured* cluster, never of who is alive, so every node agrees without talking and
//! a partition cannot produce two sequencers (DESIGN §7, both traps).
//!
//! The home region is chosen by rendezvous (highest random weight) hashing of the conversation id
//! over the configured regions; the owner by the same hashing over the configured nodes of that
//! region. Adding a node moves only the conversations it now wins. The hash is FNV-1a 64 with a
//! final mix, written out here so that it never changes with a library version.

/// A node as configured: its id and its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    /// Node id (stable across restarts).
    pub id: String,
    /// Region name (e.g. `iad`, `fra`, `sin`).
    pub region: String,
}

/// The region that owns `conversation` among `regions` (any order; duplicates are harmless).
/// `None` only when `regions` is empty.
pub fn home_region<'a>(conversation: &str, regions: &[&'a str]) -> Option<&'a str> {
    regions.iter().copied().max_by_key(|r| (weight(conversation, r), *r))
}

/// The node that owns `conversation`: the rendezvous winner among the configured nodes of its
/// home region. `None` only when `nodes` is empty.
pub fn owner<'a>(conversation: &str, nodes: &'a [NodeSpec]) -> Option<&'a NodeSpec> {
    let regions: Vec<&str> = nodes.iter().map(|n| n.region.as_str()).collect();
    let region = home_region(conversation, &regions)?;
    nodes.iter().filter(|n| n.region == region).max_by_key(|n| (weight(conversation, &n.id), n.id.as_str()))
}

/// A fingerprint of the configured cluster: 16 hex digits that are equal on two nodes exactly
/// when their node lists (ids and regions, in any order) are equal, as far as a 64-bit hash can
/// tell. Nodes exchange it in the mesh hello: two nodes with different lists could both think
/// they own a conversation, so they refuse to work together (DESIGN §7).
pub fn fingerprint(nodes: &[NodeSpec]) -> String {
    let mut lines: Vec<String> = nodes.iter().map(|n| format!("{}@{}", n.id, n.region)).collect();
    lines.sort();
    lines.dedup();
    format!("{:016x}", hash(lines.join("\n").bytes()))
}

/// The rendezvous weight of `candidate` for `key`.
fn weight(key: &str, candidate: &str) -> u64 {
    hash(key.bytes().chain([0xff]).chain(candidate.bytes()))
}

/// FNV-1a 64 over `bytes`, finished with a 64-bit avalanche.
fn hash(bytes: impl Iterator<Item = u8>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV alone mixes the last bytes poorly; finish with a 64-bit avalanche (splitmix64's).
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn nodes(spec: &[(&str, &str)]) -> Vec<NodeSpec> {
        spec.iter().map(|(id, region)| NodeSpec { id: id.to_string(), region: region.to_string() }).collect()
    }

    #[test]
    fn the_same_answer_whatever_the_order() {
        let a = nodes(&[("n1", "iad"), ("n2", "iad"), ("n3", "fra"), ("n4", "sin")]);
        let mut b = a.clone();
        b.reverse();
        for i in 0..500 {
            let conv = format!("p:u{i}:v{i}");
            assert_eq!(owner(&conv, &a), owner(&conv, &b), "{conv}");
        }
        // Pinned values: a change of the hash would move every conversation in a live cluster.
        assert_eq!(weight("g:100", "iad"), 0x3aeb_541f_76fe_6b30);
        assert_eq!(weight("p:alice:bob", "fra"), 0x8297_2582_35de_4fe6);
        assert_eq!(home_region("g:100", &["iad", "fra", "sin"]), home_region("g:100", &["sin", "iad", "fra"]));
    }

    #[test]
    fn spreads_evenly_and_moves_little_when_a_node_joins() {
        let three = nodes(&[("a", "r"), ("b", "r"), ("c", "r")]);
        let four = nodes(&[("a", "r"), ("b", "r"), ("c", "r"), ("d", "r")]);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let mut moved = 0;
        for i in 0..10_000 {
            let conv = format!("g:{i}");
            let before = owner(&conv, &three).unwrap();
            *counts.entry(before.id.as_str()).or_default() += 1;
            let after = owner(&conv, &four).unwrap();
            if before.id != after.id {
                assert_eq!(after.id, "d", "a conversation only moves to the new node");
                moved += 1;
            }
        }
        for (node, n) in counts {
            assert!((3_000..3_700).contains(&n), "{node} owns {n} of 10,000");
        }
        assert!((2_200..2_800).contains(&moved), "{moved} moved; about a quarter should");
    }

    #[test]
    fn the_fingerprint_sees_every_id_and_region_but_not_the_order() {
        let a = nodes(&[("n1", "iad"), ("n2", "fra"), ("n3", "sin")]);
        let mut b = a.clone();
        b.reverse();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 16);
        let moved = nodes(&[("n1", "iad"), ("n2", "sin"), ("n3", "sin")]);
        let fewer = nodes(&[("n1", "iad"), ("n2", "fra")]);
        let renamed = nodes(&[("n1", "iad"), ("n2", "fra"), ("n4", "sin")]);
        for other in [&moved, &fewer, &renamed] {
            assert_ne!(fingerprint(&a), fingerprint(other), "{other:?}");
        }
        // Pinned: nodes of two releases must compute the same fingerprint.
        assert_eq!(fingerprint(&nodes(&[("iad-1", "iad")])), "cfbda281b56204be");
    }

    #[test]
    fn home_region_does_not_depend_on_liveness() {
        // Only configuration goes in: there is no way to pass "who is up".
        let cluster = nodes(&[("i1", "iad"), ("f1", "fra")]);
        let owner_of = |c: &str| owner(c, &cluster).unwrap().id.clone();
        let first = owner_of("p:alice:bob");
        assert_eq!(owner_of("p:alice:bob"), first);
        assert!(owner("x", &[]).is_none());
    }
}

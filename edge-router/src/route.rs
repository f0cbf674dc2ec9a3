//! The routing choices, as pure functions over a snapshot of the node table: which region a
//! client asks for, and which node serves it. No sockets here; `main.rs` feeds them.

use std::time::{Duration, Instant};

/// A configured node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Node id.
    pub id: String,
    /// Its region.
    pub region: String,
    /// Its J-IM port (HTTP, WebSocket and binary TCP, sniffed).
    pub http: String,
    /// Its admin port (`/readyz`, `/metrics`).
    pub admin: String,
    /// Its QUIC address, advertised to clients (not proxied).
    #[serde(default)]
    pub quic: Option<String>,
}

/// What the health poller last learnt of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// `/readyz` answered 200 at the last poll.
    pub ready: bool,
    /// When a poll last found it ready.
    pub last_ready: Option<Instant>,
    /// `kefu_connections` from its `/metrics`.
    pub connections: u64,
    /// The TLS fingerprint the node publishes (`kefu_tls_fingerprint_info`), if any.
    pub fingerprint: Option<String>,
}

impl Health {
    /// Whether the node takes new requests and connections at `now`: ready at the last poll, and
    /// that poll no older than `drain_after` (a node that stops answering is drained within it).
    pub fn serves(&self, now: Instant, drain_after: Duration) -> bool {
        self.ready && self.last_ready.is_some_and(|t| now.saturating_duration_since(t) <= drain_after)
    }
}

/// The region a client asks for, from its request: `fly-force-region`, then the first of the
/// `fly-prefer-region` list, `Fly-Region`, `X-Kefu-Region`, `?region=`, else `default` (the
/// router's own region). `header` looks a header up by its lower-case name.
pub fn client_regions<'a>(header: impl Fn(&str) -> Option<&'a str>, query_region: Option<&'a str>, default: &'a str) -> Vec<String> {
    if let Some(forced) = header("fly-force-region").map(str::trim).filter(|r| !r.is_empty()) {
        return vec![forced.to_string()];
    }
    let mut out: Vec<String> = Vec::new();
    if let Some(list) = header("fly-prefer-region") {
        out.extend(list.split(',').map(str::trim).filter(|r| !r.is_empty()).map(str::to_string));
    }
    for r in [header("fly-region"), header("x-kefu-region"), query_region].into_iter().flatten() {
        let r = r.trim();
        if !r.is_empty() && !out.iter().any(|o| o == r) {
            out.push(r.to_string());
        }
    }
    if out.is_empty() {
        out.push(default.to_string());
    }
    out
}

/// Whether the request forced its region (`fly-force-region`): then no other region may serve it.
pub fn forced<'a>(header: impl Fn(&str) -> Option<&'a str>) -> bool {
    header("fly-force-region").is_some_and(|r| !r.trim().is_empty())
}

/// The node for a client that asks for `wanted` (in order of preference): the serving node with
/// the fewest connections in the first wanted region that has one (ties by id); if none, the
/// same in the regions of `fallback` in order (the nearest first), then in any region — unless
/// `strict` (a forced region), when there is no node at all.
pub fn choose<'a>(
    nodes: &'a [(NodeSpec, Health)],
    wanted: &[String],
    fallback: &[String],
    strict: bool,
    now: Instant,
    drain_after: Duration,
) -> Option<&'a NodeSpec> {
    choose_except(nodes, wanted, fallback, strict, now, drain_after, None)
}

/// [`choose`], leaving out the node `except` (a replay with `elsewhere=true`).
fn choose_except<'a>(
    nodes: &'a [(NodeSpec, Health)],
    wanted: &[String],
    fallback: &[String],
    strict: bool,
    now: Instant,
    drain_after: Duration,
    except: Option<&str>,
) -> Option<&'a NodeSpec> {
    let serving = |spec: &NodeSpec, health: &Health| health.serves(now, drain_after) && except != Some(spec.id.as_str());
    let best_in = |region: Option<&str>| {
        nodes
            .iter()
            .filter(|(spec, health)| region.is_none_or(|r| spec.region == r) && serving(spec, health))
            .min_by(|(a, ha), (b, hb)| ha.connections.cmp(&hb.connections).then_with(|| a.id.cmp(&b.id)))
            .map(|(spec, _)| spec)
    };
    if let Some(node) = wanted.iter().find_map(|r| best_in(Some(r))) {
        return Some(node);
    }
    if strict {
        return None;
    }
    fallback.iter().find_map(|r| best_in(Some(r))).or_else(|| best_in(None))
}

/// Where a request goes when the node `from` answered it with `replay`, for a client that asked
/// for `wanted`, as Fly's proxy picks: `instance` is that node or nothing; `prefer_instance` is
/// that node when it serves, else the rest of the replay decides; `region` is a preference list
/// (`any` for any region) that is not widened to other regions; with neither, the client's own
/// regions and the fallback order as for a new request. `elsewhere` leaves `from` out. `None`:
/// no node serves the replay (the caller falls back or errs).
pub fn replay_target<'a>(
    nodes: &'a [(NodeSpec, Health)],
    replay: &schema::fly_replay::Replay,
    from: &str,
    wanted: &[String],
    fallback: &[String],
    now: Instant,
    drain_after: Duration,
) -> Option<&'a NodeSpec> {
    let the = |id: &str| nodes.iter().find(|(spec, health)| spec.id == id && health.serves(now, drain_after)).map(|(spec, _)| spec);
    if let Some(id) = &replay.instance {
        return the(id);
    }
    if let Some(node) = replay.prefer_instance.as_deref().and_then(the) {
        return Some(node);
    }
    let except = replay.elsewhere.then_some(from);
    if replay.regions.is_empty() {
        return choose_except(nodes, wanted, fallback, false, now, drain_after, except);
    }
    replay.regions.iter().find_map(|r| {
        if r == "any" {
            choose_except(nodes, wanted, fallback, false, now, drain_after, except)
        } else {
            choose_except(nodes, std::slice::from_ref(r), &[], true, now, drain_after, except)
        }
    })
}

/// Reads `kefu_connections` (the sum over its labels) out of Prometheus text.
pub fn connections_in(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("kefu_connections{") || l.starts_with("kefu_connections "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v.max(0.0) as u64)
        .sum()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    fn node(id: &str, region: &str) -> NodeSpec {
        NodeSpec { id: id.into(), region: region.into(), http: format!("{id}:8888"), admin: format!("{id}:9090"), quic: None }
    }

    fn up(connections: u64, now: Instant) -> Health {
        Health { ready: true, last_ready: Some(now), connections, fingerprint: None }
    }

    #[test]
    fn the_region_comes_from_the_headers_in_fly_order_then_the_query_then_the_router() {
        let h = |pairs: &'static [(&'static str, &'static str)]| move |name: &str| pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        assert_eq!(client_regions(h(&[("fly-force-region", "sin"), ("fly-region", "iad")]), Some("fra"), "ord"), ["sin"]);
        assert_eq!(client_regions(h(&[("fly-prefer-region", "fra, sin"), ("fly-region", "iad")]), None, "ord"), ["fra", "sin", "iad"]);
        assert_eq!(client_regions(h(&[("x-kefu-region", "sin")]), Some("fra"), "ord"), ["sin", "fra"]);
        assert_eq!(client_regions(h(&[]), Some("fra"), "ord"), ["fra"]);
        assert_eq!(client_regions(h(&[]), None, "ord"), ["ord"]);
        assert!(forced(h(&[("fly-force-region", "sin")])));
        assert!(!forced(h(&[("fly-region", "sin")])));
    }

    #[test]
    fn least_connections_in_the_region_then_the_nearest_region_then_any() {
        let now = Instant::now();
        let drain = Duration::from_secs(3);
        let mut table = vec![
            (node("iad-1", "iad"), up(5, now)),
            (node("iad-2", "iad"), up(2, now)),
            (node("fra-1", "fra"), up(0, now)),
            (node("sin-1", "sin"), up(9, now)),
        ];
        let want = |r: &str| vec![r.to_string()];
        assert_eq!(choose(&table, &want("iad"), &[], false, now, drain).unwrap().id, "iad-2", "fewest connections");
        assert_eq!(choose(&table, &want("ord"), &["sin".into(), "fra".into()], false, now, drain).unwrap().id, "sin-1", "fallback order");
        assert_eq!(choose(&table, &want("ord"), &[], false, now, drain).unwrap().id, "fra-1", "any region, fewest connections");
        assert!(choose(&table, &want("ord"), &[], true, now, drain).is_none(), "a forced region has no fallback");
        // iad-2 not ready: drained at once; iad-1 silent for longer than the drain time: drained.
        table[1].1.ready = false;
        assert_eq!(choose(&table, &want("iad"), &[], false, now, drain).unwrap().id, "iad-1");
        table[0].1.last_ready = Some(now - Duration::from_secs(4));
        assert_eq!(choose(&table, &want("iad"), &["fra".into()], false, now, drain).unwrap().id, "fra-1");
        // Back when ready again.
        table[1].1 = up(2, now);
        assert_eq!(choose(&table, &want("iad"), &[], false, now, drain).unwrap().id, "iad-2");
    }

    #[test]
    fn a_replay_goes_where_its_fields_say_and_nowhere_else() {
        use schema::fly_replay::Replay;
        let now = Instant::now();
        let drain = Duration::from_secs(3);
        let mut table = vec![
            (node("iad-1", "iad"), up(1, now)),
            (node("iad-2", "iad"), up(3, now)),
            (node("fra-1", "fra"), up(4, now)),
            (node("fra-2", "fra"), up(2, now)),
            (node("sin-1", "sin"), up(0, now)),
        ];
        let target = |table: &[(NodeSpec, Health)], header: &str, wanted: &[&str]| {
            let wanted: Vec<String> = wanted.iter().map(|s| s.to_string()).collect();
            replay_target(table, &Replay::parse(header).unwrap(), "iad-1", &wanted, &["fra".into()], now, drain).map(|n| n.id.clone())
        };
        assert_eq!(target(&table, "region=fra", &["iad"]).as_deref(), Some("fra-2"), "least connections in the region");
        assert_eq!(target(&table, "region=\"ord,fra,sin\"", &["iad"]).as_deref(), Some("fra-2"), "first region with a node");
        assert_eq!(target(&table, "region=iad", &["iad"]).as_deref(), Some("iad-1"), "the answering node may be chosen again");
        assert_eq!(target(&table, "region=iad;elsewhere=true", &["iad"]).as_deref(), Some("iad-2"), "elsewhere leaves it out");
        assert_eq!(target(&table, "elsewhere=true", &["iad"]).as_deref(), Some("iad-2"), "the client's region, without the answering node");
        assert_eq!(target(&table, "region=ord", &["iad"]), None, "a region list is not widened");
        assert_eq!(target(&table, "region=ord,any", &["iad"]).as_deref(), Some("iad-1"), "any: the client's own choice");
        assert_eq!(target(&table, "instance=fra-1", &["iad"]).as_deref(), Some("fra-1"));
        assert_eq!(target(&table, "instance=nope;region=fra", &["iad"]), None, "an instance is that node or nothing");
        assert_eq!(target(&table, "prefer_instance=nope;region=sin", &["iad"]).as_deref(), Some("sin-1"), "prefer_instance yields");
        assert_eq!(target(&table, "prefer_instance=fra-1;region=sin", &["iad"]).as_deref(), Some("fra-1"));
        // Drained nodes are never targets.
        table[2].1.ready = false;
        assert_eq!(target(&table, "instance=fra-1", &["iad"]), None);
        table[3].1.last_ready = Some(now - Duration::from_secs(10));
        assert_eq!(target(&table, "region=fra", &["iad"]), None);
        assert_eq!(target(&table, "prefer_instance=fra-1", &["sin"]).as_deref(), Some("sin-1"));
    }

    #[test]
    fn connections_are_summed_over_transports() {
        let text = "# HELP kefu_connections x\nkefu_connections{transport=\"tcp\"} 3\nkefu_connections{transport=\"ws\"} 2\nkefu_connections_total 99\n";
        assert_eq!(connections_in(text), 5);
        assert_eq!(connections_in(""), 0);
    }
}

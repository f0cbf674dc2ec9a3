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
    let best_in = |region: &str| {
        nodes
            .iter()
            .filter(|(spec, health)| spec.region == region && health.serves(now, drain_after))
            .min_by(|(a, ha), (b, hb)| ha.connections.cmp(&hb.connections).then_with(|| a.id.cmp(&b.id)))
            .map(|(spec, _)| spec)
    };
    if let Some(node) = wanted.iter().find_map(|r| best_in(r)) {
        return Some(node);
    }
    if strict {
        return None;
    }
    if let Some(node) = fallback.iter().find_map(|r| best_in(r)) {
        return Some(node);
    }
    nodes
        .iter()
        .filter(|(_, h)| h.serves(now, drain_after))
        .min_by(|(a, ha), (b, hb)| ha.connections.cmp(&hb.connections).then_with(|| a.id.cmp(&b.id)))
        .map(|(spec, _)| spec)
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
    fn connections_are_summed_over_transports() {
        let text = "# HELP kefu_connections x\nkefu_connections{transport=\"tcp\"} 3\nkefu_connections{transport=\"ws\"} 2\nkefu_connections_total 99\n";
        assert_eq!(connections_in(text), 5);
        assert_eq!(connections_in(""), 0);
    }
}

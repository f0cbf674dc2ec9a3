//! Router settings: a TOML file (`--config router.toml`), every key also a flag and a
//! `KEFU_ROUTER_<NAME>` variable, which win over the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use serde::Deserialize;

use crate::route::NodeSpec;

/// Command-line flags.
#[derive(Debug, Default, Parser)]
#[command(name = "kefu-router", version, about = "kefu edge router: /v1/connect, HTTP, WebSocket and J-IM TCP to the best node")]
pub struct Flags {
    /// TOML file with the settings below and the `[[nodes]]` table.
    #[arg(long, env = "KEFU_ROUTER_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP and WebSocket (default 127.0.0.1:8787).
    #[arg(long, env = "KEFU_ROUTER_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Raw J-IM binary TCP (default 127.0.0.1:8788).
    #[arg(long, env = "KEFU_ROUTER_TCP_LISTEN")]
    pub tcp_listen: Option<SocketAddr>,
    /// Where the router runs: the region of clients that name none (default `local`).
    #[arg(long, env = "KEFU_ROUTER_REGION")]
    pub region: Option<String>,
    /// Regions to try, nearest first, when the client's has no healthy node (comma separated).
    #[arg(long, env = "KEFU_ROUTER_FALLBACK", value_delimiter = ',')]
    pub fallback: Option<Vec<String>>,
    /// Milliseconds between health polls of each node (default 1000).
    #[arg(long, env = "KEFU_ROUTER_POLL_MS")]
    pub poll_ms: Option<u64>,
    /// Milliseconds without a ready answer before a node is drained (default 3000).
    #[arg(long, env = "KEFU_ROUTER_DRAIN_MS")]
    pub drain_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    listen: Option<SocketAddr>,
    tcp_listen: Option<SocketAddr>,
    region: Option<String>,
    fallback: Option<Vec<String>>,
    poll_ms: Option<u64>,
    drain_ms: Option<u64>,
    #[serde(default)]
    nodes: Vec<NodeSpec>,
}

/// The resolved settings.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// HTTP and WebSocket.
    pub listen: SocketAddr,
    /// J-IM binary TCP.
    pub tcp_listen: SocketAddr,
    /// The router's region.
    pub region: String,
    /// Fallback regions, nearest first.
    pub fallback: Vec<String>,
    /// Health poll interval.
    pub poll: Duration,
    /// A node silent (or not ready) this long gets nothing new.
    pub drain_after: Duration,
    /// The nodes.
    pub nodes: Vec<NodeSpec>,
}

impl RouterConfig {
    /// Flags over the file over the defaults.
    pub fn resolve(flags: Flags) -> anyhow::Result<RouterConfig> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str::<FileSettings>(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => FileSettings::default(),
        };
        if file.nodes.is_empty() {
            bail!("no nodes: give a config file with [[nodes]] entries (id, region, http, admin, quic)");
        }
        for (i, n) in file.nodes.iter().enumerate() {
            if file.nodes[..i].iter().any(|m| m.id == n.id) {
                bail!("node {} is listed twice", n.id);
            }
        }
        Ok(RouterConfig {
            listen: flags.listen.or(file.listen).unwrap_or_else(|| ([127, 0, 0, 1], 8787).into()),
            tcp_listen: flags.tcp_listen.or(file.tcp_listen).unwrap_or_else(|| ([127, 0, 0, 1], 8788).into()),
            region: flags.region.or(file.region).unwrap_or_else(|| "local".into()),
            fallback: flags.fallback.or(file.fallback).unwrap_or_default(),
            poll: Duration::from_millis(flags.poll_ms.or(file.poll_ms).unwrap_or(1000).max(10)),
            drain_after: Duration::from_millis(flags.drain_ms.or(file.drain_ms).unwrap_or(3000).max(10)),
            nodes: file.nodes,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn the_file_gives_the_nodes_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("router.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1\"\nregion = \"iad\"\n[[nodes]]\nid = \"iad-1\"\nregion = \"iad\"\nhttp = \"127.0.0.1:8888\"\nadmin = \"127.0.0.1:9090\"\nquic = \"127.0.0.1:8443\"\n",
        )
        .unwrap();
        let flags = Flags { config: Some(path.clone()), region: Some("fra".into()), ..Flags::default() };
        let c = RouterConfig::resolve(flags).unwrap();
        assert_eq!((c.listen.port(), c.region.as_str(), c.nodes.len()), (1, "fra", 1));
        assert_eq!(c.tcp_listen.port(), 8788);
        assert_eq!(c.drain_after, Duration::from_secs(3));
        std::fs::write(&path, "[[nodes]]\nid = \"a\"\nregion = \"r\"\nhttp = \"x\"\nadmin = \"y\"\nport = 1\n").unwrap();
        let err = RouterConfig::resolve(Flags { config: Some(path), ..Flags::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("port"), "unknown keys are named: {err:#}");
        assert!(RouterConfig::resolve(Flags::default()).is_err(), "no nodes");
    }
}

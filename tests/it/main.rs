//! Every cross-crate test, compiled as one binary. Each test starts its own real node process
//! (port 0, temporary data dir) through the harness and talks to it over real sockets.

#![allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test

mod accounts;
mod admin;
mod bad_input;
mod browser;
mod chaos;
mod cli;
mod cluster;
mod drain;
mod durability;
mod extensions;
mod groups;
mod http_api;
mod interop;
mod jim_tcp;
mod limits;
mod mesh_rules;
mod offline;
mod parity;
mod quic;
mod recall;
mod router;
mod security;
mod support;
mod tls;
mod ws;

use tests::TestNode;

/// The node binary built by this package.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_test-node")
}

/// A node with the defaults.
pub async fn node() -> TestNode {
    TestNode::start(bin()).await.expect("node starts")
}

/// Drops the fields that differ between runs (ids, times, tokens) so replies can be compared.
pub fn normalize(mut v: serde_json::Value) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for key in ["id", "createTime", "token", "terminal", "recalledAt"] {
                    map.remove(key);
                }
                map.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut v);
    v
}

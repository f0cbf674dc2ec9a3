//! Shared code of the runnable examples: the load generator's library half, which the
//! `loadgen` example drives and the smoke test runs in-process, and what several examples share.

pub mod loadgen;

use std::path::PathBuf;

/// The `kefu-node` binary built next to the running example (target/<profile>/examples/x →
/// target/<profile>/kefu-node); build it first with `cargo build [--release] -p node`.
pub fn sibling_node_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    exe.parent().and_then(|p| p.parent()).map(|p| p.join("kefu-node")).unwrap_or_else(|| PathBuf::from("kefu-node"))
}

//! Three regions on this machine to play with: one node each in `iad`, `fra` and `sin`, meshed
//! over QUIC through the test harness's UDP relays, which add a one-way delay between regions.
//!
//! ```text
//! cargo build --release -p node -p examples --examples
//! target/release/examples/three_regions [--delay-ms 40]
//! ```
//!
//! Open each node's demo page in a browser (a tab per region), log in as different users, and
//! chat across regions. Then type at the prompt:
//!
//! ```text
//! partition sin    cut sin off from the other regions      heal sin     restore it
//! delay 80         one-way delay between regions, in ms    loss 10      drop 10 % of packets
//! kill fra         SIGKILL fra's node                      restart fra  start it again
//! status           readiness and mesh metrics              quit
//! ```

use std::time::Duration;

use tests::cluster::{Cluster, LinkSettings};
use tokio::io::{AsyncBufReadExt, BufReader};

const REGIONS: [(&str, &str); 3] = [("iad-1", "iad"), ("fra-1", "fra"), ("sin-1", "sin")];

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let delay_ms: u64 =
        args.iter().position(|a| a == "--delay-ms").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(40);
    let bin = examples::sibling_node_binary();
    anyhow::ensure!(bin.exists(), "{} is missing: run `cargo build --release -p node` first", bin.display());
    let mut cluster = Cluster::start(&bin, &REGIONS, &[]).await?;
    let mut settings = LinkSettings { delay: Duration::from_millis(delay_ms), ..LinkSettings::default() };
    cluster.all_links(settings);
    print_nodes(&cluster);
    println!(
        "links between regions: {delay_ms} ms one way. Commands: partition R, heal R, delay MS, loss PCT, kill R, restart R, status, quit"
    );
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        let outcome: anyhow::Result<()> = async {
            match words.as_slice() {
                ["partition", r] => cluster.partition(r),
                ["heal", r] => cluster.heal(r),
                ["delay", ms] => {
                    settings.delay = Duration::from_millis(ms.parse()?);
                    cluster.all_links(settings);
                }
                ["loss", pct] => {
                    settings.drop = pct.parse::<f64>()? / 100.0;
                    cluster.all_links(settings);
                }
                ["kill", r] => {
                    let i = region_index(&cluster, r)?;
                    cluster.kill(i).await?
                }
                ["restart", r] => {
                    let i = region_index(&cluster, r)?;
                    cluster.restart(i).await?;
                    cluster.all_links(settings);
                    print_nodes(&cluster);
                }
                ["status"] => {
                    for i in 0..cluster.nodes.len() {
                        let ready = cluster.is_ready(i).await;
                        let lag = cluster.metric(i, "kefu_mesh_replication_lag_revisions").await.unwrap_or(f64::NAN);
                        let sent = cluster.metric(i, "kefu_mesh_bytes_sent_total").await.unwrap_or(f64::NAN);
                        println!("{:>4}: ready={ready} lag_revisions={lag} mesh_bytes_sent={sent}", cluster.nodes[i].region);
                    }
                }
                ["quit"] | ["exit"] => return Err(anyhow::anyhow!("quit")),
                [] => {}
                _ => println!("commands: partition R, heal R, delay MS, loss PCT, kill R, restart R, status, quit"),
            }
            Ok(())
        }
        .await;
        match outcome {
            Err(e) if e.to_string() == "quit" => break,
            Err(e) => println!("error: {e}"),
            Ok(()) => {}
        }
    }
    Ok(())
}

fn region_index(cluster: &Cluster, region: &str) -> anyhow::Result<usize> {
    cluster.nodes.iter().position(|n| n.region == region).ok_or_else(|| anyhow::anyhow!("no region {region}"))
}

fn print_nodes(cluster: &Cluster) {
    for n in &cluster.nodes {
        if let Some(node) = &n.node {
            println!(
                "{:>4} ({}): demo page http://{}/  J-IM tcp {}  admin http://{}/metrics  mesh udp {}",
                n.region,
                n.id,
                node.jim,
                node.jim,
                node.admin,
                node.mesh.map(|m| m.to_string()).unwrap_or_default()
            );
        }
    }
}

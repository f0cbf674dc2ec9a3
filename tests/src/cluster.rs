//! A cluster of real nodes on loopback, in named regions, with a userspace UDP relay on every
//! directed link between two nodes. The relay stands in for the network (`tc netem` is not
//! available here): it can add one-way delay, drop a share of packets, or cut the link (a
//! partition), and undo each. Nodes can be killed (SIGKILL) and restarted on their data dir.
//!
//! Node `i` dials node `j` through relay `(i, j)`; its packets leave from the relay's own socket,
//! so the link from `i` to `j` is controlled entirely by that relay, answers included.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::net::UdpSocket;

use crate::TestNode;

/// What a relay does to the packets it carries, both ways.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkSettings {
    /// Added one-way delay.
    pub delay: Duration,
    /// Share of packets dropped, 0.0 to 1.0.
    pub drop: f64,
    /// Every packet dropped.
    pub cut: bool,
}

#[derive(Default)]
struct RelayState {
    target: Option<SocketAddr>,
    client: Option<SocketAddr>,
    settings: LinkSettings,
    carried: u64,
    dropped: u64,
}

/// A UDP relay for one directed link.
pub struct Relay {
    /// Where the dialling node sends its packets.
    pub addr: SocketAddr,
    state: Arc<Mutex<RelayState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Relay {
    /// A relay on 127.0.0.1 with no target yet (packets are dropped until one is set).
    pub async fn start() -> anyhow::Result<Relay> {
        let front_std = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let back_std = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let addr = front_std.local_addr()?;
        // Readers run on tokio; each direction's writer is an OS thread that sleeps precisely
        // until a packet is due (tokio's timer has a 1 ms grain, which would add up to 1 ms to
        // every delayed packet) and sends in arrival order, so a fixed delay never reorders.
        let (front_out, back_out) = (front_std.try_clone()?, back_std.try_clone()?);
        front_std.set_nonblocking(true)?;
        back_std.set_nonblocking(true)?;
        let front = UdpSocket::from_std(front_std)?;
        let back = UdpSocket::from_std(back_std)?;
        let state: Arc<Mutex<RelayState>> = Arc::default();
        let (to_target, target_rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
        let (to_client, client_rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
        let forward_reader = {
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    let due = {
                        let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                        s.client = Some(from);
                        fate(&mut s)
                    };
                    if let Some(due) = due {
                        if to_target.send((due, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            })
        };
        let backward_reader = {
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while let Ok((n, _)) = back.recv_from(&mut buf).await {
                    let due = fate(&mut state.lock().unwrap_or_else(|e| e.into_inner()));
                    if let Some(due) = due {
                        if to_client.send((due, buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            })
        };
        let s1 = Arc::clone(&state);
        std::thread::Builder::new().name("relay-forward".into()).spawn(move || {
            writer(target_rx, |packet| {
                if let Some(target) = s1.lock().unwrap_or_else(|e| e.into_inner()).target {
                    let _ = back_out.send_to(packet, target);
                }
            })
        })?;
        let s2 = Arc::clone(&state);
        std::thread::Builder::new().name("relay-backward".into()).spawn(move || {
            writer(client_rx, |packet| {
                if let Some(client) = s2.lock().unwrap_or_else(|e| e.into_inner()).client {
                    let _ = front_out.send_to(packet, client);
                }
            })
        })?;
        Ok(Relay { addr, state, tasks: vec![forward_reader, backward_reader] })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RelayState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where packets go (the receiving node's mesh port).
    pub fn set_target(&self, target: SocketAddr) {
        self.lock().target = Some(target);
    }

    /// Changes what the link does.
    pub fn set(&self, settings: LinkSettings) {
        self.lock().settings = settings;
    }

    /// The current settings.
    pub fn settings(&self) -> LinkSettings {
        self.lock().settings
    }

    /// Packets carried and dropped so far.
    pub fn counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.carried, s.dropped)
    }
}

/// When a packet is due, or `None` to drop it.
fn fate(s: &mut RelayState) -> Option<std::time::Instant> {
    let drop = s.settings.cut || (s.settings.drop > 0.0 && rand::random::<f64>() < s.settings.drop);
    if drop {
        s.dropped += 1;
        return None;
    }
    s.carried += 1;
    Some(std::time::Instant::now() + s.settings.delay)
}

/// Sends each packet at its due time; ends when the reader is gone.
fn writer(rx: std::sync::mpsc::Receiver<(std::time::Instant, Vec<u8>)>, send: impl Fn(&[u8])) {
    while let Ok((due, packet)) = rx.recv() {
        let now = std::time::Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        send(&packet);
    }
}

/// One node of a cluster.
pub struct ClusterNode {
    /// Node id.
    pub id: String,
    /// Region.
    pub region: String,
    /// The process (`None` before its first start when started later).
    pub node: Option<TestNode>,
    data: Option<tempfile::TempDir>,
}

/// A cluster of nodes on loopback.
pub struct Cluster {
    /// The nodes, in the order given.
    pub nodes: Vec<ClusterNode>,
    relays: HashMap<(usize, usize), Relay>,
    bin: PathBuf,
    ca: tempfile::TempDir,
    extra: Vec<String>,
    /// Regions some nodes are told for others, where they differ from the truth: `(i, j)` → the
    /// region node `i` is configured to think node `j` is in.
    misconfigured: HashMap<(usize, usize), String>,
}

impl Cluster {
    /// Starts one node per `(id, region)`, every pair linked through a relay, and waits until
    /// every node reports ready. `extra` flags go to every node.
    pub async fn start(bin: impl AsRef<Path>, spec: &[(&str, &str)], extra: &[(&str, &str)]) -> anyhow::Result<Cluster> {
        let mut cluster = Cluster::configure(bin, spec, extra).await?;
        for i in 0..cluster.nodes.len() {
            cluster.launch(i).await?;
        }
        cluster.wait_ready(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Sets a cluster up without starting any node: relays, the cluster CA, the data dirs.
    pub async fn configure(bin: impl AsRef<Path>, spec: &[(&str, &str)], extra: &[(&str, &str)]) -> anyhow::Result<Cluster> {
        let ca = tempfile::Builder::new().prefix("kefu-cluster-ca-").tempdir()?;
        node::mesh::tls::make_ca(ca.path())?;
        let mut relays = HashMap::new();
        for i in 0..spec.len() {
            for j in 0..spec.len() {
                if i != j {
                    relays.insert((i, j), Relay::start().await?);
                }
            }
        }
        let mut nodes = Vec::new();
        for (id, region) in spec {
            let data = tempfile::Builder::new().prefix(&format!("kefu-{id}-")).tempdir()?;
            nodes.push(ClusterNode { id: id.to_string(), region: region.to_string(), node: None, data: Some(data) });
        }
        let extra = extra.iter().flat_map(|(k, v)| [k.to_string(), v.to_string()]).collect();
        Ok(Cluster { nodes, relays, bin: bin.as_ref().to_path_buf(), ca, extra, misconfigured: HashMap::new() })
    }

    /// Configures node `i` (before its launch) to think node `j` is in `region`: two nodes with
    /// different node lists.
    pub fn misconfigure(&mut self, i: usize, j: usize, region: &str) {
        self.misconfigured.insert((i, j), region.to_string());
    }

    /// Starts node `i` for the first time (on its fresh data dir).
    pub async fn launch(&mut self, i: usize) -> anyhow::Result<()> {
        let mut builder = TestNode::builder(&self.bin)
            .arg("--node-id", &self.nodes[i].id)
            .arg("--region", &self.nodes[i].region)
            .arg("--mesh-addr", "127.0.0.1:0")
            // The harness reads every node's history through the API many times a second.
            .arg("--api-rate", "0")
            .arg("--cluster-ca", self.ca.path().join("ca.pem").display());
        for (j, other) in self.nodes.iter().enumerate().filter(|(j, _)| *j != i) {
            let relay = &self.relays[&(i, j)];
            let region = self.misconfigured.get(&(i, j)).unwrap_or(&other.region);
            builder = builder.arg("--peer", format!("{}@{}={}", other.id, region, relay.addr));
        }
        for pair in self.extra.chunks(2) {
            builder = builder.arg(&pair[0], &pair[1]);
        }
        let data = self.nodes[i].data.take().context("node already launched")?;
        let node = builder.start_in(data).await?;
        self.nodes[i].node = Some(node);
        self.retarget(i)
    }

    fn retarget(&self, i: usize) -> anyhow::Result<()> {
        let mesh = self.node(i).mesh.context("the node has no mesh port")?;
        for ((_, to), relay) in &self.relays {
            if *to == i {
                relay.set_target(mesh);
            }
        }
        Ok(())
    }

    /// The cluster CA's certificate (its key, `ca.key`, is in the same directory).
    pub fn ca_cert(&self) -> PathBuf {
        self.ca.path().join("ca.pem")
    }

    /// Node `i`'s process. Panics if it was never started.
    pub fn node(&self, i: usize) -> &TestNode {
        self.nodes[i].node.as_ref().expect("node started")
    }

    /// Node `i`'s process, mutably.
    pub fn node_mut(&mut self, i: usize) -> &mut TestNode {
        self.nodes[i].node.as_mut().expect("node started")
    }

    /// Kills node `i` with SIGKILL.
    pub async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        self.node_mut(i).kill().await
    }

    /// Deletes node `i`'s database (a lost volume; the node id stays). Kill the node first.
    pub fn wipe_database(&self, i: usize) -> anyhow::Result<()> {
        let dir = self.node(i).data_dir();
        for name in ["kefu.db", "kefu.db-wal", "kefu.db-shm"] {
            match std::fs::remove_file(dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Restarts node `i` on its data dir (new ports) and points the relays at it.
    pub async fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.node_mut(i).restart().await?;
        self.retarget(i)
    }

    /// Applies `settings` to both directions of every link between node `a` and node `b`.
    pub fn link(&self, a: usize, b: usize, settings: LinkSettings) {
        for key in [(a, b), (b, a)] {
            if let Some(r) = self.relays.get(&key) {
                r.set(settings);
            }
        }
    }

    /// Applies `settings` to every link.
    pub fn all_links(&self, settings: LinkSettings) {
        for r in self.relays.values() {
            r.set(settings);
        }
    }

    /// Cuts every link between `region` and the other regions.
    pub fn partition(&self, region: &str) {
        self.set_region_links(region, true);
    }

    /// Restores the links `partition` cut.
    pub fn heal(&self, region: &str) {
        self.set_region_links(region, false);
    }

    fn set_region_links(&self, region: &str, cut: bool) {
        for ((a, b), relay) in &self.relays {
            let inside = (self.nodes[*a].region == region, self.nodes[*b].region == region);
            if inside.0 != inside.1 {
                relay.set(LinkSettings { cut, ..relay.settings() });
            }
        }
    }

    /// Packets carried and dropped on the link from `a` to `b`.
    pub fn link_counts(&self, a: usize, b: usize) -> (u64, u64) {
        self.relays.get(&(a, b)).map_or((0, 0), Relay::counts)
    }

    /// Whether node `i` answers `/readyz` with 200.
    pub async fn is_ready(&self, i: usize) -> bool {
        let Some(node) = self.nodes[i].node.as_ref() else { return false };
        let url = format!("http://{}/readyz", node.admin);
        matches!(reqwest::get(url).await, Ok(r) if r.status() == 200)
    }

    /// Waits until every started node is ready.
    pub async fn wait_ready(&self, within: Duration) -> anyhow::Result<()> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].node.is_some() {
                crate::eventually(within, || async move { self.is_ready(i).await.then_some(()) })
                    .await
                    .with_context(|| format!("node {} never became ready", self.nodes[i].id))?;
            }
        }
        Ok(())
    }

    /// The configured nodes, as placement sees them.
    pub fn specs(&self) -> Vec<schema::placement::NodeSpec> {
        self.nodes.iter().map(|n| schema::placement::NodeSpec { id: n.id.clone(), region: n.region.clone() }).collect()
    }

    /// The index of the node that owns `conversation`.
    pub fn owner_of(&self, conversation: &str) -> usize {
        let specs = self.specs();
        let owner = schema::placement::owner(conversation, &specs).expect("nodes configured");
        specs.iter().position(|s| s.id == owner.id).expect("owner is configured")
    }

    /// The first user name `base0`, `base1`, … whose private conversation with `peer` is owned by
    /// node `owner` (to set up a test or benchmark around a chosen sequencer).
    pub fn user_owned_by(&self, base: &str, peer: &str, owner: usize) -> String {
        (0..100_000)
            .map(|i| format!("{base}{i}"))
            .find(|u| self.owner_of(schema::ConversationId::private(u, peer).as_str()) == owner)
            .unwrap_or_else(|| base.to_string())
    }

    /// Every message of `conversation` stored at node `i`, oldest first, through the HTTP API.
    pub async fn messages(&self, i: usize, conversation: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let http = reqwest::Client::new();
        let mut out = Vec::new();
        let mut after = 0u64;
        loop {
            let url = format!("{}/v1/conversations/{conversation}/messages?after={after}&limit=100", self.node(i).http());
            let page: serde_json::Value = http.get(url).send().await?.error_for_status()?.json().await?;
            let batch = page["messages"].as_array().cloned().unwrap_or_default();
            if batch.is_empty() {
                return Ok(out);
            }
            after = batch.last().and_then(|m| m["seq"].as_u64()).context("message without seq")?;
            out.extend(batch);
        }
    }

    /// Waits until every running node has applied everything every other running node has
    /// written (each node's change stream position at each peer reaches that node's head).
    pub async fn caught_up(&self, within: Duration) -> anyhow::Result<()> {
        let running: Vec<usize> = (0..self.nodes.len()).filter(|i| self.nodes[*i].node.is_some()).collect();
        crate::eventually(within, || async {
            for &j in &running {
                let head = self.metric(j, "kefu_store_head_revision").await.ok()?;
                for &i in running.iter().filter(|i| **i != j) {
                    let label = format!("kefu_mesh_applied_revision{{peer=\"{}\"}}", self.nodes[j].id);
                    if self.metric_line(i, &label).await.ok()? < head {
                        return None;
                    }
                }
            }
            Some(())
        })
        .await
        .context("the nodes did not catch up with each other")
    }

    /// The value of the metric line that starts with `series` (name and labels) at node `i`.
    pub async fn metric_line(&self, i: usize, series: &str) -> anyhow::Result<f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.node(i).admin)).await?.text().await?;
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse::<f64>().ok()))
            .with_context(|| format!("no {series} at node {i}"))
    }

    /// Metric `name` (without labels) as node `i` reports it, summed over its label sets.
    pub async fn metric(&self, i: usize, name: &str) -> anyhow::Result<f64> {
        let text = reqwest::get(format!("http://{}/metrics", self.node(i).admin)).await?.text().await?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

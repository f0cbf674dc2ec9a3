//! The load generator's command line (clap: `loadgen --help` lists every option), and `--compare`,
//! which sets this run's figures beside a saved result's.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde_json::Value;

/// `loadgen SCENARIO [options]`.
#[derive(Debug, clap::Parser)]
#[command(
    name = "loadgen",
    about = "kefu's load generator: starts (or uses) a node, spreads connections over worker processes, runs one scenario, prints a JSON result and a summary",
    after_help = "Defaults that depend on the scenario are given as scenario: value. Every run is bounded by --duration as well as by its counts."
)]
pub struct Cli {
    /// The scenario.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Seconds the run may take at most [default: 60].
    #[arg(long)]
    pub duration: Option<u64>,
    /// Worker processes, each binding its own loopback source address [default: 1].
    #[arg(long)]
    pub procs: Option<u64>,
    /// tcp, ws or quic [default: tcp].
    #[arg(long)]
    pub transport: Option<String>,
    /// A running node's J-IM address instead of starting one.
    #[arg(long)]
    pub node: Option<String>,
    /// That node's QUIC address (with --node and --transport quic).
    #[arg(long)]
    pub quic: Option<String>,
    /// That node's TLS certificate (PEM) for QUIC.
    #[arg(long)]
    pub ca: Option<String>,
    /// That node's pid, for its CPU and RSS figures.
    #[arg(long)]
    pub node_pid: Option<String>,
    /// The node binary to start [default: kefu-node beside this executable].
    #[arg(long)]
    pub node_bin: Option<String>,
    /// Password-hash memory of the node it starts, in KiB: cheap by default so that logins are
    /// not what is measured; 0 leaves the node's own default (19 MiB argon2id) [default: 64].
    #[arg(long)]
    pub argon2_memory_kib: Option<u64>,
    /// idle: connections [default: 1000].
    #[arg(long)]
    pub conns: Option<u64>,
    /// idle: 1 logs each connection in, 0 leaves it bare [default: 1].
    #[arg(long)]
    pub login: Option<u64>,
    /// idle: milliseconds over which the one heartbeat of every connection is spread, as clients
    /// with their own timers send them; 0 sends them all at once [default: 0].
    #[arg(long)]
    pub spread_ms: Option<u64>,
    /// chat: sender→receiver pairs [default: 100].
    #[arg(long)]
    pub pairs: Option<u64>,
    /// chat, group: messages in all [chat: 100000, group: 100].
    #[arg(long)]
    pub messages: Option<u64>,
    /// chat, group: messages per second, 0 flat out; churn: cycles per second [chat, group: 0; churn: 200].
    #[arg(long)]
    pub rate: Option<u64>,
    /// group: online members of the one group [default: 1000].
    #[arg(long)]
    pub members: Option<u64>,
    /// history: messages written before the node starts [default: 1000000].
    #[arg(long)]
    pub prefill: Option<u64>,
    /// coldstart: megabytes of messages written before the starts [default: 1024].
    #[arg(long)]
    pub prefill_mb: Option<u64>,
    /// history: conversations the prefill spreads over [default: 10000].
    #[arg(long)]
    pub conversations: Option<u64>,
    /// history: reading connections (also the prefill's users) [default: 100].
    #[arg(long)]
    pub readers: Option<u64>,
    /// history: history requests in all [default: 10000].
    #[arg(long)]
    pub reads: Option<u64>,
    /// churn: connect-login-close cycles [default: 1000].
    #[arg(long)]
    pub cycles: Option<u64>,
    /// Also write the JSON result to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A saved result (an earlier run's --out) to compare this run with, figure by figure.
    #[arg(long)]
    pub compare: Option<PathBuf>,
}

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Logged-in idle connections: RSS per connection.
    Idle,
    /// 1:1 messages between pairs: throughput and send→delivery latency.
    Chat,
    /// One group's fan-out to online members.
    Group,
    /// History reads over a prefilled database.
    History,
    /// Connect, log in, close, over and over.
    Churn,
    /// Process start to first answer over a large database.
    Coldstart,
}

impl Scenario {
    /// Its name on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Chat => "chat",
            Scenario::Group => "group",
            Scenario::History => "history",
            Scenario::Churn => "churn",
            Scenario::Coldstart => "coldstart",
        }
    }
}

/// The parsed options, looked up by their command-line names.
pub struct Opts(HashMap<String, String>);

impl Opts {
    /// The options the command line gave.
    pub fn from_cli(cli: &Cli) -> Opts {
        let mut map = HashMap::new();
        let mut put = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                map.insert(k.to_string(), v);
            }
        };
        let n = |v: Option<u64>| v.map(|v| v.to_string());
        put("duration", n(cli.duration));
        put("procs", n(cli.procs));
        put("transport", cli.transport.clone());
        put("node", cli.node.clone());
        put("quic", cli.quic.clone());
        put("ca", cli.ca.clone());
        put("node-pid", cli.node_pid.clone());
        put("node-bin", cli.node_bin.clone());
        put("argon2-memory-kib", n(cli.argon2_memory_kib));
        put("conns", n(cli.conns));
        put("login", n(cli.login));
        put("spread-ms", n(cli.spread_ms));
        put("pairs", n(cli.pairs));
        put("messages", n(cli.messages));
        put("rate", n(cli.rate));
        put("members", n(cli.members));
        put("prefill", n(cli.prefill));
        put("prefill-mb", n(cli.prefill_mb));
        put("conversations", n(cli.conversations));
        put("readers", n(cli.readers));
        put("reads", n(cli.reads));
        put("cycles", n(cli.cycles));
        put("out", cli.out.as_ref().map(|p| p.display().to_string()));
        put("compare", cli.compare.as_ref().map(|p| p.display().to_string()));
        Opts(map)
    }

    /// A string option.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// A numeric option with a default (clap has checked that it is a number).
    pub fn num(&self, key: &str, default: u64) -> u64 {
        self.0.get(key).and_then(|v| v.parse().ok()).unwrap_or(default)
    }
}

/// Every number in a result, by its dotted path (arrays by index).
fn numbers(v: &Value, path: &str, out: &mut BTreeMap<String, f64>) {
    match v {
        Value::Number(n) => {
            if let Some(f) = n.as_f64() {
                out.insert(path.to_string(), f);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                numbers(v, &p, out);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                numbers(v, &format!("{path}.{i}"), out);
            }
        }
        _ => {}
    }
}

/// The figures of `after` beside those of `before`: one line per number both have
/// (`path: before → after (±x.x %)`), the machine's description left out; then a line for each
/// figure only one of them has.
pub fn compare(before: &Value, after: &Value) -> Vec<String> {
    let (mut b, mut a) = (BTreeMap::new(), BTreeMap::new());
    numbers(before, "", &mut b);
    numbers(after, "", &mut a);
    let mut lines = Vec::new();
    for (path, now) in &a {
        if path.starts_with("machine.") {
            continue;
        }
        match b.get(path) {
            Some(was) => {
                let change = if *was == 0.0 { String::new() } else { format!(" ({:+.1} %)", (now - was) / was * 100.0) };
                lines.push(format!("{path}: {} → {}{change}", fmt(*was), fmt(*now)));
            }
            None => lines.push(format!("{path}: only in this run ({})", fmt(*now))),
        }
    }
    for path in b.keys().filter(|p| !a.contains_key(*p) && !p.starts_with("machine.")) {
        lines.push(format!("{path}: only in the saved result"));
    }
    lines
}

fn fmt(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;
    use clap::Parser;
    use serde_json::json;

    #[test]
    fn options_are_typed_and_help_lists_them() {
        let cli = Cli::try_parse_from(["loadgen", "chat", "--pairs", "200", "--messages", "300000"]).unwrap();
        let opts = Opts::from_cli(&cli);
        assert_eq!((cli.scenario, opts.num("pairs", 1), opts.num("rate", 7)), (Scenario::Chat, 200, 7));
        assert!(Cli::try_parse_from(["loadgen", "chat", "--pairs", "many"]).is_err(), "a bad number is an error, not the default");
        assert!(Cli::try_parse_from(["loadgen", "dance"]).is_err());
        let help = Cli::try_parse_from(["loadgen", "--help"]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        let text = help.to_string();
        for option in ["--pairs", "--messages", "--rate", "--members", "--conns", "--transport", "--compare", "--out", "--node-bin"] {
            assert!(text.contains(option), "{option} missing from --help");
        }
    }

    #[test]
    fn compare_sets_each_figure_beside_the_saved_one() {
        let before = json!({"scenario": "chat", "machine": {"cpus": 2}, "acked": 1000, "node": {"cpu_s": 2.0}, "old": 1});
        let after = json!({"scenario": "chat", "machine": {"cpus": 2}, "acked": 1500, "node": {"cpu_s": 1.5}, "new": 3});
        let lines = compare(&before, &after);
        assert_eq!(
            lines,
            [
                "acked: 1000 → 1500 (+50.0 %)",
                "new: only in this run (3)",
                "node.cpu_s: 2 → 1.500 (-25.0 %)",
                "old: only in the saved result"
            ]
        );
    }
}

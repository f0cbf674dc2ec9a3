//! Every metric the node exports, in one place, rendered as Prometheus text by the admin port.
//! Counters are plain atomics: recording is one relaxed add, cheap enough for the hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Which transport a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// J-IM binary over TCP.
    Tcp,
    /// WebSocket.
    Ws,
    /// HTTP API (no long-lived session).
    Http,
    /// QUIC stream (ALPN kefu/1).
    Quic,
}

impl Transport {
    /// The J-IM terminal name.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Http => "http",
            Transport::Quic => "quic",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const TRANSPORTS: [Transport; 4] = [Transport::Tcp, Transport::Ws, Transport::Http, Transport::Quic];

/// A fixed-bucket histogram.
pub struct Histogram {
    bounds: &'static [f64],
    buckets: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.sum_micros.fetch_add((value * 1e6) as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// Observations so far and their sum.
    pub fn totals(&self) -> (u64, f64) {
        (self.count.load(Relaxed), self.sum_micros.load(Relaxed) as f64 / 1e6)
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, bucket) in self.bounds.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let (count, sum) = self.totals();
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}");
    }
}

/// The node's metrics.
pub struct Metrics {
    connections: [AtomicI64; 4],
    connections_total: [AtomicU64; 4],
    /// Chat messages accepted from clients.
    pub messages_in: AtomicU64,
    /// Chat messages pushed to clients.
    pub messages_out: AtomicU64,
    /// Protocol errors that closed a connection.
    pub protocol_errors: AtomicU64,
    /// Connections closed because they did not read.
    pub slow_consumers: AtomicU64,
    /// QUIC requests that arrived in 0-RTT and waited for the handshake.
    pub early_data_held: AtomicU64,
    /// Seconds from BEGIN to COMMIT of one write batch.
    pub commit_seconds: Histogram,
    /// Operations per committed write batch.
    pub commit_batch_size: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            connections: Default::default(),
            connections_total: Default::default(),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            early_data_held: AtomicU64::new(0),
            commit_seconds: Histogram::new(&[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0]),
            commit_batch_size: Histogram::new(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0]),
        }
    }
}

impl Metrics {
    /// A connection opened; the guard closes it when dropped.
    pub fn connection(&self, transport: Transport) -> ConnectionGauge<'_> {
        self.connections[transport.index()].fetch_add(1, Relaxed);
        self.connections_total[transport.index()].fetch_add(1, Relaxed);
        ConnectionGauge { metrics: self, transport }
    }

    /// Open connections on every transport.
    pub fn open_connections_total(&self) -> i64 {
        self.connections.iter().map(|c| c.load(Relaxed)).sum()
    }

    /// Open connections on a transport.
    pub fn open_connections(&self, transport: Transport) -> i64 {
        self.connections[transport.index()].load(Relaxed)
    }

    /// Records one committed batch.
    pub fn commit(&self, elapsed: Duration, ops: usize) {
        self.commit_seconds.observe(elapsed.as_secs_f64());
        self.commit_batch_size.observe(ops as f64);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP kefu_connections Open client connections.\n# TYPE kefu_connections gauge\n");
        for t in TRANSPORTS {
            let _ = writeln!(out, "kefu_connections{{transport=\"{}\"}} {}", t.name(), self.open_connections(t));
        }
        out.push_str("# HELP kefu_connections_total Client connections accepted.\n# TYPE kefu_connections_total counter\n");
        for t in TRANSPORTS {
            let _ =
                writeln!(out, "kefu_connections_total{{transport=\"{}\"}} {}", t.name(), self.connections_total[t.index()].load(Relaxed));
        }
        for (name, help, value) in [
            ("kefu_messages_in_total", "Chat messages accepted from clients.", &self.messages_in),
            ("kefu_messages_out_total", "Chat messages pushed to clients.", &self.messages_out),
            ("kefu_protocol_errors_total", "Connections closed for a protocol error.", &self.protocol_errors),
            ("kefu_slow_consumers_total", "Connections closed because they did not read.", &self.slow_consumers),
            ("kefu_quic_early_data_held_total", "QUIC requests sent in 0-RTT that waited for the handshake.", &self.early_data_held),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Relaxed));
        }
        self.commit_seconds.render(&mut out, "kefu_commit_seconds", "Time to commit one write batch.");
        self.commit_batch_size.render(&mut out, "kefu_commit_batch_size", "Operations per committed write batch.");
        out
    }
}

/// Decrements the open-connection gauge on drop.
pub struct ConnectionGauge<'a> {
    metrics: &'a Metrics,
    transport: Transport,
}

impl Drop for ConnectionGauge<'_> {
    fn drop(&mut self) {
        self.metrics.connections[self.transport.index()].fetch_sub(1, Relaxed);
    }
}

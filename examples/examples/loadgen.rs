//! kefu's load generator. It starts (or uses) a node, spreads client connections over worker
//! processes that each bind their own loopback source address (127.0.0.2, 127.0.0.3, … with
//! IP_BIND_ADDRESS_NO_PORT, so more than 20,000 connections fit under the per-process file
//! limit), runs one scenario, and writes a JSON result plus a one-line summary.
//!
//! ```text
//! cargo build --release -p node -p examples --examples
//! target/release/examples/loadgen idle  --conns 19000 --procs 2
//! target/release/examples/loadgen chat  --pairs 500 --messages 400000 --rate 0
//! target/release/examples/loadgen group --members 10000 --messages 200 --procs 2
//! target/release/examples/loadgen history --prefill 10000000 --conversations 10000 --reads 20000
//! target/release/examples/loadgen churn --cycles 5000 --rate 500
//! target/release/examples/loadgen coldstart --prefill-mb 1024
//! target/release/examples/loadgen idle  --conns 100000 --procs 4 --transport quic
//! ```
//!
//! `--transport` is `tcp` (default), `ws` or `quic`. Every run is bounded by `--duration`
//! (seconds) as well as by its counts. `loadgen --help` lists every option; `--out FILE` saves the
//! JSON result and `--compare FILE` prints this run's figures beside a saved one's.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    examples::loadgen::main(std::env::args().skip(1).collect()).await
}

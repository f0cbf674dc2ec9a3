//! The router binary the harness starts: exactly `kefu-router`, built in this package so that
//! integration tests can find it through `CARGO_BIN_EXE_test-router`.

fn main() -> anyhow::Result<()> {
    edge_router::main()
}

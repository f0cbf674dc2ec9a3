//! The node binary the harness starts: exactly `kefu-node`, built in this package so that
//! integration tests can find it through `CARGO_BIN_EXE_test-node`.

fn main() -> anyhow::Result<()> {
    node::cli::main()
}

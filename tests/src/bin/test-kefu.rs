//! The `kefu` CLI the tests run: exactly `kefu`, built in this package so that integration
//! tests can find it through `CARGO_BIN_EXE_test-kefu`.

fn main() {
    std::process::exit(wrangler_like_deploy::main());
}

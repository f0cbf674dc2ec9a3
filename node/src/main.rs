//! `kefu-node`: see `node::cli`.

fn main() -> anyhow::Result<()> {
    node::cli::main()
}

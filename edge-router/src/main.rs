//! `kefu-router`: see the library.

fn main() -> anyhow::Result<()> {
    edge_router::main()
}

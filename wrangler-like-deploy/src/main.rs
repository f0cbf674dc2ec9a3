//! `kefu`: see the library.

fn main() {
    std::process::exit(wrangler_like_deploy::main());
}

//! Parsing J-IM requests, in-process: how long `schema::jim::parse_request` takes for a private
//! and a group chat request as the load generator sends them (the node parses every frame it
//! reads once). Prints the best of five runs of `--parses` each.
//!
//! ```text
//! cargo run --release -p examples --example jim_parse [-- --parses 2000000]
//! ```

use std::time::Instant;

use schema::command::Command;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let parses: u32 =
        args.iter().position(|a| a == "--parses").and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(2_000_000);
    let private: &[u8] = br#"{"cmd":11,"chatType":2,"to":"lg17","content":"1733350000123456:42"}"#;
    let group: &[u8] = br#"{"cmd":11,"chatType":1,"groupId":"lgbench","content":"1733350000123456:42","msgType":0}"#;
    let Some(chat) = Command::from_code(11) else { return eprintln!("no chat command") };
    for (name, body) in [("private chat", private), ("group chat", group)] {
        if let Err(e) = schema::jim::parse_request(Some(chat), body) {
            return eprintln!("{name}: does not parse: {e:?}");
        }
        let mut best = f64::MAX;
        for _ in 0..5 {
            let started = Instant::now();
            for _ in 0..parses {
                let parsed = schema::jim::parse_request(Some(chat), std::hint::black_box(body));
                std::hint::black_box(&parsed);
            }
            best = best.min(started.elapsed().as_secs_f64() * 1e9 / f64::from(parses));
        }
        println!("{name}: {best:.0} ns per parse (best of 5 runs of {parses})");
    }
}

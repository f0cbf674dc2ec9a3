//! `--key value` options, parsed without ceremony.

use std::collections::HashMap;

use anyhow::bail;

/// Parsed options.
pub struct Opts(HashMap<String, String>);

impl Opts {
    /// Parses `--key value` pairs.
    pub fn parse(args: &[String]) -> anyhow::Result<Opts> {
        let mut map = HashMap::new();
        let mut it = args.iter();
        while let Some(key) = it.next() {
            let Some(key) = key.strip_prefix("--") else { bail!("expected --option, got {key}") };
            let Some(value) = it.next() else { bail!("--{key} needs a value") };
            map.insert(key.to_string(), value.clone());
        }
        Ok(Opts(map))
    }

    /// A string option.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// A numeric option with a default.
    pub fn num(&self, key: &str, default: u64) -> u64 {
        self.0.get(key).and_then(|v| v.replace('_', "").parse().ok()).unwrap_or(default)
    }
}

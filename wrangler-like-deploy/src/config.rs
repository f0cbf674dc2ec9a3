//! `kefu.toml`: found by walking up from the working directory, `[env.NAME]` sections that
//! inherit the top level the way wrangler's do, `.dev.vars` beside it for local secrets.
//!
//! Inheritable keys (an environment that leaves them out gets the top level's): `name` (with
//! `-<env>` appended, as wrangler does), `org`, `primary_region`, `regions`, `nodes_per_region`,
//! `dockerfile`, `image`, `profile`, `strategy`, `auto_stop`, `release_command`, `vm`.
//! Non-inheritable keys (bindings to things that must differ per environment): `vars`, `volume`;
//! an environment without them has none, with a warning when the top level has them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The file name looked for.
pub const FILE: &str = "kefu.toml";

/// A problem in the configuration: the file, the key, what is wrong and a hint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// The key (dotted path), if one is to blame.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}: `{key}`: {}", self.file.display(), self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The keys of the top level and of an `[env.NAME]` section, as written.
#[derive(Debug, Default, Clone, Deserialize)]
struct Section {
    name: Option<String>,
    org: Option<String>,
    primary_region: Option<String>,
    regions: Option<Vec<String>>,
    nodes_per_region: Option<u32>,
    dockerfile: Option<String>,
    image: Option<String>,
    profile: Option<String>,
    strategy: Option<String>,
    auto_stop: Option<String>,
    release_command: Option<String>,
    vm: Option<Vm>,
    vars: Option<BTreeMap<String, String>>,
    volume: Option<Volume>,
    #[serde(default)]
    env: BTreeMap<String, Section>,
}

/// The keys a section may have (`env` only at the top level).
const KNOWN: [&str; 15] = [
    "name",
    "org",
    "primary_region",
    "regions",
    "nodes_per_region",
    "dockerfile",
    "image",
    "profile",
    "strategy",
    "auto_stop",
    "release_command",
    "vm",
    "vars",
    "volume",
    "env",
];

/// Removes the keys no section knows, with a warning for each.
fn strip_unknown(table: &mut toml::Table, prefix: &str, file: &Path, warnings: &mut Vec<String>) {
    let unknown: Vec<String> =
        table.keys().filter(|k| !KNOWN.contains(&k.as_str()) || (!prefix.is_empty() && *k == "env")).cloned().collect();
    for key in unknown {
        warnings.push(format!("{}: unexpected field `{prefix}{key}`: it is ignored (a typo?)", file.display()));
        table.remove(&key);
    }
}

/// The dotted key at `offset` of TOML text: the `key =` of that line under its `[table]`.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text[line_start..].lines().next()?;
    let key = line.split_once('=')?.0.trim().trim_matches('"').to_string();
    let table = before[..line_start]
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']').map(|t| t.trim_matches(['[', ']']).to_string()));
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key,
    })
}

/// Machine size.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Fly's preset, e.g. `shared-cpu-1x`.
    #[serde(default = "default_size")]
    pub size: String,
    /// Memory in MB.
    #[serde(default = "default_memory")]
    pub memory_mb: u32,
}

impl Default for Vm {
    fn default() -> Vm {
        Vm { size: default_size(), memory_mb: default_memory() }
    }
}

fn default_size() -> String {
    "shared-cpu-1x".to_string()
}

fn default_memory() -> u32 {
    512
}

/// The volume each node keeps its database on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Volume name (one per node, all with this name).
    pub name: String,
    /// Size in GB.
    #[serde(default = "default_volume_size")]
    pub size_gb: u32,
}

fn default_volume_size() -> u32 {
    1
}

/// The resolved configuration of one environment (or the top level).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// The file it came from.
    pub file: PathBuf,
    /// The environment, if one was chosen.
    pub env: Option<String>,
    /// Fly app name.
    pub name: String,
    /// Fly organisation.
    pub org: String,
    /// The first region (fly.toml's `primary_region`).
    pub primary_region: String,
    /// Every region a node runs in, the primary first.
    pub regions: Vec<String>,
    /// Nodes in each region.
    pub nodes_per_region: u32,
    /// Dockerfile the image is built from (relative to the config file).
    pub dockerfile: String,
    /// A prebuilt image instead of building one.
    pub image: Option<String>,
    /// The node's profile.
    pub profile: String,
    /// Deploy strategy.
    pub strategy: String,
    /// Machines' auto-stop setting.
    pub auto_stop: String,
    /// A release command (always refused: see the rules).
    pub release_command: Option<String>,
    /// Machine size.
    pub vm: Vm,
    /// Environment variables of the nodes.
    pub vars: BTreeMap<String, String>,
    /// The data volume.
    pub volume: Option<Volume>,
}

impl App {
    /// The directory the config file is in.
    pub fn dir(&self) -> &Path {
        self.file.parent().unwrap_or(Path::new("."))
    }
}

/// What loading printed as warnings, and the result.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration.
    pub app: App,
    /// Warnings (unknown keys, non-inherited keys).
    pub warnings: Vec<String>,
}

/// Finds `kefu.toml` in `start` or the nearest directory above it.
pub fn find(start: &Path) -> Option<PathBuf> {
    start.ancestors().map(|d| d.join(FILE)).find(|p| p.is_file())
}

/// Reads and resolves `file` for the environment `env` (the top level when `None`).
pub fn load(file: &Path, env: Option<&str>) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_path_buf(),
        key: None,
        message: format!("cannot be read: {e}"),
        hint: "run `kefu init` to make one".to_string(),
    })?;
    parse(file, &text, env)
}

/// Resolves a config's `text` (from `file`) for `env`.
pub fn parse(file: &Path, text: &str, env: Option<&str>) -> Result<Loaded, ConfigError> {
    let err = |key: Option<&str>, message: String, hint: &str| ConfigError {
        file: file.to_path_buf(),
        key: key.map(str::to_string),
        message,
        hint: hint.to_string(),
    };
    const TYPES: &str = "see the README's kefu.toml reference for the keys and their types";
    let line_of = |offset: usize| text[..offset.min(text.len())].lines().count().max(1);
    let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let at = e.span().map(|s| format!(" (line {})", line_of(s.start))).unwrap_or_default();
        err(None, format!("{}{at}", e.message()), "the file is not valid TOML")
    })?;
    let mut warnings = Vec::new();
    strip_unknown(&mut table, "", file, &mut warnings);
    if let Some(toml::Value::Table(envs)) = table.get_mut("env") {
        for (name, section) in envs.iter_mut() {
            if let toml::Value::Table(section) = section {
                strip_unknown(section, &format!("env.{name}."), file, &mut warnings);
            }
        }
    }
    // Typed now; a wrong type is found in the re-written text, then named by its key and its
    // line in the file as written.
    let clean = toml::to_string(&table).map_err(|e| err(None, e.to_string(), TYPES))?;
    let base: Section = toml::from_str(&clean).map_err(|e| {
        let key = e.span().and_then(|s| key_at(&clean, s.start));
        let last = key.as_deref().and_then(|k| k.rsplit('.').next()).unwrap_or_default().to_string();
        let line = text.lines().position(|l| l.trim_start().strip_prefix(last.as_str()).is_some_and(|r| r.trim_start().starts_with('=')));
        let at = line.map(|l| format!(" (line {})", l + 1)).unwrap_or_default();
        err(key.as_deref(), format!("{}{at}", e.message()), TYPES)
    })?;
    let top_env = base.env.clone();
    let base = &base;
    let chosen = match env {
        None => None,
        Some(name) => Some(top_env.get(name).ok_or_else(|| {
            let known: Vec<&str> = top_env.keys().map(String::as_str).collect();
            err(
                Some(&format!("env.{name}")),
                format!("no environment named {name:?}"),
                &if known.is_empty() { "add an [env.NAME] section".to_string() } else { format!("known: {}", known.join(", ")) },
            )
        })?),
    };
    let pick = |f: fn(&Section) -> Option<String>| chosen.and_then(f).or_else(|| f(base));
    let name = match (env, chosen.and_then(|s| s.name.clone()), base.name.clone()) {
        (_, Some(own), _) => own,
        (Some(e), None, Some(top)) => format!("{top}-{e}"),
        (None, None, Some(top)) => top,
        (_, None, None) => return Err(err(Some("name"), "is missing".to_string(), "name the Fly app: name = \"my-chat\"")),
    };
    if let (Some(e), Some(section)) = (env, chosen) {
        for (key, top_has, env_has) in
            [("vars", base.vars.is_some(), section.vars.is_some()), ("volume", base.volume.is_some(), section.volume.is_some())]
        {
            if top_has && !env_has {
                warnings.push(format!(
                    "{}: `{key}` exists at the top level but not in [env.{e}]; it is not inherited, so env {e} has none (repeat it there if it should)",
                    file.display()
                ));
            }
        }
    }
    let (vars, volume) = match chosen {
        Some(section) => (section.vars.clone().unwrap_or_default(), section.volume.clone()),
        None => (base.vars.clone().unwrap_or_default(), base.volume.clone()),
    };
    let mut regions = chosen.and_then(|s| s.regions.clone()).or_else(|| base.regions.clone()).unwrap_or_default();
    let primary_region = match pick(|s| s.primary_region.clone()) {
        Some(p) => p,
        None => regions.first().cloned().ok_or_else(|| {
            err(Some("regions"), "names no region".to_string(), "regions = [\"iad\", \"fra\", \"sin\"] (Fly region codes)")
        })?,
    };
    if !regions.contains(&primary_region) {
        regions.insert(0, primary_region.clone());
    } else {
        regions.retain(|r| r != &primary_region);
        regions.insert(0, primary_region.clone());
    }
    for r in &regions {
        if r.len() != 3 || !r.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(err(
                Some("regions"),
                format!("{r:?} is not a Fly region code"),
                "three lower-case letters, as `fly platform regions` lists",
            ));
        }
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') || name.is_empty() || name.len() > 63 {
        return Err(err(Some("name"), format!("{name:?} is not a Fly app name"), "lower-case letters, digits and dashes, at most 63"));
    }
    let nodes_per_region = chosen.and_then(|s| s.nodes_per_region).or(base.nodes_per_region).unwrap_or(1);
    if nodes_per_region == 0 {
        return Err(err(Some("nodes_per_region"), "is 0".to_string(), "at least one node per region"));
    }
    let profile = pick(|s| s.profile.clone()).unwrap_or_else(|| "prod".to_string());
    if profile != "prod" && profile != "dev" {
        return Err(err(Some("profile"), format!("{profile:?} is not dev or prod"), "profile = \"prod\""));
    }
    let app = App {
        file: file.to_path_buf(),
        env: env.map(str::to_string),
        name,
        org: pick(|s| s.org.clone()).unwrap_or_else(|| "personal".to_string()),
        primary_region,
        regions,
        nodes_per_region,
        dockerfile: pick(|s| s.dockerfile.clone()).unwrap_or_else(|| "Dockerfile".to_string()),
        image: pick(|s| s.image.clone()),
        profile,
        strategy: pick(|s| s.strategy.clone()).unwrap_or_else(|| "rolling".to_string()),
        auto_stop: pick(|s| s.auto_stop.clone()).unwrap_or_else(|| "off".to_string()),
        release_command: pick(|s| s.release_command.clone()),
        vm: chosen.and_then(|s| s.vm.clone()).or_else(|| base.vm.clone()).unwrap_or_default(),
        vars,
        volume,
    };
    Ok(Loaded { app, warnings })
}

/// `.dev.vars` beside the config: `NAME=value` lines (`#` comments, optional quotes), local
/// secrets for `kefu dev`, never deployed.
pub fn dev_vars(dir: &Path) -> Result<BTreeMap<String, String>, ConfigError> {
    let path = dir.join(".dev.vars");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(BTreeMap::new()) };
    parse_dotenv(&path, &text)
}

/// `NAME=value` lines, as `.dev.vars` and `kefu secret bulk` read them.
pub fn parse_dotenv(path: &Path, text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(ConfigError {
                file: path.to_path_buf(),
                key: None,
                message: format!("line {} is not NAME=value", i + 1),
                hint: "one NAME=value per line".to_string(),
            });
        };
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        out.insert(k.trim().to_string(), v.to_string());
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    const TEXT: &str = r#"
name = "chat"
regions = ["fra", "iad", "sin"]
primary_region = "iad"
nodes_per_region = 2
colour = "blue"
[vm]
size = "shared-cpu-2x"
memory_mb = 1024
[vars]
KEFU_LOG = "info"
[volume]
name = "kefu_data"
size_gb = 3
[env.staging]
regions = ["iad"]
[env.eu]
name = "chat-europe"
primary_region = "fra"
tpyo = 1
[env.eu.vars]
KEFU_LOG = "debug"
"#;

    #[test]
    fn environments_inherit_what_wrangler_lets_them_and_nothing_else() {
        let top = parse(Path::new("kefu.toml"), TEXT, None).unwrap();
        assert_eq!(top.app.name, "chat");
        assert_eq!(top.app.regions, ["iad", "fra", "sin"], "the primary first");
        assert_eq!((top.app.nodes_per_region, top.app.vm.memory_mb), (2, 1024));
        assert_eq!(top.app.vars["KEFU_LOG"], "info");
        assert!(top.warnings.iter().any(|w| w.contains("`colour`")), "{:?}", top.warnings);
        assert!(top.warnings.iter().any(|w| w.contains("`env.eu.tpyo`")), "{:?}", top.warnings);

        let staging = parse(Path::new("kefu.toml"), TEXT, Some("staging")).unwrap();
        assert_eq!(staging.app.name, "chat-staging", "the env's name is appended");
        assert_eq!(staging.app.regions, ["iad"]);
        assert_eq!(staging.app.nodes_per_region, 2, "inherited");
        assert_eq!(staging.app.vm.size, "shared-cpu-2x", "inherited");
        assert!(staging.app.vars.is_empty() && staging.app.volume.is_none(), "vars and volume are not inherited");
        assert!(staging.warnings.iter().any(|w| w.contains("`vars` exists at the top level but not in [env.staging]")));
        assert!(staging.warnings.iter().any(|w| w.contains("`volume`")));

        let eu = parse(Path::new("kefu.toml"), TEXT, Some("eu")).unwrap();
        assert_eq!(eu.app.name, "chat-europe");
        assert_eq!(eu.app.regions, ["fra", "iad", "sin"]);
        assert_eq!(eu.app.vars["KEFU_LOG"], "debug");
    }

    #[test]
    fn errors_name_the_file_the_key_and_a_hint() {
        let e = parse(Path::new("/x/kefu.toml"), TEXT, Some("prod")).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("env.prod"));
        assert!(e.hint.contains("staging"), "{e:?}");
        let e = parse(Path::new("/x/kefu.toml"), "regions = [\"iad\"]", None).unwrap_err();
        assert_eq!((e.key.as_deref(), e.to_string().starts_with("/x/kefu.toml")), (Some("name"), true));
        let e = parse(Path::new("k.toml"), "name = \"a\"\nregions = [\"Frankfurt\"]", None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("regions"));
        let e = parse(Path::new("k.toml"), "name = \"a\"\nregions = \"iad\"", None).unwrap_err();
        assert!(e.message.contains("line 2"), "{e:?}");
        assert_eq!(e.key.as_deref(), Some("regions"));
        let e = parse(Path::new("k.toml"), "name = \"a\"\nregions = [\"iad\"]\n[vm]\nmemory_mb = \"lots\"\n", None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("vm.memory_mb"), "{e:?}");
        assert!(e.message.contains("line 4"), "{e:?}");
        let e = parse(Path::new("k.toml"), "name = \"a\"\nregions = [", None).unwrap_err();
        assert!(e.message.contains("line"), "{e:?}");
        let e = parse(Path::new("k.toml"), "name = \"A B\"\nregions = [\"iad\"]", None).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("name"));
    }

    #[test]
    fn the_file_is_found_walking_up_and_dev_vars_are_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), "name = \"a\"\nregions = [\"iad\"]\n").unwrap();
        let deep = dir.path().join("a/b/c");
        std::fs::create_dir_all(&deep).unwrap();
        assert_eq!(find(&deep).unwrap(), dir.path().join(FILE));
        std::fs::write(dir.path().join(".dev.vars"), "# local\nKEFU_API_KEY=\"dev-key\"\nexport OTHER=1\n").unwrap();
        let vars = dev_vars(dir.path()).unwrap();
        assert_eq!((vars["KEFU_API_KEY"].as_str(), vars["OTHER"].as_str()), ("dev-key", "1"));
        assert!(parse_dotenv(Path::new("x"), "novalue").is_err());
    }
}

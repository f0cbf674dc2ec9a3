//! `kefu`, the operator's CLI (DESIGN §9), in wrangler's habits: `kefu.toml` found by walking up,
//! `[env.NAME]` sections, `.dev.vars`, a banner and step lines, warnings and errors with a hint
//! on stderr, NDJSON records to `KEFU_OUTPUT_FILE`, no prompts without a terminal (`--yes`).
//!
//! `config` reads kefu.toml; `render` turns it into fly.toml, Machines API bodies, the plan and
//! the flyctl commands (no I/O, Fly's rules checked); `driver` carries ops out (flyctl, the
//! Machines API, or a recording); `dev` runs a local multi-region cluster behind a router.
//! The same executable is the node and the router of `kefu dev` (`KEFU_RUN_AS`), so one
//! `cargo run -p wrangler-like-deploy -- dev` needs nothing else built.

pub mod config;
pub mod dev;
pub mod driver;
pub mod render;
pub mod ui;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use crate::config::App;
use crate::driver::{Driver, Op, Secret};

/// `kefu`.
#[derive(Debug, Parser)]
#[command(name = "kefu", version, about = "kefu's CLI: a local multi-region cluster, and deploys to Fly.io")]
pub struct Cli {
    /// The environment: an [env.NAME] section of kefu.toml.
    #[arg(short = 'e', long = "env", global = true)]
    pub env: Option<String>,
    /// kefu.toml to use (default: found by walking up from the working directory).
    #[arg(short = 'c', long = "config", global = true)]
    pub config: Option<PathBuf>,
    /// Answer yes to every question (needed where one would be asked without a terminal).
    #[arg(short = 'y', long = "yes", global = true)]
    pub yes: bool,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Writes a kefu.toml (and .gitignore lines for .kefu/ and .dev.vars) in this directory.
    Init {
        /// The app's name (default: the directory's).
        #[arg(long)]
        name: Option<String>,
        /// Overwrite an existing kefu.toml.
        #[arg(long)]
        force: bool,
    },
    /// Runs nodes in several regions, their mesh and a router on this machine.
    Dev(dev::DevArgs),
    /// Deploys to Fly.io, or with --dry-run writes what a deploy would do.
    Deploy {
        /// Write fly.toml, machines/<region>.json, plan.json and commands.sh; touch nothing.
        #[arg(long)]
        dry_run: bool,
        /// Where --dry-run writes (default dist).
        #[arg(long, default_value = "dist")]
        outdir: PathBuf,
        /// Regions instead of kefu.toml's (comma separated; the first is the primary).
        #[arg(long, value_delimiter = ',')]
        regions: Option<Vec<String>>,
        /// The image label (default kefu-<unix time>).
        #[arg(long)]
        label: Option<String>,
    },
    /// Shows the nodes' recent logs.
    Tail {
        /// Only this region.
        #[arg(long)]
        region: Option<String>,
        /// json (one record per line) or pretty.
        #[arg(long, default_value = "pretty")]
        format: String,
    },
    /// The app's secrets.
    #[command(subcommand)]
    Secret(SecretCommand),
    /// Deployed versions.
    #[command(subcommand)]
    Versions(VersionsCommand),
    /// Puts every node back on an earlier version's image.
    Rollback {
        /// The version (default: the one before the current).
        version: Option<u64>,
    },
    /// The regions the app runs in.
    #[command(subcommand)]
    Regions(RegionsCommand),
    /// The database.
    #[command(subcommand)]
    Db(DbCommand),
    /// Who the Fly token belongs to.
    Whoami,
}

/// `kefu secret …`.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Sets a secret; the value is read from standard input.
    Put {
        /// Its name.
        name: String,
    },
    /// Lists the secrets' names.
    List,
    /// Removes a secret.
    Delete {
        /// Its name.
        name: String,
    },
    /// Sets many: a JSON object or NAME=value lines, from a file (or stdin with `-`).
    Bulk {
        /// The file.
        file: PathBuf,
    },
}

/// `kefu versions …`.
#[derive(Debug, Subcommand)]
pub enum VersionsCommand {
    /// Lists the deployed versions, newest first.
    List,
}

/// `kefu regions …`.
#[derive(Debug, Subcommand)]
pub enum RegionsCommand {
    /// The configured regions and the nodes running in each.
    List,
    /// Adds a region to kefu.toml and deploys.
    Add {
        /// Region code.
        region: String,
    },
    /// Removes a region from kefu.toml, destroys its nodes and deploys.
    Remove {
        /// Region code.
        region: String,
    },
}

/// `kefu db …`.
#[derive(Debug, Subcommand)]
pub enum DbCommand {
    /// Schema migrations.
    #[command(subcommand)]
    Migrations(MigrationsCommand),
}

/// `kefu db migrations …`.
#[derive(Debug, Subcommand)]
pub enum MigrationsCommand {
    /// Which migrations each node's database has.
    List {
        /// The databases of `kefu dev` (.kefu/state) instead of the deployed nodes.
        #[arg(long)]
        local: bool,
    },
    /// Applies pending migrations to the databases of `kefu dev` (nodes stopped). Deployed nodes
    /// apply them when they start.
    Apply {
        /// The databases of `kefu dev`.
        #[arg(long)]
        local: bool,
    },
}

/// Runs `kefu` (or the node or router that `kefu dev` starts, by `KEFU_RUN_AS`); the exit code.
pub fn main() -> i32 {
    match std::env::var("KEFU_RUN_AS").as_deref() {
        Ok("node") => return exit_code(node::cli::main()),
        Ok("router") => return exit_code(edge_router_main()),
        _ => {}
    }
    let cli = Cli::parse();
    ui::record(
        "session",
        json!({"kefu_version": env!("CARGO_PKG_VERSION"), "command_line_args": std::env::args().skip(1).collect::<Vec<_>>()}),
    );
    if !matches!(cli.command, Command::Dev(_)) {
        ui::banner();
    }
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            let hint = e.chain().skip(1).map(|c| c.to_string()).collect::<Vec<_>>().join("\n");
            match e.downcast_ref::<config::ConfigError>() {
                Some(c) => ui::error(&c.to_string(), &c.hint),
                None => match e.downcast_ref::<render::RuleError>() {
                    Some(r) => ui::error(&r.to_string(), &r.hint),
                    None => ui::error(&e.to_string(), &hint),
                },
            }
            1
        }
    }
}

fn edge_router_main() -> anyhow::Result<()> {
    dev::router_main()
}

fn exit_code(r: anyhow::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// The config for the command line's `--config`/`--env`, warnings printed.
pub fn load_app(cli_config: Option<&Path>, env: Option<&str>) -> anyhow::Result<App> {
    let file = match cli_config {
        Some(f) => f.to_path_buf(),
        None => {
            let cwd = std::env::current_dir()?;
            config::find(&cwd).ok_or_else(|| config::ConfigError {
                file: cwd.join(config::FILE),
                key: None,
                message: "no kefu.toml here or in any directory above".to_string(),
                hint: "run `kefu init` to make one, or pass --config".to_string(),
            })?
        }
    };
    let loaded = config::load(&file, env)?;
    for w in &loaded.warnings {
        ui::warn(w);
    }
    Ok(loaded.app)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (yes, env) = (cli.yes, cli.env.clone());
    let app = || load_app(cli.config.as_deref(), env.as_deref());
    match cli.command {
        Command::Init { name, force } => init(name, force),
        Command::Dev(args) => {
            let cwd = std::env::current_dir()?;
            let found = cli.config.clone().or_else(|| config::find(&cwd));
            let app = match &found {
                Some(f) => Some(load_app(Some(f), env.as_deref())?),
                None => None,
            };
            dev::run(args, app.as_ref())
        }
        Command::Deploy { dry_run, outdir, regions, label } => {
            let mut app = app()?;
            if let Some(r) = regions {
                app.primary_region = r.first().cloned().context("--regions names none")?;
                app.regions = r;
            }
            let label = label.unwrap_or_else(|| format!("kefu-{}", unix_now()));
            if dry_run {
                dry_run_to(&app, &label, &outdir)
            } else {
                deploy(&app, &label, driver::from_env()?.as_mut())
            }
        }
        Command::Tail { region, format } => tail(&app()?, region, &format, driver::from_env()?.as_mut()),
        Command::Secret(c) => secret(&app()?, c, driver::from_env()?.as_mut(), yes),
        Command::Versions(VersionsCommand::List) => versions(&app()?, driver::from_env()?.as_mut()).map(|_| ()),
        Command::Rollback { version } => rollback(&app()?, version, driver::from_env()?.as_mut(), yes),
        Command::Regions(c) => regions(&app()?, c, driver::from_env()?.as_mut(), yes),
        Command::Db(DbCommand::Migrations(c)) => migrations(&app()?, c, driver::from_env()?.as_mut()),
        Command::Whoami => {
            let who = driver::from_env()?.call(&Op::Whoami)?;
            let email = who["email"].as_str().unwrap_or("an unknown user");
            ui::step(&format!("👋 You are logged in to Fly.io as {email}."));
            ui::record("whoami", json!({"email": email}));
            Ok(())
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

// -- init -------------------------------------------------------------------------------------------

/// The kefu.toml `kefu init` writes.
pub fn template(name: &str) -> String {
    format!(
        r#"# kefu.toml: what `kefu dev` runs locally and `kefu deploy` puts on Fly.io.
name = "{name}"               # the Fly app
primary_region = "iad"
regions = ["iad", "fra", "sin"]
nodes_per_region = 1
dockerfile = "Dockerfile"
profile = "prod"

[vm]
size = "shared-cpu-1x"
memory_mb = 512

# Not inherited by [env.NAME] sections: repeat them there.
[volume]
name = "kefu_data"
size_gb = 1

[vars]
KEFU_LOG = "info"

# [env.staging]
# regions = ["iad"]
# [env.staging.volume]
# name = "kefu_data"
"#
    )
}

fn init(name: Option<String>, force: bool) -> anyhow::Result<()> {
    let cwd = std::env::current_dir()?;
    let path = cwd.join(config::FILE);
    if path.exists() && !force {
        bail!("{} exists already — pass --force to overwrite it", path.display());
    }
    let name = name.unwrap_or_else(|| {
        let dir = cwd.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
        let clean: String = dir.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        if clean.trim_matches('-').is_empty() {
            "kefu-chat".to_string()
        } else {
            clean.trim_matches('-').to_string()
        }
    });
    let text = template(&name);
    config::parse(&path, &text, None)?;
    std::fs::write(&path, text)?;
    let ignore = cwd.join(".gitignore");
    let existing = std::fs::read_to_string(&ignore).unwrap_or_default();
    let mut add = String::new();
    for line in [".kefu/", ".dev.vars", "dist/"] {
        if !existing.lines().any(|l| l.trim() == line) {
            add.push_str(line);
            add.push('\n');
        }
    }
    if !add.is_empty() {
        let sep = if existing.is_empty() || existing.ends_with('\n') { "" } else { "\n" };
        std::fs::write(&ignore, format!("{existing}{sep}{add}"))?;
    }
    ui::step(&format!("✨ Wrote {} for the app {name}.", path.display()));
    ui::step("   Next: `kefu dev` runs it locally; `kefu deploy --dry-run` shows what a deploy does.");
    Ok(())
}

// -- deploy -------------------------------------------------------------------------------------------

/// The secrets a first deploy makes: names and fresh values (the CA as base64 PEM: Fly's file
/// secrets are base64).
fn new_secrets() -> anyhow::Result<Vec<(String, Secret)>> {
    let dir = std::env::temp_dir().join(format!("kefu-ca-{}-{}", std::process::id(), unix_now()));
    node::mesh::tls::make_ca(&dir)?;
    let b64 = |p: &str| -> anyhow::Result<String> { Ok(base64::engine::general_purpose::STANDARD.encode(std::fs::read(dir.join(p))?)) };
    let ca = b64("ca.pem")?;
    let ca_key = b64("ca.key")?;
    let _ = std::fs::remove_dir_all(&dir);
    let api_key: [u8; 32] = rand::random();
    Ok(vec![
        ("KEFU_API_KEY".to_string(), Secret(api_key.iter().map(|b| format!("{b:02x}")).collect())),
        ("KEFU_TOKEN_KEY".to_string(), Secret(node::auth::new_key_line().trim().to_string())),
        ("KEFU_CLUSTER_CA".to_string(), Secret(ca)),
        ("KEFU_CLUSTER_CA_KEY".to_string(), Secret(ca_key)),
    ])
}

/// Placeholders for the dry run: what would be made, never made.
fn placeholder_secrets() -> Vec<(String, Secret)> {
    render::SECRETS.iter().map(|n| (n.to_string(), Secret(String::new()))).collect()
}

/// `kefu deploy --dry-run`: writes the rendered files; no network.
pub fn dry_run_to(app: &App, label: &str, outdir: &Path) -> anyhow::Result<()> {
    let rendered = render::render(app, label, &placeholder_secrets())?;
    ui::step(&format!("Rendering {} for {} ({})", app.name, app.regions.join(", "), app.env.as_deref().unwrap_or("top level")));
    std::fs::create_dir_all(outdir.join("machines")).with_context(|| format!("creating {}", outdir.display()))?;
    std::fs::write(outdir.join("fly.toml"), &rendered.fly_toml)?;
    for (region, body) in &rendered.machines {
        std::fs::write(outdir.join("machines").join(format!("{region}.json")), serde_json::to_string_pretty(body)? + "\n")?;
    }
    let plan = json!({"app": app.name, "label": label, "image": render::image_for(app, label), "steps": rendered.plan});
    std::fs::write(outdir.join("plan.json"), serde_json::to_string_pretty(&plan)? + "\n")?;
    std::fs::write(outdir.join("commands.sh"), render::commands_sh(&rendered.plan))?;
    for f in ["fly.toml", "plan.json", "commands.sh"] {
        ui::step(&format!("  wrote {}", outdir.join(f).display()));
    }
    ui::step(&format!("  wrote {} machine bodies in {}", rendered.machines.len(), outdir.join("machines").display()));
    ui::step(&format!("--dry-run: exiting now ({} steps planned, nothing sent).", rendered.plan.len()));
    ui::record("dry-run", json!({"app": app.name, "outdir": outdir.display().to_string(), "steps": rendered.plan.len()}));
    Ok(())
}

fn names_of(list: &Value) -> Vec<String> {
    list.as_array().into_iter().flatten().filter_map(|v| v["name"].as_str().or(v["Name"].as_str()).map(str::to_string)).collect()
}

/// `kefu deploy`: the plan carried out through `driver`, skipping what Fly already has.
pub fn deploy(app: &App, label: &str, driver: &mut dyn Driver) -> anyhow::Result<()> {
    // The rules first: nothing is sent for a config Fly would refuse.
    render::render(app, label, &placeholder_secrets())?;
    let a = app.name.clone();
    ui::step(&format!("Deploying {a} to {} ({} node(s) each)", app.regions.join(", "), app.nodes_per_region));
    if !names_of(&driver.call(&Op::AppsList { org: app.org.clone() })?).contains(&a) {
        ui::step(&format!("  creating the app {a} in {}", app.org));
        driver.call(&Op::AppCreate { app: a.clone(), org: app.org.clone() })?;
    }
    let ips = driver.call(&Op::IpsList { app: a.clone() })?;
    let has = |kind: &str| {
        ips.as_array().into_iter().flatten().any(|ip| {
            let t = ip["type"].as_str().or(ip["Type"].as_str()).unwrap_or_default();
            t.eq_ignore_ascii_case(kind)
        })
    };
    if !has("v4") {
        ui::step("  allocating a dedicated IPv4 (UDP needs one)");
        driver.call(&Op::IpAllocateV4 { app: a.clone() })?;
    }
    if !has("v6") {
        driver.call(&Op::IpAllocateV6 { app: a.clone() })?;
    }
    let present = names_of(&driver.call(&Op::SecretsList { app: a.clone() })?);
    let missing: Vec<(String, Secret)> = new_secrets()?.into_iter().filter(|(n, _)| !present.contains(n)).collect();
    if !missing.is_empty() {
        ui::step(&format!("  setting secrets: {}", missing.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")));
        if let Some((_, key)) = missing.iter().find(|(n, _)| n == "KEFU_API_KEY") {
            let dir = app.dir().join(".kefu").join("secrets");
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(format!("{a}.env"));
            node::tls::write_private(&path, format!("KEFU_API_KEY={}\n", key.0).as_bytes())?;
            ui::step(&format!("  the API key is in {} (0600); it is shown nowhere else", path.display()));
        }
        driver.call(&Op::SecretsSet { app: a.clone(), secrets: missing, stage: true })?;
    }
    let image = match &app.image {
        Some(image) => image.clone(),
        None => {
            let p = ui::Progress::start(&format!("building {} and pushing it", app.dockerfile));
            let built = driver.call(&Op::ImageBuild { app: a.clone(), dockerfile: app.dockerfile.clone(), label: label.to_string() })?;
            p.done();
            built["image"].as_str().map(str::to_string).unwrap_or_else(|| render::image_for(app, label))
        }
    };
    roll(app, &image, driver)?;
    ui::step(&format!("✨ Deployed {a} ({image})."));
    ui::record("deploy", json!({"app": a, "image": image, "label": label, "regions": app.regions}));
    Ok(())
}

/// Puts every configured node on `image`, one machine at a time: existing machines updated,
/// missing ones created (with a volume each).
fn roll(app: &App, image: &str, driver: &mut dyn Driver) -> anyhow::Result<()> {
    let a = app.name.clone();
    let services = render::services();
    let env = render::environment(app);
    let machines = driver.call(&Op::MachinesList { app: a.clone() })?;
    let volumes = driver.call(&Op::VolumesList { app: a.clone() })?;
    let mut used_volumes: Vec<String> = Vec::new();
    for region in &app.regions {
        let mut here: Vec<&Value> = machines.as_array().into_iter().flatten().filter(|m| m["region"].as_str() == Some(region)).collect();
        here.sort_by_key(|m| m["id"].as_str().unwrap_or_default().to_string());
        for i in 0..app.nodes_per_region as usize {
            let mut body = render::machine_body(app, region, image, &services, &env);
            let (op, action) = match here.get(i) {
                Some(existing) => {
                    let id = existing["id"].as_str().unwrap_or_default().to_string();
                    if let Some(vol) = existing["config"]["mounts"][0]["volume"].as_str() {
                        body["config"]["mounts"][0]["volume"] = json!(vol);
                    }
                    (Op::MachineUpdate { app: a.clone(), id, body }, "updated")
                }
                None => {
                    if let Some(v) = &app.volume {
                        let free = volumes.as_array().into_iter().flatten().find(|vol| {
                            vol["region"].as_str() == Some(region)
                                && vol["name"].as_str() == Some(&v.name)
                                && vol["attached_machine_id"].is_null()
                                && !used_volumes.contains(&vol["id"].as_str().unwrap_or_default().to_string())
                        });
                        let id = match free {
                            Some(vol) => vol["id"].as_str().unwrap_or_default().to_string(),
                            None => {
                                let made = driver.call(&Op::VolumeCreate {
                                    app: a.clone(),
                                    name: v.name.clone(),
                                    region: region.clone(),
                                    size_gb: v.size_gb,
                                })?;
                                made["id"].as_str().context("the volume was created without an id")?.to_string()
                            }
                        };
                        used_volumes.push(id.clone());
                        body["config"]["mounts"][0]["volume"] = json!(id);
                    }
                    (Op::MachineCreate { app: a.clone(), region: region.clone(), body }, "created")
                }
            };
            let p = ui::Progress::start(&format!("{action} node {} in {region}", i + 1));
            let answer = driver.call(&op)?;
            let id = match &op {
                Op::MachineUpdate { id, .. } => id.clone(),
                _ => answer["id"].as_str().unwrap_or_default().to_string(),
            };
            driver.call(&Op::MachineWait { app: a.clone(), id: id.clone() })?;
            p.done();
            ui::record("machine", json!({"app": a, "region": region, "machine_id": id, "action": action, "image": image}));
        }
        for extra in here.iter().skip(app.nodes_per_region as usize) {
            ui::warn(&format!(
                "machine {} in {region} is beyond nodes_per_region = {}: left running; destroy it with `fly machine destroy`",
                extra["id"].as_str().unwrap_or("?"),
                app.nodes_per_region
            ));
        }
    }
    for m in machines.as_array().into_iter().flatten() {
        if let Some(r) = m["region"].as_str().filter(|r| !app.regions.iter().any(|x| x == r)) {
            ui::warn(&format!(
                "machine {} runs in {r}, which kefu.toml does not list: `kefu regions remove {r}` destroys it",
                m["id"].as_str().unwrap_or("?")
            ));
        }
    }
    Ok(())
}

// -- the other commands ---------------------------------------------------------------------------------

fn tail(app: &App, region: Option<String>, format: &str, driver: &mut dyn Driver) -> anyhow::Result<()> {
    if format != "json" && format != "pretty" {
        bail!("--format {format:?}: expected json or pretty");
    }
    ui::step(&format!("Logs of {}{}", app.name, region.as_ref().map(|r| format!(" in {r}")).unwrap_or_default()));
    let lines = driver.call(&Op::Logs { app: app.name.clone(), region })?;
    for l in lines.as_array().into_iter().flatten() {
        if format == "json" {
            println!("{l}");
        } else {
            let field = |k: &str| l[k].as_str().unwrap_or("").to_string();
            println!("{} {} [{}] {}", field("timestamp"), field("region"), field("instance"), field("message"));
        }
    }
    Ok(())
}

fn read_stdin_secret(name: &str) -> anyhow::Result<String> {
    use std::io::{IsTerminal, Read};
    if std::io::stdin().is_terminal() {
        eprint!("Enter a secret value for {name}: ");
    }
    let mut value = String::new();
    std::io::stdin().read_to_string(&mut value)?;
    let value = value.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        bail!("no value for {name} on standard input");
    }
    Ok(value)
}

fn secret(app: &App, c: SecretCommand, driver: &mut dyn Driver, yes: bool) -> anyhow::Result<()> {
    let a = app.name.clone();
    match c {
        SecretCommand::Put { name } => {
            check_secret_name(&name)?;
            let value = read_stdin_secret(&name)?;
            ui::step(&format!("🌀 Creating the secret {name} for {a}"));
            driver.call(&Op::SecretsSet { app: a, secrets: vec![(name.clone(), Secret(value))], stage: false })?;
            ui::step(&format!("✨ Success! Uploaded secret {name}"));
        }
        SecretCommand::List => {
            let list = driver.call(&Op::SecretsList { app: a })?;
            let out: Vec<Value> = names_of(&list).into_iter().map(|n| json!({"name": n, "type": "secret_text"})).collect();
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        SecretCommand::Delete { name } => {
            if !ui::confirm(&format!("Delete the secret {name} of {a}?"), yes)? {
                ui::step("Not deleted.");
                return Ok(());
            }
            ui::step(&format!("🌀 Deleting the secret {name} of {a}"));
            driver.call(&Op::SecretsUnset { app: a, names: vec![name.clone()] })?;
            ui::step(&format!("✨ Success! Deleted secret {name}"));
        }
        SecretCommand::Bulk { file } => {
            let text = if file.as_os_str() == "-" {
                let mut t = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut t)?;
                t
            } else {
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?
            };
            let map: BTreeMap<String, String> = match serde_json::from_str::<BTreeMap<String, Value>>(&text) {
                Ok(obj) => obj.into_iter().map(|(k, v)| (k, v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()))).collect(),
                Err(_) => config::parse_dotenv(&file, &text)?,
            };
            for name in map.keys() {
                check_secret_name(name)?;
            }
            ui::step(&format!("🌀 Creating {} secrets for {a}", map.len()));
            let secrets = map.into_iter().map(|(k, v)| (k, Secret(v))).collect::<Vec<_>>();
            let count = secrets.len();
            driver.call(&Op::SecretsSet { app: a, secrets, stage: false })?;
            ui::step(&format!("✨ {count} secrets successfully uploaded"));
        }
    }
    Ok(())
}

fn check_secret_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') {
        bail!("secret name {name:?}: use upper-case letters, digits and _");
    }
    if name.starts_with("FLY_") {
        bail!("secret name {name}: names starting with FLY_ are Fly's own");
    }
    Ok(())
}

/// A release's field, as the Machines API (`snake_case`) or flyctl (`PascalCase`) names it.
fn release_field<'a>(v: &'a Value, snake: &str) -> &'a Value {
    let pascal: String = snake.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect();
    match &v[snake] {
        Value::Null => &v[pascal.as_str()],
        found => found,
    }
}

/// Prints the versions, newest first; returns them (fields in snake_case).
fn versions(app: &App, driver: &mut dyn Driver) -> anyhow::Result<Vec<Value>> {
    let raw: Vec<Value> = driver.call(&Op::ReleasesList { app: app.name.clone() })?.as_array().cloned().unwrap_or_default();
    let mut list: Vec<Value> = raw
        .iter()
        .map(|v| {
            json!({
                "version": release_field(v, "version"),
                "status": release_field(v, "status"),
                "created_at": release_field(v, "created_at"),
                "image_ref": release_field(v, "image_ref"),
            })
        })
        .collect();
    list.sort_by_key(|v| std::cmp::Reverse(v["version"].as_u64().unwrap_or(0)));
    if list.is_empty() {
        ui::step(&format!("{} has no versions yet: `kefu deploy` makes the first.", app.name));
    }
    for v in &list {
        println!(
            "v{:<5} {:<10} {:<25} {}",
            v["version"].as_u64().unwrap_or(0),
            v["status"].as_str().unwrap_or(""),
            v["created_at"].as_str().unwrap_or(""),
            v["image_ref"].as_str().unwrap_or("")
        );
    }
    Ok(list)
}

fn rollback(app: &App, version: Option<u64>, driver: &mut dyn Driver, yes: bool) -> anyhow::Result<()> {
    let list = versions(app, driver)?;
    let target = match version {
        Some(n) => list
            .iter()
            .find(|v| v["version"].as_u64() == Some(n))
            .with_context(|| format!("no version {n}: `kefu versions list` shows them"))?,
        None => list.get(1).context("there is no earlier version to roll back to")?,
    };
    let image = target["image_ref"].as_str().context("that version names no image")?.to_string();
    let n = target["version"].as_u64().unwrap_or(0);
    if !ui::confirm(&format!("Roll {} back to v{n} ({image})?", app.name), yes)? {
        ui::step("Not rolled back.");
        return Ok(());
    }
    roll(app, &image, driver)?;
    ui::step(&format!("✨ {} is back on v{n}.", app.name));
    ui::record("rollback", json!({"app": app.name, "version": n, "image": image}));
    Ok(())
}

fn regions(app: &App, c: RegionsCommand, driver: &mut dyn Driver, yes: bool) -> anyhow::Result<()> {
    match c {
        RegionsCommand::List => {
            let machines = driver.call(&Op::MachinesList { app: app.name.clone() })?;
            let count = |r: &str| machines.as_array().into_iter().flatten().filter(|m| m["region"].as_str() == Some(r)).count();
            println!("{:<8} {:<11} running", "region", "configured");
            let mut all: Vec<String> = app.regions.clone();
            for m in machines.as_array().into_iter().flatten() {
                if let Some(r) = m["region"].as_str() {
                    if !all.iter().any(|x| x == r) {
                        all.push(r.to_string());
                    }
                }
            }
            for r in &all {
                let configured = if app.regions.contains(r) { app.nodes_per_region.to_string() } else { "-".to_string() };
                println!("{r:<8} {configured:<11} {}", count(r));
            }
            Ok(())
        }
        RegionsCommand::Add { region } => {
            if app.regions.contains(&region) {
                bail!("{region} is in kefu.toml already");
            }
            let mut next = app.regions.clone();
            next.push(region.clone());
            let mut changed = app.clone();
            changed.regions = next;
            render::render(&changed, "check", &placeholder_secrets())?;
            if !ui::confirm(&format!("Add {region} to {} and deploy (every node restarts with the new peer list)?", app.name), yes)? {
                return Ok(());
            }
            set_regions(&app.file, app.env.as_deref(), &changed.regions)?;
            ui::step(&format!("  {} now lists {}", app.file.display(), changed.regions.join(", ")));
            deploy(&changed, &format!("kefu-{}", unix_now()), driver)
        }
        RegionsCommand::Remove { region } => {
            if !app.regions.contains(&region) {
                bail!("{region} is not in kefu.toml");
            }
            if app.regions.len() == 1 {
                bail!("{region} is the only region: a deploy needs one");
            }
            let mut changed = app.clone();
            changed.regions.retain(|r| r != &region);
            changed.primary_region = changed.regions[0].clone();
            if !ui::confirm(&format!("Remove {region} from {}: destroy its nodes (their volumes stay) and deploy?", app.name), yes)? {
                return Ok(());
            }
            set_regions(&app.file, app.env.as_deref(), &changed.regions)?;
            let machines = driver.call(&Op::MachinesList { app: app.name.clone() })?;
            for m in machines.as_array().into_iter().flatten().filter(|m| m["region"].as_str() == Some(&region)) {
                let id = m["id"].as_str().unwrap_or_default().to_string();
                ui::step(&format!("  destroying {id} in {region}"));
                driver.call(&Op::MachineDestroy { app: app.name.clone(), id: id.clone() })?;
                ui::record("machine", json!({"app": app.name, "region": region, "machine_id": id, "action": "destroyed"}));
            }
            deploy(&changed, &format!("kefu-{}", unix_now()), driver)
        }
    }
}

/// Rewrites the `regions = [...]` line of the top level (or of `[env.NAME]`), keeping the rest
/// of the file as it is; adds one when the section has none.
pub fn set_regions(file: &Path, env: Option<&str>, regions: &[String]) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)?;
    let list = format!("regions = [{}]", regions.iter().map(|r| format!("\"{r}\"")).collect::<Vec<_>>().join(", "));
    let header = env.map(|e| format!("[env.{e}]"));
    let mut out = Vec::new();
    let mut in_section = header.is_none();
    let mut done = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if in_section && !done {
                out.push(list.clone());
                done = true;
            }
            in_section = header.as_deref() == Some(trimmed);
        }
        if in_section && !done && trimmed.starts_with("regions") && trimmed[7..].trim_start().starts_with('=') {
            out.push(list.clone());
            done = true;
            continue;
        }
        out.push(line.to_string());
    }
    if !done {
        if in_section {
            out.push(list);
        } else {
            bail!("{}: no [env.{}] section to set regions in", file.display(), env.unwrap_or_default());
        }
    }
    let mut new = out.join("\n");
    new.push('\n');
    config::parse(file, &new, env)?;
    std::fs::write(file, new)?;
    Ok(())
}

fn migrations(app: &App, c: MigrationsCommand, driver: &mut dyn Driver) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match c {
        MigrationsCommand::List { local: true } => {
            let dirs = dev::node_dirs(&app.dir().join(".kefu").join("state"));
            if dirs.is_empty() {
                ui::step("No local databases yet: `kefu dev` makes them under .kefu/state.");
            }
            for (id, dir) in dirs {
                let applied = runtime.block_on(node::store::applied_migrations(&dir))?;
                println!("{id} ({})", dir.display());
                for m in schema::migrations::MIGRATIONS {
                    let status = if applied.iter().any(|(v, _)| *v == m.version) { "applied" } else { "pending" };
                    println!("  {:>4}  {:<32} {status}", m.version, m.name);
                }
            }
            Ok(())
        }
        MigrationsCommand::List { local: false } => {
            ui::step(&format!("Migrations known to this kefu ({}): each node applies them when it starts.", env!("CARGO_PKG_VERSION")));
            for m in schema::migrations::MIGRATIONS {
                println!("  {:>4}  {}", m.version, m.name);
            }
            let machines = driver.call(&Op::MachinesList { app: app.name.clone() })?;
            for m in machines.as_array().into_iter().flatten() {
                println!(
                    "{} {} runs {}",
                    m["id"].as_str().unwrap_or("?"),
                    m["region"].as_str().unwrap_or("?"),
                    m["config"]["metadata"]["kefu_version"].as_str().or(m["config"]["image"].as_str()).unwrap_or("?")
                );
            }
            Ok(())
        }
        MigrationsCommand::Apply { local: true } => {
            let dirs = dev::node_dirs(&app.dir().join(".kefu").join("state"));
            for (id, dir) in dirs {
                let applied = runtime.block_on(node::store::apply_migrations(&dir)).with_context(|| format!("node {id}: stop `kefu dev` first"))?;
                ui::step(&format!("{id}: {}", if applied.is_empty() { "up to date".to_string() } else { format!("applied {applied:?}") }));
            }
            Ok(())
        }
        MigrationsCommand::Apply { local: false } => bail!(
            "deployed nodes apply migrations when they start (a release command runs without the volume): `kefu deploy` rolls them out; `--local` applies them to kefu dev's databases"
        ),
    }
}

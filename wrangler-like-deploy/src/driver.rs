//! Everything `kefu` asks of Fly, as [`Op`]s, and the [`Driver`]s that carry them out: flyctl
//! (spawns `fly`), the Machines API (HTTP with `FLY_API_TOKEN`), and the recording driver
//! (`KEFU_DRIVER=record:PATH`: appends each op as one JSON line and answers from canned
//! answers) that makes every command testable offline. Secret values never leave as text in a
//! record, a plan or a printed command: [`Secret`] serialises as `***`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

/// A secret value; shown and serialised as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// One request to Fly.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Who the token belongs to.
    Whoami,
    /// The apps of the organisation.
    AppsList { org: String },
    /// A new app.
    AppCreate { app: String, org: String },
    /// The app's IP addresses.
    IpsList { app: String },
    /// A dedicated IPv4 address (UDP needs one: shared IPv4s carry no UDP).
    IpAllocateV4 { app: String },
    /// An IPv6 address.
    IpAllocateV6 { app: String },
    /// The names of the app's secrets.
    SecretsList { app: String },
    /// Sets secrets; `stage`: without restarting machines (the deploy that follows does).
    SecretsSet { app: String, secrets: Vec<(String, Secret)>, stage: bool },
    /// Removes secrets.
    SecretsUnset { app: String, names: Vec<String> },
    /// The app's volumes.
    VolumesList { app: String },
    /// A volume in a region.
    VolumeCreate { app: String, name: String, region: String, size_gb: u32 },
    /// Builds the image from the Dockerfile and pushes it to Fly's registry.
    ImageBuild { app: String, dockerfile: String, label: String },
    /// The app's machines.
    MachinesList { app: String },
    /// A new machine from a Machines API create body.
    MachineCreate { app: String, region: String, body: Value },
    /// A machine's config replaced (it restarts with it).
    MachineUpdate { app: String, id: String, body: Value },
    /// Waits until a machine is started.
    MachineWait { app: String, id: String },
    /// Destroys a machine.
    MachineDestroy { app: String, id: String },
    /// Deploys with the app's releases (what `versions list` shows).
    ReleasesList { app: String },
    /// Recent log lines (optionally of one region).
    Logs { app: String, region: Option<String> },
}

impl Op {
    /// The op's name in records and canned answers.
    pub fn name(&self) -> String {
        serde_json::to_value(self).ok().and_then(|v| v["op"].as_str().map(str::to_string)).unwrap_or_default()
    }
}

/// Carries out ops; the answer is JSON in the shape the Machines API (or `fly … --json`) gives.
pub trait Driver {
    /// Runs one op.
    fn call(&mut self, op: &Op) -> anyhow::Result<Value>;
}

/// The driver named by `KEFU_DRIVER` (`flyctl`, the default; `api`; `record:PATH`).
pub fn from_env() -> anyhow::Result<Box<dyn Driver>> {
    let spec = std::env::var("KEFU_DRIVER").unwrap_or_default();
    match spec.as_str() {
        "" | "flyctl" => Ok(Box::new(Flyctl::from_env())),
        "api" => Ok(Box::new(MachinesApi::from_env()?)),
        s if s.starts_with("record:") => Ok(Box::new(Record::open(PathBuf::from(&s["record:".len()..]))?)),
        other => bail!("KEFU_DRIVER={other:?}: expected flyctl, api or record:PATH"),
    }
}

// -- recording ----------------------------------------------------------------------------------

/// Appends every op to a file as one JSON line and answers from canned answers: built in, or
/// from `KEFU_DRIVER_ANSWERS` (a JSON object from op name to answer) when set.
pub struct Record {
    path: PathBuf,
    answers: serde_json::Map<String, Value>,
    machines: u32,
}

impl Record {
    /// Records to `path` (appending).
    pub fn open(path: PathBuf) -> anyhow::Result<Record> {
        let answers = match std::env::var("KEFU_DRIVER_ANSWERS") {
            Ok(file) => {
                let text = std::fs::read_to_string(&file).with_context(|| format!("reading KEFU_DRIVER_ANSWERS {file}"))?;
                serde_json::from_str(&text).with_context(|| format!("{file}: expected a JSON object of op name to answer"))?
            }
            Err(_) => serde_json::Map::new(),
        };
        Ok(Record { path, answers, machines: 0 })
    }

    fn canned(&mut self, op: &Op) -> Value {
        if let Some(answer) = self.answers.get(&op.name()) {
            return answer.clone();
        }
        match op {
            Op::Whoami => json!({"email": "recorded@example.com"}),
            Op::AppsList { .. } | Op::IpsList { .. } | Op::SecretsList { .. } | Op::VolumesList { .. } | Op::MachinesList { .. } => {
                json!([])
            }
            Op::ReleasesList { .. } => json!([]),
            Op::Logs { .. } => json!([]),
            Op::VolumeCreate { region, .. } => json!({"id": format!("vol_{region}_recorded"), "region": region}),
            Op::ImageBuild { app, label, .. } => json!({"image": format!("registry.fly.io/{app}:{label}")}),
            Op::MachineCreate { region, .. } => {
                self.machines += 1;
                json!({"id": format!("m{:04}{region}", self.machines), "region": region, "state": "created"})
            }
            _ => json!({"ok": true}),
        }
    }
}

impl Driver for Record {
    fn call(&mut self, op: &Op) -> anyhow::Result<Value> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("opening the record {}", self.path.display()))?;
        writeln!(file, "{}", serde_json::to_string(op)?)?;
        Ok(self.canned(op))
    }
}

// -- flyctl ---------------------------------------------------------------------------------------

/// Runs `fly` for each op.
pub struct Flyctl {
    /// The flyctl executable.
    pub bin: String,
}

/// The flyctl arguments for `op`; secret values appear as `***` unless `reveal`.
pub fn flyctl_args(op: &Op, reveal: bool) -> Vec<String> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    match op {
        Op::Whoami => s(&["auth", "whoami", "--json"]),
        Op::AppsList { org } => s(&["apps", "list", "--org", org, "--json"]),
        Op::AppCreate { app, org } => s(&["apps", "create", app, "--org", org]),
        Op::IpsList { app } => s(&["ips", "list", "--app", app, "--json"]),
        Op::IpAllocateV4 { app } => s(&["ips", "allocate-v4", "--app", app, "--yes"]),
        Op::IpAllocateV6 { app } => s(&["ips", "allocate-v6", "--app", app]),
        Op::SecretsList { app } => s(&["secrets", "list", "--app", app, "--json"]),
        Op::SecretsSet { app, secrets, stage } => {
            let mut out = s(&["secrets", "set", "--app", app]);
            if *stage {
                out.push("--stage".to_string());
            }
            out.extend(secrets.iter().map(|(k, v)| format!("{k}={}", if reveal { v.0.as_str() } else { "***" })));
            out
        }
        Op::SecretsUnset { app, names } => {
            let mut out = s(&["secrets", "unset", "--app", app]);
            out.extend(names.iter().cloned());
            out
        }
        Op::VolumesList { app } => s(&["volumes", "list", "--app", app, "--json"]),
        Op::VolumeCreate { app, name, region, size_gb } => {
            s(&["volumes", "create", name, "--app", app, "--region", region, "--size", &size_gb.to_string(), "--yes", "--json"])
        }
        Op::ImageBuild { app, dockerfile, label } => {
            s(&["deploy", "--app", app, "--dockerfile", dockerfile, "--build-only", "--push", "--image-label", label])
        }
        Op::MachinesList { app } => s(&["machines", "list", "--app", app, "--json"]),
        Op::MachineCreate { app, region, body } => {
            let mut out = s(&["machine", "run", body["config"]["image"].as_str().unwrap_or_default(), "--app", app, "--region", region]);
            if let Some(name) = body["name"].as_str() {
                out.extend(s(&["--name", name]));
            }
            out.extend(machine_flags(&body["config"]));
            out.push("--detach".to_string());
            out
        }
        Op::MachineUpdate { app, id, body } => {
            let mut out = s(&["machine", "update", id, "--app", app, "--image", body["config"]["image"].as_str().unwrap_or_default()]);
            out.extend(machine_flags(&body["config"]).into_iter().filter(|f| !f.starts_with("--volume")));
            out.push("--yes".to_string());
            out
        }
        Op::MachineWait { app, id } => s(&["machine", "status", id, "--app", app]),
        Op::MachineDestroy { app, id } => s(&["machine", "destroy", id, "--app", app, "--force"]),
        Op::ReleasesList { app } => s(&["releases", "--app", app, "--json"]),
        Op::Logs { app, region } => {
            let mut out = s(&["logs", "--app", app, "--no-tail", "--json"]);
            if let Some(r) = region {
                out.extend(s(&["--region", r]));
            }
            out
        }
    }
}

/// `fly machine run/update` flags for a Machines API config.
fn machine_flags(config: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(guest) = config.get("guest") {
        out.push(format!("--vm-size={}", guest["size"].as_str().unwrap_or("shared-cpu-1x")));
        out.push(format!("--vm-memory={}", guest["memory_mb"]));
    }
    for (k, v) in config["env"].as_object().into_iter().flatten() {
        out.push(format!("--env={k}={}", v.as_str().unwrap_or_default()));
    }
    for f in config["files"].as_array().into_iter().flatten() {
        out.push(format!(
            "--file-secret={}={}",
            f["guest_path"].as_str().unwrap_or_default(),
            f["secret_name"].as_str().unwrap_or_default()
        ));
    }
    for m in config["mounts"].as_array().into_iter().flatten() {
        out.push(format!("--volume={}:{}", m["volume"].as_str().unwrap_or_default(), m["path"].as_str().unwrap_or_default()));
    }
    for svc in config["services"].as_array().into_iter().flatten() {
        let (proto, internal) = (svc["protocol"].as_str().unwrap_or("tcp"), &svc["internal_port"]);
        for p in svc["ports"].as_array().into_iter().flatten() {
            let handlers: Vec<&str> = p["handlers"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let mut flag = format!("--port={}:{internal}/{proto}", p["port"]);
            if !handlers.is_empty() {
                flag.push(':');
                flag.push_str(&handlers.join(","));
            }
            out.push(flag);
        }
    }
    out.push("--restart=always".to_string());
    out.push("--autostop=off".to_string());
    out
}

impl Flyctl {
    /// `fly`, or the executable `KEFU_FLYCTL` names.
    pub fn from_env() -> Flyctl {
        Flyctl { bin: std::env::var("KEFU_FLYCTL").unwrap_or_else(|_| "fly".to_string()) }
    }
}

impl Driver for Flyctl {
    fn call(&mut self, op: &Op) -> anyhow::Result<Value> {
        let args = flyctl_args(op, true);
        let output = std::process::Command::new(&self.bin)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("running {} (install flyctl, or set KEFU_FLYCTL)", self.bin))?;
        if !output.status.success() {
            bail!("`fly {}` failed: {}", flyctl_args(op, false).join(" "), String::from_utf8_lossy(&output.stderr).trim());
        }
        let text = String::from_utf8_lossy(&output.stdout);
        if let Ok(v) = serde_json::from_str(&text) {
            return Ok(v);
        }
        // `fly logs --json` writes one object per line.
        let lines: Result<Vec<Value>, _> = text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect();
        Ok(match lines {
            Ok(lines) if !lines.is_empty() => Value::Array(lines),
            _ => json!({"output": text.trim()}),
        })
    }
}

// -- Machines API ---------------------------------------------------------------------------------

/// Fly's Machines API over HTTP. Building an image needs Docker, which the API does not do: with
/// this driver `image` must be set in kefu.toml (a prebuilt image).
pub struct MachinesApi {
    base: String,
    token: String,
    http: http_client::Client,
}

impl MachinesApi {
    /// `FLY_API_TOKEN` and `FLY_API_HOSTNAME` (default `https://api.machines.dev`).
    pub fn from_env() -> anyhow::Result<MachinesApi> {
        let token = std::env::var("FLY_API_TOKEN").context("the api driver needs FLY_API_TOKEN (`fly tokens create deploy`)")?;
        let base = std::env::var("FLY_API_HOSTNAME").unwrap_or_else(|_| "https://api.machines.dev".to_string());
        Ok(MachinesApi { base, token, http: http_client::Client::new()? })
    }

    fn request(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        self.http.send(method, &format!("{}/v1{path}", self.base), &self.token, body)
    }
}

impl Driver for MachinesApi {
    fn call(&mut self, op: &Op) -> anyhow::Result<Value> {
        match op {
            Op::AppsList { org } => self.request("GET", &format!("/apps?org_slug={org}"), None).map(|v| v["apps"].clone()),
            Op::AppCreate { app, org } => self.request("POST", "/apps", Some(json!({"app_name": app, "org_slug": org}))),
            Op::SecretsList { app } => self.request("GET", &format!("/apps/{app}/secrets"), None).map(|v| v["secrets"].clone()),
            Op::SecretsSet { app, secrets, .. } => {
                for (name, value) in secrets {
                    self.request("POST", &format!("/apps/{app}/secrets/{name}"), Some(json!({"value": value.0})))?;
                }
                Ok(json!({"ok": true}))
            }
            Op::SecretsUnset { app, names } => {
                for name in names {
                    self.request("DELETE", &format!("/apps/{app}/secrets/{name}"), None)?;
                }
                Ok(json!({"ok": true}))
            }
            Op::VolumesList { app } => self.request("GET", &format!("/apps/{app}/volumes"), None),
            Op::VolumeCreate { app, name, region, size_gb } => {
                self.request("POST", &format!("/apps/{app}/volumes"), Some(json!({"name": name, "region": region, "size_gb": size_gb})))
            }
            Op::MachinesList { app } => self.request("GET", &format!("/apps/{app}/machines"), None),
            Op::MachineCreate { app, body, .. } => self.request("POST", &format!("/apps/{app}/machines"), Some(body.clone())),
            Op::MachineUpdate { app, id, body } => self.request("POST", &format!("/apps/{app}/machines/{id}"), Some(body.clone())),
            Op::MachineWait { app, id } => self.request("GET", &format!("/apps/{app}/machines/{id}/wait?state=started&timeout=60"), None),
            Op::MachineDestroy { app, id } => self.request("DELETE", &format!("/apps/{app}/machines/{id}?force=true"), None),
            Op::Whoami
            | Op::IpsList { .. }
            | Op::IpAllocateV4 { .. }
            | Op::IpAllocateV6 { .. }
            | Op::ReleasesList { .. }
            | Op::Logs { .. } => {
                // These live in Fly's GraphQL API, which flyctl speaks.
                Flyctl::from_env().call(op)
            }
            Op::ImageBuild { .. } => bail!("the api driver cannot build images: set `image` in kefu.toml, or use KEFU_DRIVER=flyctl"),
        }
    }
}

/// A small blocking HTTP client over reqwest's async one (a runtime of its own per client).
mod http_client {
    use anyhow::{bail, Context};
    use serde_json::Value;

    /// See the module.
    pub struct Client {
        runtime: tokio::runtime::Runtime,
        inner: ::reqwest::Client,
    }

    impl Client {
        pub fn new() -> anyhow::Result<Client> {
            Ok(Client { runtime: tokio::runtime::Builder::new_current_thread().enable_all().build()?, inner: ::reqwest::Client::new() })
        }

        pub fn send(&self, method: &str, url: &str, token: &str, body: Option<Value>) -> anyhow::Result<Value> {
            self.runtime.block_on(async {
                let method = ::reqwest::Method::from_bytes(method.as_bytes())?;
                let mut req = self.inner.request(method, url).bearer_auth(token);
                if let Some(body) = body {
                    req = req.json(&body);
                }
                let resp = req.send().await.with_context(|| format!("calling {url}"))?;
                let status = resp.status();
                let text = resp.text().await?;
                if !status.is_success() {
                    bail!("{url}: {status}: {text}");
                }
                Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
            })
        }
    }
}

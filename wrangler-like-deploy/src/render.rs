//! What a deploy puts on Fly, rendered from a resolved [`App`] without any I/O: `fly.toml`, the
//! Machines API create body of each region's nodes, the plan (every step in order, as driver
//! ops) and the flyctl commands. Fly's rules are checked first; a config that breaks one is
//! refused with the rule named.
//!
//! A node on Fly: its id is the machine id and its region `FLY_REGION` (the node reads both);
//! it finds its peers in `vms.<app>.internal` and reaches them on the private network at
//! `<id>.vm.<app>.internal:7443`; the cluster CA and its key come as files from secrets, and
//! each node signs its own mesh certificate with them at start.

use serde_json::{json, Value};

use crate::config::App;
use crate::driver::{Op, Secret};

/// The J-IM port (binary TCP, HTTP and WebSocket, sniffed).
pub const JIM_PORT: u16 = 8888;
/// TLS (TCP) and QUIC (UDP) share this number.
pub const TLS_PORT: u16 = 8443;
/// Admin: `/readyz`, `/metrics` (private).
pub const ADMIN_PORT: u16 = 9090;
/// The mesh (UDP, private network only).
pub const MESH_PORT: u16 = 7443;
/// Where the volume is mounted and the node keeps its data.
pub const DATA_DIR: &str = "/data";
/// Where the cluster CA and its key are put from secrets.
pub const CA_PATH: &str = "/etc/kefu/ca.pem";
const CA_KEY_PATH: &str = "/etc/kefu/ca.key";

/// The secrets a deploy makes (once, when missing) and every node reads.
pub const SECRETS: [&str; 4] = ["KEFU_API_KEY", "KEFU_TOKEN_KEY", "KEFU_CLUSTER_CA", "KEFU_CLUSTER_CA_KEY"];

/// A broken Fly rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleError {
    /// The rule, in a few words.
    pub rule: &'static str,
    /// The key of kefu.toml that breaks it.
    pub key: String,
    /// What to do.
    pub hint: String,
}

impl std::fmt::Display for RuleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` breaks Fly's rule: {}", self.key, self.rule)
    }
}

impl std::error::Error for RuleError {}

/// One service of the machines, as both fly.toml and the Machines API describe it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// What it is for.
    pub what: &'static str,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// The port the node listens on.
    pub internal_port: u16,
    /// Public ports and their handlers.
    pub ports: Vec<(u16, Vec<&'static str>)>,
}

/// The services every node has.
pub fn services() -> Vec<Service> {
    vec![
        Service {
            what: "HTTP, WebSocket and the APIs through Fly's proxy (fly-replay works here)",
            protocol: "tcp",
            internal_port: JIM_PORT,
            ports: vec![(80, vec!["http"]), (443, vec!["tls", "http"])],
        },
        Service { what: "J-IM binary TCP, passed through", protocol: "tcp", internal_port: JIM_PORT, ports: vec![(JIM_PORT, vec![])] },
        Service {
            what: "the node's own TLS (ALPN kefu-tcp/1, h2, http/1.1), passed through",
            protocol: "tcp",
            internal_port: TLS_PORT,
            ports: vec![(TLS_PORT, vec![])],
        },
        Service { what: "QUIC and HTTP/3 (UDP)", protocol: "udp", internal_port: TLS_PORT, ports: vec![(TLS_PORT, vec![])] },
    ]
}

/// Fly's rules, checked on the config and on what would be rendered from it.
pub fn check(app: &App, services: &[Service], env: &[(String, String)]) -> Result<(), RuleError> {
    let udp = services.iter().any(|s| s.protocol == "udp");
    for s in services.iter().filter(|s| s.protocol == "udp") {
        if s.ports.iter().any(|(port, _)| *port != s.internal_port) {
            return Err(RuleError {
                rule: "a UDP service uses the same internal and public port",
                key: "services".into(),
                hint: format!("serve UDP on {} inside and out", s.internal_port),
            });
        }
        if s.ports.iter().any(|(_, handlers)| !handlers.is_empty()) {
            return Err(RuleError { rule: "a UDP service has no handlers", key: "services".into(), hint: "drop the handlers".into() });
        }
        let bound = env.iter().find(|(k, _)| k == "KEFU_QUIC_ADDR").map(|(_, v)| v.as_str());
        if bound != Some(&format!("fly-global-services:{}", s.internal_port)) {
            return Err(RuleError {
                rule: "a UDP service must bind fly-global-services",
                key: "vars.KEFU_QUIC_ADDR".into(),
                hint: format!("leave KEFU_QUIC_ADDR to kefu (fly-global-services:{})", s.internal_port),
            });
        }
    }
    for key in app.vars.keys() {
        if key.starts_with("FLY_") {
            return Err(RuleError {
                rule: "[env] names may not start with FLY_ (Fly sets those)",
                key: format!("vars.{key}"),
                hint: "rename it, e.g. KEFU_…".into(),
            });
        }
    }
    if app.volume.is_some() && !matches!(app.strategy.as_str(), "rolling" | "immediate") {
        return Err(RuleError {
            rule:
                "machines with volumes deploy with the rolling (or immediate) strategy; blue-green and canary need machines without volumes",
            key: "strategy".into(),
            hint: "strategy = \"rolling\"".into(),
        });
    }
    if udp && app.auto_stop != "off" {
        return Err(RuleError {
            rule: "auto-stop is off when UDP is served (Fly's proxy does not wake a machine for UDP)",
            key: "auto_stop".into(),
            hint: "auto_stop = \"off\"".into(),
        });
    }
    if app.release_command.is_some() {
        return Err(RuleError {
            rule: "migrations run at node start: a release command runs on a machine without the volume",
            key: "release_command".into(),
            hint: "remove it; `kefu db migrations list` shows what each node applied".into(),
        });
    }
    if app.volume.is_none() && app.profile == "prod" {
        return Err(RuleError {
            rule: "a durable node keeps its database on a volume (a machine's root disk is lost on every deploy)",
            key: "volume".into(),
            hint: "[volume]\nname = \"kefu_data\"\nsize_gb = 1".into(),
        });
    }
    Ok(())
}

/// The nodes' environment: what kefu sets, then the config's `vars`.
pub fn environment(app: &App) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("KEFU_PROFILE".into(), app.profile.clone()),
        ("KEFU_DATA_DIR".into(), DATA_DIR.into()),
        ("KEFU_JIM_ADDR".into(), format!("0.0.0.0:{JIM_PORT}")),
        ("KEFU_TLS_ADDR".into(), format!("0.0.0.0:{TLS_PORT}")),
        ("KEFU_QUIC_ADDR".into(), format!("fly-global-services:{TLS_PORT}")),
        ("KEFU_ADMIN_ADDR".into(), format!("0.0.0.0:{ADMIN_PORT}")),
        ("KEFU_MESH_ADDR".into(), format!("[::]:{MESH_PORT}")),
        ("KEFU_PEERS_DNS".into(), format!("vms.{}.internal", app.name)),
        ("KEFU_CLUSTER_CA".into(), CA_PATH.into()),
    ];
    for (k, v) in &app.vars {
        match env.iter_mut().find(|(name, _)| name == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    env
}

/// Renders and checks everything a deploy of `app` with the image `image` needs.
pub struct Rendered {
    /// fly.toml's text.
    pub fly_toml: String,
    /// Per region (in the config's order), the Machines API create body of its nodes.
    pub machines: Vec<(String, Value)>,
    /// The steps, in order.
    pub plan: Vec<Step>,
}

/// One step of a deploy.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Step {
    /// Stable id, e.g. `volume-fra-1`.
    pub id: String,
    /// What it does.
    pub what: String,
    /// When it runs (`None`: always).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub when: Option<&'static str>,
    /// The request to Fly.
    #[serde(flatten)]
    pub op: Op,
}

/// The image label of a deploy (`kefu-<version>`), the image reference Fly's registry gives it.
pub fn image_for(app: &App, label: &str) -> String {
    app.image.clone().unwrap_or_else(|| format!("registry.fly.io/{}:{label}", app.name))
}

/// Renders `app` for a deploy labelled `label`; secrets as given (values masked in the plan).
pub fn render(app: &App, label: &str, secrets: &[(String, Secret)]) -> Result<Rendered, RuleError> {
    let services = services();
    let env = environment(app);
    check(app, &services, &env)?;
    let image = image_for(app, label);
    let machines = app.regions.iter().map(|r| (r.clone(), machine_body(app, r, &image, &services, &env))).collect();
    Ok(Rendered { fly_toml: fly_toml(app, &services, &env), machines, plan: plan(app, label, &image, secrets, &services, &env) })
}

/// The Machines API create body of a node in `region` (`$VOLUME_ID`: the volume made for it).
pub fn machine_body(app: &App, region: &str, image: &str, services: &[Service], env: &[(String, String)]) -> Value {
    let env: serde_json::Map<String, Value> = env.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    let services: Vec<Value> = services
        .iter()
        .map(|s| {
            let ports: Vec<Value> = s
                .ports
                .iter()
                .map(|(port, handlers)| {
                    let mut p = json!({"port": port});
                    if !handlers.is_empty() {
                        p["handlers"] = json!(handlers);
                    }
                    p
                })
                .collect();
            let mut v =
                json!({"protocol": s.protocol, "internal_port": s.internal_port, "ports": ports, "autostop": "off", "autostart": false});
            if s.protocol == "tcp" {
                v["concurrency"] = json!({"type": "connections", "soft_limit": 15000, "hard_limit": 20000});
            }
            v
        })
        .collect();
    let mut config = json!({
        "image": image,
        "env": env,
        "guest": {"size": app.vm.size, "cpu_kind": if app.vm.size.starts_with("performance") { "performance" } else { "shared" }, "cpus": cpus(&app.vm.size), "memory_mb": app.vm.memory_mb},
        "services": services,
        "files": [
            {"guest_path": CA_PATH, "secret_name": "KEFU_CLUSTER_CA"},
            {"guest_path": CA_KEY_PATH, "secret_name": "KEFU_CLUSTER_CA_KEY"},
        ],
        "checks": {"readyz": {"type": "http", "port": ADMIN_PORT, "method": "GET", "path": "/readyz", "interval": "10s", "timeout": "2s", "grace_period": "30s"}},
        "restart": {"policy": "always"},
        "stop_config": {"signal": "SIGTERM", "timeout": "15s"},
        "metadata": {"kefu_role": "node", "kefu_version": image},
    });
    if app.volume.is_some() {
        config["mounts"] = json!([{"volume": "$VOLUME_ID", "path": DATA_DIR}]);
    }
    json!({"region": region, "config": config})
}

fn cpus(size: &str) -> u32 {
    size.rsplit('-').next().and_then(|n| n.trim_end_matches('x').parse().ok()).unwrap_or(1)
}

/// fly.toml for `app`: what `fly deploy` and the Fly dashboard read. The first region is the
/// primary; the others get their machines from the plan.
pub fn fly_toml(app: &App, services: &[Service], env: &[(String, String)]) -> String {
    let mut t = String::new();
    let q = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    t.push_str("# Rendered by `kefu deploy --dry-run` from kefu.toml: edit kefu.toml, not this file.\n");
    t.push_str(&format!("# Regions: {}; {} node(s) in each.\n\n", app.regions.join(", "), app.nodes_per_region));
    t.push_str(&format!("app = {}\nprimary_region = {}\n", q(&app.name), q(&app.primary_region)));
    t.push_str("kill_signal = \"SIGTERM\"\nkill_timeout = 15\n\n");
    match &app.image {
        Some(image) => t.push_str(&format!("[build]\n  image = {}\n\n", q(image))),
        None => t.push_str(&format!("[build]\n  dockerfile = {}\n\n", q(&app.dockerfile))),
    }
    t.push_str(&format!("[deploy]\n  strategy = {}\n", q(&app.strategy)));
    t.push_str("  # No release_command: migrations run at node start (a release machine has no volume).\n\n");
    t.push_str("[env]\n");
    for (k, v) in env {
        t.push_str(&format!("  {k} = {}\n", q(v)));
    }
    t.push('\n');
    for (path, secret) in [(CA_PATH, "KEFU_CLUSTER_CA"), (CA_KEY_PATH, "KEFU_CLUSTER_CA_KEY")] {
        t.push_str(&format!("[[files]]\n  guest_path = {}\n  secret_name = {}\n\n", q(path), q(secret)));
    }
    if let Some(v) = &app.volume {
        t.push_str(&format!(
            "[[mounts]]\n  source = {}\n  destination = {}\n  initial_size = \"{}gb\"\n\n",
            q(&v.name),
            q(DATA_DIR),
            v.size_gb
        ));
    }
    for s in services {
        t.push_str(&format!("# {}\n[[services]]\n  protocol = {}\n  internal_port = {}\n", s.what, q(s.protocol), s.internal_port));
        t.push_str("  auto_stop_machines = \"off\"\n  auto_start_machines = false\n  min_machines_running = 0\n");
        for (port, handlers) in &s.ports {
            t.push_str(&format!("  [[services.ports]]\n    port = {port}\n"));
            if !handlers.is_empty() {
                let list: Vec<String> = handlers.iter().map(|h| q(h)).collect();
                t.push_str(&format!("    handlers = [{}]\n", list.join(", ")));
            }
        }
        if s.protocol == "tcp" {
            t.push_str("  [services.concurrency]\n    type = \"connections\"\n    soft_limit = 15000\n    hard_limit = 20000\n");
            t.push_str("  [[services.tcp_checks]]\n    interval = \"15s\"\n    timeout = \"2s\"\n    grace_period = \"10s\"\n");
        }
        t.push('\n');
    }
    t.push_str(&format!(
        "[checks.readyz]\n  type = \"http\"\n  port = {ADMIN_PORT}\n  path = \"/readyz\"\n  interval = \"10s\"\n  timeout = \"2s\"\n  grace_period = \"30s\"\n\n"
    ));
    t.push_str(&format!("[[vm]]\n  size = {}\n  memory = \"{}mb\"\n", q(&app.vm.size), app.vm.memory_mb));
    t
}

/// A first deploy's steps. Ones with a `when` are skipped when Fly already has what they make.
pub fn plan(
    app: &App,
    label: &str,
    image: &str,
    secrets: &[(String, Secret)],
    services: &[Service],
    env: &[(String, String)],
) -> Vec<Step> {
    let a = app.name.clone();
    let mut steps = vec![Step {
        id: "app".into(),
        what: format!("create the app {a}"),
        when: Some("the app does not exist"),
        op: Op::AppCreate { app: a.clone(), org: app.org.clone() },
    }];
    if services.iter().any(|s| s.protocol == "udp") {
        steps.push(Step {
            id: "ipv4".into(),
            what: "allocate a dedicated IPv4 (UDP is not carried on shared IPv4s)".into(),
            when: Some("the app has no dedicated IPv4"),
            op: Op::IpAllocateV4 { app: a.clone() },
        });
    }
    steps.push(Step {
        id: "ipv6".into(),
        what: "allocate an IPv6".into(),
        when: Some("the app has no IPv6"),
        op: Op::IpAllocateV6 { app: a.clone() },
    });
    steps.push(Step {
        id: "secrets".into(),
        what: "set the cluster's secrets (API key, token key, cluster CA and its key), made locally".into(),
        when: Some("the app lacks any of them; only those are set"),
        op: Op::SecretsSet { app: a.clone(), secrets: secrets.to_vec(), stage: true },
    });
    if app.image.is_none() {
        steps.push(Step {
            id: "image".into(),
            what: format!("build {} and push it as {image}", app.dockerfile),
            when: None,
            op: Op::ImageBuild { app: a.clone(), dockerfile: app.dockerfile.clone(), label: label.to_string() },
        });
    }
    let services = services.to_vec();
    for region in &app.regions {
        for i in 1..=app.nodes_per_region {
            if let Some(v) = &app.volume {
                steps.push(Step {
                    id: format!("volume-{region}-{i}"),
                    what: format!("create volume {} ({} GB) for node {i} in {region}", v.name, v.size_gb),
                    when: Some("the region has fewer volumes than nodes"),
                    op: Op::VolumeCreate { app: a.clone(), name: v.name.clone(), region: region.clone(), size_gb: v.size_gb },
                });
            }
            steps.push(Step {
                id: format!("machine-{region}-{i}"),
                what: format!("start node {i} in {region} from machines/{region}.json (an existing one is updated, one at a time)"),
                when: None,
                op: Op::MachineCreate { app: a.clone(), region: region.clone(), body: machine_body(app, region, image, &services, env) },
            });
        }
    }
    steps
}

/// `commands.sh`: the plan as flyctl commands, secrets as `***`.
pub fn commands_sh(plan: &[Step]) -> String {
    let mut out = String::from(
        "#!/bin/sh\n# The flyctl commands of this deploy, in order (secret values shown as ***; jq reads the new volume ids).\nset -eu\n",
    );
    for step in plan {
        out.push_str(&format!("\n# {}: {}", step.id, step.what));
        if let Some(when) = step.when {
            out.push_str(&format!(" (only when {when})"));
        }
        out.push('\n');
        let args: Vec<String> = crate::driver::flyctl_args(&step.op, false).iter().map(|a| shell_quote(a)).collect();
        match step.op {
            // The machine created next mounts the volume made here.
            Op::VolumeCreate { .. } => out.push_str(&format!("VOLUME_ID=$(fly {} | jq -r .id)\n", args.join(" "))),
            _ => out.push_str(&format!("fly {}\n", args.join(" "))),
        }
    }
    out
}

fn shell_quote(s: &str) -> String {
    if s.contains("$VOLUME_ID") {
        return format!("\"{s}\"");
    }
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@%+*".contains(&b)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;
    use std::path::Path;

    fn app(extra: &str) -> App {
        let text = format!("name = \"chat\"\nregions = [\"iad\", \"fra\"]\n{extra}\n[volume]\nname = \"kefu_data\"\n");
        crate::config::parse(Path::new("kefu.toml"), &text, None).unwrap().app
    }

    #[test]
    fn every_rule_is_refused_by_name() {
        let env = |a: &App| environment(a);
        let ok = app("");
        check(&ok, &services(), &env(&ok)).unwrap();
        let rule = |a: &App| check(a, &services(), &env(a)).unwrap_err();
        let mut a = app("[vars]\nFLY_SECRET = \"x\"");
        assert!(rule(&a).rule.contains("FLY_"));
        a = app("strategy = \"bluegreen\"\n");
        assert_eq!(rule(&a).key, "strategy");
        a = app("auto_stop = \"stop\"\n");
        assert!(rule(&a).rule.contains("auto-stop"));
        a = app("release_command = \"kefu-node migrate\"\n");
        assert!(rule(&a).rule.contains("migrations run at node start"));
        a = app("[vars]\nKEFU_QUIC_ADDR = \"0.0.0.0:8443\"\n");
        assert!(rule(&a).rule.contains("fly-global-services"));
        let mut bad = services();
        bad[3].ports = vec![(443, vec![])];
        assert!(check(&ok, &bad, &env(&ok)).unwrap_err().rule.contains("same internal and public port"));
        bad[3].ports = vec![(TLS_PORT, vec!["tls"])];
        assert!(check(&ok, &bad, &env(&ok)).unwrap_err().rule.contains("no handlers"));
        let no_volume = crate::config::parse(Path::new("k"), "name = \"c\"\nregions = [\"iad\"]\n", None).unwrap().app;
        assert_eq!(rule(&no_volume).key, "volume");
    }

    #[test]
    fn the_plan_allocates_a_dedicated_ipv4_and_masks_secrets() {
        let secrets = vec![("KEFU_API_KEY".to_string(), Secret("hunter2".into()))];
        let r = render(&app("nodes_per_region = 2\n"), "kefu-1", &secrets).unwrap();
        let ids: Vec<&str> = r.plan.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "app",
                "ipv4",
                "ipv6",
                "secrets",
                "image",
                "volume-iad-1",
                "machine-iad-1",
                "volume-iad-2",
                "machine-iad-2",
                "volume-fra-1",
                "machine-fra-1",
                "volume-fra-2",
                "machine-fra-2"
            ]
        );
        let sh = commands_sh(&r.plan);
        assert!(sh.contains("fly ips allocate-v4 --app chat --yes\n"), "{sh}");
        assert!(sh.contains("KEFU_API_KEY=***") && !sh.contains("hunter2"));
        assert!(!serde_json::to_string(&r.plan).unwrap().contains("hunter2"));
        assert!(sh.contains("--port=8443:8443/udp --restart"), "UDP without handlers: {sh}");
        assert_eq!(r.machines[1].1["config"]["env"]["KEFU_QUIC_ADDR"], "fly-global-services:8443");
    }
}

//! The `kefu` CLI (issue 11 §2) as users run it: the dry run against golden files and the
//! repository's own fly.toml, Fly's rules refused by name, every command through the recording
//! driver, and `kefu dev` running regions behind a router and leaving no process behind.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};
use tests::{Client, TcpClient, WsClient};
use tokio::io::AsyncBufReadExt;

fn kefu() -> &'static str {
    env!("CARGO_BIN_EXE_test-kefu")
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs `kefu args` in `dir` with `env`, `stdin` as its input.
fn run(dir: &Path, args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    use std::io::Write;
    let mut child = std::process::Command::new(kefu())
        .args(args)
        .current_dir(dir)
        .envs(env.iter().copied())
        .env_remove("KEFU_OUTPUT_FILE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A command that needs no input may exit before reading it: its closed pipe is not an error.
    if let Err(e) = child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "writing the input: {e}");
    }
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

/// The recorded ops, one JSON value per line.
fn recorded(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn ops(records: &[Value]) -> Vec<String> {
    records.iter().map(|r| r["op"].as_str().unwrap().to_string()).collect()
}

/// Compares `got` with the golden file `name`; `KEFU_UPDATE_GOLDEN=1` writes it instead.
fn golden(name: &str, got: &str) {
    let path = repo().join("tests/golden/deploy").join(name);
    if std::env::var("KEFU_UPDATE_GOLDEN").is_ok() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} missing: run with KEFU_UPDATE_GOLDEN=1", path.display()));
    assert_eq!(got, want, "{} differs (KEFU_UPDATE_GOLDEN=1 rewrites it after a deliberate change)", path.display());
}

#[test]
fn the_dry_run_renders_the_golden_files_and_the_repositorys_fly_toml_touching_nothing() {
    let out = tempfile::tempdir().unwrap();
    let record = out.path().join("record.jsonl");
    let rec = format!("record:{}", record.display());
    let o = run(
        &repo().join("node"),
        &["deploy", "--dry-run", "--outdir", out.path().join("dist").to_str().unwrap(), "--label", "kefu-golden"],
        &[("KEFU_DRIVER", &rec)],
        "",
    );
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}{stderr}");
    assert!(stdout.starts_with(" kefu "), "a banner first: {stdout}");
    assert!(stdout.contains("--dry-run: exiting now"), "{stdout}");
    assert!(!record.exists(), "a dry run makes no call to Fly");
    let dist = out.path().join("dist");
    let fly_toml = std::fs::read_to_string(dist.join("fly.toml")).unwrap();
    // kefu.toml was found walking up from node/; the root fly.toml is its rendering.
    assert_eq!(fly_toml, std::fs::read_to_string(repo().join("fly.toml")).unwrap(), "fly.toml drifted from kefu.toml: render it again");
    golden("fly.toml", &fly_toml);
    for f in ["plan.json", "commands.sh", "machines/iad.json", "machines/fra.json", "machines/sin.json"] {
        golden(f, &std::fs::read_to_string(dist.join(f)).unwrap());
    }
    // fly.toml is TOML Fly can read, with the rules visible in it.
    let parsed: toml::Table = fly_toml.parse().unwrap();
    let services = parsed["services"].as_array().unwrap();
    let udp: Vec<_> = services.iter().filter(|s| s["protocol"].as_str() == Some("udp")).collect();
    assert_eq!(udp.len(), 1);
    let port = &udp[0]["ports"].as_array().unwrap()[0];
    assert_eq!(port["port"].as_integer(), udp[0]["internal_port"].as_integer(), "same port inside and out");
    assert!(port.get("handlers").is_none(), "no handlers on UDP");
    assert_eq!(parsed["env"]["KEFU_QUIC_ADDR"].as_str(), Some("fly-global-services:8443"));
    assert!(services.iter().all(|s| s["auto_stop_machines"].as_str() == Some("off")));
    assert_eq!(parsed["deploy"]["strategy"].as_str(), Some("rolling"));
    assert!(parsed["deploy"].get("release_command").is_none());
    assert!(parsed["env"].as_table().unwrap().keys().all(|k| !k.starts_with("FLY_")));
    let plan: Value = serde_json::from_str(&std::fs::read_to_string(dist.join("plan.json")).unwrap()).unwrap();
    let steps: Vec<&str> = plan["steps"].as_array().unwrap().iter().map(|s| s["op"].as_str().unwrap()).collect();
    assert!(steps.contains(&"ip_allocate_v4"), "UDP needs a dedicated IPv4: {steps:?}");
    let commands = std::fs::read_to_string(dist.join("commands.sh")).unwrap();
    assert!(commands.contains("KEFU_TOKEN_KEY=***") && commands.contains("KEFU_CLUSTER_CA_KEY=***"));
    // The image the plan builds is the repository's Dockerfile, whose last stage runs kefu-node.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(dockerfile.contains("ENTRYPOINT [\"/usr/local/bin/kefu-node\"]") && dockerfile.contains("-p node --bin kefu-node"));
    // The staging environment: inherited regions overridden, its own volume.
    let o = run(&repo(), &["deploy", "--dry-run", "-e", "staging", "--outdir", out.path().join("staging").to_str().unwrap()], &[], "");
    assert!(o.status.success(), "{:?}", text(&o));
    let staging = std::fs::read_to_string(out.path().join("staging/fly.toml")).unwrap();
    assert!(staging.contains("app = \"kefu-staging\"") && staging.contains("initial_size = \"1gb\""), "{staging}");
    assert!(!out.path().join("staging/machines/sin.json").exists());
}

#[test]
fn a_config_that_breaks_a_fly_rule_is_refused_with_the_rule_named() {
    let dir = tempfile::tempdir().unwrap();
    let base = "name = \"rules\"\nregions = [\"iad\"]\n";
    let volume = "\n[volume]\nname = \"kefu_data\"\n";
    for (extra, rule) in [
        ("[vars]\nFLY_REGION = \"x\"\n", "may not start with FLY_"),
        ("strategy = \"bluegreen\"\n", "rolling"),
        ("auto_stop = \"suspend\"\n", "auto-stop is off when UDP is served"),
        ("release_command = \"kefu-node migrate\"\n", "migrations run at node start"),
        ("[vars]\nKEFU_QUIC_ADDR = \"0.0.0.0:8443\"\n", "must bind fly-global-services"),
    ] {
        std::fs::write(dir.path().join("kefu.toml"), format!("{base}{extra}{volume}")).unwrap();
        let o = run(dir.path(), &["deploy", "--dry-run"], &[], "");
        let (_, stderr) = text(&o);
        assert!(!o.status.success());
        assert!(stderr.contains("✘ [ERROR]") && stderr.contains(rule), "{extra}: {stderr}");
        assert!(!dir.path().join("dist").exists(), "nothing written for a refused config");
    }
    // Unknown keys warn and go on; errors name the file, the key and a hint.
    std::fs::write(dir.path().join("kefu.toml"), format!("{base}colour = \"blue\"{volume}")).unwrap();
    let o = run(dir.path(), &["deploy", "--dry-run"], &[], "");
    assert!(o.status.success());
    assert!(text(&o).1.contains("▲ [WARNING]") && text(&o).1.contains("`colour`"));
    std::fs::write(dir.path().join("kefu.toml"), "name = \"rules\"\nregions = [\"iad\"]\nnodes_per_region = \"two\"\n").unwrap();
    let (_, stderr) = text(&run(dir.path(), &["deploy", "--dry-run"], &[], ""));
    assert!(stderr.contains("kefu.toml: `nodes_per_region`") && stderr.contains("line 3"), "{stderr}");
    let empty = tempfile::tempdir().unwrap();
    let (_, stderr) = text(&run(empty.path(), &["secret", "list"], &[("KEFU_DRIVER", "record:/dev/null")], ""));
    assert!(stderr.contains("no kefu.toml") && stderr.contains("kefu init"), "{stderr}");
}

/// A project directory with a kefu.toml (two regions) and the recording driver's files.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("kefu.toml"),
            "name = \"rec\"\nregions = [\"iad\", \"fra\"]\n\n[volume]\nname = \"kefu_data\"\n\n[vars]\nKEFU_LOG = \"info\"\n",
        )
        .unwrap();
        Project { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Runs `kefu` with the recording driver and `answers`; the ops it recorded this time.
    fn kefu(&self, args: &[&str], answers: Value, stdin: &str) -> (Output, Vec<Value>) {
        let record = self.path("record.jsonl");
        let _ = std::fs::remove_file(&record);
        std::fs::write(self.path("answers.json"), answers.to_string()).unwrap();
        let rec = format!("record:{}", record.display());
        let answers_path = self.path("answers.json");
        let o = run(self.dir.path(), args, &[("KEFU_DRIVER", &rec), ("KEFU_DRIVER_ANSWERS", answers_path.to_str().unwrap())], stdin);
        (o, recorded(&record))
    }
}

#[test]
fn every_command_goes_through_the_recording_driver() {
    let p = Project::new();
    // whoami
    let (o, rec) = p.kefu(&["whoami"], json!({}), "");
    assert!(text(&o).0.contains("recorded@example.com"));
    assert_eq!(ops(&rec), ["whoami"]);

    // A first deploy: everything is made, in order; secret values never recorded.
    let output = p.path("deploy.ndjson");
    let record = p.path("record.jsonl");
    std::fs::write(p.path("answers.json"), "{}").unwrap();
    std::fs::remove_file(&record).unwrap();
    let o = std::process::Command::new(kefu())
        .args(["deploy", "--label", "kefu-test"])
        .current_dir(p.dir.path())
        .env("KEFU_DRIVER", format!("record:{}", record.display()))
        .env("KEFU_DRIVER_ANSWERS", p.path("answers.json"))
        .env("KEFU_OUTPUT_FILE", &output)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{:?}", text(&o));
    let rec = recorded(&record);
    assert_eq!(
        ops(&rec),
        [
            "apps_list",
            "app_create",
            "ips_list",
            "ip_allocate_v4",
            "ip_allocate_v6",
            "secrets_list",
            "secrets_set",
            "image_build",
            "machines_list",
            "volumes_list",
            "volume_create",
            "machine_create",
            "machine_wait",
            "volume_create",
            "machine_create",
            "machine_wait"
        ]
    );
    let secrets = &rec[6]["secrets"];
    let names: Vec<&str> = secrets.as_array().unwrap().iter().map(|s| s[0].as_str().unwrap()).collect();
    assert_eq!(names, ["KEFU_API_KEY", "KEFU_TOKEN_KEY", "KEFU_CLUSTER_CA", "KEFU_CLUSTER_CA_KEY"]);
    assert!(secrets.as_array().unwrap().iter().all(|s| s[1] == "***"));
    let create = &rec[11]["body"];
    assert_eq!(create["region"], "iad");
    assert_eq!(create["config"]["image"], "registry.fly.io/rec:kefu-test");
    assert_eq!(create["config"]["mounts"][0]["volume"], "vol_iad_recorded", "the machine mounts the volume made for it");
    let saved = std::fs::read_to_string(p.path(".kefu/secrets/rec.env")).unwrap();
    assert!(saved.starts_with("KEFU_API_KEY=") && saved.len() > 60);
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(p.path(".kefu/secrets/rec.env")).unwrap().permissions().mode() & 0o777, 0o600);
    }
    let records: Vec<Value> = std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = records.iter().map(|r| r["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["session", "machine", "machine", "deploy"], "NDJSON records for scripts");
    assert_eq!((records[1]["region"].as_str(), records[1]["action"].as_str()), (Some("iad"), Some("created")));

    // Deploying again: what exists is kept; machines are updated one at a time, keeping volumes.
    let existing = json!({
        "apps_list": [{"name": "rec"}],
        "ips_list": [{"type": "v4"}, {"type": "v6"}],
        "secrets_list": [{"name": "KEFU_API_KEY"}, {"name": "KEFU_TOKEN_KEY"}, {"name": "KEFU_CLUSTER_CA"}, {"name": "KEFU_CLUSTER_CA_KEY"}],
        "machines_list": [
            {"id": "m1", "region": "iad", "config": {"mounts": [{"volume": "vol_a"}]}},
            {"id": "m2", "region": "fra", "config": {"mounts": [{"volume": "vol_b"}]}},
            {"id": "m9", "region": "lhr", "config": {}}
        ],
        "releases_list": [
            // flyctl's spelling of the same fields.
            {"Version": 1, "Status": "complete", "CreatedAt": "2026-11-30T10:00:00Z", "ImageRef": "registry.fly.io/rec:kefu-1"},
            {"version": 2, "status": "complete", "created_at": "2026-12-01T10:00:00Z", "image_ref": "registry.fly.io/rec:kefu-2"}
        ],
        "logs": [{"timestamp": "2026-12-02T08:00:00Z", "region": "fra", "instance": "m2", "message": "kefu-node ready"}]
    });
    let (o, rec) = p.kefu(&["deploy"], existing.clone(), "");
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(
        ops(&rec),
        [
            "apps_list",
            "ips_list",
            "secrets_list",
            "image_build",
            "machines_list",
            "volumes_list",
            "machine_update",
            "machine_wait",
            "machine_update",
            "machine_wait"
        ]
    );
    assert_eq!((rec[6]["id"].as_str(), rec[6]["body"]["config"]["mounts"][0]["volume"].as_str()), (Some("m1"), Some("vol_a")));
    assert!(text(&o).1.contains("lhr, which kefu.toml does not list"), "{:?}", text(&o));

    // Secrets: put (from stdin), list, delete (asks: refused without a terminal or --yes), bulk.
    let (o, rec) = p.kefu(&["secret", "put", "SMTP_PASSWORD"], json!({}), "s3cret\n");
    assert!(o.status.success(), "{:?}", text(&o));
    assert_eq!(
        (rec[0]["op"].as_str(), rec[0]["secrets"][0][0].as_str(), rec[0]["secrets"][0][1].as_str()),
        (Some("secrets_set"), Some("SMTP_PASSWORD"), Some("***"))
    );
    assert!(!std::fs::read_to_string(p.path("record.jsonl")).unwrap().contains("s3cret"));
    let (o, _) = p.kefu(&["secret", "list"], existing.clone(), "");
    let listed: Value = serde_json::from_str(&text(&o).0.lines().skip(2).collect::<Vec<_>>().join("\n")).unwrap();
    assert_eq!(listed[0], json!({"name": "KEFU_API_KEY", "type": "secret_text"}));
    let (o, rec) = p.kefu(&["secret", "delete", "SMTP_PASSWORD"], json!({}), "");
    assert!(!o.status.success() && text(&o).1.contains("--yes"), "{:?}", text(&o));
    assert!(rec.is_empty());
    let (o, rec) = p.kefu(&["secret", "delete", "SMTP_PASSWORD", "--yes"], json!({}), "");
    assert!(o.status.success());
    assert_eq!((rec[0]["op"].as_str(), rec[0]["names"][0].as_str()), (Some("secrets_unset"), Some("SMTP_PASSWORD")));
    std::fs::write(p.path("bulk.json"), r#"{"A_KEY": "1", "B_KEY": "2"}"#).unwrap();
    let (o, rec) = p.kefu(&["secret", "bulk", "bulk.json"], json!({}), "");
    assert!(o.status.success());
    assert_eq!(rec[0]["secrets"].as_array().unwrap().len(), 2);
    let (o, _) = p.kefu(&["secret", "put", "FLY_TOKEN"], json!({}), "x");
    assert!(!o.status.success());

    // Versions and rollback (to the one before the newest unless named).
    let (o, rec) = p.kefu(&["versions", "list"], existing.clone(), "");
    let out = text(&o).0;
    assert!(out.find("v2").unwrap() < out.find("v1").unwrap(), "newest first: {out}");
    assert_eq!(ops(&rec), ["releases_list"]);
    let (o, rec) = p.kefu(&["rollback", "--yes"], existing.clone(), "");
    assert!(o.status.success(), "{:?}", text(&o));
    let updates: Vec<&Value> = rec.iter().filter(|r| r["op"] == "machine_update").collect();
    assert_eq!(updates.len(), 2);
    assert!(updates.iter().all(|u| u["body"]["config"]["image"] == "registry.fly.io/rec:kefu-1"));

    // Regions: list; add edits kefu.toml and deploys; remove destroys that region's nodes.
    let (o, _) = p.kefu(&["regions", "list"], existing.clone(), "");
    assert!(text(&o).0.contains("lhr      -           1"), "{:?}", text(&o));
    let (o, rec) = p.kefu(&["regions", "add", "sin", "--yes"], existing.clone(), "");
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(std::fs::read_to_string(p.path("kefu.toml")).unwrap().contains("regions = [\"iad\", \"fra\", \"sin\"]"));
    assert!(rec.iter().any(|r| r["op"] == "machine_create" && r["region"] == "sin"));
    let mut with_sin = existing.clone();
    with_sin["machines_list"].as_array_mut().unwrap().push(json!({"id": "m3", "region": "sin", "config": {}}));
    let (o, rec) = p.kefu(&["regions", "remove", "sin", "--yes"], with_sin, "");
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(rec.iter().any(|r| r["op"] == "machine_destroy" && r["id"] == "m3"));
    assert!(std::fs::read_to_string(p.path("kefu.toml")).unwrap().contains("regions = [\"iad\", \"fra\"]"));

    // Logs.
    let (o, rec) = p.kefu(&["tail", "--region", "fra"], existing.clone(), "");
    assert!(text(&o).0.contains("fra [m2] kefu-node ready"));
    assert_eq!(rec[0]["region"], "fra");

    // Migrations: applied locally to kefu dev's databases; remote ones run at node start.
    std::fs::create_dir_all(p.path(".kefu/state/nodes/iad-1")).unwrap();
    let (o, _) = p.kefu(&["db", "migrations", "list", "--local"], json!({}), "");
    assert!(text(&o).0.contains("pending") && !text(&o).0.contains("applied"), "{:?}", text(&o));
    let (o, _) = p.kefu(&["db", "migrations", "apply", "--local"], json!({}), "");
    assert!(o.status.success() && text(&o).0.contains("iad-1: applied"), "{:?}", text(&o));
    let (o, _) = p.kefu(&["db", "migrations", "list", "--local"], json!({}), "");
    assert!(!text(&o).0.contains("pending"), "{:?}", text(&o));
    let (o, _) = p.kefu(&["db", "migrations", "apply"], json!({}), "");
    assert!(!o.status.success() && text(&o).1.contains("apply migrations when they start"));
    let (o, rec) = p.kefu(&["db", "migrations", "list"], existing, "");
    assert!(o.status.success() && text(&o).0.contains("m1 iad runs"), "{:?}", text(&o));
    assert_eq!(ops(&rec), ["machines_list"]);

    // init writes a kefu.toml that loads, and refuses to overwrite one.
    let fresh = tempfile::tempdir().unwrap();
    let o = run(fresh.path(), &["init", "--name", "fresh-chat"], &[], "");
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(std::fs::read_to_string(fresh.path().join(".gitignore")).unwrap().contains(".dev.vars"));
    assert!(run(fresh.path(), &["deploy", "--dry-run"], &[], "").status.success());
    assert!(!run(fresh.path(), &["init"], &[], "").status.success());
}

fn alive(pid: u64) -> bool {
    // A zombie is not running; /proc/<pid>/stat's third field says which.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

#[tokio::test]
async fn kefu_dev_runs_regions_behind_a_router_and_leaves_no_process() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join(".dev.vars"), "KEFU_LOG=warn\n")?;
    let mut child = tokio::process::Command::new(kefu())
        .args(["dev", "--regions", "iad,fra", "--port", "0", "--tcp-port", "0", "--node-bin", crate::bin()])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(url) = line.strip_prefix("Ready on ") {
                return anyhow::Ok(url.to_string());
            }
        }
        anyhow::bail!("kefu dev ended before it was ready")
    })
    .await??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let state: Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(".kefu/state/dev.json"))?)?;
    assert_eq!(state["nodes"].as_array().unwrap().len(), 2);
    // The demo page and the /v1 API through the router.
    assert!(reqwest::get(format!("{ready}/")).await?.text().await?.contains("kefu demo chat"));
    let host = ready.trim_start_matches("http://");
    // Users on different regions chat: one by WebSocket at iad, one by J-IM TCP at fra.
    let mut ws = WsClient::connect(&format!("ws://{host}/?region=iad&username=dev-ann&password=pw")).await?;
    assert_eq!(ws.recv_cmd(6).await?["code"], 10007);
    let at_fra = state["nodes"].as_array().unwrap().iter().find(|n| n["region"] == "fra").unwrap();
    let mut tcp = TcpClient::connect(at_fra["jim"].as_str().unwrap().parse()?).await?;
    tcp.login("dev-ben", "pw").await?;
    let sent = tcp.chat(json!({"chatType": 2, "to": "dev-ann", "content": "from fra"})).await?;
    assert!(sent["code"] == 10000 || sent["code"] == 10001, "{sent}");
    assert_eq!(ws.recv_cmd(11).await?["data"]["content"], "from fra");
    // J-IM TCP through the router's own port.
    let mut via_router = TcpClient::connect(state["router"]["tcp"].as_str().unwrap().parse()?).await?;
    via_router.login("dev-cat", "pw").await?;
    let api = reqwest::Client::new()
        .post(format!("{ready}/v1/messages"))
        .json(&json!({"from": "dev-cat", "to": "dev-ann", "content": "by the api"}))
        .send()
        .await?;
    assert_eq!(api.status(), 200);
    assert_eq!(ws.recv_cmd(11).await?["data"]["content"], "by the api");
    // SIGTERM: everything stops, and nothing outlives kefu.
    let mut pids: Vec<u64> = state["nodes"].as_array().unwrap().iter().map(|n| n["pid"].as_u64().unwrap()).collect();
    pids.push(state["router"]["pid"].as_u64().unwrap());
    assert!(pids.iter().all(|p| alive(*p)));
    let rc = std::process::Command::new("kill").args(["-TERM", &child.id().unwrap().to_string()]).status()?;
    assert!(rc.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    assert!(status.success(), "{status}");
    for pid in pids {
        assert!(!alive(pid), "node {pid} outlived kefu dev");
    }
    assert!(!dir.path().join(".kefu/state/dev.json").exists());
    Ok(())
}

#[tokio::test]
async fn prod_nodes_mesh_with_only_the_cluster_ca_and_its_key_as_a_deploy_gives_them() -> anyhow::Result<()> {
    // On Fly a node's id is its machine id, known only when it starts: the deploy hands every
    // machine the cluster CA and its key (file secrets), and each node signs its own certificate.
    let key = node::auth::new_key_line();
    let extra = [("--profile", "prod"), ("--api-key", "0123456789abcdef0123"), ("--token-key", key.trim())];
    let c = tests::cluster::Cluster::start(crate::bin(), &crate::cluster::REGIONS[..2], &extra).await?;
    for i in 0..2 {
        let up = tests::eventually(Duration::from_secs(10), || async {
            let v = c.metric(i, "kefu_mesh_peer_up").await.ok()?;
            (v == 1.0).then_some(v)
        })
        .await?;
        assert_eq!(up, 1.0);
        assert_eq!(c.metric(i, "kefu_mesh_handshakes_refused_total").await.unwrap_or(0.0), 0.0);
    }
    Ok(())
}

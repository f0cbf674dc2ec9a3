//! The production profile's accounts (issue: production profile §1–§2): the admin API under
//! `/v1/users`, `kefu-node user …` on a stopped node's data dir, key files, tokens that every node
//! accepts, and revocation (password change, ban, delete, logout) that ends sessions everywhere.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tests::cluster::Cluster;
use tests::{eventually, Client, TcpClient, TestNode};

use crate::bin;

/// Cheap hashes: these tests are about behaviour, and a debug build's argon2 at the default cost
/// takes a second per login.
const CHEAP: [(&str, &str); 2] = [("--argon2-memory-kib", "64"), ("--argon2-passes", "1")];

/// `builder` with [`CHEAP`] hashes.
fn cheap(mut builder: tests::NodeBuilder) -> tests::NodeBuilder {
    for (k, v) in CHEAP {
        builder = builder.arg(k, v);
    }
    builder
}

/// Runs `kefu-node ARGS` (an operator's command) with `stdin` in an empty working directory,
/// returning (success, stdout, stderr).
async fn tool(args: &[&str], stdin: &str) -> anyhow::Result<(bool, String, String)> {
    tool_in(tempfile::tempdir()?.path(), args, stdin).await
}

/// [`tool`] run in `cwd`.
async fn tool_in(cwd: &std::path::Path, args: &[&str], stdin: &str) -> anyhow::Result<(bool, String, String)> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(bin())
        .args(args)
        .current_dir(cwd)
        .env("KEFU_LOG", "warn")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await?;
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output()).await??;
    Ok((out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned()))
}

/// A logged-in J-IM TCP client, or the login reply that refused it.
async fn login(n: &TestNode, user: &str, password: &str) -> anyhow::Result<Result<(tests::TcpClient, String), Value>> {
    let mut c = n.tcp().await?;
    c.send(json!({"cmd": 5, "userId": user, "password": password})).await?;
    let reply = c.recv_cmd(6).await?;
    if reply["code"] != 10007 {
        return Ok(Err(reply));
    }
    let token = reply["data"]["token"].as_str().unwrap_or_default().to_string();
    Ok(Ok((c, token)))
}

/// Logs in with a token (cmd 5 `token`): the reply's code.
async fn token_login(n: &TestNode, token: &str) -> anyhow::Result<u64> {
    let mut c = n.tcp().await?;
    c.send(json!({"cmd": 5, "token": token})).await?;
    Ok(c.recv_cmd(6).await?["code"].as_u64().unwrap_or(0))
}

/// Authenticates with a token (cmd 3): the reply's code.
async fn token_auth(n: &TestNode, token: &str) -> anyhow::Result<u64> {
    let mut c = n.tcp().await?;
    c.send(json!({"cmd": 3, "token": token})).await?;
    Ok(c.recv_cmd(4).await?["code"].as_u64().unwrap_or(0))
}

/// A client that was signed out gets the 11013 close frame, then the connection ends.
async fn signed_out(c: &mut tests::TcpClient) -> anyhow::Result<()> {
    let frame = tokio::time::timeout(Duration::from_secs(10), c.recv_cmd(14)).await??;
    anyhow::ensure!(frame["code"] == 11013, "close frame {frame}");
    c.closed().await
}

#[tokio::test]
async fn prod_in_three_commands_make_keys_start_create_a_user() -> anyhow::Result<()> {
    let keys = tempfile::tempdir()?;
    let dir = keys.path().join("keys");
    let cwd = tempfile::tempdir()?;
    let (ok, out, err) = tool_in(cwd.path(), &["keys", "new", dir.to_str().unwrap()], "").await?;
    // Making key files touches nothing but them: no data dir appears where the operator stands.
    assert_eq!(std::fs::read_dir(cwd.path())?.count(), 0, "keys new wrote into its working directory");
    assert!(ok, "{err}");
    assert!(out.contains("--token-key-file"), "{out}");
    #[cfg(unix)]
    for f in ["token.key", "api.key"] {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.join(f))?.permissions().mode() & 0o777, 0o600, "{f}");
    }
    let (again, _, err) = tool(&["keys", "new", dir.to_str().unwrap()], "").await?;
    assert!(!again && err.contains("exists"), "never replaced: {err}");
    let api_key = std::fs::read_to_string(dir.join("api.key"))?.trim().to_string();
    let builder = TestNode::builder(bin())
        .arg("--profile", "prod")
        .arg("--token-key-file", dir.join("token.key").display())
        .arg("--api-key-file", dir.join("api.key").display());
    let n = cheap(builder).start().await?;
    let http = reqwest::Client::new();
    let users = format!("{}/v1/users", n.http());
    let body = json!({"id": "alice", "password": "correct horse", "nick": "Alice", "role": "agent"});
    assert_eq!(http.post(&users).json(&body).send().await?.status(), StatusCode::UNAUTHORIZED, "the API key is required");
    let created = http.post(&users).header("x-api-key", &api_key).json(&body).send().await?;
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await?;
    assert_eq!(created, json!({"id": "alice", "nick": "Alice", "avatar": null, "role": "agent", "banned": false}));
    assert!(login(&n, "alice", "correct horse").await?.is_ok(), "the new user logs in");
    assert_eq!(login(&n, "alice", "wrong").await?.err().unwrap()["code"], 10008);
    // The operator's command refuses a data dir a node is running on, and says what to use.
    let data = n.data_dir().display().to_string();
    let (ok, _, err) = tool(&["--data-dir", &data, "user", "add", "bob"], "pw\n").await?;
    assert!(!ok && err.contains("HTTP API"), "{err}");
    Ok(())
}

#[tokio::test]
async fn operators_manage_users_on_a_stopped_nodes_data_dir() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let d = data.path().display().to_string();
    let mut args = vec!["--data-dir", d.as_str()];
    args.extend(CHEAP.iter().flat_map(|(k, v)| [*k, *v]));
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    let (ok, out, err) = tool(&with(&args, &["user", "add", "op1", "--role", "admin", "--nick", "Op"]), "first pass\n").await?;
    assert!(ok, "{err}");
    assert!(out.contains(r#""role":"admin""#), "{out}");
    let (ok, _, err) = tool(&with(&args, &["user", "add", "op1"]), "again\n").await?;
    assert!(!ok && err.contains("exists"), "{err}");
    let (ok, _, err) = tool(&with(&args, &["user", "role", "op1", "emperor"]), "").await?;
    assert!(!ok && err.contains("role"), "{err}");
    assert!(tool(&with(&args, &["user", "passwd", "op1"]), "second pass\n").await?.0);
    assert!(tool(&with(&args, &["user", "add", "op2"]), "pw2\n").await?.0);
    assert!(tool(&with(&args, &["user", "ban", "op2"]), "").await?.0);
    let (_, list, _) = tool(&with(&args, &["user", "list"]), "").await?;
    assert_eq!(list.lines().count(), 2, "{list}");
    // The node started on that data dir knows them, in prod too.
    let n = cheap(TestNode::builder(bin()).arg("--profile", "prod").arg("--api-key", "0123456789abcdef")).start_in(data).await?;
    assert!(login(&n, "op1", "first pass").await?.is_err(), "the old password is gone");
    assert!(login(&n, "op1", "second pass").await?.is_ok());
    assert!(login(&n, "op2", "pw2").await?.is_err(), "banned");
    Ok(())
}

#[tokio::test]
async fn the_users_api_creates_lists_changes_and_deletes() -> anyhow::Result<()> {
    let n = cheap(TestNode::builder(bin())).start().await?;
    let http = reqwest::Client::new();
    let users = format!("{}/v1/users", n.http());
    for i in 0..5 {
        let r = http.post(&users).json(&json!({"id": format!("u{i}"), "password": "pw"})).send().await?;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let dup = http.post(&users).json(&json!({"id": "u1", "password": "other"})).send().await?;
    assert_eq!(dup.status(), StatusCode::CONFLICT);
    assert_eq!(dup.json::<Value>().await?["code"], 11014);
    for bad in [json!({"id": "u9", "password": "pw", "role": "root"}), json!({"id": "a:b", "password": "pw"}), json!({"id": "u9"})] {
        let r = http.post(&users).json(&bad).send().await?;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(r.json::<Value>().await?["code"], 11012);
    }
    // Paged by id.
    let page: Value = http.get(format!("{users}?limit=2")).send().await?.json().await?;
    assert_eq!(page["users"].as_array().unwrap().len(), 2);
    assert_eq!(page["next"], "u1");
    let rest: Value = http.get(format!("{users}?after=u1&limit=10")).send().await?.json().await?;
    let ids: Vec<&str> = rest["users"].as_array().unwrap().iter().map(|u| u["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["u2", "u3", "u4"]);
    assert_eq!(rest["next"], Value::Null);
    // Patch changes what it names and nothing else.
    let patched: Value = http.patch(format!("{users}/u2")).json(&json!({"nick": "Two", "role": "agent"})).send().await?.json().await?;
    assert_eq!((patched["nick"].as_str(), patched["role"].as_str()), (Some("Two"), Some("agent")));
    let got: Value = http.get(format!("{users}/u2")).send().await?.json().await?;
    assert_eq!((got["nick"].as_str(), got["role"].as_str()), (Some("Two"), Some("agent")));
    assert!(got.get("password_hash").is_none() && !got.to_string().contains("argon2"), "no hash leaks: {got}");
    assert_eq!(http.patch(format!("{users}/nobody")).json(&json!({"nick": "x"})).send().await?.status(), StatusCode::NOT_FOUND);
    let unknown_field = http.patch(format!("{users}/u2")).json(&json!({"banned": false})).send().await?;
    assert_eq!(unknown_field.status(), StatusCode::BAD_REQUEST, "ban has its own route");
    // Delete: gone, cannot log in, and the id can be taken again with its old tokens refused.
    let (_, old_token) = login(&n, "u3", "pw").await?.unwrap();
    assert_eq!(http.delete(format!("{users}/u3")).send().await?.status(), StatusCode::NO_CONTENT);
    assert_eq!(http.get(format!("{users}/u3")).send().await?.status(), StatusCode::NOT_FOUND);
    assert_eq!(http.delete(format!("{users}/u3")).send().await?.status(), StatusCode::NOT_FOUND);
    assert!(login(&n, "u3", "pw").await?.is_err(), "a deleted user cannot log in (nor is re-registered by the dev profile)");
    assert_eq!(http.post(&users).json(&json!({"id": "u3", "password": "new"})).send().await?.status(), StatusCode::CREATED);
    assert_eq!(token_login(&n, &old_token).await?, 10008, "the deleted user's tokens do not work for the new one");
    assert!(login(&n, "u3", "new").await?.is_ok());
    Ok(())
}

#[tokio::test]
async fn password_change_ban_and_logout_end_sessions_and_tokens() -> anyhow::Result<()> {
    let n = cheap(TestNode::builder(bin())).start().await?;
    let http = reqwest::Client::new();
    let users = format!("{}/v1/users", n.http());
    http.post(&users).json(&json!({"id": "rev", "password": "one"})).send().await?.error_for_status()?;
    // Password change: the open session ends with 11013 and the token is refused.
    let (mut session, token) = login(&n, "rev", "one").await?.unwrap();
    assert_eq!(token_auth(&n, &token).await?, 10009);
    http.patch(format!("{users}/rev")).json(&json!({"password": "two"})).send().await?.error_for_status()?;
    signed_out(&mut session).await?;
    assert_eq!(token_login(&n, &token).await?, 10008);
    assert_eq!(token_auth(&n, &token).await?, 10010);
    assert!(login(&n, "rev", "one").await?.is_err());
    // Ban: signed out, cannot log in; unban lets the password in again, not the old token.
    let (mut session, token) = login(&n, "rev", "two").await?.unwrap();
    let banned: Value = http.post(format!("{users}/rev/ban")).send().await?.json().await?;
    assert_eq!(banned["banned"], true);
    signed_out(&mut session).await?;
    assert!(login(&n, "rev", "two").await?.is_err(), "banned");
    http.post(format!("{users}/rev/unban")).send().await?.error_for_status()?;
    assert_eq!(token_login(&n, &token).await?, 10008, "the ban revoked it for good");
    // Logout everywhere: every session of the user, on every transport.
    let (mut tcp, token) = login(&n, "rev", "two").await?.unwrap();
    let mut ws = tests::WsClient::connect(&format!("{}/?token={token}", n.ws())).await?;
    assert_eq!(ws.recv_cmd(6).await?["code"], 10007, "?token= logs in");
    http.post(format!("{users}/rev/logout")).send().await?.error_for_status()?;
    signed_out(&mut tcp).await?;
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), ws.recv_cmd(14)).await??["code"], 11013);
    assert_eq!(token_login(&n, &token).await?, 10008);
    assert!(login(&n, "rev", "two").await?.is_ok(), "a logout is not a ban");
    Ok(())
}

#[tokio::test]
async fn a_user_and_a_token_from_one_node_work_at_every_node_and_revocation_reaches_them_all() -> anyhow::Result<()> {
    let c = Cluster::start(bin(), &crate::cluster::REGIONS, &CHEAP).await?;
    let http = reqwest::Client::new();
    let created = http.post(format!("{}/v1/users", c.node(0).http())).json(&json!({"id": "roamer", "password": "pw"})).send().await?;
    assert_eq!(created.status(), StatusCode::CREATED);
    // Created at iad, it logs in at fra and sin as soon as the row has arrived.
    for i in 1..3 {
        eventually(Duration::from_secs(10), || async { login(c.node(i), "roamer", "pw").await.ok()?.ok().map(drop) }).await?;
    }
    // A token from iad works at fra and sin: cmd 5, cmd 3 and ?token=.
    let (_iad, token) = login(c.node(0), "roamer", "pw").await?.unwrap();
    for i in 1..3 {
        assert_eq!(token_login(c.node(i), &token).await?, 10007, "node {i}");
        assert_eq!(token_auth(c.node(i), &token).await?, 10009, "node {i}");
    }
    let mut ws = tests::WsClient::connect(&format!("{}/?token={token}", c.node(2).ws())).await?;
    assert_eq!(ws.recv_cmd(6).await?["code"], 10007);
    let mut at_fra = c.node(1).tcp().await?;
    at_fra.send(json!({"cmd": 5, "token": token})).await?;
    assert_eq!(at_fra.recv_cmd(6).await?["code"], 10007);
    // A password change at sin ends the sessions at fra and sin, and the token everywhere.
    let changed = http.patch(format!("{}/v1/users/roamer", c.node(2).http())).json(&json!({"password": "new"})).send().await?;
    assert_eq!(changed.status(), StatusCode::OK);
    signed_out(&mut at_fra).await?;
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), ws.recv_cmd(14)).await??["code"], 11013);
    for i in 0..3 {
        eventually(Duration::from_secs(10), || async { (token_login(c.node(i), &token).await.ok()? == 10008).then_some(()) }).await?;
    }
    assert!(login(c.node(0), "roamer", "new").await?.is_ok());
    Ok(())
}

#[tokio::test]
async fn the_dev_profile_stays_on_loopback_unless_told_otherwise() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let d = data.path().display().to_string();
    // It would register anyone who logs in and leave the API open: refused on a public address.
    let (ok, _, err) = tool(&["--data-dir", &d, "--jim-addr", "0.0.0.0:0"], "").await?;
    assert!(!ok && err.contains("--allow-dev-public") && err.contains("--profile prod"), "{err}");
    let mut node = tokio::process::Command::new(bin())
        .args(["--data-dir", &d, "--jim-addr", "0.0.0.0:0", "--allow-dev-public"])
        .args(["--admin-addr", "127.0.0.1:0", "--tls-addr", "127.0.0.1:0", "--quic-addr", "127.0.0.1:0"])
        .env("KEFU_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(node.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await??.unwrap_or_default();
    assert!(first.starts_with("kefu-node listening jim=0.0.0.0:"), "told otherwise, it starts: {first}");
    node.kill().await?;
    Ok(())
}

#[tokio::test]
async fn a_quic_client_resumes_in_zero_rtt_at_another_region_with_its_token() -> anyhow::Result<()> {
    let c = Cluster::start(bin(), &crate::cluster::REGIONS[..2], &CHEAP).await?;
    // The token comes from iad.
    let (_iad, token) = login(c.node(0), "traveller", "pw").await?.map_err(|r| anyhow::anyhow!("{r}"))?;
    // The phone has been to fra before (so it holds a ticket for 0-RTT there).
    let fra = c.node(1);
    let config = tests::quic_client_config(&[b"kefu/1"], fra.self_signed_cert()?)?;
    let mut endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into())?;
    endpoint.set_default_client_config(config);
    let first = endpoint.connect(fra.quic, "localhost")?.await?;
    let (send, recv) = first.open_bi().await?;
    let mut visit = TcpClient::over(tokio::io::join(recv, send));
    visit.send(json!({"cmd": 13})).await?;
    visit.recv_cmd(13).await?;
    first.close(0u32.into(), b"bye");
    // Back at fra: iad's token, sent in 0-RTT before the handshake completes, logs in.
    let (conn, accepted) = endpoint.connect(fra.quic, "localhost")?.into_0rtt().map_err(|_| anyhow::anyhow!("no 0-RTT ticket"))?;
    let (send, recv) = conn.open_bi().await?;
    let mut phone = TcpClient::over(tokio::io::join(recv, send));
    phone.send(json!({"cmd": 5, "token": token})).await?;
    assert!(accepted.await, "fra accepted 0-RTT");
    let reply = phone.recv_cmd(6).await?;
    assert_eq!(reply["code"], 10007, "{reply}");
    assert_eq!(reply["data"]["userId"], "traveller");
    Ok(())
}

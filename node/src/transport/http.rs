//! HTTP on the J-IM port: the J-IM API (`/api/...`), kefu's `/v1` JSON API with its OpenAPI
//! document, the static demo page, and the WebSocket upgrade on any path. Handlers translate
//! HTTP to dispatcher calls and back; they hold no command logic of their own.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};

use crate::accounts::{Access, AccountError, Accounts, NewUser, UserPatch};
use axum::{Json, Router};
use schema::jim::{self, Request as JimRequest};
use schema::{Command, ConversationId, Status};
use serde_json::{json, Value};
use tower::ServiceExt;

use crate::dispatch::{Core, Sender};
use crate::store::StoredMessage;

const INDEX_HTML: &str = include_str!("../../web/index.html");
const OPENAPI_JSON: &str = include_str!("../../web/openapi.json");
/// Largest HTTP body (the TCP limit: a chat sent over HTTP is no bigger than one over TCP).
const MAX_HTTP_BODY: usize = schema::frame::MAX_BODY;

/// The client address, put into every request's extensions by [`service`].
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// The router for the J-IM port.
pub fn router(core: Arc<Core>) -> Router {
    // Every API route needs the key (when one is configured); the pages and the OpenAPI
    // document do not.
    let api = Router::new()
        .route("/api/message/send", any(api_send))
        .route("/api/user/online", any(api_online))
        .route("/api/user/close", any(api_close))
        .route("/v1/messages", post(v1_send))
        .route("/v1/conversations/{conversation}/messages", get(v1_history))
        .route("/v1/users", post(v1_create_user).get(v1_list_users))
        .route("/v1/users/{user}", get(v1_user).patch(v1_patch_user).delete(v1_delete_user))
        .route("/v1/users/{user}/ban", post(v1_ban))
        .route("/v1/users/{user}/unban", post(v1_unban))
        .route("/v1/users/{user}/logout", post(v1_logout))
        .route("/v1/groups", post(v1_create_group))
        .route("/v1/groups/{group}", get(v1_group))
        .route("/v1/groups/{group}/members/{user}", axum::routing::put(v1_add_member).delete(v1_remove_member))
        .route("/v1/presence", get(v1_presence_all))
        .route("/v1/presence/{user}", get(v1_presence))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&core), require_key));
    Router::new()
        .route("/", get(index))
        .route("/index.html", get(index))
        .route("/v1/openapi.json", get(openapi))
        .merge(api)
        .merge(super::support_http::routes(Arc::clone(&core)))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_HTTP_BODY))
        .with_state(core)
}

/// A hyper service for one connection: requests with `Sec-WebSocket-Key` become WebSocket
/// sessions on any path (as J-IM); everything else goes to the router.
#[derive(Clone)]
pub struct HttpService {
    router: Router,
    core: Arc<Core>,
    peer: SocketAddr,
}

/// The service for a connection from `peer`.
pub fn service(router: Router, core: Arc<Core>, peer: SocketAddr) -> HttpService {
    HttpService { router, core, peer }
}

impl hyper::service::Service<Request<hyper::body::Incoming>> for HttpService {
    type Response = Response;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Infallible>> + Send>>;

    fn call(&self, req: Request<hyper::body::Incoming>) -> Self::Future {
        let (router, core, peer) = (self.router.clone(), Arc::clone(&self.core), self.peer);
        Box::pin(async move {
            let mut req = req.map(Body::new);
            req.extensions_mut().insert(Peer(peer));
            if req.headers().contains_key(header::SEC_WEBSOCKET_KEY) {
                return Ok(websocket(core, req, peer).await);
            }
            router.oneshot(req).await
        })
    }
}

async fn websocket(core: Arc<Core>, req: Request<Body>, peer: SocketAddr) -> Response {
    let query: HashMap<String, String> = Query::try_from_uri(req.uri()).map(|Query(q)| q).unwrap_or_default();
    let (mut parts, _) = req.into_parts();
    match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(ws) => super::ws::upgrade(core, ws, peer, query),
        Err(rejection) => rejection.into_response(),
    }
}

async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML)
}

async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON)
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, json_body(&json!({ "code": Status::NotFound.code(), "msg": Status::NotFound.msg() })))
}

pub(super) fn json_body(v: &Value) -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"))], v.to_string()).into_response()
}

fn raw_json(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"))], body).into_response()
}

/// Whether the caller presented the API key (or none is configured, which only dev allows).
pub(super) fn authorized(core: &Core, headers: &HeaderMap) -> bool {
    let Some(key) = &core.config.api_key else { return true };
    let presented = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")));
    presented.is_some_and(|p| crate::auth::constant_time_eq(p.as_bytes(), key.as_bytes()))
}

/// Takes a token for the request: a caller with the key is limited per key (a backend fleet
/// shares one), anyone else per client IP, which also slows down guessing the key.
pub(super) fn within_rate(core: &Core, req: &axum::extract::Request) -> bool {
    let now = std::time::Instant::now();
    match &core.config.api_key {
        Some(key) if authorized(core, req.headers()) => core.api_per_key.take(key, now),
        _ => client_ip(core, req).is_none_or(|ip| core.api_per_ip.take(&ip, now)),
    }
}

async fn require_key(State(core): State<Arc<Core>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if !within_rate(&core, &req) {
        return rate_limited();
    }
    if !authorized(&core, req.headers()) {
        return unauthorized();
    }
    next.run(req).await
}

/// The caller's IP: the socket's peer, or behind a proxy (Fly's or kefu-router, which
/// `replay_writes` says the node runs behind) the `Fly-Client-IP` the proxy sets.
fn client_ip(core: &Core, req: &axum::extract::Request) -> Option<std::net::IpAddr> {
    let forwarded = || req.headers().get("fly-client-ip")?.to_str().ok()?.trim().parse().ok();
    if core.config.replay_writes {
        if let Some(ip) = forwarded() {
            return Some(ip);
        }
    }
    req.extensions().get::<Peer>().map(|Peer(peer)| peer.ip())
}

pub(super) fn rate_limited() -> Response {
    (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "1")], code_only(Status::RateLimited)).into_response()
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, json_body(&json!({ "code": Status::InvalidVerification.code(), "msg": "api key required 需要API密钥" })))
        .into_response()
}

fn code_only(status: Status) -> Response {
    json_body(&json!({ "code": status.code(), "msg": status.msg() }))
}

// -- J-IM API -----------------------------------------------------------------------------------

/// How long the proxy tries the owner's region before bringing a replayed write back here.
const REPLAY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Behind Fly's proxy: a send for a conversation sequenced in another region is answered with
/// `fly-replay: region=<that region>` (the proxy replays it there, where it is one local
/// commit instead of a forward across regions), unless it is such a replay already
/// (`fly-replay-src`) or comes back because the replay failed (`fly-replay-failed`): then it is
/// served here, forwarded over the mesh as any send. The replay allows that fallback, so a
/// region that cannot be reached costs a forward, not an error.
fn replay_elsewhere(core: &Core, headers: &HeaderMap, body: &[u8]) -> Option<Response> {
    if !core.config.replay_writes || headers.contains_key("fly-replay-src") || headers.contains_key("fly-replay-failed") {
        return None;
    }
    let Ok(JimRequest::Chat(chat)) = jim::parse_request(Some(Command::ChatReq), body) else { return None };
    let from = chat.from.as_deref()?;
    let conversation = match &chat.target {
        jim::Target::User(to) => ConversationId::private(from, to),
        jim::Target::Group(g) => ConversationId::group(g),
    };
    let region = core.cluster.home_region(&conversation)?;
    if region == core.config.region {
        return None;
    }
    let replay = schema::fly_replay::Replay {
        regions: vec![region.clone()],
        timeout: Some(REPLAY_TIMEOUT),
        fallback: Some(schema::fly_replay::Fallback::PreferSelf),
        ..Default::default()
    };
    let header = HeaderValue::from_str(&replay.to_header()).ok()?;
    let body = json!({ "code": Status::Retryable.code(), "msg": Status::Retryable.msg(), "replay": region });
    Some((StatusCode::CONFLICT, [("fly-replay", header)], json_body(&body)).into_response())
}

/// `/api/message/send`: the body is a cmd 11 chat JSON, `from` names the sender.
async fn api_send(State(core): State<Arc<Core>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(replay) = replay_elsewhere(&core, &headers, &body) {
        return replay;
    }
    // J-IM answers 200 whatever the code in the body.
    let (_, reply) = send_from_api(&core, &body).await;
    raw_json(StatusCode::OK, reply)
}

/// Parses a chat body with a `from`, sends it, and returns the cmd 12 reply and its status.
async fn send_from_api(core: &Core, body: &[u8]) -> (Status, Vec<u8>) {
    let bad = || (Status::SendFailed, jim::status_reply(Command::ChatResp, Status::SendFailed));
    let Ok(JimRequest::Chat(chat)) = jim::parse_request(Some(Command::ChatReq), body) else { return bad() };
    let Some(from) = chat.from.clone().filter(|f| jim::valid_id(f)) else { return bad() };
    let (nick, avatar) = match core.store.user(&from).await {
        Ok(Some(user)) => (user.nick, user.avatar),
        Ok(None) => (None, None),
        Err(_) => return (Status::Retryable, jim::status_reply(Command::ChatResp, Status::Retryable)),
    };
    let sender = Sender { id: &from, nick, avatar, in_hub: false, conn: None };
    let reply = core.send_chat(&sender, chat).await;
    let status = serde_json::from_slice::<Value>(&reply)
        .ok()
        .and_then(|v| v["code"].as_u64())
        .and_then(|c| Status::from_code(c as u32))
        .unwrap_or(Status::Retryable);
    (status, reply)
}

#[derive(serde::Deserialize)]
struct UserParam {
    userid: Option<String>,
}

async fn api_online(State(core): State<Arc<Core>>, Query(q): Query<UserParam>) -> Response {
    match q.userid.filter(|u| !u.is_empty()) {
        None => code_only(Status::InvalidVerification),
        Some(user) if core.hub.is_online_anywhere(&user) => code_only(Status::Online),
        Some(_) => code_only(Status::Offline),
    }
}

async fn api_close(State(core): State<Arc<Core>>, Query(q): Query<UserParam>) -> Response {
    match q.userid.filter(|u| !u.is_empty()) {
        None => code_only(Status::InvalidVerification),
        Some(user) => {
            core.kick_everywhere(&user);
            code_only(Status::CloseOk)
        }
    }
}

// -- /v1 ----------------------------------------------------------------------------------------

fn http_status(status: Status) -> StatusCode {
    match status {
        Status::Ok | Status::Offline => StatusCode::OK,
        Status::Forbidden => StatusCode::FORBIDDEN,
        Status::NotFound => StatusCode::NOT_FOUND,
        Status::Retryable => StatusCode::SERVICE_UNAVAILABLE,
        Status::RateLimited | Status::LoginThrottled => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// `POST /v1/messages` with `{"from","to"|"groupId","content","msgType"?,"id"?,"extras"?}`.
async fn v1_send(State(core): State<Arc<Core>>, headers: HeaderMap, Json(mut body): Json<Value>) -> Response {
    let Some(obj) = body.as_object_mut() else {
        return raw_json(StatusCode::BAD_REQUEST, jim::status_reply(Command::ChatResp, Status::SendFailed));
    };
    let chat_type = if obj.contains_key("groupId") { 1 } else { 2 };
    obj.entry("chatType").or_insert(json!(chat_type));
    obj.insert("cmd".into(), json!(11));
    let body = body.to_string();
    if let Some(replay) = replay_elsewhere(&core, &headers, body.as_bytes()) {
        return replay;
    }
    let (status, reply) = send_from_api(&core, body.as_bytes()).await;
    raw_json(http_status(status), reply)
}

#[derive(serde::Deserialize)]
struct HistoryParams {
    after: Option<u64>,
    limit: Option<u32>,
}

/// `GET /v1/conversations/{id}/messages?after=SEQ&limit=N`: without `after`, the newest N.
async fn v1_history(State(core): State<Arc<Core>>, Path(conversation): Path<String>, Query(p): Query<HistoryParams>) -> Response {
    let Some(conv) = ConversationId::parse(&conversation) else {
        return (StatusCode::BAD_REQUEST, code_only(Status::BadRequest)).into_response();
    };
    let limit = p.limit.unwrap_or(jim::DEFAULT_PAGE).clamp(1, core.config.history_max);
    let result = match p.after {
        Some(after) => core.store.since(&conv, after, limit).await,
        None => core.store.history(&conv, None, None, 0, limit).await,
    };
    match result {
        Ok(messages) => {
            let bodies: Vec<_> = messages.iter().map(StoredMessage::to_chat_body).collect();
            json_body(&json!({ "conversation": conv.as_str(), "messages": bodies }))
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, code_only(Status::Retryable)).into_response(),
    }
}

async fn v1_user(State(core): State<Arc<Core>>, Path(user): Path<String>) -> Response {
    let (record, groups) = match (core.store.user(&user).await, core.store.user_groups(&user).await) {
        (Ok(r), Ok(g)) => (r, g),
        _ => return (StatusCode::SERVICE_UNAVAILABLE, code_only(Status::Retryable)).into_response(),
    };
    let Some(record) = record else { return (StatusCode::NOT_FOUND, code_only(Status::NotFound)).into_response() };
    let groups: Vec<&str> = groups.iter().map(|(g, _)| g.as_str()).collect();
    json_body(&json!({
        "userId": record.user_id, "nick": record.nick, "avatar": record.avatar, "role": record.role, "banned": record.banned,
        "online": core.hub.is_online_anywhere(&record.user_id), "groups": groups,
    }))
}

fn accounts(core: &Core) -> Accounts<'_> {
    Accounts { store: &core.store, cost: core.config.password_hash_cost, passwords: &core.passwords }
}

/// An account change's answer: the user, or the error as HTTP status, kefu code and message.
fn account_reply(result: Result<crate::store::UserRecord, AccountError>, ok: StatusCode) -> Response {
    let (http, status) = match &result {
        Ok(user) => return (ok, json_body(&crate::accounts::view(user))).into_response(),
        Err(AccountError::Exists(_)) => (StatusCode::CONFLICT, Status::Exists),
        Err(AccountError::NotFound(_)) => (StatusCode::NOT_FOUND, Status::NotFound),
        Err(AccountError::Invalid(_)) => (StatusCode::BAD_REQUEST, Status::BadRequest),
        Err(AccountError::Store(_)) => (StatusCode::SERVICE_UNAVAILABLE, Status::Retryable),
        Err(AccountError::Busy) => (StatusCode::SERVICE_UNAVAILABLE, Status::Busy),
    };
    error_reply(http, status, result.err().map(|e| e.to_string()).unwrap_or_default())
}

/// A JSON body that did not parse: 400 with what was wrong.
fn bad_json(e: axum::extract::rejection::JsonRejection) -> Response {
    error_reply(StatusCode::BAD_REQUEST, Status::BadRequest, e.body_text())
}

/// `POST /v1/users` with `{"id","password","nick"?,"avatar"?,"role"?}`: 201, or 409 if the id exists.
async fn v1_create_user(State(core): State<Arc<Core>>, body: Result<Json<NewUser>, axum::extract::rejection::JsonRejection>) -> Response {
    match body {
        Ok(Json(new)) => account_reply(accounts(&core).create(new).await, StatusCode::CREATED),
        Err(e) => bad_json(e),
    }
}

#[derive(serde::Deserialize)]
struct PageParams {
    after: Option<String>,
    limit: Option<u32>,
}

/// `GET /v1/users?after=ID&limit=N`: users in id order; `next` is the `after` of the next page.
async fn v1_list_users(State(core): State<Arc<Core>>, Query(p): Query<PageParams>) -> Response {
    let limit = p.limit.unwrap_or(100).clamp(1, 1000);
    match core.store.users(p.after.as_deref().unwrap_or(""), limit).await {
        Ok(users) => {
            let next = (users.len() == limit as usize).then(|| users.last().map(|u| u.user_id.clone())).flatten();
            json_body(&json!({ "users": users.iter().map(crate::accounts::view).collect::<Vec<_>>(), "next": next }))
        }
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, code_only(Status::Retryable)).into_response(),
    }
}

/// `PATCH /v1/users/{id}` with any of `{"nick","avatar","role","password"}`.
async fn v1_patch_user(
    State(core): State<Arc<Core>>,
    Path(user): Path<String>,
    body: Result<Json<UserPatch>, axum::extract::rejection::JsonRejection>,
) -> Response {
    match body {
        Ok(Json(patch)) => account_reply(accounts(&core).patch(&user, patch).await, StatusCode::OK),
        Err(e) => bad_json(e),
    }
}

async fn v1_delete_user(State(core): State<Arc<Core>>, Path(user): Path<String>) -> Response {
    match accounts(&core).set_access(&user, Access::Delete).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => account_reply(Err(e), StatusCode::OK),
    }
}

async fn v1_ban(State(core): State<Arc<Core>>, Path(user): Path<String>) -> Response {
    account_reply(accounts(&core).set_access(&user, Access::Ban).await, StatusCode::OK)
}

async fn v1_unban(State(core): State<Arc<Core>>, Path(user): Path<String>) -> Response {
    account_reply(accounts(&core).set_access(&user, Access::Unban).await, StatusCode::OK)
}

async fn v1_logout(State(core): State<Arc<Core>>, Path(user): Path<String>) -> Response {
    account_reply(accounts(&core).set_access(&user, Access::Logout).await, StatusCode::OK)
}

async fn v1_group(State(core): State<Arc<Core>>, Path(group): Path<String>) -> Response {
    let (info, members) = match (core.store.group_info(&group).await, core.store.group_members(&group).await) {
        (Ok(i), Ok(m)) => (i, m),
        _ => return (StatusCode::SERVICE_UNAVAILABLE, code_only(Status::Retryable)).into_response(),
    };
    let Some(info) = info else { return (StatusCode::NOT_FOUND, code_only(Status::NotFound)).into_response() };
    let members: Vec<Value> = members
        .into_iter()
        .map(|(id, nick, _)| json!({ "userId": id, "nick": nick, "online": core.hub.is_online_anywhere(&id) }))
        .collect();
    let access = if info.closed { "closed" } else { "open" };
    json_body(&json!({ "groupId": group, "name": info.name, "access": access, "members": members }))
}

/// An error answer: HTTP status, kefu code and message, and what was wrong.
pub(super) fn error_reply(http: StatusCode, status: Status, error: impl std::fmt::Display) -> Response {
    (http, json_body(&json!({ "code": status.code(), "msg": status.msg(), "error": error.to_string() }))).into_response()
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewGroup {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    access: Option<String>,
    #[serde(default)]
    members: Vec<String>,
}

/// `POST /v1/groups` with `{"id","name"?,"access"?:"open"|"closed","members"?:[…]}`.
async fn v1_create_group(State(core): State<Arc<Core>>, body: Result<Json<NewGroup>, axum::extract::rejection::JsonRejection>) -> Response {
    let new = match body {
        Ok(Json(new)) => new,
        Err(e) => return bad_json(e),
    };
    let closed = match new.access.as_deref().unwrap_or("open") {
        "open" => false,
        "closed" => true,
        other => return error_reply(StatusCode::BAD_REQUEST, Status::BadRequest, format!("access {other:?}: open or closed")),
    };
    if let Some(bad) = std::iter::once(&new.id).chain(&new.members).find(|id| !jim::valid_id(id)) {
        return error_reply(
            StatusCode::BAD_REQUEST,
            Status::BadRequest,
            format!("id {bad:?}: 1 to 64 characters, without ':' or control characters"),
        );
    }
    if crate::support::is_support_group(&new.id) {
        return error_reply(
            StatusCode::BAD_REQUEST,
            Status::BadRequest,
            format!("group ids starting with {:?} belong to customer service", crate::support::GROUP_PREFIX),
        );
    }
    match core.store.create_group(&new.id, new.name.clone(), closed, new.members.clone()).await {
        Ok(true) => {
            let access = if closed { "closed" } else { "open" };
            (StatusCode::CREATED, json_body(&json!({ "groupId": new.id, "name": new.name, "access": access, "members": new.members })))
                .into_response()
        }
        Ok(false) => error_reply(StatusCode::CONFLICT, Status::Exists, format!("group {} exists", new.id)),
        Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, Status::Retryable, e),
    }
}

/// `PUT /v1/groups/{group}/members/{user}`: 204 (also when already a member), 404 without the group.
async fn v1_add_member(State(core): State<Arc<Core>>, Path((group, user)): Path<(String, String)>) -> Response {
    if !jim::valid_id(&user) {
        return error_reply(StatusCode::BAD_REQUEST, Status::BadRequest, format!("user id {user:?}"));
    }
    match core.store.group_info(&group).await {
        Ok(Some(_)) => {}
        Ok(None) => return error_reply(StatusCode::NOT_FOUND, Status::NotFound, format!("no group {group}")),
        Err(e) => return error_reply(StatusCode::SERVICE_UNAVAILABLE, Status::Retryable, e),
    }
    match core.store.set_member(&group, &user, true).await {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, Status::Retryable, e),
    }
}

/// `DELETE /v1/groups/{group}/members/{user}`: removes the member at once on every node and sends
/// the exit notice to the others; 404 if they were not a member.
async fn v1_remove_member(State(core): State<Arc<Core>>, Path((group, user)): Path<(String, String)>) -> Response {
    let nick = match core.store.user(&user).await {
        Ok(record) => record.and_then(|r| r.nick),
        Err(e) => return error_reply(StatusCode::SERVICE_UNAVAILABLE, Status::Retryable, e),
    };
    match core.leave_group(&group, &user, nick).await {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error_reply(StatusCode::NOT_FOUND, Status::NotFound, format!("{user} is not a member of {group}")),
        Err(e) => error_reply(StatusCode::SERVICE_UNAVAILABLE, Status::Retryable, e),
    }
}

async fn v1_presence_all(State(core): State<Arc<Core>>) -> Response {
    json_body(&json!({ "online": core.hub.online_users_everywhere() }))
}

async fn v1_presence(State(core): State<Arc<Core>>, Path(user): Path<String>) -> Response {
    let terminals = core.hub.terminals(&user);
    let nodes = core.hub.remote_nodes_of(&user);
    json_body(&json!({ "userId": user, "online": !terminals.is_empty() || !nodes.is_empty(), "terminals": terminals, "otherNodes": nodes }))
}

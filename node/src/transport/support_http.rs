//! HTTP for customer service: the `/v1` routes of inboxes, agents, conversations and the widget,
//! and the two pages (`/widget.js`, `/console/`). Handlers turn requests into `support` calls and
//! answers into JSON; who may call what is decided here from the caller's credentials: the API
//! key (an admin), an agent's or admin's token, or a visitor's token.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use schema::Status;
use serde::Deserialize;
use serde_json::{json, Value};

use super::http::{authorized, error_reply, json_body, rate_limited, within_rate};
use crate::dispatch::Core;
use crate::support::{self, model, SupportError};

const WIDGET_JS: &str = include_str!("../../web/widget.js");
const CONSOLE_HTML: &str = include_str!("../../web/console.html");

/// The customer-service routes and pages.
pub fn routes(core: Arc<Core>) -> Router<Arc<Core>> {
    // The widget runs on the customers' sites: its routes answer any origin (they take a token
    // in a header, never a cookie, so a foreign page gains nothing it could not do itself).
    let widget = Router::new()
        .route("/v1/widget/session", post(widget_session))
        .route("/v1/widget/conversation", get(widget_conversation))
        .route("/v1/widget/csat", post(widget_csat))
        .route("/v1/widget/offline", post(widget_offline))
        .route_layer(axum::middleware::from_fn_with_state(Arc::clone(&core), limit))
        .layer(axum::middleware::from_fn(any_origin));
    let api = Router::new()
        .route("/v1/inboxes", post(create_inbox).get(list_inboxes))
        .route("/v1/inboxes/{inbox}", get(get_inbox).patch(patch_inbox))
        .route("/v1/agents", get(list_agents))
        .route("/v1/teams", get(list_teams))
        .route("/v1/agents/{user}", put(put_agent))
        .route("/v1/conversations", get(list_conversations))
        .route("/v1/conversations/{conversation}", get(get_conversation))
        .route("/v1/conversations/{conversation}/assign", post(assign))
        .route("/v1/conversations/{conversation}/transfer", post(transfer))
        .route("/v1/conversations/{conversation}/resolve", post(resolve))
        .route("/v1/conversations/{conversation}/snooze", post(snooze))
        .route("/v1/conversations/{conversation}/notes", post(note))
        .route("/v1/conversations/{conversation}/labels", put(labels))
        .route("/v1/canned", get(list_canned))
        .route("/v1/canned/{code}", put(put_canned).delete(delete_canned))
        .route_layer(axum::middleware::from_fn_with_state(core, limit));
    Router::new()
        .route("/widget.js", get(widget_js))
        .route("/console", get(|| async { axum::response::Redirect::permanent("/console/") }))
        .route("/console/", get(console))
        .merge(api)
        .merge(widget)
}

async fn widget_js() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=300"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
        ],
        WIDGET_JS,
    )
}

async fn console() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], CONSOLE_HTML)
}

/// CORS for the widget's routes: preflights answered here, every answer open to any origin.
async fn any_origin(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let mut resp = if req.method() == axum::http::Method::OPTIONS { StatusCode::NO_CONTENT.into_response() } else { next.run(req).await };
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, header::HeaderValue::from_static("*"));
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, header::HeaderValue::from_static("GET, POST, OPTIONS"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, header::HeaderValue::from_static("authorization, content-type"));
    h.insert(header::ACCESS_CONTROL_MAX_AGE, header::HeaderValue::from_static("600"));
    resp
}

/// The HTTP API's rate limits (the widget's routes are public: this is what slows down a script
/// making visitors).
async fn limit(State(core): State<Arc<Core>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if !within_rate(&core, &req) {
        return rate_limited();
    }
    next.run(req).await
}

/// Who is calling.
enum Caller {
    /// The API key (or, in the dev profile without one, anyone without a token).
    Admin,
    /// A logged-in agent or admin.
    Agent { id: String, admin: bool },
    /// A widget's visitor.
    Visitor(String),
}

impl Caller {
    /// The name activity lines give the caller.
    fn name(&self) -> &str {
        match self {
            Caller::Admin => "api",
            Caller::Agent { id, .. } | Caller::Visitor(id) => id,
        }
    }
}

async fn caller(core: &Core, headers: &HeaderMap) -> Option<Caller> {
    let bearer = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // A bearer that is not a token may be the API key.
    if let Some(token) = bearer.filter(|t| core.tokens.verify(t, SystemTime::now()).is_some()) {
        let user = core.user_for_token(token).await.ok().flatten()?;
        return match user.role.as_str() {
            "agent" => Some(Caller::Agent { id: user.user_id, admin: false }),
            "admin" => Some(Caller::Agent { id: user.user_id, admin: true }),
            "visitor" => Some(Caller::Visitor(user.user_id)),
            _ => None,
        };
    }
    authorized(core, headers).then_some(Caller::Admin)
}

fn unauthorized() -> Response {
    error_reply(StatusCode::UNAUTHORIZED, Status::InvalidVerification, "an agent token, a visitor token or the API key is required")
}

fn forbidden(what: &str) -> Response {
    error_reply(StatusCode::FORBIDDEN, Status::Forbidden, what)
}

/// An agent, an admin or the API key.
async fn staff(core: &Core, headers: &HeaderMap) -> Result<Caller, Response> {
    match caller(core, headers).await {
        Some(Caller::Visitor(_)) => Err(forbidden("agents only")),
        Some(c) => Ok(c),
        None => Err(unauthorized()),
    }
}

/// An admin or the API key.
async fn admin(core: &Core, headers: &HeaderMap) -> Result<Caller, Response> {
    match caller(core, headers).await {
        Some(c @ (Caller::Admin | Caller::Agent { admin: true, .. })) => Ok(c),
        Some(_) => Err(forbidden("admins only")),
        None => Err(unauthorized()),
    }
}

async fn visitor(core: &Core, headers: &HeaderMap) -> Result<String, Response> {
    match caller(core, headers).await {
        Some(Caller::Visitor(id)) => Ok(id),
        Some(_) => Err(forbidden("a visitor token is required")),
        None => Err(unauthorized()),
    }
}

fn answer(result: Result<Value, SupportError>) -> Response {
    match result {
        Ok(v) => json_body(&v),
        Err(e) => support_error(e),
    }
}

fn support_error(e: SupportError) -> Response {
    let http = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let status = match &e {
        SupportError::NotFound(_) => Status::NotFound,
        SupportError::Invalid(_) => Status::BadRequest,
        SupportError::Forbidden(_) => Status::Forbidden,
        SupportError::Store(_) => Status::Retryable,
    };
    error_reply(http, status, e)
}

/// A JSON body, with a clear 400 when it is not the expected shape.
#[allow(clippy::result_large_err)] // the error is the handler's answer, built once per bad request
fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(bytes).map_err(|e| error_reply(StatusCode::BAD_REQUEST, Status::BadRequest, format!("body: {e}")))
}

/// An inbox without its secrets, for agents.
fn public_inbox(i: &model::Inbox) -> Value {
    json!({ "id": i.id, "name": i.name, "website_token": i.website_token, "hmac_required": i.hmac_required,
            "greeting": i.greeting, "away_message": i.away_message, "csat": i.csat, "hours": i.hours, "agents": i.agents })
}

async fn create_inbox(State(core): State<Arc<Core>>, headers: HeaderMap, bytes: axum::body::Bytes) -> Response {
    if let Err(r) = admin(&core, &headers).await {
        return r;
    }
    let new = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match support::create_inbox(&core, new).await {
        Ok(inbox) => (StatusCode::CREATED, Json(inbox)).into_response(),
        Err(e) => support_error(e),
    }
}

async fn list_inboxes(State(core): State<Arc<Core>>, headers: HeaderMap) -> Response {
    let caller = match staff(&core, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let full = matches!(caller, Caller::Admin | Caller::Agent { admin: true, .. });
    answer(support::inboxes(&core).await.map(|all| {
        let open = all.iter().map(|i| if full { serde_json::to_value(i).unwrap_or_default() } else { public_inbox(i) });
        json!({ "inboxes": open.collect::<Vec<_>>() })
    }))
}

async fn get_inbox(State(core): State<Arc<Core>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let caller = match staff(&core, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let full = matches!(caller, Caller::Admin | Caller::Agent { admin: true, .. });
    answer(support::inbox(&core, &id).await.map(|i| if full { serde_json::to_value(&i).unwrap_or_default() } else { public_inbox(&i) }))
}

async fn patch_inbox(State(core): State<Arc<Core>>, headers: HeaderMap, Path(id): Path<String>, bytes: axum::body::Bytes) -> Response {
    if let Err(r) = admin(&core, &headers).await {
        return r;
    }
    let patch = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    answer(support::patch_inbox(&core, &id, patch).await.map(|i| serde_json::to_value(i).unwrap_or_default()))
}

async fn list_teams(State(core): State<Arc<Core>>, headers: HeaderMap) -> Response {
    if let Err(r) = staff(&core, &headers).await {
        return r;
    }
    answer(support::teams(&core).await.map(|t| json!({ "teams": t })))
}

async fn list_agents(State(core): State<Arc<Core>>, headers: HeaderMap) -> Response {
    if let Err(r) = staff(&core, &headers).await {
        return r;
    }
    answer(support::agents(&core).await.map(|a| json!({ "agents": a })))
}

/// An admin sets anything; an agent only their own status.
async fn put_agent(State(core): State<Arc<Core>>, headers: HeaderMap, Path(id): Path<String>, bytes: axum::body::Bytes) -> Response {
    let caller = match staff(&core, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let patch: support::AgentPatch = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if let Caller::Agent { id: me, admin: false } = &caller {
        if *me != id || patch.limit.is_some() || patch.teams.is_some() {
            return forbidden("an agent may change only their own status");
        }
    }
    answer(support::set_agent(&core, &id, patch).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConversationFilter {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    inbox: Option<String>,
    #[serde(default)]
    assignee: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn list_conversations(State(core): State<Arc<Core>>, headers: HeaderMap, Query(f): Query<ConversationFilter>) -> Response {
    let caller = match staff(&core, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let status = match f.status.as_deref() {
        None | Some("" | "all") => None,
        Some(s) => match model::Status::ALL.iter().find(|x| x.name() == s) {
            Some(s) => Some(*s),
            None => return error_reply(StatusCode::BAD_REQUEST, Status::BadRequest, format!("status {s:?}")),
        },
    };
    let assignee = match f.assignee.as_deref() {
        Some("me") => Some(caller.name().to_string()),
        other => other.map(str::to_string),
    };
    let limit = f.limit.unwrap_or(200).clamp(1, 1000);
    answer(
        support::conversations(&core, status, f.inbox.as_deref(), assignee.as_deref(), limit).await.map(|c| json!({ "conversations": c })),
    )
}

async fn get_conversation(State(core): State<Arc<Core>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(r) = staff(&core, &headers).await {
        return r;
    }
    answer(support::conversation(&core, &id).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignTo {
    agent: String,
}

async fn assign(State(core): State<Arc<Core>>, headers: HeaderMap, Path(id): Path<String>, bytes: axum::body::Bytes) -> Response {
    let caller = match admin(&core, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let to: AssignTo = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    answer(support::assign(&core, &id, caller.name(), &to.agent).await)
}

async fn transfer(State(core): State<Arc<Core>>, headers: HeaderMap, Path(id): Path<String>, bytes: axum::body::Bytes) -> Response {
    let caller = match staff(&core, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let to = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    answer(support::transfer(&core, &id, caller.name(), to).await)
}

async fn resolve(State(core): State<Arc<Core>>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let caller = match staff(&core, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    answer(support::resolve(&core, &id, caller.name()).await)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SnoozeUntil {
    #[serde(default)]
    until: Option<i64>,
}

async fn snooze(State(core): State<Arc<Core>>, headers: HeaderMap, Path(id): Path<String>, bytes: axum::body::Bytes) -> Response {
    let caller = match staff(&core, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let until: SnoozeUntil = if bytes.is_empty() {
        SnoozeUntil::default()
    } else {
        match body(&bytes) {
            Ok(b) => b,
            Err(r) => return r,
        }
    };
    answer(support::snooze(&core, &id, caller.name(), until.until).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoteText {
    text: String,
}

async fn note(State(core): State<Arc<Core>>, headers: HeaderMap, Path(id): Path<String>, bytes: axum::body::Bytes) -> Response {
    let caller = match staff(&core, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let n: NoteText = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    match support::note(&core, &id, caller.name(), &n.text).await {
        Ok(e) => (StatusCode::CREATED, Json(e)).into_response(),
        Err(e) => support_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Labels {
    labels: Vec<String>,
}

async fn labels(State(core): State<Arc<Core>>, headers: HeaderMap, Path(id): Path<String>, bytes: axum::body::Bytes) -> Response {
    if let Err(r) = staff(&core, &headers).await {
        return r;
    }
    let l: Labels = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    answer(support::set_labels(&core, &id, l.labels).await)
}

async fn widget_session(State(core): State<Arc<Core>>, bytes: axum::body::Bytes) -> Response {
    let start = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    answer(support::widget_session(&core, start).await)
}

async fn widget_conversation(State(core): State<Arc<Core>>, headers: HeaderMap) -> Response {
    let me = match visitor(&core, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    answer(support::visitor_conversation(&core, &me).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rating {
    rating: u8,
    #[serde(default)]
    comment: Option<String>,
}

async fn widget_csat(State(core): State<Arc<Core>>, headers: HeaderMap, bytes: axum::body::Bytes) -> Response {
    let me = match visitor(&core, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let r: Rating = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    if r.comment.as_ref().is_some_and(|c| c.len() > 2000) {
        return error_reply(StatusCode::BAD_REQUEST, Status::BadRequest, "comment: at most 2,000 characters");
    }
    answer(support::rate(&core, &me, r.rating, r.comment).await.map(|c| json!({ "rated": c["csat"].is_object() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OfflineForm {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    email: Option<String>,
    message: String,
}

async fn widget_offline(State(core): State<Arc<Core>>, headers: HeaderMap, bytes: axum::body::Bytes) -> Response {
    let me = match visitor(&core, &headers).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let f: OfflineForm = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    answer(support::offline_message(&core, &me, f.name, f.email, &f.message).await)
}

async fn list_canned(State(core): State<Arc<Core>>, headers: HeaderMap) -> Response {
    if let Err(r) = staff(&core, &headers).await {
        return r;
    }
    answer(support::canned(&core).await.map(|c| json!({ "canned": c })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CannedText {
    text: String,
}

async fn put_canned(State(core): State<Arc<Core>>, headers: HeaderMap, Path(code): Path<String>, bytes: axum::body::Bytes) -> Response {
    if let Err(r) = admin(&core, &headers).await {
        return r;
    }
    let t: CannedText = match body(&bytes) {
        Ok(b) => b,
        Err(r) => return r,
    };
    answer(support::set_canned(&core, &code, Some(t.text)).await)
}

async fn delete_canned(State(core): State<Arc<Core>>, headers: HeaderMap, Path(code): Path<String>) -> Response {
    if let Err(r) = admin(&core, &headers).await {
        return r;
    }
    answer(support::set_canned(&core, &code, None).await)
}

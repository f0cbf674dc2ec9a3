//! The admin port: `/healthz` (the process answers), `/readyz` (accepting clients) and
//! `/metrics` (Prometheus text). Never exposed publicly.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::dispatch::Core;

/// The admin router.
pub fn router(core: Arc<Core>) -> Router {
    Router::new().route("/healthz", get(|| async { "ok\n" })).route("/readyz", get(readyz)).route("/metrics", get(metrics)).with_state(core)
}

async fn readyz(State(core): State<Arc<Core>>) -> impl IntoResponse {
    // A stopping node still commits what its sessions already sent, but takes no new clients.
    if core.may_sequence() && !core.hub.is_draining() {
        (StatusCode::OK, "ready\n")
    } else if core.mesh.as_ref().is_some_and(|m| !m.agrees()) {
        (StatusCode::SERVICE_UNAVAILABLE, "a peer has another node list\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n")
    }
}

async fn metrics(State(core): State<Arc<Core>>) -> impl IntoResponse {
    let mut text = core.metrics.render();
    // The certificate clients may pin (the edge router passes it on in /v1/connect).
    text.push_str(&format!(
        "# HELP kefu_tls_fingerprint_info SHA-256 fingerprint of the TLS certificate served.\n# TYPE kefu_tls_fingerprint_info gauge\nkefu_tls_fingerprint_info{{sha256=\"{}\"}} 1\n",
        core.certs.fingerprint()
    ));
    text.push_str(&format!(
        "# HELP kefu_sqlite_memory_bytes Memory SQLite holds (page caches, statements), given back after {}s idle.\n# TYPE kefu_sqlite_memory_bytes gauge\nkefu_sqlite_memory_bytes {}\n",
        crate::store::IDLE_SHRINK.as_secs(),
        crate::store::sqlite_memory_used()
    ));
    if let Some(mesh) = &core.mesh {
        text.push_str(&mesh.render_metrics());
        // What peers compare their applied revision of this node with.
        text.push_str(&format!(
            "# HELP kefu_store_head_revision Newest revision written here.\n# TYPE kefu_store_head_revision gauge\nkefu_store_head_revision {}\n",
            core.store.head()
        ));
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

//! HTTP/3 on the QUIC port (ALPN `h3`): each request goes through the same router as HTTP/1.1
//! and HTTP/2 (the J-IM API, `/v1`, the pages). Bodies are collected up to the HTTP body limit.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http_body_util::BodyExt;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::dispatch::Core;

/// Largest request body accepted over HTTP/3 (as over HTTP/1.1).
const MAX_BODY: usize = schema::frame::MAX_BODY;

/// Serves the requests of one HTTP/3 connection.
pub async fn serve(core: Arc<Core>, conn: quinn::Connection, tasks: TaskTracker) {
    let peer = conn.remote_address();
    let built = h3::server::builder()
        .enable_webtransport(true)
        .enable_extended_connect(true)
        .enable_datagram(true)
        .max_webtransport_sessions(1)
        .send_grease(true)
        .build::<_, Bytes>(h3_quinn::Connection::new(conn))
        .await;
    let mut h3 = match built {
        Ok(h3) => h3,
        Err(e) => return tracing::debug!(error = %e, %peer, "h3 setup failed"),
    };
    let router = super::http::router(Arc::clone(&core));
    loop {
        let resolver = match h3.accept().await {
            Ok(Some(resolver)) => resolver,
            Ok(None) => return,
            Err(e) => return tracing::debug!(error = %e, %peer, "h3 connection ended"),
        };
        let Ok((req, stream)) = resolver.resolve_request().await else { continue };
        let webtransport = req.method() == http::Method::CONNECT
            && req.extensions().get::<h3::ext::Protocol>() == Some(&h3::ext::Protocol::WEB_TRANSPORT)
            && req.uri().path() == super::webtransport::PATH;
        if webtransport {
            // The session takes the connection over: one WebTransport session per connection.
            let query =
                axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(req.uri()).map(|q| q.0).unwrap_or_default();
            match h3_webtransport::server::WebTransportSession::accept(req, stream, h3).await {
                Ok(session) => super::webtransport::serve(core, session, query, peer).await,
                Err(e) => tracing::debug!(error = %e, %peer, "webtransport session refused"),
            }
            return;
        }
        let router = router.clone();
        tasks.spawn(async move {
            if let Err(e) = request(router, req, stream, peer).await {
                tracing::debug!(error = %e, %peer, "h3 request failed");
            }
        });
    }
}

async fn request<S>(
    router: axum::Router,
    req: http::Request<()>,
    mut stream: h3::server::RequestStream<S, Bytes>,
    peer: SocketAddr,
) -> anyhow::Result<()>
where
    S: h3::quic::BidiStream<Bytes>,
{
    let mut body = BytesMut::new();
    while let Some(mut chunk) = stream.recv_data().await? {
        if body.len() + chunk.remaining() > MAX_BODY {
            stream.send_response(http::Response::builder().status(http::StatusCode::PAYLOAD_TOO_LARGE).body(())?).await?;
            stream.finish().await?;
            return Ok(());
        }
        body.extend_from_slice(&chunk.copy_to_bytes(chunk.remaining()));
    }
    let (parts, ()) = req.into_parts();
    let mut req = http::Request::from_parts(parts, Body::from(body.freeze()));
    req.extensions_mut().insert(super::http::Peer(peer));
    let response = router.oneshot(req).await.unwrap_or_else(|never| match never {});
    let (parts, body) = response.into_parts();
    stream.send_response(http::Response::from_parts(parts, ())).await?;
    let bytes = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
    if !bytes.is_empty() {
        stream.send_data(bytes).await?;
    }
    stream.finish().await?;
    Ok(())
}

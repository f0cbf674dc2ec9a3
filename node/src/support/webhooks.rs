//! Webhooks: each customer-service event goes, as JSON, to every URL of its inbox, signed with the
//! inbox's webhook secret: `X-Kefu-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." +
//! body)>`, `X-Kefu-Timestamp` (epoch seconds, the moment of this attempt), `X-Kefu-Delivery`
//! (the same on every attempt of one delivery). Deliveries wait in the store's outbox until the
//! receiver answers 2xx, retried with exponential backoff, so each is made at least once, across
//! restarts. Owns the delivery task; the outbox rows belong to the store's writer.

use std::time::Duration;

use serde_json::{json, Value};

use super::model::Inbox;
use crate::dispatch::Core;
use crate::store::{now_ms, LocalOp, OutboxRow};

/// Deliveries tried at once.
const BATCH: u32 = 32;
/// A receiver that does not answer within this is a failed attempt.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(600);
/// How often the outbox is looked at without a new event.
const POLL: Duration = Duration::from_secs(1);

/// The signature header's value for `body` sent at `timestamp` (epoch seconds).
pub fn signature(secret: &str, timestamp: i64, body: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = match Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    format!("sha256={}", super::model::hex(&mac.finalize().into_bytes()))
}

/// How long to wait after the `attempts`-th failure: 1 s, 2 s, 4 s … up to 10 minutes.
pub fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(20);
    Duration::from_secs(1u64 << exp).min(MAX_BACKOFF)
}

/// Queues `event` for every webhook URL of `inbox`. With a `key`, the delivery id is derived from
/// it and the URL, so queueing the same event again (a message handled twice after a crash) is
/// kept once. Failures are logged: an event the store could not queue is lost to the webhook,
/// never to the conversation.
pub async fn emit(core: &Core, inbox: &Inbox, event: &str, data: Value, key: Option<&str>) {
    if inbox.webhooks.is_empty() {
        return;
    }
    let now = now_ms();
    let rows: Vec<OutboxRow> = inbox
        .webhooks
        .iter()
        .map(|url| {
            let id = match key {
                Some(k) => super::model::sha256_hex(&format!("{k}\n{url}"))[..32].to_string(),
                None => uuid::Uuid::now_v7().to_string(),
            };
            let body = json!({ "event": event, "delivery": id, "inbox": inbox.id, "at": now, "data": data }).to_string();
            OutboxRow { id, inbox: inbox.id.clone(), url: url.clone(), body, attempts: 0, next_at: now }
        })
        .collect();
    match core.store.local(LocalOp::Add(rows)).await {
        Ok(_) => core.support.webhooks.notify_one(),
        Err(e) => tracing::warn!(error = %e, event, "queueing a webhook failed"),
    }
}

/// Delivers what is due until shutdown.
pub async fn run(core: std::sync::Arc<Core>, shutdown: tokio_util::sync::CancellationToken) {
    let client = match reqwest::Client::builder().timeout(TIMEOUT).redirect(reqwest::redirect::Policy::none()).build() {
        Ok(c) => c,
        Err(e) => return tracing::error!(error = %e, "no HTTP client for webhooks"),
    };
    loop {
        let due = match core.store.outbox_due(now_ms(), BATCH).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(error = %e, "reading the webhook outbox failed");
                Vec::new()
            }
        };
        let full = due.len() == BATCH as usize;
        let attempts = due.into_iter().map(|row| deliver(&core, &client, row));
        futures_util::future::join_all(attempts).await;
        if full {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = core.support.webhooks.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn deliver(core: &Core, client: &reqwest::Client, row: OutboxRow) {
    let secret = match super::inbox(core, &row.inbox).await {
        Ok(inbox) => inbox.webhook_secret,
        // The inbox is gone here (or not replicated yet): try again later.
        Err(_) => String::new(),
    };
    let ok = !secret.is_empty() && {
        let ts = now_ms() / 1000;
        let sent = client
            .post(&row.url)
            .header("content-type", "application/json")
            .header("x-kefu-signature", signature(&secret, ts, &row.body))
            .header("x-kefu-timestamp", ts.to_string())
            .header("x-kefu-delivery", &row.id)
            .body(row.body.clone())
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => true,
            Ok(r) => {
                tracing::info!(url = %row.url, status = r.status().as_u16(), attempts = row.attempts + 1, "webhook refused; will retry");
                false
            }
            Err(e) => {
                tracing::info!(url = %row.url, error = %e, attempts = row.attempts + 1, "webhook failed; will retry");
                false
            }
        }
    };
    let op = if ok {
        LocalOp::Done(row.id)
    } else {
        let attempts = row.attempts.saturating_add(1);
        let wait = i64::try_from(backoff(attempts).as_millis()).unwrap_or(i64::MAX);
        LocalOp::Retry { id: row.id, attempts, next_at: now_ms().saturating_add(wait) }
    };
    if let Err(e) = core.store.local(op).await {
        tracing::warn!(error = %e, "updating the webhook outbox failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_covers_timestamp_and_body() {
        let a = signature("s3cret", 1_700_000_000, r#"{"event":"x"}"#);
        assert!(a.starts_with("sha256=") && a.len() == 7 + 64, "{a}");
        assert_ne!(a, signature("s3cret", 1_700_000_001, r#"{"event":"x"}"#));
        assert_ne!(a, signature("s3cret", 1_700_000_000, r#"{"event":"y"}"#));
        assert_ne!(a, signature("other", 1_700_000_000, r#"{"event":"x"}"#));
        // Pinned: what a receiver computes with any HMAC library.
        assert_eq!(
            signature("whsec", 1_700_000_000, r#"{"event":"x"}"#),
            "sha256=84da94eb7ba592f37db15d3d593d9ca72576fb27dbd519ff98dd8685441561de"
        );
    }

    #[test]
    fn backoff_doubles_up_to_ten_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}

//! Gives memory back to the operating system after connections close. glibc keeps what a
//! process frees in its per-thread arenas; after 10,000 connections have come and gone the node
//! held all of their memory (11 MiB before, 72 MiB after they had all closed). A periodic check
//! asks glibc to return the free pages once enough connections have closed since the last time.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// How often the connection count is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// Connections closed (below the highest count since the last trim) that make a trim worth its
/// cost: it walks every arena, a few milliseconds on a blocking thread.
const CLOSED_FOR_TRIM: i64 = 256;

/// Whether to trim: enough connections closed below the most that were open since the last
/// trim.
fn should_trim(peak: i64, open: i64) -> bool {
    peak - open >= CLOSED_FOR_TRIM
}

/// Runs until `shutdown`.
pub async fn trim_loop(metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let open = metrics.open_connections_total();
        if should_trim(metrics.peak_connections(), open) {
            metrics.reset_peak_connections(open);
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
        }
    }
}

/// Returns the free pages of every glibc arena to the system.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // malloc_trim has no preconditions: it only releases memory that is free.
        #[allow(unsafe_code)]
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(released = released != 0, "returned free memory to the system");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trim_follows_enough_closed_connections_below_the_peak() {
        assert!(!should_trim(0, 0));
        assert!(!should_trim(5_000, 4_800));
        assert!(should_trim(5_000, 4_744));
        assert!(should_trim(10_000, 0));
    }

    #[test]
    fn the_peak_follows_opened_connections_and_starts_over_from_a_reset() {
        let metrics = Metrics::default();
        let gauges: Vec<_> = (0..300).map(|_| metrics.connection(crate::metrics::Transport::Tcp)).collect();
        assert_eq!(metrics.peak_connections(), 300);
        drop(gauges);
        assert_eq!(metrics.open_connections_total(), 0);
        assert!(should_trim(metrics.peak_connections(), 0));
        metrics.reset_peak_connections(0);
        assert!(!should_trim(metrics.peak_connections(), metrics.open_connections_total()));
    }
}

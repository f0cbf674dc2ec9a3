//! Limits that hold for every request: token buckets (per connection, and per client IP or API
//! key on the HTTP API) and the per-IP cap on concurrent connections.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket: `rate` per second, up to `burst` saved.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket { tokens: f64::from(burst), rate: f64::from(rate), burst: f64::from(burst), last: Instant::now() }
    }

    /// Takes one token if there is one at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One bucket per key (a client IP, an API key), forgotten once full again and idle.
pub struct KeyedBuckets<K> {
    rate: u32,
    burst: u32,
    buckets: Mutex<HashMap<K, TokenBucket>>,
}

/// Keys kept before idle ones are swept.
const SWEEP_AT: usize = 100_000;

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    /// `rate` per second per key with a burst of twice that; a rate of 0 allows everything.
    pub fn new(rate: u32) -> KeyedBuckets<K> {
        KeyedBuckets { rate, burst: rate.saturating_mul(2).max(1), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token from `key`'s bucket.
    pub fn take(&self, key: &K, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= SWEEP_AT {
            // A bucket idle for the time it takes to refill is as good as a new one.
            let refill = Duration::from_secs_f64(f64::from(self.burst) / f64::from(self.rate));
            buckets.retain(|_, b| now.saturating_duration_since(b.last) < refill);
        }
        buckets.entry(key.clone()).or_insert_with(|| TokenBucket::new(self.rate, self.burst)).take(now)
    }
}

/// Concurrent connections per client IP.
pub struct ConnLimit {
    max: usize,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

/// Held while a connection is open; gives its place back when dropped.
pub struct ConnSlot {
    ip: IpAddr,
    open: Option<Arc<Mutex<HashMap<IpAddr, usize>>>>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            let mut open = open.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = open.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&self.ip);
                }
            }
        }
    }
}

impl ConnLimit {
    /// At most `max` at once from one IP; 0: no limit.
    pub fn new(max: usize) -> ConnLimit {
        ConnLimit { max, open: Arc::new(Mutex::new(HashMap::new())) }
    }

    /// A place for a new connection from `ip`, or `None` when it has `max` open already.
    pub fn admit(&self, ip: IpAddr) -> Option<ConnSlot> {
        if self.max == 0 {
            return Some(ConnSlot { ip, open: None });
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnSlot { ip, open: Some(Arc::clone(&self.open)) })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn buckets_refill_at_their_rate_per_key() {
        let buckets = KeyedBuckets::new(2);
        let (a, b) = ("a".to_string(), "b".to_string());
        let t0 = Instant::now();
        assert!((0..4).all(|_| buckets.take(&a, t0)), "a burst of twice the rate");
        assert!(!buckets.take(&a, t0));
        assert!(buckets.take(&b, t0), "another key has its own");
        assert!(buckets.take(&a, t0 + Duration::from_millis(600)), "refilled at 2 per second");
        assert!(KeyedBuckets::new(0).take(&a, t0), "0: no limit");
    }

    #[test]
    fn connections_per_ip_are_capped_and_given_back() {
        let limit = ConnLimit::new(2);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let first = limit.admit(ip).unwrap();
        let _second = limit.admit(ip).unwrap();
        assert!(limit.admit(ip).is_none());
        assert!(limit.admit([10, 0, 0, 2].into()).is_some(), "another address");
        drop(first);
        assert!(limit.admit(ip).is_some(), "a closed connection's place is free again");
    }
}

//! Credentials: argon2id password hashes, signed expiring login tokens, and the per-IP failed
//! login throttle. Owns the token key (a file in the data dir) and the throttle table. Never logs a
//! password, a hash or a token.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use argon2::password_hash::{rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Cost of new argon2id hashes. Checking a password uses the cost recorded in its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashCost {
    /// Memory, KiB.
    pub memory_kib: u32,
    /// Passes.
    pub passes: u32,
}

impl Default for HashCost {
    /// OWASP's first argon2id recommendation (and the argon2 crate's default): 19 MiB, 2 passes.
    fn default() -> HashCost {
        HashCost { memory_kib: 19 * 1024, passes: 2 }
    }
}

/// Hashes a password with argon2id. CPU-heavy: call from a blocking thread.
pub fn hash_password(password: &str, cost: HashCost) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    let params = argon2::Params::new(cost.memory_kib, cost.passes, 1, None).map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params)
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))
}

/// Checks a password against a stored hash. CPU-heavy: call from a blocking thread.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok())
}

/// Issues and checks tokens of the form `v1.<user id, base64url>.<expiry, unix seconds>.<HMAC>`.
pub struct Tokens {
    key: Vec<u8>,
    ttl: Duration,
}

impl Tokens {
    /// Loads the key from `dir/token.key`, creating it (32 random bytes) on first start.
    pub fn load_or_create(dir: &Path, ttl: Duration) -> anyhow::Result<Tokens> {
        let path = dir.join("token.key");
        let key = match std::fs::read(&path) {
            Ok(key) if key.len() >= 32 => key,
            _ => {
                let key: [u8; 32] = rand::random();
                std::fs::write(&path, key)?;
                key.to_vec()
            }
        };
        Ok(Tokens { key, ttl })
    }

    /// A token for `user`, valid for the configured lifetime from `now`.
    pub fn issue(&self, user: &str, now: SystemTime) -> String {
        let expires = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() + self.ttl.as_secs();
        let payload = format!("v1.{}.{expires}", URL_SAFE_NO_PAD.encode(user));
        let sig = URL_SAFE_NO_PAD.encode(self.sign(&payload));
        format!("{payload}.{sig}")
    }

    /// The user a token names, if its signature holds and it has not expired at `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Option<String> {
        let (payload, sig) = token.rsplit_once('.')?;
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        let mut mac = HmacSha256::new_from_slice(&self.key).ok()?;
        mac.update(payload.as_bytes());
        mac.verify_slice(&sig).ok()?;
        let mut parts = payload.split('.');
        let (Some("v1"), Some(user), Some(expires), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return None;
        };
        let expires: u64 = expires.parse().ok()?;
        if now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() >= expires {
            return None;
        }
        String::from_utf8(URL_SAFE_NO_PAD.decode(user).ok()?).ok()
    }

    fn sign(&self, payload: &str) -> Vec<u8> {
        // HMAC accepts keys of any length.
        let mut mac = HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!());
        mac.update(payload.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

/// Counts failed logins per client IP in one-minute windows.
pub struct LoginThrottle {
    limit: u32,
    window: Duration,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl LoginThrottle {
    /// At most `limit` failures per IP per minute; 0 turns the throttle off.
    pub fn new(limit: u32) -> LoginThrottle {
        LoginThrottle { limit, window: Duration::from_secs(60), failures: Mutex::new(HashMap::new()) }
    }

    /// Whether `ip` may try to log in at `now`.
    pub fn allows(&self, ip: IpAddr, now: Instant) -> bool {
        if self.limit == 0 {
            return true;
        }
        let table = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match table.get(&ip) {
            Some((start, count)) => now.duration_since(*start) >= self.window || *count < self.limit,
            None => true,
        }
    }

    /// Records a failed attempt from `ip`.
    pub fn failed(&self, ip: IpAddr, now: Instant) {
        if self.limit == 0 {
            return;
        }
        let mut table = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() > 100_000 {
            let window = self.window;
            table.retain(|_, (start, _)| now.duration_since(*start) < window);
        }
        let entry = table.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= self.window {
            *entry = (now, 0);
        }
        entry.1 += 1;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_expire_and_resist_forgery() {
        let dir = std::env::temp_dir().join(format!("kefu-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tokens = Tokens::load_or_create(&dir, Duration::from_secs(60)).unwrap();
        let now = SystemTime::now();
        let token = tokens.issue("ann", now);
        assert_eq!(tokens.verify(&token, now).as_deref(), Some("ann"));
        assert_eq!(tokens.verify(&token, now + Duration::from_secs(61)), None, "expired");
        let forged = token.replacen(&URL_SAFE_NO_PAD.encode("ann"), &URL_SAFE_NO_PAD.encode("bob"), 1);
        assert_eq!(tokens.verify(&forged, now), None, "payload changed");
        assert_eq!(tokens.verify("garbage", now), None);
        let again = Tokens::load_or_create(&dir, Duration::from_secs(60)).unwrap();
        assert_eq!(again.verify(&token, now).as_deref(), Some("ann"), "key survives a restart");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn passwords_hash_and_verify() {
        let hash = hash_password("s3cret", HashCost::default()).unwrap();
        assert!(hash.contains("m=19456,t=2"));
        let cheap = hash_password("s3cret", HashCost { memory_kib: 64, passes: 1 }).unwrap();
        assert!(verify_password("s3cret", &cheap));
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &hash));
        assert!(!verify_password("wrong", &hash));
        assert!(!verify_password("s3cret", "not a hash"));
    }

    #[test]
    fn throttle_counts_per_ip_per_window() {
        let throttle = LoginThrottle::new(2);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        let t0 = Instant::now();
        assert!(throttle.allows(ip, t0));
        throttle.failed(ip, t0);
        throttle.failed(ip, t0);
        assert!(!throttle.allows(ip, t0));
        assert!(throttle.allows(other, t0));
        assert!(throttle.allows(ip, t0 + Duration::from_secs(61)));
    }
}

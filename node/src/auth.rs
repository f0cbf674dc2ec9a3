//! Credentials: argon2id password hashes, signed expiring login tokens, and the per-IP failed
//! login throttle. Owns the token key (a file in the data dir) and the throttle table. Never logs a
//! password, a hash or a token.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use argon2::password_hash::{self, rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
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

/// Password hashing and checking on a fixed pool of threads, one per core, each reusing one
/// argon2 memory area between requests: a login storm costs a bounded queue and a bounded amount
/// of memory instead of a thread and 19 MiB per login (glibc keeps what freed-per-thread
/// allocations leave behind). A full queue answers [`PoolError::Busy`] at once.
pub struct PasswordPool {
    jobs: std::sync::mpsc::SyncSender<Job>,
    threads: usize,
}

enum Job {
    Verify { password: String, hash: String, reply: tokio::sync::oneshot::Sender<bool> },
    Hash { password: String, cost: HashCost, reply: tokio::sync::oneshot::Sender<anyhow::Result<String>> },
}

/// Why the pool did not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// Its queue is full: retry later.
    #[error("password hashing is busy")]
    Busy,
    /// The pool stopped (shutdown).
    #[error("password hashing stopped")]
    Stopped,
}

impl PasswordPool {
    /// `threads` workers (at least one) behind a queue of `queue` waiting requests.
    pub fn new(threads: usize, queue: usize) -> PasswordPool {
        let threads = threads.max(1);
        let (jobs, rx) = std::sync::mpsc::sync_channel::<Job>(queue);
        let rx = std::sync::Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = std::sync::Arc::clone(&rx);
            let spawned = std::thread::Builder::new().name(format!("kefu-argon2-{i}")).spawn(move || {
                lower_priority();
                let mut memory: Vec<argon2::Block> = Vec::new();
                loop {
                    // The lock is only held while waiting for the next job, never while hashing.
                    let job = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(job) => job,
                        Err(_) => return,
                    };
                    match job {
                        Job::Verify { password, hash, reply } => drop(reply.send(verify_with(&password, &hash, &mut memory))),
                        Job::Hash { password, cost, reply } => drop(reply.send(hash_with(&password, cost, &mut memory))),
                    }
                }
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "could not start a password hashing thread");
            }
        }
        PasswordPool { jobs, threads }
    }

    /// How many threads hash.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Checks `password` against a stored hash.
    pub async fn verify(&self, password: &str, hash: &str) -> Result<bool, PoolError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Job::Verify { password: password.to_string(), hash: hash.to_string(), reply })?;
        rx.await.map_err(|_| PoolError::Stopped)
    }

    /// A new argon2id hash of `password`.
    pub async fn hash(&self, password: &str, cost: HashCost) -> Result<anyhow::Result<String>, PoolError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.submit(Job::Hash { password: password.to_string(), cost, reply })?;
        rx.await.map_err(|_| PoolError::Stopped)
    }

    fn submit(&self, job: Job) -> Result<(), PoolError> {
        self.jobs.try_send(job).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => PoolError::Busy,
            std::sync::mpsc::TrySendError::Disconnected(_) => PoolError::Stopped,
        })
    }
}

/// Runs the calling thread at nice 10: a login storm then takes the CPU the chat traffic leaves
/// over, instead of half of it each (the scheduler gives a nice-0 thread about ten times the
/// share of a nice-10 one), and logins still use every idle core.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // gettid and setpriority on the calling thread have no memory-safety preconditions.
        #[allow(unsafe_code)]
        let rc = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10)
        };
        if rc != 0 {
            tracing::debug!("could not lower the password hashing thread's priority");
        }
    }
}

/// [`verify_password`] in `memory` (grown to the hash's cost, then kept).
fn verify_with(password: &str, hash: &str, memory: &mut Vec<argon2::Block>) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else { return false };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else { return false };
    let Ok(algorithm) = argon2::Algorithm::try_from(parsed.algorithm) else { return false };
    let Ok(params) = argon2::Params::try_from(&parsed) else { return false };
    let version = parsed.version.and_then(|v| argon2::Version::try_from(v).ok()).unwrap_or_default();
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else { return false };
    let mut out = vec![0u8; expected.len()];
    if memory.len() < params.block_count() {
        memory.resize(params.block_count(), argon2::Block::default());
    }
    let argon = Argon2::new(algorithm, version, params.clone());
    if argon.hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut memory[..params.block_count()]).is_err() {
        return false;
    }
    // Constant time: the comparison does not stop at the first differing byte.
    out.len() == expected.len() && out.iter().zip(expected.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// [`hash_password`] in `memory`.
fn hash_with(password: &str, cost: HashCost, memory: &mut Vec<argon2::Block>) -> anyhow::Result<String> {
    let params = argon2::Params::new(cost.memory_kib, cost.passes, 1, Some(32)).map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
    let salt = SaltString::generate(&mut OsRng);
    let mut salt_buf = [0u8; 64];
    let raw_salt = salt.decode_b64(&mut salt_buf).map_err(|e| anyhow::anyhow!("salt: {e}"))?;
    if memory.len() < params.block_count() {
        memory.resize(params.block_count(), argon2::Block::default());
    }
    let mut out = [0u8; 32];
    Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params.clone())
        .hash_password_into_with_memory(password.as_bytes(), raw_salt, &mut out, &mut memory[..params.block_count()])
        .map_err(|e| anyhow::anyhow!("hashing password: {e}"))?;
    let output = password_hash::Output::new(&out).map_err(|e| anyhow::anyhow!("hash output: {e}"))?;
    Ok(format!("$argon2id$v=19$m={},t={},p=1${}${output}", cost.memory_kib, cost.passes, salt.as_str()))
}

/// Successful password checks, remembered for the token lifetime so that a client reconnecting
/// with its password (J-IM clients send it on every connect) costs a MAC instead of an argon2
/// hash. An entry is an HMAC, under a secret made at start and never stored, of the user, the
/// password and the stored hash: never the password itself, and a password change (a new stored
/// hash) misses every entry of the old one.
pub struct LoginCache {
    secret: [u8; 32],
    ttl: Duration,
    entries: Mutex<HashMap<[u8; 32], Instant>>,
    limit: usize,
}

impl LoginCache {
    /// Entries live `ttl`; at most `limit` are kept (past it, expired ones go, then all).
    pub fn new(ttl: Duration, limit: usize) -> LoginCache {
        LoginCache { secret: rand::random(), ttl, entries: Mutex::new(HashMap::new()), limit }
    }

    fn key(&self, user: &str, password: &str, stored_hash: &str) -> [u8; 32] {
        let mut mac = HmacSha256::new_from_slice(&self.secret).unwrap_or_else(|_| unreachable!());
        // Lengths first, so that no two different triples feed the MAC the same bytes.
        for part in [user, password, stored_hash] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac.finalize().into_bytes().into()
    }

    /// Whether this password was checked against this stored hash within the lifetime.
    pub fn knows(&self, user: &str, password: &str, stored_hash: &str, now: Instant) -> bool {
        let key = self.key(user, password, stored_hash);
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).get(&key).is_some_and(|until| now < *until)
    }

    /// Remembers a successful check.
    pub fn remember(&self, user: &str, password: &str, stored_hash: &str, now: Instant) {
        let key = self.key(user, password, stored_hash);
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.limit {
            entries.retain(|_, until| now < *until);
            if entries.len() >= self.limit {
                entries.clear();
            }
        }
        entries.insert(key, now + self.ttl);
    }
}

/// Issues and checks tokens of the form
/// `v2.<user id, base64url>.<expiry, unix seconds>.<token epoch>.<HMAC-SHA256, base64url>`.
/// One key set for the whole cluster, so a token from any node works at every node. The first
/// key signs; every key verifies (rotation: add a new first key, remove the old one once the
/// tokens it signed have expired).
pub struct Tokens {
    keys: Vec<Vec<u8>>,
    ttl: Duration,
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    /// The user.
    pub user: String,
    /// The user's token epoch when it was issued: refused once the user's epoch is higher.
    pub epoch: u64,
}

/// Shortest token key accepted, in bytes.
pub const MIN_KEY_BYTES: usize = 32;

impl Tokens {
    /// Tokens signed with `keys` (the first signs), each at least [`MIN_KEY_BYTES`] long.
    pub fn new(keys: Vec<Vec<u8>>, ttl: Duration) -> anyhow::Result<Tokens> {
        anyhow::ensure!(!keys.is_empty(), "no token key");
        if let Some(short) = keys.iter().find(|k| k.len() < MIN_KEY_BYTES) {
            anyhow::bail!("a token key of {} bytes is too short (at least {MIN_KEY_BYTES})", short.len());
        }
        Ok(Tokens { keys, ttl })
    }

    /// Reads a key file (see [`parse_keys`]). A missing, unreadable, empty or short file is an
    /// error: it is never replaced, because every node of the cluster must hold the same keys.
    pub fn load(path: &Path, ttl: Duration) -> anyhow::Result<Tokens> {
        let bytes = std::fs::read(path).with_context(|| format!("reading the token key file {}", path.display()))?;
        let keys = parse_key_file(&bytes).with_context(|| format!("token key file {}", path.display()))?;
        Tokens::new(keys, ttl).with_context(|| format!("token key file {}", path.display()))
    }

    /// Reads the key file at `path`, making it first (one new key, mode 0600) if there is none.
    pub fn load_or_create(path: &Path, ttl: Duration) -> anyhow::Result<Tokens> {
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            crate::tls::create_private(path, new_key_line().as_bytes()).with_context(|| format!("writing {}", path.display()))?;
        }
        Tokens::load(path, ttl)
    }

    /// A token for `user` in token epoch `epoch`, valid for the configured lifetime from `now`.
    pub fn issue(&self, user: &str, epoch: u64, now: SystemTime) -> String {
        let expires = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() + self.ttl.as_secs();
        let payload = format!("v2.{}.{expires}.{epoch}", URL_SAFE_NO_PAD.encode(user));
        let sig = URL_SAFE_NO_PAD.encode(mac(&self.keys[0], &payload).finalize().into_bytes());
        format!("{payload}.{sig}")
    }

    /// What a token says, if one of the keys signed it and it has not expired at `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Option<TokenClaims> {
        let (payload, sig) = token.rsplit_once('.')?;
        let sig = URL_SAFE_NO_PAD.decode(sig).ok()?;
        if !self.keys.iter().any(|key| mac(key, payload).verify_slice(&sig).is_ok()) {
            return None;
        }
        let mut parts = payload.split('.');
        let (Some("v2"), Some(user), Some(expires), Some(epoch), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        let expires: u64 = expires.parse().ok()?;
        if now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() >= expires {
            return None;
        }
        let user = String::from_utf8(URL_SAFE_NO_PAD.decode(user).ok()?).ok()?;
        Some(TokenClaims { user, epoch: epoch.parse().ok()? })
    }
}

/// The token keys the configuration names (see [`crate::config::TokenKeys`]).
pub fn tokens_for(config: &crate::config::Config) -> anyhow::Result<Tokens> {
    use crate::config::{Profile, TokenKeys};
    let clustered = !config.peers.is_empty() || config.peers_dns.is_some();
    match &config.token_keys {
        TokenKeys::Given(text) => Tokens::new(parse_keys(text).context("--token-key / KEFU_TOKEN_KEY")?, config.token_ttl),
        TokenKeys::File(path) => Tokens::load(path, config.token_ttl),
        TokenKeys::Default if config.profile == Profile::Prod && clustered => anyhow::bail!(
            "the prod profile with peers needs one token key for the whole cluster: --token-key-file (make it with \
             `kefu-node token-key new FILE` and give every node the same file) or KEFU_TOKEN_KEY"
        ),
        TokenKeys::Default => {
            // Beside the cluster CA, which every dev node of one cluster shares.
            let dir = match &config.cluster_ca {
                Some(ca) => ca.parent().map(Path::to_path_buf).unwrap_or_default(),
                None if clustered => config.data_dir.join("mesh"),
                None => config.data_dir.clone(),
            };
            Tokens::load_or_create(&dir.join("token.key"), config.token_ttl)
        }
    }
}

fn mac(key: &[u8], payload: &str) -> HmacSha256 {
    // HMAC accepts keys of any length.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(payload.as_bytes());
    mac
}

/// A new random key as a key file line (64 hex digits and a newline).
pub fn new_key_line() -> String {
    let key: [u8; 32] = rand::random();
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}\n")
}

/// The keys in key-file text: one per line (or separated by commas, as an environment variable
/// holds them), each hex or base64; empty lines and `#` comments are skipped. Every key must be
/// at least [`MIN_KEY_BYTES`] long.
pub fn parse_keys(text: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut keys = Vec::new();
    for (i, item) in text.lines().flat_map(|l| l.split(',')).map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).enumerate() {
        let key = if item.len() % 2 == 0 && item.bytes().all(|b| b.is_ascii_hexdigit()) {
            (0..item.len()).step_by(2).map(|j| u8::from_str_radix(&item[j..j + 2], 16)).collect::<Result<Vec<u8>, _>>().ok()
        } else {
            let trimmed = item.trim_end_matches('=');
            URL_SAFE_NO_PAD.decode(trimmed).ok().or_else(|| base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed).ok())
        };
        let key = key.with_context(|| format!("key {} is neither hex nor base64", i + 1))?;
        anyhow::ensure!(key.len() >= MIN_KEY_BYTES, "key {} has {} bytes; at least {MIN_KEY_BYTES} are needed", i + 1, key.len());
        keys.push(key);
    }
    anyhow::ensure!(!keys.is_empty(), "no key in it");
    Ok(keys)
}

/// A key file's keys; a file from before key files were text (32 raw random bytes, as nodes
/// wrote `token.key` in their data dir) is read as that one key.
fn parse_key_file(bytes: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse_keys(text),
        Err(_) if bytes.len() >= MIN_KEY_BYTES => Ok(vec![bytes.to_vec()]),
        Err(_) => anyhow::bail!("{} bytes, neither key text nor a raw key of at least {MIN_KEY_BYTES} bytes", bytes.len()),
    }
}

/// Adds a new signing key in front of the file's keys (the old ones keep verifying).
pub fn rotate_key_file(path: &Path) -> anyhow::Result<()> {
    let old = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_keys(&old).with_context(|| format!("token key file {}", path.display()))?;
    crate::tls::write_private(path, format!("{}{old}", new_key_line()).as_bytes()).with_context(|| format!("writing {}", path.display()))
}

/// Keeps only the file's first (signing) key: tokens signed by the others stop working.
pub fn retire_old_keys(path: &Path) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let keys = parse_keys(&text).with_context(|| format!("token key file {}", path.display()))?;
    let first = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or_default();
    crate::tls::write_private(path, format!("{first}\n").as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(keys.len() - 1)
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

/// Whether two byte strings are equal, in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_expire_and_resist_forgery() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let tokens = Tokens::load_or_create(&path, Duration::from_secs(60)).unwrap();
        let now = SystemTime::now();
        let token = tokens.issue("ann", 3, now);
        assert_eq!(tokens.verify(&token, now), Some(TokenClaims { user: "ann".into(), epoch: 3 }));
        assert_eq!(tokens.verify(&token, now + Duration::from_secs(61)), None, "expired");
        let forged = token.replacen(&URL_SAFE_NO_PAD.encode("ann"), &URL_SAFE_NO_PAD.encode("bob"), 1);
        assert_eq!(tokens.verify(&forged, now), None, "payload changed");
        let older_epoch = token.replacen(".3.", ".2.", 1);
        assert_eq!(tokens.verify(&older_epoch, now), None, "epoch changed");
        assert_eq!(tokens.verify("garbage", now), None);
        let again = Tokens::load_or_create(&path, Duration::from_secs(60)).unwrap();
        assert!(again.verify(&token, now).is_some(), "the key file is read, not replaced");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    #[test]
    fn rotation_signs_with_the_new_key_and_verifies_with_both_until_retired() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token.key");
        let ttl = Duration::from_secs(60);
        let now = SystemTime::now();
        let old = Tokens::load_or_create(&path, ttl).unwrap().issue("ann", 0, now);
        rotate_key_file(&path).unwrap();
        let rotated = Tokens::load(&path, ttl).unwrap();
        let new = rotated.issue("ann", 0, now);
        assert!(rotated.verify(&old, now).is_some(), "the previous key still verifies");
        assert!(rotated.verify(&new, now).is_some());
        assert_eq!(retire_old_keys(&path).unwrap(), 1);
        let retired = Tokens::load(&path, ttl).unwrap();
        assert!(retired.verify(&old, now).is_none(), "the removed key no longer verifies");
        assert!(retired.verify(&new, now).is_some());
    }

    #[test]
    fn short_unreadable_or_garbled_key_files_are_errors_and_stay_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let ttl = Duration::from_secs(60);
        let path = dir.path().join("short.key");
        std::fs::write(&path, "abcd\n").unwrap();
        let err = Tokens::load_or_create(&path, ttl).err().unwrap();
        assert!(format!("{err:#}").contains("at least 32"), "{err:#}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "abcd\n", "never replaced");
        assert!(Tokens::load(&dir.path().join("missing.key"), ttl).is_err());
        std::fs::write(&path, "# only a comment\n").unwrap();
        assert!(Tokens::load(&path, ttl).is_err());
        std::fs::write(&path, "not-a-key!\n").unwrap();
        assert!(Tokens::load(&path, ttl).is_err());
        // Hex and base64 both read; an environment variable separates keys with commas.
        let hex = "11".repeat(32);
        let b64 = URL_SAFE_NO_PAD.encode([7u8; 32]);
        assert_eq!(parse_keys(&format!("{hex},{b64}")).unwrap(), vec![vec![0x11; 32], vec![7; 32]]);
        // A data dir's token.key from before key files were text: 32 raw bytes.
        std::fs::write(&path, [0xffu8; 32]).unwrap();
        assert!(Tokens::load(&path, ttl).is_ok());
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

    #[tokio::test]
    async fn the_pool_hashes_and_verifies_like_the_crate_and_says_busy_when_full() {
        let pool = PasswordPool::new(2, 8);
        let cost = HashCost { memory_kib: 256, passes: 1 };
        let ours = pool.hash("s3cret", cost).await.unwrap().unwrap();
        assert!(ours.starts_with("$argon2id$v=19$m=256,t=1,p=1$"), "{ours}");
        assert!(verify_password("s3cret", &ours), "the crate accepts the pool's hash");
        let theirs = hash_password("s3cret", cost).unwrap();
        assert!(pool.verify("s3cret", &theirs).await.unwrap(), "the pool accepts the crate's hash");
        assert!(!pool.verify("wrong", &theirs).await.unwrap());
        assert!(!pool.verify("s3cret", "not a hash").await.unwrap());
        // Memory grows to the largest cost seen and a smaller one still works in it.
        let big = hash_password("pw", HashCost { memory_kib: 1024, passes: 1 }).unwrap();
        assert!(pool.verify("pw", &big).await.unwrap());
        assert!(pool.verify("s3cret", &ours).await.unwrap());
        // A queue of one behind one thread: a burst gets Busy at once instead of waiting.
        let small = std::sync::Arc::new(PasswordPool::new(1, 1));
        let slow = hash_password("pw", HashCost { memory_kib: 8192, passes: 3 }).unwrap();
        let mut answers = Vec::new();
        for _ in 0..8 {
            let (pool, slow) = (std::sync::Arc::clone(&small), slow.clone());
            answers.push(tokio::spawn(async move { pool.verify("pw", &slow).await }));
        }
        let mut busy = 0;
        for a in answers {
            match a.await.unwrap() {
                Ok(ok) => assert!(ok),
                Err(e) => {
                    assert_eq!(e, PoolError::Busy);
                    busy += 1;
                }
            }
        }
        assert!(busy > 0, "a full queue answers busy");
    }

    #[test]
    fn the_login_cache_remembers_a_check_until_the_hash_changes_or_it_expires() {
        let cache = LoginCache::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        assert!(!cache.knows("ann", "pw", "$h1", t0));
        cache.remember("ann", "pw", "$h1", t0);
        assert!(cache.knows("ann", "pw", "$h1", t0));
        assert!(!cache.knows("ann", "other", "$h1", t0), "another password");
        assert!(!cache.knows("ann", "pw", "$h2", t0), "the password was changed");
        assert!(!cache.knows("bob", "pw", "$h1", t0), "another user");
        assert!(!cache.knows("ann", "pw", "$h1", t0 + Duration::from_secs(61)), "expired");
        // Over the limit it forgets, and never grows past it.
        for i in 0..10 {
            cache.remember(&format!("u{i}"), "pw", "$h", t0);
        }
        assert!(cache.entries.lock().unwrap().len() <= 3);
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

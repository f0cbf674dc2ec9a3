//! The `fly-replay` response header and the `fly-replay-src` request header, as Fly's proxy reads
//! and writes them (the first piece of the edge router, issue 11; nodes answer with it too).
//!
//! A node that wants a request served elsewhere answers with `fly-replay: region=fra;state=x`;
//! the proxy (Fly's, or `kefu-router` where there is none) sends the same request again to the
//! target and adds `fly-replay-src` saying where it came from. Fields are `;`-separated
//! `key=value` pairs; `region` takes a preference list (`region=fra,sin`, or quoted). No I/O.

use std::time::Duration;

/// Requests with larger bodies are not replayed (Fly's limit).
pub const MAX_REPLAY_BODY: usize = 1_000_000;

/// Where the proxy goes when the replay target cannot be reached in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Back to the machine that answered with the replay, else any machine of its app.
    PreferSelf,
    /// Back to exactly that machine, else an error.
    ForceSelf,
}

/// A parsed `fly-replay` header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replay {
    /// Regions to replay in, most preferred first (empty: any).
    pub regions: Vec<String>,
    /// The machine to replay to, and only it.
    pub instance: Option<String>,
    /// The machine to replay to when it can be reached, else any.
    pub prefer_instance: Option<String>,
    /// Another app of the organisation.
    pub app: Option<String>,
    /// Leave out the machine that answered when choosing the target.
    pub elsewhere: bool,
    /// Carried to the target in `fly-replay-src`.
    pub state: Option<String>,
    /// How long to try the target before giving up (or falling back).
    pub timeout: Option<Duration>,
    /// What to do when the target cannot be reached.
    pub fallback: Option<Fallback>,
}

/// Why a `fly-replay` header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// A field without `=`.
    #[error("fly-replay field {0:?} has no value")]
    NoValue(String),
    /// A field this parser does not know.
    #[error("unknown fly-replay field {0:?}")]
    UnknownField(String),
    /// A value that does not parse (a timeout, a fallback, a boolean).
    #[error("fly-replay field {field}: bad value {value:?}")]
    BadValue {
        /// The field.
        field: String,
        /// Its value.
        value: String,
    },
    /// Nothing to replay to.
    #[error("fly-replay names no target (region, instance, prefer_instance or app)")]
    NoTarget,
}

impl Replay {
    /// Parses a header value. Field names are matched without regard to case; values may be
    /// quoted.
    pub fn parse(header: &str) -> Result<Replay, ReplayError> {
        let mut r = Replay::default();
        for field in header.split(';').map(str::trim).filter(|f| !f.is_empty()) {
            let (key, value) = field.split_once('=').ok_or_else(|| ReplayError::NoValue(field.to_string()))?;
            let key = key.trim().to_ascii_lowercase();
            let value = unquote(value.trim());
            let bad = || ReplayError::BadValue { field: key.clone(), value: value.to_string() };
            match key.as_str() {
                "region" => r.regions = value.split(',').map(str::trim).filter(|v| !v.is_empty()).map(str::to_string).collect(),
                "instance" => r.instance = Some(value.to_string()),
                "prefer_instance" => r.prefer_instance = Some(value.to_string()),
                "app" => r.app = Some(value.to_string()),
                "state" => r.state = Some(value.to_string()),
                "elsewhere" => r.elsewhere = value.parse::<bool>().map_err(|_| bad())?,
                "timeout" => r.timeout = Some(parse_duration(value).ok_or_else(bad)?),
                "fallback" => {
                    r.fallback = Some(match value {
                        "prefer_self" => Fallback::PreferSelf,
                        "force_self" => Fallback::ForceSelf,
                        _ => return Err(bad()),
                    })
                }
                _ => return Err(ReplayError::UnknownField(key)),
            }
        }
        if r.regions.is_empty() && r.instance.is_none() && r.prefer_instance.is_none() && r.app.is_none() && !r.elsewhere {
            return Err(ReplayError::NoTarget);
        }
        Ok(r)
    }

    /// The header value, fields in a fixed order; `parse` reads it back to the same value.
    pub fn to_header(&self) -> String {
        let mut fields = Vec::new();
        if !self.regions.is_empty() {
            fields.push(format!("region={}", self.regions.join(",")));
        }
        for (key, value) in [("instance", &self.instance), ("prefer_instance", &self.prefer_instance), ("app", &self.app)] {
            if let Some(v) = value {
                fields.push(format!("{key}={v}"));
            }
        }
        if self.elsewhere {
            fields.push("elsewhere=true".to_string());
        }
        if let Some(state) = &self.state {
            fields.push(format!("state={state}"));
        }
        if let Some(t) = self.timeout {
            fields.push(format!("timeout={}ms", t.as_millis()));
        }
        if let Some(f) = self.fallback {
            fields.push(format!("fallback={}", if f == Fallback::PreferSelf { "prefer_self" } else { "force_self" }));
        }
        fields.join(";")
    }
}

/// The `fly-replay-src` header of a replayed request: the machine and region that asked for the
/// replay, when (µs since the epoch), and the state it passed on.
pub fn replay_src(instance: &str, region: &str, t_us: u64, state: Option<&str>) -> String {
    let mut out = format!("instance={instance};region={region};t={t_us}");
    if let Some(state) = state {
        out.push_str(";state=");
        out.push_str(state);
    }
    out
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v)
}

/// `800ms`, `2s`, `1.5s`, `1m`.
fn parse_duration(v: &str) -> Option<Duration> {
    let (number, unit) = v.find(|c: char| c.is_ascii_alphabetic()).map(|i| v.split_at(i))?;
    let n: f64 = number.parse().ok().filter(|n: &f64| n.is_finite() && *n >= 0.0)?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap: a panic is a failed test
mod tests {
    use super::*;

    #[test]
    fn every_field_reads_and_writes_back() {
        let r = Replay::parse("region=\"fra,sin\";prefer_instance=abc;elsewhere=true;state=w1;timeout=800ms;fallback=prefer_self").unwrap();
        assert_eq!(r.regions, ["fra", "sin"]);
        assert_eq!(r.prefer_instance.as_deref(), Some("abc"));
        assert!(r.elsewhere);
        assert_eq!(r.state.as_deref(), Some("w1"));
        assert_eq!(r.timeout, Some(Duration::from_millis(800)));
        assert_eq!(r.fallback, Some(Fallback::PreferSelf));
        assert_eq!(Replay::parse(&r.to_header()).unwrap(), r);
        let one = Replay::parse("instance=00bb33ff; timeout=2s; fallback=force_self").unwrap();
        assert_eq!(
            (one.instance.as_deref(), one.timeout, one.fallback),
            (Some("00bb33ff"), Some(Duration::from_secs(2)), Some(Fallback::ForceSelf))
        );
        assert_eq!(Replay::parse("REGION=iad").unwrap().regions, ["iad"]);
    }

    #[test]
    fn bad_headers_say_what_is_wrong() {
        assert_eq!(Replay::parse("region"), Err(ReplayError::NoValue("region".into())));
        assert_eq!(Replay::parse("colour=blue"), Err(ReplayError::UnknownField("colour".into())));
        assert!(matches!(Replay::parse("region=iad;timeout=soon"), Err(ReplayError::BadValue { .. })));
        assert!(matches!(Replay::parse("region=iad;fallback=elsewhere"), Err(ReplayError::BadValue { .. })));
        assert!(matches!(Replay::parse("region=iad;elsewhere=maybe"), Err(ReplayError::BadValue { .. })));
        assert_eq!(Replay::parse("state=x"), Err(ReplayError::NoTarget));
        assert_eq!(Replay::parse(""), Err(ReplayError::NoTarget));
    }

    #[test]
    fn the_source_header_names_machine_region_time_and_state() {
        assert_eq!(replay_src("m1", "iad", 1_700_000_000_000_000, Some("w1")), "instance=m1;region=iad;t=1700000000000000;state=w1");
        assert_eq!(replay_src("m1", "iad", 5, None), "instance=m1;region=iad;t=5");
    }
}

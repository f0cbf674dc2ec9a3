//! The `fly-replay` response header and the `fly-replay-src` request header, as Fly's proxy reads
//! and writes them (the first piece of the edge router, issue 11; nodes answer with it too).
//!
//! A node that wants a request served elsewhere answers with `fly-replay: region=fra;state=x`;
//! the proxy (Fly's, or `kefu-router` where there is none) sends the same request again to the
//! target and adds `fly-replay-src` saying where it came from. Fields are `;`-separated
//! `key=value` pairs; `region` takes a preference list (`region=fra,sin`, or quoted). The same
//! fields may come as a JSON body instead, with the content type [`JSON_CONTENT_TYPE`], which
//! also carries a [`Transform`] of the replayed request. No I/O.

use std::time::Duration;

/// Requests with larger bodies are not replayed (Fly's limit).
pub const MAX_REPLAY_BODY: usize = 1_000_000;

/// The content type of a response whose JSON body is the replay.
pub const JSON_CONTENT_TYPE: &str = "application/vnd.fly.replay+json";

/// Changes made to the request before it is replayed (JSON form only).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct Transform {
    /// A new path (and query) for the replayed request.
    pub path: Option<String>,
    /// Headers removed from it.
    pub delete_headers: Vec<String>,
    /// Headers set on it (replacing any of the same name).
    pub set_headers: Vec<SetHeader>,
}

/// One header of [`Transform::set_headers`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct SetHeader {
    /// Its name.
    pub name: String,
    /// Its value.
    pub value: String,
}

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
    /// Changes to the replayed request (JSON form only; the header form has none).
    pub transform: Transform,
}

/// The JSON form as it is written: the header's fields, `region` as a list or a comma-separated
/// string, `timeout` as a duration string. Fields Fly has and this proxy does not use (`cache`,
/// `allow_bypass`) are ignored.
#[derive(serde::Deserialize)]
struct JsonReplay {
    region: Option<Regions>,
    instance: Option<String>,
    prefer_instance: Option<String>,
    app: Option<String>,
    #[serde(default)]
    elsewhere: bool,
    state: Option<String>,
    timeout: Option<String>,
    fallback: Option<String>,
    #[serde(default)]
    transform: Transform,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Regions {
    One(String),
    Many(Vec<String>),
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
    /// A JSON replay body that is not an object of the known fields.
    #[error("fly-replay JSON body: {0}")]
    Json(String),
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
                "fallback" => r.fallback = Some(parse_fallback(value).ok_or_else(bad)?),
                _ => return Err(ReplayError::UnknownField(key)),
            }
        }
        r.checked()
    }

    /// Parses the JSON form (a response body of type [`JSON_CONTENT_TYPE`]).
    pub fn from_json(body: &[u8]) -> Result<Replay, ReplayError> {
        let j: JsonReplay = serde_json::from_slice(body).map_err(|e| ReplayError::Json(e.to_string()))?;
        let bad = |field: &str, value: &str| ReplayError::BadValue { field: field.to_string(), value: value.to_string() };
        let regions = match j.region {
            None => Vec::new(),
            Some(Regions::One(list)) => list.split(',').map(str::trim).filter(|v| !v.is_empty()).map(str::to_string).collect(),
            Some(Regions::Many(list)) => list.into_iter().map(|r| r.trim().to_string()).filter(|r| !r.is_empty()).collect(),
        };
        let timeout = match &j.timeout {
            None => None,
            Some(t) => Some(parse_duration(t).ok_or_else(|| bad("timeout", t))?),
        };
        let fallback = match &j.fallback {
            None => None,
            Some(f) => Some(parse_fallback(f).ok_or_else(|| bad("fallback", f))?),
        };
        Replay {
            regions,
            instance: j.instance,
            prefer_instance: j.prefer_instance,
            app: j.app,
            elsewhere: j.elsewhere,
            state: j.state,
            timeout,
            fallback,
            transform: j.transform,
        }
        .checked()
    }

    fn checked(self) -> Result<Replay, ReplayError> {
        if self.regions.is_empty() && self.instance.is_none() && self.prefer_instance.is_none() && self.app.is_none() && !self.elsewhere {
            return Err(ReplayError::NoTarget);
        }
        Ok(self)
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

fn parse_fallback(v: &str) -> Option<Fallback> {
    match v {
        "prefer_self" => Some(Fallback::PreferSelf),
        "force_self" => Some(Fallback::ForceSelf),
        _ => None,
    }
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
    fn the_json_form_reads_the_same_fields_and_a_transform() {
        let body = br#"{"region": "fra,sin", "state": "w1", "timeout": "5s", "fallback": "prefer_self", "cache": {"ttl": 1},
            "transform": {"path": "/v1/x?y=1", "delete_headers": ["cookie"], "set_headers": [{"name": "x-a", "value": "1"}]}}"#;
        let r = Replay::from_json(body).unwrap();
        assert_eq!(r.regions, ["fra", "sin"]);
        assert_eq!((r.state.as_deref(), r.timeout, r.fallback), (Some("w1"), Some(Duration::from_secs(5)), Some(Fallback::PreferSelf)));
        assert_eq!(r.transform.path.as_deref(), Some("/v1/x?y=1"));
        assert_eq!(r.transform.delete_headers, ["cookie"]);
        assert_eq!(r.transform.set_headers, [SetHeader { name: "x-a".into(), value: "1".into() }]);
        let listed = Replay::from_json(br#"{"region": ["iad", "ord"], "elsewhere": true}"#).unwrap();
        assert_eq!((listed.regions, listed.elsewhere), (vec!["iad".to_string(), "ord".to_string()], true));
        assert_eq!(Replay::from_json(br#"{"instance": "m1"}"#).unwrap().instance.as_deref(), Some("m1"));
        assert_eq!(Replay::from_json(br#"{"state": "x"}"#), Err(ReplayError::NoTarget));
        assert!(matches!(Replay::from_json(br#"{"region": "iad", "timeout": "later"}"#), Err(ReplayError::BadValue { .. })));
        assert!(matches!(Replay::from_json(b"region=iad"), Err(ReplayError::Json(_))));
    }

    #[test]
    fn the_source_header_names_machine_region_time_and_state() {
        assert_eq!(replay_src("m1", "iad", 1_700_000_000_000_000, Some("w1")), "instance=m1;region=iad;t=1700000000000000;state=w1");
        assert_eq!(replay_src("m1", "iad", 5, None), "instance=m1;region=iad;t=5");
    }
}

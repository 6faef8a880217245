//! The configuration file (`--config.file`, TOML) for what flags do not cover. Every key is
//! optional; unknown keys and bad values are rejected with the line and the reason.
use std::{path::Path, time::Duration};

use serde::{Deserialize, Deserializer};

/// The example in the README is this file's default, key for key.
pub const EXAMPLE: &str = r#"# twmon configuration. Every key is optional; shown here with its default.

[breakdown]
# Series per port breakdown (twmon_port_sockets), plus one labelled "other".
top_k = 10
# Ports always shown with their own series, whatever their rank.
always_ports = []

[pressure]
# Destinations (remote address and port) shown in twmon_port_pressure_ratio.
top_k = 10

[close_wait]
# A socket in CLOSE_WAIT longer than this is a leak: its process is named and logged once.
leak_threshold = "60s"
# Processes shown in twmon_close_wait_leaked_sockets.
top_k = 10

[namespaces]
# Network namespaces to watch, by name ("host", "netns/NAME", "pod/...", "container/...") or
# inode number. Empty means all. `exclude` wins over `include`.
include = []
exclude = []

[reconcile]
# How often to compare with the kernel's own view (sock_diag, /proc/net) and refresh the
# breakdowns that come from it. Stretched when a reconcile is slow (many sockets), so that
# reconciling takes at most `max_cpu` of a core.
interval = "10s"
max_cpu = 0.005
"#;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--config.file {0}: {1}")]
    Read(String, std::io::Error),
    #[error("--config.file {path}: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub breakdown: Breakdown,
    pub pressure: Pressure,
    pub close_wait: CloseWait,
    pub namespaces: Namespaces,
    pub reconcile: Reconcile,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Breakdown {
    #[serde(deserialize_with = "top_k")]
    pub top_k: usize,
    pub always_ports: Vec<u16>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Pressure {
    #[serde(deserialize_with = "top_k")]
    pub top_k: usize,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CloseWait {
    #[serde(deserialize_with = "duration")]
    pub leak_threshold: Duration,
    #[serde(deserialize_with = "top_k")]
    pub top_k: usize,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Namespaces {
    pub include: Vec<NamespaceRef>,
    pub exclude: Vec<NamespaceRef>,
}

/// A namespace by inode number or by name.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum NamespaceRef {
    Inode(u32),
    Name(String),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Reconcile {
    #[serde(deserialize_with = "duration")]
    pub interval: Duration,
    /// The share of one core reconciling may take on average (0.01 is 1 %).
    #[serde(deserialize_with = "share")]
    pub max_cpu: f64,
}

impl Default for Breakdown {
    fn default() -> Self {
        Self { top_k: 10, always_ports: Vec::new() }
    }
}
impl Default for Pressure {
    fn default() -> Self {
        Self { top_k: 10 }
    }
}
impl Default for CloseWait {
    fn default() -> Self {
        Self { leak_threshold: Duration::from_secs(60), top_k: 10 }
    }
}
impl Default for Reconcile {
    fn default() -> Self {
        Self { interval: Duration::from_secs(10), max_cpu: 0.005 }
    }
}

fn top_k<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let k = usize::deserialize(d)?;
    if !(1..=1000).contains(&k) {
        return Err(serde::de::Error::custom(format!("top_k = {k}: must be between 1 and 1000")));
    }
    Ok(k)
}

fn share<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if !(v > 0.0 && v <= 1.0) {
        return Err(serde::de::Error::custom(format!(
            "max_cpu = {v}: must be above 0 and at most 1 (a share of one core)"
        )));
    }
    Ok(v)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    let parsed = parse_duration(&s).map_err(serde::de::Error::custom)?;
    if parsed < Duration::from_secs(1) {
        return Err(serde::de::Error::custom(format!("\"{s}\" is too short: at least 1s")));
    }
    Ok(parsed)
}

/// The largest configuration file read: a complete one is about 2 KiB.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// `500ms`, `10s`, `2m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("\"{s}\" is not a duration such as \"500ms\", \"10s\" or \"2m\"");
    let (num, unit) =
        s.find(|c: char| !c.is_ascii_digit() && c != '.').map(|i| s.split_at(i)).ok_or_else(bad)?;
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    // At most a day: longer is a typo, and would not fit the timers anyway.
    if secs > 86_400.0 {
        return Err(format!("\"{s}\" is too long: at most 24h"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| bad())
}

impl Config {
    pub fn parse(path: &str, text: &str) -> Result<Self, ConfigError> {
        // toml's messages carry the line, the column and the offending key.
        toml::from_str(text)
            .map_err(|e| ConfigError::Invalid { path: path.to_string(), message: e.to_string() })
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        use std::io::Read as _;
        let p = path.display().to_string();
        // Read at most one byte past the limit: /dev/zero or a huge file is refused, not read.
        let mut text = String::new();
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| ConfigError::Read(p.clone(), e))?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::Invalid {
                path: p,
                message: format!(
                    "larger than {} KiB; is it the right file?",
                    MAX_CONFIG_BYTES / 1024
                ),
            });
        }
        Self::parse(&p, &text)
    }

    /// Whether a namespace is watched.
    pub fn watches(&self, inode: u32, name: &str) -> bool {
        let hit = |r: &NamespaceRef| match r {
            NamespaceRef::Inode(i) => *i == inode,
            NamespaceRef::Name(n) => n == name,
        };
        (self.namespaces.include.is_empty() || self.namespaces.include.iter().any(hit))
            && !self.namespaces.exclude.iter().any(hit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_is_the_default() {
        assert_eq!(Config::parse("example", EXAMPLE).unwrap(), Config::default());
        assert_eq!(Config::parse("empty", "").unwrap(), Config::default());
    }

    #[test]
    fn values_are_read() {
        let c = Config::parse(
            "t",
            "[breakdown]\ntop_k = 3\nalways_ports = [443]\n[close_wait]\nleak_threshold = \"2s\"\n\
             [namespaces]\ninclude = [\"host\", 4026531840]\n[reconcile]\ninterval = \"1m\"\n",
        )
        .unwrap();
        assert_eq!(c.breakdown.top_k, 3);
        assert_eq!(c.breakdown.always_ports, vec![443]);
        assert_eq!(c.close_wait.leak_threshold, Duration::from_secs(2));
        assert_eq!(c.reconcile.interval, Duration::from_secs(60));
        assert!(c.watches(4026531840, "pod/x") && c.watches(1, "host") && !c.watches(2, "pod/x"));
    }

    #[test]
    fn unknown_keys_and_bad_values_say_where_and_why() {
        let e =
            Config::parse("f.toml", "[breakdown]\ntop_k = 10\ntopk = 3\n").unwrap_err().to_string();
        assert!(e.contains("f.toml") && e.contains("line 3") && e.contains("topk"), "{e}");
        let e = Config::parse("f.toml", "\n[breakdown]\ntop_k = 0\n").unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("between 1 and 1000"), "{e}");
        let e = Config::parse("f.toml", "[close_wait]\nleak_threshold = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2") && e.contains("not a duration"), "{e}");
        let e = Config::parse("f.toml", "[nope]\n").unwrap_err().to_string();
        assert!(e.contains("unknown field") && e.contains("nope"), "{e}");
    }
}

//! The configuration file (TOML) and the built-in defaults.
//!
//! Every key is documented in README.md ("Configuration reference"). Unknown keys are errors,
//! not ignored: a typo in a train's config must not silently fall back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use thiserror::Error;

use crate::store::queue::WhenFull;
use crate::store::Synchronous;
use crate::topic;

/// A config problem, naming the file and the key.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("config {file}: cannot read it: {source}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {file}: {message}")]
    Parse { file: PathBuf, message: String },
    #[error("config {file}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identifies the train; substituted for `{train_id}` in topics.
    pub train_id: String,
    #[serde(default)]
    pub local: LocalConfig,
    #[serde(default)]
    pub uplink: UplinkConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub status: StatusConfig,
    #[serde(default)]
    pub log: LogConfig,
}

/// `[log]`: what the daemon logs. `RUST_LOG`, when set, takes precedence.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `RUST_LOG`-style directives: `"info"`, `"info,trainrelay::uplink=debug"`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: crate::logging::DEFAULT_LEVEL.into(),
        }
    }
}

/// `[local]`: the broker the cab iPads connect to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    pub listen: SocketAddr,
    pub max_connections: usize,
    pub max_packet_size: ByteSize,
    pub receive_maximum: u16,
    pub max_queued_messages: usize,
    pub max_subscriptions: usize,
    #[serde(with = "humantime_serde")]
    pub max_session_expiry: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            max_connections: 64,
            max_packet_size: ByteSize::mib(1),
            receive_maximum: 64,
            max_queued_messages: 1000,
            max_subscriptions: 64,
            max_session_expiry: Duration::from_secs(7 * 24 * 3600),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// MQTT version spoken to the central broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

/// `[uplink]`: the connection to the central broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UplinkConfig {
    /// `mqtt://host:port`.
    pub url: String,
    /// Client id at the central broker; `{train_id}` is substituted.
    pub client_id: String,
    pub protocol: Protocol,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long the central broker keeps the relay's session after a disconnect (v5).
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_min: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// QoS 1 messages in flight at once (lowered to the broker's Receive Maximum).
    pub inflight: u16,
    /// Largest packet sent; larger messages are refused when accepted.
    pub max_packet_size: ByteSize,
    pub username: Option<String>,
    /// File holding the password for the central broker (first line).
    pub password_file: Option<PathBuf>,
    /// Topic of the relay's retained presence (`online`/`offline`, the latter as Last Will).
    pub status_topic: String,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            url: "mqtt://127.0.0.1:1884".into(),
            client_id: "trainrelay-{train_id}".into(),
            protocol: Protocol::V5,
            keep_alive: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(10),
            session_expiry: Duration::from_secs(24 * 3600),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            inflight: 64,
            max_packet_size: ByteSize::mib(1),
            username: None,
            password_file: None,
            status_topic: "trains/{train_id}/status".into(),
        }
    }
}

/// `[store]`: the durable buffer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub path: PathBuf,
    pub max_bytes: ByteSize,
    pub when_full: WhenFull,
    pub synchronous: Synchronous,
    /// How often expired rows are deleted.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("trainrelay-state/store.db"),
            max_bytes: ByteSize::mib(256),
            when_full: WhenFull::DropOldest,
            synchronous: Synchronous::Full,
            sweep_interval: Duration::from_secs(10),
        }
    }
}

/// Which way a route carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Local broker -> store -> central broker.
    Up,
    /// Central broker -> local broker.
    Down,
}

/// `[[route]]`: a mapping between a local and a remote topic tree.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in status and logs; defaults to `up:<local>` or `down:<remote>`.
    pub name: Option<String>,
    pub direction: Direction,
    /// Local topic filter (up) or local topic pattern (down).
    pub local: String,
    /// Remote topic pattern (up) or remote topic filter to subscribe to (down).
    pub remote: String,
    /// QoS towards the destination: 0 or 1 (QoS 2 is never used upstream).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Lifetime of a message that carries no v5 Message Expiry Interval.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Uplink drain priority, 0 (first) to 9 (last).
    #[serde(default = "default_priority")]
    pub priority: u8,
}

fn default_qos() -> u8 {
    1
}

fn default_priority() -> u8 {
    5
}

/// `[status]`: the local maintenance socket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StatusConfig {
    pub socket: PathBuf,
    /// Group allowed to use the status socket besides root and the daemon's own user; the
    /// socket file is given this group (mode 0660).
    pub group: Option<String>,
    /// How often the retained health document is refreshed upstream (also on every link state
    /// change); `0s` turns it off.
    #[serde(with = "humantime_serde")]
    pub detail_interval: Duration,
}

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            socket: PathBuf::from("trainrelay-state/status.sock"),
            group: None,
            detail_interval: Duration::from_secs(60),
        }
    }
}

impl Config {
    /// The built-in defaults: a laptop setup that buffers until a central broker appears on
    /// 127.0.0.1:1884.
    pub fn builtin() -> Config {
        let routes = vec![
            RouteConfig {
                name: None,
                direction: Direction::Up,
                local: "up/#".into(),
                remote: "trains/{train_id}/up/#".into(),
                qos: 1,
                ttl: Some(Duration::from_secs(600)),
                priority: 5,
            },
            RouteConfig {
                name: None,
                direction: Direction::Down,
                local: "down/#".into(),
                remote: "trains/{train_id}/down/#".into(),
                qos: 1,
                ttl: None,
                priority: 5,
            },
            RouteConfig {
                name: None,
                direction: Direction::Down,
                local: "fleet/broadcast/#".into(),
                remote: "fleet/broadcast/#".into(),
                qos: 1,
                ttl: None,
                priority: 5,
            },
        ];
        let mut config = Config {
            train_id: "T1".into(),
            local: LocalConfig::default(),
            uplink: UplinkConfig::default(),
            store: StoreConfig::default(),
            routes,
            status: StatusConfig::default(),
            log: LogConfig::default(),
        };
        config.expand();
        config
    }

    /// Reads, parses and validates a config file.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Config::parse(&text, file)
    }

    /// Parses and validates config text; `file` is only used in messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_path_buf(),
            message: describe_toml_error(&e, text),
        })?;
        config.validate(file)?;
        config.expand();
        Ok(config)
    }

    /// Substitutes `{train_id}` and fills in route names.
    fn expand(&mut self) {
        let id = self.train_id.clone();
        let sub = |s: &str| s.replace("{train_id}", &id);
        self.uplink.client_id = sub(&self.uplink.client_id);
        self.uplink.status_topic = sub(&self.uplink.status_topic);
        for r in &mut self.routes {
            r.local = sub(&r.local);
            r.remote = sub(&r.remote);
            if r.name.is_none() {
                r.name = Some(match r.direction {
                    Direction::Up => format!("up:{}", r.local),
                    Direction::Down => format!("down:{}", r.remote),
                });
            }
        }
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key: key.to_string(),
            message,
        };
        if self.train_id.is_empty()
            || !self
                .train_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(invalid(
                "train_id",
                format!(
                    "'{}' must be non-empty and use only letters, digits, '-' and '_'",
                    self.train_id
                ),
            ));
        }
        if !self.uplink.url.starts_with("mqtt://") {
            return Err(invalid(
                "uplink.url",
                format!("'{}' must look like mqtt://host:port", self.uplink.url),
            ));
        }
        if crate::uplink::parse_url(&self.uplink.url).is_none() {
            return Err(invalid(
                "uplink.url",
                format!("'{}' must look like mqtt://host:port", self.uplink.url),
            ));
        }
        if self.uplink.keep_alive < Duration::from_secs(1)
            || self.uplink.keep_alive > Duration::from_secs(65535)
        {
            return Err(invalid(
                "uplink.keep_alive",
                "must be between 1s and 65535s".into(),
            ));
        }
        if self.uplink.backoff_min.is_zero() || self.uplink.backoff_min > self.uplink.backoff_max {
            return Err(invalid(
                "uplink.backoff_min",
                "must be above zero and not above uplink.backoff_max".into(),
            ));
        }
        if self.uplink.inflight == 0 {
            return Err(invalid("uplink.inflight", "must be at least 1".into()));
        }
        if self.local.receive_maximum == 0 {
            return Err(invalid(
                "local.receive_maximum",
                "must be at least 1".into(),
            ));
        }
        if self.local.max_connections == 0 {
            return Err(invalid(
                "local.max_connections",
                "must be at least 1".into(),
            ));
        }
        if self.local.max_packet_size.as_u64() > u64::from(u32::MAX >> 4)
            || self.local.max_packet_size.as_u64() < 64
        {
            return Err(invalid(
                "local.max_packet_size",
                "must be between 64B and 256MiB".into(),
            ));
        }
        if self.store.max_bytes.as_u64() < 1024 {
            return Err(invalid("store.max_bytes", "must be at least 1KiB".into()));
        }
        if self.store.path.as_os_str().is_empty() {
            return Err(invalid("store.path", "must not be empty".into()));
        }
        if self.status.socket.as_os_str().is_empty() {
            return Err(invalid("status.socket", "must not be empty".into()));
        }
        if let Some(group) = &self.status.group {
            if group.is_empty() {
                return Err(invalid("status.group", "must not be empty".into()));
            }
        }
        if !self.status.detail_interval.is_zero()
            && self.status.detail_interval < Duration::from_secs(1)
        {
            return Err(invalid(
                "status.detail_interval",
                "must be 0s (off) or at least 1s".into(),
            ));
        }
        if let Err(e) = crate::logging::Filter::parse(&self.log.level) {
            return Err(invalid("log.level", e));
        }
        for (i, r) in self.routes.iter().enumerate() {
            let key = |k: &str| format!("route[{i}].{k}");
            if r.qos > 1 {
                return Err(invalid(
                    &key("qos"),
                    format!("{} is not allowed: use 0 or 1", r.qos),
                ));
            }
            if r.priority > 9 {
                return Err(invalid(
                    &key("priority"),
                    format!("{} is out of range 0..=9", r.priority),
                ));
            }
            if r.ttl.is_some_and(|t| t.is_zero()) {
                return Err(invalid(&key("ttl"), "must be above zero".into()));
            }
            let (from_key, from, to_key, to) = match r.direction {
                Direction::Up => ("local", &r.local, "remote", &r.remote),
                Direction::Down => ("remote", &r.remote, "local", &r.local),
            };
            topic::validate_filter(from)
                .map_err(|e| invalid(&key(from_key), format!("invalid filter '{from}': {e}")))?;
            topic::validate_filter(to)
                .map_err(|e| invalid(&key(to_key), format!("invalid pattern '{to}': {e}")))?;
            if wildcards(from) != wildcards(to) {
                return Err(invalid(
                    &key(to_key),
                    format!(
                        "'{to}' must have the same wildcards in the same order as '{from}', so that the matched levels can be carried over"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// "line N (`the line`): what is wrong", so the message names the key as written.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let line_no = text
        .get(..span.start)
        .map_or(0, |t| t.matches('\n').count())
        + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    format!("line {line_no} (`{line}`): {}", e.message())
}

/// The wildcard levels of a filter, in order.
fn wildcards(filter: &str) -> Vec<&str> {
    filter
        .split('/')
        .filter(|l| *l == "+" || *l == "#")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn minimal_and_substitution() {
        let c = parse(
            r#"
            train_id = "ICE-42"
            [[route]]
            direction = "up"
            local = "up/#"
            remote = "trains/{train_id}/up/#"
            ttl = "10m"
            "#,
        )
        .unwrap();
        assert_eq!(c.routes[0].remote, "trains/ICE-42/up/#");
        assert_eq!(c.routes[0].ttl, Some(Duration::from_secs(600)));
        assert_eq!(c.uplink.client_id, "trainrelay-ICE-42");
    }

    #[test]
    fn errors_name_the_key() {
        let e = parse("train_id = \"T1\"\n[store]\nmax_byte = \"1MiB\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_byte"), "{e}");
        let e = parse(
            "train_id = \"T1\"\n[[route]]\ndirection = \"up\"\nlocal = \"up/#/x\"\nremote = \"r/#\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("route[0].local") && e.contains("'#'"), "{e}");
        let e = parse(
            "train_id = \"T1\"\n[[route]]\ndirection = \"up\"\nlocal = \"up/+\"\nremote = \"r/#\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("route[0].remote"), "{e}");
        let e = parse("train_id = \"T1\"\n[uplink]\nkeep_alive = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("keep_alive"), "{e}");
    }

    #[test]
    fn ops_keys_are_validated_by_name() {
        let e = parse("train_id = \"T1\"\n[log]\nlevel = \"loud\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("log.level"), "{e}");
        let e = parse("train_id = \"T1\"\n[status]\ndetail_interval = \"10ms\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("status.detail_interval"), "{e}");
        let c = parse(
            "train_id = \"T1\"\n[status]\ngroup = \"adm\"\ndetail_interval = \"0s\"\n[log]\nlevel = \"warn,trainrelay=debug\"\n",
        )
        .unwrap();
        assert_eq!(c.status.group.as_deref(), Some("adm"));
        assert!(c.status.detail_interval.is_zero());
    }

    #[test]
    fn builtin_is_valid() {
        let c = Config::builtin();
        c.validate(Path::new("builtin")).unwrap();
        assert_eq!(c.routes.len(), 3);
    }
}

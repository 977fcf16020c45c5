//! The configuration file (TOML) and the built-in defaults.
//!
//! Every key is documented in docs/configuration.md. Unknown keys are errors,
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

/// Where a secret file named in the config is read: a relative name found in systemd's
/// `$CREDENTIALS_DIRECTORY` (`LoadCredential=`) is taken from there, anything else as given.
pub fn secret_path(p: &Path) -> PathBuf {
    if p.is_relative() {
        if let Some(dir) = std::env::var_os("CREDENTIALS_DIRECTORY") {
            let candidate = Path::new(&dir).join(p);
            if candidate.exists() {
                return candidate;
            }
        }
    }
    p.to_path_buf()
}

/// Refuses a file holding secrets that users other than the owner and group may read.
fn check_private(config: &Path, key: &str, secret: &Path) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(secret).map_err(|source| ConfigError::Read {
        file: secret.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode();
    if mode & 0o004 != 0 {
        return Err(ConfigError::Invalid {
            file: config.to_path_buf(),
            key: key.to_string(),
            message: format!(
                "{} is readable by every user (mode {:o}); it holds secrets: chmod o-r it",
                secret.display(),
                mode & 0o777
            ),
        });
    }
    Ok(())
}

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
    /// True when the file lists no `[[route]]` and the built-in routes were put in their place
    /// (a file with no routes would accept the iPads' messages and send them nowhere).
    #[serde(skip)]
    pub builtin_routes: bool,
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
    /// Local topic prefix of per-iPad topics: `{device_prefix}/{client_id}/...` is delivered
    /// only to the iPad with that client id.
    pub device_prefix: String,
    /// Whether clients without a username may connect. Default: true when no device is
    /// configured (the laptop defaults), false as soon as one is.
    pub allow_anonymous: Option<bool>,
    /// A separate TOML file of `[[device]]` entries (same keys as `[[local.device]]`), so the
    /// main config can stay world-readable; it must not be.
    pub credentials_file: Option<PathBuf>,
    /// The cab devices that may connect (see `auth`).
    #[serde(rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// Named ACLs shared by devices.
    #[serde(rename = "group")]
    pub groups: Vec<GroupConfig>,
    /// Sockets one source address may hold open at once.
    pub max_connections_per_address: usize,
    /// PUBLISH packets per second a client may send (token bucket with a burst of the same
    /// size); beyond it the client is disconnected (v5: reason 0x96). 0: no limit. Default:
    /// 1000 once devices are configured, no limit in open (laptop) mode, where test
    /// publishers push bursts of thousands.
    pub max_publish_rate: Option<u32>,
    /// Address of the MQTT-over-WebSocket listener (subprotocol `mqtt`, plain HTTP).
    pub ws_listen: Option<SocketAddr>,
    /// Address of the MQTT-over-TLS listener (needs `tls_cert` and `tls_key`).
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain of the TLS listener.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the TLS listener; refused when readable by every user.
    pub tls_key: Option<PathBuf>,
    /// PEM CA of client certificates (mTLS): a certificate's subject CN names the device.
    pub tls_client_ca: Option<PathBuf>,
}

/// `[[local.device]]`: one cab device and its credentials.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// The MQTT username; the client id must be this name or start with `{name}-`.
    #[serde(alias = "username")]
    pub name: String,
    /// Argon2 PHC string from `trainrelay passwd`.
    pub password_hash: String,
    /// Group whose ACL applies when the device has no `publish` / `subscribe` of its own.
    pub group: Option<String>,
    /// Topic filters the device may publish to (`{client_id}` is substituted).
    pub publish: Option<Vec<String>>,
    /// Topic filters the device may subscribe to (a subscription must be covered by one).
    pub subscribe: Option<Vec<String>>,
    /// The device may connect with any client id (for apps whose library picks its own), but
    /// never one another configured device owns. Unset: the group's setting, else false.
    pub any_client_id: Option<bool>,
}

/// `[[local.group]]`: an ACL shared by devices.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    pub publish: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
    /// Devices of this group may connect with any client id no other device owns.
    #[serde(default)]
    pub any_client_id: bool,
}

/// A credentials file: only `[[device]]` entries.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default, rename = "device")]
    devices: Vec<DeviceConfig>,
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
            device_prefix: "down/device".into(),
            allow_anonymous: None,
            credentials_file: None,
            devices: Vec::new(),
            groups: Vec::new(),
            max_connections_per_address: 16,
            max_publish_rate: None,
            ws_listen: None,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
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
    /// Parallel MQTT connections to the central broker, each with its own session and window;
    /// the first one carries presence and the downlink.
    pub connections: usize,
    /// Cap on the QoS 1 messages in flight at once. By default the window is the central
    /// broker's Receive Maximum, up to `uplink::DEFAULT_WINDOW` (also the window for a broker
    /// that announces none: MQTT 3.1.1).
    pub inflight: Option<u16>,
    /// Largest packet sent; larger messages are refused when accepted.
    pub max_packet_size: ByteSize,
    pub username: Option<String>,
    /// File holding the password for the central broker (first line).
    pub password_file: Option<PathBuf>,
    /// Topic of the relay's retained presence (`online`/`offline`, the latter as Last Will).
    pub status_topic: String,
    /// HTTP proxy for the uplink, `http://[user:password@]host:port` (CONNECT tunnel).
    pub proxy: Option<String>,
    /// Failed delivery attempts of one message (refused, too large, or the connection dropped
    /// right after it was sent) before it becomes a dead letter.
    /// Bandwidth cap for the uplink (topic + payload bytes per second); none by default.
    #[serde(default)]
    pub max_bytes_per_second: Option<ByteSize>,
    pub max_attempts: u32,
    /// Ordered central-broker endpoints (first preferred); empty means `url` alone. Giving
    /// both is an error.
    pub endpoints: Vec<String>,
    /// While on a fallback endpoint, how often to check whether the first one is back.
    #[serde(with = "humantime_serde")]
    pub probe_primary_every: Duration,
    /// PEM CA certificates trusted for `mqtts://` and `wss://` endpoints.
    pub ca_file: Option<PathBuf>,
    /// Also trust the operating system's root certificates.
    pub system_roots: bool,
    /// PEM client certificate (chain) for mutual TLS; needs `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// PEM private key of `client_cert_file`.
    pub client_key_file: Option<PathBuf>,
}

impl UplinkConfig {
    /// The endpoints in order of preference.
    pub fn endpoint_urls(&self) -> Vec<String> {
        if self.endpoints.is_empty() {
            vec![self.url.clone()]
        } else {
            self.endpoints.clone()
        }
    }
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
            connections: 4,
            inflight: None,
            max_packet_size: ByteSize::mib(1),
            username: None,
            password_file: None,
            status_topic: "trains/{train_id}/status".into(),
            proxy: None,
            max_bytes_per_second: None,
            max_attempts: 5,
            endpoints: Vec::new(),
            probe_primary_every: Duration::from_secs(60),
            ca_file: None,
            system_roots: false,
            client_cert_file: None,
            client_key_file: None,
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
    /// Every this many uplink fills, the oldest message of the lowest waiting priority goes
    /// first, so low priorities are never starved; 0 turns it off.
    pub starvation_every: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("trainrelay-state/store.db"),
            max_bytes: ByteSize::mib(256),
            when_full: WhenFull::DropOldest,
            synchronous: Synchronous::Full,
            sweep_interval: Duration::from_secs(10),
            starvation_every: 10,
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
    /// Where a message's version is read, for dropping outdated messages (see `freshness`).
    #[serde(default)]
    pub version: Option<VersionSource>,
    /// What identifies "the same thing" for versions and conflation: `"topic"` (the source
    /// topic) or the name of a v5 user property.
    #[serde(default = "default_key")]
    pub key: String,
    /// Uplink: whether a newer waiting message replaces an older one of the same key.
    #[serde(default)]
    pub conflate: Conflate,
    /// Uplink: what keeps its order across the parallel uplink connections.
    #[serde(default)]
    pub order: Order,
    /// Downlink: keep each topic's latest message as local retained state, whatever its
    /// retain flag (3.1.1 central brokers clear the flag on live delivery).
    #[serde(default)]
    pub state: bool,
    /// Downlink: exact remote topics subscribed to as well, so brokers that serve retained
    /// messages only to exact-topic subscriptions (RabbitMQ) deliver the initial state.
    #[serde(default)]
    pub snapshot_topics: Vec<String>,
}

/// Where a route reads a message's version.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VersionSource {
    /// A v5 user property of that name.
    UserProperty(String),
    /// A top-level field of a JSON object payload.
    JsonField(String),
}

/// What an uplink route keeps in order across the parallel uplink connections
/// (`uplink.connections`): every message of one topic (and of one conflation key) always
/// travels on the same connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Per topic, MQTT's ordered-topic rule: topics are spread over the connections.
    #[default]
    Topic,
    /// Strict FIFO across all the route's topics: the whole route travels on one connection.
    Route,
}

/// Conflation policy of an uplink route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conflate {
    /// Every message is kept and sent.
    #[default]
    None,
    /// Only the newest waiting message per key is kept.
    Latest,
}

fn default_key() -> String {
    "topic".into()
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

/// The routes of the built-in defaults, also used when a config file lists no `[[route]]`:
/// the iPads' `up/#` to the train's uplink tree, the train's downlink tree and the fleet
/// broadcast to the iPads.
fn builtin_routes() -> Vec<RouteConfig> {
    let route = |direction, local: &str, remote: &str, ttl| RouteConfig {
        name: None,
        direction,
        local: local.into(),
        remote: remote.into(),
        qos: 1,
        ttl,
        priority: 5,
        version: None,
        key: default_key(),
        conflate: Conflate::None,
        order: Order::Topic,
        state: false,
        snapshot_topics: Vec::new(),
    };
    vec![
        route(
            Direction::Up,
            "up/#",
            "trains/{train_id}/up/#",
            Some(Duration::from_secs(600)),
        ),
        route(Direction::Down, "down/#", "trains/{train_id}/down/#", None),
        route(
            Direction::Down,
            "fleet/broadcast/#",
            "fleet/broadcast/#",
            None,
        ),
    ]
}

impl Config {
    /// The built-in defaults: a laptop setup that buffers until a central broker appears on
    /// 127.0.0.1:1884.
    pub fn builtin() -> Config {
        let mut config = Config {
            train_id: "T1".into(),
            local: LocalConfig::default(),
            uplink: UplinkConfig::default(),
            store: StoreConfig::default(),
            routes: builtin_routes(),
            status: StatusConfig::default(),
            log: LogConfig::default(),
            builtin_routes: true,
        };
        config.expand();
        config
    }

    /// When the file lists no `[[route]]`: the line that says which routes are used instead.
    pub fn builtin_routes_note(&self, file: &Path) -> Option<String> {
        if !self.builtin_routes {
            return None;
        }
        let routes: Vec<String> = self
            .routes
            .iter()
            .map(|r| match r.direction {
                Direction::Up => format!("{} -> {}", r.local, r.remote),
                Direction::Down => format!("{} <- {}", r.local, r.remote),
            })
            .collect();
        Some(format!(
            "no [[route]] in {}: using the built-in routes {}",
            file.display(),
            routes.join(", ")
        ))
    }

    /// Reads, parses and validates a config file, and the credentials file it names. Files
    /// holding secrets (`local.credentials_file`, `uplink.password_file`) are refused when
    /// other users may read them.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        let mut config = Config::parse(&text, file)?;
        if let Some(p) = &config.uplink.password_file {
            check_private(file, "uplink.password_file", &secret_path(p))?;
        }
        if let Some(key) = &config.local.tls_key {
            check_private(file, "local.tls_key", key)?;
        }
        if let Some(cred) = config.local.credentials_file.clone() {
            check_private(file, "local.credentials_file", &cred)?;
            let text = std::fs::read_to_string(&cred).map_err(|source| ConfigError::Read {
                file: cred.clone(),
                source,
            })?;
            let parsed: CredentialsFile =
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    file: cred.clone(),
                    message: describe_toml_error(&e, &text),
                })?;
            config.local.devices.extend(parsed.devices);
            config.validate_devices(file)?;
        }
        Ok(config)
    }

    /// `local.max_publish_rate` with its mode-dependent default.
    pub fn max_publish_rate(&self) -> u32 {
        self.local
            .max_publish_rate
            .unwrap_or(if self.secured() { 1000 } else { 0 })
    }

    /// Whether the local broker requires credentials (any device configured).
    pub fn secured(&self) -> bool {
        !self.local.devices.is_empty() || self.local.credentials_file.is_some()
    }

    /// Devices, groups and `allow_anonymous` must agree: names unique, hashes readable,
    /// groups defined, filters valid.
    fn validate_devices(&self, file: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            key,
            message,
        };
        if self.local.allow_anonymous == Some(false) && !self.secured() {
            return Err(invalid(
                "local.allow_anonymous".into(),
                "false needs at least one [[local.device]] or local.credentials_file".into(),
            ));
        }
        let check_filters = |key: String, filters: &Option<Vec<String>>| {
            for f in filters.iter().flatten() {
                let expanded = f.replace("{client_id}", "x");
                topic::validate_filter(&expanded)
                    .map_err(|e| invalid(key.clone(), format!("filter '{f}' {e}")))?;
            }
            Ok(())
        };
        let mut names = std::collections::HashSet::new();
        for (i, g) in self.local.groups.iter().enumerate() {
            if !names.insert(g.name.as_str()) {
                return Err(invalid(
                    format!("local.group[{i}].name"),
                    format!("group '{}' is defined twice", g.name),
                ));
            }
            check_filters(format!("local.group[{i}].publish"), &g.publish)?;
            check_filters(format!("local.group[{i}].subscribe"), &g.subscribe)?;
        }
        let mut seen = std::collections::HashSet::new();
        for (i, d) in self.local.devices.iter().enumerate() {
            let key = |k: &str| format!("local.device[{i}].{k}");
            if !crate::auth::valid_device_name(&d.name) {
                return Err(invalid(
                    key("name"),
                    format!(
                        "'{}' must be 1 to 64 characters of letters, digits, '.', '_', ':', '-'",
                        d.name
                    ),
                ));
            }
            if !seen.insert(d.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("device '{}' is defined twice", d.name),
                ));
            }
            if let Err(e) = crate::auth::check_hash(&d.password_hash) {
                return Err(invalid(
                    key("password_hash"),
                    format!(
                        "device '{}': {e} (make one with `trainrelay passwd`)",
                        d.name
                    ),
                ));
            }
            if let Some(g) = &d.group {
                if !self.local.groups.iter().any(|x| &x.name == g) {
                    return Err(invalid(
                        key("group"),
                        format!("no [[local.group]] named '{g}'"),
                    ));
                }
            }
            check_filters(key("publish"), &d.publish)?;
            check_filters(key("subscribe"), &d.subscribe)?;
        }
        Ok(())
    }

    /// Parses and validates config text; `file` is only used in messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_path_buf(),
            message: describe_toml_error(&e, text),
        })?;
        // `url` has a default, so only the text tells whether it was given next to `endpoints`.
        let url_given = text
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("uplink")?.get("url").cloned())
            .is_some();
        if url_given && !config.uplink.endpoints.is_empty() {
            return Err(ConfigError::Invalid {
                file: file.to_path_buf(),
                key: "uplink.endpoints".into(),
                message: "give either uplink.url or uplink.endpoints, not both".into(),
            });
        }
        if config.routes.is_empty() {
            config.routes = builtin_routes();
            config.builtin_routes = true;
        }
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
            for t in &mut r.snapshot_topics {
                *t = sub(t);
            }
            if r.name.is_none() {
                r.name = Some(match r.direction {
                    Direction::Up => format!("up:{}", r.local),
                    Direction::Down => format!("down:{}", r.remote),
                });
            }
        }
    }

    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        self.validate_devices(file)?;
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
        let key = if self.uplink.endpoints.is_empty() {
            "uplink.url"
        } else {
            "uplink.endpoints"
        };
        let mut tls = false;
        for url in self.uplink.endpoint_urls() {
            let endpoint = crate::uplink::endpoint::Endpoint::parse(&url)
                .map_err(|message| invalid(key, message))?;
            tls |= endpoint.scheme.is_tls();
        }
        if tls {
            crate::uplink::tls::client_config(&self.uplink)
                .map_err(|e| invalid(e.key, e.message))?;
        }
        if self.uplink.probe_primary_every < Duration::from_secs(1) {
            return Err(invalid(
                "uplink.probe_primary_every",
                "must be at least 1s".into(),
            ));
        }
        // Pinging a cellular link more often than every 5 s costs data and catches nothing
        // the route watch does not; the upper bound is what MQTT can carry.
        if self.uplink.keep_alive < Duration::from_secs(5)
            || self.uplink.keep_alive > Duration::from_secs(65535)
        {
            return Err(invalid(
                "uplink.keep_alive",
                "must be between 5s and 65535s".into(),
            ));
        }
        if self.uplink.max_attempts == 0 {
            return Err(invalid("uplink.max_attempts", "must be at least 1".into()));
        }
        if self.uplink.backoff_min.is_zero() || self.uplink.backoff_min > self.uplink.backoff_max {
            return Err(invalid(
                "uplink.backoff_min",
                "must be above zero and not above uplink.backoff_max".into(),
            ));
        }
        if let Some(proxy) = &self.uplink.proxy {
            if crate::uplink::link::HttpProxy::parse(proxy).is_none() {
                return Err(invalid(
                    "uplink.proxy",
                    format!("'{proxy}' must look like http://[user:password@]host:port"),
                ));
            }
        }
        if !(1..=16).contains(&self.uplink.connections) {
            return Err(invalid(
                "uplink.connections",
                format!("must be 1 to 16, not {}", self.uplink.connections),
            ));
        }
        if self.uplink.inflight == Some(0) {
            return Err(invalid("uplink.inflight", "must be at least 1".into()));
        }
        if self.local.receive_maximum == 0 {
            return Err(invalid(
                "local.receive_maximum",
                "must be at least 1".into(),
            ));
        }
        if self.local.tls_listen.is_some()
            && (self.local.tls_cert.is_none() || self.local.tls_key.is_none())
        {
            return Err(invalid(
                "local.tls_listen",
                "needs local.tls_cert and local.tls_key".into(),
            ));
        }
        if self.local.max_connections_per_address == 0 {
            return Err(invalid(
                "local.max_connections_per_address",
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
        if topic::validate_name(&self.local.device_prefix).is_err()
            || self.local.device_prefix.is_empty()
        {
            return Err(invalid(
                "local.device_prefix",
                format!(
                    "'{}' must be a topic without wildcards",
                    self.local.device_prefix
                ),
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
            if r.key.is_empty() {
                return Err(invalid(
                    &key("key"),
                    "must be \"topic\" or a user property name".into(),
                ));
            }
            if let Some(VersionSource::UserProperty(n) | VersionSource::JsonField(n)) = &r.version {
                if n.is_empty() {
                    return Err(invalid(&key("version"), "names an empty field".into()));
                }
            }
            if r.direction == Direction::Down && r.conflate != Conflate::None {
                return Err(invalid(
                    &key("conflate"),
                    "applies to uplink routes only (downlink messages are not queued)".into(),
                ));
            }
            if r.direction == Direction::Up && (r.state || !r.snapshot_topics.is_empty()) {
                return Err(invalid(
                    &key(if r.state { "state" } else { "snapshot_topics" }),
                    "applies to downlink routes only".into(),
                ));
            }
            for t in &r.snapshot_topics {
                let t = t.replace("{train_id}", &self.train_id);
                let remote = r.remote.replace("{train_id}", &self.train_id);
                if topic::validate_name(&t).is_err() || !topic::matches(&remote, &t) {
                    return Err(invalid(
                        &key("snapshot_topics"),
                        format!("'{t}' must be an exact topic matched by remote '{remote}'"),
                    ));
                }
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

    #[test]
    fn freshness_keys_parse_and_are_checked() {
        let c = parse(
            r#"
            train_id = "T9"
            [[route]]
            direction = "up"
            local = "pos/#"
            remote = "trains/{train_id}/pos/#"
            conflate = "latest"
            key = "vehicle"
            version = { user_property = "seq" }
            [[route]]
            direction = "down"
            remote = "trains/{train_id}/state/#"
            local = "state/#"
            state = true
            version = { json_field = "ts" }
            snapshot_topics = ["trains/{train_id}/state/speed"]
            "#,
        )
        .unwrap();
        assert_eq!(c.routes[0].conflate, Conflate::Latest);
        assert_eq!(c.routes[0].key, "vehicle");
        assert_eq!(
            c.routes[0].version,
            Some(VersionSource::UserProperty("seq".into()))
        );
        assert!(c.routes[1].state);
        assert_eq!(c.routes[1].snapshot_topics, vec!["trains/T9/state/speed"]);
        assert_eq!(c.routes[1].key, "topic");
        assert_eq!(c.local.device_prefix, "down/device");
        assert_eq!(c.store.starvation_every, 10);
        let routes = crate::route::Routes::from_config(&c);
        assert_eq!(
            routes.down_filters(),
            vec![
                ("trains/T9/state/#".to_string(), 1),
                ("trains/T9/state/speed".to_string(), 1)
            ]
        );

        let bad = |route: &str, key: &str| {
            let text = format!("train_id = \"T1\"\n[[route]]\n{route}\n");
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        };
        bad(
            "direction = \"down\"\nremote = \"r/#\"\nlocal = \"l/#\"\nconflate = \"latest\"",
            "route[0].conflate",
        );
        bad(
            "direction = \"up\"\nlocal = \"l/#\"\nremote = \"r/#\"\nstate = true",
            "route[0].state",
        );
        bad(
            "direction = \"down\"\nremote = \"r/#\"\nlocal = \"l/#\"\nsnapshot_topics = [\"x/y\"]",
            "route[0].snapshot_topics",
        );
        bad(
            "direction = \"up\"\nlocal = \"l/#\"\nremote = \"r/#\"\nversion = { header = \"x\" }",
            "header",
        );
        bad(
            "direction = \"up\"\nlocal = \"l/#\"\nremote = \"r/#\"\nconflate = \"sometimes\"",
            "sometimes",
        );
    }
}

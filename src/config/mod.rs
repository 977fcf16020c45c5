//! The configuration file (TOML) and the built-in defaults.
//!
//! Every key is documented in docs/configuration.md. Unknown keys are errors,
//! not ignored: a typo in a train's config must not silently fall back to a default.
//!
//! Each section is a file of its own that checks its own keys (`[local]` in `local`, `[uplink]`
//! in `uplink` over the uplink's own types, `[store]`, `[[route]]`, `[status]`, `[log]`); this
//! file reads the whole, checks the sections in a fixed order, and puts the file's name on the
//! first problem found. Checking builds nothing the daemon runs with, except that the uplink's
//! TLS files are loaded the way the uplink will load them, so a bad one is a config error.

mod local;
mod logging;
mod routes;
mod status;
mod store;
mod uplink;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

pub use local::{DeviceConfig, GroupConfig, LocalConfig};
pub use logging::LogConfig;
pub use routes::{Conflate, Direction, Order, RouteConfig, VersionSource};
pub use status::StatusConfig;
pub use store::StoreConfig;
pub use uplink::{Protocol, UplinkConfig};

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

/// A value one section refuses: the key and what is wrong with it. [`Config::parse`] adds the
/// file.
#[derive(Debug)]
struct Invalid {
    key: String,
    message: String,
}

impl Invalid {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            message: message.into(),
        }
    }

    fn in_file(self, file: &Path) -> ConfigError {
        ConfigError::Invalid {
            file: file.to_path_buf(),
            key: self.key,
            message: self.message,
        }
    }
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

impl Config {
    /// The built-in defaults: a laptop setup that buffers until a central broker appears on
    /// 127.0.0.1:1884.
    pub fn builtin() -> Config {
        let mut config = Config {
            train_id: "T1".into(),
            local: LocalConfig::default(),
            uplink: UplinkConfig::default(),
            store: StoreConfig::default(),
            routes: routes::builtin_routes(),
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
            let parsed: local::CredentialsFile =
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    file: cred.clone(),
                    message: describe_toml_error(&e, &text),
                })?;
            config.local.devices.extend(parsed.devices);
            config
                .local
                .validate_devices()
                .map_err(|e| e.in_file(file))?;
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
        self.local.secured()
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
            config.routes = routes::builtin_routes();
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

    /// Each section checks its own keys; the order decides which of several problems is
    /// reported.
    fn validate(&self, file: &Path) -> Result<(), ConfigError> {
        self.validate_sections().map_err(|e| e.in_file(file))
    }

    fn validate_sections(&self) -> Result<(), Invalid> {
        self.local.validate_devices()?;
        if self.train_id.is_empty()
            || !self
                .train_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(Invalid::new(
                "train_id",
                format!(
                    "'{}' must be non-empty and use only letters, digits, '-' and '_'",
                    self.train_id
                ),
            ));
        }
        uplink::validate(&self.uplink)?;
        self.local.validate()?;
        self.store.validate()?;
        self.status.validate()?;
        self.log.validate()?;
        routes::validate(&self.routes, &self.train_id)
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

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
    fn the_urgent_reserve_is_a_percentage_of_max_bytes() {
        let c =
            parse("train_id = \"T1\"\n[store]\nmax_bytes = \"1MiB\"\nurgent_reserve = \"10%\"\n")
                .unwrap();
        assert_eq!(
            c.store.urgent_reserve.of(c.store.max_bytes.as_u64()),
            104_857
        );
        let default = parse("train_id = \"T1\"\n").unwrap();
        assert_eq!(default.store.urgent_reserve.of(1000), 50);
        for bad in ["\"lots\"", "\"10\"", "\"60%\"", "\"-1%\""] {
            let e = parse(&format!(
                "train_id = \"T1\"\n[store]\nurgent_reserve = {bad}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains("urgent_reserve"), "{bad}: {e}");
        }
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

//! `[log]`: what the daemon logs.

use serde::Deserialize;

use super::Invalid;

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

impl LogConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        crate::logging::Filter::parse(&self.level)
            .map(drop)
            .map_err(|e| Invalid::new("log.level", e.to_string()))
    }
}

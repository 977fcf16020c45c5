//! `[status]`: the local maintenance socket.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::Invalid;

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

impl StatusConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.socket.as_os_str().is_empty() {
            return Err(Invalid::new("status.socket", "must not be empty"));
        }
        if let Some(group) = &self.group {
            if group.is_empty() {
                return Err(Invalid::new("status.group", "must not be empty"));
            }
        }
        if !self.detail_interval.is_zero() && self.detail_interval < Duration::from_secs(1) {
            return Err(Invalid::new(
                "status.detail_interval",
                "must be 0s (off) or at least 1s",
            ));
        }
        Ok(())
    }
}

//! `[store]`: the durable buffer.

use std::path::PathBuf;
use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;

use super::Invalid;
use crate::store::queue::WhenFull;
use crate::store::Synchronous;

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

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.max_bytes.as_u64() < 1024 {
            return Err(Invalid::new("store.max_bytes", "must be at least 1KiB"));
        }
        if self.path.as_os_str().is_empty() {
            return Err(Invalid::new("store.path", "must not be empty"));
        }
        Ok(())
    }
}

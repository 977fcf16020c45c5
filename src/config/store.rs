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
    /// The share of `max_bytes` kept for urgent routes (priority 0 and 1), as `"5%"`.
    pub urgent_reserve: Percent,
}

/// A share of a whole, written `"5%"` (0 to 50 %).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Percent(f64);

impl Percent {
    /// `part` % of `whole`, rounded down.
    pub fn of(self, whole: u64) -> u64 {
        (whole as f64 * self.0 / 100.0) as u64
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Percent, D::Error> {
        let text = String::deserialize(d)?;
        let number = text
            .trim()
            .strip_suffix('%')
            .and_then(|n| n.trim().parse::<f64>().ok())
            .filter(|n| n.is_finite());
        match number {
            Some(n) => Ok(Percent(n)),
            None => Err(serde::de::Error::custom(format!(
                "'{text}' is not a percentage such as \"5%\""
            ))),
        }
    }
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
            urgent_reserve: Percent(5.0),
        }
    }
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.max_bytes.as_u64() < 1024 {
            return Err(Invalid::new("store.max_bytes", "must be at least 1KiB"));
        }
        if !(0.0..=50.0).contains(&self.urgent_reserve.0) {
            return Err(Invalid::new(
                "store.urgent_reserve",
                "must be between 0% and 50%",
            ));
        }
        if self.path.as_os_str().is_empty() {
            return Err(Invalid::new("store.path", "must not be empty"));
        }
        Ok(())
    }
}

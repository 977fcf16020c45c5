//! Time that survives restarts.
//!
//! A message's deadline is fixed when it is accepted. Within one boot of the unit we measure
//! age with `CLOCK_BOOTTIME`, which is monotonic, keeps counting during suspend and also across
//! restarts of the daemon, so a wrong wall clock that NTP or GNSS corrects later neither expires
//! the buffer nor keeps stale messages. Across a reboot the boot clock restarts, so age falls back
//! to the wall clock (saturating at zero if the wall clock now reads earlier than at acceptance:
//! such a message is kept until the wall clock has passed its deadline).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time, as both boot-clock and wall-clock milliseconds, tagged with the boot it
/// was taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Milliseconds since the Unix epoch by the wall clock.
    pub wall_ms: i64,
    /// Milliseconds of `CLOCK_BOOTTIME`.
    pub boot_ms: i64,
    /// Identifies the boot (a hash of the kernel's boot id).
    pub boot_id: i64,
}

impl Stamp {
    /// Now, in the current boot.
    pub fn now() -> Stamp {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Stamp {
            wall_ms,
            boot_ms: boot_ms(),
            boot_id: boot_id(),
        }
    }

    /// This stamp moved forward by `d` (a deadline from an acceptance time and a TTL).
    pub fn plus(&self, d: Duration) -> Stamp {
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4);
        Stamp {
            wall_ms: self.wall_ms.saturating_add(ms),
            boot_ms: self.boot_ms.saturating_add(ms),
            boot_id: self.boot_id,
        }
    }

    /// How long after `earlier` this stamp is; zero if it is not after it.
    pub fn since(&self, earlier: &Stamp) -> Duration {
        let ms = if self.boot_id == earlier.boot_id {
            self.boot_ms - earlier.boot_ms
        } else {
            self.wall_ms - earlier.wall_ms
        };
        Duration::from_millis(ms.max(0) as u64)
    }

    /// Time left until this stamp (as a deadline) passes, seen from `now`; `None` once it has.
    pub fn remaining(&self, now: &Stamp) -> Option<Duration> {
        let ms = if self.boot_id == now.boot_id {
            self.boot_ms - now.boot_ms
        } else {
            self.wall_ms - now.wall_ms
        };
        (ms > 0).then(|| Duration::from_millis(ms as u64))
    }

    /// True once this stamp, as a deadline, has passed.
    pub fn is_past(&self, now: &Stamp) -> bool {
        self.remaining(now).is_none()
    }
}

/// Remaining time as a v5 Message Expiry Interval in whole seconds, rounded up so that a
/// message that has not expired is never forwarded with an interval of zero.
pub fn expiry_secs(remaining: Duration) -> u32 {
    let secs = remaining.as_millis().div_ceil(1000);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// Milliseconds since boot. Widened through `Duration` because `time_t` is 32 bits on armv7
/// (Debian armhf): `tv_sec() * 1000` would be i32 there and overflow after 24 days of uptime.
fn boot_ms() -> i64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME) {
        Ok(ts) => i64::try_from(Duration::from(ts).as_millis()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

fn boot_id() -> i64 {
    use std::sync::OnceLock;
    static ID: OnceLock<i64> = OnceLock::new();
    *ID.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
        // FNV-1a: stable across builds and platforms, unlike std's hasher.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in text.trim().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h as i64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_boot_uses_boot_clock_even_if_wall_clock_jumps() {
        let t0 = Stamp {
            wall_ms: 1_000_000,
            boot_ms: 5_000,
            boot_id: 7,
        };
        let deadline = t0.plus(Duration::from_secs(10));
        // Wall clock jumped a day ahead, boot clock moved 2 s: 8 s remain.
        let now = Stamp {
            wall_ms: 1_000_000 + 86_400_000,
            boot_ms: 7_000,
            boot_id: 7,
        };
        assert_eq!(deadline.remaining(&now), Some(Duration::from_secs(8)));
    }

    #[test]
    fn other_boot_uses_wall_clock_and_saturates() {
        let t0 = Stamp {
            wall_ms: 1_000_000,
            boot_ms: 5_000,
            boot_id: 7,
        };
        let deadline = t0.plus(Duration::from_secs(10));
        let later = Stamp {
            wall_ms: 1_011_000,
            boot_ms: 100,
            boot_id: 8,
        };
        assert!(deadline.is_past(&later));
        let clock_wrong = Stamp {
            wall_ms: 10,
            boot_ms: 100,
            boot_id: 8,
        };
        assert!(!deadline.is_past(&clock_wrong));
        assert_eq!(clock_wrong.since(&t0), Duration::ZERO);
    }

    #[test]
    fn expiry_rounds_up() {
        assert_eq!(expiry_secs(Duration::from_millis(1)), 1);
        assert_eq!(expiry_secs(Duration::from_millis(1000)), 1);
        assert_eq!(expiry_secs(Duration::from_millis(1001)), 2);
    }
}

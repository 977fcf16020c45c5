//! The liveness of the daemon's main loops: each loop owns a [`Heartbeat`] and beats it as it
//! goes round; [`crate::watchdog`] stops systemd's pings when one is overdue. A leaf, so that
//! every loop can beat without knowing who watches.
//!
//! Test hook (debug builds only): `TRAINRELAY_TEST_HANG=<loop>:<file>` makes `<loop>` (`uplink`
//! or `store`) hang for good once `<file>` exists, so a test can prove that the pings stop.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a loop may go without a beat (beyond what it announced) before it counts as hung.
/// Generous: a loaded two-core unit must not be restarted for being slow.
pub const GRACE: Duration = Duration::from_secs(10);

/// Process-wide reference point for heartbeat deadlines (milliseconds since it).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> i64 {
    epoch().elapsed().as_millis() as i64
}

/// The liveness of one loop: the time by which it promised to beat again.
#[derive(Clone)]
pub struct Heartbeat {
    name: &'static str,
    deadline_ms: Arc<AtomicI64>,
}

impl Heartbeat {
    /// A heartbeat that is healthy for [`GRACE`] from now.
    pub fn new(name: &'static str) -> Heartbeat {
        let hb = Heartbeat {
            name,
            deadline_ms: Arc::new(AtomicI64::new(0)),
        };
        hb.beat();
        hb
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The loop made progress: healthy for another [`GRACE`].
    pub fn beat(&self) {
        self.expect_within(Duration::ZERO);
    }

    /// The loop is about to wait on purpose for up to `wait`: healthy until `wait` + [`GRACE`].
    pub fn expect_within(&self, wait: Duration) {
        let ms = i64::try_from((wait + GRACE).as_millis()).unwrap_or(i64::MAX / 4);
        self.deadline_ms
            .store(now_ms().saturating_add(ms), Ordering::Release);
    }

    /// The loop is gone for good (its task ended while the daemon still runs).
    pub fn stop(&self) {
        self.deadline_ms.store(i64::MIN, Ordering::Release);
    }

    /// How long it is overdue, if it is.
    pub fn overdue(&self) -> Option<Duration> {
        let late = now_ms().saturating_sub(self.deadline_ms.load(Ordering::Acquire));
        (late > 0).then(|| Duration::from_millis(late as u64))
    }
}

/// The loop named by `TRAINRELAY_TEST_HANG` should hang now (debug builds only).
pub fn test_hang_requested(name: &str) -> bool {
    if !cfg!(debug_assertions) {
        return false;
    }
    let Ok(spec) = std::env::var("TRAINRELAY_TEST_HANG") else {
        return false;
    };
    match spec.split_once(':') {
        Some((which, file)) => which == name && std::path::Path::new(file).exists(),
        None => false,
    }
}

/// Beats `hb`, or, under the test hook, never returns.
pub async fn beat_or_hang(hb: &Heartbeat) {
    if test_hang_requested(hb.name()) {
        log::warn!("test hook: {} loop hangs now", hb.name());
        std::future::pending::<()>().await;
    }
    hb.beat();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_goes_stale_and_recovers() {
        let hb = Heartbeat::new("t");
        assert!(hb.overdue().is_none());
        hb.deadline_ms.store(now_ms() - 5, Ordering::Release);
        assert!(hb.overdue().is_some());
        hb.beat();
        assert!(hb.overdue().is_none());
        hb.stop();
        assert!(hb.overdue().is_some());
    }
}

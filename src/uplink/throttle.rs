//! An optional bandwidth cap for the uplink (a token bucket over payload bytes), so a backlog
//! drained over a metered cellular link does not take all of it.
//!
//! A message may be sent whenever the bucket is not in debt; its size is then taken, possibly
//! into debt, which later sends pay back. So a message larger than the per-second budget is
//! never stuck, and the long-run rate stays at the cap.

use std::time::Instant;

/// A token bucket refilled at `rate` bytes per second, holding at most one second's worth.
#[derive(Debug)]
pub struct Throttle {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl Throttle {
    /// `rate` bytes per second; `None` means no cap.
    pub fn new(rate: Option<u64>) -> Option<Throttle> {
        rate.filter(|r| *r > 0).map(|r| Throttle {
            rate: r as f64,
            tokens: r as f64,
            last: Instant::now(),
        })
    }

    fn refill(&mut self, now: Instant) {
        let secs = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + secs * self.rate).min(self.rate);
        self.last = now;
    }

    /// True if a message may be sent now.
    pub fn ready(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens > 0.0
    }

    /// Charges a sent message of `bytes`.
    pub fn take(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn long_run_rate_is_the_cap() {
        let start = Instant::now();
        let mut t = Throttle::new(Some(1000)).unwrap();
        t.last = start;
        let mut sent = 0usize;
        // Ten simulated seconds in 10 ms steps, 300-byte messages.
        for step in 0..1000 {
            let now = start + Duration::from_millis(10 * step);
            while t.ready(now) {
                t.take(300);
                sent += 300;
            }
        }
        // One second of burst plus ten of rate, within one message.
        assert!((10_000..=11_300).contains(&sent), "{sent}");
    }

    #[test]
    fn no_rate_no_throttle() {
        assert!(Throttle::new(None).is_none());
        assert!(Throttle::new(Some(0)).is_none());
    }

    #[test]
    fn a_message_larger_than_the_budget_still_goes() {
        let start = Instant::now();
        let mut t = Throttle::new(Some(100)).unwrap();
        t.last = start;
        assert!(t.ready(start));
        t.take(1000);
        assert!(!t.ready(start + Duration::from_secs(5)));
        assert!(t.ready(start + Duration::from_secs(11)));
    }
}

//! Limits against clients that misbehave on purpose or by accident: sockets per source
//! address, a slowing-down of repeated authentication failures from one address, and a
//! per-connection publish rate.
//!
//! All state here is bounded: the per-address tables hold at most [`MAX_TRACKED`] addresses,
//! and a refusal is delayed inside the refused connection's own task, so a client that keeps
//! guessing passwords only slows itself down, never the accept loop or other clients.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

/// Addresses remembered by the failure table; beyond it the stalest entry is forgotten.
pub const MAX_TRACKED: usize = 4096;
/// Delay before the first refusal; doubled per further failure.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Upper bound of the refusal delay.
pub const MAX_DELAY: Duration = Duration::from_secs(8);
/// An address without failures for this long starts from zero again.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Longest client id accepted, in bytes (UTF-8). MQTT allows up to 65535; an id is kept in
/// memory, the store, logs and topics, so we take what real clients use with a wide margin.
pub const MAX_CLIENT_ID: usize = 256;

/// Why a client id is refused, if it is. MQTT allows any UTF-8 client id; we refuse only what
/// cannot be carried safely: NUL and other control characters (C0, DEL, C1: the spec lets a
/// server treat them as malformed; they would garble logs and the status output), and ids
/// longer than [`MAX_CLIENT_ID`] bytes. Ids with `/`, `+`, `#`, spaces or non-ASCII letters are
/// fine: where an id goes into a topic it is encoded with [`crate::topic::id_level`].
pub fn client_id_problem(id: &str) -> Option<String> {
    if id.len() > MAX_CLIENT_ID {
        return Some(format!(
            "is {} bytes long, more than {MAX_CLIENT_ID}",
            id.len()
        ));
    }
    id.chars()
        .find(|c| c.is_control())
        .map(|c| format!("contains the control character U+{:04X}", u32::from(c)))
}

/// Device names (`[[local.device]] name`, also the MQTT username) stay plain: 1 to 64 of
/// `[A-Za-z0-9._:-]`, so that they read well in topics, logs and the config.
pub fn valid_device_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// `authenticate` calls running at once.
const AUTH_SLOTS: usize = 2;

/// What every connection consults before it is let in: the open sockets, per address too,
/// the failed logins, and the slots for running the authentication hook. Each part
/// synchronises itself; none of it is session state.
pub struct Admission {
    /// Sockets open, including those that have not sent CONNECT yet.
    pub open_sockets: AtomicUsize,
    /// Open sockets per source address (`max_connections_per_address`).
    pub addresses: AddressCounts,
    /// Authentication failures per source address, for delaying refusals.
    pub failures: FailureThrottle,
    /// Bounds concurrent `authenticate` calls: password hashing is slow and memory-hungry on
    /// purpose, so a burst of logins must not occupy every thread or megabytes each.
    pub auth_slots: Arc<Semaphore>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            open_sockets: AtomicUsize::new(0),
            addresses: AddressCounts::default(),
            failures: FailureThrottle::default(),
            auth_slots: Arc::new(Semaphore::new(AUTH_SLOTS)),
        }
    }
}

/// Open sockets per source address.
#[derive(Default)]
pub struct AddressCounts {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl AddressCounts {
    /// Counts a new socket from `ip`; false (and not counted) if `ip` already holds `max`.
    pub fn try_add(&self, ip: IpAddr, max: usize) -> bool {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if *n >= max {
            return false;
        }
        *n += 1;
        true
    }

    pub fn remove(&self, ip: IpAddr) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&ip);
            }
        }
    }
}

struct Failures {
    count: u32,
    last: Instant,
}

/// Authentication failures per source address, for an exponential delay before the refusal.
#[derive(Default)]
pub struct FailureThrottle {
    table: Mutex<HashMap<IpAddr, Failures>>,
}

impl FailureThrottle {
    /// Records a failure from `ip` and returns how long to wait before answering it:
    /// 100 ms, 200 ms, 400 ms, ... up to [`MAX_DELAY`].
    pub fn fail(&self, ip: IpAddr) -> Duration {
        let now = Instant::now();
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if table.len() >= MAX_TRACKED && !table.contains_key(&ip) {
            table.retain(|_, f| now.duration_since(f.last) < FORGET_AFTER);
            if table.len() >= MAX_TRACKED {
                let stalest = table.iter().min_by_key(|(_, f)| f.last).map(|(k, _)| *k);
                if let Some(k) = stalest {
                    table.remove(&k);
                }
            }
        }
        let f = table.entry(ip).or_insert(Failures {
            count: 0,
            last: now,
        });
        if now.duration_since(f.last) >= FORGET_AFTER {
            f.count = 0;
        }
        f.count = f.count.saturating_add(1);
        f.last = now;
        delay_for(f.count)
    }

    /// A successful login from `ip` clears its record.
    pub fn succeed(&self, ip: IpAddr) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.remove(&ip);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().map(|t| t.len()).unwrap_or(0)
    }
}

fn delay_for(failures: u32) -> Duration {
    let shift = failures.saturating_sub(1).min(16);
    FIRST_DELAY.saturating_mul(1u32 << shift).min(MAX_DELAY)
}

/// A token bucket: `rate` tokens per second, holding at most `rate` (a one-second burst).
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32) -> TokenBucket {
        TokenBucket {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            last: Instant::now(),
        }
    }

    /// Takes one token; false if none is left.
    pub fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + refill).min(self.rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_bounded() {
        assert_eq!(delay_for(1), Duration::from_millis(100));
        assert_eq!(delay_for(2), Duration::from_millis(200));
        assert_eq!(delay_for(4), Duration::from_millis(800));
        assert_eq!(delay_for(30), MAX_DELAY);
        assert_eq!(delay_for(u32::MAX), MAX_DELAY);
    }

    #[test]
    fn failure_table_is_bounded_and_cleared_by_success() {
        let t = FailureThrottle::default();
        let ip: IpAddr = [10, 0, 0, 1].into();
        assert_eq!(t.fail(ip), Duration::from_millis(100));
        assert_eq!(t.fail(ip), Duration::from_millis(200));
        t.succeed(ip);
        assert_eq!(t.fail(ip), Duration::from_millis(100));
        for i in 0..(MAX_TRACKED as u32 + 100) {
            t.fail(IpAddr::from(i.to_be_bytes()));
        }
        assert!(t.len() <= MAX_TRACKED);
    }

    #[test]
    fn per_address_counts() {
        let c = AddressCounts::default();
        let ip: IpAddr = [10, 0, 0, 2].into();
        assert!(c.try_add(ip, 2));
        assert!(c.try_add(ip, 2));
        assert!(!c.try_add(ip, 2));
        assert!(c.try_add([10, 0, 0, 3].into(), 2));
        c.remove(ip);
        assert!(c.try_add(ip, 2));
    }

    #[test]
    fn bucket() {
        let mut b = TokenBucket::new(5);
        assert!((0..5).all(|_| b.take()));
        assert!(!b.take());
    }
}

//! systemd integration at runtime: `STATUS=` lines with the link state, and `WATCHDOG=1` pings
//! that are sent only while the daemon's main loops make progress.
//!
//! A ping proves more than "the process exists": each main loop (uplink, local broker, store
//! writer) owns a [`Heartbeat`] and beats it as it goes round. A loop that waits on purpose (the
//! uplink's reconnect backoff, a connect attempt) first announces how long it will be away
//! ([`Heartbeat::expect_within`]). When any heartbeat is overdue the pings stop, and systemd
//! (`WatchdogSec=`) kills and restarts the process: a hung loop cannot leave the train silently
//! without its relay.
//! The heartbeats themselves and the test hook that makes a loop hang are in
//! [`crate::heartbeat`].

use std::time::Duration;

use crate::heartbeat::{test_hang_requested, Heartbeat};
use crate::shutdown::Shutdown;
use crate::store::Db;
use crate::uplink::{LinkState, StatusHandle};

/// How often the store and broker probes run.
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Probes the store writer: an empty job must come back. Beats `hb` when it does.
pub async fn probe_store(db: Db, hb: Heartbeat, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hang_injected = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.recv() => return,
        }
        if !hang_injected && test_hang_requested("store") {
            hang_injected = true;
            log::warn!("test hook: store writer hangs now");
            // Occupies the writer thread for good, like a stuck fsync would.
            drop(db.submit(|_| -> Result<(), crate::store::StoreError> {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }));
        }
        // Waits as long as it takes: a slow answer is fine, no answer is what goes stale.
        tokio::select! {
            r = db.run(|_| Ok(())) => if r.is_ok() { hb.beat() },
            _ = shutdown.recv() => return,
        }
    }
}

/// Probes the local broker: its accept task still runs and its shared state can be locked.
pub async fn probe_broker(
    broker: crate::broker::BrokerHandle,
    accept_task: tokio::task::AbortHandle,
    hb: Heartbeat,
    mut shutdown: Shutdown,
) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.recv() => return,
        }
        if accept_task.is_finished() {
            if !shutdown.is_shutdown() {
                log::error!("watchdog: the local broker's accept loop ended");
                hb.stop();
            }
            return;
        }
        // The lock is a std mutex: take it off the async workers, so a deadlock there
        // shows up as a stale heartbeat instead of a stalled runtime.
        let b = broker.clone();
        let probe = tokio::task::spawn_blocking(move || b.stats());
        tokio::select! {
            r = probe => if r.is_ok() { hb.beat() },
            _ = shutdown.recv() => return,
        }
    }
}

/// Sends `STATUS=` on link changes and `WATCHDOG=1` while every heartbeat is fresh.
pub struct Watchdog {
    pub status: StatusHandle,
    pub endpoint: String,
    pub heartbeats: Vec<Heartbeat>,
}

impl Watchdog {
    pub async fn run(self, mut shutdown: Shutdown) {
        let usec = watchdog_usec();
        let enabled = usec.is_some();
        let usec = usec.unwrap_or(0);
        // Half the timeout, as sd_watchdog_enabled(3) recommends.
        let every = if enabled {
            Duration::from_micros(usec / 2).max(Duration::from_millis(50))
        } else {
            Duration::from_secs(1)
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changes = self.status.changes();
        let mut last_state = None;
        let mut unhealthy: Option<&'static str> = None;
        loop {
            let state = self.status.snapshot();
            if last_state != Some(state.state) {
                last_state = Some(state.state);
                let endpoint = state.endpoint.as_deref().unwrap_or(&self.endpoint);
                let line = status_line(state.state, endpoint, state.last_error.as_deref());
                notify(&format!("STATUS={line}"));
            }
            let stale = self
                .heartbeats
                .iter()
                .find_map(|hb| hb.overdue().map(|d| (hb, d)));
            match (stale, unhealthy) {
                (Some((hb, late)), None) => {
                    log::error!(
                        "watchdog: the {} loop is {:.1}s overdue; no more watchdog pings, so systemd restarts the daemon",
                        hb.name(),
                        late.as_secs_f64()
                    );
                    unhealthy = Some(hb.name());
                }
                (None, Some(name)) => {
                    log::warn!("watchdog: the {name} loop is responsive again");
                    unhealthy = None;
                }
                _ => {}
            }
            if enabled && unhealthy.is_none() {
                notify("WATCHDOG=1");
            }
            tokio::select! {
                _ = tick.tick() => {}
                r = changes.changed() => if r.is_err() { tick.tick().await; },
                _ = shutdown.recv() => return,
            }
        }
    }
}

/// Sends one notification (`"READY=1"`, `"STATUS=..."`) to `NOTIFY_SOCKET`, if set, without
/// ever blocking: a datagram socket whose reader stopped reading (its queue holds ten) would
/// block a blocking sender, and with it an async worker or shutdown. A message that does not
/// fit is dropped; systemd reads promptly, so this only matters when something else listens.
pub fn notify(state: &str) {
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let addr = match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        }
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        log::debug!("sd_notify {state:?}: {e}");
    }
}

/// The watchdog timeout systemd asks for, as sd_watchdog_enabled(3) reads it: `WATCHDOG_USEC`,
/// applying to this process unless `WATCHDOG_PID` names another one. (The sd-notify crate
/// insists on `WATCHDOG_PID`, which systemd sets but a supervisor or test may not.)
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    (usec > 0).then_some(usec)
}

/// The one line `systemctl status` shows.
fn status_line(state: LinkState, endpoint: &str, last_error: Option<&str>) -> String {
    match (state, last_error) {
        (LinkState::Connected, _) => format!("uplink connected to {endpoint}"),
        (LinkState::Draining, _) => format!("uplink connected to {endpoint}, draining the backlog"),
        (LinkState::Connecting, _) => format!("uplink connecting to {endpoint}"),
        (LinkState::BackingOff, Some(e)) => format!("uplink down ({e}); buffering"),
        (LinkState::BackingOff, None) => "uplink down; buffering".into(),
        (LinkState::Stopped, _) => "uplink stopped".into(),
    }
}

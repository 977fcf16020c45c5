//! sd_notify against the real daemon: the test is systemd. It binds a NOTIFY_SOCKET datagram
//! socket and starts the daemon with NOTIFY_SOCKET and WATCHDOG_USEC set, then checks that
//! READY comes only once the local listener accepts, STATUS follows the uplink's state,
//! WATCHDOG pings arrive, and the pings stop when a main loop hangs (debug-build test hook).

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use trainrelay_testkit::ops::*;
use trainrelay_testkit::*;

const WAIT: Duration = Duration::from_secs(60);

/// What the daemon sent, one datagram per entry, with the time it arrived.
struct Notifications {
    rx: mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
}

impl Notifications {
    fn bind(path: &Path) -> Notifications {
        let sock = UnixDatagram::bind(path).expect("bind NOTIFY_SOCKET");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = sock.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                if tx.send((Instant::now(), msg)).is_err() {
                    return;
                }
            }
        });
        Notifications {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a datagram containing `needle`; returns it.
    fn wait_for(&mut self, needle: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((at, msg)) => {
                    self.seen.push((at, msg.clone()));
                    if msg.contains(needle) {
                        return msg;
                    }
                }
                Err(_) => panic!(
                    "no notification with {needle:?} within {within:?}; seen: {:?}",
                    self.seen.iter().map(|(_, m)| m).collect::<Vec<_>>()
                ),
            }
        }
    }

    /// Everything that arrives during `d`.
    fn collect_for(&mut self, d: Duration) -> Vec<String> {
        let deadline = Instant::now() + d;
        let mut out = Vec::new();
        while let Ok((at, msg)) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push((at, msg.clone()));
            out.push(msg);
        }
        out
    }
}

fn notify_env(dir: &Path, hang: &str) -> (Notifications, Vec<(&'static str, String)>) {
    let path = dir.join("notify.sock");
    let n = Notifications::bind(&path);
    let env = vec![
        ("NOTIFY_SOCKET", path.display().to_string()),
        ("WATCHDOG_USEC", "1000000".to_string()),
        ("TRAINRELAY_TEST_HANG", hang.to_string()),
    ];
    (n, env)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_status_and_watchdog_until_the_uplink_hangs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut central = Central::start(tmp.path()).await;
    let hang_file = tmp.path().join("hang-now");
    let (mut notes, env) = notify_env(tmp.path(), &format!("uplink:{}", hang_file.display()));
    let config = relay_config(&central.url(), &store_section(""));
    let started = Instant::now();
    let relay = Daemon::spawn(tmp.path(), &config, &env);

    let ready = tokio::task::block_in_place(|| notes.wait_for("READY=1", WAIT));
    let ready_after = started.elapsed();
    // READY means the listener accepts and the status socket answers.
    std::net::TcpStream::connect(("127.0.0.1", relay.local_port))
        .expect("READY before the local listener accepts");
    assert!(relay.socket().exists(), "READY before the status socket");
    println!(
        "READY {ready:?} {:.0} ms after spawn",
        ready_after.as_secs_f64() * 1000.0
    );

    tokio::task::block_in_place(|| {
        notes.wait_for("STATUS=uplink connected to", WAIT);
        notes.wait_for("WATCHDOG=1", WAIT);
    });
    let pings = tokio::task::block_in_place(|| notes.collect_for(Duration::from_secs(3)));
    assert!(
        pings.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2,
        "{pings:?}"
    );

    // The link goes down and comes back: STATUS says so both times.
    central.kill();
    tokio::task::block_in_place(|| notes.wait_for("STATUS=uplink down", WAIT));
    central.restart().await;
    tokio::task::block_in_place(|| notes.wait_for("STATUS=uplink connected to", WAIT));

    // The uplink loop hangs: the pings must stop (after the heartbeat grace).
    std::fs::write(&hang_file, "").unwrap();
    relay
        .wait_log("test hook: uplink loop hangs now", WAIT)
        .await;
    let hung_at = Instant::now();
    tokio::task::block_in_place(|| loop {
        let got = notes.collect_for(Duration::from_secs(3));
        if !got.iter().any(|m| m.contains("WATCHDOG=1")) {
            break;
        }
        assert!(
            hung_at.elapsed() < WAIT,
            "watchdog pings go on although the uplink loop hangs"
        );
    });
    // ... and stay stopped.
    let later = tokio::task::block_in_place(|| notes.collect_for(Duration::from_secs(4)));
    assert!(!later.iter().any(|m| m.contains("WATCHDOG=1")), "{later:?}");
    assert!(
        relay.log().contains("the uplink loop is"),
        "{}",
        relay.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_stops_when_the_store_writer_hangs() {
    let tmp = tempfile::tempdir().unwrap();
    let hang_file = tmp.path().join("hang-now");
    let (mut notes, env) = notify_env(tmp.path(), &format!("store:{}", hang_file.display()));
    // No central broker: the watchdog must not depend on the link being up.
    let config = relay_config("mqtt://127.0.0.1:9", &store_section(""));
    let relay = Daemon::spawn(tmp.path(), &config, &env);
    tokio::task::block_in_place(|| {
        notes.wait_for("READY=1", WAIT);
        notes.wait_for("STATUS=uplink down", WAIT);
        notes.wait_for("WATCHDOG=1", WAIT);
    });
    std::fs::write(&hang_file, "").unwrap();
    relay
        .wait_log("test hook: store writer hangs now", WAIT)
        .await;
    let hung_at = Instant::now();
    tokio::task::block_in_place(|| loop {
        let got = notes.collect_for(Duration::from_secs(3));
        if !got.iter().any(|m| m.contains("WATCHDOG=1")) {
            break;
        }
        assert!(
            hung_at.elapsed() < WAIT,
            "pings go on although the store hangs"
        );
    });
    assert!(relay.log().contains("the store loop is"), "{}", relay.log());
}

/// A notify socket nobody reads (its queue fills up) must not block the daemon: status still
/// answers and SIGTERM still stops it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_notify_socket_blocks_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("notify.sock");
    let _deaf = UnixDatagram::bind(&path).unwrap();
    let env = [
        ("NOTIFY_SOCKET", path.display().to_string()),
        ("WATCHDOG_USEC", "100000".to_string()),
    ];
    let config = relay_config("mqtt://127.0.0.1:9", &store_section(""));
    let mut relay = Daemon::start(tmp.path(), &config, &env).await;
    // Pings every 50 ms: the socket's queue is long full after a few seconds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = query(&relay.socket(), "status");
    assert_eq!(s["ok"], true, "{s}");
    let exit = relay
        .terminate(WAIT)
        .await
        .expect("did not stop on SIGTERM");
    assert!(exit.success(), "{exit:?}");
}

//! The status socket and `trainrelay status` against the real daemon: correct figures while the
//! central broker is down and after it comes back, error replies for bad requests, the
//! connection bound, and access control by peer credentials (a child running as `nobody`).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use trainrelay_testkit::ops::*;
use trainrelay_testkit::*;

const WAIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_figures_follow_an_outage() {
    let tmp = tempfile::tempdir().unwrap();
    let mut central = Central::start(tmp.path()).await;
    central.stop(); // its port is known and nobody listens there: the central broker is down
    let config = relay_config(&central.url(), &store_section(""))
        .replace("[status]\n", "[status]\ndetail_interval = \"1s\"\n");
    let relay = Daemon::start(tmp.path(), &config, &[]).await;
    let socket = relay.socket();

    let mut ipad = V5Client::connect(relay.local_port, "ipad-cab-1", false).await;
    ipad.subscribe("down/#").await;
    assert_eq!(
        ipad.publish_acked("up/report", payloads("r", 7), None)
            .await,
        7
    );
    assert_eq!(
        ipad.publish_acked("up/ack", payloads("a", 3), None).await,
        3
    );

    let s = query(&socket, "status");
    assert_eq!(s["v"], 1);
    assert_eq!(s["ok"], true, "{s}");
    let st = &s["status"];
    assert_eq!(st["train_id"], "T1");
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    assert_ne!(st["uplink"]["state"], "connected");
    assert_eq!(st["uplink"]["connects"], 0);
    assert!(st["uplink"]["last_error"].is_string(), "{st}");
    assert_eq!(st["uplink"]["endpoint"], central.url());
    assert_eq!(route_depth(&s, "up:up/#"), 10, "{st}");
    // The health document is refreshed every second and on every retry, yet only one copy
    // waits during the outage.
    assert_eq!(route_depth(&s, "status"), 1, "{st}");
    assert!(st["store"]["oldest_age_s"].is_u64(), "{st}");
    assert!(st["counters"]["accepted"].as_u64().unwrap() >= 10);
    assert_eq!(st["counters"]["forwarded"], 0);
    assert_eq!(st["counters"]["expired_dropped"], 0);
    assert_eq!(st["local"]["clients"], 1);
    assert!(st["local"]["messages_in"].as_u64().unwrap() >= 10);

    let c = query(&socket, "clients");
    let clients = c["clients"].as_array().expect("clients");
    assert_eq!(clients.len(), 1, "{c}");
    assert_eq!(clients[0]["client_id"], "ipad-cab-1");
    assert_eq!(clients[0]["protocol"], "5");
    assert_eq!(clients[0]["subscriptions"], 1);

    // The human summary and --json, as a technician and a script see them.
    let out = status_cli(&["--socket", socket.to_str().unwrap()], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(text.contains("uplink    DOWN since"), "{text}");
    assert!(text.contains("last error:"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.contains("up:up/#") && l.contains(" 10 msgs")),
        "{text}"
    );
    assert!(text.contains("iPads     1 connected"), "{text}");
    assert!(text.contains("ipad-cab-1"), "{text}");
    assert!(text.contains("dropped   nothing"), "{text}");
    let out = status_cli(
        &["--config", relay.config_path.to_str().unwrap(), "--json"],
        None,
    );
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    assert_eq!(doc["clients"][0]["client_id"], "ipad-cab-1");
    assert!(doc["status"]["store"]["depth"].as_u64().unwrap() >= 10);

    // The central broker comes back: everything drains and the figures say so.
    central.restart().await;
    let s = eventually(WAIT, "queue drained", || {
        let s = query(&socket, "status");
        (s["status"]["uplink"]["state"] == "connected" && s["status"]["store"]["depth"] == 0)
            .then_some(s)
    })
    .await;
    let st = &s["status"];
    assert_eq!(st["uplink"]["connects"], 1);
    assert!(st["counters"]["forwarded"].as_u64().unwrap() >= 10, "{st}");
    assert!(st["counters"]["acked"].as_u64().unwrap() >= 10, "{st}");
    assert_eq!(route_depth(&s, "up:up/#"), 0);
    let out = status_cli(&["--socket", socket.to_str().unwrap()], None);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("uplink    UP since"), "{text}");

    // The control centre sees the retained health document, fresh after the outage.
    let mut control = V5Client::connect(central.port, "control", true).await;
    control.subscribe("trains/T1/status/detail").await;
    let doc = eventually(WAIT, "a fresh health document", || {
        let p = control.messages.try_recv().ok()?;
        let doc: serde_json::Value = serde_json::from_slice(&p.payload).ok()?;
        (doc["link"] == "connected").then_some(doc)
    })
    .await;
    assert_eq!(doc["train_id"], "T1");
    assert_eq!(doc["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        doc["queue_depth"].is_u64() && doc["uptime_s"].is_u64(),
        "{doc}"
    );

    // reconnect: the uplink drops its connection and comes back.
    let out = status_cli(&["--socket", socket.to_str().unwrap(), "--reconnect"], None);
    assert!(out.status.success());
    eventually(WAIT, "reconnected", || {
        let s = query(&socket, "status");
        (s["status"]["uplink"]["connects"] == 2 && s["status"]["uplink"]["state"] == "connected")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_error_replies() {
    let tmp = tempfile::tempdir().unwrap();
    let config = relay_config("mqtt://127.0.0.1:9", &store_section(""));
    let mut relay = Daemon::start(tmp.path(), &config, &[]).await;
    let socket = relay.socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);

    let cases: [(&[u8], &str); 5] = [
        (b"hello\n", "malformed request"),
        (
            b"{\"v\":1,\"query\":\"format_disk\"}\n",
            "malformed request",
        ),
        (b"{\"v\":7,\"query\":\"status\"}\n", "protocol version 7"),
        (b"{\"v\":1}\n", "malformed request"),
        (b"\xff\xfe{]\n", "malformed request"),
    ];
    for (req, want) in cases {
        let answer = raw_request(&socket, req);
        let v: serde_json::Value = serde_json::from_str(&answer).expect(&answer);
        assert_eq!(v["ok"], false, "{answer}");
        assert!(v["error"].as_str().unwrap().contains(want), "{answer}");
    }
    // Oversized: 5000 bytes without a newline, then more.
    let big = vec![b'x'; 5000];
    let answer = raw_request(&socket, &big);
    assert!(answer.contains("too large"), "{answer}");
    // Silent peer: answered with a timeout error and closed.
    let mut silent = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert!(closed_by_peer(&mut silent));

    // The connection bound: 8 idle peers hold every slot, the 9th is told "busy".
    let idle: Vec<_> = (0..8)
        .map(|_| std::os::unix::net::UnixStream::connect(&socket).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer = raw_request(&socket, b"");
    assert!(answer.contains("busy"), "{answer}");
    drop(idle);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Still fine.
    let s = eventually(WAIT, "status after abuse", || {
        let s = query(&socket, "status");
        (s["ok"] == true).then_some(s)
    })
    .await;
    assert_eq!(s["status"]["train_id"], "T1");
    assert!(relay.alive());

    // Not running: a clear message and exit code 3.
    relay.kill();
    let out = status_cli(
        &[
            "--socket",
            tmp.path().join("nowhere.sock").to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_permitted_users_get_answers() {
    if !require_or_skip(
        "only_permitted_users_get_answers",
        nix::unistd::Uid::effective().is_root(),
        "running a client as nobody needs root (CI runs as root)",
    ) {
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("user nobody")
        .uid
        .as_raw();
    let tmp = tempfile::tempdir().unwrap();
    let config = relay_config("mqtt://127.0.0.1:9", &store_section(""));
    let relay = Daemon::start(tmp.path(), &config, &[]).await;
    let socket = relay.socket();
    // Let nobody reach the socket's directory; the socket itself stays 0660 root:root.
    for dir in [tmp.path(), relay.dir.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let sock = socket.to_str().unwrap();
    let out = status_cli(&["--socket", sock], Some(nobody));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(err.contains("access denied"), "{err}");

    // Even with the file opened to everyone, the peer credentials keep nobody out.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = status_cli(&["--socket", sock, "--json"], Some(nobody));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{err}");
    assert!(
        err.contains(&format!("permission denied: uid {nobody}")),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    relay.wait_log("status socket: refused a peer", WAIT).await;

    // Root still gets its answer.
    let out = status_cli(&["--socket", sock], None);
    assert!(out.status.success());
}

/// CPU time (user + system) of a process so far, from /proc.
fn cpu_time(pid: nix::unistd::Pid) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    Duration::from_millis((f[0] + f[1]) * 1000 / ticks)
}

/// A long outage with a short detail interval: the pending health document must not make the
/// daemon poll the store in a loop (it once did, keeping a core busy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_keeps_the_daemon_idle() {
    let tmp = tempfile::tempdir().unwrap();
    let config = relay_config("mqtt://127.0.0.1:9", &store_section(""))
        .replace("[status]\n", "[status]\ndetail_interval = \"1s\"\n");
    let relay = Daemon::start(tmp.path(), &config, &[]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (cpu0, t0) = (cpu_time(relay.pid()), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let used = cpu_time(relay.pid()) - cpu0;
    let wall = t0.elapsed();
    println!("CPU {used:?} in {wall:?} of outage");
    // Idle is a few tens of milliseconds; a busy loop is close to the whole wall time.
    assert!(used < wall / 3, "CPU {used:?} in {wall:?}: busy while idle");
    assert_eq!(route_depth(&query(&relay.socket(), "status"), "status"), 1);

    // A restart during the outage finds the pending document instead of adding another.
    let mut relay = relay;
    relay.kill();
    let relay = Daemon::start(tmp.path(), &config, &[]).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(route_depth(&query(&relay.socket(), "status"), "status"), 1);
}

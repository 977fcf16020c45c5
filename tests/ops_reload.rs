//! SIGHUP against the real daemon: a valid new config changes route TTLs (seen in what
//! expires) and the log level; an invalid one is rejected naming the key, and the daemon keeps
//! running on the old config.

use std::time::Duration;

use nix::sys::signal::Signal;
use trainrelay_testkit::ops::*;
use trainrelay_testkit::*;

const WAIT: Duration = Duration::from_secs(60);

fn config(ttl: &str, level: &str, extra_route: &str) -> String {
    Config::new("mqtt://127.0.0.1:9")
        .store("sweep_interval = \"200ms\"")
        .set("log", "level", &format!("\"{level}\""))
        .append(&format!(
            "[[route]]\ndirection = \"up\"\nlocal = \"up/#\"\nremote = \"trains/T1/up/#\"\n\
             ttl = \"{ttl}\"\n{extra_route}"
        ))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_valid_and_rejects_invalid() {
    let tmp = tempfile::tempdir().unwrap();
    // No RUST_LOG, so that log.level governs.
    let mut relay = Daemon::start(
        tmp.path(),
        &config("1h", "info", ""),
        &[("RUST_LOG", String::new())],
    )
    .await;
    let socket = relay.socket();
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    assert_eq!(ipad.publish_acked("up/x", payloads("a", 3), None).await, 3);

    // Valid: a shorter TTL for messages accepted from now on, and a quieter log.
    let text = config("1s", "warn,trainrelay::reload=info", "")
        .replace("{local_port}", &relay.local_port.to_string())
        .replace("{dir}", &relay.dir.display().to_string());
    std::fs::write(&relay.config_path, text).unwrap();
    relay.signal(Signal::SIGHUP);
    relay.wait_log("applied route[0].ttl", WAIT).await;
    assert!(relay.log().contains("log.level"), "{}", relay.log());
    assert_eq!(ipad.publish_acked("up/x", payloads("b", 2), None).await, 2);
    // The two new ones expire and are swept; the three old ones keep their hour.
    let s = eventually(WAIT, "new messages expired", || {
        let s = query(&socket, "status");
        (s["status"]["counters"]["expired_dropped"] == 2).then_some(s)
    })
    .await;
    assert_eq!(route_depth(&s, "up:up/#"), 3, "{s}");
    // At warn, an iPad connecting is no longer logged.
    let before = relay.log().matches("connected from").count();
    let _other = V5Client::connect(relay.local_port, "ipad-quiet", true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(relay.log().matches("connected from").count(), before);

    // Invalid: rejected with the key named, old config kept.
    let good = std::fs::read_to_string(&relay.config_path).unwrap();
    std::fs::write(
        &relay.config_path,
        good.replace("ttl = \"1s\"", "ttl = \"1s\"\nqos = 7"),
    )
    .unwrap();
    relay.signal(Signal::SIGHUP);
    relay.wait_log("route[0].qos", WAIT).await;
    assert!(relay.log().contains("keeping the running config"));
    std::fs::write(
        &relay.config_path,
        "train_id = \"T1\"\n[store]\nmax_byte = 1\n",
    )
    .unwrap();
    relay.signal(Signal::SIGHUP);
    relay.wait_log("max_byte", WAIT).await;

    // A key that needs a restart is named as such, and the rest still applies.
    std::fs::write(
        &relay.config_path,
        good.replace("sweep_interval = \"200ms\"", "sweep_interval = \"300ms\""),
    )
    .unwrap();
    relay.signal(Signal::SIGHUP);
    relay.wait_log("[store] changed", WAIT).await;

    // Still running, still the 1 s TTL, still answering.
    assert!(relay.alive());
    assert_eq!(ipad.publish_acked("up/x", payloads("c", 1), None).await, 1);
    eventually(WAIT, "third expiry", || {
        let s = query(&socket, "status");
        (s["status"]["counters"]["expired_dropped"] == 3).then_some(())
    })
    .await;
}

/// A route's `key` (like `version`, `conflate`, `state`, `snapshot_topics`) needs a restart:
/// a SIGHUP that changes it says so naming the route and keeps the old value, whether it comes
/// alone or beside a `ttl` change that is applied. Seen in conflation: with the old key
/// (`topic`) two messages of different vehicles on one topic still replace each other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_keeps_route_keys_that_need_a_restart() {
    use rumqttc::v5::mqttbytes::v5::PublishProperties;
    let tmp = tempfile::tempdir().unwrap();
    let relay = Daemon::start(
        tmp.path(),
        &config("1h", "info", "conflate = \"latest\""),
        &[],
    )
    .await;
    let socket = relay.socket();
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    let rewrite = |ttl: &str, extra: &str| {
        let text = config(ttl, "info", extra)
            .replace("{local_port}", &relay.local_port.to_string())
            .replace("{dir}", &relay.dir.display().to_string());
        std::fs::write(&relay.config_path, text).unwrap();
    };
    let vehicle = |v: &str| PublishProperties {
        user_properties: vec![("vehicle".into(), v.into())],
        ..Default::default()
    };
    let warning = "route up:up/#: changing `key` needs a restart; keeping the old value";

    // The key alone.
    rewrite("1h", "conflate = \"latest\"\nkey = \"vehicle\"");
    relay.signal(Signal::SIGHUP);
    relay.wait_log(warning, WAIT).await;
    assert!(!relay.log().contains("nothing changed"), "{}", relay.log());
    for v in ["v1", "v2"] {
        ipad.publish_acked("up/pos", payloads(v, 1), Some(vehicle(v)))
            .await;
    }
    let s = query(&socket, "status");
    assert_eq!(route_depth(&s, "up:up/#"), 1, "conflated by topic: {s}");

    // The key beside a ttl change: the ttl applies, the key does not.
    rewrite("2h", "conflate = \"latest\"\nkey = \"vehicle\"");
    relay.signal(Signal::SIGHUP);
    relay.wait_log("applied route[0].ttl", WAIT).await;
    assert_eq!(relay.log().matches(warning).count(), 2, "{}", relay.log());
    for v in ["v3", "v4"] {
        ipad.publish_acked("up/pos", payloads(v, 1), Some(vehicle(v)))
            .await;
    }
    let s = query(&socket, "status");
    assert_eq!(
        route_depth(&s, "up:up/#"),
        1,
        "still conflated by topic: {s}"
    );
}

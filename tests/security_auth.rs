//! Authentication and ACLs of the local broker, end to end: the real daemon, a real
//! Mosquitto as the central broker, raw MQTT bytes for the iPads so every reason code is seen.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trainrelay_testkit::security::{devices, secure_config, Raw};
use trainrelay_testkit::{Central, Relay, V5Client};

const T: Duration = Duration::from_secs(20);

fn shutdown_counters(relay: &mut Relay) -> String {
    relay.terminate();
    relay
        .log()
        .lines()
        .find(|l| l.contains("local broker counters:"))
        .expect("no counters line at shutdown")
        .to_string()
}

fn counter(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// Waits until the relay is subscribed upstream: a retained probe published centrally
/// reaches a local subscriber.
async fn downlink_reaches(central: &V5Client, ipad: &mut Raw, tag: &str) -> Duration {
    let start = Instant::now();
    let topic = format!("trains/T1/down/{tag}");
    loop {
        central
            .client
            .publish(
                &topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                tag.as_bytes().to_vec(),
            )
            .await
            .unwrap();
        let round = Instant::now() + Duration::from_secs(2);
        while let Some(left) = round.checked_duration_since(Instant::now()) {
            let Some(p) = ipad.read_kind(3, left).await else {
                break;
            };
            let (t, payload) = p.publish(ipad.v5);
            assert!(
                t != "down/speed"
                    && !t.starts_with("fleet/broadcast/x")
                    && !t.contains("device/ipad2/order"),
                "a forged message reached an iPad: {t} {payload:?}"
            );
            if t == format!("down/{tag}") {
                assert_eq!(payload, tag.as_bytes());
                return start.elapsed();
            }
        }
        assert!(start.elapsed() < T * 2, "down/{tag} never reached the iPad");
    }
}

/// (v5?, client id, user, password, expected CONNACK code, what)
type Case<'a> = (bool, &'a str, Option<&'a str>, Option<&'a str>, u8, &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_clients_get_the_right_code_and_others_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let local = devices(&[("ipad1", "pw-one", None), ("ipad2", "pw-two", None)]);
    let mut relay = Relay::start(dir.path(), &secure_config(&central.url(), "", &local)).await;
    let control = V5Client::connect(central.port, "control", true).await;

    // A well-behaved iPad, connected before and throughout.
    let mut good = Raw::open(relay.local_port).await;
    assert_eq!(
        good.login(true, "ipad2", Some("ipad2"), Some("pw-two"))
            .await,
        Some(0)
    );
    assert_eq!(good.subscribe(1, "down/#").await, 1);
    downlink_reaches(&control, &mut good, "before").await;

    // (v5?, client id, user, password, expected code, what)
    let cases: &[Case] = &[
        (false, "anon", None, None, 0x05, "3.1.1 without credentials"),
        (true, "anon", None, None, 0x87, "v5 without credentials"),
        (
            false,
            "ipad1",
            Some("ipad1"),
            Some("wrong"),
            0x04,
            "3.1.1 wrong password",
        ),
        (
            true,
            "ipad1",
            Some("ipad1"),
            Some("wrong"),
            0x86,
            "v5 wrong password",
        ),
        (
            true,
            "ipad1",
            Some("ipad1"),
            None,
            0x86,
            "v5 user without password",
        ),
        (
            true,
            "ghost",
            Some("ghost"),
            Some("pw-one"),
            0x86,
            "v5 unknown user",
        ),
        (
            false,
            "ipad2",
            Some("ipad1"),
            Some("pw-one"),
            0x02,
            "3.1.1 another device's client id",
        ),
        (
            true,
            "ipad2",
            Some("ipad1"),
            Some("pw-one"),
            0x85,
            "v5 another device's client id",
        ),
        (
            false,
            "ipad1-a\0b",
            Some("ipad1"),
            Some("pw-one"),
            0x02,
            "3.1.1 client id with NUL",
        ),
        (
            true,
            "ipad1-\u{7f}",
            Some("ipad1"),
            Some("pw-one"),
            0x85,
            "v5 client id with DEL",
        ),
        (
            true,
            "ipad1-\u{85}",
            Some("ipad1"),
            Some("pw-one"),
            0x85,
            "v5 client id with a C1 control character",
        ),
    ];
    let long_id = format!(
        "ipad1-{}",
        "x".repeat(trainrelay::broker::MAX_CLIENT_ID - 5)
    );
    let mut all: Vec<Case> = cases.to_vec();
    all.push((
        true,
        &long_id,
        Some("ipad1"),
        Some("pw-one"),
        0x85,
        "v5 client id one byte over MAX_CLIENT_ID",
    ));
    for (v5, id, user, pass, want, what) in all {
        let mut c = Raw::open(relay.local_port).await;
        let started = Instant::now();
        let got = c.login(v5, id, user, pass).await;
        println!("{what}: CONNACK {got:02x?} after {:?}", started.elapsed());
        assert_eq!(got, Some(want), "{what}");
        let (closed, _) = c.closed_within(T).await;
        assert!(closed, "{what}: connection not closed after the refusal");
    }
    // The right password works, also after the failures above.
    let mut ok = Raw::open(relay.local_port).await;
    assert_eq!(
        ok.login(false, "ipad1-web", Some("ipad1"), Some("pw-one"))
            .await,
        Some(0)
    );

    // The iPad that was connected all along still gets the downlink.
    let latency = downlink_reaches(&control, &mut good, "after").await;
    println!("downlink after the refusals reached the iPad in {latency:?}");

    let line = shutdown_counters(&mut relay);
    println!("{line}");
    // Wrong passwords, unknown users and anonymous logins; a right password with a client id
    // that is not the device's is not an authentication failure.
    assert_eq!(counter(&line, "auth_failures"), 6, "{line}");
    assert_eq!(counter(&line, "bad_client_ids"), 6, "{line}");
}

/// Refusals for a client id that is not the device's (right password) do not slow down later
/// logins from that address, and a device with `any_client_id` gets in with an id of its own
/// choosing, though never with another device's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_client_id_is_not_a_failed_login_and_any_client_id_works() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let mut local = devices(&[("ipad1", "pw-one", None), ("app", "pw-app", None)]);
    local.push_str("any_client_id = true\n");
    let relay = Relay::start(dir.path(), &secure_config(&central.url(), "", &local)).await;
    for i in 0..6 {
        let mut c = Raw::open_from([127, 0, 0, 4], relay.local_port)
            .await
            .unwrap();
        let v5 = i % 2 == 0;
        let got = c.login(v5, "paho-xyz", Some("ipad1"), Some("pw-one")).await;
        assert_eq!(got, Some(if v5 { 0x85 } else { 0x02 }), "attempt {i}");
    }
    // Six counted failures would make the next refusal wait 6.4 s; it waits the first step.
    let mut c = Raw::open_from([127, 0, 0, 4], relay.local_port)
        .await
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        c.login(true, "ipad1", Some("ipad1"), Some("guess")).await,
        Some(0x86)
    );
    let delay = started.elapsed();
    println!("first wrong password after six wrong client ids refused after {delay:?}");
    assert!(delay < Duration::from_millis(1600), "{delay:?}");
    let log = relay.log();
    assert!(
        log.contains("'paho-xyz'") && log.contains("not one user \"ipad1\" may use"),
        "no log line naming the refused id"
    );

    // any_client_id: any id, but not ipad1's.
    let mut app = Raw::open(relay.local_port).await;
    assert_eq!(
        app.login(true, "Cab iPad 3", Some("app"), Some("pw-app"))
            .await,
        Some(0)
    );
    let mut app4 = Raw::open(relay.local_port).await;
    assert_eq!(
        app4.login(false, "paho/123", Some("app"), Some("pw-app"))
            .await,
        Some(0)
    );
    let mut thief = Raw::open(relay.local_port).await;
    assert_eq!(
        thief
            .login(true, "ipad1-web", Some("app"), Some("pw-app"))
            .await,
        Some(0x85)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_from_one_address_are_slowed_down() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let local = devices(&[("ipad1", "pw-one", None)]);
    let relay = Relay::start(dir.path(), &secure_config(&central.url(), "", &local)).await;
    let mut times = Vec::new();
    for _ in 0..6 {
        let mut c = Raw::open_from([127, 0, 0, 3], relay.local_port)
            .await
            .unwrap();
        let started = Instant::now();
        assert_eq!(
            c.login(true, "ipad1", Some("ipad1"), Some("guess")).await,
            Some(0x86)
        );
        times.push(started.elapsed());
    }
    println!("refusal delays of 6 consecutive failures: {times:?}");
    // 100 ms, 200, ..., 3.2 s by design: the sixth waits at least 3.2 s.
    assert!(times[5] >= Duration::from_millis(3200), "{times:?}");
    // Another address is not slowed down by them.
    let mut other = Raw::open(relay.local_port).await;
    let started = Instant::now();
    assert_eq!(
        other
            .login(true, "ipad1", Some("ipad1"), Some("pw-one"))
            .await,
        Some(0)
    );
    println!(
        "a login from another address meanwhile: {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipads_may_not_speak_for_the_control_centre() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let local = devices(&[
        ("ipad1", "pw-one", None),
        ("ipad2", "pw-two", None),
        ("ipad3", "pw-three", None),
    ]);
    let mut relay = Relay::start(dir.path(), &secure_config(&central.url(), "", &local)).await;
    let control = V5Client::connect(central.port, "control", true).await;

    let mut victim = Raw::open(relay.local_port).await;
    assert_eq!(
        victim
            .login(true, "ipad2", Some("ipad2"), Some("pw-two"))
            .await,
        Some(0)
    );
    assert_eq!(victim.subscribe(1, "down/#").await, 1);
    assert_eq!(victim.subscribe(2, "fleet/broadcast/#").await, 1);
    let mut victim4 = Raw::open(relay.local_port).await;
    assert_eq!(
        victim4
            .login(false, "ipad3", Some("ipad3"), Some("pw-three"))
            .await,
        Some(0)
    );
    assert_eq!(victim4.subscribe(1, "down/#").await, 1);
    downlink_reaches(&control, &mut victim, "ready").await;
    downlink_reaches(&control, &mut victim4, "ready4").await;

    // v5: refused with PUBACK 0x87.
    let mut attacker = Raw::open(relay.local_port).await;
    assert_eq!(
        attacker
            .login(true, "ipad1", Some("ipad1"), Some("pw-one"))
            .await,
        Some(0)
    );
    assert_eq!(
        attacker.publish_qos1(1, "down/speed", b"20").await,
        Some(0x87)
    );
    assert_eq!(
        attacker.publish_qos1(2, "fleet/broadcast/x", b"stop").await,
        Some(0x87)
    );
    assert_eq!(
        attacker
            .publish_qos1(3, "down/device/ipad2/order", b"x")
            .await,
        Some(0x87)
    );
    // Outside the uplink routes: refused by the default ACL.
    assert_eq!(
        attacker.publish_qos1(4, "other/topic", b"x").await,
        Some(0x87)
    );
    // Subscriptions beyond the defaults: refused (not narrowed).
    for (i, f) in ["#", "+/speed", "$SYS/#", "fleet/#", "up/#", "+/#"]
        .iter()
        .enumerate()
    {
        let code = attacker.subscribe(10 + i as u16, f).await;
        println!("ipad1 SUBSCRIBE {f}: SUBACK {code:#04x}");
        assert_eq!(code, 0x87, "subscribe {f}");
    }
    assert_eq!(attacker.subscribe(30, "down/+/limits").await, 1);
    assert_eq!(attacker.subscribe(31, "down/device/ipad1/#").await, 1);
    // 3.1.1: acknowledged and dropped.
    let mut attacker4 = Raw::open(relay.local_port).await;
    assert_eq!(
        attacker4
            .login(false, "ipad1-old", Some("ipad1"), Some("pw-one"))
            .await,
        Some(0)
    );
    assert_eq!(
        attacker4.publish_qos1(1, "down/speed", b"20").await,
        Some(0)
    );
    assert_eq!(attacker4.subscribe(2, "#").await, 0x80);

    // Allowed traffic still flows: up to the central broker, down to the iPads.
    let mut control_up = V5Client::connect(central.port, "control-up", true).await;
    control_up.subscribe("trains/T1/up/#").await;
    assert_eq!(
        attacker.publish_qos1(40, "up/ack", b"order 17").await,
        Some(0)
    );
    let got = control_up.collect(1, T).await;
    assert_eq!(got.len(), 1, "the allowed uplink message did not arrive");

    // Nothing forged reached the other iPads: the next publish they see is the real one.
    downlink_reaches(&control, &mut victim, "real").await;
    downlink_reaches(&control, &mut victim4, "real4").await;
    let line = shutdown_counters(&mut relay);
    println!("{line}");
    assert!(counter(&line, "denied_publish") >= 5, "{line}");
    assert!(counter(&line, "denied_subscribe") >= 7, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_files_readable_by_everyone_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cred = dir.path().join("devices.toml");
    let hash = trainrelay::password::hash_password(b"pw").unwrap();
    std::fs::write(
        &cred,
        format!("[[device]]\nname = \"ipad1\"\npassword_hash = \"{hash}\"\n"),
    )
    .unwrap();
    let config = dir.path().join("trainrelay.toml");
    std::fs::write(
        &config,
        format!(
            "train_id = \"T1\"\n[local]\ncredentials_file = \"{}\"\n",
            cred.display()
        ),
    )
    .unwrap();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_trainrelay"))
            .arg("check-config")
            .arg(&config)
            .output()
            .unwrap()
    };
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{err}");
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("local.credentials_file") && err.contains(&cred.display().to_string()));
    std::fs::set_permissions(&cred, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = check();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// docs/security.md "Secret files": `uplink.password_file` readable by every user is refused at load,
/// by `check-config` and by `run` alike (exit 2, naming the key and the file); once private it
/// is accepted.
#[test]
fn uplink_password_file_readable_by_everyone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("central.password");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let config = dir.path().join("trainrelay.toml");
    std::fs::write(
        &config,
        format!(
            "train_id = \"T1\"\n[local]\nlisten = \"127.0.0.1:{}\"\n[uplink]\nurl = \"mqtt://127.0.0.1:{}\"\nusername = \"T1\"\npassword_file = \"{}\"\n[store]\npath = \"{}\"\n[status]\nsocket = \"{}\"\n",
            trainrelay_testkit::free_port(),
            trainrelay_testkit::free_port(),
            secret.display(),
            dir.path().join("store.db").display(),
            dir.path().join("status.sock").display(),
        ),
    )
    .unwrap();
    let trainrelay = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trainrelay"));
        cmd.args(args).current_dir(dir.path());
        // `run` refuses before it starts anything; the timeout only fails a hung test.
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("trainrelay {args:?} did not exit within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    };
    let config_arg = config.display().to_string();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    for args in [
        vec!["check-config", config_arg.as_str()],
        vec!["run", "--config", config_arg.as_str()],
    ] {
        let out = trainrelay(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        println!("{args:?}: {err}");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("uplink.password_file") && err.contains(&secret.display().to_string()),
            "{args:?} names neither the key nor the file: {err}"
        );
    }
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = trainrelay(&["check-config", config_arg.as_str()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn passwd_prints_a_hash_that_verifies() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_trainrelay"))
        .arg("passwd")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"correct horse\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    let hash = hash.trim();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(trainrelay::password::check_hash(hash).is_ok());
    assert!(!hash.contains("correct horse"));
}

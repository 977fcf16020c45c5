//! Relay acceptance tests: a real Mosquitto as the central broker, the real daemon, real
//! clients. Each test asserts what arrives where.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::PublishProperties;
use trainrelay_testkit::*;

const QUIET: Duration = Duration::from_secs(15);

fn assert_complete_in_order(order: &[u64], n: u64, what: &str) {
    let missing: Vec<u64> = (0..n).filter(|i| !order.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "{what}: {} lost, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "{what}: order broken"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_delivers_v311_and_v5_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let relay = Relay::start(
        dir.path(),
        &relay_config(&central.url(), &store_section("")),
    )
    .await;
    let mut control = V5Client::connect(central.port, "control", false).await;
    control.subscribe("trains/T1/up/#").await;

    let mut v4 = V4Client::connect(relay.local_port, "ipad-v4", true).await;
    let mut v5 = V5Client::connect(relay.local_port, "ipad-v5", true).await;
    v4.publish_acked("up/v4", payloads("v4", 1000)).await;
    v5.publish_acked("up/v5", payloads("v5", 1000), None).await;

    let got = control.collect(2000, QUIET).await;
    for m in &got {
        let topic = String::from_utf8_lossy(&m.topic);
        assert!(
            topic == "trains/T1/up/v4" || topic == "trains/T1/up/v5",
            "unexpected topic {topic}"
        );
    }
    let (a, dup_a) = sequence(&got, "v4");
    let (b, dup_b) = sequence(&got, "v5");
    assert_complete_in_order(&a, 1000, "v3.1.1 publisher");
    assert_complete_in_order(&b, 1000, "v5 publisher");
    println!("duplicates: v3.1.1 {dup_a}, v5 {dup_b}");
    // Every forwarded message carries the relay's stable message id.
    let has_id = got.iter().all(|m| {
        m.properties.as_ref().is_some_and(|p| {
            p.user_properties
                .iter()
                .any(|(k, _)| k == "trainrelay-msg-id")
        })
    });
    assert!(has_id, "a forwarded message lacks trainrelay-msg-id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_delivers_live_and_retained_state() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let relay = Relay::start(
        dir.path(),
        &relay_config(&central.url(), &store_section("")),
    )
    .await;
    let mut v4 = V4Client::connect(relay.local_port, "ipad-v4", true).await;
    let mut v5 = V5Client::connect(relay.local_port, "ipad-v5", true).await;
    v4.subscribe("down/#").await;
    v5.subscribe("down/#").await;
    // Wait until the relay is connected upstream and subscribed.
    let control = V5Client::connect(central.port, "control", true).await;
    let mut probe = V5Client::connect(central.port, "probe", true).await;
    probe.subscribe("trains/T1/status").await;
    let online = probe.collect(1, Duration::from_secs(20)).await;
    assert_eq!(
        online.first().map(|p| p.payload.as_ref()),
        Some(&b"online"[..])
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    control
        .client
        .publish(
            "trains/T1/down/speed",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            true,
            "80",
        )
        .await
        .unwrap();
    control
        .client
        .publish(
            "fleet/broadcast/news",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "hello",
        )
        .await
        .unwrap();
    let got4 = v4.collect(1, QUIET).await;
    assert_eq!(
        got4.first().map(|p| (p.topic.as_str(), p.payload.as_ref())),
        Some(("down/speed", &b"80"[..]))
    );
    let got5 = v5.collect(1, QUIET).await;
    assert_eq!(got5.first().map(|p| p.payload.as_ref()), Some(&b"80"[..]));

    let mut late = V5Client::connect(relay.local_port, "ipad-late", true).await;
    late.subscribe("down/#").await;
    let retained = late.collect(1, QUIET).await;
    let first = retained
        .first()
        .expect("late subscriber got no retained state");
    assert_eq!(first.payload.as_ref(), b"80");
    assert!(
        first.retain,
        "retained state must arrive with the retain flag"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_outage_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut central = Central::start(dir.path()).await;
    let relay = Relay::start(
        dir.path(),
        &relay_config(&central.url(), &store_section("")),
    )
    .await;
    let mut control = V5Client::connect(central.port, "control", false).await;
    control.subscribe("trains/T1/up/#").await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;

    ipad.publish_acked("up/x", payloads("m", 500), None).await;
    central.stop();
    let publish = ipad.publish_acked("up/x", payloads("m", 2000).into_iter().skip(500), None);
    let outage = tokio::time::sleep(Duration::from_secs(10));
    tokio::join!(publish, outage);
    central.restart().await;
    // Central exits some milliseconds after the stop signal: what reached it meanwhile was
    // delivered to this connection already, and counts as arrived.
    let mut got = control.collect(4000, Duration::from_millis(200)).await;
    drop(control);
    let mut control = V5Client::connect(central.port, "control", false).await;

    got.extend(control.collect(4000, QUIET).await);
    let (order, dups) = sequence(&got, "m");
    // Messages from before the outage may have reached the old connection only.
    let missing: Vec<u64> = (500..2000).filter(|i| !order.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "lost during the outage: {}",
        missing.len()
    );
    assert!(order.windows(2).all(|w| w[0] < w[1]), "order broken");
    println!("central outage: {} received, {dups} duplicates", got.len());
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_sigkill_keeps_every_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let mut central = Central::down_with_subscriber(dir.path(), "trains/T1/up/#").await;

    let mut relay = Relay::start(
        dir.path(),
        &relay_config(&central.url(), &store_section("")),
    )
    .await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    let acked = ipad.publish_acked("up/x", payloads("k", 2000), None).await;
    assert_eq!(acked, 2000);
    relay.kill();
    drop(ipad);
    relay.restart().await;
    central.restart().await;
    let mut control = V5Client::connect(central.port, "control", false).await;
    let got = control.collect(2000, QUIET).await;
    let (order, dups) = sequence(&got, "k");
    assert_complete_in_order(&order, 2000, "after SIGKILL");
    println!("relay SIGKILL: {dups} duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_never_forwarded() {
    let dir = tempfile::tempdir().unwrap();
    let mut central = Central::start(dir.path()).await;
    let control = V5Client::connect(central.port, "control", false).await;
    control.subscribe("trains/T1/#").await;
    drop(control);
    central.stop();

    let extra = format!(
        "{}\n[[route]]\ndirection = \"up\"\nlocal = \"short/#\"\nremote = \"trains/T1/short/#\"\nttl = \"2s\"\n",
        store_section("")
    );
    let relay = Relay::start(dir.path(), &relay_config(&central.url(), &extra)).await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    let expiring = PublishProperties {
        message_expiry_interval: Some(2),
        ..Default::default()
    };
    let lasting = PublishProperties {
        message_expiry_interval: Some(600),
        ..Default::default()
    };
    ipad.publish_acked("up/x", payloads("expiring", 20), Some(expiring))
        .await;
    ipad.publish_acked("short/x", payloads("ttl", 20), None)
        .await;
    ipad.publish_acked("up/x", payloads("lasting", 20), Some(lasting))
        .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    central.restart().await;
    let mut control = V5Client::connect(central.port, "control", false).await;
    let got = control.collect(60, Duration::from_secs(8)).await;
    assert_eq!(
        sequence(&got, "expiring").0.len(),
        0,
        "a message with v5 expiry 2 s was delivered"
    );
    assert_eq!(
        sequence(&got, "ttl").0.len(),
        0,
        "a message with route TTL 2 s was delivered"
    );
    let lasting: Vec<_> = got
        .iter()
        .filter(|m| m.payload.starts_with(b"lasting-"))
        .collect();
    assert_eq!(lasting.len(), 20);
    for m in lasting {
        let left = m
            .properties
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .expect("forwarded message lost its expiry");
        assert!(left < 600 && left > 500, "remaining expiry {left}");
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_config_files_exit_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("train_id = \"T1\"\n[store]\nmax_byte = \"1MiB\"\n", "max_byte"),
        ("train_id = \"T1\"\n[[route]]\ndirection = \"up\"\nlocal = \"up/#/x\"\nremote = \"r/#\"\n", "route[0].local"),
        ("train_id = \"T1\"\n[uplink]\nkeep_alive = \"often\"\n", "keep_alive"),
        ("train_id = \"T1\"\n[store]\nwhen_full = \"explode\"\n", "when_full"),
        ("train_id = \"T1\"\n[[route]]\ndirection = \"up\"\nlocal = \"a/#\"\nremote = \"b/#\"\nqos = 2\n", "route[0].qos"),
        ("train_id = \"T1\"\n[uplink]\nurl = \"http://x\"\n", "uplink.url"),
        ("train_id = \n", "line 1"),
    ];
    for (i, (text, key)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&file, text).unwrap();
        for args in [
            vec!["check-config".to_string()],
            vec!["run".into(), "--config".into()],
        ] {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_trainrelay"))
                .args(&args)
                .arg(&file)
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?} {text:?}: {err}");
            assert!(
                err.contains(key),
                "{args:?} {text:?}: message does not name {key}: {err}"
            );
            assert!(
                err.contains(&file.display().to_string()),
                "message does not name the file: {err}"
            );
        }
    }
}

/// A new user's three-line config lists no `[[route]]`: the built-in routes apply (and both
/// `check-config` and the daemon say so), so the iPads' messages reach the central broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_without_routes_uses_the_builtin_routes() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let config = format!(
        "train_id = \"T7\"\n[local]\nlisten = \"127.0.0.1:{{local_port}}\"\n[uplink]\nurl = \"{}\"\n",
        central.url()
    );
    let relay = Relay::start(dir.path(), &config).await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_trainrelay"))
        .arg("check-config")
        .arg(&relay.config_path)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("no [[route]] in") && said.contains("up/# -> trains/T7/up/#"),
        "check-config does not tell about the built-in routes: {said}"
    );

    let mut control = V5Client::connect(central.port, "control", false).await;
    control.subscribe("trains/T7/up/#").await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    ipad.publish_acked("up/report", payloads("r", 3), None)
        .await;
    let got = control.collect(3, QUIET).await;
    let (order, _) = sequence(&got, "r");
    assert_complete_in_order(&order, 3, "three-line config");
    assert!(got.iter().all(|m| &m.topic[..] == b"trains/T7/up/report"));
    let log = relay.log();
    assert!(
        log.contains("no [[route]] in") && log.contains("up/# -> trains/T7/up/#"),
        "the daemon does not log the built-in routes: {log}"
    );
}

/// A v5 publisher learns when neither a route nor a local subscriber takes its message
/// (PUBACK 0x10, a success code); routed or locally subscribed messages get 0x00.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrouted_publish_without_subscriber_gets_no_matching_subscribers() {
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let relay = Relay::start(
        dir.path(),
        &relay_config(&central.url(), &store_section("")),
    )
    .await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    assert_eq!(
        ipad.publish_reasons("elsewhere/x", payloads("n", 2)).await,
        vec![PubAckReason::NoMatchingSubscribers; 2],
        "no route, no subscriber"
    );
    assert_eq!(
        ipad.publish_reasons("up/x", payloads("u", 2)).await,
        vec![PubAckReason::Success; 2],
        "routed"
    );
    let mut local = V5Client::connect(relay.local_port, "listener", true).await;
    local.subscribe("elsewhere/#").await;
    assert_eq!(
        ipad.publish_reasons("elsewhere/x", payloads("s", 2)).await,
        vec![PubAckReason::Success; 2],
        "a local subscriber takes it"
    );
    assert_eq!(local.collect(2, QUIET).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_full_policies_behave_as_documented() {
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    for policy in ["drop_oldest", "reject_new"] {
        let dir = tempfile::tempdir().unwrap();
        let mut central = Central::down_with_subscriber(dir.path(), "trains/T1/up/#").await;
        let store = store_section(&format!("max_bytes = \"4KiB\"\nwhen_full = \"{policy}\""));
        let relay = Relay::start(dir.path(), &relay_config(&central.url(), &store)).await;
        let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
        // 200-byte payloads: about a dozen fit in 4 KiB.
        let big: Vec<Vec<u8>> = (0..100)
            .map(|i| {
                let mut p = format!("f-{i}").into_bytes();
                p.push(b' ');
                p.resize(200, b'.');
                p
            })
            .collect();
        let reasons = ipad.publish_reasons("up/x", big).await;
        let accepted = reasons
            .iter()
            .filter(|r| **r == PubAckReason::Success)
            .count();
        let refused = reasons
            .iter()
            .filter(|r| **r == PubAckReason::QuotaExceeded)
            .count();
        central.restart().await;
        let mut control = V5Client::connect(central.port, "control", false).await;
        let got = control.collect(100, Duration::from_secs(8)).await;
        let seqs: Vec<u64> = got
            .iter()
            .filter_map(|m| {
                let text = String::from_utf8_lossy(&m.payload).into_owned();
                text.strip_prefix("f-")?.split(' ').next()?.parse().ok()
            })
            .collect();
        println!(
            "{policy}: {accepted} acknowledged, {refused} refused with 0x97, {} delivered",
            seqs.len()
        );
        assert!(
            !seqs.is_empty() && seqs.len() < 100,
            "{policy}: {} delivered",
            seqs.len()
        );
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{policy}: order broken"
        );
        match policy {
            "drop_oldest" => {
                assert_eq!(accepted, 100, "drop_oldest acknowledges everything");
                // The newest survive.
                assert_eq!(*seqs.last().unwrap(), 99);
                let first = seqs[0];
                assert_eq!(seqs, (first..100).collect::<Vec<_>>());
            }
            _ => {
                assert_eq!(accepted + refused, 100);
                assert!(refused > 0, "reject_new refused nothing");
                // The oldest survive: exactly those acknowledged.
                assert_eq!(seqs, (0..accepted as u64).collect::<Vec<_>>());
                assert!(reasons[..accepted]
                    .iter()
                    .all(|r| *r == PubAckReason::Success));
            }
        }
        drop(relay);
    }
}

/// docs/guarantees.md "Store full" for an MQTT 3.1.1 iPad, which cannot be refused: under `reject_new` the
/// relay withholds the PUBACK and closes the connection (seen on the wire with a raw client),
/// and a real 3.1.1 client with a persistent session keeps the message and sends it again on
/// every reconnect; once the central broker is back and the queue drained, the resend is
/// accepted and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_full_mqtt311_publisher_is_not_acknowledged_until_there_is_room() {
    use rumqttc::v5::mqttbytes::v5::PubAckReason;
    use trainrelay_testkit::security::{publish_packet, Raw};
    let dir = tempfile::tempdir().unwrap();
    let mut central = Central::down_with_subscriber(dir.path(), "trains/T1/up/#").await;
    let store = store_section("max_bytes = \"4KiB\"\nwhen_full = \"reject_new\"");
    let relay = Relay::start(dir.path(), &relay_config(&central.url(), &store)).await;
    // Fill the store with 200-byte messages until a v5 publisher is refused (0x97).
    let mut filler = V5Client::connect(relay.local_port, "filler", true).await;
    let fill: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            let mut p = format!("f-{i} ").into_bytes();
            p.resize(200, b'.');
            p
        })
        .collect();
    let reasons = filler.publish_reasons("up/x", fill).await;
    assert!(
        reasons.contains(&PubAckReason::QuotaExceeded),
        "the store never filled: {reasons:?}"
    );
    // The messages below are as large as the fillers: where a filler found no room, they find
    // none either (a smaller one could still fit in what is left).
    let padded = |tag: &str| {
        let mut p = format!("{tag} ").into_bytes();
        p.resize(200, b'.');
        p
    };

    // On the wire: a 3.1.1 QoS 1 PUBLISH gets no PUBACK, the connection is closed.
    let mut raw = Raw::open(relay.local_port).await;
    assert_eq!(raw.login(false, "ipad311-raw", None, None).await, Some(0));
    raw.send(&publish_packet(false, b"up/x", &padded("raw-0"), 7))
        .await
        .expect("send PUBLISH");
    let (closed, seen) = raw.closed_within(Duration::from_secs(30)).await;
    assert!(closed, "the relay kept the 3.1.1 connection open");
    assert!(
        seen.iter().all(|p| p.kind() != 4),
        "a 3.1.1 PUBLISH that was not stored got a PUBACK: {seen:?}"
    );

    // A real 3.1.1 client keeps the message in its session and redelivers it after each
    // reconnect: no PUBACK while the store is full.
    let mut ipad = V4Client::connect(relay.local_port, "ipad311", false).await;
    ipad.client
        .publish("up/x", rumqttc::QoS::AtLeastOnce, false, padded("v4-0"))
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(3), ipad.acks.recv())
            .await
            .is_err(),
        "acknowledged although the store is full"
    );

    // Room is made: the central broker is back and the queue drains.
    central.restart().await;
    let mut control = V5Client::connect(central.port, "control", false).await;
    tokio::time::timeout(Duration::from_secs(60), ipad.acks.recv())
        .await
        .expect("the 3.1.1 resend was not acknowledged after room was made")
        .expect("client ended");
    let got = control.collect(100, Duration::from_secs(8)).await;
    let texts: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect();
    assert!(
        texts.iter().any(|t| t.starts_with("v4-0 ")),
        "the 3.1.1 message did not reach the central broker: {texts:?}"
    );
    assert!(
        !texts.iter().any(|t| t.starts_with("raw-0 ")),
        "a message that was never acknowledged was stored"
    );
    let accepted = reasons
        .iter()
        .filter(|r| **r == PubAckReason::Success)
        .count();
    println!(
        "3.1.1 store full: {accepted} fillers stored, the 3.1.1 PUBLISH closed without PUBACK, \
         accepted after room was made; {} messages delivered",
        got.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_disturb_the_others() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let relay = Relay::start(
        dir.path(),
        &relay_config(&central.url(), &store_section("")),
    )
    .await;
    let mut control = V5Client::connect(central.port, "control", false).await;
    control.subscribe("trains/T1/up/#").await;
    let mut watcher = V4Client::connect(relay.local_port, "watcher-v4", true).await;
    watcher.subscribe("#").await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;

    // Garbage bytes: the connection is closed, nothing else happens.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", relay.local_port))
        .await
        .unwrap();
    raw.write_all(&[0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x13, 0x37])
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), raw.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "garbage connection must be closed without a reply: {closed:?} {:?}",
        &buf[..8]
    );

    // A failed connect (protocol level 9), then a good one with the same client id.
    let mut raw = tokio::net::TcpStream::connect(("127.0.0.1", relay.local_port))
        .await
        .unwrap();
    let mut connect = vec![0x10, 0x10, 0x00, 0x04];
    connect.extend_from_slice(b"MQTT");
    connect.extend_from_slice(&[9, 0x02, 0x00, 0x3c, 0x00, 0x04]);
    connect.extend_from_slice(b"same");
    raw.write_all(&connect).await.unwrap();
    // MQTT 5 [MQTT-3.1.2-2]: CONNACK 0x84 (Unsupported Protocol Version), then closed.
    let mut reply = Vec::new();
    let read_all = tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut reply)).await;
    assert!(
        read_all.is_ok(),
        "connection with protocol level 9 not closed"
    );
    assert_eq!(
        reply,
        vec![0x20, 0x03, 0x00, 0x84, 0x00],
        "protocol level 9 must get CONNACK 0x84"
    );
    drop(raw);
    let mut same = V5Client::connect(relay.local_port, "same", true).await;

    // A topic starting with a multi-byte character, and v5 user properties towards a
    // 3.1.1 subscriber.
    let props = PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    ipad.publish_acked("Ü/x", payloads("umlaut", 1), None).await;
    ipad.publish_acked("up/props", payloads("props", 1), Some(props))
        .await;
    let seen = watcher.collect(2, QUIET).await;
    let topics: Vec<&str> = seen.iter().map(|p| p.topic.as_str()).collect();
    assert!(
        topics.contains(&"Ü/x"),
        "3.1.1 subscriber missed Ü/x: {topics:?}"
    );
    assert!(
        topics.contains(&"up/props"),
        "3.1.1 subscriber missed up/props: {topics:?}"
    );

    // Everyone else still relays.
    same.publish_acked("up/after", payloads("after", 10), None)
        .await;
    let got = control.collect(11, QUIET).await;
    let (after, _) = sequence(&got, "after");
    assert_eq!(after, (0..10).collect::<Vec<_>>());
    assert!(got.iter().any(|m| m.payload.as_ref() == b"props-0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_restart_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut central = Central::down_with_subscriber(dir.path(), "trains/T1/up/#").await;

    let mut relay = Relay::start(
        dir.path(),
        &relay_config(&central.url(), &store_section("")),
    )
    .await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    ipad.publish_acked("up/x", payloads("t", 300), None).await;
    let started = std::time::Instant::now();
    let status = relay.terminate();
    let took = started.elapsed();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");
    assert!(took < Duration::from_secs(10), "SIGTERM took {took:?}");
    println!("SIGTERM to exit: {took:?}");
    drop(ipad);

    relay.restart().await;
    central.restart().await;
    let mut control = V5Client::connect(central.port, "control", false).await;
    let got = control.collect(300, QUIET).await;
    let (order, _) = sequence(&got, "t");
    assert_complete_in_order(&order, 300, "after a clean restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_paces_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut central = Central::down_with_subscriber(dir.path(), "trains/T1/up/#").await;
    let config = relay_config(&central.url(), &store_section("")).replace(
        "backoff_max = \"1s\"",
        "backoff_max = \"1s\"\nmax_bytes_per_second = \"2KB\"",
    );
    let relay = Relay::start(dir.path(), &config).await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    // 40 messages of about 210 bytes: 8.4 kB, four times the per-second budget.
    let big: Vec<Vec<u8>> = (0..40)
        .map(|i| {
            let mut p = format!("b-{i} ").into_bytes();
            p.resize(200, b'.');
            p
        })
        .collect();
    ipad.publish_acked("up/x", big, None).await;
    central.restart().await;
    let started = std::time::Instant::now();
    let mut control = V5Client::connect(central.port, "control", false).await;
    let got = control.collect(40, QUIET).await;
    let took = started.elapsed();
    assert_eq!(got.len(), 40, "capped drain lost messages");
    // One second of burst, then 2 kB/s: at least about 3 s for 8.4 kB.
    assert!(
        took >= Duration::from_secs(2),
        "cap not applied: drained in {took:?}"
    );
    println!("8.4 kB at 2 kB/s drained in {took:?}");
}

/// A minimal HTTP CONNECT proxy: counts tunnels, then copies bytes both ways.
async fn connect_proxy() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tunnels = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = tunnels.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut client = BufReader::new(client);
                let mut line = String::new();
                if client.read_line(&mut line).await.is_err() {
                    return;
                }
                let Some(target) = line
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split(' ').next())
                else {
                    return;
                };
                let target = target.to_string();
                loop {
                    let mut header = String::new();
                    match client.read_line(&mut header).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) if header == "\r\n" => break,
                        Ok(_) => {}
                    }
                }
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    return;
                };
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut client = client.into_inner();
                if client.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (port, tunnels)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_tunnels_through_an_http_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let (proxy_port, tunnels) = connect_proxy().await;
    let config = relay_config(&central.url(), &store_section("")).replace(
        "backoff_max = \"1s\"",
        &format!("backoff_max = \"1s\"\nproxy = \"http://127.0.0.1:{proxy_port}\""),
    );
    let relay = Relay::start(dir.path(), &config).await;
    let mut control = V5Client::connect(central.port, "control", false).await;
    control.subscribe("trains/T1/up/#").await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    ipad.publish_acked("up/x", payloads("px", 50), None).await;
    let got = control.collect(50, QUIET).await;
    let (order, _) = sequence(&got, "px");
    assert_complete_in_order(&order, 50, "through the proxy");
    assert!(
        tunnels.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the uplink did not go through the proxy"
    );
}

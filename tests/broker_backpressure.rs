//! Flow control of the client's PUBLISHes: while the store is behind, a client is slowed down
//! (we stop reading), never disconnected; a v5 client that exceeds the Receive Maximum we
//! announced is disconnected with 0x93 (MQTT 5 §4.9).

use std::collections::HashSet;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{DisconnectReasonCode, Packet, PingReq, PubRel};
use tokio::io::AsyncWriteExt;
use trainrelay_testkit::broker::*;
use trainrelay_testkit::require_or_skip;

/// With its messages' verdicts held, a v5 client is held back once they occupy
/// `max_uncommitted_bytes`: the rest stays unread, a PINGREQ behind them is answered, and
/// once the verdicts come everything is acknowledged in order, without a disconnect.
#[tokio::test]
async fn store_behind_holds_a_v5_client_back_without_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.max_uncommitted_bytes = 20_000;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let mut sub = v5(b.addr, "sub", |_| {}).await;
    sub.subscribe(filter("up/flood", 1)).await;
    b.hooks.set_mode(IngestMode::Hold);
    let mut c = Raw5::simple(b.addr, "flood", 0).await;
    // 30 × 2,000 bytes: more than the bound, less than the bound plus the read-ahead, so the
    // PINGREQ behind them is in reach.
    let mut bytes = BytesMut::new();
    for i in 1..=30u16 {
        let payload = format!("{i:>2000}");
        pub5("up/flood", payload.as_bytes(), 1, i, None)
            .write(&mut bytes, None)
            .unwrap();
    }
    Packet::PingReq(PingReq).write(&mut bytes, None).unwrap();
    c.stream.write_all(&bytes).await.unwrap();
    // Held back, not disconnected: the PINGREQ behind the held PUBLISHes is answered.
    assert!(matches!(c.recv().await, Some(Packet::PingResp(_))));
    let held = b.hooks.held();
    // Each message occupies more than its 2,000-byte payload: the hold begins by the 10th.
    assert!((1..=10).contains(&held), "{held} verdicts pending");
    assert_eq!(b.handle.stats().held_back, 1);
    b.hooks.set_mode(IngestMode::Accept);
    for _ in 0..held {
        b.hooks.release(Ok(()));
    }
    let mut acked = Vec::new();
    while acked.len() < 30 {
        match c.recv().await {
            Some(Packet::PubAck(a)) => {
                assert_eq!(
                    a.reason,
                    rumqttc::v5::mqttbytes::v5::PubAckReason::Success,
                    "pkid {}",
                    a.pkid
                );
                acked.push(a.pkid);
            }
            other => panic!("expected PUBACK (after {}), got {other:?}", acked.len()),
        }
    }
    assert_eq!(acked, (1..=30).collect::<Vec<_>>());
    let mut got = HashSet::new();
    while got.len() < 30 {
        let p = sub.publish().await;
        assert!(got.insert(p.payload.to_vec()), "duplicate at subscriber");
    }
    c.send(Packet::PingReq(PingReq)).await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp(_))));
    let stats = b.handle.stats();
    assert_eq!(stats.protocol_errors, 0);
    assert_eq!(stats.receive_maximum_exceeded, 0);
}

/// While held back, PINGREQ behind the held PUBLISHes is still served, and the keep-alive
/// does not run out although the client sends nothing else.
#[tokio::test]
async fn held_connection_serves_pings_and_is_not_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    // Any waiting message holds the connection back.
    config.max_uncommitted_bytes = 1;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    b.hooks.set_mode(IngestMode::Hold);
    // Keep-alive 1 s: without the hold rule it would be closed after 1.5 s.
    let mut c = Raw5::simple(b.addr, "held", 1).await;
    for i in 1..=3 {
        c.send(pub5("up/x", b"m", 1, i, None)).await;
    }
    c.send(Packet::PingReq(PingReq)).await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp(_))));
    assert_eq!(b.hooks.held(), 1);
    // Well past 1.5 × keep-alive with nothing sent: still connected.
    assert!(c.recv_within(Duration::from_millis(2500)).await.is_none());
    assert_eq!(b.hooks.held(), 1, "the other PUBLISHes stay unread");
    b.hooks.set_mode(IngestMode::Accept);
    b.hooks.release(Ok(()));
    let mut acked = Vec::new();
    while acked.len() < 3 {
        match c.recv().await {
            Some(Packet::PubAck(a)) => acked.push(a.pkid),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    assert_eq!(acked, vec![1, 2, 3]);
    assert_eq!(b.handle.stats().protocol_errors, 0);
}

/// QoS 2 while held back: the PUBREL behind a held PUBLISH is served (PUBCOMP) before the
/// store catches up.
#[tokio::test]
async fn held_connection_completes_qos2_behind_held_publishes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.max_uncommitted_bytes = 1;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let mut c = Raw5::simple(b.addr, "q2", 0).await;
    c.send(pub5("up/x", b"1", 2, 1, None)).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.pkid == 1));
    b.hooks.set_mode(IngestMode::Hold);
    c.send(pub5("up/x", b"2", 2, 2, None)).await;
    c.send(pub5("up/x", b"3", 2, 3, None)).await;
    c.send(Packet::PubRel(PubRel::new(1, None))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubComp(p)) if p.pkid == 1));
    assert_eq!(b.hooks.held(), 1, "message 3 waits behind message 2");
    b.hooks.set_mode(IngestMode::Accept);
    b.hooks.release(Ok(()));
    for pkid in [2, 3] {
        assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.pkid == pkid));
    }
}

/// A SUBSCRIBE read behind held PUBLISHes is in effect at once: a message another client
/// publishes while this one is still held back reaches it.
#[tokio::test]
async fn subscribe_behind_held_publishes_is_in_effect_once_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.max_uncommitted_bytes = 1;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let mut a = Raw5::simple(b.addr, "talker", 0).await;
    let mut c = Raw5::simple(b.addr, "listener", 0).await;
    // The listener's own message waits for the store; the next one is parked behind it.
    b.hooks.set_mode(IngestMode::Hold);
    c.send(pub5("up/own", b"1", 1, 1, None)).await;
    eventually("the listener's message pending", || b.hooks.held() == 1).await;
    b.hooks.set_mode(IngestMode::Accept);
    let mut bytes = BytesMut::new();
    pub5("up/own", b"2", 1, 2, None)
        .write(&mut bytes, None)
        .unwrap();
    let mut subscribe = rumqttc::v5::mqttbytes::v5::Subscribe::new(filter("news/#", 1), None);
    subscribe.pkid = 3;
    Packet::Subscribe(subscribe)
        .write(&mut bytes, None)
        .unwrap();
    Packet::PingReq(PingReq).write(&mut bytes, None).unwrap();
    c.stream.write_all(&bytes).await.unwrap();
    // SUBACK, then PINGRESP: the SUBSCRIBE was read and served while held back.
    assert!(matches!(c.recv().await, Some(Packet::SubAck(s)) if s.pkid == 3));
    assert!(matches!(c.recv().await, Some(Packet::PingResp(_))));
    assert_eq!(b.hooks.held(), 1, "still held back");
    a.send(pub5("news/x", b"hello", 1, 1, None)).await;
    assert!(matches!(a.recv().await, Some(Packet::PubAck(p)) if p.pkid == 1));
    b.hooks.release(Ok(()));
    let mut got = Vec::new();
    while got.len() < 3 {
        match c.recv().await {
            Some(Packet::PubAck(p)) => got.push(format!("ack{}", p.pkid)),
            Some(Packet::Publish(p)) => {
                assert_eq!(&p.payload[..], b"hello");
                got.push("news".into());
            }
            other => panic!("got {other:?} after {got:?}"),
        }
    }
    assert!(got.contains(&"news".to_string()), "{got:?}");
}

/// QoS 2 messages that await their PUBREL hold nothing back: 1,100 of them (more than the
/// old window, their PUBRELs far behind in the stream) are all received and completed.
#[tokio::test]
async fn qos2_awaiting_pubrel_never_holds_a_client_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.max_uncommitted_bytes = 1;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut bytes = connect4_bytes("q2-old", 0, true);
    let mut publishes = BytesMut::new();
    for i in 1..=1100u16 {
        let mut p = rumqttc::mqttbytes::v4::Publish::new(
            "up/x",
            rumqttc::mqttbytes::QoS::ExactlyOnce,
            format!("{i:>100}"),
        );
        p.pkid = i;
        p.write(&mut publishes).unwrap();
    }
    for i in 1..=1100u16 {
        // PUBREL: 0x62, length 2, packet id.
        publishes.extend_from_slice(&[0x62, 2]);
        publishes.extend_from_slice(&i.to_be_bytes());
    }
    bytes.extend_from_slice(&publishes);
    s.write_all(&bytes).await.unwrap();
    // CONNACK (4 bytes), then 1,100 PUBRECs and 1,100 PUBCOMPs (4 bytes each).
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < 4 + 2200 * 4 {
        let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
            .await
            .unwrap_or_else(|_| panic!("stuck after {} bytes", got.len()))
            .unwrap();
        assert!(n > 0, "closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    let kinds: Vec<(u8, u16)> = got[4..]
        .chunks(4)
        .map(|c| (c[0], u16::from_be_bytes([c[2], c[3]])))
        .collect();
    let recs = kinds.iter().filter(|(k, _)| *k == 0x50).count();
    let comps: Vec<u16> = kinds
        .iter()
        .filter(|(k, _)| *k == 0x70)
        .map(|(_, p)| *p)
        .collect();
    assert_eq!(recs, 1100);
    assert_eq!(comps, (1..=1100).collect::<Vec<_>>());
    assert_eq!(b.handle.stats().protocol_errors, 0);
}

/// A v5 client that sends one QoS 1 PUBLISH more than the Receive Maximum we announced is
/// disconnected with 0x93, also while held back.
#[tokio::test]
async fn v5_client_over_receive_maximum_is_disconnected_with_0x93() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.receive_maximum = 8;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    b.hooks.set_mode(IngestMode::Hold);
    let connect = p5::Connect {
        keep_alive: 0,
        client_id: "greedy".into(),
        clean_start: true,
        properties: None,
    };
    let (mut c, ack) = Raw5::connect(b.addr, connect, None).await;
    let announced = ack.properties.and_then(|p| p.receive_max);
    assert_eq!(announced, Some(8));
    for i in 1..=8 {
        c.send(pub5("up/x", b"m", 1, i, None)).await;
    }
    c.send(Packet::PingReq(PingReq)).await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp(_))));
    assert_eq!(b.hooks.held(), 8);
    c.send(pub5("up/x", b"m", 1, 9, None)).await;
    match c.recv().await {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::ReceiveMaximumExceeded)
        }
        other => panic!("expected DISCONNECT 0x93, got {other:?}"),
    }
    assert!(c.recv().await.is_none(), "connection closed");
    assert_eq!(b.handle.stats().receive_maximum_exceeded, 1);
    assert_eq!(b.hooks.held(), 8, "the 9th message was not taken in");
}

/// QoS 2 messages count towards the Receive Maximum until their PUBREL is answered: within
/// it the client goes on (also after a completed exchange frees a slot), one beyond it
/// gets 0x93.
#[tokio::test]
async fn qos2_counts_towards_receive_maximum_until_pubcomp() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.receive_maximum = 4;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let mut c = Raw5::simple(b.addr, "q2-window", 0).await;
    for i in 1..=4 {
        c.send(pub5("up/x", b"m", 2, i, None)).await;
        assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.pkid == i));
    }
    // A resent PUBLISH of a PUBREC'd message is not a new one.
    c.send(pub5("up/x", b"m", 2, 4, None)).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.pkid == 4));
    c.send(Packet::PubRel(PubRel::new(1, None))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubComp(p)) if p.pkid == 1));
    c.send(pub5("up/x", b"m", 2, 5, None)).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.pkid == 5));
    assert_eq!(b.handle.stats().receive_maximum_exceeded, 0);
    // 2, 3, 4 and 5 await PUBREL: a sixth is one too many.
    c.send(pub5("up/x", b"m", 1, 6, None)).await;
    match c.recv().await {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, DisconnectReasonCode::ReceiveMaximumExceeded)
        }
        other => panic!("expected DISCONNECT 0x93, got {other:?}"),
    }
    assert_eq!(b.handle.stats().receive_maximum_exceeded, 1);
}

/// A v5 client that keeps exactly our Receive Maximum in flight, round after round while the
/// store is slow, is never disconnected.
#[tokio::test]
async fn v5_client_within_receive_maximum_is_never_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.receive_maximum = 8;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    b.hooks.set_mode(IngestMode::Hold);
    let mut c = Raw5::simple(b.addr, "polite", 0).await;
    for round in 0..3u16 {
        for i in 1..=8 {
            c.send(pub5("up/x", b"m", 1, round * 8 + i, None)).await;
        }
        eventually("a full window pending", || b.hooks.held() == 8).await;
        for _ in 0..8 {
            b.hooks.release(Ok(()));
        }
        for i in 1..=8 {
            match c.recv().await {
                Some(Packet::PubAck(a)) => assert_eq!(a.pkid, round * 8 + i),
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
    }
    let stats = b.handle.stats();
    assert_eq!(stats.receive_maximum_exceeded, 0);
    assert_eq!(stats.protocol_errors, 0);
}

/// A 3.1.1 client has no Receive Maximum at all: more in flight than we announce to v5
/// clients is no reason to disconnect it.
#[tokio::test]
async fn v311_client_beyond_receive_maximum_is_not_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.receive_maximum = 4;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let mut s = tokio::net::TcpStream::connect(b.addr).await.unwrap();
    let mut bytes = connect4_bytes("old", 0, true);
    for i in 1..=50u16 {
        let mut p = rumqttc::mqttbytes::v4::Publish::new(
            "up/x",
            rumqttc::mqttbytes::QoS::AtLeastOnce,
            vec![b'x'],
        );
        p.pkid = i;
        let mut bm = BytesMut::new();
        p.write(&mut bm).unwrap();
        bytes.extend_from_slice(&bm);
    }
    s.write_all(&bytes).await.unwrap();
    // CONNACK (4 bytes) + 50 PUBACKs (4 bytes each), then the connection stays open.
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while got.len() < 4 + 50 * 4 {
        let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut s, &mut buf))
            .await
            .expect("PUBACKs")
            .unwrap();
        assert!(n > 0, "closed after {} bytes", got.len());
        got.extend_from_slice(&buf[..n]);
    }
    let pkids: Vec<u16> = got[4..]
        .chunks(4)
        .map(|c| {
            assert_eq!(c[0], 0x40);
            u16::from_be_bytes([c[2], c[3]])
        })
        .collect();
    assert_eq!(pkids, (1..=50).collect::<Vec<_>>());
    assert_eq!(b.handle.stats().protocol_errors, 0);
    assert_eq!(
        b.handle.stats().receive_maximum_exceeded,
        0,
        "3.1.1 knows no Receive Maximum"
    );
}

/// Whether python3 with paho-mqtt is there (the test kit's skip rule decides what then).
fn paho_available(test: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .output()
        .is_ok_and(|o| o.status.success());
    require_or_skip(
        test,
        ok,
        "python3 with paho-mqtt is not installed (.ci/run installs it)",
    )
}

/// A paho-mqtt for Python publisher with an in-flight window of 1,000.
struct Flood {
    version: &'static str,
    qos: u8,
    count: usize,
    /// Payload size in bytes.
    size: usize,
}

/// `flood` against the broker with the first verdicts held until the publisher is held back
/// (the store behind), then answered as they come: every message is acknowledged, the client
/// is never disconnected, and the subscriber gets each message exactly once.
async fn paho_flood(flood: Flood) {
    let test = format!(
        "paho_flood v{} QoS {} {} × {} bytes",
        flood.version, flood.qos, flood.count, flood.size
    );
    if !paho_available(&test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    // Small, so that the window of 1,000 surely meets it.
    config.max_uncommitted_bytes = 64 * 1024;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let mut sub = v5(b.addr, "sub", |_| {}).await;
    sub.subscribe(filter("up/paho", 1)).await;
    b.hooks.set_mode(IngestMode::Hold);
    let hooks = b.hooks.clone();
    let handle = b.handle.clone();
    let releaser = tokio::spawn(async move {
        eventually("the publisher held back", || handle.stats().held_back > 0).await;
        hooks.set_mode(IngestMode::Accept);
        while hooks.held() > 0 {
            hooks.release(Ok(()));
        }
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/paho_flood.py");
    // The script gives up by itself after 60 s.
    let args: Vec<String> = [
        script.to_string(),
        "127.0.0.1".into(),
        b.addr.port().to_string(),
        flood.version.into(),
        "paho-flood".into(),
        "up/paho".into(),
        flood.count.to_string(),
        "1000".into(),
        flood.qos.to_string(),
        flood.size.to_string(),
    ]
    .into();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3").args(&args).output()
    })
    .await
    .unwrap()
    .expect("run python3");
    releaser.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "paho_flood.py printed no report ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!("{test}: {report}");
    assert_eq!(report["acked"], flood.count, "{report}");
    assert_eq!(report["connects"], 1, "reconnected: {report}");
    // The one disconnect paho reports is its own DISCONNECT at the end.
    assert_eq!(report["disconnects"], 1, "{report}");
    assert!(out.status.success(), "{report}");
    let mut got = HashSet::new();
    while got.len() < flood.count {
        let p = sub.publish().await;
        assert!(
            got.insert(p.payload.to_vec()),
            "duplicate {:?} after {} messages",
            p.payload,
            got.len()
        );
    }
    assert!(
        sub.no_publish_within(Duration::from_millis(300)).await,
        "more than {}",
        flood.count
    );
    let stats = b.handle.stats();
    assert_eq!(stats.protocol_errors, 0);
    assert_eq!(stats.receive_maximum_exceeded, 0);
    assert_eq!(
        stats.connections, 2,
        "subscriber and publisher, no reconnect"
    );
    let ingested = b.hooks.ingested.lock().unwrap().len();
    assert_eq!(
        ingested, flood.count,
        "each message taken in once (no DUP resend)"
    );
}

#[tokio::test]
async fn paho_python_window_1000_v311() {
    paho_flood(Flood {
        version: "3.1.1",
        qos: 1,
        count: 1000,
        size: 0,
    })
    .await;
}

#[tokio::test]
async fn paho_python_window_1000_v5() {
    paho_flood(Flood {
        version: "5",
        qos: 1,
        count: 1000,
        size: 0,
    })
    .await;
}

#[tokio::test]
async fn paho_python_qos2_window_1000_1kb_v311() {
    paho_flood(Flood {
        version: "3.1.1",
        qos: 2,
        count: 3000,
        size: 1024,
    })
    .await;
}

#[tokio::test]
async fn paho_python_qos2_window_1000_1kb_v5() {
    paho_flood(Flood {
        version: "5",
        qos: 2,
        count: 3000,
        size: 1024,
    })
    .await;
}

//! A full inbound window slows a client down (we stop reading); it never disconnects it.

use std::collections::HashSet;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5::{Packet, PubRel};
use tokio::io::AsyncWriteExt;
use trainrelay_testkit::broker::*;

/// 200 QoS 1 PUBLISHes in one write from a v5 client, with our Receive Maximum at 64: all are
/// acknowledged, none is refused, and the connection stays up.
#[tokio::test]
async fn v5_client_over_receive_maximum_gets_all_pubacks_and_no_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.receive_maximum = 64;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let mut sub = v5(b.addr, "sub", |_| {}).await;
    sub.subscribe(filter("up/flood", 1)).await;
    // Verdicts held at first, so the window is surely full while the rest sits unread.
    b.hooks.set_mode(IngestMode::Hold);
    let mut c = Raw5::simple(b.addr, "flood", 0).await;
    let mut bytes = BytesMut::new();
    for i in 1..=200u16 {
        pub5("up/flood", format!("{i}").as_bytes(), 1, i, None)
            .write(&mut bytes, None)
            .unwrap();
    }
    c.stream.write_all(&bytes).await.unwrap();
    eventually("a full window of 64 verdicts pending", || {
        b.hooks.held() == 64
    })
    .await;
    // Held back, not disconnected: a PINGREQ behind the held PUBLISHes is answered.
    c.send(Packet::PingReq(rumqttc::v5::mqttbytes::v5::PingReq))
        .await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp(_))));
    assert_eq!(b.hooks.held(), 64, "nothing beyond the window was taken in");
    b.hooks.set_mode(IngestMode::Accept);
    for _ in 0..64 {
        b.hooks.release(Ok(()));
    }
    let mut acked = HashSet::new();
    while acked.len() < 200 {
        match c.recv().await {
            Some(Packet::PubAck(a)) => {
                assert_eq!(
                    a.reason,
                    rumqttc::v5::mqttbytes::v5::PubAckReason::Success,
                    "pkid {}",
                    a.pkid
                );
                assert!(acked.insert(a.pkid), "PUBACK {} twice", a.pkid);
            }
            other => panic!("expected PUBACK (after {}), got {other:?}", acked.len()),
        }
    }
    let mut got = HashSet::new();
    while got.len() < 200 {
        let p = sub.publish().await;
        assert!(got.insert(p.payload.to_vec()), "duplicate at subscriber");
    }
    // Still connected: a PINGREQ is answered.
    c.send(Packet::PingReq(rumqttc::v5::mqttbytes::v5::PingReq))
        .await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp(_))));
    let stats = b.handle.stats();
    assert_eq!(stats.protocol_errors, 0);
    assert_eq!(stats.receive_maximum_exceeded, 1);
}

/// While the window is full, PINGREQ and PUBREL behind the held PUBLISHes are still served,
/// and the keep-alive does not run out although the client sends nothing else.
#[tokio::test]
async fn held_connection_serves_pings_and_is_not_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.receive_maximum = 2;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    b.hooks.set_mode(IngestMode::Hold);
    // Keep-alive 1 s: without the hold rule it would be closed after 1.5 s.
    let mut c = Raw5::simple(b.addr, "held", 1).await;
    for i in 1..=3 {
        c.send(pub5("up/x", b"m", 1, i, None)).await;
    }
    c.send(Packet::PingReq(rumqttc::v5::mqttbytes::v5::PingReq))
        .await;
    assert!(matches!(c.recv().await, Some(Packet::PingResp(_))));
    eventually("two verdicts pending", || b.hooks.held() == 2).await;
    // Well past 1.5 × keep-alive with nothing sent: still connected.
    assert!(c.recv_within(Duration::from_millis(2500)).await.is_none());
    assert_eq!(b.hooks.held(), 2, "the third PUBLISH stays unread");
    b.hooks.set_mode(IngestMode::Accept);
    b.hooks.release(Ok(()));
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

/// QoS 2: the window is full of messages awaiting PUBREL and the next PUBLISH comes before the
/// PUBRELs; they must still be read, or nothing would ever move again.
#[tokio::test]
async fn qos2_pubrel_behind_held_publish_frees_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.receive_maximum = 2;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let mut c = Raw5::simple(b.addr, "q2", 0).await;
    c.send(pub5("up/x", b"1", 2, 1, None)).await;
    c.send(pub5("up/x", b"2", 2, 2, None)).await;
    for _ in 0..2 {
        assert!(matches!(c.recv().await, Some(Packet::PubRec(_))));
    }
    c.send(pub5("up/x", b"3", 2, 3, None)).await;
    c.send(Packet::PubRel(PubRel::new(1, None))).await;
    c.send(Packet::PubRel(PubRel::new(2, None))).await;
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match c.recv().await {
            Some(Packet::PubComp(p)) => seen.push(format!("comp{}", p.pkid)),
            Some(Packet::PubRec(p)) => seen.push(format!("rec{}", p.pkid)),
            other => panic!("got {other:?} after {seen:?}"),
        }
    }
    assert!(seen.contains(&"rec3".to_string()), "{seen:?}");
}

/// A 3.1.1 client has no Receive Maximum at all: it is slowed down the same way.
#[tokio::test]
async fn v311_client_with_large_window_is_held_back_not_disconnected() {
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

/// Whether a test that needs `python3` with paho-mqtt can run: in CI (`CI` set) a missing
/// prerequisite fails the test, elsewhere it is skipped.
fn paho_available(test: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: python3 with paho-mqtt is required in CI (.ci/run installs it)"
        );
        eprintln!("SKIPPED {test}: python3 with paho-mqtt not installed");
    }
    ok
}

/// paho-mqtt for Python with an in-flight window of 1,000 (it ignores Receive Maximum)
/// publishes 1,000 QoS 1 messages: none is refused, the client is never disconnected, and the
/// subscriber gets each message exactly once.
async fn paho_window_1000(version: &str) {
    let test = format!("paho_window_1000 v{version}");
    if !paho_available(&test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start_with(dir.path(), test_config(), TestHooks::new()).await;
    let mut sub = v5(b.addr, "sub", |_| {}).await;
    sub.subscribe(filter("up/paho", 1)).await;
    // The first 64 verdicts are held until the window is full, so the broker surely has to
    // hold the client back at least once; later ones are answered as they come.
    b.hooks.set_mode(IngestMode::Hold);
    let hooks = b.hooks.clone();
    let releaser = tokio::spawn(async move {
        eventually("a full window of verdicts pending", || hooks.held() == 64).await;
        hooks.set_mode(IngestMode::Accept);
        while hooks.held() > 0 {
            hooks.release(Ok(()));
        }
    });
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/tools/paho_flood.py");
    // The script gives up by itself after 60 s.
    let port = b.addr.port().to_string();
    let version_arg = version.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([
                script,
                "127.0.0.1",
                &port,
                &version_arg,
                "paho-flood",
                "up/paho",
                "1000",
                "1000",
            ])
            .output()
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
    assert_eq!(report["acked"], 1000, "{report}");
    assert_eq!(report["connects"], 1, "reconnected: {report}");
    // The one disconnect paho reports is its own DISCONNECT at the end.
    assert_eq!(report["disconnects"], 1, "{report}");
    assert!(out.status.success(), "{report}");
    let mut got = HashSet::new();
    while got.len() < 1000 {
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
        "more than 1,000"
    );
    let stats = b.handle.stats();
    assert_eq!(stats.protocol_errors, 0);
    assert_eq!(
        stats.connections, 2,
        "subscriber and publisher, no reconnect"
    );
    let ingested = b.hooks.ingested.lock().unwrap().len();
    assert_eq!(ingested, 1000, "each message taken in once (no DUP resend)");
}

#[tokio::test]
async fn paho_python_window_1000_v311() {
    paho_window_1000("3.1.1").await;
}

#[tokio::test]
async fn paho_python_window_1000_v5() {
    paho_window_1000("5").await;
}

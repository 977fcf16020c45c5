//! Session takeover happens only for the CONNECT processed last, and never for a connection
//! that is already closed (an iPad on flaky Wi-Fi sends CONNECT, loses the socket before the
//! CONNACK and reconnects at once with the same client id).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trainrelay_testkit::broker::*;

fn connect_bytes(id: &str, user: &str, v5: bool) -> Vec<u8> {
    let mut b = BytesMut::new();
    if v5 {
        let c = p5::Connect {
            keep_alive: 60,
            client_id: id.into(),
            clean_start: false,
            properties: Some(p5::ConnectProperties {
                session_expiry_interval: Some(600),
                ..p5::ConnectProperties::new()
            }),
        };
        let login = p5::Login::new(user, "pw");
        p5::Packet::Connect(c, None, Some(login))
            .write(&mut b, None)
            .unwrap();
    } else {
        let mut c = rumqttc::mqttbytes::v4::Connect::new(id);
        c.keep_alive = 60;
        c.clean_session = false;
        c.set_login(user, "pw");
        c.write(&mut b).unwrap();
    }
    b.to_vec()
}

/// Reads one packet: (first byte, body); `None` on close or after `WAIT`.
async fn read_packet(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let read = async {
        let first = s.read_u8().await.ok()?;
        let mut len = 0usize;
        for i in 0..4 {
            let b = s.read_u8().await.ok()?;
            len |= usize::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.ok()?;
        Some((first, body))
    };
    tokio::time::timeout(WAIT, read).await.ok().flatten()
}

/// Sends CONNECT with a slow authentication and half-closes the socket at once, then waits
/// until the broker is done with it (EOF). Returns what the broker sent meanwhile.
async fn abandoned_connect(addr: std::net::SocketAddr, id: &str, v5: bool) -> Vec<u8> {
    let mut a = TcpStream::connect(addr).await.unwrap();
    a.write_all(&connect_bytes(id, "slow", v5)).await.unwrap();
    a.shutdown().await.unwrap();
    let (bytes, closed) = read_to_close(&mut a).await;
    assert!(closed, "the broker kept an abandoned connection open");
    bytes
}

/// The client still holds its session: a PINGREQ is answered and nothing else arrives.
async fn still_connected(b: &mut TcpStream, what: &str) {
    b.write_all(&[0xC0, 0x00]).await.unwrap();
    let got = read_packet(b).await;
    assert_eq!(got, Some((0xD0, vec![])), "{what}: expected PINGRESP");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_connect_never_takes_over_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    // The abandoned CONNECT's authentication finishes after the reconnect's: that is the
    // order in which the old code let the dead connection win.
    b.hooks
        .slow_users
        .lock()
        .unwrap()
        .push(("slow".into(), Duration::from_millis(20)));
    for i in 0..200 {
        let v5 = i % 2 == 0;
        let id = "flaky ipad";
        // CONNECT, close, reconnect at once with the same id.
        let addr = b.addr;
        let abandoned = tokio::spawn(async move { abandoned_connect(addr, id, v5).await });
        tokio::task::yield_now().await;
        let mut live = TcpStream::connect(b.addr).await.unwrap();
        live.write_all(&connect_bytes(id, "fast", v5))
            .await
            .unwrap();
        let ack = read_packet(&mut live).await.expect("CONNACK");
        assert_eq!(ack.0, 0x20, "round {i}: expected CONNACK, got {ack:?}");
        assert_eq!(ack.1.get(1), Some(&0), "round {i}: refused: {ack:?}");
        abandoned.await.unwrap();
        still_connected(
            &mut live,
            &format!("round {i}, after the abandoned CONNECT"),
        )
        .await;

        // An abandoned CONNECT while the session is connected elsewhere takes nothing over.
        let bytes = abandoned_connect(b.addr, id, v5).await;
        assert!(
            bytes.is_empty() || bytes[0] != 0x20 || bytes.get(3) != Some(&0),
            "round {i}: the abandoned connection got CONNACK 0"
        );
        still_connected(&mut live, &format!("round {i}, while connected")).await;
        live.write_all(&[0xE0, 0x00]).await.unwrap();
        let _ = read_to_close(&mut live).await;
    }
}

/// Two live connections with the same id whose authentications finish in the opposite order
/// of their CONNECTs: the later CONNECT keeps the session, the earlier one gives way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_connect_wins_although_its_authentication_finished_first() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    b.hooks
        .slow_users
        .lock()
        .unwrap()
        .push(("slow".into(), Duration::from_millis(200)));
    for i in 0..20 {
        let v5 = i % 2 == 0;
        let id = "twice";
        let mut first = TcpStream::connect(b.addr).await.unwrap();
        first
            .write_all(&connect_bytes(id, "slow", v5))
            .await
            .unwrap();
        // The later CONNECT is the one sent once the slow one is surely being authenticated.
        eventually_connect_seen(&b).await;
        let mut second = TcpStream::connect(b.addr).await.unwrap();
        second
            .write_all(&connect_bytes(id, "fast", v5))
            .await
            .unwrap();
        let ack = read_packet(&mut second).await.expect("CONNACK");
        assert_eq!((ack.0, ack.1.get(1)), (0x20, Some(&0)), "round {i}");
        let (bytes, closed) = read_to_close(&mut first).await;
        assert!(closed, "round {i}");
        assert!(
            bytes.is_empty(),
            "round {i}: the earlier CONNECT got {bytes:?}"
        );
        still_connected(&mut second, &format!("round {i}")).await;
        second.write_all(&[0xE0, 0x00]).await.unwrap();
        let _ = read_to_close(&mut second).await;
    }
}

/// Waits until the slow CONNECT is being authenticated.
async fn eventually_connect_seen(b: &TestBroker) {
    let hooks = b.hooks.clone();
    eventually("slow CONNECT in authentication", || {
        hooks
            .authenticating
            .load(std::sync::atomic::Ordering::SeqCst)
            > 0
    })
    .await;
}

/// A v5 connection with session expiry 600 s on a raw socket.
async fn raw_session(addr: std::net::SocketAddr, id: &str, clean_start: bool) -> Raw5 {
    let c = p5::Connect {
        keep_alive: 0,
        client_id: id.into(),
        clean_start,
        properties: Some(p5::ConnectProperties {
            session_expiry_interval: Some(600),
            ..p5::ConnectProperties::new()
        }),
    };
    let (raw, ack) = Raw5::connect(addr, c, None).await;
    assert_eq!(ack.code, p5::ConnectReturnCode::Success);
    raw
}

/// The old connection is slow: its QoS 2 PUBLISH gets its verdict only after another
/// connection took the session over (it waits for it after its DISCONNECT). It must not record
/// its packet id in the new session, where the same id then names a new message; nor deliver
/// a message whose PUBREC it can no longer send.
#[tokio::test]
async fn a_slow_old_connection_does_not_write_into_the_new_session() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut watch = v5(b.addr, "watch", |_| {}).await;
    watch.subscribe(filter("orders", 2)).await;

    b.hooks.set_mode(IngestMode::Hold);
    let mut old = raw_session(b.addr, "cab", true).await;
    let mut bytes = BytesMut::new();
    pub5("orders", b"stale", 2, 7, None)
        .write(&mut bytes, None)
        .unwrap();
    p5::Packet::Disconnect(p5::Disconnect::new(
        p5::DisconnectReasonCode::NormalDisconnection,
    ))
    .write(&mut bytes, None)
    .unwrap();
    old.send_bytes(&bytes).await.unwrap();
    let hooks = b.hooks.clone();
    eventually("the old connection's PUBLISH at ingest", || {
        hooks.held() == 1
    })
    .await;
    // The DISCONNECT came in the same read: the old connection now waits for the verdict.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut new = raw_session(b.addr, "cab", true).await;
    b.hooks.set_mode(IngestMode::Accept);
    b.hooks.release(Ok(()));
    let closing = old.until_closed().await;
    assert!(
        !closing
            .iter()
            .any(|p| matches!(p, p5::Packet::PubRec(r) if r.pkid == 7)),
        "the old connection acknowledged after losing the session: {closing:?}"
    );
    assert!(
        closing.iter().any(|p| matches!(p, p5::Packet::Disconnect(d)
            if d.reason_code == p5::DisconnectReasonCode::SessionTakenOver)),
        "the old connection was not told of the takeover: {closing:?}"
    );

    // Packet id 7 on the new session is a new message, delivered once.
    new.send(pub5("orders", b"fresh", 2, 7, None)).await;
    assert!(matches!(new.recv().await, Some(p5::Packet::PubRec(r)) if r.pkid == 7));
    new.send(p5::Packet::PubRel(p5::PubRel::new(7, None))).await;
    match new.recv().await {
        Some(p5::Packet::PubComp(c)) => {
            assert_eq!(c.pkid, 7);
            assert_eq!(c.reason, p5::PubCompReason::Success);
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    assert_eq!(watch.publish().await.payload.as_ref(), b"fresh");
    assert!(watch.no_publish_within(Duration::from_millis(300)).await);
}

//! CONNECT handling, session expiry, topic aliases, events, and slow consumers.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    Connect, ConnectProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, LastWill, Login, Packet, PublishProperties,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use trainrelay::broker::BrokerEvent;
use trainrelay_testkit::broker::*;

fn connect(id: &str, clean: bool, expiry: Option<u32>) -> Connect {
    Connect {
        keep_alive: 0,
        client_id: id.into(),
        clean_start: clean,
        properties: expiry.map(|e| ConnectProperties {
            session_expiry_interval: Some(e),
            ..ConnectProperties::new()
        }),
    }
}

#[tokio::test]
async fn empty_client_id_v311_needs_clean_session_and_v5_gets_one_assigned() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(&connect4_bytes("", 0, false)).await.unwrap();
    let (reply, closed) = read_to_close(&mut s).await;
    assert!(closed);
    assert_eq!(reply, vec![0x20, 0x02, 0x00, 0x02]);

    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(&connect4_bytes("", 0, true)).await.unwrap();
    let mut buf = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf)
        .await
        .unwrap();
    assert_eq!(buf, [0x20, 0x02, 0x00, 0x00]);

    let (_c, ack) = Raw5::connect(b.addr, connect("", true, None), None).await;
    assert_eq!(ack.code, ConnectReturnCode::Success);
    let id = ack.properties.unwrap().assigned_client_identifier.unwrap();
    assert!(!id.is_empty());
}

#[tokio::test]
async fn bad_credentials_and_forbidden_will_are_refused_with_reason_codes() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = TestHooks::new();
    hooks.bad_users.lock().unwrap().push("mallory".into());
    hooks.deny_publish.lock().unwrap().push("down/cmd".into());
    let b = TestBroker::start_with(dir.path(), test_config(), hooks).await;
    let stream = TcpStream::connect(b.addr).await.unwrap();
    let mut raw = Raw5Bare(stream);
    raw.send(Packet::Connect(
        connect("m", true, None),
        None,
        Some(Login::new("mallory", "pw")),
    ))
    .await;
    let (reply, _) = read_to_close(&mut raw.0).await;
    assert_eq!(reply.get(3), Some(&0x86), "{reply:?}");

    let will = LastWill::new("down/cmd", "x", qos5(0), false, None);
    let (_c, ack) = Raw5::connect(b.addr, connect("w", true, None), Some(will)).await;
    assert_eq!(ack.code, ConnectReturnCode::NotAuthorized);
    assert_eq!(b.handle.stats().refused_connections, 2);
    assert!(b.handle.clients().is_empty());
}

struct Raw5Bare(TcpStream);
impl Raw5Bare {
    async fn send(&mut self, p: Packet) {
        let mut buf = bytes::BytesMut::new();
        p.write(&mut buf, None).unwrap();
        self.0.write_all(&buf).await.unwrap();
    }
}

#[tokio::test]
async fn session_expires_after_its_interval() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let (c, _) = Raw5::connect(b.addr, connect("brief", true, Some(1)), None).await;
    drop(c);
    eventually("disconnected", || b.handle.clients().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (_c, ack) = Raw5::connect(b.addr, connect("brief", false, Some(1)), None).await;
    assert!(!ack.session_present);
}

#[tokio::test]
async fn disconnect_may_not_raise_session_expiry_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let (mut c, _) = Raw5::connect(b.addr, connect("zero", true, None), None).await;
    c.send(Packet::Disconnect(Disconnect {
        reason_code: DisconnectReasonCode::NormalDisconnection,
        properties: Some(DisconnectProperties {
            session_expiry_interval: Some(100),
            reason_string: None,
            user_properties: vec![],
            server_reference: None,
        }),
    }))
    .await;
    let got = c.until_closed().await;
    assert!(got.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.reason_code == DisconnectReasonCode::ProtocolError)));
}

#[tokio::test]
async fn client_topic_aliases_are_resolved_and_invalid_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut sub = v5(b.addr, "sub", |_| {}).await;
    sub.subscribe(filter("long/topic/name", 0)).await;
    let mut c = Raw5::simple(b.addr, "alias", 0).await;
    let with_alias = |a| PublishProperties {
        topic_alias: Some(a),
        ..Default::default()
    };
    c.send(pub5("long/topic/name", b"1", 0, 0, Some(with_alias(3))))
        .await;
    c.send(pub5("", b"2", 0, 0, Some(with_alias(3)))).await;
    assert_eq!(sub.publish().await.payload.as_ref(), b"1");
    let second = sub.publish().await;
    assert_eq!(second.topic.as_ref(), b"long/topic/name");
    assert_eq!(second.payload.as_ref(), b"2");
    c.send(pub5("x", b"3", 0, 0, Some(with_alias(17)))).await;
    let got = c.until_closed().await;
    assert!(got.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.reason_code == DisconnectReasonCode::TopicAliasInvalid)));
}

#[tokio::test]
async fn connection_events_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let c = v4(b.addr, "ev", true).await;
    c.client.disconnect().await.unwrap();
    eventually("disconnect event", || {
        b.hooks.events().iter().any(
            |e| matches!(e, BrokerEvent::Disconnected { client, .. } if client.client_id == "ev"),
        )
    })
    .await;
    assert!(b
        .hooks
        .events()
        .iter()
        .any(|e| matches!(e, BrokerEvent::Connected(c) if c.client_id == "ev")));
}

#[tokio::test]
async fn a_client_that_does_not_read_blocks_neither_inject_nor_others() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.max_queued_messages = 100;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let mut stuck = Raw5::simple(b.addr, "stuck", 0).await;
    stuck
        .send(Packet::Subscribe(rumqttc::v5::mqttbytes::v5::Subscribe {
            pkid: 1,
            filters: vec![filter("flood", 1)],
            properties: None,
        }))
        .await;
    assert!(matches!(stuck.recv().await, Some(Packet::SubAck(_))));
    let mut ok = v5(b.addr, "ok", |_| {}).await;
    ok.subscribe(filter("other", 0)).await;
    let payload = vec![0u8; 16 * 1024];
    let t = tokio::time::timeout(WAIT, async {
        for _ in 0..2000 {
            let m = trainrelay::message::Message {
                topic: "flood".into(),
                payload: payload.clone().into(),
                qos: trainrelay::message::QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
                accepted: trainrelay::clock::Stamp::now(),
                deadline: None,
            };
            b.handle.inject(m).await.unwrap();
        }
    })
    .await;
    assert!(t.is_ok(), "inject blocked on a client that does not read");
    let p = v5(b.addr, "p", |_| {}).await;
    p.client
        .publish("other", qos5(0), false, "still here")
        .await
        .unwrap();
    assert_eq!(ok.publish().await.payload.as_ref(), b"still here");
    eventually("drops counted", || b.handle.stats().dropped_queue_full > 0).await;
}

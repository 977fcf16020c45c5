//! Flow control, the ingest pipeline, limits, and hostile or broken input.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    Connect, ConnectReturnCode, DisconnectReasonCode, Packet, PubAckReason, PubRel,
    SubscribeReasonCode,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use trainrelay::broker::RejectReason;
use trainrelay_testkit::broker::*;

fn sub_packet(pkid: u16, filters: Vec<rumqttc::v5::mqttbytes::v5::Filter>) -> Packet {
    Packet::Subscribe(rumqttc::v5::mqttbytes::v5::Subscribe {
        pkid,
        filters,
        properties: None,
    })
}

fn disconnect_reason(packets: &[Packet]) -> Option<DisconnectReasonCode> {
    packets.iter().find_map(|p| match p {
        Packet::Disconnect(d) => Some(d.reason_code),
        _ => None,
    })
}

#[tokio::test]
async fn silent_client_is_dropped_after_keep_alive_even_while_receiving() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut silent = Raw5::simple(b.addr, "silent", 1).await;
    silent.send(sub_packet(1, vec![filter("feed", 0)])).await;
    // Keep the broker busy sending to it; its writes must not count as liveness.
    let handle = b.handle.clone();
    let feeder = tokio::spawn(async move {
        loop {
            let m = trainrelay::message::Message {
                topic: "feed".into(),
                payload: "tick".into(),
                qos: trainrelay::message::QoS::AtMostOnce,
                retain: false,
                properties: Default::default(),
                accepted: trainrelay::clock::Stamp::now(),
                deadline: None,
            };
            let _ = handle.inject(m).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let got = silent.until_closed().await;
    feeder.abort();
    assert!(got.iter().any(|p| matches!(p, Packet::Publish(_))));
    assert_eq!(
        disconnect_reason(&got),
        Some(DisconnectReasonCode::KeepAliveTimeout)
    );
    eventually("client removed", || b.handle.clients().is_empty()).await;
}

#[tokio::test]
async fn pending_ingest_delays_puback_until_the_verdict_and_keeps_order() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    b.hooks.set_mode(IngestMode::Hold);
    let mut sub = v5(b.addr, "sub", |_| {}).await;
    sub.subscribe(filter("up/#", 1)).await;
    let mut c = Raw5::simple(b.addr, "pub", 0).await;
    c.send(pub5("up/1", b"a", 1, 1, None)).await;
    c.send(pub5("up/2", b"b", 1, 2, None)).await;
    eventually("both ingested before any verdict", || b.hooks.held() == 2).await;
    assert!(
        c.recv_within(Duration::from_millis(300)).await.is_none(),
        "acked before the verdict"
    );
    assert!(sub.no_publish_within(Duration::from_millis(10)).await);
    b.hooks.release(Ok(()));
    match c.recv().await {
        Some(Packet::PubAck(a)) => {
            assert_eq!(a.pkid, 1);
            assert_eq!(a.reason, PubAckReason::Success);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(sub.publish().await.payload.as_ref(), b"a");
    b.hooks.release(Ok(()));
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.pkid, 2),
        other => panic!("{other:?}"),
    }
    assert_eq!(sub.publish().await.payload.as_ref(), b"b");
}

#[tokio::test]
async fn rejected_ingest_gives_v5_puback_0x97_and_no_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut sub = v5(b.addr, "sub", |_| {}).await;
    sub.subscribe(filter("up/#", 1)).await;
    b.hooks
        .set_mode(IngestMode::Reject(RejectReason::QuotaExceeded));
    let mut c = Raw5::simple(b.addr, "pub", 0).await;
    c.send(pub5("up/x", b"no room", 1, 5, None)).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason, PubAckReason::QuotaExceeded),
        other => panic!("{other:?}"),
    }
    assert!(sub.no_publish_within(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn rejected_ingest_closes_a_v311_client_without_puback() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    b.hooks
        .set_mode(IngestMode::Reject(RejectReason::QuotaExceeded));
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(&connect4_bytes("old", 0, true)).await.unwrap();
    // PUBLISH QoS 1, topic "t", pkid 1, payload "x".
    s.write_all(&[0x32, 0x06, 0x00, 0x01, b't', 0x00, 0x01, b'x'])
        .await
        .unwrap();
    let (bytes, closed) = read_to_close(&mut s).await;
    assert!(closed);
    assert_eq!(
        bytes,
        vec![0x20, 0x02, 0x00, 0x00],
        "only CONNACK, no PUBACK"
    );
}

#[tokio::test]
async fn qos2_duplicate_is_not_delivered_twice_before_pubrel() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut sub = v5(b.addr, "sub", |_| {}).await;
    sub.subscribe(filter("q2", 2)).await;
    let mut c = Raw5::simple(b.addr, "pub", 0).await;
    c.send(pub5("q2", b"once", 2, 9, None)).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.pkid == 9));
    let mut dup = pub5("q2", b"once", 2, 9, None);
    if let Packet::Publish(p) = &mut dup {
        p.dup = true;
    }
    c.send(dup).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.pkid == 9));
    c.send(Packet::PubRel(PubRel::new(9, None))).await;
    assert!(matches!(c.recv().await, Some(Packet::PubComp(r)) if r.pkid == 9));
    assert_eq!(sub.publish().await.payload.as_ref(), b"once");
    assert!(sub.no_publish_within(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn unacked_qos1_is_redelivered_with_dup_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let props = rumqttc::v5::mqttbytes::v5::ConnectProperties {
        session_expiry_interval: Some(60),
        ..rumqttc::v5::mqttbytes::v5::ConnectProperties::new()
    };
    let connect = Connect {
        keep_alive: 0,
        client_id: "forgetful".into(),
        clean_start: true,
        properties: Some(props.clone()),
    };
    let (mut c, _) = Raw5::connect(b.addr, connect, None).await;
    c.send(sub_packet(1, vec![filter("r", 1)])).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    let p = v5(b.addr, "p", |_| {}).await;
    p.client
        .publish("r", qos5(1), false, "again")
        .await
        .unwrap();
    match c.recv().await {
        Some(Packet::Publish(p)) => assert!(!p.dup),
        other => panic!("{other:?}"),
    }
    drop(c); // no PUBACK
    eventually("gone", || b.handle.clients().len() == 1).await;
    let connect = Connect {
        keep_alive: 0,
        client_id: "forgetful".into(),
        clean_start: false,
        properties: Some(props),
    };
    let (mut c, ack) = Raw5::connect(b.addr, connect, None).await;
    assert!(ack.session_present);
    match c.recv().await {
        Some(Packet::Publish(p)) => {
            assert!(p.dup);
            assert_eq!(p.payload.as_ref(), b"again");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn publish_declaring_256_mb_is_refused_without_affecting_others() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut other = v4(b.addr, "other", true).await;
    other.subscribe("ok", qos4(1)).await;
    let mut c = Raw5::simple(b.addr, "huge", 0).await;
    // PUBLISH with remaining length 268,435,455 (max varint), then a few bytes.
    c.send_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0x7F, 0x00, 0x01, b'x'])
        .await
        .unwrap();
    let got = c.until_closed().await;
    assert_eq!(
        disconnect_reason(&got),
        Some(DisconnectReasonCode::PacketTooLarge)
    );
    let p = v4(b.addr, "p", true).await;
    p.client
        .publish("ok", qos4(1), false, "fine")
        .await
        .unwrap();
    assert_eq!(other.publish().await.payload.as_ref(), b"fine");
}

#[tokio::test]
async fn message_larger_than_client_maximum_packet_size_is_dropped_for_that_client() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut small = v5(b.addr, "small", |o| {
        o.set_max_packet_size(Some(100));
    })
    .await;
    small.subscribe(filter("big", 1)).await;
    let mut large = v5(b.addr, "large", |_| {}).await;
    large.subscribe(filter("big", 1)).await;
    let p = v5(b.addr, "p", |_| {}).await;
    p.client
        .publish("big", qos5(1), false, vec![7u8; 500])
        .await
        .unwrap();
    p.client
        .publish("big", qos5(1), false, "tiny")
        .await
        .unwrap();
    assert_eq!(large.publish().await.payload.len(), 500);
    assert_eq!(small.publish().await.payload.as_ref(), b"tiny");
    assert_eq!(b.handle.stats().dropped_too_large, 1);
}

#[tokio::test]
async fn garbage_bytes_close_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (bytes, closed) = read_to_close(&mut s).await;
    assert!(closed);
    assert!(bytes.is_empty());
    let _ok = v4(b.addr, "after", true).await;
}

#[tokio::test]
async fn truncated_connect_is_closed_after_connect_timeout_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.connect_timeout = Duration::from_millis(500);
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let full = connect4_bytes("slow", 0, true);
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(&full[..full.len() - 2]).await.unwrap();
    let mut ok = v4(b.addr, "fast", true).await;
    ok.subscribe("x", qos4(0)).await;
    let (_, closed) = read_to_close(&mut s).await;
    assert!(closed);
    assert!(b.handle.stats().refused_connections >= 1);
}

#[tokio::test]
async fn client_sending_connack_is_disconnected_with_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut c = Raw5::simple(b.addr, "confused", 0).await;
    c.send_bytes(&[0x20, 0x03, 0x00, 0x00, 0x00]).await.unwrap();
    let got = c.until_closed().await;
    assert_eq!(
        disconnect_reason(&got),
        Some(DisconnectReasonCode::ProtocolError)
    );
    assert_eq!(b.handle.stats().protocol_errors, 1);
}

#[tokio::test]
async fn failed_connect_then_reconnect_with_the_same_id_works() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut bytes = connect4_bytes("again", 0, true);
    // Protocol level 3 (MQIsdp would be 3.1; here MQTT with level 3): CONNACK 0x01.
    bytes[8] = 3;
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let (reply, closed) = read_to_close(&mut s).await;
    assert!(closed);
    assert_eq!(reply, vec![0x20, 0x02, 0x00, 0x01]);
    let _c = v4(b.addr, "again", true).await;
    assert_eq!(b.handle.clients().len(), 1);
}

#[tokio::test]
async fn unknown_v5_level_gets_connack_0x84() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut bytes = connect4_bytes("future", 0, true);
    bytes[8] = 6;
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(&bytes).await.unwrap();
    let (reply, closed) = read_to_close(&mut s).await;
    assert!(closed);
    assert_eq!(reply.get(3), Some(&0x84));
}

#[tokio::test]
async fn connections_beyond_max_connections_get_server_busy() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.max_connections = 2;
    let b = TestBroker::start_with(dir.path(), config, TestHooks::new()).await;
    let _a = Raw5::simple(b.addr, "a", 0).await;
    let _b = Raw5::simple(b.addr, "b", 0).await;
    let c = Connect {
        keep_alive: 0,
        client_id: "c".into(),
        clean_start: true,
        properties: None,
    };
    let (_c, ack) = Raw5::connect(b.addr, c, None).await;
    assert_eq!(ack.code, ConnectReturnCode::ServerBusy);
    assert_eq!(b.handle.clients().len(), 2);
    // A client coming back while its old connection still holds a slot takes it over.
    let _a2 = Raw5::simple(b.addr, "a", 0).await;
    assert_eq!(b.handle.clients().len(), 2);
}

#[tokio::test]
async fn subscribe_refusals_carry_reason_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config();
    config.max_subscriptions = 2;
    let hooks = TestHooks::new();
    hooks.deny_subscribe.lock().unwrap().push("secret/#".into());
    let b = TestBroker::start_with(dir.path(), config, hooks).await;
    let mut c = Raw5::simple(b.addr, "s", 0).await;
    c.send(sub_packet(
        1,
        vec![
            filter("$share//x", 1),
            filter("a/#/b", 1),
            filter("secret/#", 1),
            filter("ok/1", 1),
            filter("ok/2", 2),
            filter("ok/3", 1),
        ],
    ))
    .await;
    let Some(Packet::SubAck(ack)) = c.recv().await else {
        panic!("expected SUBACK");
    };
    assert_eq!(
        ack.return_codes,
        vec![
            // A shared subscription needs a group name.
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::TopicFilterInvalid,
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::Success(qos5(1)),
            SubscribeReasonCode::Success(qos5(2)),
            SubscribeReasonCode::QuotaExceeded,
        ]
    );
    c.send(Packet::Unsubscribe(
        rumqttc::v5::mqttbytes::v5::Unsubscribe {
            pkid: 2,
            filters: vec!["ok/1".into(), "never".into()],
            properties: None,
        },
    ))
    .await;
    let Some(Packet::UnsubAck(u)) = c.recv().await else {
        panic!("expected UNSUBACK");
    };
    use rumqttc::v5::mqttbytes::v5::UnsubAckReason;
    assert_eq!(
        u.reasons,
        vec![
            UnsubAckReason::Success,
            UnsubAckReason::NoSubscriptionExisted
        ]
    );
}

#[tokio::test]
async fn publish_with_wildcard_topic_is_a_protocol_error() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut c = Raw5::simple(b.addr, "wild", 0).await;
    c.send(pub5("a/+", b"x", 0, 0, None)).await;
    let got = c.until_closed().await;
    assert_eq!(
        disconnect_reason(&got),
        Some(DisconnectReasonCode::TopicNameInvalid)
    );
}

#[tokio::test]
async fn acl_denied_publish_gets_v5_puback_0x87() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = TestHooks::new();
    hooks.deny_publish.lock().unwrap().push("down/x".into());
    let b = TestBroker::start_with(dir.path(), test_config(), hooks).await;
    let mut c = Raw5::simple(b.addr, "ipad", 0).await;
    c.send(pub5("down/x", b"spoof", 1, 3, None)).await;
    match c.recv().await {
        Some(Packet::PubAck(a)) => assert_eq!(a.reason, PubAckReason::NotAuthorized),
        other => panic!("{other:?}"),
    }
    assert_eq!(b.handle.stats().denied_publish, 1);
    assert!(b.hooks.ingested.lock().unwrap().is_empty());
}

#[tokio::test]
async fn shutdown_sends_server_shutting_down() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut c = Raw5::simple(b.addr, "bye", 0).await;
    let stop = tokio::spawn(b.stop());
    let got = c.until_closed().await;
    assert_eq!(
        disconnect_reason(&got),
        Some(DisconnectReasonCode::ServerShuttingDown)
    );
    stop.await.unwrap();
}

#[tokio::test]
async fn outgoing_qos2_in_pubrel_state_gets_pubrel_again_after_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let props = rumqttc::v5::mqttbytes::v5::ConnectProperties {
        session_expiry_interval: Some(60),
        ..rumqttc::v5::mqttbytes::v5::ConnectProperties::new()
    };
    let mk = |clean| Connect {
        keep_alive: 0,
        client_id: "q2".into(),
        clean_start: clean,
        properties: Some(props.clone()),
    };
    let (mut c, _) = Raw5::connect(b.addr, mk(true), None).await;
    c.send(sub_packet(1, vec![filter("two", 2)])).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    let p = v5(b.addr, "p", |_| {}).await;
    p.client
        .publish("two", qos5(2), false, "exactly")
        .await
        .unwrap();
    let pkid = match c.recv().await {
        Some(Packet::Publish(p)) => p.pkid,
        other => panic!("{other:?}"),
    };
    c.send(Packet::PubRec(rumqttc::v5::mqttbytes::v5::PubRec::new(
        pkid, None,
    )))
    .await;
    assert!(matches!(c.recv().await, Some(Packet::PubRel(r)) if r.pkid == pkid));
    drop(c); // no PUBCOMP
    eventually("gone", || b.handle.clients().len() == 1).await;
    let (mut c, ack) = Raw5::connect(b.addr, mk(false), None).await;
    assert!(ack.session_present);
    assert!(matches!(c.recv().await, Some(Packet::PubRel(r)) if r.pkid == pkid));
    c.send(Packet::PubComp(rumqttc::v5::mqttbytes::v5::PubComp::new(
        pkid, None,
    )))
    .await;
    assert!(c.recv_within(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn v311_acl_denied_publish_is_acknowledged_and_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let hooks = TestHooks::new();
    hooks.deny_publish.lock().unwrap().push("down/x".into());
    let b = TestBroker::start_with(dir.path(), test_config(), hooks).await;
    let mut sub = v4(b.addr, "sub", true).await;
    sub.subscribe("down/#", qos4(1)).await;
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(&connect4_bytes("spoofer", 0, true))
        .await
        .unwrap();
    // PUBLISH QoS 1 "down/x" pkid 4 payload "z".
    s.write_all(&[
        0x32, 0x0b, 0x00, 0x06, b'd', b'o', b'w', b'n', b'/', b'x', 0x00, 0x04, b'z',
    ])
    .await
    .unwrap();
    let mut buf = [0u8; 8];
    tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read_exact(&mut s, &mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, [0x20, 0x02, 0x00, 0x00, 0x40, 0x02, 0x00, 0x04]);
    assert!(sub.no_publish_within(Duration::from_millis(300)).await);
    assert_eq!(b.handle.stats().denied_publish, 1);
}

#[tokio::test]
async fn v311_invalid_filter_closes_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut s = TcpStream::connect(b.addr).await.unwrap();
    s.write_all(&connect4_bytes("bad", 0, true)).await.unwrap();
    // SUBSCRIBE pkid 1 filter "a/#/b" QoS 0.
    s.write_all(&[
        0x82, 0x0a, 0x00, 0x01, 0x00, 0x05, b'a', b'/', b'#', b'/', b'b', 0x00,
    ])
    .await
    .unwrap();
    let (bytes, closed) = read_to_close(&mut s).await;
    assert!(closed);
    assert_eq!(bytes, vec![0x20, 0x02, 0x00, 0x00]);
}

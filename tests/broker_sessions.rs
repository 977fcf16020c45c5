//! Sessions: persistence across reconnects and restarts, clean start, takeover, wills.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{
    Connect, ConnectProperties, DisconnectReasonCode, LastWill, LastWillProperties, Packet,
};
use trainrelay_testkit::broker::*;

#[tokio::test]
async fn persistent_v311_session_receives_qos1_messages_missed_while_away() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut s = v4(b.addr, "ipad", false).await;
    s.subscribe("orders/#", qos4(1)).await;
    s.client.disconnect().await.unwrap();
    drop(s);
    eventually("ipad gone", || b.handle.clients().is_empty()).await;
    let p = v4(b.addr, "p", true).await;
    p.client
        .publish("orders/1", qos4(1), false, "one")
        .await
        .unwrap();
    p.client
        .publish("orders/2", qos4(0), false, "qos0 not kept")
        .await
        .unwrap();
    p.client
        .publish("orders/3", qos4(1), false, "three")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = v4(b.addr, "ipad", false).await;
    assert_eq!(s.publish().await.payload.as_ref(), b"one");
    assert_eq!(s.publish().await.payload.as_ref(), b"three");
}

#[tokio::test]
async fn persistent_session_and_queued_messages_survive_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut s = v5(b.addr, "ipad5", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
    })
    .await;
    s.subscribe(filter("down/#", 1)).await;
    s.client.disconnect().await.unwrap();
    drop(s);
    eventually("ipad gone", || b.handle.clients().is_empty()).await;
    let msg = trainrelay::message::Message {
        topic: "down/restriction".into(),
        payload: "40".into(),
        qos: trainrelay::message::QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
        accepted: trainrelay::clock::Stamp::now(),
        deadline: None,
    };
    // inject resolves once the queued row is committed.
    b.handle.inject(msg).await.unwrap();
    b.stop().await;

    let b = TestBroker::start(dir.path()).await;
    let mut s = v5(b.addr, "ipad5", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
    })
    .await;
    assert!(s.connack.session_present);
    assert_eq!(s.publish().await.payload.as_ref(), b"40");
}

#[tokio::test]
async fn clean_start_discards_the_old_session() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut s = v5(b.addr, "c", |o| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(600));
    })
    .await;
    s.subscribe(filter("x", 1)).await;
    s.client.disconnect().await.unwrap();
    drop(s);
    eventually("c gone", || b.handle.clients().is_empty()).await;
    let p = v5(b.addr, "p", |_| {}).await;
    p.client
        .publish("x", qos5(1), false, "missed")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = v5(b.addr, "c", |o| {
        o.set_clean_start(true);
    })
    .await;
    assert!(!s.connack.session_present);
    assert!(s.no_publish_within(Duration::from_millis(300)).await);
    // The subscription is gone too.
    p.client
        .publish("x", qos5(1), false, "later")
        .await
        .unwrap();
    assert!(s.no_publish_within(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn session_takeover_disconnects_the_old_connection_with_0x8e() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut first = Raw5::simple(b.addr, "same", 0).await;
    let _second = Raw5::simple(b.addr, "same", 0).await;
    let got = first.until_closed().await;
    assert!(
        got.iter().any(|p| matches!(p, Packet::Disconnect(d) if d.reason_code == DisconnectReasonCode::SessionTakenOver)),
        "{got:?}"
    );
    assert_eq!(b.handle.clients().len(), 1);
}

fn will_connect(id: &str, delay: Option<u32>, expiry: Option<u32>) -> (Connect, Option<LastWill>) {
    let c = Connect {
        keep_alive: 0,
        client_id: id.into(),
        clean_start: true,
        properties: expiry.map(|e| ConnectProperties {
            session_expiry_interval: Some(e),
            ..ConnectProperties::new()
        }),
    };
    let w = LastWill {
        topic: format!("status/{id}").into(),
        message: "offline".into(),
        qos: qos5(1),
        retain: false,
        properties: delay.map(|d| LastWillProperties {
            delay_interval: Some(d),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: vec![],
        }),
    };
    (c, Some(w))
}

#[tokio::test]
async fn will_is_published_on_abnormal_close_but_not_on_normal_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut watcher = v5(b.addr, "watcher", |_| {}).await;
    watcher.subscribe(filter("status/#", 1)).await;

    let (c, w) = will_connect("polite", None, None);
    let (mut polite, _) = Raw5::connect(b.addr, c, w).await;
    polite
        .send(Packet::Disconnect(
            rumqttc::v5::mqttbytes::v5::Disconnect::new(DisconnectReasonCode::NormalDisconnection),
        ))
        .await;
    polite.until_closed().await;

    let (c, w) = will_connect("crashy", None, None);
    let (crashy, _) = Raw5::connect(b.addr, c, w).await;
    drop(crashy);

    let got = watcher.publish().await;
    assert_eq!(got.topic.as_ref(), b"status/crashy");
    assert_eq!(got.payload.as_ref(), b"offline");
    assert!(watcher.no_publish_within(Duration::from_millis(300)).await);
    // The will went through the ingest hook, so the relay's uplink sees it.
    assert!(b
        .hooks
        .ingested
        .lock()
        .unwrap()
        .iter()
        .any(|(c, m)| c == "crashy" && m.topic == "status/crashy"));
    assert_eq!(b.hooks.wills(), vec!["status/crashy".to_string()]);
}

#[tokio::test]
async fn will_with_delay_is_cancelled_by_a_timely_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut watcher = v5(b.addr, "watcher", |_| {}).await;
    watcher.subscribe(filter("status/#", 1)).await;
    let (c, w) = will_connect("tunnel", Some(2), Some(60));
    let (first, _) = Raw5::connect(b.addr, c, w).await;
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (c, _) = will_connect("tunnel", None, Some(60));
    let c = Connect {
        clean_start: false,
        ..c
    };
    let (_back, ack) = Raw5::connect(b.addr, c, None).await;
    assert!(ack.session_present);
    assert!(watcher.no_publish_within(Duration::from_millis(2500)).await);
    assert!(b.hooks.wills().is_empty());
}

#[tokio::test]
async fn will_delay_longer_than_session_expiry_fires_at_session_end() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut watcher = v5(b.addr, "watcher", |_| {}).await;
    watcher.subscribe(filter("status/#", 1)).await;
    let (c, w) = will_connect("gone", Some(600), Some(1));
    let (first, _) = Raw5::connect(b.addr, c, w).await;
    drop(first);
    let got = watcher.publish().await;
    assert_eq!(got.topic.as_ref(), b"status/gone");
}

#[tokio::test]
async fn incoming_qos2_awaiting_pubrel_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mk = |clean| Connect {
        keep_alive: 0,
        client_id: "q2in".into(),
        clean_start: clean,
        properties: Some(ConnectProperties {
            session_expiry_interval: Some(600),
            ..ConnectProperties::new()
        }),
    };
    let (mut c, _) = Raw5::connect(b.addr, mk(true), None).await;
    c.send(pub5("up/q2", b"exactly once", 2, 5, None)).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.pkid == 5));
    assert_eq!(b.hooks.ingested.lock().unwrap().len(), 1);
    b.stop().await;
    drop(c);

    let b = TestBroker::start(dir.path()).await;
    let (mut c, ack) = Raw5::connect(b.addr, mk(false), None).await;
    assert!(ack.session_present);
    let mut dup = pub5("up/q2", b"exactly once", 2, 5, None);
    if let Packet::Publish(p) = &mut dup {
        p.dup = true;
    }
    c.send(dup).await;
    assert!(matches!(c.recv().await, Some(Packet::PubRec(r)) if r.pkid == 5));
    assert!(
        b.hooks.ingested.lock().unwrap().is_empty(),
        "duplicate ingested again"
    );
    c.send(Packet::PubRel(rumqttc::v5::mqttbytes::v5::PubRel::new(
        5, None,
    )))
    .await;
    match c.recv().await {
        Some(Packet::PubComp(r)) => {
            assert_eq!(r.pkid, 5);
            assert_eq!(r.reason, rumqttc::v5::mqttbytes::v5::PubCompReason::Success);
        }
        other => panic!("{other:?}"),
    }
}

/// MQTT 5 §4.4: a resumed session gets its unacknowledged PUBRELs again. A QoS 2 message the
/// client answered with PUBREC before the broker restarted is not sent again after the
/// restart; its PUBREL is, under the packet id of that PUBREC, and PUBCOMP completes it.
#[tokio::test]
async fn outgoing_qos2_answered_with_pubrec_gets_its_pubrel_after_a_restart() {
    use rumqttc::v5::mqttbytes::v5::{Filter, PubComp, PubRec, Subscribe};
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mk = |clean| Connect {
        keep_alive: 0,
        client_id: "q2out".into(),
        clean_start: clean,
        properties: Some(ConnectProperties {
            session_expiry_interval: Some(600),
            ..ConnectProperties::new()
        }),
    };
    let (mut c, _) = Raw5::connect(b.addr, mk(true), None).await;
    let mut sub = Subscribe::new(
        Filter::new("down/q2", rumqttc::v5::mqttbytes::QoS::ExactlyOnce),
        None,
    );
    sub.pkid = 1;
    c.send(Packet::Subscribe(sub)).await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    let msg = trainrelay::message::Message {
        topic: "down/q2".into(),
        payload: "stop at km 12".into(),
        qos: trainrelay::message::QoS::ExactlyOnce,
        retain: false,
        properties: Default::default(),
        accepted: trainrelay::clock::Stamp::now(),
        deadline: None,
    };
    b.handle.inject(msg).await.unwrap();
    let pkid = match c.recv().await {
        Some(Packet::Publish(p)) => p.pkid,
        other => panic!("expected the PUBLISH, got {other:?}"),
    };
    c.send(Packet::PubRec(PubRec::new(pkid, None))).await;
    // The PUBREL comes; the client does not complete it before the broker goes away.
    assert!(matches!(c.recv().await, Some(Packet::PubRel(r)) if r.pkid == pkid));
    // The PUBREC's row change was submitted before the PUBREL was sent; stopping the broker
    // joins the store's writer, which commits everything submitted.
    b.stop().await;
    drop(c);

    let b = TestBroker::start(dir.path()).await;
    let (mut c, ack) = Raw5::connect(b.addr, mk(false), None).await;
    assert!(ack.session_present);
    match c.recv_within(Duration::from_secs(5)).await {
        Some(Packet::PubRel(r)) => assert_eq!(r.pkid, pkid),
        other => panic!("expected the PUBREL of packet id {pkid} again, got {other:?}"),
    }
    c.send(Packet::PubComp(PubComp::new(pkid, None))).await;
    // Completed: nothing more comes, on this connection or after another restart.
    assert!(c.recv_within(Duration::from_millis(300)).await.is_none());
    b.stop().await;
    drop(c);
    let b = TestBroker::start(dir.path()).await;
    let (mut c, ack) = Raw5::connect(b.addr, mk(false), None).await;
    assert!(ack.session_present);
    assert!(c.recv_within(Duration::from_millis(500)).await.is_none());
}

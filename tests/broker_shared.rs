//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5 §4.8.2, also from 3.1.1 clients),
//! and request / response properties between two v5 clients.

use std::collections::HashMap;
use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::Packet;
use trainrelay_testkit::broker::*;

#[tokio::test]
async fn each_message_goes_to_one_member_round_robin() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut a = v5(b.addr, "member-a", |_| {}).await;
    assert_eq!(
        a.connack
            .properties
            .as_ref()
            .and_then(|p| p.shared_subscription_available),
        Some(1)
    );
    a.subscribe(filter("$share/workers/jobs/#", 1)).await;
    let mut c = v5(b.addr, "member-c", |_| {}).await;
    c.subscribe(filter("$share/workers/jobs/#", 1)).await;
    let mut old = v4(b.addr, "member-b", true).await;
    old.subscribe("$share/workers/jobs/#", qos4(1)).await;
    // Another group gets its own copy of each message.
    let mut audit = v5(b.addr, "audit", |_| {}).await;
    audit.subscribe(filter("$share/audit/jobs/#", 1)).await;

    let p = v5(b.addr, "pub", |_| {}).await;
    for i in 0..30 {
        p.client
            .publish(format!("jobs/{i}"), qos5(1), false, format!("{i}"))
            .await
            .unwrap();
    }
    let mut seen: HashMap<String, &str> = HashMap::new();
    for _ in 0..10 {
        let m = a.publish().await;
        let k = String::from_utf8_lossy(&m.payload).into_owned();
        assert!(seen.insert(k, "a").is_none(), "delivered twice");
        let m = c.publish().await;
        let k = String::from_utf8_lossy(&m.payload).into_owned();
        assert!(seen.insert(k, "c").is_none(), "delivered twice");
        let m = old.publish().await;
        let k = String::from_utf8_lossy(&m.payload).into_owned();
        assert!(seen.insert(k, "b").is_none(), "delivered twice");
    }
    assert_eq!(seen.len(), 30);
    for _ in 0..30 {
        audit.publish().await;
    }
    assert!(a.no_publish_within(Duration::from_millis(200)).await);
    assert!(c.no_publish_within(Duration::from_millis(200)).await);
    assert!(old.no_publish_within(Duration::from_millis(200)).await);
    assert!(audit.no_publish_within(Duration::from_millis(200)).await);
}

#[tokio::test]
async fn no_retained_messages_on_a_shared_subscribe() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let p = v5(b.addr, "pub", |_| {}).await;
    p.client
        .publish("state/x", qos5(1), true, "retained")
        .await
        .unwrap();
    let mut plain = v5(b.addr, "plain", |_| {}).await;
    plain.subscribe(filter("state/#", 1)).await;
    assert!(plain.publish().await.retain, "the retained message exists");
    let mut member = v5(b.addr, "member", |_| {}).await;
    member.subscribe(filter("$share/g/state/#", 1)).await;
    assert!(member.no_publish_within(Duration::from_millis(500)).await);
    // Live messages do arrive.
    p.client
        .publish("state/x", qos5(1), false, "live")
        .await
        .unwrap();
    assert_eq!(member.publish().await.payload.as_ref(), b"live");
}

#[tokio::test]
async fn unacknowledged_message_of_a_member_that_leaves_goes_to_another() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    // Members in client id order: "a-silent" gets the first message and never acknowledges.
    let mut silent = Raw5::simple(b.addr, "a-silent", 0).await;
    silent
        .send(Packet::Subscribe(rumqttc::v5::mqttbytes::v5::Subscribe {
            pkid: 1,
            filters: vec![filter("$share/g/orders", 1)],
            properties: None,
        }))
        .await;
    assert!(matches!(silent.recv().await, Some(Packet::SubAck(_))));
    let mut other = v5(b.addr, "b-other", |_| {}).await;
    other.subscribe(filter("$share/g/orders", 1)).await;
    let p = v5(b.addr, "pub", |_| {}).await;
    p.client
        .publish("orders", qos5(1), false, "order 1")
        .await
        .unwrap();
    match silent.recv().await {
        Some(Packet::Publish(m)) => assert_eq!(m.payload.as_ref(), b"order 1"),
        other => panic!("expected the PUBLISH at the first member, got {other:?}"),
    }
    assert!(other.no_publish_within(Duration::from_millis(200)).await);
    // Gone without PUBACK: the other member gets it.
    drop(silent);
    let m = other.publish().await;
    assert_eq!(m.payload.as_ref(), b"order 1");
}

#[tokio::test]
async fn response_topic_and_correlation_data_reach_the_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut responder = v5(b.addr, "responder", |_| {}).await;
    responder.subscribe(filter("req/x", 1)).await;
    let mut requester = v5(b.addr, "requester", |_| {}).await;
    requester.subscribe(filter("resp/requester", 1)).await;
    let props = p5::PublishProperties {
        response_topic: Some("resp/requester".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"corr-17")),
        ..Default::default()
    };
    requester
        .client
        .publish_with_properties("req/x", qos5(1), false, "question", props)
        .await
        .unwrap();
    let req = responder.publish().await;
    let props = req.properties.expect("properties forwarded");
    assert_eq!(props.response_topic.as_deref(), Some("resp/requester"));
    assert_eq!(props.correlation_data.as_deref(), Some(&b"corr-17"[..]));
    let answer = p5::PublishProperties {
        correlation_data: props.correlation_data.clone(),
        ..Default::default()
    };
    responder
        .client
        .publish_with_properties("resp/requester", qos5(1), false, "answer", answer)
        .await
        .unwrap();
    let resp = requester.publish().await;
    assert_eq!(resp.payload.as_ref(), b"answer");
    assert_eq!(
        resp.properties.and_then(|p| p.correlation_data).as_deref(),
        Some(&b"corr-17"[..])
    );
}

/// A persistent v5 member on a raw socket (session expiry 600 s).
async fn persistent_member(
    addr: std::net::SocketAddr,
    id: &str,
    clean_start: bool,
) -> (Raw5, bool) {
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
    (raw, ack.session_present)
}

async fn expect_publish(c: &mut Raw5, payload: &[u8]) -> p5::Publish {
    match c.recv().await {
        Some(Packet::Publish(m)) => {
            assert_eq!(m.payload.as_ref(), payload, "{m:?}");
            m
        }
        other => panic!("expected the PUBLISH of {payload:?}, got {other:?}"),
    }
}

/// MQTT 5 §4.8.2: a QoS 2 message sent to a member whose connection breaks is completed with
/// that member when it reconnects, and never sent to another member; a QoS 1 message it left
/// unacknowledged goes to another member.
#[tokio::test]
async fn a_qos2_message_sent_to_a_member_that_leaves_stays_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    // Members in client id order: "a-member" gets the first and third message.
    let (mut a, _) = persistent_member(b.addr, "a-member", true).await;
    a.send(Packet::Subscribe(rumqttc::v5::mqttbytes::v5::Subscribe {
        pkid: 1,
        filters: vec![filter("$share/g/orders", 2)],
        properties: None,
    }))
    .await;
    assert!(matches!(a.recv().await, Some(Packet::SubAck(_))));
    let mut other = v5(b.addr, "b-other", |_| {}).await;
    other.subscribe(filter("$share/g/orders", 2)).await;
    let p = v5(b.addr, "pub", |_| {}).await;
    for (payload, qos) in [("exactly once", 2), ("one", 1), ("two", 1)] {
        p.client
            .publish("orders", qos5(qos), false, payload)
            .await
            .unwrap();
    }
    let sent = expect_publish(&mut a, b"exactly once").await;
    assert_eq!(sent.qos, qos5(2));
    assert_eq!(other.publish().await.payload.as_ref(), b"one");
    expect_publish(&mut a, b"two").await;

    // Gone with both unacknowledged: the QoS 1 message goes to the other member, the QoS 2
    // message does not.
    drop(a);
    assert_eq!(other.publish().await.payload.as_ref(), b"two");
    assert!(other.no_publish_within(Duration::from_millis(500)).await);

    // Back: the member gets it again and completes it.
    let (mut a, present) = persistent_member(b.addr, "a-member", false).await;
    assert!(present);
    let again = expect_publish(&mut a, b"exactly once").await;
    assert!(again.dup);
    assert_eq!(again.pkid, sent.pkid);
    a.send(Packet::PubRec(p5::PubRec::new(sent.pkid, None)))
        .await;
    assert!(matches!(a.recv().await, Some(Packet::PubRel(r)) if r.pkid == sent.pkid));

    // Gone between PUBREL and PUBCOMP: still nobody else's; the PUBREL comes again.
    drop(a);
    let (mut a, present) = persistent_member(b.addr, "a-member", false).await;
    assert!(present);
    assert!(matches!(a.recv().await, Some(Packet::PubRel(r)) if r.pkid == sent.pkid));
    a.send(Packet::PubComp(p5::PubComp::new(sent.pkid, None)))
        .await;
    assert!(a.recv_within(Duration::from_millis(300)).await.is_none());
    assert!(other.no_publish_within(Duration::from_millis(200)).await);
}

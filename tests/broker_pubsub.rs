//! Publish/subscribe round trips across protocol versions and QoS levels.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::PublishProperties;
use trainrelay_testkit::broker::*;

#[tokio::test]
async fn v311_round_trip_at_qos_0_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut sub = v4(b.addr, "sub", true).await;
    sub.subscribe("a/b", qos4(2)).await;
    let publisher = v4(b.addr, "pub", true).await;
    for q in 0..=2u8 {
        publisher
            .client
            .publish("a/b", qos4(q), false, vec![q])
            .await
            .unwrap();
        let p = sub.publish().await;
        assert_eq!(p.topic, "a/b");
        assert_eq!(p.payload.as_ref(), &[q]);
        assert_eq!(p.qos, qos4(q));
    }
}

#[tokio::test]
async fn v5_round_trip_at_qos_0_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut sub = v5(b.addr, "sub5", |_| {}).await;
    sub.subscribe(filter("a/+", 2)).await;
    let publisher = v5(b.addr, "pub5", |_| {}).await;
    for q in 0..=2u8 {
        publisher
            .client
            .publish("a/x", qos5(q), false, vec![q])
            .await
            .unwrap();
        let p = sub.publish().await;
        assert_eq!(p.topic.as_ref(), b"a/x");
        assert_eq!(p.payload.as_ref(), &[q]);
        assert_eq!(p.qos, qos5(q));
    }
}

#[tokio::test]
async fn delivery_qos_is_min_of_publish_and_granted_qos() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut s1 = v4(b.addr, "s1", true).await;
    s1.subscribe("t", qos4(1)).await;
    let mut s0 = v5(b.addr, "s0", |_| {}).await;
    s0.subscribe(filter("t", 0)).await;
    let publisher = v4(b.addr, "p", true).await;
    publisher
        .client
        .publish("t", qos4(2), false, "x")
        .await
        .unwrap();
    assert_eq!(s1.publish().await.qos, qos4(1));
    assert_eq!(s0.publish().await.qos, qos5(0));
    publisher
        .client
        .publish("t", qos4(0), false, "y")
        .await
        .unwrap();
    assert_eq!(s1.publish().await.qos, qos4(0));
}

#[tokio::test]
async fn v5_user_properties_are_delivered_to_a_v311_subscriber_without_them() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut sub = v4(b.addr, "old", true).await;
    sub.subscribe("props", qos4(1)).await;
    let mut sub5 = v5(b.addr, "new", |_| {}).await;
    sub5.subscribe(filter("props", 1)).await;
    let publisher = v5(b.addr, "pub", |_| {}).await;
    let props = PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    publisher
        .client
        .publish_with_properties("props", qos5(1), false, "hello", props)
        .await
        .unwrap();
    let p = sub.publish().await;
    assert_eq!(p.payload.as_ref(), b"hello");
    let p5 = sub5.publish().await;
    let got = p5.properties.expect("properties");
    assert_eq!(
        got.user_properties,
        vec![("k".to_string(), "v".to_string())]
    );
    assert_eq!(got.content_type.as_deref(), Some("text/plain"));
}

#[tokio::test]
async fn non_ascii_topic_is_delivered_to_hash_subscriber_and_broker_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut sub = v4(b.addr, "all", true).await;
    sub.subscribe("#", qos4(1)).await;
    let publisher = v4(b.addr, "p", true).await;
    publisher
        .client
        .publish("Ü/x", qos4(1), false, "1")
        .await
        .unwrap();
    assert_eq!(sub.publish().await.topic, "Ü/x");
    publisher
        .client
        .publish("plain", qos4(1), false, "2")
        .await
        .unwrap();
    assert_eq!(sub.publish().await.topic, "plain");
    assert_eq!(b.handle.clients().len(), 2);
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_one_copy_with_all_identifiers() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut sub = v5(b.addr, "overlap", |_| {}).await;
    let mut props = rumqttc::v5::mqttbytes::v5::SubscribeProperties {
        id: Some(7),
        user_properties: vec![],
    };
    sub.client
        .subscribe_with_properties("o/#", qos5(0), props.clone())
        .await
        .unwrap();
    sub.suback().await;
    props.id = Some(9);
    sub.client
        .subscribe_with_properties("o/x", qos5(2), props)
        .await
        .unwrap();
    sub.suback().await;
    let publisher = v5(b.addr, "p", |_| {}).await;
    publisher
        .client
        .publish("o/x", qos5(2), false, "m")
        .await
        .unwrap();
    let p = sub.publish().await;
    assert_eq!(p.qos, qos5(2));
    let mut ids = p.properties.unwrap().subscription_identifiers;
    ids.sort();
    assert_eq!(ids, vec![7, 9]);
    assert!(sub.no_publish_within(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn inject_reaches_subscribers_without_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut sub = v5(b.addr, "s", |_| {}).await;
    sub.subscribe(filter("down/#", 1)).await;
    let msg = trainrelay::message::Message {
        topic: "down/speed".into(),
        payload: "80".into(),
        qos: trainrelay::message::QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
        accepted: trainrelay::clock::Stamp::now(),
        deadline: None,
    };
    b.handle.inject(msg).await.unwrap();
    assert_eq!(sub.publish().await.payload.as_ref(), b"80");
    assert!(b.hooks.ingested.lock().unwrap().is_empty());
    let bad = trainrelay::message::Message {
        topic: "down/+".into(),
        payload: "x".into(),
        qos: trainrelay::message::QoS::AtMostOnce,
        retain: false,
        properties: Default::default(),
        accepted: trainrelay::clock::Stamp::now(),
        deadline: None,
    };
    assert!(b.handle.inject(bad).await.is_err());
}

/// A v5 client that accepts topic aliases gets them: the first PUBLISH on a topic carries
/// topic and alias, later ones the alias alone, up to the client's Topic Alias Maximum.
#[tokio::test]
async fn topic_aliases_are_sent_up_to_the_clients_maximum() {
    use rumqttc::v5::mqttbytes::v5::{Connect, ConnectProperties, Packet, Subscribe};
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let props = ConnectProperties {
        topic_alias_max: Some(2),
        ..ConnectProperties::new()
    };
    let connect = Connect {
        keep_alive: 0,
        client_id: "aliased".into(),
        clean_start: true,
        properties: Some(props),
    };
    let (mut c, _) = Raw5::connect(b.addr, connect, None).await;
    c.send(Packet::Subscribe(Subscribe {
        pkid: 1,
        filters: vec![filter("t/#", 0)],
        properties: None,
    }))
    .await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
    let p = v5(b.addr, "pub", |_| {}).await;
    for t in ["t/a", "t/a", "t/b", "t/c", "t/b"] {
        p.client.publish(t, qos5(0), false, t).await.unwrap();
    }
    let mut got = Vec::new();
    while got.len() < 5 {
        match c.recv().await {
            Some(Packet::Publish(m)) => got.push((
                String::from_utf8_lossy(&m.topic).into_owned(),
                m.properties.and_then(|p| p.topic_alias),
                String::from_utf8_lossy(&m.payload).into_owned(),
            )),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    let want = [
        ("t/a", Some(1), "t/a"),
        ("", Some(1), "t/a"),
        ("t/b", Some(2), "t/b"),
        ("t/c", None, "t/c"),
        ("", Some(2), "t/b"),
    ];
    let want: Vec<_> = want
        .iter()
        .map(|(t, a, p)| (t.to_string(), *a, p.to_string()))
        .collect();
    assert_eq!(got, want);
}

/// A SUBSCRIBE that reached the broker before another client's PUBLISH is in effect for it,
/// also when the subscriber does not wait for its SUBACK: both packets are written back to
/// back, 200 times (with the broker on a multi-threaded runtime, 20 to 50 of them were routed
/// first).
#[tokio::test]
async fn subscribe_that_arrived_first_is_in_effect_for_another_clients_publish() {
    use rumqttc::v5::mqttbytes::v5::{Packet, Subscribe};
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut publisher = Raw5::simple(b.addr, "requester", 0).await;
    let mut subscriber = Raw5::simple(b.addr, "responder", 0).await;
    let mut missed = Vec::new();
    for i in 1..=200u16 {
        let topic = format!("race/{i}");
        let mut sub = Subscribe::new(filter(&topic, 1), None);
        sub.pkid = i;
        subscriber.send(Packet::Subscribe(sub)).await;
        publisher.send(pub5(&topic, b"request", 1, i, None)).await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(a)) if a.pkid == i));
        // Once the SUBACK is in, a marker on the same topic surely reaches the subscriber, and
        // after the request if that was routed to it (one publisher, one topic: in order).
        let mut got = false;
        let mut subscribed = false;
        let mut marker_sent = false;
        loop {
            match subscriber.recv().await {
                Some(Packet::SubAck(_)) => subscribed = true,
                Some(Packet::Publish(p)) => {
                    if p.qos != rumqttc::v5::mqttbytes::QoS::AtMostOnce {
                        let ack = rumqttc::v5::mqttbytes::v5::PubAck::new(p.pkid, None);
                        subscriber.send(Packet::PubAck(ack)).await;
                    }
                    match &p.payload[..] {
                        b"request" => got = true,
                        b"marker" => break,
                        other => panic!("round {i}: unexpected payload {other:?}"),
                    }
                }
                other => panic!("round {i}: got {other:?}"),
            }
            if subscribed && !marker_sent {
                marker_sent = true;
                publisher
                    .send(pub5(&topic, b"marker", 1, 1000 + i, None))
                    .await;
                assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
            }
        }
        if !got {
            missed.push(i);
        }
        // Within `max_subscriptions`.
        let mut unsub = rumqttc::v5::mqttbytes::v5::Unsubscribe::new(&topic, None);
        unsub.pkid = i;
        subscriber.send(Packet::Unsubscribe(unsub)).await;
        assert!(matches!(subscriber.recv().await, Some(Packet::UnsubAck(_))));
    }
    assert!(missed.is_empty(), "routed before the SUBSCRIBE: {missed:?}");
}

//! Retained messages, their expiry, and the v5 subscription options that touch them.

use std::time::Duration;

use rumqttc::v5::mqttbytes::v5::{Filter, PublishProperties, RetainForwardRule};
use trainrelay_testkit::broker::*;

#[tokio::test]
async fn retained_is_set_cleared_by_empty_retained_and_not_by_empty_plain_publish() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let p = v4(b.addr, "p", true).await;
    p.client
        .publish("state", qos4(1), true, "on")
        .await
        .unwrap();
    // An empty non-retained publish must not touch the retained message.
    p.client.publish("state", qos4(1), false, "").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut s = v4(b.addr, "s1", true).await;
    s.subscribe("state", qos4(1)).await;
    let got = s.publish().await;
    assert!(got.retain);
    assert_eq!(got.payload.as_ref(), b"on");
    p.client.publish("state", qos4(1), true, "").await.unwrap();
    // The live empty retained publish reaches s (retain flag cleared for a live delivery).
    let live = s.publish().await;
    assert!(live.payload.is_empty());
    let mut s2 = v4(b.addr, "s2", true).await;
    s2.subscribe("state", qos4(1)).await;
    assert!(s2.no_publish_within(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn retained_message_expiry_is_honoured_and_remaining_interval_sent() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let p = v5(b.addr, "p", |_| {}).await;
    let props = PublishProperties {
        message_expiry_interval: Some(2),
        ..Default::default()
    };
    p.client
        .publish_with_properties("exp", qos5(1), true, "soon gone", props)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut s = v5(b.addr, "s", |_| {}).await;
    s.subscribe(filter("exp", 1)).await;
    let got = s.publish().await;
    assert!(got.retain);
    let left = got.properties.unwrap().message_expiry_interval.unwrap();
    assert!((1..2).contains(&left), "remaining expiry {left}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut s2 = v5(b.addr, "s2", |_| {}).await;
    s2.subscribe(filter("exp", 1)).await;
    assert!(s2.no_publish_within(Duration::from_millis(300)).await);
}

fn rh(path: &str, rule: RetainForwardRule) -> Filter {
    let mut f = filter(path, 1);
    f.retain_forward_rule = rule;
    f
}

#[tokio::test]
async fn retain_handling_0_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let p = v5(b.addr, "p", |_| {}).await;
    p.client.publish("r", qos5(1), true, "kept").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut s = v5(b.addr, "s", |_| {}).await;
    // 0: sent on every subscribe.
    s.subscribe(rh("r", RetainForwardRule::OnEverySubscribe))
        .await;
    assert!(s.publish().await.retain);
    s.subscribe(rh("r", RetainForwardRule::OnEverySubscribe))
        .await;
    assert!(s.publish().await.retain);
    // 1: only if the subscription is new.
    s.subscribe(rh("r", RetainForwardRule::OnNewSubscribe))
        .await;
    assert!(s.no_publish_within(Duration::from_millis(300)).await);
    let mut s1 = v5(b.addr, "s1", |_| {}).await;
    s1.subscribe(rh("r", RetainForwardRule::OnNewSubscribe))
        .await;
    assert!(s1.publish().await.retain);
    // 2: never.
    let mut s2 = v5(b.addr, "s2", |_| {}).await;
    s2.subscribe(rh("r", RetainForwardRule::Never)).await;
    assert!(s2.no_publish_within(Duration::from_millis(300)).await);
}

#[tokio::test]
async fn retain_as_published_keeps_the_flag_on_live_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut keep = v5(b.addr, "keep", |_| {}).await;
    let mut f = filter("rap", 1);
    f.preserve_retain = true;
    keep.subscribe(f).await;
    let mut plain = v5(b.addr, "plain", |_| {}).await;
    plain.subscribe(filter("rap", 1)).await;
    let p = v5(b.addr, "p", |_| {}).await;
    p.client.publish("rap", qos5(1), true, "x").await.unwrap();
    assert!(keep.publish().await.retain);
    assert!(!plain.publish().await.retain);
}

#[tokio::test]
async fn no_local_suppresses_own_messages() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let mut me = v5(b.addr, "me", |_| {}).await;
    let mut f = filter("chat", 1);
    f.nolocal = true;
    me.subscribe(f).await;
    let mut other = v5(b.addr, "other", |_| {}).await;
    other.subscribe(filter("chat", 1)).await;
    me.client
        .publish("chat", qos5(1), false, "hi")
        .await
        .unwrap();
    assert_eq!(other.publish().await.payload.as_ref(), b"hi");
    assert!(me.no_publish_within(Duration::from_millis(300)).await);
    other
        .client
        .publish("chat", qos5(1), false, "yo")
        .await
        .unwrap();
    assert_eq!(me.publish().await.payload.as_ref(), b"yo");
}

#[tokio::test]
async fn retained_messages_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let msg = trainrelay::message::Message {
        topic: "down/state".into(),
        payload: "green".into(),
        qos: trainrelay::message::QoS::AtLeastOnce,
        retain: true,
        properties: Default::default(),
        accepted: trainrelay::clock::Stamp::now(),
        deadline: None,
    };
    b.handle.inject(msg).await.unwrap();
    b.stop().await;
    let b = TestBroker::start(dir.path()).await;
    let mut s = v4(b.addr, "s", true).await;
    s.subscribe("down/#", qos4(1)).await;
    let got = s.publish().await;
    assert!(got.retain);
    assert_eq!(got.payload.as_ref(), b"green");
}

/// The downlink's case: the store write of a retained message fails (here the route version
/// committed with it). Memory does not keep it, so the central broker's redelivery is not
/// found unchanged and is written; after a restart the iPads get it, not the older value.
#[tokio::test]
async fn a_retained_message_that_failed_to_commit_is_taken_again_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let b = TestBroker::start(dir.path()).await;
    let speed = |v: &str| trainrelay::message::Message {
        topic: "down/speed".into(),
        payload: v.to_string().into(),
        qos: trainrelay::message::QoS::AtLeastOnce,
        retain: true,
        properties: Default::default(),
        accepted: trainrelay::clock::Stamp::now(),
        deadline: None,
    };
    b.handle.inject(speed("80")).await.unwrap();
    let failing: trainrelay::store::StoreWrite =
        Box::new(|_| Err(trainrelay::store::StoreError::Full));
    assert!(b.handle.inject_with(speed("60"), failing).await.is_err());

    // The redelivery, as the downlink handles it.
    assert!(
        !b.handle
            .repeats_retained("down/speed", &speed("60"), "stamp"),
        "a value the store does not hold was taken for unchanged"
    );
    b.handle.inject(speed("60")).await.unwrap();
    assert!(b
        .handle
        .repeats_retained("down/speed", &speed("60"), "stamp"));
    b.stop().await;

    let b = TestBroker::start(dir.path()).await;
    let mut s = v4(b.addr, "s", true).await;
    s.subscribe("down/#", qos4(1)).await;
    let got = s.publish().await;
    assert!(got.retain);
    assert_eq!(got.payload.as_ref(), b"60");
    assert!(s.no_publish_within(Duration::from_millis(300)).await);
}

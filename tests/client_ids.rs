//! Any client id MQTT allows, end to end through the daemon: ids with spaces, non-ASCII
//! letters, `/`, `+` and `#` connect, publish and subscribe, and where an id goes into a topic
//! (device topics, presence upstream) it is one level that no other id maps to.

use std::collections::HashSet;
use std::time::Duration;

use trainrelay_testkit::{relay_config, store_section, Central, Relay, V4Client, V5Client};

const QUIET: Duration = Duration::from_secs(10);

async fn start(dir: &std::path::Path) -> (Central, Relay) {
    let central = Central::start(dir).await;
    let relay = Relay::start(dir, &relay_config(&central.url(), &store_section(""))).await;
    (central, relay)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_with_spaces_and_non_ascii_letters_connect_and_pub_sub() {
    let dir = tempfile::tempdir().unwrap();
    let (central, relay) = start(dir.path()).await;
    let mut up = V5Client::connect(central.port, "control", true).await;
    up.subscribe("trains/T1/up/ids/#").await;
    let mut presence = V5Client::connect(central.port, "presence", true).await;
    presence.subscribe("trains/T1/clients/#").await;

    let mut v5s = Vec::new();
    for id in ["Cab iPad 3", "iPad von Jürg", "clean retained"] {
        let c = V5Client::connect(relay.local_port, id, true).await;
        c.subscribe("up/ids/#").await;
        v5s.push(c);
    }
    let mut v4 = V4Client::connect(relay.local_port, "iPad von Jürg (3.1.1)", true).await;
    v4.subscribe("up/ids/#").await;
    let n = v5s[0]
        .publish_acked("up/ids/a", vec![b"from Cab iPad 3".to_vec()], None)
        .await;
    assert_eq!(n, 1);
    v4.publish_acked("up/ids/b", vec![b"from 3.1.1".to_vec()])
        .await;
    for c in &mut v5s {
        let got = c.collect(2, QUIET).await;
        assert_eq!(got.len(), 2, "a local subscriber missed a message");
    }
    let got: Vec<_> = tokio::time::timeout(QUIET, async {
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Some(p) = v4.messages.recv().await {
                got.push(p.topic);
            }
        }
        got
    })
    .await
    .expect("3.1.1 subscriber got both");
    assert_eq!(got.len(), 2);
    let central_got = up.collect(2, QUIET).await;
    assert_eq!(central_got.len(), 2, "uplink: {central_got:?}");

    let topics: HashSet<String> = presence
        .collect(4, QUIET)
        .await
        .into_iter()
        .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
        .collect();
    for t in [
        "trains/T1/clients/Cab%20iPad%203",
        "trains/T1/clients/iPad%20von%20Jürg",
        "trains/T1/clients/clean%20retained",
        "trains/T1/clients/iPad%20von%20Jürg%20(3.1.1)",
    ] {
        assert!(topics.contains(t), "no presence on {t}: {topics:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ids_with_slash_plus_hash_own_only_their_encoded_device_topic() {
    let dir = tempfile::tempdir().unwrap();
    let (central, relay) = start(dir.path()).await;
    let control = V5Client::connect(central.port, "control", true).await;
    let mut presence = V5Client::connect(central.port, "presence", true).await;
    presence.subscribe("trains/T1/clients/#").await;

    let ids = ["a/b", "+", "#", "a", "a_b"];
    let mut clients = Vec::new();
    for id in ids {
        let c = V5Client::connect(relay.local_port, id, true).await;
        c.subscribe("down/#").await;
        clients.push(c);
    }
    // Wait until the downlink is up: a marker reaches everyone.
    let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    'ready: for _ in 0..40 {
        control
            .client
            .publish("trains/T1/down/ready", qos, false, "ready")
            .await
            .unwrap();
        if let Some(p) = clients[0]
            .collect(1, Duration::from_millis(500))
            .await
            .pop()
        {
            if p.topic.as_ref() == b"down/ready" {
                break 'ready;
            }
        }
    }
    for c in &mut clients[1..] {
        let got = c.collect(1, QUIET).await;
        assert!(!got.is_empty(), "downlink not up");
    }
    for c in &mut clients {
        while c.collect(1, Duration::from_millis(300)).await.len() == 1 {}
    }
    // One message per device level; "a%2Fb" belongs to "a/b", not to "a" or "a_b".
    for level in ["a%2Fb", "%2B", "%23", "a", "a_b"] {
        control
            .client
            .publish(
                format!("trains/T1/down/device/{level}/order"),
                qos,
                false,
                level,
            )
            .await
            .unwrap();
    }
    control
        .client
        .publish("trains/T1/down/end", qos, false, "end")
        .await
        .unwrap();
    for (id, c) in ids.iter().zip(clients.iter_mut()) {
        let mut got = Vec::new();
        loop {
            let p = c.collect(1, QUIET).await.pop().expect("end marker");
            if p.topic.as_ref() == b"down/end" {
                break;
            }
            got.push(String::from_utf8_lossy(&p.topic).into_owned());
        }
        let own = format!("down/device/{}/order", trainrelay::topic::id_level(id));
        assert_eq!(got, vec![own], "client id {id:?} received {got:?}");
    }

    let topics: HashSet<String> = presence
        .collect(ids.len(), QUIET)
        .await
        .into_iter()
        .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
        .collect();
    assert!(topics.contains("trains/T1/clients/a%2Fb"), "{topics:?}");
    assert!(topics.contains("trains/T1/clients/a_b"), "{topics:?}");
    assert!(topics.contains("trains/T1/clients/%2B"), "{topics:?}");
    assert!(topics.contains("trains/T1/clients/%23"), "{topics:?}");
}

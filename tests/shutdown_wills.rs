//! The relay stopping gracefully publishes the wills of the iPads still connected, and they
//! are relayed upstream like any will: the real daemon, a real Mosquitto as the central broker.

use std::time::Duration;

use trainrelay_testkit::{relay_config, store_section, Central, Relay, V5Client};

const T: Duration = Duration::from_secs(20);

/// A connected rumqttc client with a will; its event loop runs until dropped.
struct WithWill {
    _task: tokio::task::JoinHandle<()>,
}

async fn v5_with_will(port: u16, id: &str, topic: &str, delay: Option<u32>) -> WithWill {
    use rumqttc::v5::mqttbytes::v5::{LastWill, LastWillProperties};
    let mut o = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    let props = delay.map(|d| LastWillProperties {
        delay_interval: Some(d),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    });
    o.set_last_will(LastWill::new(
        topic,
        format!("{id} gone"),
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        false,
        props,
    ));
    let (_client, mut el) = rumqttc::v5::AsyncClient::new(o, 10);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::ConnAck(
                    _,
                ))) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(T, rx).await.expect("CONNACK").unwrap();
    WithWill { _task: task }
}

async fn v4_with_will(port: u16, id: &str, topic: &str) -> WithWill {
    let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_last_will(rumqttc::LastWill::new(
        topic,
        format!("{id} gone"),
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let (_client, mut el) = rumqttc::AsyncClient::new(o, 10);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let mut tx = Some(tx);
    let task = tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) => {
                    if let Some(t) = tx.take() {
                        let _ = t.send(());
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    });
    tokio::time::timeout(T, rx).await.expect("CONNACK").unwrap();
    WithWill { _task: task }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wills_of_connected_ipads_reach_the_central_broker_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let mut relay = Relay::start(
        dir.path(),
        &relay_config(&central.url(), &store_section("")),
    )
    .await;
    let mut control = V5Client::connect(central.port, "control", true).await;
    control.subscribe("trains/T1/up/#").await;

    // The uplink is up: a probe from an iPad reaches the central broker.
    let mut probe = V5Client::connect(relay.local_port, "probe", true).await;
    probe
        .publish_acked("up/probe", vec![b"probe".to_vec()], None)
        .await;
    let got = control.collect(1, T).await;
    assert_eq!(got.len(), 1, "uplink not up");
    drop(probe);

    let _a = v5_with_will(relay.local_port, "ipad-v5", "up/will/ipad-v5", None).await;
    let _b = v5_with_will(
        relay.local_port,
        "ipad-delay",
        "up/will/ipad-delay",
        Some(600),
    )
    .await;
    let _c = v4_with_will(relay.local_port, "ipad-v4", "up/will/ipad-v4").await;

    let status = relay.terminate();
    assert!(status.success(), "relay exit: {status:?}");

    let mut wills: Vec<String> = control
        .collect(3, T)
        .await
        .into_iter()
        .map(|p| String::from_utf8_lossy(&p.topic).into_owned())
        .collect();
    wills.sort();
    assert_eq!(
        wills,
        vec![
            "trains/T1/up/will/ipad-delay",
            "trains/T1/up/will/ipad-v4",
            "trains/T1/up/will/ipad-v5",
        ],
        "relay log:\n{}",
        relay.log()
    );
}

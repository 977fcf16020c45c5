//! MQTT over WebSocket: the same authentication, ACL and relaying as on TCP, and an upgrade
//! that never comes does not hold up anyone else.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rumqttc::v5::mqttbytes::QoS;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use trainrelay_testkit::security::{
    connect_packet, devices, publish_packet, secure_config, subscribe_packet, Raw,
};
use trainrelay_testkit::{free_port, Central, Relay, V5Client};

const T: Duration = Duration::from_secs(30);

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn ws_connect(port: u16) -> Ws {
    let mut req = format!("ws://127.0.0.1:{port}/mqtt")
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let (ws, resp) = tokio::time::timeout(T, tokio_tungstenite::client_async(req, tcp))
        .await
        .expect("upgrade timed out")
        .expect("upgrade failed");
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok()),
        Some("mqtt")
    );
    ws
}

/// The next MQTT packet (first byte, body); assumes one packet per message or several
/// whole packets in one (the relay writes whole packets).
async fn next_packet(ws: &mut Ws, pending: &mut Vec<u8>) -> (u8, Vec<u8>) {
    loop {
        if pending.len() >= 2 {
            let mut len = 0usize;
            let mut used = 0;
            for (i, b) in pending[1..].iter().enumerate().take(4) {
                len |= usize::from(b & 0x7f) << (7 * i);
                used = i + 1;
                if b & 0x80 == 0 {
                    break;
                }
            }
            if pending.len() >= 1 + used + len {
                let h = pending[0];
                let body = pending[1 + used..1 + used + len].to_vec();
                pending.drain(..1 + used + len);
                return (h, body);
            }
        }
        match tokio::time::timeout(T, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => pending.extend_from_slice(&b),
            Ok(Some(Ok(_))) => {}
            other => panic!("WebSocket ended: {other:?}"),
        }
    }
}

async fn next_of_kind(ws: &mut Ws, pending: &mut Vec<u8>, kind: u8) -> Vec<u8> {
    loop {
        let (h, body) = next_packet(ws, pending).await;
        if h >> 4 == kind {
            return body;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let ws_port = free_port();
    let local = format!(
        "connect_timeout = \"3s\"\nws_listen = \"127.0.0.1:{ws_port}\"\n{}",
        devices(&[("webcab", "pw-web", None)])
    );
    let relay = Relay::start(dir.path(), &secure_config(&central.url(), &local, "")).await;
    trainrelay_testkit::wait_for_port(ws_port, T).await;
    let control = V5Client::connect(central.port, "control", true).await;

    // A socket that never upgrades, and one that sends half a request.
    let mut silent = Raw::open_from([127, 0, 0, 10], ws_port).await.unwrap();
    let mut half = Raw::open_from([127, 0, 0, 10], ws_port).await.unwrap();
    half.send(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let stalled_at = Instant::now();

    // Wrong password over WebSocket: refused like on TCP.
    let mut bad = ws_connect(ws_port).await;
    let mut pb = Vec::new();
    bad.send(Message::Binary(
        connect_packet(true, "webcab", Some("webcab"), Some(b"nope")).into(),
    ))
    .await
    .unwrap();
    let connack = next_of_kind(&mut bad, &mut pb, 2).await;
    assert_eq!(connack[1], 0x86);

    let started = Instant::now();
    let mut ws = ws_connect(ws_port).await;
    let mut p = Vec::new();
    ws.send(Message::Binary(
        connect_packet(true, "webcab", Some("webcab"), Some(b"pw-web")).into(),
    ))
    .await
    .unwrap();
    let connack = next_of_kind(&mut ws, &mut p, 2).await;
    assert_eq!(connack[1], 0, "CONNACK over WebSocket");
    println!(
        "WebSocket login while two upgrades stall: {:?}",
        started.elapsed()
    );
    ws.send(Message::Binary(subscribe_packet(true, 1, "down/#").into()))
        .await
        .unwrap();
    let suback = next_of_kind(&mut ws, &mut p, 9).await;
    assert_eq!(suback.last(), Some(&1));
    ws.send(Message::Binary(
        publish_packet(true, b"down/speed", b"0", 2).into(),
    ))
    .await
    .unwrap();
    let puback = next_of_kind(&mut ws, &mut p, 4).await;
    assert_eq!(puback.get(2), Some(&0x87), "forged downlink over WebSocket");
    ws.send(Message::Binary(
        publish_packet(true, b"up/web", b"hi", 3).into(),
    ))
    .await
    .unwrap();
    let puback = next_of_kind(&mut ws, &mut p, 4).await;
    assert_eq!(puback.get(2).copied().unwrap_or(0), 0);

    // Downlink reaches the web client (retry until the relay is subscribed upstream).
    let deadline = Instant::now() + T;
    'outer: loop {
        control
            .client
            .publish("trains/T1/down/speed", QoS::AtLeastOnce, false, "80")
            .await
            .unwrap();
        let round = tokio::time::timeout(Duration::from_secs(2), next_of_kind(&mut ws, &mut p, 3));
        if let Ok(body) = round.await {
            let n = usize::from(u16::from_be_bytes([body[0], body[1]]));
            assert_eq!(&body[2..2 + n], b"down/speed");
            break 'outer;
        }
        assert!(
            Instant::now() < deadline,
            "downlink never reached the WebSocket client"
        );
    }

    assert!(silent.closed_within(T).await.0, "silent socket not closed");
    assert!(half.closed_within(T).await.0, "half upgrade not closed");
    println!(
        "stalled upgrades closed after {:?} (connect_timeout 3s)",
        stalled_at.elapsed()
    );
    assert!(relay.log().contains("WebSocket upgrade not finished"));
}

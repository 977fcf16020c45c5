//! Hostile input against the real daemon: while each attack runs, a well-behaved iPad keeps
//! publishing (its PUBACK latency is measured and printed) and the central broker's `down/...`
//! messages must keep reaching it. Attackers connect from other loopback addresses
//! (127.0.0.2 and up), as a passenger device would from its own address.

use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::QoS;
use trainrelay_testkit::security::{devices, frame, publish_packet, secure_config, Raw};
use trainrelay_testkit::{Central, Relay, V5Client};

const T: Duration = Duration::from_secs(30);

/// The well-behaved iPad and the control centre.
struct Watch {
    ipad: Raw,
    control: V5Client,
    pkid: u16,
    seq: u32,
}

impl Watch {
    /// One round: an uplink QoS 1 publish (time to PUBACK, which follows the store commit)
    /// and a downlink message from the central broker (time until the iPad has it).
    async fn round(&mut self) -> (Duration, Duration) {
        self.pkid = self.pkid % 60000 + 1;
        self.seq += 1;
        let started = Instant::now();
        let code = self
            .ipad
            .publish_qos1(
                self.pkid,
                "up/ping",
                format!("ping {}", self.seq).as_bytes(),
            )
            .await;
        assert_eq!(
            code,
            Some(0),
            "the good iPad's publish was not acknowledged"
        );
        let up = started.elapsed();
        let tag = format!("probe{}", self.seq);
        let started = Instant::now();
        self.control
            .client
            .publish(
                format!("trains/T1/down/{tag}"),
                QoS::AtLeastOnce,
                false,
                tag.clone(),
            )
            .await
            .unwrap();
        loop {
            let p = self
                .ipad
                .read_kind(3, T)
                .await
                .unwrap_or_else(|| panic!("down/{tag} did not reach the good iPad"));
            let (topic, _) = p.publish(true);
            if topic == format!("down/{tag}") {
                break;
            }
        }
        (up, started.elapsed())
    }

    /// Rounds until `attack` finishes (at least one); prints the latencies.
    async fn during<F: std::future::Future<Output = String> + Send + 'static>(
        &mut self,
        name: &str,
        attack: F,
    ) {
        let attack = tokio::spawn(attack);
        // A moment for the attack to get going.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut ups = Vec::new();
        let mut downs = Vec::new();
        loop {
            let (u, d) = self.round().await;
            ups.push(u);
            downs.push(d);
            if attack.is_finished() {
                break;
            }
            // An iPad's pace (and below max_publish_rate).
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let outcome = attack.await.expect("attack task panicked");
        ups.sort();
        downs.sort();
        println!(
            "ATTACK {name}: {outcome}; good iPad during it: {} rounds, uplink PUBACK median {:?} max {:?}, downlink median {:?} max {:?}",
            ups.len(),
            ups[ups.len() / 2],
            ups[ups.len() - 1],
            downs[downs.len() / 2],
            downs[downs.len() - 1],
        );
    }
}

/// An anonymous v5 attacker from `source`, logged in.
async fn attacker(source: [u8; 4], port: u16, id: &str) -> Raw {
    let mut a = Raw::open_from(source, port)
        .await
        .expect("attacker connect");
    assert_eq!(
        a.login(true, id, None, None).await,
        Some(0),
        "attacker {id} login"
    );
    a
}

/// Sends `bytes` after login and expects the server to close the connection, after a v5
/// DISCONNECT with reason `expected` (`None`: closed without a DISCONNECT, as MQTT 3.1.1 has
/// none from the server). The broker lingers after its DISCONNECT (it shuts down its side and
/// reads on for a second), so the reason reaches the client even while it is still writing.
async fn expect_kicked(mut a: Raw, bytes: &[u8], what: &str, expected: Option<u8>) -> String {
    let _ = a.send(bytes).await;
    let (closed, seen) = a.closed_within(T).await;
    assert!(closed, "{what}: the relay did not close the connection");
    let code = seen
        .iter()
        .find(|p| p.kind() == 14)
        .map(|p| p.body.first().copied().unwrap_or(0));
    assert_eq!(
        code, expected,
        "{what}: DISCONNECT reason (None: closed without DISCONNECT)"
    );
    let reason = code
        .map(|c| format!("DISCONNECT {c:#04x}"))
        .unwrap_or_else(|| "closed without DISCONNECT".into());
    format!("{what}: {reason}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_keeps_serving_under_hostile_input() {
    let dir = tempfile::tempdir().unwrap();
    let central = Central::start(dir.path()).await;
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    trainrelay_testkit::security::make_pki(&pki, &[]);
    let (tls_port, ws_port) = (
        trainrelay_testkit::free_port(),
        trainrelay_testkit::free_port(),
    );
    let local = format!(
        "allow_anonymous = true\nconnect_timeout = \"3s\"\nmax_publish_rate = 200\ntls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{p}/server.pem\"\ntls_key = \"{p}/server.key\"\nws_listen = \"127.0.0.1:{ws_port}\"\n{}",
        devices(&[("ipad1", "pw-one", None)]),
        p = pki.display()
    );
    let mut relay = Relay::start(dir.path(), &secure_config(&central.url(), &local, "")).await;
    let port = relay.local_port;
    let control = V5Client::connect(central.port, "control", true).await;
    let mut ipad = Raw::open(port).await;
    assert_eq!(
        ipad.login(true, "ipad1", Some("ipad1"), Some("pw-one"))
            .await,
        Some(0)
    );
    assert_eq!(ipad.subscribe(1, "down/#").await, 1);
    let mut w = Watch {
        ipad,
        control,
        pkid: 100,
        seq: 0,
    };
    // Until the relay's downlink subscription is up, probes may be lost: retry the first.
    let start = Instant::now();
    loop {
        w.control
            .client
            .publish("trains/T1/down/hello", QoS::AtLeastOnce, false, "hi")
            .await
            .unwrap();
        if w.ipad.read_kind(3, Duration::from_secs(2)).await.is_some() {
            break;
        }
        assert!(start.elapsed() < T, "downlink never came up");
    }
    let (u, d) = w.round().await;
    println!("BASELINE: uplink PUBACK {u:?}, downlink {d:?}");

    w.during("500 connections from one address", async move {
        let mut held = Vec::new();
        let mut failed = 0;
        for _ in 0..500 {
            match Raw::open_from([127, 0, 0, 2], port).await {
                Ok(r) => held.push(r),
                Err(_) => failed += 1,
            }
        }
        // Sockets beyond the per-address limit are closed at once.
        let mut closed = 0;
        for r in held.iter_mut() {
            if r.closed_within(Duration::from_millis(20)).await.0 {
                closed += 1;
            }
        }
        assert!(closed >= 500 - 16 - failed, "only {closed} of 500 closed");
        tokio::time::sleep(Duration::from_secs(2)).await;
        format!("{closed} of 500 closed at once ({failed} connects failed), the rest held until the CONNECT timeout")
    })
    .await;

    w.during("slowloris CONNECT (one byte per second)", async move {
        let mut a = Raw::open_from([127, 0, 0, 4], port).await.unwrap();
        let connect = trainrelay_testkit::security::connect_packet(true, "slow", None, None);
        let started = Instant::now();
        for b in connect.iter().take(connect.len() - 1) {
            if a.send(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if started.elapsed() > T {
                break;
            }
        }
        let (closed, _) = a.closed_within(T).await;
        assert!(closed, "slowloris connection still open");
        format!("closed after {:?} (connect_timeout 3s)", started.elapsed())
    })
    .await;

    w.during(
        "silent socket and TLS ClientHello on the plain port",
        async move {
            let mut silent = Raw::open_from([127, 0, 0, 5], port).await.unwrap();
            let mut hello = Raw::open_from([127, 0, 0, 5], port).await.unwrap();
            let _ = hello
                .send(&[
                    0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03,
                ])
                .await;
            let started = Instant::now();
            let (hello_closed, _) = hello.closed_within(T).await;
            let hello_t = started.elapsed();
            let (silent_closed, _) = silent.closed_within(T).await;
            assert!(hello_closed && silent_closed);
            format!(
                "ClientHello closed after {hello_t:?}, silent socket after {:?}",
                started.elapsed()
            )
        },
    )
    .await;

    w.during("TLS clients that never finish the handshake", async move {
        let mut stalled = Vec::new();
        for i in 0..10u8 {
            let mut r = Raw::open_from([127, 0, 0, 11], tls_port).await.unwrap();
            if i % 2 == 0 {
                // Half a ClientHello.
                let _ = r
                    .send(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
                    .await;
            }
            stalled.push(r);
        }
        let started = Instant::now();
        for r in stalled.iter_mut() {
            assert!(
                r.closed_within(T).await.0,
                "stalled TLS handshake not closed"
            );
        }
        format!(
            "10 stalled handshakes (5 silent, 5 with half a ClientHello) closed after {:?}",
            started.elapsed()
        )
    })
    .await;

    w.during("WebSocket upgrades that never finish", async move {
        let mut stalled = Vec::new();
        for _ in 0..10 {
            let mut r = Raw::open_from([127, 0, 0, 12], ws_port).await.unwrap();
            let _ = r.send(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n").await;
            stalled.push(r);
        }
        let started = Instant::now();
        for r in stalled.iter_mut() {
            assert!(r.closed_within(T).await.0, "stalled upgrade not closed");
        }
        format!("10 half HTTP upgrades closed after {:?}", started.elapsed())
    })
    .await;

    w.during("10 MB packet", async move {
        let mut a = attacker([127, 0, 0, 6], port, "big").await;
        let payload = vec![b'x'; 10 * 1024 * 1024];
        let packet = publish_packet(true, b"up/big", &payload, 1);
        let _ = tokio::time::timeout(T, a.send(&packet)).await;
        expect_kicked(a, &[], "10 MB PUBLISH", Some(0x95)).await
    })
    .await;

    w.during("malformed remaining length", async move {
        let a = attacker([127, 0, 0, 6], port, "badlen").await;
        expect_kicked(
            a,
            &[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f],
            "5-byte remaining length",
            Some(0x81),
        )
        .await
    })
    .await;

    w.during("invalid UTF-8 in a topic", async move {
        let a = attacker([127, 0, 0, 6], port, "badutf8").await;
        let p = publish_packet(true, &[b'u', b'p', b'/', 0xc3, 0x28], b"x", 1);
        let v4 = Raw::open_from([127, 0, 0, 6], port).await;
        let mut out = expect_kicked(a, &p, "v5 topic up/\\xc3\\x28", Some(0x81)).await;
        let mut v4 = v4.unwrap();
        assert_eq!(v4.login(false, "badutf8-v4", None, None).await, Some(0));
        let p4 = publish_packet(false, &[0xff, 0xfe], b"x", 0);
        out += &format!(
            "; {}",
            expect_kicked(v4, &p4, "3.1.1 topic \\xff\\xfe", None).await
        );
        out
    })
    .await;

    w.during("topics starting with a multi-byte character", async move {
        let mut a = attacker([127, 0, 0, 6], port, "umlaut").await;
        let code = a.publish_qos1(1, "Ü/x", b"x").await;
        // Anonymous clients may publish only into uplink routes: refused, connection kept.
        assert_eq!(code, Some(0x87));
        let sub = a.subscribe(2, "Ü/#").await;
        assert_eq!(sub, 0x87);
        let code = a.publish_qos1(3, "up/Ü", b"x").await;
        assert_eq!(code, Some(0));
        "PUBLISH Ü/x -> PUBACK 0x87, SUBSCRIBE Ü/# -> SUBACK 0x87, PUBLISH up/Ü -> PUBACK 0x00 (relayed)".to_string()
    })
    .await;

    w.during("server-only packets from a client", async move {
        let a = attacker([127, 0, 0, 6], port, "connack").await;
        let mut out =
            expect_kicked(a, &[0x20, 0x03, 0x00, 0x00, 0x00], "CONNACK", Some(0x82)).await;
        let a = attacker([127, 0, 0, 6], port, "suback").await;
        out += &format!(
            "; {}",
            expect_kicked(
                a,
                &[0x90, 0x04, 0x00, 0x01, 0x00, 0x01],
                "SUBACK",
                Some(0x82)
            )
            .await
        );
        let mut pre = Raw::open_from([127, 0, 0, 6], port).await.unwrap();
        let _ = pre.send(&[0x90, 0x03, 0x00, 0x01, 0x00]).await;
        assert!(
            pre.closed_within(T).await.0,
            "SUBACK before CONNECT not closed"
        );
        out += "; SUBACK instead of CONNECT: closed";
        let mut second = attacker([127, 0, 0, 6], port, "twice").await;
        let c = trainrelay_testkit::security::connect_packet(true, "twice", None, None);
        let _ = second.send(&c).await;
        assert!(second.closed_within(T).await.0, "second CONNECT not closed");
        out += "; a second CONNECT: closed";
        out
    })
    .await;

    w.during("oversized CONNECT and garbage", async move {
        let mut big = Raw::open_from([127, 0, 0, 7], port).await.unwrap();
        let mut header = frame(0x10, &[]);
        header.truncate(1);
        header.extend_from_slice(&[0xff, 0xff, 0xff, 0x7f]);
        let _ = big.send(&header).await;
        assert!(big.closed_within(T).await.0, "256 MB CONNECT not closed");
        let mut junk = Raw::open_from([127, 0, 0, 7], port).await.unwrap();
        let garbage: Vec<u8> = (0..4096).map(|i| (i * 7 + 3) as u8).collect();
        let _ = junk.send(&garbage).await;
        assert!(junk.closed_within(T).await.0, "garbage not closed");
        "CONNECT announcing 256 MB: closed; 4 KiB of garbage: closed".to_string()
    })
    .await;

    w.during("publish flood beyond max_publish_rate", async move {
        let mut a = attacker([127, 0, 0, 8], port, "flood").await;
        let one = publish_packet(true, b"up/flood", b"x", 0);
        let mut burst = Vec::new();
        for _ in 0..2000 {
            burst.extend_from_slice(&one);
        }
        let _ = a.send(&burst).await;
        expect_kicked(
            a,
            &[],
            "2000 QoS 0 PUBLISH at once, limit 200/s",
            Some(0x96),
        )
        .await
    })
    .await;

    // Still up, still relaying.
    let (u, d) = w.round().await;
    println!("AFTER: uplink PUBACK {u:?}, downlink {d:?}");
    relay.terminate();
    let line = relay
        .log()
        .lines()
        .find(|l| l.contains("local broker counters:"))
        .expect("no counters at shutdown")
        .to_string();
    println!("{line}");
    assert!(!relay.log().contains("panicked"), "a task panicked");
    assert!(line.contains("rate_limited=1"), "{line}");
}

//! The test kit's cellular link (`trainrelay_testkit::cellular`): two links of one process
//! get distinct namespaces and addresses, a plain TCP transfer crosses a link at a plausible
//! rate, a process started inside listens on the namespace's address, and `drop on` is a
//! silent blackhole until `drop off`. Needs root (skipped otherwise, a failure under CI).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use trainrelay_testkit::cellular::{CellularLink, LinkParams};

#[test]
fn links_are_distinct_carry_tcp_and_blackhole() {
    let quick = LinkParams {
        delay_ms: 10,
        jitter_ms: 2,
        loss_pct: 0.0,
        rate_kbit: None,
    };
    let Some(a) = CellularLink::up_or_skip("links_are_distinct_carry_tcp_and_blackhole", quick)
    else {
        return;
    };
    let b = CellularLink::up(quick).expect("a second link");
    assert_ne!(a.ns, b.ns);
    assert_ne!(a.addr, b.addr);
    assert_ne!(a.host_addr, b.host_addr);

    // A plain TCP transfer arrives whole, after at least one delay.
    let t = a.tcp_transfer(1 << 20).expect("transfer");
    assert_eq!(t.bytes, 1 << 20);
    assert!(t.total >= Duration::from_millis(20), "{t:?}");

    // A listener made inside the namespace is reachable over the link.
    let l: TcpListener = a
        .in_namespace(|| TcpListener::bind((a.addr, 0)))
        .expect("enter namespace")
        .expect("bind inside");
    let to: SocketAddr = l.local_addr().unwrap();
    let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5)).expect("connect");
    let (mut s, _) = l.accept().unwrap();
    c.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    // Blackhole: nothing passes, no reset; then it passes again.
    a.drop_packets(true).unwrap();
    c.write_all(b"lost").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(s.read(&mut buf).is_err(), "a byte crossed the blackhole");
    a.drop_packets(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"lost");

    // A program started inside runs in the namespace.
    let out = a
        .command("ip")
        .args(["-4", "-o", "addr"])
        .output()
        .expect("exec inside");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&a.addr.to_string()), "{text}");
}

/// The relay over a poor cellular link (150 ± 50 ms each way per packet, in order, 3 % loss
/// both ways): an iPad's steady load for 20 s all arrives, in order, with duplicates within
/// the bound of docs/guarantees.md. The per-packet counterpart of link_faults.rs's
/// `poor_cellular_delivers_everything`, whose proxy hides the relay's own socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_over_a_poor_cellular_link_delivers_everything_in_order() {
    use trainrelay_testkit::cellular::LinkCentral;
    use trainrelay_testkit::netns::{
        assert_duplicates_bounded, connected, fault_config, Collector, Load,
    };
    use trainrelay_testkit::{Relay, V5Client};

    let poor = LinkParams {
        delay_ms: 150,
        jitter_ms: 50,
        loss_pct: 3.0,
        rate_kbit: None,
    };
    let test = "relay_over_a_poor_cellular_link_delivers_everything_in_order";
    let Some(link) = CellularLink::up_or_skip(test, poor) else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let central = LinkCentral::start(dir.path(), &link, 100, "").await;
    // The control client watches across the link too (nothing else reaches the namespace).
    let mut control =
        V5Client::connect_host(&link.addr.to_string(), LinkCentral::PORT, "control", false).await;
    control.subscribe("trains/T1/up/#").await;
    let relay = Relay::start(dir.path(), &fault_config(&central.url(), "10s", "", "")).await;
    connected(&relay, 0).await;
    let load = Load::start(relay.local_port, "ipad", "up/x", "c", 5).await;
    tokio::time::sleep(Duration::from_secs(20)).await;
    let n = load.stop().await;
    let mut seen = Collector::new(&["c"]);
    let complete = seen
        .until(&mut control, &[n], Duration::from_secs(180))
        .await;
    seen.settle(&mut control, Duration::from_secs(2)).await;
    let t = seen.tally(0);
    assert!(
        complete,
        "{} of {n} lost: {:?}",
        t.missing(n).len(),
        t.missing(n)
    );
    assert!(t.in_order(), "order broken");
    let log = relay.log();
    println!(
        "poor cellular link ({poor}): {n} delivered, {} duplicates, {} connects; {}",
        t.duplicates,
        log.matches("connected (session").count(),
        link.stats()
    );
    assert_duplicates_bounded(t, &log, 0, "poor cellular link");
    drop(relay);
    drop(central);
}

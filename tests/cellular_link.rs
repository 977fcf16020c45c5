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

//! The TLS listener: server certificate, client certificates (CN = device), passwords over
//! TLS, and handshakes that never finish while others connect.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use trainrelay_testkit::security::{
    connect_packet, devices, make_pki, publish_packet, secure_config, Raw,
};
use trainrelay_testkit::{free_port, Central, Relay};

const T: Duration = Duration::from_secs(30);

fn certs(file: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    let data = std::fs::read(file).unwrap();
    rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A TLS connection to the relay, optionally with a client certificate.
async fn tls_connect(
    pki: &Path,
    port: u16,
    client: Option<&str>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&pki.join("ca.pem")) {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(name) => {
            let key = std::fs::read(pki.join(format!("{name}.key"))).unwrap();
            let key = rustls_pemfile::private_key(&mut key.as_slice())
                .unwrap()
                .unwrap();
            builder
                .with_client_auth_cert(certs(&pki.join(format!("{name}.pem"))), key)
                .unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio::time::timeout(T, connector.connect(name, tcp))
        .await
        .expect("TLS handshake timed out")
        .expect("TLS handshake failed")
}

/// Reads one packet (first byte, body) from any stream.
async fn read_packet<S: AsyncReadExt + Unpin>(s: &mut S) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 1];
    tokio::time::timeout(T, s.read_exact(&mut h))
        .await
        .ok()?
        .ok()?;
    let mut len = 0usize;
    for i in 0..4 {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.ok()?;
        len |= usize::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.ok()?;
    Some((h[0], body))
}

/// v5 CONNECT over the stream; the CONNACK code.
async fn login<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    s: &mut S,
    id: &str,
    user: Option<&str>,
    pass: Option<&str>,
) -> Option<u8> {
    s.write_all(&connect_packet(true, id, user, pass.map(str::as_bytes)))
        .await
        .ok()?;
    let (h, body) = read_packet(s).await?;
    assert_eq!(h >> 4, 2, "expected CONNACK");
    body.get(1).copied()
}

async fn publish<S: AsyncReadExt + AsyncWriteExt + Unpin>(s: &mut S, pkid: u16, topic: &str) -> u8 {
    s.write_all(&publish_packet(true, topic.as_bytes(), b"x", pkid))
        .await
        .unwrap();
    loop {
        let (h, body) = read_packet(s).await.expect("no PUBACK");
        if h >> 4 == 4 {
            return body.get(2).copied().unwrap_or(0);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    make_pki(&pki, &["ipad1", "stranger"]);
    let central = Central::start(dir.path()).await;
    let tls_port = free_port();
    let local = format!(
        "connect_timeout = \"3s\"\ntls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{p}/server.pem\"\ntls_key = \"{p}/server.key\"\ntls_client_ca = \"{p}/ca.pem\"\n{}",
        devices(&[("ipad1", "pw-one", None), ("ipad2", "pw-two", None)]),
        p = pki.display()
    );
    let relay = Relay::start(dir.path(), &secure_config(&central.url(), &local, "")).await;
    trainrelay_testkit::wait_for_port(tls_port, T).await;

    // Sockets that never finish the handshake: one silent, one with half a ClientHello.
    let mut silent = Raw::open_from([127, 0, 0, 9], tls_port).await.unwrap();
    let mut half = Raw::open_from([127, 0, 0, 9], tls_port).await.unwrap();
    half.send(&[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ])
    .await
    .unwrap();
    let stalled_at = Instant::now();

    // Meanwhile: a device by its certificate (no username), its ACL applies.
    let started = Instant::now();
    let mut ipad1 = tls_connect(&pki, tls_port, Some("ipad1")).await;
    assert_eq!(login(&mut ipad1, "ipad1", None, None).await, Some(0));
    println!(
        "mTLS login while two handshakes stall: {:?}",
        started.elapsed()
    );
    assert_eq!(publish(&mut ipad1, 1, "up/tls").await, 0);
    assert_eq!(publish(&mut ipad1, 2, "down/speed").await, 0x87);
    // The certificate names ipad1: it cannot take ipad2's client id (0x85: the id is not
    // one this device may use).
    let mut wrong = tls_connect(&pki, tls_port, Some("ipad1")).await;
    assert_eq!(login(&mut wrong, "ipad2", None, None).await, Some(0x85));
    // A valid certificate of an unknown device is anonymous: refused.
    let mut stranger = tls_connect(&pki, tls_port, Some("stranger")).await;
    assert_eq!(
        login(&mut stranger, "stranger", None, None).await,
        Some(0x87)
    );
    // Without a certificate, a password works over TLS.
    let mut ipad2 = tls_connect(&pki, tls_port, None).await;
    assert_eq!(
        login(&mut ipad2, "ipad2", Some("ipad2"), Some("pw-two")).await,
        Some(0)
    );
    let mut anon = tls_connect(&pki, tls_port, None).await;
    assert_eq!(login(&mut anon, "anon", None, None).await, Some(0x87));

    // The stalled handshakes are closed after connect_timeout.
    assert!(
        silent.closed_within(T).await.0,
        "silent TLS socket not closed"
    );
    assert!(half.closed_within(T).await.0, "half handshake not closed");
    println!(
        "stalled TLS handshakes closed after {:?} (connect_timeout 3s)",
        stalled_at.elapsed()
    );
    assert!(relay.log().contains("TLS handshake not finished"));

    // The plain listener serves as before.
    let mut plain = Raw::open(relay.local_port).await;
    assert_eq!(
        plain
            .login(true, "ipad2", Some("ipad2"), Some("pw-two"))
            .await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_key_readable_by_everyone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir_all(&pki).unwrap();
    make_pki(&pki, &[]);
    std::fs::set_permissions(
        pki.join("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "train_id = \"T1\"\n[local]\ntls_listen = \"127.0.0.1:0\"\ntls_cert = \"{p}/server.pem\"\ntls_key = \"{p}/server.key\"\n",
            p = pki.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trainrelay"))
        .arg("check-config")
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{err}");
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("local.tls_key") && err.contains("server.key"));
}

/// The first certificate the server presented on `tls`.
fn server_cert(
    tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> rustls::pki_types::CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .expect("the server presented no certificate")
        .clone()
        .into_owned()
}

/// Replaces `to` by a copy of `from` the way a certificate renewal does: written beside it,
/// then renamed over it (the copy keeps `from`'s mode, 0600 for keys).
fn replace_file(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// docs/security.md "TLS listener": on SIGHUP the daemon re-reads the listener's certificate and key;
/// new connections get the new certificate, a connection made before keeps working, and a
/// broken file on a later SIGHUP keeps the current certificate (logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_tls_certificate_for_new_connections() {
    use nix::sys::signal::Signal;
    use trainrelay_testkit::ops::Daemon;
    let dir = tempfile::tempdir().unwrap();
    // Two independent PKIs: the certificate before and after the renewal. The client trusts
    // both CAs, so only the certificate it is shown tells them apart.
    let (old, new, live, trust) = (
        dir.path().join("old"),
        dir.path().join("new"),
        dir.path().join("live"),
        dir.path().join("trust"),
    );
    for d in [&old, &new, &live, &trust] {
        std::fs::create_dir_all(d).unwrap();
    }
    make_pki(&old, &[]);
    make_pki(&new, &[]);
    let cas = [
        std::fs::read(old.join("ca.pem")).unwrap(),
        std::fs::read(new.join("ca.pem")).unwrap(),
    ]
    .concat();
    std::fs::write(trust.join("ca.pem"), cas).unwrap();
    replace_file(&old.join("server.pem"), &live.join("server.pem"));
    replace_file(&old.join("server.key"), &live.join("server.key"));

    let tls_port = free_port();
    let config = format!(
        "train_id = \"T1\"\n[local]\nlisten = \"127.0.0.1:{{local_port}}\"\nconnect_timeout = \"3s\"\ntls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{l}/server.pem\"\ntls_key = \"{l}/server.key\"\n[uplink]\nurl = \"mqtt://127.0.0.1:9\"\nbackoff_min = \"100ms\"\nbackoff_max = \"1s\"\n[store]\npath = \"{{dir}}/store.db\"\n[status]\nsocket = \"{{dir}}/status.sock\"\n",
        l = live.display()
    );
    let relay = Daemon::start(dir.path(), &config, &[]).await;
    trainrelay_testkit::wait_for_port(tls_port, T).await;
    let old_cert = certs(&old.join("server.pem")).remove(0);
    let new_cert = certs(&new.join("server.pem")).remove(0);
    assert_ne!(old_cert, new_cert);

    let mut before = tls_connect(&trust, tls_port, None).await;
    assert_eq!(server_cert(&before), old_cert, "the certificate at start");
    assert_eq!(login(&mut before, "before", None, None).await, Some(0));

    // The renewal: new files in place, then SIGHUP.
    replace_file(&new.join("server.pem"), &live.join("server.pem"));
    replace_file(&new.join("server.key"), &live.join("server.key"));
    relay.signal(Signal::SIGHUP);
    relay.wait_log("TLS certificate and key reloaded", T).await;
    let mut after = tls_connect(&trust, tls_port, None).await;
    assert_eq!(
        server_cert(&after),
        new_cert,
        "a new connection after SIGHUP sees the new certificate"
    );
    assert_eq!(login(&mut after, "after", None, None).await, Some(0));
    assert_eq!(publish(&mut after, 1, "up/after").await, 0);
    // The connection made before the reload is untouched.
    assert_eq!(publish(&mut before, 1, "up/before").await, 0);

    // A broken certificate file on the next SIGHUP: the current certificate stays.
    std::fs::write(live.join("server.pem"), "not a certificate\n").unwrap();
    relay.signal(Signal::SIGHUP);
    relay
        .wait_log("keeping the current TLS certificate", T)
        .await;
    let kept = tls_connect(&trust, tls_port, None).await;
    assert_eq!(
        server_cert(&kept),
        new_cert,
        "the broken file replaced nothing"
    );
}

//! `mqtts://` (with mutual TLS) and `wss://` uplinks against a real Mosquitto with TLS and
//! WebSocket-over-TLS listeners, using a CA, server and client certificates the test makes.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};
use trainrelay_testkit::*;

/// A test PKI: CA, a server certificate for 127.0.0.1 and a client certificate.
struct Pki {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn make_pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "trainrelay test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    sp.subject_alt_names
        .push(SanType::IpAddress(Ipv4Addr::LOCALHOST.into()));
    sp.distinguished_name.push(DnType::CommonName, "central");
    let server = sp.signed_by(&server_key, &ca, &ca_key).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name
        .push(DnType::CommonName, "trainrelay-T1");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = cp.signed_by(&client_key, &ca, &ca_key).unwrap();

    Pki {
        ca: ca.pem(),
        server_cert: server.pem(),
        server_key: server_key.serialize_pem(),
        client_cert: client.pem(),
        client_key: client_key.serialize_pem(),
    }
}

/// Mosquitto with a plain listener (for the control client), an MQTT-over-TLS listener that
/// requires a client certificate, and a WebSocket-over-TLS listener.
struct TlsCentral {
    plain: u16,
    tls: u16,
    wss: u16,
    child: Child,
}

impl TlsCentral {
    async fn start(dir: &Path, pki: &Pki) -> TlsCentral {
        let dir = dir.join("central");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in [
            ("ca.pem", &pki.ca),
            ("server.pem", &pki.server_cert),
            ("server.key", &pki.server_key),
        ] {
            std::fs::write(dir.join(name), text).unwrap();
        }
        let (plain, tls, wss) = (free_port(), free_port(), free_port());
        let d = dir.display();
        let conf = dir.join("mosquitto.conf");
        let mut f = std::fs::File::create(&conf).unwrap();
        writeln!(
            f,
            "user root\nallow_anonymous true\nlog_dest file {d}/mosquitto.log\n\
             listener {plain} 127.0.0.1\n\
             listener {tls} 127.0.0.1\ncafile {d}/ca.pem\ncertfile {d}/server.pem\n\
             keyfile {d}/server.key\nrequire_certificate true\n\
             listener {wss} 127.0.0.1\nprotocol websockets\ncafile {d}/ca.pem\n\
             certfile {d}/server.pem\nkeyfile {d}/server.key\n"
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start mosquitto");
        let c = TlsCentral {
            plain,
            tls,
            wss,
            child,
        };
        for port in [plain, tls, wss] {
            wait_for_port(port, Duration::from_secs(10)).await;
        }
        c
    }
}

impl Drop for TlsCentral {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(url: &str, tls: &str) -> String {
    Config::new(url)
        .set("uplink", "connect_timeout", "\"5s\"")
        .lines("uplink", tls)
        .store("")
        .route("up", "up/#", "trains/T1/up/#")
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtts_with_client_certificate_and_wss_deliver_and_a_wrong_ca_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki();
    let central = TlsCentral::start(dir.path(), &pki).await;
    let files = dir.path().join("relay-tls");
    std::fs::create_dir_all(&files).unwrap();
    let write = |name: &str, text: &str| {
        let p = files.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let ca = write("ca.pem", &pki.ca);
    let cert = write("client.pem", &pki.client_cert);
    let key = write("client.key", &pki.client_key);
    let other_ca = write("other-ca.pem", &make_pki().ca);

    let mut control = V5Client::connect(central.plain, "control", false).await;
    control.subscribe("trains/T1/up/#").await;

    let mtls = Relay::start(
        &dir.path().join("a"),
        &config(
            &format!("mqtts://127.0.0.1:{}", central.tls),
            &format!(
                "client_id = \"relay-a\"\nca_file = \"{ca}\"\nclient_cert_file = \"{cert}\"\nclient_key_file = \"{key}\""
            ),
        ),
    )
    .await;
    let wss = Relay::start(
        &dir.path().join("b"),
        &config(
            &format!("wss://127.0.0.1:{}/mqtt", central.wss),
            &format!("client_id = \"relay-b\"\nca_file = \"{ca}\""),
        ),
    )
    .await;
    let wrong = Relay::start(
        &dir.path().join("c"),
        &config(
            &format!("mqtts://127.0.0.1:{}", central.tls),
            &format!(
                "client_id = \"relay-c\"\nca_file = \"{other_ca}\"\nclient_cert_file = \"{cert}\"\nclient_key_file = \"{key}\""
            ),
        ),
    )
    .await;

    let mut seen = trainrelay_testkit::netns::Collector::new(&["tls", "wss"]);
    let mut ipad = V5Client::connect(mtls.local_port, "ipad-a", true).await;
    ipad.publish_acked("up/a", payloads("tls", 200), None).await;
    let mut ipad = V5Client::connect(wss.local_port, "ipad-b", true).await;
    ipad.publish_acked("up/b", payloads("wss", 200), None).await;
    assert!(
        seen.until(&mut control, &[200, 200], Duration::from_secs(60))
            .await,
        "mqtts:// {} of 200, wss:// {} of 200 arrived",
        seen.tally(0).order.len(),
        seen.tally(1).order.len()
    );
    assert!(seen.tally(0).in_order() && seen.tally(1).in_order());
    drop(mtls);
    drop(wss);

    let mut ipad = V5Client::connect(wrong.local_port, "ipad-c", true).await;
    ipad.publish_acked("up/c", payloads("bad", 10), None).await;
    let got = control.collect(1, Duration::from_secs(5)).await;
    assert!(
        got.is_empty(),
        "a relay trusting another CA must not connect"
    );
    let log = wrong.log();
    assert!(
        log.contains("connect failed") && !log.contains("connected (session"),
        "expected a refused TLS handshake in the log"
    );
    println!(
        "wrong CA: {}",
        log.lines()
            .find(|l| l.contains("connect failed"))
            .unwrap_or("")
    );
}

#[test]
fn tls_endpoint_without_a_ca_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "train_id = \"T1\"\n[uplink]\nurl = \"mqtts://central:8883\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_trainrelay"))
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("uplink.ca_file"), "{err}");
}

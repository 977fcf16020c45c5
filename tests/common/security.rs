//! Raw MQTT over TCP for the security tests: exact bytes out, exact reason codes back, and
//! a relay config with `[local]` keys of the test's choosing.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Like `relay_config`, with `local` added to `[local]` and `extra` appended.
pub fn secure_config(central_url: &str, local: &str, extra: &str) -> String {
    format!(
        r#"
train_id = "T1"

[local]
listen = "127.0.0.1:{{local_port}}"
{local}

[uplink]
url = "{central_url}"
keep_alive = "5s"
backoff_min = "100ms"
backoff_max = "1s"

[store]
path = "{{dir}}/store.db"

[status]
socket = "{{dir}}/status.sock"

[[route]]
direction = "up"
local = "up/#"
remote = "trains/T1/up/#"

[[route]]
direction = "down"
remote = "trains/T1/down/#"
local = "down/#"

[[route]]
direction = "down"
remote = "fleet/broadcast/#"
local = "fleet/broadcast/#"
{extra}
"#
    )
}

/// `[[local.device]]` entries for (name, password, group).
pub fn devices(list: &[(&str, &str, Option<&str>)]) -> String {
    let mut out = String::new();
    for (name, pw, group) in list {
        let hash = trainrelay::password::hash_password(pw.as_bytes()).expect("hash");
        out.push_str(&format!(
            "\n[[local.device]]\nname = \"{name}\"\npassword_hash = \"{hash}\"\n"
        ));
        if let Some(g) = group {
            out.push_str(&format!("group = \"{g}\"\n"));
        }
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// Fixed header + remaining length + body.
pub fn frame(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![header];
    let mut len = body.len();
    loop {
        let mut b = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            b |= 0x80;
        }
        out.push(b);
        if len == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// CONNECT (clean start, keep-alive 60 s).
pub fn connect_packet(
    v5: bool,
    client_id: &str,
    user: Option<&str>,
    pass: Option<&[u8]>,
) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, b"MQTT");
    b.push(if v5 { 5 } else { 4 });
    let mut flags = 0x02;
    if user.is_some() {
        flags |= 0x80;
    }
    if pass.is_some() {
        flags |= 0x40;
    }
    b.push(flags);
    b.extend_from_slice(&60u16.to_be_bytes());
    if v5 {
        b.push(0);
    }
    put_str(&mut b, client_id.as_bytes());
    if let Some(u) = user {
        put_str(&mut b, u.as_bytes());
    }
    if let Some(p) = pass {
        put_str(&mut b, p);
    }
    frame(0x10, &b)
}

pub fn subscribe_packet(v5: bool, pkid: u16, filter: &str) -> Vec<u8> {
    let mut b = pkid.to_be_bytes().to_vec();
    if v5 {
        b.push(0);
    }
    put_str(&mut b, filter.as_bytes());
    b.push(1);
    frame(0x82, &b)
}

/// PUBLISH with a raw topic (may be invalid on purpose); `pkid` 0 means QoS 0.
pub fn publish_packet(v5: bool, topic: &[u8], payload: &[u8], pkid: u16) -> Vec<u8> {
    let mut b = Vec::new();
    put_str(&mut b, topic);
    if pkid != 0 {
        b.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        b.push(0);
    }
    b.extend_from_slice(payload);
    frame(if pkid == 0 { 0x30 } else { 0x32 }, &b)
}

/// A received packet: first byte and body.
#[derive(Debug)]
pub struct Pkt {
    pub header: u8,
    pub body: Vec<u8>,
}

impl Pkt {
    pub fn kind(&self) -> u8 {
        self.header >> 4
    }

    /// Topic and payload of a PUBLISH.
    pub fn publish(&self, v5: bool) -> (String, Vec<u8>) {
        let b = &self.body;
        let n = usize::from(u16::from_be_bytes([b[0], b[1]]));
        let topic = String::from_utf8_lossy(&b[2..2 + n]).to_string();
        let mut i = 2 + n;
        if self.header & 0x06 != 0 {
            i += 2;
        }
        if v5 {
            let (len, used) = varint(&b[i..]);
            i += used + len;
        }
        (topic, b[i..].to_vec())
    }
}

fn varint(b: &[u8]) -> (usize, usize) {
    let mut v = 0usize;
    for (i, byte) in b.iter().enumerate().take(4) {
        v |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    (v, 4)
}

/// A raw MQTT connection.
pub struct Raw {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub v5: bool,
}

impl Raw {
    /// Opens a TCP connection from `source` (another loopback address, so attackers do not
    /// share the well-behaved clients' per-address limit) to the relay.
    pub async fn open_from(source: [u8; 4], port: u16) -> std::io::Result<Raw> {
        let sock = TcpSocket::new_v4()?;
        sock.bind(SocketAddr::from((source, 0)))?;
        let stream = sock
            .connect(SocketAddr::from(([127, 0, 0, 1], port)))
            .await?;
        Ok(Raw {
            stream,
            buf: Vec::new(),
            v5: false,
        })
    }

    pub async fn open(port: u16) -> Raw {
        Raw::open_from([127, 0, 0, 1], port).await.expect("connect")
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// CONNECT and return the CONNACK's code (None if the socket closed without one).
    pub async fn login(
        &mut self,
        v5: bool,
        client_id: &str,
        user: Option<&str>,
        pass: Option<&str>,
    ) -> Option<u8> {
        self.v5 = v5;
        self.send(&connect_packet(
            v5,
            client_id,
            user,
            pass.map(str::as_bytes),
        ))
        .await
        .ok()?;
        let p = self.read(Duration::from_secs(30)).await?;
        assert_eq!(p.kind(), 2, "expected CONNACK, got {p:?}");
        p.body.get(1).copied()
    }

    /// The next packet, or None on close or timeout.
    pub async fn read(&mut self, within: Duration) -> Option<Pkt> {
        let deadline = Instant::now() + within;
        loop {
            if self.buf.len() >= 2 {
                let (len, used) = varint(&self.buf[1..]);
                if self.buf.len() >= 1 + used + len {
                    let header = self.buf[0];
                    let body = self.buf[1 + used..1 + used + len].to_vec();
                    self.buf.drain(..1 + used + len);
                    return Some(Pkt { header, body });
                }
            }
            let mut chunk = [0u8; 8192];
            let left = deadline.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// Reads until a packet of `kind` arrives (others are skipped).
    pub async fn read_kind(&mut self, kind: u8, within: Duration) -> Option<Pkt> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let p = self.read(left).await?;
            if p.kind() == kind {
                return Some(p);
            }
        }
    }

    /// SUBSCRIBE one filter; the SUBACK's code.
    pub async fn subscribe(&mut self, pkid: u16, filter: &str) -> u8 {
        let v5 = self.v5;
        self.send(&subscribe_packet(v5, pkid, filter))
            .await
            .expect("send");
        let p = self
            .read_kind(9, Duration::from_secs(30))
            .await
            .expect("no SUBACK");
        *p.body.last().expect("empty SUBACK")
    }

    /// QoS 1 PUBLISH; the PUBACK's reason code (0 for 3.1.1) once it arrives.
    pub async fn publish_qos1(&mut self, pkid: u16, topic: &str, payload: &[u8]) -> Option<u8> {
        let v5 = self.v5;
        self.send(&publish_packet(v5, topic.as_bytes(), payload, pkid))
            .await
            .ok()?;
        let p = self.read_kind(4, Duration::from_secs(30)).await?;
        Some(p.body.get(2).copied().unwrap_or(0))
    }

    /// True once the server closed the connection (EOF or reset) within `within`; the
    /// packets read before that are returned too.
    pub async fn closed_within(&mut self, within: Duration) -> (bool, Vec<Pkt>) {
        let mut seen = Vec::new();
        let deadline = Instant::now() + within;
        loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return (false, seen);
            };
            if self.buf.len() >= 2 {
                if let Some(p) = self.read(Duration::from_millis(1)).await {
                    seen.push(p);
                    continue;
                }
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (true, seen),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Err(_) => return (false, seen),
            }
        }
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and client certificates for `clients` (CNs).
pub fn make_pki(dir: &Path, clients: &[&str]) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    ]);
    openssl(dir, &a);
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, ext) in
        std::iter::once(("server", "server.ext")).chain(clients.iter().map(|c| (*c, "client.ext")))
    {
        let cn = if name == "server" {
            "localhost".to_string()
        } else {
            name.to_string()
        };
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let subj = format!("/CN={cn}");
        let mut a = vec!["req"];
        a.extend(ec);
        a.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &a);
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                ext,
            ],
        );
    }
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

//! Shared helpers for the broker tests: an in-process broker on 127.0.0.1:0 with a fresh
//! store, recording hooks, rumqttc clients, and a raw client for byte-level tests.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use trainrelay::broker::{
    Broker, BrokerConfig, BrokerError, BrokerEvent, BrokerHandle, ClientInfo, Hooks, Ingest,
    RejectReason,
};
use trainrelay::message::Message;
use trainrelay::shutdown::{self, ShutdownTrigger};
use trainrelay::store::{Db, DbThread, Synchronous};

/// Fails a hung test; never a timing assertion.
pub const WAIT: Duration = Duration::from_secs(10);

/// What the test hooks answer to `ingest`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IngestMode {
    Accept,
    Reject(RejectReason),
    /// Answer `Pending`; the test releases verdicts with [`TestHooks::release`].
    Hold,
}

pub struct TestHooks {
    pub events: Mutex<Vec<BrokerEvent>>,
    pub ingested: Mutex<Vec<(String, Message)>>,
    pub mode: Mutex<IngestMode>,
    held: Mutex<VecDeque<oneshot::Sender<Result<(), RejectReason>>>>,
    pub deny_publish: Mutex<Vec<String>>,
    pub deny_subscribe: Mutex<Vec<String>>,
    /// User names refused with bad credentials.
    pub bad_users: Mutex<Vec<String>>,
    /// User names whose authentication takes this long (on the blocking pool).
    pub slow_users: Mutex<Vec<(String, Duration)>>,
    /// Slow authentications under way.
    pub authenticating: std::sync::atomic::AtomicUsize,
}

impl TestHooks {
    pub fn new() -> Arc<TestHooks> {
        Arc::new(TestHooks {
            events: Mutex::new(Vec::new()),
            ingested: Mutex::new(Vec::new()),
            mode: Mutex::new(IngestMode::Accept),
            held: Mutex::new(VecDeque::new()),
            deny_publish: Mutex::new(Vec::new()),
            deny_subscribe: Mutex::new(Vec::new()),
            bad_users: Mutex::new(Vec::new()),
            slow_users: Mutex::new(Vec::new()),
            authenticating: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub fn set_mode(&self, m: IngestMode) {
        *self.mode.lock().unwrap() = m;
    }

    pub fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    /// Answers the oldest held verdict.
    pub fn release(&self, verdict: Result<(), RejectReason>) {
        if let Some(tx) = self.held.lock().unwrap().pop_front() {
            let _ = tx.send(verdict);
        }
    }

    pub fn events(&self) -> Vec<BrokerEvent> {
        self.events.lock().unwrap().clone()
    }

    pub fn wills(&self) -> Vec<String> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                BrokerEvent::WillPublished { topic, .. } => Some(topic),
                _ => None,
            })
            .collect()
    }
}

impl Hooks for TestHooks {
    fn authenticate(
        &self,
        req: &trainrelay::broker::ConnectRequest<'_>,
    ) -> trainrelay::broker::AuthVerdict {
        let slow = self
            .slow_users
            .lock()
            .unwrap()
            .iter()
            .find(|(u, _)| Some(u.as_str()) == req.username)
            .map(|(_, d)| *d);
        if let Some(d) = slow {
            use std::sync::atomic::Ordering;
            self.authenticating.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(d);
            self.authenticating.fetch_sub(1, Ordering::SeqCst);
        }
        let bad = self.bad_users.lock().unwrap();
        if req.username.is_some_and(|u| bad.iter().any(|b| b == u)) {
            trainrelay::broker::AuthVerdict::BadCredentials
        } else {
            trainrelay::broker::AuthVerdict::Allow
        }
    }
    fn may_publish(&self, _c: &ClientInfo, topic: &str) -> bool {
        !self.deny_publish.lock().unwrap().iter().any(|t| t == topic)
    }
    fn may_subscribe(&self, _c: &ClientInfo, filter: &str) -> bool {
        !self
            .deny_subscribe
            .lock()
            .unwrap()
            .iter()
            .any(|t| t == filter)
    }
    fn ingest(&self, client: &ClientInfo, msg: &Message) -> Ingest {
        self.ingested
            .lock()
            .unwrap()
            .push((client.client_id.clone(), msg.clone()));
        match *self.mode.lock().unwrap() {
            IngestMode::Accept => Ingest::Accept,
            IngestMode::Reject(r) => Ingest::Reject(r),
            IngestMode::Hold => {
                let (tx, rx) = oneshot::channel();
                self.held.lock().unwrap().push_back(tx);
                Ingest::Pending(rx)
            }
        }
    }
    fn on_event(&self, event: BrokerEvent) {
        self.events.lock().unwrap().push(event);
    }
}

/// A broker running in-process.
pub struct TestBroker {
    pub addr: SocketAddr,
    pub handle: BrokerHandle,
    pub hooks: Arc<TestHooks>,
    pub db_path: PathBuf,
    trigger: ShutdownTrigger,
    task: JoinHandle<Result<(), BrokerError>>,
    db_thread: Option<DbThread>,
}

pub fn test_config() -> BrokerConfig {
    BrokerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        connect_timeout: Duration::from_secs(2),
        ..BrokerConfig::default()
    }
}

impl TestBroker {
    pub async fn start(dir: &Path) -> TestBroker {
        Self::start_with(dir, test_config(), TestHooks::new()).await
    }

    pub async fn start_with(dir: &Path, config: BrokerConfig, hooks: Arc<TestHooks>) -> TestBroker {
        let _ = env_logger::builder().is_test(true).try_init();
        let db_path = dir.join("store.db");
        let (db, db_thread) = Db::open(&db_path, Synchronous::Normal).unwrap();
        let broker = Broker::bind(config, db, hooks.clone()).await.unwrap();
        let addr = broker.local_addr();
        let handle = broker.handle();
        let (trigger, shutdown) = shutdown::channel();
        let task = tokio::spawn(broker.run(shutdown));
        TestBroker {
            addr,
            handle,
            hooks,
            db_path,
            trigger,
            task,
            db_thread: Some(db_thread),
        }
    }

    /// Shuts down and waits until the store is closed, so a new broker can open it.
    pub async fn stop(mut self) {
        self.trigger.trigger();
        let result = tokio::time::timeout(WAIT, &mut self.task).await;
        assert!(matches!(result, Ok(Ok(Ok(())))), "broker run: {result:?}");
        let thread = self.db_thread.take();
        drop(self);
        if let Some(t) = thread {
            let _ = tokio::time::timeout(WAIT, tokio::task::spawn_blocking(move || t.join())).await;
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.trigger.trigger();
    }
}

/// Polls `cond` until it holds; panics after [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------- rumqttc clients ----------

/// A rumqttc 3.1.1 client whose incoming packets arrive on `rx`.
pub struct V4 {
    pub client: rumqttc::AsyncClient,
    pub rx: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Packet>,
    task: JoinHandle<()>,
}

impl Drop for V4 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn v4(addr: SocketAddr, id: &str, clean: bool) -> V4 {
    v4_with(addr, id, |o| {
        o.set_clean_session(clean);
    })
    .await
}

pub async fn v4_with(addr: SocketAddr, id: &str, f: impl FnOnce(&mut rumqttc::MqttOptions)) -> V4 {
    let mut o = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    f(&mut o);
    let (client, mut el) = rumqttc::AsyncClient::new(o, 100);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let rumqttc::Event::Incoming(p) = ev {
                if tx.send(p).is_err() {
                    break;
                }
            }
        }
    });
    let ack = tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Some(rumqttc::Packet::ConnAck(a)) => return a,
                Some(_) => {}
                None => panic!("client {id}: connection failed"),
            }
        }
    })
    .await
    .expect("CONNACK");
    assert_eq!(ack.code, rumqttc::ConnectReturnCode::Success);
    V4 { client, rx, task }
}

impl V4 {
    /// Next incoming PUBLISH.
    pub async fn publish(&mut self) -> rumqttc::Publish {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.rx.recv().await {
                    Some(rumqttc::Packet::Publish(p)) => return p,
                    Some(_) => {}
                    None => panic!("connection ended while waiting for PUBLISH"),
                }
            }
        })
        .await
        .expect("timed out waiting for PUBLISH")
    }

    pub async fn suback(&mut self) -> rumqttc::SubAck {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.rx.recv().await {
                    Some(rumqttc::Packet::SubAck(p)) => return p,
                    Some(_) => {}
                    None => panic!("connection ended while waiting for SUBACK"),
                }
            }
        })
        .await
        .expect("timed out waiting for SUBACK")
    }

    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        self.suback().await;
    }

    /// True if no PUBLISH arrives within `d`.
    pub async fn no_publish_within(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, async {
            loop {
                match self.rx.recv().await {
                    Some(rumqttc::Packet::Publish(_)) => return,
                    Some(_) => {}
                    None => std::future::pending::<()>().await,
                }
            }
        })
        .await
        .is_err()
    }
}

pub use rumqttc::v5::mqttbytes::v5 as p5;

/// A rumqttc MQTT 5 client whose incoming packets arrive on `rx`.
pub struct V5 {
    pub client: rumqttc::v5::AsyncClient,
    pub rx: tokio::sync::mpsc::UnboundedReceiver<p5::Packet>,
    pub connack: p5::ConnAck,
    task: JoinHandle<()>,
}

impl Drop for V5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn v5(addr: SocketAddr, id: &str, f: impl FnOnce(&mut rumqttc::v5::MqttOptions)) -> V5 {
    let mut o = rumqttc::v5::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    f(&mut o);
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 100);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            if let rumqttc::v5::Event::Incoming(p) = ev {
                if tx.send(p).is_err() {
                    break;
                }
            }
        }
    });
    let connack = tokio::time::timeout(WAIT, async {
        loop {
            match rx.recv().await {
                Some(p5::Packet::ConnAck(a)) => return a,
                Some(_) => {}
                None => panic!("client {id}: connection failed"),
            }
        }
    })
    .await
    .expect("CONNACK");
    assert_eq!(connack.code, p5::ConnectReturnCode::Success);
    V5 {
        client,
        rx,
        connack,
        task,
    }
}

impl V5 {
    pub async fn publish(&mut self) -> p5::Publish {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.rx.recv().await {
                    Some(p5::Packet::Publish(p)) => return p,
                    Some(_) => {}
                    None => panic!("connection ended while waiting for PUBLISH"),
                }
            }
        })
        .await
        .expect("timed out waiting for PUBLISH")
    }

    pub async fn suback(&mut self) -> p5::SubAck {
        tokio::time::timeout(WAIT, async {
            loop {
                match self.rx.recv().await {
                    Some(p5::Packet::SubAck(p)) => return p,
                    Some(_) => {}
                    None => panic!("connection ended while waiting for SUBACK"),
                }
            }
        })
        .await
        .expect("timed out waiting for SUBACK")
    }

    pub async fn subscribe(&mut self, filter: p5::Filter) -> p5::SubAck {
        self.client.subscribe_many(vec![filter]).await.unwrap();
        self.suback().await
    }

    pub async fn no_publish_within(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, async {
            loop {
                match self.rx.recv().await {
                    Some(p5::Packet::Publish(_)) => return,
                    Some(_) => {}
                    None => std::future::pending::<()>().await,
                }
            }
        })
        .await
        .is_err()
    }
}

pub fn filter(path: &str, qos: u8) -> p5::Filter {
    p5::Filter::new(path, qos5(qos))
}

pub fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

pub fn qos4(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

// ---------- raw clients ----------

/// A byte-level MQTT 5 client with full control over what is sent and acknowledged.
pub struct Raw5 {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw5 {
    pub async fn connect(
        addr: SocketAddr,
        connect: p5::Connect,
        will: Option<p5::LastWill>,
    ) -> (Raw5, p5::ConnAck) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut raw = Raw5 {
            stream,
            buf: BytesMut::new(),
        };
        raw.send(p5::Packet::Connect(connect, will, None)).await;
        match raw.recv().await {
            Some(p5::Packet::ConnAck(a)) => (raw, a),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub async fn simple(addr: SocketAddr, id: &str, keep_alive: u16) -> Raw5 {
        let c = p5::Connect {
            keep_alive,
            client_id: id.into(),
            clean_start: true,
            properties: None,
        };
        let (raw, ack) = Raw5::connect(addr, c, None).await;
        assert_eq!(ack.code, p5::ConnectReturnCode::Success);
        raw
    }

    pub async fn send(&mut self, p: p5::Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, None).unwrap();
        self.stream.write_all(&b).await.unwrap();
    }

    pub async fn send_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(b).await
    }

    /// Next packet, or `None` if the connection closed (or `WAIT` passed).
    pub async fn recv(&mut self) -> Option<p5::Packet> {
        self.recv_within(WAIT).await
    }

    pub async fn recv_within(&mut self, d: Duration) -> Option<p5::Packet> {
        let deadline = tokio::time::Instant::now() + d;
        loop {
            if !self.buf.is_empty() {
                // rumqttc refuses a zero-length DISCONNECT; servers may send only longer ones.
                match p5::Packet::read(&mut self.buf, None) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("undecodable packet from broker: {e}"),
                }
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Reads until the broker closes the connection; returns the packets it sent before.
    pub async fn until_closed(&mut self) -> Vec<p5::Packet> {
        let mut out = Vec::new();
        while let Some(p) = self.recv().await {
            out.push(p);
        }
        out
    }
}

/// Writes a v5 PUBLISH packet.
pub fn pub5(
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    props: Option<p5::PublishProperties>,
) -> p5::Packet {
    let mut p = p5::Publish::new(topic, qos5(qos), payload.to_vec(), props);
    p.pkid = pkid;
    p5::Packet::Publish(p)
}

/// Bytes of a 3.1.1 CONNECT.
pub fn connect4_bytes(id: &str, keep_alive: u16, clean: bool) -> Vec<u8> {
    let mut c = rumqttc::mqttbytes::v4::Connect::new(id);
    c.keep_alive = keep_alive;
    c.clean_session = clean;
    let mut b = BytesMut::new();
    c.write(&mut b).unwrap();
    b.to_vec()
}

/// Reads until EOF (or `WAIT`); returns everything read and whether EOF was seen.
pub async fn read_to_close(stream: &mut TcpStream) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, false),
        }
    }
}

//! Test harness: a real Mosquitto as the central broker, the real `trainrelay` binary as a
//! child process, and rumqttc clients standing in for iPads and the control centre.
//!
//! Every test gets its own ports and temp dir; processes are killed on drop, so a failing
//! test leaves nothing behind.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use rumqttc::v5::mqttbytes::v5::{Packet, Publish, PublishProperties};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

pub use config::Config;

/// The `trainrelay` binary under test: `TRAINRELAY_BIN`, else the one cargo built next to
/// the running test (`target/<profile>/trainrelay`; cargo builds it for integration tests).
pub fn relay_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("TRAINRELAY_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("path of the running test");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/trainrelay
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary outside a cargo target dir");
    let bin = profile.join("trainrelay");
    assert!(bin.exists(), "{} not built", bin.display());
    bin
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

/// Waits until something accepts TCP connections on the port.
pub async fn wait_for_port(port: u16, within: Duration) {
    let start = Instant::now();
    while start.elapsed() < within {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on port {port} after {within:?}");
}

fn kill(child: &mut Child, signal: i32) {
    // SAFETY-free: plain kill(2) through the nix crate.
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let sig = nix::sys::signal::Signal::try_from(signal).expect("signal");
    let _ = nix::sys::signal::kill(pid, sig);
}

/// Whether the environment says this is CI (`CI` set to anything but "", "0" or "false").
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"))
}

/// The one place a test gives up for a missing prerequisite: prints "SKIPPED" and returns
/// false; under CI it fails the test instead, so a broken install step cannot turn CI green.
pub fn require_or_skip(test: &str, available: bool, missing: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        !under_ci(),
        "{test}: {missing}; CI is set, so this is a failure, not a skip"
    );
    eprintln!("SKIPPED {test}: {missing}");
    false
}

/// [`require_or_skip`] for tests that need root (network namespaces, iptables).
pub fn require_root_or_skip(test: &str) -> bool {
    require_or_skip(
        test,
        nix::unistd::geteuid().is_root(),
        "network namespaces need root (CI runs as root)",
    )
}

/// One persistent-session connect + QoS 1 SUBSCRIBE, answered with a success within 5 s.
pub async fn session_works(port: u16, id: &str) -> bool {
    let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(10))
        .set_clean_session(false);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 10);
    let probe = async {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) => {
                    if client
                        .try_subscribe("trainrelay/probe", rumqttc::QoS::AtLeastOnce)
                        .is_err()
                    {
                        return false;
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Incoming::SubAck(a))) => {
                    return a
                        .return_codes
                        .iter()
                        .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure));
                }
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    };
    let ok = tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .unwrap_or(false);
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), eventloop.poll()).await;
    ok
}

/// Waits until the broker on `port` takes a persistent MQTT session and a QoS 1 subscription
/// (NATS needs its JetStream streams for that, well after its listener is up), panicking after
/// `within`. A fresh client id each attempt: a half-created session of a failed one must not
/// be what the next waits on.
pub async fn wait_sessions(port: u16, name: &str, within: Duration) {
    let deadline = Instant::now() + within;
    let mut attempt = 0;
    while Instant::now() < deadline {
        attempt += 1;
        if session_works(port, &format!("ready-{name}-{attempt}")).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{name} serves no MQTT session after {within:?}");
}

/// A Mosquitto process playing the central broker, with persistence on.
pub struct Central {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// `max_inflight_messages`: also the Receive Maximum it announces to MQTT 5 clients
    /// (0: no limit).
    inflight: u32,
    /// More lines for mosquitto.conf.
    extra: String,
}

impl Central {
    pub async fn start(dir: &Path) -> Central {
        Central::start_with(dir, 100, "").await
    }

    /// With `max_inflight_messages inflight` and `extra` lines in its configuration.
    pub async fn start_with(dir: &Path, inflight: u32, extra: &str) -> Central {
        let mut c = Central {
            port: free_port(),
            dir: dir.join("central"),
            child: None,
            inflight,
            extra: extra.to_string(),
        };
        std::fs::create_dir_all(&c.dir).unwrap();
        c.restart().await;
        c
    }

    /// A central broker that holds a persistent `control` session subscribed to `filter`, and
    /// is then stopped: what the relay forwards after a restart is queued for `control`.
    pub async fn down_with_subscriber(dir: &Path, filter: &str) -> Central {
        let mut central = Central::start(dir).await;
        let control = V5Client::connect(central.port, "control", false).await;
        control.subscribe(filter).await;
        drop(control);
        central.stop();
        central
    }

    /// (Re)starts on the same port and data directory.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "central broker already running");
        let conf = self.dir.join("mosquitto.conf");
        let mut f = std::fs::File::create(&conf).unwrap();
        writeln!(
            f,
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {dir}/\nautosave_interval 1\nmax_queued_messages 100000\nmax_inflight_messages {inflight}\nlog_dest file {dir}/mosquitto.log\n{extra}\n",
            port = self.port,
            dir = self.dir.display(),
            inflight = self.inflight,
            extra = self.extra
        )
        .unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        wait_for_port(self.port, Duration::from_secs(10)).await;
    }

    /// Stops with SIGTERM (Mosquitto saves its persistence file) and waits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(&mut child, libc_sigterm());
            let _ = child.wait();
        }
    }

    /// Stops with SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Whether it was started and not stopped since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Central {
    fn drop(&mut self) {
        self.kill();
    }
}

fn libc_sigterm() -> i32 {
    nix::sys::signal::Signal::SIGTERM as i32
}

/// The trainrelay daemon as a child process.
pub struct Relay {
    pub local_port: u16,
    pub dir: PathBuf,
    pub config_path: PathBuf,
    child: Option<Child>,
}

impl Relay {
    /// Writes `config` (with `{local_port}` and `{dir}` substituted) and starts the daemon.
    pub async fn start(dir: &Path, config: &str) -> Relay {
        let local_port = free_port();
        let dir = dir.join("relay");
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("trainrelay.toml");
        let text = config
            .replace("{local_port}", &local_port.to_string())
            .replace("{dir}", &dir.display().to_string());
        std::fs::write(&config_path, text).unwrap();
        let mut relay = Relay {
            local_port,
            dir,
            config_path,
            child: None,
        };
        relay.restart().await;
        relay
    }

    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "relay already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("relay.log"))
            .unwrap();
        let child = Command::new(relay_binary())
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            // Relative default paths (store, status socket) land in the test's own directory.
            .current_dir(&self.dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start trainrelay");
        self.child = Some(child);
        wait_for_port(self.local_port, Duration::from_secs(20)).await;
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("relay not running");
        kill(&mut child, libc_sigterm());
        child.wait().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!("--- relay log (last 200 lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A config for the relay with [`Config::standard_routes`] (no `[store]`: `extra` may add one
/// with [`store_section`], or more routes); see [`Config`] for the shared defaults.
pub fn relay_config(central_url: &str, extra: &str) -> String {
    Config::new(central_url)
        .standard_routes()
        .append(extra)
        .build()
}

/// Store section for `relay_config`'s `extra`.
pub fn store_section(extra: &str) -> String {
    format!("\n[store]\npath = \"{{dir}}/store.db\"\n{extra}\n")
}

/// An MQTT v5 client with its event loop driven in the background; received publishes
/// arrive on `messages`.
pub struct V5Client {
    pub client: AsyncClient,
    pub messages: mpsc::UnboundedReceiver<Publish>,
    pub acks: mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::PubAck>,
    pub subacks: mpsc::UnboundedReceiver<rumqttc::v5::mqttbytes::v5::SubAck>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V5Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V5Client {
    /// Connects (persistent session unless `clean`) and waits for the CONNACK.
    pub async fn connect(port: u16, id: &str, clean: bool) -> V5Client {
        V5Client::connect_host("127.0.0.1", port, id, clean).await
    }

    /// Like [`V5Client::connect`], to any host.
    pub async fn connect_host(host: &str, port: u16, id: &str, clean: bool) -> V5Client {
        let mut opts = MqttOptions::new(id, host, port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_start(clean)
            .set_max_packet_size(Some(1024 * 1024));
        if !clean {
            opts.set_session_expiry_interval(Some(3600));
        }
        let (client, mut eventloop) = AsyncClient::new(opts, 1000);
        let (tx, messages) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let (suback_tx, subacks) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(Event::Incoming(Packet::PubAck(a))) => {
                        let _ = ack_tx.send(a);
                    }
                    Ok(Event::Incoming(Packet::SubAck(a))) => {
                        let _ = suback_tx.send(a);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("no CONNACK within 10 s")
            .expect("client task ended");
        V5Client {
            client,
            messages,
            acks,
            subacks,
            task,
        }
    }

    pub async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        // Give the SUBACK time to land before the test publishes.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Subscribes to one filter and returns the SUBACK's reason code for it.
    pub async fn subscribe_reason(
        &mut self,
        filter: &str,
    ) -> rumqttc::v5::mqttbytes::v5::SubscribeReasonCode {
        while self.subacks.try_recv().is_ok() {}
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        let ack = tokio::time::timeout(Duration::from_secs(30), self.subacks.recv())
            .await
            .expect("SUBACK not received within 30 s")
            .expect("client ended");
        assert_eq!(ack.return_codes.len(), 1, "{ack:?}");
        ack.return_codes[0]
    }

    /// Publishes QoS 1 messages and waits until `n` PUBACKs came back, each a success.
    pub async fn publish_acked(
        &mut self,
        topic: &str,
        payloads: impl IntoIterator<Item = Vec<u8>>,
        props: Option<PublishProperties>,
    ) -> usize {
        let mut n = 0;
        for p in payloads {
            match &props {
                Some(props) => self
                    .client
                    .publish_with_properties(topic, QoS::AtLeastOnce, false, p, props.clone())
                    .await
                    .unwrap(),
                None => self
                    .client
                    .publish(topic, QoS::AtLeastOnce, false, p)
                    .await
                    .unwrap(),
            }
            n += 1;
        }
        for _ in 0..n {
            let ack = tokio::time::timeout(Duration::from_secs(30), self.acks.recv())
                .await
                .expect("PUBACK not received within 30 s")
                .expect("client ended");
            assert_eq!(
                ack.reason,
                rumqttc::v5::mqttbytes::v5::PubAckReason::Success,
                "PUBACK {} on '{topic}' is not a success",
                ack.pkid
            );
        }
        n
    }

    /// Collects messages until `n` arrived or `quiet` passed without one.
    pub async fn collect(&mut self, n: usize, quiet: Duration) -> Vec<Publish> {
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(quiet, self.messages.recv()).await {
                Ok(Some(p)) => out.push(p),
                _ => break,
            }
        }
        out
    }
}

/// Sequence numbers from payloads like `"<tag>-<seq>"`; returns (unique in first-seen
/// order, duplicate count).
pub fn sequence(msgs: &[Publish], tag: &str) -> (Vec<u64>, usize) {
    let mut seen = std::collections::HashSet::new();
    let mut order = Vec::new();
    let mut dups = 0;
    for m in msgs {
        let text = String::from_utf8_lossy(&m.payload);
        let Some(rest) = text.strip_prefix(&format!("{tag}-")) else {
            continue;
        };
        let Ok(seq) = rest.parse::<u64>() else {
            continue;
        };
        if seen.insert(seq) {
            order.push(seq);
        } else {
            dups += 1;
        }
    }
    (order, dups)
}

/// Payloads `"<tag>-0" .. "<tag>-(n-1)"`.
pub fn payloads(tag: &str, n: u64) -> Vec<Vec<u8>> {
    (0..n).map(|i| format!("{tag}-{i}").into_bytes()).collect()
}

/// An MQTT 3.1.1 client with a background event loop.
pub struct V4Client {
    pub client: rumqttc::AsyncClient,
    pub messages: mpsc::UnboundedReceiver<rumqttc::Publish>,
    pub acks: mpsc::UnboundedReceiver<u16>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for V4Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl V4Client {
    pub async fn connect(port: u16, id: &str, clean: bool) -> V4Client {
        V4Client::try_connect(port, id, clean, Duration::from_secs(10))
            .await
            .expect("no CONNACK within 10 s")
    }

    /// [`V4Client::connect`], or `None` when no CONNACK comes `within` (a broker still
    /// electing its leaders).
    pub async fn try_connect(
        port: u16,
        id: &str,
        clean: bool,
        within: Duration,
    ) -> Option<V4Client> {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(clean);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 1000);
        let (tx, messages) = mpsc::unbounded_channel();
        let (ack_tx, acks) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) => {
                        if let Some(r) = ready_tx.take() {
                            let _ = r.send(());
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p))) => {
                        let _ = tx.send(p);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::PubAck(a))) => {
                        let _ = ack_tx.send(a.pkid);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        match tokio::time::timeout(within, ready_rx).await {
            Ok(Ok(())) => Some(V4Client {
                client,
                messages,
                acks,
                task,
            }),
            _ => {
                task.abort();
                None
            }
        }
    }

    pub async fn subscribe(&self, filter: &str) {
        self.client
            .subscribe(filter, rumqttc::QoS::AtLeastOnce)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    pub async fn publish_acked(
        &mut self,
        topic: &str,
        payloads: impl IntoIterator<Item = Vec<u8>>,
    ) -> usize {
        let mut n = 0;
        for p in payloads {
            self.client
                .publish(topic, rumqttc::QoS::AtLeastOnce, false, p)
                .await
                .unwrap();
            n += 1;
        }
        for _ in 0..n {
            tokio::time::timeout(Duration::from_secs(30), self.acks.recv())
                .await
                .expect("PUBACK not received within 30 s")
                .expect("client ended");
        }
        n
    }

    pub async fn collect(&mut self, n: usize, quiet: Duration) -> Vec<rumqttc::Publish> {
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(quiet, self.messages.recv()).await {
                Ok(Some(p)) => out.push(p),
                _ => break,
            }
        }
        out
    }
}

impl V5Client {
    /// Publishes QoS 1 messages and returns the PUBACK reason of each, in order.
    pub async fn publish_reasons(
        &mut self,
        topic: &str,
        payloads: impl IntoIterator<Item = Vec<u8>>,
    ) -> Vec<rumqttc::v5::mqttbytes::v5::PubAckReason> {
        let mut n = 0;
        for p in payloads {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, p)
                .await
                .unwrap();
            n += 1;
        }
        let mut reasons = Vec::new();
        for _ in 0..n {
            let ack = tokio::time::timeout(Duration::from_secs(30), self.acks.recv())
                .await
                .expect("PUBACK not received within 30 s")
                .expect("client ended");
            reasons.push(ack.reason);
        }
        reasons
    }
}

pub mod broker;
pub mod cellular;
pub mod config;
pub mod fresh;
pub mod nats_core;
pub mod netns;
pub mod ops;
pub mod security;

//! The core scenarios against a clustered-class central broker that speaks only MQTT 3.1.1:
//! NATS 2.9 with JetStream and its MQTT listener (Debian `nats-server`), started per test on
//! its own ports with a temp store, with the relay on `protocol = "3.1.1"`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use trainrelay_testkit::netns::fault_config;
use trainrelay_testkit::ops::eventually;
use trainrelay_testkit::*;

const QUIET: Duration = Duration::from_secs(20);

struct Nats {
    mqtt: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Nats {
    /// `None` (with a message) when nats-server is not installed.
    async fn start(dir: &Path) -> Option<Nats> {
        let installed = Command::new("nats-server")
            .arg("--version")
            .output()
            .is_ok();
        if !require_or_skip(
            "nats",
            installed,
            "nats-server is not installed (apt-get install nats-server)",
        ) {
            return None;
        }
        let dir = dir.join("nats");
        std::fs::create_dir_all(dir.join("js")).unwrap();
        let (client, mqtt) = (free_port(), free_port());
        let mut f = std::fs::File::create(dir.join("nats.conf")).unwrap();
        writeln!(
            f,
            "server_name: trainrelay_test\nlisten: 127.0.0.1:{client}\n\
             jetstream {{\n  store_dir: \"{js}\"\n}}\nmqtt {{\n  listen: 127.0.0.1:{mqtt}\n}}\n",
            js = dir.join("js").display()
        )
        .unwrap();
        let mut n = Nats {
            mqtt,
            dir,
            child: None,
        };
        n.restart().await;
        Some(n)
    }

    async fn restart(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::File::create(self.dir.join("nats.log")).unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(self.dir.join("nats.conf"))
            // NATS may write stray files (consumer metadata) into its working directory.
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start nats-server");
        self.child = Some(child);
        wait_for_port(self.mqtt, Duration::from_secs(30)).await;
        // The listener is up before JetStream can hold a persistent session.
        wait_sessions(self.mqtt, "nats", Duration::from_secs(90)).await;
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(nats: &Nats) -> String {
    fault_config(&nats.url(), "5s", "protocol = \"3.1.1\"", "")
}

fn complete_in_order(got: &[rumqttc::Publish], tag: &str, n: u64) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut order = Vec::new();
    let mut dups = 0;
    for p in got {
        let text = String::from_utf8_lossy(&p.payload);
        if let Some(seq) = text
            .strip_prefix(&format!("{tag}-"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            if seen.insert(seq) {
                order.push(seq);
            } else {
                dups += 1;
            }
        }
    }
    let missing: Vec<u64> = (0..n).filter(|i| !seen.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "{tag}: {} of {n} lost, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{tag}: order broken");
    dups
}

async fn collect_unique(c: &mut V4Client, tag: &str, n: u64) -> Vec<rumqttc::Publish> {
    let mut got = Vec::new();
    let mut seen = std::collections::HashSet::new();
    while (seen.len() as u64) < n {
        match tokio::time::timeout(QUIET, c.messages.recv()).await {
            Ok(Some(p)) => {
                if let Some(seq) = String::from_utf8_lossy(&p.payload)
                    .strip_prefix(&format!("{tag}-"))
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    seen.insert(seq);
                }
                got.push(p);
            }
            _ => break,
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_uplink_and_downlink() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()).await else {
        return;
    };
    let mut control = V4Client::connect(nats.mqtt, "control", false).await;
    control.subscribe("trains/T1/up/#").await;
    let relay = Relay::start(dir.path(), &config(&nats)).await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    ipad.subscribe("down/#").await;
    ipad.publish_acked("up/x", payloads("u", 500), None).await;
    let got = collect_unique(&mut control, "u", 500).await;
    let dups = complete_in_order(&got, "u", 500);

    // Downlink: wait until the relay subscribed (its presence is published after that).
    let mut probe = V4Client::connect(nats.mqtt, "probe", true).await;
    probe.subscribe("trains/T1/status").await;
    let online = probe.collect(1, QUIET).await;
    assert_eq!(online.first().map(|p| &p.payload[..]), Some(&b"online"[..]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    control
        .client
        .publish(
            "trains/T1/down/speed",
            rumqttc::QoS::AtLeastOnce,
            true,
            "80",
        )
        .await
        .unwrap();
    let down = ipad.collect(1, QUIET).await;
    assert_eq!(
        down.first().map(|p| (
            String::from_utf8_lossy(&p.topic).into_owned(),
            p.payload.to_vec()
        )),
        Some(("down/speed".to_string(), b"80".to_vec()))
    );
    println!("NATS uplink: 500 delivered, {dups} duplicates; downlink delivered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_and_relay_sigkill_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut nats) = Nats::start(dir.path()).await else {
        return;
    };
    let control = V4Client::connect(nats.mqtt, "control", false).await;
    control.subscribe("trains/T1/up/#").await;
    drop(control);
    let mut relay = Relay::start(dir.path(), &config(&nats)).await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    ipad.publish_acked("up/x", payloads("o", 300), None).await;

    // Central outage (SIGKILL) while the iPad keeps publishing.
    nats.kill();
    ipad.publish_acked("up/x", payloads("o", 1000).into_iter().skip(300), None)
        .await;
    // Relay SIGKILL with the backlog in its store.
    relay.kill();
    drop(ipad);
    relay.restart().await;
    nats.restart().await;
    let mut control = V4Client::connect(nats.mqtt, "control", false).await;
    let got = collect_unique(&mut control, "o", 1000).await;
    let dups = complete_in_order_from(&got, "o", 300, 1000);
    println!("NATS outage + relay SIGKILL: 300..1000 delivered, {dups} duplicates");
}

/// Like `complete_in_order` for `from..n` (what was sent before `from` may have reached the
/// control client's session before the kill, and NATS may have lost it with the kill).
fn complete_in_order_from(got: &[rumqttc::Publish], tag: &str, from: u64, n: u64) -> usize {
    let mut seen = std::collections::HashSet::new();
    let mut order = Vec::new();
    let mut dups = 0;
    for p in got {
        let text = String::from_utf8_lossy(&p.payload);
        if let Some(seq) = text
            .strip_prefix(&format!("{tag}-"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            if seen.insert(seq) {
                order.push(seq);
            } else {
                dups += 1;
            }
        }
    }
    let missing: Vec<u64> = (from..n).filter(|i| !seen.contains(i)).collect();
    assert!(
        missing.is_empty(),
        "{tag}: {} of {} lost, first {:?}",
        missing.len(),
        n - from,
        &missing[..missing.len().min(10)]
    );
    let late: Vec<u64> = order.into_iter().filter(|s| *s >= from).collect();
    assert!(late.windows(2).all(|w| w[0] < w[1]), "{tag}: order broken");
    dups
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_dropping_the_connection_on_a_topic_dead_letters_it_and_the_queue_flows() {
    let dir = tempfile::tempdir().unwrap();
    let Some(nats) = Nats::start(dir.path()).await else {
        return;
    };
    let mut control = V4Client::connect(nats.mqtt, "control", false).await;
    control.subscribe("trains/T1/up/#").await;
    let relay = Relay::start(
        dir.path(),
        &fault_config(
            &nats.url(),
            "5s",
            "protocol = \"3.1.1\"\nmax_attempts = 3",
            "",
        ),
    )
    .await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
    ipad.publish_acked("up/x", payloads("p", 5), None).await;
    // NATS 2.9 closes the connection on a topic with a '.', on every resend.
    ipad.publish_acked("up/odd.topic", [b"poison".to_vec()], None)
        .await;
    ipad.publish_acked("up/x", payloads("p", 10).into_iter().skip(5), None)
        .await;
    let got = collect_unique(&mut control, "p", 10).await;
    let dups = complete_in_order(&got, "p", 10);
    // The poison topic has a connection of its own (it joined the least loaded share), so the
    // other topic flowed meanwhile; its third failed attempt moves it aside.
    let db = rusqlite::Connection::open(relay.dir.join("store.db")).unwrap();
    let reason = eventually(
        Duration::from_secs(60),
        "the poison message kept as a dead letter",
        || {
            db.query_row(
                "SELECT COUNT(*), COALESCE(MAX(reason), '') FROM uplink_dead_letters",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)),
            )
            .ok()
            .filter(|(dead, _)| *dead == 1)
            .map(|(_, reason)| reason)
        },
    )
    .await;
    println!("NATS poison topic: queue flowed, {dups} duplicates, dead letter: {reason}");
}

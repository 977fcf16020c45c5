//! The relay against a clustered central broker: three NATS 2.9 nodes (Debian `nats-server`)
//! with JetStream (sessions and messages replicated three times) and the MQTT listener on
//! each, the relay on `protocol = "3.1.1"` with `endpoints` listing the three nodes. Nodes are
//! killed (SIGKILL), restarted, and restarted one after another while an iPad publishes, and
//! every message the relay acknowledged to the iPad must reach a control subscriber.
//!
//! A message the control subscriber misses is looked up in what reached the cluster (a NATS
//! core subscriber on every node, which NATS hands each MQTT PUBLISH too): reached but not
//! delivered is the cluster's loss (NATS 2.9 loses a QoS 1 subscriber's messages when its
//! JetStream consumer times out under load) and is reported; never reached fails the test.
//!
//! Duplicates are counted by payload sequence (3.1.1 carries no `trainrelay-msg-id`) and split
//! by who caused them where the wire tells: a copy NATS redelivers from a subscriber's session
//! carries DUP (its own redelivery); a copy without DUP is a second stored message or a
//! redelivery NATS did not flag. The relay's share is at most its `duplicates_resent` counter
//! (what it sent again after a lost connection), so unflagged copies beyond that are NATS's.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use trainrelay_testkit::nats_core;
use trainrelay_testkit::netns::fault_config;
use trainrelay_testkit::ops::{eventually, query};
use trainrelay_testkit::*;

/// A node's MQTT ack wait: how long NATS waits for a subscriber's PUBACK before redelivering
/// (default 30 s; shorter here so a redelivery is seen within the test).
const ACK_WAIT: &str = "5s";
const QUIET: Duration = Duration::from_secs(30);
const RECOVERY: Duration = Duration::from_secs(120);

/// Three NATS servers with JetStream per test are heavy on a 2-core machine: the tests of
/// this file take turns, so a node's JetStream timeouts come from the faults, not the load.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Node {
    name: String,
    /// NATS client port (for the JetStream witness).
    client: u16,
    mqtt: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.mqtt)
    }
}

/// Three NATS nodes on their own ports and store directories, killed on drop.
struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    /// `None` (with a message; a failure under CI) when nats-server is not installed.
    async fn start(dir: &Path, test: &str) -> Option<Cluster> {
        let installed = Command::new("nats-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !require_or_skip(
            test,
            installed,
            "nats-server is not installed (apt-get install nats-server)",
        ) {
            return None;
        }
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let route_list = routes
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut nodes = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let dir = dir.join(format!("nats-{name}"));
            std::fs::create_dir_all(dir.join("js")).unwrap();
            let (client, mqtt) = (free_port(), free_port());
            let mut f = std::fs::File::create(dir.join("nats.conf")).unwrap();
            writeln!(
                f,
                "server_name: {name}\nlisten: 127.0.0.1:{client}\n\
                 jetstream {{\n  store_dir: \"{js}\"\n}}\n\
                 mqtt {{\n  listen: 127.0.0.1:{mqtt}\n  ack_wait: \"{ACK_WAIT}\"\n}}\n\
                 cluster {{\n  name: trainrelay_test\n  listen: 127.0.0.1:{route}\n  \
                 routes: [{route_list}]\n}}\n",
                js = dir.join("js").display()
            )
            .unwrap();
            nodes.push(Node {
                name,
                client,
                mqtt,
                dir,
                child: None,
            });
        }
        let mut cluster = Cluster { nodes };
        for i in 0..3 {
            cluster.spawn(i);
        }
        for i in 0..3 {
            cluster.wait_ready(i).await;
        }
        Some(cluster)
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "{} already running", node.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.dir.join("nats.log"))
            .unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(node.dir.join("nats.conf"))
            // NATS may write stray files (consumer metadata) into its working directory.
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start nats-server");
        node.child = Some(child);
    }

    /// (Re)starts node `i` and waits until it serves MQTT sessions.
    async fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.wait_ready(i).await;
    }

    /// Waits until node `i` takes a persistent MQTT session and a QoS 1 subscription: that
    /// needs the JetStream meta leader and the session streams, not just the listener.
    async fn wait_ready(&self, i: usize) {
        wait_sessions(self.nodes[i].mqtt, &self.nodes[i].name, RECOVERY).await;
    }

    fn signal(&mut self, i: usize, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.nodes[i].child {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// kill -9.
    fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (what a rolling restart does) and wait for the exit.
    fn stop(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGTERM);
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.wait();
        }
    }

    fn endpoints(&self) -> String {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("\"{}\"", n.url()))
            .collect();
        format!("endpoints = [{}]", urls.join(", "))
    }

    /// Which node an endpoint URL of the status report names.
    fn node_of(&self, endpoint: &str) -> Option<usize> {
        self.nodes
            .iter()
            .position(|n| endpoint.contains(&format!(":{}", n.mqtt)))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            // A stopped (SIGSTOP) node dies of SIGKILL too.
            self.kill(i);
        }
        if std::thread::panicking() {
            for n in &self.nodes {
                let log = std::fs::read_to_string(n.dir.join("nats.log")).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("--- {} log (last 40 lines) ---", n.name);
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// What a control subscriber received: copies per sequence number, and how many copies
/// carried DUP (NATS's own redelivery).
#[derive(Default)]
struct Tally {
    copies: HashMap<u64, u32>,
    flagged: usize,
}

impl Tally {
    fn add(&mut self, p: &rumqttc::Publish, tag: &str) {
        let text = String::from_utf8_lossy(&p.payload);
        if let Some(seq) = text
            .strip_prefix(&format!("{tag}-"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            let n = self.copies.entry(seq).or_default();
            *n += 1;
            if *n > 1 && p.dup {
                self.flagged += 1;
            }
        }
    }

    fn unique(&self) -> usize {
        self.copies.len()
    }

    fn duplicates(&self) -> usize {
        self.copies.values().map(|n| (*n - 1) as usize).sum()
    }

    /// "d duplicates (f flagged DUP by NATS, u unflagged; the relay resent r)".
    fn describe(&self, resent: u64) -> String {
        let unflagged = self.duplicates() - self.flagged;
        let relay = unflagged.min(resent as usize);
        format!(
            "{} duplicates: {} flagged DUP (NATS's redelivery), {unflagged} unflagged; the relay \
             resent {resent} after lost connections, so at most {relay} are the relay's and at \
             least {} NATS's",
            self.duplicates(),
            self.flagged,
            self.duplicates() - relay
        )
    }

    fn missing(&self, n: u64) -> Vec<u64> {
        (0..n).filter(|i| !self.copies.contains_key(i)).collect()
    }
}

/// Receives until every sequence below `n` arrived or `QUIET` passed without a message.
async fn drain_until_complete(control: &mut V4Client, tally: &mut Tally, tag: &str, n: u64) {
    while (tally.unique() as u64) < n {
        match tokio::time::timeout(QUIET, control.messages.recv()).await {
            Ok(Some(p)) => tally.add(&p, tag),
            _ => break,
        }
    }
    // Whatever else is already here (late duplicates) counts too.
    while let Ok(p) = control.messages.try_recv() {
        tally.add(&p, tag);
    }
}

/// What reached the cluster on the train's uplink topics: a NATS core subscriber on every
/// node (at most one node is down at a time, so one of them sees each message).
struct Witness {
    received: mpsc::UnboundedReceiver<Vec<u8>>,
    followers: Vec<tokio::task::JoinHandle<()>>,
    seen: HashMap<String, HashSet<u64>>,
}

impl Drop for Witness {
    fn drop(&mut self) {
        for f in &self.followers {
            f.abort();
        }
    }
}

impl Witness {
    /// Subscribes on every node and waits until a marker published over MQTT reached each.
    async fn start(cluster: &Cluster) -> Witness {
        let (tx, mut received) = mpsc::unbounded_channel();
        let mut followers = Vec::new();
        for (i, node) in cluster.nodes.iter().enumerate() {
            let (one, mut heard) = mpsc::unbounded_channel();
            followers.push(tokio::spawn(nats_core::follow(
                node.client,
                "trains.T1.up.>".to_string(),
                one,
            )));
            let tx = tx.clone();
            followers.push(tokio::spawn(async move {
                while let Some(p) = heard.recv().await {
                    let _ = tx.send(p);
                }
            }));
            // Core subscriptions propagate asynchronously: repeat the marker until it shows.
            let marker = format!("witness-{i}");
            let deadline = Instant::now() + RECOVERY;
            'ready: loop {
                publish_on(cluster, i, "witness", "trains/T1/up/witness", &marker).await;
                let wait = Instant::now() + Duration::from_secs(1);
                while let Ok(Some(p)) = tokio::time::timeout_at(wait.into(), received.recv()).await
                {
                    if p == marker.as_bytes() {
                        break 'ready;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "no NATS core subscriber on {}",
                    node.name
                );
            }
        }
        Witness {
            received,
            followers,
            seen: HashMap::new(),
        }
    }

    /// Which of messages `0..n` of `tag` never reached the cluster.
    fn never_received(&mut self, tag: &str, n: u64) -> Vec<u64> {
        while let Ok(p) = self.received.try_recv() {
            let text = String::from_utf8_lossy(&p);
            if let Some((t, s)) = text.rsplit_once('-') {
                if let Ok(s) = s.parse() {
                    self.seen.entry(t.to_string()).or_default().insert(s);
                }
            }
        }
        let seen = self.seen.get(tag);
        (0..n)
            .filter(|s| !seen.is_some_and(|v| v.contains(s)))
            .collect()
    }
}

/// Fails for a message that never reached the cluster; returns how many reached it but not
/// the control subscriber (the cluster's own loss).
fn assert_complete(tally: &Tally, witness: &mut Witness, tag: &str, n: u64) -> usize {
    let missing = tally.missing(n);
    let never_reached = witness.never_received(tag, n);
    assert!(
        never_reached.is_empty(),
        "{tag}: {} of {n} acknowledged messages never reached the cluster, first {:?}",
        never_reached.len(),
        &never_reached[..never_reached.len().min(10)]
    );
    if !missing.is_empty() {
        println!(
            "{tag}: {} messages reached the cluster but not the control subscriber, first {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
    }
    missing.len()
}

/// The status report's per-connection endpoints (connected ones only).
fn connected_endpoints(relay: &Relay) -> Vec<String> {
    let status = query(&relay.dir.join("status.sock"), "status");
    status["status"]["uplink"]["connections"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"] == "connected" || c["state"] == "draining")
        .filter_map(|c| c["endpoint"].as_str().map(str::to_string))
        .collect()
}

fn counters(relay: &Relay) -> serde_json::Value {
    query(&relay.dir.join("status.sock"), "status")["status"]["counters"].clone()
}

/// Waits until all `connections` uplink connections are connected, none to `avoid`; returns
/// the node each is on.
async fn wait_connected(
    relay: &Relay,
    cluster: &Cluster,
    connections: usize,
    avoid: Option<usize>,
) -> Vec<usize> {
    eventually(RECOVERY, "every uplink connection on a live node", || {
        let nodes: Vec<usize> = connected_endpoints(relay)
            .iter()
            .filter_map(|e| cluster.node_of(e))
            .collect();
        (nodes.len() == connections && !avoid.is_some_and(|a| nodes.contains(&a))).then_some(nodes)
    })
    .await
}

/// Publishes one QoS 1 message from a fresh client on node `i` until a PUBACK comes back:
/// NATS sends none for a message whose JetStream write timed out (a stream leader frozen or
/// being re-elected), so a publisher has to send it again.
async fn publish_on(cluster: &Cluster, i: usize, id: &str, topic: &str, payload: &str) {
    let deadline = Instant::now() + RECOVERY;
    loop {
        // A node busy with leader elections may not answer a CONNECT in time either.
        let Some(mut c) =
            V4Client::try_connect(cluster.nodes[i].mqtt, id, true, Duration::from_secs(10)).await
        else {
            assert!(Instant::now() < deadline, "no CONNACK from node {i}");
            continue;
        };
        c.client
            .publish(
                topic,
                rumqttc::QoS::AtLeastOnce,
                false,
                payload.as_bytes().to_vec(),
            )
            .await
            .unwrap();
        if let Ok(Some(_)) = tokio::time::timeout(Duration::from_secs(10), c.acks.recv()).await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no PUBACK for {payload:?} on {topic}"
        );
    }
}

/// Drains the control client until `0..n` arrived; if some are missing, asks the relay to
/// reconnect (`trainrelay status --reconnect`) and drains again. Returns how many arrived
/// only after the reconnect (messages NATS never acknowledged — a JetStream write that
/// timed out gets no PUBACK — stay in flight on a live connection until it is replaced) and
/// how many reached the cluster but never the control subscriber.
async fn drain_complete(
    relay: &Relay,
    control: &mut V4Client,
    witness: &mut Witness,
    tally: &mut Tally,
    tag: &str,
    n: u64,
) -> (usize, usize) {
    drain_until_complete(control, tally, tag, n).await;
    let stuck = tally.missing(n).len();
    if stuck > 0 {
        let answer = query(&relay.dir.join("status.sock"), "reconnect");
        assert_eq!(answer["ok"], true, "{answer}");
        drain_until_complete(control, tally, tag, n).await;
    }
    let undelivered = assert_complete(tally, witness, tag, n);
    (stuck - undelivered, undelivered)
}

/// Waits until the iPad receives a message with `payload` on `topic`.
async fn ipad_receives(ipad: &mut V5Client, topic: &str, payload: &str) {
    let deadline = Instant::now() + RECOVERY;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ipad.messages.recv()).await {
            Ok(Some(p)) if p.topic == topic.as_bytes() && p.payload == payload.as_bytes() => return,
            Ok(Some(_)) => {}
            _ => panic!("the iPad never received {payload:?} on {topic}"),
        }
    }
}

fn cluster_config(cluster: &Cluster, keep_alive: &str, connections: usize) -> String {
    let url = "mqtt://127.0.0.1:1";
    fault_config(
        url,
        keep_alive,
        &format!("protocol = \"3.1.1\"\nconnections = {connections}"),
        "",
    )
    .replace(&format!("url = \"{url}\""), &cluster.endpoints())
}

/// A control subscriber with a persistent session on node `i`, subscribed to the train's
/// uplink topics; returns once a marker published on another node reached it.
async fn control_on(cluster: &Cluster, i: usize) -> V4Client {
    let mut control = V4Client::connect(cluster.nodes[i].mqtt, "control", false).await;
    control.subscribe("trains/T1/up/#").await;
    let other = (i + 1) % 3;
    publish_on(cluster, other, "marker", "trains/T1/up/marker", "marker").await;
    let got = control.collect(1, QUIET).await;
    assert_eq!(
        got.first().map(|p| &p.payload[..]),
        Some(&b"marker"[..]),
        "the control subscription does not work across the cluster"
    );
    control
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_connected_node_loses_nothing_and_keeps_the_session() {
    let test = "killing_the_connected_node_loses_nothing_and_keeps_the_session";
    let dir = tempfile::tempdir().unwrap();
    let _one_cluster_at_a_time = ONE_CLUSTER.lock().await;
    let Some(mut cluster) = Cluster::start(dir.path(), test).await else {
        return;
    };
    let mut witness = Witness::start(&cluster).await;
    // One connection, so "the node the relay is on" is one node. A long keep-alive: the
    // failover below is the kill's doing, not a dead-link deadline's.
    let relay = Relay::start(dir.path(), &cluster_config(&cluster, "30s", 1)).await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", false).await;
    ipad.subscribe("down/#").await;
    let on = wait_connected(&relay, &cluster, 1, None).await[0];
    let other = (on + 1) % 3;
    // The control subscriber sits on a node that survives.
    let mut control = control_on(&cluster, (on + 2) % 3).await;
    // The downlink subscription works before the kill.
    publish_on(&cluster, other, "desk-0", "trains/T1/down/pre", "pre").await;
    ipad_receives(&mut ipad, "down/pre", "pre").await;

    // A backlog in the middle of its drain.
    const N: u64 = 3000;
    let all = payloads("k", N);
    ipad.publish_acked("up/x", all[..1000].to_vec(), None).await;
    let mut tally = Tally::default();
    while tally.unique() < 100 {
        let p = tokio::time::timeout(QUIET, control.messages.recv())
            .await
            .expect("the drain never started")
            .expect("control client ended");
        tally.add(&p, "k");
    }
    // The node freezes: what the relay writes now stays unacknowledged, and a downlink
    // message published meanwhile is queued in the relay's session but cannot reach it.
    cluster.signal(on, nix::sys::signal::Signal::SIGSTOP);
    publish_on(
        &cluster,
        other,
        "desk-1",
        "trains/T1/down/pending",
        "pending",
    )
    .await;
    ipad.publish_acked("up/x", all[1000..2000].to_vec(), None)
        .await;
    let depth_at_kill = query(&relay.dir.join("status.sock"), "status")["status"]["store"]["depth"]
        .as_u64()
        .unwrap_or(0);
    cluster.kill(on);
    // The iPad keeps publishing through the failover.
    ipad.publish_acked("up/x", all[2000..].to_vec(), None).await;
    let moved_to = wait_connected(&relay, &cluster, 1, Some(on)).await[0];

    // The session survived: the message queued for it before the kill is redelivered, and a
    // message published on another node after the failover arrives.
    ipad_receives(&mut ipad, "down/pending", "pending").await;
    let third = 3 - on - moved_to;
    publish_on(&cluster, third, "desk-2", "trains/T1/down/post", "post").await;
    ipad_receives(&mut ipad, "down/post", "post").await;

    let (stuck, undelivered) =
        drain_complete(&relay, &mut control, &mut witness, &mut tally, "k", N).await;
    let resent = counters(&relay)["duplicates_resent"].as_u64().unwrap_or(0);
    println!(
        "NATS cluster, kill -9 of {} (the relay's node) with {depth_at_kill} waiting: relay moved \
         to {}; {N} of {N} reached the cluster, {} delivered to the control subscriber \
         ({stuck} only after a forced reconnect), {}; pending and post-failover downlink \
         delivered",
        cluster.nodes[on].name,
        cluster.nodes[moved_to].name,
        N as usize - undelivered,
        tally.describe(resent),
    );

    // The killed node comes back; the relay and the cluster carry on without loss.
    cluster.restart(on).await;
    let resent_before = counters(&relay)["duplicates_resent"].as_u64().unwrap_or(0);
    let mut tally2 = Tally::default();
    ipad.publish_acked("up/x", payloads("r", 500), None).await;
    publish_on(&cluster, on, "desk-3", "trains/T1/down/back", "back").await;
    ipad_receives(&mut ipad, "down/back", "back").await;
    let (stuck, undelivered) =
        drain_complete(&relay, &mut control, &mut witness, &mut tally2, "r", 500).await;
    let resent = counters(&relay)["duplicates_resent"]
        .as_u64()
        .unwrap_or(0)
        .saturating_sub(resent_before);
    println!(
        "after {} restarted: 500 of 500 reached the cluster, {} delivered ({stuck} only after a forced \
         reconnect), {}",
        cluster.nodes[on].name,
        500 - undelivered,
        tally2.describe(resent),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_the_cluster_loses_nothing() {
    let test = "a_rolling_restart_of_the_cluster_loses_nothing";
    let dir = tempfile::tempdir().unwrap();
    let _one_cluster_at_a_time = ONE_CLUSTER.lock().await;
    let Some(mut cluster) = Cluster::start(dir.path(), test).await else {
        return;
    };
    let mut witness = Witness::start(&cluster).await;
    let mut control = control_on(&cluster, 2).await;
    // The default four connections, each failing over on its own.
    let relay = Relay::start(dir.path(), &cluster_config(&cluster, "5s", 4)).await;
    let mut ipad = V5Client::connect(relay.local_port, "ipad", false).await;
    ipad.subscribe("down/#").await;
    wait_connected(&relay, &cluster, 4, None).await;

    let mut tally = Tally::default();
    let mut sent = 0u64;
    let mut stuck = 0;
    let mut undelivered = 0;
    const BATCH: u64 = 400;
    for i in 0..3 {
        // Load before and during each node's restart.
        let batch: Vec<Vec<u8>> = (sent..sent + BATCH)
            .map(|s| format!("g-{s}").into_bytes())
            .collect();
        ipad.publish_acked("up/x", batch, None).await;
        sent += BATCH;
        cluster.stop(i);
        let batch: Vec<Vec<u8>> = (sent..sent + BATCH)
            .map(|s| format!("g-{s}").into_bytes())
            .collect();
        ipad.publish_acked("up/x", batch, None).await;
        sent += BATCH;
        wait_connected(&relay, &cluster, 4, Some(i)).await;
        cluster.restart(i).await;
        // Recovery: the relay's connections are all up, a downlink message published on the
        // restarted node reaches the iPad, and what was sent so far reached the control client
        // (which rides out its own node's restart on its persistent session).
        wait_connected(&relay, &cluster, 4, None).await;
        let payload = format!("roll-{i}");
        publish_on(
            &cluster,
            i,
            &format!("desk-{i}"),
            "trains/T1/down/roll",
            &payload,
        )
        .await;
        ipad_receives(&mut ipad, "down/roll", &payload).await;
        let (s, u) =
            drain_complete(&relay, &mut control, &mut witness, &mut tally, "g", sent).await;
        stuck += s;
        undelivered = u;
    }
    let resent = counters(&relay)["duplicates_resent"].as_u64().unwrap_or(0);
    println!(
        "NATS cluster rolling restart (SIGTERM, one node at a time), 4 connections: {sent} of \
         {sent} reached the cluster, {} delivered to the control subscriber ({stuck} only \
         after a forced reconnect), {}",
        sent as usize - undelivered,
        tally.describe(resent),
    );
}

//! Quick measurements of the local broker, run with `--release`:
//!
//! - `cargo run --release --example broker_bench -- latency [N]`: N sequential QoS 0
//!   publish→deliver round trips between two local 3.1.1 clients; prints median and p99.
//! - `cargo run --release --example broker_bench -- throughput [N] [QOS]`: one publisher sends N
//!   messages, one subscriber receives them; prints messages/s.
//! - `cargo run --release --example broker_bench -- serve ADDR`: only the broker, with a deep
//!   queue, to be measured from another process with `BENCH_ADDR=ADDR`.
//! - `cargo run --release --example broker_bench -- hold ADDR N SECS`: connects N clients to a
//!   broker at ADDR, each with a subscription, and holds them (for measuring the broker's RSS).
//!
//! The broker for `latency` and `throughput` runs in this process on a temporary store, unless
//! `BENCH_ADDR=host:port` names another broker to measure the same way.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use trainrelay::broker::{Broker, BrokerConfig, Hooks};
use trainrelay::store::{Db, Synchronous};

struct NoHooks;
impl Hooks for NoHooks {}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("latency");
    match mode {
        "hold" => {
            let addr: std::net::SocketAddr = args.get(1).map_or("127.0.0.1:1883", |s| s).parse()?;
            let n: usize = args.get(2).map_or(Ok(50), |s| s.parse())?;
            let secs: u64 = args.get(3).map_or(Ok(30), |s| s.parse())?;
            let mut clients = Vec::new();
            for i in 0..n {
                let (c, mut el) = client(addr, &format!("hold-{i}"));
                c.subscribe(format!("ipad/{i}/#"), QoS::AtLeastOnce).await?;
                tokio::spawn(async move { while el.poll().await.is_ok() {} });
                clients.push(c);
            }
            println!("{n} clients connected; holding for {secs}s");
            tokio::time::sleep(Duration::from_secs(secs)).await;
            Ok(())
        }
        "serve" => {
            // The broker alone in this process, to be measured from another one.
            let listen: std::net::SocketAddr =
                args.get(1).map_or("127.0.0.1:1883", |s| s).parse()?;
            let dir = std::env::temp_dir().join(format!("broker-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let (db, _thread) = Db::open(&dir.join("bench.db"), Synchronous::Normal)?;
            let config = BrokerConfig {
                listen,
                max_queued_messages: 1_000_000,
                ..BrokerConfig::default()
            };
            let broker = Broker::bind(config, db, Arc::new(NoHooks)).await?;
            let (trigger, shutdown) = trainrelay::shutdown::channel();
            tokio::spawn(async move {
                let _ = tokio::signal::ctrl_c().await;
                trigger.trigger();
            });
            broker.run(shutdown).await?;
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        }
        _ if std::env::var("BENCH_ADDR").is_ok() => {
            // Same measurement against another broker (e.g. Mosquitto), for a ratio.
            let addr: std::net::SocketAddr = std::env::var("BENCH_ADDR")?.parse()?;
            let n: usize = args.get(1).map_or(Ok(0), |s| s.parse())?;
            if mode == "throughput" {
                let qos = match args.get(2).map(String::as_str) {
                    Some("0") => QoS::AtMostOnce,
                    _ => QoS::AtLeastOnce,
                };
                throughput(addr, if n == 0 { 50_000 } else { n }, qos).await
            } else {
                latency(addr, if n == 0 { 2000 } else { n }).await
            }
        }
        _ => {
            let dir = std::env::temp_dir().join(format!("broker-bench-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let (db, _thread) = Db::open(&dir.join("bench.db"), Synchronous::Normal)?;
            // A queue deep enough that the subscriber never loses messages to the drop policy,
            // so the figure is what the broker sustains end to end.
            let config = BrokerConfig {
                listen: "127.0.0.1:0".parse()?,
                max_queued_messages: 1_000_000,
                ..BrokerConfig::default()
            };
            let broker = Broker::bind(config, db, Arc::new(NoHooks)).await?;
            let addr = broker.local_addr();
            let handle = broker.handle();
            let (trigger, shutdown) = trainrelay::shutdown::channel();
            let task = tokio::spawn(broker.run(shutdown));
            let n: usize = args.get(1).map_or(Ok(0), |s| s.parse())?;
            if mode == "throughput" {
                let qos = match args.get(2).map(String::as_str) {
                    Some("0") => QoS::AtMostOnce,
                    _ => QoS::AtLeastOnce,
                };
                throughput(addr, if n == 0 { 50_000 } else { n }, qos).await?;
            } else {
                latency(addr, if n == 0 { 2000 } else { n }).await?;
            }
            let stats = handle.stats();
            println!(
                "broker: in {} out {} dropped (queue full) {}",
                stats.messages_in, stats.messages_out, stats.dropped_queue_full
            );
            trigger.trigger();
            let _ = task.await;
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        }
    }
}

fn client(addr: std::net::SocketAddr, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_keep_alive(Duration::from_secs(30));
    o.set_inflight(100);
    AsyncClient::new(o, 1000)
}

async fn subscriber(
    addr: std::net::SocketAddr,
    qos: QoS,
) -> anyhow::Result<(AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Instant>)> {
    let (c, mut el) = client(addr, "bench-sub");
    c.subscribe("bench/#", qos).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let mut ready_tx = Some(ready_tx);
    tokio::spawn(async move {
        while let Ok(ev) = el.poll().await {
            match ev {
                Event::Incoming(Packet::SubAck(_)) => {
                    if let Some(t) = ready_tx.take() {
                        let _ = t.send(());
                    }
                }
                Event::Incoming(Packet::Publish(_)) if tx.send(Instant::now()).is_err() => break,
                _ => {}
            }
        }
    });
    ready_rx.await?;
    Ok((c, rx))
}

async fn latency(addr: std::net::SocketAddr, n: usize) -> anyhow::Result<()> {
    let (_sub, mut rx) = subscriber(addr, QoS::AtMostOnce).await?;
    let (p, mut el) = client(addr, "bench-pub");
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let t0 = Instant::now();
        p.publish("bench/lat", QoS::AtMostOnce, false, vec![0u8; 64])
            .await?;
        let t1 = rx
            .recv()
            .await
            .ok_or_else(|| anyhow::anyhow!("subscriber gone"))?;
        if i >= 100 {
            samples.push(t1.duration_since(t0));
        }
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[samples.len() * 99 / 100];
    println!(
        "latency over {n} QoS 0 round trips (64 B): median {:.1} µs, p99 {:.1} µs",
        median.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    Ok(())
}

async fn throughput(addr: std::net::SocketAddr, n: usize, qos: QoS) -> anyhow::Result<()> {
    let (_sub, mut rx) = subscriber(addr, qos).await?;
    let (p, mut el) = client(addr, "bench-pub");
    tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let t0 = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            if p.publish("bench/tp", qos, false, vec![0u8; 64])
                .await
                .is_err()
            {
                break;
            }
        }
        p
    });
    let mut got = 0;
    let mut last = t0;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(t)) => {
                got += 1;
                last = t;
            }
            _ => break,
        }
    }
    let _ = sender.await;
    let secs = last.duration_since(t0).as_secs_f64();
    println!(
        "throughput: {got}/{n} messages of 64 B at QoS {} in {secs:.2} s = {:.0} msg/s",
        qos as u8,
        got as f64 / secs
    );
    Ok(())
}

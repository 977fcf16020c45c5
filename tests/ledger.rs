//! The ledger adds up (docs/operations.md, "Ledger"): per route, what entered the uplink queue
//! equals what was delivered, dropped (by reason) and is still in the store, after every one
//! of 20 kill -9s at random moments of traffic. Real Mosquitto, the real binary, the real
//! SQLite file read after each kill.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use trainrelay_testkit::{relay_config, store_section, Central, Relay, V5Client};

/// A small deterministic generator; the seed is printed so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Per route: (accepted + requeued, delivered + dropped, rows in the table).
fn books(store: &std::path::Path) -> BTreeMap<String, (i64, i64, i64)> {
    let db = rusqlite::Connection::open(store).expect("open the relay's store");
    let mut out = BTreeMap::new();
    let mut st = db
        .prepare(
            "SELECT route, accepted + requeued, \
             delivered + expired + store_full + conflated + dead_letter + corrupt, \
             (SELECT COUNT(*) FROM uplink_queue q WHERE q.route = l.route) \
             FROM route_ledger l",
        )
        .expect("the ledger table");
    let rows = st
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?, r.get(3)?)))
        })
        .expect("read the ledger");
    for row in rows {
        let (route, figures) = row.expect("ledger row");
        out.insert(route, figures);
    }
    // Every route with rows has a ledger row.
    let mut st = db
        .prepare("SELECT DISTINCT route FROM uplink_queue")
        .expect("routes");
    let routes: Vec<String> = st
        .query_map([], |r| r.get(0))
        .expect("routes")
        .map(|r| r.expect("route"))
        .collect();
    for route in routes {
        assert!(
            out.contains_key(&route),
            "route {route} has rows but no ledger"
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_adds_up_after_every_kill() {
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    println!("seed {seed}");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut central = Central::start(dir.path()).await;
    // A store small enough to fill while central is away (drop_oldest), a route that
    // conflates, one whose messages expire quickly, and the default one.
    let extra = format!(
        "{}\n[[route]]\nname = \"state\"\ndirection = \"up\"\nlocal = \"state/#\"\nremote = \"trains/T1/state/#\"\nconflate = \"latest\"\n\n[[route]]\nname = \"brief\"\ndirection = \"up\"\nlocal = \"brief/#\"\nremote = \"trains/T1/brief/#\"\nttl = \"300ms\"\npriority = 8\n",
        store_section("max_bytes = \"24KiB\"\nsweep_interval = \"200ms\"")
    );
    let mut relay = Relay::start(dir.path(), &relay_config(&central.url(), &extra)).await;
    let store = relay.dir.join("store.db");
    let mut seen: BTreeMap<String, i64> = BTreeMap::new();
    let started = Instant::now();
    for round in 0..20 {
        if round > 0 {
            relay.restart().await;
        }
        // Central comes and goes, so rows are delivered, wait, and get dropped.
        match rng.below(3) {
            0 if central.is_running() => central.stop(),
            1 if !central.is_running() => central.restart().await,
            _ => {}
        }
        let mut ipad = V5Client::connect(relay.local_port, "ipad", true).await;
        let traffic = tokio::spawn(async move {
            for i in 0u64.. {
                let topic = match i % 4 {
                    0 => format!("up/log/{}", i % 7),
                    1 => format!("state/speed/{}", i % 3),
                    2 => format!("brief/pos/{}", i % 5),
                    _ => "up/diag".to_string(),
                };
                let body = vec![b'x'; 100 + (i as usize * 37) % 300];
                ipad.publish_reasons(&topic, [body]).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(100 + rng.below(900))).await;
        relay.kill();
        traffic.abort();
        let _ = traffic.await;

        for (route, (came, left, in_store)) in books(&store) {
            assert_eq!(
                came,
                left + in_store,
                "round {round}, route {route}: {came} in != {left} out + {in_store} in the store"
            );
            let before = seen.insert(route.clone(), came).unwrap_or(0);
            assert!(came >= before, "route {route}: the ledger went back");
        }
    }
    println!(
        "20 kills in {:?}; accepted per route: {seen:?}",
        started.elapsed()
    );
    // Something of everything happened.
    let db = rusqlite::Connection::open(&store).unwrap();
    let (delivered, full, conflated, expired): (i64, i64, i64, i64) = db
        .query_row(
            "SELECT SUM(delivered), SUM(store_full), SUM(conflated), SUM(expired) FROM route_ledger",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    println!("delivered {delivered}, store_full {full}, conflated {conflated}, expired {expired}");
    assert!(delivered > 0 && conflated > 0, "too little happened");

    // The running daemon reports the same books.
    relay.restart().await;
    if !central.is_running() {
        central.restart().await;
    }
    let out = std::process::Command::new(trainrelay_testkit::relay_binary())
        .args([
            "status",
            "--config",
            relay.config_path.to_str().unwrap(),
            "--json",
        ])
        .output()
        .expect("trainrelay status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json is JSON");
    let routes = doc["status"]["ledger"]["routes"]
        .as_array()
        .expect("ledger routes");
    assert!(!routes.is_empty());
    for r in routes {
        let n = |k: &str| r[k].as_u64().unwrap();
        let dropped: u64 = r["dropped"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .sum();
        assert_eq!(
            n("accepted") + n("requeued"),
            n("delivered") + dropped + n("in_store"),
            "{r}"
        );
    }
}

//! Runs the local broker alone, for interoperability suites such as Eclipse Paho's
//! `interoperability/client_test.py` and `client_test5.py`.
//!
//! Usage: `cargo run --example paho_broker -- 127.0.0.1:1883 [store.db]`
//!
//! The Paho suites expect a subscription to `test/nosubscribe` to be refused; that policy
//! lives in this example's hooks, not in the broker.
//!
//! The suites' `unittest.main()` re-parses `sys.argv` and rejects `-p`, so run them through a
//! small driver that sets the module globals their `__main__` block would set, e.g.:
//!
//! ```text
//! import sys, unittest
//! sys.path.insert(0, "<suite>/interoperability")
//! t = __import__(sys.argv[1])            # client_test or client_test5
//! t.host, t.port = "127.0.0.1", int(sys.argv[2])
//! pre = "client_test5/" if sys.argv[1] == "client_test5" else ""
//! t.topics = [pre + x for x in ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")]
//! t.wildtopics = [pre + x for x in ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")]
//! t.nosubscribe_topics = ("test/nosubscribe",)
//! t.topic_prefix = pre
//! unittest.main(module=t, argv=[sys.argv[1], "-v"])
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use trainrelay::broker::{Broker, BrokerConfig, ClientInfo, Hooks};
use trainrelay::store::{Db, Synchronous};

struct PahoHooks;

impl Hooks for PahoHooks {
    fn may_subscribe(&self, _client: &ClientInfo, filter: &str) -> bool {
        filter != "test/nosubscribe"
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .unwrap_or_else(|| "127.0.0.1:1883".into())
        .parse()?;
    let dir = tempfile_dir()?;
    let path = args
        .next()
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.join("paho.db"));
    let (db, thread) = Db::open(&path, Synchronous::Normal)?;
    let config = BrokerConfig {
        listen,
        max_session_expiry: Duration::from_secs(3600),
        ..BrokerConfig::default()
    };
    let broker = Broker::bind(config, db, Arc::new(PahoHooks)).await?;
    let (trigger, shutdown) = trainrelay::shutdown::channel();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        trigger.trigger();
    });
    broker.run(shutdown).await?;
    thread.join();
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("paho-broker-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

//! `trainrelay run`: wires the pieces together and owns their lifetimes.
//!
//! Start-up order: store, queue, local broker (bound), uplink; then READY. Shutdown on
//! SIGTERM/SIGINT: every task sees the shared signal, the local broker stops accepting and
//! closes its clients, the uplink says goodbye to the central broker, and the store's writer
//! finishes what was submitted before the process exits.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::auth::Auth;
use crate::broker::{Broker, BrokerConfig};
use crate::config::Config;
use crate::downlink::Downlink;
use crate::freshness::{Freshness, FreshnessCounters};
use crate::relay::RelayHooks;
use crate::route::Routes;
use crate::shutdown::{self, Shutdown};
use crate::store::queue::{Queue, QueueConfig};
use crate::store::Db;
use crate::uplink::{StatusHandle, Uplink};

/// How long tasks get to finish after the shutdown signal.
const GRACE: Duration = Duration::from_secs(5);

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;

    let (db, db_thread) = Db::open(&config.store.path, config.store.synchronous)?;
    let queue = Queue::open(
        db.clone(),
        QueueConfig {
            max_bytes: config.store.max_bytes.as_u64(),
            when_full: config.store.when_full,
        },
    )
    .await?;
    queue.set_starvation_every(config.store.starvation_every);
    let routes = Arc::new(Routes::from_config(&config));
    let freshness = Arc::new(Freshness::load(db.clone()).await?);
    let hooks = Arc::new(
        RelayHooks::new(routes.clone(), queue.clone(), &config.train_id)
            .with_freshness(freshness.clone())
            .with_device_prefix(&config.local.device_prefix)
            .with_auth(Arc::new(Auth::from_config(&config, &routes))),
    );
    let broker = Broker::bind(broker_config(&config), db.clone(), hooks).await?;
    let broker_handle = broker.handle();
    let credentials = read_credentials(&config)?;

    let (trigger, shutdown) = shutdown::channel();
    let status = StatusHandle::default();
    let downlink = Downlink::new(routes.clone(), broker.handle()).with_freshness(freshness.clone());
    let report = (queue.clone(), freshness, downlink.clone());
    let uplink = Uplink::new(
        &config.uplink,
        credentials,
        queue.clone(),
        downlink,
        routes.down_filters(),
        status.clone(),
    );
    log::info!(
        "trainrelay {} for train {}: iPads on {}, central broker {}, store {}",
        env!("CARGO_PKG_VERSION"),
        config.train_id,
        broker.local_addr(),
        config.uplink.url,
        config.store.path.display()
    );
    let tasks = vec![
        tokio::spawn(log_errors("local broker", broker.run(shutdown.clone()))),
        tokio::spawn(uplink.run(shutdown.clone())),
        tokio::spawn(sweep(
            queue.clone(),
            config.store.sweep_interval,
            shutdown.clone(),
        )),
    ];
    drop(queue);
    drop(db);
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    tokio::select! {
        _ = terminate.recv() => log::info!("SIGTERM: shutting down"),
        _ = interrupt.recv() => log::info!("SIGINT: shutting down"),
    }
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    trigger.trigger();
    for task in tasks {
        let abort = task.abort_handle();
        if tokio::time::timeout(GRACE, task).await.is_err() {
            log::warn!("a task did not stop within {GRACE:?}; aborting it");
            abort.abort();
        }
    }
    log_freshness_counters(&report.0, &report.1, &report.2);
    log_security_counters(&broker_handle);
    // It holds a store handle: the writer stops only once every handle is gone.
    drop(broker_handle);
    drop(report);
    // Every store handle is gone now: the writer drains its queue and stops.
    tokio::task::spawn_blocking(move || db_thread.join())
        .await
        .context("store writer")?;
    log::info!("stopped");
    Ok(())
}

async fn log_errors<E: std::fmt::Display>(
    what: &str,
    fut: impl std::future::Future<Output = Result<(), E>>,
) {
    if let Err(e) = fut.await {
        log::error!("{what}: {e}");
    }
}

/// Deletes expired rows now and then, so they do not hold space.
async fn sweep(queue: Queue, every: Duration, mut shutdown: Shutdown) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.recv() => return,
        }
        match queue.sweep_expired().await {
            Ok(0) => {}
            Ok(n) => log::info!("store: dropped {n} expired messages"),
            Err(e) => log::error!("store: sweeping expired messages failed: {e}"),
        }
    }
}

/// One line at shutdown with what the freshness rules removed, for the logs of a run.
fn log_freshness_counters(queue: &Queue, freshness: &Freshness, downlink: &Downlink) {
    let c = FreshnessCounters::collect(freshness, queue, downlink);
    log::info!(
        "freshness counters: suppressed={} (uplink {}, downlink {}), conflated={}, expired={} (uplink {}, downlink {})",
        c.suppressed_up + c.suppressed_down,
        c.suppressed_up,
        c.suppressed_down,
        c.conflated,
        c.expired_up + c.expired_down,
        c.expired_up,
        c.expired_down,
    );
}

/// One line at shutdown with what the local broker refused, for the logs of a run.
fn log_security_counters(broker: &crate::broker::BrokerHandle) {
    let s = broker.stats();
    log::info!(
        "local broker counters: refused_connections={} auth_failures={} bad_client_ids={} refused_per_address={} rate_limited={} protocol_errors={} denied_publish={} denied_subscribe={}",
        s.refused_connections,
        s.auth_failures,
        s.bad_client_ids,
        s.refused_per_address,
        s.rate_limited,
        s.protocol_errors,
        s.denied_publish,
        s.denied_subscribe,
    );
}

fn broker_config(config: &Config) -> BrokerConfig {
    let l = &config.local;
    BrokerConfig {
        listen: l.listen,
        max_connections: l.max_connections,
        max_packet_size: u32::try_from(l.max_packet_size.as_u64()).unwrap_or(u32::MAX),
        receive_maximum: l.receive_maximum,
        max_queued_messages: l.max_queued_messages,
        max_subscriptions: l.max_subscriptions,
        max_session_expiry: l.max_session_expiry,
        connect_timeout: l.connect_timeout,
        max_connections_per_address: l.max_connections_per_address,
        max_publish_rate: config.max_publish_rate(),
        ws_listen: l.ws_listen,
        tls: match (&l.tls_listen, &l.tls_cert, &l.tls_key) {
            (Some(listen), Some(cert), Some(key)) => Some(crate::broker::tls::TlsSettings {
                listen: *listen,
                cert: cert.clone(),
                key: key.clone(),
                client_ca: l.tls_client_ca.clone(),
            }),
            _ => None,
        },
    }
}

fn read_credentials(config: &Config) -> anyhow::Result<Option<(String, String)>> {
    let Some(user) = &config.uplink.username else {
        return Ok(None);
    };
    let password = match &config.uplink.password_file {
        Some(file) => std::fs::read_to_string(crate::config::secret_path(file))
            .with_context(|| format!("uplink.password_file {}", file.display()))?
            .lines()
            .next()
            .unwrap_or("")
            .to_string(),
        None => String::new(),
    };
    Ok(Some((user.clone(), password)))
}

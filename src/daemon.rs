//! `trainrelay run`: wires the pieces together and owns their lifetimes.
//!
//! Start-up order: store, queue, local broker (bound), uplink, status socket; then READY (so
//! `Type=notify` units order after a relay that accepts iPads and has its store open). SIGHUP
//! reloads the config (see `reload`). Shutdown on SIGTERM/SIGINT, in two steps: first the
//! local broker stops accepting and closes its clients, publishing the wills of those still
//! connected (they go through the store like any will), and the uplink, still running, gets up
//! to `FINAL_FLUSH` (2 s) to forward them; then every other task sees the shared signal, the
//! uplink says goodbye to the central broker, and the store's writer finishes what was
//! submitted before the process exits.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::auth::Auth;
use crate::broker::{Broker, BrokerConfig};
use crate::config::Config;
use crate::downlink::Downlink;
use crate::freshness::Freshness;
use crate::heartbeat::Heartbeat;
use crate::relay::RelayHooks;
use crate::reload::Reloader;
use crate::route::{Routes, SharedRoutes};
use crate::shutdown::{self, Shutdown};
use crate::store::queue::{Queue, QueueConfig, Shares};
use crate::store::Db;
use crate::uplink::{StatusHandle, Uplink};
use crate::watchdog::{self, Watchdog};

/// How long tasks get to finish after the shutdown signal.
const GRACE: Duration = Duration::from_secs(5);

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(config: Config) -> anyhow::Result<()> {
    run_from(config, None).await
}

/// Runs the daemon until SIGTERM or SIGINT; SIGHUP re-reads `file` (if any).
pub async fn run_from(config: Config, file: Option<PathBuf>) -> anyhow::Result<()> {
    let started = Instant::now();
    let started_ms = crate::clock::Stamp::now().wall_ms;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;

    let (db, db_thread) = Db::open(&config.store.path, config.store.synchronous)?;
    let routes = SharedRoutes::new(Routes::from_config(&config));
    let queue = Queue::open_shared(
        db.clone(),
        QueueConfig {
            max_bytes: config.store.max_bytes.as_u64(),
            when_full: config.store.when_full,
            urgent_reserve: config
                .store
                .urgent_reserve
                .of(config.store.max_bytes.as_u64()),
        },
        Shares::new(config.uplink.connections, routes.load().fifo_up_routes()),
    )
    .await?;
    queue.set_starvation_every(config.store.starvation_every);
    let freshness = Arc::new(Freshness::load(db.clone()).await?);
    let hooks = Arc::new(
        RelayHooks::new(routes.clone(), queue.clone(), &config.train_id)
            .with_freshness(freshness.clone())
            .with_device_prefix(&config.local.device_prefix)
            .with_auth(Arc::new(Auth::from_config(&config, &routes.load()))),
    );
    let broker = Broker::bind(broker_config(&config), db.clone(), hooks).await?;
    let credentials = read_credentials(&config)?;

    let (trigger, shutdown) = shutdown::channel();
    let status = StatusHandle::default();
    let downlink = Downlink::new(routes.clone(), broker.handle()).with_freshness(freshness.clone());
    let report = (queue.clone(), freshness, downlink.clone());
    let broker_handle = broker.handle();
    let endpoint = crate::uplink::endpoint::redact_url(&config.uplink.url);
    let sources = crate::status::Sources {
        train_id: config.train_id.clone(),
        endpoint: endpoint.clone(),
        listen: broker.local_addr().to_string(),
        max_bytes: config.store.max_bytes.as_u64(),
        started,
        started_ms,
        uplink: status.clone(),
        queue: queue.clone(),
        broker: broker.handle(),
        downlink: downlink.clone(),
        freshness: report.1.clone(),
    };
    let uplink = Uplink::new(
        &config.uplink,
        credentials,
        queue.clone(),
        downlink,
        routes.load().down_filters(),
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
    // A status socket that cannot be set up is reported, but does not keep the relay from
    // carrying messages.
    let status_server =
        match crate::status::server::StatusServer::bind(&config.status, sources.clone()) {
            Ok(server) => {
                log::info!("status socket: {}", server.path().display());
                Some(server)
            }
            Err(e) => {
                log::error!("{e}; `trainrelay status` will not work");
                None
            }
        };
    let (detail_interval, detail_rx) = tokio::sync::watch::channel(config.status.detail_interval);
    // The local broker stops first, on its own signal: the wills of the iPads it closes go
    // through the store to the uplink, which is still running then.
    let (broker_trigger, broker_shutdown) = shutdown::channel();
    let mut broker_task = tokio::spawn(log_errors("local broker", broker.run(broker_shutdown)));
    let broker_hb = Heartbeat::new("local broker");
    let store_hb = Heartbeat::new("store");
    let mut tasks = vec![
        tokio::spawn(watchdog::probe_broker(
            broker_handle.clone(),
            broker_task.abort_handle(),
            broker_hb.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(watchdog::probe_store(
            db.clone(),
            store_hb.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(
            Watchdog {
                status: status.clone(),
                endpoint,
                // One per uplink connection.
                heartbeats: status
                    .heartbeats()
                    .into_iter()
                    .chain([broker_hb, store_hb])
                    .collect(),
            }
            .run(shutdown.clone()),
        ),
        tokio::spawn(
            crate::status::detail::Detail {
                topic: format!("{}/detail", config.uplink.status_topic),
                sources,
                interval: detail_rx,
            }
            .run(shutdown.clone()),
        ),
        tokio::spawn(uplink.run(shutdown.clone())),
        tokio::spawn(sweep(
            queue.clone(),
            config.store.sweep_interval,
            shutdown.clone(),
        )),
    ];
    if let Some(server) = status_server {
        tasks.push(tokio::spawn(server.run(shutdown.clone())));
    }
    let flush_queue = queue.clone();
    drop(queue);
    drop(db);
    watchdog::notify("READY=1");
    log::info!(
        "ready {:.0} ms after start",
        started.elapsed().as_secs_f64() * 1000.0
    );

    let mut reloader = Reloader {
        file,
        current: config.clone(),
        routes,
        detail_interval,
    };
    loop {
        tokio::select! {
            _ = terminate.recv() => { log::info!("SIGTERM: shutting down"); break; }
            _ = interrupt.recv() => { log::info!("SIGINT: shutting down"); break; }
            _ = hangup.recv() => {
                let mut reloading = "RELOADING=1".to_string();
                if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
                    reloading.push_str(&format!("\n{now}"));
                }
                watchdog::notify(&reloading);
                reloader.reload();
                // A renewed TLS certificate for the iPads' listener; on error the old one stays.
                if let Err(e) = broker_handle.reload_tls() {
                    log::error!("SIGHUP: {e}; keeping the current TLS certificate");
                }
                watchdog::notify("READY=1");
            }
        }
    }
    watchdog::notify("STOPPING=1");
    broker_trigger.trigger();
    if tokio::time::timeout(GRACE, &mut broker_task).await.is_err() {
        log::warn!("the local broker did not stop within {GRACE:?}; aborting it");
        broker_task.abort();
    }
    flush_before_stop(&flush_queue, &status).await;
    drop(flush_queue);
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

/// How long shutdown waits for the uplink to forward what the local broker committed last
/// (the wills of the iPads it closed).
const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// With the uplink connected, gives it up to [`FINAL_FLUSH`] to empty the queue, so the wills
/// published at shutdown reach the central broker now rather than after the next start. A
/// backlog that takes longer stays in the store, as always.
async fn flush_before_stop(queue: &Queue, status: &StatusHandle) {
    use crate::uplink::LinkState;
    let deadline = Instant::now() + FINAL_FLUSH;
    while Instant::now() < deadline
        && queue.totals().rows > 0
        && matches!(
            status.snapshot().state,
            LinkState::Connected | LinkState::Draining
        )
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
    let (up, down) = (freshness.suppressed_up(), freshness.suppressed_down());
    let q = queue.counters();
    let expired_down = downlink
        .counters()
        .expired
        .load(std::sync::atomic::Ordering::Relaxed);
    log::info!(
        "freshness counters: suppressed={} (uplink {up}, downlink {down}), conflated={}, expired={} (uplink {}, downlink {expired_down})",
        up + down,
        q.conflated,
        q.expired + expired_down,
        q.expired,
    );
}

/// One line at shutdown with what the local broker refused, for the logs of a run.
fn log_security_counters(broker: &crate::broker::BrokerHandle) {
    let s = broker.stats();
    log::info!(
        "local broker counters: refused_connections={} auth_failures={} bad_client_ids={} refused_per_address={} rate_limited={} protocol_errors={} receive_maximum_exceeded={} held_back={} denied_publish={} denied_subscribe={}",
        s.refused_connections,
        s.auth_failures,
        s.bad_client_ids,
        s.refused_per_address,
        s.rate_limited,
        s.protocol_errors,
        s.receive_maximum_exceeded,
        s.held_back,
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
        max_uncommitted_bytes: usize::try_from(l.max_uncommitted.as_u64()).unwrap_or(usize::MAX),
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

//! The status report as metrics a fleet's monitoring scrapes: the Prometheus text format
//! (version 0.0.4, what node_exporter's textfile collector reads) or OpenMetrics 1.0.
//!
//! Names follow Prometheus's conventions: a `trainrelay_` prefix, base units (`_seconds`,
//! `_bytes`), counters ending in `_total`; every sample carries the `train_id` label, so one
//! query spans the fleet. Gauges say how things are now (connected, waiting messages, oldest
//! age); counters say what happened since the daemon started (a restart resets them, which
//! Prometheus's `rate()` and `increase()` handle).

use std::fmt::Write;

use super::protocol::{ClientReport, StatusReport};

/// Which text format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Prometheus text exposition format 0.0.4.
    Prometheus,
    /// OpenMetrics 1.0 text (counters' families named without `_total`, `# EOF` at the end).
    OpenMetrics,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
}

/// Writes metric families one after another.
struct Writer {
    format: Format,
    out: String,
    train_id: String,
}

impl Writer {
    /// One family with its samples: `(extra labels, value)`. `name` is the family name; a
    /// counter's samples get `_total`.
    fn family(&mut self, name: &str, kind: Kind, help: &str, samples: &[(Vec<(&str, &str)>, f64)]) {
        let sample_name = match kind {
            Kind::Counter => format!("{name}_total"),
            Kind::Gauge => name.to_string(),
        };
        // Prometheus 0.0.4 names a counter family by its sample name; OpenMetrics without
        // the suffix.
        let family = match (self.format, kind) {
            (Format::Prometheus, _) => sample_name.as_str(),
            (Format::OpenMetrics, _) => name,
        };
        let kind = match kind {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        };
        let _ = writeln!(self.out, "# HELP {family} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {family} {kind}");
        for (labels, value) in samples {
            let mut all = vec![("train_id", self.train_id.as_str())];
            all.extend(labels.iter().copied());
            let labels = all
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
                .collect::<Vec<_>>()
                .join(",");
            let _ = writeln!(self.out, "{sample_name}{{{labels}}} {}", number(*value));
        }
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) {
        self.family(name, Kind::Gauge, help, &[(Vec::new(), value)]);
    }

    fn counter(&mut self, name: &str, help: &str, value: u64) {
        self.family(name, Kind::Counter, help, &[(Vec::new(), value as f64)]);
    }
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Label values escape backslash, double quote and line feed.
fn escape_label(v: &str) -> String {
    v.replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', r"\\").replace('\n', r"\n")
}

fn up(state: &str) -> f64 {
    f64::from(u8::from(state == "connected" || state == "draining"))
}

/// The report as metrics.
pub fn render(s: &StatusReport, clients: &[ClientReport], format: Format) -> String {
    let mut w = Writer {
        format,
        out: String::new(),
        train_id: s.train_id.clone(),
    };
    w.family(
        "trainrelay_info",
        Kind::Gauge,
        "The relay's version (always 1).",
        &[(vec![("version", s.version.as_str())], 1.0)],
    );
    w.gauge("trainrelay_up", "Whether the daemon answered (1).", 1.0);
    w.gauge(
        "trainrelay_start_time_seconds",
        "When the daemon started, seconds since the Unix epoch.",
        s.started_ms as f64 / 1000.0,
    );

    // The uplink.
    let u = &s.uplink;
    w.gauge(
        "trainrelay_uplink_connected",
        "Whether the first uplink connection (presence, downlink) is up.",
        up(&u.state),
    );
    w.gauge(
        "trainrelay_uplink_state_seconds",
        "How long the first uplink connection has been up, or down.",
        u.link_for_s as f64,
    );
    let conns: Vec<(Vec<(&str, &str)>, f64)> = u
        .connections
        .iter()
        .map(|c| (vec![("client_id", c.client_id.as_str())], up(&c.state)))
        .collect();
    w.family(
        "trainrelay_uplink_connection_up",
        Kind::Gauge,
        "Whether each parallel uplink connection is up.",
        &conns,
    );
    let per_conn =
        |f: fn(&super::protocol::ConnectionReport) -> u64| -> Vec<(Vec<(&str, &str)>, f64)> {
            u.connections
                .iter()
                .map(|c| (vec![("client_id", c.client_id.as_str())], f(c) as f64))
                .collect()
        };
    w.family(
        "trainrelay_uplink_connection_window_messages",
        Kind::Gauge,
        "In-flight window of each uplink connection (the broker's Receive Maximum within uplink.inflight).",
        &per_conn(|c| c.window),
    );
    w.family(
        "trainrelay_uplink_connection_in_flight_messages",
        Kind::Gauge,
        "Unacknowledged QoS 1 messages on each uplink connection.",
        &per_conn(|c| c.in_flight),
    );
    w.family(
        "trainrelay_uplink_connects",
        Kind::Counter,
        "Successful connects of each uplink connection.",
        &per_conn(|c| c.connects),
    );
    w.family(
        "trainrelay_uplink_connection_forwarded",
        Kind::Counter,
        "Messages each uplink connection delivered.",
        &per_conn(|c| c.forwarded),
    );

    // The store.
    let st = &s.store;
    w.gauge(
        "trainrelay_queue_messages",
        "Messages waiting in the store for the uplink.",
        st.depth as f64,
    );
    w.gauge(
        "trainrelay_queue_bytes",
        "Bytes waiting in the store.",
        st.bytes as f64,
    );
    w.gauge(
        "trainrelay_queue_max_bytes",
        "The store's size limit (store.max_bytes).",
        st.max_bytes as f64,
    );
    w.gauge(
        "trainrelay_queue_oldest_age_seconds",
        "Age of the oldest waiting message (0 when none waits).",
        st.oldest_age_s.unwrap_or(0) as f64,
    );
    let routes: Vec<(Vec<(&str, &str)>, f64)> = st
        .routes
        .iter()
        .map(|r| (vec![("route", r.route.as_str())], r.depth as f64))
        .collect();
    w.family(
        "trainrelay_queue_route_messages",
        Kind::Gauge,
        "Messages waiting per route.",
        &routes,
    );

    // The ledger: persisted, so these counters survive restarts.
    let entries = |l: &crate::store::queue::ledger::RouteLedger| {
        let d = &l.dropped;
        [
            ("accepted", l.accepted),
            ("requeued", l.requeued),
            ("delivered", l.delivered),
            ("expired", d.expired),
            ("store_full", d.store_full),
            ("conflated", d.conflated),
            ("dead_letter", d.dead_letter),
            ("corrupt", d.corrupt),
        ]
    };
    let ledger: Vec<(Vec<(&str, &str)>, f64)> = s
        .ledger
        .routes
        .iter()
        .flat_map(|l| {
            entries(l).into_iter().map(|(entry, n)| {
                (
                    vec![("route", l.route.as_str()), ("entry", entry)],
                    n as f64,
                )
            })
        })
        .collect();
    w.family(
        "trainrelay_ledger_messages",
        Kind::Counter,
        "Uplink messages per route and ledger entry, since the store was created: accepted + \
         requeued = delivered + expired + store_full + conflated + dead_letter + corrupt + in store.",
        &ledger,
    );
    let in_store: Vec<(Vec<(&str, &str)>, f64)> = s
        .ledger
        .routes
        .iter()
        .map(|l| (vec![("route", l.route.as_str())], l.in_store as f64))
        .collect();
    w.family(
        "trainrelay_ledger_in_store_messages",
        Kind::Gauge,
        "Uplink messages per route in the store (waiting or in flight), as the ledger counts them.",
        &in_store,
    );

    // What happened to messages.
    let c = &s.counters;
    for (name, help, value) in [
        (
            "trainrelay_messages_accepted",
            "Messages committed to the store for the uplink.",
            c.accepted,
        ),
        (
            "trainrelay_messages_forwarded",
            "Messages the central broker acknowledged.",
            c.forwarded,
        ),
        (
            "trainrelay_messages_expired_dropped",
            "Messages dropped because their TTL or expiry passed before they could be sent.",
            c.expired_dropped,
        ),
        (
            "trainrelay_messages_full_dropped",
            "Oldest messages deleted to make room (when_full = drop_oldest).",
            c.full_dropped,
        ),
        (
            "trainrelay_messages_full_rejected",
            "New messages refused because the store was full (when_full = reject_new).",
            c.full_rejected,
        ),
        (
            "trainrelay_messages_corrupt_dropped",
            "Store rows that could not be read and were deleted.",
            c.corrupt_dropped,
        ),
        (
            "trainrelay_messages_resent",
            "Messages in flight when a connection ended, sent again (possible duplicates).",
            c.duplicates_resent,
        ),
        (
            "trainrelay_messages_dead_lettered",
            "Messages moved to the dead letters.",
            c.dead_lettered,
        ),
        (
            "trainrelay_messages_conflated",
            "Waiting messages replaced by a newer one of the same key.",
            c.conflated,
        ),
        (
            "trainrelay_messages_outdated_up",
            "Outdated messages from iPads dropped (routes with a version).",
            c.suppressed_up,
        ),
        (
            "trainrelay_messages_outdated_down",
            "Outdated messages from the centre dropped (routes with a version).",
            c.suppressed_down,
        ),
        (
            "trainrelay_downlink_unchanged",
            "Retained messages from the centre that repeated the local state.",
            c.unchanged_down,
        ),
    ] {
        w.counter(name, help, value);
    }
    let d = &s.downlink;
    w.counter(
        "trainrelay_downlink_delivered",
        "Messages from the centre handed to the local broker.",
        d.delivered,
    );
    w.counter(
        "trainrelay_downlink_expired",
        "Messages from the centre that arrived expired and were dropped.",
        d.expired,
    );
    w.counter(
        "trainrelay_downlink_unrouted",
        "Messages from the centre that matched no downlink route.",
        d.unrouted,
    );

    // The local broker.
    let l = &s.local;
    w.gauge(
        "trainrelay_local_clients",
        "Connected local clients (iPads).",
        clients.len().max(l.clients as usize) as f64,
    );
    for (name, help, value) in [
        (
            "trainrelay_local_connections",
            "Local connections accepted.",
            l.connections,
        ),
        (
            "trainrelay_local_refused_connections",
            "Local connections refused.",
            l.refused_connections,
        ),
        (
            "trainrelay_local_protocol_errors",
            "Local connections ended for a protocol error.",
            l.protocol_errors,
        ),
        (
            "trainrelay_local_messages_in",
            "PUBLISHes taken from local clients.",
            l.messages_in,
        ),
        (
            "trainrelay_local_messages_out",
            "PUBLISHes delivered to local clients.",
            l.messages_out,
        ),
        (
            "trainrelay_local_dropped_queue_full",
            "Not delivered to an iPad: its queue was full.",
            l.dropped_queue_full,
        ),
        (
            "trainrelay_local_dropped_expired",
            "Not delivered to an iPad: expired while queued.",
            l.dropped_expired,
        ),
        (
            "trainrelay_local_dropped_too_large",
            "Not delivered to an iPad: over its Maximum Packet Size.",
            l.dropped_too_large,
        ),
        (
            "trainrelay_local_denied_publish",
            "Local PUBLISHes refused by the ACL.",
            l.denied_publish,
        ),
        (
            "trainrelay_local_denied_subscribe",
            "Local subscriptions refused by the ACL.",
            l.denied_subscribe,
        ),
    ] {
        w.counter(name, help, value);
    }
    if format == Format::OpenMetrics {
        w.out.push_str("# EOF\n");
    }
    w.out
}

/// What to write when the daemon did not answer: `trainrelay_up 0`, so a scraper that reads a
/// file sees a dead relay instead of the last figures it wrote.
pub fn render_down(train_id: &str, format: Format) -> String {
    let mut w = Writer {
        format,
        out: String::new(),
        train_id: train_id.to_string(),
    };
    w.gauge("trainrelay_up", "Whether the daemon answered (1).", 0.0);
    if format == Format::OpenMetrics {
        w.out.push_str("# EOF\n");
    }
    w.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(1.5), "1.5");
    }

    #[test]
    fn a_dead_daemon_is_reported_as_down() {
        let text = render_down("T\"1", Format::Prometheus);
        assert!(
            text.contains("trainrelay_up{train_id=\"T\\\"1\"} 0\n"),
            "{text}"
        );
        assert!(render_down("T1", Format::OpenMetrics).ends_with("# EOF\n"));
    }
}

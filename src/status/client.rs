//! The `trainrelay status` side of the socket: ask, and render the answer for a person.
//!
//! Synchronous on purpose: the command asks one or two questions and exits, it needs no
//! runtime.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use thiserror::Error;

use super::protocol::{ClientReport, Query, Request, Response, StatusReport, VERSION};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a question could not be answered. Each says what to do about it.
#[derive(Debug, Error)]
pub enum ClientError {
    #[error("trainrelay is not running (no status socket at {0})")]
    NotRunning(PathBuf),
    #[error(
        "access denied to {0}: run as root, as the daemon's user, or as a member of status.group"
    )]
    AccessDenied(PathBuf),
    #[error("{0}")]
    Refused(String),
    #[error("status socket {}: {}", .0.display(), .1)]
    Io(PathBuf, std::io::Error),
    #[error("status socket {}: unreadable answer: {}", .0.display(), .1)]
    Garbled(PathBuf, String),
}

impl ClientError {
    /// Exit code of the command: 3 not running, 4 access denied, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NotRunning(_) => 3,
            ClientError::AccessDenied(_) => 4,
            ClientError::Refused(m) if m.starts_with("permission denied") => 4,
            _ => 1,
        }
    }
}

/// Sends one query and reads the answer; an error answer becomes [`ClientError::Refused`].
pub fn ask(socket: &Path, query: Query) -> Result<Response, ClientError> {
    let mut stream = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(socket.to_path_buf())
        }
        std::io::ErrorKind::PermissionDenied => ClientError::AccessDenied(socket.to_path_buf()),
        _ => ClientError::Io(socket.to_path_buf(), e),
    })?;
    let io = |e| ClientError::Io(socket.to_path_buf(), e);
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let mut request = serde_json::to_vec(&Request { v: VERSION, query })
        .map_err(|e| ClientError::Garbled(socket.to_path_buf(), e.to_string()))?;
    request.push(b'\n');
    // A refused peer gets its answer and a close, possibly before our write lands.
    let written = stream.write_all(&request);
    let mut answer = String::new();
    let read = BufReader::new(&stream).read_line(&mut answer);
    if answer.is_empty() {
        if let Err(e) = written {
            return Err(io(e));
        }
        return match read {
            Err(e) => Err(io(e)),
            Ok(_) => Err(ClientError::Garbled(
                socket.to_path_buf(),
                "the daemon closed the connection without answering".into(),
            )),
        };
    }
    let response: Response = serde_json::from_str(answer.trim())
        .map_err(|e| ClientError::Garbled(socket.to_path_buf(), e.to_string()))?;
    if !response.ok {
        return Err(ClientError::Refused(
            response
                .error
                .unwrap_or_else(|| "the daemon refused".into()),
        ));
    }
    Ok(response)
}

/// `status` and `clients` together: what the summary shows.
pub fn ask_all(socket: &Path) -> Result<(StatusReport, Vec<ClientReport>), ClientError> {
    let status = ask(socket, Query::Status)?
        .status
        .ok_or_else(|| ClientError::Garbled(socket.to_path_buf(), "no status in answer".into()))?;
    let clients = ask(socket, Query::Clients)?.clients.unwrap_or_default();
    Ok((status, clients))
}

/// The one-screen summary for a maintenance technician.
pub fn render(s: &StatusReport, clients: &[ClientReport], now_ms: i64) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "trainrelay {}, train {}, running {} (pid {})",
        s.version,
        s.train_id,
        duration(s.uptime_s),
        s.pid
    );
    let u = &s.uplink;
    let state = match u.state.as_str() {
        "connecting" => "connecting",
        "backing_off" => "waiting to retry",
        "stopped" => "stopped",
        other => other,
    };
    let up = u.state == "connected" || u.state == "draining";
    let _ = writeln!(
        o,
        "uplink    {} since {} ({}), {}, {} connects",
        if up { "UP" } else { "DOWN" },
        clock_time(u.link_since_ms, now_ms),
        duration(u.link_for_s),
        u.endpoint,
        u.connects
    );
    if !up {
        let _ = writeln!(o, "          now {state} (for {})", duration(u.for_s));
    }
    if let Some(e) = &u.last_error {
        if !up {
            let _ = writeln!(o, "          last error: {e}");
        } else {
            let _ = writeln!(o, "          previous error: {e}");
        }
    }
    if u.connections.len() > 1 {
        for c in &u.connections {
            let _ = writeln!(
                o,
                "          {} {}: window {}, {} in flight (most {}), {} forwarded, {} connects",
                c.client_id,
                c.state,
                c.window,
                c.in_flight,
                c.max_in_flight,
                c.forwarded,
                c.connects
            );
        }
    }
    let st = &s.store;
    let oldest = st
        .oldest_age_s
        .map_or(String::new(), |a| format!(", oldest {} old", duration(a)));
    let _ = writeln!(
        o,
        "waiting   {} messages, {} of {}{oldest}{}",
        st.depth,
        bytes(st.bytes),
        bytes(st.max_bytes),
        if st.partial {
            " (store busy: no per-route figures)"
        } else {
            ""
        }
    );
    for r in &st.routes {
        let oldest = r
            .oldest_age_s
            .map_or(String::new(), |a| format!(", oldest {}", duration(a)));
        let _ = writeln!(
            o,
            "          {:<24} {:>7} msgs {:>10}{oldest}",
            r.route,
            r.depth,
            bytes(r.bytes)
        );
    }
    for l in &s.ledger.routes {
        let d = &l.dropped;
        let _ = writeln!(
            o,
            "ledger    {:<24} {} in = {} delivered + {} dropped + {} in store",
            l.route,
            l.accepted + l.requeued,
            l.delivered,
            d.total(),
            l.in_store
        );
        if d.total() > 0 {
            let _ = writeln!(
                o,
                "          {:<24} dropped: {} expired, {} store full, {} conflated, {} dead letter, {} corrupt",
                "", d.expired, d.store_full, d.conflated, d.dead_letter, d.corrupt
            );
        }
    }
    let _ = writeln!(
        o,
        "iPads     {} connected on {}",
        clients.len(),
        s.local.listen
    );
    for c in clients {
        let _ = writeln!(
            o,
            "          {:<24} {:<22} v{:<5} since {}, {} subscriptions",
            c.client_id,
            c.address,
            c.protocol,
            clock_time(c.since_ms, now_ms),
            c.subscriptions
        );
    }
    let c = &s.counters;
    let _ = writeln!(
        o,
        "forwarded {} accepted, {} delivered upstream, {} resent after a lost connection (possible duplicates)",
        c.accepted, c.forwarded, c.duplicates_resent
    );
    let l = &s.local;
    let d = &s.downlink;
    let dropped = [
        (
            c.expired_dropped,
            "expired before the uplink could send them",
        ),
        (c.full_dropped, "oldest deleted because the store was full"),
        (c.full_rejected, "refused because the store was full"),
        (c.corrupt_dropped, "unreadable rows deleted"),
        (
            c.dead_lettered,
            "moved to dead letters: the central broker kept refusing them",
        ),
        (
            c.conflated,
            "replaced while waiting by a newer value (conflated)",
        ),
        (c.suppressed_up, "outdated (older version) from iPads"),
        (
            c.suppressed_down,
            "outdated (older version) from the control centre",
        ),
        (
            l.dropped_queue_full,
            "not delivered to an iPad: its queue was full",
        ),
        (
            l.dropped_expired,
            "not delivered to an iPad: expired while it was away",
        ),
        (
            l.dropped_too_large,
            "not delivered to an iPad: larger than it accepts",
        ),
        (d.expired, "from the control centre, already expired"),
        (d.unrouted, "from the control centre, no downlink route"),
    ];
    let any: Vec<_> = dropped.iter().filter(|(n, _)| *n > 0).collect();
    if any.is_empty() {
        let _ = writeln!(o, "dropped   nothing");
    } else {
        for (i, (n, why)) in any.iter().enumerate() {
            let head = if i == 0 { "dropped" } else { "" };
            let _ = writeln!(o, "{head:<9} {n} {why}");
        }
    }
    if l.denied_publish + l.denied_subscribe + l.refused_connections > 0 {
        let _ = writeln!(
            o,
            "refused   {} connections, {} publishes and {} subscriptions denied",
            l.refused_connections, l.denied_publish, l.denied_subscribe
        );
    }
    if l.receive_maximum_exceeded > 0 {
        let _ = writeln!(
            o,
            "exceeded  {} MQTT 5 clients sent more than our Receive Maximum (disconnected, 0x93)",
            l.receive_maximum_exceeded
        );
    }
    o
}

/// `2h 03m`, `5m 12s`, `40s`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h:02}h")
    } else if h > 0 {
        format!("{h}h {m:02}m")
    } else if m > 0 {
        format!("{m}m {s:02}s")
    } else {
        format!("{s}s")
    }
}

/// `14:03:07 UTC` for today, `2026-11-27 14:03 UTC` for an earlier day.
fn clock_time(ms: i64, now_ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    if days == now_ms.div_euclid(1000).div_euclid(86400) {
        format!("{h:02}:{m:02}:{s:02} UTC")
    } else {
        let (y, mo, d) = civil_from_days(days);
        format!("{y}-{mo:02}-{d:02} {h:02}:{m:02} UTC")
    }
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn bytes(n: u64) -> String {
    bytesize::ByteSize::b(n).to_string_as(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(duration(3725), "1h 02m");
        assert_eq!(duration(59), "59s");
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(clock_time(3_600_000, 3_700_000), "01:00:00 UTC");
        assert_eq!(clock_time(0, 86_400_000 * 2), "1970-01-01 00:00 UTC");
    }
}

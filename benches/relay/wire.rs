//! Raw MQTT 3.1.1 over a tokio `TcpStream`: just what the load generator and the receiver
//! need, so neither is slowed by a general-purpose client. The publisher pipelines QoS 1
//! PUBLISHes up to a window of unacknowledged packets (the iPad's Receive Maximum) and writes
//! them in large buffered batches; the receiver acknowledges every QoS 1 delivery in batches,
//! flushing only when it has consumed everything already read.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Payload size of the benchmark's messages (the cellular workload sets its own).
pub const PAYLOAD: usize = 200;

/// One decoded packet; only the kinds the benchmark uses are looked into.
enum Frame {
    ConnAck {
        code: u8,
    },
    Publish {
        qos: u8,
        pkid: u16,
        payload: Vec<u8>,
    },
    PubAck {
        pkid: u16,
    },
    Other,
}

/// Reads whole packets from the socket.
struct Reader {
    rd: OwnedReadHalf,
    buf: BytesMut,
}

impl Reader {
    /// A complete packet already in the buffer, if any.
    fn parse(&mut self) -> io::Result<Option<Frame>> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let mut len = 0usize;
        let mut shift = 0;
        let mut i = 1;
        loop {
            let Some(&byte) = b.get(i) else {
                return Ok(None);
            };
            len |= usize::from(byte & 0x7f) << shift;
            i += 1;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 21 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "bad length"));
            }
        }
        if b.len() < i + len {
            return Ok(None);
        }
        let kind = b[0] >> 4;
        let body = &b[i..i + len];
        let frame = match kind {
            2 if len >= 2 => Frame::ConnAck { code: body[1] },
            3 => {
                let qos = (b[0] >> 1) & 3;
                if body.len() < 2 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "short PUBLISH"));
                }
                let tlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
                let mut at = 2 + tlen;
                let mut pkid = 0;
                if qos > 0 {
                    pkid = u16::from_be_bytes([body[at], body[at + 1]]);
                    at += 2;
                }
                Frame::Publish {
                    qos,
                    pkid,
                    payload: body[at..].to_vec(),
                }
            }
            4 if len >= 2 => Frame::PubAck {
                pkid: u16::from_be_bytes([body[0], body[1]]),
            },
            _ => Frame::Other,
        };
        self.buf.advance(i + len);
        Ok(Some(frame))
    }

    /// Waits for more bytes; `Ok(false)` at end of stream.
    async fn fill(&mut self) -> io::Result<bool> {
        if self.buf.capacity() - self.buf.len() < 16 * 1024 {
            self.buf.reserve(64 * 1024);
        }
        Ok(self.rd.read_buf(&mut self.buf).await? > 0)
    }

    async fn next(&mut self) -> io::Result<Frame> {
        loop {
            if let Some(f) = self.parse()? {
                return Ok(f);
            }
            if !self.fill().await? {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed"));
            }
        }
    }
}

fn put_len(out: &mut Vec<u8>, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// An MQTT 3.1.1 connection after a successful CONNACK.
struct Conn {
    reader: Reader,
    wr: BufWriter<OwnedWriteHalf>,
}

/// Connects to `addr`, from inside network namespace `inside` when given (a receiver next
/// to a central broker behind a cellular link).
async fn connect_from(
    addr: SocketAddr,
    client_id: &str,
    clean: bool,
    inside: Option<&str>,
) -> io::Result<Conn> {
    let stream = match inside {
        None => TcpStream::connect(addr).await?,
        Some(ns) => {
            let ns = ns.to_string();
            let s = tokio::task::spawn_blocking(move || {
                trainrelay_testkit::cellular::connect_in(&ns, addr)
            })
            .await
            .map_err(io::Error::other)??;
            s.set_nonblocking(true)?;
            TcpStream::from_std(s)?
        }
    };
    handshake(stream, addr, client_id, clean).await
}

async fn connect(addr: SocketAddr, client_id: &str, clean: bool) -> io::Result<Conn> {
    connect_from(addr, client_id, clean, None).await
}

async fn handshake(
    stream: TcpStream,
    addr: SocketAddr,
    client_id: &str,
    clean: bool,
) -> io::Result<Conn> {
    stream.set_nodelay(true)?;
    let (rd, wr) = stream.into_split();
    let mut conn = Conn {
        reader: Reader {
            rd,
            buf: BytesMut::with_capacity(64 * 1024),
        },
        wr: BufWriter::with_capacity(64 * 1024, wr),
    };
    let mut body = Vec::new();
    put_str(&mut body, "MQTT");
    body.push(4);
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&0u16.to_be_bytes()); // keep-alive off: no pings to interleave
    put_str(&mut body, client_id);
    let mut pkt = vec![0x10];
    put_len(&mut pkt, body.len());
    pkt.extend_from_slice(&body);
    conn.wr.write_all(&pkt).await?;
    conn.wr.flush().await?;
    match tokio::time::timeout(Duration::from_secs(10), conn.reader.next()).await {
        Ok(Ok(Frame::ConnAck { code: 0 })) => Ok(conn),
        Ok(Ok(Frame::ConnAck { code })) => Err(io::Error::other(format!(
            "{addr}: CONNACK refused '{client_id}' with code {code}"
        ))),
        Ok(Ok(_)) => Err(io::Error::other(format!("{addr}: no CONNACK"))),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::other(format!("{addr}: CONNACK timed out"))),
    }
}

/// Encodes a QoS 1 PUBLISH whose payload (`size` bytes, at least 16) carries the send time
/// and the sequence number.
fn encode_publish(out: &mut Vec<u8>, topic: &str, pkid: u16, sent_ns: u64, seq: u64, size: usize) {
    let size = size.max(16);
    out.clear();
    out.push(0x32);
    put_len(out, 2 + topic.len() + 2 + size);
    put_str(out, topic);
    out.extend_from_slice(&pkid.to_be_bytes());
    out.extend_from_slice(&sent_ns.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes());
    out.resize(out.len() + size - 16, 0x5a);
}

/// What one publisher saw.
#[derive(Debug, Default)]
pub struct PubReport {
    /// From the first PUBLISH to the last PUBACK.
    pub elapsed: Duration,
    /// PUBLISH written to PUBACK read, in nanoseconds (only when `record` was asked for).
    pub ack_latency_ns: Vec<u64>,
}

/// Parameters of one publisher.
#[derive(Clone)]
pub struct PubSpec {
    pub port: u16,
    pub client_id: String,
    /// Messages go to `{topic}/{seq % topics}`: a train publishes on many topics (positions,
    /// doors, diagnostics, acknowledgements), and per-topic order is what MQTT keeps.
    pub topic: String,
    pub topics: u64,
    /// Payload bytes of every message.
    pub payload: usize,
    /// Sequence numbers `first_seq .. first_seq + count` go into the payloads.
    pub first_seq: u64,
    pub count: u64,
    /// Unacknowledged PUBLISHes allowed at once.
    pub window: usize,
    /// Messages per second; `None` is as fast as the window allows.
    pub rate: Option<f64>,
    /// Record every PUBACK latency.
    pub record: bool,
    /// Counts PUBACKs as they arrive, for whoever watches progress.
    pub progress: Arc<AtomicU64>,
}

/// Publishes `spec.count` QoS 1 messages and waits for every PUBACK.
pub async fn publish(spec: PubSpec, epoch: Instant) -> io::Result<PubReport> {
    let entry = SocketAddr::from((Ipv4Addr::LOCALHOST, spec.port));
    let Conn { mut reader, mut wr } = connect(entry, &spec.client_id, true).await?;
    let sent_at: Arc<Vec<AtomicU64>> =
        Arc::new((0..=u16::MAX).map(|_| AtomicU64::new(0)).collect());
    let window = Arc::new(Semaphore::new(spec.window));
    let count = spec.count;
    let record = spec.record;
    let progress = spec.progress.clone();
    let acks = {
        let sent_at = sent_at.clone();
        let window = window.clone();
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut acked = 0u64;
            while acked < count {
                if let Frame::PubAck { pkid } = reader.next().await? {
                    acked += 1;
                    progress.fetch_add(1, Ordering::Relaxed);
                    if record {
                        let now = epoch.elapsed().as_nanos() as u64;
                        let sent = sent_at[usize::from(pkid)].load(Ordering::Relaxed);
                        lat.push(now.saturating_sub(sent));
                    }
                    window.add_permits(1);
                }
            }
            Ok::<_, io::Error>((lat, Instant::now()))
        })
    };
    let started = Instant::now();
    let interval = spec.rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut pkt = Vec::with_capacity(spec.payload + 64);
    let topics: Vec<String> = (0..spec.topics.max(1))
        .map(|k| format!("{}/{k}", spec.topic))
        .collect();
    for i in 0..count {
        if let Some(interval) = interval {
            let due = started + interval.mul_f64(i as f64);
            if Instant::now() < due {
                tokio::time::sleep_until(due.into()).await;
            }
        }
        match window.try_acquire() {
            Ok(p) => p.forget(),
            Err(_) => {
                wr.flush().await?;
                window
                    .acquire()
                    .await
                    .map_err(|_| io::Error::other("window closed"))?
                    .forget();
            }
        }
        let pkid = (i % 65535) as u16 + 1;
        let now = epoch.elapsed().as_nanos() as u64;
        sent_at[usize::from(pkid)].store(now, Ordering::Relaxed);
        let seq = spec.first_seq + i;
        let topic = &topics[(seq % topics.len() as u64) as usize];
        encode_publish(&mut pkt, topic, pkid, now, seq, spec.payload);
        wr.write_all(&pkt).await?;
        if interval.is_some() {
            wr.flush().await?;
        }
    }
    wr.flush().await?;
    let (ack_latency_ns, last) = acks
        .await
        .map_err(|e| io::Error::other(format!("ack reader: {e}")))??;
    let _ = wr.write_all(&[0xe0, 0x00]).await;
    let _ = wr.flush().await;
    Ok(PubReport {
        elapsed: last - started,
        ack_latency_ns,
    })
}

/// What the receiver saw.
#[derive(Debug, Default)]
pub struct SinkReport {
    /// Distinct sequence numbers below `expect`.
    pub unique: u64,
    /// Deliveries of a sequence number seen before.
    pub duplicates: u64,
    pub first: Option<Instant>,
    pub last: Option<Instant>,
    /// End-to-end latency (payload timestamp to arrival), nanoseconds, if recorded.
    pub latency_ns: Vec<u64>,
}

/// Creates a persistent session (clean session off) subscribed to `filter`, then leaves, so a
/// later [`sink`] with the same id finds everything queued for it meanwhile.
pub async fn make_session(addr: SocketAddr, client_id: &str, filter: &str) -> io::Result<()> {
    let mut conn = connect(addr, client_id, false).await?;
    subscribe(&mut conn, filter).await?;
    conn.wr.write_all(&[0xe0, 0x00]).await?;
    conn.wr.flush().await
}

async fn subscribe(conn: &mut Conn, filter: &str) -> io::Result<()> {
    let mut body = Vec::new();
    body.extend_from_slice(&1u16.to_be_bytes());
    put_str(&mut body, filter);
    body.push(1);
    let mut pkt = vec![0x82];
    put_len(&mut pkt, body.len());
    pkt.extend_from_slice(&body);
    conn.wr.write_all(&pkt).await?;
    conn.wr.flush().await?;
    loop {
        let f = tokio::time::timeout(Duration::from_secs(10), conn.reader.next())
            .await
            .map_err(|_| io::Error::other("SUBACK timed out"))??;
        if matches!(f, Frame::Other) {
            return Ok(());
        }
    }
}

/// Parameters of the receiver.
pub struct SinkSpec {
    pub addr: SocketAddr,
    pub client_id: String,
    /// Connect from inside this network namespace (next to central) rather than from here.
    pub inside: Option<String>,
    pub filter: String,
    /// Keep the session (see [`make_session`]).
    pub persistent: bool,
    /// Stop once this many distinct messages arrived.
    pub expect: u64,
    /// Record end-to-end latencies.
    pub record: bool,
    /// Give up at this instant (the report then says how many arrived).
    pub deadline: Instant,
    /// Distinct arrivals so far.
    pub progress: Arc<AtomicU64>,
    /// Told once the receiver is connected and subscribed.
    pub ready: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Receives until `expect` distinct messages arrived, acknowledging each QoS 1 delivery.
/// Connecting is retried until the deadline, so the sink may start before its broker.
pub async fn sink(mut spec: SinkSpec, epoch: Instant) -> io::Result<SinkReport> {
    let mut conn = loop {
        let inside = spec.inside.as_deref();
        match connect_from(spec.addr, &spec.client_id, !spec.persistent, inside).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > spec.deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    if !spec.persistent {
        subscribe(&mut conn, &spec.filter).await?;
    }
    if let Some(ready) = spec.ready.take() {
        let _ = ready.send(());
    }
    let mut seen = vec![false; spec.expect as usize];
    let mut report = SinkReport::default();
    let deadline = tokio::time::Instant::from_std(spec.deadline);
    while report.unique < spec.expect {
        // Consume every complete packet already read, then flush the acks in one write.
        while let Some(frame) = conn.reader.parse()? {
            let Frame::Publish { qos, pkid, payload } = frame else {
                continue;
            };
            let now = Instant::now();
            if qos == 1 {
                conn.wr.write_all(&[0x40, 0x02]).await?;
                conn.wr.write_all(&pkid.to_be_bytes()).await?;
            }
            if payload.len() < 16 {
                continue;
            }
            let sent = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
            let seq = u64::from_be_bytes(payload[8..16].try_into().expect("8 bytes"));
            let Some(slot) = seen.get_mut(seq as usize) else {
                continue;
            };
            if *slot {
                report.duplicates += 1;
                continue;
            }
            *slot = true;
            report.unique += 1;
            spec.progress.fetch_add(1, Ordering::Relaxed);
            report.first.get_or_insert(now);
            report.last = Some(now);
            if spec.record {
                let at = (now - epoch).as_nanos() as u64;
                report.latency_ns.push(at.saturating_sub(sent));
            }
        }
        if report.unique >= spec.expect {
            break;
        }
        conn.wr.flush().await?;
        match tokio::time::timeout_at(deadline, conn.reader.fill()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{}: broker closed the receiver", spec.addr),
                ))
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    let _ = conn.wr.flush().await;
    let _ = conn.wr.write_all(&[0xe0, 0x00]).await;
    let _ = conn.wr.flush().await;
    Ok(report)
}

/// Publishes `spec.count` messages split over `publishers` connections and returns the
/// reports (`spec.client_id` gets a suffix per connection).
pub async fn publish_many(
    spec: PubSpec,
    publishers: u64,
    epoch: Instant,
) -> io::Result<Vec<PubReport>> {
    let per = spec.count / publishers;
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let mut s = spec.clone();
        s.client_id = format!("{}-{p}", spec.client_id);
        s.first_seq = spec.first_seq + p * per;
        s.count = if p + 1 == publishers {
            spec.count - per * (publishers - 1)
        } else {
            per
        };
        tasks.push(tokio::spawn(publish(s, epoch)));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(
            t.await
                .map_err(|e| io::Error::other(format!("publisher: {e}")))??,
        );
    }
    Ok(out)
}

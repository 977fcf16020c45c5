//! A NATS core subscriber on a server's client port, for seeing what reached a NATS cluster
//! independently of its MQTT sessions: NATS hands every MQTT PUBLISH to core subscribers of
//! the topic's subject too (`trains/T1/up/x` is `trains.T1.up.x`).

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// Subscribes to `subject` on the server at `port` and sends every payload to `out`, from
/// connection to connection while the server comes and goes, until `out` is closed or the
/// task is aborted.
pub async fn follow(port: u16, subject: String, out: mpsc::UnboundedSender<Vec<u8>>) {
    while !out.is_closed() {
        // A failed or lost connection: the node is down; try again shortly.
        let _ = subscribe(port, &subject, &out).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn subscribe(
    port: u16,
    subject: &str,
    out: &mpsc::UnboundedSender<Vec<u8>>,
) -> std::io::Result<()> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    write
        .write_all(
            format!(
                "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true}}\r\n\
                 SUB {subject} 1\r\n"
            )
            .as_bytes(),
        )
        .await?;
    let mut line = String::new();
    loop {
        line.clear();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.first().copied() {
            Some("PING") => write.write_all(b"PONG\r\n").await?,
            // MSG subject sid [reply] len; HMSG subject sid [reply] header_len total_len
            Some(kind @ ("MSG" | "HMSG")) => {
                let number = |i: usize| {
                    words
                        .get(i)
                        .and_then(|w| w.parse::<usize>().ok())
                        .ok_or_else(|| std::io::Error::other(format!("bad NATS line {line:?}")))
                };
                let total = number(words.len() - 1)?;
                let headers = if kind == "HMSG" {
                    number(words.len() - 2)?
                } else {
                    0
                };
                let mut body = vec![0; total + 2];
                read.read_exact(&mut body).await?;
                body.truncate(total);
                if out.send(body.split_off(headers.min(total))).is_err() {
                    return Ok(());
                }
            }
            _ => {}
        }
    }
}

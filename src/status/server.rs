//! The status socket server.
//!
//! Shaped like mini-redis's listener: one accept loop, one task per connection, a semaphore
//! bounding how many are served at once. The socket answers only permitted local users: its
//! file has mode 0660 (owner and `status.group`), and each connection's peer credentials
//! (SO_PEERCRED, which the kernel fills in and a client cannot forge) must be root, the
//! daemon's own user, or a member of `status.group`, so a wrong mode on the file alone does not
//! open it. A peer that sends garbage, too much, or nothing gets an error reply or is closed;
//! it cannot crash or block the daemon.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::unistd::{Gid, Group, Uid, User};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::protocol::{parse_request, Query, Response, MAX_REQUEST};
use super::Sources;
use crate::config::StatusConfig;
use crate::shutdown::Shutdown;

/// Status connections served at once; more are answered "busy" and closed.
const MAX_CONNECTIONS: usize = 8;
/// How long a connection may take to send a request (or stay idle between requests).
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing an answer may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the socket could not be set up; names the config key.
#[derive(Debug, Error)]
pub enum StatusSocketError {
    #[error("status.socket {}: {what}: {source}", path.display())]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("status.socket {}: {detail}", path.display())]
    InUse { path: PathBuf, detail: String },
    #[error("status.group '{0}': no such group")]
    NoGroup(String),
}

/// Why a peer is refused; the text is the reply's error message.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(
        "permission denied: uid {uid} is not root, the daemon's user or a member of group '{group}'"
    )]
    NotInGroup { uid: Uid, group: String },
    #[error(
        "permission denied: uid {0} is not root or the daemon's user (set status.group to admit a group)"
    )]
    NotAllowed(Uid),
    #[error("permission denied: cannot read peer credentials: {0}")]
    NoCredentials(#[source] io::Error),
}

/// Who may ask.
#[derive(Debug, Clone)]
struct Access {
    own_uid: Uid,
    group: Option<(String, Gid)>,
}

impl Access {
    /// `Err(reason)` for a peer that is not root, the daemon's user, or in the group.
    fn check(&self, uid: u32, gid: u32) -> Result<(), Refusal> {
        let uid = Uid::from_raw(uid);
        if uid.is_root() || uid == self.own_uid {
            return Ok(());
        }
        if let Some((name, group_gid)) = &self.group {
            if Gid::from_raw(gid) == *group_gid {
                return Ok(());
            }
            // Supplementary membership, as listed in the group database.
            let user = User::from_uid(uid).ok().flatten();
            let member = match (user, Group::from_name(name)) {
                (Some(user), Ok(Some(group))) => group.mem.contains(&user.name),
                _ => false,
            };
            if member {
                return Ok(());
            }
            return Err(Refusal::NotInGroup {
                uid,
                group: name.clone(),
            });
        }
        Err(Refusal::NotAllowed(uid))
    }
}

/// A bound status socket, ready to [`StatusServer::run`].
pub struct StatusServer {
    listener: UnixListener,
    path: PathBuf,
    access: Access,
    sources: Arc<Sources>,
}

impl StatusServer {
    /// Creates the socket's directory if needed, replaces a stale socket file (one nobody
    /// answers on), binds, and sets mode 0660 and the group.
    pub fn bind(
        config: &StatusConfig,
        sources: Sources,
    ) -> Result<StatusServer, StatusSocketError> {
        let path = config.socket.clone();
        let io_err = |what: &'static str| {
            let path = path.clone();
            move |source| StatusSocketError::Io { path, what, source }
        };
        let group = match &config.group {
            None => None,
            Some(name) => match Group::from_name(name) {
                Ok(Some(g)) => Some((name.clone(), g.gid)),
                _ => return Err(StatusSocketError::NoGroup(name.clone())),
            },
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err("cannot create its directory"))?;
        }
        remove_stale(&path)?;
        let listener = UnixListener::bind(&path).map_err(io_err("cannot bind"))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))
            .map_err(io_err("cannot set mode 0660"))?;
        if let Some((_, gid)) = &group {
            nix::unistd::chown(&path, None, Some(*gid))
                .map_err(|e| io_err("cannot set its group")(io::Error::from(e)))?;
        }
        Ok(StatusServer {
            listener,
            path,
            access: Access {
                own_uid: Uid::effective(),
                group,
            },
            sources: Arc::new(sources),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until shutdown, then removes the socket file.
    pub async fn run(self, mut shutdown: Shutdown) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let refusals = crate::logging::Throttle::new(Duration::from_secs(60));
        loop {
            let stream = tokio::select! {
                _ = shutdown.recv() => break,
                r = self.listener.accept() => match r {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        if let Some(held) = refusals.allow() {
                            log::warn!("status socket {}: accept failed: {e} ({held} more not logged)", self.path.display());
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                // Best effort, never waits: the peer may not be reading.
                if let Err(e) = stream.try_write(&line(&Response::error(format!(
                    "busy: {MAX_CONNECTIONS} status connections are open; try again"
                )))) {
                    log::debug!("status socket: cannot tell a peer it is busy: {e}");
                }
                continue;
            };
            let sources = Arc::clone(&self.sources);
            let access = self.access.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let _permit = permit;
                serve(stream, &sources, &access, shutdown).await;
            });
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!(
                    "status socket {}: cannot remove it: {e}",
                    self.path.display()
                );
            }
        }
    }
}

/// A socket file left by a daemon that died is removed; one that still answers is in use.
fn remove_stale(path: &Path) -> Result<(), StatusSocketError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(StatusSocketError::InUse {
            path: path.to_path_buf(),
            detail: "exists and is not a socket; not replacing it".into(),
        });
    }
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(StatusSocketError::InUse {
            path: path.to_path_buf(),
            detail: "another trainrelay answers on it".into(),
        });
    }
    std::fs::remove_file(path).map_err(|source| StatusSocketError::Io {
        path: path.to_path_buf(),
        what: "cannot remove the stale socket",
        source,
    })
}

fn line(r: &Response) -> Vec<u8> {
    let mut out = serde_json::to_vec(r).unwrap_or_else(|_| b"{\"v\":1,\"ok\":false}".to_vec());
    out.push(b'\n');
    out
}

async fn send(stream: &mut tokio::net::unix::OwnedWriteHalf, r: &Response) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&line(r))).await,
        Ok(Ok(()))
    )
}

/// One connection: check the peer, then answer requests until EOF, an error, or idleness.
async fn serve(stream: UnixStream, sources: &Sources, access: &Access, mut shutdown: Shutdown) {
    let cred = stream.peer_cred();
    let (read, mut write) = stream.into_split();
    let verdict = match cred {
        Ok(c) => access.check(c.uid(), c.gid()),
        Err(e) => Err(Refusal::NoCredentials(e)),
    };
    if let Err(reason) = verdict {
        log::warn!("status socket: refused a peer: {reason}");
        send(&mut write, &Response::error(reason.to_string())).await;
        return;
    }
    let mut reader = BufReader::new(read);
    let mut buf = Vec::with_capacity(256);
    loop {
        buf.clear();
        let limited = (&mut reader).take(MAX_REQUEST as u64 + 1);
        let mut limited = limited;
        let read = tokio::select! {
            r = tokio::time::timeout(READ_TIMEOUT, limited.read_until(b'\n', &mut buf)) => r,
            _ = shutdown.recv() => return,
        };
        match read {
            Err(_) => {
                send(
                    &mut write,
                    &Response::error("timed out waiting for a request"),
                )
                .await;
                return;
            }
            Ok(Err(_)) | Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
        }
        if buf.len() > MAX_REQUEST || (buf.len() == MAX_REQUEST && buf.last() != Some(&b'\n')) {
            send(
                &mut write,
                &Response::error(format!("request too large (limit {MAX_REQUEST} bytes)")),
            )
            .await;
            return;
        }
        let text = String::from_utf8_lossy(&buf);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let response = answer(text, sources).await;
        if !send(&mut write, &response).await {
            return;
        }
    }
}

/// The answer to one request line.
async fn answer(text: &str, sources: &Sources) -> Response {
    let request = match parse_request(text) {
        Ok(r) => r,
        Err(refusal) => return Response::error(refusal.to_string()),
    };
    match request.query {
        Query::Status => Response {
            status: Some(sources.status().await),
            ..Response::ok()
        },
        Query::Clients => Response {
            clients: Some(sources.clients()),
            ..Response::ok()
        },
        Query::DeadLetters => match sources.queue.dead_letters(100).await {
            Ok(list) => Response {
                dead_letters: Some(list),
                ..Response::ok()
            },
            Err(e) => Response::error(format!("cannot read the dead letters: {e}")),
        },
        Query::Requeue => match sources.queue.requeue_dead_letters(None).await {
            Ok(n) => {
                log::info!("status socket: {n} dead letters re-queued");
                Response {
                    message: Some(format!("{n} dead letters re-queued")),
                    ..Response::ok()
                }
            }
            Err(e) => Response::error(format!("cannot re-queue the dead letters: {e}")),
        },
        Query::Reconnect => {
            log::info!("status socket: uplink reconnect requested");
            sources.uplink.request_reconnect();
            Response {
                message: Some("uplink reconnect requested".into()),
                ..Response::ok()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rules() {
        let a = Access {
            own_uid: Uid::from_raw(1234),
            group: None,
        };
        assert!(a.check(0, 0).is_ok());
        assert!(a.check(1234, 99).is_ok());
        assert!(a
            .check(65534, 65534)
            .unwrap_err()
            .to_string()
            .contains("uid 65534"));
        let a = Access {
            own_uid: Uid::from_raw(1234),
            group: Some(("ops".into(), Gid::from_raw(4321))),
        };
        assert!(a.check(777, 4321).is_ok());
        assert!(a.check(777, 1).unwrap_err().to_string().contains("'ops'"));
    }
}

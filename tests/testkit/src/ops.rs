//! Helpers for the operations tests: the daemon with a chosen environment (NOTIFY_SOCKET,
//! WATCHDOG_USEC, test hooks) and its pid for signals, raw status-socket requests, and the
//! `trainrelay status` command.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The daemon as a child process, killed on drop (its log printed if the test failed).
pub struct Daemon {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub local_port: u16,
    child: Option<Child>,
}

impl Daemon {
    /// Writes `config` (`{local_port}` and `{dir}` substituted) and starts the daemon with
    /// `env`; does not wait for anything.
    pub fn spawn(dir: &Path, config: &str, env: &[(&str, String)]) -> Daemon {
        let local_port = crate::free_port();
        let dir = dir.join("relay");
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("trainrelay.toml");
        let text = config
            .replace("{local_port}", &local_port.to_string())
            .replace("{dir}", &dir.display().to_string());
        std::fs::write(&config_path, text).unwrap();
        let log = std::fs::File::create(dir.join("relay.log")).unwrap();
        let mut cmd = Command::new(crate::relay_binary());
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", "info")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("TRAINRELAY_TEST_HANG")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("cannot start trainrelay");
        Daemon {
            dir,
            config_path,
            local_port,
            child: Some(child),
        }
    }

    /// Like [`Daemon::spawn`], then waits until the status socket answers.
    pub async fn start(dir: &Path, config: &str, env: &[(&str, String)]) -> Daemon {
        let d = Daemon::spawn(dir, config, env);
        crate::wait_for_port(d.local_port, Duration::from_secs(30)).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.socket().exists() {
            assert!(Instant::now() < deadline, "no status socket after 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("status.sock")
    }

    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.as_ref().expect("not running").id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).expect("kill");
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default()
    }

    /// Waits until the log contains `needle` (fails the test after `within`).
    pub async fn wait_log(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?} within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits up to `within` for the exit; `None` if it did not exit.
    pub async fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + within;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            let log = self.log();
            eprintln!(
                "relay log {}: {} bytes",
                self.dir.join("relay.log").display(),
                log.len()
            );
            let tail: Vec<&str> = log.lines().rev().take(200).collect();
            eprintln!("--- relay log (last 200 lines) ---");
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Sends raw bytes to the status socket, then reads one answer line (empty if none).
pub fn raw_request(socket: &Path, bytes: &[u8]) -> String {
    let mut s = UnixStream::connect(socket).expect("connect status socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let _ = s.write_all(bytes);
    let mut line = String::new();
    let _ = BufReader::new(&s).read_line(&mut line);
    line
}

/// One JSON request, parsed answer.
pub fn query(socket: &Path, q: &str) -> serde_json::Value {
    let line = raw_request(
        socket,
        format!("{{\"v\":1,\"query\":\"{q}\"}}\n").as_bytes(),
    );
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
}

/// True once the peer closed the connection (read returns 0).
pub fn closed_by_peer(s: &mut UnixStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(_) => return false,
        }
    }
}

/// Runs `trainrelay status ARGS`, optionally as another user.
pub fn status_cli(args: &[&str], uid: Option<u32>) -> Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(crate::relay_binary());
    cmd.arg("status").args(args).stdin(Stdio::null());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().expect("run trainrelay status")
}

/// Polls `f` until it returns `Some`, or fails the test after `within`.
pub async fn eventually<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The depth of `route` in a `status` answer (0 if absent).
pub fn route_depth(status: &serde_json::Value, route: &str) -> u64 {
    status["status"]["store"]["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["route"] == route)
        .and_then(|r| r["depth"].as_u64())
        .unwrap_or(0)
}

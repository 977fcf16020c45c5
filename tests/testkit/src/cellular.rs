//! A per-packet emulated cellular link between this host and a network namespace, for the
//! tests and benchmarks that need the relay's own TCP socket to meet delay, in-order jitter,
//! loss and a bandwidth cap: a guard around `../shared/tools/cellular-link` (see the README
//! next to it).
//!
//! [`CellularLink::up`] brings a link up under a namespace name of this process's own,
//! [`CellularLink::command`] starts a process inside (the central broker, a receiver),
//! [`CellularLink::set`] and [`CellularLink::drop_packets`] change the impairment while it
//! runs, and drop takes it down (`cellular-link down`), also when a test panics.
//!
//! The tool derives the link's addresses and NFQUEUE numbers from a checksum of the name
//! (50 queue pairs): so that links of parallel tests and benchmarks never share one, each link
//! holds a claim on its queue pair (a file under `/run/cellular-link.claims`, freed on drop,
//! taken over when its process is gone) and avoids the pairs of links it did not make.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where the links' queue-pair claims and the lock around `up`/`down` live.
const CLAIMS: &str = "/run/cellular-link.claims";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// What the link does to every packet, each way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    pub delay_ms: u32,
    /// Uniform either side of the delay; packets stay in order.
    pub jitter_ms: u32,
    /// Random loss in percent.
    pub loss_pct: f64,
    /// Bandwidth cap (tbf) in kbit/s; `None`: uncapped.
    pub rate_kbit: Option<u32>,
}

impl Default for LinkParams {
    /// A moving train on LTE, the tool's defaults: 60 ± 20 ms each way, 1 % loss, uncapped.
    fn default() -> LinkParams {
        LinkParams {
            delay_ms: 60,
            jitter_ms: 20,
            loss_pct: 1.0,
            rate_kbit: None,
        }
    }
}

impl LinkParams {
    fn args(&self) -> Vec<String> {
        vec![
            "--delay".into(),
            self.delay_ms.to_string(),
            "--jitter".into(),
            self.jitter_ms.to_string(),
            "--loss".into(),
            self.loss_pct.to_string(),
            "--rate".into(),
            self.rate_kbit.unwrap_or(0).to_string(),
        ]
    }
}

impl std::fmt::Display for LinkParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ± {} ms each way, {} % loss, ",
            self.delay_ms, self.jitter_ms, self.loss_pct
        )?;
        match self.rate_kbit {
            Some(r) => write!(f, "{r} kbit/s"),
            None => write!(f, "uncapped"),
        }
    }
}

/// The `cellular-link` script: `CELLULAR_LINK` if set, else `shared/tools/cellular-link` next
/// to the project's checkout (the first ancestor of this crate's or the current directory
/// that has one: `../shared/tools` from the project's root, also from a worktree beside it).
pub fn tool() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CELLULAR_LINK") {
        return Some(PathBuf::from(p));
    }
    let starts = [
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
        std::env::current_dir().ok(),
    ];
    starts
        .iter()
        .flatten()
        .flat_map(|d| d.ancestors().map(Path::to_path_buf).collect::<Vec<_>>())
        .map(|d| d.join("shared/tools/cellular-link"))
        .find(|p| p.is_file())
}

/// Why a link cannot be brought up here, if it cannot (checked before trying).
pub fn missing() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("the cellular link needs root (network namespaces, iptables)".into());
    }
    if tool().is_none() {
        return Some("../shared/tools/cellular-link not found (set CELLULAR_LINK)".into());
    }
    for (cmd, package) in [
        ("ip", "iproute2"),
        ("iptables", "iptables"),
        ("tc", "iproute2"),
        ("gcc", "gcc and libnetfilter-queue-dev"),
    ] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {cmd}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "the cellular link needs {cmd} (apt-get install {package})"
            ));
        }
    }
    None
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// The tool's queue pair for a namespace name (`cksum(name) % 200 + 20`, then `% 50`).
fn slot_of(name: &str) -> Result<u32, String> {
    let mut child = Command::new("cksum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cksum: {e}"))?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(name.as_bytes())
        .map_err(|e| format!("cksum: {e}"))?;
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cksum: {e}"))?;
    let sum: u64 = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or("cksum: no checksum")?;
    Ok(((sum % 200 + 20) % 50) as u32)
}

/// An exclusive lock on `CLAIMS/lock`, held while links are brought up or down (iptables
/// of parallel `up`s would otherwise race for the xtables lock).
fn lock() -> Result<nix::fcntl::Flock<File>, String> {
    std::fs::create_dir_all(CLAIMS).map_err(|e| format!("{CLAIMS}: {e}"))?;
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(Path::new(CLAIMS).join("lock"))
        .map_err(|e| format!("{CLAIMS}/lock: {e}"))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("{CLAIMS}/lock: {e}"))
}

/// Queue pairs of links that exist but are not claimed (started by hand, e.g. `trcell`).
fn slots_in_use() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/run") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("cellular-link-"))
                .map(str::to_string)
        })
        .filter_map(|ns| slot_of(&ns).ok())
        .collect()
}

/// Claims queue pair `slot` for this process; false when a live process holds it.
fn claim(slot: u32) -> bool {
    let path = Path::new(CLAIMS).join(format!("q{slot}"));
    for _ in 0..2 {
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                let _ = write!(f, "{}", std::process::id());
                return true;
            }
            Err(_) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let alive = holder
                    .trim()
                    .parse::<u32>()
                    .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                if alive {
                    return false;
                }
                // Its process is gone (killed before its guard ran): the claim is stale.
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    false
}

/// An emulated cellular link to a namespace of this process's own; down on drop.
pub struct CellularLink {
    /// The namespace's name (also `--ns` of the tool).
    pub ns: String,
    /// This host's end of the link.
    pub host_addr: Ipv4Addr,
    /// The namespace's end: where a server started with [`CellularLink::command`] listens.
    pub addr: Ipv4Addr,
    params: LinkParams,
    tool: PathBuf,
    claim: PathBuf,
}

impl CellularLink {
    /// Brings a link up; Err says why not (see also [`missing`]).
    pub fn up(params: LinkParams) -> Result<CellularLink, String> {
        if let Some(why) = missing() {
            return Err(why);
        }
        let tool = tool().expect("checked by missing()");
        let _guard = lock()?;
        let taken = slots_in_use();
        let pid = std::process::id();
        let (ns, slot) = (0..200)
            .find_map(|_| {
                // At most 10 characters: the tool names the interfaces after the first 10.
                let k = COUNTER.fetch_add(1, Ordering::SeqCst) % 256;
                let name = format!("cl{:x}{k:02x}", pid & 0xff_ffff);
                let slot = slot_of(&name).ok()?;
                (!taken.contains(&slot) && claim(slot)).then_some((name, slot))
            })
            .ok_or("no free queue pair for another cellular link (50 at most)")?;
        let claim = Path::new(CLAIMS).join(format!("q{slot}"));
        let mut link = CellularLink {
            ns,
            host_addr: Ipv4Addr::UNSPECIFIED,
            addr: Ipv4Addr::UNSPECIFIED,
            params,
            tool,
            claim,
        };
        // From here on, drop takes down whatever `up` got to.
        let out = run(Command::new(&link.tool)
            .args(["up", "--ns", &link.ns])
            .args(params.args()))?;
        // "cellular-link NAME up: host 10.201.N.1 <-> 10.201.N.2 (namespace NAME); ..."
        let words: Vec<&str> = out.split_whitespace().collect();
        let after = |w: &str| {
            words
                .iter()
                .position(|x| *x == w)
                .and_then(|i| words.get(i + 1))
                .and_then(|a| a.parse::<Ipv4Addr>().ok())
        };
        match (after("host"), after("<->")) {
            (Some(h), Some(n)) => {
                link.host_addr = h;
                link.addr = n;
            }
            _ => return Err(format!("cellular-link up: unexpected output: {out}")),
        }
        Ok(link)
    }

    /// [`CellularLink::up`] for a test or benchmark: `None` (after printing "SKIPPED") when a
    /// prerequisite is missing here; under CI a failure instead ([`crate::require_or_skip`]).
    pub fn up_or_skip(test: &str, params: LinkParams) -> Option<CellularLink> {
        match CellularLink::up(params) {
            Ok(link) => Some(link),
            Err(why) => {
                crate::require_or_skip(test, false, &why);
                None
            }
        }
    }

    /// The impairment in force.
    pub fn params(&self) -> LinkParams {
        self.params
    }

    /// `program` to run inside the namespace (`cellular-link exec`): the child's pid is the
    /// program's own (everything on the way execs in place).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(&self.tool);
        cmd.args(["exec", "--ns", &self.ns, "--"]).arg(program);
        cmd
    }

    /// The words that run a program inside, for callers that build their own command line.
    pub fn exec_prefix(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![self.tool.clone().into()];
        v.extend(["exec", "--ns", &self.ns, "--"].map(OsString::from));
        v
    }

    /// Changes the impairment while the link runs.
    pub fn set(&mut self, params: LinkParams) -> Result<(), String> {
        run(Command::new(&self.tool)
            .args(["set", "--ns", &self.ns])
            .args(params.args()))?;
        self.params = params;
        Ok(())
    }

    /// A silent blackhole in both directions (a tunnel) while `on`.
    pub fn drop_packets(&self, on: bool) -> Result<(), String> {
        run(Command::new(&self.tool).args([
            "drop",
            "--ns",
            &self.ns,
            if on { "on" } else { "off" },
        ]))
        .map(|_| ())
    }

    /// The tool's packet counters (passed / dropped per direction).
    pub fn stats(&self) -> String {
        run(Command::new(&self.tool).args(["stats", "--ns", &self.ns]))
            .unwrap_or_else(|e| e)
            .trim()
            .to_string()
    }

    /// Runs `f` on a thread inside the namespace: sockets it creates belong to the namespace
    /// (and stay there when handed back), so a receiver next to the central broker needs no
    /// process of its own.
    pub fn in_namespace<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        in_namespace(&self.ns, f)
    }

    /// A TCP connection made from inside the namespace (not over the link).
    pub fn connect_inside(&self, to: SocketAddr) -> io::Result<TcpStream> {
        connect_in(&self.ns, to)
    }

    /// A plain TCP transfer of `bytes` over the link, from this host to a receiver inside the
    /// namespace: the physical ceiling a protocol on top can approach.
    pub fn tcp_transfer(&self, bytes: usize) -> io::Result<Transfer> {
        let listener: TcpListener = self.in_namespace(|| TcpListener::bind((self.addr, 0)))??;
        let to = listener.local_addr()?;
        let receiver = std::thread::spawn(move || -> io::Result<(u64, Duration)> {
            let (mut s, _) = listener.accept()?;
            s.set_read_timeout(Some(Duration::from_secs(600)))?;
            let mut buf = vec![0u8; 64 * 1024];
            let (mut got, mut first, mut last) = (0u64, None, Instant::now());
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                got += n as u64;
            }
            s.write_all(b"k")?;
            Ok((got, last - first.unwrap_or(last)))
        });
        let started = Instant::now();
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(10))?;
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n])?;
            left -= n;
        }
        s.shutdown(std::net::Shutdown::Write)?;
        s.set_read_timeout(Some(Duration::from_secs(600)))?;
        let mut ack = [0u8; 1];
        s.read_exact(&mut ack)?;
        let total = started.elapsed();
        let (received, first_to_last) = receiver
            .join()
            .map_err(|_| io::Error::other("receiver panicked"))??;
        Ok(Transfer {
            bytes: received,
            first_to_last,
            total,
        })
    }
}

impl Drop for CellularLink {
    fn drop(&mut self) {
        let _guard = lock();
        if let Err(e) = run(Command::new(&self.tool).args(["down", "--ns", &self.ns])) {
            eprintln!("cellular link {}: {e}", self.ns);
        }
        let _ = std::fs::remove_file(&self.claim);
    }
}

/// One plain TCP transfer over a link.
#[derive(Debug, Clone, Copy)]
pub struct Transfer {
    pub bytes: u64,
    /// From the first byte the receiver read to the last.
    pub first_to_last: Duration,
    /// From connect to the receiver's answer after the last byte.
    pub total: Duration,
}

impl Transfer {
    /// Bytes per second from the first byte read to the last.
    pub fn bytes_per_s(&self) -> f64 {
        self.bytes as f64 / self.first_to_last.as_secs_f64().max(1e-6)
    }
}

/// [`CellularLink::in_namespace`] by namespace name (for code that holds only the name).
pub fn in_namespace<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let path = Path::new("/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = File::open(&path)?;
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(io::Error::from)?;
            Ok(f())
        })
        .join()
        .map_err(|_| io::Error::other("thread in the namespace panicked"))?
    })
}

/// A TCP connection made from inside namespace `ns`.
pub fn connect_in(ns: &str, to: SocketAddr) -> io::Result<TcpStream> {
    in_namespace(ns, || {
        TcpStream::connect_timeout(&to, Duration::from_secs(10))
    })?
}

/// CPU time (user + system) process `pid` has used so far, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) close with ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| io::Error::other("malformed /proc stat"))?;
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11) // state .. cmajflt: utime is field 14, the 12th after ')'
        .take(2)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let ticks = f.iter().sum::<u64>();
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64))
}

/// `sysconf(_SC_CLK_TCK)`, the unit of `/proc/PID/stat` times.
fn clock_ticks() -> u64 {
    static TCK: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TCK.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

/// Mosquitto as the central broker inside a link's namespace, listening on
/// [`LinkCentral::PORT`] of the namespace's address: the relay reaches it across the link
/// (and so does a control client started here). Killed on drop; drop it before the link.
pub struct LinkCentral {
    pub addr: Ipv4Addr,
    /// `max_inflight_messages` (also its Receive Maximum); more lines in `extra`.
    pub inflight: u32,
    pub extra: String,
    exec: Vec<OsString>,
    dir: PathBuf,
    child: Option<std::process::Child>,
}

impl LinkCentral {
    pub const PORT: u16 = 1883;

    /// Starts it in `link`'s namespace with its data in `dir/central`.
    pub async fn start(dir: &Path, link: &CellularLink, inflight: u32, extra: &str) -> LinkCentral {
        let dir = dir.join("central");
        std::fs::create_dir_all(&dir).expect("central dir");
        let mut c = LinkCentral {
            addr: link.addr,
            inflight,
            extra: extra.to_string(),
            exec: link.exec_prefix(),
            dir,
            child: None,
        };
        c.restart().await;
        c
    }

    /// (Re)starts on the same data directory and waits until it listens.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "central broker already running");
        let conf = self.dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {port} {addr}\nallow_anonymous true\npersistence true\n\
                 persistence_location {dir}/\nautosave_interval 1\nmax_queued_messages 1000000\n\
                 max_inflight_messages {inflight}\nlog_dest file {dir}/mosquitto.log\n{extra}\n",
                port = Self::PORT,
                addr = self.addr,
                dir = self.dir.display(),
                inflight = self.inflight,
                extra = self.extra
            ),
        )
        .expect("central config");
        let child = Command::new(&self.exec[0])
            .args(&self.exec[1..])
            .arg("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start mosquitto (apt-get install mosquitto)");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::net::TcpStream::connect((self.addr, Self::PORT)),
            )
            .await;
            if matches!(attempt, Ok(Ok(_))) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "central broker in the link's namespace does not listen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Its URL as the relay sees it (across the link).
    pub fn url(&self) -> String {
        format!("mqtt://{}:{}", self.addr, Self::PORT)
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for LinkCentral {
    fn drop(&mut self) {
        self.kill();
    }
}

//! The `trainrelay` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use trainrelay::config::{Config, ConfigError};
use trainrelay::password::PasswordError;

#[derive(Parser)]
#[command(
    name = "trainrelay",
    version,
    about = "Store-and-forward MQTT relay for trains"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (built-in laptop defaults when no config file is given).
    Run {
        /// The TOML config file.
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Ask the running daemon how it is: uplink, waiting messages, iPads, drops.
    ///
    /// Exit codes: 0 answered, 3 the daemon is not running, 4 access denied, 1 other errors.
    Status {
        /// The daemon's config file, for the socket path (default: /etc/trainrelay/trainrelay.toml
        /// if it exists, else the built-in default).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// The status socket, overriding the config.
        #[arg(short, long)]
        socket: Option<PathBuf>,
        /// Print the daemon's answers as JSON (`{"status":{...},"clients":[...]}`).
        #[arg(long)]
        json: bool,
        /// Refresh every SECONDS until interrupted.
        #[arg(short, long, value_name = "SECONDS")]
        watch: Option<f64>,
        /// Ask the uplink to drop its connection and reconnect now.
        #[arg(long, conflicts_with_all = ["json", "watch"])]
        reconnect: bool,
        /// List the messages the central broker would not take.
        #[arg(long, conflicts_with_all = ["watch", "reconnect"])]
        dead_letters: bool,
        /// Put every dead letter back into the queue.
        #[arg(long, conflicts_with_all = ["json", "watch", "reconnect", "dead_letters"])]
        requeue: bool,
        /// Print the status as metrics: `prometheus` (text format 0.0.4, what node_exporter's
        /// textfile collector reads) or `openmetrics`. A daemon that does not answer is
        /// reported as `trainrelay_up 0`.
        #[arg(long, value_enum, conflicts_with_all = ["json", "watch", "reconnect", "dead_letters", "requeue"])]
        format: Option<MetricsFormat>,
        /// With --format: write to FILE (replaced atomically, for the textfile collector)
        /// instead of standard output.
        #[arg(long, value_name = "FILE", requires = "format")]
        output: Option<PathBuf>,
    },
    /// Read a password (without echo from a terminal, else one line of stdin) and print its
    /// argon2 hash for `password_hash` of a `[[local.device]]`.
    Passwd,
    /// Check a config file and exit: 0 if valid, 2 if not.
    CheckConfig {
        /// The TOML config file.
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Status {
            config,
            socket,
            json,
            watch,
            reconnect,
            dead_letters,
            requeue,
            format,
            output,
        } => match format {
            Some(format) => metrics(config, socket, format, output),
            None => status(
                config,
                socket,
                json,
                watch,
                reconnect,
                dead_letters,
                requeue,
            ),
        },
        Command::Passwd => match read_password().and_then(|p| {
            if p.is_empty() {
                return Err(PasswdError::Empty);
            }
            Ok(trainrelay::password::hash_password(p.as_bytes())?)
        }) {
            Ok(hash) => {
                println!("{hash}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trainrelay passwd: {e}");
                ExitCode::FAILURE
            }
        },
        Command::CheckConfig { config } => match Config::load(&config) {
            Ok(c) => {
                if let Some(note) = c.builtin_routes_note(&config) {
                    println!("{note}");
                }
                println!("config {}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trainrelay: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config: file } => {
            limit_malloc_arenas();
            let config = match &file {
                Some(file) => match Config::load(file) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("trainrelay: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => Config::builtin(),
            };
            trainrelay::logging::init_for(&config.train_id, &config.log.level);
            if let Some(note) = file.as_ref().and_then(|f| config.builtin_routes_note(f)) {
                log::warn!("{note}");
            }
            let runtime = match runtime().build() {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(trainrelay::daemon::run_from(config, file)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{}", describe(&e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// At most two glibc malloc arenas. By default glibc gives each thread that allocates an arena
/// of its own (up to eight per core), and each keeps the memory it once held: during a drain
/// the daemon's threads held a megabyte more that way (docs/benchmarks.md). Other C libraries
/// have no such arenas.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt changes a glibc tunable under glibc's own lock; called before the
    // daemon starts its threads, so every later arena obeys it.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// The daemon's async runtime: one worker thread unless `TOKIO_WORKER_THREADS` says otherwise.
/// The local broker, the store's writer and its reader have threads of their own; what is left
/// (the uplink connections, the downlink, the status socket) needs less than a core, and a
/// second worker mostly woke up to steal a task from the first: on the paced bench one worker
/// costs 13 % less CPU per message (docs/benchmarks.md).
fn runtime() -> tokio::runtime::Builder {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        builder.worker_threads(1);
    }
    builder
}

/// The error and its causes on one line, leaving out a cause whose text the message before it
/// already carries (many of our errors name their source in their own text).
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// The default config file of an installed daemon.
const SYSTEM_CONFIG: &str = "/etc/trainrelay/trainrelay.toml";

/// `trainrelay status --format`'s formats.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum MetricsFormat {
    Prometheus,
    Openmetrics,
}

/// The status socket and the train id, from `--socket`, the config file or the defaults. A
/// given `--socket` needs no readable config (a technician's own user may not read it).
fn locate(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
) -> Result<(PathBuf, String), ConfigError> {
    if let (Some(socket), None) = (&socket, &config) {
        let train_id = Config::load(std::path::Path::new(SYSTEM_CONFIG))
            .map_or_else(|_| "unknown".to_string(), |c| c.train_id);
        return Ok((socket.clone(), train_id));
    }
    let file = config.or_else(|| {
        let system = PathBuf::from(SYSTEM_CONFIG);
        system.exists().then_some(system)
    });
    let config = match file {
        Some(file) => Config::load(&file)?,
        None => Config::builtin(),
    };
    Ok((socket.unwrap_or(config.status.socket), config.train_id))
}

/// `trainrelay status --format prometheus|openmetrics [--output FILE]`.
fn metrics(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    format: MetricsFormat,
    output: Option<PathBuf>,
) -> ExitCode {
    use trainrelay::status::{client, metrics};
    let format = match format {
        MetricsFormat::Prometheus => metrics::Format::Prometheus,
        MetricsFormat::Openmetrics => metrics::Format::OpenMetrics,
    };
    let (socket, train_id) = match locate(config, socket) {
        Ok(found) => found,
        Err(e) => {
            eprintln!("trainrelay: {e}");
            return ExitCode::from(2);
        }
    };
    let (text, code) = match client::ask_all(&socket) {
        Ok((status, clients)) => (
            metrics::render(&status, &clients, format),
            ExitCode::SUCCESS,
        ),
        Err(e) => {
            eprintln!("trainrelay status: {e}");
            (
                metrics::render_down(&train_id, format),
                ExitCode::from(e.exit_code()),
            )
        }
    };
    let Some(path) = output else {
        print!("{text}");
        return code;
    };
    // Write beside the target and rename over it: a collector never reads half a file.
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        if let Err(rm) = std::fs::remove_file(&tmp) {
            if rm.kind() != std::io::ErrorKind::NotFound {
                eprintln!("trainrelay status: cannot remove {}: {rm}", tmp.display());
            }
        }
        eprintln!("trainrelay status: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    code
}

fn status(
    config: Option<PathBuf>,
    socket: Option<PathBuf>,
    json: bool,
    watch: Option<f64>,
    reconnect: bool,
    dead_letters: bool,
    requeue: bool,
) -> ExitCode {
    use trainrelay::status::client;
    let socket = match locate(config, socket) {
        Ok((socket, _)) => socket,
        Err(e) => {
            eprintln!("trainrelay: {e}");
            return ExitCode::from(2);
        }
    };
    if dead_letters {
        return match client::ask(&socket, trainrelay::status::protocol::Query::DeadLetters) {
            Ok(r) => {
                let list = r.dead_letters.unwrap_or_default();
                if json {
                    println!("{}", serde_json::json!({ "dead_letters": list }));
                } else if list.is_empty() {
                    println!("no dead letters");
                } else {
                    for d in &list {
                        println!(
                            "{}  {}  route {}  {} B  {} attempts  {}",
                            d.msg_id, d.topic, d.route, d.size, d.attempts, d.reason
                        );
                    }
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trainrelay status: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    let one_shot = if requeue {
        Some(trainrelay::status::protocol::Query::Requeue)
    } else if reconnect {
        Some(trainrelay::status::protocol::Query::Reconnect)
    } else {
        None
    };
    if let Some(query) = one_shot {
        return match client::ask(&socket, query) {
            Ok(r) => {
                println!("{}", r.message.unwrap_or_else(|| "ok".into()));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trainrelay status: {e}");
                ExitCode::from(e.exit_code())
            }
        };
    }
    let every = match watch {
        Some(s) if s.is_finite() && s >= 0.1 => Some(std::time::Duration::from_secs_f64(s)),
        Some(_) => {
            eprintln!("trainrelay status: --watch wants at least 0.1 seconds");
            return ExitCode::from(2);
        }
        None => None,
    };
    loop {
        let outcome = client::ask_all(&socket);
        let code = match &outcome {
            Ok((status, clients)) => {
                let now_ms = trainrelay::clock::Stamp::now().wall_ms;
                if every.is_some() && !json {
                    // Clear the screen and home the cursor, like watch(1).
                    print!("\x1b[2J\x1b[H");
                }
                if json {
                    let doc = serde_json::json!({ "status": status, "clients": clients });
                    println!("{doc}");
                } else {
                    print!("{}", client::render(status, clients, now_ms));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trainrelay status: {e}");
                ExitCode::from(e.exit_code())
            }
        };
        let Some(every) = every else {
            return code;
        };
        if let Err(client::ClientError::AccessDenied(_)) = outcome {
            return code;
        }
        std::thread::sleep(every);
    }
}

/// Why `trainrelay passwd` made no hash.
#[derive(Debug, thiserror::Error)]
enum PasswdError {
    #[error("cannot read terminal settings: {0}")]
    TerminalSettings(#[source] nix::Error),
    #[error("cannot turn off echo: {0}")]
    Echo(#[source] nix::Error),
    #[error("cannot read the password: {0}")]
    Read(#[source] std::io::Error),
    #[error("the password is empty")]
    Empty,
    #[error(transparent)]
    Hash(#[from] PasswordError),
}

/// One line of stdin without its line end; from a terminal, prompted and not echoed.
fn read_password() -> Result<String, PasswdError> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    use std::io::{BufRead, IsTerminal};
    let stdin = std::io::stdin();
    let saved = if stdin.is_terminal() {
        // Standard error is unbuffered: the prompt is out before echo goes off.
        eprint!("password: ");
        let saved = tcgetattr(&stdin).map_err(PasswdError::TerminalSettings)?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet).map_err(PasswdError::Echo)?;
        Some(saved)
    } else {
        None
    };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(saved) = saved {
        let restored = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
        eprintln!();
        if let Err(e) = restored {
            eprintln!("trainrelay passwd: cannot turn echo back on: {e} (run `stty echo`)");
        }
    }
    read.map_err(PasswdError::Read)?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

//! The `trainrelay` command.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use trainrelay::config::Config;

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
        Command::Passwd => match read_password().and_then(|p| {
            if p.is_empty() {
                return Err("the password is empty".into());
            }
            trainrelay::auth::hash_password(p.as_bytes())
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
            Ok(_) => {
                println!("config {}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("trainrelay: {e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let config = match config {
                Some(file) => match Config::load(&file) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("trainrelay: {e}");
                        return ExitCode::from(2);
                    }
                },
                None => Config::builtin(),
            };
            trainrelay::logging::init();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    log::error!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(trainrelay::daemon::run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    log::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// One line of stdin without its line end; from a terminal, prompted and not echoed.
fn read_password() -> Result<String, String> {
    use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let saved = if stdin.is_terminal() {
        eprint!("password: ");
        let _ = std::io::stderr().flush();
        let saved = tcgetattr(&stdin).map_err(|e| format!("cannot read terminal settings: {e}"))?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet)
            .map_err(|e| format!("cannot turn off echo: {e}"))?;
        Some(saved)
    } else {
        None
    };
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(saved) = saved {
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
        eprintln!();
    }
    read.map_err(|e| format!("cannot read the password: {e}"))?;
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

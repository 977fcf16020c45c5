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
    /// Check a config file and exit: 0 if valid, 2 if not.
    CheckConfig {
        /// The TOML config file.
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
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

//! Logging: to journald with structured fields when running under it, else readable stderr.
//! The level comes from `RUST_LOG` (default `info`).

/// Installs the logger once, early in `main`.
pub fn init() {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<log::LevelFilter>().ok())
        .unwrap_or(log::LevelFilter::Info);
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
            if logger.install().is_ok() {
                log::set_max_level(level);
                return;
            }
        }
    }
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log::LevelFilter::Info);
    builder.parse_default_env();
    let _ = builder.try_init();
}

//! Logging: to journald with structured fields when running under it, else readable stderr.
//!
//! The level comes from `RUST_LOG` when it is set, else from the config's `log.level`
//! (default [`DEFAULT_LEVEL`]), both written as `RUST_LOG`-style directives. The filter lives
//! in this module rather than in env_logger so that SIGHUP can change it at runtime
//! ([`set_filter`]).
//!
//! Under journald every record carries `TRAIN_ID`; call sites add `ROUTE`, `CLIENT_ID` or
//! `ENDPOINT` as key-values (`log::info!(route = name; "...")`), which the journal logger turns
//! into upper-case fields, so `journalctl TRAIN_ID=T1 ROUTE=reports` finds them.

use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use log::{LevelFilter, Log, Metadata, Record};

/// The level when neither the config nor `RUST_LOG` gives one.
pub const DEFAULT_LEVEL: &str = "info";

/// Why a `RUST_LOG`-style filter is refused, naming the directive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("'{0}' is not a log level")]
    Level(String),
    #[error("'{level}' (for {target}) is not a log level")]
    TargetLevel { target: String, level: String },
    #[error("'{0}' names no target")]
    NoTarget(String),
}

/// `RUST_LOG`-style directives: a default level and per-target (module prefix) levels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    default: LevelFilter,
    /// Longest target first, so the most specific directive wins.
    targets: Vec<(String, LevelFilter)>,
}

impl Filter {
    /// Parses `"info,trainrelay::uplink=debug"`. A directive without `=` sets the default;
    /// `target=level` sets the level of that target and everything below it. Targets not
    /// mentioned fall back to the default (info when none is given).
    pub fn parse(spec: &str) -> Result<Filter, FilterError> {
        let mut filter = Filter {
            default: LevelFilter::Info,
            targets: Vec::new(),
        };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                None => {
                    filter.default = part
                        .parse()
                        .map_err(|_| FilterError::Level(part.to_string()))?;
                }
                Some((target, level)) => {
                    let level: LevelFilter =
                        level.trim().parse().map_err(|_| FilterError::TargetLevel {
                            target: target.to_string(),
                            level: level.to_string(),
                        })?;
                    let target = target.trim();
                    if target.is_empty() {
                        return Err(FilterError::NoTarget(part.to_string()));
                    }
                    filter.targets.push((target.to_string(), level));
                }
            }
        }
        filter
            .targets
            .sort_by_key(|(t, _)| std::cmp::Reverse(t.len()));
        Ok(filter)
    }

    fn level_for(&self, target: &str) -> LevelFilter {
        self.targets
            .iter()
            .find(|(t, _)| {
                target == t
                    || (target.starts_with(t.as_str()) && target[t.len()..].starts_with("::"))
            })
            .map_or(self.default, |(_, l)| *l)
    }

    /// The most verbose level any target gets; the `log` crate's global cap.
    fn max(&self) -> LevelFilter {
        self.targets
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, std::cmp::max)
    }
}

struct Logger {
    inner: Box<dyn Log>,
    filter: RwLock<Filter>,
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        let filter = match self.filter.read() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        };
        metadata.level() <= filter.level_for(metadata.target())
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            self.inner.log(record);
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}

static LOGGER: OnceLock<&'static Logger> = OnceLock::new();

/// The filter in effect: `RUST_LOG` if set (and valid), else `configured`.
fn effective(configured: &str) -> Filter {
    if let Ok(env) = std::env::var("RUST_LOG").map(|v| v.trim().to_string()) {
        if env.is_empty() {
            return Filter::parse(configured).unwrap_or_else(|_| fallback());
        }
        match Filter::parse(&env) {
            Ok(f) => return f,
            Err(e) => eprintln!("trainrelay: RUST_LOG ignored: {e}"),
        }
    }
    Filter::parse(configured).unwrap_or_else(|_| fallback())
}

fn fallback() -> Filter {
    Filter::parse(DEFAULT_LEVEL).unwrap_or(Filter {
        default: LevelFilter::Info,
        targets: Vec::new(),
    })
}

/// Installs the logger once, early in `main`, with the built-in level and no train id.
pub fn init() {
    init_for("", DEFAULT_LEVEL);
}

/// Installs the logger once: journald (with `TRAIN_ID` on every record) when stderr is
/// connected to the journal, else env_logger's readable format on stderr.
pub fn init_for(train_id: &str, level: &str) {
    let filter = effective(level);
    let mut inner: Option<Box<dyn Log>> = None;
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(journal) = systemd_journal_logger::JournalLog::new() {
            let journal = if train_id.is_empty() {
                journal
            } else {
                journal.with_extra_fields(vec![("TRAIN_ID", train_id.to_string())])
            };
            inner = Some(Box::new(journal));
        }
    }
    let inner = inner.unwrap_or_else(|| {
        let mut builder = env_logger::Builder::new();
        builder.filter_level(LevelFilter::Trace);
        Box::new(builder.build())
    });
    let max = filter.max();
    let logger: &'static Logger = Box::leak(Box::new(Logger {
        inner,
        filter: RwLock::new(filter),
    }));
    if log::set_logger(logger).is_ok() {
        log::set_max_level(max);
        if LOGGER.set(logger).is_err() {
            log::warn!("logging: a logger was installed twice; SIGHUP cannot change the level");
        }
    }
}

/// Applies a new configured level (SIGHUP). `RUST_LOG`, when set, still wins. Returns whether
/// the filter changed.
pub fn set_filter(configured: &str) -> bool {
    let Some(logger) = LOGGER.get() else {
        return false;
    };
    let new = effective(configured);
    let mut current = match logger.filter.write() {
        Ok(f) => f,
        Err(poisoned) => poisoned.into_inner(),
    };
    if *current == new {
        return false;
    }
    log::set_max_level(new.max());
    *current = new;
    true
}

/// Lets a repeating message through at most once per `every`, and says how many were held back,
/// so a persisting condition (an accept loop out of file descriptors, a flood of refused
/// sockets) cannot storm the journal.
pub struct Throttle {
    every: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttle {
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed since the last one)` if this occurrence should be logged.
    pub fn allow(&self) -> Option<u64> {
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let now = Instant::now();
        match st.0 {
            Some(last) if now.duration_since(last) < self.every => {
                st.1 += 1;
                None
            }
            _ => {
                let held = st.1;
                *st = (Some(now), 0);
                Some(held)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives() {
        let f = Filter::parse("info").unwrap();
        assert_eq!(f.level_for("trainrelay::uplink"), LevelFilter::Info);
        assert_eq!(f.level_for("rumqttc::state"), LevelFilter::Info);
        let f = Filter::parse("warn,trainrelay::uplink=debug,rumqttc=error").unwrap();
        assert_eq!(f.level_for("trainrelay::uplink::link"), LevelFilter::Debug);
        assert_eq!(f.level_for("trainrelay::uplinkx"), LevelFilter::Warn);
        assert_eq!(f.level_for("rumqttc"), LevelFilter::Error);
        assert_eq!(f.max(), LevelFilter::Debug);
        assert!(Filter::parse("loud").is_err());
        assert!(Filter::parse("x=loud").is_err());
        assert_eq!(
            Filter::parse("error").unwrap().level_for("rumqttc"),
            LevelFilter::Error
        );
    }

    #[test]
    fn throttle_summarises() {
        let t = Throttle::new(Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
    }
}

//! SIGHUP: re-read the config file and apply what can change safely while running.
//!
//! Applied at once: the routes' `ttl` and `priority` (for messages accepted from then on; a
//! queued message keeps the deadline it got when it was accepted), `log.level`, and
//! `status.detail_interval`. Everything else (listen addresses, the uplink, the store, the
//! status socket, the route list itself) is owned by a running loop or an open socket; a change
//! there is reported as needing a restart and the old value stays in effect. An invalid file is
//! rejected as a whole with the reason (naming the key) and the daemon keeps running on the
//! config it has.

use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, RouteConfig};
use crate::route::{Routes, SharedRoutes};

/// What SIGHUP may change, and the config in effect.
pub struct Reloader {
    pub file: Option<std::path::PathBuf>,
    pub current: Config,
    pub routes: SharedRoutes,
    pub detail_interval: watch::Sender<Duration>,
}

impl Reloader {
    /// Re-reads the file and applies it; logs what happened.
    pub fn reload(&mut self) {
        let Some(file) = self.file.clone() else {
            log::warn!("SIGHUP: running on built-in defaults (no --config); nothing to reload");
            return;
        };
        let new = match Config::load(&file) {
            Ok(c) => c,
            Err(e) => {
                log::error!("SIGHUP: {e}; keeping the running config");
                return;
            }
        };
        let (applied, restart) = self.apply(new, &file);
        if applied.is_empty() && restart.is_empty() {
            log::info!("SIGHUP: {} reloaded; nothing changed", file.display());
        } else if !applied.is_empty() {
            log::info!(
                "SIGHUP: {} reloaded; applied {}",
                file.display(),
                applied.join(", ")
            );
        }
        if !restart.is_empty() {
            log::warn!(
                "SIGHUP: {} changed, which takes effect only after a restart; running on the old value",
                restart.join(", ")
            );
        }
    }

    /// Applies the runtime-changeable keys of `new`; returns (applied, needing restart).
    fn apply(&mut self, new: Config, _file: &Path) -> (Vec<String>, Vec<String>) {
        let old = &self.current;
        let mut applied = Vec::new();
        let mut restart = Vec::new();
        let differs =
            |a: &dyn std::fmt::Debug, b: &dyn std::fmt::Debug| format!("{a:?}") != format!("{b:?}");
        if old.train_id != new.train_id {
            restart.push("train_id".to_string());
        }
        if differs(&old.local, &new.local) {
            restart.push("[local]".into());
        }
        if differs(&old.uplink, &new.uplink) {
            restart.push("[uplink]".into());
        }
        if differs(&old.store, &new.store) {
            restart.push("[store]".into());
        }
        if old.status.socket != new.status.socket || old.status.group != new.status.group {
            restart.push("status.socket/status.group".into());
        }
        // Routes: only ttl and priority change at runtime, and only when the list is otherwise
        // the same, so that queued rows keep meaning the same route.
        let same_shape = old.routes.len() == new.routes.len()
            && old
                .routes
                .iter()
                .zip(&new.routes)
                .all(|(a, b)| shape(a) == shape(b));
        let mut next = self.current.clone();
        if same_shape {
            let mut changed = false;
            for (i, (a, b)) in old.routes.iter().zip(&new.routes).enumerate() {
                let name = a.name.as_deref().unwrap_or("?");
                // Keys that decide what is stored and how it is compared: queued rows and
                // stored versions were made under the old ones.
                for (key, differ) in [
                    ("version", differs(&a.version, &b.version)),
                    ("key", a.key != b.key),
                    ("conflate", differs(&a.conflate, &b.conflate)),
                    ("state", a.state != b.state),
                    ("snapshot_topics", a.snapshot_topics != b.snapshot_topics),
                    // Which uplink connection carries what is fixed when they start.
                    ("order", a.order != b.order),
                ] {
                    if differ {
                        log::warn!(
                            "SIGHUP: route {name}: changing `{key}` needs a restart; keeping the old value"
                        );
                        restart.push(format!("route[{i}].{key}"));
                    }
                }
                let route = &mut next.routes[i];
                if a.ttl != b.ttl {
                    applied.push(format!("route[{i}].ttl"));
                    route.ttl = b.ttl;
                    changed = true;
                }
                if a.priority != b.priority {
                    applied.push(format!("route[{i}].priority"));
                    route.priority = b.priority;
                    changed = true;
                }
            }
            if changed {
                self.routes.store(Routes::from_config(&next));
            }
        } else {
            restart.push("the route list".into());
        }
        if old.log.level != new.log.level {
            crate::logging::set_filter(&new.log.level);
            next.log = new.log.clone();
            applied.push(format!("log.level = \"{}\"", new.log.level));
        }
        if old.status.detail_interval != new.status.detail_interval {
            self.detail_interval
                .send_replace(new.status.detail_interval);
            next.status.detail_interval = new.status.detail_interval;
            applied.push("status.detail_interval".into());
        }
        self.current = next;
        (applied, restart)
    }
}

/// A route without the keys SIGHUP may change.
fn shape(r: &RouteConfig) -> String {
    format!(
        "{:?} {:?} {} {} {}",
        r.name, r.direction, r.local, r.remote, r.qos
    )
}

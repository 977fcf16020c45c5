//! Routes: which messages cross between the local broker and the central broker, under which
//! topic, and with which TTL and priority.
//!
//! Mapping works like a Mosquitto bridge's prefixes, generalised: the levels that the source
//! filter's wildcards match are carried over into the same wildcards of the destination pattern
//! (config validation guarantees both have the same wildcards in the same order). The first
//! route that matches a topic wins.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::{Config, Conflate, Direction, Order, VersionSource};
use crate::message::Message;
use crate::topic;

/// One configured route, ready to match.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub direction: Direction,
    /// Filter matched against the source side's topics.
    pub from: String,
    /// Pattern that builds the destination topic.
    pub to: String,
    pub qos: u8,
    pub ttl: Option<Duration>,
    pub priority: u8,
    /// Where the version is read for outdated-message suppression (see `freshness`).
    pub version: Option<VersionSource>,
    /// `"topic"` (the source topic) or a v5 user property name: what "the same thing" is.
    pub key: String,
    pub conflate: Conflate,
    /// Uplink: what keeps its order across parallel uplink connections.
    pub order: Order,
    /// Downlink: injected as retained whatever the flag said.
    pub state: bool,
    /// Downlink: exact remote topics also subscribed to, for the initial snapshot.
    pub snapshot_topics: Vec<String>,
}

/// All routes, in config order.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    up: Vec<Route>,
    down: Vec<Route>,
}

impl Route {
    /// The key of `msg` (seen on this route's source side) for versions and conflation: its
    /// topic, or the named user property (the topic when the property is missing).
    pub fn key_of(&self, msg: &Message) -> String {
        if self.key != "topic" {
            if let Some((_, v)) = msg
                .properties
                .user_properties
                .iter()
                .rev()
                .find(|(k, _)| *k == self.key)
            {
                return v.clone();
            }
        }
        msg.topic.clone()
    }
}

impl Routes {
    /// Builds the routes of a validated config.
    pub fn from_config(config: &Config) -> Routes {
        let mut routes = Routes::default();
        for r in &config.routes {
            let (from, to) = match r.direction {
                Direction::Up => (r.local.clone(), r.remote.clone()),
                Direction::Down => (r.remote.clone(), r.local.clone()),
            };
            let route = Route {
                name: r.name.clone().unwrap_or_default(),
                direction: r.direction,
                from,
                to,
                qos: r.qos,
                ttl: r.ttl,
                priority: r.priority,
                version: r.version.clone(),
                key: r.key.clone(),
                conflate: r.conflate,
                order: r.order,
                state: r.state,
                snapshot_topics: r.snapshot_topics.clone(),
            };
            match r.direction {
                Direction::Up => routes.up.push(route),
                Direction::Down => routes.down.push(route),
            }
        }
        routes
    }

    /// Names of the uplink routes that keep strict FIFO order across their topics.
    pub fn fifo_up_routes(&self) -> Vec<String> {
        self.up
            .iter()
            .filter(|r| r.order == Order::Route)
            .map(|r| r.name.clone())
            .collect()
    }

    /// The uplink route for a local topic, and the remote topic it maps to.
    pub fn up(&self, local_topic: &str) -> Option<(&Route, String)> {
        first_match(&self.up, local_topic)
    }

    /// The downlink route for a remote topic, and the local topic it maps to.
    pub fn down(&self, remote_topic: &str) -> Option<(&Route, String)> {
        first_match(&self.down, remote_topic)
    }

    /// The remote filters to subscribe to on the central broker, with their QoS: every
    /// downlink route's filter, then its snapshot topics (each filter once).
    pub fn down_filters(&self) -> Vec<(String, u8)> {
        let mut out: Vec<(String, u8)> = Vec::new();
        let all = self.down.iter().map(|r| (r.from.clone(), r.qos)).chain(
            self.down
                .iter()
                .flat_map(|r| r.snapshot_topics.iter().map(|t| (t.clone(), r.qos))),
        );
        for (filter, qos) in all {
            if !out.iter().any(|(f, _)| *f == filter) {
                out.push((filter, qos));
            }
        }
        out
    }

    /// The local topic patterns that only the relay may publish to (downlink destinations).
    pub fn down_local_patterns(&self) -> Vec<String> {
        self.down.iter().map(|r| r.to.clone()).collect()
    }

    /// The local filters of the uplink routes: what local clients publish into by default.
    pub fn up_local_filters(&self) -> Vec<String> {
        self.up.iter().map(|r| r.from.clone()).collect()
    }
}

/// The routes in effect, replaceable at runtime (SIGHUP applies new TTLs and priorities).
/// Readers take a snapshot per message, so a message is routed by one consistent set.
#[derive(Debug, Clone, Default)]
pub struct SharedRoutes(Arc<RwLock<Arc<Routes>>>);

impl SharedRoutes {
    pub fn new(routes: Routes) -> SharedRoutes {
        SharedRoutes(Arc::new(RwLock::new(Arc::new(routes))))
    }

    /// The current routes.
    pub fn load(&self) -> Arc<Routes> {
        match self.0.read() {
            Ok(g) => Arc::clone(&g),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Replaces the routes for every later message.
    pub fn store(&self, routes: Routes) {
        let mut g = match self.0.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *g = Arc::new(routes);
    }
}

fn first_match<'a>(routes: &'a [Route], topic_name: &str) -> Option<(&'a Route, String)> {
    routes
        .iter()
        .filter(|r| topic::matches(&r.from, topic_name))
        .find_map(|r| map_topic(&r.from, &r.to, topic_name).map(|t| (r, t)))
}

/// Maps `topic_name` (matched by `from`) onto `to`, carrying over the wildcard levels.
pub fn map_topic(from: &str, to: &str, topic_name: &str) -> Option<String> {
    let mut captured: Vec<Option<&str>> = Vec::new();
    let mut levels = topic_name.split('/');
    let mut consumed = 0usize;
    for f in from.split('/') {
        match f {
            "#" => {
                // The rest of the topic, possibly nothing ("a/#" matches "a").
                let rest = topic_name.get(consumed..).unwrap_or("");
                captured.push(if rest.is_empty() { None } else { Some(rest) });
                break;
            }
            "+" => {
                let level = levels.next()?;
                consumed += level.len() + 1;
                captured.push(Some(level));
            }
            literal => {
                let level = levels.next()?;
                if level != literal {
                    return None;
                }
                consumed += level.len() + 1;
            }
        }
    }
    let mut out: Vec<&str> = Vec::new();
    let mut captures = captured.into_iter();
    for t in to.split('/') {
        match t {
            "+" => out.push(captures.next()??),
            "#" => {
                if let Some(rest) = captures.next()? {
                    out.push(rest);
                }
            }
            literal => out.push(literal),
        }
    }
    Some(out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_wildcard_levels_over() {
        assert_eq!(
            map_topic("up/#", "trains/T1/up/#", "up/a/b").as_deref(),
            Some("trains/T1/up/a/b")
        );
        assert_eq!(
            map_topic("up/#", "trains/T1/up/#", "up").as_deref(),
            Some("trains/T1/up")
        );
        assert_eq!(
            map_topic("a/+/c/#", "x/+/y/#", "a/1/c/2/3").as_deref(),
            Some("x/1/y/2/3")
        );
        assert_eq!(map_topic("a/b", "c/d", "a/b").as_deref(), Some("c/d"));
        assert_eq!(map_topic("up/#", "r/#", "down/x"), None);
        assert_eq!(map_topic("#", "r/#", "Ü/x").as_deref(), Some("r/Ü/x"));
    }

    #[test]
    fn first_route_wins() {
        let cfg = Config::builtin();
        let routes = Routes::from_config(&cfg);
        let (r, t) = routes.up("up/speed").unwrap();
        assert_eq!(t, "trains/T1/up/speed");
        assert_eq!(r.ttl, Some(Duration::from_secs(600)));
        assert!(routes.up("down/speed").is_none());
        let (_, t) = routes.down("trains/T1/down/speed").unwrap();
        assert_eq!(t, "down/speed");
        assert_eq!(routes.down_filters().len(), 2);
    }
}

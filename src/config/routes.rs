//! `[[route]]`: the mappings between local and remote topic trees.

use std::time::Duration;

use serde::Deserialize;

use super::Invalid;
use crate::topic;

/// Which way a route carries messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Local broker -> store -> central broker.
    Up,
    /// Central broker -> local broker.
    Down,
}

/// `[[route]]`: a mapping between a local and a remote topic tree.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name used in status and logs; defaults to `up:<local>` or `down:<remote>`.
    pub name: Option<String>,
    pub direction: Direction,
    /// Local topic filter (up) or local topic pattern (down).
    pub local: String,
    /// Remote topic pattern (up) or remote topic filter to subscribe to (down).
    pub remote: String,
    /// QoS towards the destination: 0 or 1 (QoS 2 is never used upstream).
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Lifetime of a message that carries no v5 Message Expiry Interval.
    #[serde(default, with = "humantime_serde")]
    pub ttl: Option<Duration>,
    /// Uplink drain priority, 0 (first) to 9 (last).
    #[serde(default = "default_priority")]
    pub priority: u8,
    /// Where a message's version is read, for dropping outdated messages (see `freshness`).
    #[serde(default)]
    pub version: Option<VersionSource>,
    /// What identifies "the same thing" for versions and conflation: `"topic"` (the source
    /// topic) or the name of a v5 user property.
    #[serde(default = "default_key")]
    pub key: String,
    /// Uplink: whether a newer waiting message replaces an older one of the same key.
    #[serde(default)]
    pub conflate: Conflate,
    /// Uplink: what keeps its order across the parallel uplink connections.
    #[serde(default)]
    pub order: Order,
    /// Downlink: keep each topic's latest message as local retained state, whatever its
    /// retain flag (3.1.1 central brokers clear the flag on live delivery).
    #[serde(default)]
    pub state: bool,
    /// Downlink: exact remote topics subscribed to as well, so brokers that serve retained
    /// messages only to exact-topic subscriptions (RabbitMQ) deliver the initial state.
    #[serde(default)]
    pub snapshot_topics: Vec<String>,
}

/// Where a route reads a message's version.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum VersionSource {
    /// A v5 user property of that name.
    UserProperty(String),
    /// A top-level field of a JSON object payload.
    JsonField(String),
}

/// What an uplink route keeps in order across the parallel uplink connections
/// (`uplink.connections`): every message of one topic (and of one conflation key) always
/// travels on the same connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    /// Per topic, MQTT's ordered-topic rule: topics are spread over the connections.
    #[default]
    Topic,
    /// Strict FIFO across all the route's topics: the whole route travels on one connection.
    Route,
}

/// Conflation policy of an uplink route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Conflate {
    /// Every message is kept and sent.
    #[default]
    None,
    /// Only the newest waiting message per key is kept.
    Latest,
}

fn default_key() -> String {
    "topic".into()
}

fn default_qos() -> u8 {
    1
}

fn default_priority() -> u8 {
    5
}

/// The routes of the built-in defaults, also used when a config file lists no `[[route]]`:
/// the iPads' `up/#` to the train's uplink tree, the train's downlink tree and the fleet
/// broadcast to the iPads.
pub(super) fn builtin_routes() -> Vec<RouteConfig> {
    let route = |direction, local: &str, remote: &str, ttl| RouteConfig {
        name: None,
        direction,
        local: local.into(),
        remote: remote.into(),
        qos: 1,
        ttl,
        priority: 5,
        version: None,
        key: default_key(),
        conflate: Conflate::None,
        order: Order::Topic,
        state: false,
        snapshot_topics: Vec::new(),
    };
    vec![
        route(
            Direction::Up,
            "up/#",
            "trains/{train_id}/up/#",
            Some(Duration::from_secs(600)),
        ),
        route(Direction::Down, "down/#", "trains/{train_id}/down/#", None),
        route(
            Direction::Down,
            "fleet/broadcast/#",
            "fleet/broadcast/#",
            None,
        ),
    ]
}

/// Checks every route; `train_id` is substituted where the routes name it.
pub(super) fn validate(routes: &[RouteConfig], train_id: &str) -> Result<(), Invalid> {
    let invalid = |key: &str, message: String| Invalid::new(key, message);
    for (i, r) in routes.iter().enumerate() {
        let key = |k: &str| format!("route[{i}].{k}");
        if r.qos > 1 {
            return Err(invalid(
                &key("qos"),
                format!("{} is not allowed: use 0 or 1", r.qos),
            ));
        }
        if r.priority > 9 {
            return Err(invalid(
                &key("priority"),
                format!("{} is out of range 0..=9", r.priority),
            ));
        }
        if r.ttl.is_some_and(|t| t.is_zero()) {
            return Err(invalid(&key("ttl"), "must be above zero".into()));
        }
        if r.key.is_empty() {
            return Err(invalid(
                &key("key"),
                "must be \"topic\" or a user property name".into(),
            ));
        }
        if let Some(VersionSource::UserProperty(n) | VersionSource::JsonField(n)) = &r.version {
            if n.is_empty() {
                return Err(invalid(&key("version"), "names an empty field".into()));
            }
        }
        if r.direction == Direction::Down && r.conflate != Conflate::None {
            return Err(invalid(
                &key("conflate"),
                "applies to uplink routes only (downlink messages are not queued)".into(),
            ));
        }
        if r.direction == Direction::Up && (r.state || !r.snapshot_topics.is_empty()) {
            return Err(invalid(
                &key(if r.state { "state" } else { "snapshot_topics" }),
                "applies to downlink routes only".into(),
            ));
        }
        for t in &r.snapshot_topics {
            let t = t.replace("{train_id}", train_id);
            let remote = r.remote.replace("{train_id}", train_id);
            if topic::validate_name(&t).is_err() || !topic::matches(&remote, &t) {
                return Err(invalid(
                    &key("snapshot_topics"),
                    format!("'{t}' must be an exact topic matched by remote '{remote}'"),
                ));
            }
        }
        let (from_key, from, to_key, to) = match r.direction {
            Direction::Up => ("local", &r.local, "remote", &r.remote),
            Direction::Down => ("remote", &r.remote, "local", &r.local),
        };
        topic::validate_filter(from)
            .map_err(|e| invalid(&key(from_key), format!("invalid filter '{from}': {e}")))?;
        topic::validate_filter(to)
            .map_err(|e| invalid(&key(to_key), format!("invalid pattern '{to}': {e}")))?;
        if wildcards(from) != wildcards(to) {
            return Err(invalid(
                &key(to_key),
                format!(
                    "'{to}' must have the same wildcards in the same order as '{from}', so that the matched levels can be carried over"
                ),
            ));
        }
    }
    Ok(())
}

/// The wildcard levels of a filter, in order.
fn wildcards(filter: &str) -> Vec<&str> {
    filter
        .split('/')
        .filter(|l| *l == "+" || *l == "#")
        .collect()
}

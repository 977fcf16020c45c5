//! A session's subscriptions and how one message maps onto them.
//!
//! A client may hold overlapping subscriptions (`a/#` and `a/b`). MQTT 5 §3.3.4 allows either
//! one copy per subscription or a single copy; we send a single copy at the highest granted QoS
//! that carries every matching Subscription Identifier, because a cab iPad showing the same
//! order twice is worse than the alternative.
//!
//! Shared subscriptions (`$share/{group}/{filter}`, MQTT 5 §4.8.2) are kept here under their
//! full filter, like any other, but [`Subscriptions::matching`] leaves them out: the router
//! picks one member of each group per message ([`shared_parts`]).

use std::collections::HashMap;

use crate::message::QoS;
use crate::topic;

/// One subscription with its v5 options (3.1.1 subscriptions use the defaults).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub filter: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub id: Option<usize>,
}

/// The result of matching a topic against all of one session's subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub qos: QoS,
    pub retain_as_published: bool,
    pub sub_ids: Vec<usize>,
}

/// Subscriptions keyed by filter.
#[derive(Debug, Clone, Default)]
pub struct Subscriptions {
    by_filter: HashMap<String, Subscription>,
}

impl Subscriptions {
    pub fn len(&self) -> usize {
        self.by_filter.len()
    }

    pub fn contains(&self, filter: &str) -> bool {
        self.by_filter.contains_key(filter)
    }

    /// Adds or replaces; returns true if the filter was new.
    pub fn insert(&mut self, sub: Subscription) -> bool {
        self.by_filter.insert(sub.filter.clone(), sub).is_none()
    }

    pub fn remove(&mut self, filter: &str) -> bool {
        self.by_filter.remove(filter).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Subscription> {
        self.by_filter.values()
    }

    /// The combined match for `topic`, or `None` if no subscription takes it. `own_message`:
    /// the publisher is this session's client, so No Local subscriptions do not take it.
    pub fn matching(&self, topic: &str, own_message: bool) -> Option<Match> {
        let mut found: Option<Match> = None;
        for sub in self.by_filter.values() {
            if shared_parts(&sub.filter).is_some() {
                continue;
            }
            if own_message && sub.no_local {
                continue;
            }
            if !topic::matches(&sub.filter, topic) {
                continue;
            }
            let m = found.get_or_insert(Match {
                qos: sub.qos,
                retain_as_published: false,
                sub_ids: Vec::new(),
            });
            m.qos = m.qos.max(sub.qos);
            m.retain_as_published |= sub.retain_as_published;
            if let Some(id) = sub.id {
                m.sub_ids.push(id);
            }
        }
        if let Some(m) = found.as_mut() {
            m.sub_ids.sort_unstable();
        }
        found
    }
}

/// `$share/{group}/{filter}` split into group and filter; `None` for a filter that is not a
/// shared subscription. The group must be non-empty and free of `/`, `+` and `#`; the filter
/// is checked by the caller.
pub fn shared_parts(filter: &str) -> Option<(&str, &str)> {
    let rest = filter.strip_prefix("$share/")?;
    let (group, inner) = rest.split_once('/')?;
    (!group.is_empty() && !group.contains(['+', '#'])).then_some((group, inner))
}

/// Whether `filter` asks for a shared subscription, valid or not (`$share` as first level).
pub fn is_shared(filter: &str) -> bool {
    filter == "$share" || filter.starts_with("$share/")
}

#[cfg(test)]
mod tests {
    #[test]
    fn shared_subscription_filters() {
        use super::shared_parts;
        assert_eq!(shared_parts("$share/g/a/b"), Some(("g", "a/b")));
        assert_eq!(shared_parts("$share/g/#"), Some(("g", "#")));
        assert_eq!(shared_parts("$share//a"), None);
        assert_eq!(shared_parts("$share/g+/a"), None);
        assert_eq!(shared_parts("$share/g"), None);
        assert_eq!(shared_parts("a/b"), None);
    }

    use super::*;

    fn sub(filter: &str, qos: QoS, id: Option<usize>) -> Subscription {
        Subscription {
            filter: filter.into(),
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            id,
        }
    }

    #[test]
    fn overlapping_subscriptions_give_one_copy_at_max_qos_with_all_ids() {
        let mut s = Subscriptions::default();
        s.insert(sub("a/#", QoS::AtMostOnce, Some(1)));
        s.insert(sub("a/b", QoS::ExactlyOnce, Some(2)));
        s.insert(sub("x", QoS::AtLeastOnce, Some(3)));
        let m = s.matching("a/b", false).unwrap();
        assert_eq!(m.qos, QoS::ExactlyOnce);
        assert_eq!(m.sub_ids, vec![1, 2]);
        assert!(s.matching("b", false).is_none());
    }

    #[test]
    fn no_local_skips_own_messages() {
        let mut s = Subscriptions::default();
        let mut a = sub("a", QoS::AtLeastOnce, None);
        a.no_local = true;
        s.insert(a);
        assert!(s.matching("a", true).is_none());
        assert!(s.matching("a", false).is_some());
    }
}

//! Which of the parallel uplink connections carries a message.
//!
//! Every message of one topic (one conflation key, where the route conflates) is carried by
//! the same connection, so MQTT's per-topic order holds however the connections fare; a route
//! with `order = "route"` travels whole on one connection (strict FIFO across its topics). The
//! choice is a stable hash, computed when a row is fetched, so it needs nothing stored: a
//! changed `uplink.connections` takes effect at the next start, when nothing is in flight.

use std::collections::HashSet;

/// The rows one connection takes.
#[derive(Debug, Clone)]
pub struct Partition {
    lane: usize,
    count: usize,
    fifo_routes: HashSet<String>,
}

impl Partition {
    /// Connection `lane` of `count`; `fifo_routes` keep their order across topics.
    pub fn new(lane: usize, count: usize, fifo_routes: &[String]) -> Partition {
        Partition {
            lane,
            count: count.max(1),
            fifo_routes: fifo_routes.iter().cloned().collect(),
        }
    }

    /// Whether this connection carries every row (it is the only one).
    pub fn is_whole(&self) -> bool {
        self.count == 1
    }

    /// Whether this connection carries a row of `route` on `topic` with conflation `key`.
    pub fn takes(&self, route: &str, topic: &str, key: Option<&str>) -> bool {
        self.count == 1 || self.lane_of(route, topic, key) == self.lane
    }

    fn lane_of(&self, route: &str, topic: &str, key: Option<&str>) -> usize {
        let hash = if self.fifo_routes.contains(route) {
            fnv1a(&[route])
        } else {
            fnv1a(&[route, key.unwrap_or(topic)])
        };
        (hash % self.count as u64) as usize
    }
}

/// FNV-1a over the parts (with a separator): stable across runs and builds, unlike the
/// standard library's randomly keyed hasher.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_has_exactly_one_connection() {
        let fifo = vec!["events".to_string()];
        let lanes: Vec<Partition> = (0..4).map(|l| Partition::new(l, 4, &fifo)).collect();
        let mut used = HashSet::new();
        for i in 0..200 {
            let topic = format!("trains/T1/up/pos/{i}");
            let takers: Vec<usize> = lanes
                .iter()
                .enumerate()
                .filter(|(_, p)| p.takes("up", &topic, None))
                .map(|(l, _)| l)
                .collect();
            assert_eq!(takers.len(), 1, "{topic}: {takers:?}");
            used.insert(takers[0]);
            // The same topic always goes the same way; a key overrides the topic.
            assert!(lanes[takers[0]].takes("up", &topic, None));
        }
        assert_eq!(used.len(), 4, "topics spread over every connection");
        // A FIFO route goes whole on one connection.
        let events: HashSet<usize> = (0..50)
            .map(|i| {
                let t = format!("trains/T1/up/ev/{i}");
                (0..4)
                    .find(|&l| lanes[l].takes("events", &t, None))
                    .unwrap()
            })
            .collect();
        assert_eq!(events.len(), 1);
        // One connection takes everything.
        assert!(Partition::new(0, 1, &[]).takes("up", "x", Some("k")));
    }

    #[test]
    fn the_hash_is_stable() {
        // Rows stay with their connection across restarts and builds.
        assert_eq!(
            fnv1a(&["up", "trains/T1/up/x"]),
            fnv1a(&["up", "trains/T1/up/x"])
        );
        assert_ne!(fnv1a(&["up", "a/b"]), fnv1a(&["up/a", "b"]));
        assert_eq!(fnv1a(&[]), 0xcbf2_9ce4_8422_2325);
    }
}

//! The router: turns each bus message into queued frames for this node's connections.
//!
//! Runs on the bus subscriber's task, one message at a time, so per-user order is the
//! order of the bus. Per recipient it does one check and one `try_send` of a shared frame:
//! no JSON, no allocation, no lock across `.await`, no database query.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::{BusEvent, BusHandler, BusMessage, Channel};
use crate::metrics::Metrics;
use crate::registry::{PushError, Registry};

/// How many recent message ids the router remembers to drop redeliveries.
const RECENT_IDS: usize = 1 << 16;

/// Remembers the last [`RECENT_IDS`] ids, to drop a message the bus carries twice
/// (Kafka redelivery after a rebalance) before it reaches any connection again.
struct RecentIds {
    set: HashSet<Box<str>>,
    order: VecDeque<Box<str>>,
}

impl RecentIds {
    fn new() -> Self {
        Self {
            set: HashSet::with_capacity(RECENT_IDS),
            order: VecDeque::with_capacity(RECENT_IDS),
        }
    }

    /// False if `id` was seen recently.
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() == RECENT_IDS {
            if let Some(oldest) = self.order.pop_front() {
                self.set.remove(&oldest);
            }
        }
        self.set.insert(id.into());
        self.order.push_back(id.into());
        true
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Routes bus messages to local connections.
pub struct Router {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    recent: RecentIds,
    /// Registered type names: metric labels for anything else are `other`.
    known_types: HashSet<String>,
}

impl Router {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        known_types: HashSet<String>,
    ) -> Self {
        Self {
            registry,
            metrics,
            recent: RecentIds::new(),
            known_types,
        }
    }

    /// Queues `msg` on every local connection it targets.
    pub fn route(&mut self, msg: &BusMessage) {
        let h = &msg.header;
        if let Some(ttl) = h.ttl_ms {
            if now_ms() > h.ts.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)) {
                self.metrics.dropped.with_label_values(&["expired"]).inc();
                return;
            }
        }
        if !self.recent.insert(&h.id) {
            self.metrics.dropped.with_label_values(&["duplicate"]).inc();
            return;
        }
        let (mut queued, mut full, mut closed) = (0u64, 0u64, 0u64);
        self.registry.for_each_target(&h.to, |conn| {
            match conn.push(msg.frame.clone(), Some(h.ts)) {
                Ok(()) => queued += 1,
                Err(PushError::Overflow) => full += 1,
                Err(PushError::Closed) => closed += 1,
            }
        });
        let label = if self.known_types.contains(&h.msg_type) {
            h.msg_type.as_str()
        } else {
            "other"
        };
        if queued > 0 {
            self.metrics
                .delivered
                .with_label_values(&[label])
                .inc_by(queued);
            self.metrics.deliveries.inc_by(queued);
        }
        if full > 0 {
            self.metrics
                .dropped
                .with_label_values(&["queue_full"])
                .inc_by(full);
        }
        if closed > 0 {
            self.metrics
                .dropped
                .with_label_values(&["closed"])
                .inc_by(closed);
        }
    }
}

impl BusHandler for Router {
    fn on_event(&mut self, event: BusEvent) {
        match event {
            BusEvent::Message {
                channel: Channel::Bus,
                payload,
            } => match BusMessage::decode(payload) {
                Ok(msg) => self.route(&msg),
                Err(e) => {
                    self.metrics.bus_bad_payloads.inc();
                    tracing::warn!(error = %e, "undecodable bus payload dropped");
                }
            },
            BusEvent::Message {
                channel: Channel::Control,
                ..
            } => {
                // Preference changes arrive here once preferences exist (DESIGN §4).
            }
            BusEvent::Gap { reason } => {
                tracing::warn!(
                    reason,
                    "bus gap: messages published meanwhile may be missing"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Header;
    use crate::envelope::Target;
    use crate::registry::Limits;

    fn setup() -> (Router, Arc<Registry>) {
        let metrics = Arc::new(Metrics::new());
        let limits = Limits {
            max_connections: 10,
            max_connections_per_user: 10,
            queue_max_messages: 10,
            queue_max_bytes: 1 << 20,
        };
        let registry = Registry::new(limits, metrics.clone());
        (
            Router::new(registry.clone(), metrics, HashSet::new()),
            registry,
        )
    }

    fn msg(id: &str, to: Target, ts: i64, ttl_ms: Option<u64>) -> BusMessage {
        BusMessage {
            header: Header {
                id: id.into(),
                msg_type: "t".into(),
                to,
                ts,
                ttl_ms,
            },
            frame: format!("frame-{id}").into(),
        }
    }

    #[test]
    fn duplicates_and_expired_messages_are_dropped() {
        let (mut router, registry) = setup();
        let (_g, _c, mut rx) = registry.register("alice", None, None).unwrap();
        let alice = Target::User {
            user: "alice".into(),
            platform: None,
            tab: None,
        };
        router.route(&msg("1", alice.clone(), now_ms(), None));
        router.route(&msg("1", alice.clone(), now_ms(), None));
        router.route(&msg("2", alice.clone(), now_ms() - 10_000, Some(1_000)));
        router.route(&msg("3", alice, now_ms(), Some(60_000)));
        assert_eq!(rx.try_recv().unwrap().frame.as_str(), "frame-1");
        assert_eq!(rx.try_recv().unwrap().frame.as_str(), "frame-3");
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn recent_ids_forget_the_oldest() {
        let mut recent = RecentIds::new();
        assert!(recent.insert("first"));
        for i in 0..RECENT_IDS {
            recent.insert(&i.to_string());
        }
        assert!(recent.insert("first"), "the oldest id was forgotten");
        assert!(!recent.insert(&(RECENT_IDS - 1).to_string()));
    }
}

//! The router: turns each bus message into queued frames for this node's connections.
//!
//! Runs on the bus subscriber's task, one message at a time, so per-user order is the
//! order of the bus. Per recipient it does one preference check (an atomic load and a mask)
//! and one `try_send` of a shared frame: no JSON, no allocation, no lock across `.await`,
//! no database query.
//!
//! Control messages (preference changes) arrive on the same task, so a message published
//! after a change is filtered by the new preferences on every node.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::bus::{BusEvent, BusHandler, BusMessage, Channel};
use crate::gateway::protocol;
use crate::metrics::Metrics;
use crate::prefs::Change;
use crate::registry::{PushError, Registry};
use crate::types::{self, TypeRegistry};

/// How many recent message ids the router remembers to drop redeliveries.
const RECENT_IDS: usize = 1 << 16;

/// Remembers the last [`RECENT_IDS`] ids, to drop a message the bus carries twice
/// (Kafka redelivery after a rebalance) before it reaches any connection again.
struct RecentIds {
    set: HashSet<Arc<str>>,
    order: VecDeque<Arc<str>>,
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
        // One allocation per message, shared by the set and the eviction order.
        let id: Arc<str> = Arc::from(id);
        self.set.insert(id.clone());
        self.order.push_back(id);
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
    /// The type registry: bits for the filter; metric labels (anything else is `other`).
    types: Arc<TypeRegistry>,
}

impl Router {
    pub fn new(registry: Arc<Registry>, metrics: Arc<Metrics>, types: Arc<TypeRegistry>) -> Self {
        Self {
            registry,
            metrics,
            recent: RecentIds::new(),
            types,
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
        let slot = self.types.slot(&h.msg_type);
        let (mut queued, mut filtered, mut full, mut closed) = (0u64, 0u64, 0u64, 0u64);
        self.registry.for_each_target(&h.to, |conn| {
            if !types::accepts(conn.prefs.get(), slot) {
                filtered += 1;
                return;
            }
            match conn.push(msg.frame.clone(), Some(h.ts)) {
                Ok(()) => queued += 1,
                Err(PushError::Overflow) => full += 1,
                Err(PushError::Closed) => closed += 1,
            }
        });
        let label = if self.types.contains(&h.msg_type) {
            h.msg_type.as_str()
        } else {
            "other"
        };
        if filtered > 0 {
            self.metrics
                .filtered
                .with_label_values(&[label])
                .inc_by(filtered);
        }
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

impl Router {
    /// Applies a preference change to this node's connections of that user.
    fn apply(&mut self, change: &Change) {
        let bits = self.types.apply(
            self.types.defaults(),
            change.prefs.iter().map(|(t, e)| (t.as_str(), *e)),
        );
        let frame = protocol::prefs(&self.types.to_map(bits));
        let told = self
            .registry
            .apply_prefs(&change.user, bits, change.version, &frame);
        if told > 0 {
            let latency = (now_ms() - change.ts).max(0) as f64 / 1000.0;
            self.metrics.prefs_change_latency.observe(latency);
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
                payload,
            } => match Change::decode(&payload) {
                Ok(change) => self.apply(&change),
                Err(e) => {
                    self.metrics.bus_bad_payloads.inc();
                    tracing::warn!(error = %e, "undecodable control message dropped");
                }
            },
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
    use crate::config::{TypeConfig, TypesConfig, UnknownTypes};
    use crate::envelope::Target;
    use crate::registry::Limits;

    fn setup() -> (Router, Arc<Registry>) {
        let metrics = Arc::new(Metrics::new());
        let registry = Registry::new(Limits::small(), metrics.clone());
        let types = TypeRegistry::new(&TypesConfig {
            registry: vec![
                TypeConfig {
                    name: "t".into(),
                    default: true,
                },
                TypeConfig {
                    name: "promo".into(),
                    default: false,
                },
            ],
            unknown: UnknownTypes::Deliver,
        });
        let types = Arc::new(types);
        (Router::new(registry.clone(), metrics, types), registry)
    }

    fn typed(id: &str, msg_type: &str, to: Target) -> BusMessage {
        let mut m = msg(id, to, now_ms(), None);
        m.header.msg_type = msg_type.into();
        m
    }

    fn control(user: &str, prefs: &[(&str, bool)]) -> BusEvent {
        let change = Change {
            kind: "prefs".into(),
            user: user.into(),
            prefs: prefs.iter().map(|(t, e)| (t.to_string(), *e)).collect(),
            ts: now_ms(),
            version: now_ms() * 1000,
        };
        BusEvent::Message {
            channel: Channel::Control,
            payload: change.encode(),
        }
    }

    #[test]
    fn preferences_filter_per_user_and_changes_apply_at_once() {
        let (mut router, registry) = setup();
        let defaults = router.types.defaults();
        let (_a, _, mut alice) = registry.register("alice", None, None, defaults, 0).unwrap();
        let (_b, _, mut bob) = registry
            .register(
                "bob",
                None,
                None,
                router.types.apply(defaults, [("promo", true)]),
                0,
            )
            .unwrap();
        router.route(&typed("1", "promo", Target::All));
        router.route(&typed("2", "t", Target::All));
        router.route(&typed("3", "unregistered", Target::All));
        let frames = |rx: &mut tokio::sync::mpsc::Receiver<crate::registry::Queued>| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|q| q.frame.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            frames(&mut alice),
            ["frame-2", "frame-3"],
            "promo is off by default"
        );
        assert_eq!(frames(&mut bob), ["frame-1", "frame-2", "frame-3"]);

        router.on_event(control("alice", &[("t", false), ("promo", true)]));
        let prefs_frame = frames(&mut alice);
        assert_eq!(
            prefs_frame,
            [r#"{"t":"prefs","prefs":{"promo":true,"t":false}}"#]
        );
        router.route(&typed("4", "t", Target::All));
        router.route(&typed("5", "promo", Target::All));
        assert_eq!(
            frames(&mut alice),
            ["frame-5"],
            "the change applies to the next message"
        );
        assert_eq!(
            frames(&mut bob),
            ["frame-4", "frame-5"],
            "bob is unaffected"
        );
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
        let (_g, _c, mut rx) = registry
            .register("alice", None, None, router.types.defaults(), 0)
            .unwrap();
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

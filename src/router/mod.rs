//! The router: turns each bus message into queued frames for this node's connections, and
//! makes the node whole again after it missed part of the bus.
//!
//! Runs as one task, one event at a time, so per-user order is the order of the bus. Per
//! recipient it does one preference check (an atomic load and a mask) and one `try_send`
//! of a shared frame: no JSON, no allocation, no lock across `.await`, no database query.
//!
//! Control messages arrive in the same stream, dispatched on their `kind`: preference
//! changes (`prefs`), so a message published after a change is filtered by the new
//! preferences on every node; and kicks (`kick`, see [`crate::kick`]).
//!
//! Invariant: the router has routed every bus message up to `last_seq` (or told the
//! affected users they lost some). A message whose sequence number jumps past
//! `last_seq + 1`, a lost subscription, a lagging receiver, or a quiet bus whose counter
//! moved on starts a recovery (see [`recovery`]): events wait in order in a buffer while
//! the missed messages are read from the history, routed, and only then is the buffer
//! drained. Sequence numbers make both sides of that overlap exact.
//!
//! Routed mode ([`Bus::is_routed`]): the node receives only the messages for its users (on
//! its node channel) and those for everyone (on the bus channel), so the cluster's numbers
//! jump between them by design. Each frame also carries its channel's own number: a jump
//! there (or a step back) is the gap, and `last_seq` is the highest cluster number seen.
//! The two channels arrive on one connection in publish order, so when both channels are
//! whole, every message for this node up to `last_seq` has been seen; a recovery then reads
//! from `last_seq` exactly as in broadcast mode, and takes both channels' numbers from the
//! read that gave it the bus's head. The idle check compares those numbers, not the head.

mod gaps;
mod recovery;
mod tally;
#[cfg(test)]
mod tests;

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::{payload_channel_seq, After, Bus, BusEvent, BusMessage, Channel};
use crate::clock::{now_ms, now_us};
use crate::kick::{self, Kick, Kicks};
use crate::metrics::{Dropped, Gap, Metrics};
use crate::prefs::{Change, Prefs};
use crate::protocol;
use crate::receipts::{self, Receipts};
use crate::registry::{PushError, Registry};
use crate::types::{self, TypeRegistry};
use recovery::Recovery;
use tally::Tally;

/// How many recent message ids the router remembers to drop redeliveries.
const RECENT_IDS: usize = 1 << 16;
/// Most events held while a recovery runs; later ones are dropped and recovered again.
const BUFFER_MAX: usize = 1 << 17;
/// A bus this quiet for this long is asked whether its counter moved on without us.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// Remembers the last [`RECENT_IDS`] ids, to drop a message the bus carries twice before
/// it reaches any connection again.
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

/// Routes bus messages to local connections.
pub struct Router {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    recent: RecentIds,
    /// The type registry: bits for the filter; metric labels (anything else is `other`).
    types: Arc<TypeRegistry>,
    bus: Arc<dyn Bus>,
    /// Re-read after a gap (announcements may have been lost); `None` in unit tests.
    prefs: Option<Arc<Prefs>>,
    /// `recovery.window`: a gap longer than this cannot be recovered.
    window: Duration,
    /// Every bus message up to this one has been routed; `None` until the first one.
    last_seq: Option<u64>,
    /// The bus epoch `last_seq` belongs to ([`crate::bus::HistoryRead::epoch_start`]), as
    /// last read; `None` until read. A recovery that finds another one reports a reset.
    epoch: Option<u64>,
    /// Messages up to this one were routed by a recovery: arriving live, they are duplicates.
    recovered_through: u64,
    /// Routed mode: the last number seen on the bus channel and on the node channel
    /// (`None` before the first, in broadcast mode always).
    channel_seq: ChannelSeqs,
    /// When the last bus event arrived.
    last_event: Instant,
    /// When the router last knew it had every message up to `last_seq`.
    whole_at: Instant,
    /// Events held while a recovery runs.
    buffer: VecDeque<BusEvent>,
    receipts: Receipts,
    kicks: Option<Arc<Kicks>>,
}

/// Routed mode's per-channel positions: `None` in broadcast mode; else the last number
/// seen on [`Channel::Bus`] and on [`Channel::Node`], each `None` until known.
type ChannelSeqs = Option<[Option<u64>; 2]>;

/// The field every control message has.
#[derive(serde::Deserialize)]
struct ControlKind {
    kind: String,
}

impl Router {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        types: Arc<TypeRegistry>,
        bus: Arc<dyn Bus>,
        prefs: Option<Arc<Prefs>>,
        window: Duration,
    ) -> Self {
        let routed = bus.is_routed();
        Self {
            registry,
            metrics,
            recent: RecentIds::new(),
            types,
            bus,
            prefs,
            window,
            last_seq: None,
            epoch: None,
            recovered_through: 0,
            channel_seq: routed.then_some([None, None]),
            last_event: Instant::now(),
            whole_at: Instant::now(),
            buffer: VecDeque::new(),
            kicks: None,
            receipts: Receipts::off(),
        }
    }

    /// Applies kicks announced on the control channel with `kicks`.
    pub fn with_kicks(mut self, kicks: Arc<Kicks>) -> Self {
        self.kicks = Some(kicks);
        self
    }

    /// Reports what each message did for each user it targets to `receipts`.
    pub fn with_receipts(mut self, receipts: Receipts) -> Self {
        self.receipts = receipts;
        self
    }

    /// Routes `events` until `shutdown`.
    pub async fn run(
        mut self,
        mut events: mpsc::Receiver<BusEvent>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        // The epoch this node starts in, so that a failover before its first gap is seen.
        // (Unreadable now: the first recovery reads it instead.)
        if let Ok(read) = self.bus.read_history(After::Seq(0), &[]).await {
            self.epoch = Some(read.epoch_start);
            // Routed mode: a channel's first frame is checked against its counter too.
            if let (Some(seqs), Some(at)) = (&mut self.channel_seq, read.positions) {
                *seqs = [Some(at.bus), Some(at.node)];
                self.last_seq = Some(read.head);
                self.recovered_through = read.head;
            }
        }
        let mut recovery: Option<Recovery> = None;
        let mut idle = tokio::time::interval(IDLE_CHECK);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                outcome = async { recovery.as_mut().expect("guarded").wait().await }, if recovery.is_some() => {
                    recovery = None;
                    self.finish(outcome);
                    while recovery.is_none() {
                        let Some(event) = self.buffer.pop_front() else { break };
                        recovery = self.handle(event);
                    }
                }
                event = events.recv() => {
                    let Some(event) = event else {
                        // The subscriber stops on the same shutdown signal, maybe first.
                        if shutdown.is_cancelled() {
                            return Ok(());
                        }
                        anyhow::bail!("the bus subscriber stopped");
                    };
                    self.last_event = Instant::now();
                    if recovery.is_some() {
                        self.hold(event);
                    } else {
                        recovery = self.handle(event);
                    }
                }
                _ = idle.tick(), if recovery.is_none() => {
                    if self.last_event.elapsed() >= IDLE_CHECK {
                        recovery = Some(self.start_recovery(false));
                    }
                }
            }
        }
    }

    /// Keeps an event for after the running recovery.
    fn hold(&mut self, event: BusEvent) {
        if self.buffer.len() < BUFFER_MAX {
            self.buffer.push_back(event);
        } else {
            // Dropped here, it shows up later as a sequence jump and is recovered again.
            self.metrics
                .dropped
                .with_label_values(&[Dropped::BufferFull.label()])
                .inc();
        }
    }

    /// Handles one event; returns a recovery to run when the event revealed a gap (the
    /// event itself is then held until the recovery is done).
    fn handle(&mut self, event: BusEvent) -> Option<Recovery> {
        match event {
            BusEvent::Message {
                channel: channel @ (Channel::Bus | Channel::Node),
                payload,
            } => match BusMessage::decode(payload.clone()) {
                Ok(msg) if self.channel_seq.is_some() => {
                    self.on_routed_message(channel, msg, payload)
                }
                Ok(msg) => self.on_message(msg, payload),
                Err(e) => {
                    self.metrics.bus_bad_payloads.inc();
                    tracing::warn!(error = %e, "undecodable bus payload dropped");
                    None
                }
            },
            BusEvent::Message {
                channel: Channel::Control,
                payload,
            } => {
                self.on_control(&payload);
                None
            }
            BusEvent::Gap { reason } => {
                tracing::warn!(
                    reason,
                    "bus gap: recovering what was missed from the history"
                );
                Some(self.start_recovery(true))
            }
        }
    }

    /// Applies one control message, by its `kind`. An unknown kind (from a newer node
    /// during a rolling upgrade) is ignored and counted as undecodable.
    fn on_control(&mut self, payload: &[u8]) {
        let kind = match serde_json::from_slice::<ControlKind>(payload) {
            Ok(c) => c.kind,
            Err(e) => return self.bad_control(&e.to_string()),
        };
        match kind.as_str() {
            "prefs" => match Change::decode(payload) {
                Ok(change) => self.apply_change(&change),
                Err(e) => self.bad_control(&e.to_string()),
            },
            kick::KIND => match Kick::decode(payload) {
                Ok(kick) => {
                    if let Some(kicks) = &self.kicks {
                        kicks.apply(&kick);
                    }
                }
                Err(e) => self.bad_control(&e.to_string()),
            },
            other => self.bad_control(&format!("unknown kind `{other}`")),
        }
    }

    fn bad_control(&self, error: &str) {
        self.metrics.bus_bad_payloads.inc();
        tracing::warn!(error, "undecodable control message dropped");
    }

    fn start_recovery(&self, reload_prefs: bool) -> Recovery {
        if let Some(kicks) = self.kicks.as_ref().filter(|_| reload_prefs) {
            kicks.reload_soon(); // announcements may have been lost with the gap
        }
        Recovery::start(
            self.bus.clone(),
            self.prefs.clone().filter(|_| reload_prefs),
            self.registry.clone(),
            self.last_seq,
            self.epoch,
            self.channel_seq,
            self.whole_at,
        )
    }

    /// Queues `msg` on every local connection it targets.
    pub fn route(&mut self, msg: &BusMessage) {
        let h = &msg.header;
        if h.expired(now_ms()) {
            self.metrics
                .dropped
                .with_label_values(&[Dropped::Expired.label()])
                .inc();
            if self.receipts.is_on() {
                self.report_expired(msg);
            }
            return;
        }
        if !self.recent.insert(&h.id) {
            self.metrics
                .dropped
                .with_label_values(&[Dropped::Duplicate.label()])
                .inc();
            return;
        }
        let slot = self.types.slot(&h.msg_type);
        let routed_us = now_us();
        let (mut queued, mut filtered, mut full, mut closed) = (0u64, 0u64, 0u64, 0u64);
        let mut tally = (self.receipts.is_on() && receipts::is_user_target(&h.to))
            .then(|| Tally::new(&self.receipts, h));
        self.registry.for_each_target(&h.to, |conn| {
            if let Some(tally) = &mut tally {
                tally.next(&conn.user);
            }
            if !types::accepts(conn.prefs.get(), slot) {
                filtered += 1;
                if let Some(tally) = &mut tally {
                    tally.filtered = true;
                }
                return;
            }
            let ticket = tally.as_mut().and_then(Tally::ticket);
            match conn.push_msg(msg.frame.clone(), msg.seq, h.ts, routed_us, ticket) {
                Ok(()) => {
                    queued += 1;
                    if let Some(tally) = &mut tally {
                        tally.queued += 1;
                    }
                }
                Err(PushError::Overflow) => full += 1,
                Err(PushError::Closed) => closed += 1,
            }
        });
        if let Some(tally) = &mut tally {
            tally.flush();
        }
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
                .with_label_values(&[Dropped::QueueFull.label()])
                .inc_by(full);
        }
        if closed > 0 {
            self.metrics
                .dropped
                .with_label_values(&[Dropped::Closed.label()])
                .inc_by(closed);
        }
    }

    /// Reports `expired` for each targeted user with a matching connection here (off the
    /// path of live messages: only an expired one comes here).
    fn report_expired(&self, msg: &BusMessage) {
        if !receipts::is_user_target(&msg.header.to) {
            return;
        }
        let mut tally = Tally::new(&self.receipts, &msg.header);
        tally.expired = true;
        self.registry
            .for_each_target(&msg.header.to, |conn| tally.next(&conn.user));
        tally.flush();
    }

    /// Applies a preference change to this node's connections of that user.
    pub fn apply_change(&mut self, change: &Change) {
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

/// Tells every connection of this node it may have lost messages (`messages_lost`), as a
/// recovery does when the history cannot fill a gap; how many were told. For routed mode,
/// after presence had taken the node for dead: messages for its users then reached no node,
/// and no channel number shows it.
pub fn tell_all_lost(registry: &Registry, metrics: &Metrics) -> usize {
    let frame = recovery::lost_frame(metrics);
    registry.for_each(|conn| {
        let _ = conn.push(frame.clone());
    });
    metrics
        .gap_recoveries
        .with_label_values(&[crate::metrics::GapRecovery::Lost.label()])
        .inc();
    registry.connection_count()
}

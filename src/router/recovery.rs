//! Gap recovery: a task that reads what this node missed while the router holds new
//! events back, and [`Router::finish`], which applies what it found.
//!
//! It asks the bus for its head first (one cheap read): when nothing was missed it is done.
//! (In routed mode "nothing missed" means both channels' counters are where the router
//! is; the head moves on with messages for other nodes.)
//! Otherwise it reads, for the users (and groups) connected here, every message after the
//! router's `last_seq` from the history, and re-reads their preferences (a preference announcement
//! may have been lost with the messages). Redis being down is not an outcome: the task
//! retries every second until it can read, and the router keeps holding events meanwhile.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::{ChannelSeqs, Router};
use crate::bus::history::{self, Recovered};
use crate::bus::{After, Bus, BusError, Positions};
use crate::metrics::{GapRecovery, Metrics};
use crate::prefs::Prefs;
use crate::protocol;
use crate::registry::Registry;

/// What a recovery found.
pub(super) struct Outcome {
    /// The bus's last sequence number when read.
    pub head: u64,
    /// `None` when the router had no position yet (nothing to compare with).
    pub recovered: Option<Recovered>,
    /// Fresh preferences of the connected users: `(user, bits, version)`.
    pub prefs: Vec<(String, u64, i64)>,
    /// True when messages were actually missed (or the bus was reset).
    pub missed: bool,
    /// The bus's epoch when read (a change after that read shows in the next recovery).
    pub epoch_start: u64,
    /// Routed mode: the channel counters read with `head`.
    pub positions: Option<Positions>,
    /// When the router was last known to be whole, before this gap.
    pub whole_at: Instant,
}

/// A running recovery; aborted if dropped.
pub(super) struct Recovery {
    task: JoinHandle<Outcome>,
}

impl Drop for Recovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recovery {
    /// Starts reading what `users` missed after `after`. `prefs` is given when their
    /// preferences should be read again too.
    pub fn start(
        bus: Arc<dyn Bus>,
        prefs: Option<Arc<Prefs>>,
        registry: Arc<Registry>,
        after: Option<u64>,
        epoch: Option<u64>,
        channels: ChannelSeqs,
        whole_at: Instant,
    ) -> Self {
        let task = tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let position = Position {
                    after,
                    epoch,
                    channels,
                };
                match attempt(&*bus, prefs.as_deref(), &registry, position, whole_at).await {
                    Ok(outcome) => return outcome,
                    Err(e) => {
                        if failures == 0 {
                            tracing::warn!(error = %e, "history unreadable; recovery retries every second");
                        }
                        failures += 1;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Self { task }
    }

    /// Waits for the outcome.
    pub async fn wait(&mut self) -> Outcome {
        match (&mut self.task).await {
            Ok(outcome) => outcome,
            Err(e) => panic!("recovery task failed: {e}"),
        }
    }
}

/// Where the router stands when a recovery starts.
#[derive(Clone, Copy)]
struct Position {
    /// Its `last_seq`.
    after: Option<u64>,
    /// The bus epoch it last read.
    epoch: Option<u64>,
    /// Routed mode: its channels' last numbers.
    channels: ChannelSeqs,
}

/// One try from the router's position.
async fn attempt(
    bus: &dyn Bus,
    prefs: Option<&Prefs>,
    registry: &Registry,
    position: Position,
    whole_at: Instant,
) -> Result<Outcome, BusError> {
    let Position {
        after,
        epoch,
        channels,
    } = position;
    let bus_now = bus.read_history(After::Seq(0), &[]).await?;
    let (head, epoch_start) = (bus_now.head, bus_now.epoch_start);
    let Some(after) = after else {
        return Ok(Outcome {
            head,
            recovered: None,
            prefs: Vec::new(),
            missed: false,
            epoch_start,
            positions: bus_now.positions,
            whole_at,
        });
    };
    let new_epoch = epoch.is_some_and(|e| e != epoch_start);
    let behind = match (channels, bus_now.positions) {
        // Routed: whole while both channels' counters are where the router is.
        (Some(seen), Some(now)) => seen != [Some(now.bus), Some(now.node)] || head < after,
        _ => head != after,
    };
    let missed = behind || new_epoch;
    // The users connected now: whoever connects later resumes by itself.
    let users = if missed || prefs.is_some() {
        registry.users()
    } else {
        Vec::new()
    };
    // Their groups' streams too (a group has a connection here only if a user does).
    let groups = if missed {
        registry.groups()
    } else {
        Vec::new()
    };
    let found = if !missed || users.is_empty() {
        Recovered {
            head,
            positions: bus_now.positions,
            reset: head < after || new_epoch,
            ..Recovered::default()
        }
    } else {
        history::recover(bus, &users, &groups, after, epoch).await?
    };
    let prefs = match prefs {
        Some(prefs) if !users.is_empty() => {
            let names: Vec<&str> = users.iter().map(|u| &**u).collect();
            prefs.load_bits_many(&names).await.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "preferences not re-read after the gap");
                Vec::new()
            })
        }
        _ => Vec::new(),
    };
    Ok(Outcome {
        head: found.head,
        positions: found.positions,
        epoch_start,
        missed: missed || found.reset,
        recovered: Some(found),
        prefs,
        whole_at,
    })
}

impl Router {
    /// Applies a finished recovery: fresh preferences, the missed messages in order, the
    /// notices for what could not be recovered; the node is then whole up to its head.
    pub(super) fn finish(&mut self, outcome: Outcome) {
        for (user, bits, version) in &outcome.prefs {
            let frame = protocol::prefs(&self.types.to_map(*bits));
            self.registry.refresh_prefs(user, *bits, *version, &frame);
        }
        self.epoch = Some(outcome.epoch_start);
        if let (Some(seqs), Some(at)) = (&mut self.channel_seq, outcome.positions) {
            *seqs = [Some(at.bus), Some(at.node)];
        }
        let Some(found) = outcome.recovered else {
            // Nothing was known yet: start counting from the bus's head.
            self.last_seq = Some(outcome.head);
            self.recovered_through = outcome.head;
            self.whole_at = Instant::now();
            return;
        };
        let last = if found.reset {
            0
        } else {
            self.last_seq.unwrap_or(0)
        };
        let mut routed = 0u64;
        for msg in found.messages.iter().filter(|m| m.seq > last) {
            self.route(msg);
            routed += 1;
        }
        self.metrics.recovered_messages.inc_by(routed);
        // Longer than the window, history streams may have expired under the gap.
        let too_long = outcome.whole_at.elapsed() > self.window;
        let lost_all = outcome.missed && (found.reset || found.lost_all || too_long);
        let lost = if lost_all {
            self.registry.for_each(|conn| {
                let _ = conn.push(lost_frame(&self.metrics));
            });
            self.registry.connection_count()
        } else {
            let users: usize = found
                .lost_users
                .iter()
                .map(|user| {
                    let frame = lost_frame(&self.metrics);
                    self.registry.for_each_of_user(user, |conn| {
                        let _ = conn.push(frame.clone());
                    })
                })
                .sum();
            let groups: usize = found
                .lost_groups
                .iter()
                .map(|group| {
                    let frame = lost_frame(&self.metrics);
                    self.registry.for_each_of_group(group, |conn| {
                        let _ = conn.push(frame.clone());
                    })
                })
                .sum();
            users + groups
        };
        let result = if lost > 0 {
            GapRecovery::Lost
        } else {
            GapRecovery::Recovered
        };
        if outcome.missed {
            self.metrics
                .gap_recoveries
                .with_label_values(&[result.label()])
                .inc();
            tracing::info!(
                from = last,
                to = found.head,
                routed,
                connections_told_lost = lost,
                "bus gap recovered"
            );
        }
        self.last_seq = Some(found.head.max(last));
        self.recovered_through = found.head.max(last);
        self.whole_at = Instant::now();
    }
}

/// The notice for a connection that missed messages no history can give back.
pub(super) fn lost_frame(metrics: &Metrics) -> Utf8Bytes {
    protocol::error_frame(
        &metrics.client_errors,
        "messages_lost",
        "some messages for you could not be delivered; reload your state",
        None,
    )
}

//! Delivery receipts (DESIGN §6 "What the backend learns"): what became of each message for
//! each user it targeted, produced to `kafka.receipts_topic` for the backend (e.g. to send a
//! mobile push to a user who was offline). docs/delivery.md says exactly what each outcome
//! means and what races can produce.
//!
//! Four places report, none of them waiting: sessions (a message written to a user's
//! connections here, through a [`Ticket`]; and client `ack`s), the router (a user's
//! connections on this node that all had the type switched off, or the message had expired
//! when it got here), ingest (each user-targeted message it published, to be checked
//! against presence). Each hands a small event to a
//! [`Receipts`] handle: `try_send` into one bounded channel; full, the event is dropped and
//! counted (`fanout_receipts_dropped_total{reason="channel_full"}`). With
//! `kafka.receipts_topic` empty the handle is off and every report is one branch.
//!
//! One task per node ([`Task`]) takes the events in batches, and per batch:
//! * asks presence, in one call, which users of the published messages have a matching
//!   connection anywhere ([`Directory`]); those without one are `offline` candidates;
//! * claims every negative candidate (`offline`, `filtered`, `expired`) in one round trip
//!   ([`Claims`]: Redis `SET <key base>:receipt:<id length>:<id>:<user> 1 NX EX <recovery.window>`,
//!   one script call; in memory on the in-process bus): only the first claim of an (id, user) in
//!   the cluster is produced, so the backend gets at most one negative outcome per message
//!   and user, whichever node or ingest saw it first;
//! * renders each record into one reused buffer and hands it to a
//!   [`Sink`](crate::kafka::Sink) (librdkafka's queue; full → dropped and counted), never
//!   waiting for the broker.
//!
//! `delivered` is not claimed: one record per node that wrote the message to the user's
//! sockets. The router gives the queue entries of a user's connections one shared
//! [`Ticket`]; each session marks it once the frame is written (flushed to the socket);
//! when the last entry is gone (written, or dropped with a closing connection) the ticket

mod claims;
mod task;
mod ticket;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::bus::Header;
use crate::clock::now_ms;
use crate::envelope::Target;
use crate::metrics::{Metrics, ReceiptDropped};

pub use claims::{Claims, LocalClaims, RedisClaims};
#[cfg(test)]
pub use task::Out;
pub use task::{Directory, Query, Task};
pub use ticket::Ticket;

/// Events waiting for the receipts task at most; beyond, they are dropped and counted.
pub const CHANNEL: usize = 8192;
/// Records the events waiting in the channel may become, at most (a message to many users
/// is one event of many entries); beyond, reports are dropped and counted.
pub const PENDING_MAX: usize = 1 << 18;
/// Ids of one `ack` frame carried by one event: a frame with more is split, so an event
/// holds at most this many ids of at most [`ACK_ID_MAX`] bytes (the channel holds at most
/// [`CHANNEL`] events: a bounded amount of memory, whatever clients send).
pub const ACK_IDS_PER_EVENT: usize = 64;
/// Longest id an `ack` may carry (message ids are ~30 bytes); longer ones are ignored.
pub const ACK_ID_MAX: usize = 128;

/// What a message's events share: its id and type, in one allocation made once per message
/// (and only when there is something to report); a clone is a reference count.
#[derive(Clone)]
pub struct MsgRef {
    /// The id, then the type.
    text: Arc<str>,
    id_len: usize,
}

impl MsgRef {
    pub fn of(header: &Header) -> Self {
        let (id, msg_type) = (header.id.as_str(), header.msg_type.as_str());
        let len = id.len() + msg_type.len();
        // Joined on the stack when short (ids are ~30 bytes, types shorter): one allocation.
        let mut joined = [0u8; 256];
        let text: Arc<str> = if len <= joined.len() {
            joined[..id.len()].copy_from_slice(id.as_bytes());
            joined[id.len()..len].copy_from_slice(msg_type.as_bytes());
            std::str::from_utf8(&joined[..len])
                .expect("two strings joined are UTF-8")
                .into()
        } else {
            [id, msg_type].concat().into()
        };
        Self {
            text,
            id_len: id.len(),
        }
    }

    pub fn id(&self) -> &str {
        &self.text[..self.id_len]
    }

    pub fn msg_type(&self) -> &str {
        &self.text[self.id_len..]
    }
}

impl std::fmt::Debug for MsgRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsgRef")
            .field("id", &self.id())
            .field("msg_type", &self.msg_type())
            .finish()
    }
}

/// A negative outcome the router saw for one user of a message on this node (what it
/// queued is reported by its [`Ticket`] once written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routed {
    /// The user's matching connections here have the type switched off (a candidate).
    Filtered,
    /// The message had expired when it got here (a candidate).
    Expired,
}

/// One report, on its way to the receipts task.
#[derive(Debug)]
enum Event {
    /// A message was written to `conns` of `user`'s sockets here (a [`Ticket`]'s report).
    Delivered {
        msg: MsgRef,
        user: Arc<str>,
        conns: u32,
        at_ms: i64,
    },
    /// The router's negative reports for one message: one entry per user with matching
    /// connections here that it queued to none of (one event per message, not per user).
    Routed {
        msg: MsgRef,
        users: Vec<(Arc<str>, Routed)>,
        at_ms: i64,
    },
    /// Ingest published user-targeted messages (one event per bus publish, the headers
    /// moved, not copied): their users without a matching connection anywhere are
    /// `offline` (all of a message's users `expired` if it had expired already at `at_ms`).
    Published { headers: Vec<Header>, at_ms: i64 },
    /// A client acknowledged `ids`.
    Acked {
        user: Arc<str>,
        conn: Arc<str>,
        ids: Vec<String>,
        at_ms: i64,
    },
}

impl Event {
    /// How many records it may become: what the bound on pending reports counts.
    fn weight(&self) -> usize {
        match self {
            Event::Delivered { .. } => 1,
            Event::Routed { users, .. } => users.len(),
            Event::Published { headers, .. } => {
                headers.iter().map(|h| users_of(&h.to).count()).sum()
            }
            Event::Acked { ids, .. } => ids.len(),
        }
        .max(1)
    }
}

/// The reporting end: cheap to clone, never waits. Off (every call one branch) when
/// `kafka.receipts_topic` is empty.
#[derive(Clone, Default)]
pub struct Receipts {
    /// Shared: a [`Ticket`] holds a clone, one reference count.
    on: Option<Arc<On>>,
}

struct On {
    tx: mpsc::Sender<Event>,
    metrics: Arc<Metrics>,
    /// Records the events in the channel may become ([`Event::weight`]), at most
    /// [`PENDING_MAX`]: what bounds the memory of events of many users each.
    pending: Arc<AtomicUsize>,
}

/// True for the targets receipts are about (`to.user`, `to.users`).
pub fn is_user_target(to: &Target) -> bool {
    matches!(to, Target::User { .. } | Target::Users(_))
}

impl Receipts {
    /// A handle that reports nothing.
    pub fn off() -> Self {
        Self::default()
    }

    /// A handle and the receiving end for [`Task`].
    pub fn channel(metrics: Arc<Metrics>) -> (Self, Inbox) {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let pending = Arc::new(AtomicUsize::new(0));
        (
            Self {
                on: Some(Arc::new(On {
                    tx,
                    metrics,
                    pending: pending.clone(),
                })),
            },
            Inbox { rx, pending },
        )
    }

    /// True when receipts are produced.
    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.is_some()
    }

    fn send(&self, event: Event) {
        let Some(on) = &self.on else { return };
        let weight = event.weight();
        let queued = on.pending.fetch_add(weight, Ordering::Relaxed) + weight <= PENDING_MAX
            && on.tx.try_send(event).is_ok();
        if !queued {
            on.pending.fetch_sub(weight, Ordering::Relaxed);
            on.metrics
                .receipts_dropped
                .with_label_values(&[ReceiptDropped::ChannelFull.label()])
                .inc_by(weight as u64);
        }
    }

    /// A ticket for `msg` to `user`'s connections here, to queue with each of its
    /// frames; `None` when off.
    #[inline]
    pub fn ticket(&self, msg: &MsgRef, user: &Arc<str>) -> Option<Arc<Ticket>> {
        self.on
            .as_ref()
            .map(|_| Arc::new(Ticket::new(self.clone(), msg.clone(), user.clone())))
    }

    /// The router's negative reports for `msg` on this node (see [`Routed`]); nothing if
    /// empty.
    pub fn routed(&self, msg: MsgRef, users: Vec<(Arc<str>, Routed)>) {
        if !users.is_empty() {
            self.send(Event::Routed {
                msg,
                users,
                at_ms: now_ms(),
            });
        }
    }

    /// Ingest published `headers`' messages (none a duplicate), in one bus call; other
    /// targets than users are left out here.
    pub fn published(&self, mut headers: Vec<Header>, now_ms: i64) {
        if self.is_on() {
            headers.retain(|h| is_user_target(&h.to));
            if !headers.is_empty() {
                self.send(Event::Published {
                    headers,
                    at_ms: now_ms,
                });
            }
        }
    }

    /// A client of `user` on connection `conn` acknowledged `ids`.
    pub fn acked(&self, user: &Arc<str>, conn: &Arc<str>, ids: Vec<String>) {
        let Some(on) = &self.on else { return };
        let before = ids.len();
        let mut ids: Vec<String> = ids
            .into_iter()
            .filter(|id| id.len() <= ACK_ID_MAX)
            .collect();
        let bad = before - ids.len();
        if bad > 0 {
            on.metrics
                .receipts_dropped
                .with_label_values(&[ReceiptDropped::BadAck.label()])
                .inc_by(bad as u64);
        }
        let at_ms = now_ms();
        while !ids.is_empty() {
            let rest = ids.split_off(ids.len().min(ACK_IDS_PER_EVENT));
            self.send(Event::Acked {
                user: user.clone(),
                conn: conn.clone(),
                ids: std::mem::replace(&mut ids, rest),
                at_ms,
            });
        }
    }
}

impl std::fmt::Debug for Receipts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receipts")
            .field("on", &self.is_on())
            .finish()
    }
}

/// The receiving end of a [`Receipts`] handle.
pub struct Inbox {
    rx: mpsc::Receiver<Event>,
    pending: Arc<AtomicUsize>,
}

impl Inbox {
    /// Takes up to `max` events into `batch`; 0 when every handle is gone (or closed).
    /// Appends to `batch`: only what it takes leaves the pending count.
    async fn recv_many(&mut self, batch: &mut Vec<Event>, max: usize) -> usize {
        let before = batch.len();
        let n = self.rx.recv_many(batch, max).await;
        let weight: usize = batch[before..].iter().map(Event::weight).sum();
        self.pending.fetch_sub(weight, Ordering::Relaxed);
        n
    }
}

#[cfg(test)]
impl Inbox {
    /// What was reported so far, one line per event: `<kind> <id> <user> [conns]`.
    pub fn summaries(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(event) = self.rx.try_recv() {
            self.pending.fetch_sub(event.weight(), Ordering::Relaxed);
            match event {
                Event::Delivered {
                    msg, user, conns, ..
                } => out.push(format!("delivered {} {user} {conns}", msg.id())),
                Event::Routed { msg, users, .. } => {
                    out.extend(users.iter().map(|(user, routed)| match routed {
                        Routed::Filtered => format!("filtered {} {user}", msg.id()),
                        Routed::Expired => format!("expired {} {user}", msg.id()),
                    }))
                }
                Event::Published { headers, at_ms } => out.extend(
                    headers
                        .iter()
                        .map(|h| format!("published {} expired={}", h.id, h.expired(at_ms))),
                ),
                Event::Acked {
                    user, conn, ids, ..
                } => out.push(format!("acked {} {user} {conn}", ids.join(","))),
            }
        }
        out
    }
}

/// The users a `to.user` / `to.users` target names, in order.
fn users_of(to: &Target) -> impl Iterator<Item = &str> {
    let (one, many): (Option<&str>, &[String]) = match to {
        Target::User { user, .. } => (Some(user), &[]),
        Target::Users(users) => (None, users),
        Target::Conn(_) | Target::Group(_) | Target::All => (None, &[]),
    };
    one.into_iter().chain(many.iter().map(String::as_str))
}

#[cfg(test)]
mod tests;

//! One connection as the rest of the node sees it: its identity, its user's shared
//! preference bits, and its bounded outbound queue with a close signal.
//!
//! The queue is a `VecDeque` behind an uncontended lock, not a channel: it allocates
//! nothing until something is queued, which keeps an idle connection small. Its byte count
//! lives under the same lock. The session is woken only when a frame lands in an empty
//! queue: it always drains the queue before it waits again, so a frame pushed behind
//! others needs no wake-up of its own (under load that spares most of them).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::envelope::{Platform, Target};
use crate::protocol::Close;
use crate::receipts::Ticket;

/// A frame waiting in a connection's queue.
#[derive(Debug)]
pub struct Queued {
    pub frame: Utf8Bytes,
    /// Kafka timestamp of a `msg` frame (for the latency histogram); 0 for other frames.
    pub ts_ms: i64,
    /// When the router queued a `msg` frame, µs since the epoch (the `send` stage); 0 for
    /// other frames.
    pub routed_us: u64,
    /// Bus sequence number of a `msg` frame (a resuming session skips what it replayed);
    /// 0 for other frames.
    pub seq: u64,
    /// The delivery receipt of a `msg` frame to a user (receipts on), marked by the session
    /// once the frame is written.
    pub ticket: Option<Arc<Ticket>>,
}

/// A connection's queued frames and their size in bytes.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Queued>,
    bytes: usize,
}

/// Why a frame could not be queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue is full: the connection has been asked to close with 4001.
    Overflow,
    /// The connection is already closing.
    Closed,
}

/// One user's preference bits on this node (see [`crate::types`]).
#[derive(Debug)]
pub struct UserPrefs {
    bits: AtomicU64,
    /// Version of `bits` (see [`crate::prefs::Change::version`]); written only under the
    /// registry's write lock.
    version: AtomicI64,
}

impl UserPrefs {
    pub fn new(bits: u64, version: i64) -> Self {
        Self {
            bits: AtomicU64::new(bits),
            version: AtomicI64::new(version),
        }
    }

    #[inline]
    pub fn get(&self) -> u64 {
        self.bits.load(Ordering::Relaxed)
    }

    pub fn version(&self) -> i64 {
        self.version.load(Ordering::Relaxed)
    }

    /// Takes `bits` unless they are older than what is held; true if taken.
    pub(super) fn update(&self, bits: u64, version: i64) -> bool {
        if version < self.version() {
            return false;
        }
        self.version.store(version, Ordering::Relaxed);
        self.bits.store(bits, Ordering::Relaxed);
        true
    }
}

/// The router's and other tasks' handle on one connection.
pub struct ConnHandle {
    pub id: Arc<str>,
    pub user: Arc<str>,
    /// Shared with every connection of the same user on this node.
    pub prefs: Arc<UserPrefs>,
    pub platform: Option<Platform>,
    pub tab: Option<Box<str>>,
    /// The groups of its identity (JWT claim `groups`), shared with the registry's index.
    pub groups: Box<[Arc<str>]>,
    queue: Mutex<Queue>,
    /// Woken when a frame lands in an empty queue or a close is asked for (a permit is
    /// kept if the session is not waiting).
    queued: Notify,
    /// Set when the session's [`QueueRx`] is gone: nothing is queued any more.
    receiver_gone: AtomicBool,
    max_messages: usize,
    max_bytes: usize,
    /// The close asked for, as [`Close::to_u8`]; 0: none.
    close: AtomicU8,
}

impl ConnHandle {
    /// A handle whose queue holds at most `max_messages` frames and `max_bytes` bytes.
    #[allow(clippy::too_many_arguments)] // one caller, the registry, naming each
    pub(super) fn new(
        id: Arc<str>,
        user: Arc<str>,
        prefs: Arc<UserPrefs>,
        platform: Option<Platform>,
        tab: Option<Box<str>>,
        groups: Box<[Arc<str>]>,
        max_messages: usize,
        max_bytes: usize,
    ) -> Self {
        Self {
            id,
            user,
            prefs,
            platform,
            tab,
            groups,
            queue: Mutex::new(Queue::default()),
            queued: Notify::new(),
            receiver_gone: AtomicBool::new(false),
            max_messages,
            max_bytes,
            close: AtomicU8::new(0),
        }
    }

    /// Queues a reply or notice (not a `msg`) without waiting; see [`push_msg`](Self::push_msg).
    pub fn push(&self, frame: Utf8Bytes) -> Result<(), PushError> {
        self.enqueue(Queued {
            frame,
            ts_ms: 0,
            routed_us: 0,
            seq: 0,
            ticket: None,
        })
    }

    /// Queues a `msg` frame with its bus sequence number, Kafka timestamp, routing time
    /// and receipt ticket.
    pub fn push_msg(
        &self,
        frame: Utf8Bytes,
        seq: u64,
        ts_ms: i64,
        routed_us: u64,
        ticket: Option<Arc<Ticket>>,
    ) -> Result<(), PushError> {
        self.enqueue(Queued {
            frame,
            ts_ms,
            routed_us,
            seq,
            ticket,
        })
    }

    /// Queues without waiting. On overflow, asks the session to close with 4001.
    fn enqueue(&self, queued: Queued) -> Result<(), PushError> {
        if self.close.load(Ordering::Relaxed) != 0 || self.receiver_gone.load(Ordering::Relaxed) {
            return Err(PushError::Closed);
        }
        let len = queued.frame.len();
        let mut queue = self.queue.lock();
        if queue.frames.len() >= self.max_messages || queue.bytes + len > self.max_bytes {
            drop(queue);
            self.close(Close::TooSlow);
            return Err(PushError::Overflow);
        }
        let was_empty = queue.frames.is_empty();
        queue.frames.push_back(queued);
        queue.bytes += len;
        drop(queue);
        if was_empty {
            self.queued.notify_one();
        }
        Ok(())
    }

    /// Takes the oldest queued frame; an emptied queue gives back a large buffer.
    fn pop(&self) -> Option<Queued> {
        let mut queue = self.queue.lock();
        let next = queue.frames.pop_front()?;
        queue.bytes -= next.frame.len();
        if queue.frames.is_empty() && queue.frames.capacity() > 64 {
            queue.frames = VecDeque::new();
        }
        Some(next)
    }

    /// Asks the session to close (`why`); the first request wins. The session hears it as
    /// it hears a queued frame (one wake-up signal for both: one waiting future less in
    /// every idle session).
    pub fn close(&self, why: Close) {
        if self
            .close
            .compare_exchange(0, why.to_u8(), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            self.queued.notify_one();
        }
    }

    /// The close [`close`](Self::close) asked for, if one was.
    pub fn closing(&self) -> Option<Close> {
        Close::from_u8(self.close.load(Ordering::Acquire))
    }

    /// Resolves at the next frame queued into an empty queue or close request, or at once
    /// if one came since the last such wake-up was taken (a stale one is possible: check
    /// what is there).
    pub fn woken(&self) -> Notified<'_> {
        self.queued.notified()
    }

    /// True if `target` selects this connection (used when replaying history to it).
    pub fn is_target(&self, target: &Target) -> bool {
        match target {
            Target::User {
                user,
                platform,
                tab,
            } => **user == *self.user && self.matches(*platform, tab.as_deref()),
            Target::Users(users) => users.iter().any(|u| **u == *self.user),
            Target::Conn(id) => **id == *self.id,
            Target::Group(group) => self.groups.iter().any(|g| **g == **group),
            Target::All => true,
        }
    }

    pub(super) fn matches(&self, platform: Option<Platform>, tab: Option<&str>) -> bool {
        platform.is_none_or(|p| self.platform == Some(p))
            && tab.is_none_or(|t| self.tab.as_deref() == Some(t))
    }
}

/// The receiving end of a connection's queue, held by its session. Dropping it makes every
/// later push fail with [`PushError::Closed`].
pub struct QueueRx {
    conn: Arc<ConnHandle>,
}

/// [`QueueRx::try_recv`] found nothing queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Empty;

impl QueueRx {
    pub(super) fn new(conn: Arc<ConnHandle>) -> Self {
        Self { conn }
    }

    /// The next queued frame, if any, without waiting.
    pub fn try_recv(&mut self) -> Result<Queued, Empty> {
        self.conn.pop().ok_or(Empty)
    }

    /// Returns once something is queued or a close was asked for (or, rarely, for
    /// nothing: a stale wake-up; the caller takes what there is with
    /// [`try_recv`](Self::try_recv), maybe none, and checks
    /// [`closing`](ConnHandle::closing)). Holds no frame, so a session waiting on it
    /// is no larger for it.
    pub async fn ready(&mut self) {
        if self.conn.queue.lock().frames.is_empty() && self.conn.closing().is_none() {
            self.conn.queued.notified().await;
        }
    }

    /// Waits for the next queued frame (always `Some`: the queue outlives its senders).
    /// For tests: the session waits with [`ready`](Self::ready), which holds no frame and
    /// also wakes for a close.
    #[cfg(test)]
    pub async fn recv(&mut self) -> Option<Queued> {
        loop {
            if let Some(queued) = self.conn.pop() {
                return Some(queued);
            }
            self.conn.queued.notified().await;
        }
    }
}

impl Drop for QueueRx {
    fn drop(&mut self) {
        self.conn.receiver_gone.store(true, Ordering::Relaxed);
        *self.conn.queue.lock() = Queue::default();
    }
}

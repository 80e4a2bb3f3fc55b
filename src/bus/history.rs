//! The message history behind resume and gap recovery (DESIGN §6).
//!
//! * [`MemoryHistory`] is the history of the in-process bus; the Redis bus keeps the same
//!   structure in Redis (see [`super::redis`]). Both follow one contract: per-user streams,
//!   per-group streams and one broadcast stream, each holding its newest
//!   `recovery.max_messages` entries for `recovery.window` after its last write, keyed by
//!   sequence number; ids remembered for the window so a client's `since` resolves to a
//!   sequence number. A message with a `collapse` key replaces the entry with that key in
//!   each of its streams (the replaced message is not "missing": the newer one stands for
//!   it), so a hundred progress ticks take one slot.
//! * [`replay`] answers a resuming client: everything after its `since`, from its own
//!   stream, the broadcast stream and its groups' streams, in sequence order — or "not
//!   recovered" when any of it may be missing. Never a silent partial replay.
//! * [`recover`] answers a node that missed part of the bus: everything its connected users
//!   and groups missed, and which of them cannot be made whole.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    payload_seq, sequenced, After, Bus, BusError, BusMessage, HistoryRead, Outgoing, Published,
    StreamKey, StreamRead,
};

/// One stream of the in-memory history.
#[derive(Default)]
struct MemStream {
    entries: VecDeque<(u64, Bytes)>,
    /// The newest sequence number trimmed away (0: none): nothing after it is missing.
    trimmed_through: u64,
    /// `collapse` key → the sequence number of its entry (at most one entry per key).
    collapse: HashMap<Box<str>, u64>,
    expires: Option<Instant>,
}

impl MemStream {
    /// Appends `seq`; an entry with the same `collapse` key goes, the oldest beyond `max`
    /// are trimmed.
    fn push(&mut self, seq: u64, payload: &Bytes, collapse: Option<&str>, max: usize) {
        if let Some(key) = collapse {
            if let Some(old) = self.collapse.insert(key.into(), seq) {
                if let Ok(at) = self.entries.binary_search_by_key(&old, |(s, _)| *s) {
                    self.entries.remove(at);
                }
            }
        }
        self.entries.push_back((seq, payload.clone()));
        while self.entries.len() > max {
            let (trimmed, _) = self.entries.pop_front().expect("not empty");
            self.trimmed_through = trimmed;
        }
        // Keys whose entry was trimmed point at nothing: forget them, now and then.
        if self.collapse.len() > 2 * max.max(1) {
            let oldest = self.entries.front().map_or(u64::MAX, |(s, _)| *s);
            self.collapse.retain(|_, s| *s >= oldest);
        }
    }
}

/// The history of the in-process bus (one node, no Redis).
pub struct MemoryHistory {
    max_messages: usize,
    window: Duration,
    seq: u64,
    /// id → (sequence number, forgotten at).
    seen: HashMap<Box<str>, (u64, Instant)>,
    seen_order: VecDeque<(Instant, Box<str>)>,
    all: MemStream,
    users: HashMap<Box<str>, MemStream>,
    groups: HashMap<Box<str>, MemStream>,
    /// Calls since start; every 4096th sweeps expired user and group streams.
    calls: u64,
}

impl MemoryHistory {
    pub fn new(max_messages: usize, window: Duration) -> Self {
        Self {
            max_messages,
            window,
            seq: 0,
            seen: HashMap::new(),
            seen_order: VecDeque::new(),
            all: MemStream::default(),
            users: HashMap::new(),
            groups: HashMap::new(),
            calls: 0,
        }
    }

    /// Numbers and records `msg`; returns the payload to publish, or `None` for a duplicate.
    pub fn append(&mut self, msg: &Outgoing) -> (Published, Option<Bytes>) {
        let now = Instant::now();
        self.forget_expired(now);
        if let Some((seq, _)) = self.seen.get(msg.header.id.as_str()) {
            let published = Published {
                seq: *seq,
                duplicate: true,
            };
            return (published, None);
        }
        self.seq += 1;
        let payload = sequenced(self.seq, msg.body());
        let expires = now + self.window;
        let collapse = msg.header.collapse.as_deref();
        for key in msg.streams() {
            let stream = match key {
                StreamKey::All => &mut self.all,
                StreamKey::User(user) => self.users.entry(user.into()).or_default(),
                StreamKey::Group(group) => self.groups.entry(group.into()).or_default(),
            };
            if stream.expires.is_some_and(|t| t <= now) {
                *stream = MemStream::default();
            }
            stream.push(self.seq, &payload, collapse, self.max_messages);
            stream.expires = Some(expires);
        }
        let id: Box<str> = msg.header.id.as_str().into();
        self.seen.insert(id.clone(), (self.seq, expires));
        self.seen_order.push_back((expires, id));
        let published = Published {
            seq: self.seq,
            duplicate: false,
        };
        (published, Some(payload))
    }

    /// Reads `streams` after a position, like the Redis history read.
    pub fn read(&mut self, after: After<'_>, streams: &[StreamKey<'_>]) -> HistoryRead {
        let now = Instant::now();
        self.forget_expired(now);
        let after = match after {
            After::Seq(seq) => Some(seq),
            After::Id(id) => self.seen.get(id).map(|(seq, _)| *seq),
        };
        let Some(after) = after else {
            return HistoryRead {
                after: None,
                head: self.seq,
                epoch_start: 1,
                streams: Vec::new(),
                positions: None,
            };
        };
        let read = |stream: Option<&MemStream>| match stream {
            // Trimming removes the oldest: nothing after `after` is gone if the newest
            // trimmed entry is at or before it (the Redis rule). An entry replaced by a
            // later one with its `collapse` key is not missing: the later one stands for it.
            Some(s) if s.expires.is_some_and(|t| t > now) => StreamRead {
                complete: s.trimmed_through <= after,
                entries: s
                    .entries
                    .iter()
                    .filter(|(seq, _)| *seq > after)
                    .map(|(_, payload)| payload.clone())
                    .collect(),
            },
            // Never written, or expired a whole window after its last write: nothing after
            // a position inside the window can have been in it.
            _ => StreamRead {
                complete: true,
                entries: Vec::new(),
            },
        };
        let streams = streams
            .iter()
            .map(|key| match key {
                StreamKey::All => read(Some(&self.all)),
                StreamKey::User(user) => read(self.users.get(*user)),
                StreamKey::Group(group) => read(self.groups.get(*group)),
            })
            .collect();
        HistoryRead {
            after: Some(after),
            head: self.seq,
            // One process, one line of history: it starts with the process.
            epoch_start: 1,
            streams,
            positions: None,
        }
    }

    fn forget_expired(&mut self, now: Instant) {
        while let Some((expires, _)) = self.seen_order.front() {
            if *expires > now {
                break;
            }
            let (_, id) = self.seen_order.pop_front().expect("not empty");
            if self.seen.get(&id).is_some_and(|(_, t)| *t <= now) {
                self.seen.remove(&id);
            }
        }
        self.calls += 1;
        if self.calls % 4096 == 0 {
            self.users.retain(|_, s| s.expires.is_some_and(|t| t > now));
            self.groups
                .retain(|_, s| s.expires.is_some_and(|t| t > now));
        }
    }
}

/// What a client resuming with `since` gets.
#[derive(Debug)]
pub enum Replay {
    /// Everything after `since` for this user, in order (not yet filtered by target
    /// details, preferences or ttl); live messages up to `head` are covered by it.
    Recovered {
        messages: Vec<BusMessage>,
        head: u64,
    },
    /// `since` is unknown or older than the history: nothing is replayed.
    NotRecovered,
}

/// Merges stream reads into one list in sequence order, without duplicates, keeping only
/// sequence numbers in `(after, upto]`.
fn merge(reads: &[StreamRead], after: u64, upto: u64, into: &mut BTreeMap<u64, Bytes>) {
    for read in reads {
        for payload in &read.entries {
            if let Some(seq) = payload_seq(payload).filter(|s| *s > after && *s <= upto) {
                into.entry(seq).or_insert_with(|| payload.clone());
            }
        }
    }
}

fn decode_all(payloads: BTreeMap<u64, Bytes>) -> Vec<BusMessage> {
    payloads
        .into_values()
        .filter_map(|payload| match BusMessage::decode(payload) {
            Ok(msg) => Some(msg),
            Err(e) => {
                tracing::warn!(error = %e, "undecodable history entry skipped");
                None
            }
        })
        .collect()
}

/// The messages `user` (a member of `groups`) missed after the message `since`, from
/// their stream, the broadcast stream and each group's stream.
pub async fn replay(
    bus: &dyn Bus,
    user: &str,
    groups: &[Arc<str>],
    since: &str,
) -> Result<Replay, BusError> {
    let mut keys = vec![StreamKey::User(user), StreamKey::All];
    keys.extend(groups.iter().map(|g| StreamKey::Group(g)));
    let read = bus.read_history(After::Id(since), &keys).await?;
    let Some(after) = read.after else {
        return Ok(Replay::NotRecovered);
    };
    // Before the epoch, the old primary may have numbered messages this server never got.
    if after < read.epoch_start || read.streams.iter().any(|s| !s.complete) {
        return Ok(Replay::NotRecovered);
    }
    let mut payloads = BTreeMap::new();
    merge(&read.streams, after, read.head, &mut payloads);
    Ok(Replay::Recovered {
        messages: decode_all(payloads),
        head: read.head,
    })
}

/// What a node missed of the bus, for the users connected to it.
#[derive(Debug, Default)]
pub struct Recovered {
    /// The bus's last sequence number when recovery read it: the node is whole up to it.
    pub head: u64,
    /// Routed mode: the channel counters read with `head`.
    pub positions: Option<super::Positions>,
    /// The missed messages for these users (and broadcasts), in sequence order.
    pub messages: Vec<BusMessage>,
    /// The bus lost its state (Redis restarted empty, or a new epoch began: a failover, a
    /// crash): what was published before cannot be known; every user should be told.
    pub reset: bool,
    /// The broadcast stream was trimmed past the gap: every user missed something.
    pub lost_all: bool,
    /// Users whose own stream was trimmed past the gap.
    pub lost_users: Vec<Arc<str>>,
    /// Groups whose stream was trimmed past the gap.
    pub lost_groups: Vec<Arc<str>>,
}

/// User and group streams read per history request during recovery.
const USERS_PER_READ: usize = 200;

/// Reads what `users` and `groups` missed after sequence number `after`, in the bus epoch
/// that started at `epoch` (as the node last saw it). When the bus's counter is behind
/// `after`, the bus lost its state: everything since the reset is read. When the epoch
/// changed, `after` may be a number the new epoch gave to another message: everything the
/// new server has from the point both agree on is read, and the result is a reset.
pub async fn recover(
    bus: &dyn Bus,
    users: &[Arc<str>],
    groups: &[Arc<str>],
    after: u64,
    epoch: Option<u64>,
) -> Result<Recovered, BusError> {
    let mut out = Recovered::default();
    // Users, then groups: entry `i` belongs to `owner(i)`.
    let streams: Vec<StreamKey<'_>> = users
        .iter()
        .map(|u| StreamKey::User(u))
        .chain(groups.iter().map(|g| StreamKey::Group(g)))
        .collect();
    let first = streams.len().min(USERS_PER_READ);
    let mut keys = vec![StreamKey::All];
    keys.extend_from_slice(&streams[..first]);
    let mut after = after;
    let mut read = bus.read_history(After::Seq(after), &keys).await?;
    if epoch.is_some_and(|e| e != read.epoch_start) {
        out.reset = true;
        let agreed = after.min(read.epoch_start.saturating_sub(1));
        if agreed != after {
            after = agreed;
            read = bus.read_history(After::Seq(after), &keys).await?;
        }
    } else if read.head < after {
        out.reset = true;
        after = 0;
        read = bus.read_history(After::Seq(0), &keys).await?;
    }
    out.head = read.head;
    out.positions = read.positions;
    let mut payloads = BTreeMap::new();
    let mut note = |read: &HistoryRead, start: usize, skip: usize, out: &mut Recovered| {
        merge(&read.streams, after, out.head, &mut payloads);
        for (i, stream) in read.streams[skip..].iter().enumerate() {
            if stream.complete {
                continue;
            }
            match users.get(start + i) {
                Some(user) => out.lost_users.push(user.clone()),
                None => out
                    .lost_groups
                    .push(groups[start + i - users.len()].clone()),
            }
        }
    };
    out.lost_all = read.streams.first().is_some_and(|s| !s.complete);
    note(&read, 0, 1, &mut out);
    let mut start = first;
    for chunk in streams[first..].chunks(USERS_PER_READ) {
        let read = bus.read_history(After::Seq(after), chunk).await?;
        note(&read, start, 0, &mut out);
        start += chunk.len();
    }
    out.messages = decode_all(payloads);
    Ok(out)
}

#[cfg(test)]
mod tests;

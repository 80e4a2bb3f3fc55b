//! The message history behind resume and gap recovery (DESIGN §6).
//!
//! * [`MemoryHistory`] is the history of the in-process bus; the Redis bus keeps the same
//!   structure in Redis (see [`super::redis`]). Both follow one contract: per-user streams
//!   and one broadcast stream, each holding its newest `recovery.max_messages` entries for
//!   `recovery.window` after its last write, keyed by sequence number; ids remembered for
//!   the window so a client's `since` resolves to a sequence number.
//! * [`replay`] answers a resuming client: everything after its `since`, from its own
//!   stream and the broadcast stream, in sequence order — or "not recovered" when any of
//!   it may be missing. Never a silent partial replay.
//! * [`recover`] answers a node that missed part of the bus: everything its connected users
//!   missed, and which users cannot be made whole.

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
    /// True once an entry was trimmed away.
    trimmed: bool,
    expires: Option<Instant>,
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
    /// Calls since start; every 4096th sweeps expired user streams.
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
        for key in msg.streams() {
            let stream = match key {
                StreamKey::All => &mut self.all,
                StreamKey::User(user) => self.users.entry(user.into()).or_default(),
            };
            if stream.expires.is_some_and(|t| t <= now) {
                *stream = MemStream::default();
            }
            stream.entries.push_back((self.seq, payload.clone()));
            while stream.entries.len() > self.max_messages {
                stream.entries.pop_front();
                stream.trimmed = true;
            }
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
            };
        };
        let read = |stream: Option<&MemStream>| match stream {
            // Trimming removes the oldest: nothing after `after` is gone if nothing was
            // ever trimmed or an entry at or before `after` is still there (the Redis rule).
            Some(s) if s.expires.is_some_and(|t| t > now) => StreamRead {
                complete: !s.trimmed || s.entries.front().is_some_and(|(seq, _)| *seq <= after),
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
            })
            .collect();
        HistoryRead {
            after: Some(after),
            head: self.seq,
            // One process, one line of history: it starts with the process.
            epoch_start: 1,
            streams,
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

/// The messages `user` missed after the message `since`, from their stream and the
/// broadcast stream.
pub async fn replay(bus: &dyn Bus, user: &str, since: &str) -> Result<Replay, BusError> {
    let read = bus
        .read_history(After::Id(since), &[StreamKey::User(user), StreamKey::All])
        .await?;
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
    /// The missed messages for these users (and broadcasts), in sequence order.
    pub messages: Vec<BusMessage>,
    /// The bus lost its state (Redis restarted empty, or a new epoch began: a failover, a
    /// crash): what was published before cannot be known; every user should be told.
    pub reset: bool,
    /// The broadcast stream was trimmed past the gap: every user missed something.
    pub lost_all: bool,
    /// Users whose own stream was trimmed past the gap.
    pub lost_users: Vec<Arc<str>>,
}

/// Users read per history request during recovery.
const USERS_PER_READ: usize = 200;

/// Reads what `users` missed after sequence number `after`, in the bus epoch that started
/// at `epoch` (as the node last saw it). When the bus's counter is behind `after`, the bus
/// lost its state: everything since the reset is read. When the epoch changed, `after` may
/// be a number the new epoch gave to another message: everything the new server has from
/// the point both agree on is read, and the result is a reset.
pub async fn recover(
    bus: &dyn Bus,
    users: &[Arc<str>],
    after: u64,
    epoch: Option<u64>,
) -> Result<Recovered, BusError> {
    let mut out = Recovered::default();
    let first = &users[..users.len().min(USERS_PER_READ)];
    let mut keys = vec![StreamKey::All];
    keys.extend(first.iter().map(|u| StreamKey::User(u)));
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
    let mut payloads = BTreeMap::new();
    let mut note = |read: &HistoryRead, users: &[Arc<str>], skip: usize, out: &mut Recovered| {
        merge(&read.streams, after, out.head, &mut payloads);
        for (user, stream) in users.iter().zip(&read.streams[skip..]) {
            if !stream.complete {
                out.lost_users.push(user.clone());
            }
        }
    };
    out.lost_all = read.streams.first().is_some_and(|s| !s.complete);
    note(&read, first, 1, &mut out);
    for chunk in users[first.len()..].chunks(USERS_PER_READ) {
        let keys: Vec<StreamKey<'_>> = chunk.iter().map(|u| StreamKey::User(u)).collect();
        let read = bus.read_history(After::Seq(after), &keys).await?;
        note(&read, chunk, 0, &mut out);
    }
    out.messages = decode_all(payloads);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::Header;
    use crate::envelope::Target;

    fn outgoing(id: &str, to: Target) -> Outgoing {
        Outgoing::new(
            Header {
                id: id.into(),
                msg_type: "t".into(),
                to,
                ts: 1,
                ttl_ms: None,
                at_us: 0,
            },
            &format!("frame-{id}"),
        )
    }

    fn user(u: &str) -> Target {
        Target::User {
            user: u.into(),
            platform: None,
            tab: None,
        }
    }

    fn seqs(read: &StreamRead) -> Vec<u64> {
        read.entries
            .iter()
            .map(|p| payload_seq(p).unwrap())
            .collect()
    }

    #[test]
    fn ids_resolve_and_duplicates_are_not_published_again() {
        let mut h = MemoryHistory::new(10, Duration::from_secs(60));
        let (p1, payload) = h.append(&outgoing("a", user("alice")));
        assert_eq!((p1.seq, p1.duplicate), (1, false));
        assert!(payload.unwrap().starts_with(b"1\n"));
        let (again, none) = h.append(&outgoing("a", user("alice")));
        assert_eq!((again.seq, again.duplicate, none), (1, true, None));
        h.append(&outgoing("b", Target::All));
        h.append(&outgoing(
            "c",
            Target::Users(vec!["alice".into(), "bob".into()]),
        ));
        let read = h.read(After::Id("a"), &[StreamKey::User("alice"), StreamKey::All]);
        assert_eq!((read.after, read.head), (Some(1), 3));
        assert_eq!(seqs(&read.streams[0]), [3]);
        assert_eq!(seqs(&read.streams[1]), [2]);
        assert!(h.read(After::Id("never"), &[]).after.is_none());
    }

    #[test]
    fn trimming_past_the_position_is_reported() {
        let mut h = MemoryHistory::new(3, Duration::from_secs(60));
        for i in 0..5 {
            h.append(&outgoing(&i.to_string(), user("alice")));
        }
        let keys = [StreamKey::User("alice")];
        let read = h.read(After::Seq(1), &keys);
        assert!(!read.streams[0].complete, "seq 2 was trimmed");
        let read = h.read(After::Seq(2), &keys);
        assert!(
            !read.streams[0].complete,
            "the oldest left is 3: 2 may be gone"
        );
        let read = h.read(After::Seq(3), &keys);
        assert!(read.streams[0].complete);
        assert_eq!(seqs(&read.streams[0]), [4, 5]);
        let read = h.read(After::Seq(0), &[StreamKey::User("nobody")]);
        assert!(read.streams[0].complete && read.streams[0].entries.is_empty());
    }

    #[test]
    fn everything_is_forgotten_after_the_window() {
        let mut h = MemoryHistory::new(3, Duration::from_millis(1));
        h.append(&outgoing("a", user("alice")));
        std::thread::sleep(Duration::from_millis(5));
        assert!(h.read(After::Id("a"), &[]).after.is_none());
        let read = h.read(After::Seq(0), &[StreamKey::User("alice")]);
        assert!(read.streams[0].entries.is_empty());
    }

    #[test]
    fn merge_orders_and_dedupes_within_bounds() {
        let p = |s: u64| sequenced(s, b"x");
        let reads = [
            StreamRead {
                complete: true,
                entries: vec![p(2), p(5), p(9)],
            },
            StreamRead {
                complete: true,
                entries: vec![p(3), p(5), p(7)],
            },
        ];
        let mut out = BTreeMap::new();
        merge(&reads, 2, 7, &mut out);
        assert_eq!(out.keys().copied().collect::<Vec<_>>(), [3, 5, 7]);
    }
}

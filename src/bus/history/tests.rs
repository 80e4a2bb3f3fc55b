//! Unit tests of the in-memory history ([`MemoryHistory`]) against the history contract.

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
            collapse: None,
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
        read.streams[0].complete,
        "2 is the newest trimmed: nothing after it is gone"
    );
    let read = h.read(After::Seq(3), &keys);
    assert!(read.streams[0].complete);
    assert_eq!(seqs(&read.streams[0]), [4, 5]);
    let read = h.read(After::Seq(0), &[StreamKey::User("nobody")]);
    assert!(read.streams[0].complete && read.streams[0].entries.is_empty());
}

fn ticked(id: &str, to: Target, key: &str) -> Outgoing {
    let mut out = outgoing(id, to);
    out.header.collapse = Some(key.into());
    Outgoing::new(out.header, &format!("frame-{id}"))
}

#[test]
fn a_collapse_key_keeps_one_entry_per_stream() {
    let mut h = MemoryHistory::new(3, Duration::from_secs(60));
    h.append(&outgoing("first", user("alice")));
    for i in 0..100 {
        h.append(&ticked(&format!("tick-{i}"), user("alice"), "job"));
    }
    h.append(&ticked("g", Target::Group("store".into()), "job"));
    h.append(&ticked("other", user("alice"), "other-job"));
    let keys = [StreamKey::User("alice"), StreamKey::Group("store")];
    let read = h.read(After::Id("first"), &keys);
    assert_eq!(seqs(&read.streams[0]), [101, 103], "the latest tick only");
    assert!(read.streams[0].complete, "replaced is not missing");
    assert_eq!(seqs(&read.streams[1]), [102], "streams collapse separately");
    // A replaced message still resolves as a position.
    let read = h.read(After::Id("tick-50"), &keys);
    assert_eq!(read.after, Some(52));
    assert_eq!(seqs(&read.streams[0]), [101, 103]);
    assert!(read.streams[0].complete);
    // Trimming still counts: 3 slots, 4 keys.
    for k in ["a", "b", "c", "d"] {
        h.append(&ticked(k, user("alice"), k));
    }
    let read = h.read(After::Id("first"), &keys);
    assert!(!read.streams[0].complete, "job's tick was trimmed");
    assert_eq!(seqs(&read.streams[0]), [105, 106, 107]);
    let read = h.read(After::Id("a"), &keys);
    assert!(read.streams[0].complete);
}

#[test]
fn collapse_keys_of_trimmed_entries_are_forgotten() {
    let mut h = MemoryHistory::new(2, Duration::from_secs(60));
    for i in 0..50 {
        h.append(&ticked(&i.to_string(), user("alice"), &format!("k{i}")));
    }
    let stream = &h.users["alice"];
    assert!(stream.collapse.len() <= 5, "{}", stream.collapse.len());
    assert_eq!(stream.entries.len(), 2);
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

//! Unit tests of the receipts task's decisions: presence, claims, rendering, acks.

use std::collections::HashSet;

use serde_json::Value;

use std::time::Duration;

use async_trait::async_trait;

use super::task::Worker;
use super::*;
use crate::envelope::Platform;
use crate::metrics::Receipt;

/// Presence as a fixed set of online users (any platform, any tab).
struct Online(HashSet<&'static str>);

#[async_trait]
impl Directory for Online {
    async fn online(&self, queries: &[Query<'_>]) -> Result<Vec<bool>, String> {
        Ok(queries.iter().map(|q| self.0.contains(q.user)).collect())
    }
}

struct Down;

#[async_trait]
impl Directory for Down {
    async fn online(&self, _: &[Query<'_>]) -> Result<Vec<bool>, String> {
        Err("redis is down".into())
    }
}

fn worker(directory: Option<Arc<dyn Directory>>) -> Worker {
    Worker::new(
        "node-a".into(),
        Claims::Local(LocalClaims::new(Duration::from_secs(600))),
        directory,
        Arc::new(Metrics::new()),
    )
}

fn header(id: &str, to: Target, ttl_ms: Option<u64>, ts: i64) -> Header {
    Header {
        id: id.into(),
        msg_type: "robot.reply".into(),
        to,
        ts,
        ttl_ms,
        at_us: 0,
        collapse: None,
    }
}

fn users(list: &[&str]) -> Target {
    Target::Users(list.iter().map(|u| u.to_string()).collect())
}

/// The handle's events, as the task would take them.
fn events(report: impl FnOnce(&Receipts)) -> Vec<Event> {
    let (receipts, mut inbox) = Receipts::channel(Arc::new(Metrics::new()));
    report(&receipts);
    let mut out = Vec::new();
    while let Ok(e) = inbox.rx.try_recv() {
        out.push(e);
    }
    out
}

fn parsed(out: &[(Receipt, Out)]) -> Vec<Value> {
    out.iter()
        .map(|(_, o)| {
            let v: Value = serde_json::from_str(&o.value).unwrap();
            assert_eq!(v["user"].as_str(), Some(o.key.as_str()), "keyed by user");
            v
        })
        .collect()
}

fn outcomes(out: &[(Receipt, Out)]) -> Vec<String> {
    parsed(out)
        .iter()
        .map(|v| {
            format!(
                "{} {} {}",
                v["outcome"].as_str().unwrap(),
                v["id"].as_str().unwrap(),
                v["user"].as_str().unwrap()
            )
        })
        .collect()
}

#[tokio::test]
async fn offline_users_of_a_published_message_get_one_offline_record() {
    let mut w = worker(Some(Arc::new(Online(["alice"].into()))));
    let now = now_ms();
    let evs = events(|r| {
        r.published(
            vec![header("m1", users(&["alice", "bob", "carol"]), None, now)],
            now,
        );
        r.published(
            vec![header(
                "m2",
                Target::User {
                    user: "dave".into(),
                    platform: Some(Platform::Ios),
                    tab: None,
                },
                None,
                now,
            )],
            now,
        );
        r.published(vec![header("m3", Target::All, None, now)], now);
    });
    assert_eq!(evs.len(), 2, "only user targets are reported");
    let out = w.records(evs).await;
    assert_eq!(
        outcomes(&out),
        ["offline m1 bob", "offline m1 carol", "offline m2 dave"]
    );
    let v = &parsed(&out)[0];
    assert_eq!(v["type"], "robot.reply");
    assert_eq!(v["conns"], 0);
    assert_eq!(v["node"], "node-a");
    assert!(v["ts"].as_i64().unwrap() >= now);
}

#[tokio::test]
async fn a_negative_outcome_is_claimed_once_whoever_reports_it() {
    let mut w = worker(Some(Arc::new(Online([].into()))));
    let now = now_ms();
    let msg = MsgRef::of(&header("m1", users(&["alice"]), None, now));
    let alice: Arc<str> = Arc::from("alice");
    // Two nodes saw the type switched off (the task of one node claims like the other's).
    let evs = events(|r| {
        r.routed(msg.clone(), vec![(alice.clone(), Routed::Filtered)]);
        r.routed(msg.clone(), vec![(alice.clone(), Routed::Filtered)]);
    });
    assert_eq!(outcomes(&w.records(evs).await), ["filtered m1 alice"]);
    // Ingest then finds alice offline (she left meanwhile): already reported.
    let evs = events(|r| r.published(vec![header("m1", users(&["alice"]), None, now)], now));
    assert!(w.records(evs).await.is_empty());
    // An expired message: expired for every user at ingest, and again on a node.
    let evs = events(|r| {
        r.published(
            vec![header("m2", users(&["alice", "bob"]), Some(1), now - 5_000)],
            now,
        );
        let m2 = MsgRef::of(&header("m2", users(&["alice"]), None, now));
        r.routed(m2, vec![(alice.clone(), Routed::Expired)]);
    });
    assert_eq!(
        outcomes(&w.records(evs).await),
        ["expired m2 alice", "expired m2 bob"]
    );
}

fn alice() -> Target {
    Target::User {
        user: "alice".into(),
        platform: None,
        tab: None,
    }
}

#[tokio::test]
async fn delivered_is_reported_per_node_with_its_connection_count() {
    let mut w = worker(None);
    let msg = MsgRef::of(&header("m1", alice(), None, 0));
    let alice: Arc<str> = Arc::from("alice");
    let out = w
        .records(events(|r| {
            let ticket = r.ticket(&msg, &alice).unwrap();
            for _ in 0..3 {
                ticket.written();
            }
        }))
        .await;
    let v = &parsed(&out)[0];
    assert_eq!(
        (v["outcome"].as_str(), v["conns"].as_u64(), v["id"].as_str()),
        (Some("delivered"), Some(3), Some("m1"))
    );
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["id", "type", "user", "outcome", "conns", "node", "ts"]
    );
    // Not claimed: a second node's delivery is reported too.
    let again = events(|r| r.ticket(&msg, &alice).unwrap().written());
    assert_eq!(w.records(again).await.len(), 1);
}

#[test]
fn a_ticket_reports_once_its_last_holder_lets_go_and_only_if_written() {
    let (receipts, mut inbox) = Receipts::channel(Arc::new(Metrics::new()));
    let msg = MsgRef::of(&header("m1", alice(), None, 0));
    let alice: Arc<str> = Arc::from("alice");
    // Three connections' queue entries; two are written, one is dropped unwritten.
    let ticket = receipts.ticket(&msg, &alice).unwrap();
    let entries: Vec<_> = (0..3).map(|_| ticket.clone()).collect();
    drop(ticket);
    for (i, entry) in entries.into_iter().enumerate() {
        if i < 2 {
            entry.written();
        }
        drop(entry);
        let reported = inbox.summaries();
        if i < 2 {
            assert!(reported.is_empty(), "entry {i}: others still hold it");
        } else {
            assert_eq!(reported, ["delivered m1 alice 2"]);
        }
    }
    // Nothing written (every connection closed first): nothing reported.
    let ticket = receipts.ticket(&msg, &alice).unwrap();
    drop(ticket.clone());
    drop(ticket);
    assert!(inbox.summaries().is_empty());
    assert!(Receipts::off().ticket(&msg, &alice).is_none());
}

#[tokio::test]
async fn acks_become_one_record_per_id_in_bounded_events() {
    let mut w = worker(None);
    let (user, conn): (Arc<str>, Arc<str>) = (Arc::from("alice"), Arc::from("c-1"));
    let mut ids: Vec<String> = (0..ACK_IDS_PER_EVENT * 2 + 1)
        .map(|i| format!("id-{i}"))
        .collect();
    ids.push("x".repeat(ACK_ID_MAX + 1));
    let evs = events(|r| r.acked(&user, &conn, ids));
    assert_eq!(
        evs.len(),
        3,
        "split into events of at most {ACK_IDS_PER_EVENT} ids"
    );
    let out = w.records(evs).await;
    assert_eq!(
        out.len(),
        ACK_IDS_PER_EVENT * 2 + 1,
        "the overlong id is ignored"
    );
    let v = &parsed(&out)[0];
    assert_eq!(v["outcome"], "acked");
    assert_eq!(v["conn"], "c-1");
    assert_eq!(v["id"], "id-0");
    assert!(v.get("type").is_none() && v.get("conns").is_none());
    assert_eq!(
        w.metrics
            .receipts_dropped
            .with_label_values(&[ReceiptDropped::BadAck.label()])
            .get(),
        0,
        "counted by the handle's metrics, not the worker's"
    );
}

#[tokio::test]
async fn without_presence_no_offline_and_failures_are_counted() {
    let now = now_ms();
    let mut w = worker(None);
    let evs = events(|r| r.published(vec![header("m1", alice(), None, now)], now));
    assert!(
        w.records(evs).await.is_empty(),
        "no presence: nothing claimed"
    );
    let mut w = worker(Some(Arc::new(Down)));
    let evs = events(|r| r.published(vec![header("m1", users(&["a", "b"]), None, now)], now));
    assert!(w.records(evs).await.is_empty());
    let failed = w
        .metrics
        .receipts_dropped
        .with_label_values(&[ReceiptDropped::PresenceFailed.label()])
        .get();
    assert_eq!(failed, 2);
}

#[test]
fn an_off_handle_reports_nothing_and_a_full_channel_counts() {
    let off = Receipts::off();
    assert!(!off.is_on());
    off.acked(&Arc::from("a"), &Arc::from("c"), vec!["x".into()]);
    let metrics = Arc::new(Metrics::new());
    let (on, _inbox) = Receipts::channel(metrics.clone());
    let msg = MsgRef::of(&header("m", alice(), None, 0));
    let user: Arc<str> = Arc::from("alice");
    for _ in 0..CHANNEL + 5 {
        on.routed(msg.clone(), vec![(user.clone(), Routed::Filtered)]);
    }
    let full = metrics
        .receipts_dropped
        .with_label_values(&[ReceiptDropped::ChannelFull.label()])
        .get();
    assert_eq!(full, 5, "beyond the channel's events");
    // Beyond the pending records, however few events: a message to many users.
    let (on, mut inbox) = Receipts::channel(metrics.clone());
    let many: Vec<_> = (0..PENDING_MAX / 2 + 1)
        .map(|_| (user.clone(), Routed::Filtered))
        .collect();
    on.routed(msg.clone(), many.clone());
    on.routed(msg.clone(), many.clone());
    let full = metrics
        .receipts_dropped
        .with_label_values(&[ReceiptDropped::ChannelFull.label()])
        .get();
    assert_eq!(full, 5 + many.len() as u64, "the second one did not fit");
    assert_eq!(inbox.summaries().len(), many.len());
    on.routed(msg.clone(), many);
    assert_eq!(
        inbox.summaries().len(),
        PENDING_MAX / 2 + 1,
        "room again once taken"
    );
}

#[test]
fn local_claims_expire_after_the_window() {
    let mut claims = LocalClaims::new(Duration::from_millis(0));
    assert!(claims.claim("m", "a"));
    assert!(claims.claim("m", "a"), "the window passed");
    let mut claims = LocalClaims::new(Duration::from_secs(60));
    assert!(claims.claim("m", "a"));
    assert!(!claims.claim("m", "a"));
    assert!(claims.claim("m", "b"));
    // Ids and user ids may hold `:`: `a:b` for `c` and `a` for `b:c` are two claims.
    assert!(claims.claim("a:b", "c"));
    assert!(claims.claim("a", "b:c"));
    assert!(!claims.claim("a", "b:c"));
}

#[tokio::test]
async fn taking_a_batch_in_two_steps_frees_each_event_once() {
    let (receipts, mut inbox) = Receipts::channel(Arc::new(Metrics::new()));
    let now = now_ms();
    for id in ["m1", "m2", "m3"] {
        receipts.published(vec![header(id, users(&["alice", "bob"]), None, now)], now);
    }
    let counted = inbox.pending.load(Ordering::Relaxed);
    assert!(counted > 0);
    // What the task does when it lingers: a first take, then one appended to it.
    let mut batch = Vec::new();
    assert_eq!(inbox.recv_many(&mut batch, 1).await, 1);
    assert_eq!(inbox.recv_many(&mut batch, 8).await, 2);
    assert_eq!(batch.len(), 3);
    assert_eq!(
        inbox.pending.load(Ordering::Relaxed),
        0,
        "counted {counted}; every event leaves the count once"
    );
}

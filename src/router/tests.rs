//! Unit tests of routing, filtering, de-duplication and gap recovery.

use super::*;
use crate::bus::local::LocalBus;
use crate::bus::{After, Header, Outgoing, StreamKey};
use crate::envelope::{Platform, Target};
use crate::registry::Limits;
use crate::types::{TypeConfig, TypesConfig, UnknownTypes};

mod receipts;

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
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::default());
    let router = Router::new(
        registry.clone(),
        metrics,
        types,
        bus,
        None,
        Duration::from_secs(600),
    );
    (router, registry)
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
    let frames = |rx: &mut crate::registry::QueueRx| {
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

    router.handle(control("alice", &[("t", false), ("promo", true)]));
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
        seq: 0,
        header: Header {
            id: id.into(),
            msg_type: "t".into(),
            to,
            ts,
            ttl_ms,
            at_us: 0,
            collapse: None,
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

fn alice() -> Target {
    Target::User {
        user: "alice".into(),
        platform: None,
        tab: None,
    }
}

/// Publishes `n` messages for alice on `bus`; returns their payloads as the bus sent them.
async fn publish_for_alice(bus: &dyn Bus, n: usize, tag: &str) -> Vec<bytes::Bytes> {
    for i in 0..n {
        let out = Outgoing::new(
            Header {
                id: format!("{tag}-{i}"),
                msg_type: "t".into(),
                to: alice(),
                ts: now_ms(),
                ttl_ms: None,
                at_us: 0,
                collapse: None,
            },
            &format!("{tag}-{i}"),
        );
        bus.publish_message(&out).await.unwrap();
    }
    let read = bus
        .read_history(After::Seq(0), &[StreamKey::User("alice")])
        .await
        .unwrap();
    read.streams[0].entries.clone()
}

fn bus_event(payload: &bytes::Bytes) -> BusEvent {
    BusEvent::Message {
        channel: Channel::Bus,
        payload: payload.clone(),
    }
}

async fn frames_within(rx: &mut crate::registry::QueueRx, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    while out.len() < n {
        let q = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("frame in time")
            .expect("queue open");
        out.push(q.frame.to_string());
    }
    out
}

#[tokio::test]
async fn a_sequence_jump_is_filled_from_the_history_in_order() {
    let (router, registry) = setup();
    let (_g, _c, mut rx) = registry
        .register("alice", None, None, router.types.defaults(), 0)
        .unwrap();
    let payloads = publish_for_alice(&*router.bus, 5, "m").await;
    let (tx, events) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let task = tokio::spawn(router.run(events, stop.clone()));
    // 2 and 3 never arrive live: the router must read them back before routing 4 and 5.
    for i in [0, 3, 4] {
        tx.send(bus_event(&payloads[i])).await.unwrap();
    }
    assert_eq!(
        frames_within(&mut rx, 5).await,
        ["m-0", "m-1", "m-2", "m-3", "m-4"]
    );
    // A late live copy of a recovered message is not delivered again.
    tx.send(bus_event(&payloads[2])).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx.try_recv().is_err(), "nothing twice");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_reset_bus_tells_connections_they_lost_messages_then_carries_on() {
    let (mut router, registry) = setup();
    let (_g, _c, mut rx) = registry
        .register("alice", None, None, router.types.defaults(), 0)
        .unwrap();
    // The router followed an old bus up to seq 3; the bus it reads now started again.
    let old: Arc<dyn Bus> = Arc::new(LocalBus::default());
    for payload in publish_for_alice(&*old, 3, "old").await {
        router.handle(bus_event(&payload));
    }
    assert_eq!(frames_within(&mut rx, 3).await.len(), 3);
    let fresh = publish_for_alice(&*router.bus, 2, "new").await;
    let (tx, events) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let task = tokio::spawn(router.run(events, stop.clone()));
    tx.send(bus_event(&fresh[1])).await.unwrap();
    let frames = frames_within(&mut rx, 3).await;
    assert_eq!(frames[..2], ["new-0", "new-1"]);
    assert!(frames[2].contains("messages_lost"), "{frames:?}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_lost_subscription_is_recovered_even_when_the_bus_then_goes_quiet() {
    let (router, registry) = setup();
    let (_g, _c, mut rx) = registry
        .register("alice", None, None, router.types.defaults(), 0)
        .unwrap();
    let payloads = publish_for_alice(&*router.bus, 3, "q").await;
    let (tx, events) = mpsc::channel(16);
    let stop = CancellationToken::new();
    let task = tokio::spawn(router.run(events, stop.clone()));
    tx.send(bus_event(&payloads[0])).await.unwrap();
    assert_eq!(frames_within(&mut rx, 1).await, ["q-0"]);
    // Nothing else arrives: the idle check finds the counter moved on.
    assert_eq!(frames_within(&mut rx, 2).await, ["q-1", "q-2"]);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn control_messages_dispatch_on_kind_and_kicks_close_only_that_user() {
    let (router, registry) = setup();
    let metrics = router.metrics.clone();
    let auth = Arc::new(
        crate::auth::Authenticator::new(&crate::config::AuthConfig {
            jwt_secret: "s".into(),
            ..Default::default()
        })
        .unwrap(),
    );
    let store = crate::prefs::Store::open("sqlite::memory:", 8).unwrap(); // lazy: not used here
    let kicks = crate::kick::Kicks::new(
        store,
        router.bus.clone(),
        auth.clone(),
        registry.clone(),
        metrics.clone(),
    );
    let mut router = router.with_kicks(kicks);
    let defaults = router.types.defaults();
    let (_a1, alice1, _q1) = registry.register("alice", None, None, defaults, 0).unwrap();
    let (_a2, alice2, _q2) = registry.register("alice", None, None, defaults, 0).unwrap();
    let (_b, bob, _qb) = registry.register("bob", None, None, defaults, 0).unwrap();
    let (_c, carol, _qc) = registry.register("carol", None, None, defaults, 0).unwrap();
    let kick = |user: &str, revoked_before: Option<i64>| BusEvent::Message {
        channel: Channel::Control,
        payload: crate::kick::Kick {
            kind: "kick".into(),
            user: user.into(),
            revoked_before,
            ts: now_ms(),
        }
        .encode(),
    };

    assert!(router.handle(kick("alice", None)).is_none());
    assert_eq!(alice1.closing(), Some(protocol::Close::Kicked));
    assert_eq!(alice2.closing(), Some(protocol::Close::Kicked));
    assert_eq!(bob.closing(), None, "other users stay");
    assert!(
        auth.revocations().is_empty(),
        "a plain kick revokes nothing"
    );

    router.handle(kick("carol", Some(42)));
    assert_eq!(carol.closing(), Some(protocol::Close::TokenRevoked));
    assert_eq!(auth.revocations().revoked_before("carol"), Some(42));
    assert_eq!(bob.closing(), None);
    assert_eq!(metrics.revocations.get(), 1);
    let kicked = |code: &str| metrics.kicked_connections.with_label_values(&[code]).get();
    assert_eq!((kicked("4004"), kicked("4003")), (2, 1));

    // Preference changes still apply; an unknown kind is dropped and counted.
    router.handle(control("bob", &[("t", false)]));
    assert_eq!(bob.prefs.get() & router.types.defaults(), 0);
    assert_eq!(metrics.bus_bad_payloads.get(), 0);
    router.handle(BusEvent::Message {
        channel: Channel::Control,
        payload: bytes::Bytes::from_static(br#"{"kind":"later","user":"bob"}"#),
    });
    assert_eq!(metrics.bus_bad_payloads.get(), 1);
    assert_eq!(bob.closing(), None);
}

#[tokio::test]
async fn a_bus_gap_makes_the_node_reread_revocations_at_once() {
    let (router, registry) = setup();
    let path = std::env::temp_dir().join(format!("fanout-kick-{:08x}.db", rand::random::<u32>()));
    let store = crate::prefs::Store::open(&format!("sqlite://{}", path.display()), 8).unwrap();
    store.migrate().await.unwrap();
    let auth = Arc::new(
        crate::auth::Authenticator::new(&crate::config::AuthConfig {
            jwt_secret: "s".into(),
            ..Default::default()
        })
        .unwrap(),
    );
    let kicks = crate::kick::Kicks::new(
        store.clone(),
        router.bus.clone(),
        auth.clone(),
        registry.clone(),
        router.metrics.clone(),
    );
    let mut router = router.with_kicks(kicks.clone());
    let stop = CancellationToken::new();
    let reloading = tokio::spawn(kicks.run(stop.clone()));
    // Revoked while this node heard nothing (its announcement lost with the gap).
    store.revoke("dora", 50).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(auth.revocations().revoked_before("dora"), None);

    let _recovery = router.handle(BusEvent::Gap { reason: "test" });
    let deadline = Instant::now() + Duration::from_secs(3); // the periodic re-read: 10 s
    while auth.revocations().revoked_before("dora").is_none() {
        assert!(Instant::now() < deadline, "not re-read after the gap");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(auth.revocations().revoked_before("dora"), Some(50));
    stop.cancel();
    reloading.await.unwrap().unwrap();
    let _ = std::fs::remove_file(&path);
}

/// Publishes `n` messages for group `store` on `bus`; returns their payloads as sent.
async fn publish_for_store(bus: &dyn Bus, n: usize, tag: &str) -> Vec<bytes::Bytes> {
    let mut sent = Vec::new();
    for i in 0..n {
        let out = Outgoing::new(
            Header {
                id: format!("{tag}-{i}"),
                msg_type: "t".into(),
                to: Target::Group("store".into()),
                ts: now_ms(),
                ttl_ms: None,
                at_us: 0,
                collapse: None,
            },
            &format!("{tag}-{i}"),
        );
        let seq = bus.publish_message(&out).await.unwrap().seq;
        sent.push(crate::bus::sequenced(seq, out.body()));
    }
    sent
}

#[tokio::test]
async fn a_sequence_jump_is_filled_for_groups_and_a_trimmed_group_is_told() {
    for (max_messages, expected) in [
        (200, vec!["s-0", "s-1", "s-2", "s-3", "s-4"]),
        // s-1 and s-2 trimmed: what is left, then the notice.
        (2, vec!["s-0", "s-3", "s-4", "messages_lost"]),
    ] {
        let (router, registry) = setup();
        let recovery = crate::config::RecoveryConfig {
            max_messages,
            ..Default::default()
        };
        let bus: Arc<dyn Bus> = Arc::new(LocalBus::new(1 << 10, &recovery));
        let router = Router { bus, ..router };
        let (_g, _c, mut rx) = registry
            .register_in(
                "pc",
                None,
                None,
                &["store".to_owned()],
                router.types.defaults(),
                0,
            )
            .unwrap();
        let payloads = publish_for_store(&*router.bus, 5, "s").await;
        let first = BusMessage::decode(payloads[0].clone()).unwrap();
        assert_eq!(first.header.id, "s-0", "{max_messages}");
        let (tx, events) = mpsc::channel(16);
        let stop = CancellationToken::new();
        let task = tokio::spawn(router.run(events, stop.clone()));
        // s-0 live, then the last: the router reads the group's stream back.
        tx.send(bus_event(&payloads[0])).await.unwrap();
        tx.send(bus_event(payloads.last().unwrap())).await.unwrap();
        let frames = frames_within(&mut rx, expected.len()).await;
        for (frame, want) in frames.iter().zip(&expected) {
            assert!(frame.contains(want), "{max_messages}: {frames:?}");
        }
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn telling_all_lost_reaches_every_connection_once_and_counts() {
    let (router, registry) = setup();
    let (_a, _c, mut alice) = registry
        .register("alice", None, None, router.types.defaults(), 0)
        .unwrap();
    let (_b, _d, mut bob) = registry
        .register("bob", Some(Platform::Ios), None, router.types.defaults(), 0)
        .unwrap();
    assert_eq!(tell_all_lost(&registry, &router.metrics), 2);
    for rx in [&mut alice, &mut bob] {
        let frames = frames_within(rx, 1).await;
        assert!(frames[0].contains("messages_lost"), "{frames:?}");
        assert!(rx.try_recv().is_err(), "once");
    }
    let lost = router
        .metrics
        .gap_recoveries
        .with_label_values(&[crate::metrics::GapRecovery::Lost.label()])
        .get();
    assert_eq!(lost, 1);
}

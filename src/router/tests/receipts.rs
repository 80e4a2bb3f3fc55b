//! What the router reports to receipts: one ticket per user and message, negative outcomes.

use super::*;

/// The router with receipts on, and what it reports.
fn with_receipts() -> (Router, Arc<Registry>, crate::receipts::Inbox) {
    let (router, registry) = setup();
    let (receipts, inbox) = Receipts::channel(router.metrics.clone());
    (router.with_receipts(receipts), registry, inbox)
}

/// What sessions do with queued frames: write each (marking its receipt ticket), in the
/// order of `queues`.
fn write_all(queues: &mut [&mut crate::registry::QueueRx]) {
    for queue in queues {
        while let Ok(queued) = queue.try_recv() {
            if let Some(ticket) = queued.ticket {
                ticket.written();
            }
        }
    }
}

#[test]
fn receipts_count_each_users_connections_once_per_message() {
    let (mut router, registry, mut inbox) = with_receipts();
    let defaults = router.types.defaults();
    let promo_on = router.types.apply(defaults, [("promo", true)]);
    let (_a1, _, mut q1) = registry
        .register("alice", Some(Platform::Ios), None, defaults, 0)
        .unwrap();
    let (_a2, _, mut q2) = registry
        .register("alice", Some(Platform::H5), Some("t-1".into()), defaults, 0)
        .unwrap();
    let (_b, _, mut q3) = registry.register("bob", None, None, promo_on, 0).unwrap();
    let users = Target::Users(vec!["alice".into(), "bob".into(), "carol".into()]);
    router.route(&typed("1", "t", users.clone()));
    assert!(inbox.summaries().is_empty(), "queued, not written yet");
    write_all(&mut [&mut q3, &mut q1, &mut q2]);
    assert_eq!(
        inbox.summaries(),
        ["delivered 1 bob 1", "delivered 1 alice 2"],
        "one report per user here, once its last connection wrote it; none for carol, \
         who has no connection here"
    );
    router.route(&typed("2", "promo", users));
    assert_eq!(inbox.summaries(), ["filtered 2 alice"]);
    write_all(&mut [&mut q1, &mut q2, &mut q3]);
    assert_eq!(inbox.summaries(), ["delivered 2 bob 1"]);
    let ios = Target::User {
        user: "alice".into(),
        platform: Some(Platform::Ios),
        tab: None,
    };
    router.route(&typed("3", "t", ios));
    write_all(&mut [&mut q1, &mut q2]);
    assert_eq!(inbox.summaries(), ["delivered 3 alice 1"]);
    // A connection that closes before writing is not counted.
    router.route(&typed("3b", "t", alice()));
    write_all(&mut [&mut q1]);
    drop(q2);
    assert_eq!(inbox.summaries(), ["delivered 3b alice 1"]);
    let tab = Target::User {
        user: "alice".into(),
        platform: None,
        tab: Some("t-9".into()),
    };
    router.route(&typed("4", "t", tab));
    assert!(inbox.summaries().is_empty(), "no matching connection here");
    router.route(&typed("5", "t", Target::All));
    assert!(inbox.summaries().is_empty(), "only user targets");
    router.route(&msg("6", alice(), now_ms() - 10_000, Some(1_000)));
    assert_eq!(inbox.summaries(), ["expired 6 alice"]);
    router.route(&typed("1", "t", alice()));
    assert!(inbox.summaries().is_empty(), "a duplicate is not reported");
}

#[test]
fn receipts_leave_out_connections_whose_queue_is_full() {
    let (mut router, registry, mut inbox) = with_receipts();
    let (_a, _, mut q) = registry
        .register("alice", None, None, router.types.defaults(), 0)
        .unwrap();
    for i in 0..Limits::small().queue_max_messages {
        router.route(&typed(&format!("m{i}"), "t", alice()));
    }
    router.route(&typed("over", "t", alice()));
    assert!(inbox.summaries().is_empty(), "nothing written yet");
    write_all(&mut [&mut q]);
    assert_eq!(
        inbox.summaries().len(),
        Limits::small().queue_max_messages,
        "not queued: neither delivered nor a negative outcome from this node"
    );
}

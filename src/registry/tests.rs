//! Unit tests of the registry: targeting, limits, queues, preference changes.

use super::*;
use crate::protocol::Close;

fn registry(per_user: usize, queue: usize, bytes: usize) -> Arc<Registry> {
    Registry::new(
        Limits {
            max_connections: per_user + 1,
            max_connections_per_user: per_user,
            queue_max_messages: queue,
            queue_max_bytes: bytes,
        },
        Arc::new(Metrics::new()),
    )
}

fn ids(reg: &Registry, target: &Target) -> Vec<String> {
    let mut out = Vec::new();
    reg.for_each_target(target, |c| {
        out.push(format!("{}/{}", c.user, c.tab.as_deref().unwrap_or("-")))
    });
    out.sort();
    out
}

#[test]
fn targets_select_the_right_connections() {
    let reg = registry(5, 8, 1024);
    let (_a1, a1, _r1) = reg
        .register("alice", Some(Platform::Ios), Some("t1".into()), 0, 0)
        .unwrap();
    let (_a2, _, _r2) = reg
        .register("alice", Some(Platform::H5), Some("t2".into()), 0, 0)
        .unwrap();
    let (_b, _, _r3) = reg.register("bob", None, None, 0, 0).unwrap();
    let user = |u: &str, p, t: Option<&str>| Target::User {
        user: u.into(),
        platform: p,
        tab: t.map(Into::into),
    };
    assert_eq!(
        ids(&reg, &user("alice", None, None)),
        ["alice/t1", "alice/t2"]
    );
    assert_eq!(
        ids(&reg, &user("alice", Some(Platform::H5), None)),
        ["alice/t2"]
    );
    assert_eq!(ids(&reg, &user("alice", None, Some("t1"))), ["alice/t1"]);
    assert_eq!(
        ids(&reg, &user("alice", Some(Platform::Android), None)),
        Vec::<String>::new()
    );
    assert_eq!(ids(&reg, &user("carol", None, None)), Vec::<String>::new());
    assert_eq!(
        ids(&reg, &Target::Users(vec!["bob".into(), "carol".into()])),
        ["bob/-"]
    );
    assert_eq!(ids(&reg, &Target::Conn(a1.id.to_string())), ["alice/t1"]);
    assert_eq!(ids(&reg, &Target::All).len(), 3);
}

#[test]
fn dropping_the_guard_unregisters() {
    let reg = registry(5, 8, 1024);
    let (guard, _, _rx) = reg.register("alice", None, None, 0, 0).unwrap();
    assert_eq!((reg.connection_count(), reg.user_count()), (1, 1));
    drop(guard);
    assert_eq!((reg.connection_count(), reg.user_count()), (0, 0));
}

#[test]
fn limits_refuse_registration() {
    let reg = registry(2, 8, 1024);
    let _a = reg.register("alice", None, None, 0, 0).unwrap();
    let _b = reg.register("alice", None, None, 0, 0).unwrap();
    assert_eq!(
        reg.register("alice", None, None, 0, 0).err(),
        Some(RegisterError::UserFull)
    );
    let _c = reg.register("bob", None, None, 0, 0).unwrap();
    assert_eq!(
        reg.register("carol", None, None, 0, 0).err(),
        Some(RegisterError::NodeFull)
    );
}

#[test]
fn a_change_reaches_the_user_entry_or_waits_for_their_first_connection() {
    let reg = registry(5, 8, 1024);
    let (_a, a, mut rx) = reg.register("alice", None, None, 0b01, 100).unwrap();
    let (_b, b, _rb) = reg.register("alice", None, None, 0b11, 100).unwrap();
    assert_eq!(
        (a.prefs.get(), b.prefs.get()),
        (0b01, 0b01),
        "one entry per user"
    );
    assert_eq!(reg.apply_prefs("alice", 0b10, 200, &"prefs".into()), 2);
    assert_eq!(b.prefs.get(), 0b10);
    rx.try_recv().unwrap();
    assert_eq!(
        reg.apply_prefs("alice", 0b11, 150, &"stale".into()),
        0,
        "older than held"
    );
    assert_eq!(b.prefs.get(), 0b10);
    reg.apply_prefs("alice", 0b10, 200, &"prefs".into());
    assert_eq!(rx.try_recv().unwrap().frame.as_str(), "prefs");

    // bob's change lands while his preferences are being read (version 150 < 200)...
    assert_eq!(reg.apply_prefs("bob", 0b100, 200, &"prefs".into()), 0);
    let (_c, c, _) = reg.register("bob", None, None, 0b001, 150).unwrap();
    assert_eq!(
        c.prefs.get(),
        0b100,
        "the newer change wins over the stale read"
    );
    // ...but an older change does not override a fresher read.
    reg.apply_prefs("carol", 0b100, 200, &"prefs".into());
    let (_d, d, _) = reg.register("carol", None, None, 0b001, 300).unwrap();
    assert_eq!(d.prefs.get(), 0b001);
}

#[tokio::test]
async fn overflow_by_count_or_bytes_asks_for_4001() {
    let reg = registry(5, 2, 1024);
    let (_g, conn, mut rx) = reg.register("alice", None, None, 0, 0).unwrap();
    conn.push("a".into()).unwrap();
    conn.push("b".into()).unwrap();
    assert_eq!(conn.push("c".into()), Err(PushError::Overflow));
    assert_eq!(conn.closing(), Some(Close::TooSlow));
    assert_eq!(conn.push("d".into()), Err(PushError::Closed));
    assert_eq!(rx.recv().await.unwrap().frame.as_str(), "a");

    let reg = registry(5, 100, 10);
    let (_g, conn, _rx) = reg.register("bob", None, None, 0, 0).unwrap();
    conn.push("12345".into()).unwrap();
    conn.push("12345".into()).unwrap();
    assert_eq!(conn.push("1".into()), Err(PushError::Overflow));
    assert_eq!(conn.closing(), Some(Close::TooSlow));
}

#[test]
fn groups_select_their_connections_until_they_close() {
    let reg = registry(5, 8, 1024);
    let groups = |g: &[&str]| g.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let (a1, _, _r1) = reg
        .register_in(
            "alice",
            None,
            Some("t1".into()),
            &groups(&["store-42", "ops", "store-42"]),
            0,
            0,
        )
        .unwrap();
    let (_a2, _, _r2) = reg
        .register_in("alice", None, Some("t2".into()), &groups(&["ops"]), 0, 0)
        .unwrap();
    let (bg, b, _r3) = reg
        .register_in("bob", None, None, &groups(&["store-42"]), 0, 0)
        .unwrap();
    let (_c, _, _r4) = reg.register("carol", None, None, 0, 0).unwrap();
    let store = Target::Group("store-42".into());
    assert_eq!(
        ids(&reg, &store),
        ["alice/t1", "bob/-"],
        "listed twice, once"
    );
    assert_eq!(
        ids(&reg, &Target::Group("ops".into())),
        ["alice/t1", "alice/t2"]
    );
    assert_eq!(
        ids(&reg, &Target::Group("store-4".into())),
        Vec::<String>::new()
    );
    assert!(b.is_target(&store) && !b.is_target(&Target::Group("ops".into())));
    let mut names: Vec<String> = reg.groups().iter().map(|g| g.to_string()).collect();
    names.sort();
    assert_eq!(names, ["ops", "store-42"]);
    drop(a1);
    assert_eq!(ids(&reg, &store), ["bob/-"]);
    assert_eq!(reg.for_each_of_group("ops", |_| {}), 1);
    drop(bg);
    assert!(
        !reg.groups().iter().any(|g| &**g == "store-42"),
        "emptied groups go"
    );
}

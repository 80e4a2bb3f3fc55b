use super::events::Event;
use super::*;

fn local() -> Presence {
    Presence::new(Options {
        node: "n-1".into(),
        backend: Backend::Local,
        session_timeout: Duration::from_secs(10),
        events: None,
        metrics: Arc::new(Metrics::new()),
    })
}

fn info(user: &str, conn: &str, platform: Option<Platform>, tab: Option<&str>) -> ConnInfo {
    ConnInfo {
        user: user.into(),
        conn: conn.into(),
        node: "n-1".into(),
        platform,
        tab: tab.map(str::to_owned),
        connected_at: 1_000 + conn.len() as i64,
    }
}

#[tokio::test]
async fn the_in_process_presence_is_the_nodes_own_table() {
    let p = local();
    p.connected(info("ann", "c-1", Some(Platform::Ios), None));
    p.connected(info("ann", "c-22", None, Some("t-1")));
    p.connected(info("bob", "c-3", None, None));
    let conns = p.connections("ann").await.unwrap();
    assert_eq!(
        conns.iter().map(|c| c.conn.as_str()).collect::<Vec<_>>(),
        ["c-1", "c-22"],
        "oldest first"
    );
    assert_eq!(p.inner.metrics.presence_connections.get(), 3);
    p.disconnected("ann", "c-1", 1000);
    p.disconnected("ann", "c-1", 1000); // twice: ignored
    p.disconnected("zed", "c-9", 1000); // unknown: ignored
    assert_eq!(p.connections("ann").await.unwrap().len(), 1);
    assert!(p.connections("nobody").await.unwrap().is_empty());
    assert_eq!(p.inner.metrics.presence_connections.get(), 2);
    assert!(
        p.inner.table.lock().dirty.is_empty(),
        "nothing to write in-process"
    );
}

#[tokio::test]
async fn online_matches_platform_and_tab_like_to_does() {
    let p = local();
    p.connected(info("ann", "c-1", Some(Platform::Ios), Some("t-1")));
    let q = |user, platform, tab| OnlineQuery {
        user,
        platform,
        tab,
    };
    let answers = p
        .online(&[
            q("ann", None, None),
            q("ann", Some(Platform::Ios), None),
            q("ann", Some(Platform::Android), None),
            q("ann", None, Some("t-1")),
            q("ann", Some(Platform::Ios), Some("t-2")),
            q("bob", None, None),
        ])
        .await
        .unwrap();
    assert_eq!(answers, [true, true, false, true, false, false]);
}

#[test]
fn a_dirty_list_that_grows_past_its_bound_becomes_one_rewrite() {
    let mut table = Table::default();
    for i in 0..DIRTY_MAX {
        table.mark(&format!("c-{i}"), Change::Put { user: "u".into() });
    }
    assert_eq!(table.dirty.len(), DIRTY_MAX);
    assert!(!table.resync);
    // Marking one already listed again does not count.
    table.mark("c-0", Change::Remove { user: "u".into() });
    assert!(!table.resync);
    table.mark("c-new", Change::Put { user: "u".into() });
    assert!(table.resync);
    assert!(table.dirty.is_empty(), "the list is dropped, not grown");
    table.mark("c-newer", Change::Put { user: "u".into() });
    assert!(
        table.dirty.is_empty(),
        "until the rewrite, nothing is listed"
    );
}

#[test]
fn events_have_the_documented_shape() {
    let c = info("ann", "c-1", Some(Platform::H5), Some("t-1"));
    let connect = serde_json::to_value(Event::connect(&c, 1003)).unwrap();
    assert_eq!(
        connect,
        serde_json::json!({"event":"connect","user":"ann","conn":"c-1","node":"n-1",
            "platform":"h5","tab":"t-1","ts":1003})
    );
    let bare = info("bob", "c-2", None, None);
    let disconnect = serde_json::to_value(Event::disconnect(&bare, 4001, 7)).unwrap();
    assert_eq!(
        disconnect,
        serde_json::json!({"event":"disconnect","user":"bob","conn":"c-2","node":"n-1",
            "platform":null,"tab":null,"ts":7,"code":4001})
    );
}

#[test]
fn the_dead_bound_follows_the_session_timeout() {
    assert_eq!(dead_bound(Duration::from_secs(10)), Duration::from_secs(15));
    assert_eq!(dead_bound(Duration::from_secs(6)), Duration::from_secs(11));
}

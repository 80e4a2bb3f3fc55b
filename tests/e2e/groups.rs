//! Groups and collapse (issue 17, DESIGN §2 `to.group` and `collapse`, §6): a group message
//! reaches every connection whose token carries the group, on every node, filtered by each
//! member's preferences; it resumes like a personal one; and a job's progress ticks with one
//! `collapse` key take one history slot, so a reconnecting client gets the latest.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::resume::urlencode;
use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);
const QUIET: Duration = Duration::from_millis(1500);

/// A token for `user` in `groups` (the JWT claim `groups`).
fn group_token(user: &str, groups: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": user, "exp": exp, "groups": groups}),
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn member(
    cluster: &TestCluster,
    node: usize,
    user: &str,
    groups: &[&str],
    query: &str,
) -> Client {
    Client::connect(
        &cluster.node(node).ws_url(query),
        Some(&group_token(user, groups)),
    )
    .await
}

fn to_group(group: &str, msg_type: &str, n: u64) -> Value {
    json!({ "type": msg_type, "to": { "group": group }, "data": { "n": n } })
}

fn n_of(m: &Value) -> u64 {
    m["data"]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("no data.n in {m}"))
}

async fn rejected(cluster: &TestCluster, reason: &str) -> f64 {
    let sample = format!("fanout_ingest_rejected_total{{reason=\"{reason}\"}}");
    cluster.node(0).metric(&sample).await + cluster.node(1).metric(&sample).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_message_reaches_the_groups_connections_on_both_nodes_and_nobody_else() {
    let cluster = TestCluster::start(2).await;
    let p = &cluster.producer;
    let mut pc1 = member(&cluster, 0, "pc-1", &["store-42"], "").await;
    let mut pc2 = member(&cluster, 1, "pc-2", &["ops", "store-42"], "").await;
    let mut pc3 = member(&cluster, 1, "pc-3", &["store-43"], "").await;
    let mut ann = cluster.connect(0, "ann", "").await;
    // `?groups=` is for insecure mode only: with tokens, only the claim counts.
    let mut sly = cluster.connect(1, "sly", "groups=store-42").await;
    // A member who switched order.status off.
    let mut quiet = member(&cluster, 0, "pc-4", &["store-42"], "").await;
    quiet
        .send_json(json!({"t":"prefs.set","prefs":{"order.status":false}}))
        .await;
    loop {
        let f = quiet.next_frame(WAIT).await.expect("a prefs frame");
        if f["t"] == "prefs" {
            assert_eq!(f["prefs"]["order.status"], json!(false), "{f}");
            break;
        }
    }

    p.send("store-42", to_group("store-42", "order.status", 1))
        .await;
    for (who, c) in [("pc-1", &mut pc1), ("pc-2", &mut pc2)] {
        let m = c.expect_msg(WAIT).await;
        assert_eq!(
            (n_of(&m), m["type"].as_str()),
            (1, Some("order.status")),
            "{who}"
        );
        assert!(
            m.get("collapse").is_none(),
            "no collapse key, no field: {m}"
        );
    }
    p.send("store-42", to_group("store-42", "robot.reply", 2))
        .await;
    assert_eq!(
        n_of(&quiet.expect_msg(WAIT).await),
        2,
        "filtered by type only"
    );
    for c in [&mut pc1, &mut pc2] {
        assert_eq!(n_of(&c.expect_msg(WAIT).await), 2);
    }
    for (who, c) in [
        ("pc-3 (another group)", &mut pc3),
        ("ann (no group)", &mut ann),
        ("sly (?groups= with a token)", &mut sly),
        ("pc-4 (switched order.status off)", &mut quiet),
        ("pc-1", &mut pc1),
        ("pc-2", &mut pc2),
    ] {
        assert!(c.msgs_during(QUIET).await.is_empty(), "{who}");
    }

    // Bad groups and collapse keys are rejected records; too many groups refuse the token.
    let (bad_target, invalid) = (
        rejected(&cluster, "bad_target").await,
        rejected(&cluster, "invalid").await,
    );
    p.send("x", json!({"type":"order.status","to":{"group":""}}))
        .await;
    p.send(
        "x",
        json!({"type":"order.status","to":{"group":"g","user":"ann"}}),
    )
    .await;
    p.send(
        "x",
        json!({"type":"order.status","to":{"group":"store-42"},"collapse":{"k":1}}),
    )
    .await;
    eventually(WAIT, "the bad records are rejected", || async {
        rejected(&cluster, "bad_target").await >= bad_target + 2.0
            && rejected(&cluster, "invalid").await >= invalid + 1.0
    })
    .await;
    assert!(pc1.msgs_during(QUIET).await.is_empty());
    let many: Vec<String> = (0..33).map(|i| format!("g{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let bearer = format!("Bearer {}", group_token("pc-9", &many));
    let Err((status, body)) =
        Client::try_connect(&cluster.node(0).ws_url(""), &[("authorization", &bearer)]).await
    else {
        panic!("a token with 33 groups was let in");
    };
    assert_eq!(status.as_u16(), 400, "{body}");
    assert!(body.contains("bad_groups"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_reconnecting_with_since_gets_the_group_messages_it_missed() {
    let cluster = TestCluster::start_with(
        2,
        Options::default().with("FANOUT__RECOVERY__MAX_MESSAGES", "20"),
    )
    .await;
    let p = &cluster.producer;
    let mut pc = member(&cluster, 0, "pc-1", &["store-42"], "").await;
    p.send("store-42", to_group("store-42", "order.status", 0))
        .await;
    let last = pc.expect_msg(WAIT).await;
    drop(pc);

    for n in 1..=5 {
        p.send("store-42", to_group("store-42", "order.status", n))
            .await;
    }
    p.send("store-43", to_group("store-43", "order.status", 98))
        .await;
    // marketing is off by default: filtered on replay too.
    p.send("store-42", to_group("store-42", "marketing", 99))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let since = format!("since={}", urlencode(last["id"].as_str().unwrap()));
    let mut pc = member(&cluster, 1, "pc-1", &["store-42"], &since).await;
    assert_eq!(
        pc.hello["resume"],
        json!({"recovered": true, "replayed": 5}),
        "{}",
        pc.hello
    );
    let mut replayed = Vec::new();
    for _ in 0..5 {
        replayed.push(pc.expect_msg(WAIT).await);
    }
    assert_eq!(
        replayed.iter().map(n_of).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5],
        "in order, filtered"
    );
    p.send("store-42", to_group("store-42", "order.status", 6))
        .await;
    assert_eq!(n_of(&pc.expect_msg(WAIT).await), 6, "then live");
    assert!(pc.msgs_during(QUIET).await.is_empty(), "nothing twice");
    let last = replayed.last().unwrap().clone();
    drop(pc);

    // More than recovery.max_messages (20) for the group while away: not recoverable.
    for n in 7..=31 {
        p.send("store-42", to_group("store-42", "order.status", n))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let since = format!("since={}", urlencode(last["id"].as_str().unwrap()));
    let mut pc = member(&cluster, 0, "pc-1", &["store-42"], &since).await;
    assert_eq!(
        pc.hello["resume"],
        json!({"recovered": false, "replayed": 0}),
        "{}",
        pc.hello
    );
    assert!(pc.msgs_during(QUIET).await.is_empty(), "no partial replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_progress_ticks_replay_as_the_latest_one() {
    let cluster = TestCluster::start_with(
        2,
        Options::default().with("FANOUT__RECOVERY__MAX_MESSAGES", "20"),
    )
    .await;
    let p = &cluster.producer;
    let mut tab = member(&cluster, 0, "rep", &["store-42"], "").await;
    // Another tab stays connected on the other node and sees every tick live.
    let mut watcher = member(&cluster, 1, "rep", &["store-42"], "tab=w").await;
    p.send(
        "rep",
        json!({"type":"robot.reply","to":{"user":"rep"},"data":{"n":0}}),
    )
    .await;
    let last = tab.expect_msg(WAIT).await;
    assert_eq!(n_of(&watcher.expect_msg(WAIT).await), 0);
    drop(tab);

    for pct in 0..100u64 {
        p.send(
            "rep",
            json!({"type":"order.status","to":{"user":"rep"},"collapse":"report-7","data":{"pct":pct}}),
        )
        .await;
        p.send(
            "store-42",
            json!({"type":"order.status","to":{"group":"store-42"},"collapse":"sync","data":{"pct":pct}}),
        )
        .await;
    }
    let mut latest = BTreeSet::new();
    let mut live = 0;
    while latest.len() < 2 {
        let m = watcher.expect_msg(WAIT).await;
        live += 1;
        assert!(m["collapse"].is_string(), "live ticks carry collapse: {m}");
        if m["data"]["pct"] == json!(99) {
            latest.insert(m["collapse"].as_str().unwrap().to_owned());
        }
    }
    assert!(live >= 2);

    let since = format!("since={}", urlencode(last["id"].as_str().unwrap()));
    let mut tab = member(&cluster, 1, "rep", &["store-42"], &since).await;
    assert_eq!(
        tab.hello["resume"],
        json!({"recovered": true, "replayed": 2}),
        "200 ticks for a 20-slot history, 2 keys: {}",
        tab.hello
    );
    let mut got = BTreeSet::new();
    for _ in 0..2 {
        let m = tab.expect_msg(WAIT).await;
        assert_eq!(m["data"]["pct"], json!(99), "the latest tick: {m}");
        got.insert(
            m["collapse"]
                .as_str()
                .expect("collapse in the frame")
                .to_owned(),
        );
    }
    assert_eq!(
        got,
        BTreeSet::from(["report-7".to_owned(), "sync".to_owned()])
    );
    assert!(
        tab.msgs_during(QUIET).await.is_empty(),
        "exactly one per key"
    );
}

/// The embedded default (insecure auth, in-process bus): `?groups=` puts a connection in
/// groups, a group message published over HTTP reaches them, and its ticks collapse in the
/// in-memory history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_takes_groups_from_the_query_and_collapses_in_memory() {
    let node = EmbeddedNode::start(&[]).await;
    let ws = |q: &str| format!("ws://{}/ws?{q}", node.public);
    let mut pc = Client::connect(&ws("user=pc-1&groups=store-42,ops"), None).await;
    let mut other = Client::connect(&ws("user=pc-2&groups=store-43"), None).await;
    let http = reqwest::Client::new();
    let publish = |body: Value| {
        let (http, url) = (http.clone(), node.http("/v1/publish"));
        async move {
            let r = http.post(url).body(body.to_string()).send().await.unwrap();
            assert_eq!(r.status().as_u16(), 202, "{}", r.text().await.unwrap());
        }
    };
    publish(json!({"type":"robot.reply","to":{"group":"store-42"},"data":{"n":0}})).await;
    let first = pc.expect_msg(WAIT).await;
    assert_eq!(n_of(&first), 0);
    assert!(other.msgs_during(QUIET).await.is_empty(), "another group");
    drop(pc);

    for n in 1..=30 {
        publish(json!({"type":"robot.reply","to":{"group":"ops"},"collapse":"job","data":{"n":n}}))
            .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let since = urlencode(first["id"].as_str().unwrap());
    let mut pc = Client::connect(
        &ws(&format!("user=pc-1&groups=store-42,ops&since={since}")),
        None,
    )
    .await;
    assert_eq!(
        pc.hello["resume"],
        json!({"recovered": true, "replayed": 1}),
        "{}",
        pc.hello
    );
    let m = pc.expect_msg(WAIT).await;
    assert_eq!((n_of(&m), m["collapse"].as_str()), (30, Some("job")), "{m}");
    assert!(pc.msgs_during(QUIET).await.is_empty());

    let bad = http
        .get(node.http("/ws?user=pc-3&groups=a,b%0Ac"))
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    assert!(bad.text().await.unwrap().contains("bad_groups"));
}

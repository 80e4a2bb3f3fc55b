//! Resume with `since` (DESIGN §6): a client that reconnects, to any node, gets exactly what
//! it missed, in order, then live messages — or `recovered: false` and nothing replayed.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);
const QUIET: Duration = Duration::from_millis(1500);

fn numbered(user: &str, msg_type: &str, n: u64) -> Value {
    json!({ "type": msg_type, "to": { "user": user }, "data": { "n": n } })
}

fn n_of(m: &Value) -> u64 {
    m["data"]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("no data.n in {m}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnecting_to_the_other_node_with_since_gets_exactly_what_it_missed() {
    let cluster = TestCluster::start(2).await;
    let p = &cluster.producer;
    let mut ann = cluster.connect(0, "ann", "").await;
    p.send("ann", numbered("ann", "robot.reply", 0)).await;
    let last = ann.expect_msg(WAIT).await;
    assert_eq!(n_of(&last), 0);
    drop(ann);

    // While she is away: hers (one partition, keyed by her), a broadcast, one she switched
    // off (marketing is off by default), one that expires, and one for someone else.
    for n in 1..=10 {
        p.send("ann", numbered("ann", "robot.reply", n)).await;
    }
    p.send(
        "ann",
        json!({"type":"order.status","to":{"all":true},"data":{"n":11}}),
    )
    .await;
    p.send("ann", numbered("ann", "marketing", 99)).await;
    // Expired by the time she is back: ttl_ms holds on replay too.
    let mut short = numbered("ann", "robot.reply", 97);
    short["ttl_ms"] = json!(500);
    p.send("ann", short).await;
    p.send("ann", numbered("bob", "robot.reply", 98)).await;
    p.send("ann", numbered("ann", "order.status", 12)).await;
    // Let both nodes' routers see them, so the replay is from the history, not luck.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let since = last["id"].as_str().unwrap();
    let mut ann = cluster
        .connect(1, "ann", &format!("since={}", urlencode(since)))
        .await;
    assert_eq!(
        ann.hello["resume"],
        json!({"recovered": true, "replayed": 12}),
        "{}",
        ann.hello
    );
    let replayed: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..12 {
            v.push(n_of(&ann.expect_msg(WAIT).await));
        }
        v
    };
    assert_eq!(replayed, (1..=12).collect::<Vec<_>>(), "in order, filtered");

    p.send("ann", numbered("ann", "robot.reply", 13)).await;
    assert_eq!(n_of(&ann.expect_msg(WAIT).await), 13, "then live messages");
    assert!(ann.msgs_during(QUIET).await.is_empty(), "nothing twice");
    assert!(
        cluster
            .node(1)
            .metric("fanout_resumes_total{result=\"recovered\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_beyond_the_history_is_answered_not_recovered_and_nothing_is_replayed() {
    let options = Options::default().with("FANOUT__RECOVERY__MAX_MESSAGES", "5");
    let cluster = TestCluster::start_with(2, options).await;
    let p = &cluster.producer;
    let mut ola = cluster.connect(0, "ola", "").await;
    p.send("ola", numbered("ola", "robot.reply", 0)).await;
    let since = ola.expect_msg(WAIT).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(ola);
    for n in 1..=8 {
        p.send("ola", numbered("ola", "robot.reply", n)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut ola = cluster
        .connect(1, "ola", &format!("since={}", urlencode(&since)))
        .await;
    assert_eq!(
        ola.hello["resume"],
        json!({"recovered": false, "replayed": 0}),
        "8 missed, 5 kept: never a partial replay"
    );
    assert!(ola.msgs_during(QUIET).await.is_empty(), "nothing replayed");
    p.send("ola", numbered("ola", "robot.reply", 9)).await;
    assert_eq!(n_of(&ola.expect_msg(WAIT).await), 9, "live messages flow");

    let unknown = cluster.connect(0, "ola", "since=not-an-id").await;
    assert_eq!(
        unknown.hello["resume"],
        json!({"recovered": false, "replayed": 0})
    );
    let fresh = cluster.connect(0, "ola", "").await;
    assert!(fresh.hello.get("resume").is_none(), "no since, no resume");
}

/// A client that keeps reconnecting (to alternate nodes) while messages stream in ends
/// with every message exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_produced_during_the_replay_are_neither_lost_nor_duplicated() {
    const TOTAL: u64 = 300;
    let cluster = TestCluster::start(2).await;
    let producer = cluster.producer.clone();
    let mut pia = cluster.connect(0, "pia", "").await;
    let stream = tokio::spawn(async move {
        for n in 0..TOTAL {
            producer
                .send("pia", numbered("pia", "robot.reply", n))
                .await;
            if n % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let mut got: Vec<u64> = Vec::new();
    let mut last_id: Option<String> = None;
    let mut reconnects = 0;
    while got.len() < TOTAL as usize {
        // Read a few, then drop the connection and resume on the other node.
        let burst = 5 + reconnects % 7;
        for _ in 0..burst {
            let Some(m) = pia_next(&mut pia).await else {
                break;
            };
            got.push(n_of(&m));
            last_id = Some(m["id"].as_str().unwrap().to_owned());
            if got.len() == TOTAL as usize {
                break;
            }
        }
        if got.len() == TOTAL as usize {
            break;
        }
        reconnects += 1;
        let query = last_id
            .as_deref()
            .map(|id| format!("since={}", urlencode(id)))
            .unwrap_or_default();
        pia = cluster.connect(reconnects % 2, "pia", &query).await;
        if last_id.is_some() {
            assert_eq!(
                pia.hello["resume"]["recovered"], true,
                "resume {reconnects}: {}",
                pia.hello
            );
        }
    }
    stream.await.unwrap();
    assert!(reconnects >= 20, "the test reconnected {reconnects} times");
    assert_eq!(
        got,
        (0..TOTAL).collect::<Vec<_>>(),
        "every message once, in order"
    );
    assert!(pia.msgs_during(QUIET).await.is_empty(), "nothing extra");
}

async fn pia_next(client: &mut Client) -> Option<Value> {
    loop {
        let f = client.next_frame(WAIT).await?;
        if f["t"] == "msg" {
            return Some(f);
        }
    }
}

/// Percent-encodes a query value.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_stream_loses_nothing_its_clients_resume_elsewhere() {
    const TOTAL: u64 = 120;
    let mut cluster = TestCluster::start(2).await;
    let users = ["kim", "kai", "kit", "kev"];
    let mut clients = Vec::new();
    for user in users {
        clients.push(cluster.connect(0, user, "").await);
    }
    let producer = cluster.producer.clone();
    let stream = tokio::spawn(async move {
        for n in 0..TOTAL {
            for user in users {
                producer.send(user, numbered(user, "robot.reply", n)).await;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    });
    // Read some, then node 0 dies with SIGKILL: no commit, no goodbye.
    let mut got: Vec<Vec<u64>> = vec![Vec::new(); users.len()];
    let mut last: Vec<String> = vec![String::new(); users.len()];
    for (i, client) in clients.iter_mut().enumerate() {
        while got[i].len() < 10 {
            let m = client.expect_msg(WAIT).await;
            got[i].push(n_of(&m));
            last[i] = m["id"].as_str().unwrap().to_owned();
        }
    }
    cluster.nodes[0].kill();
    for (i, client) in clients.iter_mut().enumerate() {
        // Whatever was already on the socket before the kill.
        for m in client.msgs_during(Duration::from_millis(200)).await {
            got[i].push(n_of(&m));
            last[i] = m["id"].as_str().unwrap().to_owned();
        }
    }
    let mut resumed = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let c = cluster
            .connect(1, user, &format!("since={}", urlencode(&last[i])))
            .await;
        assert_eq!(c.hello["resume"]["recovered"], true, "{}", c.hello);
        resumed.push(c);
    }
    stream.await.unwrap();
    for (i, client) in resumed.iter_mut().enumerate() {
        // The dead node's partitions move to the survivor after the session timeout.
        while got[i].len() < TOTAL as usize {
            let m = client.expect_msg(Duration::from_secs(45)).await;
            got[i].push(n_of(&m));
        }
        let unique: BTreeSet<u64> = got[i].iter().copied().collect();
        assert_eq!(got[i].len(), unique.len(), "{} got a duplicate", users[i]);
        assert_eq!(
            unique,
            (0..TOTAL).collect(),
            "{} missed a message",
            users[i]
        );
        assert_eq!(
            got[i],
            (0..TOTAL).collect::<Vec<_>>(),
            "{}: in order",
            users[i]
        );
        assert!(client
            .msgs_during(Duration::from_millis(500))
            .await
            .is_empty());
    }
}

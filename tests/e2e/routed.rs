//! Routed delivery (`bus.routing = "routed"`): a message for a user reaches only the nodes
//! holding one of their connections, and a user who moves to another node resumes there
//! exactly once. (These run routed whatever `FANOUT_TEST_BUS_ROUTING` says.)

use std::time::Duration;

use serde_json::{json, Value};

use crate::resume::urlencode;
use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);
const QUIET: Duration = Duration::from_millis(1500);

fn routed() -> Options {
    Options::default().with("FANOUT__BUS__ROUTING", "routed")
}

fn numbered(user: &str, n: u64) -> Value {
    json!({ "type": "robot.reply", "to": { "user": user }, "data": { "n": n } })
}

fn n_of(m: &Value) -> u64 {
    m["data"]["n"]
        .as_u64()
        .unwrap_or_else(|| panic!("no data.n in {m}"))
}

/// Frames a node received on its own channel and on the bus channel.
async fn received(node: &Node) -> (f64, f64) {
    (
        node.metric("fanout_bus_received_total{channel=\"node\"}")
            .await,
        node.metric("fanout_bus_received_total{channel=\"bus\"}")
            .await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_for_a_user_on_node_b_reaches_b_only_and_follows_her_resume_to_a() {
    let cluster = TestCluster::start_with(2, routed()).await;
    let p = &cluster.producer;
    let mut ann = cluster.connect(1, "ann", "").await;
    let (a_node_before, a_bus_before) = received(cluster.node(0)).await;
    for n in 0..5 {
        p.send("ann", numbered("ann", n)).await;
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(n_of(&ann.expect_msg(WAIT).await));
    }
    assert_eq!(got, [0, 1, 2, 3, 4]);
    let (b_node, _) = received(cluster.node(1)).await;
    assert!(b_node >= 5.0, "node B got them on its channel: {b_node}");
    let (a_node, a_bus) = received(cluster.node(0)).await;
    assert_eq!(
        (a_node, a_bus),
        (a_node_before, a_bus_before),
        "node A received nothing for her"
    );

    // A broadcast still reaches every node.
    let mut bob = cluster.connect(0, "bob", "").await;
    p.send(
        "bob",
        json!({"type":"robot.reply","to":{"all":true},"data":{"n":100}}),
    )
    .await;
    assert_eq!(n_of(&bob.expect_msg(WAIT).await), 100);
    assert_eq!(n_of(&ann.expect_msg(WAIT).await), 100);

    // She moves to node A: what was sent meanwhile (to node B, or to nowhere once B's entry
    // is gone) comes from the history, once, then live messages on A.
    p.send("ann", numbered("ann", 5)).await;
    let last = ann.expect_msg(WAIT).await;
    assert_eq!(n_of(&last), 5);
    let since = last["id"].as_str().unwrap().to_owned();
    drop(ann);
    for n in 6..=8 {
        p.send("ann", numbered("ann", n)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut ann = cluster
        .connect(0, "ann", &format!("since={}", urlencode(&since)))
        .await;
    assert_eq!(
        ann.hello["resume"]["recovered"],
        json!(true),
        "{}",
        ann.hello
    );
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(n_of(&ann.expect_msg(WAIT).await));
    }
    assert_eq!(got, [6, 7, 8], "replayed in order");
    p.send("ann", numbered("ann", 9)).await;
    assert_eq!(n_of(&ann.expect_msg(WAIT).await), 9, "then live on node A");
    assert!(ann.msgs_during(QUIET).await.is_empty(), "nothing twice");
    assert!(bob.msgs_during(Duration::from_millis(10)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_on_both_nodes_gets_each_message_once_per_connection() {
    let cluster = TestCluster::start_with(2, routed()).await;
    let p = &cluster.producer;
    let mut on_a = cluster.connect(0, "cy", "tab=a").await;
    let mut on_b = cluster.connect(1, "cy", "tab=b").await;
    for n in 0..4 {
        p.send("cy", numbered("cy", n)).await;
    }
    for client in [&mut on_a, &mut on_b] {
        let mut got = Vec::new();
        for _ in 0..4 {
            got.push(n_of(&client.expect_msg(WAIT).await));
        }
        assert_eq!(got, [0, 1, 2, 3]);
        assert!(client.msgs_during(QUIET).await.is_empty(), "once each");
    }
}

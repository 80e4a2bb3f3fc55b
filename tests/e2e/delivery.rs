//! Targeting and ingest: who receives what, across nodes.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);
const QUIET: Duration = Duration::from_millis(1500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_for_alice_reaches_all_her_tabs_on_both_nodes_and_nobody_else() {
    let cluster = TestCluster::start(2).await;
    let mut alice0 = cluster.connect(0, "alice", "tab=t-0").await;
    let mut alice1 = cluster.connect(1, "alice", "tab=t-1").await;
    let mut bob = cluster.connect(1, "bob", "").await;
    // One record per partition, so both nodes' ingest is exercised.
    for p in 0..PARTITIONS {
        cluster
            .producer
            .send_to_partition(p, for_user("alice", "robot.reply", &format!("hi {p}")))
            .await;
    }
    for client in [&mut alice0, &mut alice1] {
        let mut texts: Vec<String> = Vec::new();
        for _ in 0..PARTITIONS {
            let m = client.expect_msg(WAIT).await;
            assert_eq!(m["type"], "robot.reply");
            assert!(m["id"].is_string() && m["ts"].is_i64(), "{m}");
            texts.push(m["data"]["text"].as_str().unwrap().to_owned());
        }
        texts.sort();
        assert_eq!(texts, ["hi 0", "hi 1", "hi 2", "hi 3"]);
    }
    assert!(
        bob.msgs_during(QUIET).await.is_empty(),
        "bob got alice's messages"
    );
    assert!(
        alice0.msgs_during(QUIET).await.is_empty(),
        "a message arrived twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_platform_tab_conn_and_all_select_the_right_connections() {
    let cluster = TestCluster::start(2).await;
    let mut a_ios = Client::connect(
        &cluster.node(0).ws_url("tab=a1"),
        Some(&token_with(
            SECRET,
            "ann",
            Duration::from_secs(600),
            Some("ios"),
        )),
    )
    .await;
    let mut a_h5 = cluster.connect(1, "ann", "tab=a2&platform=h5").await;
    let mut ben = cluster.connect(0, "ben", "").await;
    let mut cat = cluster.connect(1, "cat", "").await;
    let p = &cluster.producer;

    p.send(
        "ann",
        json!({"type":"t","to":{"users":["ann","ben"]},"data":"users"}),
    )
    .await;
    for c in [&mut a_ios, &mut a_h5, &mut ben] {
        assert_eq!(c.expect_msg(WAIT).await["data"], "users");
    }
    p.send(
        "ann",
        json!({"type":"t","to":{"user":"ann","platform":"ios"},"data":"ios"}),
    )
    .await;
    assert_eq!(a_ios.expect_msg(WAIT).await["data"], "ios");
    p.send(
        "ann",
        json!({"type":"t","to":{"user":"ann","tab":"a2"},"data":"tab"}),
    )
    .await;
    assert_eq!(a_h5.expect_msg(WAIT).await["data"], "tab");
    let cat_conn = cat.conn_id();
    p.send(
        "cat",
        json!({"type":"t","to":{"conn":cat_conn},"data":"conn"}),
    )
    .await;
    assert_eq!(cat.expect_msg(WAIT).await["data"], "conn");
    p.send("x", json!({"type":"t","to":{"all":true},"data":"all"}))
        .await;
    for c in [&mut a_ios, &mut a_h5, &mut ben, &mut cat] {
        assert_eq!(
            c.expect_msg(WAIT).await["data"],
            "all",
            "everyone gets `all`, and nothing else first"
        );
    }
    for c in [&mut a_ios, &mut a_h5, &mut ben, &mut cat] {
        assert!(c.msgs_during(Duration::from_millis(500)).await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_keyed_by_user_arrive_in_partition_order() {
    let cluster = TestCluster::start(2).await;
    let mut dora = cluster.connect(1, "dora", "").await;
    for i in 0..50 {
        cluster
            .producer
            .send("dora", json!({"type":"t","to":{"user":"dora"},"data":i}))
            .await;
    }
    for i in 0..50 {
        assert_eq!(dora.expect_msg(WAIT).await["data"], i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_records_on_every_partition_do_not_block_the_next_good_record() {
    let cluster = TestCluster::start(2).await;
    let mut eve = cluster.connect(0, "eve", "").await;
    let poisons: [&[u8]; 5] = [
        b"not json",
        br#"{"to":{"user":"eve"}}"#,
        br#"{"type":"t","to":{"user":"eve","all":true}}"#,
        br#"{"type":5,"to":{"user":"eve"}}"#,
        b"",
    ];
    for p in 0..PARTITIONS {
        for poison in poisons {
            cluster.producer.send_raw(Some("k"), Some(p), poison).await;
        }
        cluster
            .producer
            .send_to_partition(p, for_user("eve", "t", &format!("good {p}")))
            .await;
    }
    let mut got: Vec<String> = Vec::new();
    for _ in 0..PARTITIONS {
        got.push(
            eve.expect_msg(WAIT).await["data"]["text"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    got.sort();
    assert_eq!(got, ["good 0", "good 1", "good 2", "good 3"]);

    let mut rejected = 0.0;
    for node in &cluster.nodes {
        for reason in ["not_json", "no_type", "bad_target", "invalid", "empty"] {
            rejected += node
                .metric(&format!(
                    "fanout_ingest_rejected_total{{reason=\"{reason}\"}}"
                ))
                .await;
        }
    }
    assert_eq!(rejected, (poisons.len() as i32 * PARTITIONS) as f64);
    let dead = consume_one(&cluster.dead_letter_topic, WAIT).await;
    assert!(
        dead.headers.contains_key("fanout-reject-reason"),
        "{dead:?}"
    );
    assert!(
        dead.headers.contains_key("fanout-source-partition"),
        "{dead:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_compressed_with_every_codec_arrive_and_none_stalls_its_partition() {
    let cluster = TestCluster::start(1).await;
    let mut carol = cluster.connect(0, "carol", "").await;
    // One partition, so a codec that stalled it would hold back every record after it.
    for codec in ["zstd", "lz4", "snappy", "gzip", "none"] {
        Producer::with_compression(&cluster.options.kafka, &cluster.topic, codec)
            .send_to_partition(0, for_user("carol", "robot.reply", codec))
            .await;
    }
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(carol.expect_msg(WAIT).await["data"]["text"].clone());
    }
    assert_eq!(got, ["zstd", "lz4", "snappy", "gzip", "none"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_not_delivered() {
    let cluster = TestCluster::start(1).await;
    let mut fay = cluster.connect(0, "fay", "").await;
    // ttl_ms 0: already too old when routed, a few ms after the record timestamp.
    cluster
        .producer
        .send(
            "fay",
            json!({"type":"t","to":{"user":"fay"},"data":"stale","ttl_ms":0}),
        )
        .await;
    cluster
        .producer
        .send(
            "fay",
            json!({"type":"t","to":{"user":"fay"},"data":"fresh","ttl_ms":60000}),
        )
        .await;
    assert_eq!(fay.expect_msg(WAIT).await["data"], "fresh");
    assert!(
        cluster
            .node(0)
            .metric("fanout_dropped_total{reason=\"expired\"}")
            .await
            >= 1.0
    );
}

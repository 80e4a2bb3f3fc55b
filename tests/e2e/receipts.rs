//! Delivery receipts (`kafka.receipts_topic`, DESIGN §6) on a 2-node cluster: what a
//! backend consuming the topic sees for a user online on one node, on both, offline, with
//! the type switched off, for an expired message, and for a client's ack.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use serde_json::{json, Value};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(20);
/// How long to keep listening after the expected records came, for any extra one.
const QUIET: Duration = Duration::from_secs(3);

/// Reads the receipts topic from the start, in the background, keeping every record with
/// its key.
struct Receipts {
    records: Arc<Mutex<Vec<(String, Value)>>>,
    _reader: tokio::task::JoinHandle<()>,
}

impl Receipts {
    fn read(brokers: &str, topic: &str) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("e2e-receipts"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        let records = Arc::new(Mutex::new(Vec::new()));
        let kept = records.clone();
        let reader = tokio::spawn(async move {
            loop {
                let Ok(m) = consumer.recv().await else {
                    continue;
                };
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                let value: Value = serde_json::from_slice(m.payload().unwrap_or_default())
                    .expect("a receipt is JSON");
                kept.lock().push((key, value));
            }
        });
        Self {
            records,
            _reader: reader,
        }
    }

    /// The records of `user` so far (checking each is keyed by its user).
    fn of(&self, user: &str) -> Vec<Value> {
        self.records
            .lock()
            .iter()
            .filter(|(_, v)| v["user"] == user)
            .map(|(key, v)| {
                assert_eq!(key, user, "a receipt is keyed by its user: {v}");
                v.clone()
            })
            .collect()
    }

    /// Waits until `user` has `n` records, then a little longer for any extra one; returns
    /// them all, sorted by node.
    async fn settle(&self, user: &str, n: usize) -> Vec<Value> {
        eventually(WAIT, &format!("{n} receipt(s) for {user}"), || async {
            self.of(user).len() >= n
        })
        .await;
        tokio::time::sleep(QUIET).await;
        let mut records = self.of(user);
        records.sort_by_key(|v| v["node"].as_str().unwrap_or_default().to_owned());
        records
    }
}

/// A 2-node cluster with receipts on, and a reader of its receipts topic.
async fn cluster() -> (TestCluster, Receipts) {
    let topic = unique("fanout-e2e-receipts");
    let brokers = Options::default().kafka;
    create_topic_on(&brokers, &topic, 1).await;
    let receipts = Receipts::read(&brokers, &topic);
    let options = Options::default().with("FANOUT__KAFKA__RECEIPTS_TOPIC", &topic);
    (TestCluster::start_with(2, options).await, receipts)
}

fn outcome(v: &Value) -> (&str, &str, i64) {
    (
        v["outcome"].as_str().unwrap(),
        v["node"].as_str().unwrap(),
        v["conns"].as_i64().unwrap_or(-1),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_report_delivered_per_node_and_acks() {
    let (cluster, receipts) = cluster().await;

    // Online on one node, two tabs there: one `delivered` with both sockets.
    let mut a1 = cluster.connect(0, "rc-one", "tab=a").await;
    let mut a2 = cluster.connect(0, "rc-one", "tab=b").await;
    cluster
        .producer
        .send("rc-one", for_user("rc-one", "robot.reply", "hi"))
        .await;
    let msg = a1.expect_msg(WAIT).await;
    a2.expect_msg(WAIT).await;
    let records = receipts.settle("rc-one", 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(outcome(&records[0]), ("delivered", "node-0", 2));
    assert_eq!(records[0]["id"], msg["id"]);
    assert_eq!(records[0]["type"], "robot.reply");
    assert!(records[0]["ts"].as_i64().unwrap() >= msg["ts"].as_i64().unwrap());

    // The client acks it: one `acked` record with its connection.
    a1.send_json(json!({"t":"ack","ids":[msg["id"]]})).await;
    let records = receipts.settle("rc-one", 2).await;
    let acked: Vec<&Value> = records.iter().filter(|v| v["outcome"] == "acked").collect();
    assert_eq!(acked.len(), 1, "{records:?}");
    assert_eq!(acked[0]["id"], msg["id"]);
    assert_eq!(acked[0]["conn"], a1.conn_id().as_str());

    // Online on both nodes (one socket on node 0, two on node 1), narrowed to a platform
    // on the way: one `delivered` per node, with that node's count.
    let mut b0 = cluster.connect(0, "rc-both", "platform=ios").await;
    let mut b1 = cluster.connect(1, "rc-both", "platform=ios&tab=x").await;
    let mut b2 = cluster.connect(1, "rc-both", "platform=ios&tab=y").await;
    let _h5 = cluster.connect(1, "rc-both", "platform=h5").await;
    cluster
        .producer
        .send(
            "rc-both",
            json!({"type":"robot.reply","to":{"user":"rc-both","platform":"ios"},"data":1}),
        )
        .await;
    for c in [&mut b0, &mut b1, &mut b2] {
        c.expect_msg(WAIT).await;
    }
    let records = receipts.settle("rc-both", 2).await;
    let got: Vec<_> = records.iter().map(outcome).collect();
    assert_eq!(
        got,
        [("delivered", "node-0", 1), ("delivered", "node-1", 2)],
        "{records:?}"
    );

    // `to.users`: each user gets their own record.
    cluster
        .producer
        .send(
            "x",
            json!({"type":"robot.reply","to":{"users":["rc-one","rc-both"]},"data":2}),
        )
        .await;
    let one = receipts.settle("rc-one", 3).await;
    let both = receipts.settle("rc-both", 4).await;
    assert_eq!(one.len(), 3, "{one:?}");
    assert_eq!(both.len(), 4, "{both:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_report_exactly_one_negative_outcome() {
    let (cluster, receipts) = cluster().await;

    // Online on both nodes with the type switched off (marketing is off by default): the
    // two nodes both see it filtered; the backend gets one `filtered`.
    let mut f0 = cluster.connect(0, "rc-filtered", "").await;
    let mut f1 = cluster.connect(1, "rc-filtered", "").await;
    cluster
        .producer
        .send("rc-filtered", for_user("rc-filtered", "marketing", "sale"))
        .await;
    let records = receipts.settle("rc-filtered", 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "filtered");
    assert_eq!(records[0]["type"], "marketing");
    assert_eq!(records[0]["conns"], 0);

    // Expired before it got anywhere (online on both nodes): ingest and both routers see
    // it expired; one `expired`.
    cluster
        .producer
        .send(
            "rc-filtered",
            json!({"type":"robot.reply","to":{"user":"rc-filtered"},"data":0,"ttl_ms":1}),
        )
        .await;
    let records = receipts.settle("rc-filtered", 2).await;
    let expired: Vec<&Value> = records
        .iter()
        .filter(|v| v["outcome"] == "expired")
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert_eq!(expired.len(), 1, "{records:?}");
    assert!(f0.msgs_during(Duration::from_millis(200)).await.is_empty());
    assert!(f1.msgs_during(Duration::from_millis(200)).await.is_empty());

    // Offline: connected nowhere; one `offline`.
    cluster
        .producer
        .send("rc-gone", for_user("rc-gone", "robot.reply", "hello?"))
        .await;
    let records = receipts.settle("rc-gone", 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "offline");
    assert_eq!(records[0]["type"], "robot.reply");

    // Offline on the platform asked for: online on h5 only, message for ios.
    let _h5 = cluster.connect(1, "rc-h5", "platform=h5").await;
    cluster
        .producer
        .send(
            "rc-h5",
            json!({"type":"robot.reply","to":{"user":"rc-h5","platform":"ios"},"data":0}),
        )
        .await;
    let records = receipts.settle("rc-h5", 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "offline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_reports_receipts_with_claims_in_memory() {
    let node = EmbeddedNode::start(&[
        ("FANOUT__KAFKA__RECEIPTS_TOPIC", "fanout.receipts"),
        ("FANOUT__NODE__ID", "emb-0"),
    ])
    .await;
    let receipts = Receipts::read(&node.bootstrap, "fanout.receipts");
    let producer = Producer::new(&node.bootstrap, "fanout.messages");
    let url = format!("ws://{}/ws?user=emb-ann", node.public);
    let mut ann = Client::connect(&url, None).await;

    producer
        .send("emb-ann", for_user("emb-ann", "robot.reply", "hi"))
        .await;
    let msg = ann.expect_msg(WAIT).await;
    // marketing is off by default in the embedded default.
    producer
        .send("emb-ann", for_user("emb-ann", "marketing", "sale"))
        .await;
    // Expired: seen expired by ingest and by the router; one record.
    producer
        .send(
            "emb-ann",
            json!({"type":"robot.reply","to":{"user":"emb-ann"},"data":0,"ttl_ms":1}),
        )
        .await;
    let records = receipts.settle("emb-ann", 3).await;
    let mut got: Vec<_> = records.iter().map(outcome).collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("delivered", "emb-0", 1),
            ("expired", "emb-0", 0),
            ("filtered", "emb-0", 0)
        ],
        "{records:?}"
    );
    let delivered = records
        .iter()
        .find(|v| v["outcome"] == "delivered")
        .unwrap();
    assert_eq!(delivered["id"], msg["id"]);

    producer
        .send("emb-nobody", for_user("emb-nobody", "robot.reply", "hi"))
        .await;
    let records = receipts.settle("emb-nobody", 1).await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "offline");
}

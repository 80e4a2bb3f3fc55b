//! Presence on a 2-node cluster: `GET /v1/users/{user}/connections` from either node, who
//! may read it, the presence topic's connect and disconnect records, and a SIGKILLed node's
//! connections leaving presence (DESIGN §5, §6).

use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::Message;
use serde_json::Value;

use crate::support::*;

/// The cluster's `kafka.session_timeout` (support.rs): a dead node must leave presence
/// within this + 10 s.
const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// A 2-node cluster producing presence events to a topic of its own.
async fn cluster_with_presence_topic() -> (TestCluster, String) {
    let topic = unique("fanout-presence");
    create_topic(&topic, 1).await;
    let options = Options::default().with("FANOUT__KAFKA__PRESENCE_TOPIC", &topic);
    (TestCluster::start_with(2, options).await, topic)
}

/// `GET /v1/users/{user}/connections` on `node` with `bearer`: status and body.
async fn connections(node: &Node, user: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(node.http(&format!("/v1/users/{user}/connections")));
    if let Some(token) = bearer {
        req = req.bearer_auth(token);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The `(conn, node)` pairs `node` lists for `user` (admin token), sorted.
async fn listed(node: &Node, user: &str) -> Vec<(String, String)> {
    let (status, body) = connections(node, user, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let mut out: Vec<(String, String)> = body["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["conn"].as_str().unwrap().to_owned(),
                c["node"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = list
        .iter()
        .map(|(c, n)| (c.to_string(), n.to_string()))
        .collect();
    out.sort();
    out
}

/// Reads the presence topic from its beginning.
struct TopicReader {
    consumer: StreamConsumer,
    records: Vec<(Option<String>, Value)>,
}

impl TopicReader {
    fn new(topic: &str) -> Self {
        Self::on(&kafka_addr(), topic)
    }

    fn on(brokers: &str, topic: &str) -> Self {
        let consumer: StreamConsumer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique("e2e-presence-reader"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        consumer.subscribe(&[topic]).unwrap();
        Self {
            consumer,
            records: Vec::new(),
        }
    }

    /// Reads until a record matching `want` has arrived (failing after `timeout`); it.
    async fn until(&mut self, timeout: Duration, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((_, v)) = self.records.iter().find(|(_, v)| want(v)) {
                return v.clone();
            }
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => {
                    let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                    let value = serde_json::from_slice(m.payload().unwrap_or_default())
                        .expect("presence records are JSON");
                    self.records.push((key, value));
                }
                Ok(Err(e)) => panic!("consuming the presence topic: {e}"),
                Err(_) => panic!("no such record within {timeout:?}; got {:#?}", self.records),
            }
        }
    }

    /// The key of a record seen with this value.
    fn key_of(&self, value: &Value) -> Option<String> {
        self.records
            .iter()
            .find(|(_, v)| v == value)
            .and_then(|(k, _)| k.clone())
    }
}

fn is(event: &str, conn: &str) -> impl Fn(&Value) -> bool {
    let (event, conn) = (event.to_owned(), conn.to_owned());
    move |v: &Value| v["event"] == event.as_str() && v["conn"] == conn.as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_on_both_nodes_are_listed_from_either_node() {
    let (cluster, _) = cluster_with_presence_topic().await;
    let before = fanout::clock::now_ms();
    let on_0 = cluster.connect(0, "ann", "platform=ios&tab=t-1").await;
    let on_1 = cluster.connect(1, "ann", "").await;
    let other = cluster.connect(1, "bob", "").await;
    let want = pairs(&[(&on_0.conn_id(), "node-0"), (&on_1.conn_id(), "node-1")]);
    for node in &cluster.nodes {
        let start = Instant::now();
        while listed(node, "ann").await != want {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{} lists {:?}, expected {want:?}",
                node.id,
                listed(node, "ann").await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (_, body) = connections(cluster.node(1), "ann", Some(ADMIN_TOKEN)).await;
    assert_eq!(body["user"], "ann");
    let first = body["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["conn"] == on_0.conn_id().as_str())
        .unwrap()
        .clone();
    assert_eq!(first["platform"], "ios");
    assert_eq!(first["tab"], "t-1");
    let at = first["connected_at"].as_i64().unwrap();
    assert!(at >= before && at <= fanout::clock::now_ms(), "{first}");
    assert_eq!(
        first.as_object().unwrap().len(),
        5,
        "conn, node, platform, tab, connected_at: {first}"
    );
    assert_eq!(
        listed(cluster.node(0), "bob").await,
        pairs(&[(&other.conn_id(), "node-1")])
    );
    assert!(listed(cluster.node(0), "nobody").await.is_empty());
    // A closed connection leaves the list.
    on_1.close(1000).await;
    let want = pairs(&[(&on_0.conn_id(), "node-0")]);
    eventually(
        Duration::from_secs(5),
        "ann's closed connection unlisted",
        || async { listed(cluster.node(0), "ann").await == want },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_sees_their_own_connections_and_nobody_elses() {
    let cluster = TestCluster::start(2).await;
    let _ann = cluster.connect(0, "ann", "").await;
    let node = cluster.node(1);
    let own = token("ann", Duration::from_secs(600));
    let other = token("bob", Duration::from_secs(600));
    eventually(Duration::from_secs(5), "ann listed", || async {
        let (status, body) = connections(node, "ann", Some(&own)).await;
        status == 200 && body["connections"].as_array().unwrap().len() == 1
    })
    .await;
    let (status, body) = connections(node, "ann", Some(&other)).await;
    assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")));
    let (status, body) = connections(node, "ann", None).await;
    assert_eq!(status, 401, "{body}");
    let (status, _) = connections(node, "ann", Some("not-a-token")).await;
    assert_eq!(status, 401);
    let (status, body) = connections(node, "ann", Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    assert_eq!(body["connections"].as_array().unwrap().len(), 1);
    let bad = "a".repeat(300);
    let (status, body) = connections(node, &bad, Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_normal_close_is_reported_connect_then_disconnect_with_its_code() {
    let (cluster, topic) = cluster_with_presence_topic().await;
    let mut reader = TopicReader::new(&topic);
    let ann = cluster.connect(1, "ann", "platform=android&tab=t-9").await;
    let conn = ann.conn_id();
    let connect = reader
        .until(Duration::from_secs(15), is("connect", &conn))
        .await;
    assert_eq!(connect["user"], "ann");
    assert_eq!(connect["node"], "node-1");
    assert_eq!(connect["platform"], "android");
    assert_eq!(connect["tab"], "t-9");
    assert!(connect["ts"].as_i64().unwrap() > 0);
    assert!(connect.get("code").is_none(), "{connect}");
    assert_eq!(reader.key_of(&connect).as_deref(), Some("ann"));
    ann.close(1000).await;
    let disconnect = reader
        .until(Duration::from_secs(15), is("disconnect", &conn))
        .await;
    assert_eq!(disconnect["code"], 1000);
    assert_eq!(disconnect["user"], "ann");
    assert_eq!(disconnect["node"], "node-1");
    assert_eq!(disconnect["platform"], "android");
    assert_eq!(reader.key_of(&disconnect).as_deref(), Some("ann"));
    assert!(disconnect["ts"].as_i64() >= connect["ts"].as_i64());
    // A close the server makes carries its code too (here: a client that keeps sending
    // garbage is closed with 1008).
    let mut bob = cluster.connect(0, "bob", "").await;
    let bob_conn = bob.conn_id();
    for _ in 0..30 {
        bob.send_text("not json").await;
    }
    bob.expect_close(Duration::from_secs(10)).await;
    let closed = reader
        .until(Duration::from_secs(15), is("disconnect", &bob_conn))
        .await;
    assert_eq!(closed["code"], 1008);
    // A connection lost without a close frame: 1006.
    let carl = cluster.connect(0, "carl", "").await;
    let carl_conn = carl.conn_id();
    drop(carl);
    let lost = reader
        .until(Duration::from_secs(15), is("disconnect", &carl_conn))
        .await;
    assert_eq!(lost["code"], 1006);
    let node = cluster.node(0);
    assert!(
        node.metric("fanout_presence_events_total{result=\"produced\"}")
            .await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_connections_leave_presence_and_are_reported_disconnected() {
    let (mut cluster, topic) = cluster_with_presence_topic().await;
    let mut reader = TopicReader::new(&topic);
    let doomed = cluster.connect(0, "ann", "tab=t-dead").await;
    let survivor = cluster.connect(1, "ann", "").await;
    let (dead_conn, live_conn) = (doomed.conn_id(), survivor.conn_id());
    let both = pairs(&[(&dead_conn, "node-0"), (&live_conn, "node-1")]);
    eventually(Duration::from_secs(5), "both listed", || async {
        listed(cluster.node(1), "ann").await == both
    })
    .await;
    reader
        .until(Duration::from_secs(15), is("connect", &dead_conn))
        .await;
    cluster.nodes[0].kill();
    let killed = Instant::now();
    let bound = SESSION_TIMEOUT + Duration::from_secs(10);
    let live_only = pairs(&[(&live_conn, "node-1")]);
    eventually(bound, "the dead node's connection unlisted", || async {
        listed(cluster.node(1), "ann").await == live_only
    })
    .await;
    let unlisted = killed.elapsed();
    let left = bound.saturating_sub(killed.elapsed());
    let disconnect = reader
        .until(
            left.max(Duration::from_millis(1)),
            is("disconnect", &dead_conn),
        )
        .await;
    let reported = killed.elapsed();
    assert_eq!(disconnect["code"], 1006);
    assert_eq!(disconnect["node"], "node-0");
    assert_eq!(disconnect["user"], "ann");
    assert_eq!(disconnect["tab"], "t-dead");
    assert_eq!(reader.key_of(&disconnect).as_deref(), Some("ann"));
    assert!(cluster.node(1).metric("fanout_presence_swept_total").await >= 1.0);
    eprintln!("unlisted after {unlisted:?}, reported disconnected after {reported:?}");
    // The survivor's own connection is still there, and was never reported gone.
    assert!(!reader
        .records
        .iter()
        .any(|(_, v)| is("disconnect", &live_conn)(v)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_redis_is_swept_then_lists_its_connections_again() {
    let topic = unique("fanout-presence");
    create_topic(&topic, 1).await;
    let options = Options::default().with("FANOUT__KAFKA__PRESENCE_TOPIC", &topic);
    let redis = options.redis_url.clone();
    let mut cluster = TestCluster::start_with(1, options).await;
    // node-1 reaches Redis through a proxy the test can cut.
    let proxy = TcpProxy::start(url_host_port(&redis)).await;
    let proxied = url_with_host_port(&redis, &format!("127.0.0.1:{}", proxy.port));
    cluster
        .options
        .env
        .push(("FANOUT__REDIS__URL".into(), proxied));
    cluster.add_node();
    cluster.wait_settled().await;
    let mut reader = TopicReader::new(&topic);
    let ann = cluster.connect(1, "ann", "").await;
    let conn = ann.conn_id();
    let listed_on_1 = pairs(&[(&conn, "node-1")]);
    eventually(Duration::from_secs(5), "ann listed", || async {
        listed(cluster.node(0), "ann").await == listed_on_1
    })
    .await;
    proxy.cut();
    let bound = SESSION_TIMEOUT + Duration::from_secs(10);
    eventually(bound, "the cut-off node's connection unlisted", || async {
        listed(cluster.node(0), "ann").await.is_empty()
    })
    .await;
    let swept = reader
        .until(Duration::from_secs(10), is("disconnect", &conn))
        .await;
    assert_eq!(swept["code"], 1006);
    // Back on Redis, the node finds it was taken for dead and writes its connections again.
    proxy.restore();
    eventually(Duration::from_secs(15), "ann listed again", || async {
        listed(cluster.node(0), "ann").await == listed_on_1
    })
    .await;
    let connects = |r: &TopicReader| {
        r.records
            .iter()
            .filter(|(_, v)| is("connect", &conn)(v))
            .count()
    };
    reader
        .until(Duration::from_secs(10), |v| {
            is("connect", &conn)(v) && v["ts"].as_i64() > swept["ts"].as_i64()
        })
        .await;
    assert_eq!(connects(&reader), 2, "connected, swept, connected again");
    assert!(
        cluster
            .node(1)
            .metric("fanout_presence_resyncs_total")
            .await
            >= 1.0
    );
    drop(ann);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_lists_its_connections_and_produces_events() {
    let node = EmbeddedNode::start(&[("FANOUT__KAFKA__PRESENCE_TOPIC", "fanout.presence")]).await;
    let ann = Client::connect(&format!("ws://{}/ws?user=ann&tab=t-e", node.public), None).await;
    let conn = ann.conn_id();
    // Insecure mode: no token needed.
    let body: Value = reqwest::get(node.http("/v1/users/ann/connections"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let conns = body["connections"].as_array().unwrap();
    assert_eq!(conns.len(), 1, "{body}");
    assert_eq!(conns[0]["conn"], conn.as_str());
    assert_eq!(conns[0]["tab"], "t-e");
    let mut reader = TopicReader::on(&node.bootstrap, "fanout.presence");
    reader
        .until(Duration::from_secs(15), is("connect", &conn))
        .await;
    ann.close(4321).await;
    let closed = reader
        .until(Duration::from_secs(15), is("disconnect", &conn))
        .await;
    assert_eq!(closed["code"], 4321);
    let body: Value = reqwest::get(node.http("/v1/users/ann/connections"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["connections"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_works_over_tls_redis_with_an_acl_user() {
    let var = |name: &str| {
        std::env::var(name).unwrap_or_else(|_| {
            panic!("{name} is not set: run ./scripts/test, which starts the TLS test servers")
        })
    };
    let ca = format!("{}/ca.pem", var("FANOUT_TEST_TLS_DIR"));
    let options = Options {
        redis_url: var("FANOUT_TEST_REDIS_TLS"),
        ..Options::default()
    }
    .with("FANOUT__REDIS__TLS_CA_FILE", &ca);
    let cluster = TestCluster::start_with(2, options).await;
    let a = cluster.connect(0, "ann", "").await;
    let b = cluster.connect(1, "ann", "").await;
    let want = pairs(&[(&a.conn_id(), "node-0"), (&b.conn_id(), "node-1")]);
    for node in &cluster.nodes {
        eventually(Duration::from_secs(5), "both listed over TLS", || async {
            listed(node, "ann").await == want
        })
        .await;
    }
}

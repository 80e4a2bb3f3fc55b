//! A small builder language for end-to-end tests: real `fanout` processes against a real
//! Apache Kafka (`FANOUT_TEST_KAFKA`, started by `./scripts/test`), a real Redis
//! (`FANOUT_TEST_REDIS`) and a real PostgreSQL (`FANOUT_TEST_DATABASE_URL`). With
//! `FANOUT_TEST_REDIS_MODE=cluster` the nodes of a [`TestCluster`] use the Redis Cluster at
//! `FANOUT_TEST_REDIS_CLUSTER` instead (tests that start their own Redis keep it). With
//! `FANOUT_TEST_BUS_ROUTING=routed` they run with `bus.routing = "routed"`.
//!
//! Each test gets its own topics, consumer group and Redis prefix, so tests run in parallel
//! on one broker and one Redis without seeing each other.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::resume::urlencode;
use crate::sentinel::{check_live, ranges, Seen, QUIET, ROUNDS};

pub const SECRET: &str = "e2e-secret";
pub const ADMIN_TOKEN: &str = "e2e-admin";
pub const PARTITIONS: i32 = 4;

#[path = "../common/servers.rs"]
mod servers;
/// The servers: each fails the test in seconds, with one line, when it is not there.
pub use servers::{bus_routing, database_url, kafka_addr, nodes_redis_url, redis_url};

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let server = base.rsplit_once('/').map_or(base, |(s, _)| s);
    match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    }
}

/// A fresh PostgreSQL database for one test; dropped with it.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    pub async fn create() -> Self {
        use sqlx::Connection;
        let admin = database_url();
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL at {admin} is needed (./scripts/test starts it): {e}")
            });
        let name = unique("fanout_e2e").replace('-', "_");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .unwrap();
        Self {
            url: with_database(&admin, &name),
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let (admin, name) = (database_url(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::Connection;
                if let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

/// The type registry every test cluster uses (shared with tests/cli.rs).
pub const TYPES_TOML: &str = include_str!("../fixtures/types.toml");

/// A name no other test run uses.
pub fn unique(name: &str) -> String {
    format!("{name}-{:08x}", rand::random::<u32>())
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Mints a token like `fanout token` would.
pub fn token(user: &str, ttl: Duration) -> String {
    token_with(SECRET, user, ttl, None)
}

/// A token from [`fanout::auth::mint`] (what `fanout token` runs) signed with `secret`.
pub fn token_with(secret: &str, user: &str, ttl: Duration, platform: Option<&str>) -> String {
    let auth = fanout::config::AuthConfig {
        jwt_secret: secret.into(),
        ..Default::default()
    };
    let platform = platform.map(|p| {
        fanout::envelope::Platform::parse(p).unwrap_or_else(|| panic!("no platform `{p}`"))
    });
    fanout::auth::mint(&auth, user, ttl, platform).unwrap()
}

fn kafka_config_for(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

fn kafka_config() -> ClientConfig {
    kafka_config_for(&kafka_addr())
}

/// Creates a topic through the Kafka protocol.
pub async fn create_topic(name: &str, partitions: i32) {
    create_topic_on(&kafka_addr(), name, partitions).await
}

pub async fn create_topic_on(brokers: &str, name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = kafka_config_for(brokers).create().unwrap();
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let results = admin
        .create_topics(
            [&topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap_or_else(|e| panic!("cannot reach the Kafka broker at {brokers}: {e}"));
    for r in results {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
}

/// Produces records to the test's topic.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
    pub topic: String,
}

impl Producer {
    pub fn new(brokers: &str, topic: &str) -> Self {
        Self::with_compression(brokers, topic, "none")
    }

    /// A producer whose batches are compressed with `codec` (`gzip`, `snappy`, `lz4`,
    /// `zstd` or `none`).
    pub fn with_compression(brokers: &str, topic: &str, codec: &str) -> Self {
        let inner = kafka_config_for(brokers)
            .set("message.timeout.ms", "15000")
            .set("compression.type", codec)
            .create()
            .unwrap();
        Self {
            inner,
            topic: topic.to_owned(),
        }
    }

    /// Produces raw bytes with an optional key and explicit partition.
    pub async fn send_raw(&self, key: Option<&str>, partition: Option<i32>, value: &[u8]) {
        let mut record = FutureRecord::to(&self.topic).payload(value);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(p) = partition {
            record = record.partition(p);
        }
        self.inner
            .send(record, Duration::from_secs(15))
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }

    /// Produces an envelope keyed by `key`.
    pub async fn send(&self, key: &str, envelope: Value) {
        self.send_raw(Some(key), None, envelope.to_string().as_bytes())
            .await;
    }

    /// Produces an envelope to one partition.
    pub async fn send_to_partition(&self, partition: i32, envelope: Value) {
        self.send_raw(None, Some(partition), envelope.to_string().as_bytes())
            .await;
    }
}

/// A consumed record, for checking what fanout produced.
#[derive(Debug)]
pub struct Record {
    pub key: Option<String>,
    pub value: String,
    pub headers: HashMap<String, String>,
}

/// Reads one record from `topic` (from the beginning), failing after `timeout`.
pub async fn consume_one(topic: &str, timeout: Duration) -> Record {
    let consumer: StreamConsumer = kafka_config()
        .set("group.id", unique("e2e-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let msg = tokio::time::timeout(timeout, consumer.recv())
        .await
        .unwrap_or_else(|_| panic!("no record on {topic} within {timeout:?}"))
        .unwrap();
    let mut headers = HashMap::new();
    if let Some(h) = msg.headers() {
        for Header { key, value } in h.iter() {
            headers.insert(
                key.to_owned(),
                String::from_utf8_lossy(value.unwrap_or_default()).into_owned(),
            );
        }
    }
    let _ = OwnedHeaders::new();
    Record {
        key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        value: String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned(),
        headers,
    }
}

/// Every record of `topic` as `(partition, offset, value)`, read from the beginning for
/// `window` (for diagnostics when a test finds a gap).
pub async fn dump_topic(brokers: &str, topic: &str, window: Duration) -> Vec<(i32, i64, String)> {
    let consumer: StreamConsumer = kafka_config_for(brokers)
        .set("group.id", unique("e2e-dump"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Ok(m)) = tokio::time::timeout_at(deadline, consumer.recv()).await {
        let value = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
        out.push((m.partition(), m.offset(), value));
    }
    out
}

/// The offsets `group` has committed on `topic`'s partitions (`None`: nothing committed).
pub fn committed_offsets(brokers: &str, group: &str, topic: &str) -> Vec<Option<i64>> {
    use rdkafka::TopicPartitionList;
    let consumer: rdkafka::consumer::BaseConsumer = kafka_config_for(brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    (0..PARTITIONS)
        .map(
            |p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(rdkafka::Offset::Offset(o)) => Some(o),
                _ => None,
            },
        )
        .collect()
}

/// How to run the nodes of a cluster.
#[derive(Clone)]
pub struct Options {
    /// Bootstrap address of the broker (default: `FANOUT_TEST_KAFKA`).
    pub kafka: String,
    /// `redis.url` of every node (default: [`nodes_redis_url`]).
    pub redis_url: String,
    /// The database every node shares (default: a fresh one per cluster).
    pub database_url: Option<String>,
    /// Extra `FANOUT__…` variables for every node.
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kafka: kafka_addr(),
            database_url: None,
            redis_url: nodes_redis_url(),
            env: Vec::new(),
        }
    }
}

impl Options {
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// One `fanout` process.
pub struct Node {
    pub id: String,
    pub public: String,
    pub admin: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Node {
    /// `ws://…/ws` with a query string.
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws?{query}", self.public)
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    pub async fn stats(&self) -> Option<Value> {
        let r = reqwest::get(format!("http://{}/v1/stats", self.admin))
            .await
            .ok()?;
        r.json().await.ok()
    }

    pub async fn ready(&self) -> bool {
        matches!(reqwest::get(format!("http://{}/readyz", self.admin)).await, Ok(r) if r.status().is_success())
    }

    /// The value of one metric sample, e.g. `fanout_ingest_rejected_total{reason="not_json"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_at(&self.admin, sample).await
    }

    /// SIGKILL: the node dies without leaving the group or committing.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits until the node listens on both ports; false if it exited because a port was
    /// taken meanwhile.
    fn wait_bound(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .is_none_or(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                return !self.log_text().contains("Address already in use");
            }
            let listening = |addr: &str| std::net::TcpStream::connect(addr).is_ok();
            if listening(&self.public) && listening(&self.admin) {
                // Still alive a moment later: the listeners are this node's.
                std::thread::sleep(Duration::from_millis(100));
                let alive = self
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_none());
                return alive || !self.log_text().contains("Address already in use");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        true // slow to start: wait_settled reports it
    }

    /// SIGTERM, then waits (at most `timeout`) for the process to exit; its exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        self.signal_term();
        self.wait_exit(timeout)
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
        }
    }

    /// Waits (at most `timeout`) for the process to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.take()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().ok().flatten() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node {} did not exit within {timeout:?} of SIGTERM",
                    self.id
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of node {} ----\n{}", self.id, self.log_text());
        }
    }
}

/// Several nodes sharing one consumer group, topic and Redis prefix.
pub struct TestCluster {
    pub nodes: Vec<Node>,
    pub topic: String,
    pub upstream_topic: String,
    pub dead_letter_topic: String,
    pub group: String,
    pub prefix: String,
    pub options: Options,
    pub producer: Producer,
    /// The shared database (dropped after the nodes).
    pub database: Option<TestDatabase>,
    pub database_url: String,
    config_file: PathBuf,
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // Nodes first, then the database they use.
        self.nodes.clear();
        self.database.take();
        let _ = std::fs::remove_file(&self.config_file);
    }
}

impl TestCluster {
    /// Starts `n` nodes with default options and waits until the group is settled.
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, Options::default()).await
    }

    pub async fn start_with(n: usize, options: Options) -> Self {
        let topic = unique("fanout-e2e");
        let upstream_topic = format!("{topic}-upstream");
        let dead_letter_topic = format!("{topic}-dlq");
        for (name, partitions) in [
            (&topic, PARTITIONS),
            (&upstream_topic, 1),
            (&dead_letter_topic, 1),
        ] {
            create_topic_on(&options.kafka, name, partitions).await;
        }
        let (database, database_url) = match options.database_url.clone() {
            Some(url) => (None, url),
            None => {
                let db = TestDatabase::create().await;
                let url = db.url.clone();
                (Some(db), url)
            }
        };
        let prefix = unique("e2e");
        let config_file = std::env::temp_dir().join(format!("{prefix}.toml"));
        std::fs::write(&config_file, TYPES_TOML).unwrap();
        let mut cluster = TestCluster {
            database,
            database_url,
            config_file,
            nodes: Vec::new(),
            producer: Producer::new(&options.kafka, &topic),
            group: unique("group"),
            prefix,
            topic,
            upstream_topic,
            dead_letter_topic,
            options,
        };
        for _ in 0..n {
            cluster.add_node();
        }
        cluster.wait_settled().await;
        cluster
    }

    /// Starts one more node (not waiting for it).
    pub fn add_node(&mut self) -> &Node {
        let id = format!("node-{}", self.nodes.len());
        self.spawn_node(id)
    }

    /// Starts node `i` again (after [`Node::kill`]) with the same id and ports.
    pub fn restart_node(&mut self, i: usize) {
        let old = &self.nodes[i];
        assert!(old.child.is_none(), "restart_node needs a killed node");
        let (id, public, admin) = (old.id.clone(), old.public.clone(), old.admin.clone());
        let fresh = self.spawn_node_at(id, public, admin);
        self.nodes[i] = fresh;
    }

    /// Starts a node on free ports. A port found free can be taken by another process
    /// before the node binds it (other tests, client sockets): then it starts again on
    /// other ports.
    fn spawn_node(&mut self, id: String) -> &Node {
        for _ in 0..5 {
            let (public, admin) = (
                format!("127.0.0.1:{}", free_port()),
                format!("127.0.0.1:{}", free_port()),
            );
            let mut node = self.spawn_node_at(id.clone(), public, admin);
            if node.wait_bound() {
                self.nodes.push(node);
                return self.nodes.last().unwrap();
            }
            node.kill();
            let _ = std::fs::remove_file(&node.log);
        }
        panic!("node {id} could not bind its ports in 5 attempts");
    }

    fn spawn_node_at(&self, id: String, public: String, admin: String) -> Node {
        let log = std::env::temp_dir().join(format!("{}-{id}.log", self.prefix));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
        cmd.arg("--config")
            .arg(&self.config_file)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FANOUT_LOG", "info,fanout=debug,rdkafka=warn")
            .env("FANOUT__NODE__ID", &id)
            .env("FANOUT__SERVER__LISTEN", &public)
            .env("FANOUT__ADMIN__LISTEN", &admin)
            .env("FANOUT__KAFKA__BROKERS", &self.options.kafka)
            .env("FANOUT__KAFKA__TOPICS", &self.topic)
            .env("FANOUT__KAFKA__GROUP_ID", &self.group)
            .env("FANOUT__KAFKA__UPSTREAM_TOPIC", &self.upstream_topic)
            .env("FANOUT__KAFKA__DEAD_LETTER_TOPIC", &self.dead_letter_topic)
            .env("FANOUT__KAFKA__SESSION_TIMEOUT", "6s")
            .env("FANOUT__REDIS__URL", &self.options.redis_url)
            .env("FANOUT__DATABASE__URL", &self.database_url)
            .env("FANOUT__REDIS__PREFIX", &self.prefix)
            .env("FANOUT__BUS__ROUTING", bus_routing())
            .env("FANOUT__AUTH__JWT_SECRET", SECRET)
            .env("FANOUT__AUTH__ADMIN_TOKEN", ADMIN_TOKEN)
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn fanout");
        Node {
            id,
            public,
            admin,
            child: Some(child),
            log,
        }
    }

    /// Waits until every live node is ready and the live nodes own all partitions between
    /// them, each at least one (when there are at most as many nodes as partitions).
    pub async fn wait_settled(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stable_since: Option<Instant> = None;
        loop {
            let mut total = 0;
            let mut all_ok = true;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let owned = node
                    .stats()
                    .await
                    .and_then(|s| s["kafka_partitions"].as_i64())
                    .unwrap_or(-1);
                all_ok &= owned > 0 && node.ready().await;
                total += owned.max(0);
            }
            if all_ok && total == PARTITIONS as i64 {
                let since = *stable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(1500) {
                    return;
                }
            } else {
                stable_since = None;
            }
            if Instant::now() > deadline {
                for n in &self.nodes {
                    eprintln!("---- log of {} ----\n{}", n.id, n.log_text());
                }
                panic!("cluster did not settle within 60 s (partitions owned: {total})");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Connects `user` to node `i` without waiting for `hello` (the server may close at once).
    pub async fn connect_raw(&self, i: usize, user: &str) -> RawClient {
        let mut req = self.nodes[i].ws_url("").into_client_request().unwrap();
        let header = format!("Bearer {}", token(user, Duration::from_secs(600)));
        req.headers_mut()
            .insert("authorization", HeaderValue::from_str(&header).unwrap());
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .expect("upgrade");
        RawClient { ws }
    }

    /// Connects `user` to node `i` with a valid token in the Authorization header.
    pub async fn connect(&self, i: usize, user: &str, query: &str) -> Client {
        Client::connect(
            &self.nodes[i].ws_url(query),
            Some(&token(user, Duration::from_secs(600))),
        )
        .await
    }
}

/// A WebSocket client speaking protocol v1.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub hello: Value,
}

/// A connection that has not read its `hello` (for refusals after the upgrade).
pub struct RawClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl RawClient {
    /// Reads until the server closes; returns the close code and reason.
    pub async fn expect_close(&mut self, timeout: Duration) -> Closed {
        read_until_close(&mut self.ws, timeout).await
    }
}

async fn read_until_close(
    ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>,
    timeout: Duration,
) -> Closed {
    read_to_close(ws, timeout).await.1
}

/// Reads every frame until the server closes: the `msg` frames, and how it closed.
async fn read_to_close(
    ws: &mut WebSocketStream<MaybeTlsStream<TcpStream>>,
    timeout: Duration,
) -> (Vec<Value>, Closed) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut msgs = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(t)))) => {
                let f: Value = serde_json::from_str(&t).expect("server frames are JSON");
                if f["t"] == "msg" {
                    msgs.push(f);
                }
            }
            Ok(Some(Ok(WsMessage::Close(Some(frame))))) => {
                return (
                    msgs,
                    Closed::Code(frame.code.into(), frame.reason.to_string()),
                )
            }
            Ok(Some(Ok(WsMessage::Close(None)))) => {
                return (
                    msgs,
                    Closed::Code(u16::from(CloseCode::Status), String::new()),
                )
            }
            Ok(None) | Ok(Some(Err(_))) => return (msgs, Closed::Eof),
            Ok(Some(Ok(_))) => continue,
            Err(_) => panic!("connection not closed within {timeout:?}"),
        }
    }
}

/// How a connection attempt or session ended, for assertions.
#[derive(Debug, PartialEq)]
pub enum Closed {
    /// The server closed with this code and reason.
    Code(u16, String),
    /// The stream ended without a close frame.
    Eof,
}

impl Client {
    /// Connects with `Authorization: Bearer <token>` and reads `hello`.
    pub async fn connect(url: &str, token: Option<&str>) -> Self {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = bearer
            .iter()
            .map(|b| ("authorization", b.as_str()))
            .collect();
        Self::try_connect(url, &headers)
            .await
            .unwrap_or_else(|e| panic!("connect {url}: {e:?}"))
    }

    /// Connects with extra request headers; `Err` carries the HTTP status and body of a
    /// refusal before the upgrade.
    pub async fn try_connect(
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<Self, (StatusCode, String)> {
        let mut req = url.into_client_request().unwrap();
        for (name, value) in headers {
            let name =
                tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())
                    .unwrap();
            req.headers_mut()
                .insert(name, HeaderValue::from_str(value).unwrap());
        }
        Self::connect_request(req).await
    }

    /// Connects with a prepared request; `Err` carries the HTTP status of a refusal.
    pub async fn connect_request(
        req: tokio_tungstenite::tungstenite::handshake::client::Request,
    ) -> Result<Self, (StatusCode, String)> {
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => {
                let mut client = Client {
                    ws,
                    hello: Value::Null,
                };
                let hello = client
                    .next_frame(Duration::from_secs(10))
                    .await
                    .expect("hello frame");
                assert_eq!(hello["t"], "hello", "first frame must be hello: {hello}");
                client.hello = hello;
                Ok(client)
            }
            Err(WsError::Http(resp)) => {
                let body = resp
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).into_owned())
                    .unwrap_or_default();
                Err((resp.status(), body))
            }
            Err(e) => panic!("websocket error: {e}"),
        }
    }

    pub fn conn_id(&self) -> String {
        self.hello["conn"].as_str().unwrap().to_owned()
    }

    pub async fn send_json(&mut self, v: Value) {
        self.ws
            .send(WsMessage::Text(v.to_string().into()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, s: &str) {
        self.ws.send(WsMessage::Text(s.into())).await.unwrap();
    }

    /// Reads every frame until the server closes: the `msg` frames, and how it closed.
    pub async fn read_to_close(&mut self, timeout: Duration) -> (Vec<Value>, Closed) {
        read_to_close(&mut self.ws, timeout).await
    }

    /// The next JSON text frame within `timeout`, or `None` (timeout or closed).
    pub async fn next_frame(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(WsMessage::Text(t)))) => {
                    return Some(serde_json::from_str(&t).expect("server frames are JSON"))
                }
                Ok(Some(Ok(WsMessage::Close(_)))) | Ok(None) | Ok(Some(Err(_))) | Err(_) => {
                    return None
                }
                Ok(Some(Ok(_))) => continue,
            }
        }
    }

    /// The next `msg` frame (other frames are skipped), failing after `timeout`.
    pub async fn expect_msg(&mut self, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_frame(left).await {
                Some(f) if f["t"] == "msg" => return f,
                Some(_) => continue,
                None => panic!("no msg within {timeout:?}"),
            }
        }
    }

    /// Collects `msg` frames for `window`.
    pub async fn msgs_during(&mut self, window: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + window;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return out;
            }
            match self.next_frame(left).await {
                Some(f) if f["t"] == "msg" => out.push(f),
                Some(_) => {}
                None => return out,
            }
        }
    }

    /// Reads until the server closes; returns the close code and reason.
    pub async fn expect_close(&mut self, timeout: Duration) -> Closed {
        read_until_close(&mut self.ws, timeout).await
    }

    /// Closes from the client's side with `code` and returns how the server answered: its
    /// Close frame (RFC 6455 §5.5.1: it must send one back), or `Eof` if it dropped TCP
    /// without one.
    pub async fn close_for_answer(mut self, code: u16) -> Closed {
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        self.ws
            .send(WsMessage::Close(Some(frame)))
            .await
            .expect("close frame sent");
        read_until_close(&mut self.ws, Duration::from_secs(5)).await
    }

    /// Closes from the client's side with `code`, and waits (at most 5 s) for the server's
    /// answer.
    pub async fn close(mut self, code: u16) {
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: CloseCode::from(code),
            reason: "".into(),
        };
        let _ = self.ws.close(Some(frame)).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// An envelope for `user`.
pub fn for_user(user: &str, msg_type: &str, text: &str) -> Value {
    json!({ "type": msg_type, "to": { "user": user }, "data": { "text": text } })
}

/// Waits until `cond` holds, polling; panics with `what` after `timeout`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A TCP proxy the test can cut and restore, to make a server unreachable on demand.
pub struct TcpProxy {
    pub port: u16,
    state: std::sync::Arc<std::sync::Mutex<ProxyState>>,
}

struct ProxyState {
    up: bool,
    cut: tokio_util::sync::CancellationToken,
}

impl TcpProxy {
    /// Forwards 127.0.0.1:<port> to `target` (`host:port`).
    pub async fn start(target: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(std::sync::Mutex::new(ProxyState {
            up: true,
            cut: tokio_util::sync::CancellationToken::new(),
        }));
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (up, cut) = {
                    let s = shared.lock().unwrap();
                    (s.up, s.cut.clone())
                };
                if !up {
                    continue; // dropped: the client sees the connection closed
                }
                let target = target.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        Self { port, state }
    }

    /// Drops every open connection and refuses new ones.
    pub fn cut(&self) {
        let mut s = self.state.lock().unwrap();
        s.up = false;
        s.cut.cancel();
        s.cut = tokio_util::sync::CancellationToken::new();
    }

    pub fn restore(&self) {
        self.state.lock().unwrap().up = true;
    }
}

/// `host:port` of a `scheme://user@host:port/db` URL.
pub fn url_host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap().to_owned()
}

/// `url` with its `host:port` replaced.
pub fn url_with_host_port(url: &str, host_port: &str) -> String {
    url.replacen(&url_host_port(url), host_port, 1)
}

/// One node outside any cluster: `env` over a working plaintext setup (the test broker,
/// Redis, the database `db`), `config` as its file, stderr piped for
/// [`expect_refused_at_start`].
pub fn spawn_lone_node(
    env: &[(&str, String)],
    config: Option<&Path>,
    admin: u16,
    db: &str,
) -> Child {
    let public = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
    if let Some(config) = config {
        cmd.arg("--config").arg(config);
    }
    cmd.arg("serve")
        .env_clear()
        .env("FANOUT_LOG", "info,rdkafka=off")
        .env("FANOUT__SERVER__LISTEN", format!("127.0.0.1:{public}"))
        .env("FANOUT__ADMIN__LISTEN", format!("127.0.0.1:{admin}"))
        .env("FANOUT__KAFKA__BROKERS", kafka_addr())
        .env("FANOUT__KAFKA__TOPICS", unique("fanout-lone"))
        .env("FANOUT__KAFKA__GROUP_ID", unique("group"))
        .env("FANOUT__REDIS__URL", redis_url())
        .env("FANOUT__REDIS__PREFIX", unique("lone"))
        .env("FANOUT__DATABASE__URL", db)
        .env("FANOUT__AUTH__JWT_SECRET", SECRET)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.spawn().expect("spawn fanout")
}

/// Expects `child` to exit with 1 within 15 s (a node refused at start); its log.
pub fn expect_refused_at_start(mut child: Child) -> String {
    const WAIT: Duration = Duration::from_secs(15);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the node did not stop within {WAIT:?}; its log:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned();
    assert_eq!(status.code(), Some(1), "exit code; log:\n{log}");
    log
}

/// A `fanout` running the embedded default (no Kafka, Redis or database configured) in a
/// directory of its own, with extra `FANOUT__…` variables; ready when returned.
pub struct EmbeddedNode {
    child: Child,
    /// `host:port` of the public and admin listeners (127.0.0.1).
    pub public: String,
    pub admin: String,
    /// The in-process Kafka broker's bootstrap address, as the banner prints it.
    pub bootstrap: String,
    /// Its working directory (where `fanout.db` is made).
    pub dir: PathBuf,
}

impl EmbeddedNode {
    /// Starts the embedded default (nothing configured but the listen addresses and `env`)
    /// in a fresh directory, and waits until it is ready.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        use std::io::{BufRead as _, BufReader};
        let dir = std::env::temp_dir().join(unique("fanout-embedded"));
        std::fs::create_dir_all(&dir).unwrap();
        let public = format!("127.0.0.1:{}", free_port());
        let admin = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fanout"));
        cmd.current_dir(&dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FANOUT__SERVER__LISTEN", &public)
            .env("FANOUT__ADMIN__LISTEN", &admin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in env {
            cmd.env(key, value);
        }
        let mut child = cmd.spawn().expect("spawn fanout");
        // The banner names the in-process broker: "Kafka       bootstrap HOST:PORT topic T".
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let bootstrap = lines
            .by_ref()
            .take(50)
            .map_while(Result::ok)
            .find_map(|l| {
                let rest = l.trim().strip_prefix("Kafka")?.to_owned();
                rest.split_whitespace().nth(1).map(str::to_owned)
            })
            .expect("the banner prints the Kafka bootstrap address");
        std::thread::spawn(move || lines.for_each(drop)); // keep draining the log
        let node = Self {
            child,
            public,
            admin,
            bootstrap,
            dir,
        };
        let ready = format!("http://{}/readyz", node.admin);
        eventually(Duration::from_secs(30), "embedded node ready", || async {
            matches!(reqwest::get(&ready).await, Ok(r) if r.status().is_success())
        })
        .await;
        node
    }

    pub fn http(&self, path: &str) -> String {
        format!("http://{}{path}", self.public)
    }

    /// The value of one metric sample, e.g. `fanout_ingest_rejected_total{reason="empty"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_at(&self.admin, sample).await
    }
}

impl Drop for EmbeddedNode {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The value of one metric sample on the admin port `admin` (0 when absent).
pub async fn metric_at(admin: &str, sample: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Kills every pub/sub client of the Redis servers on `ports` (`CLIENT KILL TYPE pubsub`),
/// `times` times 700 ms apart, the first 700 ms from now, on a task of its own.
pub fn kill_pubsub_clients(ports: Vec<u16>, times: usize) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for _ in 0..times {
            tokio::time::sleep(Duration::from_millis(700)).await;
            for port in &ports {
                let out = Command::new("redis-cli")
                    .args(["-p", &port.to_string(), "CLIENT", "KILL", "TYPE", "pubsub"])
                    .output()
                    .unwrap();
                assert!(out.status.success());
            }
        }
    })
}

/// A failover's outcome for each of `users` against DESIGN §6 (tests/e2e/sentinel.rs):
/// the connection that stayed, whose frames `watchers[i]` collected, by [`check_live`]
/// (nothing from round `after_kill` on may be lost); then the one that left, resuming on
/// node `i % 2` (the other node) with `since[i]`, the number and id of the last message it
/// got: every later message replayed exactly, or `recovered:false` and none replayed.
/// Returns (what held, what broke), a line per connection.
pub(crate) async fn judge_failover(
    cluster: &TestCluster,
    users: &[&str],
    watchers: Vec<tokio::task::JoinHandle<Vec<Seen>>>,
    since: &[(u64, String)],
    after_kill: u64,
) -> (Vec<String>, Vec<String>) {
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for (user, watcher) in users.iter().zip(watchers) {
        let seen = watcher.await.unwrap();
        match check_live(&format!("{user} (live)"), &seen, after_kill) {
            Ok(line) => report.push(line),
            Err(line) => failures.push(line),
        }
    }

    // The leavers come back, each on the other node, with the id they kept.
    for (i, (user, (last_n, id))) in users.iter().zip(since).enumerate() {
        let mut client = cluster
            .connect(i % 2, user, &format!("since={}", urlencode(id)))
            .await;
        let resume = client.hello["resume"].clone();
        let got: Vec<u64> = client
            .msgs_during(QUIET)
            .await
            .iter()
            .map(|m| m["data"]["n"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = (last_n + 1..ROUNDS).collect();
        let line = format!(
            "{user} (resume after {last_n}): {resume}, then {} messages ({})",
            got.len(),
            ranges(&got)
        );
        match resume["recovered"].as_bool() {
            Some(true) if got == expected && resume["replayed"] == json!(expected.len()) => {
                report.push(line)
            }
            Some(true) => {
                let have: BTreeSet<u64> = got.iter().copied().collect();
                let missing: Vec<u64> = expected
                    .iter()
                    .copied()
                    .filter(|n| !have.contains(n))
                    .collect();
                failures.push(format!(
                    "{line}; recovered:true but NOT EXACT: missing {}",
                    ranges(&missing)
                ))
            }
            Some(false) if got.is_empty() => report.push(line),
            Some(false) => failures.push(format!("{line}; recovered:false yet messages replayed")),
            None => failures.push(format!("{line}; no resume in hello {}", client.hello)),
        }
    }
    (report, failures)
}

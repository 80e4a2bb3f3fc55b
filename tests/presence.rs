//! The presence contract, on both backends where it applies: Redis (a real Redis at
//! `FANOUT_TEST_REDIS`, and a Redis Cluster at `FANOUT_TEST_REDIS_CLUSTER`, several "nodes"
//! sharing one prefix, each a `Presence` with its writer task) and the in-process one of
//! the embedded default.

use std::sync::Arc;
use std::time::{Duration, Instant};

use fanout::bus::redis::RedisBus;
use fanout::config::{RecoveryConfig, RedisConfig};
use fanout::envelope::Platform;
use fanout::metrics::Metrics;
use fanout::presence::{Backend, ConnInfo, OnlineQuery, Options, Presence};
use fred::prelude::*;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[path = "common/servers.rs"]
mod servers;

/// `kafka.session_timeout` of the test nodes: their dead bound is 1 + 5 = 6 s.
const SESSION_TIMEOUT: Duration = Duration::from_secs(1);
const DEAD: Duration = Duration::from_secs(6);

/// One node's presence, its writer task running.
struct TestNode {
    presence: Presence,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl TestNode {
    /// SIGKILL, as far as Redis can tell: the writer stops without leaving.
    fn kill(&self) {
        self.task.abort();
    }
}

/// Which Redis presence runs on.
#[derive(Clone, Copy)]
enum On {
    Server,
    Cluster,
}

/// The bus's client on `on` and its key base, which presence keys live under (as the app
/// wires them).
async fn client_on(on: On, prefix: &str) -> (Client, String) {
    let url = match on {
        On::Server => servers::redis_url(),
        On::Cluster => servers::redis_cluster_url(),
    };
    let cfg = RedisConfig {
        url: url.clone(),
        prefix: prefix.to_owned(),
        ..RedisConfig::default()
    };
    let bus = RedisBus::connect(&cfg, &RecoveryConfig::default(), Arc::new(Metrics::new()))
        .await
        .unwrap_or_else(|e| {
            panic!("Redis at {url} is needed for this test (./scripts/test starts it): {e}")
        });
    (bus.client(), bus.key_base().to_owned())
}

async fn node_on(on: On, prefix: &str, node: &str) -> TestNode {
    let (client, base) = client_on(on, prefix).await;
    start(
        node,
        Backend::Redis {
            client,
            prefix: base,
        },
    )
}

async fn redis_node(prefix: &str, node: &str) -> TestNode {
    node_on(On::Server, prefix, node).await
}

fn local_node() -> TestNode {
    start("local", Backend::Local)
}

fn start(node: &str, backend: Backend) -> TestNode {
    let metrics = Arc::new(Metrics::new());
    let presence = Presence::new(Options {
        node: node.to_owned(),
        backend,
        session_timeout: SESSION_TIMEOUT,
        events: None,
        metrics: metrics.clone(),
    });
    let stop = CancellationToken::new();
    let (p, s) = (presence.clone(), stop.clone());
    let task = tokio::spawn(async move { p.run(s).await.expect("presence writer") });
    TestNode {
        presence,
        metrics,
        stop,
        task,
    }
}

fn prefix() -> String {
    format!("presence-test-{:08x}", rand::random::<u32>())
}

fn info(node: &TestNode, user: &str, conn: &str, platform: Option<Platform>) -> ConnInfo {
    ConnInfo {
        user: user.into(),
        conn: conn.into(),
        node: node.presence.node().to_owned(),
        platform,
        tab: Some(format!("tab-{conn}")),
        connected_at: fanout::clock::now_ms(),
    }
}

/// The conn ids `node` lists for `user`.
async fn listed(node: &TestNode, user: &str) -> Vec<String> {
    let mut ids: Vec<String> = node
        .presence
        .connections(user)
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.conn)
        .collect();
    ids.sort();
    ids
}

/// Waits until `node` lists exactly `want` for `user`; how long it took.
async fn until_listed(node: &TestNode, user: &str, want: &[&str], within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = listed(node, user).await;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{user}: listed {got:?}, expected {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn q<'a>(user: &'a str, platform: Option<Platform>, tab: Option<&'a str>) -> OnlineQuery<'a> {
    OnlineQuery {
        user,
        platform,
        tab,
    }
}

async fn lists_and_forgets(node: &TestNode) {
    let ann = info(node, "ann", "c-1", Some(Platform::Android));
    node.presence.connected(ann.clone());
    until_listed(node, "ann", &["c-1"], Duration::from_secs(3)).await;
    assert_eq!(node.presence.connections("ann").await.unwrap(), [ann]);
    node.presence.disconnected("ann", "c-1", 1000);
    until_listed(node, "ann", &[], Duration::from_secs(3)).await;
    assert_eq!(node.metrics.presence_connections.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_listed_until_it_ends_on_redis() {
    lists_and_forgets(&redis_node(&prefix(), "a").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_listed_until_it_ends_in_process() {
    lists_and_forgets(&local_node()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_is_listed_until_it_ends_on_a_redis_cluster() {
    lists_and_forgets(&node_on(On::Cluster, &prefix(), "a").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_lists_the_connections_of_every_node() {
    every_node_lists_every_connection(On::Server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_lists_the_connections_of_every_node_on_a_redis_cluster() {
    every_node_lists_every_connection(On::Cluster).await;
}

async fn every_node_lists_every_connection(on: On) {
    let prefix = prefix();
    let (a, b) = (
        node_on(on, &prefix, "a").await,
        node_on(on, &prefix, "b").await,
    );
    a.presence
        .connected(info(&a, "ann", "c-a1", Some(Platform::Ios)));
    b.presence.connected(info(&b, "ann", "c-b1", None));
    b.presence.connected(info(&b, "bob", "c-b2", None));
    for node in [&a, &b] {
        until_listed(node, "ann", &["c-a1", "c-b1"], Duration::from_secs(3)).await;
        until_listed(node, "bob", &["c-b2"], Duration::from_secs(3)).await;
    }
    let from_a = a.presence.connections("ann").await.unwrap();
    let nodes: Vec<&str> = from_a.iter().map(|c| c.node.as_str()).collect();
    assert!(nodes.contains(&"a") && nodes.contains(&"b"), "{from_a:?}");
    // Online, asked on the node that does not hold the connection.
    let answers = b
        .presence
        .online(&[
            q("ann", Some(Platform::Ios), None),
            q("ann", Some(Platform::Android), None),
            q("ann", None, Some("tab-c-a1")),
            q("ann", Some(Platform::Ios), Some("tab-c-b1")),
            q("bob", None, None),
            q("cy", None, None),
        ])
        .await
        .unwrap();
    assert_eq!(answers, [true, false, true, false, true, false]);
    b.presence.disconnected("ann", "c-b1", 4000);
    until_listed(&a, "ann", &["c-a1"], Duration::from_secs(3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_in_process_answers_for_the_node() {
    let node = local_node();
    node.presence
        .connected(info(&node, "ann", "c-1", Some(Platform::H5)));
    let answers = node
        .presence
        .online(&[
            q("ann", Some(Platform::H5), Some("tab-c-1")),
            q("ann", Some(Platform::Ios), None),
            q("bob", None, None),
        ])
        .await
        .unwrap();
    assert_eq!(answers, [true, false, false]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_connections_leave_presence_and_are_swept_once() {
    dead_nodes_are_swept_once(On::Server).await;
}

/// The sweep script builds user keys itself: on a cluster they are in its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_connections_leave_presence_and_are_swept_once_on_a_redis_cluster() {
    dead_nodes_are_swept_once(On::Cluster).await;
}

async fn dead_nodes_are_swept_once(on: On) {
    let prefix = prefix();
    let (a, b, c) = (
        node_on(on, &prefix, "a").await,
        node_on(on, &prefix, "b").await,
        node_on(on, &prefix, "c").await,
    );
    for i in 0..3 {
        a.presence
            .connected(info(&a, "ann", &format!("c-a{i}"), None));
    }
    b.presence.connected(info(&b, "ann", "c-b", None));
    until_listed(
        &b,
        "ann",
        &["c-a0", "c-a1", "c-a2", "c-b"],
        Duration::from_secs(3),
    )
    .await;
    let killed = Instant::now();
    a.kill();
    until_listed(&b, "ann", &["c-b"], DEAD + Duration::from_secs(3)).await;
    let gone = killed.elapsed();
    assert!(
        gone >= DEAD / 2,
        "listed as dead after {gone:?}, before its heartbeat was {DEAD:?} old"
    );
    // One of the live nodes swept the three connections, exactly once between them.
    let (redis, base) = client_on(on, &prefix).await;
    let node_key = format!("{base}:presence:n:a");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let swept = b.metrics.presence_swept.get() + c.metrics.presence_swept.get();
        let left: i64 = redis.hlen(&node_key).await.unwrap();
        let score: Option<f64> = redis
            .zscore(format!("{base}:presence:nodes"), "a")
            .await
            .unwrap();
        if swept == 3 && left == 0 && score.is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "swept {swept}, {left} entries left, heartbeat {score:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let user_entries: i64 = redis.hlen(format!("{base}:presence:u:ann")).await.unwrap();
    assert_eq!(user_entries, 1, "only b's connection is left");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        b.metrics.presence_swept.get() + c.metrics.presence_swept.get(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_taken_for_dead_writes_its_connections_again() {
    let prefix = prefix();
    let (a, b) = (
        redis_node(&prefix, "a").await,
        redis_node(&prefix, "b").await,
    );
    let mut lost = a.presence.entries_lost();
    a.presence.connected(info(&a, "ann", "c-a", None));
    until_listed(&b, "ann", &["c-a"], Duration::from_secs(3)).await;
    assert!(
        !lost.has_changed().unwrap(),
        "nothing lost while it heartbeats"
    );
    // What a sweep leaves after a node was cut off from Redis for longer than the bound.
    let (redis, _) = client_on(On::Server, &prefix).await;
    let _: i64 = redis
        .hdel(format!("{prefix}:presence:u:ann"), "c-a")
        .await
        .unwrap();
    let _: i64 = redis.del(format!("{prefix}:presence:n:a")).await.unwrap();
    let _: i64 = redis
        .zrem(format!("{prefix}:presence:nodes"), "a")
        .await
        .unwrap();
    assert!(listed(&b, "ann").await.is_empty());
    // Its next heartbeat finds it was gone, and it writes its connections again.
    until_listed(&b, "ann", &["c-a"], Duration::from_secs(3)).await;
    assert!(a.metrics.presence_resyncs.get() >= 1);
    // ...and says its entries may have been missing (routed mode tells its connections).
    tokio::time::timeout(Duration::from_secs(3), lost.changed())
        .await
        .expect("entries_lost changes within 3 s")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_removes_what_its_previous_run_left() {
    let prefix = prefix();
    let (a, b) = (
        redis_node(&prefix, "a").await,
        redis_node(&prefix, "b").await,
    );
    a.presence.connected(info(&a, "ann", "c-old", None));
    until_listed(&b, "ann", &["c-old"], Duration::from_secs(3)).await;
    a.kill();
    let again = redis_node(&prefix, "a").await;
    again.presence.connected(info(&again, "ann", "c-new", None));
    // Long before the old run's heartbeat could look dead.
    let took = until_listed(&b, "ann", &["c-new"], Duration::from_secs(3)).await;
    assert!(took < DEAD / 2, "took {took:?}");
    assert_eq!(again.metrics.presence_swept.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_leaves_presence() {
    let prefix = prefix();
    let (a, b) = (
        redis_node(&prefix, "a").await,
        redis_node(&prefix, "b").await,
    );
    a.presence.connected(info(&a, "ann", "c-a", None));
    until_listed(&b, "ann", &["c-a"], Duration::from_secs(3)).await;
    a.stop.cancel();
    tokio::time::timeout(Duration::from_secs(6), a.task)
        .await
        .expect("the writer stops within its leave bound")
        .unwrap();
    assert!(listed(&b, "ann").await.is_empty(), "gone at once");
    let (redis, _) = client_on(On::Server, &prefix).await;
    let score: Option<f64> = redis
        .zscore(format!("{prefix}:presence:nodes"), "a")
        .await
        .unwrap();
    assert_eq!(score, None);
}

/// Routed mode waits for a connection's entry: [`Presence::written`] answers once the
/// writer has it in Redis (a direct read then finds it), and a write that cannot happen
/// (no writer running) is answered `false` after the timeout.
async fn a_write_can_be_awaited(on: On) {
    let prefix = prefix();
    let node = node_on(on, &prefix, "a").await;
    let (client, base) = client_on(on, &prefix).await;
    for i in 0..20 {
        let conn = format!("c-{i}");
        let mark = node.presence.connected(info(&node, "ann", &conn, None));
        assert!(mark > 0, "a write on Redis is numbered");
        assert!(
            node.presence.written(mark, Duration::from_secs(3)).await,
            "written within 3 s"
        );
        let held: Option<String> = client
            .hget(format!("{base}:presence:u:ann"), conn.as_str())
            .await
            .unwrap();
        assert!(held.is_some(), "{conn} is in Redis once written() said so");
    }
    node.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mark = node.presence.connected(info(&node, "ann", "c-late", None));
    let started = Instant::now();
    assert!(
        !node
            .presence
            .written(mark, Duration::from_millis(300))
            .await
    );
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_write_can_be_awaited_on_redis() {
    a_write_can_be_awaited(On::Server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_write_can_be_awaited_on_a_redis_cluster() {
    a_write_can_be_awaited(On::Cluster).await;
}

/// Receipts' claims share presence's Redis and slot: the first claim of an (id, user) wins,
/// once, whatever the id holds (`:`, a newline), from any client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_claim_is_won_once() {
    claims_are_won_once(On::Server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receipt_claim_is_won_once_on_a_redis_cluster() {
    claims_are_won_once(On::Cluster).await;
}

async fn claims_are_won_once(on: On) {
    use fanout::receipts::RedisClaims;
    let prefix = prefix();
    let (a, base) = client_on(on, &prefix).await;
    let (b, _) = client_on(on, &prefix).await;
    let window = Duration::from_secs(60);
    let (a, b) = (
        RedisClaims::new(a, &base, window),
        RedisClaims::new(b, &base, window),
    );
    let odd = "m:1\n2";
    let first = [("m-1", "ann"), (odd, "bob"), ("m-1", "bob")];
    assert_eq!(
        a.claim(first.into_iter()).await.unwrap(),
        [true, true, true]
    );
    // The same claims from another node lose; a new one in the same call wins.
    let again = [("m-1", "bob"), (odd, "bob"), ("m-2", "ann"), ("m-1", "ann")];
    assert_eq!(
        b.claim(again.into_iter()).await.unwrap(),
        [false, false, true, false]
    );
    // Ids are length-prefixed in the call and in the keys: `12:3` for `ann` and `1` for
    // `2:3ann` are two claims, and so are `a:b` for `c` and `a` for `b:c` (user ids may
    // hold `:` too), whatever the colons.
    assert_eq!(
        b.claim([("12:3", "ann"), ("1", "2:3ann"), (odd, "carol")].into_iter())
            .await
            .unwrap(),
        [true, true, true]
    );
    assert_eq!(
        b.claim([("a:b", "c"), ("a", "b:c")].into_iter())
            .await
            .unwrap(),
        [true, true]
    );
    assert_eq!(
        a.claim([("a", "b:c"), ("a:b", "c")].into_iter())
            .await
            .unwrap(),
        [false, false]
    );
}

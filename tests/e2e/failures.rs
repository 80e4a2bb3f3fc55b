//! Failures: a node dies, Redis restarts. Nothing produced afterwards may be lost.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::support::*;

/// Produces `n` records for `user` spread over every partition, then checks the client
/// gets each exactly once.
async fn produce_spread_and_expect_all(
    cluster: &TestCluster,
    client: &mut Client,
    user: &str,
    n: usize,
) {
    for i in 0..n {
        cluster
            .producer
            .send(
                &format!("key-{i}"),
                json!({"type":"t","to":{"user":user},"data":i}),
            )
            .await;
    }
    let mut seen = BTreeSet::new();
    while seen.len() < n {
        let m = client.expect_msg(Duration::from_secs(45)).await;
        assert!(
            seen.insert(m["data"].as_i64().unwrap()),
            "duplicate delivery of {m}"
        );
    }
    assert_eq!(seen, (0..n as i64).collect());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_node_is_killed_the_survivor_takes_its_partitions_and_nothing_is_lost() {
    let mut cluster = TestCluster::start(2).await;
    let mut max = cluster.connect(1, "max", "").await;
    cluster.nodes[0].kill();
    // The group moves the dead node's partitions to the survivor once kafka.session_timeout
    // (6 s here) has passed without a heartbeat.
    eventually(
        Duration::from_secs(6 + 10),
        "the survivor owns every partition",
        || async {
            let stats = cluster.node(1).stats().await;
            stats.and_then(|s| s["kafka_partitions"].as_i64()) == Some(PARTITIONS as i64)
        },
    )
    .await;
    // Records on every partition, including those the dead node owned.
    produce_spread_and_expect_all(&cluster, &mut max, "max", 40).await;
    let owned = cluster.node(1).stats().await.unwrap()["kafka_partitions"].as_i64();
    assert_eq!(
        owned,
        Some(PARTITIONS as i64),
        "the survivor owns every partition"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_produced_while_a_node_is_dead_arrive_after_it_restarts() {
    let mut cluster = TestCluster::start(2).await;
    let mut ola = cluster.connect(1, "ola", "").await;
    cluster.nodes[0].kill();
    for i in 0..20 {
        cluster
            .producer
            .send(
                &format!("key-{i}"),
                json!({"type":"t","to":{"user":"ola"},"data":i}),
            )
            .await;
    }
    // Restarted at once, as Kubernetes does, while the dead instance is still a member.
    cluster.restart_node(0);
    let mut seen = BTreeSet::new();
    while seen.len() < 20 {
        let m = ola.expect_msg(Duration::from_secs(45)).await;
        assert!(
            seen.insert(m["data"].as_i64().unwrap()),
            "duplicate delivery of {m}"
        );
    }
    assert_eq!(seen, (0..20).collect());
}

/// A private redis-server on its own port, so the test can restart it.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(port: u16) -> Self {
        Self::start_with(port, &["--appendonly", "no"])
    }

    /// With an append-only file synced on every write, in `dir`: data survives a restart.
    fn start_persistent(port: u16, dir: &std::path::Path) -> Self {
        let dir = dir.to_str().unwrap();
        Self::start_with(
            port,
            &[
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                dir,
            ],
        )
    }

    fn start_with(port: u16, extra: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(extra)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH for this test (./scripts/test installs it)");
        let redis = Self {
            port,
            child: Some(child),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "private redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_redis_restarts_delivery_resumes_without_restarting_fanout() {
    let port = free_port();
    let mut redis = PrivateRedis::start(port);
    let cluster = TestCluster::start_with(
        2,
        Options {
            redis_url: redis.url(),
            ..Default::default()
        },
    )
    .await;
    let mut nia = cluster.connect(1, "nia", "").await;
    cluster
        .producer
        .send("nia", for_user("nia", "t", "before"))
        .await;
    assert_eq!(
        nia.expect_msg(Duration::from_secs(15)).await["data"]["text"],
        "before"
    );

    redis.stop();
    eventually(
        Duration::from_secs(15),
        "readyz reports redis down",
        || async { !cluster.node(0).ready().await },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut redis = PrivateRedis::start(port);
    eventually(Duration::from_secs(30), "nodes ready again", || async {
        cluster.node(0).ready().await && cluster.node(1).ready().await
    })
    .await;
    // The new Redis is empty (no persistence): the node cannot know what was in flight when
    // the old one died, so it tells its clients, and keeps the connection open.
    let notice = loop {
        let f = nia
            .next_frame(Duration::from_secs(20))
            .await
            .expect("a messages_lost notice after Redis came back empty");
        if f["t"] == "error" {
            break f;
        }
    };
    assert_eq!(notice["code"], "messages_lost", "{notice}");

    // Probe until a message gets through end to end (the subscriber resubscribes by itself),
    // then every later message must arrive.
    let mut resumed = false;
    for i in 0..40 {
        cluster
            .producer
            .send("nia", for_user("nia", "probe", &format!("probe {i}")))
            .await;
        if !nia.msgs_during(Duration::from_millis(500)).await.is_empty() {
            resumed = true;
            break;
        }
    }
    assert!(
        resumed,
        "no message reached the client within 20 s of Redis coming back"
    );
    for i in 0..10 {
        cluster
            .producer
            .send("nia", for_user("nia", "after", &format!("after {i}")))
            .await;
    }
    let mut after = Vec::new();
    while after.len() < 10 {
        let m = nia.expect_msg(Duration::from_secs(15)).await;
        if m["type"] == "after" {
            after.push(m["data"]["text"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(
        after,
        (0..10).map(|i| format!("after {i}")).collect::<Vec<_>>()
    );
    assert!(
        cluster
            .node(1)
            .metric("fanout_bus_gaps_total{reason=\"reconnected\"}")
            .await
            >= 1.0
    );
    redis.stop();
}

impl PrivateRedis {
    /// `redis-cli` against this server.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli must be on PATH (./scripts/test installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Streams `total` numbered messages for `user` in the background.
pub(crate) fn stream_for(
    cluster: &TestCluster,
    user: &'static str,
    total: u64,
) -> tokio::task::JoinHandle<()> {
    let producer = cluster.producer.clone();
    tokio::spawn(async move {
        for n in 0..total {
            producer
                .send(user, json!({"type":"t","to":{"user":user},"data":{"n":n}}))
                .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
}

/// Reads until `total` messages arrived; checks they are 0..total, in order, once each.
pub(crate) async fn expect_exactly_in_order(client: &mut Client, total: u64, wait: Duration) {
    let mut got = Vec::new();
    while got.len() < total as usize {
        let m = client.expect_msg(wait).await;
        assert_ne!(m["t"], "error", "{m}");
        got.push(m["data"]["n"].as_u64().unwrap());
    }
    assert_eq!(
        got,
        (0..total).collect::<Vec<_>>(),
        "every message once, in order"
    );
    let extra = client.msgs_during(Duration::from_millis(1500)).await;
    assert!(extra.is_empty(), "nothing twice: {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_bus_subscriptions_are_recovered_from_the_history_without_loss() {
    let redis = PrivateRedis::start(free_port());
    let options = Options {
        redis_url: redis.url(),
        ..Default::default()
    };
    let cluster = TestCluster::start_with(2, options).await;
    let mut uma = cluster.connect(1, "uma", "").await;
    let stream = stream_for(&cluster, "uma", 300);
    // Kill every subscriber connection three times while messages flow: each node misses
    // what was published until it resubscribes, and must read it back from the history.
    let killer = kill_pubsub_clients(vec![redis.port], 3);
    expect_exactly_in_order(&mut uma, 300, Duration::from_secs(20)).await;
    killer.await.unwrap();
    stream.await.unwrap();
    let node = cluster.node(1);
    assert!(
        node.metric("fanout_bus_gaps_total{reason=\"reconnected\"}")
            .await
            >= 1.0
    );
    assert!(
        node.metric("fanout_gap_recoveries_total{result=\"recovered\"}")
            .await
            >= 1.0,
        "the gap was recovered, not just noticed"
    );
    assert_eq!(
        node.metric("fanout_gap_recoveries_total{result=\"lost\"}")
            .await,
        0.0
    );
    drop(redis.cli(&["PING"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_while_messages_flow_loses_nothing_and_duplicates_nothing() {
    let dir = std::env::temp_dir().join(unique("fanout-redis-aof"));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let mut redis = PrivateRedis::start_persistent(port, &dir);
    let options = Options {
        redis_url: redis.url(),
        ..Default::default()
    };
    let cluster = TestCluster::start_with(2, options).await;
    let mut vic = cluster.connect(0, "vic", "").await;
    let mut val = cluster.connect(1, "val", "").await;
    let streams = [
        stream_for(&cluster, "vic", 200),
        stream_for(&cluster, "val", 200),
    ];
    tokio::time::sleep(Duration::from_millis(800)).await;
    redis.stop(); // SIGKILL, mid-stream
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _redis = PrivateRedis::start_persistent(port, &dir);
    expect_exactly_in_order(&mut vic, 200, Duration::from_secs(30)).await;
    expect_exactly_in_order(&mut val, 200, Duration::from_secs(30)).await;
    for s in streams {
        s.await.unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_connections_with_1012_and_exits_0() {
    let mut cluster = TestCluster::start(1).await;
    let mut zoe = cluster.connect(0, "zoe", "").await;
    let node = &mut cluster.nodes[0];
    let code = tokio::task::block_in_place(|| node.terminate(Duration::from_secs(40)));
    assert_eq!(
        code,
        Some(0),
        "a drained node exits 0:\n{}",
        node.log_text()
    );
    match zoe.expect_close(Duration::from_secs(5)).await {
        Closed::Code(code, reason) => {
            assert_eq!(code, 1012);
            assert!(reason.contains("retry_ms"), "{reason}");
        }
        Closed::Eof => panic!("no close frame"),
    }
}

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

/// The broker for the takeover test: `FANOUT_TEST_KAFKA_FAILOVER` when set (e.g. Apache
/// Kafka), else librdkafka's mock cluster over TCP. Not tansu: tansu 0.6 evicts a dead member
/// but answers the survivors' rejoin with the old generation and assignment, so a dead node's
/// partitions are never moved (docs/testing.md). The nodes are real processes either way.
fn failover_broker() -> Options {
    let base = Options::default();
    match std::env::var("FANOUT_TEST_KAFKA_FAILOVER") {
        Ok(kafka) => Options { kafka, ..base },
        Err(_) => {
            let mock = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
            Options {
                kafka: mock.bootstrap_servers(),
                mock: Some(std::rc::Rc::new(mock)),
                ..base
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_node_is_killed_the_survivor_takes_its_partitions_and_nothing_is_lost() {
    let mut cluster = TestCluster::start_with(2, failover_broker()).await;
    let mut max = cluster.connect(1, "max", "").await;
    cluster.nodes[0].kill();
    // Records on every partition, including those the dead node owned: the group moves them
    // to the survivor after kafka.session_timeout (6 s here).
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
    // Restart after the group has evicted the dead instance (kafka.session_timeout = 6 s):
    // tansu 0.6 never rebalances on an eviction, so a dead member still in the group at the
    // restart would keep its share of partitions forever (docs/testing.md).
    tokio::time::sleep(Duration::from_secs(8)).await;
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
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
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

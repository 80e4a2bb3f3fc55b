//! Redis Cluster failover (issue 18, DESIGN §6): the nodes run on a private 3-primary
//! cluster (`scripts/servers/redis-cluster`), and the primary serving the bus's shard
//! (the slot of `{<prefix>}`) fails over while messages flow.
//!
//! * SIGKILLed, its replica promoted: what a client may see is what it may see under
//!   Sentinel (tests/e2e/sentinel.rs, whose checks these are): every message exactly once
//!   and in order, or a loss that is *reported* (`messages_lost`, `recovered:false`); never
//!   a duplicate, never out of order, never a silent gap, and nothing produced after the
//!   primary died lost at all.
//! * Manual (`CLUSTER FAILOVER`: the replica catches up, then takes the slots; the old
//!   primary stays up as its replica and ends the nodes' shard subscriptions with a
//!   `sunsubscribe` they are not told about): nothing may be lost at all, and the nodes
//!   must hear the bus live again, not only through their once-a-second history checks.
//!
//! * Every node of the cluster drops its pub/sub clients (`CLIENT KILL TYPE pubsub`) while
//!   messages flow: the nodes subscribe again and recover exactly what they missed.
//!
//! (The other delivery, resume, preference and failure scenarios run on the shared cluster
//! when `FANOUT_TEST_REDIS_MODE=cluster`, as `./scripts/test` does.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::failures::{expect_exactly_in_order, stream_for};
use crate::sentinel::{n_and_id, numbered, watch, KILL_AT, ROUNDS, ROUND_PAUSE};
use crate::support::*;

#[path = "../common/redis_cluster.rs"]
mod redis_cluster;
use redis_cluster::PrivateCluster;

const RECEIVED: &str = "fanout_bus_received_total{channel=\"bus\"}";

/// Four users, each with a connection that stays (node 0 or 1) and one that leaves before
/// the failover and resumes afterwards on the other node; a producer streams numbered
/// messages to them while the bus's shard fails over; then DESIGN §6 is checked for each.
async fn failover_while_messages_flow(manual: bool) {
    let started = Instant::now();
    let redis = PrivateCluster::start().await;
    let options = Options {
        redis_url: redis.url.clone(),
        ..Options::default()
    }
    // Every message of the test fits in the history: a refused resume is the failover's.
    .with("FANOUT__RECOVERY__MAX_MESSAGES", "1000");
    let cluster = TestCluster::start_with(2, options).await;
    eprintln!("servers and cluster up after {:?}", started.elapsed());

    let users = ["cia", "col", "cam", "cue"];
    let mut watchers = Vec::new();
    let mut leavers = Vec::new();
    for (i, user) in users.iter().enumerate() {
        watchers.push(tokio::spawn(watch(cluster.connect(i % 2, user, "").await)));
        leavers.push(cluster.connect((i + 1) % 2, user, "").await);
    }

    let produced = Arc::new(AtomicU64::new(0));
    let stream = {
        let producer = cluster.producer.clone();
        let produced = produced.clone();
        tokio::spawn(async move {
            for n in 0..ROUNDS {
                // Counted before the round is produced: a round counted after the kill
                // was produced after it.
                produced.store(n, Ordering::SeqCst);
                for user in users {
                    producer.send(user, numbered(user, n)).await;
                }
                tokio::time::sleep(ROUND_PAUSE).await;
            }
            produced.store(ROUNDS, Ordering::SeqCst);
        })
    };

    // The leavers read a while, then go, keeping the id of the last message they got.
    let mut since = Vec::new();
    for (user, mut client) in users.iter().zip(leavers) {
        let mut last = None;
        while produced.load(Ordering::SeqCst) < KILL_AT - 15 {
            if let Some(f) = client.next_frame(Duration::from_millis(100)).await {
                if f["t"] == "msg" {
                    last = Some(n_and_id(&f));
                }
            }
        }
        for f in client.msgs_during(Duration::from_millis(50)).await {
            last = Some(n_and_id(&f));
        }
        let (n, id) = last.unwrap_or_else(|| panic!("{user}'s leaver got no message"));
        since.push((n, id));
    }
    eventually(
        Duration::from_secs(20),
        "the stream reaches the failover",
        || {
            let produced = produced.clone();
            async move { produced.load(Ordering::SeqCst) >= KILL_AT }
        },
    )
    .await;
    let shard = format!("{{{}}}", cluster.prefix);
    let mut failover = redis.failover(&shard, manual);
    let failed_at = Instant::now();
    // From which round on nothing may be lost: after a SIGKILL, what was produced after
    // it; after a manual failover (nothing is lost), everything.
    let after_kill = if manual {
        failover.wait_for("FAILOVER_DEMOTED").await;
        0
    } else {
        failover.wait_for("FAILOVER_KILLED").await;
        produced.load(Ordering::SeqCst) + 1
    };
    let promoted = failover.wait_for("FAILOVER_PROMOTED").await;
    let at_switch = produced.load(Ordering::SeqCst);
    let switch_took = failed_at.elapsed();
    eprintln!("{promoted} serves the bus's shard {switch_took:?} later, at round {at_switch}");
    assert!(
        at_switch + 60 < ROUNDS,
        "the stream should run on well after the failover (switched at round {at_switch} of \
         {ROUNDS}): the test is mis-tuned"
    );
    let mut received_at_switch = Vec::new();
    for node in &cluster.nodes {
        received_at_switch.push(node.metric(RECEIVED).await);
    }
    stream.await.unwrap();

    let how = if manual {
        "manual failover"
    } else {
        "primary SIGKILLed"
    };
    let mut report = vec![format!(
        "{how} at round {} (nothing from round {after_kill} on may be lost), {promoted} \
         serving {switch_took:?} later, at round {at_switch}",
        KILL_AT
    )];
    let (held, mut failures) = judge_failover(&cluster, &users, watchers, &since, after_kill).await;
    report.extend(held);

    for (i, node) in cluster.nodes.iter().enumerate() {
        let mut metrics = Vec::new();
        for sample in [
            "fanout_bus_gaps_total{reason=\"reconnected\"}",
            "fanout_bus_gaps_total{reason=\"skipped\"}",
            "fanout_bus_gaps_total{reason=\"reset\"}",
            "fanout_gap_recoveries_total{result=\"recovered\"}",
            "fanout_gap_recoveries_total{result=\"lost\"}",
            "fanout_recovered_messages_total",
            "fanout_ingest_duplicates_total",
        ] {
            metrics.push(format!("{sample} {}", node.metric(sample).await));
        }
        // Live again: the bus's messages reach the node by pub/sub after the switch, not
        // only through recoveries from the history (4 users x the rounds after it).
        let live = node.metric(RECEIVED).await - received_at_switch[i];
        let owed = (4 * (ROUNDS - at_switch)) as f64;
        metrics.push(format!("{RECEIVED} +{live} after the switch"));
        if live < owed / 2.0 {
            failures.push(format!(
                "node-{i} heard only {live} bus messages live after the switch, of about {owed}: \
                 its subscription did not follow the shard"
            ));
        }
        report.push(format!("node-{i}: {}", metrics.join(", ")));
    }
    eprintln!("---- failover outcome ----\n{}", report.join("\n"));
    assert!(
        failures.is_empty(),
        "DESIGN §6 broken across the failover:\n{}\n(what held:\n{})",
        failures.join("\n"),
        report.join("\n")
    );
    eprintln!("test took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_bus_shards_primary_dies_the_nodes_follow_its_replica_and_lose_nothing_silently() {
    failover_while_messages_flow(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_manual_failover_of_the_bus_shard_nothing_is_lost_and_the_nodes_hear_it_live() {
    failover_while_messages_flow(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_shard_subscriptions_are_recovered_from_the_history_without_loss() {
    let redis = PrivateCluster::start().await;
    let options = Options {
        redis_url: redis.url.clone(),
        ..Default::default()
    };
    let cluster = TestCluster::start_with(2, options).await;
    let mut uma = cluster.connect(1, "uma", "").await;
    let stream = stream_for(&cluster, "uma", 300);
    // Every node drops its subscribers three times while messages flow: each fanout node
    // misses what was published until it subscribes again, and must read it back.
    let killer = kill_pubsub_clients(redis.ports(), 3);
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
}

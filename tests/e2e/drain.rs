//! Draining on SIGTERM (DESIGN §8): readiness off at once, connections closed with 1012 in
//! waves over `shutdown.drain`, messages still flowing to those not closed yet, exit 0, and
//! nothing produced before the signal lost across the restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::resume::urlencode;
use crate::support::*;

const CLIENTS: usize = 300;
const DRAIN: Duration = Duration::from_secs(6);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_waves_and_a_restart_loses_nothing() {
    let options = Options::default().with("FANOUT__SHUTDOWN__DRAIN", "6s");
    let mut cluster = TestCluster::start_with(1, options).await;
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(cluster.connect(0, &format!("d{i}"), "").await);
    }
    // Broadcasts on one partition (one key), numbered, every 50 ms until told to stop.
    let produced = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let stream = {
        let (producer, produced, stop) = (cluster.producer.clone(), produced.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let n = produced.load(Ordering::SeqCst);
                producer
                    .send("b", json!({"type":"t","to":{"all":true},"data":{"n":n}}))
                    .await;
                produced.store(n + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;

    let signalled = Instant::now();
    let n_at_signal = produced.load(Ordering::SeqCst);
    let readers: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let (msgs, closed) = c.read_to_close(Duration::from_secs(30)).await;
                (msgs, closed, Instant::now())
            })
        })
        .collect();
    cluster.nodes[0].signal_term();
    let mut unready_after = None;
    while signalled.elapsed() < Duration::from_secs(2) {
        if !cluster.node(0).ready().await {
            unready_after = Some(signalled.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let unready_after = unready_after.expect("/readyz still 200 two seconds after SIGTERM");
    eprintln!("readyz turned 503 {unready_after:?} after SIGTERM");

    let mut results = Vec::new();
    for r in readers {
        results.push(r.await.unwrap());
    }
    let node = &mut cluster.nodes[0];
    let code = tokio::task::block_in_place(|| node.wait_exit(DRAIN + Duration::from_secs(15)));
    assert_eq!(code, Some(0), "exit code; log:\n{}", node.log_text());
    let exited = signalled.elapsed();

    // Every close is 1012 with a retry_ms, and they are spread over the window.
    let mut offsets = Vec::new();
    for (_, closed, at) in &results {
        match closed {
            Closed::Code(1012, reason) => {
                let retry: serde_json::Value = serde_json::from_str(reason).expect("JSON reason");
                assert!(
                    retry["retry_ms"].as_u64().is_some_and(|ms| ms >= 1000),
                    "{reason}"
                );
            }
            other => panic!("expected 1012, got {other:?}"),
        }
        offsets.push(at.duration_since(signalled));
    }
    offsets.sort();
    let early = offsets.iter().filter(|t| **t < DRAIN / 10).count();
    let last = *offsets.last().unwrap();
    eprintln!(
        "closes: first {:?}, median {:?}, last {:?}; {early} of {CLIENTS} in the first tenth; exit after {exited:?}",
        offsets[0],
        offsets[CLIENTS / 2],
        last
    );
    assert!(
        early <= CLIENTS / 4,
        "{early} of {CLIENTS} closed in the first 10% of the drain"
    );
    assert!(
        last >= DRAIN / 2,
        "the last close came after {last:?}: not spread over {DRAIN:?}"
    );

    // Until its close, each connection got every broadcast, in order.
    for (i, (msgs, _, _)) in results.iter().enumerate() {
        let ns: Vec<u64> = msgs
            .iter()
            .filter_map(|m| m["data"]["n"].as_u64())
            .collect();
        if let (Some(first), Some(last)) = (ns.first(), ns.last()) {
            assert_eq!(
                ns,
                (*first..=*last).collect::<Vec<_>>(),
                "connection {i} before its close"
            );
        }
    }

    // Connections closed late kept receiving what was produced after the signal.
    let late: Vec<_> = results
        .iter()
        .filter(|(_, _, at)| at.duration_since(signalled) > DRAIN / 2)
        .collect();
    assert!(!late.is_empty());
    for (msgs, _, _) in &late {
        let max = msgs.iter().filter_map(|m| m["data"]["n"].as_u64()).max();
        assert!(
            max.is_some_and(|n| n > n_at_signal),
            "a late connection got nothing new: {max:?} <= {n_at_signal}"
        );
    }

    // Restart with the same group: the client that heard the most resumes from its last
    // message and ends with every broadcast, once, in order.
    let (best, _, _) = results
        .iter()
        .max_by_key(|(msgs, _, _)| msgs.len())
        .unwrap();
    let first_n = best[0]["data"]["n"].as_u64().unwrap();
    let since = best.last().unwrap()["id"].as_str().unwrap().to_owned();
    let mut seen: Vec<u64> = best
        .iter()
        .filter_map(|m| m["data"]["n"].as_u64())
        .collect();
    let committed = committed_offsets(&cluster.options.kafka, &cluster.group, &cluster.topic);
    eprintln!(
        "committed after the drain: {committed:?}; last delivered n={:?}",
        seen.last()
    );
    cluster.restart_node(0);
    cluster.wait_settled().await;
    let mut back = cluster
        .connect(0, "d0", &format!("since={}", urlencode(&since)))
        .await;
    assert_eq!(back.hello["resume"]["recovered"], true, "{}", back.hello);
    eprintln!(
        "resumed after n={:?}: {}",
        seen.last(),
        back.hello["resume"]
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.cancel();
    stream.await.unwrap();
    let total = produced.load(Ordering::SeqCst);
    while seen.last().copied() != Some(total - 1) {
        let m = back.expect_msg(Duration::from_secs(30)).await;
        seen.push(m["data"]["n"].as_u64().unwrap());
    }
    let expected: Vec<u64> = (first_n..total).collect();
    if seen != expected {
        let missing: Vec<u64> = expected
            .iter()
            .copied()
            .filter(|n| !seen.contains(n))
            .collect();
        eprintln!("missing {missing:?}; the topic holds:");
        let records = dump_topic(
            &cluster.options.kafka,
            &cluster.topic,
            Duration::from_secs(5),
        )
        .await;
        for (partition, offset, value) in records {
            let n: Option<u64> = serde_json::from_str::<serde_json::Value>(&value)
                .ok()
                .and_then(|v| v["data"]["n"].as_u64());
            if n.is_some_and(|n| missing.iter().any(|m| n + 2 >= *m && n <= m + 2)) {
                eprintln!("  partition {partition} offset {offset}: n={n:?}");
            }
        }
        for node in &cluster.nodes {
            eprintln!("---- log of {} ----\n{}", node.id, node.log_text());
        }
    }
    assert_eq!(
        seen, expected,
        "every broadcast once, in order, across the restart"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    let options = Options::default().with("FANOUT__SHUTDOWN__DRAIN", "60s");
    let mut cluster = TestCluster::start_with(1, options).await;
    // Enough connections that the 60 s drain is still closing them when the second signal comes.
    let mut clients = Vec::new();
    for i in 0..20 {
        clients.push(cluster.connect(0, &format!("s{i}"), "").await);
    }
    let node = &mut cluster.nodes[0];
    node.signal_term();
    tokio::time::sleep(Duration::from_millis(500)).await;
    node.signal_term();
    let started = Instant::now();
    let code = tokio::task::block_in_place(|| node.wait_exit(Duration::from_secs(20)));
    assert_eq!(code, Some(130), "log:\n{}", node.log_text());
    eprintln!("exited {:?} after the second signal", started.elapsed());
}

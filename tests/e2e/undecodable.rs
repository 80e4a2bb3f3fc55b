//! A batch the consumer cannot decode (DESIGN §2: a bad record never stops a partition).
//!
//! Apache Kafka validates batches on produce, so the corrupt batch goes to librdkafka's
//! mock cluster, the embedded default's broker, which stores what it is given
//! (`rdkafka_mock.c`, `rd_kafka_mock_partition_log_append`: it reads only the magic byte,
//! the record count and the attributes). librdkafka fails to decompress that batch and,
//! without fanout's skip, fetches it again forever: the partition stalls.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::*;

/// CRC-32C (Castagnoli), as RecordBatch v2 carries it (bitwise; the batch is tiny).
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A RecordBatch v2 (magic 2) of `records` records whose attributes say zstd but whose
/// compressed payload is not a zstd frame: librdkafka reports `__BAD_COMPRESSION`
/// (rdkafka_msgset_reader.c, `rd_kafka_msgset_reader_decompress`) and does not move its
/// fetch position. The CRC is right, so `check.crcs` would not change the outcome.
fn zstd_batch_of_garbage(records: i32) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // From `attributes` to the end: the part the CRC covers.
    let mut tail = Vec::new();
    tail.extend(4i16.to_be_bytes()); // attributes: compression codec 4 = zstd
    tail.extend((records - 1).to_be_bytes()); // lastOffsetDelta
    tail.extend(now.to_be_bytes()); // baseTimestamp
    tail.extend(now.to_be_bytes()); // maxTimestamp
    tail.extend((-1i64).to_be_bytes()); // producerId: none
    tail.extend((-1i16).to_be_bytes()); // producerEpoch
    tail.extend((-1i32).to_be_bytes()); // baseSequence
    tail.extend(records.to_be_bytes()); // record count
    tail.extend(b"not a zstd frame, just garbage bytes"); // the "compressed" records
    let mut batch = Vec::new();
    batch.extend(0i64.to_be_bytes()); // baseOffset (the broker assigns it)
    batch.extend((4 + 1 + 4 + tail.len() as i32).to_be_bytes()); // batchLength
    batch.extend(0i32.to_be_bytes()); // partitionLeaderEpoch (the broker sets it)
    batch.push(2); // magic
    batch.extend(crc32c(&tail).to_be_bytes());
    batch.extend(tail);
    batch
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as i16).to_be_bytes());
    buf.extend(s.as_bytes());
}

/// Sends `batch` to `topic`/`partition` with a hand-made Produce request (v3: the first
/// with RecordBatch v2; not yet flexible) to the partition's leader (the mock cluster has
/// one broker) and returns the base offset the broker gave it.
fn produce_raw(broker: &str, topic: &str, partition: i32, batch: &[u8]) -> i64 {
    let mut req = Vec::new();
    req.extend(0i16.to_be_bytes()); // api key: Produce
    req.extend(3i16.to_be_bytes()); // api version
    req.extend(1i32.to_be_bytes()); // correlation id
    put_str(&mut req, "e2e-raw");
    req.extend((-1i16).to_be_bytes()); // transactional id: null
    req.extend((-1i16).to_be_bytes()); // acks: all
    req.extend(5000i32.to_be_bytes()); // timeout ms
    req.extend(1i32.to_be_bytes()); // one topic
    put_str(&mut req, topic);
    req.extend(1i32.to_be_bytes()); // one partition
    req.extend(partition.to_be_bytes());
    req.extend((batch.len() as i32).to_be_bytes());
    req.extend(batch);
    let mut conn = TcpStream::connect(broker).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(&(req.len() as i32).to_be_bytes()).unwrap();
    conn.write_all(&req).unwrap();
    let mut len = [0u8; 4];
    conn.read_exact(&mut len).unwrap();
    let mut resp = vec![0u8; i32::from_be_bytes(len) as usize];
    conn.read_exact(&mut resp).unwrap();
    // correlation id, #topics, topic name, #partitions, partition, error code, base offset
    let name_len = i16::from_be_bytes([resp[8], resp[9]]) as usize;
    let at = 10 + name_len + 4 + 4;
    let error = i16::from_be_bytes([resp[at], resp[at + 1]]);
    assert_eq!(error, 0, "the mock broker accepts the batch");
    i64::from_be_bytes(resp[at + 2..at + 10].try_into().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_consumer_cannot_decode_is_skipped_offset_by_offset_and_the_partition_moves_on()
{
    let node = EmbeddedNode::start(&[]).await;
    let mut ada = Client::connect(&format!("ws://{}/ws?user=ada", node.public), None).await;
    let topic = "fanout.messages";
    let producer = Producer::new(&node.bootstrap, topic);
    let broker = node.bootstrap.split(',').next().unwrap().to_owned();

    // Partition 1: a good record first, so its reader knows the next offset.
    producer
        .send_to_partition(1, for_user("ada", "robot.reply", "before"))
        .await;
    assert_eq!(
        ada.expect_msg(Duration::from_secs(20)).await["data"]["text"],
        "before"
    );

    // Partition 0: a corrupt batch of 50 records is its first data (the reader saw
    // nothing and looks the offset up); partition 1: one of 3, right after the good
    // record. Then a good record behind each, which stays unread forever unless the
    // partition moves past the batch.
    let started = Instant::now();
    let b = broker.clone();
    let bases = tokio::task::spawn_blocking(move || {
        [(0, 50), (1, 3)].map(|(p, n)| produce_raw(&b, topic, p, &zstd_batch_of_garbage(n)))
    })
    .await
    .unwrap();
    assert_eq!(bases, [0, 1], "the corrupt batches' first offsets");
    producer
        .send_to_partition(0, for_user("ada", "robot.reply", "after 0"))
        .await;
    producer
        .send_to_partition(1, for_user("ada", "robot.reply", "after 1"))
        .await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let msg = ada.expect_msg(Duration::from_secs(30)).await;
        got.push(msg["data"]["text"].as_str().unwrap().to_owned());
    }
    got.sort();
    assert_eq!(got, ["after 0", "after 1"]);
    let took = started.elapsed();
    assert_eq!(
        node.metric("fanout_ingest_rejected_total{reason=\"undecodable\"}")
            .await,
        53.0,
        "each offset of each corrupt batch skipped, one by one, and nothing else"
    );
    assert!(
        node.metric("fanout_kafka_consumer_errors_total{kind=\"undecodable\"}")
            .await
            >= 53.0
    );
    // Not an assertion: the time per step (partition 0 takes 50), for docs/delivery.md.
    eprintln!("corrupt batches of 50 and 3 records skipped and the records behind them delivered in {took:?}");
}

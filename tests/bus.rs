//! The bus contract, checked against both implementations: the Redis bus (a real Redis at
//! `FANOUT_TEST_REDIS`, and a Redis Cluster at `FANOUT_TEST_REDIS_CLUSTER`) and the
//! in-process bus. Each scenario runs on all three (`redis_…`, `cluster_…`, `local_…`), and
//! on the Redis bus in routed mode (`routed_…`, `routed_cluster_…`; `bus.routing =
//! "routed"`), with the routed-only scenarios at the end.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fanout::bus::history::{self, Replay};
use fanout::bus::local::LocalBus;
use fanout::bus::redis::{BusRouting, RedisBus};
use fanout::bus::{
    After, Bus, BusEvent, BusHandler, BusMessage, Channel, EventSender, Header, Outgoing,
};
use fanout::config::{RecoveryConfig, RedisConfig};
use fanout::envelope::Target;
use fanout::metrics::Metrics;
use fanout::registry::{Limits, Registry};
use fanout::router::Router;
use fanout::types::{TypeRegistry, TypesConfig};
use tokio_util::sync::CancellationToken;

#[path = "common/redis_cluster.rs"]
mod redis_cluster;
#[path = "common/servers.rs"]
mod servers;

/// Records what a subscriber hands its handler.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(Channel, Bytes)>>>);

impl BusHandler for Recorder {
    fn on_event(&mut self, event: BusEvent) {
        if let BusEvent::Message { channel, payload } = event {
            self.0.lock().unwrap().push((channel, payload));
        }
    }
}

impl Recorder {
    async fn wait_for(&self, n: usize) -> Vec<(Channel, Bytes)> {
        for _ in 0..100 {
            if self.0.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.0.lock().unwrap().clone()
    }
}

/// Which Redis a scenario runs on.
#[derive(Clone, Copy, Debug)]
enum On {
    /// One server (`FANOUT_TEST_REDIS`).
    Server,
    /// A Redis Cluster (`FANOUT_TEST_REDIS_CLUSTER`).
    Cluster,
}

impl On {
    fn url(self) -> String {
        match self {
            On::Server => servers::redis_url(),
            On::Cluster => servers::redis_cluster_url(),
        }
    }

    async fn connect(self, prefix: &str) -> RedisBus {
        bus_at(&self.url(), prefix).await
    }

    async fn bus(self, prefix: &str) -> Arc<dyn Bus> {
        Arc::new(self.connect(prefix).await)
    }

    /// A client for looking at the keys of the bus under `prefix` behind its back.
    async fn raw(self, prefix: &str) -> Raw {
        let bus = self.connect(prefix).await;
        Raw {
            client: bus.client(),
            base: bus.key_base().to_owned(),
        }
    }
}

async fn bus_at(url: &str, prefix: &str) -> RedisBus {
    let cfg = RedisConfig {
        url: url.to_owned(),
        prefix: prefix.to_owned(),
        ..RedisConfig::default()
    };
    RedisBus::connect(&cfg, &recovery(), Arc::new(Metrics::new()))
        .await
        .unwrap_or_else(|e| {
            panic!("Redis at {url} is needed for this test (./scripts/test starts it): {e}")
        })
}

async fn redis_bus(prefix: &str) -> Arc<dyn Bus> {
    On::Server.bus(prefix).await
}

async fn cluster_bus(prefix: &str) -> Arc<dyn Bus> {
    On::Cluster.bus(prefix).await
}

/// Small limits, so trimming is easy to reach.
fn recovery() -> RecoveryConfig {
    RecoveryConfig {
        window: Duration::from_secs(60),
        max_messages: 5,
    }
}

fn local_bus() -> Arc<dyn Bus> {
    Arc::new(LocalBus::new(1 << 10, &recovery()))
}

fn prefix() -> String {
    format!("bus-test-{:08x}", rand::random::<u32>())
}

/// Subscribes two receivers, as two nodes would.
async fn subscribe_two(
    bus: &Arc<dyn Bus>,
    other: &Arc<dyn Bus>,
    stop: &CancellationToken,
) -> (Recorder, Recorder) {
    let (a, b) = (Recorder::default(), Recorder::default());
    for (bus, rec) in [(bus.clone(), a.clone()), (other.clone(), b.clone())] {
        let stop = stop.clone();
        tokio::spawn(async move { bus.subscribe(Box::new(rec), stop).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    (a, b)
}

async fn every_subscriber_sees_every_message_in_order(
    publisher: Arc<dyn Bus>,
    other: Arc<dyn Bus>,
) {
    let stop = CancellationToken::new();
    let (a, b) = subscribe_two(&publisher, &other, &stop).await;
    for i in 0..100 {
        let channel = if i % 10 == 0 {
            Channel::Control
        } else {
            Channel::Bus
        };
        publisher
            .publish(channel, Bytes::from(format!("m{i}")))
            .await
            .unwrap();
    }
    for rec in [a, b] {
        let got = rec.wait_for(100).await;
        let expected: Vec<(Channel, Bytes)> = (0..100)
            .map(|i| {
                (
                    if i % 10 == 0 {
                        Channel::Control
                    } else {
                        Channel::Bus
                    },
                    Bytes::from(format!("m{i}")),
                )
            })
            .collect();
        assert_eq!(got, expected);
    }
    stop.cancel();
}

async fn subscribe_ends_on_shutdown(bus: Arc<dyn Bus>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let (bus, stop) = (bus.clone(), stop.clone());
        async move { bus.subscribe(Box::new(Recorder::default()), stop).await }
    });
    stop.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("subscribe returns after shutdown");
    assert!(result.unwrap().is_ok());
    assert!(bus.is_connected());
}

#[tokio::test]
async fn redis_bus_delivers_every_message_to_every_node_in_order() {
    let p = prefix();
    every_subscriber_sees_every_message_in_order(redis_bus(&p).await, redis_bus(&p).await).await;
}

#[tokio::test]
async fn local_bus_delivers_every_message_to_every_subscriber_in_order() {
    let bus: Arc<dyn Bus> = Arc::new(LocalBus::default());
    every_subscriber_sees_every_message_in_order(bus.clone(), bus).await;
}

#[tokio::test]
async fn cluster_bus_delivers_every_message_to_every_node_in_order() {
    let p = prefix();
    every_subscriber_sees_every_message_in_order(cluster_bus(&p).await, cluster_bus(&p).await)
        .await;
}

/// On a Redis Cluster the bus's keys share one hash tag (one slot, one shard: a script
/// touches them together) and its channels are shard channels of that slot, which only
/// that shard's nodes carry.
#[tokio::test]
async fn cluster_bus_keys_and_channels_share_the_prefix_hash_tag() {
    let p = prefix();
    let bus = cluster_bus(&p).await;
    let raw = On::Cluster.raw(&p).await;
    assert_eq!(raw.base, format!("{{{p}}}"));
    let (_live, stop) = subscribed(&bus).await;
    bus.publish_messages(&[
        outgoing("k1", Target::Users(vec!["kim".into(), "kai".into()])),
        outgoing("k2", group("crew")),
        outgoing("k3", Target::All),
    ])
    .await
    .unwrap();
    let keys = raw.cmd(vec!["KEYS".into(), raw.key("*")]).await;
    let fred::types::Value::Array(keys) = keys else {
        panic!("KEYS: {keys:?}");
    };
    let mut keys: Vec<String> = keys.iter().map(|k| k.as_string().unwrap()).collect();
    keys.sort();
    for rest in [
        "seq", "epoch", "all", "u:kim", "u:kai", "g:crew", "m:k1", "m:k3",
    ] {
        assert!(keys.contains(&raw.key(rest)), "{rest} not in {keys:?}");
    }
    let subscribers = raw
        .cmd(vec![
            "PUBSUB".into(),
            "SHARDNUMSUB".into(),
            raw.key("bus"),
            raw.key("control"),
        ])
        .await;
    let fred::types::Value::Array(counts) = subscribers else {
        panic!("PUBSUB SHARDNUMSUB: {subscribers:?}");
    };
    let counts: Vec<String> = counts.iter().filter_map(|v| v.as_string()).collect();
    assert_eq!(
        counts,
        [raw.key("bus"), "1".into(), raw.key("control"), "1".into()],
        "one shard subscription each, on the shard of the hash tag"
    );
    stop.cancel();
}

#[tokio::test]
async fn redis_bus_prefixes_keep_clusters_apart() {
    prefixes_keep_clusters_apart(On::Server).await;
}

#[tokio::test]
async fn cluster_bus_prefixes_keep_clusters_apart() {
    prefixes_keep_clusters_apart(On::Cluster).await;
}

async fn prefixes_keep_clusters_apart(on: On) {
    let (one, two) = (on.bus(&prefix()).await, on.bus(&prefix()).await);
    let stop = CancellationToken::new();
    let (a, b) = subscribe_two(&one, &two, &stop).await;
    one.publish(Channel::Bus, Bytes::from_static(b"for one"))
        .await
        .unwrap();
    assert_eq!(a.wait_for(1).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.0.lock().unwrap().is_empty(), "another prefix heard it");
    stop.cancel();
}

#[tokio::test]
async fn both_buses_stop_subscribing_on_shutdown() {
    subscribe_ends_on_shutdown(redis_bus(&prefix()).await).await;
    subscribe_ends_on_shutdown(cluster_bus(&prefix()).await).await;
    subscribe_ends_on_shutdown(Arc::new(LocalBus::default())).await;
}

fn outgoing(id: &str, to: Target) -> Outgoing {
    Outgoing::new(
        Header {
            id: id.into(),
            msg_type: "t".into(),
            to,
            ts: 1,
            ttl_ms: None,
            at_us: 0,
            collapse: None,
        },
        &format!("frame {id}"),
    )
}

fn user(u: &str) -> Target {
    Target::User {
        user: u.into(),
        platform: None,
        tab: None,
    }
}

/// A recorder subscribed to `bus` (cancel the token to stop it), once the subscription is up.
async fn subscribed(bus: &Arc<dyn Bus>) -> (Recorder, CancellationToken) {
    let stop = CancellationToken::new();
    let live = Recorder::default();
    tokio::spawn({
        let (bus, rec, stop) = (bus.clone(), live.clone(), stop.clone());
        async move { bus.subscribe(Box::new(rec), stop).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    (live, stop)
}

fn ids(messages: &[BusMessage]) -> Vec<String> {
    messages.iter().map(|m| m.header.id.clone()).collect()
}

/// Messages are numbered in publish order, recorded per recipient, published once per id,
/// and a resume returns exactly what came after `since` for that user, in order.
async fn history_replays_exactly_what_a_user_missed(bus: Arc<dyn Bus>) {
    let (live, stop) = subscribed(&bus).await;
    let first = bus
        .publish_message(&outgoing("a1", user("ann")))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = bus
        .publish_message(&outgoing("a1", user("ann")))
        .await
        .unwrap();
    assert_eq!(
        (again.seq, again.duplicate),
        (first.seq, true),
        "a redelivery is not published again"
    );
    bus.publish_message(&outgoing("b1", user("bob")))
        .await
        .unwrap();
    bus.publish_message(&outgoing("all1", Target::All))
        .await
        .unwrap();
    bus.publish_message(&outgoing(
        "ab",
        Target::Users(vec!["ann".into(), "bob".into()]),
    ))
    .await
    .unwrap();
    bus.publish_message(&outgoing("c", Target::Conn("c-1".into())))
        .await
        .unwrap();
    let published = live.wait_for(5).await;
    let seqs: Vec<u64> = published
        .iter()
        .map(|(_, p)| BusMessage::decode(p.clone()).unwrap().seq)
        .collect();
    assert_eq!(
        seqs,
        (first.seq..first.seq + 5).collect::<Vec<_>>(),
        "consecutive, once each"
    );

    let Replay::Recovered { messages, head } =
        history::replay(&*bus, "ann", &[], "a1").await.unwrap()
    else {
        panic!("a1 is in the history");
    };
    assert_eq!(ids(&messages), ["all1", "ab"]);
    assert_eq!(head, first.seq + 4);
    let Replay::Recovered { messages, .. } =
        history::replay(&*bus, "bob", &[], "a1").await.unwrap()
    else {
        panic!("any known id is a position");
    };
    assert_eq!(ids(&messages), ["b1", "all1", "ab"]);
    assert!(matches!(
        history::replay(&*bus, "ann", &[], "never-published")
            .await
            .unwrap(),
        Replay::NotRecovered
    ));
    stop.cancel();
}

/// When more than `recovery.max_messages` came after `since`, nothing is replayed.
async fn history_trimmed_past_since_is_not_recovered(bus: Arc<dyn Bus>) {
    bus.publish_message(&outgoing("t0", user("tim")))
        .await
        .unwrap();
    for i in 1..=6 {
        bus.publish_message(&outgoing(&format!("t{i}"), user("tim")))
            .await
            .unwrap();
    }
    assert!(
        matches!(history::replay(&*bus, "tim", &[], "t2").await.unwrap(), Replay::Recovered { ref messages, .. } if messages.len() == 4),
        "t2..t6 are kept: t3..t6 after t2"
    );
    assert!(
        matches!(
            history::replay(&*bus, "tim", &[], "t0").await.unwrap(),
            Replay::NotRecovered
        ),
        "after t0: t1 was trimmed: no partial replay"
    );
    assert!(
        matches!(history::replay(&*bus, "tim", &[], "t1").await.unwrap(), Replay::Recovered { ref messages, .. } if messages.len() == 5),
        "t1 is the newest trimmed: everything after it (t2..t6) is kept"
    );
}

/// A node that missed part of the bus reads it back for its users.
async fn recovery_reads_what_a_node_missed(bus: Arc<dyn Bus>) {
    let start = bus
        .publish_message(&outgoing("r0", user("ria")))
        .await
        .unwrap()
        .seq;
    bus.publish_message(&outgoing("r1", user("ria")))
        .await
        .unwrap();
    bus.publish_message(&outgoing("other", user("someone-else")))
        .await
        .unwrap();
    bus.publish_message(&outgoing("r-all", Target::All))
        .await
        .unwrap();
    let users: Vec<Arc<str>> = vec!["ria".into(), "rob".into()];
    let found = history::recover(&*bus, &users, &[], start, None)
        .await
        .unwrap();
    assert_eq!(ids(&found.messages), ["r1", "r-all"]);
    assert_eq!(found.head, start + 3);
    assert!(!found.reset && !found.lost_all && found.lost_users.is_empty());
}

#[tokio::test]
async fn redis_history_replays_exactly_what_a_user_missed() {
    history_replays_exactly_what_a_user_missed(redis_bus(&prefix()).await).await;
}

#[tokio::test]
async fn cluster_history_replays_exactly_what_a_user_missed() {
    history_replays_exactly_what_a_user_missed(cluster_bus(&prefix()).await).await;
}

#[tokio::test]
async fn local_history_replays_exactly_what_a_user_missed() {
    history_replays_exactly_what_a_user_missed(local_bus()).await;
}

#[tokio::test]
async fn redis_history_trimmed_past_since_is_not_recovered() {
    history_trimmed_past_since_is_not_recovered(redis_bus(&prefix()).await).await;
}

#[tokio::test]
async fn cluster_history_trimmed_past_since_is_not_recovered() {
    history_trimmed_past_since_is_not_recovered(cluster_bus(&prefix()).await).await;
}

#[tokio::test]
async fn local_history_trimmed_past_since_is_not_recovered() {
    history_trimmed_past_since_is_not_recovered(local_bus()).await;
}

#[tokio::test]
async fn redis_recovery_reads_what_a_node_missed() {
    recovery_reads_what_a_node_missed(redis_bus(&prefix()).await).await;
}

#[tokio::test]
async fn cluster_recovery_reads_what_a_node_missed() {
    recovery_reads_what_a_node_missed(cluster_bus(&prefix()).await).await;
}

#[tokio::test]
async fn local_recovery_reads_what_a_node_missed() {
    recovery_reads_what_a_node_missed(local_bus()).await;
}

/// A batch is numbered and published in order, each message into its streams; publishing
/// the same batch again (ingest's retry after an error) publishes nothing twice, and a
/// batch that overlaps it publishes only what is new.
async fn a_batch_is_published_in_order_and_a_retry_adds_nothing(bus: Arc<dyn Bus>) {
    let (live, stop) = subscribed(&bus).await;
    let batch = [
        outgoing("k0", user("kim")),
        outgoing("k-all", Target::All),
        outgoing("k1", Target::Users(vec!["kim".into(), "lea".into()])),
    ];
    let first = bus.publish_messages(&batch).await.unwrap();
    let seqs: Vec<u64> = first.iter().map(|p| p.seq).collect();
    assert_eq!(
        seqs,
        [seqs[0], seqs[0] + 1, seqs[0] + 2],
        "consecutive, in order"
    );
    assert!(first.iter().all(|p| !p.duplicate));
    let again = bus.publish_messages(&batch).await.unwrap();
    assert_eq!(again.iter().map(|p| p.seq).collect::<Vec<_>>(), seqs);
    assert!(
        again.iter().all(|p| p.duplicate),
        "a retry publishes nothing"
    );
    let overlap = [outgoing("k1", user("kim")), outgoing("k2", user("kim"))];
    let third = bus.publish_messages(&overlap).await.unwrap();
    assert_eq!((third[0].seq, third[0].duplicate), (seqs[2], true));
    assert_eq!((third[1].seq, third[1].duplicate), (seqs[2] + 1, false));
    let heard: Vec<String> = live
        .wait_for(4)
        .await
        .iter()
        .map(|(_, p)| BusMessage::decode(p.clone()).unwrap().header.id)
        .collect();
    assert_eq!(heard, ["k0", "k-all", "k1", "k2"], "each once, in order");
    let Replay::Recovered { messages, .. } =
        history::replay(&*bus, "lea", &[], "k0").await.unwrap()
    else {
        panic!("k0 is in the history");
    };
    assert_eq!(ids(&messages), ["k-all", "k1"]);
    stop.cancel();
}

#[tokio::test]
async fn redis_bus_publishes_a_batch_in_order_and_once() {
    a_batch_is_published_in_order_and_a_retry_adds_nothing(redis_bus(&prefix()).await).await;
}

#[tokio::test]
async fn cluster_bus_publishes_a_batch_in_order_and_once() {
    a_batch_is_published_in_order_and_a_retry_adds_nothing(cluster_bus(&prefix()).await).await;
}

#[tokio::test]
async fn local_bus_publishes_a_batch_in_order_and_once() {
    a_batch_is_published_in_order_and_a_retry_adds_nothing(local_bus()).await;
}

/// A failover to a replica that missed writes, or a crash restart, changes the server's
/// replication id: positions from before it cannot be continued exactly, since the new
/// server may give their numbers to other messages. Simulated by making the recorded epoch
/// name another replication id, which is what such a server finds.
#[tokio::test]
async fn redis_positions_from_before_a_new_epoch_are_not_recovered_exactly() {
    positions_from_before_a_new_epoch_are_not_recovered_exactly(On::Server).await;
}

#[tokio::test]
async fn cluster_positions_from_before_a_new_epoch_are_not_recovered_exactly() {
    positions_from_before_a_new_epoch_are_not_recovered_exactly(On::Cluster).await;
}

async fn positions_from_before_a_new_epoch_are_not_recovered_exactly(on: On) {
    let prefix = prefix();
    let bus = on.bus(&prefix).await;
    let first = bus
        .publish_message(&outgoing("e1", user("eda")))
        .await
        .unwrap();
    let before = bus.read_history(After::Seq(0), &[]).await.unwrap();
    assert!(
        before.epoch_start >= 1 && before.epoch_start <= first.seq,
        "{before:?}"
    );
    assert!(matches!(
        history::replay(&*bus, "eda", &[], "e1").await.unwrap(),
        Replay::Recovered { .. }
    ));

    let raw = on.raw(&prefix).await;
    raw.cmd(vec!["SET".into(), raw.key("epoch"), "0ld 1".into()])
        .await;

    let second = bus
        .publish_message(&outgoing("e2", user("eda")))
        .await
        .unwrap();
    let after = bus.read_history(After::Seq(0), &[]).await.unwrap();
    assert_eq!(
        after.epoch_start, second.seq,
        "the new epoch starts at the next number"
    );
    assert!(
        matches!(
            history::replay(&*bus, "eda", &[], "e1").await.unwrap(),
            Replay::NotRecovered
        ),
        "a since from the old epoch is not recovered"
    );
    assert!(matches!(
        history::replay(&*bus, "eda", &[], "e2").await.unwrap(),
        Replay::Recovered { .. }
    ));
    let users: Vec<Arc<str>> = vec!["eda".into()];
    let found = history::recover(&*bus, &users, &[], first.seq, Some(before.epoch_start))
        .await
        .unwrap();
    assert!(
        found.reset,
        "a node that saw the old epoch is told it may have lost messages"
    );
    assert_eq!(ids(&found.messages), ["e2"]);
    let found = history::recover(&*bus, &users, &[], second.seq, Some(after.epoch_start))
        .await
        .unwrap();
    assert!(!found.reset && found.messages.is_empty());
}

/// A client on the Redis of a bus, for looking at its keys behind its back.
struct Raw {
    client: fred::prelude::Client,
    /// The bus's key base: `<prefix>`, or `{<prefix>}` on a Redis Cluster.
    base: String,
}

impl Raw {
    /// `<base>:<rest>`.
    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.base)
    }

    /// A command, sent on a cluster to the node serving the bus's slot (every key of the
    /// bus is there; `KEYS` sees only the node it runs on).
    async fn cmd(&self, args: Vec<String>) -> fred::types::Value {
        let mut args = args.into_iter();
        let name = args.next().unwrap();
        let slot = fred::types::ClusterHash::from(self.base.as_str());
        let cmd = fred::types::CustomCommand::new(name, slot, false);
        fred::prelude::ClientLike::custom(&self.client, cmd, args.collect())
            .await
            .unwrap()
    }
}

/// Bytes Redis uses for every key of the bus (`MEMORY USAGE … SAMPLES 0`: exact, and blind
/// to what other tests do on the same server).
async fn memory_under(raw: &Raw) -> (usize, i64) {
    let keys = raw.cmd(vec!["KEYS".into(), raw.key("*")]).await;
    let fred::types::Value::Array(keys) = keys else {
        panic!("KEYS: {keys:?}");
    };
    let mut total = 0;
    for key in &keys {
        let key = key.as_string().unwrap();
        let used = raw
            .cmd(vec![
                "MEMORY".into(),
                "USAGE".into(),
                key,
                "SAMPLES".into(),
                "0".into(),
            ])
            .await;
        total += used.as_i64().unwrap_or(0);
    }
    (keys.len(), total)
}

fn big_outgoing(id: &str, users: &[String], payload_bytes: usize) -> Outgoing {
    let data = "x".repeat(payload_bytes);
    Outgoing::new(
        Header {
            id: id.into(),
            msg_type: "t".into(),
            to: Target::Users(users.to_vec()),
            ts: 1,
            ttl_ms: None,
            at_us: 0,
            collapse: None,
        },
        &format!(r#"{{"t":"msg","id":"{id}","data":"{data}"}}"#),
    )
}

/// Issue 15 (4): a message to many users costs Redis its payload once plus a small entry
/// per user, not the payload per user (which made one 151 KB record to 400 users cost
/// 66 MB); and each of them still gets it back on resume.
#[tokio::test]
async fn redis_a_message_to_many_users_stores_its_payload_once() {
    a_message_to_many_users_stores_its_payload_once(On::Server).await;
}

#[tokio::test]
async fn cluster_a_message_to_many_users_stores_its_payload_once() {
    a_message_to_many_users_stores_its_payload_once(On::Cluster).await;
}

async fn a_message_to_many_users_stores_its_payload_once(on: On) {
    const USERS: usize = 1000;
    const PAYLOAD: usize = 100 * 1024;
    let prefix = prefix();
    let bus = on.bus(&prefix).await;
    let raw = on.raw(&prefix).await;
    let users: Vec<String> = (0..USERS).map(|i| format!("user-{i:04}")).collect();
    bus.publish_message(&outgoing("before", user("nobody")))
        .await
        .unwrap();
    let (_, before) = memory_under(&raw).await;
    let msg = big_outgoing("big", &users, PAYLOAD);
    let body = msg.body().len();
    let published = bus.publish_message(&msg).await.unwrap();
    assert!(!published.duplicate);
    let (keys, after) = memory_under(&raw).await;
    let grown = (after - before) as usize;
    // The body once (with its allocator slack), and per user a list of two short entries
    // (~100 bytes in Redis 7).
    let bound = 2 * body + USERS * 256;
    eprintln!("{USERS} users, body {body} B: Redis grew by {grown} B over {keys} keys");
    assert!(
        grown <= bound,
        "{USERS} users, body {body} B: Redis grew by {grown} B over {keys} keys, more than {bound} B"
    );
    for u in [&users[0], &users[USERS / 2], &users[USERS - 1]] {
        let Replay::Recovered { messages, .. } =
            history::replay(&*bus, u, &[], "before").await.unwrap()
        else {
            panic!("{u}: `before` is in the history");
        };
        assert_eq!(ids(&messages), ["big"], "{u}");
        assert_eq!(messages[0].header.to, msg.header.to);
        assert!(
            msg.body().ends_with(messages[0].frame.as_bytes()),
            "the frame as sent"
        );
    }
    let Replay::Recovered { messages, .. } = history::replay(&*bus, "user-x", &[], "before")
        .await
        .unwrap()
    else {
        panic!("`before` is in the history");
    };
    assert!(messages.is_empty(), "not for user-x");
    let found = history::recover(
        &*bus,
        &[users[7].as_str().into()],
        &[],
        published.seq - 1,
        None,
    )
    .await
    .unwrap();
    assert_eq!(ids(&found.messages), ["big"]);
    assert!(found.lost_users.is_empty());
}

/// A message whose payload is gone from Redis (expired, evicted) while a stream still
/// points at it is a gap, reported as such: never skipped silently.
#[tokio::test]
async fn redis_a_payload_gone_from_the_history_is_a_gap() {
    a_payload_gone_from_the_history_is_a_gap(On::Server).await;
}

#[tokio::test]
async fn cluster_a_payload_gone_from_the_history_is_a_gap() {
    a_payload_gone_from_the_history_is_a_gap(On::Cluster).await;
}

async fn a_payload_gone_from_the_history_is_a_gap(on: On) {
    let prefix = prefix();
    let bus = on.bus(&prefix).await;
    let raw = on.raw(&prefix).await;
    bus.publish_message(&outgoing("g1", user("gus")))
        .await
        .unwrap();
    let lost = bus
        .publish_message(&outgoing(
            "g2",
            Target::Users(vec!["gus".into(), "gil".into()]),
        ))
        .await
        .unwrap();
    let last = bus
        .publish_message(&outgoing("g3", user("gus")))
        .await
        .unwrap();
    assert!(matches!(
        history::replay(&*bus, "gil", &[], "g1").await.unwrap(),
        Replay::Recovered { ref messages, .. } if ids(messages) == ["g2"]
    ));
    raw.cmd(vec!["DEL".into(), raw.key(&format!("b:{}", lost.seq))])
        .await;
    for u in ["gus", "gil"] {
        assert!(
            matches!(
                history::replay(&*bus, u, &[], "g1").await.unwrap(),
                Replay::NotRecovered
            ),
            "{u}: g2 is gone"
        );
    }
    assert!(matches!(
        history::replay(&*bus, "gus", &[], "g2").await.unwrap(),
        Replay::Recovered { ref messages, .. } if ids(messages) == ["g3"]
    ));
    let users: Vec<Arc<str>> = vec!["gus".into(), "gil".into(), "guy".into()];
    let found = history::recover(&*bus, &users, &[], lost.seq - 1, None)
        .await
        .unwrap();
    assert_eq!(ids(&found.messages), ["g3"]);
    assert_eq!(found.head, last.seq);
    assert_eq!(
        found.lost_users,
        [Arc::<str>::from("gus"), Arc::<str>::from("gil")]
    );
}

/// A batch that touches more history streams than one script call takes is published in
/// several calls, still in order and once, and every user's history has its messages.
async fn a_batch_to_many_users_is_published_in_order(bus: Arc<dyn Bus>) {
    let (live, stop) = subscribed(&bus).await;
    let group = |n: usize| -> Vec<String> { (0..700).map(|i| format!("g{n}-{i}")).collect() };
    let mut common = group(0);
    common.push("zoe".into());
    let batch = [
        outgoing("z0", user("zoe")),
        outgoing("z1", Target::Users(common)),
        outgoing("z2", Target::Users(group(2))),
        outgoing("z3", Target::All),
        outgoing("z4", Target::Users(vec!["zoe".into(), "g2-5".into()])),
    ];
    let first = bus.publish_messages(&batch).await.unwrap();
    let seqs: Vec<u64> = first.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, (seqs[0]..seqs[0] + 5).collect::<Vec<_>>());
    assert!(first.iter().all(|p| !p.duplicate));
    let again = bus.publish_messages(&batch).await.unwrap();
    assert!(again.iter().all(|p| p.duplicate));
    assert_eq!(again.iter().map(|p| p.seq).collect::<Vec<_>>(), seqs);
    let heard: Vec<String> = live
        .wait_for(5)
        .await
        .iter()
        .map(|(_, p)| BusMessage::decode(p.clone()).unwrap().header.id)
        .collect();
    assert_eq!(heard, ["z0", "z1", "z2", "z3", "z4"], "each once, in order");
    for (u, expected) in [
        ("zoe", vec!["z1", "z3", "z4"]),
        ("g0-699", vec!["z1", "z3"]),
        ("g2-5", vec!["z2", "z3", "z4"]),
        ("g2-699", vec!["z2", "z3"]),
    ] {
        let Replay::Recovered { messages, .. } =
            history::replay(&*bus, u, &[], "z0").await.unwrap()
        else {
            panic!("{u}: z0 is in the history");
        };
        assert_eq!(ids(&messages), expected, "{u}");
    }
    stop.cancel();
}

#[tokio::test]
async fn redis_bus_publishes_a_batch_to_many_users_in_order() {
    a_batch_to_many_users_is_published_in_order(redis_bus(&prefix()).await).await;
}

#[tokio::test]
async fn cluster_bus_publishes_a_batch_to_many_users_in_order() {
    a_batch_to_many_users_is_published_in_order(cluster_bus(&prefix()).await).await;
}

#[tokio::test]
async fn local_bus_publishes_a_batch_to_many_users_in_order() {
    a_batch_to_many_users_is_published_in_order(local_bus()).await;
}

/// A message to more users than one script call appends to is written over several calls:
/// still numbered in order, published once, and in every user's history.
#[tokio::test]
async fn redis_a_message_to_more_users_than_one_call_takes_is_published_whole() {
    a_message_to_more_users_than_one_call_takes_is_published_whole(On::Server).await;
}

#[tokio::test]
async fn cluster_a_message_to_more_users_than_one_call_takes_is_published_whole() {
    a_message_to_more_users_than_one_call_takes_is_published_whole(On::Cluster).await;
}

async fn a_message_to_more_users_than_one_call_takes_is_published_whole(on: On) {
    const USERS: usize = 2500;
    let prefix = prefix();
    let bus = on.bus(&prefix).await;
    let raw = on.raw(&prefix).await;
    let (live, stop) = subscribed(&bus).await;
    let users: Vec<String> = (0..USERS).map(|i| format!("w{i}")).collect();
    let batch = [
        outgoing("w-before", user("w0")),
        big_outgoing("w-big", &users, 1000),
        outgoing("w-after", user("w2499")),
    ];
    let first = bus.publish_messages(&batch).await.unwrap();
    let seqs: Vec<u64> = first.iter().map(|p| p.seq).collect();
    assert_eq!(seqs, [seqs[0], seqs[0] + 1, seqs[0] + 2]);
    assert!(first.iter().all(|p| !p.duplicate));
    let again = bus.publish_messages(&batch).await.unwrap();
    assert!(again.iter().all(|p| p.duplicate), "{again:?}");
    assert_eq!(again.iter().map(|p| p.seq).collect::<Vec<_>>(), seqs);
    let heard: Vec<String> = live
        .wait_for(3)
        .await
        .iter()
        .map(|(_, p)| BusMessage::decode(p.clone()).unwrap().header.id)
        .collect();
    assert_eq!(
        heard,
        ["w-before", "w-big", "w-after"],
        "each once, in order"
    );
    for (u, expected) in [
        ("w0", vec!["w-big"]),
        ("w1500", vec!["w-big"]),
        ("w2499", vec!["w-big", "w-after"]),
        ("w2500", vec![]),
    ] {
        let Replay::Recovered { messages, head } =
            history::replay(&*bus, u, &[], "w-before").await.unwrap()
        else {
            panic!("{u}: w-before is in the history");
        };
        assert_eq!(ids(&messages), expected, "{u}");
        assert_eq!(head, seqs[2]);
    }
    let pending = raw.cmd(vec!["EXISTS".into(), raw.key("pending")]).await;
    assert_eq!(pending.as_i64(), Some(0), "nothing left half written");
    stop.cancel();
}

/// While a message is half written (its publisher between two calls) nobody reads it
/// (the head stays before it) and other publishers wait; a publisher that stops for longer
/// than its lease has its message aborted by the next one (its record, not committed, is
/// published again), and streams that got its number skip it.
#[tokio::test]
async fn redis_a_half_written_message_is_not_read_and_is_aborted_after_its_lease() {
    a_half_written_message_is_not_read_and_is_aborted_after_its_lease(On::Server).await;
}

#[tokio::test]
async fn cluster_a_half_written_message_is_not_read_and_is_aborted_after_its_lease() {
    a_half_written_message_is_not_read_and_is_aborted_after_its_lease(On::Cluster).await;
}

async fn a_half_written_message_is_not_read_and_is_aborted_after_its_lease(on: On) {
    let prefix = prefix();
    let bus = on.bus(&prefix).await;
    let raw = on.raw(&prefix).await;
    let h0 = bus
        .publish_message(&outgoing("h0", user("hal")))
        .await
        .unwrap();
    // What a publisher that stopped after its first call leaves.
    let ghost = h0.seq + 1;
    raw.cmd(vec!["INCR".into(), raw.key("seq")]).await;
    let body = format!("{ghost}\n{{\"id\":\"ghost\",\"type\":\"t\",\"to\":{{\"users\":[\"hal\",\"x\"]}},\"ts\":1}}\nframe ghost");
    raw.cmd(vec![
        "SET".into(),
        raw.key(&format!("b:{ghost}")),
        body,
        "EX".into(),
        "60".into(),
    ])
    .await;
    raw.cmd(vec!["RPUSH".into(), raw.key("u:hal"), ghost.to_string()])
        .await;
    raw.cmd(vec![
        "SET".into(),
        raw.key("pending"),
        format!("{ghost} ghost"),
    ])
    .await;
    raw.cmd(vec![
        "SET".into(),
        raw.key("lease"),
        "ghost".into(),
        "PX".into(),
        "600".into(),
    ])
    .await;

    let read = bus.read_history(After::Seq(0), &[]).await.unwrap();
    assert_eq!(
        read.head, h0.seq,
        "the half-written message is not there yet"
    );
    let Replay::Recovered { messages, head } =
        history::replay(&*bus, "hal", &[], "h0").await.unwrap()
    else {
        panic!("h0 is in the history");
    };
    assert!(messages.is_empty() && head == h0.seq, "{messages:?} {head}");

    let started = std::time::Instant::now();
    let h1 = bus
        .publish_message(&outgoing("h1", user("hal")))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited for the lease: {:?}",
        started.elapsed()
    );
    assert_eq!(h1.seq, ghost + 1);
    let Replay::Recovered { messages, head } =
        history::replay(&*bus, "hal", &[], "h0").await.unwrap()
    else {
        panic!("h0 is in the history; the aborted message is not a gap");
    };
    assert_eq!(ids(&messages), ["h1"]);
    assert_eq!(head, h1.seq);
}

/// A publish of a message written in parts that failed half way (Redis blinked between two
/// calls) is retried by ingest: the retry goes on with the message's number, once.
#[tokio::test]
async fn redis_a_retried_message_written_in_parts_keeps_its_number() {
    a_retried_message_written_in_parts_keeps_its_number(On::Server).await;
}

#[tokio::test]
async fn cluster_a_retried_message_written_in_parts_keeps_its_number() {
    a_retried_message_written_in_parts_keeps_its_number(On::Cluster).await;
}

async fn a_retried_message_written_in_parts_keeps_its_number(on: On) {
    let prefix = prefix();
    let bus = on.bus(&prefix).await;
    let raw = on.raw(&prefix).await;
    let (live, stop) = subscribed(&bus).await;
    let r0 = bus
        .publish_message(&outgoing("r0", user("r5")))
        .await
        .unwrap();
    let users: Vec<String> = (0..1100).map(|i| format!("r{i}")).collect();
    let msg = big_outgoing("r-big", &users, 100);
    // What its first call left before the error: a number, the payload, and `pending`.
    let n = r0.seq + 1;
    raw.cmd(vec!["INCR".into(), raw.key("seq")]).await;
    let payload = format!("{n}\n{}", std::str::from_utf8(msg.body()).unwrap());
    raw.cmd(vec![
        "SET".into(),
        raw.key(&format!("b:{n}")),
        payload,
        "EX".into(),
        "60".into(),
    ])
    .await;
    raw.cmd(vec!["SET".into(), raw.key("pending"), format!("{n} r-big")])
        .await;
    raw.cmd(vec![
        "SET".into(),
        raw.key("lease"),
        "r-big".into(),
        "PX".into(),
        "5000".into(),
    ])
    .await;
    let started = std::time::Instant::now();
    let published = bus.publish_message(&msg).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "did not wait for its own lease"
    );
    assert_eq!((published.seq, published.duplicate), (n, false));
    let again = bus.publish_message(&msg).await.unwrap();
    assert_eq!((again.seq, again.duplicate), (n, true));
    let heard: Vec<String> = live
        .wait_for(2)
        .await
        .iter()
        .map(|(_, p)| BusMessage::decode(p.clone()).unwrap().header.id)
        .collect();
    assert_eq!(heard, ["r0", "r-big"], "published once");
    for u in ["r5", "r1099"] {
        let Replay::Recovered { messages, .. } =
            history::replay(&*bus, u, &[], "r0").await.unwrap()
        else {
            panic!("{u}: r0 is in the history");
        };
        assert_eq!(ids(&messages), ["r-big"], "{u}");
    }
    stop.cancel();
}

// ---- groups and collapse (issue 17) ----

fn collapsing(id: &str, to: Target, key: &str) -> Outgoing {
    Outgoing::new(
        Header {
            id: id.into(),
            msg_type: "t".into(),
            to,
            ts: 1,
            ttl_ms: None,
            at_us: 0,
            collapse: Some(key.into()),
        },
        &format!(r#"{{"t":"msg","id":"{id}","collapse":"{key}"}}"#),
    )
}

fn group(g: &str) -> Target {
    Target::Group(g.into())
}

/// A group message is in its group's stream: a member resuming with its groups gets it (and
/// not another group's), a member whose group stream was trimmed past `since` is not
/// recovered, and gap recovery reads group streams and names the groups it cannot fill.
async fn group_messages_resume_and_recover(bus: Arc<dyn Bus>) {
    let start = bus
        .publish_message(&outgoing("g0", user("pc-1")))
        .await
        .unwrap()
        .seq;
    bus.publish_messages(&[
        outgoing("store-1", group("store-42")),
        outgoing("other-1", group("store-43")),
        outgoing("all-1", Target::All),
        outgoing("store-2", group("store-42")),
        outgoing("mine", user("pc-1")),
    ])
    .await
    .unwrap();
    let mine: Vec<Arc<str>> = vec!["store-42".into()];
    let Replay::Recovered { messages, head } =
        history::replay(&*bus, "pc-1", &mine, "g0").await.unwrap()
    else {
        panic!("g0 is in the history");
    };
    assert_eq!(ids(&messages), ["store-1", "all-1", "store-2", "mine"]);
    assert_eq!(head, start + 5);
    let Replay::Recovered { messages, .. } =
        history::replay(&*bus, "pc-1", &[], "g0").await.unwrap()
    else {
        panic!("g0 is in the history");
    };
    assert_eq!(
        ids(&messages),
        ["all-1", "mine"],
        "not a member: not replayed"
    );

    let found = history::recover(&*bus, &["pc-1".into()], &mine, start, None)
        .await
        .unwrap();
    assert_eq!(
        ids(&found.messages),
        ["store-1", "all-1", "store-2", "mine"]
    );
    assert!(found.lost_groups.is_empty() && found.lost_users.is_empty());

    // More than max_messages (5) for the group after g0: its stream is trimmed past it.
    for i in 3..=7 {
        bus.publish_message(&outgoing(&format!("store-{i}"), group("store-42")))
            .await
            .unwrap();
    }
    assert!(
        matches!(
            history::replay(&*bus, "pc-1", &mine, "g0").await.unwrap(),
            Replay::NotRecovered
        ),
        "store-1 and store-2 were trimmed: no partial replay"
    );
    assert!(matches!(
        history::replay(&*bus, "pc-1", &[], "g0").await.unwrap(),
        Replay::Recovered { .. }
    ));
    let groups: Vec<Arc<str>> = vec!["store-43".into(), "store-42".into()];
    let found = history::recover(&*bus, &["pc-1".into()], &groups, start, None)
        .await
        .unwrap();
    assert_eq!(found.lost_groups, [Arc::<str>::from("store-42")]);
    assert!(found.lost_users.is_empty() && !found.lost_all);
    assert!(ids(&found.messages).contains(&"other-1".to_owned()));
}

/// A message with a `collapse` key replaces the earlier one with that key in each of its
/// streams: a hundred ticks take one slot of a five-slot stream, the replay is exact (the
/// latest tick, in its place in the order), a replaced message still resolves as `since`,
/// and distinct keys beyond the stream's size are still reported as trimmed.
async fn collapse_keeps_the_latest_per_key(bus: Arc<dyn Bus>) {
    bus.publish_message(&outgoing("c0", user("cat")))
        .await
        .unwrap();
    bus.publish_message(&outgoing("keep-1", user("cat")))
        .await
        .unwrap();
    // Ticks one by one and in batches (one script call holding several ticks).
    for i in 0..50 {
        bus.publish_message(&collapsing(&format!("tick-{i}"), user("cat"), "job"))
            .await
            .unwrap();
    }
    let batch: Vec<Outgoing> = (50..100)
        .map(|i| collapsing(&format!("tick-{i}"), user("cat"), "job"))
        .collect();
    bus.publish_messages(&batch).await.unwrap();
    for i in 0..10 {
        bus.publish_message(&collapsing(&format!("gt-{i}"), group("ops"), "job"))
            .await
            .unwrap();
        bus.publish_message(&collapsing(&format!("at-{i}"), Target::All, "job"))
            .await
            .unwrap();
    }
    bus.publish_message(&outgoing("keep-2", user("cat")))
        .await
        .unwrap();
    let ops: Vec<Arc<str>> = vec!["ops".into()];
    let Replay::Recovered { messages, .. } =
        history::replay(&*bus, "cat", &ops, "c0").await.unwrap()
    else {
        panic!("102 messages for cat, but the ticks take one slot of five");
    };
    assert_eq!(
        ids(&messages),
        ["keep-1", "tick-99", "gt-9", "at-9", "keep-2"],
        "the latest of each stream's key, in order"
    );
    let frame = messages[1].frame.as_str();
    assert!(frame.contains(r#""collapse":"job""#), "{frame}");
    let Replay::Recovered { messages, .. } = history::replay(&*bus, "cat", &ops, "tick-40")
        .await
        .unwrap()
    else {
        panic!("a replaced message is still a position");
    };
    assert_eq!(ids(&messages), ["tick-99", "gt-9", "at-9", "keep-2"]);
    let Replay::Recovered { messages, .. } =
        history::replay(&*bus, "cat", &[], "tick-99").await.unwrap()
    else {
        panic!("the latest tick is a position");
    };
    assert_eq!(ids(&messages), ["at-9", "keep-2"]);

    // Five distinct keys after keep-2: cat's stream (five slots) drops keep-1.. for real.
    for k in ["a", "b", "c", "d", "e"] {
        bus.publish_message(&collapsing(&format!("k-{k}"), user("cat"), k))
            .await
            .unwrap();
    }
    assert!(
        matches!(
            history::replay(&*bus, "cat", &[], "c0").await.unwrap(),
            Replay::NotRecovered
        ),
        "trimmed past c0 is still reported"
    );
    let Replay::Recovered { messages, .. } =
        history::replay(&*bus, "cat", &[], "keep-2").await.unwrap()
    else {
        panic!("nothing after keep-2 was trimmed");
    };
    assert_eq!(ids(&messages), ["k-a", "k-b", "k-c", "k-d", "k-e"]);
}

#[tokio::test]
async fn redis_group_messages_resume_and_recover() {
    group_messages_resume_and_recover(redis_bus(&prefix()).await).await;
}

#[tokio::test]
async fn cluster_group_messages_resume_and_recover() {
    group_messages_resume_and_recover(cluster_bus(&prefix()).await).await;
}

#[tokio::test]
async fn local_group_messages_resume_and_recover() {
    group_messages_resume_and_recover(local_bus()).await;
}

#[tokio::test]
async fn redis_collapse_keeps_the_latest_per_key() {
    collapse_keeps_the_latest_per_key(redis_bus(&prefix()).await).await;
}

#[tokio::test]
async fn cluster_collapse_keeps_the_latest_per_key() {
    collapse_keeps_the_latest_per_key(cluster_bus(&prefix()).await).await;
}

#[tokio::test]
async fn local_collapse_keeps_the_latest_per_key() {
    collapse_keeps_the_latest_per_key(local_bus()).await;
}

/// Redis keeps a stream's collapse keys in a hash that cannot grow without bound (keys of
/// trimmed entries are pruned), expiring with the stream; a message to more users than one
/// script call takes collapses in every user's stream too.
#[tokio::test]
async fn redis_collapse_hashes_stay_bounded_and_split_messages_collapse() {
    collapse_hashes_stay_bounded_and_split_messages_collapse(On::Server).await;
}

#[tokio::test]
async fn cluster_collapse_hashes_stay_bounded_and_split_messages_collapse() {
    collapse_hashes_stay_bounded_and_split_messages_collapse(On::Cluster).await;
}

async fn collapse_hashes_stay_bounded_and_split_messages_collapse(on: On) {
    let prefix = prefix();
    let bus = on.bus(&prefix).await;
    let raw = on.raw(&prefix).await;
    bus.publish_message(&outgoing("h0", user("hal")))
        .await
        .unwrap();
    for i in 0..200 {
        bus.publish_message(&collapsing(
            &format!("h{i}"),
            user("hal"),
            &format!("key-{i}"),
        ))
        .await
        .unwrap();
    }
    let hash = raw.key("c:u:hal");
    let len = raw.cmd(vec!["HLEN".into(), hash.clone()]).await;
    assert!(
        len.as_i64().is_some_and(|n| (5..=11).contains(&n)),
        "at most about twice the stream (5): {len:?}"
    );
    let ttl = raw.cmd(vec!["TTL".into(), hash]).await;
    assert!(ttl.as_i64().is_some_and(|t| t > 0 && t <= 60), "{ttl:?}");

    let users: Vec<String> = (0..1500).map(|i| format!("s{i}")).collect();
    bus.publish_message(&outgoing("s-before", user("s0")))
        .await
        .unwrap();
    for i in 0..3 {
        bus.publish_message(&collapsing(
            &format!("s-tick-{i}"),
            Target::Users(users.clone()),
            "job",
        ))
        .await
        .unwrap();
    }
    for u in ["s0", "s1499"] {
        let Replay::Recovered { messages, .. } =
            history::replay(&*bus, u, &[], "s-before").await.unwrap()
        else {
            panic!("{u}: s-before is in the history");
        };
        assert_eq!(ids(&messages), ["s-tick-2"], "{u}");
    }
}

// ---- Redis Cluster failover ----

/// A manual failover of the bus's shard (`CLUSTER FAILOVER`: its replica takes the slots,
/// the old primary stays up as a replica) ends the bus's shard subscription at the old
/// primary with a `sunsubscribe` push, which fred drops without a word (no reconnect, no
/// event). The bus subscribes again by itself, at the new primary: live messages come
/// again within seconds, each once and in order (what was published meanwhile is the
/// router's to recover from the history: a jump in the sequence numbers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_bus_subscribes_again_after_a_manual_failover() {
    let cluster = redis_cluster::PrivateCluster::start().await;
    let p = prefix();
    let bus: Arc<dyn Bus> = Arc::new(bus_at(&cluster.url, &p).await);
    let (live, stop) = subscribed(&bus).await;
    bus.publish_message(&outgoing("before", user("mia")))
        .await
        .unwrap();
    assert_eq!(live.wait_for(1).await.len(), 1, "heard before the failover");
    let mut failover = cluster.failover(&format!("{{{p}}}"), true);
    let promoted = failover.wait_for("FAILOVER_PROMOTED").await;
    let heard = |live: &Recorder| -> Vec<BusMessage> {
        live.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, payload)| BusMessage::decode(payload.clone()).unwrap())
            .collect()
    };
    let mut published = 0;
    let started = std::time::Instant::now();
    while heard(&live).len() < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no message came live within 10 s after {promoted} took over the bus's shard \
             ({published} published meanwhile)"
        );
        bus.publish_message(&outgoing(&format!("after-{published}"), user("mia")))
            .await
            .unwrap();
        published += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "live again {:?} after the failover ({published} published meanwhile)",
        started.elapsed()
    );
    for i in 0..20 {
        bus.publish_message(&outgoing(&format!("later-{i}"), user("mia")))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let heard = heard(&live);
    let later: Vec<String> = heard
        .iter()
        .map(|m| m.header.id.clone())
        .filter(|id| id.starts_with("later-"))
        .collect();
    assert_eq!(
        later,
        (0..20).map(|i| format!("later-{i}")).collect::<Vec<_>>(),
        "every message published once live again: heard once each, in order"
    );
    let seqs: Vec<u64> = heard.iter().map(|m| m.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "never twice, never out of order: {seqs:?}"
    );
    stop.cancel();
}

// ---- Routed mode (`bus.routing = "routed"`) ----

/// A bus in routed mode as node `node`, with `users` present on it: their presence entries
/// written in Redis as that node's presence writes them.
async fn routed_bus(on: On, prefix: &str, node: &str, users: &[&str]) -> RedisBus {
    let cfg = RedisConfig {
        url: on.url(),
        prefix: prefix.to_owned(),
        ..RedisConfig::default()
    };
    let routing = BusRouting::Routed {
        node: node.to_owned(),
    };
    let bus = RedisBus::connect_with(&cfg, &recovery(), routing, Arc::new(Metrics::new()))
        .await
        .unwrap_or_else(|e| panic!("Redis at {} is needed for this test: {e}", on.url()));
    let raw = Raw {
        client: bus.client(),
        base: bus.key_base().to_owned(),
    };
    for user in users {
        present(&raw, node, user).await;
    }
    bus
}

/// Writes a presence entry of `user` on `node` (conn `c-<node>-<user>`).
async fn present(raw: &Raw, node: &str, user: &str) {
    let conn = format!("c-{node}-{user}");
    let info = serde_json::json!({
        "user": user, "conn": conn, "node": node,
        "platform": null, "tab": null, "connected_at": 0
    });
    raw.cmd(vec![
        "HSET".into(),
        raw.key(&format!("presence:u:{user}")),
        conn,
        info.to_string(),
    ])
    .await;
}

/// Removes the presence entry [`present`] wrote.
async fn absent(raw: &Raw, node: &str, user: &str) {
    raw.cmd(vec![
        "HDEL".into(),
        raw.key(&format!("presence:u:{user}")),
        format!("c-{node}-{user}"),
    ])
    .await;
}

fn routed_dyn(bus: RedisBus) -> Arc<dyn Bus> {
    Arc::new(bus)
}

// The contract scenarios, on a routed bus whose node holds every user they watch live
// (the history-only ones need nobody present).

#[tokio::test]
async fn routed_history_replays_exactly_what_a_user_missed() {
    let bus = routed_bus(On::Server, &prefix(), "n1", &["ann", "bob"]).await;
    history_replays_exactly_what_a_user_missed(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_cluster_history_replays_exactly_what_a_user_missed() {
    let bus = routed_bus(On::Cluster, &prefix(), "n1", &["ann", "bob"]).await;
    history_replays_exactly_what_a_user_missed(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_history_trimmed_past_since_is_not_recovered() {
    let bus = routed_bus(On::Server, &prefix(), "n1", &[]).await;
    history_trimmed_past_since_is_not_recovered(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_cluster_history_trimmed_past_since_is_not_recovered() {
    let bus = routed_bus(On::Cluster, &prefix(), "n1", &[]).await;
    history_trimmed_past_since_is_not_recovered(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_recovery_reads_what_a_node_missed() {
    let bus = routed_bus(On::Server, &prefix(), "n1", &[]).await;
    recovery_reads_what_a_node_missed(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_cluster_recovery_reads_what_a_node_missed() {
    let bus = routed_bus(On::Cluster, &prefix(), "n1", &[]).await;
    recovery_reads_what_a_node_missed(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_bus_publishes_a_batch_in_order_and_once() {
    let bus = routed_bus(On::Server, &prefix(), "n1", &["kim", "lea"]).await;
    a_batch_is_published_in_order_and_a_retry_adds_nothing(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_cluster_bus_publishes_a_batch_in_order_and_once() {
    let bus = routed_bus(On::Cluster, &prefix(), "n1", &["kim", "lea"]).await;
    a_batch_is_published_in_order_and_a_retry_adds_nothing(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_bus_publishes_a_batch_to_many_users_in_order() {
    let bus = routed_bus(On::Server, &prefix(), "n1", &["zoe", "g2-5"]).await;
    a_batch_to_many_users_is_published_in_order(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_cluster_bus_publishes_a_batch_to_many_users_in_order() {
    let bus = routed_bus(On::Cluster, &prefix(), "n1", &["zoe", "g2-5"]).await;
    a_batch_to_many_users_is_published_in_order(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_group_messages_resume_and_recover() {
    let bus = routed_bus(On::Server, &prefix(), "n1", &[]).await;
    group_messages_resume_and_recover(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_cluster_group_messages_resume_and_recover() {
    let bus = routed_bus(On::Cluster, &prefix(), "n1", &[]).await;
    group_messages_resume_and_recover(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_collapse_keeps_the_latest_per_key() {
    let bus = routed_bus(On::Server, &prefix(), "n1", &[]).await;
    collapse_keeps_the_latest_per_key(routed_dyn(bus)).await;
}

#[tokio::test]
async fn routed_cluster_collapse_keeps_the_latest_per_key() {
    let bus = routed_bus(On::Cluster, &prefix(), "n1", &[]).await;
    collapse_keeps_the_latest_per_key(routed_dyn(bus)).await;
}

/// What a node heard: (channel, cluster number, channel number, id) per frame.
async fn heard(rec: &Recorder, n: usize) -> Vec<(Channel, u64, u64, String)> {
    rec.wait_for(n)
        .await
        .into_iter()
        .map(|(channel, payload)| {
            let number = fanout::bus::payload_channel_seq(&payload).expect("a channel number");
            let msg = BusMessage::decode(payload).unwrap();
            (channel, msg.seq, number, msg.header.id)
        })
        .collect()
}

/// A message for users goes to the nodes holding one of their connections, once each;
/// broadcasts, groups and `to.conn` reach every node; a user connected nowhere costs no
/// frame; each channel numbers its frames 1, 2, 3…; history reads report both counters.
async fn routed_messages_reach_the_nodes_of_their_users(on: On) {
    let p = prefix();
    let a = routed_bus(on, &p, "node-a", &["bob"]).await;
    let b = routed_bus(on, &p, "node-b", &["ann", "bob"]).await;
    let (a, b): (Arc<dyn Bus>, Arc<dyn Bus>) = (Arc::new(a), Arc::new(b));
    let stop = CancellationToken::new();
    let (heard_a, heard_b) = subscribe_two(&a, &b, &stop).await;
    let batch = [
        outgoing("for-ann", user("ann")),
        outgoing("for-bob", user("bob")),
        outgoing("for-both", Target::Users(vec!["ann".into(), "bob".into()])),
        outgoing("for-all", Target::All),
        outgoing("for-group", group("store-1")),
        outgoing("for-carl", user("carl")),
        outgoing("for-conn", Target::Conn("c-x".into())),
    ];
    let seqs: Vec<u64> = a
        .publish_messages(&batch)
        .await
        .unwrap()
        .iter()
        .map(|p| p.seq)
        .collect();
    let s = |i: usize| seqs[i];
    let node = Channel::Node;
    let bus = Channel::Bus;
    let on_a = heard(&heard_a, 5).await;
    let on_b = heard(&heard_b, 6).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        on_a,
        [
            (node, s(1), 1, "for-bob".to_owned()),
            (node, s(2), 2, "for-both".to_owned()),
            (bus, s(3), 1, "for-all".to_owned()),
            (bus, s(4), 2, "for-group".to_owned()),
            (bus, s(6), 3, "for-conn".to_owned()),
        ]
    );
    assert_eq!(
        on_b,
        [
            (node, s(0), 1, "for-ann".to_owned()),
            (node, s(1), 2, "for-bob".to_owned()),
            (node, s(2), 3, "for-both".to_owned()),
            (bus, s(3), 1, "for-all".to_owned()),
            (bus, s(4), 2, "for-group".to_owned()),
            (bus, s(6), 3, "for-conn".to_owned()),
        ]
    );
    assert_eq!(heard_a.0.lock().unwrap().len(), 5, "nothing more on A");
    assert_eq!(heard_b.0.lock().unwrap().len(), 6, "nothing more on B");
    // Each node's history reads say where its channels are, with the head.
    let read = a.read_history(After::Seq(0), &[]).await.unwrap();
    assert_eq!(read.head, s(6));
    let at = read.positions.expect("routed reads report positions");
    assert_eq!((at.bus, at.node), (3, 2));
    let at = b.read_history(After::Seq(0), &[]).await.unwrap().positions;
    assert_eq!(at.map(|p| (p.bus, p.node)), Some((3, 3)));
    // The history is the cluster's: carl's message is there for when he connects.
    let Replay::Recovered { messages, .. } =
        history::replay(&*a, "carl", &[], "for-ann").await.unwrap()
    else {
        panic!("for-ann is in the history");
    };
    assert_eq!(ids(&messages), ["for-all", "for-carl"]);
    stop.cancel();
}

#[tokio::test]
async fn routed_messages_reach_only_the_nodes_of_their_users() {
    routed_messages_reach_the_nodes_of_their_users(On::Server).await;
}

#[tokio::test]
async fn routed_cluster_messages_reach_only_the_nodes_of_their_users() {
    routed_messages_reach_the_nodes_of_their_users(On::Cluster).await;
}

/// A frame lost on a node's channel shows as a jump in that channel's numbers: the router
/// recovers the message from the history, and each connection gets every message once,
/// in order.
async fn a_gap_on_a_node_channel_is_recovered(on: On) {
    let p = prefix();
    let bus = routed_bus(on, &p, "node-b", &["ann"]).await;
    let raw = Raw {
        client: bus.client(),
        base: bus.key_base().to_owned(),
    };
    let bus: Arc<dyn Bus> = Arc::new(bus);
    let metrics = Arc::new(Metrics::new());
    let types = Arc::new(TypeRegistry::new(&TypesConfig::default()));
    let registry = Registry::new(
        Limits {
            max_connections: 10,
            max_connections_per_user: 10,
            queue_max_messages: 100,
            queue_max_bytes: 1 << 20,
        },
        metrics.clone(),
    );
    let (_registration, _conn, mut queue) =
        registry.register("ann", None, None, u64::MAX, 0).unwrap();
    let router = Router::new(
        registry.clone(),
        metrics.clone(),
        types,
        bus.clone(),
        None,
        Duration::from_secs(60),
    );
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(router.run(rx, stop.clone()));
    tokio::spawn({
        let (bus, stop) = (bus.clone(), stop.clone());
        async move { bus.subscribe(Box::new(EventSender::new(tx)), stop).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    bus.publish_message(&outgoing("m1", user("ann")))
        .await
        .unwrap();
    // A message whose frame for node-b is lost: published while ann's entry is away, and
    // node-b's counter moved on as if its frame had been sent.
    absent(&raw, "node-b", "ann").await;
    bus.publish_message(&outgoing("m2", user("ann")))
        .await
        .unwrap();
    present(&raw, "node-b", "ann").await;
    raw.cmd(vec!["INCR".into(), raw.key("nseq:node-b")]).await;
    bus.publish_message(&outgoing("m3", user("ann")))
        .await
        .unwrap();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while got.len() < 3 {
        match queue.try_recv() {
            Ok(q) => got.push(q.frame.as_str().to_owned()),
            Err(_) => tokio::time::timeout_at(deadline, queue.ready())
                .await
                .unwrap_or_else(|_| panic!("three messages within 10 s, got {got:?}")),
        }
    }
    assert_eq!(got, ["frame m1", "frame m2", "frame m3"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(queue.try_recv().is_err(), "nothing twice");
    let gaps = metrics.bus_gaps.with_label_values(&["skipped"]).get();
    assert_eq!(gaps, 1, "the jump was seen as a gap");
    stop.cancel();
}

#[tokio::test]
async fn routed_a_gap_on_a_node_channel_is_recovered() {
    a_gap_on_a_node_channel_is_recovered(On::Server).await;
}

#[tokio::test]
async fn routed_cluster_a_gap_on_a_node_channel_is_recovered() {
    a_gap_on_a_node_channel_is_recovered(On::Cluster).await;
}

//! The bus contract, checked against both implementations: the Redis bus (a real Redis at
//! `FANOUT_TEST_REDIS`) and the in-process bus. Each scenario runs on both.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fanout::bus::local::LocalBus;
use fanout::bus::redis::RedisBus;
use fanout::bus::{Bus, BusEvent, BusHandler, Channel};
use fanout::metrics::Metrics;
use tokio_util::sync::CancellationToken;

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

async fn redis_bus(prefix: &str) -> Arc<dyn Bus> {
    let url =
        std::env::var("FANOUT_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let bus = RedisBus::connect(&url, prefix, Arc::new(Metrics::new()))
        .await
        .unwrap_or_else(|e| {
            panic!("Redis at {url} is needed for this test (./scripts/test starts it): {e}")
        });
    Arc::new(bus)
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
async fn redis_bus_prefixes_keep_clusters_apart() {
    let (one, two) = (redis_bus(&prefix()).await, redis_bus(&prefix()).await);
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
    subscribe_ends_on_shutdown(Arc::new(LocalBus::default())).await;
}

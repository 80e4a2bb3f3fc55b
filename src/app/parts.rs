//! The parts of a node: every client, store and shared handle, built from [`Settings`]
//! and connected (Redis, the database, the revocation list) before any task runs.

use std::sync::Arc;

use anyhow::Context as _;

use super::budget::{file_budget, limits};
use super::embedded::consumer_settings;
use super::{migrate, open_store, Pipeline};
use crate::admin::Health;
use crate::auth::Authenticator;
use crate::bus::redis::{BusRouting, RedisBus};
use crate::bus::{local::LocalBus, Bus};
use crate::config::{mask_url_password, RedisConfig, Routing, Settings};
use crate::ingest;
use crate::kafka::{self, Producer};
use crate::kick::Kicks;
use crate::metrics::Metrics;
use crate::prefs::{Prefs, Store};
use crate::presence::{self, Presence};
use crate::receipts::{self, Receipts};
use crate::registry::Registry;
use crate::types::TypeRegistry;

/// Everything a node is made of, built and connected before any task runs.
pub(super) struct Parts {
    pub(super) settings: Arc<Settings>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) bus: Arc<dyn Bus>,
    pub(super) auth: Arc<Authenticator>,
    pub(super) producer: Producer,
    pub(super) consumer: Arc<ingest::IngestConsumer>,
    pub(super) registry: Arc<Registry>,
    pub(super) health: Arc<Health>,
    pub(super) types: Arc<TypeRegistry>,
    pub(super) store: Store,
    pub(super) prefs: Arc<Prefs>,
    pub(super) kicks: Arc<Kicks>,
    pub(super) presence: Presence,
    /// `server.max_pending_connections`, fitted into the open-file limit.
    pub(super) max_pending: usize,
    /// The reporting end of delivery receipts (off without `kafka.receipts_topic`)...
    pub(super) receipts: Receipts,
    /// ...their task, taken when the message path starts...
    pub(super) receipts_task: parking_lot::Mutex<Option<receipts::Task>>,
    /// The never-waiting producer of receipts and presence events, if either topic is set.
    pub(super) sink: Option<kafka::Sink>,
}

impl Parts {
    /// Builds every part from `settings`: the Redis bus connected from the `pipeline`
    /// runtime, the database migrated, the revocations read.
    pub(super) async fn build(
        settings: Settings,
        pipeline: &Pipeline,
        in_process_broker: bool,
    ) -> anyhow::Result<Self> {
        let settings = Arc::new(settings);
        let metrics = Arc::new(Metrics::new());
        let window = settings.recovery.window;
        let mut claims = receipts::Claims::Local(receipts::LocalClaims::new(window));
        let mut redis_client = None;
        let bus: Arc<dyn Bus> = if settings.redis.url.is_empty() {
            Arc::new(LocalBus::new(1 << 16, &settings.recovery))
        } else {
            // Connected from the pipeline runtime, where fred then runs its connection tasks.
            let (s, m) = (settings.clone(), metrics.clone());
            let bus = pipeline
                .handle
                .spawn(async move {
                    let routing = match s.bus.routing {
                        Routing::Broadcast => BusRouting::Broadcast,
                        Routing::Routed => BusRouting::Routed {
                            node: s.node.id.clone(),
                        },
                    };
                    RedisBus::connect_with(&s.redis, &s.recovery, routing, m).await
                })
                .await
                .context("the pipeline runtime stopped")?
                .with_context(|| redis_context(&settings.redis))?;
            // Claim keys under the bus's key base: on a Redis Cluster `{<prefix>}`, the one
            // slot a batch's claim script must keep all its keys in.
            claims = receipts::Claims::Redis(receipts::RedisClaims::new(
                bus.client(),
                bus.key_base(),
                window,
            ));
            redis_client = Some((bus.client(), bus.key_base().to_owned()));
            Arc::new(bus)
        };
        let auth = Arc::new(Authenticator::new(&settings.auth).map_err(anyhow::Error::msg)?);
        if auth.is_insecure() {
            tracing::warn!("auth.mode = \"insecure\": ANYONE can connect as ANY user with ?user=. Never expose this node.");
        }
        let producer = Producer::new(&settings.kafka).context("creating the Kafka producer")?;
        let consumer = ingest::consumer(
            &consumer_settings(&settings.kafka, in_process_broker),
            metrics.clone(),
        )
        .context("creating the Kafka consumer")?;
        let (max_connections, max_pending) = file_budget(&settings)?;
        let registry = Registry::new(limits(&settings, max_connections), metrics.clone());
        let health = Arc::new(Health::new(bus.clone()));
        let types = Arc::new(TypeRegistry::new(&settings.types));
        let store = open_store(&settings)?;
        migrate(&store).await?;
        let prefs = Arc::new(Prefs::new(store.clone(), types.clone(), bus.clone()));
        let kicks = Kicks::new(
            store.clone(),
            bus.clone(),
            auth.clone(),
            registry.clone(),
            metrics.clone(),
        );
        // Before any port is open: a node never accepts a token revoked before it started.
        kicks.load().await.context("reading fanout_revocations")?;
        let sink = side_sink(&settings, &metrics)?;
        let presence = build_presence(&settings, redis_client, sink.as_ref(), &metrics);
        let (receipts, receipts_task) = match &sink {
            Some(sink) if !settings.kafka.receipts_topic.is_empty() => {
                let (receipts, inbox) = Receipts::channel(metrics.clone());
                let task = receipts::Task {
                    inbox,
                    sink: sink.clone(),
                    topic: settings.kafka.receipts_topic.clone(),
                    node: settings.node.id.clone(),
                    claims,
                    directory: Some(Arc::new(presence.clone())),
                    metrics: metrics.clone(),
                };
                (receipts, Some(task))
            }
            _ => (Receipts::off(), None),
        };
        Ok(Self {
            settings,
            metrics,
            bus,
            auth,
            producer,
            consumer: Arc::new(consumer),
            registry,
            health,
            types,
            store,
            prefs,
            kicks,
            presence,
            max_pending,
            receipts,
            receipts_task: parking_lot::Mutex::new(receipts_task),
            sink,
        })
    }
}

/// The never-waiting producer for `kafka.receipts_topic` and `kafka.presence_topic`, if
/// either is set (its own librdkafka instance: they never fill the queue `ask` waits on).
fn side_sink(settings: &Settings, metrics: &Metrics) -> anyhow::Result<Option<kafka::Sink>> {
    let kafka = &settings.kafka;
    let mut failed = Vec::new();
    if !kafka.receipts_topic.is_empty() {
        let counter = metrics
            .receipts_dropped
            .with_label_values(&[crate::metrics::ReceiptDropped::ProduceFailed.label()]);
        failed.push((kafka.receipts_topic.clone(), counter));
    }
    if !kafka.presence_topic.is_empty() {
        let counter = metrics
            .presence_events
            .with_label_values(&[crate::metrics::PresenceEvent::Failed.label()]);
        failed.push((kafka.presence_topic.clone(), counter));
    }
    if failed.is_empty() {
        return Ok(None);
    }
    let sink = kafka::Sink::new(kafka, failed)
        .context("creating the Kafka producer of kafka.receipts_topic / kafka.presence_topic")?;
    Ok(Some(sink))
}

/// Presence on the Redis bus's client and under its key base (or in-process), with events
/// when `kafka.presence_topic` is set.
fn build_presence(
    settings: &Settings,
    redis_client: Option<(fred::clients::Client, String)>,
    sink: Option<&kafka::Sink>,
    metrics: &Arc<Metrics>,
) -> Presence {
    let backend = match redis_client {
        Some((client, key_base)) => presence::Backend::Redis {
            client,
            prefix: key_base,
        },
        None => presence::Backend::Local,
    };
    let topic = &settings.kafka.presence_topic;
    Presence::new(presence::Options {
        node: settings.node.id.clone(),
        backend,
        session_timeout: settings.kafka.session_timeout,
        events: sink
            .filter(|_| !topic.is_empty())
            .map(|sink| (sink.clone(), topic.clone())),
        metrics: metrics.clone(),
    })
}

/// What failed to connect to Redis, without the password and naming the TLS files.
fn redis_context(cfg: &RedisConfig) -> String {
    let mut context = format!("connecting to redis.url {}", mask_url_password(&cfg.url));
    for (key, file) in [
        ("redis.tls_ca_file", &cfg.tls_ca_file),
        ("redis.tls_cert_file", &cfg.tls_cert_file),
    ] {
        if !file.is_empty() {
            context.push_str(&format!(", {key} {file}"));
        }
    }
    context
}

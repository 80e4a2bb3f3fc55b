//! Wiring: builds every part from [`Settings`], runs the long-lived tasks on one
//! [`TaskTracker`], and shuts them down in a fixed order.
//!
//! Two runtimes: sessions and HTTP run on the main one; the message path — ingest, the
//! Redis clients, the bus subscriber and the router — on a [`Pipeline`] thread of its own.
//! A broadcast wakes thousands of sessions at once; on a shared run queue the router, and
//! every Redis reply ingest waits for, would queue up behind them.
//!
//! Shutdown order (DESIGN §8): readiness off → stop accepting → close sessions with 1012 →
//! ingest commits and leaves the group → the bus subscriber stops → exit. If any task ends
//! on its own, that is a failure: the others are stopped the same way and `run` errors.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Admin};
use crate::bus::EventSender;
use crate::config::{mask_url_password, Settings};
use crate::gateway::Gateway;
use crate::ingest::Ingest;
use crate::kafka::{self, Producer};
use crate::metrics::Listener;
use crate::prefs::Store;
use crate::router::Router;
use crate::{api, shutdown};

mod budget;
mod embedded;
mod parts;
mod serve;
mod watch;

use embedded::{print_embedded_banner, start_embedded_kafka};
use parts::Parts;
use serve::{serve, HttpLimits, HttpMetrics};
use watch::{spawn, TaskWatch};

/// The database of the embedded default, in the working directory.
pub const EMBEDDED_DATABASE: &str = "sqlite://fanout.db";

/// Opens the store (`database.url`, or the embedded SQLite file).
pub fn open_store(settings: &Settings) -> anyhow::Result<Store> {
    let url = if settings.database.url.is_empty() {
        EMBEDDED_DATABASE
    } else {
        &settings.database.url
    };
    Store::open(url, settings.database.max_connections)
        .with_context(|| format!("opening database.url {}", mask_url_password(url)))
}

/// Applies migrations, waiting up to 30 s in all for the database to come up.
pub async fn migrate(store: &Store) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut warned = false;
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_tls() => {
                return Err(e).context(
                    "invalid config key `database.url`: TLS to the database failed (check sslmode, sslrootcert, sslcert, sslkey)",
                )
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                if !std::mem::replace(&mut warned, true) {
                    tracing::warn!(error = %e, "database not ready for migrations; retrying for 30 s");
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e).context("applying database migrations"),
        }
    }
}

/// Bus events buffered between the subscriber and the router (beyond: a gap, recovered).
const BUS_EVENTS: usize = 1 << 16;

/// How long a node waits at start for the brokers to accept or refuse its TLS and SASL
/// settings, before starting anyway (readiness then waits for Kafka).
const KAFKA_START_WAIT: Duration = Duration::from_secs(10);

/// The message path's runtime: one thread, stopped (after its tasks) when dropped.
struct Pipeline {
    handle: Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pipeline {
    fn start() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building the pipeline runtime")?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fanout-pipeline".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Not a plain drop, which waits for every blocking task.
                runtime.shutdown_timeout(Duration::from_millis(200));
            })
            .context("starting the pipeline thread")?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The bound listeners of a node.
pub struct Listeners {
    pub public: TcpListener,
    pub admin: TcpListener,
}

/// Runs a node until `shutdown` is cancelled (or a part fails).
pub async fn run(
    mut settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let embedded = settings.is_embedded();
    let embedded_kafka = if settings.kafka.brokers.is_empty() {
        Some(start_embedded_kafka(&mut settings)?)
    } else {
        None
    };
    if embedded {
        print_embedded_banner(&settings, &listeners);
    }
    if embedded_kafka.is_none() {
        let kafka = settings.kafka.clone();
        tokio::task::spawn_blocking(move || kafka::check_access(&kafka, KAFKA_START_WAIT))
            .await
            .context("the Kafka start check panicked")??;
    }
    let in_process_broker = embedded_kafka.is_some();
    let result = run_node(settings, listeners, shutdown, in_process_broker).await;
    // Every Kafka client is gone by now, so none of them logs the broker's disappearance.
    drop(embedded_kafka);
    result
}

async fn run_node(
    settings: Settings,
    listeners: Listeners,
    shutdown: CancellationToken,
    in_process_broker: bool,
) -> anyhow::Result<()> {
    // Dropped last: the message path's tasks run on it until the shutdown is over.
    let pipeline = Pipeline::start()?;
    let parts = Parts::build(settings, &pipeline, in_process_broker).await?;
    let node = Tasks::default();
    node.spawn_message_path(&parts, &pipeline.handle);
    node.spawn_probes(&parts);
    node.spawn_presence(&parts);
    let gateway = node.serve_ports(&parts, listeners);
    node.tracker.close();
    tokio::select! {
        _ = shutdown.cancelled() => tracing::info!("shutting down"),
        _ = node.watch.failed.cancelled() => tracing::error!("a task failed; shutting down"),
    }
    node.shut_down(&parts, &gateway).await
}

/// The node's long-lived tasks, and the cancellations that stop them, in the order the
/// shutdown fires them: `http` (stop accepting), `drain` (sessions registering late close
/// themselves), `ingest` (commit and leave), `bus` (subscriber, router, probes, presence
/// (which then leaves: its entries are removed), admin port).
#[derive(Default)]
struct Tasks {
    tracker: TaskTracker,
    watch: TaskWatch,
    http: CancellationToken,
    drain: CancellationToken,
    ingest: CancellationToken,
    bus: CancellationToken,
}

impl Tasks {
    /// Ingest, the bus subscriber and the router, on the pipeline runtime.
    fn spawn_message_path(&self, parts: &Parts, pipeline: &Handle) {
        let ingest = Ingest {
            consumer: parts.consumer.clone(),
            bus: parts.bus.clone(),
            producer: parts.producer.clone(),
            kafka: parts.settings.kafka.clone(),
            types: parts.types.clone(),
            metrics: parts.metrics.clone(),
            receipts: parts.receipts.clone(),
        };
        let ingesting = ingest.run(self.ingest.clone());
        spawn(
            &self.tracker,
            &self.watch,
            "ingest",
            ingesting,
            Some(pipeline),
        );

        let router = Router::new(
            parts.registry.clone(),
            parts.metrics.clone(),
            parts.types.clone(),
            parts.bus.clone(),
            Some(parts.prefs.clone()),
            parts.settings.recovery.window,
        )
        .with_kicks(parts.kicks.clone())
        .with_receipts(parts.receipts.clone());
        if let Some(task) = parts.receipts_task.lock().take() {
            let reporting = task.run(self.bus.clone());
            spawn(&self.tracker, &self.watch, "receipts", reporting, None);
        }
        let (events, events_rx) = tokio::sync::mpsc::channel(BUS_EVENTS);
        let (bus, stop) = (parts.bus.clone(), self.bus.clone());
        let subscriber = async move {
            bus.subscribe(Box::new(EventSender::new(events)), stop)
                .await
                .map_err(anyhow::Error::from)
        };
        spawn(
            &self.tracker,
            &self.watch,
            "bus subscriber",
            subscriber,
            Some(pipeline),
        );
        let routing = router.run(events_rx, self.bus.clone());
        spawn(
            &self.tracker,
            &self.watch,
            "router",
            routing,
            Some(pipeline),
        );
    }

    /// Presence's writer (Redis: batched writes, heartbeats, sweeps of dead nodes); in
    /// routed mode also the watch that tells this node's connections they may have lost
    /// messages when presence had taken the node for dead.
    fn spawn_presence(&self, parts: &Parts) {
        let (presence, stop) = (parts.presence.clone(), self.bus.clone());
        let writing = async move { presence.run(stop).await.map_err(anyhow::Error::from) };
        spawn(&self.tracker, &self.watch, "presence", writing, None);
        if parts.bus.is_routed() {
            let mut lost = parts.presence.entries_lost();
            let (registry, metrics) = (parts.registry.clone(), parts.metrics.clone());
            let stop = self.bus.clone();
            let watching = async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        changed = lost.changed() => {
                            if changed.is_err() {
                                stop.cancelled().await; // presence is gone: nothing to watch
                                return Ok(());
                            }
                        }
                    }
                    let told = crate::router::tell_all_lost(&registry, &metrics);
                    tracing::warn!(
                        connections = told,
                        "presence had taken this node for dead: messages for its users may have reached no node; its connections were told messages_lost"
                    );
                }
            };
            spawn(
                &self.tracker,
                &self.watch,
                "presence loss watch",
                watching,
                None,
            );
        }
    }

    /// The readiness probes of the database and Kafka (and the revocation re-reads).
    fn spawn_probes(&self, parts: &Parts) {
        let reloading = parts.kicks.clone().run(self.bus.clone());
        spawn(&self.tracker, &self.watch, "revocations", reloading, None);
        let (h, stop) = (parts.health.clone(), self.bus.clone());
        let check = database_check(parts.store.clone());
        let database = async move { probe("database", &h.database, check, stop).await };
        spawn(&self.tracker, &self.watch, "database probe", database, None);
        let (h, stop) = (parts.health.clone(), self.bus.clone());
        let topic = parts.settings.kafka.topics[0].clone();
        let check = kafka_check(parts.producer.clone(), topic);
        let kafka = async move { probe("kafka", &h.kafka, check, stop).await };
        spawn(&self.tracker, &self.watch, "kafka probe", kafka, None);
    }

    /// The public port (`/ws` and the HTTP API) and the admin port; returns the gateway,
    /// which the shutdown drains.
    fn serve_ports(&self, parts: &Parts, listeners: Listeners) -> Arc<Gateway> {
        let settings = &parts.settings;
        let gateway = Arc::new(Gateway {
            settings: settings.clone(),
            registry: parts.registry.clone(),
            auth: parts.auth.clone(),
            metrics: parts.metrics.clone(),
            upstream: (!settings.kafka.upstream_topic.is_empty()).then(|| parts.producer.clone()),
            sessions: TaskTracker::new(),
            stopping: CancellationToken::new(),
            drain: self.drain.clone(),
            prefs: parts.prefs.clone(),
            bus: parts.bus.clone(),
            presence: parts.presence.clone(),
            receipts: parts.receipts.clone(),
        });
        let public_api = Arc::new(api::Api {
            settings: settings.clone(),
            auth: parts.auth.clone(),
            producer: parts.producer.clone(),
            prefs: parts.prefs.clone(),
            kicks: parts.kicks.clone(),
            presence: parts.presence.clone(),
        });
        let http = |listener: Listener| HttpMetrics {
            pending: parts
                .metrics
                .http_pending
                .with_label_values(&[listener.label()]),
            evicted: parts
                .metrics
                .http_evicted
                .with_label_values(&[listener.label()]),
        };
        let public_limits = HttpLimits {
            header_timeout: settings.server.header_timeout,
            body_timeout: settings.server.body_timeout,
            max_pending: parts.max_pending,
        };
        let admin_limits = HttpLimits {
            max_pending: settings.admin.max_connections,
            ..public_limits
        };
        let public = api::router(gateway.clone(), public_api);
        let serving = serve(
            listeners.public,
            public,
            public_limits,
            http(Listener::Public),
            self.http.clone(),
        );
        spawn(&self.tracker, &self.watch, "public server", serving, None);
        let admin = admin::router(Arc::new(Admin {
            metrics: parts.metrics.clone(),
            health: parts.health.clone(),
            registry: parts.registry.clone(),
            node_id: settings.node.id.clone(),
        }));
        let serving = serve(
            listeners.admin,
            admin,
            admin_limits,
            http(Listener::Admin),
            self.bus.clone(),
        );
        spawn(&self.tracker, &self.watch, "admin server", serving, None);
        gateway
    }

    /// The shutdown (DESIGN §8): readiness off, stop accepting, close the sessions in waves
    /// over `shutdown.drain`; then one deadline, `shutdown.grace`, for the rest — close
    /// handshakes, open HTTP requests, the Kafka commit and leave, the bus — with its last
    /// fifth kept for the producer's flush. Errors if a task failed.
    async fn shut_down(&self, parts: &Parts, gateway: &Gateway) -> anyhow::Result<()> {
        self.watch.ending.cancel();
        parts.health.draining.store(true, Ordering::Relaxed);
        self.http.cancel();
        shutdown::close_sessions(gateway, &self.drain, parts.settings.shutdown.drain).await;
        let grace = parts.settings.shutdown.grace;
        let end = tokio::time::Instant::now() + grace;
        self.ingest.cancel();
        self.bus.cancel();
        let stopped = async {
            gateway.sessions.wait().await;
            self.tracker.wait().await;
        };
        if tokio::time::timeout_at(end - grace / 5, stopped)
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = gateway.registry.connection_count(),
                "not everything stopped within shutdown.grace; exiting anyway"
            );
        }
        parts
            .producer
            .flush(end.saturating_duration_since(tokio::time::Instant::now()));
        if let Some(sink) = &parts.sink {
            sink.flush(end.saturating_duration_since(tokio::time::Instant::now()));
        }
        if self.watch.failed.is_cancelled() {
            anyhow::bail!("stopped after a task failed (see the log above)");
        }
        Ok(())
    }
}

/// Keeps one readiness flag current: runs `check` every 5 s (every second while failing)
/// and logs each change.
async fn probe<F, Fut>(
    what: &'static str,
    flag: &AtomicBool,
    mut check: F,
    stop: CancellationToken,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    loop {
        let ok = tokio::time::timeout(Duration::from_secs(4), check())
            .await
            .unwrap_or(false);
        if flag.swap(ok, Ordering::Relaxed) != ok {
            tracing::info!(what, reachable = ok, "reachability changed");
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(if ok { 5 } else { 1 })) => {}
        }
    }
}

/// `SELECT 1` on the store.
fn database_check(
    store: Store,
) -> impl FnMut() -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> {
    move || {
        let store = store.clone();
        Box::pin(async move { store.ping().await })
    }
}

/// A metadata request for `topic` (blocking in librdkafka, so off the runtime).
fn kafka_check(
    producer: Producer,
    topic: String,
) -> impl FnMut() -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> {
    move || {
        let (p, t) = (producer.clone(), topic.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || p.probe(&t, Duration::from_secs(3)))
                .await
                .unwrap_or(false)
        })
    }
}

//! The writer task: batched writes, heartbeats, rewrites, sweeps of dead nodes, and leaving
//! at shutdown.

use fred::interfaces::EventInterface as _;
use tokio_util::sync::CancellationToken;

use super::{Beat, Op, Store, BATCH, CODE_GONE, HEARTBEAT_PERIOD, LEAVE_WITHIN};
use crate::presence::{Change, Inner, PresenceError};

/// The writer task's state.
pub(in crate::presence) struct Writer<'a> {
    inner: &'a Inner,
    store: &'a Store,
    /// A heartbeat has succeeded: writes may start (never before this run's leftovers are
    /// gone and its heartbeat is fresh).
    beating: bool,
    /// The last write or heartbeat failed (logged once per streak).
    failing: bool,
}

impl<'a> Writer<'a> {
    pub fn new(inner: &'a Inner, store: &'a Store) -> Self {
        Self {
            inner,
            store,
            beating: false,
            failing: false,
        }
    }

    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), PresenceError> {
        // What a previous run of this node left (a crash, a SIGKILL) is gone with it.
        loop {
            let own = self.inner.node.clone();
            match self.sweep(&own, true).await {
                Ok(_) => break,
                Err(e) => self.failed("removing a previous run's entries", &e),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(HEARTBEAT_PERIOD) => {}
            }
        }
        let mut reconnects = self.store.client.reconnect_rx();
        let mut tick = tokio::time::interval(HEARTBEAT_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => self.beat().await,
                reconnected = reconnects.recv() => {
                    if reconnected.is_ok() {
                        tracing::info!("redis reconnected; writing presence again");
                        self.inner.table.lock().resync = true;
                    }
                }
                _ = self.inner.wake.notified() => {}
            }
            if self.beating {
                self.flush().await;
            }
        }
        self.leave().await;
        Ok(())
    }

    /// Logs the first failure of a streak.
    fn failed(&mut self, what: &str, e: &PresenceError) {
        self.inner.metrics.presence_write_errors.inc();
        if !std::mem::replace(&mut self.failing, true) {
            tracing::warn!(error = %e, "presence: {what} failed; retrying");
        }
    }

    fn recovered(&mut self) {
        if std::mem::replace(&mut self.failing, false) {
            tracing::info!("presence: redis writes work again");
        }
    }

    /// Heartbeats; when the node had been taken for dead, writes everything again; sweeps
    /// dead nodes.
    async fn beat(&mut self) {
        let (beat, dead) = match self.store.heartbeat().await {
            Ok(reply) => reply,
            Err(e) => return self.failed("heartbeat", &e),
        };
        if self.beating && beat != Beat::Alive {
            tracing::warn!(
                ?beat,
                "this node was taken for dead by presence; writing its connections again"
            );
            self.inner.table.lock().resync = true;
            if let Err(e) = self.resync(true).await {
                self.failed("rewriting presence", &e);
            }
            self.inner.lost.send_modify(|n| *n += 1);
        }
        self.beating = true;
        for node in dead {
            if let Err(e) = self.sweep_dead(&node).await {
                self.failed("sweeping a dead node", &e);
            }
        }
    }

    async fn sweep_dead(&mut self, node: &str) -> Result<(), PresenceError> {
        if !self.store.lock(node).await? {
            return Ok(());
        }
        let swept = self.sweep(node, false).await;
        self.store.unlock(node).await?;
        let (count, done) = swept?;
        if count > 0 || done {
            tracing::info!(node, count, "swept a dead node's connections from presence");
        }
        Ok(())
    }

    /// Removes `node`'s entries and reports each `disconnect` with 1006; how many, and
    /// whether it finished.
    async fn sweep(&self, node: &str, force: bool) -> Result<(usize, bool), PresenceError> {
        let inner = self.inner;
        let mut count = 0;
        let now = crate::clock::now_ms();
        let done = self
            .store
            .sweep(node, force, |info| {
                count += 1;
                if let Some(events) = &inner.events {
                    events.disconnect(&info, CODE_GONE, now, &inner.metrics);
                }
            })
            .await?;
        inner.metrics.presence_swept.inc_by(count as u64);
        Ok((count, done))
    }

    /// Writes what is dirty (everything, when a resync is due).
    async fn flush(&mut self) {
        loop {
            if self.inner.table.lock().resync {
                match self.resync(false).await {
                    Ok(()) => self.recovered(),
                    Err(e) => return self.failed("rewriting presence", &e),
                }
            }
            let (ops, done) = self.take_dirty();
            if !ops.is_empty() {
                match self.store.write(&ops).await {
                    Ok(()) => self.recovered(),
                    Err(e) => {
                        // Some of them may be written, some not: write everything next time.
                        self.inner.table.lock().resync = true;
                        return self.failed("writing presence", &e);
                    }
                }
            }
            if let Some(marked) = done {
                // Nothing left dirty, no resync due: every change up to `marked` is in Redis.
                self.inner.written.send_if_modified(|w| {
                    let newer = marked > *w;
                    *w = (*w).max(marked);
                    newer
                });
                return;
            }
        }
    }

    /// Up to [`BATCH`] dirty connections, as writes; and when that leaves nothing dirty
    /// (and no resync due), the number of the last change marked so far: once these
    /// writes succeed, every change up to it is in Redis.
    fn take_dirty(&self) -> (Vec<Op>, Option<u64>) {
        let mut table = self.inner.table.lock();
        if table.resync {
            // Due since the check above (`dirty` overflowed): the next flush does it.
            return (Vec::new(), None);
        }
        let conns: Vec<String> = table.dirty.keys().take(BATCH).cloned().collect();
        let mut ops = Vec::with_capacity(conns.len());
        for conn in conns {
            let change = table.dirty.remove(&conn).expect("listed above");
            match change {
                Change::Put { user } => {
                    if let Some(info) = table.find(&user, &conn) {
                        let json = serde_json::to_string(info).expect("ConnInfo serializes");
                        ops.push(Op::Put { user, conn, json });
                    }
                }
                Change::Remove { user } => ops.push(Op::Remove { user, conn }),
            }
        }
        let done = table.dirty.is_empty().then_some(table.marked);
        (ops, done)
    }

    /// Brings Redis in line with the table: removes what it holds for this node that is not
    /// live, writes every live connection. With `announce`, reports `connect` again for live
    /// connections Redis had lost (swept while this node was taken for dead).
    async fn resync(&self, announce: bool) -> Result<(), PresenceError> {
        let inner = self.inner;
        let live = {
            let mut table = inner.table.lock();
            table.dirty.clear();
            table.resync = false;
            table.all()
        };
        let result = async {
            let held = self.store.held().await?;
            let mut ops = Vec::with_capacity(held.len() + live.len());
            let live_ids: std::collections::HashSet<&str> =
                live.iter().map(|c| c.conn.as_str()).collect();
            for (conn, user) in &held {
                if !live_ids.contains(conn.as_str()) {
                    ops.push(Op::Remove {
                        user: user.clone(),
                        conn: conn.clone(),
                    });
                }
            }
            for info in &live {
                ops.push(Op::Put {
                    user: info.user.clone(),
                    conn: info.conn.clone(),
                    json: serde_json::to_string(info).expect("ConnInfo serializes"),
                });
            }
            self.store.write(&ops).await?;
            Ok::<_, PresenceError>(held)
        }
        .await;
        let held = match result {
            Ok(held) => held,
            Err(e) => {
                inner.table.lock().resync = true;
                return Err(e);
            }
        };
        inner.metrics.presence_resyncs.inc();
        if announce {
            if let Some(events) = &inner.events {
                let now = crate::clock::now_ms();
                for info in live.iter().filter(|c| !held.contains_key(&c.conn)) {
                    events.connect(info, now, &inner.metrics);
                }
            }
        }
        Ok(())
    }

    /// At shutdown: this node's entries and heartbeat are removed (its sessions reported
    /// their own disconnects).
    async fn leave(&self) {
        let store = self.store;
        let leaving = async {
            store.sweep(&self.inner.node, true, |_| {}).await?;
            store.forget().await
        };
        match tokio::time::timeout(LEAVE_WITHIN, leaving).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "presence: leaving failed"),
            Err(_) => tracing::warn!(
                "presence: leaving took too long; the entries expire with the node's heartbeat"
            ),
        }
    }
}

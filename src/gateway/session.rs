//! One WebSocket session: a `select!` loop over its timer (heartbeat, token expiry), its
//! queue and its socket. A close request (overflow, drain, limits all close through the
//! connection's handle) wakes the session as a queued frame does, and is checked first.
//!
//! Invariant: the session is the only writer of its socket and never touches the registry
//! while awaiting it; a slow client fills only its own queue and, when that overflows, is
//! closed with 4001 — it can only lose its own messages.
//!
//! No write can hold the session: every send and flush (hello and replay included) goes
//! through [`write_within`], which keeps honouring close requests and the token's expiry and
//! gives up on a write the client has not taken within `heartbeat.timeout` (it does not
//! read). Such an end drops the connection without a close frame ([`End::Dropped`]): none
//! could get through.
//!
//! Cost per wake-up (this loop runs once per delivered batch): the timer outlives an
//! iteration — made once and pinned, so a wake-up registers no timer and takes no shared
//! lock; only the queue's own wait is made anew. Queued frames are fed into tungstenite's
//! write buffer and written with one flush.
//!
//! Size: this future is most of every idle connection's memory (S1 in docs/benchmarks.md).
//! A wait holds no frame (the queue is read after the wake-up), and there is one wake-up
//! signal for frames and close requests; a test keeps its size in check.
//!
//! Generic over any `Sink + Stream` of WebSocket messages, so tests drive it with channels.

use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::{sleep_until, Instant, Sleep};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use crate::clock::now_us;
use crate::config::HeartbeatConfig;
use crate::metrics::Metrics;
use crate::protocol::{self, ClientFrame, Close};
use crate::receipts::Ticket;
use crate::registry::{ConnHandle, QueueRx};

/// Most queued frames written before one flush.
const BATCH: usize = 64;
/// How long a server-initiated close waits for the client's Close reply.
const CLOSE_HANDSHAKE: Duration = Duration::from_secs(3);
/// Consecutive unparseable frames tolerated before closing with 1008.
const MAX_BAD_FRAMES: u32 = 20;

/// How a session ended; a server-side end knows why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The client went away without a close frame.
    ClientGone,
    /// The client closed with a close frame carrying this code (1005: it carried none).
    ClientClosed(u16),
    /// The server closes: a close frame with this code and reason is sent.
    Close(Close),
    /// The server ended it while a write to the client was stuck (the client does not
    /// read): no close frame could get through, so the connection is dropped.
    Dropped(Close),
}

impl End {
    /// Why the server ended it, if it did.
    pub fn close(&self) -> Option<Close> {
        match self {
            End::ClientGone | End::ClientClosed(_) => None,
            End::Close(close) | End::Dropped(close) => Some(*close),
        }
    }

    /// The close code, if the server ended it.
    pub fn close_code(&self) -> Option<u16> {
        self.close().map(Close::code)
    }

    /// The close code whoever ended it gave: the server's, the client's, or 1006 (closed
    /// abnormally) when the connection was lost without a close frame.
    pub fn code(&self) -> u16 {
        match self {
            End::ClientGone => 1006,
            End::ClientClosed(code) => *code,
            End::Close(close) | End::Dropped(close) => close.code(),
        }
    }
}

/// Answers client frames that need more than the session itself (prefs, ask).
pub trait FrameHandler: Send + Sync {
    /// Handles one parsed frame; returns an immediate reply, if any. Slow work (producing
    /// an `ask`) is spawned and answers through `conn`'s queue.
    fn handle(&self, conn: &Arc<ConnHandle>, frame: ClientFrame<'_>) -> Option<Utf8Bytes>;
}

/// What a session needs besides its socket.
pub struct Session {
    pub conn: Arc<ConnHandle>,
    pub queue: QueueRx,
    pub hello: Utf8Bytes,
    /// `msg` frames a resuming client missed, sent right after `hello`.
    pub replay: Vec<Utf8Bytes>,
    /// Queued `msg` frames up to this bus sequence number were in `replay` (or were not
    /// for this connection): they are skipped, so nothing arrives twice.
    pub skip_through: u64,
    pub heartbeat: HeartbeatConfig,
    /// Token expiry, seconds since the epoch.
    pub token_exp: Option<u64>,
    pub max_frames_per_sec: u32,
    pub handler: Arc<dyn FrameHandler>,
    pub metrics: Arc<Metrics>,
    /// Receipt tickets of the frames fed since the last flush, marked once it succeeds
    /// (empty, allocating nothing, unless receipts are on; then its room is reused).
    pub unflushed: Vec<Arc<Ticket>>,
}

fn expiry_instant(exp: Option<u64>) -> Instant {
    let far = Instant::now() + Duration::from_secs(10 * 365 * 24 * 3600);
    let Some(exp) = exp else { return far };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Instant::now() + Duration::from_secs(exp.saturating_sub(now))
}

impl Session {
    /// Runs until the connection ends; sends the close frame when the server ends it.
    ///
    /// Not an `async fn`: that future would keep `self` and `ws` twice (as arguments and as
    /// the locals they are moved into), ~500 B more per idle connection; this `async move`
    /// block uses them where it captured them.
    #[allow(clippy::manual_async_fn)] // on purpose, as said above
    pub fn run<S>(mut self, mut ws: S) -> impl Future<Output = End>
    where
        S: Sink<Message, Error = WsError> + Stream<Item = Result<Message, WsError>> + Unpin,
    {
        async move {
            let end = self.serve(&mut ws).await;
            if let End::Close(close) = end {
                let frame = CloseFrame {
                    code: CloseCode::from(close.code()),
                    reason: close.reason().into(),
                };
                let _ = tokio::time::timeout(CLOSE_HANDSHAKE, async {
                    ws.send(Message::Close(Some(frame))).await?;
                    // Wait for the client's Close (or its end) before dropping TCP: dropping at
                    // once can reset the connection before the client has read our close code.
                    while let Some(Ok(message)) = ws.next().await {
                        if matches!(message, Message::Close(_)) {
                            break;
                        }
                    }
                    Ok::<_, WsError>(())
                })
                .await;
            } else if let End::ClientClosed(_) = end {
                // The client's Close was answered by the WebSocket layer, but only queued:
                // send it before dropping TCP, or the client sees an unclean end (1006).
                let _ = tokio::time::timeout(CLOSE_HANDSHAKE, ws.flush()).await;
            }
            let label = end.close().map_or("client", Close::label);
            self.metrics
                .connections_closed
                .with_label_values(&[label])
                .inc();
            end
        }
    }

    /// Sends `hello`, then the replay, with one flush.
    async fn greet<S>(ws: &mut S, hello: Utf8Bytes, replay: Vec<Utf8Bytes>) -> Result<(), WsError>
    where
        S: Sink<Message, Error = WsError> + Unpin,
    {
        ws.feed(Message::Text(hello)).await?;
        for frame in replay {
            ws.feed(Message::Text(frame)).await?;
        }
        ws.flush().await
    }

    /// The session's loop: greets, then selects over the timer (token expiry, silence,
    /// Pings), the queue (frames to write, close requests) and the socket (client frames),
    /// in that order of priority. Every write goes through [`write_within`].
    async fn serve<S>(&mut self, ws: &mut S) -> End
    where
        S: Sink<Message, Error = WsError> + Stream<Item = Result<Message, WsError>> + Unpin,
    {
        let HeartbeatConfig { interval, timeout } = self.heartbeat;
        let expires = expiry_instant(self.token_exp);
        let mut inbound = Inbound::new();
        let mut next_ping = inbound.last_seen + interval;
        let conn = self.conn.clone();
        // One timer for three deadlines (the token's expiry, too long a silence, the next
        // Ping): every idle connection holds it, and one is ~250 B smaller than three. A
        // frame from the client only moves `last_seen`; when the timer fires, it checks
        // what is due and is re-armed for the earliest deadline left.
        let timer = sleep_until(expires.min(inbound.last_seen + timeout).min(next_ping));
        tokio::pin!(timer);
        let limits = WriteLimits {
            expires,
            stall: timeout,
        };
        // Taken, not cloned: an idle session does not keep its hello (~300 B) around.
        let greeting = Self::greet(
            ws,
            std::mem::take(&mut self.hello),
            std::mem::take(&mut self.replay),
        );
        if let Err(end) = write_within(&conn, timer.as_mut(), &limits, pin!(greeting)).await {
            return end;
        }
        loop {
            tokio::select! {
                biased;
                _ = &mut timer => {
                    let now = Instant::now();
                    if now >= expires {
                        return End::Close(Close::TokenExpired);
                    }
                    if now >= inbound.last_seen + timeout {
                        return End::Close(Close::HeartbeatTimeout);
                    }
                    if now >= next_ping {
                        let ping = ws.send(Message::Ping(Default::default()));
                        if let Err(end) = write_within(&conn, timer.as_mut(), &limits, pin!(ping)).await {
                            return end;
                        }
                        next_ping = Instant::now() + interval;
                    }
                    timer.as_mut().reset(expires.min(inbound.last_seen + timeout).min(next_ping));
                }
                _ = self.queue.ready() => {
                    if let Some(close) = conn.closing() {
                        return End::Close(close);
                    }
                    let batch = self.write_batch(ws);
                    if let Err(end) = write_within(&conn, timer.as_mut(), &limits, pin!(batch)).await {
                        return end;
                    }
                }
                read = ws.next() => {
                    let reply = match self.on_read(read, &mut inbound) {
                        Ok(reply) => reply,
                        Err(end) => return end,
                    };
                    if let Some(reply) = reply {
                        let send = ws.send(Message::Text(reply));
                        if let Err(end) = write_within(&conn, timer.as_mut(), &limits, pin!(send)).await {
                            return end;
                        }
                    }
                }
            }
        }
    }

    /// One read from the socket: the reply it needs, if any, or how the session ends — the
    /// client left, broke the protocol (1002, 1007, 1009) or went over a limit (1008).
    fn on_read(
        &self,
        read: Option<Result<Message, WsError>>,
        inbound: &mut Inbound,
    ) -> Result<Option<Utf8Bytes>, End> {
        let message = match read {
            None => return Err(End::ClientGone),
            Some(Ok(message)) => message,
            Some(Err(WsError::Capacity(_))) => return Err(End::Close(Close::TooBig)),
            Some(Err(WsError::Utf8(_))) => return Err(End::Close(Close::InvalidPayload)),
            Some(Err(WsError::Protocol(e))) if e != ProtocolError::ResetWithoutClosingHandshake => {
                tracing::debug!(conn = %self.conn.id, error = %e, "protocol violation");
                return Err(End::Close(Close::ProtocolError));
            }
            Some(Err(e)) => {
                tracing::debug!(conn = %self.conn.id, error = %e, "socket read ended");
                return Err(End::ClientGone);
            }
        };
        if !inbound.count(self.max_frames_per_sec) {
            return Err(End::Close(Close::Policy));
        }
        let reply = match message {
            Message::Text(text) => self.on_text(&text, &mut inbound.bad_frames),
            Message::Binary(_) => {
                inbound.bad_frames += 1;
                Some(protocol::error_frame(
                    &self.metrics.client_errors,
                    "bad_frame",
                    "binary frames are not part of the protocol",
                    None,
                ))
            }
            Message::Close(frame) => {
                return Err(End::ClientClosed(frame.map_or(1005, |f| f.code.into())))
            }
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => None,
        };
        if inbound.bad_frames > MAX_BAD_FRAMES {
            return Err(End::Close(Close::Policy));
        }
        Ok(reply)
    }

    fn on_text(&self, text: &str, bad_frames: &mut u32) -> Option<Utf8Bytes> {
        match protocol::parse(text) {
            Ok(ClientFrame::Ping) => {
                *bad_frames = 0;
                Some(protocol::pong())
            }
            Ok(frame) => {
                *bad_frames = 0;
                self.handler.handle(&self.conn, frame)
            }
            Err(bad) => {
                *bad_frames += 1;
                Some(protocol::error_frame(
                    &self.metrics.client_errors,
                    "bad_frame",
                    &bad.message,
                    bad.reference.as_deref(),
                ))
            }
        }
    }

    /// Feeds what is queued (up to [`BATCH`] frames), then flushes once. Latency is taken
    /// as each frame is taken, with one clock reading for the batch (the batch is written
    /// within microseconds; an array of stamps would make every idle session's future
    /// larger). Only the frame being fed is held across an `.await`: this future is part of
    /// every connection's task (S1 in docs/benchmarks.md).
    async fn write_batch<S>(&mut self, ws: &mut S) -> Result<(), WsError>
    where
        S: Sink<Message, Error = WsError> + Unpin,
    {
        let now_us = now_us();
        let mut fed = 0;
        while fed < BATCH {
            let Ok(q) = self.queue.try_recv() else { break };
            if q.seq != 0 && q.seq <= self.skip_through {
                // Already written, flushed with the replay.
                if let Some(ticket) = q.ticket {
                    ticket.written();
                }
                continue;
            }
            if q.ts_ms != 0 {
                let latency = ((now_us / 1000) as i64 - q.ts_ms).max(0) as f64 / 1000.0;
                self.metrics.delivery_latency.observe(latency);
                let queued_us = now_us.saturating_sub(q.routed_us);
                self.metrics.stage_send.observe(queued_us as f64 / 1e6);
            }
            if let Some(ticket) = q.ticket {
                self.unflushed.push(ticket);
            }
            ws.feed(Message::Text(q.frame)).await?;
            fed += 1;
        }
        if fed == 0 {
            return Ok(());
        }
        ws.flush().await?;
        for ticket in self.unflushed.drain(..) {
            ticket.written();
        }
        Ok(())
    }
}

/// What the session has heard from its client: when last (any frame is a sign of life),
/// the frames of the current one-second window, and the bad frames in a row.
struct Inbound {
    last_seen: Instant,
    window: (Instant, u32),
    bad_frames: u32,
}

impl Inbound {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            last_seen: now,
            window: (now, 0),
            bad_frames: 0,
        }
    }

    /// Counts a frame; false if it is one more than `max_per_sec` in its second.
    fn count(&mut self, max_per_sec: u32) -> bool {
        self.last_seen = Instant::now();
        if self.window.0.elapsed() >= Duration::from_secs(1) {
            self.window = (self.last_seen, 0);
        }
        self.window.1 += 1;
        self.window.1 <= max_per_sec
    }
}

/// What bounds a write: the token's expiry, and how long a write may wait on the client.
struct WriteLimits {
    expires: Instant,
    stall: Duration,
}

/// Waits for `write` (a send or flush on the socket) without letting it hold the session:
/// a close request, the token's expiry, or the write not finishing within `stall` (the
/// client does not read) end the session instead. The fast path is one poll: only a write
/// that cannot finish at once arms `timer`, which is put back as it was afterwards.
async fn write_within<F>(
    conn: &ConnHandle,
    mut timer: Pin<&mut Sleep>,
    limits: &WriteLimits,
    mut write: Pin<&mut F>,
) -> Result<(), End>
where
    F: Future<Output = Result<(), WsError>>,
{
    if let Poll::Ready(written) = futures::poll!(write.as_mut()) {
        return written.map_err(|_| End::ClientGone);
    }
    let restore = timer.deadline();
    timer
        .as_mut()
        .reset(limits.expires.min(Instant::now() + limits.stall));
    loop {
        tokio::select! {
            biased;
            written = write.as_mut() => {
                written.map_err(|_| End::ClientGone)?;
                timer.as_mut().reset(restore);
                return Ok(());
            }
            _ = conn.woken() => if let Some(close) = conn.closing() {
                return Err(End::Dropped(close));
            },
            _ = timer.as_mut() => {
                let why = if Instant::now() >= limits.expires {
                    Close::TokenExpired
                } else {
                    Close::HeartbeatTimeout
                };
                return Err(End::Dropped(why));
            }
        }
    }
}

#[cfg(test)]
mod tests;

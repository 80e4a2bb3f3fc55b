//! The session against a fake socket (channels), with tokio's paused clock.

use super::*;
use crate::registry::{Limits, Registry};
use futures::channel::mpsc as fmpsc;

struct NoHandler;
impl FrameHandler for NoHandler {
    fn handle(&self, _: &Arc<ConnHandle>, _: ClientFrame<'_>) -> Option<Utf8Bytes> {
        Some(protocol::error("x", "y", None))
    }
}

/// A fake socket: what the session writes goes to `out`, what the test sends comes in.
/// After `room` frames it is full, as a socket whose client does not read: every write
/// waits forever.
struct Fake {
    out: fmpsc::UnboundedSender<Message>,
    inc: fmpsc::UnboundedReceiver<Result<Message, WsError>>,
    room: usize,
}
impl Sink<Message> for Fake {
    type Error = WsError;
    fn poll_ready(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), WsError>> {
        if self.room == 0 {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Ok(()))
    }
    fn start_send(mut self: std::pin::Pin<&mut Self>, item: Message) -> Result<(), WsError> {
        self.room -= 1;
        let _ = self.out.unbounded_send(item);
        Ok(())
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), WsError>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_close(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), WsError>> {
        std::task::Poll::Ready(Ok(()))
    }
}
impl Stream for Fake {
    type Item = Result<Message, WsError>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.inc.poll_next_unpin(cx)
    }
}

struct Harness {
    conn: Arc<ConnHandle>,
    out: fmpsc::UnboundedReceiver<Message>,
    send: fmpsc::UnboundedSender<Result<Message, WsError>>,
    task: tokio::task::JoinHandle<End>,
    _guard: crate::registry::Registration,
}

/// A session of user `alice` (heartbeat every 25 s, 60 s of silence allowed) and the guard
/// of its registration.
fn session(exp: Option<u64>) -> (Session, crate::registry::Registration) {
    let metrics = Arc::new(Metrics::new());
    let registry = Registry::new(Limits::small(), metrics.clone());
    let (guard, conn, queue) = registry.register("alice", None, None, 0, 0).unwrap();
    let session = Session {
        conn,
        queue,
        hello: "hello".into(),
        replay: Vec::new(),
        skip_through: 0,
        heartbeat: HeartbeatConfig {
            interval: Duration::from_secs(25),
            timeout: Duration::from_secs(60),
        },
        token_exp: exp,
        max_frames_per_sec: 100,
        handler: Arc::new(NoHandler),
        metrics,
        unflushed: Vec::new(),
    };
    (session, guard)
}

fn start(exp: Option<u64>) -> Harness {
    start_with_room(exp, usize::MAX)
}

/// A session whose socket takes `room` frames, then no more (its client stops reading).
fn start_with_room(exp: Option<u64>, room: usize) -> Harness {
    let (session, guard) = session(exp);
    let conn = session.conn.clone();
    let (out_tx, out) = fmpsc::unbounded();
    let (send, inc) = fmpsc::unbounded();
    let task = tokio::spawn(session.run(Fake {
        out: out_tx,
        inc,
        room,
    }));
    Harness {
        conn,
        out,
        send,
        task,
        _guard: guard,
    }
}

fn close_code(m: &Message) -> Option<u16> {
    match m {
        Message::Close(Some(f)) => Some(f.code.into()),
        _ => None,
    }
}

#[tokio::test(start_paused = true)]
async fn silent_client_is_pinged_then_closed_with_4000() {
    let mut h = start(None);
    assert_eq!(h.out.next().await.unwrap(), Message::Text("hello".into()));
    assert!(
        matches!(h.out.next().await.unwrap(), Message::Ping(_)),
        "ping after 25 s"
    );
    assert!(
        matches!(h.out.next().await.unwrap(), Message::Ping(_)),
        "ping after 50 s"
    );
    let close = h.out.next().await.unwrap();
    assert_eq!(close_code(&close), Some(4000));
    assert_eq!(h.task.await.unwrap().close_code(), Some(4000));
}

#[tokio::test(start_paused = true)]
async fn a_pong_keeps_the_connection_alive() {
    let mut h = start(None);
    h.out.next().await.unwrap();
    for _ in 0..5 {
        assert!(matches!(h.out.next().await.unwrap(), Message::Ping(_)));
        h.send
            .unbounded_send(Ok(Message::Pong(Default::default())))
            .unwrap();
    }
    assert!(!h.task.is_finished());
}

#[tokio::test(start_paused = true)]
async fn token_expiry_closes_with_4003() {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 10;
    let mut h = start(Some(exp));
    h.out.next().await.unwrap();
    assert_eq!(close_code(&h.out.next().await.unwrap()), Some(4003));
}

/// The session's future is most of an idle connection's memory: 1264 B over an in-memory
/// stream (its history: docs/benchmarks.md, "A wait holds no frame, one wake-up signal").
#[test]
fn the_session_future_stays_small() {
    type Ws = tokio_tungstenite::WebSocketStream<tokio::io::DuplexStream>;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (session, _guard) = session(None);
    let (io, _peer) = tokio::io::duplex(64);
    let ws = rt.block_on(Ws::from_raw_socket(
        io,
        tokio_tungstenite::tungstenite::protocol::Role::Server,
        None,
    ));
    let stream = std::mem::size_of::<Ws>();
    let future = session.run(ws);
    let size = std::mem::size_of_val(&future);
    assert!(
        size <= stream + 1000,
        "the session future is {size} B ({stream} B of it the stream): it grew; see S1"
    );
}

#[tokio::test]
async fn queued_frames_are_written_and_bad_frames_answered() {
    let mut h = start(None);
    h.out.next().await.unwrap();
    h.conn
        .push_msg("one".into(), 1, crate::clock::now_ms(), now_us(), None)
        .unwrap();
    h.conn.push("two".into()).unwrap();
    assert_eq!(h.out.next().await.unwrap(), Message::Text("one".into()));
    assert_eq!(h.out.next().await.unwrap(), Message::Text("two".into()));
    h.send
        .unbounded_send(Ok(Message::Text("garbage".into())))
        .unwrap();
    let Message::Text(reply) = h.out.next().await.unwrap() else {
        panic!()
    };
    assert!(reply.as_str().contains("bad_frame"));
    h.send
        .unbounded_send(Ok(Message::Text(r#"{"t":"ping"}"#.into())))
        .unwrap();
    assert_eq!(h.out.next().await.unwrap(), Message::Text(protocol::pong()));
    h.conn.close(Close::TooSlow);
    assert_eq!(close_code(&h.out.next().await.unwrap()), Some(4001));
}

/// A client that keeps sending frames that need a reply but never reads: once its socket is
/// full, the reply waits; the session must still end within `heartbeat.timeout` (60 s),
/// though the client's frames keep its silence timer from firing.
#[tokio::test(start_paused = true)]
async fn a_client_that_sends_but_never_reads_is_dropped_within_the_heartbeat_timeout() {
    let mut h = start_with_room(None, 1);
    assert_eq!(h.out.next().await.unwrap(), Message::Text("hello".into()));
    let started = Instant::now();
    let pings = h.send.clone();
    tokio::spawn(async move {
        while pings
            .unbounded_send(Ok(Message::Text(r#"{"t":"ping"}"#.into())))
            .is_ok()
        {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
    let end = tokio::time::timeout(Duration::from_secs(600), &mut h.task)
        .await
        .expect("the session is stuck in a write")
        .unwrap();
    assert_eq!(end, End::Dropped(Close::HeartbeatTimeout));
    assert!(
        started.elapsed() <= Duration::from_secs(61),
        "{:?}",
        started.elapsed()
    );
}

/// A close request (here a queue overflow's 4001) ends a session stuck in a write at once.
#[tokio::test(start_paused = true)]
async fn a_close_request_ends_a_session_stuck_in_a_write() {
    let mut h = start_with_room(None, 1);
    h.out.next().await.unwrap();
    h.send
        .unbounded_send(Ok(Message::Text(r#"{"t":"ping"}"#.into())))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!h.task.is_finished(), "waiting on the full socket");
    h.conn.close(Close::TooSlow);
    let end = tokio::time::timeout(Duration::from_secs(1), &mut h.task)
        .await
        .expect("the close request was not seen")
        .unwrap();
    assert_eq!(end, End::Dropped(Close::TooSlow));
}

/// The token's expiry ends a session stuck in a write (the Ping it owes, here).
#[tokio::test(start_paused = true)]
async fn token_expiry_ends_a_session_stuck_in_a_write() {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 40;
    let mut h = start_with_room(Some(exp), 1);
    h.out.next().await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(50), &mut h.task)
        .await
        .expect("expiry was not seen")
        .unwrap();
    assert_eq!(end, End::Dropped(Close::TokenExpired));
}

/// RFC 6455: invalid UTF-8 in a text frame fails the connection with 1007, any other
/// protocol violation with 1002; both get a close frame, not a dropped socket.
#[tokio::test(start_paused = true)]
async fn protocol_violations_are_answered_with_their_close_codes() {
    use tokio_tungstenite::tungstenite::error::ProtocolError;
    for (error, code) in [
        (WsError::Utf8("invalid utf-8".into()), 1007),
        (WsError::Protocol(ProtocolError::NonZeroReservedBits), 1002),
        (WsError::Protocol(ProtocolError::ControlFrameTooBig), 1002),
    ] {
        let mut h = start(None);
        h.out.next().await.unwrap();
        h.send.unbounded_send(Err(error)).unwrap();
        assert_eq!(close_code(&h.out.next().await.unwrap()), Some(code));
        assert_eq!(h.task.await.unwrap().close_code(), Some(code));
    }
}

/// A receipt ticket queued with a frame to alice, and the receipts it reports.
fn ticket() -> (Arc<Ticket>, crate::receipts::Inbox) {
    use crate::receipts::{MsgRef, Receipts};
    let (receipts, inbox) = Receipts::channel(Arc::new(Metrics::new()));
    let header = crate::bus::Header {
        id: "m1".into(),
        msg_type: "t".into(),
        to: crate::envelope::Target::All,
        ts: 0,
        ttl_ms: None,
        at_us: 0,
        collapse: None,
    };
    let ticket = receipts.ticket(&MsgRef::of(&header), &Arc::from("alice"));
    (ticket.unwrap(), inbox)
}

/// `delivered` means written: the session marks a frame's ticket once it is flushed.
#[tokio::test]
async fn a_written_frame_reports_its_receipt() {
    let mut h = start(None);
    h.out.next().await.unwrap();
    let (ticket, mut inbox) = ticket();
    h.conn
        .push_msg("one".into(), 1, 0, now_us(), Some(ticket))
        .unwrap();
    assert_eq!(h.out.next().await.unwrap(), Message::Text("one".into()));
    let mut reported = Vec::new();
    for _ in 0..100 {
        reported = inbox.summaries();
        if !reported.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(reported, ["delivered m1 alice 1"]);
}

/// A frame the client never took (its socket full, the connection then closed) is not
/// reported delivered.
#[tokio::test(start_paused = true)]
async fn a_frame_never_written_reports_nothing() {
    let mut h = start_with_room(None, 1);
    h.out.next().await.unwrap();
    let (ticket, mut inbox) = ticket();
    h.conn
        .push_msg("one".into(), 1, 0, now_us(), Some(ticket))
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!h.task.is_finished(), "waiting on the full socket");
    h.conn.close(Close::TooSlow);
    let end = (&mut h.task).await.unwrap();
    assert_eq!(end, End::Dropped(Close::TooSlow));
    drop(h);
    assert!(inbox.summaries().is_empty());
}

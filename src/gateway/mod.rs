//! The gateway: `GET /ws` — checks before the upgrade (origin, capacity, token), the
//! WebSocket handshake on tokio-tungstenite, and one [`session::Session`] per connection.
//!
//! Every refusal before the upgrade is an HTTP status with a JSON body; a refusal after it
//! (per-user limit) is a close code. Neither touches any other connection.

mod frames;
pub mod origin;
mod resume;
pub mod session;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{self, Authenticator, Identity};
use crate::bus::Bus;
use crate::config::Settings;
use crate::envelope::Platform;
use crate::http::json_error;
use crate::kafka::Producer;
use crate::metrics::{Ask, Metrics};
use crate::prefs::Prefs;
use crate::presence::{ConnInfo, Presence, Presented};
use crate::protocol::{self, ClientFrame, Close, Hello};
use crate::registry::{ConnHandle, QueueRx, RegisterError, Registration, Registry};
use session::{FrameHandler, Session};

/// Read buffer per connection: small, since clients send little (DESIGN §9). tungstenite
/// allocates and zero-fills all of it for every connection; a larger frame (up to
/// `server.max_frame_bytes`) grows it as needed, read 512 bytes at a time.
const READ_BUFFER: usize = 512;

/// Routed mode: how long a new connection waits for its presence entry to be in Redis
/// before it reads its history and says `hello` (else it is closed with 1011).
const PRESENCE_WRITE_WITHIN: std::time::Duration = std::time::Duration::from_secs(3);

/// tungstenite writes its buffered frames once they pass this many bytes (or at a flush):
/// a session's batch of queued frames goes out in a few writes, not one per frame. A
/// connection that has written a batch keeps up to this much buffer capacity.
const WRITE_BUFFER: usize = 8 * 1024;

/// Shared state of the WebSocket endpoint.
pub struct Gateway {
    pub settings: Arc<Settings>,
    pub registry: Arc<Registry>,
    pub auth: Arc<Authenticator>,
    pub metrics: Arc<Metrics>,
    /// Produces `ask` frames upstream; `None` when `kafka.upstream_topic` is empty.
    pub upstream: Option<Producer>,
    /// Sessions, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// Cancelled when the node starts draining: new upgrades are refused with 503.
    pub stopping: CancellationToken,
    /// Cancelled at the end of a drain: a session registered after that closes with 1012
    /// at once (the others were closed through the registry).
    pub drain: CancellationToken,
    /// Preferences: loaded for a user's first connection here, changed by `prefs.set`.
    pub prefs: Arc<Prefs>,
    /// The bus, for the history a resuming connection replays.
    pub bus: Arc<dyn Bus>,
    /// Client `ack`s become `acked` receipts (off unless `kafka.receipts_topic` is set).
    pub receipts: crate::receipts::Receipts,
    /// The cluster's presence: told of each connection after its handshake and at its end.
    pub presence: Presence,
}

fn refuse(metrics: &Metrics, status: StatusCode, code: &str, message: &str) -> Response {
    metrics
        .upgrades_refused
        .with_label_values(&[status.as_str()])
        .inc();
    json_error(status, code, message)
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(header::CONNECTION, "upgrade")
        && has_token(header::UPGRADE, "websocket")
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13")
        && headers.contains_key(header::SEC_WEBSOCKET_KEY)
}

/// `GET /ws`: admission ([`admit`]), then the `101 Switching Protocols`; the connection's
/// task ([`Gateway::connection`]) takes over once hyper hands the socket over.
pub async fn upgrade(
    State(gw): State<Arc<Gateway>>,
    Query(query): Query<HashMap<String, String>>,
    mut req: Request,
) -> Response {
    let connect = match admit(&gw, req.headers(), &query).await {
        Ok(connect) => connect,
        Err(refusal) => return refusal,
    };
    let headers = req.headers();
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .expect("checked by admit")
        .as_bytes();
    let accept = derive_accept_key(key);
    let offered_v1 = auth::offered_protocols(headers).any(|p| p == auth::SUBPROTOCOL);
    let on_upgrade = hyper::upgrade::on(&mut req);
    // Boxed: the task's future keeps room for what it captured as long as the connection
    // lives, and `Connect` is needed only until the session starts.
    gw.sessions
        .spawn(gw.clone().connection(on_upgrade, Box::new(connect)));
    switching_protocols(accept, offered_v1)
}

/// The checks before the upgrade, in order: a WebSocket upgrade at all, not draining, the
/// browser's origin, room on the node, the token, the platform, the user's preferences.
/// A refusal is an HTTP status with the JSON error body, counted by status.
async fn admit(
    gw: &Gateway,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<Connect, Response> {
    let refusal = |status, code: &str, message: &str| refuse(&gw.metrics, status, code, message);
    if !is_websocket_upgrade(headers) {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            "not_websocket",
            "GET /ws needs a WebSocket upgrade (version 13)",
        ));
    }
    if gw.stopping.is_cancelled() {
        return Err(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "this node is shutting down",
        ));
    }
    if !origin::permits(&gw.settings.server.allowed_origins, headers) {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            origin::REFUSED_CODE,
            origin::REFUSED_MESSAGE,
        ));
    }
    if gw.registry.is_full() {
        return Err(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "this node is at its connection limit",
        ));
    }
    let identity = gw
        .auth
        .authenticate_upgrade(headers, query)
        .map_err(|e| refusal(e.status(), e.code(), &e.to_string()))?;
    let platform = match (identity.platform, query.get("platform")) {
        (Some(p), _) => Some(p),
        (None, None) => None,
        (None, Some(p)) => Some(Platform::parse(p).ok_or_else(|| {
            refusal(
                StatusCode::BAD_REQUEST,
                "bad_platform",
                "platform must be h5, ios or android",
            )
        })?),
    };
    // A user's first connection here needs their preferences: without them we would
    // deliver what they switched off, so refuse rather than guess.
    let (bits, version) = match gw.registry.user_prefs(&identity.user) {
        Some(prefs) => (prefs.get(), prefs.version()),
        None => gw.prefs.load_bits(&identity.user).await.map_err(|e| {
            tracing::warn!(user = %identity.user, error = %e, "preferences unavailable; connection refused");
            refusal(
                StatusCode::SERVICE_UNAVAILABLE,
                "preferences_unavailable",
                "preferences cannot be loaded now; retry with backoff",
            )
        })?,
    };
    Ok(Connect {
        identity,
        bits,
        version,
        platform,
        tab: query.get("tab").cloned(),
        since: query.get("since").cloned(),
    })
}

/// The `101 Switching Protocols` answer, naming `fanout.v1` when the client offered it.
fn switching_protocols(accept: String, offered_v1: bool) -> Response {
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, accept);
    if offered_v1 {
        response = response.header(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(auth::SUBPROTOCOL),
        );
    }
    response
        .body(Body::empty())
        .expect("valid response")
        .into_response()
}

/// What the client asked for when it connected.
struct Connect {
    identity: Identity,
    /// The user's preferences as read, and their version.
    bits: u64,
    version: i64,
    platform: Option<Platform>,
    tab: Option<String>,
    since: Option<String>,
}

/// The server side of an upgraded connection.
type Ws = WebSocketStream<TokioIo<Upgraded>>;

impl Gateway {
    /// One connection's task: the upgrade and registration ([`Self::open`]), then its
    /// session.
    ///
    /// This future lives as long as the connection, so its size counts per idle connection
    /// (S1 in docs/benchmarks.md). Hence a function returning an `async move` block rather
    /// than an `async fn` (whose future keeps its arguments twice: as captured, and as the
    /// locals they are moved into), small captures, and the setup in a future of its own
    /// whose locals are gone once the session runs.
    #[allow(clippy::manual_async_fn)] // on purpose, as said above
    fn connection(
        self: Arc<Self>,
        on_upgrade: OnUpgrade,
        connect: Box<Connect>,
    ) -> impl std::future::Future<Output = ()> + Send {
        async move {
            let Some((session, ws, _registration, mut presented)) =
                self.open(on_upgrade, connect).await
            else {
                return;
            };
            let end = session.run(ws).await;
            presented.code = end.code();
            tracing::debug!(conn = %presented.conn, user = %presented.user, ?end, "session ended");
        }
    }

    /// Completes the upgrade, registers the connection, announces it to presence, reads
    /// what a resuming client missed and renders `hello`: everything the session needs, or
    /// `None` when the connection was refused (close 1013) or went away.
    ///
    /// In routed mode the presence entry is in Redis before the history is read: a
    /// message published after that write reaches this node (and the connection,
    /// registered before it), one published before is in the history read.
    async fn open(
        self: &Arc<Self>,
        on_upgrade: OnUpgrade,
        connect: Box<Connect>,
    ) -> Option<(Session, Ws, Registration, Presented)> {
        let io = match on_upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return None;
            }
        };
        let limit = self.settings.server.max_frame_bytes;
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(WRITE_BUFFER)
            .max_message_size(Some(limit))
            .max_frame_size(Some(limit));
        let mut ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
        let Connect {
            identity,
            bits,
            version,
            platform,
            tab,
            since,
        } = *connect;
        let registered = self.registry.register_in(
            &identity.user,
            platform,
            tab,
            &identity.groups,
            bits,
            version,
        );
        let (registration, conn, queue) = match registered {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(user = %identity.user, error = %e, "connection refused after upgrade");
                self.refuse_after_upgrade(&mut ws, e).await;
                return None;
            }
        };
        self.metrics.connections_opened.inc();
        if self.drain.is_cancelled() {
            conn.close(Close::Draining); // registered after the drain went through the registry
        }
        if !self.auth.is_insecure()
            && self
                .auth
                .revocations()
                .refuses(&identity.user, identity.issued_at)
        {
            conn.close(Close::TokenRevoked); // revoked after admission, before registering
        }
        let presented = self.presence.present(
            ConnInfo {
                user: conn.user.to_string(),
                conn: conn.id.to_string(),
                node: self.settings.node.id.clone(),
                platform: conn.platform,
                tab: conn.tab.as_deref().map(str::to_owned),
                connected_at: crate::clock::now_ms(),
            },
            conn.user.clone(),
            conn.id.clone(),
        );
        if self.bus.is_routed()
            && !self
                .presence
                .written(presented.mark, PRESENCE_WRITE_WITHIN)
                .await
        {
            tracing::warn!(conn = %conn.id, user = %conn.user, "presence entry not written in time; closing 1011 (routed mode needs it to deliver)");
            conn.close(Close::Unavailable);
        }
        let session = self
            .session(conn, queue, identity.exp, since.as_deref())
            .await;
        Some((session, ws, registration, presented))
    }

    /// Closes a connection the registry refused with 1013 (waiting at most a second for the
    /// close frame to go out), and counts it.
    async fn refuse_after_upgrade(&self, ws: &mut Ws, refused: RegisterError) {
        let close = match refused {
            RegisterError::NodeFull => Close::NodeFull,
            RegisterError::UserFull => Close::UserFull,
        };
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: close.code().into(),
            reason: close.reason().into(),
        };
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(1), ws.close(Some(frame))).await;
        self.metrics
            .connections_closed
            .with_label_values(&[close.label()])
            .inc();
    }

    /// The session of a registered connection: the replay of what a resuming client missed
    /// (read after registering, so live messages queue up meanwhile; the session skips
    /// those the replay covers) and its `hello`.
    async fn session(
        self: &Arc<Self>,
        conn: Arc<ConnHandle>,
        queue: QueueRx,
        token_exp: Option<u64>,
        since: Option<&str>,
    ) -> Session {
        let (resume, replay, skip_through) = match since {
            Some(since) => {
                let r = self.resume(&conn, since).await;
                (Some(r.resume), r.frames, r.skip_through)
            }
            None => (None, Vec::new(), 0),
        };
        let prefs = self.prefs.types.to_map(conn.prefs.get());
        let hello = Hello {
            conn: &conn.id,
            user: &conn.user,
            node: &self.settings.node.id,
            heartbeat_ms: self.settings.heartbeat.interval.as_millis() as u64,
            prefs: &prefs,
            resume,
        }
        .render();
        Session {
            conn,
            queue,
            hello,
            replay,
            skip_through,
            heartbeat: self.settings.heartbeat.clone(),
            token_exp,
            max_frames_per_sec: self.settings.server.max_frames_per_sec,
            handler: self.clone(),
            metrics: self.metrics.clone(),
            unflushed: Vec::new(),
        }
    }
}

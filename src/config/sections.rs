//! The configuration sections: one struct per `[section]`, each field's `///` comment
//! being its reference documentation (`docs/configuration.md`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `[node]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Name of this node, shown to clients in `hello.node` and in logs/metrics.
    /// Defaults to the host name (the pod name on Kubernetes).
    pub id: String,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let id = std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "fanout-0".to_owned());
        Self { id }
    }
}

/// `[server]`: the public port (WebSocket and HTTP API).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the public listener (`/ws`, `/v1/...`).
    pub listen: SocketAddr,
    /// Serve the demo page at `/`.
    pub demo_page: bool,
    /// Browser origins allowed to open `/ws` and send `POST`/`PUT` to the HTTP API
    /// (`https://app.example.com`; `http://localhost:*` for any port). Empty: any. The
    /// embedded default lists the loopback origins (`config::EMBEDDED_ALLOWED_ORIGINS`).
    pub allowed_origins: Vec<String>,
    /// Most open WebSocket connections on this node; further upgrades get HTTP 503.
    pub max_connections: usize,
    /// Most connections of one user on this node; the newest beyond it is closed with 1013.
    pub max_connections_per_user: usize,
    /// Largest client frame accepted, in bytes; larger closes with 1009.
    pub max_frame_bytes: usize,
    /// Most client frames per second per connection; more closes with 1008.
    pub max_frames_per_sec: u32,
    /// Most messages waiting in one connection's outbound queue; more closes it with 4001.
    pub queue_max_messages: usize,
    /// Most bytes waiting in one connection's outbound queue; more closes it with 4001.
    pub queue_max_bytes: usize,
    /// Time a client has to send a request's head (request line and headers), counted from
    /// when the server waits for it: after the connection opens, and after each response on
    /// a kept-alive connection. Late: the connection is closed.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a client has to send a request's body once its head arrived. Late: HTTP 408.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// Most connections open on the public port that are not (yet) WebSocket sessions:
    /// HTTP requests, kept-alive connections, upgrades under way. At the limit, a new one
    /// closes the oldest of them.
    pub max_pending_connections: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".parse().expect("literal address"),
            demo_page: false,
            allowed_origins: Vec::new(),
            max_connections: 100_000,
            max_connections_per_user: 32,
            max_frame_bytes: 64 * 1024,
            max_frames_per_sec: 50,
            queue_max_messages: 1024,
            queue_max_bytes: 1 << 20,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            max_pending_connections: 2048,
        }
    }
}

/// `[admin]`: the operator port (metrics, probes, stats).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`, `/v1/stats`).
    pub listen: SocketAddr,
    /// Most open connections on the admin port (probes, scrapes, stats); at the limit, a new
    /// one closes the oldest. `server.header_timeout` and `server.body_timeout` apply here too.
    pub max_connections: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9090".parse().expect("literal address"),
            max_connections: 64,
        }
    }
}

/// Where a new consumer group starts reading a partition that has no committed offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OffsetReset {
    Earliest,
    Latest,
}

/// `[kafka]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list (librdkafka `bootstrap.servers`).
    /// Empty: the embedded default's in-process broker.
    pub brokers: String,
    /// Topics whose records are pushed to clients.
    pub topics: Vec<String>,
    /// Consumer group shared by all fanout nodes of one cluster.
    pub group_id: String,
    /// Topic that client `ask` frames are produced to. Empty: `ask` answers `error`.
    pub upstream_topic: String,
    /// Topic that rejected records are copied to. Empty: rejected records are only counted.
    pub dead_letter_topic: String,
    /// Topic that delivery receipts are produced to (JSON, keyed by user id: `delivered`
    /// per node, or one `offline`, `filtered` or `expired`; `acked` for client acks), for
    /// messages to `to.user` / `to.users`. Empty: no receipts.
    pub receipts_topic: String,
    /// Topic that connect and disconnect events are produced to (docs/presence.md), keyed by
    /// user id. Empty: no events.
    pub presence_topic: String,
    /// Where the group starts on a partition with no committed offset. `earliest` never
    /// skips a record produced while the group was forming; `ttl_ms` keeps old ones away.
    pub auto_offset_reset: OffsetReset,
    /// How long the group waits for a silent node before moving its partitions away. Also
    /// sets presence's dead bound (this + 5 s, docs/presence.md).
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Largest record value accepted; a larger one is rejected with reason `too_large`.
    pub max_record_bytes: usize,
    /// How the brokers are reached: `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: SecurityProtocol,
    /// With `sasl_*`: `PLAIN`, `SCRAM-SHA-256`, `SCRAM-SHA-512` or `OAUTHBEARER` (OIDC).
    pub sasl_mechanism: Option<SaslMechanism>,
    /// SASL user name; with `OAUTHBEARER`, the OIDC client id.
    pub sasl_username: String,
    /// SASL password; with `OAUTHBEARER`, the OIDC client secret. Secret.
    pub sasl_password: String,
    /// With `OAUTHBEARER`: the OIDC token endpoint (client credentials grant).
    pub sasl_oauthbearer_token_endpoint_url: String,
    /// With `OAUTHBEARER`: the scope asked for, if the provider wants one.
    pub sasl_oauthbearer_scope: String,
    /// With `ssl`/`sasl_ssl`: PEM file of the CA(s) that signed the brokers' certificates.
    /// Empty: the system's trust store.
    pub ssl_ca_location: String,
    /// With `ssl`/`sasl_ssl`: PEM client certificate, for brokers that require one (mTLS).
    pub ssl_certificate_location: String,
    /// With `ssl_certificate_location`: its PEM private key.
    pub ssl_key_location: String,
    /// Password of an encrypted `ssl_key_location`. Secret.
    pub ssl_key_password: String,
    /// Extra librdkafka properties (e.g. `"client.id" = "fanout"`), TOML only. Not for the
    /// properties the keys above set.
    pub options: BTreeMap<String, String>,
}

/// `kafka.security_protocol`: librdkafka's `security.protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    /// The value of librdkafka's `security.protocol`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }

    /// True for `ssl` and `sasl_ssl`.
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Ssl | Self::SaslSsl)
    }

    /// True for `sasl_plaintext` and `sasl_ssl`.
    pub fn uses_sasl(self) -> bool {
        matches!(self, Self::SaslPlaintext | Self::SaslSsl)
    }
}

/// `kafka.sasl_mechanism`: librdkafka's `sasl.mechanism`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
    #[serde(rename = "OAUTHBEARER")]
    OauthBearer,
}

impl SaslMechanism {
    /// The value of librdkafka's `sasl.mechanism`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plain => "PLAIN",
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
            Self::OauthBearer => "OAUTHBEARER",
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            topics: vec!["fanout.messages".to_owned()],
            group_id: "fanout".to_owned(),
            upstream_topic: String::new(),
            dead_letter_topic: String::new(),
            receipts_topic: String::new(),
            presence_topic: String::new(),
            auto_offset_reset: OffsetReset::Earliest,
            session_timeout: Duration::from_secs(10),
            max_record_bytes: 256 * 1024,
            security_protocol: SecurityProtocol::Plaintext,
            sasl_mechanism: None,
            sasl_username: String::new(),
            sasl_password: String::new(),
            sasl_oauthbearer_token_endpoint_url: String::new(),
            sasl_oauthbearer_scope: String::new(),
            ssl_ca_location: String::new(),
            ssl_certificate_location: String::new(),
            ssl_key_location: String::new(),
            ssl_key_password: String::new(),
            options: BTreeMap::new(),
        }
    }
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:pass@]host:port[/db]`, `rediss://…` for TLS, Sentinel as
    /// `redis-sentinel://[user:pass@]host:port[,host:port…]/<service name>` (`rediss-sentinel`
    /// for TLS), or a Redis Cluster as `redis-cluster://[user:pass@]host:port[,host:port…]`
    /// (`rediss-cluster` for TLS; one reachable node is enough, the others are discovered).
    /// Empty: the embedded default's in-process bus (one node).
    pub url: String,
    /// Prefix of every channel and key, so several clusters can share one Redis. On a
    /// Redis Cluster the bus and presence keys are `{<prefix>}:…` (one hash tag: they live
    /// on one shard), so there the prefix must not contain `{` or `}`.
    pub prefix: String,
    /// With `rediss`: PEM file of the CA(s) that signed the server certificates. Empty: the
    /// system's trust store.
    pub tls_ca_file: String,
    /// With `rediss`: PEM client certificate, for servers that require one (mTLS).
    pub tls_cert_file: String,
    /// With `tls_cert_file`: its PEM private key (unencrypted).
    pub tls_key_file: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            prefix: "fanout".to_owned(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

/// `[bus]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusConfig {
    /// `broadcast` (default): every node receives every bus message and picks its own
    /// connections. `routed` (large clusters, a Redis bus only): a message for users
    /// (`to.user`, `to.users`) reaches only the nodes holding a connection of one of them,
    /// as presence knows them; broadcasts, groups and `to.conn` still reach every node.
    /// Every node of a cluster must use the same value.
    pub routing: Routing,
}

/// `bus.routing`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// Every node receives every bus message.
    #[default]
    Broadcast,
    /// Messages for users go only to the nodes holding one of their connections.
    Routed,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://…` (TLS with libpq's `sslmode`, `sslrootcert`, `sslcert`, `sslkey`
    /// parameters) or `sqlite://…`. Empty: the embedded default's `sqlite://fanout.db`.
    pub url: String,
    /// PostgreSQL connections a node holds at most (its pool; made as needed). Every new
    /// WebSocket connection reads its user's preferences through it, so a reconnect storm
    /// waits here first. SQLite keeps 4.
    pub max_connections: u32,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            max_connections: 8,
        }
    }
}

/// How clients prove who they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Verify a JWT (production).
    Jwt,
    /// Trust `?user=` and ask for no token anywhere (embedded default / demos only).
    Insecure,
}

/// `[auth]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `jwt` or `insecure`.
    pub mode: AuthMode,
    /// HS256 shared secret.
    pub jwt_secret: String,
    /// PEM public key for RS256 or ES256 tokens.
    pub jwt_public_key: String,
    /// Required `iss` claim, when set.
    pub issuer: String,
    /// Required `aud` claim, when set.
    pub audience: String,
    /// Accept `?access_token=` on `/ws` (tokens in URLs end up in logs: off by default).
    pub allow_query_token: bool,
    /// Bearer token for the admin parts of the HTTP API.
    pub admin_token: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Jwt,
            jwt_secret: String::new(),
            jwt_public_key: String::new(),
            issuer: String::new(),
            audience: String::new(),
            allow_query_token: false,
            admin_token: String::new(),
        }
    }
}

/// `[heartbeat]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeartbeatConfig {
    /// How often the server sends a WebSocket Ping.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// A connection silent for this long is closed with 4000.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(25),
            timeout: Duration::from_secs(60),
        }
    }
}

/// `[recovery]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecoveryConfig {
    /// How far back a reconnecting client can resume with `since`.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Most messages kept per user for resume.
    pub max_messages: usize,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(600),
            max_messages: 200,
        }
    }
}

/// `[shutdown]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Time over which connections are closed with 1012 when the node stops.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// Time after the drain within which everything else ends: close handshakes, open HTTP
    /// requests, the Kafka commit and leave, the producer's flush. Then the process exits.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain: Duration::from_secs(30),
            grace: Duration::from_secs(10),
        }
    }
}

//! Configuration: built-in defaults → `config/default.toml` → `--config FILE` →
//! `FANOUT__<SECTION>__<KEY>` environment variables (DESIGN §7).
//!
//! Every field's `///` comment is the configuration reference (`docs/configuration.md`
//! is generated from the same words). [`Settings::load`] validates everything before any
//! port is bound and names the offending key in its error.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A source could not be read or a value has the wrong shape.
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    /// A value parsed but is not acceptable.
    #[error("invalid config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// The whole effective configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    pub node: NodeConfig,
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub kafka: KafkaConfig,
    pub redis: RedisConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub heartbeat: HeartbeatConfig,
    pub recovery: RecoveryConfig,
    pub shutdown: ShutdownConfig,
    /// The message type registry (`[[types]]` entries) and `types.unknown`.
    #[serde(rename = "types", with = "types_section")]
    pub types: TypesConfig,
}

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
    /// Browser origins allowed to open `/ws` (`https://app.example.com`). Empty: any.
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
        }
    }
}

/// `[admin]`: the operator port (metrics, probes, stats).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`, `/v1/stats`).
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:9090".parse().expect("literal address"),
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
    /// Where the group starts on a partition with no committed offset. `earliest` never
    /// skips a record produced while the group was forming; `ttl_ms` keeps old ones away.
    pub auto_offset_reset: OffsetReset,
    /// How long the group waits for a silent node before moving its partitions away.
    #[serde(with = "humantime_serde")]
    pub session_timeout: Duration,
    /// Largest record value accepted; a larger one is rejected with reason `too_large`.
    pub max_record_bytes: usize,
    /// Extra librdkafka properties (e.g. `"security.protocol" = "SASL_SSL"`), TOML only.
    pub options: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            topics: vec!["fanout.messages".to_owned()],
            group_id: "fanout".to_owned(),
            upstream_topic: String::new(),
            dead_letter_topic: String::new(),
            auto_offset_reset: OffsetReset::Earliest,
            session_timeout: Duration::from_secs(10),
            max_record_bytes: 256 * 1024,
            options: BTreeMap::new(),
        }
    }
}

/// `[redis]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`. Empty: the embedded default's in-process bus (one node).
    pub url: String,
    /// Prefix of every channel and key, so several clusters can share one Redis.
    pub prefix: String,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            prefix: "fanout".to_owned(),
        }
    }
}

/// `[database]`
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `postgres://…` or `sqlite://…`. Empty: the embedded default's `sqlite://fanout.db`.
    pub url: String,
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
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain: Duration::from_secs(30),
        }
    }
}

/// What happens to a record whose type is not in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownTypes {
    /// Deliver it to every target (it cannot be switched off).
    #[default]
    Deliver,
    /// Reject it at ingest with reason `unknown_type`.
    Reject,
}

/// One registered message type.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TypeConfig {
    /// The `type` of the envelope.
    pub name: String,
    /// Enabled for users who never chose.
    #[serde(default = "yes")]
    pub default: bool,
}

fn yes() -> bool {
    true
}

/// The type registry: `[[types]]` entries plus `types.unknown`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TypesConfig {
    pub registry: Vec<TypeConfig>,
    pub unknown: UnknownTypes,
}

/// `types` is an array of tables in TOML (`[[types]]`) but also carries `types.unknown`;
/// this accepts the array, or a table `{unknown = …, list = […]}` (what env vars give).
mod types_section {
    use super::{TypeConfig, TypesConfig, UnknownTypes};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        List(Vec<TypeConfig>),
        Table {
            #[serde(default)]
            unknown: UnknownTypes,
            #[serde(default)]
            list: Vec<TypeConfig>,
        },
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<TypesConfig, D::Error> {
        Ok(match Repr::deserialize(d)? {
            Repr::List(registry) => TypesConfig {
                registry,
                unknown: UnknownTypes::Deliver,
            },
            Repr::Table { unknown, list } => TypesConfig {
                registry: list,
                unknown,
            },
        })
    }

    pub fn serialize<S: Serializer>(t: &TypesConfig, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Out<'a> {
            unknown: UnknownTypes,
            list: &'a [TypeConfig],
        }
        Out {
            unknown: t.unknown,
            list: &t.registry,
        }
        .serialize(s)
    }
}

/// The environment variable for `types.unknown`.
const TYPES_UNKNOWN_ENV: &str = "FANOUT__TYPES__UNKNOWN";

/// Keys whose values are lists; in environment variables they are comma-separated.
const LIST_KEYS: &[&str] = &["kafka.topics", "server.allowed_origins"];

impl Settings {
    /// Loads the layered configuration and validates it.
    ///
    /// `types.unknown` may be given at top level as `types_unknown` too, because TOML
    /// cannot mix `[[types]]` with a `[types]` table; see `docs/configuration.md`.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder()
            .add_source(config::File::with_name("config/default").required(false));
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).required(true));
        }
        // `FANOUT__TYPES__UNKNOWN` would turn the `[[types]]` array into a table and lose
        // the registry, so it is read here and applied as `types_unknown`.
        let mut vars: config::Map<String, String> = std::env::vars().collect();
        if let Some(unknown) = vars.remove(TYPES_UNKNOWN_ENV) {
            builder = builder.set_override("types_unknown", unknown)?;
        }
        let mut env = config::Environment::with_prefix("FANOUT")
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .try_parsing(true)
            .source(Some(vars));
        for key in LIST_KEYS {
            env = env.with_list_parse_key(key);
        }
        let raw = builder.add_source(env).build()?;
        let mut settings = Self::from_config(raw)?;
        for list in [
            &mut settings.kafka.topics,
            &mut settings.server.allowed_origins,
        ] {
            for item in list.iter_mut() {
                *item = item.trim().to_owned();
            }
        }
        settings.validate()?;
        Ok(settings)
    }

    fn from_config(raw: config::Config) -> Result<Self, ConfigError> {
        let explicit: Vec<&str> = [
            "server.listen",
            "admin.listen",
            "auth.mode",
            "server.demo_page",
        ]
        .into_iter()
        .filter(|key| raw.get::<config::Value>(key).is_ok())
        .collect();
        let unknown: Option<UnknownTypes> = match raw.get("types_unknown") {
            Ok(value) => Some(value),
            Err(config::ConfigError::NotFound(_)) => None,
            Err(_) => {
                return Err(invalid(
                    "types.unknown",
                    "must be \"deliver\" or \"reject\"",
                ));
            }
        };
        let mut table = raw.cache.into_table()?;
        table.remove("types_unknown");
        let mut settings: Settings =
            config::Value::new(None, config::ValueKind::Table(table)).try_deserialize()?;
        if let Some(unknown) = unknown {
            settings.types.unknown = unknown;
        }
        if settings.is_embedded() {
            settings.apply_embedded_defaults(|key| explicit.contains(&key));
        }
        Ok(settings)
    }

    /// True when Kafka, Redis and the database are all left unconfigured: the embedded default.
    pub fn is_embedded(&self) -> bool {
        self.kafka.brokers.is_empty() && self.redis.url.is_empty() && self.database.url.is_empty()
    }

    /// The embedded default (DESIGN §7): insecure auth, the demo page and a demo type
    /// registry, listening on 127.0.0.1 only — unless those keys were given explicitly.
    fn apply_embedded_defaults(&mut self, explicit: impl Fn(&str) -> bool) {
        let localhost = |port| SocketAddr::from(([127, 0, 0, 1], port));
        if !explicit("server.listen") {
            self.server.listen = localhost(8080);
        }
        if !explicit("admin.listen") {
            self.admin.listen = localhost(9090);
        }
        if !explicit("auth.mode") {
            self.auth.mode = AuthMode::Insecure;
        }
        if !explicit("server.demo_page") {
            self.server.demo_page = true;
        }
        if self.types.registry.is_empty() {
            self.types.registry = [
                ("robot.reply", true),
                ("order.status", true),
                ("marketing", false),
            ]
            .into_iter()
            .map(|(name, default)| TypeConfig {
                name: name.to_owned(),
                default,
            })
            .collect();
        }
    }

    /// Checks what serde cannot: cross-field rules and value ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node.id.is_empty() {
            return Err(invalid("node.id", "must not be empty"));
        }
        if self.kafka.topics.is_empty() || self.kafka.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(invalid(
                "kafka.topics",
                "needs at least one non-empty topic",
            ));
        }
        if self.kafka.group_id.is_empty() {
            return Err(invalid("kafka.group_id", "must not be empty"));
        }
        if self.kafka.max_record_bytes == 0 {
            return Err(invalid("kafka.max_record_bytes", "must be positive"));
        }
        if self.redis.prefix.is_empty() || self.redis.prefix.contains(char::is_whitespace) {
            return Err(invalid("redis.prefix", "must be a non-empty word"));
        }
        if !self.redis.url.is_empty() && !self.redis.url.starts_with("redis") {
            return Err(invalid(
                "redis.url",
                "must start with redis:// or rediss://",
            ));
        }
        let db = &self.database.url;
        if !db.is_empty() && !db.starts_with("postgres") && !db.starts_with("sqlite:") {
            return Err(invalid(
                "database.url",
                "must be postgres://… or sqlite://…",
            ));
        }
        self.validate_auth()?;
        self.validate_limits()?;
        if self.types.registry.len() > crate::types::MAX_TYPES {
            return Err(invalid(
                "types",
                format!(
                    "at most {} types can be registered",
                    crate::types::MAX_TYPES
                ),
            ));
        }
        if !self.redis.url.is_empty() && self.database.url.is_empty() {
            return Err(invalid(
                "database.url",
                "a cluster (redis.url set) needs a shared database: set database.url to postgres://…",
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for t in &self.types.registry {
            if t.name.is_empty() {
                return Err(invalid("types.name", "must not be empty"));
            }
            if !seen.insert(&t.name) {
                return Err(invalid(
                    "types.name",
                    format!("`{}` is listed twice", t.name),
                ));
            }
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        if auth.mode == AuthMode::Insecure && !self.is_embedded() {
            return Err(invalid(
                "auth.mode",
                "\"insecure\" is for the embedded default only; with Kafka, Redis or a database configured use \"jwt\"",
            ));
        }
        if auth.mode == AuthMode::Jwt
            && auth.jwt_secret.is_empty()
            && auth.jwt_public_key.is_empty()
        {
            return Err(invalid(
                "auth.jwt_secret",
                "auth.mode = \"jwt\" needs auth.jwt_secret (HS256) or auth.jwt_public_key (RS256/ES256)",
            ));
        }
        if !auth.jwt_public_key.is_empty() && !auth.jwt_public_key.contains("-----BEGIN") {
            return Err(invalid("auth.jwt_public_key", "must be a PEM public key"));
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        let positive: [(&'static str, usize); 5] = [
            ("server.max_connections", s.max_connections),
            (
                "server.max_connections_per_user",
                s.max_connections_per_user,
            ),
            ("server.max_frame_bytes", s.max_frame_bytes),
            ("server.queue_max_messages", s.queue_max_messages),
            ("server.queue_max_bytes", s.queue_max_bytes),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(invalid(key, "must be positive"));
            }
        }
        if s.max_frames_per_sec == 0 {
            return Err(invalid("server.max_frames_per_sec", "must be positive"));
        }
        if self.heartbeat.interval.is_zero() {
            return Err(invalid("heartbeat.interval", "must be positive"));
        }
        if self.heartbeat.timeout <= self.heartbeat.interval {
            return Err(invalid(
                "heartbeat.timeout",
                "must be longer than heartbeat.interval",
            ));
        }
        if self.recovery.max_messages == 0 {
            return Err(invalid("recovery.max_messages", "must be positive"));
        }
        Ok(())
    }

    /// The configuration as TOML with every secret replaced by `***`.
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        for secret in [&mut masked.auth.jwt_secret, &mut masked.auth.admin_token] {
            if !secret.is_empty() {
                *secret = "***".to_owned();
            }
        }
        masked.redis.url = mask_url_password(&masked.redis.url);
        masked.database.url = mask_url_password(&masked.database.url);
        for (key, value) in masked.kafka.options.iter_mut() {
            if key.contains("password") || key.contains("secret") {
                *value = "***".to_owned();
            }
        }
        toml::to_string_pretty(&masked).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// `scheme://user:secret@host` → `scheme://user:***@host`.
fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((creds, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match creds.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from_str(text, config::FileFormat::Toml))
            .build()?;
        let s = Settings::from_config(raw)?;
        s.validate()?;
        Ok(s)
    }

    #[test]
    fn type_registry_reads_from_array_of_tables() {
        let s = from_toml(
            r#"
            types_unknown = "reject"
            [auth]
            jwt_secret = "s"
            [[types]]
            name = "robot.reply"
            [[types]]
            name = "marketing"
            default = false
            "#,
        )
        .unwrap();
        assert_eq!(s.types.registry.len(), 2);
        assert!(s.types.registry[0].default);
        assert!(!s.types.registry[1].default);
        assert_eq!(s.types.unknown, UnknownTypes::Reject);
    }

    #[test]
    fn embedded_default_is_insecure_on_localhost_only() {
        let s = from_toml("").unwrap();
        assert!(s.is_embedded());
        assert_eq!(s.auth.mode, AuthMode::Insecure);
        assert_eq!(s.server.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.admin.listen.to_string(), "127.0.0.1:9090");
        assert!(s.server.demo_page && !s.types.registry.is_empty());
        let s = from_toml("[server]\nlisten='0.0.0.0:8080'").unwrap();
        assert_eq!(s.server.listen.to_string(), "0.0.0.0:8080");
        let err = from_toml("[auth]\nmode='insecure'\n[redis]\nurl='redis://x'").unwrap_err();
        assert!(err.to_string().contains("auth.mode"), "{err}");
    }

    #[test]
    fn a_misspelt_types_unknown_is_an_error() {
        let err = from_toml("types_unknown = \"rejct\"").unwrap_err();
        assert!(err.to_string().contains("types.unknown"), "{err}");
    }

    #[test]
    fn durations_are_human_strings() {
        let s =
            from_toml("[auth]\njwt_secret='s'\n[heartbeat]\ninterval='2s'\ntimeout='1m'").unwrap();
        assert_eq!(s.heartbeat.interval, Duration::from_secs(2));
        assert_eq!(s.heartbeat.timeout, Duration::from_secs(60));
    }

    #[test]
    fn errors_name_the_key() {
        let err = from_toml("[auth]\njwt_secret='s'\n[server]\nmax_connections=0").unwrap_err();
        assert!(err.to_string().contains("server.max_connections"), "{err}");
        let err =
            from_toml("[auth]\njwt_secret='s'\n[server]\nmax_connections='lots'").unwrap_err();
        assert!(err.to_string().contains("max_connections"), "{err}");
        let err = from_toml("[auth]\nmode='jwt'").unwrap_err();
        assert!(err.to_string().contains("auth.jwt_secret"), "{err}");
        let err = from_toml("[auth]\njwt_secret='s'\n[server]\nlisten_on='x'").unwrap_err();
        assert!(err.to_string().contains("listen_on"), "{err}");
    }

    #[test]
    fn masked_toml_hides_secrets() {
        let mut s = from_toml("[auth]\njwt_secret='topsecret'\nadmin_token='adm'").unwrap();
        s.redis.url = "redis://u:pw@h:6379".into();
        let text = s.to_masked_toml();
        assert!(!text.contains("topsecret") && !text.contains("adm\"") && !text.contains(":pw@"));
        assert!(text.contains("redis://u:***@h:6379"));
    }
}

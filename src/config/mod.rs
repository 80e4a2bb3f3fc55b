//! Configuration: built-in defaults → `config/default.toml` → `--config FILE` →
//! `FANOUT__<SECTION>__<KEY>` environment variables (DESIGN §7).
//!
//! Every field's `///` comment (in `sections.rs`) is the configuration reference;
//! `docs/configuration.md` is kept in step with them by hand. [`Settings::load`] validates everything before any
//! port is bound and names the offending key in its error.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

mod sections;
#[cfg(test)]
mod tests;
mod tls;

pub use sections::*;
pub use tls::RedisScheme;

use crate::types::{TypeConfig, TypesConfig, UnknownTypes};

/// Where `ask` frames go in the embedded default (unless `kafka.upstream_topic` is given).
pub const EMBEDDED_UPSTREAM_TOPIC: &str = "fanout.upstream";

/// `server.allowed_origins` of the embedded default (unless given): pages served from this
/// machine, on any port. Its insecure auth trusts `?user=`, so a page from anywhere else
/// must not be able to open `/ws` or publish through the visitor's browser.
pub const EMBEDDED_ALLOWED_ORIGINS: [&str; 6] = [
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://[::1]:*",
    "https://[::1]:*",
];

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
    pub bus: BusConfig,
    pub database: DatabaseConfig,
    pub auth: AuthConfig,
    pub heartbeat: HeartbeatConfig,
    pub recovery: RecoveryConfig,
    pub shutdown: ShutdownConfig,
    /// The message type registry (`[[types]]` entries) and `types.unknown`.
    #[serde(rename = "types", with = "crate::types::types_section")]
    pub types: TypesConfig,
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
            list.retain(|item| !item.is_empty());
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
            "kafka.upstream_topic",
            "server.allowed_origins",
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
    /// registry, listening on 127.0.0.1 only and letting in browser pages from this machine
    /// only — unless those keys were given explicitly.
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
        if !explicit("server.allowed_origins") {
            self.server.allowed_origins = EMBEDDED_ALLOWED_ORIGINS.map(str::to_owned).to_vec();
        }
        if !explicit("kafka.upstream_topic") {
            // The demo's ask box works out of the box; the in-process broker creates it.
            self.kafka.upstream_topic = EMBEDDED_UPSTREAM_TOPIC.to_owned();
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
        let presence_topic = self.kafka.presence_topic.as_str();
        if !presence_topic.is_empty()
            && (presence_topic.trim() != presence_topic
                || self.kafka.topics.iter().any(|t| t == presence_topic))
        {
            return Err(invalid(
                "kafka.presence_topic",
                "must be a topic name not listed in kafka.topics (its events are not envelopes)",
            ));
        }
        if self.kafka.max_record_bytes == 0 {
            return Err(invalid("kafka.max_record_bytes", "must be positive"));
        }
        if !is_topic_name(&self.kafka.receipts_topic) {
            return Err(invalid(
                "kafka.receipts_topic",
                "must be empty or a Kafka topic name (letters, digits, `.`, `_`, `-`; at most 249)",
            ));
        }
        if self.kafka.topics.contains(&self.kafka.receipts_topic) {
            return Err(invalid(
                "kafka.receipts_topic",
                "must not be one of kafka.topics (receipts would come back as messages)",
            ));
        }
        if self.redis.prefix.is_empty() || self.redis.prefix.contains(char::is_whitespace) {
            return Err(invalid("redis.prefix", "must be a non-empty word"));
        }
        let cluster = RedisScheme::of(&self.redis.url).is_ok_and(RedisScheme::is_cluster);
        if cluster && self.redis.prefix.contains(['{', '}']) {
            // On a Redis Cluster the bus's keys are `{<prefix>}:…`: a brace in the prefix
            // would move the hash tag and split the keys one script touches over slots.
            return Err(invalid(
                "redis.prefix",
                "must not contain `{` or `}` with a Redis Cluster (fanout adds the hash tag itself)",
            ));
        }
        if self.bus.routing == Routing::Routed && self.redis.url.is_empty() {
            return Err(invalid(
                "bus.routing",
                "\"routed\" needs a Redis bus (redis.url): the embedded in-process bus has one node, nothing to route",
            ));
        }
        tls::check_kafka(&self.kafka, self.kafka.brokers.is_empty())?;
        tls::check_redis(&self.redis)?;
        let db = &self.database.url;
        if db.starts_with("postgres") {
            tls::check_postgres(db)?;
        } else if !db.is_empty() && !db.starts_with("sqlite:") {
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
        let positive: [(&'static str, usize); 7] = [
            ("server.max_connections", s.max_connections),
            ("server.max_pending_connections", s.max_pending_connections),
            ("admin.max_connections", self.admin.max_connections),
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
        for (key, value) in [
            ("server.header_timeout", s.header_timeout),
            ("server.body_timeout", s.body_timeout),
            ("shutdown.grace", self.shutdown.grace),
        ] {
            if value.is_zero() {
                return Err(invalid(key, "must be positive"));
            }
        }
        if self.recovery.max_messages == 0 {
            return Err(invalid("recovery.max_messages", "must be positive"));
        }
        if !(1..=1000).contains(&self.database.max_connections) {
            return Err(invalid(
                "database.max_connections",
                "must be between 1 and 1000",
            ));
        }
        Ok(())
    }

    /// The configuration as TOML with every secret replaced by `***`.
    pub fn to_masked_toml(&self) -> String {
        let mut masked = self.clone();
        for secret in [
            &mut masked.auth.jwt_secret,
            &mut masked.auth.admin_token,
            &mut masked.kafka.sasl_password,
            &mut masked.kafka.ssl_key_password,
        ] {
            if !secret.is_empty() {
                *secret = "***".to_owned();
            }
        }
        masked.redis.url = mask_url_password(&masked.redis.url);
        masked.database.url = mask_url_password(&masked.database.url);
        for (key, value) in masked.kafka.options.iter_mut() {
            if is_secret_property(key) {
                *value = "***".to_owned();
            }
        }
        toml::to_string_pretty(&masked).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

/// True for a librdkafka property whose value is a secret (`sasl.password`,
/// `sasl.oauthbearer.client.secret`, `ssl.key.password`…): never printed.
pub fn is_secret_property(key: &str) -> bool {
    key.contains("password") || key.contains("secret")
}

/// `scheme://user:secret@host` → `scheme://user:***@host`: what logs and errors may show.
pub fn mask_url_password(url: &str) -> String {
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

/// True for an empty string or a name Kafka accepts for a topic.
fn is_topic_name(name: &str) -> bool {
    name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

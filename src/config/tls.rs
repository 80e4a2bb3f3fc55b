//! Validation of how the node reaches Kafka, Redis and the database (DESIGN §7,
//! "Connecting to managed services").
//!
//! Rule: a TLS or SASL setting is either honoured or refused at start, naming its key. A
//! setting that would be ignored (a CA file with a plaintext protocol, `sslrootcert` with
//! `sslmode=require`) is refused too: it reads as protection the node would not have. Every
//! file named is read and parsed here, before any port is bound or connection made.
//!
//! One TLS stack serves all three: OpenSSL (librdkafka links it; fred and sqlx use it
//! through native-tls), so the checks below parse files the way the connections will.

use openssl::pkey::{PKey, Private};
use openssl::x509::X509;

use super::{invalid, ConfigError, KafkaConfig, RedisConfig, SaslMechanism};

/// librdkafka properties the typed `kafka.*` keys own: `kafka.options` may not set them.
const KAFKA_OWNED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "kafka.brokers"),
    ("security.protocol", "kafka.security_protocol"),
    ("sasl.mechanism", "kafka.sasl_mechanism"),
    ("sasl.mechanisms", "kafka.sasl_mechanism"),
    ("sasl.username", "kafka.sasl_username"),
    ("sasl.password", "kafka.sasl_password"),
    ("sasl.oauthbearer.method", "kafka.sasl_mechanism"),
    ("sasl.oauthbearer.client.id", "kafka.sasl_username"),
    ("sasl.oauthbearer.client.secret", "kafka.sasl_password"),
    (
        "sasl.oauthbearer.token.endpoint.url",
        "kafka.sasl_oauthbearer_token_endpoint_url",
    ),
    ("sasl.oauthbearer.scope", "kafka.sasl_oauthbearer_scope"),
    ("ssl.ca.location", "kafka.ssl_ca_location"),
    ("ssl.certificate.location", "kafka.ssl_certificate_location"),
    ("ssl.key.location", "kafka.ssl_key_location"),
    ("ssl.key.password", "kafka.ssl_key_password"),
];

/// Checks the Kafka security keys; `embedded` when the in-process broker is used.
pub(super) fn check_kafka(cfg: &KafkaConfig, embedded: bool) -> Result<(), ConfigError> {
    for (property, key) in KAFKA_OWNED_PROPERTIES {
        if cfg.options.contains_key(*property) {
            return Err(invalid(
                "kafka.options",
                format!("`{property}` is set with `{key}`, not in kafka.options"),
            ));
        }
    }
    let protocol = cfg.security_protocol;
    if embedded && protocol != super::SecurityProtocol::Plaintext {
        return Err(invalid(
            "kafka.security_protocol",
            "the in-process broker (kafka.brokers empty) speaks plaintext only",
        ));
    }
    let unused = |key: &'static str, needs: &str| {
        invalid(
            key,
            format!(
                "is set, but kafka.security_protocol = \"{}\" does not use it (it needs {needs})",
                protocol.as_str()
            ),
        )
    };
    if protocol.uses_sasl() {
        check_sasl(cfg)?;
    } else {
        let sasl_keys = [
            ("kafka.sasl_mechanism", cfg.sasl_mechanism.is_some()),
            ("kafka.sasl_username", !cfg.sasl_username.is_empty()),
            ("kafka.sasl_password", !cfg.sasl_password.is_empty()),
            (
                "kafka.sasl_oauthbearer_token_endpoint_url",
                !cfg.sasl_oauthbearer_token_endpoint_url.is_empty(),
            ),
            (
                "kafka.sasl_oauthbearer_scope",
                !cfg.sasl_oauthbearer_scope.is_empty(),
            ),
        ];
        if let Some((key, _)) = sasl_keys.iter().find(|(_, set)| *set) {
            return Err(unused(key, "sasl_plaintext or sasl_ssl"));
        }
    }
    if protocol.uses_tls() {
        if !cfg.ssl_ca_location.is_empty() {
            read_ca("kafka.ssl_ca_location", &cfg.ssl_ca_location)?;
        }
        check_identity(
            (
                "kafka.ssl_certificate_location",
                &cfg.ssl_certificate_location,
            ),
            ("kafka.ssl_key_location", &cfg.ssl_key_location),
            Some(("kafka.ssl_key_password", &cfg.ssl_key_password)),
        )?;
    } else {
        let ssl_keys = [
            ("kafka.ssl_ca_location", &cfg.ssl_ca_location),
            (
                "kafka.ssl_certificate_location",
                &cfg.ssl_certificate_location,
            ),
            ("kafka.ssl_key_location", &cfg.ssl_key_location),
            ("kafka.ssl_key_password", &cfg.ssl_key_password),
        ];
        if let Some((key, _)) = ssl_keys.iter().find(|(_, v)| !v.is_empty()) {
            return Err(unused(key, "ssl or sasl_ssl"));
        }
    }
    Ok(())
}

fn check_sasl(cfg: &KafkaConfig) -> Result<(), ConfigError> {
    let Some(mechanism) = cfg.sasl_mechanism else {
        return Err(invalid(
            "kafka.sasl_mechanism",
            "is needed with a sasl_* security protocol: PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER",
        ));
    };
    let (user, password) = match mechanism {
        SaslMechanism::OauthBearer => ("the OIDC client id", "the OIDC client secret"),
        _ => ("the SASL user", "the SASL password"),
    };
    if cfg.sasl_username.is_empty() {
        return Err(invalid(
            "kafka.sasl_username",
            format!("{} needs {user}", mechanism.as_str()),
        ));
    }
    if cfg.sasl_password.is_empty() {
        return Err(invalid(
            "kafka.sasl_password",
            format!("{} needs {password}", mechanism.as_str()),
        ));
    }
    let endpoint = &cfg.sasl_oauthbearer_token_endpoint_url;
    match mechanism {
        SaslMechanism::OauthBearer if endpoint.is_empty() => Err(invalid(
            "kafka.sasl_oauthbearer_token_endpoint_url",
            "OAUTHBEARER needs the OIDC token endpoint (https://…)",
        )),
        SaslMechanism::OauthBearer => match url::Url::parse(endpoint) {
            Ok(u) if matches!(u.scheme(), "https" | "http") => Ok(()),
            _ => Err(invalid(
                "kafka.sasl_oauthbearer_token_endpoint_url",
                "must be an https:// (or http://) URL",
            )),
        },
        _ if !endpoint.is_empty() || !cfg.sasl_oauthbearer_scope.is_empty() => Err(invalid(
            "kafka.sasl_oauthbearer_token_endpoint_url",
            format!("is only used with OAUTHBEARER, not {}", mechanism.as_str()),
        )),
        _ => Ok(()),
    }
}

/// What `redis.url` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisScheme {
    /// `redis://`: one server, plaintext.
    Plain,
    /// `rediss://`: one server over TLS.
    Tls,
    /// `redis-sentinel://`: the primary a set of sentinels names, plaintext.
    Sentinel,
    /// `rediss-sentinel://`: the same over TLS (sentinels and servers).
    SentinelTls,
    /// `redis-cluster://`: a Redis Cluster, found through the nodes listed, plaintext.
    Cluster,
    /// `rediss-cluster://`: the same over TLS.
    ClusterTls,
}

impl RedisScheme {
    /// The scheme of `url`, or why it is refused.
    pub fn of(url: &str) -> Result<Self, ConfigError> {
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        match scheme {
            "redis" => Ok(Self::Plain),
            "rediss" => Ok(Self::Tls),
            "redis-sentinel" => Ok(Self::Sentinel),
            "rediss-sentinel" => Ok(Self::SentinelTls),
            "redis-cluster" => Ok(Self::Cluster),
            "rediss-cluster" => Ok(Self::ClusterTls),
            _ => Err(invalid(
                "redis.url",
                "must start with redis://, rediss://, redis-sentinel://, rediss-sentinel://, redis-cluster:// or rediss-cluster://",
            )),
        }
    }

    /// True for the `rediss` schemes.
    pub fn uses_tls(self) -> bool {
        matches!(self, Self::Tls | Self::SentinelTls | Self::ClusterTls)
    }

    /// True for the Redis Cluster schemes.
    pub fn is_cluster(self) -> bool {
        matches!(self, Self::Cluster | Self::ClusterTls)
    }
}

/// Checks `redis.url` and the TLS files next to it.
pub(super) fn check_redis(cfg: &RedisConfig) -> Result<(), ConfigError> {
    let unused = if cfg.url.is_empty() {
        Some("is set, but redis.url is empty (the in-process bus)")
    } else if !RedisScheme::of(&cfg.url)?.uses_tls() {
        Some("is set, but redis.url is not a rediss:// URL, so TLS would not be used")
    } else {
        None
    };
    if let Some(why) = unused {
        let files = [
            ("redis.tls_ca_file", &cfg.tls_ca_file),
            ("redis.tls_cert_file", &cfg.tls_cert_file),
            ("redis.tls_key_file", &cfg.tls_key_file),
        ];
        return match files.iter().find(|(_, v)| !v.is_empty()) {
            Some((key, _)) => Err(invalid(key, why)),
            None => Ok(()),
        };
    }
    if !cfg.tls_ca_file.is_empty() {
        read_ca("redis.tls_ca_file", &cfg.tls_ca_file)?;
    }
    check_identity(
        ("redis.tls_cert_file", &cfg.tls_cert_file),
        ("redis.tls_key_file", &cfg.tls_key_file),
        None,
    )
}

/// Checks the TLS parameters of a `postgres://` `database.url`, the way libpq reads them.
pub(super) fn check_postgres(url: &str) -> Result<(), ConfigError> {
    let parsed =
        url::Url::parse(url).map_err(|e| invalid("database.url", format!("is not a URL: {e}")))?;
    let param = |name: &str| {
        parsed
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let mode = param("sslmode").unwrap_or_else(|| "prefer".to_owned());
    let (tls_required, verifies) = match mode.as_str() {
        "disable" | "allow" | "prefer" => (false, false),
        "require" => (true, false),
        "verify-ca" | "verify-full" => (true, true),
        other => {
            return Err(invalid(
                "database.url",
                format!("sslmode={other} is not one of disable, allow, prefer, require, verify-ca, verify-full"),
            ))
        }
    };
    if let Some(root) = param("sslrootcert") {
        if !verifies {
            return Err(invalid(
                "database.url",
                format!("sslrootcert is only used with sslmode=verify-ca or verify-full, not sslmode={mode}"),
            ));
        }
        read_ca("database.url (sslrootcert)", &root)?;
    }
    let (cert, key) = (param("sslcert"), param("sslkey"));
    if (cert.is_some() || key.is_some()) && !tls_required {
        return Err(invalid(
            "database.url",
            format!("sslcert/sslkey need sslmode=require or stronger, not sslmode={mode} (which may connect without TLS)"),
        ));
    }
    check_identity(
        ("database.url (sslcert)", cert.as_deref().unwrap_or("")),
        ("database.url (sslkey)", key.as_deref().unwrap_or("")),
        None,
    )
}

/// Reads a PEM file of one or more CA certificates.
fn read_ca(key: &'static str, path: &str) -> Result<Vec<X509>, ConfigError> {
    let pem = read(key, path)?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| {
        invalid(
            key,
            format!("{path}: not a PEM certificate file ({})", first_reason(&e)),
        )
    })?;
    if certs.is_empty() {
        return Err(invalid(key, format!("{path}: holds no PEM certificate")));
    }
    Ok(certs)
}

/// Checks a client certificate and its key: both or neither, both parse, and they match.
fn check_identity(
    (cert_key, cert_path): (&'static str, &str),
    (key_key, key_path): (&'static str, &str),
    password: Option<(&'static str, &str)>,
) -> Result<(), ConfigError> {
    let password = password.filter(|(_, p)| !p.is_empty());
    match (cert_path.is_empty(), key_path.is_empty()) {
        (true, true) => {
            return match password {
                Some((key, _)) => Err(invalid(key, format!("is set, but {key_key} is not"))),
                None => Ok(()),
            }
        }
        (false, true) => return Err(invalid(key_key, format!("is needed with {cert_key}"))),
        (true, false) => return Err(invalid(cert_key, format!("is needed with {key_key}"))),
        (false, false) => {}
    }
    let cert = read_ca(cert_key, cert_path)?.swap_remove(0);
    let pem = read(key_key, key_path)?;
    let private: PKey<Private> = match password {
        Some((_, secret)) => PKey::private_key_from_pem_passphrase(&pem, secret.as_bytes()),
        None => PKey::private_key_from_pem(&pem),
    }
    .map_err(|e| {
        let hint = match password {
            Some((password_key, _)) => format!(" (or {password_key} is wrong)"),
            None => " (an encrypted key is not supported here)".to_owned(),
        };
        invalid(
            key_key,
            format!(
                "{key_path}: not a usable PEM private key{hint}: {}",
                first_reason(&e)
            ),
        )
    })?;
    let matches = cert
        .public_key()
        .map(|public| public.public_eq(&private))
        .unwrap_or(false);
    if !matches {
        return Err(invalid(
            key_key,
            format!("{key_path} is not the key of the certificate in {cert_key}"),
        ));
    }
    Ok(())
}

fn read(key: &'static str, path: &str) -> Result<Vec<u8>, ConfigError> {
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {path}: {e}")))
}

/// OpenSSL's first reason, without its error-queue noise.
fn first_reason(e: &openssl::error::ErrorStack) -> String {
    e.errors()
        .first()
        .and_then(|e| e.reason().map(str::to_owned))
        .unwrap_or_else(|| e.to_string())
}

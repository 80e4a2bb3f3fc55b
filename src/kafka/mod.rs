//! Kafka clients shared by ingest, `ask` and the HTTP publish API: the common librdkafka
//! configuration (brokers, TLS and SASL, `kafka.options`), a producer that waits for the
//! broker's acknowledgement, and the check at start that the brokers accept this node.

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;

use crate::config::{is_secret_property, KafkaConfig, SaslMechanism};

mod access;
mod producer;
mod sink;

pub use access::{check_access, StartError};
pub use producer::Producer;
pub use sink::Sink;

/// librdkafka properties common to every client: brokers, security, then `kafka.options`
/// (which may not repeat what the typed keys set: `config` refuses that).
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (key, value) in security_properties(cfg) {
        c.set(key, value);
    }
    for (key, value) in &cfg.options {
        c.set(key, value);
    }
    c
}

/// The librdkafka properties of `kafka.security_protocol` and the `sasl_*`/`ssl_*` keys.
fn security_properties(cfg: &KafkaConfig) -> Vec<(&'static str, &str)> {
    let protocol = cfg.security_protocol;
    let mut props = vec![("security.protocol", protocol.as_str())];
    if let Some(mechanism) = cfg.sasl_mechanism.filter(|_| protocol.uses_sasl()) {
        props.push(("sasl.mechanism", mechanism.as_str()));
        if mechanism == SaslMechanism::OauthBearer {
            props.extend([
                ("sasl.oauthbearer.method", "oidc"),
                ("sasl.oauthbearer.client.id", cfg.sasl_username.as_str()),
                ("sasl.oauthbearer.client.secret", cfg.sasl_password.as_str()),
                (
                    "sasl.oauthbearer.token.endpoint.url",
                    cfg.sasl_oauthbearer_token_endpoint_url.as_str(),
                ),
            ]);
            if !cfg.sasl_oauthbearer_scope.is_empty() {
                props.push(("sasl.oauthbearer.scope", &cfg.sasl_oauthbearer_scope));
            }
        } else {
            props.push(("sasl.username", &cfg.sasl_username));
            props.push(("sasl.password", &cfg.sasl_password));
        }
    }
    if protocol.uses_tls() {
        let files = [
            ("ssl.ca.location", &cfg.ssl_ca_location),
            ("ssl.certificate.location", &cfg.ssl_certificate_location),
            ("ssl.key.location", &cfg.ssl_key_location),
            ("ssl.key.password", &cfg.ssl_key_password),
        ];
        props.extend(
            files
                .into_iter()
                .filter(|(_, v)| !v.is_empty())
                .map(|(k, v)| (k, v.as_str())),
        );
    }
    props
}

/// Serves `producer`'s delivery reports on a thread of its own (named `name`) until the
/// returned flag is set: the producers of both kinds (`Producer`, `Sink`) poll this way.
fn spawn_poller<C: rdkafka::producer::ProducerContext + 'static>(
    producer: std::sync::Arc<rdkafka::producer::BaseProducer<C>>,
    name: &str,
) -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>, KafkaError> {
    use std::sync::atomic::{AtomicBool, Ordering};
    /// How long one poll of the delivery reports waits; also how long the thread may
    /// outlive the last clone of its producer. rdkafka waits for the time left rounded
    /// down to whole milliseconds, then polls with a zero timeout, in a loop, until the
    /// round's end: from a round of exactly 1 s that loop took the last millisecond of
    /// every second (~1 CPU-ms a second per producer, seen in a profile of S3). The 100 µs
    /// over the second leave a round without reports (a sink's, as a rule) at most that.
    const POLL_ROUND: std::time::Duration = std::time::Duration::from_micros(1_000_100);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                producer.poll(POLL_ROUND);
            }
        })
        .map_err(|_| KafkaError::ClientCreation("cannot start the producer thread".into()))?;
    Ok(stop)
}

/// librdkafka's configuration errors show the value they refused: not a secret's.
pub fn without_secrets(e: KafkaError) -> KafkaError {
    match e {
        KafkaError::ClientConfig(result, description, key, _) if is_secret_property(&key) => {
            KafkaError::ClientConfig(result, description, key, "***".to_owned())
        }
        e => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaConfRes;

    #[test]
    fn a_refused_secret_property_is_not_shown_in_the_error() {
        let refused = |key: &str| {
            without_secrets(KafkaError::ClientConfig(
                RDKafkaConfRes::RD_KAFKA_CONF_INVALID,
                "not supported in this build".into(),
                key.into(),
                "hunter2".into(),
            ))
            .to_string()
        };
        for key in [
            "sasl.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.password",
        ] {
            assert!(!refused(key).contains("hunter2"), "{key}");
        }
        assert!(
            refused("client.id").contains("hunter2"),
            "other values are shown"
        );
    }
}

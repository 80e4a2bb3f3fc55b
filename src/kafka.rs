//! Kafka clients shared by ingest, `ask` and the HTTP publish API: the common librdkafka
//! configuration and a producer that waits for the broker's acknowledgement.

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseProducer, DeliveryResult, FutureProducer, FutureRecord, Producer as _, ProducerContext,
};
use rdkafka::util::Timeout;
use rdkafka::ClientContext;

use crate::config::{KafkaConfig, SaslMechanism};

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

/// A producer whose `send` resolves once the broker acknowledged the record.
#[derive(Clone)]
pub struct Producer {
    inner: FutureProducer,
}

impl Producer {
    pub fn new(cfg: &KafkaConfig) -> Result<Self, KafkaError> {
        let inner = client_config(cfg)
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("message.timeout.ms", "10000")
            .set("linger.ms", "1")
            .create()?;
        Ok(Self { inner })
    }

    /// Produces one record and waits for its acknowledgement.
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), KafkaError> {
        let mut owned = OwnedHeaders::new_with_capacity(headers.len());
        for (name, value) in headers {
            owned = owned.insert(Header {
                key: name,
                value: Some(*value),
            });
        }
        let mut record = FutureRecord::to(topic).payload(payload).headers(owned);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.inner
            .send(record, Timeout::After(Duration::from_secs(10)))
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }

    /// True if the cluster answers a metadata request for `topic` within `timeout`.
    /// Blocks: call it from `spawn_blocking`.
    pub fn probe(&self, topic: &str, timeout: Duration) -> bool {
        self.inner
            .client()
            .fetch_metadata(Some(topic), timeout)
            .is_ok()
    }

    /// Waits for records still in flight (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        let _ = self.inner.flush(timeout);
    }
}

/// Why the brokers refused this node at start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A TLS or SASL setting the brokers did not accept: the node must not run with it.
    #[error("invalid config key `{key}`: {reason}")]
    Refused { key: &'static str, reason: String },
    /// The client could not even be created.
    #[error(transparent)]
    Client(#[from] KafkaError),
}

/// Connects to the brokers once at start and waits, at most `wait`, for an answer. A TLS
/// handshake or SASL authentication failure is a [`StartError::Refused`] naming the key to
/// look at; anything else (no broker reachable yet) is left to the readiness probe.
/// Blocks: call it from `spawn_blocking`.
pub fn check_access(cfg: &KafkaConfig, wait: Duration) -> Result<(), StartError> {
    let producer: BaseProducer<FirstRefusal> =
        client_config(cfg).create_with_context(FirstRefusal::default())?;
    let deadline = std::time::Instant::now() + wait;
    while std::time::Instant::now() < deadline {
        // Serves the error callback; then asks for metadata, which needs a working link.
        producer.poll(Duration::from_millis(100));
        if let Some((code, reason)) = producer.context().take() {
            return Err(refused(code, reason, cfg));
        }
        if producer
            .client()
            .fetch_metadata(None, Duration::from_millis(400))
            .is_ok()
        {
            return Ok(());
        }
    }
    tracing::warn!(brokers = %cfg.brokers, "Kafka did not answer within {wait:?} at start; the node starts and /readyz reports Kafka until it does");
    Ok(())
}

/// Keeps the first TLS or SASL error librdkafka reports.
#[derive(Default)]
struct FirstRefusal(parking_lot::Mutex<Option<(RDKafkaErrorCode, String)>>);

impl FirstRefusal {
    fn take(&self) -> Option<(RDKafkaErrorCode, String)> {
        self.0.lock().take()
    }
}

impl ClientContext for FirstRefusal {
    fn error(&self, error: KafkaError, reason: &str) {
        let Some(code) = error.rdkafka_error_code() else {
            return;
        };
        // A broker that rejects the client certificate sends a TLS alert, which librdkafka
        // reports as a transport failure naming OpenSSL.
        let refused = matches!(
            code,
            RDKafkaErrorCode::SSL | RDKafkaErrorCode::Authentication
        ) || reason.contains("SSL routines");
        if refused {
            self.0.lock().get_or_insert((code, reason.to_owned()));
        }
    }
}

impl ProducerContext for FirstRefusal {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &DeliveryResult<'_>, _: ()) {}
}

/// A refusal as an error naming the key most likely at fault, from what librdkafka said.
fn refused(code: RDKafkaErrorCode, reason: String, cfg: &KafkaConfig) -> StartError {
    let key = match code {
        RDKafkaErrorCode::Authentication
            if cfg.sasl_mechanism == Some(SaslMechanism::OauthBearer) =>
        {
            "kafka.sasl_oauthbearer_token_endpoint_url"
        }
        RDKafkaErrorCode::Authentication => "kafka.sasl_password",
        _ if reason.contains("certificate verify failed") => "kafka.ssl_ca_location",
        _ => "kafka.ssl_certificate_location",
    };
    StartError::Refused {
        key,
        reason: format!("the brokers refused this node: {reason}"),
    }
}

//! The check at start that the brokers accept this node's TLS and SASL settings: a refusal
//! is a configuration error naming its key, never a node that runs without Kafka.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::ClientContext;

use super::client_config;
use crate::config::{KafkaConfig, SaslMechanism};

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
    let producer: BaseProducer<FirstRefusal> = client_config(cfg)
        .create_with_context(FirstRefusal::default())
        .map_err(super::without_secrets)?;
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

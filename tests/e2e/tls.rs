//! Managed services: a cluster reaches Kafka over SASL_SSL (SCRAM) or mutual TLS, Redis over
//! TLS with an ACL user, and PostgreSQL with `sslmode=verify-full`, and delivers. A CA that
//! does not verify a server, a wrong password or a missing client certificate stops the node
//! at start with a message naming the key: never a silent fall-back to plaintext.
//!
//! The servers come from `./scripts/test` (`scripts/servers/`): Apache Kafka's SASL_SSL and
//! SSL listeners, a TLS-only Redis and a `hostssl`-only PostgreSQL, all with certificates
//! of one throw-away CA in `FANOUT_TEST_TLS_DIR`.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);

/// A variable `./scripts/test` sets; fails (never skips) without it.
fn server(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run ./scripts/test, which starts the TLS test servers")
    })
}

/// A file of the test PKI (`scripts/servers/tls-ca`).
fn pki(name: &str) -> String {
    format!("{}/{name}", server("FANOUT_TEST_TLS_DIR"))
}

/// Kafka over SASL_SSL with SCRAM-SHA-512, trusting the test CA.
fn kafka_sasl_ssl() -> Vec<(&'static str, String)> {
    vec![
        (
            "FANOUT__KAFKA__BROKERS",
            server("FANOUT_TEST_KAFKA_SASL_SSL"),
        ),
        ("FANOUT__KAFKA__SECURITY_PROTOCOL", "sasl_ssl".into()),
        ("FANOUT__KAFKA__SASL_MECHANISM", "SCRAM-SHA-512".into()),
        (
            "FANOUT__KAFKA__SASL_USERNAME",
            server("FANOUT_TEST_KAFKA_SASL_USER"),
        ),
        (
            "FANOUT__KAFKA__SASL_PASSWORD",
            server("FANOUT_TEST_KAFKA_SASL_PASSWORD"),
        ),
        ("FANOUT__KAFKA__SSL_CA_LOCATION", pki("ca.pem")),
    ]
}

/// Kafka over TLS with a client certificate whose key is encrypted.
fn kafka_mutual_tls() -> Vec<(&'static str, String)> {
    vec![
        ("FANOUT__KAFKA__BROKERS", server("FANOUT_TEST_KAFKA_SSL")),
        ("FANOUT__KAFKA__SECURITY_PROTOCOL", "ssl".into()),
        ("FANOUT__KAFKA__SSL_CA_LOCATION", pki("ca.pem")),
        ("FANOUT__KAFKA__SSL_CERTIFICATE_LOCATION", pki("client.pem")),
        ("FANOUT__KAFKA__SSL_KEY_LOCATION", pki("client-enc.key")),
        ("FANOUT__KAFKA__SSL_KEY_PASSWORD", "keypass".into()),
    ]
}

/// Redis over TLS as the ACL user, trusting the test CA.
fn redis_tls() -> Vec<(&'static str, String)> {
    vec![
        ("FANOUT__REDIS__URL", server("FANOUT_TEST_REDIS_TLS")),
        ("FANOUT__REDIS__TLS_CA_FILE", pki("ca.pem")),
    ]
}

/// PostgreSQL as `fanout_mtls`, which must show a client certificate as well as a password.
fn postgres_mutual_tls() -> String {
    let url = server("FANOUT_TEST_DATABASE_TLS_URL").replacen("fanout:", "fanout_mtls:", 1);
    format!(
        "{url}&sslcert={}&sslkey={}",
        pki("client.pem"),
        pki("client.key")
    )
}

fn options(env: Vec<(&'static str, String)>, database_url: String) -> Options {
    let mut options = Options {
        database_url: Some(database_url),
        ..Options::default()
    };
    for (key, value) in env {
        options = options.with(key, &value);
    }
    options
}

/// alice on node 1 switches `marketing` on (a write to the database), then gets a message
/// produced while she is connected: Kafka, Redis and PostgreSQL all work over TLS.
async fn delivers_across_nodes(cluster: &TestCluster) {
    let mut alice = cluster.connect(1, "alice", "").await;
    alice
        .send_json(json!({"t":"prefs.set","prefs":{"marketing":true}}))
        .await;
    loop {
        let frame = alice.next_frame(WAIT).await.expect("prefs frame");
        if frame["t"] == "prefs" {
            assert_eq!(frame["prefs"]["marketing"], true);
            break;
        }
    }
    cluster
        .producer
        .send("alice", for_user("alice", "marketing", "over tls"))
        .await;
    let msg = alice.expect_msg(WAIT).await;
    assert_eq!(msg["data"]["text"], "over tls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_sasl_ssl_scram_tls_redis_with_an_acl_user_and_verify_full_postgres_delivers(
) {
    let mut env = kafka_sasl_ssl();
    env.extend(redis_tls());
    let database = server("FANOUT_TEST_DATABASE_TLS_URL");
    let cluster = TestCluster::start_with(2, options(env, database)).await;
    delivers_across_nodes(&cluster).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_over_sasl_ssl_plain_as_confluent_cloud_asks_delivers() {
    let mut env = kafka_sasl_ssl();
    env.push(("FANOUT__KAFKA__SASL_MECHANISM", "PLAIN".into()));
    env.extend(redis_tls());
    let database = server("FANOUT_TEST_DATABASE_TLS_URL");
    let cluster = TestCluster::start_with(1, options(env, database)).await;
    let mut bo = cluster.connect(0, "bo", "").await;
    cluster
        .producer
        .send("bo", for_user("bo", "robot.reply", "plain"))
        .await;
    assert_eq!(bo.expect_msg(WAIT).await["data"]["text"], "plain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_mutual_tls_to_kafka_redis_and_postgres_delivers() {
    let mut env = kafka_mutual_tls();
    env.extend(redis_tls());
    env.push(("FANOUT__REDIS__TLS_CERT_FILE", pki("client.pem")));
    env.push(("FANOUT__REDIS__TLS_KEY_FILE", pki("client.key")));
    let cluster = TestCluster::start_with(2, options(env, postgres_mutual_tls())).await;
    delivers_across_nodes(&cluster).await;
}

/// One node with `env` over a working plaintext setup, which must stop at start: its log.
fn node_refused_at_start(env: &[(&str, String)]) -> String {
    expect_refused_at_start(spawn_lone_node(env, None, free_port(), &database_url()))
}

#[track_caller]
fn assert_names(log: &str, key: &str, secret: &str) {
    assert!(log.contains(key), "the log should name `{key}`:\n{log}");
    assert!(
        !log.contains(secret),
        "the log shows the secret {secret}:\n{log}"
    );
}

#[test]
fn a_ca_that_does_not_verify_the_server_stops_the_node_at_start_naming_the_key() {
    let password = server("FANOUT_TEST_KAFKA_SASL_PASSWORD");
    let wrong = pki("other-ca.pem");
    let mut kafka = kafka_sasl_ssl();
    kafka.push(("FANOUT__KAFKA__SSL_CA_LOCATION", wrong.clone()));
    assert_names(
        &node_refused_at_start(&kafka),
        "kafka.ssl_ca_location",
        &password,
    );

    let redis = [
        ("FANOUT__REDIS__URL", server("FANOUT_TEST_REDIS_TLS")),
        ("FANOUT__REDIS__TLS_CA_FILE", wrong.clone()),
    ];
    assert_names(
        &node_refused_at_start(&redis),
        "redis.tls_ca_file",
        "fanout-secret",
    );

    let database = server("FANOUT_TEST_DATABASE_TLS_URL").replace(&pki("ca.pem"), &wrong);
    let log = node_refused_at_start(&[("FANOUT__DATABASE__URL", database)]);
    assert_names(&log, "database.url", "fanout-secret");
}

#[test]
fn a_wrong_password_or_a_missing_client_certificate_stops_the_node_naming_the_key() {
    let mut scram = kafka_sasl_ssl();
    scram.push(("FANOUT__KAFKA__SASL_PASSWORD", "not-the-password".into()));
    assert_names(
        &node_refused_at_start(&scram),
        "kafka.sasl_password",
        "not-the-password",
    );

    let no_certificate: Vec<_> = kafka_mutual_tls()
        .into_iter()
        .filter(|(key, _)| !key.contains("CERTIFICATE") && !key.contains("SSL_KEY"))
        .collect();
    assert_names(
        &node_refused_at_start(&no_certificate),
        "kafka.ssl_certificate_location",
        "keypass",
    );

    let wrong_acl_password = [
        (
            "FANOUT__REDIS__URL",
            server("FANOUT_TEST_REDIS_TLS").replace("fanout-secret", "not-the-acl-password"),
        ),
        ("FANOUT__REDIS__TLS_CA_FILE", pki("ca.pem")),
    ];
    let log = node_refused_at_start(&wrong_acl_password);
    assert_names(&log, "redis.url", "not-the-acl-password");
    assert!(log.contains("WRONGPASS"), "{log}");
}

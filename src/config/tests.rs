//! Unit tests of configuration loading and validation.

use super::*;
use std::time::Duration;

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
    assert_eq!(
        s.kafka.upstream_topic, "fanout.upstream",
        "ask works in the demo"
    );
    let s = from_toml("[server]\nlisten='0.0.0.0:8080'").unwrap();
    assert_eq!(s.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(s.server.allowed_origins, EMBEDDED_ALLOWED_ORIGINS);
    let s = from_toml("[server]\nallowed_origins=['https://lan.example']").unwrap();
    assert_eq!(s.server.allowed_origins, ["https://lan.example"]);
    let s = from_toml("[server]\nallowed_origins=[]").unwrap();
    assert!(s.server.allowed_origins.is_empty(), "explicitly empty: any");
    assert!(
        ServerConfig::default().allowed_origins.is_empty(),
        "production default: any"
    );
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
    let s = from_toml("[auth]\njwt_secret='s'\n[heartbeat]\ninterval='2s'\ntimeout='1m'").unwrap();
    assert_eq!(s.heartbeat.interval, Duration::from_secs(2));
    assert_eq!(s.heartbeat.timeout, Duration::from_secs(60));
}

#[test]
fn errors_name_the_key() {
    let err = from_toml("[auth]\njwt_secret='s'\n[server]\nmax_connections=0").unwrap_err();
    assert!(err.to_string().contains("server.max_connections"), "{err}");
    let err = from_toml("[auth]\njwt_secret='s'\n[server]\nmax_connections='lots'").unwrap_err();
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

/// A file of `tests/fixtures/tls`.
fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/tls/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A cluster configuration with `extra` TOML appended (its `[redis]` or `[database]`
/// replacing the plain ones).
fn cluster(extra: &str) -> Result<Settings, ConfigError> {
    let mut text = "[auth]\njwt_secret='s'\n".to_owned();
    if !extra.contains("[redis]") {
        text.push_str("[redis]\nurl='redis://r:6379'\n");
    }
    if !extra.contains("[database]") {
        text.push_str("[database]\nurl='postgres://p/db'\n");
    }
    from_toml(&(text + extra))
}

fn kafka(extra: &str) -> Result<Settings, ConfigError> {
    cluster(&format!("[kafka]\nbrokers='k:9092'\n{extra}"))
}

#[track_caller]
fn refused_naming(result: Result<Settings, ConfigError>, key: &str) -> String {
    let err = result.expect_err("must be refused").to_string();
    assert!(err.contains(key), "error should name `{key}`: {err}");
    err
}

#[test]
fn kafka_sasl_ssl_with_scram_and_a_ca_file_is_accepted() {
    let s = kafka(&format!(
        "security_protocol='sasl_ssl'\nsasl_mechanism='SCRAM-SHA-512'\nsasl_username='u'\nsasl_password='p'\nssl_ca_location='{}'",
        fixture("ca.pem")
    ))
    .unwrap();
    assert_eq!(s.kafka.security_protocol, SecurityProtocol::SaslSsl);
    assert_eq!(s.kafka.sasl_mechanism, Some(SaslMechanism::ScramSha512));
}

#[test]
fn kafka_mutual_tls_checks_the_key_against_the_certificate() {
    let mtls = |key: &str, password: &str| {
        kafka(&format!(
            "security_protocol='ssl'\nssl_ca_location='{}'\nssl_certificate_location='{}'\nssl_key_location='{}'\nssl_key_password='{password}'",
            fixture("ca.pem"),
            fixture("client.pem"),
            fixture(key)
        ))
    };
    mtls("client.key", "").unwrap();
    mtls("client-enc.key", "keypass").unwrap();
    refused_naming(mtls("client-enc.key", ""), "kafka.ssl_key_location");
    let err = refused_naming(mtls("client-enc.key", "wrong"), "kafka.ssl_key_location");
    assert!(err.contains("kafka.ssl_key_password"), "{err}");
    let err = refused_naming(mtls("other.key", ""), "kafka.ssl_key_location");
    assert!(err.contains("not the key of the certificate"), "{err}");
    refused_naming(
        kafka(&format!(
            "security_protocol='ssl'\nssl_certificate_location='{}'",
            fixture("client.pem")
        )),
        "kafka.ssl_key_location",
    );
}

#[test]
fn a_missing_or_unreadable_tls_file_is_refused_naming_its_key() {
    refused_naming(
        kafka("security_protocol='ssl'\nssl_ca_location='/nonexistent/ca.pem'"),
        "kafka.ssl_ca_location",
    );
    refused_naming(
        kafka(&format!(
            "security_protocol='ssl'\nssl_ca_location='{}'",
            fixture("client.key")
        )),
        "kafka.ssl_ca_location",
    );
    refused_naming(
        cluster("[redis]\nurl='rediss://r:6380'\ntls_ca_file='/nonexistent/ca.pem'"),
        "redis.tls_ca_file",
    );
}

#[test]
fn settings_that_would_be_ignored_are_refused_never_plaintext_by_surprise() {
    let ca = fixture("ca.pem");
    refused_naming(
        kafka(&format!("ssl_ca_location='{ca}'")),
        "kafka.ssl_ca_location",
    );
    refused_naming(
        kafka("security_protocol='ssl'\nsasl_mechanism='PLAIN'"),
        "kafka.sasl_mechanism",
    );
    refused_naming(
        kafka("security_protocol='sasl_ssl'\nsasl_username='u'\nsasl_password='p'"),
        "kafka.sasl_mechanism",
    );
    refused_naming(
        kafka("security_protocol='sasl_ssl'\nsasl_mechanism='SCRAM-SHA-256'\nsasl_username='u'"),
        "kafka.sasl_password",
    );
    refused_naming(
        kafka("[kafka.options]\n'security.protocol'='SSL'"),
        "kafka.options",
    );
    refused_naming(
        from_toml("[kafka]\nsecurity_protocol='ssl'"),
        "kafka.security_protocol",
    );
    refused_naming(
        cluster(&format!(
            "[redis]\nurl='redis://r:6379'\ntls_ca_file='{ca}'"
        )),
        "redis.tls_ca_file",
    );
    let err = refused_naming(
        cluster(&format!(
            "[database]\nurl='postgres://p/db?sslmode=require&sslrootcert={ca}'"
        )),
        "database.url",
    );
    assert!(err.contains("verify-ca"), "{err}");
    refused_naming(
        cluster(&format!(
            "[database]\nurl='postgres://p/db?sslcert={}&sslkey={}'",
            fixture("client.pem"),
            fixture("client.key")
        )),
        "database.url",
    );
}

#[test]
fn oauthbearer_needs_a_client_and_a_token_endpoint() {
    let base = "security_protocol='sasl_ssl'\nsasl_mechanism='OAUTHBEARER'";
    refused_naming(
        kafka(&format!(
            "{base}\nsasl_username='id'\nsasl_password='secret'"
        )),
        "kafka.sasl_oauthbearer_token_endpoint_url",
    );
    kafka(&format!(
        "{base}\nsasl_username='id'\nsasl_password='secret'\nsasl_oauthbearer_token_endpoint_url='https://idp.example/token'"
    ))
    .unwrap();
}

#[test]
fn redis_and_postgres_tls_settings_are_accepted() {
    let s = cluster(&format!(
        "[redis]\nurl='rediss-sentinel://u:p@s1:26379,s2:26379/main'\ntls_ca_file='{}'\ntls_cert_file='{}'\ntls_key_file='{}'",
        fixture("ca.pem"),
        fixture("client.pem"),
        fixture("client.key")
    ))
    .unwrap();
    assert_eq!(
        RedisScheme::of(&s.redis.url).unwrap(),
        RedisScheme::SentinelTls
    );
    cluster(&format!(
        "[database]\nurl='postgres://u:p@h/db?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}'",
        fixture("ca.pem"),
        fixture("client.pem"),
        fixture("client.key")
    ))
    .unwrap();
    refused_naming(cluster("[redis]\nurl='memcached://h:1'"), "redis.url");
}

#[test]
fn redis_cluster_urls_are_accepted_and_prefixes_with_braces_refused() {
    let s = cluster("[redis]\nurl='redis-cluster://u:p@10.0.0.1:7000,10.0.0.2:7001'").unwrap();
    let scheme = RedisScheme::of(&s.redis.url).unwrap();
    assert_eq!(scheme, RedisScheme::Cluster);
    assert!(scheme.is_cluster() && !scheme.uses_tls());
    let s = cluster(&format!(
        "[redis]\nurl='rediss-cluster://h:7000'\ntls_ca_file='{}'",
        fixture("ca.pem")
    ))
    .unwrap();
    let scheme = RedisScheme::of(&s.redis.url).unwrap();
    assert!(scheme.is_cluster() && scheme.uses_tls());
    refused_naming(
        cluster("[redis]\nurl='redis-cluster://h:7000'\ntls_ca_file='/x/ca.pem'"),
        "redis.tls_ca_file",
    );
    for bad in ["{fanout}", "a{b", "a}b"] {
        refused_naming(
            cluster(&format!(
                "[redis]\nurl='redis-cluster://h:7000'\nprefix='{bad}'"
            )),
            "redis.prefix",
        );
    }
    // One server or Sentinel: no hash tag is added, an existing prefix keeps working.
    cluster("[redis]\nurl='redis://h:6379'\nprefix='a{b}'").unwrap();
}

#[test]
fn masked_toml_hides_kafka_secrets() {
    let s = kafka(&format!(
        "security_protocol='sasl_ssl'\nsasl_mechanism='PLAIN'\nsasl_username='u'\nsasl_password='hunter2'\nssl_certificate_location='{}'\nssl_key_location='{}'\nssl_key_password='keypass'",
        fixture("client.pem"),
        fixture("client-enc.key")
    ))
    .unwrap();
    let text = s.to_masked_toml();
    assert!(
        !text.contains("hunter2") && !text.contains("keypass"),
        "{text}"
    );
}

#[test]
fn receipts_topic_is_off_by_default_and_must_be_a_topic_name() {
    assert_eq!(kafka("").unwrap().kafka.receipts_topic, "");
    let on = kafka("receipts_topic='fanout.receipts_v1-a'").unwrap();
    assert_eq!(on.kafka.receipts_topic, "fanout.receipts_v1-a");
    for bad in ["has space", "a/b", "..", &"x".repeat(250)] {
        refused_naming(
            kafka(&format!("receipts_topic='{bad}'")),
            "kafka.receipts_topic",
        );
    }
    refused_naming(
        kafka("topics=['in','r']\nreceipts_topic='r'"),
        "kafka.receipts_topic",
    );
}

#[test]
fn the_presence_topic_is_not_one_of_the_input_topics() {
    let s = kafka("topics=['in']\npresence_topic='fanout.presence'").unwrap();
    assert_eq!(s.kafka.presence_topic, "fanout.presence");
    assert_eq!(
        kafka("").unwrap().kafka.presence_topic,
        "",
        "off by default"
    );
    refused_naming(
        kafka("topics=['in','p']\npresence_topic='p'"),
        "kafka.presence_topic",
    );
    refused_naming(kafka("presence_topic=' p'"), "kafka.presence_topic");
}

#[test]
fn bus_routing_is_broadcast_by_default_and_routed_needs_redis() {
    let s = cluster("").unwrap();
    assert_eq!(s.bus.routing, Routing::Broadcast);
    assert!(s.to_masked_toml().contains("routing = \"broadcast\""));
    let s = cluster("[bus]\nrouting='routed'").unwrap();
    assert_eq!(s.bus.routing, Routing::Routed);
    assert!(s.to_masked_toml().contains("routing = \"routed\""));
    refused_naming(cluster("[bus]\nrouting='sometimes'"), "routing");
    // The embedded default's in-process bus is one node: nothing to route.
    let err = refused_naming(from_toml("[bus]\nrouting='routed'"), "bus.routing");
    assert!(err.contains("redis.url"), "{err}");
}

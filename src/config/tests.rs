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

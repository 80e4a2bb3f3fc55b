//! `redis.url` and the `redis.tls_*` files → a fred [`Config`] (DESIGN §7).
//!
//! `redis://` and `rediss://` name one server; `redis-sentinel://` and `rediss-sentinel://`
//! name sentinels and, as the path, the service whose primary they report;
//! `redis-cluster://` and `rediss-cluster://` name nodes of a Redis Cluster (any one that
//! answers is enough: the others are discovered with `CLUSTER SLOTS`). The user and
//! password of the URL authenticate to the servers and to the sentinels alike.
//!
//! With TLS every server (and sentinel) must present a certificate that verifies against
//! `redis.tls_ca_file` (only it, when given) or the system trust store, for the host name or
//! IP address connected to. Nothing falls back to plaintext: a handshake that fails is a
//! connection that fails. `config` has already checked the URL and the files.

use fred::prelude::*;
use fred::types::config::{
    ClusterDiscoveryPolicy, Server, ServerConfig, TlsConfig, TlsConnector, TlsHostMapping,
};
use openssl::pkey::PKey;
use openssl::x509::X509;

use crate::bus::BusError;
use crate::config::{RedisConfig, RedisScheme};

/// Sentinel's port when a host gives none.
const SENTINEL_PORT: u16 = 26379;

/// The client configuration `cfg` describes.
pub fn client_config(cfg: &RedisConfig) -> Result<Config, BusError> {
    let scheme = RedisScheme::of(&cfg.url).map_err(|e| BusError::Config(e.to_string()))?;
    let mut config = match scheme {
        RedisScheme::Plain | RedisScheme::Tls => Config::from_url(&cfg.url)?,
        RedisScheme::Sentinel | RedisScheme::SentinelTls => sentinel_config(&cfg.url)?,
        RedisScheme::Cluster | RedisScheme::ClusterTls => cluster_config(&cfg.url)?,
    };
    config.tls = match scheme.uses_tls() {
        // A cluster's nodes are reached at the addresses `CLUSTER SLOTS` reports (IPs):
        // their certificates are checked for the host the URL named.
        true if scheme.is_cluster() => Some(TlsConfig {
            connector: tls_connector(cfg)?,
            hostnames: TlsHostMapping::DefaultHost,
        }),
        true => Some(tls_connector(cfg)?.into()),
        false => None,
    };
    Ok(config)
}

/// `redis-cluster://[user:pass@]host:port[,host:port…]`: every host with its port, nothing
/// after them (no database: a cluster has only database 0).
fn cluster_config(url: &str) -> Result<Config, BusError> {
    let bad = |why: &str| BusError::Config(format!("redis.url: {why}"));
    let (credentials, hosts) = split_credentials(url);
    let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
    if hosts.contains(['/', '?']) {
        return Err(bad(
            "a Redis Cluster URL lists host:port,host:port… and nothing else (no /database, no ?options)",
        ));
    }
    let hosts = hosts
        .split(',')
        .map(|host| {
            parse_host(host, None).ok_or_else(|| bad(&format!("`{host}` is not host:port")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let auth = credentials_config(credentials)?;
    Ok(Config {
        // Also tries the nodes of the last known slot map, so a URL naming a node that
        // died still finds the cluster.
        server: ServerConfig::Clustered {
            hosts,
            policy: ClusterDiscoveryPolicy::UseCache,
        },
        username: auth.username,
        password: auth.password,
        ..Config::default()
    })
}

/// `scheme://[credentials@]rest` → (credentials, rest).
fn split_credentials(url: &str) -> (Option<&str>, &str) {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    match rest.rsplit_once('@') {
        Some((credentials, rest)) => (Some(credentials), rest),
        None => (None, rest),
    }
}

/// The user and password of `user:pass`, decoded as in any `redis://` URL.
fn credentials_config(credentials: Option<&str>) -> Result<Config, BusError> {
    let auth_url = match credentials {
        Some(c) => format!("redis://{c}@localhost"),
        None => "redis://localhost".to_owned(),
    };
    Ok(Config::from_url(&auth_url)?)
}

/// `redis-sentinel://[user:pass@]host[:port][,host[:port]…]/<service name>`.
fn sentinel_config(url: &str) -> Result<Config, BusError> {
    let bad = |why: &str| BusError::Config(format!("redis.url: {why}"));
    let (credentials, rest) = split_credentials(url);
    let (hosts, service) = rest
        .split_once('/')
        .ok_or_else(|| bad("a Sentinel URL ends with /<service name>"))?;
    let service = service.trim_end_matches('/');
    if service.is_empty() || service.contains(['/', '?']) {
        return Err(bad("a Sentinel URL ends with /<service name>"));
    }
    let hosts = hosts
        .split(',')
        .map(|host| {
            parse_host(host, Some(SENTINEL_PORT))
                .ok_or_else(|| bad(&format!("`{host}` is not host[:port]")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let auth = credentials_config(credentials)?;
    Ok(Config {
        server: ServerConfig::Sentinel {
            hosts,
            service_name: service.to_owned(),
        },
        username: auth.username,
        password: auth.password,
        ..Config::default()
    })
}

/// `host:port`, `[v6]:port`, or (with a `default_port`) a host alone.
fn parse_host(host: &str, default_port: Option<u16>) -> Option<Server> {
    if host.is_empty() {
        return None;
    }
    let (name, port) = match host.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') || name.starts_with('[') => {
            (name, port.parse().ok()?)
        }
        _ => (host, default_port?),
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    (!name.is_empty()).then(|| Server::new(name, port))
}

/// OpenSSL through native-tls, trusting `redis.tls_ca_file` alone when it is given, and
/// presenting `redis.tls_cert_file` when it is given.
fn tls_connector(cfg: &RedisConfig) -> Result<TlsConnector, BusError> {
    let tls = |key: &str, e: &dyn std::fmt::Display| BusError::Config(format!("{key}: {e}"));
    let mut builder = native_tls::TlsConnector::builder();
    if !cfg.tls_ca_file.is_empty() {
        let key = "redis.tls_ca_file";
        let pem = std::fs::read(&cfg.tls_ca_file).map_err(|e| tls(key, &e))?;
        builder.disable_built_in_roots(true);
        for cert in X509::stack_from_pem(&pem).map_err(|e| tls(key, &e))? {
            let der = cert.to_der().map_err(|e| tls(key, &e))?;
            let cert = native_tls::Certificate::from_der(&der).map_err(|e| tls(key, &e))?;
            builder.add_root_certificate(cert);
        }
    }
    if !cfg.tls_cert_file.is_empty() {
        let key = "redis.tls_key_file";
        let cert = std::fs::read(&cfg.tls_cert_file).map_err(|e| tls("redis.tls_cert_file", &e))?;
        let pem = std::fs::read(&cfg.tls_key_file).map_err(|e| tls(key, &e))?;
        // native-tls wants PKCS#8; `openssl genrsa` and others still write PKCS#1.
        let pkcs8 = PKey::private_key_from_pem(&pem)
            .and_then(|k| k.private_key_to_pem_pkcs8())
            .map_err(|e| tls(key, &e))?;
        let identity = native_tls::Identity::from_pkcs8(&cert, &pkcs8).map_err(|e| tls(key, &e))?;
        builder.identity(identity);
    }
    let connector = builder.build().map_err(|e| tls("redis.url", &e))?;
    Ok(connector.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hosts, service name, user and password.
    type Parsed = (Vec<(String, u16)>, String, Option<String>, Option<String>);

    fn sentinel(url: &str) -> Parsed {
        let config = sentinel_config(url).unwrap();
        let ServerConfig::Sentinel {
            hosts,
            service_name,
        } = config.server
        else {
            panic!("not a sentinel config");
        };
        let hosts = hosts
            .into_iter()
            .map(|s| (s.host.to_string(), s.port))
            .collect();
        (hosts, service_name, config.username, config.password)
    }

    #[test]
    fn sentinel_urls_name_hosts_service_and_credentials() {
        let (hosts, service, user, password) =
            sentinel("redis-sentinel://app:p%40ss@10.0.0.1:26380,sentinel-b,[::1]:5000/mymaster");
        assert_eq!(
            hosts,
            [
                ("10.0.0.1".to_owned(), 26380),
                ("sentinel-b".to_owned(), 26379),
                ("::1".to_owned(), 5000)
            ]
        );
        assert_eq!(service, "mymaster");
        assert_eq!(user.as_deref(), Some("app"));
        assert_eq!(password.as_deref(), Some("p@ss"), "percent-decoded");
        let (_, _, user, password) = sentinel("redis-sentinel://h:1/m");
        assert_eq!((user, password), (None, None));
    }

    /// Hosts, user and password of a cluster URL.
    fn cluster(url: &str) -> (Vec<(String, u16)>, Option<String>, Option<String>) {
        let config = cluster_config(url).unwrap();
        let ServerConfig::Clustered { hosts, policy } = config.server else {
            panic!("not a cluster config");
        };
        assert_eq!(policy, ClusterDiscoveryPolicy::UseCache);
        let hosts = hosts
            .into_iter()
            .map(|s| (s.host.to_string(), s.port))
            .collect();
        (hosts, config.username, config.password)
    }

    #[test]
    fn cluster_urls_name_every_node_and_the_credentials() {
        let (hosts, user, password) =
            cluster("redis-cluster://app:p%40ss@10.0.0.1:7000,node-b:7001,[::1]:7002");
        assert_eq!(
            hosts,
            [
                ("10.0.0.1".to_owned(), 7000),
                ("node-b".to_owned(), 7001),
                ("::1".to_owned(), 7002)
            ]
        );
        assert_eq!(user.as_deref(), Some("app"));
        assert_eq!(password.as_deref(), Some("p@ss"), "percent-decoded");
        let (hosts, user, password) = cluster("rediss-cluster://h:1/");
        assert_eq!(hosts, [("h".to_owned(), 1)]);
        assert_eq!((user, password), (None, None));
        let (_, user, password) = cluster("redis-cluster://:secret@h:1");
        assert_eq!((user, password.as_deref()), (None, Some("secret")));
    }

    #[test]
    fn cluster_urls_without_ports_or_with_a_database_are_refused() {
        for url in [
            "redis-cluster://h",
            "redis-cluster://h:1,h2",
            "redis-cluster://h:1,,h:2",
            "redis-cluster://h:x",
            "redis-cluster://h:1/0",
            "redis-cluster://h:1?node=h:2",
            "redis-cluster://",
        ] {
            let err = cluster_config(url).unwrap_err().to_string();
            assert!(err.contains("redis.url"), "{url}: {err}");
        }
    }

    #[test]
    fn cluster_tls_checks_certificates_for_the_host_named() {
        let cfg = RedisConfig {
            url: "rediss-cluster://h:7000".into(),
            ..RedisConfig::default()
        };
        let config = client_config(&cfg).unwrap();
        assert!(config.server.is_clustered());
        let tls = config.tls.expect("TLS on");
        assert_eq!(tls.hostnames, TlsHostMapping::DefaultHost);
    }

    #[test]
    fn sentinel_urls_without_a_service_or_with_a_bad_host_are_refused() {
        for url in [
            "redis-sentinel://h:1",
            "redis-sentinel://h:1/",
            "redis-sentinel://h:x/m",
            "redis-sentinel://h:1,,h:2/m",
        ] {
            let err = sentinel_config(url).unwrap_err().to_string();
            assert!(err.contains("redis.url"), "{url}: {err}");
        }
    }
}

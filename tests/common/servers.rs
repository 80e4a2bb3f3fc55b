//! The servers the server-backed tests need, one place for each address: Kafka
//! (`FANOUT_TEST_KAFKA`), Redis (`FANOUT_TEST_REDIS`, default the local one), a Redis
//! Cluster (`FANOUT_TEST_REDIS_CLUSTER`, started by `./scripts/test`) and PostgreSQL
//! (`FANOUT_TEST_DATABASE_URL`, default the local one). Each is checked with a TCP connect
//! before first use, so a run without them (`cargo test` on a fresh clone) fails each such
//! test within seconds with one line saying how to get them, instead of waiting on
//! timeouts. Never a skip. Shared by `tests/e2e`, `tests/bus.rs` and `tests/store.rs`.

#![allow(dead_code)]

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

/// How long a server gets to accept the check's connection.
const CONNECT: Duration = Duration::from_secs(3);

/// The Kafka broker's plaintext listener, `host:port`.
pub fn kafka_addr() -> String {
    let addr = std::env::var("FANOUT_TEST_KAFKA")
        .unwrap_or_else(|_| missing("Kafka", None, "FANOUT_TEST_KAFKA=host:port"));
    let first = addr.split(',').next().unwrap_or_default();
    check("Kafka", first, "FANOUT_TEST_KAFKA=host:port");
    addr
}

/// The Redis URL.
pub fn redis_url() -> String {
    let url =
        std::env::var("FANOUT_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    check(
        "Redis",
        &host_port(&url, 6379),
        "FANOUT_TEST_REDIS=redis://host:port",
    );
    url
}

/// The Redis Cluster's URL, `redis-cluster://host:port,host:port…` (DESIGN §7).
pub fn redis_cluster_url() -> String {
    let variable = "FANOUT_TEST_REDIS_CLUSTER=redis-cluster://host:port,host:port…";
    let url = std::env::var("FANOUT_TEST_REDIS_CLUSTER")
        .unwrap_or_else(|_| missing("a Redis Cluster", None, variable));
    let first = url
        .split_once("://")
        .map_or(url.as_str(), |(_, rest)| rest)
        .split(',')
        .next()
        .unwrap_or_default();
    check(
        "a Redis Cluster",
        &host_port(&format!("redis://{first}"), 6379),
        variable,
    );
    url
}

/// The Redis URL the end-to-end nodes use: the Redis Cluster's when
/// `FANOUT_TEST_REDIS_MODE=cluster` (how `./scripts/test` runs the delivery, resume and
/// failure scenarios a second time), else [`redis_url`].
pub fn nodes_redis_url() -> String {
    match std::env::var("FANOUT_TEST_REDIS_MODE").as_deref() {
        Ok("cluster") => redis_cluster_url(),
        Ok("") | Ok("single") | Err(_) => redis_url(),
        Ok(other) => panic!("FANOUT_TEST_REDIS_MODE={other}: expected `cluster` or `single`"),
    }
}

/// `bus.routing` of the nodes the e2e tests start and of the buses tests/routing.rs
/// builds: `FANOUT_TEST_BUS_ROUTING=routed` (how `./scripts/test` runs the delivery, resume
/// and failure scenarios and the property test a second time), else `broadcast`.
pub fn bus_routing() -> &'static str {
    match std::env::var("FANOUT_TEST_BUS_ROUTING").as_deref() {
        Ok("routed") => "routed",
        Ok("") | Ok("broadcast") | Err(_) => "broadcast",
        Ok(other) => panic!("FANOUT_TEST_BUS_ROUTING={other}: expected `routed` or `broadcast`"),
    }
}

/// The PostgreSQL URL tests create their databases with.
pub fn database_url() -> String {
    let url = std::env::var("FANOUT_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    check(
        "PostgreSQL",
        &host_port(&url, 5432),
        "FANOUT_TEST_DATABASE_URL=postgres://user:password@host:port/database",
    );
    url
}

/// Fails the test unless something accepts a connection at `addr` (checked once per
/// address and process). An address without a host (a Unix socket) is not checked.
fn check(what: &str, addr: &str, variable: &str) {
    static REACHED: Mutex<Vec<String>> = Mutex::new(Vec::new());
    if addr.starts_with(':') || REACHED.lock().unwrap().iter().any(|a| a == addr) {
        return;
    }
    let reached = addr
        .to_socket_addrs()
        .is_ok_and(|mut addrs| addrs.any(|a| TcpStream::connect_timeout(&a, CONNECT).is_ok()));
    if !reached {
        missing(what, Some(addr), variable);
    }
    REACHED.lock().unwrap().push(addr.to_owned());
}

fn missing(what: &str, addr: Option<&str>, variable: &str) -> ! {
    let at = addr.map_or_else(
        || " (none configured)".to_owned(),
        |a| format!(" (nothing answers at {a})"),
    );
    panic!("this test needs {what}{at}: run ./scripts/test (it starts it), or set {variable}")
}

/// `host:port` of a server URL (`scheme://[user[:password]@]host[:port][/…][?…]`); the
/// credentials never leave this function.
fn host_port(url: &str, default_port: u16) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let has_port = host
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok() && !host.ends_with(']'));
    if has_port {
        host.to_owned()
    } else {
        format!("{host}:{default_port}")
    }
}

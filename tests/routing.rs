//! Property: a message is queued on a connection if and only if its target selects that
//! connection and the user's current preferences accept its type — for random registries,
//! preference sets, connections, preference changes and messages. Checked on one router
//! fed directly, and end to end through a Redis Cluster (`FANOUT_TEST_REDIS_CLUSTER`): two
//! routers ("nodes") subscribed to one bus, messages published by the publish script and
//! preference changes announced on the control channel, which must reach every node in the
//! order they were published. With `FANOUT_TEST_BUS_ROUTING=routed` the two nodes run in
//! routed mode (`bus.routing = "routed"`): each connection's presence entry is written
//! before the case starts, and messages for users reach only the nodes holding them.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use fanout::bus::redis::{BusRouting, RedisBus};
use fanout::bus::{local::LocalBus, Bus, BusMessage, Channel, EventSender, Header, Outgoing};
use fanout::clock::now_ms;
use fanout::config::{RecoveryConfig, RedisConfig};
use fanout::envelope::{Platform, Target};
use fanout::metrics::Metrics;
use fanout::prefs::Change;
use fanout::registry::{Limits, Registry};
use fanout::router::Router;
use fanout::types::TypeRegistry;
use fanout::types::{TypeConfig, TypesConfig, UnknownTypes};
use fred::interfaces::HashesInterface as _;
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

#[path = "common/servers.rs"]
mod servers;

const TYPES: usize = 4; // t0..t3 registered; "u" is not
const USERS: usize = 4;

#[derive(Debug, Clone)]
struct Conn {
    user: usize,
    platform: Option<Platform>,
    tab: Option<&'static str>,
}

#[derive(Debug, Clone)]
enum Op {
    /// A message of type index (TYPES = unregistered) to a target.
    Msg(usize, TargetSpec),
    /// A preference change: user, (type, enabled) choices.
    Change(usize, Vec<(usize, bool)>),
}

#[derive(Debug, Clone)]
enum TargetSpec {
    User(usize, Option<Platform>, Option<&'static str>),
    Users(Vec<usize>),
    Conn(usize),
    All,
}

fn platform() -> impl Strategy<Value = Option<Platform>> {
    prop_oneof![
        Just(None),
        Just(Some(Platform::H5)),
        Just(Some(Platform::Ios)),
        Just(Some(Platform::Android))
    ]
}

fn tab() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![Just(None), Just(Some("a")), Just(Some("b"))]
}

fn target() -> impl Strategy<Value = TargetSpec> {
    prop_oneof![
        (0..USERS, platform(), tab()).prop_map(|(u, p, t)| TargetSpec::User(u, p, t)),
        prop::collection::vec(0..USERS, 1..3).prop_map(TargetSpec::Users),
        (0..10usize).prop_map(TargetSpec::Conn),
        Just(TargetSpec::All),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..=TYPES, target()).prop_map(|(t, to)| Op::Msg(t, to)),
        1 => (0..USERS, prop::collection::vec((0..TYPES, any::<bool>()), 1..3)).prop_map(|(u, c)| Op::Change(u, c)),
    ]
}

fn type_name(t: usize) -> String {
    if t < TYPES {
        format!("t{t}")
    } else {
        "u".into()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn a_message_reaches_exactly_the_connections_its_target_and_preferences_allow(
        defaults in prop::collection::vec(any::<bool>(), TYPES),
        initial in prop::collection::vec(prop::collection::vec(any::<bool>(), TYPES), USERS),
        conns in prop::collection::vec((0..USERS, platform(), tab()).prop_map(|(user, platform, tab)| Conn { user, platform, tab }), 1..8),
        ops in prop::collection::vec(op(), 1..30),
    ) {
        let cfg = TypesConfig {
            registry: (0..TYPES).map(|t| TypeConfig { name: type_name(t), default: defaults[t] }).collect(),
            unknown: UnknownTypes::Deliver,
        };
        let types = Arc::new(TypeRegistry::new(&cfg));
        let metrics = Arc::new(Metrics::new());
        let limits = Limits { max_connections: 100, max_connections_per_user: 100, queue_max_messages: 1000, queue_max_bytes: 1 << 24 };
        let registry = Registry::new(limits, metrics.clone());
        let mut router = Router::new(registry.clone(), metrics, types.clone(), std::sync::Arc::new(LocalBus::default()), None, std::time::Duration::from_secs(600));

        // The model: each user's preferences by type index.
        let mut prefs: Vec<Vec<bool>> = initial.clone();
        let bits = |p: &Vec<bool>| types.apply(0, p.iter().enumerate().map(|(t, e)| (format!("t{t}"), *e)).collect::<Vec<_>>().iter().map(|(n, e)| (n.as_str(), *e)));
        let mut handles = Vec::new();
        for c in &conns {
            let user = format!("user{}", c.user);
            let (guard, handle, rx) = registry.register(&user, c.platform, c.tab.map(Into::into), bits(&prefs[c.user]), 0).unwrap();
            handles.push((guard, handle, rx));
        }
        // The registry holds one preference entry per user: the first connection's bits.
        let mut expected: Vec<Vec<String>> = vec![Vec::new(); conns.len()];
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Change(u, choices) => {
                    for (t, e) in choices {
                        prefs[*u][*t] = *e;
                    }
                    let change = Change {
                        kind: "prefs".into(),
                        user: format!("user{u}"),
                        prefs: (0..TYPES).map(|t| (type_name(t), prefs[*u][t])).collect::<BTreeMap<_, _>>(),
                        ts: now_ms(),
                        version: i as i64,
                    };
                    router.apply_change(&change);
                }
                Op::Msg(t, spec) => {
                    let to = match spec {
                        TargetSpec::User(u, p, tab) => Target::User { user: format!("user{u}"), platform: *p, tab: tab.map(Into::into) },
                        // As on the bus: targets are decoded from JSON.
                        TargetSpec::Users(us) => serde_json::from_value(serde_json::json!({
                            "users": us.iter().map(|u| format!("user{u}")).collect::<Vec<_>>()
                        }))
                        .unwrap(),
                        TargetSpec::Conn(k) => Target::Conn(handles.get(*k).map_or("c-none".into(), |h| h.1.id.to_string())),
                        TargetSpec::All => Target::All,
                    };
                    let frame = format!("msg-{i}");
                    let msg = BusMessage {
                        seq: i as u64 + 1,
                        header: Header { id: format!("id-{i}"), msg_type: type_name(*t), to, ts: now_ms(), ttl_ms: None, at_us: 0, collapse: None },
                        frame: frame.clone().into(),
                    };
                    router.route(&msg);
                    for (k, c) in conns.iter().enumerate() {
                        let selected = match spec {
                            TargetSpec::User(u, p, tab) => c.user == *u && p.is_none_or(|p| c.platform == Some(p)) && tab.is_none_or(|t| c.tab == Some(t)),
                            TargetSpec::Users(us) => us.iter().collect::<HashSet<_>>().contains(&c.user),
                            TargetSpec::Conn(j) => *j == k,
                            TargetSpec::All => true,
                        };
                        let accepted = *t == TYPES || prefs[c.user][*t];
                        if selected && accepted {
                            expected[k].push(frame.clone());
                        }
                    }
                }
            }
        }
        for (k, (_, _, rx)) in handles.iter_mut().enumerate() {
            let got: Vec<String> = std::iter::from_fn(|| rx.try_recv().ok())
                .map(|q| q.frame.to_string())
                .filter(|f| f.starts_with("msg-"))
                .collect();
            prop_assert_eq!(&got, &expected[k], "connection {} ({:?})", k, conns[k]);
        }
    }
}

/// `user{u}`'s preference change number `i` (its version), as a node announces it.
fn change(i: usize, u: usize, prefs: &[bool]) -> Change {
    Change {
        kind: "prefs".into(),
        user: format!("user{u}"),
        prefs: (0..TYPES)
            .map(|t| (type_name(t), prefs[t]))
            .collect::<BTreeMap<_, _>>(),
        ts: now_ms(),
        version: i as i64,
    }
}

/// The frames each connection must get, in order: the model of the property.
fn expected(conns: &[Conn], initial: &[Vec<bool>], ops: &[Op]) -> Vec<Vec<String>> {
    let mut prefs = initial.to_vec();
    let mut expected = vec![Vec::new(); conns.len()];
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Change(u, choices) => {
                for (t, e) in choices {
                    prefs[*u][*t] = *e;
                }
            }
            Op::Msg(t, spec) => {
                for (k, c) in conns.iter().enumerate() {
                    let selected = match spec {
                        TargetSpec::User(u, p, tab) => {
                            c.user == *u
                                && p.is_none_or(|p| c.platform == Some(p))
                                && tab.is_none_or(|t| c.tab == Some(t))
                        }
                        TargetSpec::Users(us) => us.contains(&c.user),
                        TargetSpec::Conn(j) => *j == k,
                        TargetSpec::All => true,
                    };
                    if selected && (*t == TYPES || prefs[c.user][*t]) {
                        expected[k].push(format!("msg-{i}"));
                    }
                }
            }
        }
    }
    expected
}

/// Runs the cluster cases: one runtime for all of them.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
});

const NODES: usize = 2;

/// One case through the Redis Cluster: connection `k` is on node `k % NODES`.
async fn through_a_cluster(
    defaults: &[bool],
    initial: &[Vec<bool>],
    conns: &[Conn],
    ops: &[Op],
) -> Result<(), TestCaseError> {
    let url = servers::redis_cluster_url();
    let prefix = format!("routing-test-{:08x}", rand::random::<u32>());
    let cfg = RedisConfig {
        url,
        prefix,
        ..RedisConfig::default()
    };
    let types_cfg = TypesConfig {
        registry: (0..TYPES)
            .map(|t| TypeConfig {
                name: type_name(t),
                default: defaults[t],
            })
            .collect(),
        unknown: UnknownTypes::Deliver,
    };
    let types = Arc::new(TypeRegistry::new(&types_cfg));
    let limits = Limits {
        max_connections: 100,
        max_connections_per_user: 100,
        queue_max_messages: 1000,
        queue_max_bytes: 1 << 24,
    };
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    let mut buses: Vec<Arc<dyn Bus>> = Vec::new();
    let mut registries = Vec::new();
    let routed = servers::bus_routing() == "routed";
    let mut redis = None;
    for k in 0..NODES {
        let metrics = Arc::new(Metrics::new());
        let routing = if routed {
            BusRouting::Routed {
                node: format!("node-{k}"),
            }
        } else {
            BusRouting::Broadcast
        };
        let bus =
            RedisBus::connect_with(&cfg, &RecoveryConfig::default(), routing, metrics.clone())
                .await
                .expect("the Redis Cluster (./scripts/test starts one)");
        redis.get_or_insert_with(|| (bus.client(), bus.key_base().to_owned()));
        let bus: Arc<dyn Bus> = Arc::new(bus);
        let registry = Registry::new(limits, metrics.clone());
        let router = Router::new(
            registry.clone(),
            metrics,
            types.clone(),
            bus.clone(),
            None,
            Duration::from_secs(600),
        );
        let (tx, rx) = tokio::sync::mpsc::channel(1 << 12);
        tokio::spawn(router.run(rx, stop.clone()));
        tokio::spawn({
            let (bus, stop) = (bus.clone(), stop.clone());
            async move { bus.subscribe(Box::new(EventSender::new(tx)), stop).await }
        });
        buses.push(bus);
        registries.push(registry);
    }
    let bits = |p: &Vec<bool>| {
        let named: Vec<(String, bool)> = p
            .iter()
            .enumerate()
            .map(|(t, e)| (format!("t{t}"), *e))
            .collect();
        types.apply(0, named.iter().map(|(n, e)| (n.as_str(), *e)))
    };
    let mut handles = Vec::new();
    for (k, c) in conns.iter().enumerate() {
        let user = format!("user{}", c.user);
        let registered = registries[k % NODES]
            .register(
                &user,
                c.platform,
                c.tab.map(Into::into),
                bits(&initial[c.user]),
                0,
            )
            .unwrap();
        if routed {
            // As the node's presence writes it, before anything is published for the user.
            let (client, base) = redis.as_ref().expect("connected");
            let conn = registered.1.id.to_string();
            let info = serde_json::json!({
                "user": user, "conn": conn, "node": format!("node-{}", k % NODES),
                "platform": c.platform.map(|p| p.as_str()), "tab": c.tab,
                "connected_at": 0
            });
            let _: i64 = client
                .hset(
                    format!("{base}:presence:u:{user}"),
                    (conn, info.to_string()),
                )
                .await
                .expect("presence written");
        }
        handles.push(registered);
    }
    // Until every node hears the bus: each connection has a `ready` frame.
    let mut ready = vec![false; conns.len()];
    for attempt in 0.. {
        assert!(
            attempt < 100,
            "the routers did not hear the bus within 10 s"
        );
        let msg = outgoing(&format!("ready-{attempt}"), "u", Target::All, "ready");
        buses[0].publish_message(&msg).await.expect("publish");
        tokio::time::sleep(Duration::from_millis(100)).await;
        for (k, (_, _, rx)) in handles.iter_mut().enumerate() {
            while let Ok(q) = rx.try_recv() {
                ready[k] |= q.frame.as_str() == "ready";
            }
        }
        if ready.iter().all(|r| *r) {
            break;
        }
    }
    let mut prefs = initial.to_vec();
    for (i, op) in ops.iter().enumerate() {
        match op {
            Op::Change(u, choices) => {
                for (t, e) in choices {
                    prefs[*u][*t] = *e;
                }
                // Announced by whichever node took the change.
                let payload = change(i, *u, &prefs[*u]).encode();
                buses[i % NODES]
                    .publish(Channel::Control, payload)
                    .await
                    .expect("announce");
            }
            Op::Msg(t, spec) => {
                let to = match spec {
                    TargetSpec::User(u, p, tab) => Target::User {
                        user: format!("user{u}"),
                        platform: *p,
                        tab: tab.map(Into::into),
                    },
                    TargetSpec::Users(us) => {
                        Target::Users(us.iter().map(|u| format!("user{u}")).collect())
                    }
                    TargetSpec::Conn(k) => Target::Conn(
                        handles
                            .get(*k)
                            .map_or("c-none".into(), |h| h.1.id.to_string()),
                    ),
                    TargetSpec::All => Target::All,
                };
                let msg = outgoing(&format!("id-{i}"), &type_name(*t), to, &format!("msg-{i}"));
                buses[0].publish_message(&msg).await.expect("publish");
            }
        }
    }
    // A last message to everyone: what came before it has been routed once it arrives.
    let end = outgoing("end", "u", Target::All, "end");
    buses[0].publish_message(&end).await.expect("publish");
    let expected = expected(conns, initial, ops);
    for (k, (_, _, rx)) in handles.iter_mut().enumerate() {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let Ok(q) = rx.try_recv() else {
                if tokio::time::timeout_at(deadline, rx.ready()).await.is_err() {
                    return Err(TestCaseError::fail(format!(
                        "connection {k}: no `end` within 10 s, got {got:?}"
                    )));
                }
                continue;
            };
            match q.frame.as_str() {
                "end" => break,
                f if f.starts_with("msg-") => got.push(f.to_owned()),
                _ => {}
            }
        }
        prop_assert_eq!(&got, &expected[k], "connection {} ({:?})", k, conns[k]);
    }
    Ok(())
}

fn outgoing(id: &str, msg_type: &str, to: Target, frame: &str) -> Outgoing {
    Outgoing::new(
        Header {
            id: id.into(),
            msg_type: msg_type.into(),
            to,
            ts: now_ms(),
            ttl_ms: None,
            at_us: 0,
            collapse: None,
        },
        frame,
    )
}

proptest! {
    // Each case connects two nodes to the cluster and publishes up to 30 messages: about
    // 0.3 s a case.
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn on_a_redis_cluster_a_message_reaches_exactly_the_connections_its_target_and_preferences_allow(
        defaults in prop::collection::vec(any::<bool>(), TYPES),
        initial in prop::collection::vec(prop::collection::vec(any::<bool>(), TYPES), USERS),
        conns in prop::collection::vec((0..USERS, platform(), tab()).prop_map(|(user, platform, tab)| Conn { user, platform, tab }), 1..8),
        ops in prop::collection::vec(op(), 1..30),
    ) {
        RUNTIME.block_on(through_a_cluster(&defaults, &initial, &conns, &ops))?;
    }
}

//! Property: a message is queued on a connection if and only if its target selects that
//! connection and the user's current preferences accept its type — for random registries,
//! preference sets, connections, preference changes and messages.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use fanout::bus::{local::LocalBus, BusMessage, Header};
use fanout::clock::now_ms;
use fanout::envelope::{Platform, Target};
use fanout::metrics::Metrics;
use fanout::prefs::Change;
use fanout::registry::{Limits, Registry};
use fanout::router::Router;
use fanout::types::TypeRegistry;
use fanout::types::{TypeConfig, TypesConfig, UnknownTypes};
use proptest::prelude::*;

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

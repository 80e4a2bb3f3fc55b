//! Preferences: per-user type filtering, live on every node, over WebSocket and HTTP.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);
const QUIET: Duration = Duration::from_millis(1500);

/// Sends `prefs.set` and waits for the `prefs` frame that confirms it.
async fn set_prefs(client: &mut Client, prefs: Value) -> Value {
    client
        .send_json(json!({"t":"prefs.set","prefs":prefs}))
        .await;
    expect_prefs_frame(client).await
}

async fn expect_prefs_frame(client: &mut Client) -> Value {
    loop {
        let f = client.next_frame(WAIT).await.expect("a prefs frame");
        if f["t"] == "prefs" {
            return f["prefs"].clone();
        }
        assert_ne!(f["t"], "error", "{f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_off_type_reaches_only_users_who_switched_it_on() {
    let cluster = TestCluster::start(2).await;
    let mut ann = cluster.connect(0, "ann", "").await;
    let mut bob = cluster.connect(1, "bob", "").await;
    assert_eq!(
        bob.hello["prefs"],
        json!({"marketing":false,"order.status":true,"robot.reply":true})
    );
    let prefs = set_prefs(&mut ann, json!({"marketing": true})).await;
    assert_eq!(prefs["marketing"], true);

    cluster
        .producer
        .send(
            "x",
            json!({"type":"marketing","to":{"all":true},"data":"sale"}),
        )
        .await;
    cluster
        .producer
        .send(
            "x",
            json!({"type":"robot.reply","to":{"all":true},"data":"hello"}),
        )
        .await;
    assert_eq!(ann.expect_msg(WAIT).await["data"], "sale");
    assert_eq!(ann.expect_msg(WAIT).await["data"], "hello");
    assert_eq!(
        bob.expect_msg(WAIT).await["data"],
        "hello",
        "bob never gets marketing"
    );
    assert!(bob.msgs_during(QUIET).await.is_empty());
    assert!(
        cluster
            .node(1)
            .metric("fanout_filtered_total{type=\"marketing\"}")
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_on_type_stops_at_once_on_every_node_without_reconnecting() {
    let cluster = TestCluster::start(2).await;
    let mut here = cluster.connect(0, "cy", "tab=here").await;
    let mut there = cluster.connect(1, "cy", "tab=there").await;
    set_prefs(&mut here, json!({"robot.reply": false})).await;
    // The other node's connection is told too, and filters from now on.
    assert_eq!(expect_prefs_frame(&mut there).await["robot.reply"], false);
    cluster
        .producer
        .send("cy", for_user("cy", "robot.reply", "muted"))
        .await;
    cluster
        .producer
        .send("cy", for_user("cy", "order.status", "shipped"))
        .await;
    for client in [&mut here, &mut there] {
        let m = client.expect_msg(WAIT).await;
        assert_eq!(
            m["type"], "order.status",
            "robot.reply was switched off: {m}"
        );
    }
    // And back on.
    set_prefs(&mut there, json!({"robot.reply": true})).await;
    expect_prefs_frame(&mut here).await;
    cluster
        .producer
        .send("cy", for_user("cy", "robot.reply", "unmuted"))
        .await;
    assert_eq!(here.expect_msg(WAIT).await["data"]["text"], "unmuted");
    assert_eq!(there.expect_msg(WAIT).await["data"]["text"], "unmuted");
    // A new connection sees the stored choice.
    let later = cluster.connect(1, "cy", "").await;
    assert_eq!(later.hello["prefs"]["robot.reply"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_type_is_refused_and_changes_nothing() {
    let cluster = TestCluster::start(1).await;
    let mut dee = cluster.connect(0, "dee", "").await;
    dee.send_json(json!({"t":"prefs.set","ref":"p1","prefs":{"marketing":true,"bogus":false}}))
        .await;
    let e = dee.next_frame(WAIT).await.unwrap();
    assert_eq!(
        (e["t"].as_str(), e["code"].as_str(), e["ref"].as_str()),
        (Some("error"), Some("unknown_type"), Some("p1"))
    );
    dee.send_json(json!({"t":"prefs.get"})).await;
    let p = dee.next_frame(WAIT).await.unwrap();
    assert_eq!(p["prefs"]["marketing"], false, "nothing changed: {p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_api_reads_and_changes_preferences_for_the_right_callers() {
    let cluster = TestCluster::start(2).await;
    let mut eli = cluster.connect(1, "eli", "").await;
    let http = reqwest::Client::new();
    let url = cluster.node(0).http("/v1/users/eli/preferences");
    let own = token("eli", Duration::from_secs(60));
    let other = token("mallory", Duration::from_secs(60));

    assert_eq!(http.get(&url).send().await.unwrap().status(), 401);
    assert_eq!(
        http.get(&url)
            .bearer_auth(&other)
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    let r = http.get(&url).bearer_auth(&own).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"user":"eli","prefs":{"marketing":false,"order.status":true,"robot.reply":true}})
    );

    let r = http
        .put(&url)
        .bearer_auth(&own)
        .json(&json!({"prefs":{"nope":true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unknown_type");
    let r = http
        .put(&url)
        .bearer_auth(&other)
        .json(&json!({"prefs":{"marketing":true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .put(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"prefs":{"marketing":true}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["prefs"]["marketing"], true);
    // The connection on the other node hears about it and filters accordingly.
    assert_eq!(expect_prefs_frame(&mut eli).await["marketing"], true);
    cluster
        .producer
        .send("eli", for_user("eli", "marketing", "deal"))
        .await;
    assert_eq!(eli.expect_msg(WAIT).await["data"]["text"], "deal");

    let types: Value = http
        .get(cluster.node(0).http("/v1/types"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        types["types"][2],
        json!({"name":"marketing","default":false})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_writing_the_table_directly_applies_it_with_reload() {
    use sqlx::Connection;
    let cluster = TestCluster::start(2).await;
    let mut fox = cluster.connect(1, "fox", "").await;
    let mut db = sqlx::PgConnection::connect(&cluster.database_url)
        .await
        .unwrap();
    sqlx::query("INSERT INTO fanout_preferences (user_id, msg_type, enabled, updated_at) VALUES ('fox', 'order.status', false, now())")
        .execute(&mut db)
        .await
        .unwrap();
    let r = reqwest::Client::new()
        .post(cluster.node(0).http("/v1/users/fox/preferences/reload"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(expect_prefs_frame(&mut fox).await["order.status"], false);
    cluster
        .producer
        .send("fox", for_user("fox", "order.status", "hidden"))
        .await;
    cluster
        .producer
        .send("fox", for_user("fox", "robot.reply", "shown"))
        .await;
    assert_eq!(fox.expect_msg(WAIT).await["data"]["text"], "shown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_database_is_down_new_users_are_refused_and_nodes_recover_by_themselves() {
    let db = TestDatabase::create().await;
    let proxy = TcpProxy::start(url_host_port(&db.url)).await;
    let via_proxy = url_with_host_port(&db.url, &format!("127.0.0.1:{}", proxy.port));
    let options = Options {
        database_url: Some(via_proxy),
        ..Default::default()
    };
    let cluster = TestCluster::start_with(1, options).await;
    let node = cluster.node(0);
    let mut gus = cluster.connect(0, "gus", "").await;

    proxy.cut();
    eventually(
        Duration::from_secs(20),
        "readyz reports the database",
        || async {
            let r = reqwest::get(format!("http://{}/readyz", node.admin))
                .await
                .unwrap();
            r.status() == 503 && r.text().await.unwrap().contains("database unreachable")
        },
    )
    .await;
    let bearer = format!("Bearer {}", token("hal", Duration::from_secs(60)));
    match Client::try_connect(&node.ws_url(""), &[("authorization", &bearer)]).await {
        Ok(_) => panic!("a user whose preferences cannot be loaded was let in"),
        Err((status, body)) => {
            assert_eq!(status, 503);
            assert!(body.contains("preferences_unavailable"), "{body}");
        }
    }
    // Users already here keep their cached preferences and their messages.
    cluster
        .producer
        .send("gus", for_user("gus", "robot.reply", "still works"))
        .await;
    assert_eq!(gus.expect_msg(WAIT).await["data"]["text"], "still works");

    proxy.restore();
    eventually(Duration::from_secs(20), "ready again", || async {
        node.ready().await
    })
    .await;
    let hal = cluster.connect(0, "hal", "").await;
    assert_eq!(hal.hello["user"], "hal");
}

/// `types.unknown = "reject"`, one rule in both places: `POST /v1/publish` refuses an
/// unregistered type (400 `unknown_type`) and ingest rejects one read from Kafka (counted,
/// never delivered); a registered type passes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_unknown_reject_an_unregistered_type_is_refused_at_publish_and_at_ingest() {
    let cluster = TestCluster::start_with(
        1,
        Options::default().with("FANOUT__TYPES__UNKNOWN", "reject"),
    )
    .await;
    let node = cluster.node(0);
    let mut ida = cluster.connect(0, "ida", "").await;
    let http = reqwest::Client::new();
    let publish = |msg_type: &str| {
        http.post(node.http("/v1/publish"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&for_user("ida", msg_type, "via http"))
            .send()
    };

    let r = publish("never.registered").await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unknown_type");

    // Same key, same partition: the registered one is decided after the other.
    let producer = &cluster.producer;
    producer
        .send("ida", for_user("ida", "never.registered", "unknown"))
        .await;
    producer
        .send("ida", for_user("ida", "robot.reply", "known"))
        .await;
    assert_eq!(ida.expect_msg(WAIT).await["data"]["text"], "known");
    assert_eq!(
        node.metric("fanout_ingest_rejected_total{reason=\"unknown_type\"}")
            .await,
        1.0
    );

    let r = publish("robot.reply").await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(ida.expect_msg(WAIT).await["data"]["text"], "via http");
}

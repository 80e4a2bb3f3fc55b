//! Kick and revoke (`POST /v1/users/{user}/disconnect`): on a 2-node cluster, a request to
//! node 0 closes the user's connections on both nodes; a revocation is refused on node 1,
//! which did not take the request, and still after node 1 restarts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);

/// `POST /v1/users/{user}/disconnect` on `node` with `bearer` (if any) and `body` (if any):
/// the status and the JSON body.
async fn disconnect(
    node: &Node,
    user: &str,
    bearer: Option<&str>,
    body: Option<&str>,
) -> (u16, Value) {
    let mut req = reqwest::Client::new().post(node.http(&format!("/v1/users/{user}/disconnect")));
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// `GET /v1/users/{user}/preferences` on `node` with `token`: the status and JSON body.
async fn get_prefs(node: &Node, user: &str, token: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(node.http(&format!("/v1/users/{user}/preferences")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A WebSocket to `node` with `token`: the client, or the refusal's status and JSON body.
async fn connect_with(node: &Node, token: &str) -> Result<Client, (u16, Value)> {
    let bearer = format!("Bearer {token}");
    Client::try_connect(&node.ws_url(""), &[("authorization", &bearer)])
        .await
        .map_err(|(status, body)| {
            (
                status.as_u16(),
                serde_json::from_str(&body).unwrap_or(Value::Null),
            )
        })
}

/// A ping answered with a pong: the connection is open and served.
async fn expect_alive(client: &mut Client, who: &str) {
    client.send_json(json!({"t":"ping"})).await;
    loop {
        let f = client
            .next_frame(WAIT)
            .await
            .unwrap_or_else(|| panic!("{who}'s connection was closed"));
        if f["t"] == "pong" {
            return;
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An HS256 token for `user` with `iat` as given (`None`: no `iat` claim).
fn token_issued_at(user: &str, iat: Option<i64>) -> String {
    let mut claims = json!({ "sub": user, "exp": unix_now() + 600 });
    if let Some(iat) = iat {
        claims["iat"] = iat.into();
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_closes_the_users_connections_on_every_node_with_4004_and_no_one_elses() {
    let cluster = TestCluster::start(2).await;
    let mut alice_0 = cluster.connect(0, "alice", "tab=a").await;
    let mut alice_1 = cluster.connect(1, "alice", "tab=b").await;
    let mut alice_1b = cluster.connect(1, "alice", "tab=c").await;
    let mut bob_1 = cluster.connect(1, "bob", "").await;
    let mut bob_0 = cluster.connect(0, "bob", "").await;

    let (status, body) = disconnect(cluster.node(0), "alice", Some(ADMIN_TOKEN), None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"user":"alice","revoked":false}));

    let kicked = Closed::Code(4004, "disconnected by an operator".into());
    assert_eq!(
        alice_0.expect_close(WAIT).await,
        kicked,
        "node 0 (took the request)"
    );
    assert_eq!(alice_1.expect_close(WAIT).await, kicked, "node 1");
    assert_eq!(
        alice_1b.expect_close(WAIT).await,
        kicked,
        "node 1, second tab"
    );
    expect_alive(&mut bob_1, "bob on node 1").await;
    expect_alive(&mut bob_0, "bob on node 0").await;
    cluster
        .producer
        .send("bob", for_user("bob", "robot.reply", "still here"))
        .await;
    assert_eq!(bob_1.expect_msg(WAIT).await["data"]["text"], "still here");

    // A kick revokes nothing: the same user may come back with the same kind of token.
    let mut back = cluster.connect(1, "alice", "").await;
    expect_alive(&mut back, "alice, reconnected").await;

    assert_eq!(
        cluster
            .node(0)
            .metric("fanout_kicks_total{revoke=\"false\"}")
            .await,
        1.0
    );
    assert_eq!(
        cluster
            .node(1)
            .metric("fanout_kicked_connections_total{code=\"4004\"}")
            .await,
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_on_the_other_node_and_after_it_restarts() {
    let mut cluster = TestCluster::start(2).await;
    let old = token("carl", Duration::from_secs(600)); // iat = now
    let bob = token("bob", Duration::from_secs(600));
    let mut carl_1 = connect_with(cluster.node(1), &old)
        .await
        .expect("carl connects");
    let mut bob_1 = connect_with(cluster.node(1), &bob)
        .await
        .expect("bob connects");
    assert_eq!(get_prefs(cluster.node(1), "carl", &old).await.0, 200);

    let (status, body) = disconnect(
        cluster.node(0),
        "carl",
        Some(ADMIN_TOKEN),
        Some(r#"{"revoke":true}"#),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["user"], "carl");
    assert_eq!(body["revoked"], true);
    let before = body["revoked_before"].as_i64().expect("revoked_before");
    let now = unix_now();
    assert!(
        (now - 5..=now + 1).contains(&before),
        "revoked_before {before} is the second after the request (now {now})"
    );

    // The open connection on node 1 closes with 4003; bob's stays.
    assert_eq!(
        carl_1.expect_close(WAIT).await,
        Closed::Code(4003, "token revoked".into())
    );
    expect_alive(&mut bob_1, "bob").await;

    // Node 1 did not take the request, yet refuses the old token: WebSocket and HTTP API.
    let expect_refused = |what: &str, (status, body): (u16, Value)| {
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "token_revoked", "{what}: {body}");
    };
    match connect_with(cluster.node(1), &old).await {
        Ok(_) => panic!("node 1 let the revoked token in"),
        Err(refusal) => expect_refused("ws, node 1", refusal),
    }
    expect_refused(
        "http, node 1",
        get_prefs(cluster.node(1), "carl", &old).await,
    );
    // A token without iat cannot be told apart from an old one; one issued in the
    // revocation's own second neither.
    for (what, t) in [
        ("no iat", token_issued_at("carl", None)),
        ("same second", token_issued_at("carl", Some(before - 1))),
    ] {
        match connect_with(cluster.node(1), &t).await {
            Ok(_) => panic!("{what}: accepted"),
            Err(refusal) => expect_refused(what, refusal),
        }
    }
    assert_eq!(get_prefs(cluster.node(1), "bob", &bob).await.0, 200);

    // A token issued from `revoked_before` on is accepted.
    while unix_now() < before {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh = token("carl", Duration::from_secs(600));
    let mut carl_again = connect_with(cluster.node(1), &fresh)
        .await
        .expect("a token issued after the revoke");
    expect_alive(&mut carl_again, "carl with a fresh token").await;
    assert_eq!(get_prefs(cluster.node(0), "carl", &fresh).await.0, 200);
    assert_eq!(
        get_prefs(
            cluster.node(1),
            "carl",
            &token_issued_at("carl", Some(before))
        )
        .await
        .0,
        200,
        "iat = revoked_before is accepted"
    );
    assert!(
        cluster
            .node(1)
            .metric("fanout_revoked_tokens_refused_total")
            .await
            >= 4.0
    );
    assert_eq!(cluster.node(1).metric("fanout_revocations").await, 1.0);
    drop(carl_again);

    // After a restart node 1 reads the revocation from the database.
    cluster.nodes[1].kill();
    cluster.restart_node(1);
    cluster.wait_settled().await;
    match connect_with(cluster.node(1), &old).await {
        Ok(_) => panic!("node 1 forgot the revocation when it restarted"),
        Err(refusal) => expect_refused("ws, node 1 restarted", refusal),
    }
    expect_refused(
        "http, node 1 restarted",
        get_prefs(cluster.node(1), "carl", &old).await,
    );
    connect_with(cluster.node(1), &fresh)
        .await
        .expect("the fresh token, node 1 restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_refuses_non_admins_and_bad_bodies_and_changes_nothing() {
    let cluster = TestCluster::start(1).await;
    let node = cluster.node(0);
    let mut dan = cluster.connect(0, "dan", "").await;
    let own = token("dan", Duration::from_secs(600));

    for (what, bearer) in [
        ("no token", None),
        ("the user's own token", Some(own.as_str())),
        ("a wrong admin token", Some("not-the-admin")),
    ] {
        let (status, body) = disconnect(node, "dan", bearer, None).await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"], "unauthorized", "{what}: {body}");
    }
    for body in [
        "{",
        "[]",
        "null",
        r#"{"revoke":"yes"}"#,
        r#"{"revok":true}"#,
        r#"{"revoke":true,"extra":1}"#,
    ] {
        let (status, answer) = disconnect(node, "dan", Some(ADMIN_TOKEN), Some(body)).await;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(answer["error"], "bad_request", "{body}: {answer}");
        assert!(answer["message"].is_string());
    }
    let (status, body) = disconnect(node, "bad%0Auser", Some(ADMIN_TOKEN), None).await;
    assert_eq!(
        (status, &body["error"]),
        (400, &json!("bad_user_id")),
        "{body}"
    );
    expect_alive(&mut dan, "dan, after refused requests").await;
    assert_eq!(
        node.metric("fanout_kicks_total{revoke=\"false\"}").await,
        0.0
    );

    // An empty object is no body at all: a plain kick.
    let (status, body) = disconnect(node, "dan", Some(ADMIN_TOKEN), Some("{}")).await;
    assert_eq!((status, body), (200, json!({"user":"dan","revoked":false})));
    assert_eq!(
        dan.expect_close(WAIT).await,
        Closed::Code(4004, "disconnected by an operator".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_mode_kicks_but_refuses_to_revoke_tokens_it_does_not_have() {
    let node = EmbeddedNode::start(&[]).await;
    let mut eve = Client::connect(&format!("ws://{}/ws?user=eve", node.public), None).await;
    let post = |body: &'static str| {
        reqwest::Client::new()
            .post(node.http("/v1/users/eve/disconnect"))
            .body(body)
            .send()
    };
    let r = post(r#"{"revoke":true}"#).await.unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "revoke_unsupported", "{body}");
    expect_alive(&mut eve, "eve, after the refused revoke").await;

    let r = post("").await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        eve.expect_close(WAIT).await,
        Closed::Code(4004, "disconnected by an operator".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_whose_announcement_was_lost_applies_within_the_reload_period() {
    use sqlx::Connection;
    let cluster = TestCluster::start(1).await;
    let old = token("fay", Duration::from_secs(600));
    let mut fay = connect_with(cluster.node(0), &old)
        .await
        .expect("fay connects");
    // Written straight into the table: no node hears of it on the bus.
    let mut db = sqlx::PgConnection::connect(&cluster.database_url)
        .await
        .unwrap();
    sqlx::query("INSERT INTO fanout_revocations (user_id, revoked_before) VALUES ('fay', $1)")
        .bind(unix_now() + 1)
        .execute(&mut db)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    // The node re-reads the table every 10 s: fay's connection closes within that.
    assert_eq!(
        fay.expect_close(Duration::from_secs(13)).await,
        Closed::Code(4003, "token revoked".into())
    );
    assert!(started.elapsed() < Duration::from_secs(12));
    match connect_with(cluster.node(0), &old).await {
        Ok(_) => panic!("the re-read revocation is not applied"),
        Err((status, body)) => assert_eq!((status, &body["error"]), (401, &json!("token_revoked"))),
    }
    assert!(
        cluster
            .node(0)
            .metric("fanout_revocation_reloads_total{result=\"ok\"}")
            .await
            >= 1.0
    );
}

//! The client side of the protocol: authentication, frames, heartbeat, ask.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);

async fn refused(url: &str, header: Option<(&str, String)>) -> (StatusCode, serde_json::Value) {
    let headers: Vec<(&str, &str)> = header.iter().map(|(n, v)| (*n, v.as_str())).collect();
    match Client::try_connect(url, &headers).await {
        Ok(_) => panic!("connection to {url} was accepted"),
        Err((status, body)) => (
            status,
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("JSON body: {body}")),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_garbage_wrong_key_and_expired_tokens_get_401() {
    let cluster = TestCluster::start(1).await;
    let url = cluster.node(0).ws_url("");
    let bearer = |t: String| Some(("authorization", format!("Bearer {t}")));
    let cases = [
        ("none", None, "unauthenticated"),
        ("garbage", bearer("garbage".into()), "invalid_token"),
        (
            "wrong key",
            bearer(token_with(
                "not-the-secret",
                "al",
                Duration::from_secs(60),
                None,
            )),
            "invalid_token",
        ),
        ("expired", bearer(expired_token("al")), "token_expired"),
        ("query token not allowed", None, "unauthenticated"),
    ];
    for (what, header, code) in cases {
        let url = if what.starts_with("query") {
            format!("{url}access_token={}", token("al", Duration::from_secs(60)))
        } else {
            url.clone()
        };
        let (status, body) = refused(&url, header).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{what}");
        assert_eq!(body["error"], code, "{what}: {body}");
        assert!(body["message"].is_string());
    }
}

fn expired_token(user: &str) -> String {
    let claims = json!({ "sub": user, "exp": 1_000_000 });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browsers_authenticate_with_the_subprotocol_and_query_token_when_allowed() {
    let cluster = TestCluster::start_with(
        1,
        Options::default().with("FANOUT__AUTH__ALLOW_QUERY_TOKEN", "true"),
    )
    .await;
    let t = token("gus", Duration::from_secs(60));
    let mut req = cluster.node(0).ws_url("").into_client_request().unwrap();
    req.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_str(&format!("fanout.v1, bearer.{t}")).unwrap(),
    );
    let (ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("subprotocol auth accepted");
    assert_eq!(resp.headers()["sec-websocket-protocol"], "fanout.v1");
    drop(ws);
    let client = Client::connect(&cluster.node(0).ws_url(&format!("access_token={t}")), None).await;
    assert_eq!(client.hello["user"], "gus");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_comes_first_and_bad_frames_get_error_while_the_connection_survives() {
    let cluster = TestCluster::start(1).await;
    let mut hal = cluster.connect(0, "hal", "tab=t9&platform=android").await;
    let hello = &hal.hello;
    assert_eq!(
        (hello["user"].as_str(), hello["node"].as_str()),
        (Some("hal"), Some("node-0"))
    );
    assert!(hello["conn"].as_str().unwrap().starts_with("c-"));
    assert_eq!(hello["heartbeat_ms"], 25000);
    assert!(hello["prefs"].is_object() && hello.get("resume").is_none());

    hal.send_text("this is not json").await;
    let e = hal.next_frame(WAIT).await.unwrap();
    assert_eq!(
        (e["t"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_frame"))
    );
    hal.send_json(json!({"t":"explode","ref":"r7"})).await;
    let e = hal.next_frame(WAIT).await.unwrap();
    assert_eq!(
        (e["code"].as_str(), e["ref"].as_str()),
        (Some("bad_frame"), Some("r7"))
    );
    hal.send_json(json!({"t":"ping"})).await;
    assert_eq!(hal.next_frame(WAIT).await.unwrap()["t"], "pong");
    cluster
        .producer
        .send("hal", for_user("hal", "t", "still here"))
        .await;
    assert_eq!(hal.expect_msg(WAIT).await["data"]["text"], "still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_closed_with_4000() {
    let options = Options::default()
        .with("FANOUT__HEARTBEAT__INTERVAL", "300ms")
        .with("FANOUT__HEARTBEAT__TIMEOUT", "1s");
    let cluster = TestCluster::start_with(1, options).await;
    let mut ivy = cluster.connect(0, "ivy", "").await;
    // Not reading means not answering Pings: the server hears nothing for 1 s.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(matches!(
        ivy.expect_close(WAIT).await,
        Closed::Code(4000, _)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_expires_while_connected_closes_with_4003() {
    let cluster = TestCluster::start(1).await;
    let mut jo = Client::connect(
        &cluster.node(0).ws_url(""),
        Some(&token("jo", Duration::from_secs(2))),
    )
    .await;
    assert_eq!(
        jo.expect_close(Duration::from_secs(10)).await,
        Closed::Code(4003, "token expired".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_is_produced_upstream_with_key_and_headers() {
    let cluster = TestCluster::start(1).await;
    let mut kim = cluster.connect(0, "kim", "platform=ios").await;
    kim.send_text(
        r#"{"t":"ask","ref":"q1","data":{"text":"what is my order status?", "n": [1,2]}}"#,
    )
    .await;
    let reply = kim.next_frame(WAIT).await.unwrap();
    assert_eq!(
        (reply["t"].as_str(), reply["ref"].as_str()),
        (Some("ask.ok"), Some("q1")),
        "{reply}"
    );
    let record = consume_one(&cluster.upstream_topic, WAIT).await;
    assert_eq!(record.key.as_deref(), Some("kim"));
    assert_eq!(
        record.value, r#"{"text":"what is my order status?", "n": [1,2]}"#,
        "data verbatim"
    );
    assert_eq!(record.headers["fanout-user"], "kim");
    assert_eq!(record.headers["fanout-conn"], kim.conn_id());
    assert_eq!(record.headers["fanout-platform"], "ios");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_api_needs_the_admin_token_and_rejects_bad_envelopes() {
    let cluster = TestCluster::start(1).await;
    let mut lu = cluster.connect(0, "lu", "").await;
    let http = reqwest::Client::new();
    let url = cluster.node(0).http("/v1/publish");
    let envelope = for_user("lu", "t", "via http");
    let r = http.post(&url).json(&envelope).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .body(r#"{"type":"t"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<serde_json::Value>().await.unwrap()["error"],
        "bad_target"
    );
    let r = http
        .post(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&envelope)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(lu.expect_msg(WAIT).await["data"]["text"], "via http");
}

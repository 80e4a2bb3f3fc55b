//! The edges of the public and admin ports: JWT `nbf` and `aud` per RFC 7519, one rule
//! for user ids wherever they enter, the JSON error body on every status, and the embedded
//! default letting in browser pages from this machine only.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token signed with the cluster's secret, with exactly these claims.
fn token_of(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Opens `/ws` with `Authorization: Bearer <token>`: the status and body of a refusal.
async fn ws_with_token(url: &str, token: &str) -> Result<Client, (u16, String)> {
    let bearer = format!("Bearer {token}");
    Client::try_connect(url, &[("authorization", &bearer)])
        .await
        .map_err(|(s, b)| (s.as_u16(), b))
}

/// Status and JSON body of a response; panics if the body is not the JSON error contract.
async fn json_error_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
    assert!(
        body["error"].is_string() && body["message"].is_string(),
        "status {status}: not {{\"error\",\"message\"}}: {body}"
    );
    (status, body)
}

fn refusal(result: Result<Client, (u16, String)>) -> (u16, Value) {
    let (status, body) = result.err().expect("the upgrade was refused");
    let body = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_valid_only_from_an_hour_later_is_refused_on_ws_and_the_http_api() {
    let cluster = TestCluster::start(1).await;
    let node = cluster.node(0);
    let http = reqwest::Client::new();
    let later = token_of(json!({"sub": "nia", "exp": now() + 7200, "nbf": now() + 3600}));
    let (status, body) = refusal(ws_with_token(&node.ws_url(""), &later).await);
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_not_yet_valid")),
        "{body}"
    );
    let r = http
        .get(node.http("/v1/users/nia/preferences"))
        .bearer_auth(&later)
        .send()
        .await
        .unwrap();
    let (status, body) = json_error_of(r).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("token_not_yet_valid"))
    );
    // The same token from a moment ago (and one a few seconds ahead: clock skew) works.
    for nbf in [now() - 5, now() + 5] {
        let valid = token_of(json!({"sub": "nia", "exp": now() + 7200, "nbf": nbf}));
        assert!(ws_with_token(&node.ws_url(""), &valid).await.is_ok());
        let r = http
            .get(node.http("/v1/users/nia/preferences"))
            .bearer_auth(&valid)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audience_given_as_an_array_is_accepted_when_it_lists_ours() {
    let options = Options::default().with("FANOUT__AUTH__AUDIENCE", "fanout-app");
    let cluster = TestCluster::start_with(1, options).await;
    let node = cluster.node(0);
    let with_aud = |aud: Value| token_of(json!({"sub": "abe", "exp": now() + 600, "aud": aud}));
    let listed = with_aud(json!(["billing", "fanout-app"]));
    let mut abe = ws_with_token(&node.ws_url(""), &listed)
        .await
        .unwrap_or_else(|e| panic!("aud array refused: {e:?}"));
    assert_eq!(abe.hello["user"], "abe");
    let r = reqwest::Client::new()
        .get(node.http("/v1/users/abe/preferences"))
        .bearer_auth(&listed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        ws_with_token(&node.ws_url(""), &with_aud(json!("fanout-app")))
            .await
            .is_ok()
    );
    for other in [json!(["billing"]), json!("billing")] {
        let (status, body) = refusal(ws_with_token(&node.ws_url(""), &with_aud(other)).await);
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_token"))
        );
    }
    // The accepted connection is a working one.
    cluster
        .producer
        .send("abe", for_user("abe", "robot.reply", "aud ok"))
        .await;
    assert_eq!(abe.expect_msg(WAIT).await["data"]["text"], "aud ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_user_ids_get_400_naming_the_problem_wherever_they_enter() {
    let cluster = TestCluster::start(1).await;
    let node = cluster.node(0);
    let http = reqwest::Client::new();
    let long = "u".repeat(10 * 1024);
    // JWT `sub`: NUL (PostgreSQL cannot store it: a 400 here, not a retryable 503) and 10 KB.
    for (sub, says) in [("nu\0l", "U+0000"), (long.as_str(), "10240 bytes")] {
        let token = token_of(json!({"sub": sub, "exp": now() + 600}));
        let (status, body) = refusal(ws_with_token(&node.ws_url(""), &token).await);
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_user_id")));
        assert!(body["message"].as_str().unwrap().contains(says), "{body}");
        // The same token on the HTTP API.
        let r = http
            .get(node.http("/v1/users/nul/preferences"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        let (status, body) = json_error_of(r).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_user_id")));
    }
    // `{user}` in the HTTP API, with the admin token.
    let cases = [
        (reqwest::Method::GET, "nu%00l".to_owned(), "U+0000"),
        (reqwest::Method::PUT, "line%0Abreak".to_owned(), "U+000A"),
        (reqwest::Method::PUT, long.clone(), "10240 bytes"),
        (reqwest::Method::GET, long.clone(), "10240 bytes"),
    ];
    for (method, user, says) in cases {
        let r = http
            .request(
                method.clone(),
                node.http(&format!("/v1/users/{user}/preferences")),
            )
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"prefs": {"marketing": true}}))
            .send()
            .await
            .unwrap();
        let (status, body) = json_error_of(r).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_user_id")),
            "{method} {says}: {body}"
        );
        assert!(body["message"].as_str().unwrap().contains(says), "{body}");
    }
    // `to.user` / `to.users` follow the same rule at POST /v1/publish.
    for to in [json!({"user": "nu\u{0}l"}), json!({"users": ["ok", long]})] {
        let r = http
            .post(node.http("/v1/publish"))
            .bearer_auth(ADMIN_TOKEN)
            .json(&json!({"type": "robot.reply", "to": to, "data": {}}))
            .send()
            .await
            .unwrap();
        let (status, body) = json_error_of(r).await;
        assert_eq!((status, body["error"].as_str()), (400, Some("bad_target")));
    }
    // And at ingest: a record for such a user goes to the dead-letter topic, named.
    cluster
        .producer
        .send(
            "nul",
            json!({"type": "robot.reply", "to": {"user": "nu\u{0}l"}, "data": {}}),
        )
        .await;
    let dead = consume_one(&cluster.dead_letter_topic, WAIT).await;
    assert_eq!(
        dead.headers.get("fanout-reject-reason").map(String::as_str),
        Some("bad_target"),
        "{dead:?}"
    );
    assert!(
        dead.headers["fanout-reject-error"].contains("U+0000"),
        "{dead:?}"
    );
    // The longest id allowed (256 bytes) connects, and receives.
    let longest = "v".repeat(256);
    let mut client = ws_with_token(
        &node.ws_url(""),
        &token_of(json!({"sub": longest, "exp": now() + 600})),
    )
    .await
    .expect("a 256-byte user id is allowed");
    cluster
        .producer
        .send(&longest, for_user(&longest, "robot.reply", "long id"))
        .await;
    assert_eq!(client.expect_msg(WAIT).await["data"]["text"], "long id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_the_json_body_405_and_404_included_on_both_ports() {
    let cluster = TestCluster::start(1).await;
    let node = cluster.node(0);
    let http = reqwest::Client::new();
    let public = |path: &str| node.http(path);
    let admin = |path: &str| format!("http://{}{path}", node.admin);
    let cases = [
        (
            reqwest::Method::GET,
            public("/v1/publish"),
            405,
            "method_not_allowed",
        ),
        (
            reqwest::Method::DELETE,
            public("/v1/types"),
            405,
            "method_not_allowed",
        ),
        (
            reqwest::Method::POST,
            public("/ws"),
            405,
            "method_not_allowed",
        ),
        (
            reqwest::Method::GET,
            public("/no/such/thing"),
            404,
            "not_found",
        ),
        (
            reqwest::Method::GET,
            public("/v1/users/%FF/preferences"),
            400,
            "bad_request",
        ),
        (reqwest::Method::GET, public("/ws"), 400, "not_websocket"),
        (
            reqwest::Method::POST,
            admin("/metrics"),
            405,
            "method_not_allowed",
        ),
        (
            reqwest::Method::GET,
            admin("/no/such/thing"),
            404,
            "not_found",
        ),
    ];
    for (method, url, status, code) in cases {
        let r = http.request(method.clone(), &url).send().await.unwrap();
        let allow = r.headers().get("allow").cloned();
        let (got, body) = json_error_of(r).await;
        assert_eq!(
            (got, body["error"].as_str()),
            (status, Some(code)),
            "{method} {url}: {body}"
        );
        if status == 405 {
            assert!(
                allow.is_some(),
                "{method} {url}: 405 keeps its Allow header"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_lets_in_browser_pages_from_this_machine_only() {
    let node = EmbeddedNode::start(&[]).await;
    let ws = format!("ws://{}/ws?user=ada", node.public);
    let http = reqwest::Client::new();
    let (status, body) = refusal(
        Client::try_connect(&ws, &[("origin", "https://evil.example")])
            .await
            .map_err(|(s, b)| (s.as_u16(), b)),
    );
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("origin_not_allowed"))
    );
    // The demo page is served from the node itself: a loopback origin, any port.
    let own = format!("http://{}", node.public);
    for origin in [own.as_str(), "http://localhost:5173", "http://[::1]:8080"] {
        assert!(
            Client::try_connect(&ws, &[("origin", origin)])
                .await
                .is_ok(),
            "{origin}"
        );
    }
    let mut ada = Client::try_connect(&ws, &[])
        .await
        .expect("no Origin: not a browser");
    // A foreign page cannot publish or change preferences through the visitor's browser
    // (a text/plain POST needs no CORS preflight).
    let envelope = for_user("ada", "robot.reply", "from evil").to_string();
    let r = http
        .post(node.http("/v1/publish"))
        .header("origin", "https://evil.example")
        .header("content-type", "text/plain")
        .body(envelope)
        .send()
        .await
        .unwrap();
    let (status, body) = json_error_of(r).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("origin_not_allowed"))
    );
    let r = http
        .put(node.http("/v1/users/ada/preferences"))
        .header("origin", "https://evil.example")
        .json(&json!({"prefs": {"robot.reply": false}}))
        .send()
        .await
        .unwrap();
    assert_eq!(json_error_of(r).await.0, 403);
    // The demo page's own publish goes through.
    let r = http
        .post(node.http("/v1/publish"))
        .header("origin", &own)
        .json(&for_user("ada", "robot.reply", "from the demo page"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(
        ada.expect_msg(WAIT).await["data"]["text"],
        "from the demo page",
        "the refused publish must not have been delivered first"
    );
    // Insecure auth checks `?user=` like any other user id.
    let (status, body) = refusal(
        Client::try_connect(&format!("ws://{}/ws?user=a%00b", node.public), &[])
            .await
            .map_err(|(s, b)| (s.as_u16(), b)),
    );
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_user_id")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_default_with_allowed_origins_follows_that_list() {
    let node =
        EmbeddedNode::start(&[("FANOUT__SERVER__ALLOWED_ORIGINS", "https://lan.example")]).await;
    let ws = format!("ws://{}/ws?user=ben", node.public);
    assert!(
        Client::try_connect(&ws, &[("origin", "https://lan.example")])
            .await
            .is_ok()
    );
    let refused = Client::try_connect(&ws, &[("origin", "http://localhost:5173")]).await;
    assert_eq!(refused.err().map(|(s, _)| s.as_u16()), Some(403));
    let publish = |origin: &'static str| {
        reqwest::Client::new()
            .post(node.http("/v1/publish"))
            .header("origin", origin)
            .json(&for_user("ben", "robot.reply", "hi"))
            .send()
    };
    assert_eq!(publish("https://lan.example").await.unwrap().status(), 202);
    assert_eq!(publish("https://evil.example").await.unwrap().status(), 403);
}

/// `fanout check-config` in the embedded default, with extra environment: its stdout.
fn embedded_check_config(env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg("check-config")
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_embedded_defaults_origin_list_is_shown_and_an_empty_variable_means_any() {
    let text = embedded_check_config(&[]);
    assert!(text.contains(r#""http://127.0.0.1:*","#), "{text}");
    assert!(text.contains(r#""http://[::1]:*","#), "{text}");
    let text = embedded_check_config(&[("FANOUT__SERVER__ALLOWED_ORIGINS", "")]);
    assert!(text.contains("allowed_origins = []"), "{text}");
}

//! `kafka.sasl_mechanism = "OAUTHBEARER"`: librdkafka's OIDC method (client credentials
//! grant) against Apache Kafka's `OAuthBearerValidatorCallbackHandler`.
//!
//! Each test runs its own token endpoint (a few lines of HTTP/1.1 below, over TLS where the
//! test says so). It checks the client id and secret librdkafka sends with HTTP Basic
//! authentication and answers with an RS256 JWT signed with the key whose public half is the
//! broker's JWKS (`FANOUT_TEST_OAUTH_KEY`, `FANOUT_TEST_OAUTH_KID`, written by
//! `scripts/servers/kafka`). The broker checks the signature, `aud` and `iss`; a token it
//! did not get from this endpoint is refused.
//!
//! What librdkafka does (2.12, `rdkafka_sasl_oauthbearer_oidc.c`, `rdhttp.c`): a POST of
//! `grant_type=client_credentials[&scope=…]` with `Authorization: Basic base64(id:secret)`;
//! it wants `application/json` with an `access_token` whose payload has `sub` and `exp`. The
//! endpoint may be `http://` or `https://`. An `https://` endpoint is verified against
//! librdkafka's `https.ca.location`, not `ssl.ca.location` (`kafka.ssl_ca_location` is for
//! the brokers only); without it, against OpenSSL's default trust store.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openssl::ssl::{SslAcceptor, SslFiletype, SslMethod};
use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);
const CLIENT_ID: &str = "fanout-node";
const CLIENT_SECRET: &str = "oidc-client-secret";

/// A variable `./scripts/test` sets; fails (never skips) without it.
fn server(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run ./scripts/test, which starts Apache Kafka with its OAUTHBEARER listener")
    })
}

/// One token request as the endpoint saw it.
#[derive(Debug, Clone)]
struct TokenRequest {
    grant_type: String,
    scope: Option<String>,
    status: u16,
}

struct State {
    requests: Mutex<Vec<TokenRequest>>,
    signing_key: jsonwebtoken::EncodingKey,
    kid: String,
    audience: String,
    issuer: String,
}

/// An OIDC token endpoint on 127.0.0.1 (client credentials grant), `https` with the test
/// PKI's `server.pem` when `tls`.
struct TokenEndpoint {
    url: String,
    addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl TokenEndpoint {
    fn start(tls: bool) -> Self {
        Self::start_with(tls, &server("FANOUT_TEST_OAUTH_AUDIENCE"))
    }

    /// An endpoint whose tokens carry `audience` as their `aud`.
    fn start_with(tls: bool, audience: &str) -> Self {
        let pem = std::fs::read(server("FANOUT_TEST_OAUTH_KEY")).expect("FANOUT_TEST_OAUTH_KEY");
        let state = Arc::new(State {
            requests: Mutex::new(Vec::new()),
            signing_key: jsonwebtoken::EncodingKey::from_rsa_pem(&pem)
                .expect("FANOUT_TEST_OAUTH_KEY is an RSA private key"),
            kid: server("FANOUT_TEST_OAUTH_KID"),
            audience: audience.to_owned(),
            issuer: server("FANOUT_TEST_OAUTH_ISSUER"),
        });
        let acceptor = tls.then(|| {
            let dir = server("FANOUT_TEST_TLS_DIR");
            let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
            b.set_private_key_file(format!("{dir}/server.key"), SslFiletype::PEM)
                .unwrap();
            b.set_certificate_chain_file(format!("{dir}/server.pem"))
                .unwrap();
            b.check_private_key().unwrap();
            Arc::new(b.build())
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let (state, acceptor) = (state.clone(), acceptor.clone());
                    std::thread::spawn(move || {
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                        match acceptor {
                            None => serve(stream, &state),
                            Some(acceptor) => {
                                if let Ok(tls) = acceptor.accept(stream) {
                                    serve(tls, &state);
                                }
                            }
                        }
                    });
                }
            });
        }
        let scheme = if tls { "https" } else { "http" };
        Self {
            url: format!("{scheme}://{addr}/oauth2/token"),
            addr,
            state,
            stop,
        }
    }

    fn requests(&self) -> Vec<TokenRequest> {
        self.state.requests.lock().unwrap().clone()
    }

    fn granted(&self) -> usize {
        self.requests().iter().filter(|r| r.status == 200).count()
    }
}

impl Drop for TokenEndpoint {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

/// Answers one HTTP/1.1 request and closes the connection.
fn serve<S: Read + Write>(mut stream: S, state: &State) {
    let Some((head, body)) = read_request(&mut stream) else {
        return;
    };
    let request_line = head.lines().next().unwrap_or_default().to_owned();
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    };
    let form: Vec<(String, String)> = body
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.replace('+', " ")))
        .collect();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let grant_type = field("grant_type").unwrap_or_default();
    let scope = field("scope");
    let expected_basic = format!(
        "Basic {}",
        openssl::base64::encode_block(format!("{CLIENT_ID}:{CLIENT_SECRET}").as_bytes())
    );
    let form_type =
        header("content-type").is_some_and(|t| t.starts_with("application/x-www-form-urlencoded"));

    let (status, answer) = if !request_line.starts_with("POST /oauth2/token ") || !form_type {
        (400, json!({"error": "invalid_request"}))
    } else if header("authorization").as_deref() != Some(expected_basic.as_str()) {
        (401, json!({"error": "invalid_client"}))
    } else if grant_type != "client_credentials" {
        (400, json!({"error": "unsupported_grant_type"}))
    } else {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut claims = json!({
            "sub": CLIENT_ID,
            "aud": state.audience,
            "iss": state.issuer,
            "iat": now,
            "exp": now + 3600,
        });
        if let Some(scope) = &scope {
            claims["scope"] = scope.as_str().into();
        }
        let mut jwt_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        jwt_header.kid = Some(state.kid.clone());
        let token = jsonwebtoken::encode(&jwt_header, &claims, &state.signing_key).unwrap();
        (
            200,
            json!({"access_token": token, "token_type": "bearer", "expires_in": 3600}),
        )
    };
    state.requests.lock().unwrap().push(TokenRequest {
        grant_type,
        scope,
        status,
    });
    let body = answer.to_string();
    let reason = match status {
        200 => "OK",
        401 => "Unauthorized",
        _ => "Bad Request",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.flush();
}

/// The head and body of one request (`Content-Length` bodies only, as curl sends a form).
fn read_request(stream: &mut impl Read) -> Option<(String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut chunk).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).ok().filter(|&n| n > 0)?;
        body.extend_from_slice(&chunk[..n]);
    }
    Some((head, String::from_utf8_lossy(&body).into_owned()))
}

/// The node's Kafka settings: the OAUTHBEARER listener over SASL_SSL, tokens from `url`.
fn oauth_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("FANOUT__KAFKA__BROKERS", server("FANOUT_TEST_KAFKA_OAUTH")),
        ("FANOUT__KAFKA__SECURITY_PROTOCOL", "sasl_ssl".into()),
        ("FANOUT__KAFKA__SASL_MECHANISM", "OAUTHBEARER".into()),
        ("FANOUT__KAFKA__SASL_USERNAME", CLIENT_ID.into()),
        ("FANOUT__KAFKA__SASL_PASSWORD", CLIENT_SECRET.into()),
        (
            "FANOUT__KAFKA__SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL",
            url.into(),
        ),
        (
            "FANOUT__KAFKA__SSL_CA_LOCATION",
            format!("{}/ca.pem", server("FANOUT_TEST_TLS_DIR")),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_sasl_ssl_oauthbearer_gets_tokens_from_the_oidc_endpoint_and_delivers() {
    let idp = TokenEndpoint::start(false);
    let mut options = Options::default();
    for (key, value) in oauth_env(&idp.url) {
        options = options.with(key, &value);
    }
    options = options.with("FANOUT__KAFKA__SASL_OAUTHBEARER_SCOPE", "kafka");
    let cluster = TestCluster::start_with(2, options).await;

    let mut alice = cluster.connect(1, "alice", "").await;
    cluster
        .producer
        .send(
            "alice",
            for_user("alice", "robot.reply", "over oauthbearer"),
        )
        .await;
    assert_eq!(
        alice.expect_msg(WAIT).await["data"]["text"],
        "over oauthbearer"
    );

    // Every Kafka client of each node asked for its own token, with the scope configured.
    let requests = idp.requests();
    assert!(
        idp.granted() >= 2,
        "both nodes should have got tokens: {requests:?}"
    );
    assert!(
        requests.iter().all(|r| r.status == 200
            && r.grant_type == "client_credentials"
            && r.scope.as_deref() == Some("kafka")),
        "{requests:?}"
    );
}

#[test]
fn a_refused_client_secret_stops_the_node_naming_the_key() {
    let idp = TokenEndpoint::start(false);
    let mut env = oauth_env(&idp.url);
    env.push(("FANOUT__KAFKA__SASL_PASSWORD", "not-the-secret".into()));
    let log = expect_refused_at_start(spawn_lone_node(&env, None, free_port(), &database_url()));
    assert!(
        log.contains("kafka.sasl_oauthbearer_token_endpoint_url"),
        "the log should name the key:\n{log}"
    );
    assert!(
        !log.contains("not-the-secret"),
        "the log shows the secret:\n{log}"
    );
    let requests = idp.requests();
    assert!(
        !requests.is_empty() && requests.iter().all(|r| r.status == 401),
        "the endpoint should have refused every request: {requests:?}"
    );
}

#[test]
fn a_token_the_brokers_refuse_stops_the_node_naming_the_key() {
    // Signed with the right key, but for another cluster: Kafka's validator refuses it.
    let idp = TokenEndpoint::start_with(false, "another-cluster");
    let log = expect_refused_at_start(spawn_lone_node(
        &oauth_env(&idp.url),
        None,
        free_port(),
        &database_url(),
    ));
    assert!(
        log.contains("kafka.sasl_oauthbearer_token_endpoint_url"),
        "the log should name the key:\n{log}"
    );
    assert!(idp.granted() >= 1, "{:?}", idp.requests());
}

/// An identity provider with a private CA: `kafka.ssl_ca_location` (the brokers' CA) does not
/// make librdkafka trust it; `"https.ca.location"` in `[kafka.options]` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_token_endpoint_is_verified_against_https_ca_location_not_the_brokers_ca() {
    let idp = TokenEndpoint::start(true);
    let env = oauth_env(&idp.url);

    let log = expect_refused_at_start(spawn_lone_node(&env, None, free_port(), &database_url()));
    assert!(
        log.contains("kafka.sasl_oauthbearer_token_endpoint_url"),
        "the log should name the key:\n{log}"
    );
    assert!(
        log.contains("unable to get local issuer certificate") && idp.requests().is_empty(),
        "librdkafka should have refused the endpoint's certificate: {:?}\n{log}",
        idp.requests()
    );

    let config = std::env::temp_dir().join(format!("{}.toml", unique("oauth")));
    std::fs::write(
        &config,
        format!(
            "[kafka.options]\n\"https.ca.location\" = \"{}/ca.pem\"\n",
            server("FANOUT_TEST_TLS_DIR")
        ),
    )
    .unwrap();
    let db = TestDatabase::create().await;
    let admin = free_port();
    let mut node = spawn_lone_node(&env, Some(&config), admin, &db.url);
    let deadline = Instant::now() + WAIT;
    let ready = loop {
        if node.try_wait().unwrap().is_some() {
            break false;
        }
        let ok = reqwest::get(format!("http://127.0.0.1:{admin}/readyz"))
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok || Instant::now() > deadline {
            break ok;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = node.kill();
    let out = node.wait_with_output().unwrap();
    let _ = std::fs::remove_file(&config);
    assert!(
        ready,
        "the node should be ready over https with https.ca.location; its log:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(idp.granted() >= 1, "{:?}", idp.requests());
}

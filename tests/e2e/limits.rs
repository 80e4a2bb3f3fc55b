//! Limits against bad or abusive clients (DESIGN §3): each gets its answer, and a healthy
//! connection on the same node keeps receiving messages.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

const WAIT: Duration = Duration::from_secs(15);

/// A bystander on the node keeps getting its messages.
async fn bystander_still_served(cluster: &TestCluster, bystander: &mut Client, text: &str) {
    cluster
        .producer
        .send("bystander", for_user("bystander", "robot.reply", text))
        .await;
    assert_eq!(
        bystander.expect_msg(WAIT).await["data"]["text"],
        text,
        "the bystander was affected"
    );
}

async fn connect_status(
    url: &str,
    user: &str,
    origin: Option<&str>,
) -> Result<Client, (u16, String)> {
    let bearer = format!("Bearer {}", token(user, Duration::from_secs(600)));
    let mut headers = vec![("authorization", bearer.as_str())];
    headers.extend(origin.map(|o| ("origin", o)));
    Client::try_connect(url, &headers)
        .await
        .map_err(|(s, b)| (s.as_u16(), b))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_origin_outside_the_allow_list_gets_403() {
    let options = Options::default().with(
        "FANOUT__SERVER__ALLOWED_ORIGINS",
        "https://app.example.com, https://m.example.com",
    );
    let cluster = TestCluster::start_with(1, options).await;
    let url = cluster.node(0).ws_url("");
    let (status, body) = connect_status(&url, "ola", Some("https://evil.example"))
        .await
        .err()
        .expect("refused");
    assert_eq!(status, 403);
    assert!(body.contains("origin_not_allowed"), "{body}");
    assert!(
        connect_status(&url, "ola", Some("https://m.example.com"))
            .await
            .is_ok(),
        "listed origin"
    );
    assert!(
        connect_status(&url, "ola", None).await.is_ok(),
        "native apps send no Origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_node_answers_503_and_a_users_extra_connection_is_closed_with_1013() {
    let options = Options::default()
        .with("FANOUT__SERVER__MAX_CONNECTIONS", "3")
        .with("FANOUT__SERVER__MAX_CONNECTIONS_PER_USER", "1");
    let cluster = TestCluster::start_with(1, options).await;
    let url = cluster.node(0).ws_url("");
    let mut bystander = cluster.connect(0, "bystander", "").await;
    let _pat = cluster.connect(0, "pat", "").await;
    // pat's second connection is accepted, then closed with 1013.
    let mut second = cluster.connect_raw(0, "pat").await;
    assert!(matches!(
        second.expect_close(WAIT).await,
        Closed::Code(1013, _)
    ));
    let _quinn = cluster.connect(0, "quinn", "").await;
    let (status, body) = connect_status(&url, "rex", None)
        .await
        .err()
        .expect("node full");
    assert_eq!(status, 503);
    assert!(body.contains("overloaded"), "{body}");
    bystander_still_served(&cluster, &mut bystander, "still here").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_get_1009_and_floods_get_1008() {
    let options = Options::default()
        .with("FANOUT__SERVER__MAX_FRAME_BYTES", "1024")
        .with("FANOUT__SERVER__MAX_FRAMES_PER_SEC", "20");
    let cluster = TestCluster::start_with(1, options).await;
    let mut bystander = cluster.connect(0, "bystander", "").await;

    let mut big = cluster.connect(0, "sam", "").await;
    big.send_text(&format!(r#"{{"t":"ask","data":"{}"}}"#, "x".repeat(4096)))
        .await;
    assert!(matches!(
        big.expect_close(WAIT).await,
        Closed::Code(1009, _)
    ));

    let mut chatty = cluster.connect(0, "tia", "").await;
    for _ in 0..40 {
        chatty.send_json(json!({"t":"ping"})).await;
    }
    assert!(matches!(
        chatty.expect_close(WAIT).await,
        Closed::Code(1008, _)
    ));
    bystander_still_served(&cluster, &mut bystander, "unaffected").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_with_4001_and_others_get_everything() {
    let options = Options::default()
        .with("FANOUT__SERVER__QUEUE_MAX_MESSAGES", "64")
        .with("FANOUT__SERVER__QUEUE_MAX_BYTES", "262144");
    let cluster = TestCluster::start_with(1, options).await;
    let mut reader = cluster.connect(0, "uma", "").await;
    let _stalled = cluster.connect(0, "vic", "").await; // never read from again
                                                        // ~20 MB to everyone: more than socket buffers hold, so vic's queue overflows.
    let payload = "y".repeat(10_000);
    let n = 2000;
    let producer = cluster.producer.clone();
    let sending = tokio::spawn(async move {
        for i in 0..n {
            producer
                .send(
                    "k",
                    json!({"type":"t","to":{"all":true},"data":{"i":i,"pad":payload}}),
                )
                .await;
        }
    });
    let mut got = 0;
    while got < n {
        let m = reader.expect_msg(Duration::from_secs(60)).await;
        assert_eq!(m["data"]["i"], got, "in order, none missing");
        got += 1;
    }
    sending.await.unwrap();
    let node = cluster.node(0);
    eventually(
        Duration::from_secs(15),
        "the stalled client was closed with 4001",
        || async {
            node.metric("fanout_connections_closed_total{code=\"4001\"}")
                .await
                >= 1.0
        },
    )
    .await;
    assert!(
        node.metric("fanout_dropped_total{reason=\"queue_full\"}")
            .await
            >= 1.0
    );
}

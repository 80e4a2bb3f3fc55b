//! The embedded default: `fanout` with nothing configured runs the whole pipeline in one
//! process (in-process Kafka broker and bus, SQLite, insecure auth) and prints the broker's
//! address so any Kafka client can produce to it.

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_delivers_what_any_kafka_client_produces_to_it() {
    let node = EmbeddedNode::start(&[]).await;
    // Insecure auth: the user comes from ?user=, no token.
    let mut ada = Client::connect(&format!("ws://{}/ws?user=ada", node.public), None).await;
    assert_eq!(
        ada.hello["prefs"]["marketing"], false,
        "demo registry: marketing is off by default"
    );
    // This test process is the "separate Kafka client": it reaches the broker over TCP.
    let producer = Producer::new(&node.bootstrap, "fanout.messages");
    producer
        .send("ada", for_user("ada", "robot.reply", "from a kafka client"))
        .await;
    assert_eq!(
        ada.expect_msg(Duration::from_secs(20)).await["data"]["text"],
        "from a kafka client"
    );
    assert!(
        node.dir.join("fanout.db").exists(),
        "preferences live in ./fanout.db"
    );
}

/// RFC 6455 §5.5.1: a server answers a client's Close with a Close of its own before it
/// drops TCP. Without it every client-side close ended as 1006 (abnormal) in the client,
/// `wasClean: false` in a browser.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_the_client_is_answered_with_a_close_frame() {
    let node = EmbeddedNode::start(&[]).await;
    let ada = Client::connect(&format!("ws://{}/ws?user=ada", node.public), None).await;
    assert_eq!(
        ada.close_for_answer(1000).await,
        Closed::Code(1000, String::new())
    );
    let bob = Client::connect(&format!("ws://{}/ws?user=bob", node.public), None).await;
    assert_eq!(
        bob.close_for_answer(4321).await,
        Closed::Code(4321, String::new()),
        "an application code is echoed too"
    );
}

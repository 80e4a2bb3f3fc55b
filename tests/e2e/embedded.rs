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

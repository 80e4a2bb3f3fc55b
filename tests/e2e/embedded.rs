//! The embedded default: `fanout` with nothing configured runs the whole pipeline in one
//! process (in-process Kafka broker and bus, SQLite, insecure auth) and prints the broker's
//! address so any Kafka client can produce to it.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

/// A `fanout` started with no Kafka, Redis or database configured, in its own directory.
struct Embedded {
    child: std::process::Child,
    public: String,
    admin: String,
    bootstrap: String,
    dir: std::path::PathBuf,
}

impl Embedded {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("fanout-embedded"));
        std::fs::create_dir_all(&dir).unwrap();
        let (public, admin) = (
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        );
        let mut child = Command::new(env!("CARGO_BIN_EXE_fanout"))
            .current_dir(&dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FANOUT__SERVER__LISTEN", &public)
            .env("FANOUT__ADMIN__LISTEN", &admin)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The banner names the in-process broker: "Kafka       bootstrap HOST:PORT topic T".
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let mut bootstrap = None;
        let mut lines = stderr.lines();
        for line in lines.by_ref().take(50) {
            let line = line.unwrap();
            if let Some(rest) = line.trim().strip_prefix("Kafka") {
                bootstrap = rest.split_whitespace().nth(1).map(str::to_owned);
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop)); // keep draining the log
        let bootstrap = bootstrap.expect("the banner prints the Kafka bootstrap address");
        Self {
            child,
            public,
            admin,
            bootstrap,
            dir,
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_delivers_what_any_kafka_client_produces_to_it() {
    let node = Embedded::start();
    eventually(Duration::from_secs(30), "embedded node ready", || async {
        matches!(reqwest::get(format!("http://{}/readyz", node.admin)).await, Ok(r) if r.status().is_success())
    })
    .await;
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

//! A private Redis Cluster for the tests that fail its nodes over
//! (`scripts/servers/redis-cluster`: 3 primaries and 3 replicas from Debian's
//! `redis-server` on free loopback ports, about 6 s to start), stopped when dropped. Tests
//! that only need *a* cluster use the shared one (`FANOUT_TEST_REDIS_CLUSTER`) instead.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use tokio::sync::mpsc;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/servers/redis-cluster")
}

/// A running private cluster.
pub struct PrivateCluster {
    dir: PathBuf,
    /// `redis-cluster://127.0.0.1:P1,127.0.0.1:P2,…` (DESIGN §7).
    pub url: String,
}

impl PrivateCluster {
    /// Starts a cluster and waits until every node serves (run off the async threads).
    pub async fn start() -> Self {
        tokio::task::spawn_blocking(Self::start_blocking)
            .await
            .unwrap()
    }

    fn start_blocking() -> Self {
        let dir =
            std::env::temp_dir().join(format!("fanout-test-cluster-{:08x}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new(script())
            .arg("start")
            .arg(&dir)
            .output()
            .expect("run scripts/servers/redis-cluster");
        assert!(
            out.status.success(),
            "this test needs a private Redis Cluster: scripts/servers/redis-cluster start failed \
             (it needs redis-server and redis-cli on PATH; ./scripts/test installs them):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let url = Command::new("bash")
            .arg("-c")
            .arg(r#"source "$1/env" && printf %s "$FANOUT_TEST_REDIS_CLUSTER""#)
            .arg("bash")
            .arg(&dir)
            .output()
            .unwrap();
        let url = String::from_utf8(url.stdout).unwrap();
        assert!(url.starts_with("redis-cluster://"), "{url}");
        Self { dir, url }
    }

    /// The client ports of its nodes.
    pub fn ports(&self) -> Vec<u16> {
        self.url
            .trim_start_matches("redis-cluster://")
            .split(',')
            .filter_map(|node| node.rsplit_once(':')?.1.parse().ok())
            .collect()
    }

    /// Fails over the primary serving `key`'s slot: SIGKILLs it (`manual` false) or has its
    /// replica take over with `CLUSTER FAILOVER` (`manual` true). Runs in the background;
    /// the returned handle tells when the primary is dead and when the replica serves.
    pub fn failover(&self, key: &str, manual: bool) -> Failover {
        let mut cmd = Command::new(script());
        cmd.arg("failover").arg(&self.dir);
        if manual {
            cmd.arg("--manual");
        }
        let mut child = cmd
            .args(["--key", key])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run scripts/servers/redis-cluster");
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            let stdout = child.stdout.take().unwrap();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
            let mut err = String::new();
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            let status = child.wait().unwrap();
            let _ = tx.send(format!("EXIT={status} {err}"));
        });
        Failover { lines }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = Command::new(script()).arg("stop").arg(&self.dir).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A failover in progress ([`PrivateCluster::failover`]).
pub struct Failover {
    lines: mpsc::UnboundedReceiver<String>,
}

impl Failover {
    /// Waits for the script's `NAME=value` line (`FAILOVER_KILLED`, `FAILOVER_DEMOTED`,
    /// `FAILOVER_PROMOTED`); its value. Fails the test if the script fails first.
    pub async fn wait_for(&mut self, name: &str) -> String {
        while let Some(line) = self.lines.recv().await {
            if let Some(value) = line.strip_prefix(name).and_then(|l| l.strip_prefix('=')) {
                return value.to_owned();
            }
            assert!(
                !line.starts_with("EXIT="),
                "scripts/servers/redis-cluster failover ended before {name}: {line}"
            );
        }
        panic!("scripts/servers/redis-cluster failover ended before {name}");
    }
}

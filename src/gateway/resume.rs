//! Resume with `since` (DESIGN §6): what a reconnecting connection missed, read from the
//! history and filtered for it, before its live messages.
//!
//! Invariant: the connection is registered before the history is read, so live messages
//! queue up meanwhile; the session then skips queued messages up to the bus head the read
//! saw. Nothing is lost between the two, and nothing arrives twice.

use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::Gateway;
use crate::bus::history::{self, Replay};
use crate::clock::now_ms;
use crate::metrics::Resume as ResumeLabel;
use crate::protocol::Resume;
use crate::registry::ConnHandle;
use crate::types;

/// Longest `since` looked up (ids are far shorter; anything longer is not one of ours).
const MAX_SINCE_BYTES: usize = 256;

/// What a resuming connection gets before live messages.
pub(super) struct Resumed {
    pub resume: Resume,
    /// `msg` frames to send after `hello`, in order.
    pub frames: Vec<Utf8Bytes>,
    /// Live messages up to this sequence number were covered by the replay.
    pub skip_through: u64,
}

impl Gateway {
    /// Reads what `conn` missed after `since`, filtered for this connection: its target
    /// details, its user's preferences now, and each message's ttl. Exact or nothing.
    pub(super) async fn resume(&self, conn: &ConnHandle, since: &str) -> Resumed {
        let not_recovered = |result: ResumeLabel| {
            self.metrics
                .resumes
                .with_label_values(&[result.label()])
                .inc();
            Resumed {
                resume: Resume {
                    recovered: false,
                    replayed: 0,
                },
                frames: Vec::new(),
                skip_through: 0,
            }
        };
        if since.is_empty() || since.len() > MAX_SINCE_BYTES {
            return not_recovered(ResumeLabel::NotRecovered);
        }
        let (messages, head) = match history::replay(&*self.bus, &conn.user, &conn.groups, since)
            .await
        {
            Ok(Replay::Recovered { messages, head }) => (messages, head),
            Ok(Replay::NotRecovered) => return not_recovered(ResumeLabel::NotRecovered),
            Err(e) => {
                tracing::warn!(conn = %conn.id, user = %conn.user, error = %e, "history unreadable; resume not recovered");
                return not_recovered(ResumeLabel::Error);
            }
        };
        let (now, bits) = (now_ms(), conn.prefs.get());
        let frames: Vec<Utf8Bytes> = messages
            .into_iter()
            .filter(|m| {
                conn.is_target(&m.header.to)
                    && types::accepts(bits, self.prefs.types.slot(&m.header.msg_type))
                    && !m.header.expired(now)
            })
            .map(|m| m.frame)
            .collect();
        self.metrics
            .resumes
            .with_label_values(&[ResumeLabel::Recovered.label()])
            .inc();
        self.metrics.replayed.inc_by(frames.len() as u64);
        Resumed {
            resume: Resume {
                recovered: true,
                replayed: frames.len() as u64,
            },
            frames,
            skip_through: head,
        }
    }
}

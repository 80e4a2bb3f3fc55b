//! History reads: one [`READ_SCRIPT`](super::scripts::READ_SCRIPT) call and its reply.

use fred::prelude::*;

use super::{int, payload_bytes, RedisBus};
use crate::bus::{After, BusError, HistoryRead, Positions, StreamKey, StreamRead};

impl RedisBus {
    /// One [`READ_SCRIPT`](super::scripts::READ_SCRIPT) call: `streams`' entries after `after`.
    pub(super) async fn read(
        &self,
        after: After<'_>,
        streams: &[StreamKey<'_>],
    ) -> Result<HistoryRead, BusError> {
        let (id, mode, position) = match after {
            After::Id(id) => (id, "id", 0),
            After::Seq(seq) => ("", "seq", seq),
        };
        let keys = self.script_keys(id, streams);
        let args: Vec<Value> = vec![
            mode.into(),
            position.to_string().into(),
            self.max_messages.as_str().into(),
            self.body_prefix.as_str().into(),
        ];
        let reply: Value = self
            .read_script
            .evalsha_with_reload(&self.publisher, keys, args)
            .await?;
        parse_read(reply, self.node_channel.is_some())
    }
}

/// Parses [`READ_SCRIPT`](super::scripts::READ_SCRIPT)'s reply (with the channel counters
/// after `after` when `routed`).
fn parse_read(reply: Value, routed: bool) -> Result<HistoryRead, BusError> {
    let Value::Array(items) = reply else {
        return Err(BusError::Reply(format!("history read: {reply:?}")));
    };
    let head = items.first().map(int).transpose()?.unwrap_or(0).max(0) as u64;
    let epoch_start = items.get(1).map(int).transpose()?.unwrap_or(0).max(0) as u64;
    let after = items.get(2).map(int).transpose()?.unwrap_or(-1);
    let positions = if routed {
        match items.get(3) {
            Some(Value::Array(pos)) if pos.len() == 2 => Some(Positions {
                bus: int(&pos[0])?.max(0) as u64,
                node: int(&pos[1])?.max(0) as u64,
            }),
            other => {
                return Err(BusError::Reply(format!(
                    "history read: no channel counters: {other:?}"
                )))
            }
        }
    } else {
        None
    };
    if after < 0 {
        return Ok(HistoryRead {
            after: None,
            head,
            epoch_start,
            streams: Vec::new(),
            positions,
        });
    }
    let skip = if routed { 4 } else { 3 };
    let mut streams = Vec::with_capacity(items.len().saturating_sub(skip));
    for item in items.into_iter().skip(skip) {
        let Value::Array(parts) = item else {
            return Err(BusError::Reply(
                "history read: stream is not an array".into(),
            ));
        };
        let mut parts = parts.into_iter();
        let complete = parts.next().map(|v| int(&v)).transpose()? == Some(1);
        let entries = parts.filter_map(payload_bytes).collect();
        streams.push(StreamRead { complete, entries });
    }
    Ok(HistoryRead {
        after: Some(after as u64),
        head,
        epoch_start,
        streams,
        positions,
    })
}

//! Sequence checks on arriving bus messages: a message that follows the last one is routed;
//! a jump (messages missed) or a step back (a counter reset) starts a recovery from the
//! history, the message waiting for it. Broadcast mode checks the bus's own number; routed
//! mode each channel's.

use super::*;

impl Router {
    /// Routes a message in sequence; a jump or a step back starts a recovery (and the
    /// message, as `payload`, waits for it).
    pub(super) fn on_message(&mut self, msg: BusMessage, payload: Bytes) -> Option<Recovery> {
        fail::fail_point!("router-message");
        if msg.header.at_us != 0 {
            let on_bus_us = now_us().saturating_sub(msg.header.at_us);
            self.metrics.stage_bus.observe(on_bus_us as f64 / 1e6);
        }
        let Some(last) = self.last_seq else {
            self.last_seq = Some(msg.seq);
            self.route(&msg);
            return None;
        };
        if msg.seq == last + 1 {
            self.last_seq = Some(msg.seq);
            self.whole_at = Instant::now();
            self.route(&msg);
            return None;
        }
        if msg.seq <= last && msg.seq <= self.recovered_through {
            // Already routed from the history.
            self.metrics
                .dropped
                .with_label_values(&[Dropped::Duplicate.label()])
                .inc();
            return None;
        }
        Some(self.sequence_broken(Channel::Bus, last, msg.seq, msg.seq, payload))
    }

    /// A channel's number went from `last` to `number` (the bus's own for the bus channel,
    /// the channel's in routed mode; `seq` the message's bus number): messages were missed
    /// (a jump) or the counter was reset (a step back). Counts it; the message waits for the
    /// recovery this starts.
    fn sequence_broken(
        &mut self,
        channel: Channel,
        last: u64,
        number: u64,
        seq: u64,
        payload: Bytes,
    ) -> Recovery {
        let reason = if number > last {
            Gap::Skipped
        } else {
            Gap::Reset
        };
        tracing::warn!(
            channel = channel.as_str(),
            last,
            number,
            seq,
            reason = reason.label(),
            "bus sequence broken: recovering"
        );
        self.metrics
            .bus_gaps
            .with_label_values(&[reason.label()])
            .inc();
        self.buffer
            .push_front(BusEvent::Message { channel, payload });
        self.start_recovery(true)
    }

    /// Routed mode: routes a message that follows the last one of its channel; a jump or a
    /// step back in the channel's number starts a recovery (the message waits for it).
    pub(super) fn on_routed_message(
        &mut self,
        channel: Channel,
        msg: BusMessage,
        payload: Bytes,
    ) -> Option<Recovery> {
        fail::fail_point!("router-message");
        if msg.header.at_us != 0 {
            let on_bus_us = now_us().saturating_sub(msg.header.at_us);
            self.metrics.stage_bus.observe(on_bus_us as f64 / 1e6);
        }
        let Some(number) = payload_channel_seq(&payload) else {
            // A frame without its channel's number: a node in broadcast mode publishes here.
            self.metrics.bus_bad_payloads.inc();
            tracing::warn!(
                seq = msg.seq,
                "bus frame without a channel number in routed mode (is every node on bus.routing = \"routed\"?)"
            );
            return None;
        };
        if self.last_seq.is_some() && msg.seq <= self.recovered_through {
            // Already routed from the history.
            self.metrics
                .dropped
                .with_label_values(&[Dropped::Duplicate.label()])
                .inc();
            return None;
        }
        let i = usize::from(channel == Channel::Node);
        let seqs = self.channel_seq.as_mut().expect("routed mode");
        match seqs[i] {
            Some(last) if number != last + 1 => {
                return Some(self.sequence_broken(channel, last, number, msg.seq, payload));
            }
            _ => seqs[i] = Some(number),
        }
        if self.last_seq.is_some() {
            self.whole_at = Instant::now();
        }
        self.last_seq = Some(self.last_seq.map_or(msg.seq, |last| last.max(msg.seq)));
        self.route(&msg);
        None
    }
}

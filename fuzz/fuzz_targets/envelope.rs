//! The Kafka envelope decoder (`fanout::envelope::decode`) on arbitrary record values.
//!
//! Properties: `decode` never panics; a value over `max_bytes` is `TooLarge`; every
//! envelope it accepts renders (`render_msg_frame_with`) into a frame that is valid JSON,
//! carries the given id/type/ts and the envelope's `collapse`, and carries `data` byte for
//! byte.
#![no_main]

use fanout::envelope::{decode, render_msg_frame_with, Reject};
use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The default `kafka.max_record_bytes`.
const MAX_RECORD_BYTES: usize = 256 * 1024;

#[derive(Deserialize)]
struct Frame<'a> {
    t: String,
    id: String,
    #[serde(rename = "type")]
    msg_type: String,
    ts: i64,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    collapse: Option<String>,
}

fuzz_target!(|value: &[u8]| {
    // The size limit comes first, whatever the bytes.
    if !value.is_empty() {
        assert_eq!(
            decode(Some(value), value.len() - 1).unwrap_err(),
            Reject::TooLarge(value.len())
        );
    }

    let Ok(envelope) = decode(Some(value), MAX_RECORD_BYTES) else {
        return;
    };
    assert!(!envelope.msg_type.is_empty());

    // Ids are the server's (a producer's `id` is accepted but not used).
    let id = "0-0-1764000000000";
    for ts in [0, 1_764_000_000_000, i64::MIN, i64::MAX] {
        let frame = render_msg_frame_with(
            id,
            &envelope.msg_type,
            ts,
            &envelope.data,
            envelope.collapse.as_deref(),
        );
        // Syntactic validity without serde_json's number range check (`1e400` is valid
        // JSON that `serde_json::Value` refuses; it is passed through verbatim).
        let parsed: Frame<'_> = serde_json::from_str(&frame)
            .unwrap_or_else(|e| panic!("rendered frame is not JSON ({e}): {frame}"));
        assert_eq!(parsed.t, "msg");
        assert_eq!(parsed.id, id);
        assert_eq!(parsed.msg_type, envelope.msg_type);
        assert_eq!(parsed.ts, ts);
        assert_eq!(parsed.data.get(), envelope.data.get(), "data is verbatim");
        assert_eq!(parsed.collapse, envelope.collapse);
    }
});

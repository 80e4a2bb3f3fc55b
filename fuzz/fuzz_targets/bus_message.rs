//! The bus wire format (`fanout::bus::BusMessage::decode`) on arbitrary payloads, as a node
//! reads them from Redis.
//!
//! Properties: `decode` never panics; the frame is exactly the bytes after the second
//! newline (the first ends the sequence number, the second the header); a decoded message
//! re-encodes into a payload that decodes to the same sequence number, header and frame.
#![no_main]

use bytes::Bytes;
use fanout::bus::BusMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let Ok(msg) = BusMessage::decode(Bytes::copy_from_slice(payload)) else {
        return;
    };
    let mut newlines = payload.iter().enumerate().filter(|(_, b)| **b == b'\n');
    let _seq_end = newlines.next().expect("decoded without a sequence line");
    let (header_end, _) = newlines.next().expect("decoded without a header line");
    assert_eq!(msg.frame.as_bytes(), &payload[header_end + 1..]);

    let wire = msg.encode();
    let back = BusMessage::decode(wire.clone())
        .unwrap_or_else(|e| panic!("re-encoded message does not decode ({e}): {wire:?}"));
    assert_eq!(back.seq, msg.seq);
    assert_eq!(back.header, msg.header);
    assert_eq!(back.frame, msg.frame);
});

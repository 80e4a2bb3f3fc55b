//! The client frame parser (`fanout::gateway::protocol::parse`) on arbitrary text.
//!
//! Non-UTF-8 input is skipped: tungstenite validates text frames before fanout sees them.
//! Properties: `parse` never panics; `ask` data is a slice of the input (kept verbatim);
//! the replies the session renders for the outcome (`error`, `prefs`, `ask.ok`) are JSON.
#![no_main]

use fanout::gateway::protocol::{self, ClientFrame};
use libfuzzer_sys::fuzz_target;

fn assert_json(frame: &str) {
    if let Err(e) = serde_json::from_str::<serde_json::Value>(frame) {
        panic!("rendered reply is not JSON ({e}): {frame}");
    }
}

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return;
    };
    match protocol::parse(text) {
        Ok(ClientFrame::Ping) | Ok(ClientFrame::PrefsGet) | Ok(ClientFrame::Ack { .. }) => {}
        Ok(ClientFrame::PrefsSet { prefs, reference }) => {
            assert_json(protocol::prefs(&prefs).as_str());
            assert_json(protocol::ask_ok(reference.as_deref()).as_str());
        }
        Ok(ClientFrame::Ask { reference, data }) => {
            // Verbatim: `data` is a slice of the frame itself.
            let start = (data.get().as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
            assert!(
                start <= text.len() && data.get().len() <= text.len() - start,
                "ask data is not borrowed from the frame"
            );
            assert_json(protocol::ask_ok(reference.as_deref()).as_str());
        }
        Err(bad) => {
            assert_json(
                protocol::error("bad_frame", &bad.message, bad.reference.as_deref()).as_str(),
            );
        }
    }
});

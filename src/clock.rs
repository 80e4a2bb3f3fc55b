//! The wall clock, in the units the pipeline stamps messages with. A leaf: anything may use
//! it.

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch (stage latencies are measured across nodes, so with
/// the wall clock).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

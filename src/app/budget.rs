//! The connection limits a node can keep within its open-file limit.

use crate::config::Settings;
use crate::registry::Limits;

/// Open files kept for what is not a client socket: Kafka, Redis and database connections,
/// the SQLite file, the runtime's own descriptors.
const RESERVED_FILES: usize = 128;

/// The connection limits that fit the process's open-file limit: a node must not run out
/// of file descriptors under a flood (then it could not even answer `/healthz`). Raises
/// the soft limit to the hard one first; lowers `server.max_pending_connections` (to a
/// quarter of the room) and `server.max_connections` only when they do not fit, with a
/// warning naming the key. `(max_connections, max_pending_connections)`.
pub(super) fn file_budget(settings: &Settings) -> anyhow::Result<(usize, usize)> {
    let s = &settings.server;
    let files = rlimit::increase_nofile_limit(u64::MAX)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
        .unwrap_or(usize::MAX);
    let fixed = RESERVED_FILES + settings.admin.max_connections;
    let room = files.saturating_sub(fixed);
    if room < 32 {
        anyhow::bail!(
            "the process may open only {files} files (RLIMIT_NOFILE); fanout needs {fixed} for itself and admin.max_connections, and room for clients"
        );
    }
    let pending = s.max_pending_connections.min(room / 4);
    if pending < s.max_pending_connections {
        tracing::warn!(
            configured = s.max_pending_connections,
            effective = pending,
            open_files = files,
            "server.max_pending_connections lowered to fit the open-file limit"
        );
    }
    let connections = s.max_connections.min(room - pending);
    if connections < s.max_connections {
        tracing::warn!(
            configured = s.max_connections,
            effective = connections,
            open_files = files,
            "server.max_connections lowered to fit the open-file limit"
        );
    }
    Ok((connections, pending))
}

pub(super) fn limits(settings: &Settings, max_connections: usize) -> Limits {
    let s = &settings.server;
    Limits {
        max_connections,
        max_connections_per_user: s.max_connections_per_user,
        queue_max_messages: s.queue_max_messages,
        queue_max_bytes: s.queue_max_bytes,
    }
}

//! The bus's key and channel names, and the Lua names the routed publish script uses.

use super::{Channel, Outgoing, RedisBus, StreamKey, NODE_COUNTER_TTL_SECS};

impl RedisBus {
    pub(super) fn stream_key(&self, key: &StreamKey<'_>) -> String {
        match key {
            StreamKey::All => self.all_key.clone(),
            StreamKey::User(user) => format!("{}:u:{user}", self.base),
            StreamKey::Group(group) => format!("{}:g:{group}", self.base),
        }
    }

    /// `<prefix>:c:<stream>` (`c:u:<user>`, `c:g:<group>`, `c:all`): a stream's `collapse`
    /// key → the sequence number of its entry.
    pub(super) fn collapse_key(&self, key: &StreamKey<'_>) -> String {
        match key {
            StreamKey::All => format!("{}:c:all", self.base),
            StreamKey::User(user) => format!("{}:c:u:{user}", self.base),
            StreamKey::Group(group) => format!("{}:c:g:{group}", self.base),
        }
    }

    /// The keys a publish script appends `msg` to: each stream, followed by its collapse
    /// hash when `msg` has a `collapse` key.
    pub(super) fn append_keys<'a>(
        &self,
        msg: &Outgoing,
        streams: impl IntoIterator<Item = &'a StreamKey<'a>>,
        into: &mut Vec<String>,
    ) {
        let collapse = msg.header.collapse.is_some();
        for key in streams {
            into.push(self.stream_key(key));
            if collapse {
                into.push(self.collapse_key(key));
            }
        }
    }

    /// `<prefix>:m:<id>`: the sequence number an id was published with.
    pub(super) fn seen_key(&self, id: &str) -> String {
        format!("{}:m:{id}", self.base)
    }

    pub(super) fn script_keys<'a>(
        &self,
        id: &str,
        streams: impl IntoIterator<Item = &'a StreamKey<'a>>,
    ) -> Vec<String> {
        let mut keys = vec![
            self.seq_key.clone(),
            self.epoch_key.clone(),
            self.seen_key(id),
            self.pending_key.clone(),
        ];
        keys.extend(streams.into_iter().map(|k| self.stream_key(k)));
        keys
    }

    /// The channel's name; [`Channel::Node`] is this node's own (the bus channel in
    /// broadcast mode, which has no node channels).
    pub(super) fn channel_name(&self, channel: Channel) -> &str {
        match channel {
            Channel::Bus => &self.bus_channel,
            Channel::Control => &self.control_channel,
            Channel::Node => self.node_channel.as_deref().unwrap_or(&self.bus_channel),
        }
    }
}

/// The names [`ROUTED_LUA`](super::scripts::ROUTED_LUA) uses, as Lua definitions, for the
/// key base `base` and this node's id.
pub(super) fn routed_names(base: &str, node: &str) -> String {
    let users = format!("{base}:u:");
    format!(
        "local R_BSEQ = {}\nlocal R_NSEQ = {}\nlocal R_OWN = {}\nlocal R_NODE = {}\n\
         local R_PRESENCE = {}\nlocal R_USERS_LEN = {}\nlocal R_NSEQ_TTL = {}\n",
        lua_string(&format!("{base}:bseq")),
        lua_string(&format!("{base}:nseq:")),
        lua_string(&format!("{base}:nseq:{node}")),
        lua_string(&format!("{base}:node:")),
        lua_string(&format!("{base}:presence:u:")),
        users.len(),
        NODE_COUNTER_TTL_SECS,
    )
}

/// `s` as a Lua string literal (every byte that is not plain printable ASCII escaped).
pub(super) fn lua_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for b in s.bytes() {
        if (b.is_ascii_graphic() && b != b'\\' && b != b'\'') || b == b' ' {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\{b:03}"));
        }
    }
    out.push('\'');
    out
}

/// `{<prefix>}` on a Redis Cluster (the hash tag of every bus key), else `<prefix>`.
pub fn key_base(prefix: &str, cluster: bool) -> String {
    if cluster {
        format!("{{{prefix}}}")
    } else {
        prefix.to_owned()
    }
}

//! Revoked tokens: per user, the first `iat` (seconds) accepted again. A token of a listed
//! user is refused when its `iat` is earlier, or when it has none.
//!
//! The list only grows while a node runs: an entry is replaced only by a later time, so an
//! announcement and a re-read of the database that cross each other cannot undo a
//! revocation (see `crate::kick`, which fills it). Read at admission and by the HTTP API,
//! never per message.

use std::collections::HashMap;
use std::sync::OnceLock;

use parking_lot::RwLock;
use prometheus::{IntCounter, IntGauge};

/// The revocations a node knows, and the metrics that count them.
#[derive(Default)]
pub struct Revocations {
    by_user: RwLock<HashMap<Box<str>, i64>>,
    metrics: OnceLock<(IntCounter, IntGauge)>,
}

impl Revocations {
    /// Counts refusals in `refused` and keeps `size` at the number of users listed.
    pub fn count_in(&self, refused: IntCounter, size: IntGauge) {
        size.set(self.by_user.read().len() as i64);
        let _ = self.metrics.set((refused, size));
    }

    /// True if a token of `user` issued at `issued_at` (seconds; `None`: no `iat`) is
    /// refused; counted.
    pub fn refuses(&self, user: &str, issued_at: Option<i64>) -> bool {
        let Some(&before) = self.by_user.read().get(user) else {
            return false;
        };
        let refused = issued_at.is_none_or(|iat| iat < before);
        if refused {
            if let Some((counter, _)) = self.metrics.get() {
                counter.inc();
            }
        }
        refused
    }

    /// Refuses `user`'s tokens issued before `before` (seconds), unless a later time is
    /// already held; true if the entry changed.
    pub fn revoke(&self, user: &str, before: i64) -> bool {
        let mut by_user = self.by_user.write();
        let changed = match by_user.get_mut(user) {
            Some(held) if *held >= before => false,
            Some(held) => {
                *held = before;
                true
            }
            None => {
                by_user.insert(user.into(), before);
                true
            }
        };
        if let Some((_, size)) = self.metrics.get() {
            size.set(by_user.len() as i64);
        }
        changed
    }

    /// The first `iat` accepted for `user`, if their tokens were revoked.
    pub fn revoked_before(&self, user: &str) -> Option<i64> {
        self.by_user.read().get(user).copied()
    }

    /// How many users are listed.
    pub fn len(&self) -> usize {
        self.by_user.read().len()
    }

    /// True when no user is listed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_tokens_issued_before_and_tokens_without_iat() {
        let list = Revocations::default();
        assert!(!list.refuses("alice", Some(100)));
        assert!(!list.refuses("alice", None), "no entry: iat not needed");
        assert!(list.revoke("alice", 100));
        assert!(list.refuses("alice", Some(99)));
        assert!(list.refuses("alice", None));
        assert!(
            !list.refuses("alice", Some(100)),
            "issued at `before`: accepted"
        );
        assert!(!list.refuses("alice", Some(101)));
        assert!(!list.refuses("bob", Some(1)), "other users untouched");
    }

    #[test]
    fn keeps_the_later_time_and_counts() {
        let list = Revocations::default();
        let refused = IntCounter::new("r", "r").unwrap();
        let size = IntGauge::new("s", "s").unwrap();
        list.count_in(refused.clone(), size.clone());
        assert!(list.revoke("alice", 200));
        assert!(!list.revoke("alice", 150), "an older time changes nothing");
        assert!(!list.revoke("alice", 200));
        assert_eq!(list.revoked_before("alice"), Some(200));
        assert!(list.revoke("alice", 300));
        assert_eq!(list.revoked_before("alice"), Some(300));
        list.revoke("bob", 1);
        assert_eq!(size.get(), 2);
        assert!(list.refuses("alice", Some(299)));
        assert!(!list.refuses("alice", Some(300)));
        assert_eq!(refused.get(), 1);
    }
}

//! What one message did for each user it targets here, for receipts.

use std::sync::Arc;

use crate::receipts::{self, MsgRef, Receipts, Routed};

/// Follows, user by user, what one message does to the connections it targets here: the
/// frames queued to a user's connections share one [`Ticket`](receipts::Ticket), which
/// reports `delivered` once they are written; a user it queued nothing to is reported in
/// one event per message: `filtered` when the user's connections had the type switched
/// off, or `expired`. The registry gives a user's connections one after another, so one
/// user is followed at a time. Per recipient user: a reference count (the registry's
/// shared id) and a ticket; the message's id and type are allocated once per message, at
/// its first report.
pub(super) struct Tally<'a> {
    receipts: &'a Receipts,
    header: &'a crate::bus::Header,
    msg: Option<MsgRef>,
    users: Vec<(Arc<str>, Routed)>,
    user: Option<Arc<str>>,
    /// The current user's ticket, made at its first queued frame.
    current: Option<Arc<receipts::Ticket>>,
    pub(super) queued: u32,
    pub(super) filtered: bool,
    pub(super) expired: bool,
}

impl<'a> Tally<'a> {
    pub(super) fn new(receipts: &'a Receipts, header: &'a crate::bus::Header) -> Self {
        Self {
            receipts,
            header,
            msg: None,
            users: Vec::new(),
            user: None,
            current: None,
            queued: 0,
            filtered: false,
            expired: false,
        }
    }

    fn msg(&mut self) -> &MsgRef {
        self.msg.get_or_insert_with(|| MsgRef::of(self.header))
    }

    /// Moves on to `user`'s connection (closing the previous user if it changes).
    #[inline]
    pub(super) fn next(&mut self, user: &Arc<str>) {
        if !self.user.as_ref().is_some_and(|u| Arc::ptr_eq(u, user)) {
            self.close_user();
            self.user = Some(user.clone());
        }
    }

    /// The current user's ticket, for one more queued frame.
    pub(super) fn ticket(&mut self) -> Option<Arc<receipts::Ticket>> {
        if self.current.is_none() {
            let user = self.user.clone()?;
            let receipts = self.receipts;
            self.current = receipts.ticket(self.msg(), &user);
        }
        self.current.clone()
    }

    /// Notes a negative outcome for the current user, if it had one here.
    fn close_user(&mut self) {
        self.current = None; // its frames hold it now (or nothing does: then it is silent)
        let Some(user) = self.user.take() else { return };
        let queued = std::mem::take(&mut self.queued);
        let filtered = std::mem::take(&mut self.filtered);
        let routed = if self.expired {
            Routed::Expired
        } else if queued > 0 {
            return; // its ticket reports it
        } else if filtered {
            Routed::Filtered
        } else {
            return; // every queue was full or closed: nothing to report from here
        };
        self.users.push((user, routed));
    }

    /// Reports the message's negative outcomes (one event), if any.
    pub(super) fn flush(&mut self) {
        self.close_user();
        if !self.users.is_empty() {
            let users = std::mem::take(&mut self.users);
            let msg = self.msg().clone();
            self.receipts.routed(msg, users);
        }
    }
}

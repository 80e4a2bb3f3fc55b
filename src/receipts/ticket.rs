//! The [`Ticket`] a message's queue entries to one user's connections share.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::{Event, MsgRef, Receipts};
use crate::clock::now_ms;

/// One message on its way to one user's connections on this node, shared by their queue
/// entries: each session [marks](Self::written) it when it has written the frame; when the
/// last entry lets go (written, skipped, or dropped with a closing connection), it reports
/// `delivered` with the number of sockets written — nothing if none was (every connection
/// closed first: the outcome is then unknown here, as when every queue was full).
#[derive(Debug)]
pub struct Ticket {
    receipts: Receipts,
    msg: MsgRef,
    user: Arc<str>,
    written: AtomicU32,
}

impl Ticket {
    pub(super) fn new(receipts: Receipts, msg: MsgRef, user: Arc<str>) -> Self {
        Self {
            receipts,
            msg,
            user,
            written: AtomicU32::new(0),
        }
    }

    /// One more socket had the frame written (flushed).
    #[inline]
    pub fn written(&self) {
        self.written.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let conns = *self.written.get_mut();
        if conns > 0 {
            self.receipts.send(Event::Delivered {
                msg: self.msg.clone(),
                user: self.user.clone(),
                conns,
                at_ms: now_ms(),
            });
        }
    }
}

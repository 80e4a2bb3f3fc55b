//! Kick and revoke (DESIGN §5 `POST /v1/users/{user}/disconnect`, §3 close 4004).
//!
//! A kick is announced on `<prefix>:control` (`"kind":"kick"`); every node's router hands it
//! to [`Kicks::apply`], which asks each local connection of the user to close, through the
//! registry's per-connection close request: one read lock, no waiting, no per-message cost.
//!
//! A revocation is a kick that also refuses the user's tokens issued before now, on every
//! node, across restarts. It is written to `fanout_revocations` first (the database keeps the
//! later time), then announced. Each node holds the list in [`Revocations`] (read by
//! [`crate::auth`] wherever a token is checked); it reads the table at start, applies every
//! announcement, and re-reads the table every [`RELOAD_EVERY`] and at once after a bus gap,
//! so a node that missed an announcement refuses the revoked tokens (and closes the user's
//! open connections with 4003) within that bound.
//!
//! `iat` has one-second granularity, so a revocation made during second `s` refuses every
//! token with `iat <= s` (`revoked_before = s + 1`): a token minted in the same second as
//! the revoke, before or after it, is refused too. Nothing revoked ever gets through; a
//! fresh token is accepted once its `iat` reaches `revoked_before`, at most a second later.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::auth::{Authenticator, Revocations};
use crate::bus::{Bus, BusError, Channel};
use crate::clock::now_ms;
use crate::metrics::{KickClose, KickKind, Metrics, Reload};
use crate::prefs::{Store, StoreError};
use crate::protocol::Close;
use crate::registry::Registry;

/// How often each node re-reads `fanout_revocations`: the longest a node that missed an
/// announcement (and saw no bus gap) keeps accepting a revoked token.
pub const RELOAD_EVERY: Duration = Duration::from_secs(10);

/// The `kind` of a kick on the control channel.
pub const KIND: &str = "kick";

/// A kick as announced on the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kick {
    /// Always [`KIND`].
    pub kind: String,
    pub user: String,
    /// Set for a revocation: the user's tokens with an `iat` before this (seconds since the
    /// epoch) are refused, and open connections close with 4003 instead of 4004.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_before: Option<i64>,
    /// When it was announced, ms since the epoch.
    pub ts: i64,
}

impl Kick {
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("kick serializes"))
    }

    pub fn decode(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

/// Why a disconnect request failed.
#[derive(Debug, thiserror::Error)]
pub enum KickError {
    /// The revocation could not be written: nothing changed anywhere.
    #[error("the revocation could not be saved: {0}")]
    Store(#[from] StoreError),
    /// Not announced: only this node's connections were closed. A revocation is saved, and
    /// the other nodes apply it at their next re-read of the table ([`RELOAD_EVERY`]).
    #[error("the request could not be announced to the cluster, only this node's connections were closed: {0}")]
    Announce(BusError),
}

/// The first `iat` accepted after a revocation made at `now_ms`: the next whole second.
pub fn first_accepted_iat(now_ms: i64) -> i64 {
    now_ms.div_euclid(1000) + 1
}

/// Carries out disconnect requests and applies the cluster's kicks and revocations here.
pub struct Kicks {
    store: Store,
    bus: Arc<dyn Bus>,
    auth: Arc<Authenticator>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    /// Woken after a bus gap: re-read the table now.
    reload: Notify,
}

impl Kicks {
    pub fn new(
        store: Store,
        bus: Arc<dyn Bus>,
        auth: Arc<Authenticator>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        auth.revocations()
            .count_in(metrics.revoked_refused.clone(), metrics.revocations.clone());
        Arc::new(Self {
            store,
            bus,
            auth,
            registry,
            metrics,
            reload: Notify::new(),
        })
    }

    fn revocations(&self) -> &Revocations {
        self.auth.revocations()
    }

    /// `POST /v1/users/{user}/disconnect`: closes every connection of `user` on every node
    /// (4004); with `revoke`, first refuses their tokens issued before now, here at once and
    /// on every node (open connections then close with 4003). Returns the revocation's
    /// `revoked_before`, the first `iat` accepted again.
    pub async fn disconnect(&self, user: &str, revoke: bool) -> Result<Option<i64>, KickError> {
        let revoked_before = if revoke {
            let stored = self
                .store
                .revoke(user, first_accepted_iat(now_ms()))
                .await?;
            self.revocations().revoke(user, stored);
            Some(stored)
        } else {
            None
        };
        let kick = Kick {
            kind: KIND.into(),
            user: user.to_owned(),
            revoked_before,
            ts: now_ms(),
        };
        if let Err(source) = self.announce(&kick).await {
            tracing::warn!(user, error = %source, "kick not announced; applied on this node only");
            self.apply(&kick);
            return Err(KickError::Announce(source));
        }
        let kind = if revoke {
            KickKind::Revoke
        } else {
            KickKind::Kick
        };
        self.metrics.kicks.with_label_values(&[kind.label()]).inc();
        Ok(revoked_before)
    }

    /// Publishes `kick` on the control channel: three tries, 200 ms apart.
    async fn announce(&self, kick: &Kick) -> Result<(), BusError> {
        let payload = kick.encode();
        let mut attempt = 0;
        loop {
            match self.bus.publish(Channel::Control, payload.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= 2 => return Err(e),
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Applies an announced kick here (the router calls it; it never waits): records a
    /// revocation, then asks every local connection of the user to close.
    pub fn apply(&self, kick: &Kick) {
        let close = match kick.revoked_before {
            Some(before) => {
                self.revocations().revoke(&kick.user, before);
                Close::TokenRevoked
            }
            None => Close::Kicked,
        };
        self.close_user(&kick.user, close);
    }

    /// Asks each of `user`'s connections here to close with `close`. A connection that
    /// registers meanwhile checks the revocation list itself after registering
    /// ([`crate::gateway`]), so none slips between the list and this sweep.
    fn close_user(&self, user: &str, close: Close) {
        let n = self
            .registry
            .for_each_of_user(user, |conn| conn.close(close));
        if n > 0 {
            let label = match close {
                Close::TokenRevoked => KickClose::Revoked,
                _ => KickClose::Kicked,
            };
            self.metrics
                .kicked_connections
                .with_label_values(&[label.label()])
                .inc_by(n as u64);
            tracing::info!(
                user,
                connections = n,
                code = close.code(),
                "user disconnected"
            );
        }
    }

    /// Asks for a re-read of the table now (after a bus gap, when announcements may have
    /// been lost). Never waits.
    pub fn reload_soon(&self) {
        self.reload.notify_one();
    }

    /// Reads the table into the list; a user whose entry moved on has their open
    /// connections here closed with 4003. Returns how many entries changed.
    pub async fn load(&self) -> Result<usize, StoreError> {
        let rows = self.store.revocations().await?;
        let mut changed = 0;
        for (user, before) in rows {
            if self.revocations().revoke(&user, before) {
                changed += 1;
                self.close_user(&user, Close::TokenRevoked);
            }
        }
        Ok(changed)
    }

    /// Re-reads the table every [`RELOAD_EVERY`] and when [`reload_soon`](Self::reload_soon)
    /// asks, until `shutdown`. A failed read keeps the list as it is (and is retried).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut failing = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
                _ = self.reload.notified() => {}
            }
            match self.load().await {
                Ok(changed) => {
                    self.metrics
                        .revocation_reloads
                        .with_label_values(&[Reload::Ok.label()])
                        .inc();
                    if changed > 0 {
                        tracing::info!(changed, "revocations found on re-reading the table");
                    }
                    if std::mem::take(&mut failing) {
                        tracing::info!("revocations readable again");
                    }
                }
                Err(e) => {
                    self.metrics
                        .revocation_reloads
                        .with_label_values(&[Reload::Error.label()])
                        .inc();
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, "cannot re-read fanout_revocations; keeping the list held");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_refuses_its_whole_second() {
        assert_eq!(first_accepted_iat(1_764_000_000_000), 1_764_000_001);
        assert_eq!(first_accepted_iat(1_764_000_000_999), 1_764_000_001);
        assert_eq!(first_accepted_iat(1_764_000_001_000), 1_764_000_002);
    }

    #[test]
    fn kicks_round_trip_and_say_their_kind() {
        let kick = Kick {
            kind: KIND.into(),
            user: "alice".into(),
            revoked_before: None,
            ts: 5,
        };
        let encoded = kick.encode();
        assert_eq!(
            std::str::from_utf8(&encoded).unwrap(),
            r#"{"kind":"kick","user":"alice","ts":5}"#
        );
        assert_eq!(Kick::decode(&encoded).unwrap(), kick);
        let revoke = Kick {
            revoked_before: Some(7),
            ..kick
        };
        assert_eq!(Kick::decode(&revoke.encode()).unwrap(), revoke);
    }
}

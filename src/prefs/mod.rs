//! Per-user message-type preferences (DESIGN §4): the store, and the change protocol.
//!
//! A change is validated against the registry (an unknown type changes nothing), written
//! in one transaction, then announced on `<prefix>:control` with the user's full effective
//! preferences by name. Every node applies the announcement to the users it holds (see
//! [`crate::router`]) and sends them a `prefs` frame. Nothing here runs per message.

pub mod store;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::bus::{Bus, BusError, Channel};
use crate::clock::now_ms;
use crate::types::TypeRegistry;
pub use store::{Store, StoreError};

/// A preference change as announced on the control channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// Always `"prefs"` (room for other control messages later).
    pub kind: String,
    pub user: String,
    /// Every registered type of the announcing node, with its effective state.
    pub prefs: BTreeMap<String, bool>,
    /// When the change was announced, ms since the epoch (for the change-latency metric).
    pub ts: i64,
    /// The database's latest `updated_at` of the user's rows, in µs: a node applies a change
    /// only if it is not older than what it holds, so announcements racing each other
    /// cannot leave it stale.
    #[serde(default)]
    pub version: i64,
}

impl Change {
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("change serializes"))
    }

    pub fn decode(payload: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

/// Why a preference operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PrefsError {
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the change was saved but could not be announced to the cluster: {0}")]
    Announce(#[from] BusError),
}

impl PrefsError {
    /// The `error` code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            PrefsError::UnknownType(_) => "unknown_type",
            PrefsError::Store(_) | PrefsError::Announce(_) => "unavailable",
        }
    }
}

/// Reads and changes preferences.
pub struct Prefs {
    pub store: Store,
    pub types: Arc<TypeRegistry>,
    bus: Arc<dyn Bus>,
}

impl Prefs {
    pub fn new(store: Store, types: Arc<TypeRegistry>, bus: Arc<dyn Bus>) -> Self {
        Self { store, types, bus }
    }

    /// The user's effective preference bits (defaults overlaid with their stored choices)
    /// and their version.
    pub async fn load_bits(&self, user: &str) -> Result<(u64, i64), StoreError> {
        let (rows, version) = self.store.load(user).await?;
        Ok((self.bits(&rows), version))
    }

    /// [`load_bits`](Self::load_bits) for each of `users`, in the order given, as
    /// `(user, bits, version)` (version 0 for a user without stored choices), read in a few
    /// queries: for refreshing every held user at once.
    pub async fn load_bits_many(
        &self,
        users: &[&str],
    ) -> Result<Vec<(String, u64, i64)>, StoreError> {
        let stored = self.store.load_many(users).await?;
        Ok(users
            .iter()
            .map(|user| match stored.get(*user) {
                Some((rows, version)) => ((*user).to_owned(), self.bits(rows), *version),
                None => ((*user).to_owned(), self.types.defaults(), 0),
            })
            .collect())
    }

    /// The defaults overlaid with stored `(type, enabled)` choices.
    fn bits(&self, rows: &[(String, bool)]) -> u64 {
        let choices = rows.iter().map(|(t, e)| (t.as_str(), *e));
        self.types.apply(self.types.defaults(), choices)
    }

    /// The user's effective preferences by name.
    pub async fn load(&self, user: &str) -> Result<BTreeMap<String, bool>, StoreError> {
        Ok(self.types.to_map(self.load_bits(user).await?.0))
    }

    /// Validates, saves and announces `choices`; returns the new effective preferences.
    pub async fn set(
        &self,
        user: &str,
        choices: &BTreeMap<String, bool>,
    ) -> Result<BTreeMap<String, bool>, PrefsError> {
        if let Some(unknown) = self.types.first_unknown(choices.keys()) {
            return Err(PrefsError::UnknownType(unknown.clone()));
        }
        let rows: Vec<(String, bool)> = choices.iter().map(|(t, e)| (t.clone(), *e)).collect();
        self.store.save(user, &rows).await?;
        self.announce(user).await
    }

    /// Reads the user's preferences from the database and announces them to every node:
    /// for changes written to the database by someone else (the reload endpoint).
    pub async fn announce(&self, user: &str) -> Result<BTreeMap<String, bool>, PrefsError> {
        let (bits, version) = self.load_bits(user).await?;
        let prefs = self.types.to_map(bits);
        let change = Change {
            kind: "prefs".into(),
            user: user.to_owned(),
            prefs: prefs.clone(),
            ts: now_ms(),
            version,
        };
        let payload = change.encode();
        let mut attempt = 0;
        loop {
            match self.bus.publish(Channel::Control, payload.clone()).await {
                Ok(()) => return Ok(prefs),
                Err(e) if attempt >= 2 => return Err(e.into()),
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    }
}

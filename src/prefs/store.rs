//! The preference store: `fanout_preferences` on PostgreSQL or SQLite, one row per choice;
//! and `fanout_revocations`, one row per user whose older tokens are refused (`crate::kick`).
//!
//! The same SQL runs on both; migrations ship in `migrations/` and run at start and with
//! `fanout migrate`.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::QueryBuilder;

/// A row's version: its `updated_at` in µs since the epoch (the database's clock orders
/// changes), on PostgreSQL.
macro_rules! version_postgres {
    () => {
        "(EXTRACT(EPOCH FROM updated_at) * 1000000)::BIGINT"
    };
}

/// The same on SQLite.
macro_rules! version_sqlite {
    () => {
        "CAST(strftime('%s', updated_at) AS INTEGER) * 1000000"
    };
}

/// Each row with its version.
const LOAD_POSTGRES: &str = concat!(
    "SELECT msg_type, enabled, ",
    version_postgres!(),
    " FROM fanout_preferences WHERE user_id = $1"
);
const LOAD_SQLITE: &str = concat!(
    "SELECT msg_type, enabled, ",
    version_sqlite!(),
    " FROM fanout_preferences WHERE user_id = $1"
);
/// Each row of several users with its version; the caller appends the binds and `)`.
const LOAD_MANY_POSTGRES: &str = concat!(
    "SELECT user_id, msg_type, enabled, ",
    version_postgres!(),
    " FROM fanout_preferences WHERE user_id IN ("
);
const LOAD_MANY_SQLITE: &str = concat!(
    "SELECT user_id, msg_type, enabled, ",
    version_sqlite!(),
    " FROM fanout_preferences WHERE user_id IN ("
);
/// Users per `load_many` query: well under the bind limits of both databases.
const LOAD_MANY_CHUNK: usize = 500;
const UPSERT: &str = "INSERT INTO fanout_preferences (user_id, msg_type, enabled, updated_at) \
     VALUES ($1, $2, $3, CURRENT_TIMESTAMP) \
     ON CONFLICT (user_id, msg_type) DO UPDATE SET enabled = excluded.enabled, updated_at = excluded.updated_at";

/// Keeps the later time when the user already has a row (the same SQL on both databases).
const REVOKE: &str = "INSERT INTO fanout_revocations (user_id, revoked_before) VALUES ($1, $2) \
     ON CONFLICT (user_id) DO UPDATE SET revoked_before = excluded.revoked_before \
     WHERE excluded.revoked_before > fanout_revocations.revoked_before";
const REVOKED_BEFORE: &str = "SELECT revoked_before FROM fanout_revocations WHERE user_id = $1";
const REVOCATIONS: &str = "SELECT user_id, revoked_before FROM fanout_revocations";

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database.url must be postgres://… or sqlite://…")]
    Scheme,
}

impl StoreError {
    /// True when TLS to the database failed (a certificate that does not verify, a server
    /// without TLS under `sslmode=require`…): a setting to fix, not an outage to wait out.
    pub fn is_tls(&self) -> bool {
        let sql = match self {
            Self::Sql(e) | Self::Migrate(sqlx::migrate::MigrateError::Execute(e)) => e,
            _ => return false,
        };
        matches!(sql, sqlx::Error::Tls(_))
    }
}

/// A connection pool to one of the supported databases.
#[derive(Clone, Debug)]
pub enum Store {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs the same query body on whichever pool the store has.
macro_rules! on_pool {
    ($store:expr, $pool:ident => $body:expr) => {
        match $store {
            Store::Postgres($pool) => $body,
            Store::Sqlite($pool) => $body,
        }
    };
}

impl Store {
    /// Opens a pool lazily (connections are made on first use, so a node starts while the
    /// database is down and recovers by itself when it returns), of at most `max_connections`
    /// for PostgreSQL (`database.max_connections`; SQLite keeps 4).
    pub fn open(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        let acquire = Duration::from_secs(3);
        if url.starts_with("postgres") {
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(acquire)
                .connect_lazy(url)?;
            Ok(Store::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?.create_if_missing(true);
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(acquire)
                .connect_lazy_with(options);
            Ok(Store::Sqlite(pool))
        } else {
            Err(StoreError::Scheme)
        }
    }

    /// The most connections the pool holds.
    pub fn max_connections(&self) -> u32 {
        on_pool!(self, pool => pool.options().get_max_connections())
    }

    /// Applies the shipped migrations. Migrations a newer version applied are tolerated, so
    /// a node of this version can restart (or be rolled back to) after a newer one migrated
    /// the database: migrations only add, and this version never reads what they added.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut migrator = sqlx::migrate!("./migrations");
        migrator.set_ignore_missing(true);
        on_pool!(self, pool => migrator.run(pool).await?);
        Ok(())
    }

    /// True if the database answers.
    pub async fn ping(&self) -> bool {
        on_pool!(self, pool => sqlx::query("SELECT 1").execute(pool).await.is_ok())
    }

    /// Every choice `user` made, `(type, enabled)`, and the version of that set: the latest
    /// `updated_at` in µs (0 when there is none).
    pub async fn load(&self, user: &str) -> Result<(Vec<(String, bool)>, i64), StoreError> {
        let rows: Vec<(String, bool, i64)> = match self {
            Store::Postgres(pool) => {
                sqlx::query_as(LOAD_POSTGRES)
                    .bind(user)
                    .fetch_all(pool)
                    .await?
            }
            Store::Sqlite(pool) => {
                sqlx::query_as(LOAD_SQLITE)
                    .bind(user)
                    .fetch_all(pool)
                    .await?
            }
        };
        let version = rows.iter().map(|r| r.2).max().unwrap_or(0);
        Ok((rows.into_iter().map(|(t, e, _)| (t, e)).collect(), version))
    }

    /// What [`load`](Self::load) returns, for each of `users` that has at least one row
    /// (users without rows are absent), in one query per 500 users: for re-reading every
    /// held user at once (after a bus outage).
    pub async fn load_many(
        &self,
        users: &[&str],
    ) -> Result<HashMap<String, (Vec<(String, bool)>, i64)>, StoreError> {
        // Each user once, so no chunk repeats another's rows.
        let mut seen = HashSet::with_capacity(users.len());
        let users: Vec<&str> = users.iter().copied().filter(|u| seen.insert(*u)).collect();
        let prefix = match self {
            Store::Postgres(_) => LOAD_MANY_POSTGRES,
            Store::Sqlite(_) => LOAD_MANY_SQLITE,
        };
        let mut found: HashMap<String, (Vec<(String, bool)>, i64)> = HashMap::new();
        for chunk in users.chunks(LOAD_MANY_CHUNK) {
            let rows: Vec<(String, String, bool, i64)> = on_pool!(self, pool => {
                let mut query = QueryBuilder::new(prefix);
                let mut ids = query.separated(", ");
                for user in chunk {
                    ids.push_bind(*user);
                }
                query.push(")");
                query.build_query_as().fetch_all(pool).await?
            });
            for (user, msg_type, enabled, version) in rows {
                // i64::MIN, not 0: the version is exactly the rows' maximum, as in `load`.
                let (choices, latest) = found.entry(user).or_insert_with(|| (Vec::new(), i64::MIN));
                choices.push((msg_type, enabled));
                *latest = (*latest).max(version);
            }
        }
        Ok(found)
    }

    /// Writes `choices` for `user` in one transaction.
    pub async fn save(&self, user: &str, choices: &[(String, bool)]) -> Result<(), StoreError> {
        on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            for (msg_type, enabled) in choices {
                sqlx::query(UPSERT).bind(user).bind(msg_type).bind(*enabled).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Refuses `user`'s tokens issued before `before` (seconds since the epoch), keeping a
    /// later time already stored; returns the time now stored.
    pub async fn revoke(&self, user: &str, before: i64) -> Result<i64, StoreError> {
        Ok(on_pool!(self, pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(REVOKE).bind(user).bind(before).execute(&mut *tx).await?;
            let (stored,): (i64,) = sqlx::query_as(REVOKED_BEFORE).bind(user).fetch_one(&mut *tx).await?;
            tx.commit().await?;
            stored
        }))
    }

    /// Every revocation, `(user, revoked_before)`.
    pub async fn revocations(&self) -> Result<Vec<(String, i64)>, StoreError> {
        Ok(on_pool!(self, pool => sqlx::query_as(REVOCATIONS).fetch_all(pool).await?))
    }
}

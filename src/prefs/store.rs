//! The preference store: `fanout_preferences` on PostgreSQL or SQLite, one row per choice.
//!
//! The same SQL runs on both; migrations ship in `migrations/` and run at start and with
//! `fanout migrate`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Each row with its `updated_at` in µs since the epoch (the database's clock orders changes).
const LOAD_POSTGRES: &str =
    "SELECT msg_type, enabled, (EXTRACT(EPOCH FROM updated_at) * 1000000)::BIGINT \
     FROM fanout_preferences WHERE user_id = $1";
const LOAD_SQLITE: &str =
    "SELECT msg_type, enabled, CAST(strftime('%s', updated_at) AS INTEGER) * 1000000 \
     FROM fanout_preferences WHERE user_id = $1";
const UPSERT: &str = "INSERT INTO fanout_preferences (user_id, msg_type, enabled, updated_at) \
     VALUES ($1, $2, $3, CURRENT_TIMESTAMP) \
     ON CONFLICT (user_id, msg_type) DO UPDATE SET enabled = excluded.enabled, updated_at = excluded.updated_at";

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
    /// database is down and recovers by itself when it returns).
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let acquire = Duration::from_secs(3);
        if url.starts_with("postgres") {
            let pool = PgPoolOptions::new()
                .max_connections(8)
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

    /// Applies the shipped migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        on_pool!(self, pool => MIGRATOR.run(pool).await?);
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
}

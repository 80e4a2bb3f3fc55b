//! The preference store, the same scenarios on PostgreSQL (`FANOUT_TEST_DATABASE_URL`) and
//! on SQLite (a temporary file).

use fanout::prefs::Store;

#[path = "common/servers.rs"]
mod servers;

fn admin_url() -> String {
    servers::database_url()
}

/// A store on a fresh PostgreSQL database, and the database's name.
async fn postgres() -> (Store, String) {
    use sqlx::Connection;
    let admin = admin_url();
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin} is needed (./scripts/test starts it): {e}")
        });
    let name = format!("fanout_store_{:08x}", rand::random::<u32>());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let server = admin.rsplit_once('/').map(|(s, _)| s).unwrap();
    (Store::open(&format!("{server}/{name}"), 8).unwrap(), name)
}

async fn drop_database(name: &str) {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE {name} WITH (FORCE)"
    )))
    .execute(&mut conn)
    .await
    .unwrap();
}

fn sqlite() -> (Store, tempfile_path::TempPath) {
    let path = tempfile_path::TempPath::new();
    let store = Store::open(&format!("sqlite://{}", path.0.display()), 8).unwrap();
    (store, path)
}

mod tempfile_path {
    /// A file path in the temp dir, removed on drop.
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn new() -> Self {
            Self(
                std::env::temp_dir().join(format!("fanout-store-{:08x}.db", rand::random::<u32>())),
            )
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

async fn behaves_like_a_preference_store(store: Store) {
    store.migrate().await.unwrap();
    store.migrate().await.expect("migrations are idempotent");
    assert!(store.ping().await);
    assert!(
        store.load("alice").await.unwrap().0.is_empty(),
        "no row means defaults"
    );

    save_alice_and_bob(&store).await;
    let (mut alice, first) = store.load("alice").await.unwrap();
    alice.sort();
    assert_eq!(
        alice,
        [
            ("marketing".to_owned(), true),
            ("robot.reply".to_owned(), false)
        ]
    );

    store
        .save("alice", &[("marketing".into(), false)])
        .await
        .expect("upsert");
    let (mut alice, second) = store.load("alice").await.unwrap();
    alice.sort();
    assert_eq!(
        alice,
        [
            ("marketing".to_owned(), false),
            ("robot.reply".to_owned(), false)
        ]
    );
    assert_eq!(
        store.load("bob").await.unwrap().0,
        [("marketing".to_owned(), false)]
    );
    assert!(first > 0, "a stored set has a version");
    assert!(second >= first, "versions never go back");
    assert!(
        store.load("al%").await.unwrap().0.is_empty(),
        "user ids are matched exactly"
    );
}

/// Runs `scenario` on a store over a fresh PostgreSQL database, then drops the database.
async fn on_postgres<F, Fut>(scenario: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (store, name) = postgres().await;
    scenario(store.clone()).await;
    if let Store::Postgres(pool) = store {
        pool.close().await;
    }
    drop_database(&name).await;
}

#[tokio::test]
async fn postgres_store_keeps_one_row_per_choice() {
    on_postgres(behaves_like_a_preference_store).await;
}

#[tokio::test]
async fn sqlite_store_keeps_one_row_per_choice() {
    let (store, _path) = sqlite();
    behaves_like_a_preference_store(store).await;
}

/// alice: marketing on, robot.reply off; bob: marketing off.
async fn save_alice_and_bob(store: &Store) {
    store
        .save(
            "alice",
            &[("marketing".into(), true), ("robot.reply".into(), false)],
        )
        .await
        .unwrap();
    store
        .save("bob", &[("marketing".into(), false)])
        .await
        .unwrap();
}

/// `load_many` answers what `load` answers for each user with rows, across several chunks.
async fn loads_many_users_at_once(store: Store) {
    store.migrate().await.unwrap();
    save_alice_and_bob(&store).await;
    // Enough names for several queries (500 users each), with the users who have rows
    // at the start, in the middle and at the end.
    let filler: Vec<String> = (0..1200).map(|i| format!("filler-{i:04}")).collect();
    let mut users: Vec<&str> = filler.iter().map(String::as_str).collect();
    users.insert(0, "alice");
    users.insert(700, "nobody");
    users.push("bob");

    let mut many = store.load_many(&users).await.unwrap();
    assert_eq!(many.len(), 2, "only users with rows: {:?}", many.keys());
    assert!(
        !many.contains_key("nobody"),
        "a user without rows is absent"
    );
    for user in ["alice", "bob"] {
        let (mut rows, version) = many.remove(user).expect("a user with rows is present");
        let (mut expected, expected_version) = store.load(user).await.unwrap();
        rows.sort();
        expected.sort();
        assert_eq!(rows, expected, "{user}'s rows");
        assert_eq!(version, expected_version, "{user}'s version");
        assert!(version > 0);
    }
    assert!(store.load_many(&[]).await.unwrap().is_empty());
    assert_eq!(
        store.load_many(&["bob", "bob"]).await.unwrap()["bob"].0,
        [("marketing".to_owned(), false)],
        "a user named twice gets their rows once"
    );
}

#[tokio::test]
async fn postgres_store_loads_many_users_in_chunks() {
    on_postgres(loads_many_users_at_once).await;
}

#[tokio::test]
async fn sqlite_store_loads_many_users_in_chunks() {
    let (store, _path) = sqlite();
    loads_many_users_at_once(store).await;
}

#[tokio::test]
async fn an_unreachable_database_is_an_error_not_a_hang() {
    let store = Store::open("postgres://postgres@127.0.0.1:1/none", 8).unwrap();
    // acquire_timeout bounds every call; 60 s here only stops a broken build from hanging.
    let load = tokio::time::timeout(std::time::Duration::from_secs(60), store.load("alice")).await;
    assert!(load.expect("load returns").is_err());
    assert!(!store.ping().await);
}

/// A revocation keeps the later time, whichever order the writes come in.
async fn keeps_the_later_revocation(store: Store) {
    store.migrate().await.unwrap();
    assert!(store.revocations().await.unwrap().is_empty());
    assert_eq!(store.revoke("alice", 200).await.unwrap(), 200);
    assert_eq!(
        store.revoke("alice", 100).await.unwrap(),
        200,
        "an earlier time changes nothing"
    );
    assert_eq!(store.revoke("alice", 300).await.unwrap(), 300);
    assert_eq!(store.revoke("bob", 5).await.unwrap(), 5);
    let mut all = store.revocations().await.unwrap();
    all.sort();
    assert_eq!(all, [("alice".to_owned(), 300), ("bob".to_owned(), 5)]);
}

#[tokio::test]
async fn postgres_store_keeps_the_later_revocation() {
    on_postgres(keeps_the_later_revocation).await;
}

#[tokio::test]
async fn sqlite_store_keeps_the_later_revocation() {
    let (store, _path) = sqlite();
    keeps_the_later_revocation(store).await;
}

/// A database a newer version migrated (a migration this binary does not ship) still
/// starts this version: restarts during a rollout and rollbacks work.
async fn starts_after_a_newer_version_migrated(store: Store) {
    store.migrate().await.unwrap();
    match &store {
        Store::Postgres(pool) => sqlx::query(
            "INSERT INTO _sqlx_migrations \
             (version, description, success, checksum, execution_time) \
             VALUES (29991231000001, 'from a newer version', TRUE, '\\x00'::bytea, 1)",
        )
        .execute(pool)
        .await
        .map(drop),
        Store::Sqlite(pool) => sqlx::query(
            "INSERT INTO _sqlx_migrations \
             (version, description, success, checksum, execution_time) \
             VALUES (29991231000001, 'from a newer version', TRUE, X'00', 1)",
        )
        .execute(pool)
        .await
        .map(drop),
    }
    .unwrap();
    store.migrate().await.unwrap();
    store.revoke("alice", 1).await.unwrap();
}

#[tokio::test]
async fn postgres_store_starts_after_a_newer_version_migrated() {
    on_postgres(starts_after_a_newer_version_migrated).await;
}

#[tokio::test]
async fn sqlite_store_starts_after_a_newer_version_migrated() {
    let (store, _path) = sqlite();
    starts_after_a_newer_version_migrated(store).await;
}

/// `database.max_connections` bounds the node's PostgreSQL connections: a burst of
/// concurrent reads (a reconnect storm's preference loads) never holds more than that many
/// connections to the database, as the server itself counts them.
#[tokio::test]
async fn the_postgres_pool_holds_at_most_database_max_connections() {
    let (unused, name) = postgres().await;
    drop(unused); // lazy: it never connected
    let url = {
        let admin = admin_url();
        let server = admin.rsplit_once('/').map(|(s, _)| s.to_owned()).unwrap();
        format!("{server}/{name}")
    };
    let mut settings = fanout::config::Settings::default();
    settings.database.url = url;
    settings.database.max_connections = 2;
    let store = std::sync::Arc::new(fanout::app::open_store(&settings).unwrap());
    assert_eq!(store.max_connections(), 2);
    store.migrate().await.unwrap();

    let reads: Vec<_> = (0..40)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.load(&format!("user-{i}")).await.unwrap() })
        })
        .collect();
    let watch = {
        let name = name.clone();
        tokio::spawn(async move {
            use sqlx::Connection;
            let mut conn = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
            let mut most = 0i64;
            for _ in 0..20 {
                let (n,): (i64,) =
                    sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                        .bind(&name)
                        .fetch_one(&mut conn)
                        .await
                        .unwrap();
                most = most.max(n);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            most
        })
    };
    for read in reads {
        read.await.unwrap();
    }
    let most = watch.await.unwrap();
    assert!(
        (1..=2).contains(&most),
        "connections to the database while 40 reads ran: {most} (database.max_connections = 2)"
    );
    drop(store);
    drop_database(&name).await;
}

//! The shared store conformance suite against the real PostgreSQL named by
//! `IDEM_TEST_POSTGRES_URL` (in its own schema, so other test binaries sharing the database
//! cannot disturb it).

use idem_core::conformance::service_url;
use idem_postgres::PostgresStore;

async fn store() -> Option<PostgresStore> {
    let url = service_url("IDEM_TEST_POSTGRES_URL")?;
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(PostgresStore::connect(&format!("{url}{separator}schema=idem_conformance")).await.unwrap())
}

idem_core::store_conformance_tests!(store());

/// The same suite with group commit off (it is on by default): one statement per call.
mod single_statements {
    use super::*;

    async fn store() -> Option<PostgresStore> {
        let url = service_url("IDEM_TEST_POSTGRES_URL")?;
        let separator = if url.contains('?') { '&' } else { '?' };
        let url = format!("{url}{separator}schema=idem_conformance_single&batch_writers=0");
        Some(PostgresStore::connect(&url).await.unwrap())
    }

    idem_core::store_conformance_tests!(store());
}

/// A plain connection to the test database, to look at what the store did.
async fn admin() -> tokio_postgres::Client {
    let url = service_url("IDEM_TEST_POSTGRES_URL").expect("checked by fresh_schema_url");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// A schema of its own for one test, dropped first so the test starts from nothing.
async fn fresh_schema_url(name: &str) -> Option<String> {
    let url = service_url("IDEM_TEST_POSTGRES_URL")?;
    let client = admin().await;
    client.batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE")).await.unwrap();
    let separator = if url.contains('?') { '&' } else { '?' };
    Some(format!("{url}{separator}schema={name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_starting_at_once_migrate_once() {
    let Some(url) = fresh_schema_url("idem_migration_race").await else { return };
    let starts: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PostgresStore::connect(&url).await })
        })
        .collect();
    for start in starts {
        start.await.unwrap().expect("every instance starts, whichever migrated");
    }
    let client = admin().await;
    let versions = client
        .query(
            "SELECT version FROM idem_migration_race.idem_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(versions.iter().map(|row| row.get::<_, i32>(0)).collect::<Vec<_>>(), [1, 2]);

    // A database migrated by a newer idem is refused, not misread.
    client
        .execute(
            "INSERT INTO idem_migration_race.idem_schema_migrations (version) VALUES (99)",
            &[],
        )
        .await
        .unwrap();
    let error = PostgresStore::connect(&url).await.unwrap_err().to_string();
    assert!(error.contains("version 99"), "{error}");
    let error = PostgresStore::connect_existing(&url).await.unwrap_err().to_string();
    assert!(error.contains("version 99"), "{error}");
}

/// Operator tools open a store as it is: an empty schema is refused, and left empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_an_existing_store_never_migrates() {
    let Some(url) = fresh_schema_url("idem_existing_only").await else { return };
    let error = PostgresStore::connect_existing(&url).await.unwrap_err().to_string();
    assert!(error.contains("no idem schema"), "{error}");
    let client = admin().await;
    let tables = client
        .query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'idem_existing_only'",
            &[],
        )
        .await
        .unwrap();
    assert!(tables.is_empty(), "connect_existing created {} tables", tables.len());
    PostgresStore::connect(&url).await.unwrap();
    PostgresStore::connect_existing(&url).await.expect("a migrated store opens as it is");
}

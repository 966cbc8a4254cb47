//! Group commit against the real PostgreSQL named by `IDEM_TEST_POSTGRES_URL`: concurrent
//! claims and completions share transactions, and each keeps its own answer.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use idem_core::conformance::{fresh_postgres_schema, service_url};
use idem_core::{
    ClaimRequest, Decision, Error, FencingToken, Fingerprint, IdempotencyKey, RecordKey, Scope,
    Store, Timestamp,
};
use idem_postgres::PostgresStore;

const CLAIMS: usize = 200;

fn now() -> Timestamp {
    let millis = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis();
    Timestamp::from_millis(millis as u64)
}

fn key(name: &str) -> RecordKey {
    RecordKey::new(Scope::named("batch"), IdempotencyKey::new(name).unwrap())
}

async fn claim(
    store: &PostgresStore,
    key: &RecordKey,
    token: FencingToken,
) -> idem_core::Result<Decision> {
    let now = now();
    let lease_expires_at = now.saturating_add(Duration::from_secs(30));
    store
        .claim(ClaimRequest {
            key,
            fingerprint: &Fingerprint::from_bytes([7; 32]),
            token,
            now,
            lease_expires_at,
            expires_at: lease_expires_at.saturating_add(Duration::from_secs(3600)),
        })
        .await
}

async fn admin() -> tokio_postgres::Client {
    let url = service_url("IDEM_TEST_POSTGRES_URL").expect("checked by fresh_postgres_schema");
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// Writes record rows behind the store's back: `rows` is a `VALUES` list or a `SELECT` of
/// the table's columns, in order.
async fn insert_rows(client: &tokio_postgres::Client, schema: &str, rows: &str) {
    let columns =
        "scope, key, fingerprint, state, token, lease_expires_at, payload, created_at, expires_at";
    let sql = format!("INSERT INTO {schema}.idem_records ({columns}) {rows}");
    client.execute(&sql, &[]).await.unwrap();
}

/// How many transactions wrote the rows whose keys start with `prefix` (their `xmin`s).
async fn writing_transactions(client: &tokio_postgres::Client, schema: &str, prefix: &str) -> i64 {
    let sql = format!(
        "SELECT count(DISTINCT xmin::text) FROM {schema}.idem_records WHERE key LIKE $1 || '%'"
    );
    client.query_one(&sql, &[&prefix]).await.unwrap().get(0)
}

/// Runs `CLAIMS` claims at once (and one on a damaged row among them), then completes them
/// all at once; answers how many transactions wrote the claims and the completions.
async fn claims_and_completions(schema: &str, writers: usize) -> Option<(i64, i64)> {
    let url = fresh_postgres_schema(schema).await?;
    let store =
        Arc::new(PostgresStore::connect(&format!("{url}&batch_writers={writers}")).await.unwrap());
    let client = admin().await;
    // A row whose fingerprint is damaged: its claim must fail as corrupt, alone.
    insert_rows(
        &client,
        schema,
        "VALUES ('batch', 'damaged', '\\x00', 1, NULL, NULL, '', 0, 9223372036854775807)",
    )
    .await;
    let damaged = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { claim(&store, &key("damaged"), FencingToken::generate()).await })
    };
    let claims: Vec<_> = (0..CLAIMS)
        .map(|index| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let token = FencingToken::generate();
                let decision = claim(&store, &key(&format!("k{index}")), token).await.unwrap();
                (index, token, decision)
            })
        })
        .collect();
    let mut owned = Vec::new();
    for task in claims {
        let (index, token, decision) = task.await.unwrap();
        assert_eq!(decision, Decision::Acquire, "claim {index} of a fresh key");
        owned.push((index, token));
    }
    let error = damaged.await.unwrap().unwrap_err();
    assert!(matches!(error, Error::Corrupt(_)), "the damaged row's claim: {error:?}");

    // Every claimant owns its own key; a second claim of each sees it in flight.
    for (index, _) in owned.iter().take(20) {
        let again =
            claim(&store, &key(&format!("k{index}")), FencingToken::generate()).await.unwrap();
        assert!(matches!(again, Decision::InFlight { .. }), "k{index}: {again:?}");
    }
    let claimed_by = writing_transactions(&client, schema, "k").await;

    // Completions at once, half of them by a stale token (fenced, changing nothing).
    let completions: Vec<_> = owned
        .iter()
        .map(|(index, token)| {
            let (store, index, token) = (Arc::clone(&store), *index, *token);
            tokio::spawn(async move {
                let stale = index % 2 == 1;
                let token = if stale { FencingToken::generate() } else { token };
                let expires_at = now().saturating_add(Duration::from_secs(3600));
                let payload = Bytes::from(format!("outcome {index}"));
                let done = store
                    .complete(&key(&format!("k{index}")), token, payload, now(), expires_at)
                    .await;
                (index, stale, done)
            })
        })
        .collect();
    for task in completions {
        let (index, stale, done) = task.await.unwrap();
        match (stale, done) {
            (false, Ok(())) | (true, Err(Error::Fenced)) => {}
            (stale, done) => panic!("completion {index} (stale: {stale}): {done:?}"),
        }
    }
    for (index, _) in &owned {
        let record = key(&format!("k{index}"));
        let decision = claim(&store, &record, FencingToken::generate()).await.unwrap();
        if index % 2 == 0 {
            let expected = Bytes::from(format!("outcome {index}"));
            assert_eq!(decision, Decision::Replay(expected), "k{index} replays its own outcome");
        } else {
            assert!(matches!(decision, Decision::InFlight { .. }), "k{index}: {decision:?}");
        }
    }
    let completed_by = writing_transactions(&client, schema, "k").await;
    Some((claimed_by, completed_by))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_and_completions_share_commits_and_keep_their_own_answers() {
    let Some((claimed_by, completed_by)) = claims_and_completions("idem_group_commit", 4).await
    else {
        return;
    };
    println!("{CLAIMS} claims written by {claimed_by} transactions; all rows by {completed_by}");
    // 200 claims in far fewer transactions; after the completions, the completed half and
    // the still-claimed half were written by few transactions too.
    assert!(claimed_by < CLAIMS as i64 / 4, "{CLAIMS} claims in {claimed_by} transactions");
    assert!(completed_by < CLAIMS as i64 / 2, "rows written by {completed_by} transactions");

    // Without group commit, one transaction per claim: the count above means something.
    let (alone, _) = claims_and_completions("idem_no_group_commit", 0).await.unwrap();
    assert_eq!(alone, CLAIMS as i64);
}

/// A record another transaction is changing (an application's `complete_in` before its
/// commit, say) holds its row lock: claims must not queue behind it, neither the retry of
/// that key (a plain read) nor fresh keys in the same batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_never_waits_on_a_record_another_transaction_is_changing() {
    let schema = "idem_group_commit_locks";
    let Some(url) = fresh_postgres_schema(schema).await else { return };
    let store = PostgresStore::connect(&format!("{url}&batch_writers=4")).await.unwrap();
    let token = FencingToken::generate();
    assert_eq!(claim(&store, &key("held"), token).await.unwrap(), Decision::Acquire);
    let expires_at = now().saturating_add(Duration::from_secs(3600));
    store
        .complete(&key("held"), token, Bytes::from_static(b"done"), now(), expires_at)
        .await
        .unwrap();

    let mut client = admin().await;
    let holder = client.transaction().await.unwrap();
    holder
        .execute(
            &format!("UPDATE {schema}.idem_records SET watched = true WHERE key = 'held'"),
            &[],
        )
        .await
        .unwrap();
    let (held, fresh) = (key("held"), key("fresh-beside-held"));
    let answers = tokio::time::timeout(Duration::from_secs(3), async {
        tokio::join!(
            claim(&store, &held, FencingToken::generate()),
            claim(&store, &fresh, FencingToken::generate()),
        )
    })
    .await
    .expect("claims answer while another transaction holds a record's row");
    assert_eq!(answers.0.unwrap(), Decision::Replay(Bytes::from_static(b"done")));
    assert_eq!(answers.1.unwrap(), Decision::Acquire);
    holder.rollback().await.unwrap();
}

/// The table's read counters: tuples read by sequential scans, rows inserted and updated.
async fn table_reads(client: &tokio_postgres::Client, schema: &str) -> (i64, i64, i64) {
    let row = client
        .query_one(
            "SELECT seq_tup_read, n_tup_ins, n_tup_upd FROM pg_stat_user_tables
             WHERE schemaname = $1 AND relname = 'idem_records'",
            &[&schema],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// A new deployment starts on an empty table, which then grows. A batched statement planned
/// once while the table was empty (and cached so) scanned the whole table for every batch
/// afterwards: group commit became slower by the minute. Batches on the grown table read by
/// its index.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_read_a_grown_table_by_its_index_though_first_run_on_an_empty_one() {
    const EARLY: usize = 30;
    const GROWN: i64 = 50_000;
    const LATE: usize = 64;
    let schema = "idem_group_commit_plans";
    let Some(url) = fresh_postgres_schema(schema).await else { return };
    let store = Arc::new(PostgresStore::connect(&format!("{url}&batch_writers=1")).await.unwrap());
    let expires_at = now().saturating_add(Duration::from_secs(3600));
    // Claims and completions one at a time while the table is nearly empty: every writer
    // connection runs both statements more often than PostgreSQL's custom-plan threshold (5).
    for index in 0..EARLY {
        let (record, token) = (key(&format!("early-{index}")), FencingToken::generate());
        assert_eq!(claim(&store, &record, token).await.unwrap(), Decision::Acquire);
        store.complete(&record, token, Bytes::from_static(b"ok"), now(), expires_at).await.unwrap();
    }
    let client = admin().await;
    let grown = format!(
        "SELECT 'batch', 'grown-' || n, '\\x07', 1, NULL, NULL, 'old', 0, 9223372036854775807
         FROM generate_series(1, {GROWN}) AS n"
    );
    insert_rows(&client, schema, &grown).await;
    let (scanned_before, _, _) = table_reads(&client, schema).await;

    let late: Vec<_> = (0..LATE)
        .map(|index| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                let (record, token) = (key(&format!("late-{index}")), FencingToken::generate());
                assert_eq!(claim(&store, &record, token).await.unwrap(), Decision::Acquire);
                store.complete(&record, token, Bytes::from_static(b"ok"), now(), expires_at).await
            })
        })
        .collect();
    for task in late {
        task.await.unwrap().unwrap();
    }
    // Each backend reports its counters within seconds of going idle, all of them at once:
    // once the late inserts and updates show, so do the scans that came with them.
    let (inserted, updated) = ((EARLY + LATE) as i64 + GROWN, (EARLY + LATE) as i64);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let scanned = loop {
        let (scanned, ins, upd) = table_reads(&client, schema).await;
        if ins >= inserted && upd >= updated {
            break scanned;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "statistics show {ins} of {inserted} inserts and {upd} of {updated} updates"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let read = scanned - scanned_before;
    println!("{LATE} claims and completions on {GROWN} rows read {read} rows by scanning");
    assert!(read < GROWN, "batches scanned the grown table: {read} rows read sequentially");
}

//! The inbox against the real PostgreSQL named by `IDEM_TEST_POSTGRES_URL`: messages delivered
//! several times, handlers that fail, connections killed before the commit, duplicates
//! processed at once. Effects are counted in a table with no unique constraint, so a double
//! application would show.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_stream::postgres::Inbox;
use idem_stream::{Delivery, Error};
use tokio_postgres::{Client, Config, NoTls};

/// A client whose `search_path` is a fresh schema of this test's own, with the inbox table and
/// a one-row ledger in it, and the config to open more connections like it.
async fn fresh(schema: &str) -> Option<(Client, Config)> {
    let (client, database) = common::ledger_database(schema).await?;
    Some((client, database.parse().unwrap()))
}

async fn connect(config: &Config) -> Client {
    let (client, connection) = config.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// `deliveries` in an order drawn from `seed` (xorshift, Fisher-Yates).
fn shuffled(mut deliveries: Vec<(String, i64)>, mut seed: u64) -> Vec<(String, i64)> {
    for index in (1..deliveries.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        deliveries.swap(index, (seed % (index as u64 + 1)) as usize);
    }
    deliveries
}

async fn effects(client: &Client) -> (i64, i64, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT cents FROM ledger WHERE id = 1), count(*), count(DISTINCT message_id) FROM applied",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_applies_once_however_often_it_is_delivered() {
    let Some((client, config)) = fresh("idem_stream_redelivery").await else { return };
    let inbox = Inbox::new("ledger").unwrap();
    // 500 payments, each delivered 3 times, shuffled, handled by 4 consumers at once.
    let deliveries =
        (0..1_500).map(|i| (format!("payment-{}", i % 500), (i % 500) as i64 + 1)).collect();
    let queue = Arc::new(Mutex::new(shuffled(deliveries, 0x9e37_79b9_7f4a_7c15)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (queue, inbox, config) = (Arc::clone(&queue), inbox.clone(), config.clone());
            tokio::spawn(async move {
                let mut client = connect(&config).await;
                let mut firsts = 0;
                loop {
                    let Some((id, cents)) = queue.lock().unwrap().pop() else { break };
                    if common::credit(&mut client, &inbox, &id, cents).await.unwrap()
                        == Delivery::First
                    {
                        firsts += 1;
                    }
                }
                firsts
            })
        })
        .collect();
    let mut firsts = 0;
    for worker in workers {
        firsts += worker.await.unwrap();
    }
    assert_eq!(firsts, 500, "one first delivery per message");
    let expected_cents: i64 = (1..=500).sum();
    assert_eq!(
        effects(&client).await,
        (expected_cents, 500, 500),
        "balance = sum, each applied once"
    );
    println!(
        "inbox: 1500 deliveries of 500 messages by 4 consumers -> 500 applied, balance {expected_cents}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handler_or_a_dropped_connection_leaves_nothing_and_the_redelivery_applies() {
    let Some((mut client, config)) = fresh("idem_stream_failures").await else { return };
    let inbox = Inbox::new("ledger").unwrap();

    // The handler fails after recording the id: the transaction rolls back, id and all.
    {
        let transaction = client.transaction().await.unwrap();
        assert_eq!(inbox.record(&transaction, "m-1").await.unwrap(), Delivery::First);
        transaction
            .execute("UPDATE ledger SET cents = cents + 10 WHERE id = 1", &[])
            .await
            .unwrap();
        let failure = transaction.execute("SELECT 1 / 0", &[]).await;
        assert!(failure.is_err());
        // Dropped without commit: rolled back.
    }
    assert_eq!(effects(&client).await, (0, 0, 0));
    assert_eq!(common::credit(&mut client, &inbox, "m-1", 10).await.unwrap(), Delivery::First);

    // The connection dies between the writes and the commit.
    let mut doomed = connect(&config).await;
    let pid: i32 = doomed.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    let transaction = doomed.transaction().await.unwrap();
    assert_eq!(inbox.record(&transaction, "m-2").await.unwrap(), Delivery::First);
    transaction.execute("UPDATE ledger SET cents = cents + 20 WHERE id = 1", &[]).await.unwrap();
    transaction.execute("INSERT INTO applied VALUES ('m-2')", &[]).await.unwrap();
    client.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
    assert!(
        transaction.commit().await.is_err(),
        "the commit cannot succeed on a killed connection"
    );
    assert_eq!(effects(&client).await, (10, 1, 1), "nothing of m-2 was kept");
    // The broker redelivers m-2 (it was never acknowledged): it applies now, once.
    assert_eq!(common::credit(&mut client, &inbox, "m-2", 20).await.unwrap(), Delivery::First);
    assert_eq!(common::credit(&mut client, &inbox, "m-2", 20).await.unwrap(), Delivery::Duplicate);
    assert_eq!(effects(&client).await, (30, 2, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_processed_at_the_same_time_waits_for_the_first() {
    let Some((mut first, config)) = fresh("idem_stream_concurrent").await else { return };
    let inbox = Inbox::new("ledger").unwrap();
    for commit_first in [true, false] {
        let id = format!("m-{commit_first}");
        let transaction = first.transaction().await.unwrap();
        assert_eq!(inbox.record(&transaction, &id).await.unwrap(), Delivery::First);
        let second = {
            let (inbox, config, id) = (inbox.clone(), config.clone(), id.clone());
            tokio::spawn(async move {
                let mut client = connect(&config).await;
                let transaction = client.transaction().await.unwrap();
                let delivery = inbox.record(&transaction, &id).await.unwrap();
                transaction.commit().await.unwrap();
                delivery
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "the second delivery waits on the first's transaction");
        if commit_first {
            transaction.commit().await.unwrap();
            assert_eq!(second.await.unwrap(), Delivery::Duplicate);
        } else {
            transaction.rollback().await.unwrap();
            assert_eq!(
                second.await.unwrap(),
                Delivery::First,
                "the first rolled back: the second runs"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_are_independent_purging_is_bounded_and_bad_input_is_refused() {
    let Some((mut client, _)) = fresh("idem_stream_purge").await else { return };
    let (ledger, audit) = (Inbox::new("ledger").unwrap(), Inbox::new("audit").unwrap());
    for id in ["a", "b", "c"] {
        assert_eq!(common::credit(&mut client, &ledger, id, 1).await.unwrap(), Delivery::First);
        assert_eq!(
            common::credit(&mut client, &audit, id, 0).await.unwrap(),
            Delivery::First,
            "another consumer"
        );
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        ledger.purge(&client, Duration::from_secs(3600), 10).await.unwrap(),
        0,
        "nothing that old"
    );
    assert_eq!(ledger.purge(&client, Duration::ZERO, 2).await.unwrap(), 2, "a batch is bounded");
    assert_eq!(ledger.purge(&client, Duration::ZERO, 10).await.unwrap(), 1);
    assert_eq!(
        common::credit(&mut client, &audit, "a", 0).await.unwrap(),
        Delivery::Duplicate,
        "audit kept its ids"
    );

    let transaction = client.transaction().await.unwrap();
    assert!(matches!(ledger.record(&transaction, "").await, Err(Error::InvalidMessageId(_))));
    assert!(matches!(
        ledger.record(&transaction, &"x".repeat(513)).await,
        Err(Error::InvalidMessageId(_))
    ));
    assert!(matches!(Inbox::new(""), Err(Error::InvalidConsumer(_))));
}

/// `record_many`: 8 overlapping batches of 1,000 at once, half of them in reverse order, each
/// in one transaction: every id applies once and nothing deadlocks. Within one batch a repeated
/// id is a duplicate, and a batch over the limit is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn overlapping_batches_apply_each_message_once_without_deadlock() {
    let Some((mut client, config)) = fresh("idem_inbox_batches").await else { return };
    let inbox = Inbox::new("ledger").unwrap();
    let start = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8)
        .map(|task| {
            let (config, inbox, start) = (config.clone(), inbox.clone(), Arc::clone(&start));
            tokio::spawn(async move {
                let mut client = connect(&config).await;
                // Ids 0..3000 in windows of 1,000 that overlap, every other one reversed.
                let first = (task % 3) * 1_000;
                let mut ids: Vec<String> =
                    (first..first + 1_000).map(|n| format!("m{n:04}")).collect();
                if task % 2 == 1 {
                    ids.reverse();
                }
                let credits: Vec<(&str, i64)> = ids.iter().map(|id| (id.as_str(), 1)).collect();
                start.wait().await;
                common::credit_many(&mut client, &inbox, &credits).await.unwrap()
            })
        })
        .collect();
    let mut applied_per_batch = Vec::new();
    for task in tasks {
        let applied = tokio::time::timeout(Duration::from_secs(30), task).await.unwrap().unwrap();
        applied_per_batch.push(applied);
    }
    let (cents, applied, distinct) = effects(&client).await;
    assert_eq!((applied, distinct, cents), (3_000, 3_000, 3_000), "each id applied once");
    assert_eq!(applied_per_batch.iter().sum::<usize>(), 3_000, "{applied_per_batch:?}");

    let transaction = client.transaction().await.unwrap();
    let deliveries = inbox.record_many(&transaction, &["new-1", "m0001", "new-1"]).await.unwrap();
    use Delivery::{Duplicate, First};
    assert_eq!(
        deliveries,
        [First, Duplicate, Duplicate],
        "an id twice in one batch, and a known one"
    );
    let too_many: Vec<String> =
        (0..=idem_stream::postgres::MAX_BATCH).map(|n| n.to_string()).collect();
    let refs: Vec<&str> = too_many.iter().map(String::as_str).collect();
    let refused = inbox.record_many(&transaction, &refs).await;
    assert!(
        matches!(refused, Err(Error::InvalidMessageId(_))),
        "a batch over the limit is refused"
    );
}

/// `Inbox::apply` sends the inbox INSERT and the effects together. A duplicate applies nothing
/// even when its caller commits anyway, a duplicate racing the first waits for it, a failing
/// effect is the caller's error with nothing recorded, and 1,500 shuffled deliveries of 500
/// messages by 4 consumers apply each message once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_pipelines_the_record_and_a_duplicate_applies_nothing() {
    use idem_stream::postgres::Applied;
    let Some((mut client, config)) = fresh("idem_stream_apply").await else { return };
    let inbox = Inbox::new("ledger").unwrap();
    const CREDIT: &str = "UPDATE ledger SET cents = cents + $1 WHERE id = 1";
    const APPLIED: &str = "INSERT INTO applied VALUES ($1)";

    // Applies `cents` for `id` and commits whatever apply said, as a careless caller would.
    async fn credit(client: &mut Client, inbox: &Inbox, id: &str, cents: i64) -> Applied<()> {
        let transaction = client.transaction().await.unwrap();
        let effects = async {
            transaction.execute(CREDIT, &[&cents]).await?;
            transaction.execute(APPLIED, &[&id]).await
        };
        let applied = inbox.apply(&transaction, id, effects).await.unwrap();
        transaction.commit().await.unwrap();
        match applied {
            Applied::First(result) => {
                result.unwrap();
                Applied::First(())
            }
            Applied::Duplicate => Applied::Duplicate,
        }
    }

    assert_eq!(credit(&mut client, &inbox, "a-1", 5).await, Applied::First(()));
    assert_eq!(credit(&mut client, &inbox, "a-1", 5).await, Applied::Duplicate);
    assert_eq!(effects(&client).await, (5, 1, 1), "the committed duplicate applied nothing");
    // `record` and `apply` share the same rows: a message recorded by one is a duplicate to
    // the other.
    assert_eq!(common::credit(&mut client, &inbox, "a-1", 5).await.unwrap(), Delivery::Duplicate);

    // A failing effect: the caller's error, the transaction aborted, nothing recorded.
    {
        let transaction = client.transaction().await.unwrap();
        let effects = async {
            transaction.execute(CREDIT, &[&7i64]).await?;
            transaction.execute("SELECT 1 / 0", &[]).await
        };
        let Applied::First(result) = inbox.apply(&transaction, "a-2", effects).await.unwrap()
        else {
            panic!("a-2 is new")
        };
        assert!(result.is_err());
        // The caller sees the error and rolls back; the redelivery applies.
        transaction.rollback().await.unwrap();
    }
    assert_eq!(credit(&mut client, &inbox, "a-2", 7).await, Applied::First(()));
    assert_eq!(effects(&client).await, (12, 2, 2));

    // A duplicate racing the first waits for its outcome.
    for commit_first in [true, false] {
        let id = format!("race-{commit_first}");
        let transaction = client.transaction().await.unwrap();
        let effects = async { transaction.execute(CREDIT, &[&100i64]).await };
        assert!(matches!(inbox.apply(&transaction, &id, effects).await, Ok(Applied::First(Ok(1)))));
        let second = {
            let (inbox, config, id) = (inbox.clone(), config.clone(), id.clone());
            tokio::spawn(async move {
                let mut client = connect(&config).await;
                credit(&mut client, &inbox, &id, 1_000).await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.is_finished(), "the second delivery waits on the first's transaction");
        if commit_first {
            transaction.commit().await.unwrap();
            assert_eq!(second.await.unwrap(), Applied::Duplicate);
        } else {
            transaction.rollback().await.unwrap();
            assert_eq!(second.await.unwrap(), Applied::First(()), "the first rolled back");
        }
    }
    // race-true: 100 by the first; race-false: 1,000 by the second (it wrote `applied`).
    assert_eq!(effects(&client).await, (1_112, 3, 3));

    // Many deliveries at once.
    let deliveries = (0..1_500).map(|i| (format!("p-{}", i % 500), 1)).collect();
    let queue = Arc::new(Mutex::new(shuffled(deliveries, 0x2545_f491_4f6c_dd1d)));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (queue, inbox, config) = (Arc::clone(&queue), inbox.clone(), config.clone());
            tokio::spawn(async move {
                let mut client = connect(&config).await;
                let mut firsts = 0;
                loop {
                    let Some((id, cents)) = queue.lock().unwrap().pop() else { break };
                    if credit(&mut client, &inbox, &id, cents).await == Applied::First(()) {
                        firsts += 1;
                    }
                }
                firsts
            })
        })
        .collect();
    let mut firsts = 0;
    for worker in workers {
        firsts += worker.await.unwrap();
    }
    assert_eq!(firsts, 500, "one first delivery per message");
    assert_eq!(effects(&client).await, (1_612, 503, 503), "each of the 500 applied once");
    println!("inbox apply: 1500 deliveries of 500 messages by 4 consumers -> 500 applied once");
}

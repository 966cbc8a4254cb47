//! The inbox on SQLite: several connections (as several processes have) on one file,
//! redelivered messages, a handler that fails.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem_stream::Delivery;
use idem_stream::sqlite::Inbox;
use rusqlite::{Connection, TransactionBehavior};

fn database() -> PathBuf {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("idem-stream-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app.db");
    let connection = open(&path);
    connection.pragma_update(None, "journal_mode", "WAL").unwrap();
    Inbox::migrate(&connection).unwrap();
    connection
        .execute_batch(
            "CREATE TABLE ledger (id INTEGER PRIMARY KEY, cents INTEGER NOT NULL);
             INSERT INTO ledger VALUES (1, 0);
             CREATE TABLE applied (message_id TEXT NOT NULL);",
        )
        .unwrap();
    path
}

fn open(path: &std::path::Path) -> Connection {
    let connection = Connection::open(path).unwrap();
    connection.busy_timeout(Duration::from_secs(10)).unwrap();
    connection
}

fn deliver(connection: &mut Connection, inbox: &Inbox, message_id: &str, cents: i64) -> Delivery {
    // IMMEDIATE: take the write lock first, so the read of the inbox and the writes are one step.
    let transaction = connection.transaction_with_behavior(TransactionBehavior::Immediate).unwrap();
    let delivery = inbox.record(&transaction, message_id).unwrap();
    if delivery == Delivery::First {
        transaction.execute("UPDATE ledger SET cents = cents + ?1 WHERE id = 1", [cents]).unwrap();
        transaction.execute("INSERT INTO applied VALUES (?1)", [message_id]).unwrap();
    }
    transaction.commit().unwrap();
    delivery
}

fn effects(connection: &Connection) -> (i64, i64, i64) {
    connection
        .query_row(
            "SELECT (SELECT cents FROM ledger WHERE id = 1), count(*), count(DISTINCT message_id) FROM applied",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap()
}

#[test]
fn every_message_applies_once_across_connections() {
    let path = database();
    let inbox = Inbox::new("ledger").unwrap();
    let deliveries: Vec<(String, i64)> =
        (0..900).map(|i| (format!("m-{}", i % 300), (i % 300) as i64 + 1)).collect();
    let queue = Arc::new(Mutex::new(deliveries));
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (queue, inbox, path) = (Arc::clone(&queue), inbox.clone(), path.clone());
            std::thread::spawn(move || {
                let mut connection = open(&path);
                let mut firsts = 0;
                while let Some((id, cents)) = queue.lock().unwrap().pop() {
                    firsts += usize::from(
                        deliver(&mut connection, &inbox, &id, cents) == Delivery::First,
                    );
                }
                firsts
            })
        })
        .collect();
    let firsts: usize = threads.into_iter().map(|thread| thread.join().unwrap()).sum();
    assert_eq!(firsts, 300);
    let expected: i64 = (1..=300).sum();
    assert_eq!(effects(&open(&path)), (expected, 300, 300));
}

#[test]
fn a_failed_handler_leaves_nothing_and_the_redelivery_applies() {
    let path = database();
    let inbox = Inbox::new("ledger").unwrap();
    let mut connection = open(&path);
    {
        let transaction = connection.transaction().unwrap();
        assert_eq!(inbox.record(&transaction, "m-1").unwrap(), Delivery::First);
        transaction.execute("UPDATE ledger SET cents = cents + 5 WHERE id = 1", []).unwrap();
        // The handler fails here; the transaction is dropped without a commit.
    }
    assert_eq!(effects(&connection), (0, 0, 0));
    assert_eq!(deliver(&mut connection, &inbox, "m-1", 5), Delivery::First);
    assert_eq!(deliver(&mut connection, &inbox, "m-1", 5), Delivery::Duplicate);
    assert_eq!(effects(&connection), (5, 1, 1));
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(inbox.purge(&connection, Duration::ZERO, 10).unwrap(), 1);
}

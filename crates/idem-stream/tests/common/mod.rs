//! Shared by the broker tests.

#![allow(dead_code)]

#[allow(unused_imports)]
pub use idem_stream::conformance::DroppingAcks;

/// A fresh schema of the test's own (see `fresh_postgres_schema`) holding the outbox and
/// inbox tables, a one-row `ledger` and an `applied` log with no unique constraint (so a
/// double application would show). Returns a client on it and its URL.
pub async fn ledger_database(schema: &str) -> Option<(tokio_postgres::Client, String)> {
    let database = idem_core::conformance::fresh_postgres_schema(schema).await?;
    Some((ledger_at(&database).await, database))
}

/// The ledger fixture's tables made in the (empty) database at `database`.
pub async fn ledger_at(database: &str) -> tokio_postgres::Client {
    let (mut client, connection) =
        tokio_postgres::connect(database, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    idem_stream::postgres::Outbox::migrate(&mut client).await.unwrap();
    idem_stream::postgres::Inbox::migrate(&mut client).await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE ledger (id int PRIMARY KEY, cents bigint NOT NULL);
             INSERT INTO ledger VALUES (1, 0);
             CREATE TABLE applied (message_id text NOT NULL);",
        )
        .await
        .unwrap();
    client
}

/// The handler of the ledger fixture: credits `cents` once per message, in the transaction
/// that records the message in `inbox`.
pub async fn credit(
    client: &mut tokio_postgres::Client,
    inbox: &idem_stream::postgres::Inbox,
    message_id: &str,
    cents: i64,
) -> Result<idem_stream::Delivery, idem_stream::Error> {
    let transaction = client.transaction().await?;
    let delivery = inbox.record(&transaction, message_id).await?;
    if delivery == idem_stream::Delivery::First {
        transaction.execute("UPDATE ledger SET cents = cents + $1 WHERE id = 1", &[&cents]).await?;
        transaction.execute("INSERT INTO applied VALUES ($1)", &[&message_id]).await?;
    }
    transaction.commit().await?;
    Ok(delivery)
}

/// The batch form of [`credit`]: one transaction for the whole batch, its ids recorded with
/// one statement; returns how many were applied (the rest were duplicates).
pub async fn credit_many(
    client: &mut tokio_postgres::Client,
    inbox: &idem_stream::postgres::Inbox,
    credits: &[(&str, i64)],
) -> Result<usize, idem_stream::Error> {
    let transaction = client.transaction().await?;
    let ids: Vec<&str> = credits.iter().map(|(id, _)| *id).collect();
    let deliveries = inbox.record_many(&transaction, &ids).await?;
    let mut applied = 0;
    for ((id, cents), delivery) in credits.iter().zip(deliveries) {
        if delivery == idem_stream::Delivery::First {
            transaction
                .execute("UPDATE ledger SET cents = cents + $1 WHERE id = 1", &[cents])
                .await?;
            transaction.execute("INSERT INTO applied VALUES ($1)", &[id]).await?;
            applied += 1;
        }
    }
    transaction.commit().await?;
    Ok(applied)
}

/// Deletes the RabbitMQ queue `queue` if it exists and declares it afresh (durable, quorum);
/// returns the connection and channel used, still open.
pub async fn fresh_rabbit_queue(url: &str, queue: &str) -> (lapin::Connection, lapin::Channel) {
    let connection = lapin::Connection::connect(url, Default::default()).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel.queue_delete(queue.into(), Default::default()).await.unwrap();
    idem_stream::rabbitmq::declare_queue(url, queue, "", "").await.unwrap();
    (connection, channel)
}

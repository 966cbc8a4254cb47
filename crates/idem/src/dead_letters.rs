//! `idem dead-letters`: the messages consumers gave up on (kept in `idem_dead_letters` in the
//! consumers' PostgreSQL database, with their failure): list them, look at one, put it back
//! on its broker once the cause is fixed, or give it up for good.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use idem_stream::postgres::{Buried, BuriedCount, DeadLetters, Requeued};

use crate::secrets::{redact, scrub};

/// How long connecting to the database or the broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Dead letters one `requeue` or `delete` names at most.
const MAX_IDS: usize = 1_000;

#[derive(Debug, Args)]
pub struct DeadLettersArgs {
    /// The consumers' database, where `idem_dead_letters` lives (PostgreSQL)
    #[arg(long, env = "IDEM_DEAD_LETTERS_DATABASE", value_name = "URL", global = true)]
    pub database: Option<String>,
    /// Print JSON instead of text
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: DeadLettersCommand,
}

#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// Dead letters per consumer, then the oldest ones with their failure
    List {
        /// Only this consumer's
        #[arg(long)]
        consumer: Option<String>,
        /// At most this many (1 to 1000)
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// One dead letter, whole: headers, failure and payload
    Show { id: i64 },
    /// Publish dead letters again, each with its own message id, key and headers, then remove
    /// them (fix what made the consumer fail first). A consumer's inbox takes each once, by
    /// its id, even if a requeue is repeated.
    Requeue {
        /// Row ids, as `list` shows them
        #[arg(required = true, num_args = 1..)]
        ids: Vec<i64>,
        /// The broker the consumer reads: `nats://`, `amqp://` or `redis://`, as `idem relay`
        /// takes it
        #[arg(long, env = "IDEM_DEAD_LETTERS_BROKER", value_name = "URL")]
        broker: String,
        /// RabbitMQ only: the exchange to publish to; the default ("") routes each message to
        /// the queue named by its subject
        #[arg(long, env = "IDEM_DEAD_LETTERS_EXCHANGE", default_value = "")]
        exchange: String,
    },
    /// Give dead letters up for good: they are removed, never published again
    Delete {
        #[arg(required = true, num_args = 1..)]
        ids: Vec<i64>,
    },
}

/// Runs the command: the text to print and whether everything it named was found (`false`
/// makes the exit status 1), or an error message.
pub async fn run(args: DeadLettersArgs) -> Result<(String, bool), String> {
    let url = args.database.ok_or("--database URL (or IDEM_DEAD_LETTERS_DATABASE) is required")?;
    let mut db = Db::open(&url).await?;
    match args.command {
        DeadLettersCommand::List { consumer, limit } => {
            if !(1..=DeadLetters::MAX_LIST).contains(&limit) {
                return Err(format!("--limit must be 1 to {}", DeadLetters::MAX_LIST));
            }
            let counts = db.counts().await?;
            let letters = db.list(consumer.as_deref(), limit).await?;
            let text = if args.json {
                format!("{}\n", overview_json(&counts, &letters))
            } else {
                list_text(&counts, &letters)
            };
            Ok((text, true))
        }
        DeadLettersCommand::Show { id } => match db.get(id).await? {
            Some(letter) if args.json => Ok((format!("{}\n", letter_json(&letter, true)), true)),
            Some(letter) => Ok((show_text(&letter), true)),
            None => Ok((format!("no dead letter {id}\n"), false)),
        },
        DeadLettersCommand::Requeue { ids, broker, exchange } => {
            check_ids(&ids)?;
            let publisher = publisher(&broker, &exchange).await?;
            let mut text = String::new();
            let mut all_found = true;
            for id in ids {
                let requeued = db.requeue(id, publisher.as_ref()).await.map_err(|(_, e)| e);
                let (line, found) = requeue_line(id, requeued, args.json);
                all_found &= found;
                text.push_str(&line);
            }
            Ok((text, all_found))
        }
        DeadLettersCommand::Delete { ids } => {
            check_ids(&ids)?;
            let mut text = String::new();
            let mut all_found = true;
            for id in ids {
                let deleted = db.delete(id).await?;
                all_found &= deleted;
                let _ = match (args.json, deleted) {
                    (true, _) => {
                        writeln!(text, "{}", serde_json::json!({ "id": id, "deleted": deleted }))
                    }
                    (false, true) => {
                        writeln!(text, "deleted dead letter {id}; its message is given up")
                    }
                    (false, false) => writeln!(text, "no dead letter {id}"),
                };
            }
            Ok((text, all_found))
        }
    }
}

fn check_ids(ids: &[i64]) -> Result<(), String> {
    match ids.len() {
        0 => Err("name at least one dead letter by its id".into()),
        n if n > MAX_IDS => Err(format!("at most {MAX_IDS} ids at once (got {n})")),
        _ => Ok(()),
    }
}

/// One requeue's outcome as a line: a broker's refusal names the dead letter and leaves it
/// where it was, and the others go on.
fn requeue_line(id: i64, requeued: Result<Requeued, String>, json: bool) -> (String, bool) {
    match (requeued, json) {
        (Ok(Requeued::Requeued(letter)), false) => (
            format!(
                "requeued dead letter {id}: message {} on {} (consumer {})\n",
                letter.message_id, letter.subject, letter.consumer
            ),
            true,
        ),
        (Ok(Requeued::Requeued(letter)), true) => (
            format!(
                "{}\n",
                serde_json::json!({ "id": id, "requeued": true, "message_id": letter.message_id, "subject": letter.subject })
            ),
            true,
        ),
        (Ok(Requeued::NotFound), false) => (format!("no dead letter {id}\n"), false),
        (Ok(Requeued::NotFound), true) => (
            format!(
                "{}\n",
                serde_json::json!({ "id": id, "requeued": false, "error": "not found" })
            ),
            false,
        ),
        (Err(error), false) => (format!("dead letter {id} stays: {error}\n"), false),
        (Err(error), true) => (
            format!("{}\n", serde_json::json!({ "id": id, "requeued": false, "error": error })),
            false,
        ),
    }
}

/// A publisher for putting dead letters back (a JetStream duplicate fails: see
/// [`idem_stream::nats::JetStreamPublisher::refusing_duplicates`]).
pub(crate) async fn publisher(
    broker: &str,
    exchange: &str,
) -> Result<Box<dyn idem_stream::publish::Publisher>, String> {
    let fail = |error: &dyn std::fmt::Display| {
        format!("--broker {}: {}", redact(broker), scrub(&error.to_string(), broker))
    };
    let connect = async {
        // The relay's bound on a Redis stream's unread entries.
        let publisher = crate::relay::connect_publisher(broker, exchange, 1_000_000, true).await?;
        if !broker.starts_with("redis") {
            return Ok(publisher);
        }
        let client = redis::Client::open(broker).map_err(|e| e.to_string())?;
        let connection = client.get_connection_manager().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(Box::new(ReadStreamsOnly { publisher, connection }) as Box<_>)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| fail(&"no answer within 10s"))?
        .map_err(|error| fail(&error))
}

/// Redis makes a stream on its first entry, so a dead letter requeued through the wrong broker
/// (one a NATS or RabbitMQ consumer buried) would land in a new stream nobody reads, and be
/// gone. This refuses a stream that does not exist or has no consumer group.
struct ReadStreamsOnly {
    publisher: Box<dyn idem_stream::publish::Publisher>,
    connection: redis::aio::ConnectionManager,
}

#[async_trait::async_trait]
impl idem_stream::publish::Publisher for ReadStreamsOnly {
    async fn publish(
        &self,
        messages: &[idem_stream::publish::OutboxMessage],
    ) -> Vec<Result<(), idem_stream::publish::PublishError>> {
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            let mut connection = self.connection.clone();
            let groups = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(&message.topic)
                .query_async::<Vec<redis::Value>>(&mut connection)
                .await;
            let refusal = match groups {
                Ok(groups) if !groups.is_empty() => None,
                Ok(_) => Some(format!(
                    "stream {} has no consumer group: nothing would read it",
                    message.topic
                )),
                Err(error) => Some(format!(
                    "stream {} cannot take it back ({error}): is this the broker its consumer reads?",
                    message.topic
                )),
            };
            results.push(match refusal {
                None => self.publisher.publish(std::slice::from_ref(message)).await.remove(0),
                Some(reason) => Err(idem_stream::publish::PublishError::new(
                    message.id,
                    idem_stream::Error::broker("Redis", "requeue", reason),
                )),
            });
        }
        results
    }
}

/// The consumers' database.
pub(crate) struct Db {
    client: tokio_postgres::Client,
    url: String,
}

impl Db {
    pub(crate) async fn open(url: &str) -> Result<Self, String> {
        if url.starts_with("sqlite://") {
            return Err(format!("--database {url}: dead letters are kept in PostgreSQL only"));
        }
        let client = crate::outbox::connect_postgres(url).await?;
        Ok(Self { client, url: url.to_owned() })
    }

    fn fail(&self, error: &dyn std::fmt::Display) -> String {
        format!("--database {}: {}", redact(&self.url), scrub(&error.to_string(), &self.url))
    }

    pub(crate) async fn counts(&self) -> Result<Vec<BuriedCount>, String> {
        DeadLetters::counts(&self.client).await.map_err(|e| self.fail(&e))
    }

    pub(crate) async fn list(
        &self,
        consumer: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Buried>, String> {
        DeadLetters::list(&self.client, consumer, limit).await.map_err(|e| self.fail(&e))
    }

    async fn get(&self, id: i64) -> Result<Option<Buried>, String> {
        DeadLetters::get(&self.client, id).await.map_err(|e| self.fail(&e))
    }

    async fn delete(&self, id: i64) -> Result<bool, String> {
        DeadLetters::delete(&self.client, id).await.map_err(|e| self.fail(&e))
    }

    /// The error says whether the database failed (`true`, naming it) or the requeue was
    /// refused (`false`: by the broker, or for a message no relay published).
    pub(crate) async fn requeue(
        &mut self,
        id: i64,
        publisher: &dyn idem_stream::publish::Publisher,
    ) -> Result<Requeued, (bool, String)> {
        let url = self.url.clone();
        DeadLetters::requeue(&mut self.client, id, publisher).await.map_err(|error| match error {
            idem_stream::Error::Postgres(_) | idem_stream::Error::Disconnected => {
                (true, format!("--database {}: {}", redact(&url), scrub(&error.to_string(), &url)))
            }
            other => (false, other.to_string()),
        })
    }
}

/// `text` with control characters escaped, so that what a producer put in a message cannot
/// move the cursor or recolour an operator's terminal.
fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| match c.is_control() {
            true => c.escape_default().collect::<Vec<_>>(),
            false => vec![c],
        })
        .collect()
}

/// How long ago `at` was, at least a second (as the outbox's ages read).
fn age(at: SystemTime) -> String {
    let age = SystemTime::now().duration_since(at).unwrap_or_default();
    crate::outbox::human(Some(age.max(Duration::from_secs(1))))
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

/// The payload as text when it is UTF-8, else its size and first bytes in hex.
fn payload_text(payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(text) => text.to_owned(),
        Err(_) => {
            let shown: String = payload.iter().take(64).map(|byte| format!("{byte:02x}")).collect();
            format!("({} bytes, not UTF-8) {shown}…", payload.len())
        }
    }
}

/// A dead letter as JSON; `whole` adds its headers and payload.
pub(crate) fn letter_json(letter: &Buried, whole: bool) -> serde_json::Value {
    let mut value = serde_json::json!({
        "id": letter.id,
        "consumer": letter.consumer,
        "message_id": letter.message_id,
        "subject": letter.subject,
        "attempts": letter.attempts,
        "failure": letter.failure,
        "buried_at_unix": unix_seconds(letter.buried_at),
        "buried_for_s": SystemTime::now().duration_since(letter.buried_at).unwrap_or_default().as_secs(),
        "payload_bytes": letter.payload_bytes,
        // What `requeue` can put back: what an idem relay published.
        "requeueable": letter.relay_published(),
    });
    if whole {
        value["headers"] =
            letter.headers.iter().map(|(name, value)| serde_json::json!([name, value])).collect();
        value["payload"] = payload_text(&letter.payload).into();
    }
    value
}

pub(crate) fn overview_json(counts: &[BuriedCount], letters: &[Buried]) -> serde_json::Value {
    let counts: Vec<_> = counts
        .iter()
        .map(|count| {
            serde_json::json!({
                "consumer": count.consumer,
                "count": count.count,
                "oldest_unix": unix_seconds(count.oldest),
            })
        })
        .collect();
    let letters: Vec<_> = letters.iter().map(|letter| letter_json(letter, false)).collect();
    serde_json::json!({ "consumers": counts, "dead_letters": letters })
}

fn list_text(counts: &[BuriedCount], letters: &[Buried]) -> String {
    let mut out = String::new();
    if counts.is_empty() {
        out.push_str("no dead letters\n");
        return out;
    }
    for count in counts {
        let _ = writeln!(
            out,
            "consumer {}: {} dead letter(s), the oldest buried {} ago",
            count.consumer,
            count.count,
            age(count.oldest)
        );
    }
    if letters.is_empty() {
        return out;
    }
    let subject_width = letters.iter().map(|l| l.subject.len()).max().unwrap_or(7).clamp(7, 40);
    let id_width = letters.iter().map(|l| l.message_id.len()).max().unwrap_or(10).clamp(10, 40);
    let _ = writeln!(
        out,
        "\n{:>8}  {:16}  {:id_width$}  {:subject_width$}  {:>8}  {:>10}  FAILURE",
        "ID", "CONSUMER", "MESSAGE ID", "SUBJECT", "ATTEMPTS", "BURIED"
    );
    for letter in letters {
        let failure: String = printable(&letter.failure).chars().take(80).collect();
        let _ = writeln!(
            out,
            "{:>8}  {:16}  {:id_width$}  {:subject_width$}  {:>8}  {:>10}  {failure}",
            letter.id,
            letter.consumer,
            printable(&letter.message_id),
            printable(&letter.subject),
            letter.attempts,
            age(letter.buried_at),
        );
    }
    out
}

fn show_text(letter: &Buried) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "id           {}", letter.id);
    let _ = writeln!(out, "consumer     {}", letter.consumer);
    let _ = writeln!(out, "message id   {}", printable(&letter.message_id));
    let _ = writeln!(out, "subject      {}", printable(&letter.subject));
    let _ = writeln!(out, "attempts     {}", letter.attempts);
    let _ = writeln!(out, "buried       {} ago", age(letter.buried_at));
    let _ = writeln!(out, "failure      {}", printable(&letter.failure));
    for (name, value) in &letter.headers {
        let _ = writeln!(out, "header       {}: {}", printable(name), printable(value));
    }
    let _ = writeln!(out, "payload      {}", printable(&payload_text(&letter.payload)));
    out
}

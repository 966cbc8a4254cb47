//! Trace context into the PostgreSQL outbox (the relays carry an event's headers to every
//! broker as they are; `crates/idem/tests/traces.rs` follows one through SQLite, JetStream and
//! the consumer runner). Against the real PostgreSQL named by `IDEM_TEST_POSTGRES_URL`.

use idem_core::conformance::fresh_postgres_schema;
use idem_stream::postgres::{Event, Outbox};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tokio_postgres::NoTls;
use tracing_subscriber::layer::SubscriberExt as _;

const CLIENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
const CALLERS_OWN: &str = "00-11111111111111111111111111111111-2222222222222222-01";

/// An event enqueued inside a traced request carries its producer span's `traceparent`, in
/// the request's trace; a caller's own `traceparent` is kept as it is; without an
/// OpenTelemetry layer nothing is added.
#[tokio::test]
async fn an_enqueued_event_carries_the_producer_span_context() {
    let Some(database) = fresh_postgres_schema("idem_outbox_traces").await else { return };
    let (mut client, connection) =
        database.parse::<tokio_postgres::Config>().unwrap().connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    Outbox::migrate(&mut client).await.unwrap();

    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    let enqueue = async |client: &mut tokio_postgres::Client, headers: &[(&str, &str)]| {
        let transaction = client.transaction().await.unwrap();
        let event = Event { topic: "orders", key: "order-1", payload: b"{}", headers };
        Outbox::enqueue(&transaction, event).await.unwrap();
        transaction.commit().await.unwrap();
    };
    {
        // This test's runtime runs on this thread alone: the subscriber holds for what follows.
        let _default = tracing::subscriber::set_default(subscriber);
        let request = tracing::info_span!("request");
        let mut incoming = http::HeaderMap::new();
        incoming.insert("traceparent", CLIENT.parse().unwrap());
        idem_trace::set_parent_from_http(&request, &incoming);
        tracing::Instrument::instrument(
            async {
                enqueue(&mut client, &[("x-tenant", "7")]).await;
                enqueue(&mut client, &[("traceparent", CALLERS_OWN)]).await;
            },
            request,
        )
        .await;
    }
    enqueue(&mut client, &[]).await;

    let (_, events) = Outbox::key(&client, "orders", "order-1", 10).await.unwrap().unwrap();
    assert_eq!(events.len(), 3);
    let spans = exporter.get_finished_spans().unwrap();
    let producers: Vec<_> =
        spans.iter().filter(|span| span.name == "idem.outbox.enqueue").collect();
    assert_eq!(producers.len(), 2, "one producer span per enqueue while traced");
    let producer = producers[0];
    assert_eq!(format!("{:032x}", producer.span_context.trace_id()), &CLIENT[3..35]);
    assert_eq!(
        events[0].headers,
        vec![
            ("x-tenant".to_owned(), "7".to_owned()),
            (
                "traceparent".to_owned(),
                format!("00-{}-{:016x}-01", &CLIENT[3..35], producer.span_context.span_id())
            ),
        ]
    );
    assert_eq!(events[1].headers, vec![("traceparent".to_owned(), CALLERS_OWN.to_owned())]);
    assert_eq!(events[2].headers, Vec::<(String, String)>::new());
}

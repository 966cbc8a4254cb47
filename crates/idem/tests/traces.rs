//! Traces through idem, end to end. In one process: a client's `traceparent` goes into the
//! gateway (`idem::serve::run`), whose span continues the client's trace and names its
//! outcome; the upstream gets a `traceparent` naming the gateway's span and, inside its request,
//! enqueues an outbox event (SQLite); the relay publishes it to JetStream and the consumer
//! runner's span for the message links back to the producer's. Spans are collected by the
//! OpenTelemetry SDK's in-memory exporter. Then the binary: spans reach a real OTLP/HTTP
//! receiver, a collector that is down never breaks serving, and a setting this build cannot
//! honour stops it at start with the setting named.

mod common;

use common::free_port;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use axum::extract::State;
use axum::routing::post;
use bytes::Bytes;
use clap::Parser;
use http::{HeaderMap, StatusCode};
use idem_core::conformance::service_url;
use idem_stream::consume::{self, DeadLetter, Received, RunnerConfig};
use idem_stream::nats::{JetStreamPublisher, JetStreamSubscription};
use idem_stream::outbox::{Event, RelayConfig};
use opentelemetry::Value;
use opentelemetry::trace::{SpanKind, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt as _;

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// What the OTLP receiver got: each request's content type and body.
type ReceivedExports = Arc<Mutex<Vec<(String, Bytes)>>>;

fn client_traceparent() -> String {
    format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01")
}

#[derive(Parser)]
struct Serve {
    #[command(flatten)]
    args: idem::config::ServeArgs,
}

struct App {
    database: PathBuf,
    topic: String,
    traceparents: Mutex<Vec<String>>,
}

/// The protected service: records the `traceparent` it got, continues the trace in a server
/// span of its own, and enqueues an order event in its SQLite transaction inside that span.
async fn create_order(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    if let Some(traceparent) = headers.get("traceparent").and_then(|v| v.to_str().ok()) {
        app.traceparents.lock().unwrap().push(traceparent.to_owned());
    }
    let span = tracing::info_span!("upstream.create_order", otel.kind = "server");
    idem_trace::set_parent_from_http(&span, &headers);
    let app = Arc::clone(&app);
    async move {
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || {
            let _entered = span.enter();
            let mut connection = rusqlite::Connection::open(&app.database).unwrap();
            let transaction = connection.transaction().unwrap();
            let event = Event { topic: &app.topic, key: "order-1", payload: &body, headers: &[] };
            idem_stream::sqlite::Outbox::enqueue(&transaction, event).unwrap();
            transaction.commit().unwrap();
        })
        .await
        .unwrap();
        StatusCode::CREATED
    }
    .instrument(span)
    .await
}

struct Refuse;

#[async_trait::async_trait]
impl DeadLetter for Refuse {
    async fn bury(&self, message: &Received, failure: &str) -> idem_stream::Result<()> {
        Err(idem_stream::Error::other(format!("{} failed: {failure}", message.id)))
    }
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| &kv.value)
}

fn text(span: &SpanData, key: &str) -> String {
    match attribute(span, key) {
        Some(value) => value.as_str().into_owned(),
        None => panic!("span {} has no {key}: {:?}", span.name, span.attributes),
    }
}

fn hex_trace(span: &SpanData) -> String {
    format!("{:032x}", span.span_context.trace_id())
}

fn hex_span(span: &SpanData) -> String {
    format!("{:016x}", span.span_context.span_id())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_is_traced_from_the_client_through_the_outbox_to_the_consumer() {
    let Some(nats) = service_url("IDEM_TEST_NATS_URL") else { return };

    // The process's subscriber: every span to the in-memory exporter, as it ends.
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let database = common::temp_dir().join("app.db");
    {
        let connection = rusqlite::Connection::open(&database).unwrap();
        connection.pragma_update(None, "journal_mode", "WAL").unwrap();
        idem_stream::sqlite::Outbox::migrate(&connection).unwrap();
    }
    let unique = common::unique("traces").replace(['-', ':'], "_");
    let topic = format!("idemtest.traces.{unique}");
    let app = Arc::new(App {
        database: database.clone(),
        topic: topic.clone(),
        traceparents: Mutex::new(Vec::new()),
    });
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = upstream.local_addr().unwrap();
    let router =
        axum::Router::new().route("/orders", post(create_order)).with_state(Arc::clone(&app));
    tokio::spawn(async move { axum::serve(upstream, router).await.unwrap() });

    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = Serve::parse_from([
        "serve".to_owned(),
        "--upstream".to_owned(),
        format!("http://{upstream_addr}"),
        "--store".to_owned(),
        "memory://".to_owned(),
        "--listen".to_owned(),
        listen.to_string(),
        "--admin-listen".to_owned(),
        admin.to_string(),
    ])
    .args
    .resolve()
    .unwrap();
    let metrics = idem::serve::install_metrics().unwrap();
    let (stop_gateway, stopped) = tokio::sync::oneshot::channel::<()>();
    let gateway = tokio::spawn(idem::serve::run(config, metrics, async {
        let _ = stopped.await;
    }));
    let client = common::TestClient::new(listen);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(listen).await.is_err() {
        assert!(Instant::now() < deadline, "the gateway did not start listening");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let traceparent = client_traceparent();
    let first =
        client.post("order-7f3a", r#"{"sku":"A1"}"#, &[("traceparent", &traceparent)]).await;
    assert_eq!(first.status, StatusCode::CREATED);
    let replay =
        client.post("order-7f3a", r#"{"sku":"A1"}"#, &[("traceparent", &traceparent)]).await;
    assert_eq!(replay.status, StatusCode::CREATED);
    assert!(replay.is_replay());
    let seen_upstream = app.traceparents.lock().unwrap().clone();
    assert_eq!(seen_upstream.len(), 1, "the replay never reaches the upstream");

    // The relay publishes the event to JetStream; the runner consumes it.
    let jetstream = jetstream::new(async_nats::connect(&nats).await.unwrap());
    let stream_name = format!("IDEM_TRACES_{}", unique.to_uppercase());
    let stream = jetstream
        .create_stream(stream::Config {
            name: stream_name.clone(),
            subjects: vec![topic.clone()],
            ..Default::default()
        })
        .await
        .unwrap();
    let relay = idem_stream::sqlite::Relay::open(
        &database,
        JetStreamPublisher::new(jetstream.clone()),
        RelayConfig::default(),
    )
    .unwrap();
    relay.run_until_idle(10).await.unwrap();
    let subscription =
        JetStreamSubscription::durable(&stream, "traces", Duration::from_secs(30)).await.unwrap();
    let handled: Arc<Mutex<Vec<Received>>> = Arc::default();
    let (done, finished) = tokio::sync::watch::channel(false);
    let report = {
        let handled = Arc::clone(&handled);
        let mut finished = finished.clone();
        consume::run(
            subscription,
            move |message: Received| {
                let handled = Arc::clone(&handled);
                let done = done.clone();
                async move {
                    handled.lock().unwrap().push(message);
                    let _ = done.send(true);
                    Ok::<(), String>(())
                }
            },
            Arc::new(Refuse),
            RunnerConfig::default(),
            async move {
                let _ =
                    tokio::time::timeout(Duration::from_secs(20), finished.wait_for(|done| *done))
                        .await;
            },
        )
        .await
    };
    assert_eq!(report.handled, 1, "{report:?}");
    let message = handled.lock().unwrap()[0].clone();
    let _ = jetstream.delete_stream(&stream_name).await;

    let _ = stop_gateway.send(());
    gateway.await.unwrap().unwrap();
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let named =
        |name: &str| -> Vec<&SpanData> { spans.iter().filter(|s| s.name == name).collect() };

    // The gateway: two server spans in the client's trace, children of the client's span.
    let requests = named("idem.request");
    assert_eq!(requests.len(), 2, "{:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());
    let by_outcome: HashMap<String, &SpanData> =
        requests.iter().map(|span| (text(span, "idem.outcome"), *span)).collect();
    let run = by_outcome.get("run").expect("a span with idem.outcome=run");
    let replayed = by_outcome.get("replay").expect("a span with idem.outcome=replay");
    for span in [run, replayed] {
        assert_eq!(span.span_kind, SpanKind::Server);
        assert_eq!(hex_trace(span), CLIENT_TRACE);
        assert_eq!(format!("{:016x}", span.parent_span_id), CLIENT_SPAN);
        assert_eq!(text(span, "http.request.method"), "POST");
        assert_eq!(text(span, "url.path"), "/orders");
        assert_eq!(attribute(span, "http.response.status_code"), Some(&Value::I64(201)));
    }
    // The key's hash: the same for both requests, 32 hex digits, never the key itself.
    let key_hash = text(run, "idem.key_hash");
    assert_eq!(key_hash, text(replayed, "idem.key_hash"));
    assert!(key_hash.len() == 32 && key_hash.bytes().all(|b| b.is_ascii_hexdigit()), "{key_hash}");
    assert!(
        spans
            .iter()
            .all(|span| span.attributes.iter().all(|kv| !kv.value.as_str().contains("order-7f3a")))
    );

    // The upstream was told the gateway's span, in the client's trace.
    let forwarded: Vec<&str> = seen_upstream[0].split('-').collect();
    assert_eq!(forwarded[1], CLIENT_TRACE);
    assert_eq!(forwarded[2], hex_span(run), "the upstream's parent is the gateway's span");

    // The upstream's span, and the producer span of the enqueue inside it.
    let upstream_span = named("upstream.create_order")[0];
    assert_eq!(format!("{:016x}", upstream_span.parent_span_id), hex_span(run));
    let producer = named("idem.outbox.enqueue");
    assert_eq!(producer.len(), 1);
    let producer = producer[0];
    assert_eq!(producer.span_kind, SpanKind::Producer);
    assert_eq!(hex_trace(producer), CLIENT_TRACE);
    assert_eq!(producer.parent_span_id, upstream_span.span_context.span_id());
    assert_eq!(text(producer, "messaging.destination.name"), topic);

    // The message carried the producer's traceparent through the relay and JetStream.
    let carried = message
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("traceparent"))
        .map(|(_, value)| value.clone())
        .expect("the message has a traceparent header");
    assert_eq!(carried, format!("00-{CLIENT_TRACE}-{}-01", hex_span(producer)));

    // The consumer: its own root span, linked (not parented) to the producer's.
    let consumers = named("idem.consume");
    assert_eq!(consumers.len(), 1);
    let consumer = consumers[0];
    assert_eq!(consumer.span_kind, SpanKind::Consumer);
    assert_eq!(consumer.parent_span_id, opentelemetry::trace::SpanId::INVALID);
    assert_ne!(hex_trace(consumer), CLIENT_TRACE, "a root span of its own trace");
    assert_eq!(consumer.links.links.len(), 1);
    let link = &consumer.links.links[0].span_context;
    assert_eq!(format!("{:032x}", link.trace_id()), CLIENT_TRACE, "linked into the client's trace");
    assert_eq!(link.span_id(), producer.span_context.span_id());
    assert_eq!(text(consumer, "messaging.message.id"), message.id);
    assert!(message.id.starts_with("idem-outbox-"), "{}", message.id);
    assert_eq!(text(consumer, "messaging.destination.name"), topic);
    assert_eq!(attribute(consumer, "idem.attempt"), Some(&Value::I64(1)));
}

/// With no `OTEL_*` variable set nothing is exported and no exporter is built; asking for
/// what this build cannot do is an error naming the setting.
#[test]
fn the_environment_decides_whether_traces_are_exported() {
    use idem::telemetry::requested;
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| (*v).to_owned())
    };
    assert_eq!(requested(|_| None), Ok(None));
    assert_eq!(requested(env(&[("OTEL_SERVICE_NAME", "orders")])), Ok(None));
    let on = requested(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")]));
    assert_eq!(on.unwrap().unwrap().endpoint.as_deref(), Some("http://127.0.0.1:4318"));
    assert!(requested(env(&[("OTEL_TRACES_EXPORTER", "otlp")])).unwrap().is_some());
    assert_eq!(
        requested(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_TRACES_EXPORTER", "none")
        ])),
        Ok(None)
    );
    assert_eq!(
        requested(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_SDK_DISABLED", "true")
        ])),
        Ok(None)
    );
    for (pairs, named) in [
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ][..],
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc",
        ),
        (&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://c:4318")][..], "https://c:4318"),
        (&[("OTEL_TRACES_EXPORTER", "zipkin")][..], "OTEL_TRACES_EXPORTER=zipkin"),
        (
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "soon"),
            ][..],
            "OTEL_EXPORTER_OTLP_TIMEOUT=soon",
        ),
    ] {
        let pairs: &'static [(&'static str, &'static str)] = pairs;
        let error = requested(env(pairs)).unwrap_err();
        assert!(error.contains(named), "{error}");
    }
}

/// A real OTLP/HTTP receiver on loopback: the binary's spans arrive as protobuf on
/// `/v1/traces`, in the client's trace, with the gateway's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_sends_its_spans_to_an_otlp_endpoint() {
    let received: ReceivedExports = Arc::default();
    let collector = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let router = axum::Router::new()
        .route(
            "/v1/traces",
            post(
                |State(received): State<ReceivedExports>,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_owned();
                    received.lock().unwrap().push((content_type, body));
                    StatusCode::OK
                },
            ),
        )
        .with_state(Arc::clone(&received));
    tokio::spawn(async move { axum::serve(collector, router).await.unwrap() });
    let upstream = common::Upstream::start().await;
    let mut gateway = common::Gateway::start_with_env(
        &upstream.url(),
        "memory://",
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let reply =
        gateway.client().post("otlp-1", "{}", &[("traceparent", &client_traceparent())]).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    let trace_id: Vec<u8> =
        (0..16).map(|i| u8::from_str_radix(&CLIENT_TRACE[2 * i..2 * i + 2], 16).unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        let found = received.lock().unwrap().iter().find_map(|(content_type, body)| {
            let holds = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
            (holds(b"idem.request") && holds(&trace_id))
                .then(|| (content_type.clone(), body.clone()))
        });
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no span reached the OTLP endpoint within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(body.0, "application/x-protobuf");
    let holds = |needle: &[u8]| body.1.windows(needle.len()).any(|w| w == needle);
    assert!(holds(b"idem.outcome") && holds(b"run"));
    assert!(holds(b"service.name") && holds(b"idem"));
    assert!(!holds(b"otlp-1"), "the raw key is never exported");
    assert!(gateway.terminate().success());
}

/// A collector that is down: requests are served as usual, and the gateway still stops
/// promptly on SIGTERM (the last batch is given up, not waited for forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_does_not_break_serving() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let upstream = common::Upstream::start().await;
    let mut gateway = common::Gateway::start_with_env(
        &upstream.url(),
        "memory://",
        &[],
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", &closed), ("OTEL_BSP_SCHEDULE_DELAY", "100")],
    );
    let client = gateway.client();
    for round in 0..20 {
        let key = format!("down-{round}");
        let reply = client.post(&key, "{}", &[("traceparent", &client_traceparent())]).await;
        assert_eq!(reply.status, StatusCode::CREATED);
        let again = client.post(&key, "{}", &[]).await;
        assert!(again.is_replay());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(upstream.calls(), 20);
    let started = Instant::now();
    assert!(gateway.terminate().success());
    assert!(started.elapsed() < Duration::from_secs(15), "stopping took {:?}", started.elapsed());
}

/// A setting the build cannot honour stops the gateway at start, naming it.
#[test]
fn an_unsupported_otel_setting_stops_the_gateway_at_start() {
    let output = common::exits_within_20s(
        Command::new(common::idem_bin())
            .args(["serve", "--upstream", "http://127.0.0.1:9", "--store", "memory://"])
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("OTEL_EXPORTER_OTLP_PROTOCOL=grpc"), "{stderr}");
    assert!(output.stdout.is_empty(), "it never reported readiness");
}

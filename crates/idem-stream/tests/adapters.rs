//! The adapter conformance suite (`idem_stream::conformance`) run against each real server: NATS
//! JetStream, Redis Streams and RabbitMQ. Each case states what the relay and the consumer
//! runner rely on from an adapter:
//! - every published message arrives with its id, key, sequence, headers and payload, and a
//!   single consumer sees each key's events in the order they were published;
//! - `publish` answers each message on its own: a refused one fails alone, in its place;
//! - `Retry` brings the message back with its attempt counted;
//! - a consumer that vanishes without settling loses nothing: another one gets its messages;
//! - consumers in one group share the work, an acknowledged message going to one of them only.

mod common;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use idem_core::conformance::service_url;
use idem_stream::conformance::Broker;
use idem_stream::publish::Publisher;

idem_stream::adapter_conformance_tests!(jetstream, Nats::new());
idem_stream::adapter_conformance_tests!(redis_streams, RedisStreams::new());
idem_stream::adapter_conformance_tests!(rabbitmq, Rabbit::new());

/// Names unique to this test process, so parallel runs and earlier runs do not meet.
fn unique(case: &str) -> String {
    format!("idemtest.adapters.{case}.{}", std::process::id())
}

struct Nats {
    jetstream: async_nats::jetstream::Context,
}

impl Nats {
    async fn new() -> Option<Self> {
        let url = service_url("IDEM_TEST_NATS_URL")?;
        let client = async_nats::connect(&url).await.unwrap();
        Some(Self { jetstream: async_nats::jetstream::new(client) })
    }

    fn stream_name(topic: &str) -> String {
        topic.replace('.', "_").to_uppercase()
    }
}

#[async_trait]
impl Broker for Nats {
    type Sub = idem_stream::nats::JetStreamSubscription;

    async fn topic(&self, case: &str) -> String {
        let topic = unique(case);
        let name = Self::stream_name(&topic);
        let _ = self.jetstream.delete_stream(&name).await;
        let config = async_nats::jetstream::stream::Config {
            name,
            subjects: vec![topic.clone()],
            ..Default::default()
        };
        self.jetstream.create_stream(config).await.unwrap();
        topic
    }

    async fn refused_topic(&self, case: &str) -> String {
        // No stream captures this subject: JetStream answers "no responders".
        format!("{}.nowhere", unique(case))
    }

    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(idem_stream::nats::JetStreamPublisher::new(self.jetstream.clone()))
    }

    async fn publish_without_id(&self, topic: &str, payload: &str) {
        let payload = Bytes::from(payload.to_owned());
        self.jetstream.publish(topic.to_owned(), payload).await.unwrap().await.unwrap();
    }

    async fn subscribe(&self, topic: &str) -> Self::Sub {
        let stream = self.jetstream.get_stream(Self::stream_name(topic)).await.unwrap();
        let ack_wait = self.redelivery_after();
        idem_stream::nats::JetStreamSubscription::durable(&stream, "group", ack_wait).await.unwrap()
    }

    fn redelivery_after(&self) -> Duration {
        Duration::from_secs(1)
    }
}

struct RedisStreams {
    client: redis::Client,
    connection: redis::aio::ConnectionManager,
}

impl RedisStreams {
    async fn new() -> Option<Self> {
        let url = service_url("IDEM_TEST_REDIS_URL")?;
        let client = redis::Client::open(url.as_str()).unwrap();
        let connection = client.get_connection_manager().await.unwrap();
        Some(Self { client, connection })
    }
}

#[async_trait]
impl Broker for RedisStreams {
    type Sub = idem_stream::redis_streams::RedisStreamsSubscription;

    async fn topic(&self, case: &str) -> String {
        let topic = unique(case);
        let _: () =
            redis::cmd("DEL").arg(&topic).query_async(&mut self.connection.clone()).await.unwrap();
        // The group exists before anything is published.
        self.subscribe(&topic).await;
        topic
    }

    async fn refused_topic(&self, case: &str) -> String {
        // A key holding a plain string: XADD on it fails with WRONGTYPE.
        let key = format!("{}.string", unique(case));
        let _: () = redis::cmd("SET")
            .arg(&key)
            .arg("not a stream")
            .query_async(&mut self.connection.clone())
            .await
            .unwrap();
        key
    }

    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(idem_stream::redis_streams::RedisStreamsPublisher::new(
            self.connection.clone(),
            10_000,
        ))
    }

    async fn publish_without_id(&self, topic: &str, payload: &str) {
        let _: String = redis::cmd("XADD")
            .arg(topic)
            .arg("*")
            .arg("payload")
            .arg(payload)
            .query_async(&mut self.connection.clone())
            .await
            .unwrap();
    }

    async fn subscribe(&self, topic: &str) -> Self::Sub {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let consumer =
            format!("consumer-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
        idem_stream::redis_streams::RedisStreamsSubscription::join(
            &self.client,
            topic,
            "group",
            &consumer,
            self.redelivery_after(),
        )
        .await
        .unwrap()
    }

    fn redelivery_after(&self) -> Duration {
        Duration::from_millis(500)
    }
}

struct Rabbit {
    url: String,
}

impl Rabbit {
    async fn new() -> Option<Self> {
        Some(Self { url: service_url("IDEM_TEST_AMQP_URL")? })
    }
}

#[async_trait]
impl Broker for Rabbit {
    type Sub = idem_stream::rabbitmq::RabbitSubscription;

    async fn topic(&self, case: &str) -> String {
        let topic = unique(case);
        common::fresh_rabbit_queue(&self.url, &topic).await;
        topic
    }

    async fn refused_topic(&self, case: &str) -> String {
        // No queue of that name: the default exchange cannot route the mandatory message.
        format!("{}.nowhere", unique(case))
    }

    async fn publisher(&self) -> Arc<dyn Publisher> {
        Arc::new(idem_stream::rabbitmq::RabbitPublisher::connect(&self.url, "").await.unwrap())
    }

    async fn publish_without_id(&self, topic: &str, payload: &str) {
        let connection = lapin::Connection::connect(&self.url, Default::default()).await.unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        channel
            .basic_publish(
                "".into(),
                topic.into(),
                Default::default(),
                payload.as_bytes(),
                Default::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        connection.close(200, "published".into()).await.unwrap();
    }

    async fn subscribe(&self, topic: &str) -> Self::Sub {
        idem_stream::rabbitmq::RabbitSubscription::consume(&self.url, topic, 32).await.unwrap()
    }

    fn redelivery_after(&self) -> Duration {
        // RabbitMQ returns a closed channel's unacknowledged messages at once.
        Duration::from_millis(300)
    }

    fn redelivers_unacked(&self) -> bool {
        false
    }
}

//! The NATS JetStream adapter's message decoding (`idem_stream::nats::received_from`): the
//! headers, the attempt from the `$JS.ACK` reply subject, and the message-id rule.
//!
//! Input: the subject and the reply subject as short fields (one length byte), a header
//! block in the NATS wire form (`NATS/1.0` then `Name: value` lines, CRLF-separated) as a long
//! field (two length bytes), then the payload. Header lines async-nats would refuse are
//! skipped. Checks that nothing panics and:
//! - subject and payload are unchanged; every header value is kept;
//! - the attempt is the reply subject's delivery count (at least 1), else 1;
//! - the id is the first `Nats-Msg-Id` value when there is one, else the content id of
//!   subject, headers and payload (`idem_stream::content_id`, prefix `sha256-`);
//! - the same message, decoded again into a fresh header map (as each redelivery is), reads
//!   as the same message: the same id (so the inbox sees a redelivery as one) and the same
//!   headers, in whatever order the map iterates them.
//!
//! A `jetstream::Message` needs a JetStream context, which `received_from` never uses: it is
//! made once from a client that is never driven (a current-thread runtime that is not run
//! after `connect` returns), so no connection is made.
#![no_main]

use std::str::FromStr;
use std::sync::LazyLock;

use async_nats::jetstream::{self, Context};
use async_nats::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use idem_fuzz::{Input, is_content_id};
use idem_stream::nats::received_from;
use libfuzzer_sys::fuzz_target;

static CONTEXT: LazyLock<(tokio::runtime::Runtime, Context)> = LazyLock::new(|| {
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
    // Inside the runtime, which the client's and the context's tasks are spawned on (and,
    // once `block_on` returns, never run).
    let context = runtime.block_on(async {
        let client = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect("127.0.0.1:1")
            .await
            .expect("a client that connects lazily");
        jetstream::new(client)
    });
    (runtime, context)
});

/// The header lines of a `NATS/1.0` block that async-nats accepts, in order.
fn header_lines(block: &str) -> Vec<(HeaderName, HeaderValue)> {
    block
        .split("\r\n")
        .skip(1)
        .filter_map(|line| {
            let (name, value) = line.split_once(':')?;
            Some((HeaderName::from_str(name).ok()?, HeaderValue::from_str(value.trim()).ok()?))
        })
        .collect()
}

fn message(
    subject: &str,
    reply: &str,
    lines: &[(HeaderName, HeaderValue)],
    payload: &Bytes,
) -> jetstream::Message {
    let headers = (!lines.is_empty()).then(|| {
        let mut headers = HeaderMap::new();
        for (name, value) in lines {
            headers.append(name.clone(), value.clone());
        }
        headers
    });
    jetstream::Message {
        message: async_nats::Message {
            subject: subject.into(),
            reply: (!reply.is_empty()).then(|| reply.into()),
            payload: payload.clone(),
            headers,
            status: None,
            description: None,
            length: payload.len(),
        },
        context: CONTEXT.1.clone(),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let subject = idem_fuzz::text(input.short());
    let reply = idem_fuzz::text(input.short());
    let lines = header_lines(&idem_fuzz::text(input.long()));
    let payload = Bytes::copy_from_slice(input.rest());

    let delivered = message(&subject, &reply, &lines, &payload);
    let received = received_from(&delivered);
    assert_eq!(received.subject, subject);
    assert_eq!(received.payload, payload);
    assert_eq!(received.position, None);
    assert_eq!(received.headers.len(), lines.len());
    let attempt = delivered.info().map_or(1, |info| info.delivered.max(1) as u64);
    assert_eq!(received.attempt, attempt);

    let msg_id = lines.iter().find(|(name, _)| name.to_string() == "Nats-Msg-Id");
    match msg_id {
        Some((_, value)) => assert_eq!(received.id, value.as_str()),
        None => {
            let expected =
                idem_stream::content_id("sha256-", &subject, &received.headers, &payload);
            assert_eq!(received.id, expected);
            assert!(is_content_id(&received.id, "sha256-"), "{}", received.id);
        }
    }

    let redelivered = received_from(&message(&subject, &reply, &lines, &payload));
    assert_eq!(
        received.id, redelivered.id,
        "a redelivery gets another id; headers {:?} then {:?}",
        received.headers, redelivered.headers
    );
    let sorted = |headers: &[(String, String)]| {
        let mut headers = headers.to_vec();
        headers.sort();
        headers
    };
    assert_eq!(sorted(&received.headers), sorted(&redelivered.headers));
    assert_eq!(received.attempt, redelivered.attempt);
});

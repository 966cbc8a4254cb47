//! The RabbitMQ adapter's delivery decoding (`RabbitSubscription::received`, reached through
//! `received_offline`): header tables, `x-delivery-count`, and the message-id rule.
//!
//! Input, in AMQP 0-9-1 encoding where it has one: a flags byte (bit 0: redelivered, bit 1: the
//! message has a `message-id`), the `message-id` and the routing key as short strings, the
//! headers as a field table (parsed by amq-protocol, as lapin parses a content header), then
//! the payload. Checks that nothing panics and:
//! - subject and payload are the routing key and body, unchanged;
//! - the headers are the table's text and integer entries, in table order, other than
//!   `x-delivery-count`, which sets the attempt (its count plus one; else 1, or 2 when
//!   redelivered), never below 1;
//! - the id is the `message-id` when set and not empty, else the content id of routing key,
//!   headers and payload (`idem_stream::content_id` with the `rabbitmq-sha256-` prefix).
#![no_main]

use amq_protocol_types::parsing::{parse_field_table, parse_short_string};
use amq_protocol_types::{AMQPValue, FieldTable};
use idem_fuzz::is_content_id;
use idem_stream::rabbitmq::RabbitSubscription;
use lapin::BasicProperties;
use lapin::message::Delivery;
use libfuzzer_sys::fuzz_target;

fn header_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(text) => Some(idem_fuzz::text(text.as_bytes())),
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        AMQPValue::LongLongInt(number) => Some(number.to_string()),
        AMQPValue::LongInt(number) => Some(number.to_string()),
        _ => None,
    }
}

fn check(delivery: &Delivery, table: &FieldTable, message_id: Option<&str>) {
    let received = RabbitSubscription::received_offline(delivery);
    assert_eq!(received.subject, delivery.routing_key.as_str());
    assert_eq!(received.payload, delivery.data);
    assert_eq!(received.position, None);

    let mut count = None;
    let mut headers = Vec::new();
    for (name, value) in table.inner() {
        let Some(text) = header_text(value) else { continue };
        if name.as_str() == "x-delivery-count" {
            count = text.parse::<u64>().ok();
        } else {
            headers.push((name.as_str().to_owned(), text));
        }
    }
    assert_eq!(received.headers, headers);
    let attempt = count.map_or(1 + u64::from(delivery.redelivered), |n| n.saturating_add(1));
    assert_eq!(received.attempt, attempt);
    assert!(received.attempt >= 1);

    match message_id.filter(|id| !id.is_empty()) {
        Some(id) => assert_eq!(received.id, id),
        None => {
            let expected = idem_stream::content_id(
                "rabbitmq-sha256-",
                &received.subject,
                &received.headers,
                &delivery.data,
            );
            assert_eq!(received.id, expected);
            assert!(is_content_id(&received.id, "rabbitmq-sha256-"), "{}", received.id);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Ok((rest, message_id)) = parse_short_string(rest) else { return };
    let Ok((rest, routing_key)) = parse_short_string(rest) else { return };
    let Ok((payload, table)) = parse_field_table(rest) else { return };

    let mut properties = BasicProperties::default().with_headers(table.clone());
    let message_id = (flags & 2 != 0).then_some(message_id);
    if let Some(id) = &message_id {
        properties = properties.with_message_id(id.clone());
    }
    let mut delivery = Delivery::mock(1, "".into(), routing_key, flags & 1 != 0, payload.to_vec());
    delivery.properties = properties;
    check(&delivery, &table, message_id.as_ref().map(|id| id.as_str()));
});

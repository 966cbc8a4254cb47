//! Shared by the broker tests.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use idem_stream::consume::{Received, Settle, Subscription};

/// Drops the ack of every 7th message on its first delivery: the broker redelivers it (after
/// its ack wait, or once another consumer claims it) although its handler committed.
pub struct DroppingAcks<S> {
    pub inner: S,
    pub dropped: Arc<Mutex<usize>>,
}

#[async_trait]
impl<S: Subscription + Sync> Subscription for DroppingAcks<S> {
    type Token = (bool, S::Token);

    async fn fetch(
        &mut self,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<(Received, Self::Token)>, String> {
        let batch = self.inner.fetch(max, wait).await?;
        Ok(batch
            .into_iter()
            .map(|(message, token)| {
                let drop_ack =
                    message.attempt == 1 && message.id.bytes().map(u64::from).sum::<u64>() % 7 == 0;
                (message, (drop_ack, token))
            })
            .collect())
    }

    async fn settle(&self, (drop_ack, token): Self::Token, settle: Settle) -> Result<(), String> {
        if drop_ack && settle == Settle::Ack {
            *self.dropped.lock().unwrap() += 1;
            return Ok(());
        }
        self.inner.settle(token, settle).await
    }
}

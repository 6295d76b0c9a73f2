//! A tenant's results as one long-lived reader reads them, read after read from where the
//! last ended (the event streams' shared reader of the tenant): an ordered pull consumer
//! on the tenant's results stream, which JetStream pushes batches through, instead of a
//! direct get per result (one request and answer each: about 4,500 results a second at
//! most, less than a busy tenant makes).
//!
//! A tenant's results stream holds its results only (see [`super::bus`]), so every stream
//! sequence is one of its results: a sequence skipped is one retention (or a purge)
//! deleted, which a read reports as `lost` as [`crate::bus::Bus::read_results`] does.

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{stream, Message};
use futures_util::{FutureExt, StreamExt};

use crate::bus::{BusError, FeedRead};

pub(super) struct Follower {
    /// The position the next read starts at: after the last message delivered (its stream
    /// sequence + 1), or where it started.
    pub next: u64,
    messages: pull::Ordered,
    /// A message taken but not yet given: the first after a gap, kept for the read that
    /// reports the gap.
    held: Option<Message>,
}

fn failed(e: impl std::fmt::Display) -> BusError {
    BusError::Unavailable(format!("cannot follow the results stream: {e}"))
}

impl Follower {
    /// A follower of `stream` (on `filter`) from position `from` (a real one: the caller
    /// has read there directly, which reported what was lost before it).
    pub async fn start(stream: &stream::Stream, filter: &str, from: u64) -> Result<Self, BusError> {
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: filter.to_string(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(failed)?;
        Ok(Follower {
            next: from,
            messages: consumer.messages().await.map_err(failed)?,
            held: None,
        })
    }

    /// What follows, at most `max`: what is there now, or the first to come within `wait`
    /// and what came with it. An error ends the follower (read directly again).
    pub async fn read<T>(
        &mut self,
        max: usize,
        wait: std::time::Duration,
        parse: impl Fn(u64, &[u8]) -> Option<T>,
    ) -> Result<FeedRead<T>, BusError> {
        let mut read = FeedRead::at(self.next);
        let mut msg = match self.held.take() {
            Some(m) => m,
            None => match tokio::time::timeout(wait, self.messages.next()).await {
                Err(_) => return Ok(read),
                Ok(None) => return Err(failed("the consumer ended")),
                Ok(Some(m)) => m.map_err(failed)?,
            },
        };
        loop {
            let seq = msg.info().map_err(failed)?.stream_sequence;
            if seq + 1 > read.next {
                if read.next > 0 && seq > read.next {
                    if !read.items.is_empty() || read.lost {
                        // A gap after what this read has: the next read reports it.
                        self.held = Some(msg);
                        break;
                    }
                    read.lost = true;
                    read.resumed = Some(seq);
                }
                read.next = seq + 1;
                if let Some(item) = parse(seq, &msg.payload) {
                    read.items.push((read.next, item));
                }
            }
            if read.items.len() >= max {
                break;
            }
            // What came with it: already here, no waiting.
            msg = match self.messages.next().now_or_never() {
                Some(Some(m)) => m.map_err(failed)?,
                Some(None) => return Err(failed("the consumer ended")),
                None => break,
            };
        }
        self.next = read.next;
        Ok(read)
    }
}

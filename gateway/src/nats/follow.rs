//! A tenant's results as one long-lived reader reads them, read after read from where the
//! last ended (the event streams' shared reader of the tenant): an ordered pull consumer
//! on the tenant's results stream, which JetStream pushes batches through, instead of a
//! direct get per result (one request and answer each: about 4,500 results a second at
//! most, less than a busy tenant makes).
//!
//! Positions are those of [`crate::bus::Bus::read_results`] on NATS (a stream sequence + 1).
//! A sequence skipped before the stream's first one now is one retention deleted, which a
//! read reports as `lost`, as a direct read does. What the ordered consumer does not say,
//! the follower checks: a message from before its place (the consumer made again from the
//! start, or the stream made again) and, after a wait that found nothing, a stream made
//! again or shorter than its place end it, and the caller reads directly again (which
//! tells a reader what happened).

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{stream, Message};
use futures_util::{FutureExt, StreamExt};

use crate::bus::{BusError, FeedRead};

/// How long a read that has items waits for more the server says are on their way (so a
/// reader that lags reads full batches, and knows it lags).
const FILL_WAIT: Duration = Duration::from_millis(50);

pub(super) struct Follower {
    /// The position the next read starts at: after the last message delivered (its stream
    /// sequence + 1), or where it started.
    pub next: u64,
    /// When it was last read (followers nobody reads are dropped).
    pub used: tokio::time::Instant,
    stream: stream::Stream,
    /// Its stream as it started (its `created`: one made again under the same name is
    /// another stream).
    made: stream::Info,
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
            used: tokio::time::Instant::now(),
            stream: stream.clone(),
            made: stream.cached_info().clone(),
            messages: consumer.messages().await.map_err(failed)?,
            held: None,
        })
    }

    /// The next message already here, or (`fill`: more are on their way) within
    /// [`FILL_WAIT`]; `None` when there is none.
    async fn more(&mut self, fill: bool) -> Result<Option<Message>, BusError> {
        // (Unconstrained: taking what is buffered is not held to the task's budget.)
        let now = tokio::task::unconstrained(self.messages.next()).now_or_never();
        let got = match now {
            Some(m) => m,
            None if fill => match tokio::time::timeout(FILL_WAIT, self.messages.next()).await {
                Ok(m) => m,
                Err(_) => return Ok(None),
            },
            None => return Ok(None),
        };
        match got {
            Some(m) => m.map(Some).map_err(failed),
            None => Err(failed("the consumer ended")),
        }
    }

    /// What follows, at most `max`: what is there now, or the first to come within `wait`
    /// and what came with it. An error ends the follower (read directly again).
    pub async fn read<T>(
        &mut self,
        max: usize,
        wait: Duration,
        parse: impl Fn(u64, &[u8]) -> Option<T>,
    ) -> Result<FeedRead<T>, BusError> {
        self.used = tokio::time::Instant::now();
        let mut read = FeedRead::at(self.next);
        let mut msg = match self.held.take() {
            Some(m) => m,
            None => match tokio::time::timeout(wait, self.messages.next()).await {
                Err(_) => {
                    self.same_stream().await?;
                    return Ok(read);
                }
                Ok(None) => return Err(failed("the consumer ended")),
                Ok(Some(m)) => m.map_err(failed)?,
            },
        };
        loop {
            let info = msg.info().map_err(failed)?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if read.next > 0 && seq < read.next {
                // Before its place: the consumer was made again from elsewhere.
                return Err(failed(format!(
                    "message {seq} came again after {}",
                    read.next
                )));
            }
            if read.next > 0 && seq > read.next {
                if !read.items.is_empty() || read.lost {
                    // A gap after what this read has: the next read looks at it.
                    self.held = Some(msg);
                    break;
                }
                let first = self.first_sequence().await?;
                if read.next < first {
                    read.lost = true;
                    read.resumed = Some(seq);
                }
            }
            read.next = seq + 1;
            if let Some(item) = parse(seq, &msg.payload) {
                read.items.push((read.next, item));
            }
            if read.items.len() >= max {
                break;
            }
            msg = match self.more(pending > 0).await? {
                Some(m) => m,
                None => break,
            };
        }
        self.next = read.next;
        Ok(read)
    }

    /// The stream's first sequence now.
    async fn first_sequence(&mut self) -> Result<u64, BusError> {
        let info = self.stream.info().await.map_err(failed)?;
        Ok(info.state.first_sequence)
    }

    /// An error if the stream is not the one it started on, or no longer reaches its
    /// place (made again, or purged: a direct read says which).
    async fn same_stream(&mut self) -> Result<(), BusError> {
        let info = self.stream.info().await.map_err(failed)?;
        if info.created != self.made.created || info.state.last_sequence + 1 < self.next {
            return Err(failed("the stream was made again"));
        }
        Ok(())
    }
}

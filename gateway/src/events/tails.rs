//! One reader of each tenant's feed per gateway, shared by every event stream that has
//! caught up with it: a stream at the end of a feed is served from memory, and only a
//! stream that is behind (resuming from an old id) reads the bus itself until it catches
//! up. Without this, every client repeats every read (on NATS, a request per message per
//! client), and a hundred clients of a busy tenant cost a hundred times the bus's work.
//!
//! A [`Tail`] is a window of the feed's newest items, each with the position just after
//! it, between `start` and `end` (positions the bus gave: an item's, or a read's `next`).
//! Its reader task reads on from `end` and wakes the waiting streams; it keeps at most
//! [`WINDOW`] items and stops when no stream has asked for [`IDLE`]. A stream whose place
//! is inside the window gets what follows it; one before the window (or a window reset by
//! a jump over deleted data) reads the bus as before, which also says what was lost.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_sys::lock;
use tokio::sync::watch;

use crate::bus::{Bus, BusError, FeedRead};

/// Items a window keeps at most: a few seconds of a busy tenant's results.
const WINDOW: usize = 32_768;
/// Bytes a window keeps at most (by [`Weigh`]): results carry outputs of up to a few KiB.
const WINDOW_BYTES: usize = 16 << 20;
/// How often an idle reader looks again at most, when the bus must be looked at
/// ([`Bus::poll_every`] is the least).
const IDLE_POLL: Duration = Duration::from_millis(100);
/// A window no stream asked of for this long is dropped (its task ends).
const IDLE: Duration = Duration::from_secs(60);
/// Items the reader takes from the bus at a time, and how long one read waits.
pub(super) const READ: usize = 4096;
pub(super) const READ_WAIT: Duration = Duration::from_secs(5);

/// A feed of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Which {
    Results,
    Presence,
    Alerts,
}

/// An item of a feed as the window keeps it: what streams filter on, and what they send.
pub type Shared<T> = Arc<T>;

/// About how many bytes an item takes.
pub trait Weigh {
    fn weight(&self) -> usize;
}

struct Window<T> {
    start: u64,
    end: u64,
    items: VecDeque<(u64, Shared<T>)>,
    bytes: usize,
    /// When a stream last asked.
    asked: tokio::time::Instant,
    /// Its reader ended: streams read the bus (and make a new window).
    closed: bool,
    /// The reader's last read reached the end of the feed (fewer items than it asked).
    caught_up: bool,
}

/// One tenant's feed: its window and the signal that it moved.
pub struct Tail<T> {
    window: Mutex<Window<T>>,
    moved: watch::Sender<u64>,
}

impl<T> Tail<T> {
    /// What follows `from`, at most `max`, if `from` is within the window (`None`: it is
    /// before it, or the window is gone: read the bus).
    fn after(&self, from: u64, max: usize) -> Option<FeedRead<Shared<T>>> {
        let mut w = lock(&self.window);
        w.asked = tokio::time::Instant::now();
        if w.closed || from < w.start {
            return None;
        }
        if from > w.end {
            // Ahead of a window that lags (a client that started from the feed's end a
            // moment ago): it waits for the window. Ahead of one at the end, something
            // else is going on (the bus made again): the bus tells.
            return (!w.caught_up).then(|| FeedRead::at(from));
        }
        // The first item that ends after `from` (items are in position order).
        let first = w.items.partition_point(|(at, _)| *at <= from);
        let items: Vec<(u64, Shared<T>)> = w
            .items
            .iter()
            .skip(first)
            .take(max)
            .map(|(at, item)| (*at, item.clone()))
            .collect();
        let next = match items.last() {
            Some((at, _)) if items.len() == max => *at,
            _ => w.end,
        };
        Some(FeedRead {
            items,
            next,
            lost: false,
            resumed: None,
        })
    }
}

/// Every tail of this gateway, by tenant and feed.
pub struct Tails<T> {
    which: Which,
    tails: Arc<Mutex<HashMap<String, Arc<Tail<T>>>>>,
}

/// How a window's reader reads its feed from the bus, and makes the items it keeps.
/// (The last argument: whether to wait for something new, up to [`READ_WAIT`].)
pub type ReadFn<T> = Arc<
    dyn Fn(
            Arc<dyn Bus>,
            String,
            u64,
            bool,
        )
            -> futures_util::future::BoxFuture<'static, Result<FeedRead<Shared<T>>, BusError>>
        + Send
        + Sync,
>;

impl<T: Weigh + Send + Sync + 'static> Tails<T> {
    pub fn new(which: Which) -> Tails<T> {
        Tails {
            which,
            tails: Arc::default(),
        }
    }

    /// What follows `from` in `tenant`'s feed, from the shared window when `from` is in
    /// it, waiting up to `wait` when nothing does yet; `None` when `from` is before the
    /// window (the caller reads the bus). The window (and its reader) is made on first
    /// use, from the feed's end `end_now` (the bus's `ends` for it).
    pub async fn read(
        &self,
        bus: &Arc<dyn Bus>,
        read: &ReadFn<T>,
        (tenant, key): (&str, &str),
        (from, max, wait): (u64, usize, Duration),
        end_now: impl std::future::Future<Output = Result<u64, BusError>>,
    ) -> Result<Option<FeedRead<Shared<T>>>, BusError> {
        let tail = match self.get(key) {
            Some(t) => t,
            None => {
                let end = end_now.await?;
                self.start(bus.clone(), read.clone(), (tenant, key), end)
            }
        };
        let mut moved = tail.moved.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Some(got) = tail.after(from, max) else {
                return Ok(None);
            };
            if !got.items.is_empty() || got.next != from {
                return Ok(Some(got));
            }
            // At the end: wait for the reader to move it.
            match tokio::time::timeout_at(deadline, moved.changed()).await {
                Ok(Ok(())) => continue,
                // (The sender lives with the tail: not while it is in use.)
                Ok(Err(_)) => return Ok(tail.after(from, max)),
                Err(_) => return Ok(Some(got)),
            }
        }
    }

    fn get(&self, tenant: &str) -> Option<Arc<Tail<T>>> {
        lock(&self.tails).get(tenant).cloned()
    }

    /// A window (under `key`) of `tenant`'s feed from `end`, and its reader.
    fn start(
        &self,
        bus: Arc<dyn Bus>,
        read: ReadFn<T>,
        (tenant, key): (&str, &str),
        end: u64,
    ) -> Arc<Tail<T>> {
        let mut tails = lock(&self.tails);
        if let Some(t) = tails.get(key) {
            return t.clone();
        }
        let tail = Arc::new(Tail {
            window: Mutex::new(Window {
                start: end,
                end,
                items: VecDeque::new(),
                bytes: 0,
                asked: tokio::time::Instant::now(),
                closed: false,
                caught_up: true,
            }),
            moved: watch::Sender::new(0),
        });
        tails.insert(key.to_string(), tail.clone());
        let (me, tenant, key) = (tail.clone(), tenant.to_string(), key.to_string());
        let (which, all) = (self.which, self.tails.clone());
        tokio::spawn(async move {
            follow(me.clone(), bus.clone(), read, &tenant, which).await;
            if which == Which::Results {
                bus.stop_following(&tenant);
            }
            // Closed and forgotten together: a stream that still holds it reads the bus
            // once, then finds no window and makes a new one.
            let mut tails = lock(&all);
            lock(&me.window).closed = true;
            if tails.get(&key).is_some_and(|t| Arc::ptr_eq(t, &me)) {
                tails.remove(&key);
            }
            drop(tails);
            me.moved.send_modify(|n| *n += 1);
        });
        tail
    }
}

/// A window's reader: read on from its end until no stream asked for [`IDLE`].
async fn follow<T: Weigh + Send + Sync + 'static>(
    tail: Arc<Tail<T>>,
    bus: Arc<dyn Bus>,
    read: ReadFn<T>,
    tenant: &str,
    which: Which,
) {
    // On a bus that must be looked at, the pause between looks: the least while items come,
    // doubling to IDLE_POLL while none do.
    let mut pause = bus.poll_every();
    loop {
        let (end, idle) = {
            let w = lock(&tail.window);
            (w.end, w.asked.elapsed() >= IDLE)
        };
        if idle {
            break;
        }
        // Woken by the write itself (embedded bus), or looking again often (NATS).
        let poll = bus.poll_every();
        let reading = read(bus.clone(), tenant.to_string(), end, poll.is_none());
        let got = match tokio::time::timeout(READ_WAIT * 2, reading).await {
            Ok(Ok(got)) => got,
            Ok(Err(e)) => {
                tracing::warn!(%tenant, feed = ?which, error = %e, "the shared reader of an event feed cannot read the bus; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => continue,
        };
        let moved = {
            let mut w = lock(&tail.window);
            if got.lost {
                // The bus jumped over deleted data: the window starts again where it went
                // on (streams before it read the bus, which tells them).
                w.items.clear();
                w.bytes = 0;
                let at = got.resumed.unwrap_or(got.next);
                w.start = at;
                w.end = at;
            }
            w.caught_up = got.items.len() < READ;
            let came = !got.items.is_empty();
            for (at, item) in got.items {
                w.bytes += item.weight();
                w.items.push_back((at, item));
                w.end = at;
            }
            // (An end moved only past other tenants' events wakes nobody: the streams
            // waiting at the end take it when their wait runs out.)
            w.end = w.end.max(got.next);
            while w.items.len() > WINDOW || w.bytes > WINDOW_BYTES {
                let Some((at, item)) = w.items.pop_front() else {
                    break;
                };
                w.bytes = w.bytes.saturating_sub(item.weight());
                w.start = at;
            }
            came || got.lost
        };
        if moved {
            pause = poll;
            tail.moved.send_modify(|n| *n += 1);
        } else if let (Some(least), Some(p)) = (poll, pause) {
            tokio::time::sleep(p).await;
            pause = Some((p * 2).clamp(least, IDLE_POLL.max(least)));
        }
    }
}

/// The three feeds' windows of a gateway.
pub struct AllTails {
    pub results: Tails<super::ResultItem>,
    pub presence: Tails<super::PresenceItem>,
    pub alerts: Tails<serde_json::Value>,
}

impl Default for AllTails {
    fn default() -> AllTails {
        AllTails {
            results: Tails::new(Which::Results),
            presence: Tails::new(Which::Presence),
            alerts: Tails::new(Which::Alerts),
        }
    }
}

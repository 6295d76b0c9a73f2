//! A write deadline for a connection: a write (or flush, or shutdown) that has made no
//! progress for the deadline fails with `TimedOut`, and the connection ends with it.
//!
//! It sits under TLS, on the TCP stream, so "progress" means the peer took bytes off the
//! socket. The clock runs only while a write is pending: an idle connection (an agent's
//! websocket between heartbeats) is never cut by it, and a slow reader that keeps taking
//! data is not either. What it stops is a client that asks for a large body (a release
//! file) and never reads it, which would otherwise hold the connection, its file and its
//! buffers for as long as it likes.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Called once, when the deadline first fails a write (to count it).
pub type OnExpire = Box<dyn FnOnce() + Send>;

pub struct WriteDeadline<S> {
    inner: S,
    /// `None`: no deadline.
    limit: Option<Duration>,
    /// Made at the first stall and reused; boxed because `Sleep` is not `Unpin`.
    timer: Option<Pin<Box<Sleep>>>,
    /// Whether `timer` runs for the write pending now.
    armed: bool,
    on_expire: Option<OnExpire>,
}

impl<S> WriteDeadline<S> {
    pub fn new(inner: S, limit: Option<Duration>, on_expire: Option<OnExpire>) -> Self {
        WriteDeadline {
            inner,
            limit,
            timer: None,
            armed: false,
            on_expire,
        }
    }

    /// The inner write returned `Pending`: start the clock if it is not running, and fail
    /// once it has run out. Returns `Pending` otherwise (the timer holds `cx`'s waker).
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(limit) = self.limit else {
            return Poll::Pending;
        };
        if !self.armed {
            let at = Instant::now() + limit;
            match &mut self.timer {
                Some(t) => t.as_mut().reset(at),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.armed = true;
        }
        let timer = self.timer.as_mut().expect("armed above");
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if let Some(f) = self.on_expire.take() {
            f();
        }
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the peer took no data for {}s (write deadline)",
                limit.as_secs_f32()
            ),
        ))
    }

    /// What the inner write answered, with the deadline applied.
    fn checked<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.stalled(cx).map(Err),
            ready => {
                self.armed = false;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.checked(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.checked(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.checked(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.checked(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const LIMIT: Duration = Duration::from_secs(30);

    /// A writer over a pipe that holds `buffer` bytes, and the pipe's other end; the count
    /// goes up when the deadline fires.
    fn pipe(
        buffer: usize,
        limit: Option<Duration>,
    ) -> (
        WriteDeadline<tokio::io::DuplexStream>,
        tokio::io::DuplexStream,
        Arc<AtomicU32>,
    ) {
        let (ours, theirs) = tokio::io::duplex(buffer);
        let fired = Arc::new(AtomicU32::new(0));
        let f = fired.clone();
        let on_expire: OnExpire = Box::new(move || {
            f.fetch_add(1, Ordering::SeqCst);
        });
        (
            WriteDeadline::new(ours, limit, Some(on_expire)),
            theirs,
            fired,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_peer_never_takes_fails_at_the_deadline() {
        let (mut w, _peer, fired) = pipe(64, Some(LIMIT));
        w.write_all(&[1; 64]).await.unwrap();
        let start = Instant::now();
        let err = w.write_all(&[2; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed(), LIMIT);
        assert_eq!(fired.load(Ordering::SeqCst), 1);
        // Still stuck: later writes fail at once, counted once.
        let start = Instant::now();
        assert!(w.write_all(&[3; 64]).await.is_err());
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(fired.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_taking_data_is_not_cut() {
        let (mut w, mut peer, fired) = pipe(64, Some(LIMIT));
        // The peer takes 32 bytes every 20 s: never 30 s without progress.
        let reader = tokio::spawn(async move {
            let mut got = 0;
            let mut buf = [0u8; 32];
            while got < 64 * 10 {
                tokio::time::sleep(Duration::from_secs(20)).await;
                got += peer.read(&mut buf).await.unwrap();
            }
            got
        });
        let start = Instant::now();
        for _ in 0..10 {
            w.write_all(&[7; 64]).await.unwrap();
        }
        assert!(start.elapsed() > LIMIT * 5, "{:?}", start.elapsed());
        assert_eq!(reader.await.unwrap(), 640);
        assert_eq!(fired.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_never_cut() {
        let (mut w, mut peer, fired) = pipe(64, Some(LIMIT));
        w.write_all(b"welcome").await.unwrap();
        // An hour with nothing to send, and with the peer silent too.
        let mut buf = [0u8; 7];
        peer.read_exact(&mut buf).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3600)).await;
        w.write_all(b"ping").await.unwrap();
        w.flush().await.unwrap();
        let mut buf = [0u8; 4];
        peer.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        assert_eq!(fired.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn each_stall_gets_the_whole_deadline() {
        let (mut w, mut peer, fired) = pipe(64, Some(LIMIT));
        w.write_all(&[1; 64]).await.unwrap();
        // Stalled for 25 s, then the peer reads: the next stall starts a new clock.
        let drain = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(25)).await;
            let mut buf = [0u8; 64];
            peer.read_exact(&mut buf).await.unwrap();
            peer
        });
        let start = Instant::now();
        w.write_all(&[2; 64]).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(25));
        let _peer = drain.await.unwrap();
        let start = Instant::now();
        assert!(w.write_all(&[3; 64]).await.is_err());
        assert_eq!(start.elapsed(), LIMIT);
        assert_eq!(fired.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_a_stalled_write_waits() {
        let (mut w, _peer, fired) = pipe(64, None);
        w.write_all(&[1; 64]).await.unwrap();
        let stuck = tokio::time::timeout(Duration::from_secs(86_400), w.write_all(&[2; 1])).await;
        assert!(stuck.is_err(), "still pending after a day");
        assert_eq!(fired.load(Ordering::SeqCst), 0);
    }
}

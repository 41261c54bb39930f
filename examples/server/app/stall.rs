//! A write deadline for a connection: hyper has none, so a client that sends requests and
//! never reads the answers would hold its connection (one of [`super::App::max_connections`])
//! for as long as it likes, key or no key. With a floor on the rate it must read at once it
//! is behind: else a client taking a few bytes per deadline would hold it just as long.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The least a client that is behind (the server's writes wait for it to read) must take,
/// in bytes a second, averaged over each write deadline: 10 KiB per deadline of `main.rs`.
/// Far below any real link; what it stops is a client holding its connection by reading a
/// few bytes at a time.
pub const MIN_DRAIN_RATE: u64 = 1024;

/// `S` whose writes (and flushes, and shutdown) fail with `TimedOut`, which ends the
/// connection, once they have waited for the client for `limit` without the client taking
/// `limit × min_rate` bytes meanwhile. Taking that much starts the wait again: a client
/// that reads slowly but steadily at `min_rate` or more is not cut off, one that reads less
/// is. Writes that do not wait are not timed. Reads pass through untouched.
pub struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Bytes the client must take within `limit` of a write starting to wait.
    min_bytes: u64,
    /// Armed while writes wait: when it fires.
    stalled: Pin<Box<Sleep>>,
    armed: bool,
    /// Bytes written since it was armed.
    taken: u64,
}

impl<S> WriteDeadline<S> {
    /// `inner` with writes that may wait at most `limit` for the peer to take
    /// `limit × min_rate` bytes (`min_rate` in bytes a second, e.g. [`MIN_DRAIN_RATE`]).
    pub fn new(inner: S, limit: Duration, min_rate: u64) -> WriteDeadline<S> {
        let min_bytes = (limit.as_secs_f64() * min_rate as f64).ceil() as u64;
        WriteDeadline {
            inner,
            limit,
            min_bytes: min_bytes.max(1),
            stalled: Box::pin(tokio::time::sleep(limit)),
            armed: false,
            taken: 0,
        }
    }

    /// What a write, flush or shutdown that returned `poll`, having written `written` bytes
    /// if it is ready, means, given how long writes have waited and how much the client
    /// took meanwhile.
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
        written: impl FnOnce(&T) -> Option<usize>,
    ) -> Poll<io::Result<T>> {
        if let Poll::Ready(result) = &poll {
            match result.as_ref().ok().map(written) {
                // A flush or shutdown done: nothing waits for the client any more.
                Some(None) => self.armed = false,
                Some(Some(n)) if self.armed => {
                    self.taken = self.taken.saturating_add(n as u64);
                    // Enough progress: the next wait is timed afresh.
                    if self.taken >= self.min_bytes {
                        self.armed = false;
                    }
                }
                _ => {}
            }
            return poll;
        }
        if !self.armed {
            self.armed = true;
            self.taken = 0;
            self.stalled.as_mut().reset(Instant::now() + self.limit);
        }
        match self.stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client took {} bytes within the write deadline, fewer than the {} \
                     it must",
                    self.taken, self.min_bytes
                ),
            ))),
            Poll::Pending => Poll::Pending,
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
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.deadline(cx, poll, |&n| Some(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.deadline(cx, poll, |&n| Some(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.deadline(cx, poll, |()| None)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.deadline(cx, poll, |()| None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    /// The deadline of these tests, and a floor of 1,000 bytes per deadline.
    const LIMIT: Duration = Duration::from_millis(500);
    const RATE: u64 = 2_000;

    /// Writes `len` bytes through a 64-byte pipe whose far end `read` drains; how the write
    /// ended, on the paused clock (timers fire as soon as every task waits).
    async fn write_through<F>(len: usize, read: impl FnOnce(DuplexStream) -> F) -> io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let (near, far) = tokio::io::duplex(64);
        let reader = tokio::spawn(read(far));
        let mut writer = WriteDeadline::new(near, LIMIT, RATE);
        let written = async {
            writer.write_all(&vec![b'x'; len]).await?;
            writer.flush().await
        }
        .await;
        drop(writer);
        reader.abort();
        written
    }

    /// 16 bytes every 50 ms, 320 bytes a second: progress every 50 ms, so a deadline that
    /// each byte restarts never fired, though it took the client a minute to take 20 KiB.
    #[tokio::test(start_paused = true)]
    async fn a_client_reading_steadily_below_the_floor_is_cut_off() {
        let started = Instant::now();
        let written = write_through(20 << 10, |mut far| async move {
            let mut buf = [0u8; 16];
            while far.read(&mut buf).await.is_ok_and(|n| n > 0) {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        let e = written.expect_err("cut off");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("fewer than the 1000"), "{e}");
        let took = started.elapsed();
        assert!(took <= LIMIT + Duration::from_millis(100), "{took:?}");
    }

    /// 64 bytes every 20 ms, 3,200 bytes a second, is above the floor: the whole write goes
    /// through, however long it takes; so does one to a client that reads as fast as it can.
    #[tokio::test(start_paused = true)]
    async fn a_client_reading_at_the_floor_or_faster_is_served() {
        let started = Instant::now();
        let written = write_through(20 << 10, |mut far| async move {
            let mut buf = [0u8; 64];
            while far.read(&mut buf).await.is_ok_and(|n| n > 0) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        written.expect("served");
        assert!(
            started.elapsed() >= Duration::from_secs(6),
            "paced by the reader"
        );
        let written = write_through(1 << 20, |mut far| async move {
            let mut buf = [0u8; 4096];
            while far.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        written.expect("served");
    }

    /// A client that reads nothing is cut off at the deadline, as before.
    #[tokio::test(start_paused = true)]
    async fn a_client_reading_nothing_is_cut_off_at_the_deadline() {
        let started = Instant::now();
        let e = write_through(1 << 10, |far| async move {
            let _open = far;
            std::future::pending::<()>().await
        })
        .await
        .expect_err("cut off");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let took = started.elapsed();
        assert!(
            took >= LIMIT && took <= LIMIT + Duration::from_millis(100),
            "{took:?}"
        );
    }

    /// A wait that ended with everything written and flushed, the client having taken less
    /// than the floor, does not count against the next one, however much later: an idle
    /// keep-alive connection is not cut off at its next response.
    #[tokio::test(start_paused = true)]
    async fn a_wait_that_ended_does_not_count_against_the_next() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut writer = WriteDeadline::new(near, LIMIT, RATE);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            far.read_exact(&mut buf).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2_200)).await;
            let mut rest = Vec::new();
            far.read_to_end(&mut rest).await.unwrap();
            16 + rest.len()
        });
        // 80 bytes into 64: the write waits until the reader takes 16.
        writer.write_all(&[b'y'; 80]).await.unwrap();
        writer.flush().await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The pipe is full: this waits 200 ms, within a deadline started now.
        writer.write_all(&[b'z'; 16]).await.unwrap();
        writer.shutdown().await.unwrap();
        drop(writer);
        assert_eq!(reader.await.unwrap(), 96);
    }
}

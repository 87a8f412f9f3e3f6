//! The accept loop: every connection the engine holds is bounded in number and in time.
//!
//! `axum::serve` keeps a connection for as long as the peer likes and accepts as many as the
//! process has file descriptors, so idle or trickling peers could starve real webhooks and
//! `/healthz` (issue: ~20k idle sockets exhausted the descriptors). Here:
//!
//! - at most [`ConnLimits::max_connections`] connections are open at once (clamped below the
//!   descriptor limit, which is raised to its hard maximum at start); past it a new connection
//!   is closed at once, counted in `switchyard_connections_refused_total`;
//! - a new connection must send its first bytes within `header_timeout`, and a request's head
//!   must be complete within `header_timeout` of its first byte (hyper's header timer);
//! - a connection on which nothing is read or written for `idle_timeout` is closed;
//! - request bodies have their own time and byte bounds, in the handler ([`super::body`]).
//!
//! Shutdown stops accepting, lets requests in progress finish, and closes idle connections.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

/// Bounds on what HTTP peers may hold.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// Time for a request's head (request line and headers) to arrive.
    pub header_timeout: Duration,
    /// Time for a request's whole body to arrive once its head is in.
    pub body_timeout: Duration,
    /// A connection with no bytes read or written for this long is closed.
    pub idle_timeout: Duration,
    /// Most request-body bytes held in memory at once, over all connections.
    pub max_body_bytes_in_flight: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 10_000,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_body_bytes_in_flight: 64 << 20,
        }
    }
}

/// Raises the soft descriptor limit to the hard one and returns how many connections fit
/// under it, keeping room for the engine's own files and outgoing connections.
fn connection_budget(wanted: usize) -> usize {
    const RESERVED: u64 = 512;
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            let fit = limit.saturating_sub(RESERVED).max(64);
            let n = wanted.min(usize::try_from(fit).unwrap_or(usize::MAX));
            if n < wanted {
                tracing::warn!(
                    wanted,
                    allowed = n,
                    nofile = limit,
                    "the file-descriptor limit caps open connections below --max-connections"
                );
            }
            n
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the file-descriptor limit; keeping --max-connections as given");
            wanted
        }
    }
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves, then waits up to
/// `grace` for requests in progress.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    limits: &ConnLimits,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let budget = connection_budget(limits.max_connections);
    let slots = Arc::new(Semaphore::new(budget));
    let refused = metrics::counter!("switchyard_connections_refused_total");
    let open = metrics::gauge!("switchyard_connections_open");
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64)
        .max_header_list_size(64 * 1024);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let idle = limits.idle_timeout;
    tokio::pin!(shutdown);
    loop {
        let (stream, _peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: not fatal.
                    tracing::warn!(error = %e, "accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refused.increment(1);
            drop(stream);
            continue;
        };

        // No TCP_NODELAY: hyper writes each response in one go (bench/PROFILE.md).
        let io = TokioIo::new(IdleIo::new(stream, idle, limits.header_timeout));
        let svc = TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection_with_upgrades(io, svc).into_owned();
        let conn = graceful.watch(conn);
        let open = open.clone();
        open.increment(1.0);
        tokio::spawn(async move {
            // Errors here are the peer's (reset, timed out, malformed): nothing to report.
            let _ = conn.await;
            open.decrement(1.0);
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; closing them");
    }
}

/// A stream that fails with `TimedOut` once it has made no progress, reading or writing,
/// for `idle`. Progress only records the time; the one timer is armed when an operation first
/// has to wait and, when it fires, is moved to `idle` after the last progress if there was
/// some meanwhile. So a busy connection is never cut, and a request costs no timer updates
/// (re-arming a timer on every wait was a measurable share of the instructions per event).
///
/// Until the peer has sent its first bytes the allowance is the (shorter) header timeout:
/// hyper's header timer starts with the first byte of a request, so a connection that sends
/// nothing at all would otherwise be held for the whole idle timeout.
struct IdleIo<T> {
    inner: T,
    idle: Duration,
    /// The allowance once the first bytes have arrived.
    then: Duration,
    timer: Pin<Box<Sleep>>,
    armed: bool,
    last: Instant,
}

impl<T> IdleIo<T> {
    fn new(inner: T, idle: Duration, first_bytes: Duration) -> Self {
        let first = first_bytes.min(idle);
        IdleIo {
            inner,
            idle: first,
            then: idle,
            timer: Box::pin(tokio::time::sleep(first)),
            armed: false,
            last: Instant::now(),
        }
    }

    /// Called when an operation is pending: arms the clock if it is not running, and says
    /// whether the connection has been idle for too long.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.armed {
            self.timer.as_mut().reset(self.last + self.idle);
            self.armed = true;
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let deadline = self.last + self.idle;
            if Instant::now() >= deadline {
                return true;
            }
            // There was progress since the timer was set: wait for the rest.
            self.timer.as_mut().reset(deadline);
        }
        false
    }

    fn progress<R>(&mut self, r: Poll<R>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match r {
            Poll::Ready(v) => {
                self.last = Instant::now();
                self.idle = self.then;
                Poll::Ready(Ok(v))
            }
            Poll::Pending if self.expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn flatten<T>(p: Poll<io::Result<io::Result<T>>>) -> Poll<io::Result<T>> {
    p.map(|r| r.and_then(|x| x))
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        flatten(this.progress(r, cx))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        flatten(this.progress(r, cx))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        flatten(this.progress(r, cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        flatten(this.progress(r, cx))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

//! The accept loop: connections bounded in number, headers bounded in time, idle keep-alive
//! connections closed, and a graceful shutdown that lets requests in flight finish.
//!
//! `axum::serve` has none of these bounds: a client that sends its headers a byte at a time,
//! or opens connections and leaves them idle, would hold them for ever.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

use super::body::Held;

/// Bounds on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections at once; past it, new ones wait in the listen queue.
    pub max_connections: usize,
    /// Time a client gets to send a request's headers, from the first byte (from the
    /// connection's start for its first request); then the connection is closed.
    pub header_timeout: Duration,
    /// Time a keep-alive connection may stay open between requests.
    pub idle_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` completes; then takes no new connections,
/// lets every connection finish the request it is on, and returns once all are closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (stop, stopping) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait, as accepting again at once
                    // would fail the same way.
                    tracing::error!(error = %err, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tokio::spawn(connection(
            stream,
            peer,
            router.clone(),
            limits,
            stopping.clone(),
            slot,
        ));
    }
    drop(listener);
    let _ = stop.send(());
    // Each open connection holds a slot: when all are back, every connection is closed.
    let all = u32::try_from(limits.max_connections.max(1)).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
}

/// What a connection is doing, as its watchdog sees it: a request in flight, a request's head
/// on its way, or nothing.
struct Activity {
    opened: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the last request in flight finished.
    last_done_ms: AtomicU64,
    /// A request's head is awaited: the connection is new, or bytes came while no request was
    /// in flight.
    head_pending: AtomicBool,
    /// Milliseconds after `opened` when the pending head began.
    head_started_ms: AtomicU64,
}

/// Why a connection with nothing in flight is closed.
#[derive(Debug)]
enum Close {
    /// Its request's head took longer than `--header-timeout-secs` (or never came).
    SlowHead,
    /// Nothing was asked for `--idle-timeout-secs`.
    Idle,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_done_ms: AtomicU64::new(0),
            head_pending: AtomicBool::new(true),
            head_started_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    /// Bytes arrived: with no request in flight, they begin the next request's head.
    fn read_some(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 && !self.head_pending.swap(true, Ordering::AcqRel) {
            self.head_started_ms.store(self.now_ms(), Ordering::Release);
        }
    }

    /// Whether the connection should be closed now, and why.
    fn overdue(&self, limits: &ConnectionLimits) -> Option<Close> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since =
            |ms: &AtomicU64| Duration::from_millis(self.now_ms().saturating_sub(ms.load(Ordering::Acquire)));
        if self.head_pending.load(Ordering::Acquire) {
            (since(&self.head_started_ms) >= limits.header_timeout).then_some(Close::SlowHead)
        } else {
            (since(&self.last_done_ms) >= limits.idle_timeout).then_some(Close::Idle)
        }
    }
}

/// The client's socket, telling the connection's [`Activity`] when bytes arrive.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Marks a request in flight on its connection until its response body is sent or dropped.
struct Busy(Arc<Activity>);

impl Busy {
    fn start(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        activity.head_pending.store(false, Ordering::Release);
        Self(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let done = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_done_ms.store(done, Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ConnectionLimits,
    mut stopping: watch::Receiver<()>,
    _slot: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let service = {
        let activity = Arc::clone(&activity);
        hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            let busy = Busy::start(&activity);
            request.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let response = router
                    .oneshot(request.map(axum::body::Body::new))
                    .await
                    .unwrap_or_else(|never| match never {});
                Ok::<_, std::convert::Infallible>(response.map(|body| Held::new(body, busy)))
            }
        })
    };
    // hyper's own header timeout also runs between keep-alive requests, which would make it
    // the idle timeout too; the watchdog below keeps the two apart.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(None);
    builder.http2().timer(TokioTimer::new());
    let io = Watched {
        stream,
        activity: Arc::clone(&activity),
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let period = limits.header_timeout.min(limits.idle_timeout) / 4;
    let mut tick = tokio::time::interval(period.max(Duration::from_millis(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    loop {
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(err) = served {
                    tracing::debug!(error = %err, %peer, "connection ended with an error");
                }
                return;
            }
            _ = stopping.changed(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tick.tick(), if !closing => {
                // Nothing is in flight: closing the socket loses no answer.
                if let Some(why) = activity.overdue(&limits) {
                    tracing::debug!(%peer, ?why, "closing a connection");
                    return;
                }
            }
        }
    }
}

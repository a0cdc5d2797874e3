//! Request bodies read whole, within a size and a pace, before anything else sees them; and
//! response bodies that hold something (a turn, a connection's busy mark) until they are sent.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http_body::{Frame, SizeHint};

use super::{ApiError, AppState};

/// How large a request body may be and how fast it must arrive.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// Time the body gets before the pace is enforced: the body must be complete by
    /// `grace + received / min_rate`.
    pub grace: Duration,
    /// Least bytes per second after the grace period.
    pub min_rate: u64,
}

impl BodyLimits {
    fn allowed(&self, received: usize) -> Duration {
        self.grace + Duration::from_secs_f64(received as f64 / self.min_rate.max(1) as f64)
    }

    fn timeout(&self) -> ApiError {
        ApiError::BodyTimeout {
            grace_secs: self.grace.as_secs(),
            min_rate: self.min_rate,
        }
    }
}

/// Reads a whole body: 413 past `max_bytes` (at once when the length is announced), 408 when
/// it falls behind the pace.
pub async fn read_within(body: Body, limits: BodyLimits) -> Result<Bytes, ApiError> {
    use http_body::Body as _;
    let too_large = ApiError::BodyTooLarge {
        limit: limits.max_bytes,
    };
    if body.size_hint().lower() > limits.max_bytes as u64 {
        return Err(too_large);
    }
    let started = tokio::time::Instant::now();
    let mut stream = body.into_data_stream();
    let mut received = Vec::new();
    loop {
        let deadline = started + limits.allowed(received.len());
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => return Err(limits.timeout()),
            Ok(None) => return Ok(Bytes::from(received)),
            Ok(Some(Err(_))) => return Err(ApiError::BodyUnreadable),
            Ok(Some(Ok(chunk))) => {
                if received.len() + chunk.len() > limits.max_bytes {
                    return Err(too_large);
                }
                received.extend_from_slice(&chunk);
            }
        }
    }
}

/// Middleware in front of every route: the body is read whole, within [`BodyLimits`], before
/// any handler or the admission queue sees the request. A client that trickles its body holds
/// a connection, never a turn.
pub async fn buffered(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match read_within(body, state.body_limits).await {
        Ok(bytes) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Err(err) => {
            if parts.uri.path().starts_with("/v1/") {
                state.stats.record_rejected();
            }
            err.into_response()
        }
    }
}

/// A body that keeps `held` until it has been sent (or dropped), and keeps the inner body's
/// exact size, so that a known length still goes out as `Content-Length`.
pub struct Held<B, H> {
    body: B,
    _held: H,
}

impl<B, H> Held<B, H> {
    pub fn new(body: B, held: H) -> Self {
        Self { body, _held: held }
    }
}

impl<B, H> http_body::Body for Held<B, H>
where
    B: http_body::Body + Unpin,
    H: Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body::Body as _;

    use super::*;

    #[test]
    fn held_bodies_keep_their_length() {
        let held = Held::new(Body::from("twelve bytes"), ());
        assert_eq!(held.size_hint().exact(), Some(12));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickling_body_times_out() {
        let limits = BodyLimits {
            max_bytes: 1 << 20,
            grace: Duration::from_secs(10),
            min_rate: 1024,
        };
        let trickle = futures::stream::iter(0..1000).then(|_| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, std::io::Error>(Bytes::from_static(b"x"))
        });
        let started = tokio::time::Instant::now();
        let read = read_within(Body::from_stream(trickle), limits).await;
        assert!(matches!(read, Err(ApiError::BodyTimeout { .. })), "{read:?}");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(10) && waited < Duration::from_secs(11),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_pace_is_read() {
        let limits = BodyLimits {
            max_bytes: 1 << 20,
            grace: Duration::from_secs(1),
            min_rate: 1024,
        };
        // 20 chunks of 2 KiB, one a second: twice the least pace, for 20 s.
        let steady = futures::stream::iter(0..20).then(|_| async {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 2048]))
        });
        let read = read_within(Body::from_stream(steady), limits).await.unwrap();
        assert_eq!(read.len(), 40 * 1024);
    }

    #[tokio::test]
    async fn an_announced_length_past_the_limit_is_refused_unread() {
        let limits = BodyLimits {
            max_bytes: 4,
            grace: Duration::from_secs(1),
            min_rate: 1,
        };
        let read = read_within(Body::from("too long"), limits).await;
        assert!(
            matches!(read, Err(ApiError::BodyTooLarge { limit: 4 })),
            "{read:?}"
        );
    }
}

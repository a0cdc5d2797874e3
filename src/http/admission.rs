//! Load shedding: a bound on requests in flight and on requests waiting for a turn. Past both,
//! a request gets 503 with `Retry-After` at once, so an overloaded service answers quickly and
//! keeps its memory bounded instead of queueing without end.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::Held;
use super::{ApiError, AppState};

pub struct Admission {
    permits: Arc<Semaphore>,
    /// The bound on requests in flight, as configured (`Semaphore::MAX_PERMITS`: none).
    bound: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
    max_wait: Duration,
}

impl Admission {
    /// `in_flight` requests at once (0: no bound), up to `max_waiting` more waiting at most
    /// `max_wait` for a turn.
    pub fn new(in_flight: usize, max_waiting: usize, max_wait: Duration) -> Self {
        let bound = if in_flight == 0 {
            Semaphore::MAX_PERMITS
        } else {
            in_flight
        };
        Self {
            permits: Arc::new(Semaphore::new(bound)),
            bound,
            waiting: AtomicUsize::new(0),
            max_waiting,
            max_wait,
        }
    }

    /// Requests holding a turn now.
    pub fn in_flight(&self) -> usize {
        self.bound - self.permits.available_permits()
    }

    /// Requests waiting for a turn now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() {
            return Some(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_waiting {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let permit = tokio::time::timeout(self.max_wait, Arc::clone(&self.permits).acquire_owned()).await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        permit.ok().and_then(Result::ok)
    }
}

/// Middleware for the proxied routes. The turn is held until the response body has been sent
/// in full (a stream's last event), not only until the handler returns.
pub async fn admit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(permit) = state.admission.admit().await else {
        state.stats.record_shed();
        return ApiError::Overloaded.into_response();
    };
    // The body keeps its exact length, so a JSON answer still goes out with Content-Length.
    next.run(request)
        .await
        .map(|body| Body::new(Held::new(body, permit)))
}

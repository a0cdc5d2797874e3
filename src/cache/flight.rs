//! Coalescing of identical misses: the first request for an exact key calls the upstream, the
//! others wait for its stored answer.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::{Entry, ExactKey};

type Table = Arc<Mutex<HashMap<ExactKey, watch::Receiver<FlightOutcome>>>>;

#[derive(Debug, Clone)]
pub enum FlightOutcome {
    Pending,
    Stored(Arc<Entry>),
    /// The leader got no storable answer (upstream error, broken stream, client gone).
    Failed,
}

#[derive(Default)]
pub(super) struct Flights {
    table: Table,
    /// Requests that joined another's upstream call instead of making their own.
    followers: std::sync::atomic::AtomicU64,
}

impl Flights {
    pub(super) fn join(&self, key: ExactKey) -> Join {
        let mut table = self.table.lock();
        if let Some(receiver) = table.get(&key) {
            self.followers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Join::Follower(receiver.clone());
        }
        let (sender, receiver) = watch::channel(FlightOutcome::Pending);
        table.insert(key, receiver);
        Join::Leader(Flight {
            key,
            sender,
            table: Arc::clone(&self.table),
        })
    }
}

impl Flights {
    /// A request that waited for another node's call instead of making its own.
    pub(super) fn count_follower(&self) {
        self.followers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn followers(&self) -> u64 {
        self.followers.load(std::sync::atomic::Ordering::Relaxed)
    }
}

pub enum Join {
    /// This request makes the upstream call and must finish the flight.
    Leader(Flight),
    /// Another request is already calling the upstream for the same key.
    Follower(watch::Receiver<FlightOutcome>),
}

impl Join {
    /// Waits for a follower's answer; `None` when the leader got nothing storable.
    pub async fn wait(mut receiver: watch::Receiver<FlightOutcome>) -> Option<Arc<Entry>> {
        loop {
            match &*receiver.borrow_and_update() {
                FlightOutcome::Stored(entry) => return Some(Arc::clone(entry)),
                FlightOutcome::Failed => return None,
                FlightOutcome::Pending => {}
            }
            if receiver.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// The leader's side. Dropping it without [`Flight::complete`] tells the followers it failed.
pub struct Flight {
    key: ExactKey,
    sender: watch::Sender<FlightOutcome>,
    table: Table,
}

impl Flight {
    pub fn complete(self, entry: Arc<Entry>) {
        self.sender.send_replace(FlightOutcome::Stored(entry));
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        self.table.lock().remove(&self.key);
        self.sender.send_if_modified(|outcome| {
            let pending = matches!(outcome, FlightOutcome::Pending);
            if pending {
                *outcome = FlightOutcome::Failed;
            }
            pending
        });
    }
}

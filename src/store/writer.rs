//! The single writer thread: group commit of queued changes.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Error, Op, Store};

/// When an entry is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Durability {
    /// Committed and fsynced before the client that caused it gets its answer.
    Strict,
    /// Committed in the background within the relaxed window; a crash can lose the entries of
    /// that window.
    Relaxed,
}

/// Most changes committed in one transaction.
const MAX_BATCH: usize = 4096;

struct Job {
    op: Option<Op>,
    done: Option<oneshot::Sender<Result<(), String>>>,
    /// Commit, close the database and end the thread.
    stop: bool,
}

/// Queue of changes to the store, drained by one thread.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    durability: Durability,
}

impl Writer {
    /// Starts the writer thread. In relaxed mode it waits up to `window` to batch changes.
    pub fn start(store: Store, durability: Durability, window: Duration) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("semcache-store".into())
            .spawn(move || drain(store, queue, durability, window))
            .expect("the store writer thread starts");
        Self { jobs, durability }
    }

    pub fn durability(&self) -> Durability {
        self.durability
    }

    /// Queues a change; in strict mode, waits until it is committed.
    pub async fn write(&self, op: Op) -> Result<(), Error> {
        match self.durability {
            Durability::Strict => self.committed(Some(op)).await,
            Durability::Relaxed => {
                self.submit(op);
                Ok(())
            }
        }
    }

    /// Queues a change without waiting.
    pub fn submit(&self, op: Op) {
        let job = Job {
            op: Some(op),
            done: None,
            stop: false,
        };
        if self.jobs.send(job).is_err() {
            tracing::error!("the store writer has stopped; a change was not saved");
        }
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) -> Result<(), Error> {
        self.committed(None).await
    }

    /// Commits everything queued, closes the database and ends the writer thread. Later
    /// changes are not saved.
    pub async fn close(&self) -> Result<(), Error> {
        let (done, closed) = oneshot::channel();
        self.jobs
            .send(Job {
                op: None,
                done: Some(done),
                stop: true,
            })
            .map_err(|_| Error::WriterGone)?;
        closed.await.map_err(|_| Error::WriterGone)?.map_err(Error::Db)
    }

    async fn committed(&self, op: Option<Op>) -> Result<(), Error> {
        let (done, committed) = oneshot::channel();
        self.jobs
            .send(Job {
                op,
                done: Some(done),
                stop: false,
            })
            .map_err(|_| Error::WriterGone)?;
        committed.await.map_err(|_| Error::WriterGone)?.map_err(Error::Db)
    }
}

fn drain(store: Store, queue: mpsc::Receiver<Job>, durability: Durability, window: Duration) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        let deadline = Instant::now() + window;
        while batch.len() < MAX_BATCH && !batch.iter().any(|job| job.stop) {
            let next = match durability {
                // Strict: take what is already queued, so concurrent writers share one commit.
                Durability::Strict => queue.try_recv().ok(),
                Durability::Relaxed => queue
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .ok(),
            };
            match next {
                Some(job) => batch.push(job),
                None => break,
            }
        }
        let stop = batch.iter().any(|job| job.stop);
        let (ops, waiters): (Vec<Option<Op>>, Vec<_>) =
            batch.into_iter().map(|job| (job.op, job.done)).unzip();
        let ops: Vec<Op> = ops.into_iter().flatten().collect();
        let result = if ops.is_empty() {
            Ok(())
        } else {
            store.apply(&ops).map_err(|err| err.to_string())
        };
        if let Err(err) = &result {
            tracing::error!(error = %err, changes = ops.len(), "store commit failed");
        }
        if stop {
            // The database file lock goes with the store: release it before saying so.
            drop(store);
            for waiter in waiters.into_iter().flatten() {
                let _ = waiter.send(result.clone());
            }
            return;
        }
        for waiter in waiters.into_iter().flatten() {
            let _ = waiter.send(result.clone());
        }
    }
}

//! The single writer thread: group commit of queued changes.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{Error, FileIdentity, Op, Store};

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
    /// Changes that could not be saved (disk full, I/O error, the file gone).
    failures: Arc<AtomicU64>,
    place: Arc<Place>,
}

/// Where the store file is, and whether it is still there.
struct Place {
    path: PathBuf,
    identity: FileIdentity,
    /// Set once the file at `path` is no longer the one opened: from then on nothing written
    /// would survive a restart, so every commit is refused (and counted) until then.
    lost: OnceLock<String>,
}

impl Place {
    /// Checks the file; the first time it is found gone, says so in the log.
    fn check(&self) -> Option<&str> {
        if self.lost.get().is_none() {
            if let Some(reason) = super::moved_away(&self.path, self.identity) {
                if self.lost.set(reason.clone()).is_ok() {
                    tracing::error!(
                        %reason,
                        "the store is lost: new entries are served from memory only and will not survive a restart; restart semcache to open a new store"
                    );
                }
            }
        }
        self.lost.get().map(String::as_str)
    }
}

impl Writer {
    /// Starts the writer thread. In relaxed mode it waits up to `window` to batch changes.
    pub fn start(store: Store, durability: Durability, window: Duration) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let failures = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&failures);
        let place = Arc::new(Place {
            path: store.path().to_owned(),
            identity: store.identity(),
            lost: OnceLock::new(),
        });
        let checked = Arc::clone(&place);
        std::thread::Builder::new()
            .name("semcache-store".into())
            .spawn(move || drain(store, queue, durability, window, &counted, &checked))
            .expect("the store writer thread starts");
        Self {
            jobs,
            durability,
            failures,
            place,
        }
    }

    /// Why the store can no longer keep entries, if it cannot: its file was removed or
    /// replaced. Checks the file now.
    pub fn lost(&self) -> Option<String> {
        self.place.check().map(str::to_owned)
    }

    /// Changes that could not be saved so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
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

impl super::EntryStore for Writer {
    fn write(&self, op: Op) -> futures::future::BoxFuture<'_, Result<(), Error>> {
        Box::pin(Writer::write(self, op))
    }

    fn submit(&self, op: Op) {
        Writer::submit(self, op);
    }

    fn flush(&self) -> futures::future::BoxFuture<'_, Result<(), Error>> {
        Box::pin(Writer::flush(self))
    }

    fn close(&self) -> futures::future::BoxFuture<'_, Result<(), Error>> {
        Box::pin(Writer::close(self))
    }

    fn failures(&self) -> u64 {
        Writer::failures(self)
    }

    fn lost(&self) -> Option<String> {
        Writer::lost(self)
    }
}

/// The open database, or how to open it again after an I/O error. redb refuses every later
/// transaction once one has failed on I/O, so a disk that was full for a moment would otherwise
/// cost durability until the next restart.
struct Database {
    store: Option<Store>,
    data_dir: PathBuf,
    last_reopen: Option<Instant>,
}

/// Least time between two attempts to reopen a failing database.
const REOPEN_INTERVAL: Duration = Duration::from_secs(1);

impl Database {
    /// Applies the changes; after a failure, reopens the database (at most every
    /// [`REOPEN_INTERVAL`]) and tries once more.
    fn apply(&mut self, ops: &[Op]) -> Result<(), String> {
        let first = match &self.store {
            Some(store) => match store.apply(ops) {
                Ok(()) => return Ok(()),
                Err(err) => err.to_string(),
            },
            None => "the store is closed after an earlier error".to_owned(),
        };
        if self
            .last_reopen
            .is_some_and(|last| last.elapsed() < REOPEN_INTERVAL)
        {
            return Err(first);
        }
        self.last_reopen = Some(Instant::now());
        // The file lock goes with the old handle: drop it before opening again.
        self.store = None;
        match Store::open(&self.data_dir) {
            Ok(store) => {
                tracing::warn!(error = %first, "store reopened after a failed commit");
                let retried = store.apply(ops).map_err(|err| err.to_string());
                self.store = Some(store);
                retried
            }
            Err(err) => Err(format!("{first}; reopening failed: {err}")),
        }
    }
}

fn drain(
    store: Store,
    queue: mpsc::Receiver<Job>,
    durability: Durability,
    window: Duration,
    failures: &AtomicU64,
    place: &Place,
) {
    let mut database = Database {
        data_dir: store.path().parent().map_or_else(PathBuf::new, PathBuf::from),
        store: Some(store),
        last_reopen: None,
    };
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
        } else if let Some(lost) = place.check() {
            Err(lost.to_owned())
        } else {
            database.apply(&ops)
        };
        if let Err(err) = &result {
            failures.fetch_add(ops.len() as u64, Ordering::Relaxed);
            tracing::error!(error = %err, changes = ops.len(), "store commit failed");
        }
        if stop {
            // The database file lock goes with the store: release it before saying so.
            drop(database);
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

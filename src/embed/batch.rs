//! Dynamic batching: prompts embedded at the same time share one forward pass.
//!
//! A few threads (one per core by default) run the model's forward passes. Each pass takes
//! every prompt queued while the previous one ran, up to [`MAX_BATCH`], so a single client
//! never waits for company and concurrent clients share passes, which cost less per prompt
//! than one at a time. Only when the last pass was shared, a sign of concurrent load, does it
//! wait up to [`MAX_WAIT`] for more.
//! Prompts are sorted by length and cut into groups of similar length, so a long prompt does
//! not make short ones pay for its padding.
//!
//! Where a pass runs its matrix products: a lone prompt while the other workers are idle uses
//! the process-wide thread pool (every core on one pass: the lowest latency for one client),
//! while shared passes, or any pass beside another worker's, run on their worker's own
//! one-thread pool. Under load each core then runs whole passes instead of every pass being
//! split across cores, which leaves the cores waiting on each other at every operation of the
//! model. On 2 cores, 32 concurrent short prompts went through at 3.24 × the rate of one at a
//! time this way, against 2.07 × with every pass split across both cores (`benches/proxy.rs`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{usable, Embedder, Error};

/// Most prompts in one forward pass. Past 8 to 16 short prompts a pass costs no less per
/// prompt, and a larger pass only makes its first prompt wait longer.
pub const MAX_BATCH: usize = 16;
/// About the most text the model reads of one prompt (256 tokens of English): longer texts
/// cost no more.
const WINDOW_BYTES: usize = 1024;
/// Most attention work in one pass, in squared bytes: four prompts that fill the window. A
/// pass's working memory grows with its prompts times their length squared (the attention
/// scores), and past a few long prompts a larger pass costs no less per prompt, only memory:
/// sixteen full-window prompts in one pass took about 200 MiB more at their peak.
const PASS_BUDGET: usize = 4 * WINDOW_BYTES * WINDOW_BYTES;
/// Longest wait for more prompts before a pass, under load only.
pub const MAX_WAIT: Duration = Duration::from_millis(2);
/// How long the queue stays dry before the embedder hears it is idle ([`Embedder::idle`]).
/// Giving memory back takes the ONNX backend 3 to 7 ms on the worker's thread, and a prompt
/// that arrives meanwhile waits behind it: done the moment the queue ran dry, that is every
/// prompt of steady traffic which comes just after the one before. Not measured to matter in
/// the proxy bench (its semantic hit took 1.45 x one embedding with it, 1.47 x without).
const IDLE_AFTER: Duration = if cfg!(test) {
    Duration::from_millis(10)
} else {
    Duration::from_millis(200)
};

struct Job {
    text: String,
    reply: oneshot::Sender<Result<Vec<f32>, Error>>,
}

/// A handle on the batching thread; cheap to clone. The thread ends when every handle is gone.
#[derive(Clone)]
pub struct Batcher {
    jobs: Sender<Job>,
}

impl Batcher {
    /// Starts `workers` threads (at least one) that take turns at the queue: each takes what
    /// has queued and runs it as one pass, so on a machine with several cores, passes overlap
    /// and the parts of a pass that run on one core do not leave the others idle.
    pub fn new(embedder: Arc<dyn Embedder>, workers: usize) -> Self {
        let (jobs, queue) = mpsc::channel();
        let queue = Arc::new(Mutex::new(queue));
        let busy = Arc::new(AtomicUsize::new(0));
        for n in 0..workers.max(1) {
            let (embedder, queue, busy) = (Arc::clone(&embedder), Arc::clone(&queue), Arc::clone(&busy));
            std::thread::Builder::new()
                .name(format!("semcache-embed-{n}"))
                .spawn(move || {
                    let own_pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(1)
                        .thread_name(move |_| format!("semcache-embed-{n}-pass"))
                        .build()
                        .ok();
                    run(&*embedder, &queue, &busy, own_pool.as_ref());
                })
                .expect("spawning an embedding thread");
        }
        Self { jobs }
    }

    /// Embeds one text, sharing a forward pass with whatever else is queued.
    pub async fn embed(&self, text: &str) -> Result<Vec<f32>, Error> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                text: text.to_owned(),
                reply,
            })
            .map_err(|_| Error::Task("the embedding thread has stopped".to_owned()))?;
        answer
            .await
            .map_err(|_| Error::Task("the embedding thread dropped the request".to_owned()))?
    }
}

/// One worker: takes what has queued, runs it, and again. `busy` counts the workers in a pass.
fn run(
    embedder: &dyn Embedder,
    queue: &Mutex<Receiver<Job>>,
    busy: &AtomicUsize,
    own_pool: Option<&rayon::ThreadPool>,
) {
    let mut shared = false;
    let mut ran = false;
    loop {
        let batch = {
            let Ok(queue) = queue.lock() else { return };
            let first = match queue.try_recv() {
                Ok(job) => job,
                Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => match next_after_dry_spell(embedder, &queue, &mut ran) {
                    Some(job) => job,
                    None => return,
                },
            };
            let mut batch = vec![first];
            batch.extend(queue.try_iter().take(MAX_BATCH - 1));
            if shared {
                let deadline = Instant::now() + MAX_WAIT;
                while batch.len() < MAX_BATCH {
                    match queue.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                        Ok(job) => batch.push(job),
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
            batch
        };
        shared = batch.len() > 1;
        let others_busy = busy.fetch_add(1, Ordering::SeqCst) > 0;
        let pass = || {
            for group in by_length(batch) {
                embed_group(embedder, group);
            }
        };
        match own_pool {
            Some(pool) if shared || others_busy => pool.install(pass),
            _ => pass(),
        }
        busy.fetch_sub(1, Ordering::SeqCst);
        ran = true;
    }
}

/// The next prompt once the queue has run dry: if work ran since the embedder last heard it is
/// idle and the queue stays dry for [`IDLE_AFTER`], it hears it before the wait goes on.
fn next_after_dry_spell(embedder: &dyn Embedder, queue: &Receiver<Job>, ran: &mut bool) -> Option<Job> {
    if std::mem::take(ran) {
        match queue.recv_timeout(IDLE_AFTER) {
            Ok(job) => return Some(job),
            Err(RecvTimeoutError::Disconnected) => return None,
            Err(RecvTimeoutError::Timeout) => embedder.idle(),
        }
    }
    queue.recv().ok()
}

/// Groups of similar length, shortest first: within a group the longest text is at most twice
/// the shortest (plus a little), so padding stays small, and the group's attention work (its
/// size times the square of its longest text) stays within [`PASS_BUDGET`].
fn by_length(mut batch: Vec<Job>) -> Vec<Vec<Job>> {
    batch.sort_by_key(|job| job.text.len());
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in batch {
        let len = job.text.len();
        let weight = len.min(WINDOW_BYTES).pow(2);
        match groups.last_mut() {
            Some(group)
                if len <= 2 * group[0].text.len() + 32 && (group.len() + 1) * weight <= PASS_BUDGET =>
            {
                group.push(job)
            }
            _ => groups.push(vec![job]),
        }
    }
    groups
}

fn embed_group(embedder: &dyn Embedder, group: Vec<Job>) {
    let texts: Vec<&str> = group.iter().map(|job| job.text.as_str()).collect();
    // A panic in the model fails these requests (they are then proxied without the cache),
    // not the thread.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| embedder.embed(&texts)))
        .unwrap_or_else(|_| Err(Error::Task("the embedding model panicked".to_owned())));
    match result {
        Ok(vectors) if vectors.len() == group.len() => {
            let dimensions = embedder.dimensions();
            for (job, vector) in group.into_iter().zip(vectors) {
                let _ = job.reply.send(usable(vector, dimensions));
            }
        }
        Ok(vectors) => {
            let message = format!("{} vectors for {} texts", vectors.len(), group.len());
            for job in group {
                let _ = job.reply.send(Err(Error::Task(message.clone())));
            }
        }
        Err(err) => {
            let message = err.to_string();
            for job in group {
                let _ = job.reply.send(Err(Error::Task(message.clone())));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;

    /// Records the size of every forward pass; each vector holds the text's length.
    #[derive(Default)]
    struct Recording {
        passes: Mutex<Vec<usize>>,
        calls: AtomicUsize,
        /// Each entry: how many passes had run when the queue was found dry.
        idle_after: Mutex<Vec<usize>>,
    }

    impl Embedder for Recording {
        fn model_id(&self) -> crate::embed::EmbedderId {
            crate::embed::EmbedderId {
                model: "recording".into(),
                backend: "test".into(),
                dimensions: 1,
                weights: "0".into(),
            }
        }

        fn seen_len(&self, _: &str) -> Option<usize> {
            None
        }

        fn dimensions(&self) -> usize {
            1
        }

        fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.passes.lock().unwrap().push(texts.len());
            std::thread::sleep(Duration::from_millis(5));
            if texts.contains(&"panic") {
                panic!("model failure");
            }
            Ok(texts.iter().map(|t| vec![t.len() as f32]).collect())
        }

        fn idle(&self) {
            let passes = self.passes.lock().unwrap().len();
            self.idle_after.lock().unwrap().push(passes);
        }
    }

    #[tokio::test]
    async fn the_embedder_hears_once_per_dry_spell_after_work_never_before_or_between() {
        let model = Arc::new(Recording::default());
        let batcher = Batcher::new(Arc::clone(&model) as Arc<dyn Embedder>, 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(model.idle_after.lock().unwrap().is_empty(), "no pass yet");
        for text in ["one", "two"] {
            batcher.embed(text).await.unwrap();
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
        // Prompts closer together than IDLE_AFTER make one spell of work.
        batcher.embed("three").await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
        batcher.embed("four").await.unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
        let texts: Vec<String> = (0..40).map(|n| format!("prompt {n}")).collect();
        futures::future::join_all(texts.iter().map(|text| batcher.embed(text))).await;
        tokio::time::sleep(Duration::from_millis(60)).await;
        let passes = model.passes.lock().unwrap().len();
        let idle_after = model.idle_after.lock().unwrap().clone();
        assert!(passes >= 7, "{passes} passes");
        // Once after each lone prompt, once after the close pair, and once after the burst,
        // whose passes ran back to back.
        assert_eq!(idle_after, vec![1, 2, 4, passes]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_prompts_share_passes_and_get_their_own_vectors() {
        let model = Arc::new(Recording::default());
        let batcher = Batcher::new(Arc::clone(&model) as Arc<dyn Embedder>, 1);
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let batcher = batcher.clone();
                tokio::spawn(async move {
                    let text = "x".repeat(10 + i % 7);
                    let vector = batcher.embed(&text).await.unwrap();
                    assert_eq!(vector, vec![text.len() as f32]);
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let passes = model.passes.lock().unwrap().clone();
        assert_eq!(passes.iter().sum::<usize>(), 64);
        assert!(
            passes.len() < 64 / 2,
            "64 prompts took {} passes: {passes:?}",
            passes.len()
        );
        assert!(passes.iter().all(|&n| n <= MAX_BATCH));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn several_workers_answer_every_prompt_once() {
        let model = Arc::new(Recording::default());
        let batcher = Batcher::new(Arc::clone(&model) as Arc<dyn Embedder>, 3);
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let batcher = batcher.clone();
                tokio::spawn(async move { batcher.embed(&"z".repeat(i + 1)).await.unwrap() })
            })
            .collect();
        for (i, task) in tasks.into_iter().enumerate() {
            assert_eq!(task.await.unwrap(), vec![(i + 1) as f32]);
        }
        assert_eq!(model.passes.lock().unwrap().iter().sum::<usize>(), 50);
    }

    #[tokio::test]
    async fn one_prompt_alone_goes_at_once_and_a_panic_fails_only_its_pass() {
        let model = Arc::new(Recording::default());
        let batcher = Batcher::new(Arc::clone(&model) as Arc<dyn Embedder>, 1);
        assert_eq!(batcher.embed("hello").await.unwrap(), vec![5.0]);
        assert!(matches!(batcher.embed("panic").await, Err(Error::Task(_))));
        assert_eq!(
            batcher.embed("after").await.unwrap(),
            vec![5.0],
            "the thread lives on"
        );
        assert_eq!(*model.passes.lock().unwrap(), vec![1, 1, 1]);
    }

    #[test]
    fn long_texts_do_not_share_a_group_with_short_ones() {
        let job = |text: &str| Job {
            text: text.to_owned(),
            reply: oneshot::channel().0,
        };
        let long = "y".repeat(2000);
        let groups = by_length(vec![job("short one"), job(&long), job("another short")]);
        let sizes: Vec<usize> = groups.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 1]);
    }

    #[test]
    fn long_texts_go_a_few_at_a_time_and_short_ones_all_together() {
        let job = |text: String| Job {
            text,
            reply: oneshot::channel().0,
        };
        let long: Vec<Job> = (0..10).map(|n| job(format!("{n}{}", "y".repeat(1500)))).collect();
        let sizes: Vec<usize> = by_length(long).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        let short: Vec<Job> = (0..MAX_BATCH).map(|n| job(format!("prompt {n}"))).collect();
        assert_eq!(by_length(short).len(), 1);
    }
}

//! The caching policy: exact and semantic lookup, insertion, expiry, eviction, and coalescing
//! of identical misses. It does no network I/O; the HTTP layer feeds it keys and answers, and
//! the store (when there is one) keeps what it holds on disk.

mod flight;
mod key;
mod protocol;
mod service;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use parking_lot::RwLock;
use rand::Rng;

pub use flight::{Flight, FlightOutcome, Join};
pub use key::{partition_of, CacheInput, Digest32, ExactKey, Fingerprint, RequestKey, TenantId};
pub use protocol::{Invalid, Protocol, Replay, StreamItem, StreamReader};
pub use service::{CacheRequest, Controls, Outcome, Served, ServedBody, Service};

use crate::embed::{self, Batcher, Embedder};
use crate::index::Index;
use crate::store::{self, EntryStore, Loaded, Op, Record};
use crate::verify::{self, Reason, Rejection};

/// Entries sampled to choose an eviction victim (as Redis does): close to exact LRU or LFU at a
/// constant cost per eviction.
const EVICTION_SAMPLES: usize = 16;
/// LFU frequencies are halved after this many inserts and hits per entry the cache holds.
const AGE_EVERY: u64 = 10;
/// Candidates above the threshold considered by a semantic lookup, most similar first: an
/// expired or refused one gives way to the next.
const CANDIDATES: usize = 4;
/// Wrong-answer reports after which an entry is evicted.
const WRONG_REPORTS_TO_EVICT: u64 = 3;
/// Entry ids are drawn below this: the largest integer a JSON number keeps exactly in
/// JavaScript is 2^53 - 1.
const MAX_ID: u64 = 1 << 53;

/// Which entry goes when the cache is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Eviction {
    /// Least recently used (or stored).
    Lru,
    /// Least frequently used; ties go to the least recently used.
    Lfu,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// Most entries held; 0 means no bound.
    pub max_entries: usize,
    pub eviction: Eviction,
    /// Lifetime of an entry unless its request said otherwise; `None`: no expiry.
    pub default_ttl: Option<Duration>,
    /// Threads running embedding passes.
    pub embed_workers: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_entries: 0,
            eviction: Eviction::Lfu,
            default_ttl: None,
            embed_workers: 1,
        }
    }
}

/// Token counts of an answer, as the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A complete, successful upstream answer, ready to be served again.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The whole `chat.completion` object as JSON. The cache does not look inside it.
    pub completion: Bytes,
    pub model: String,
    pub usage: Usage,
    pub upstream_latency: Duration,
}

#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    pub tenant: TenantId,
    pub fingerprint: Fingerprint,
    pub prompt: String,
    pub exact: ExactKey,
    pub answer: Answer,
    pub created: SystemTime,
    pub expires: Option<SystemTime>,
    pub hits: AtomicU64,
    /// Milliseconds since the epoch of the last hit, or of creation before any.
    pub last_used_ms: AtomicU64,
    /// Recent use, for LFU: hits, halved as the cache ages (see [`Cache::age`]) so that past
    /// popularity fades.
    frequency: AtomicU64,
    /// The cache's logical clock at the last use: orders uses within the same millisecond.
    recency: AtomicU64,
    /// Hit count last written to the store, to know which entries need their usage saved.
    saved_hits: AtomicU64,
    /// The entry's own threshold (f32 bits), raised by wrong-answer reports; 0 means none.
    own_threshold: AtomicU32,
    /// Wrong-answer reports received.
    pub wrong_reports: AtomicU64,
    /// Similarity at which the entry was last served (f32 bits).
    last_similarity: AtomicU32,
    /// How much of the prompt the model reads (see [`Embedder::seen_len`]), found when first
    /// needed.
    seen_len: OnceLock<Option<usize>>,
}

impl Entry {
    pub fn is_expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|expires| expires <= now)
    }

    /// Whether the entry is older than `max_age`.
    pub fn is_older_than(&self, max_age: Duration, now: SystemTime) -> bool {
        now.duration_since(self.created).unwrap_or_default() > max_age
    }

    /// The entry's own threshold, raised by feedback; 0 when it has none.
    pub fn own_threshold(&self) -> f32 {
        f32::from_bits(self.own_threshold.load(Ordering::Relaxed))
    }

    fn touch(&self, clock: &AtomicU64) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.frequency.fetch_add(1, Ordering::Relaxed);
        self.last_used_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        self.recency
            .store(clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Lowest goes first.
    fn eviction_score(&self, policy: Eviction) -> (u64, u64) {
        let recency = self.recency.load(Ordering::Relaxed);
        match policy {
            Eviction::Lru => (recency, 0),
            Eviction::Lfu => (self.frequency.load(Ordering::Relaxed), recency),
        }
    }
}

/// The longest an entry is kept: lifetimes asked for beyond it (a `max-age` of `u64::MAX`
/// seconds, a huge `--ttl`) are capped to it rather than overflowing the clock.
pub const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// When an entry stored at `now` with lifetime `ttl` expires; never panics, whatever `ttl`.
pub fn expiry(now: SystemTime, ttl: Duration) -> SystemTime {
    let ttl = ttl.min(MAX_TTL);
    now.checked_add(ttl).unwrap_or(now)
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitKind {
    /// The same prompt in the same context; no embedding was computed.
    Exact,
    /// A prompt close enough in meaning, in the same context.
    Semantic,
}

#[derive(Debug, Clone)]
pub struct Hit {
    pub entry: Arc<Entry>,
    pub similarity: f32,
    pub kind: HitKind,
}

#[derive(Debug, Clone, Default)]
pub struct Miss {
    /// The prompt's embedding, kept so that storing the answer need not compute it again.
    pub embedding: Option<Vec<f32>>,
    /// Similarity of the best candidate that was not served: below the threshold, or refused.
    pub nearest: Option<f32>,
    /// Why the best candidate above the threshold was refused by the verifier, if it was.
    pub refused: Option<Rejection>,
}

#[derive(Debug, Clone)]
pub enum Lookup {
    Hit(Hit),
    Miss(Miss),
}

/// What a lookup may serve.
#[derive(Debug, Clone, Copy)]
pub struct Criteria {
    pub threshold: f32,
    /// Entries older than this are not served (`Cache-Control: max-age` on the request).
    pub max_age: Option<Duration>,
    /// Whether semantic candidates must pass the hit verifier.
    pub verify: bool,
}

/// The in-memory layers, under one lock so they always agree.
#[derive(Default)]
struct Inner {
    entries: HashMap<u64, Arc<Entry>>,
    exact: HashMap<ExactKey, u64>,
    /// Every id once, in no order, for sampling eviction victims in constant time.
    ids: Vec<u64>,
    id_slot: HashMap<u64, usize>,
}

impl Inner {
    fn add(&mut self, entry: Arc<Entry>) -> Option<u64> {
        self.id_slot.insert(entry.id, self.ids.len());
        self.ids.push(entry.id);
        let replaced = self.exact.insert(entry.exact, entry.id);
        self.entries.insert(entry.id, entry);
        replaced
    }

    fn take(&mut self, entry_id: u64) -> Option<Arc<Entry>> {
        let entry = self.entries.remove(&entry_id)?;
        if self.exact.get(&entry.exact) == Some(&entry_id) {
            self.exact.remove(&entry.exact);
        }
        if let Some(slot) = self.id_slot.remove(&entry_id) {
            self.ids.swap_remove(slot);
            if let Some(&moved) = self.ids.get(slot) {
                self.id_slot.insert(moved, slot);
            }
        }
        Some(entry)
    }
}

pub struct Cache {
    embedder: Arc<dyn Embedder>,
    batcher: Batcher,
    index: Index,
    inner: RwLock<Inner>,
    /// Logical clock for recency; ticks at every insert and hit.
    clock: AtomicU64,
    /// The clock when LFU frequencies were last halved.
    aged_at: AtomicU64,
    flights: flight::Flights,
    config: Config,
    writer: Option<Arc<dyn EntryStore>>,
}

impl Cache {
    /// A cache held in memory only.
    pub fn new(embedder: Arc<dyn Embedder>, config: Config) -> Self {
        Self {
            batcher: Batcher::new(Arc::clone(&embedder), config.embed_workers),
            embedder,
            index: Index::new(),
            inner: RwLock::default(),
            clock: AtomicU64::new(1),
            aged_at: AtomicU64::new(1),
            flights: flight::Flights::default(),
            config,
            writer: None,
        }
    }

    /// A cache whose entries are written to a store and reloaded from what it held.
    pub fn with_store(
        embedder: Arc<dyn Embedder>,
        config: Config,
        writer: Arc<dyn EntryStore>,
        loaded: Loaded,
    ) -> Self {
        let mut cache = Self::new(embedder, config);
        cache.writer = Some(writer);
        cache.restore(loaded);
        cache
    }

    fn restore(&self, loaded: Loaded) {
        let Loaded { mut records, vectors } = loaded;
        let now = SystemTime::now();
        // Each partition's vector array is sized once, exactly.
        let mut sizes: HashMap<crate::index::PartitionId, usize> = HashMap::new();
        for (record, vector) in &records {
            if vector.is_some() {
                let partition = partition_of(
                    TenantId(Digest32(record.tenant)),
                    Fingerprint(Digest32(record.fingerprint)),
                );
                *sizes.entry(partition).or_default() += 1;
            }
        }
        for (partition, size) in sizes {
            self.index.reserve(partition, size);
        }
        // Recency restarts from the saved last-use times, oldest first.
        records.sort_by_key(|(record, _)| (record.last_hit_ms.max(record.created_ms), record.id));
        for (record, vector) in records {
            let key = RequestKey::new(
                TenantId(Digest32(record.tenant)),
                Fingerprint(Digest32(record.fingerprint)),
                record.prompt,
            );
            let entry = Arc::new(Entry {
                id: record.id,
                tenant: key.tenant,
                fingerprint: key.fingerprint,
                exact: key.exact,
                answer: Answer {
                    completion: Bytes::from(record.completion),
                    model: record.model,
                    usage: Usage {
                        prompt_tokens: record.prompt_tokens,
                        completion_tokens: record.completion_tokens,
                    },
                    upstream_latency: Duration::from_micros(record.upstream_latency_us),
                },
                created: from_unix_ms(record.created_ms),
                expires: record.expires_ms.map(from_unix_ms),
                hits: AtomicU64::new(record.hits),
                frequency: AtomicU64::new(record.hits),
                last_used_ms: AtomicU64::new(record.last_hit_ms.max(record.created_ms)),
                recency: AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed)),
                saved_hits: AtomicU64::new(record.hits),
                own_threshold: AtomicU32::new(record.own_threshold.to_bits()),
                wrong_reports: AtomicU64::new(record.wrong_reports),
                last_similarity: AtomicU32::new(0),
                seen_len: OnceLock::new(),
                prompt: key.prompt,
            });
            if entry.is_expired(now) {
                self.persist(Op::Delete(entry.id));
                continue;
            }
            if let Some(range) = vector {
                self.index.insert_slice(
                    partition_of(entry.tenant, entry.fingerprint),
                    entry.id,
                    &vectors[range],
                );
            }
            let replaced = self.inner.write().add(entry);
            if let Some(old_id) = replaced {
                self.remove(old_id);
            }
        }
        self.evict_to_bound(None);
    }

    pub fn embedder(&self) -> &Arc<dyn Embedder> {
        &self.embedder
    }

    /// Embeds a text off the async workers, sharing a forward pass with concurrent requests.
    pub async fn embed(&self, text: &str) -> Result<Vec<f32>, embed::Error> {
        self.batcher.embed(text).await
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.inner.read().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A fresh entry id: random, so that ids are unique across restarts, processes and nodes
    /// sharing a store without any coordination; below 2^53, so that JavaScript (the
    /// dashboard) reads it exactly from JSON.
    fn new_id(&self) -> u64 {
        let inner = self.inner.read();
        loop {
            let id = rand::thread_rng().gen_range(1..MAX_ID);
            if !inner.entries.contains_key(&id) {
                return id;
            }
        }
    }

    pub fn get(&self, entry_id: u64) -> Option<Arc<Entry>> {
        self.inner.read().entries.get(&entry_id).cloned()
    }

    /// An entry that may be served: not expired (expired ones are removed on the way) and not
    /// older than the request allows.
    fn servable(&self, entry_id: u64, criteria: &Criteria) -> Result<Arc<Entry>, Unservable> {
        let entry = self.get(entry_id).ok_or(Unservable::Gone)?;
        let now = SystemTime::now();
        if entry.is_expired(now) {
            self.remove(entry_id);
            return Err(Unservable::Expired);
        }
        if criteria
            .max_age
            .is_some_and(|max_age| entry.is_older_than(max_age, now))
        {
            return Err(Unservable::TooOld);
        }
        Ok(entry)
    }

    /// The exact layer alone: no embedding is computed.
    pub fn lookup_exact(&self, key: &RequestKey, criteria: &Criteria) -> Option<Hit> {
        let entry_id = *self.inner.read().exact.get(&key.exact)?;
        let entry = self.servable(entry_id, criteria).ok()?;
        entry.touch(&self.clock);
        entry.last_similarity.store(1.0f32.to_bits(), Ordering::Relaxed);
        Some(Hit {
            entry,
            similarity: 1.0,
            kind: HitKind::Exact,
        })
    }

    /// Exact lookup, then a search by meaning among the entries of the same tenant and context.
    /// Embedding runs on a batching thread, and the search on a blocking thread: with the
    /// verifier it takes a few hundred microseconds at 100k entries, too long to hold an async
    /// worker.
    pub async fn lookup(
        self: &Arc<Self>,
        key: &RequestKey,
        criteria: &Criteria,
    ) -> Result<Lookup, embed::Error> {
        if let Some(hit) = self.lookup_exact(key, criteria) {
            return Ok(Lookup::Hit(hit));
        }
        // With nothing to compare with (a new conversation, a new tenant), the embedding is not
        // needed before the upstream call: the caller can compute it alongside, for storing.
        if !key.is_semantic() || self.index.partition_len(&key.partition()) == 0 {
            return Ok(Lookup::Miss(Miss::default()));
        }
        let embedding = self.embed(&key.prompt).await?;
        let cache = Arc::clone(self);
        let (key, criteria) = (key.clone(), *criteria);
        tokio::task::spawn_blocking(move || cache.lookup_embedded(&key, embedding, &criteria))
            .await
            .map_err(|err| embed::Error::Task(format!("the index search failed: {err}")))
    }

    /// The semantic layer, for a prompt already embedded. Candidates above the threshold (and
    /// above their own, feedback-raised threshold) are tried most similar first; the first that
    /// is servable and passes the verifier is the hit.
    pub fn lookup_embedded(&self, key: &RequestKey, embedding: Vec<f32>, criteria: &Criteria) -> Lookup {
        let partition = key.partition();
        let candidates = self.index.top(&partition, &embedding, CANDIDATES);
        let mut refused: Option<(Rejection, f32)> = None;
        let mut best_unserved = candidates.first().map(|c| c.similarity);
        let mut query_seen = None;
        for candidate in candidates.iter().filter(|c| c.similarity >= criteria.threshold) {
            let entry = match self.servable(candidate.entry_id, criteria) {
                Ok(entry) => entry,
                Err(Unservable::Expired | Unservable::Gone) => {
                    self.index.remove(&partition, candidate.entry_id);
                    continue;
                }
                Err(Unservable::TooOld) => continue,
            };
            if candidate.similarity < entry.own_threshold() {
                continue;
            }
            if criteria.verify {
                let query_seen = *query_seen.get_or_insert_with(|| self.embedder.seen_len(&key.prompt));
                let verdict = self
                    .compare_unseen(&key.prompt, query_seen, &entry)
                    .and_then(|()| verify::verify(&entry.prompt, &key.prompt));
                if let Err(rejection) = verdict {
                    tracing::debug!(entry = entry.id, reason = rejection.reason.as_str(), detail = %rejection.detail, "candidate refused");
                    refused.get_or_insert((rejection, candidate.similarity));
                    continue;
                }
            }
            entry.touch(&self.clock);
            let similarity = candidate.similarity.min(1.0);
            entry
                .last_similarity
                .store(similarity.to_bits(), Ordering::Relaxed);
            return Lookup::Hit(Hit {
                entry,
                similarity,
                kind: HitKind::Semantic,
            });
        }
        if let Some((_, similarity)) = &refused {
            best_unserved = Some(*similarity);
        }
        Lookup::Miss(Miss {
            embedding: Some(embedding),
            nearest: best_unserved,
            refused: refused.map(|(rejection, _)| rejection),
        })
    }

    /// Refuses a candidate when the two prompts differ where the model does not read them, past
    /// the end of its window: there the vectors are blind. Both prompts must end with the
    /// longer of their unread tails, so that every difference lies in text the model has read.
    fn compare_unseen(&self, query: &str, query_seen: Option<usize>, entry: &Entry) -> Result<(), Rejection> {
        let entry_seen = *entry
            .seen_len
            .get_or_init(|| self.embedder.seen_len(&entry.prompt));
        if query_seen.is_none() && entry_seen.is_none() {
            return Ok(());
        }
        let unread = |text: &'_ str, seen: Option<usize>| -> usize {
            seen.map_or(0, |seen| text.len().saturating_sub(seen))
        };
        let (query_unread, entry_unread) = (unread(query, query_seen), unread(&entry.prompt, entry_seen));
        let tail = if query_unread >= entry_unread {
            &query[query.len() - query_unread..]
        } else {
            &entry.prompt[entry.prompt.len() - entry_unread..]
        };
        if query.ends_with(tail) && entry.prompt.ends_with(tail) {
            Ok(())
        } else {
            Err(Rejection {
                reason: Reason::Unseen,
                detail: format!(
                    "the prompts differ past the model's window ({} and {} bytes unread)",
                    query_unread, entry_unread
                ),
            })
        }
    }

    /// Feedback from the application on an answer it was served. A wrong answer raises the
    /// entry's own threshold just above the similarity at which it was served (an exact hit
    /// being wrong means the answer itself is), and repeated reports evict it.
    pub fn report(&self, entry_id: u64, correct: bool, similarity: Option<f32>) -> Option<Feedback> {
        let entry = self.get(entry_id)?;
        if correct {
            return Some(Feedback::Noted);
        }
        let reports = entry.wrong_reports.fetch_add(1, Ordering::Relaxed) + 1;
        let served_at =
            similarity.unwrap_or_else(|| f32::from_bits(entry.last_similarity.load(Ordering::Relaxed)));
        // Wrong at similarity 1, or never served at all (an operator's verdict on the answer
        // itself): nothing else could be served from it.
        if reports >= WRONG_REPORTS_TO_EVICT || served_at >= 0.9999 || served_at <= 0.0 {
            self.remove(entry_id);
            return Some(Feedback::Evicted);
        }
        let raised = (served_at + 0.005).min(1.0).max(entry.own_threshold());
        entry.own_threshold.store(raised.to_bits(), Ordering::Relaxed);
        // Saved with the hit counts at the next upkeep.
        entry.saved_hits.store(u64::MAX, Ordering::Relaxed);
        Some(Feedback::Raised(raised))
    }

    /// Stores an answer: on disk first (awaited in strict durability), then in memory, where it
    /// is served from the moment this returns. `ttl` overrides the default lifetime. A
    /// previous entry for the same exact key is replaced; a full cache evicts.
    pub async fn insert(
        &self,
        key: &RequestKey,
        embedding: Option<Vec<f32>>,
        answer: Answer,
        ttl: Option<Duration>,
    ) -> Arc<Entry> {
        let now = SystemTime::now();
        let entry = Arc::new(Entry {
            id: self.new_id(),
            tenant: key.tenant,
            fingerprint: key.fingerprint,
            prompt: key.prompt.clone(),
            exact: key.exact,
            answer,
            created: now,
            expires: ttl.or(self.config.default_ttl).map(|ttl| expiry(now, ttl)),
            hits: AtomicU64::new(0),
            frequency: AtomicU64::new(0),
            last_used_ms: AtomicU64::new(unix_ms(now)),
            recency: AtomicU64::new(self.clock.fetch_add(1, Ordering::Relaxed)),
            saved_hits: AtomicU64::new(0),
            own_threshold: AtomicU32::new(0),
            wrong_reports: AtomicU64::new(0),
            last_similarity: AtomicU32::new(0),
            seen_len: OnceLock::new(),
        });
        if let Some(writer) = &self.writer {
            let record = Box::new(record_of(&entry, embedding.clone()));
            if let Err(err) = writer.write(Op::Put(record)).await {
                // Still served from memory: a broken disk degrades durability, not answers.
                tracing::error!(error = %err, entry = entry.id, "entry not saved to the store");
            }
        }
        if let Some(embedding) = embedding {
            self.index.insert(key.partition(), entry.id, embedding);
        }
        let replaced = self.inner.write().add(Arc::clone(&entry));
        if let Some(old_id) = replaced {
            self.remove(old_id);
        }
        self.evict_to_bound(Some(entry.id));
        entry
    }

    /// Evicts by policy until the cache is within `max_entries`, sparing `keep`.
    fn evict_to_bound(&self, keep: Option<u64>) {
        let max = self.config.max_entries;
        if max == 0 {
            return;
        }
        while self.len() > max {
            let victim = {
                let inner = self.inner.read();
                let mut rng = rand::thread_rng();
                let candidates: Vec<u64> = if inner.ids.len() <= EVICTION_SAMPLES {
                    inner.ids.clone()
                } else {
                    (0..EVICTION_SAMPLES)
                        .map(|_| inner.ids[rng.gen_range(0..inner.ids.len())])
                        .collect()
                };
                candidates
                    .into_iter()
                    .filter(|id| Some(*id) != keep)
                    .filter_map(|id| inner.entries.get(&id))
                    .min_by_key(|entry| entry.eviction_score(self.config.eviction))
                    .map(|entry| entry.id)
            };
            match victim {
                Some(victim) => {
                    self.remove(victim);
                }
                None => break,
            }
        }
    }

    /// Removes an entry from every layer and from the store. Returns whether it was there.
    pub fn remove(&self, entry_id: u64) -> bool {
        let Some(entry) = self.inner.write().take(entry_id) else {
            return false;
        };
        self.index
            .remove(&partition_of(entry.tenant, entry.fingerprint), entry_id);
        self.persist(Op::Delete(entry_id));
        true
    }

    fn persist(&self, op: Op) {
        if let Some(writer) = &self.writer {
            writer.submit(op);
        }
    }

    /// Removes every entry, or every entry of one tenant. Returns how many were removed.
    pub fn flush(&self, tenant: Option<TenantId>) -> usize {
        let ids: Vec<u64> = self
            .inner
            .read()
            .entries
            .values()
            .filter(|entry| tenant.is_none_or(|tenant| entry.tenant == tenant))
            .map(|entry| entry.id)
            .collect();
        ids.into_iter().filter(|id| self.remove(*id)).count()
    }

    /// Removes every entry of `tenant` (every tenant when `None`) whose prompt is at least
    /// `min_similarity` similar to `text`. Returns how many were removed.
    pub async fn invalidate(
        &self,
        text: &str,
        min_similarity: f32,
        tenant: Option<TenantId>,
    ) -> Result<usize, embed::Error> {
        let embedding = self.embed(text).await?;
        let candidates = self.index.within(&embedding, min_similarity);
        let ids: Vec<u64> = {
            let inner = self.inner.read();
            candidates
                .into_iter()
                .filter(|id| {
                    inner
                        .entries
                        .get(id)
                        .is_some_and(|entry| tenant.is_none_or(|tenant| entry.tenant == tenant))
                })
                .collect()
        };
        Ok(ids.into_iter().filter(|id| self.remove(*id)).count())
    }

    /// The newest entries first.
    pub fn recent(&self, limit: usize) -> Vec<Arc<Entry>> {
        let mut entries: Vec<Arc<Entry>> = self.inner.read().entries.values().cloned().collect();
        // Newest first; ids are random, so they say nothing of age.
        entries.sort_by_key(|entry| std::cmp::Reverse((entry.created, entry.id)));
        entries.truncate(limit);
        entries
    }

    /// The entries nearest to a text across every tenant and context, for operators.
    pub async fn nearest_anywhere(
        &self,
        text: &str,
        limit: usize,
    ) -> Result<Vec<(Arc<Entry>, f32)>, embed::Error> {
        let embedding = self.embed(text).await?;
        Ok(self
            .index
            .nearest_anywhere(&embedding, limit)
            .into_iter()
            .filter_map(|nearest| Some((self.get(nearest.entry_id)?, nearest.similarity)))
            .collect())
    }

    /// Adds recent inserts of the key's partition to its HNSW graph. Slow: call it on the
    /// blocking pool.
    pub fn catch_up(&self, key: &RequestKey) {
        self.index.catch_up(&key.partition());
    }

    /// Background upkeep: removes expired entries, saves hit counts, compacts the index and
    /// brings its graphs up to date. Slow: call it on the blocking pool.
    pub fn maintain(&self) {
        // Noticed here too, so that an idle server reports a lost store within one upkeep.
        let _ = self.store_lost();
        let now = SystemTime::now();
        let (expired, touched): (Vec<u64>, Vec<Op>) = {
            let inner = self.inner.read();
            let expired = inner
                .entries
                .values()
                .filter(|entry| entry.is_expired(now))
                .map(|entry| entry.id)
                .collect();
            let touched = inner
                .entries
                .values()
                .filter_map(|entry| {
                    let hits = entry.hits.load(Ordering::Relaxed);
                    (entry.saved_hits.swap(hits, Ordering::Relaxed) != hits).then(|| Op::Touch {
                        id: entry.id,
                        usage: store::Usage {
                            hits,
                            last_hit_ms: entry.last_used_ms.load(Ordering::Relaxed),
                            own_threshold: entry.own_threshold(),
                            wrong_reports: entry.wrong_reports.load(Ordering::Relaxed),
                        },
                    })
                })
                .collect();
            (expired, touched)
        };
        for id in expired {
            self.remove(id);
        }
        for op in touched {
            self.persist(op);
        }
        self.age();
        self.index.compact();
        self.index.catch_up_all();
    }

    /// Halves every entry's LFU frequency once the cache has seen [`AGE_EVERY`] times as many
    /// inserts and hits as it holds entries, as W-TinyLFU does: an entry popular last week but
    /// not since loses its place to today's, while steady favourites keep theirs.
    fn age(&self) {
        let now = self.clock.load(Ordering::Relaxed);
        let period = AGE_EVERY * self.config.max_entries.max(1) as u64;
        if now.saturating_sub(self.aged_at.load(Ordering::Relaxed)) < period {
            return;
        }
        self.aged_at.store(now, Ordering::Relaxed);
        for entry in self.inner.read().entries.values() {
            let _ = entry
                .frequency
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| Some(f / 2));
        }
    }

    /// Waits until every change so far is on disk.
    pub async fn flush_store(&self) -> Result<(), store::Error> {
        match &self.writer {
            Some(writer) => writer.flush().await,
            None => Ok(()),
        }
    }

    /// Saves everything and closes the store; the cache keeps serving from memory only.
    pub async fn close_store(&self) -> Result<(), store::Error> {
        match &self.writer {
            Some(writer) => writer.close().await,
            None => Ok(()),
        }
    }

    /// Changes the store could not save (disk full, I/O error): served from memory, not durable.
    /// Why the durable store can no longer keep entries, if it cannot (its file is gone).
    pub fn store_lost(&self) -> Option<String> {
        self.writer.as_ref().and_then(|writer| writer.lost())
    }

    pub fn store_failures(&self) -> u64 {
        self.writer.as_ref().map_or(0, |writer| writer.failures())
    }

    /// Number of live vectors in the index; equals the number of entries with an embedding.
    pub fn indexed(&self) -> usize {
        self.index.len()
    }

    /// Joins the in-flight upstream call for this exact key, or becomes its leader.
    pub fn join(&self, key: &RequestKey) -> Join {
        self.flights.join(key.exact)
    }

    /// Requests so far that waited for another's identical upstream call instead of making
    /// their own.
    pub fn coalesced(&self) -> u64 {
        self.flights.followers()
    }
}

/// What a feedback report did to its entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Feedback {
    /// A correct report: counted, nothing changes.
    Noted,
    /// The entry now needs at least this similarity.
    Raised(f32),
    /// Wrong once too often, or wrong on an exact match: the entry is gone.
    Evicted,
}

enum Unservable {
    Gone,
    Expired,
    TooOld,
}

fn record_of(entry: &Entry, embedding: Option<Vec<f32>>) -> Record {
    Record {
        id: entry.id,
        tenant: entry.tenant.0 .0,
        fingerprint: entry.fingerprint.0 .0,
        prompt: entry.prompt.clone(),
        embedding,
        completion: entry.answer.completion.to_vec(),
        model: entry.answer.model.clone(),
        prompt_tokens: entry.answer.usage.prompt_tokens,
        completion_tokens: entry.answer.usage.completion_tokens,
        upstream_latency_us: entry.answer.upstream_latency.as_micros() as u64,
        created_ms: unix_ms(entry.created),
        expires_ms: entry.expires.map(unix_ms),
        hits: entry.hits.load(Ordering::Relaxed),
        last_hit_ms: entry.last_used_ms.load(Ordering::Relaxed),
        own_threshold: entry.own_threshold(),
        wrong_reports: entry.wrong_reports.load(Ordering::Relaxed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::testing::FirstLetter;

    fn key(prompt: &str) -> RequestKey {
        RequestKey::new(
            TenantId::shared(),
            Fingerprint(Digest32::of("t", &[b"ctx"])),
            prompt.to_owned(),
        )
    }

    fn answer() -> Answer {
        Answer {
            completion: Bytes::from_static(b"{}"),
            model: "m".into(),
            usage: Usage::default(),
            upstream_latency: Duration::from_millis(100),
        }
    }

    const ANY: Criteria = Criteria {
        threshold: 0.5,
        max_age: None,
        verify: true,
    };

    async fn fill(cache: &Cache, prompts: &[&str]) {
        for prompt in prompts {
            let embedding = cache.embedder().embed(&[prompt]).unwrap().remove(0);
            cache.insert(&key(prompt), Some(embedding), answer(), None).await;
        }
    }

    #[tokio::test]
    async fn expired_entries_are_never_served() {
        let cache = Arc::new(Cache::new(
            Arc::new(FirstLetter { fails: false }),
            Config::default(),
        ));
        let k = key("apple");
        cache
            .insert(
                &k,
                Some(FirstLetter { fails: false }.embed(&["apple"]).unwrap().remove(0)),
                answer(),
                Some(Duration::ZERO),
            )
            .await;
        assert!(cache.lookup_exact(&k, &ANY).is_none());
        assert!(matches!(
            cache.lookup(&key("avocado"), &ANY).await.unwrap(),
            Lookup::Miss(_)
        ));
        assert_eq!(cache.len(), 0, "expired entries are removed when met");
    }

    #[tokio::test]
    async fn max_age_on_the_request_skips_older_entries() {
        let cache = Cache::new(Arc::new(FirstLetter { fails: false }), Config::default());
        fill(&cache, &["apple"]).await;
        std::thread::sleep(Duration::from_millis(20));
        let strict = Criteria {
            threshold: 0.5,
            max_age: Some(Duration::from_millis(10)),
            verify: true,
        };
        assert!(cache.lookup_exact(&key("apple"), &strict).is_none());
        assert!(cache.lookup_exact(&key("apple"), &ANY).is_some());
    }

    #[tokio::test]
    async fn lru_evicts_the_least_recently_used() {
        let config = Config {
            max_entries: 3,
            eviction: Eviction::Lru,
            ..Config::default()
        };
        let cache = Cache::new(Arc::new(FirstLetter { fails: false }), config);
        fill(&cache, &["apple", "banana", "cherry"]).await;
        assert!(cache.lookup_exact(&key("apple"), &ANY).is_some());
        fill(&cache, &["date"]).await;
        assert_eq!(cache.len(), 3);
        assert!(
            cache.lookup_exact(&key("apple"), &ANY).is_some(),
            "recently used stays"
        );
        assert!(
            cache.lookup_exact(&key("banana"), &ANY).is_none(),
            "least recently used goes"
        );
    }

    #[tokio::test]
    async fn lfu_evicts_the_least_frequently_used() {
        let config = Config {
            max_entries: 3,
            eviction: Eviction::Lfu,
            ..Config::default()
        };
        let cache = Cache::new(Arc::new(FirstLetter { fails: false }), config);
        fill(&cache, &["apple", "banana", "cherry"]).await;
        for _ in 0..3 {
            cache.lookup_exact(&key("apple"), &ANY);
            cache.lookup_exact(&key("cherry"), &ANY);
        }
        cache.lookup_exact(&key("banana"), &ANY);
        fill(&cache, &["date"]).await;
        assert!(
            cache.lookup_exact(&key("banana"), &ANY).is_none(),
            "used once: evicted"
        );
        assert!(cache.lookup_exact(&key("apple"), &ANY).is_some());
        assert!(cache.lookup_exact(&key("cherry"), &ANY).is_some());
        assert_eq!(cache.indexed(), 3, "evicted entries leave the index");
    }

    #[tokio::test]
    async fn lfu_forgets_past_popularity_as_the_cache_ages() {
        let config = Config {
            max_entries: 3,
            eviction: Eviction::Lfu,
            ..Config::default()
        };
        let cache = Cache::new(Arc::new(FirstLetter { fails: false }), config);
        fill(&cache, &["apple", "banana", "cherry"]).await;
        // Yesterday's favourite...
        for _ in 0..1000 {
            cache.lookup_exact(&key("apple"), &ANY);
        }
        // ...then ten upkeep periods of steady use of the other two, and none of it.
        for _ in 0..10 {
            for _ in 0..15 {
                cache.lookup_exact(&key("banana"), &ANY);
                cache.lookup_exact(&key("cherry"), &ANY);
            }
            cache.maintain();
        }
        fill(&cache, &["date"]).await;
        assert!(
            cache.lookup_exact(&key("apple"), &ANY).is_none(),
            "1,000 hits long ago count for less than 150 recent ones"
        );
        assert!(cache.lookup_exact(&key("cherry"), &ANY).is_some());
        let banana = cache.lookup_exact(&key("banana"), &ANY).unwrap();
        assert_eq!(
            banana.entry.hits.load(Ordering::Relaxed),
            151,
            "the hit counts shown to operators are not halved"
        );
    }

    #[tokio::test]
    async fn invalidation_removes_similar_prompts_of_the_tenant() {
        let cache = Cache::new(Arc::new(FirstLetter { fails: false }), Config::default());
        fill(&cache, &["apple", "avocado", "banana"]).await;
        let removed = cache
            .invalidate("apricot", 0.9, Some(TenantId::shared()))
            .await
            .unwrap();
        assert_eq!(removed, 2);
        assert_eq!(cache.len(), 1);
        let other = TenantId::from_api_key("sk-other");
        assert_eq!(cache.invalidate("banana", 0.9, Some(other)).await.unwrap(), 0);
    }
}

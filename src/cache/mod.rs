//! The caching policy. It does no network I/O: the edges feed it requests and upstream
//! answers, and the store (when there is one) keeps what it holds.
//!
//! - `service.rs`: the request flow (lookup, coalescing, storing, relaying), behind
//!   `protocol.rs`, the seam each API surface implements.
//! - `mod.rs`: [`Cache`] itself: inserting, removing, listing, invalidating.
//! - `entry.rs`: an entry and its lifetime; `table.rs`: the maps that find entries, and
//!   eviction; `lookup.rs`: exact and semantic lookup; `feedback.rs`: wrong-answer reports;
//!   `persist.rs`: loading, saving and background upkeep; `flight.rs`: coalescing;
//!   `key.rs`: the hashes that key entries.

mod entry;
mod feedback;
mod flight;
mod key;
mod lookup;
mod persist;
mod protocol;
mod service;
mod table;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rand::Rng;

pub use entry::{expiry, Answer, Entry, Usage, MAX_TTL};
pub use feedback::Feedback;
pub use flight::{Flight, FlightOutcome, Join};
pub use key::{partition_of, CacheInput, Digest32, ExactKey, Fingerprint, RequestKey, TenantId};
pub use lookup::{Criteria, Hit, HitKind, Lookup, Miss};
pub use protocol::{Invalid, Protocol, Replay, StreamItem, StreamReader};
pub use service::{CacheRequest, Controls, Outcome, Served, ServedBody, Service};
pub use table::Eviction;

use crate::embed::{self, Batcher, Embedder};
use crate::index::Index;
use crate::store::{EntryStore, Op};
use entry::{record_of, unix_ms};
use table::Inner;

/// Entry ids are drawn below this: the largest integer a JSON number keeps exactly in
/// JavaScript is 2^53 - 1.
const MAX_ID: u64 = 1 << 53;

#[derive(Debug, Clone)]
pub struct Config {
    /// Most entries held; 0 means no bound.
    pub max_entries: usize,
    pub eviction: Eviction,
    /// Lifetime of an entry unless its request said otherwise; `None`: no expiry.
    pub default_ttl: Option<Duration>,
    /// Threads running embedding passes; 0: as many as the embedder runs at once.
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
            batcher: Batcher::new(
                Arc::clone(&embedder),
                match config.embed_workers {
                    0 => embedder.concurrent_passes(),
                    n => n,
                },
            ),
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
            counts_changed: AtomicBool::new(false),
            own_threshold: AtomicU32::new(0),
            wrong_reports: AtomicU64::new(0),
            last_similarity: AtomicU32::new(0),
            seen_len: OnceLock::new(),
            analysis: OnceLock::new(),
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

    /// Removes every entry, or every entry of one tenant. Returns how many were removed.
    pub fn clear(&self, tenant: Option<TenantId>) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::embed::testing::FirstLetter;
    use bytes::Bytes;

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

    /// A cache of three entries, full: apple, banana, cherry.
    async fn full_cache(eviction: Eviction) -> Cache {
        let config = Config {
            max_entries: 3,
            eviction,
            ..Config::default()
        };
        let cache = Cache::new(Arc::new(FirstLetter { fails: false }), config);
        fill(&cache, &["apple", "banana", "cherry"]).await;
        cache
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
        let cache = full_cache(Eviction::Lru).await;
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
        let cache = full_cache(Eviction::Lfu).await;
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
        let cache = full_cache(Eviction::Lfu).await;
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

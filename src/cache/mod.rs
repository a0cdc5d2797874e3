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
mod items;
mod judged;
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
pub use items::{ItemsProtocol, ItemsRequest, ItemsServed};
pub use judged::vouch;
pub use key::{
    partition_of, CacheInput, Conversation, Digest32, ExactKey, Fingerprint, RequestKey, TenantId,
};
pub use lookup::{Criteria, Hit, HitKind, Lookup, Miss, Vouched};
pub use protocol::{Invalid, Protocol, Replay, StreamItem, StreamReader, Surface};
pub use service::{CacheRequest, Controls, Outcome, Served, ServedBody, Service};
pub use table::Eviction;

use crate::embed::{self, Batcher, Embedder};
use crate::index::Index;
use crate::store::redis::{Lease, RedisStore};
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
    /// The store shared with other nodes, when there is one (it is also `writer`).
    shared: Option<Arc<RedisStore>>,
}

/// This node's lease on an upstream call; dropped, it ends (a stored answer has ended it
/// already).
pub struct LeaseGuard {
    store: Arc<RedisStore>,
    exact: [u8; 32],
    token: String,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let (store, exact, token) = (
            Arc::clone(&self.store),
            self.exact,
            std::mem::take(&mut self.token),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { store.release(&exact, &token).await });
        }
    }
}

/// Why a lookup could not be made; the request then goes through as through a plain proxy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Embed(#[from] embed::Error),
    #[error("the shared store cannot be used now: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] crate::store::Error),
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
            shared: None,
        }
    }

    /// Why the shared store cannot be used now, if this cache has one that cannot.
    pub fn unavailable(&self) -> Option<String> {
        let shared = self.shared.as_ref()?;
        (!shared.is_available()).then(|| shared.lost().unwrap_or_default())
    }

    /// The store shared with other nodes, if this cache has one.
    pub fn shared(&self) -> Option<&Arc<RedisStore>> {
        self.shared.as_ref()
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
            context: key
                .context
                .as_ref()
                .map(|analysed| Arc::new(analysed.context.clone())),
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
            verdicts: Default::default(),
        });
        if self.shared.as_ref().is_some_and(|shared| !shared.is_available()) {
            // Redis went away since the lookup: nothing is kept that it has not acknowledged.
            return entry;
        }
        if let Some(writer) = &self.writer {
            let record = Box::new(record_of(&entry, embedding.clone()));
            if let Err(err) = writer.write(Op::Put(record)).await {
                tracing::error!(error = %err, entry = entry.id, "entry not saved to the store");
                if self.shared.is_some() {
                    // Other nodes cannot see it and no hit on it could be confirmed: not held.
                    return entry;
                }
                // Still served from memory: a broken disk degrades durability, not answers.
            }
        }
        let entry = self.admit(entry, embedding);
        self.evict_to_bound(Some(entry.id));
        entry
    }

    /// Adds an entry to the table and the index, unless one with its id is there already (a
    /// shared store's log may bring in this node's own entry before its store call returns):
    /// then that one is kept and returned. An entry it replaces (same exact key) goes.
    fn admit(&self, entry: Arc<Entry>, embedding: Option<Vec<f32>>) -> Arc<Entry> {
        let replaced = {
            let mut inner = self.inner.write();
            if let Some(existing) = inner.entries.get(&entry.id) {
                return Arc::clone(existing);
            }
            inner.add(Arc::clone(&entry))
        };
        if let Some(embedding) = embedding {
            self.index
                .insert(partition_of(entry.tenant, entry.fingerprint), entry.id, embedding);
        }
        if let Some(old_id) = replaced {
            if self.shared.is_some() {
                // The shared store replaced it already, for every node.
                self.forget(old_id);
            } else {
                self.remove(old_id);
            }
        }
        entry
    }

    /// Removes every entry, or every entry of one tenant, on every node when the store is
    /// shared. Returns how many were removed.
    pub async fn clear(&self, tenant: Option<TenantId>) -> Result<usize, Error> {
        let local = self.clear_local(tenant);
        match &self.shared {
            Some(shared) => Ok(shared
                .clear(tenant.map(|tenant| tenant.0 .0).as_ref())
                .await?
                .max(local)),
            None => Ok(local),
        }
    }

    fn clear_local(&self, tenant: Option<TenantId>) -> usize {
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
    ) -> Result<usize, Error> {
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
        let removed = ids.into_iter().filter(|id| self.remove(*id)).count();
        self.flush_store().await?;
        Ok(removed)
    }

    /// Removes an entry, from the store too, and waits until the store has done it: on every
    /// node when the store is shared (also when this node has not seen the entry yet).
    /// Returns whether it was there.
    pub async fn delete(&self, entry_id: u64) -> Result<bool, Error> {
        let here = self.remove(entry_id);
        let elsewhere = match &self.shared {
            Some(shared) if !here => shared.remove_one(entry_id).await?,
            _ => false,
        };
        self.flush_store().await?;
        Ok(here || elsewhere)
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

    /// With a shared store, asks for the lease on the upstream call for this exact key:
    /// `Some(Ok)` when this node makes the call, `Some(Err)` when another node is making it,
    /// `None` without a shared store (or when it cannot be asked: then the call is made).
    pub async fn lease(&self, key: &RequestKey) -> Option<Result<LeaseGuard, ()>> {
        let shared = self.shared.as_ref()?;
        match shared.lease(&key.exact.0 .0).await {
            Ok(Lease::Granted(token)) => Some(Ok(LeaseGuard {
                store: Arc::clone(shared),
                exact: key.exact.0 .0,
                token,
            })),
            Ok(Lease::Held) => Some(Err(())),
            Err(_) => None,
        }
    }

    /// Waits for the answer another node's leased call stores: `None` when its lease ends
    /// without one (its call failed) or the store cannot be asked; the caller then makes its
    /// own call.
    pub async fn await_other_node(&self, key: &RequestKey) -> Option<Hit> {
        let shared = self.shared.as_ref()?;
        let deadline = tokio::time::Instant::now() + shared.config().lease;
        let mut pause = Duration::from_millis(5);
        let exact = key.exact.0 .0;
        let mut lease_ended = false;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
            if let Some(record) = shared.exact(&exact).await.ok()? {
                let entry = self.adopt(record)?;
                shared.confirm(entry.id).await.ok()?;
                self.flights.count_follower();
                return Some(Hit {
                    entry,
                    similarity: 1.0,
                    kind: HitKind::Exact,
                    vouched: Vouched::Nothing,
                });
            }
            // Asked after the entry: a lease ended by the leader's store leaves the entry.
            if lease_ended {
                return None;
            }
            lease_ended = !shared.leased(&exact).await.ok()?;
        }
        None
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
        context_threshold: 0.5,
        max_age: None,
        verify: true,
        judge: None,
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
    async fn a_partition_past_the_inline_bound_is_searched_on_the_blocking_pool_alike() {
        let cache = Arc::new(Cache::new(
            Arc::new(FirstLetter { fails: false }),
            Config::default(),
        ));
        let unverified = Criteria { verify: false, ..ANY };
        for size in [lookup::INLINE_SEARCH_MAX, lookup::INLINE_SEARCH_MAX + 1] {
            while cache.index.partition_len(&key("a").partition()) < size {
                let n = cache.len();
                let prompt = format!("{}{n}", char::from(b'a' + (n % 25) as u8));
                fill(&cache, &[&prompt]).await;
            }
            match cache.lookup(&key("banana split"), &unverified).await.unwrap() {
                Lookup::Hit(hit) => {
                    assert!(hit.entry.prompt.starts_with('b'), "{size}: {}", hit.entry.prompt)
                }
                Lookup::Miss(miss) => panic!("{size} entries: a miss, {miss:?}"),
            }
            match cache.lookup(&key("zebra"), &unverified).await.unwrap() {
                Lookup::Miss(miss) => assert!(miss.nearest.is_some_and(|s| s < 0.5), "{size}: {miss:?}"),
                Lookup::Hit(hit) => panic!("{size} entries: zebra served {}", hit.entry.prompt),
            }
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
            context_threshold: 0.5,
            max_age: Some(Duration::from_millis(10)),
            verify: true,
            judge: None,
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

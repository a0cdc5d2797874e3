//! Persistence: loading the store at start, telling it every change, and the background
//! upkeep that saves hit counts and removes what expired.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::entry::from_unix_ms;
use super::{partition_of, Answer, Cache, Config, Digest32, Entry, Fingerprint, TenantId, Usage};
use crate::embed::Embedder;
use crate::store::{self, EntryStore, Loaded, Op};

impl Cache {
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

    /// A cache that replicates a store shared with other nodes; empty until
    /// [`RedisStore::follow`](crate::store::redis::RedisStore::follow) has loaded it. It bounds
    /// nothing itself: the shared store keeps `--max-entries` across the cluster.
    pub fn with_shared_store(
        embedder: Arc<dyn Embedder>,
        mut config: Config,
        store: Arc<crate::store::redis::RedisStore>,
    ) -> Self {
        config.max_entries = 0;
        let mut cache = Self::new(embedder, config);
        cache.writer = Some(Arc::clone(&store) as Arc<dyn EntryStore>);
        cache.shared = Some(store);
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
            let entry = self.entry_of(record);
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

    /// An entry as a record describes it, with a fresh place in the recency order.
    fn entry_of(&self, record: store::Record) -> Arc<Entry> {
        let exact = record.exact_key();
        Arc::new(Entry {
            id: record.id,
            tenant: TenantId(Digest32(record.tenant)),
            fingerprint: Fingerprint(Digest32(record.fingerprint)),
            exact,
            context: record.context.map(|stored| Arc::new(stored.context)),
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
            counts_changed: AtomicBool::new(false),
            own_threshold: AtomicU32::new(record.own_threshold.to_bits()),
            wrong_reports: AtomicU64::new(record.wrong_reports),
            last_similarity: AtomicU32::new(0),
            seen_len: OnceLock::new(),
            analysis: OnceLock::new(),
            verdicts: parking_lot::Mutex::new(record.verdicts),
            prompt: record.prompt,
        })
    }

    /// Takes in an entry another node stored (read from the shared store), unless it is
    /// already here or expired. Returns the entry held for its id.
    pub fn adopt(&self, mut record: store::Record) -> Option<Arc<Entry>> {
        if let Some(entry) = self.get(record.id) {
            return Some(entry);
        }
        let embedding = record.embedding.take();
        let entry = self.entry_of(record);
        if entry.is_expired(SystemTime::now()) {
            return None;
        }
        Some(self.admit(entry, embedding))
    }

    /// Drops an entry from memory only: the shared store said it is gone.
    pub fn forget(&self, entry_id: u64) -> bool {
        let Some(entry) = self.inner.write().take(entry_id) else {
            return false;
        };
        self.index
            .remove(&partition_of(entry.tenant, entry.fingerprint), entry_id);
        true
    }

    /// Feedback another node saved: the entry's own threshold and wrong-answer reports.
    pub fn apply_feedback(&self, entry_id: u64, own_threshold: f32, wrong_reports: u64) {
        if let Some(entry) = self.get(entry_id) {
            entry.own_threshold.store(
                own_threshold.max(entry.own_threshold()).to_bits(),
                Ordering::Relaxed,
            );
            entry.wrong_reports.fetch_max(wrong_reports, Ordering::Relaxed);
        }
    }

    /// Replaces everything held in memory by what the shared store holds. Slow: call it on
    /// the blocking pool.
    pub fn reload(&self, loaded: Loaded) {
        let ids: Vec<u64> = self.inner.read().entries.keys().copied().collect();
        let keep: std::collections::HashSet<u64> =
            loaded.records.iter().map(|(record, _)| record.id).collect();
        for id in ids.into_iter().filter(|id| !keep.contains(id)) {
            self.forget(id);
        }
        let Loaded { records, vectors } = loaded;
        let fresh: Vec<_> = records
            .into_iter()
            .filter(|(record, _)| self.get(record.id).is_none())
            .collect();
        self.restore(Loaded {
            records: fresh,
            vectors,
        });
    }

    pub(super) fn persist(&self, op: Op) {
        if let Some(writer) = &self.writer {
            writer.submit(op);
        }
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
                    let counts = entry.unsaved_counts()?;
                    Some(Op::Touch { id: entry.id, counts })
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

    /// Why the durable store can no longer keep entries, if it cannot (its file is gone).
    pub fn store_lost(&self) -> Option<String> {
        self.writer.as_ref().and_then(|writer| writer.lost())
    }

    /// Changes the store could not save (disk full, I/O error): served from memory, not durable.
    pub fn store_failures(&self) -> u64 {
        self.writer.as_ref().map_or(0, |writer| writer.failures())
    }
}

//! The caching policy: exact and semantic lookup, insertion, and coalescing of identical
//! misses. It does no network I/O; the HTTP layer feeds it keys and answers.

mod flight;
mod key;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use parking_lot::RwLock;

pub use flight::{Flight, FlightOutcome, Join};
pub use key::{partition_of, Digest32, ExactKey, Fingerprint, RequestKey, TenantId};

use crate::embed::{self, Embedder};
use crate::index::Index;

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
    pub hits: AtomicU64,
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
    /// Similarity of the best candidate that fell short of the threshold.
    pub nearest: Option<f32>,
}

#[derive(Debug, Clone)]
pub enum Lookup {
    Hit(Hit),
    Miss(Miss),
}

pub struct Cache {
    embedder: Arc<dyn Embedder>,
    index: Index,
    entries: RwLock<HashMap<u64, Arc<Entry>>>,
    exact: RwLock<HashMap<ExactKey, u64>>,
    next_id: AtomicU64,
    flights: flight::Flights,
}

impl Cache {
    pub fn new(embedder: Arc<dyn Embedder>) -> Self {
        Self {
            embedder,
            index: Index::new(),
            entries: RwLock::default(),
            exact: RwLock::default(),
            next_id: AtomicU64::new(1),
            flights: flight::Flights::default(),
        }
    }

    pub fn embedder(&self) -> &Arc<dyn Embedder> {
        &self.embedder
    }

    /// Number of entries held.
    pub fn len(&self) -> usize {
        self.entries.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, entry_id: u64) -> Option<Arc<Entry>> {
        self.entries.read().get(&entry_id).cloned()
    }

    /// The exact layer alone: no embedding is computed.
    pub fn lookup_exact(&self, key: &RequestKey) -> Option<Hit> {
        let entry_id = *self.exact.read().get(&key.exact)?;
        let entry = self.get(entry_id)?;
        entry.hits.fetch_add(1, Ordering::Relaxed);
        Some(Hit {
            entry,
            similarity: 1.0,
            kind: HitKind::Exact,
        })
    }

    /// Exact lookup, then a search by meaning among the entries of the same tenant and context.
    /// Embedding runs on the blocking pool.
    pub async fn lookup(&self, key: &RequestKey, threshold: f32) -> Result<Lookup, embed::Error> {
        if let Some(hit) = self.lookup_exact(key) {
            return Ok(Lookup::Hit(hit));
        }
        if !key.is_semantic() {
            return Ok(Lookup::Miss(Miss::default()));
        }
        let embedding = embed::embed_blocking(&self.embedder, &key.prompt).await?;
        Ok(self.lookup_embedded(key, embedding, threshold))
    }

    /// The semantic layer, for a prompt already embedded.
    pub fn lookup_embedded(&self, key: &RequestKey, embedding: Vec<f32>, threshold: f32) -> Lookup {
        let nearest = self.index.nearest(&key.partition(), &embedding);
        if let Some(nearest) = nearest.filter(|n| n.similarity >= threshold) {
            if let Some(entry) = self.get(nearest.entry_id) {
                entry.hits.fetch_add(1, Ordering::Relaxed);
                return Lookup::Hit(Hit {
                    entry,
                    similarity: nearest.similarity.min(1.0),
                    kind: HitKind::Semantic,
                });
            }
        }
        Lookup::Miss(Miss {
            embedding: Some(embedding),
            nearest: nearest.map(|n| n.similarity),
        })
    }

    /// Stores an answer. The entry is served from the moment this returns; the index's graph
    /// catches up separately (see [`Cache::catch_up`]). A previous entry for the same exact
    /// key is replaced.
    pub fn insert(&self, key: &RequestKey, embedding: Option<Vec<f32>>, answer: Answer) -> Arc<Entry> {
        let entry = Arc::new(Entry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            tenant: key.tenant,
            fingerprint: key.fingerprint,
            prompt: key.prompt.clone(),
            exact: key.exact,
            answer,
            created: SystemTime::now(),
            hits: AtomicU64::new(0),
        });
        self.entries.write().insert(entry.id, Arc::clone(&entry));
        if let Some(embedding) = embedding {
            self.index.insert(key.partition(), entry.id, embedding);
        }
        let replaced = self.exact.write().insert(key.exact, entry.id);
        if let Some(old_id) = replaced {
            self.remove(old_id);
        }
        entry
    }

    /// Removes an entry from every layer. Returns whether it was there.
    pub fn remove(&self, entry_id: u64) -> bool {
        let Some(entry) = self.entries.write().remove(&entry_id) else {
            return false;
        };
        self.index
            .remove(&partition_of(entry.tenant, entry.fingerprint), entry_id);
        let mut exact = self.exact.write();
        if exact.get(&entry.exact) == Some(&entry_id) {
            exact.remove(&entry.exact);
        }
        true
    }

    /// Removes every entry, or every entry of one tenant. Returns how many were removed.
    pub fn flush(&self, tenant: Option<TenantId>) -> usize {
        let ids: Vec<u64> = self
            .entries
            .read()
            .values()
            .filter(|entry| tenant.is_none_or(|tenant| entry.tenant == tenant))
            .map(|entry| entry.id)
            .collect();
        ids.into_iter().filter(|id| self.remove(*id)).count()
    }

    /// The newest entries first.
    pub fn recent(&self, limit: usize) -> Vec<Arc<Entry>> {
        let mut entries: Vec<Arc<Entry>> = self.entries.read().values().cloned().collect();
        entries.sort_by_key(|entry| std::cmp::Reverse(entry.id));
        entries.truncate(limit);
        entries
    }

    /// The entries nearest to a text across every tenant and context, for operators.
    pub async fn nearest_anywhere(
        &self,
        text: &str,
        limit: usize,
    ) -> Result<Vec<(Arc<Entry>, f32)>, embed::Error> {
        let embedding = embed::embed_blocking(&self.embedder, text).await?;
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

    /// Joins the in-flight upstream call for this exact key, or becomes its leader.
    pub fn join(&self, key: &RequestKey) -> Join {
        self.flights.join(key.exact)
    }
}

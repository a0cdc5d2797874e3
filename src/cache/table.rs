//! The entry table: the maps that find entries, kept in agreement under one lock, and the
//! eviction that bounds them.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use rand::Rng;

use super::{partition_of, Cache, Entry, ExactKey};
use crate::store::Op;

/// Entries sampled to choose an eviction victim (as Redis does): close to exact LRU or LFU at a
/// constant cost per eviction.
const EVICTION_SAMPLES: usize = 16;

/// LFU frequencies are halved after this many inserts and hits per entry the cache holds.
const AGE_EVERY: u64 = 10;

/// Which entry goes when the cache is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Eviction {
    /// Least recently used (or stored).
    Lru,
    /// Least frequently used; ties go to the least recently used.
    Lfu,
}

/// The in-memory layers, under one lock so they always agree.
#[derive(Default)]
pub(super) struct Inner {
    pub(super) entries: HashMap<u64, Arc<Entry>>,
    pub(super) exact: HashMap<ExactKey, u64>,
    /// Every id once, in no order, for sampling eviction victims in constant time.
    pub(super) ids: Vec<u64>,
    pub(super) id_slot: HashMap<u64, usize>,
}

impl Inner {
    pub(super) fn add(&mut self, entry: Arc<Entry>) -> Option<u64> {
        self.id_slot.insert(entry.id, self.ids.len());
        self.ids.push(entry.id);
        let replaced = self.exact.insert(entry.exact, entry.id);
        self.entries.insert(entry.id, entry);
        replaced
    }

    pub(super) fn take(&mut self, entry_id: u64) -> Option<Arc<Entry>> {
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

impl Cache {
    /// Evicts by policy until the cache is within `max_entries`, sparing `keep`.
    pub(super) fn evict_to_bound(&self, keep: Option<u64>) {
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

    /// Halves every entry's LFU frequency once the cache has seen [`AGE_EVERY`] times as many
    /// inserts and hits as it holds entries, as W-TinyLFU does: an entry popular last week but
    /// not since loses its place to today's, while steady favourites keep theirs.
    pub(super) fn age(&self) {
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
}

//! An entry: a stored answer with what identifies it, its lifetime and how it has been used.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::{Eviction, ExactKey, Fingerprint, TenantId};
use crate::context::Context;
use crate::judge::Verdicts;
use crate::store::{Record, RecordContext};
use crate::verify;

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

/// A stored answer. What identifies it is public and never changes; how it has been used is
/// the cache's to change, under the invariants of `table.rs` and `persist.rs`.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    pub tenant: TenantId,
    pub fingerprint: Fingerprint,
    /// The text compared by meaning: the prompt, or in a conversation the request with what it
    /// refers back to.
    pub prompt: String,
    pub exact: ExactKey,
    /// The conversation the entry was stored in (semantic context mode, earlier turns
    /// present), as the matcher read it. Kept unanalysed: the analyses took 14 KB for a chat
    /// of two user turns and about 100 KB for twenty, the context itself at most a few KB; they
    /// are made again when the entry is a candidate (50-400 us).
    pub context: Option<Arc<Context>>,
    pub answer: Answer,
    pub created: SystemTime,
    pub expires: Option<SystemTime>,
    pub(super) hits: AtomicU64,
    /// Milliseconds since the epoch of the last hit, or of creation before any.
    pub(super) last_used_ms: AtomicU64,
    /// Recent use, for LFU: hits, halved as the cache ages (see `Cache::age`) so that past
    /// popularity fades.
    pub(super) frequency: AtomicU64,
    /// The cache's logical clock at the last use: orders uses within the same millisecond.
    pub(super) recency: AtomicU64,
    /// Hit count last written to the store.
    pub(super) saved_hits: AtomicU64,
    /// Set when feedback changed the entry since its counts were last saved.
    pub(super) counts_changed: AtomicBool,
    /// The entry's own threshold (f32 bits), raised by wrong-answer reports; 0 means none.
    pub(super) own_threshold: AtomicU32,
    /// Wrong-answer reports received.
    pub(super) wrong_reports: AtomicU64,
    /// Similarity at which the entry was last served (f32 bits).
    pub(super) last_similarity: AtomicU32,
    /// How much of the prompt the model reads (see `Embedder::seen_len`), found when first
    /// needed.
    pub(super) seen_len: OnceLock<Option<usize>>,
    /// The prompt as the hit verifier reads it, found when the entry is first a candidate and
    /// kept: a popular entry is compared with many requests.
    pub(super) analysis: OnceLock<verify::Analysis>,
    /// The judge's verdicts on the entry, and feedback on its hits (see `judge::learn`).
    pub(super) verdicts: parking_lot::Mutex<Verdicts>,
}

impl Entry {
    /// Times the entry was served.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Wrong-answer reports received.
    pub fn wrong_reports(&self) -> u64 {
        self.wrong_reports.load(Ordering::Relaxed)
    }

    /// The counts to save, if they changed since they were last saved.
    pub(super) fn unsaved_counts(&self) -> Option<crate::store::Counts> {
        let hits = self.hits();
        let hits_changed = self.saved_hits.swap(hits, Ordering::Relaxed) != hits;
        let feedback_changed = self.counts_changed.swap(false, Ordering::Relaxed);
        (hits_changed || feedback_changed).then(|| crate::store::Counts {
            hits,
            last_hit_ms: self.last_used_ms.load(Ordering::Relaxed),
            own_threshold: self.own_threshold(),
            wrong_reports: self.wrong_reports(),
        })
    }

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

    pub(super) fn touch(&self, clock: &AtomicU64) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        self.frequency.fetch_add(1, Ordering::Relaxed);
        self.last_used_ms
            .store(unix_ms(SystemTime::now()), Ordering::Relaxed);
        self.recency
            .store(clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Lowest goes first.
    pub(super) fn eviction_score(&self, policy: Eviction) -> (u64, u64) {
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

pub(super) fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

pub(super) fn record_of(entry: &Entry, embedding: Option<Vec<f32>>) -> Record {
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
        context: entry.context.as_ref().map(|context| RecordContext {
            exact: entry.exact.0 .0,
            context: Context::clone(context),
        }),
        verdicts: entry.verdicts.lock().clone(),
    }
}

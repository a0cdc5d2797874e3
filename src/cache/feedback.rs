//! Feedback: what an application or operator says about an answer it was served.

use std::sync::atomic::Ordering;

use super::Cache;
use crate::store::{Counts, Op};

/// Wrong-answer reports after which an entry is evicted.
const WRONG_REPORTS_TO_EVICT: u64 = 3;

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

impl Cache {
    /// Feedback from the application on an answer it was served. A wrong answer raises the
    /// entry's own threshold just above the similarity at which it was served (an exact hit
    /// being wrong means the answer itself is), and repeated reports evict it. Feedback on a
    /// semantic hit is also a verdict the judge's learning counts (`judge::learn`).
    pub fn report(&self, entry_id: u64, correct: bool, similarity: Option<f32>) -> Option<Feedback> {
        let entry = self.get(entry_id)?;
        let served_at =
            similarity.unwrap_or_else(|| f32::from_bits(entry.last_similarity.load(Ordering::Relaxed)));
        if served_at > 0.0 && served_at < 0.9999 {
            self.learn_from_feedback(&entry, served_at, correct);
        }
        if correct {
            return Some(Feedback::Noted);
        }
        let reports = entry.wrong_reports.fetch_add(1, Ordering::Relaxed) + 1;
        // Wrong at similarity 1, or never served at all (an operator's verdict on the answer
        // itself): nothing else could be served from it.
        if reports >= WRONG_REPORTS_TO_EVICT || served_at >= 0.9999 || served_at <= 0.0 {
            self.remove(entry_id);
            return Some(Feedback::Evicted);
        }
        let raised = (served_at + 0.005).min(1.0).max(entry.own_threshold());
        entry.own_threshold.store(raised.to_bits(), Ordering::Relaxed);
        // Saved at once (every node applies it from a shared store); `flush_store` waits.
        self.persist(Op::Touch {
            id: entry_id,
            counts: Counts {
                hits: entry.hits(),
                last_hit_ms: entry.last_used_ms.load(Ordering::Relaxed),
                own_threshold: raised,
                wrong_reports: reports,
            },
        });
        Some(Feedback::Raised(raised))
    }
}

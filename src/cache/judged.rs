//! The judge's part in a lookup: verdicts remembered per (entry, request), learned per entry,
//! and the asking itself.

use std::sync::atomic::Ordering;

use http::HeaderValue;

use super::{Cache, Entry, ExactKey, Hit, RequestKey};
use crate::judge::{self, Confidence, Judge, Policy, Question, Ruling};
use crate::store::Op;

impl Cache {
    /// What `entry`'s verdicts say of serving it at `similarity`.
    pub(super) fn confidence(&self, entry: &Entry, similarity: f32, policy: &Policy) -> Confidence {
        entry
            .verdicts
            .lock()
            .confidence(similarity, policy.floor, policy.max_error)
    }

    /// The lowest similarity at which `entry` is served without the judge, if any.
    pub fn judge_bound(&self, entry: &Entry, policy: &Policy) -> Option<f32> {
        entry.verdicts.lock().bound(policy.floor, policy.max_error)
    }

    /// A verdict on `entry` for `request`, at `similarity`: remembered for that request,
    /// learned by the entry and the cache, and saved with the entry.
    pub fn learn(&self, entry: &Entry, request: &ExactKey, similarity: f32, approved: bool) {
        let verdicts = {
            let mut verdicts = entry.verdicts.lock();
            verdicts.add(request.0 .0, similarity, approved);
            verdicts.clone()
        };
        self.persist(Op::Judged {
            id: entry.id,
            verdicts: Box::new(verdicts),
        });
    }

    /// Feedback on a hit served at `similarity` is a verdict too.
    pub(super) fn learn_from_feedback(&self, entry: &Entry, similarity: f32, correct: bool) {
        let verdicts = {
            let mut verdicts = entry.verdicts.lock();
            if correct {
                verdicts.learn(similarity, true);
            } else {
                verdicts.refute(similarity);
            }
            verdicts.clone()
        };
        self.persist(Op::Judged {
            id: entry.id,
            verdicts: Box::new(verdicts),
        });
    }

    /// Counts a hit the judge approved (the lookup counts the others).
    fn served(&self, entry: &Entry, similarity: f32) {
        entry.touch(&self.clock);
        entry
            .last_similarity
            .store(similarity.to_bits(), Ordering::Relaxed);
    }

    /// The judge's verdicts on `entry`, for the admin API.
    pub fn verdicts(&self, entry: &Entry) -> judge::Verdicts {
        entry.verdicts.lock().clone()
    }
}

/// Asks about a candidate the lookup was not sure of (`Miss::unsure`): a verdict already given
/// on this entry for this exact request is used again; otherwise the judge is asked, and its
/// verdict learned. An approved candidate is counted as served.
pub async fn vouch(
    cache: &Cache,
    judge: &Judge,
    key: &RequestKey,
    candidate: &Hit,
    credential: Option<&HeaderValue>,
) -> Ruling {
    let entry = &candidate.entry;
    let remembered = entry.verdicts.lock().on(&key.exact.0 .0);
    let ruling = match remembered {
        Some(approved) => Ruling::Remembered(approved),
        None => {
            let stored_context = entry.context.as_deref();
            let asked_context = key.context.as_deref().map(|analysed| &analysed.context);
            let question = Question {
                stored: judge::request_of(&entry.prompt, stored_context),
                stored_context,
                asked: judge::request_of(&key.prompt, asked_context),
                asked_context,
            };
            let ruling = judge.ask(&question, credential).await;
            if let Ruling::Judged { approved, .. } = ruling {
                cache.learn(entry, &key.exact, candidate.similarity, approved);
            }
            ruling
        }
    };
    if ruling.approved() {
        cache.served(entry, candidate.similarity);
    }
    ruling
}

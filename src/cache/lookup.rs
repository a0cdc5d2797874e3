//! Lookup: the exact layer, then candidates by meaning from the request's own partition,
//! checked for age, for their own threshold and by the hit verifier.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{Cache, Entry, Error, RequestKey};
use crate::context::{self, Analysed, Context};
use crate::embed;
use crate::judge::{Confidence, Policy};
use crate::store::EntryStore;
use crate::verify::{self, Rejection};

/// Candidates above the threshold considered by a semantic lookup, most similar first: an
/// expired or refused one gives way to the next.
const CANDIDATES: usize = 4;

/// Largest partition searched on the request's own thread (see [`Cache::lookup_semantic`]).
pub(super) const INLINE_SEARCH_MAX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HitKind {
    /// The same prompt in the same context; no embedding was computed.
    Exact,
    /// A prompt close enough in meaning, in the same context.
    Semantic,
    /// A request close enough in meaning whose conversation (its own or the entry's) was
    /// compared turn by turn: the semantic context mode.
    Conversation,
}

#[derive(Debug, Clone)]
pub struct Hit {
    pub entry: Arc<Entry>,
    pub similarity: f32,
    pub kind: HitKind,
    /// What vouched for it besides similarity and the verifier.
    pub vouched: Vouched,
}

/// What vouched for a hit besides its similarity and the verifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vouched {
    /// Nothing else: no judge, or a hit the judge is not asked about (an exact one).
    Nothing,
    /// The judge approved it (for this request, now or before).
    Judge,
    /// The entry's verdicts so far: its learned bound let it be served without asking.
    Learned,
}

impl Vouched {
    /// The `x-semcache-judged` header's value: `yes` or `learned`; none when not judged.
    pub fn header(self) -> Option<&'static str> {
        match self {
            Vouched::Nothing => None,
            Vouched::Judge => Some("yes"),
            Vouched::Learned => Some("learned"),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Miss {
    /// The prompt's embedding, kept so that storing the answer need not compute it again.
    pub embedding: Option<Vec<f32>>,
    /// Similarity of the best candidate that was not served: below the threshold, or refused.
    pub nearest: Option<f32>,
    /// Why the best candidate above the threshold was refused by the verifier, if it was.
    pub refused: Option<Rejection>,
    /// With a judge: the most similar candidate that passed every other check but is served
    /// only if the judge approves it (see [`crate::cache::vouch`]).
    pub unsure: Option<Hit>,
    /// Candidates passed over without asking the judge: their verdicts said no.
    pub passed_over: u32,
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
    /// The threshold for a candidate compared as a conversation (the semantic context mode:
    /// either side has earlier turns), whose compared text is the request with what it refers
    /// back to. The conversation matcher refuses what differs in details and decisions, so it
    /// may be lower than `threshold` (see [`crate::config::DEFAULT_CONTEXT_THRESHOLD`]).
    pub context_threshold: f32,
    /// Entries older than this are not served (`Cache-Control: max-age` on the request).
    pub max_age: Option<Duration>,
    /// Whether semantic candidates must pass the hit verifier.
    pub verify: bool,
    /// With a judge: candidates from its floor up (below the thresholds too) are the judge's
    /// to approve, unless their entry is confident at that similarity.
    pub judge: Option<Policy>,
}

enum Unservable {
    Gone,
    Expired,
    TooOld,
}

impl Cache {
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
            vouched: Vouched::Nothing,
        })
    }

    /// Exact lookup, then a search by meaning among the entries of the same tenant and context.
    /// With a shared store, an exact key another node stored is looked for there too, and a
    /// hit is served only once the store confirms its entry is still there (a refuted one is
    /// dropped and the next candidate tried).
    pub async fn lookup(self: &Arc<Self>, key: &RequestKey, criteria: &Criteria) -> Result<Lookup, Error> {
        let Some(shared) = &self.shared else {
            if let Some(hit) = self.lookup_exact(key, criteria) {
                return Ok(Lookup::Hit(hit));
            }
            return self.lookup_semantic(key, criteria).await;
        };
        if !shared.is_available() {
            return Err(Error::Unavailable(shared.lost().unwrap_or_default()));
        }
        for _ in 0..CANDIDATES {
            let hit = match self.lookup_exact(key, criteria) {
                Some(hit) => hit,
                None => {
                    // An exact key stored on another node and not applied here yet is asked
                    // for alongside the search by meaning, so that it costs no extra wait.
                    let (remote, semantic) =
                        tokio::join!(shared.exact(&key.exact.0 .0), self.lookup_semantic(key, criteria));
                    let remote = remote?.and_then(|record| {
                        self.adopt(record)?;
                        self.lookup_exact(key, criteria)
                    });
                    match (remote, semantic?) {
                        (Some(hit), _) | (None, Lookup::Hit(hit)) => hit,
                        (None, Lookup::Miss(mut miss)) => {
                            // A candidate for the judge must still be there before it is asked.
                            if let Some(unsure) = &miss.unsure {
                                if !shared.confirm(unsure.entry.id).await? {
                                    self.forget(unsure.entry.id);
                                    miss.unsure = None;
                                }
                            }
                            return Ok(Lookup::Miss(miss));
                        }
                    }
                }
            };
            if shared.confirm(hit.entry.id).await? {
                return Ok(Lookup::Hit(hit));
            }
            self.forget(hit.entry.id);
        }
        Ok(Lookup::Miss(Miss::default()))
    }

    /// The exact layer, confirmed by the shared store when there is one.
    pub async fn lookup_exact_confirmed(
        &self,
        key: &RequestKey,
        criteria: &Criteria,
    ) -> Result<Option<Hit>, Error> {
        let Some(hit) = self.lookup_exact(key, criteria) else {
            return Ok(None);
        };
        match &self.shared {
            Some(shared) if !shared.confirm(hit.entry.id).await? => {
                self.forget(hit.entry.id);
                Ok(None)
            }
            _ => Ok(Some(hit)),
        }
    }

    /// A search by meaning among the entries of the same tenant and context. Embedding runs
    /// on a batching thread. The search runs where the request does while its partition is
    /// small (tens of microseconds), and on a blocking thread past [`INLINE_SEARCH_MAX`]
    /// entries: with the verifier it takes a few hundred microseconds at 100k entries, too long
    /// to hold an async worker. The hop to a blocking thread costs about 0.2 ms on its own.
    async fn lookup_semantic(
        self: &Arc<Self>,
        key: &RequestKey,
        criteria: &Criteria,
    ) -> Result<Lookup, Error> {
        // With nothing to compare with (a new conversation, a new tenant), the embedding is not
        // needed before the upstream call: the caller can compute it alongside, for storing.
        let entries = if key.is_semantic() {
            self.index.partition_len(&key.partition())
        } else {
            0
        };
        if entries == 0 {
            return Ok(Lookup::Miss(Miss::default()));
        }
        let embedding = self.embed(&key.prompt).await?;
        if entries <= INLINE_SEARCH_MAX {
            return Ok(self.lookup_embedded(key, embedding, criteria));
        }
        let cache = Arc::clone(self);
        let (key, criteria) = (key.clone(), *criteria);
        tokio::task::spawn_blocking(move || cache.lookup_embedded(&key, embedding, &criteria))
            .await
            .map_err(|err| embed::Error::Task(format!("the index search failed: {err}")).into())
    }

    /// The semantic layer, for a prompt already embedded. Candidates above the threshold (and
    /// above their own, feedback-raised threshold) are tried most similar first; the first that
    /// is servable and passes the verifier is the hit.
    pub fn lookup_embedded(&self, key: &RequestKey, embedding: Vec<f32>, criteria: &Criteria) -> Lookup {
        let partition = key.partition();
        let candidates = self.index.top(&partition, &embedding, CANDIDATES);
        let mut refused: Option<(Rejection, f32)> = None;
        let mut passed_over = 0;
        let mut best_unserved = candidates.first().map(|c| c.similarity);
        // The request's prompt, analysed once for all its candidates.
        let (mut query_seen, mut query) = (None, None);
        // The request's conversation, or its prompt read as a one-turn one, for the matcher.
        let mut asked: Option<Arc<Analysed>> = key.context.clone();
        let lowest = if key.conversations {
            criteria.threshold.min(criteria.context_threshold)
        } else {
            criteria.threshold
        };
        let lowest = criteria.judge.map_or(lowest, |judge| lowest.min(judge.floor));
        for candidate in candidates.iter().filter(|c| c.similarity >= lowest) {
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
            let in_conversation = key.context.is_some() || entry.context.is_some();
            if entry.context.is_some() && !key.conversations {
                // Stored in a conversation; this request's earlier turns, if any, are exact.
                continue;
            }
            let threshold = if in_conversation {
                criteria.context_threshold
            } else {
                criteria.threshold
            };
            let judged = criteria.judge.filter(|judge| candidate.similarity >= judge.floor);
            if candidate.similarity < threshold && judged.is_none() {
                continue;
            }
            if criteria.verify {
                let query_seen = *query_seen.get_or_insert_with(|| self.embedder.seen_len(&key.prompt));
                let entry_seen = *entry
                    .seen_len
                    .get_or_init(|| self.embedder.seen_len(&entry.prompt));
                let verdict =
                    verify::unseen(&key.prompt, query_seen, &entry.prompt, entry_seen).and_then(|()| {
                        if in_conversation {
                            let stored = match &entry.context {
                                Some(context) => Context::clone(context).analysed(),
                                None => Context::of(&[], &entry.prompt).analysed(),
                            };
                            let asked = asked
                                .get_or_insert_with(|| Arc::new(Context::of(&[], &key.prompt).analysed()));
                            return context::check(&stored, asked);
                        }
                        let stored = entry.analysis.get_or_init(|| verify::Analysis::of(&entry.prompt));
                        verify::check(
                            stored,
                            query.get_or_insert_with(|| verify::Analysis::of(&key.prompt)),
                        )
                    });
                if let Err(rejection) = verdict {
                    tracing::debug!(entry = entry.id, reason = rejection.reason.as_str(), detail = %rejection.detail, "candidate refused");
                    refused.get_or_insert((rejection, candidate.similarity));
                    continue;
                }
            }
            let similarity = candidate.similarity.min(1.0);
            let kind = if in_conversation {
                HitKind::Conversation
            } else {
                HitKind::Semantic
            };
            let mut vouched = Vouched::Nothing;
            if let Some(judge) = judged {
                vouched = Vouched::Learned;
                match self.confidence(&entry, similarity, &judge) {
                    Confidence::Serve => {}
                    Confidence::PassOver => {
                        passed_over += 1;
                        continue;
                    }
                    Confidence::Ask => {
                        // One judge call per request at most: for the most similar candidate left.
                        return Lookup::Miss(Miss {
                            embedding: Some(embedding),
                            nearest: Some(similarity),
                            refused: refused.map(|(rejection, _)| rejection),
                            unsure: Some(Hit {
                                entry,
                                similarity,
                                kind,
                                vouched: Vouched::Judge,
                            }),
                            passed_over,
                        });
                    }
                }
            }
            entry.touch(&self.clock);
            entry
                .last_similarity
                .store(similarity.to_bits(), Ordering::Relaxed);
            return Lookup::Hit(Hit {
                entry,
                similarity,
                kind,
                vouched,
            });
        }
        if let Some((_, similarity)) = &refused {
            best_unserved = Some(*similarity);
        }
        Lookup::Miss(Miss {
            embedding: Some(embedding),
            nearest: best_unserved,
            refused: refused.map(|(rejection, _)| rejection),
            unsure: None,
            passed_over,
        })
    }
}

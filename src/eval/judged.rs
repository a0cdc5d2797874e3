//! The evals through the judge: each query looked up as the server would with a judge, in
//! order, so that entries learn from the verdicts as they do in service. The judge is a model
//! over HTTP (`--judge-model`, what a user with a key measures on their own data) or simulated
//! from the labels with a stated accuracy (`--judge-simulated`), against the verifier alone.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use http::HeaderValue;
use serde::Serialize;

use super::{answer, embed_all, key, percent, progress, Intent, Pair};
use crate::cache::{self, Cache, Criteria, Digest32, Lookup, RequestKey, TenantId, Usage, Vouched};
use crate::embed::{Embedder, Error as EmbedError};
use crate::judge::{self, Ask, Failure, Judge, Policy, Question, Reply, Ruling};

/// Whether the answer stored for the first request is right for the second, from the labels.
pub type Truth = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// A judge that knows the labels and is right `accuracy` of the time: whether it errs on a
/// question is drawn from the question and the seed, so that a run reads the same every time.
pub struct Simulated {
    truth: Truth,
    accuracy: f64,
    seed: u64,
}

impl Simulated {
    pub fn new(truth: Truth, accuracy: f64, seed: u64) -> Self {
        Self {
            truth,
            accuracy,
            seed,
        }
    }
}

impl Ask for Simulated {
    fn ask<'a>(
        &'a self,
        question: &'a Question<'a>,
        _credential: Option<&'a HeaderValue>,
    ) -> BoxFuture<'a, Result<Reply, Failure>> {
        let right = (self.truth)(question.stored, question.asked);
        let digest = Digest32::of(
            "semcache/eval/judge",
            &[
                &self.seed.to_le_bytes(),
                question.stored.as_bytes(),
                question.asked.as_bytes(),
            ],
        );
        let draw = u64::from_le_bytes(digest.0[..8].try_into().expect("8 bytes")) as f64 / u64::MAX as f64;
        let verdict = if draw < self.accuracy { right } else { !right };
        // What a real call would cost: about four characters a token, and a one-token answer.
        let chars = judge::SYSTEM.len() + judge::prompt(question).len();
        let usage = Usage {
            prompt_tokens: chars.div_ceil(4) as u64,
            completion_tokens: 1,
        };
        Box::pin(async move {
            Ok(Reply {
                verdict: Some(verdict),
                usage,
            })
        })
    }
}

/// A simulated judge as the cache uses it.
pub fn simulated(truth: Truth, accuracy: f64, seed: u64, policy: Policy) -> Judge {
    Judge::new(
        Arc::new(Simulated::new(truth, accuracy, seed)),
        format!("simulated, {} right", percent(accuracy)),
        policy,
        Duration::from_secs(60),
    )
}

/// One way of serving the queries: with a judge, or the verifier alone.
#[derive(Debug, Clone, Serialize)]
pub struct JudgedRow {
    /// The judge's name, or "verifier alone".
    pub judge: String,
    pub requests: usize,
    pub hits: usize,
    /// Hits whose answer the labels say is another question's.
    pub wrong: usize,
    pub hit_rate: f64,
    pub wrong_share: f64,
    /// Calls made to the judge (answered or failed).
    pub judge_calls: usize,
    pub judge_failures: usize,
    /// Hits served on an entry's learned bound, without a call.
    pub learned_hits: usize,
    /// Candidates passed over on their entry's verdicts, without a call.
    pub passed_over: usize,
    pub judge_prompt_tokens: u64,
    pub judge_completion_tokens: u64,
    /// Mean time a judge call took, in milliseconds.
    pub judge_mean_latency_ms: f64,
    /// Time all judge calls took.
    #[serde(skip)]
    latency: Duration,
}

impl JudgedRow {
    /// An empty row for `requests` requests through `judge`.
    pub fn new(judge: Option<&Judge>, requests: usize) -> Self {
        Self {
            judge: judge.map_or_else(|| "verifier alone".to_owned(), |judge| judge.model.clone()),
            requests,
            hits: 0,
            wrong: 0,
            hit_rate: 0.0,
            wrong_share: 0.0,
            judge_calls: 0,
            judge_failures: 0,
            learned_hits: 0,
            passed_over: 0,
            judge_prompt_tokens: 0,
            judge_completion_tokens: 0,
            judge_mean_latency_ms: 0.0,
            latency: Duration::ZERO,
        }
    }

    /// Counts what asking the judge came to.
    pub fn count(&mut self, ruling: &Ruling) {
        if let Ruling::Judged { usage, latency, .. } | Ruling::Failed { usage, latency, .. } = ruling {
            self.judge_calls += 1;
            self.judge_prompt_tokens += usage.prompt_tokens;
            self.judge_completion_tokens += usage.completion_tokens;
            self.latency += *latency;
        }
        if matches!(ruling, Ruling::Failed { .. }) {
            self.judge_failures += 1;
        }
    }

    /// The row with its rates worked out.
    pub fn finish(mut self) -> Self {
        self.hit_rate = super::ratio(self.hits, self.requests);
        self.wrong_share = super::ratio(self.wrong, self.hits);
        if self.judge_calls > 0 {
            self.judge_mean_latency_ms = self.latency.as_secs_f64() * 1000.0 / self.judge_calls as f64;
        }
        self
    }

    pub fn per_thousand(&self, count: usize) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            count as f64 * 1000.0 / self.requests as f64
        }
    }
}

/// Asks every query in order at `threshold`, verifier on, through `judge` if there is one.
/// `right(query, item)` says whether serving stored item `item` to query `query` is right;
/// `item_of` maps an entry id to the stored item's number.
pub(super) async fn serve_all(
    cache: &Cache,
    queries: &[(RequestKey, Vec<f32>)],
    item_of: &HashMap<u64, usize>,
    threshold: f32,
    judge: Option<&Judge>,
    right: &dyn Fn(usize, usize) -> bool,
) -> JudgedRow {
    let bar = progress(queries.len(), "judging");
    let mut row = JudgedRow::new(judge, queries.len());
    let criteria = Criteria {
        threshold,
        context_threshold: threshold,
        max_age: None,
        verify: true,
        judge: judge.map(|judge| judge.policy),
    };
    for (query, (key, embedding)) in queries.iter().enumerate() {
        let served = match cache.lookup_exact(key, &criteria) {
            Some(hit) => Some(hit),
            None => match cache.lookup_embedded(key, embedding.clone(), &criteria) {
                Lookup::Hit(hit) => Some(hit),
                Lookup::Miss(miss) => {
                    row.passed_over += miss.passed_over as usize;
                    match (judge, miss.unsure) {
                        (Some(judge), Some(candidate)) => {
                            let ruling = cache::vouch(cache, judge, key, &candidate, None).await;
                            row.count(&ruling);
                            ruling.approved().then_some(candidate)
                        }
                        _ => None,
                    }
                }
            },
        };
        if let Some(hit) = served {
            row.hits += 1;
            row.learned_hits += usize::from(hit.vouched == Vouched::Learned);
            row.wrong += usize::from(!right(query, item_of[&hit.entry.id]));
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    row.finish()
}

/// Labelled pairs through each judge (`None`: the verifier alone), each on a cache of its own:
/// each pair's first question stored, its second asked, in a partition of its own.
pub async fn judge_pairs(
    embedder: &Arc<dyn Embedder>,
    pairs: &[Pair],
    threshold: f32,
    judges: &[Option<Judge>],
) -> Result<Vec<JudgedRow>, EmbedError> {
    let texts = pairs
        .iter()
        .flat_map(|pair| [pair.a.clone(), pair.b.clone()])
        .collect();
    let vectors = embed_all(embedder, texts).await?;
    let mut rows = Vec::with_capacity(judges.len());
    for judge in judges {
        let cache = Cache::new(Arc::clone(embedder), crate::cache::Config::default());
        let (mut item_of, mut queries) = (HashMap::new(), Vec::with_capacity(pairs.len()));
        for (i, (pair, vectors)) in pairs.iter().zip(vectors.chunks(2)).enumerate() {
            let tenant = TenantId(Digest32::of("semcache/eval/pair", &[&(i as u64).to_le_bytes()]));
            let entry = cache
                .insert(&key(tenant, &pair.a), Some(vectors[0].clone()), answer(), None)
                .await;
            item_of.insert(entry.id, i);
            queries.push((key(tenant, &pair.b), vectors[1].clone()));
        }
        let right = |query: usize, _item: usize| pairs[query].duplicate;
        rows.push(serve_all(&cache, &queries, &item_of, threshold, judge.as_ref(), &right).await);
    }
    Ok(rows)
}

/// What the labels of pairs say of two questions: the pair's label, either way round.
pub fn pairs_truth(pairs: &[Pair]) -> Truth {
    let labels: HashMap<(String, String), bool> = pairs
        .iter()
        .flat_map(|pair| {
            [
                ((pair.a.clone(), pair.b.clone()), pair.duplicate),
                ((pair.b.clone(), pair.a.clone()), pair.duplicate),
            ]
        })
        .collect();
    Arc::new(move |a: &str, b: &str| {
        labels
            .get(&(a.to_owned(), b.to_owned()))
            .copied()
            .unwrap_or(a == b)
    })
}

/// Intent-labelled queries through each judge, each on a cache of its own holding every
/// training query.
pub async fn judge_intents(
    embedder: &Arc<dyn Embedder>,
    train: &[Intent],
    test: &[Intent],
    threshold: f32,
    judges: &[Option<Judge>],
) -> Result<Vec<JudgedRow>, EmbedError> {
    let texts = train
        .iter()
        .chain(test)
        .map(|intent| intent.text.clone())
        .collect();
    let vectors = embed_all(embedder, texts).await?;
    let (stored, asked) = vectors.split_at(train.len());
    let tenant = TenantId(Digest32::of("semcache/eval/intents", &[]));
    let queries: Vec<_> = test
        .iter()
        .zip(asked)
        .map(|(query, vector)| (key(tenant, &query.text), vector.clone()))
        .collect();
    let mut rows = Vec::with_capacity(judges.len());
    for judge in judges {
        let cache = Cache::new(Arc::clone(embedder), crate::cache::Config::default());
        let mut item_of = HashMap::new();
        for (i, (intent, vector)) in train.iter().zip(stored).enumerate() {
            let entry = cache
                .insert(&key(tenant, &intent.text), Some(vector.clone()), answer(), None)
                .await;
            item_of.insert(entry.id, i);
        }
        let right = |query: usize, item: usize| train[item].category == test[query].category;
        rows.push(serve_all(&cache, &queries, &item_of, threshold, judge.as_ref(), &right).await);
    }
    Ok(rows)
}

/// What intent labels say of two queries: whether they have the same intent.
pub fn intents_truth(train: &[Intent], test: &[Intent]) -> Truth {
    let category: HashMap<String, String> = train
        .iter()
        .chain(test)
        .map(|intent| (intent.text.clone(), intent.category.clone()))
        .collect();
    Arc::new(move |a: &str, b: &str| {
        a == b || category.get(a).is_some_and(|of_a| category.get(b) == Some(of_a))
    })
}

/// The rows as a Markdown table.
pub fn judged_table(rows: &[JudgedRow], threshold: f32, policy: &Policy) -> String {
    let mut out = format!(
        "Through the judge: threshold {threshold:.2}, verifier on; judged from {:.2} up, \
         judge skipped where an entry's expected wrong-hit share is at most {}.\n\n\
         | judge | hit rate | wrong-hit share | judge calls / 1,000 requests | served on learned bounds / 1,000 | passed over / 1,000 | judge tokens / call |\n\
         |---|---|---|---|---|---|---|\n",
        policy.floor,
        percent(f64::from(policy.max_error)),
    );
    for row in rows {
        let tokens = if row.judge_calls == 0 {
            "-".to_owned()
        } else {
            format!(
                "{:.0}",
                (row.judge_prompt_tokens + row.judge_completion_tokens) as f64 / row.judge_calls as f64
            )
        };
        out.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {tokens} |\n",
            row.judge,
            percent(row.hit_rate),
            percent(row.wrong_share),
            row.per_thousand(row.judge_calls),
            row.per_thousand(row.learned_hits),
            row.per_thousand(row.passed_over),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_simulated_judge_errs_at_its_stated_rate_and_the_same_way_every_run() {
        let truth: Truth = Arc::new(|a: &str, b: &str| a.len() % 2 == b.len() % 2);
        let judge = Simulated::new(Arc::clone(&truth), 0.9, 7);
        let texts: Vec<String> = (0..2000).map(|n| format!("question number {n}")).collect();
        let mut wrong = 0;
        for pair in texts.windows(2) {
            let question = Question {
                stored: &pair[0],
                stored_context: None,
                asked: &pair[1],
                asked_context: None,
            };
            let reply = judge.ask(&question, None).await.unwrap();
            let again = judge.ask(&question, None).await.unwrap();
            assert_eq!(reply, again);
            assert!(reply.usage.prompt_tokens > 50);
            wrong += usize::from(reply.verdict != Some(truth(&pair[0], &pair[1])));
        }
        let share = wrong as f64 / 1999.0;
        assert!((0.08..0.12).contains(&share), "{share}");
    }
}

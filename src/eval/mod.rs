//! Answer quality on labelled data, measured through the server's own lookup.
//!
//! Every query goes through [`Cache::lookup_exact`] and [`Cache::lookup_embedded`], the calls
//! the HTTP layer makes, so what is measured is what is served. One lookup per query at the
//! lowest threshold of the grid gives the outcome at every threshold: a lookup serves the most
//! similar candidate that passes the checks, so at a higher threshold it serves the same entry
//! if that entry is still above it, and nothing otherwise.

mod conversations;
mod data;
mod judged;
mod plot;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

pub use conversations::{
    conversations_series, conversations_table, eval_conversations, eval_conversations_semantic,
    judge_conversations, read_conversations, ConversationPair, ConversationsReport, ConversationsRow, Kind,
};
pub use data::{read_intents, read_pairs, sample, Intent, Pair};
pub use judged::{
    intents_truth, judge_intents, judge_pairs, judged_table, pairs_truth, simulated, JudgedRow, Simulated,
    Truth,
};
pub use plot::{plot, Series};

use crate::cache::{Answer, Cache, Criteria, Digest32, Fingerprint, Lookup, RequestKey, TenantId, Usage};
use crate::embed::{Embedder, Error as EmbedError};

/// Texts embedded per forward pass.
const BATCH: usize = 32;

/// Thresholds to report, as hundredths so that the grid is exact.
#[derive(Debug, Clone)]
pub struct Grid {
    hundredths: Vec<u32>,
}

impl Grid {
    /// `from..=to` in steps, all in hundredths.
    pub fn new(from: u32, to: u32, step: u32) -> Self {
        let step = step.max(1);
        Self {
            hundredths: (from..=to.min(100)).step_by(step as usize).collect(),
        }
    }

    /// Parses `FROM:TO:STEP`, e.g. `0.70:0.98:0.02`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let [from, to, step] = parts[..] else {
            return Err(format!("expected FROM:TO:STEP, got {text:?}"));
        };
        let hundredths = |part: &str| -> Result<u32, String> {
            let value: f64 = part.parse().map_err(|_| format!("{part:?} is not a number"))?;
            if !(0.0..=1.0).contains(&value) {
                return Err(format!("{value} is outside [0, 1]"));
            }
            Ok((value * 100.0).round() as u32)
        };
        let (from, to, step) = (hundredths(from)?, hundredths(to)?, hundredths(step)?);
        if step == 0 || from > to {
            return Err(format!("{text:?} is an empty range"));
        }
        Ok(Self::new(from, to, step))
    }

    /// Also reports at `threshold` (the serving default), if it is not on the grid.
    pub fn with(mut self, threshold: f32) -> Self {
        let hundredths = (threshold * 100.0).round() as u32;
        if !self.hundredths.contains(&hundredths) {
            self.hundredths.push(hundredths);
            self.hundredths.sort_unstable();
        }
        self
    }

    pub fn thresholds(&self) -> impl Iterator<Item = f32> + '_ {
        self.hundredths.iter().map(|&h| h as f32 / 100.0)
    }

    fn lowest(&self) -> f32 {
        self.thresholds().next().unwrap_or(0.0)
    }
}

/// What one lookup served: the stored item's number and the similarity it was served at.
#[derive(Debug, Clone, Copy)]
struct Served {
    item: usize,
    similarity: f32,
}

/// The outcome of each query, with and without the hit verifier.
struct Outcomes {
    plain: Vec<Option<Served>>,
    verified: Vec<Option<Served>>,
}

impl Outcomes {
    fn of(&self, verified: bool) -> &[Option<Served>] {
        if verified {
            &self.verified
        } else {
            &self.plain
        }
    }
}

/// Served at `threshold`: the lookup at the grid's lowest threshold served an entry at least
/// this similar.
fn served_at(outcome: Option<Served>, threshold: f32) -> Option<Served> {
    outcome.filter(|served| served.similarity >= threshold - 1e-6)
}

fn progress(len: usize, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

/// Embeds the texts in batches on the blocking pool, with a progress bar.
async fn embed_all(embedder: &Arc<dyn Embedder>, texts: Vec<String>) -> Result<Vec<Vec<f32>>, EmbedError> {
    let embedder = Arc::clone(embedder);
    tokio::task::spawn_blocking(move || {
        let bar = progress(texts.len(), "embedding");
        let mut vectors = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(BATCH) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            vectors.extend(embedder.embed(&refs)?);
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(vectors)
    })
    .await
    .map_err(|err| EmbedError::Task(err.to_string()))?
}

fn answer() -> Answer {
    Answer {
        completion: Bytes::from_static(b"{}"),
        model: "eval".to_owned(),
        usage: Usage::default(),
        upstream_latency: Duration::ZERO,
    }
}

fn key(tenant: TenantId, prompt: &str) -> RequestKey {
    let fingerprint = Fingerprint(Digest32::of("semcache/eval", &[b"context"]));
    RequestKey::new(tenant, fingerprint, prompt.to_owned())
}

/// Looks each query up as the server would (exact layer, then by meaning) at `threshold`,
/// with and without the verifier. `item_of` maps an entry id to the stored item's number.
fn look_up_all(
    cache: &Cache,
    queries: &[(RequestKey, Vec<f32>)],
    item_of: &HashMap<u64, usize>,
    threshold: f32,
) -> Outcomes {
    let bar = progress(queries.len(), "looking up");
    let mut outcomes = Outcomes {
        plain: Vec::with_capacity(queries.len()),
        verified: Vec::with_capacity(queries.len()),
    };
    for (key, embedding) in queries {
        for verify in [false, true] {
            let criteria = Criteria {
                threshold,
                context_threshold: threshold,
                max_age: None,
                verify,
                judge: None,
            };
            let hit = match cache.lookup_exact(key, &criteria) {
                Some(hit) => Some(hit),
                None => match cache.lookup_embedded(key, embedding.clone(), &criteria) {
                    Lookup::Hit(hit) => Some(hit),
                    Lookup::Miss(_) => None,
                },
            };
            let served = hit.map(|hit| Served {
                item: item_of[&hit.entry.id],
                similarity: hit.similarity,
            });
            if verify {
                outcomes.verified.push(served);
            } else {
                outcomes.plain.push(served);
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    outcomes
}

/// One threshold's result on labelled pairs.
#[derive(Debug, Clone, Serialize)]
pub struct PairsRow {
    pub threshold: f32,
    /// Duplicates served (correct hits).
    pub duplicates_served: usize,
    /// Non-duplicates served (wrong hits).
    pub non_duplicates_served: usize,
    /// Share of duplicates served.
    pub recall: f64,
    /// Share of non-duplicates served.
    pub false_hit_rate: f64,
    /// Share of hits that were duplicates; 1 when nothing was served.
    pub precision: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PairsReport {
    pub pairs: usize,
    pub duplicates: usize,
    pub non_duplicates: usize,
    /// The threshold alone.
    pub plain: Vec<PairsRow>,
    /// The threshold, then the hit verifier (the server's default).
    pub verified: Vec<PairsRow>,
}

fn ratio(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

impl PairsReport {
    /// The rows at `threshold`, without and with verification.
    pub fn at(&self, threshold: f32) -> Option<(&PairsRow, &PairsRow)> {
        let find = |rows: &'_ [PairsRow]| {
            rows.iter()
                .position(|row| same_threshold(row.threshold, threshold))
        };
        let i = find(&self.plain)?;
        Some((&self.plain[i], &self.verified[find(&self.verified)?]))
    }
}

/// Stores each pair's first question and asks its second, each pair in a partition of its
/// own, so a question can only be answered by its partner.
pub async fn eval_pairs(
    embedder: &Arc<dyn Embedder>,
    pairs: &[Pair],
    grid: &Grid,
) -> Result<PairsReport, EmbedError> {
    let texts = pairs
        .iter()
        .flat_map(|pair| [pair.a.clone(), pair.b.clone()])
        .collect();
    let mut vectors = embed_all(embedder, texts).await?.into_iter();
    let cache = Cache::new(Arc::clone(embedder), crate::cache::Config::default());
    let mut item_of = HashMap::new();
    let mut queries = Vec::with_capacity(pairs.len());
    for (i, pair) in pairs.iter().enumerate() {
        let tenant = TenantId(Digest32::of("semcache/eval/pair", &[&(i as u64).to_le_bytes()]));
        let (a, b) = (vectors.next(), vectors.next());
        let entry = cache.insert(&key(tenant, &pair.a), a, answer(), None).await;
        item_of.insert(entry.id, i);
        queries.push((key(tenant, &pair.b), b.expect("two vectors per pair")));
    }
    let outcomes = look_up_all(&cache, &queries, &item_of, grid.lowest());

    let duplicates = pairs.iter().filter(|pair| pair.duplicate).count();
    let non_duplicates = pairs.len() - duplicates;
    let rows = |verified: bool| {
        grid.thresholds()
            .map(|threshold| {
                let (mut good, mut bad) = (0, 0);
                for (pair, outcome) in pairs.iter().zip(outcomes.of(verified)) {
                    if served_at(*outcome, threshold).is_some() {
                        if pair.duplicate {
                            good += 1;
                        } else {
                            bad += 1;
                        }
                    }
                }
                PairsRow {
                    threshold,
                    duplicates_served: good,
                    non_duplicates_served: bad,
                    recall: ratio(good, duplicates),
                    false_hit_rate: ratio(bad, non_duplicates),
                    precision: if good + bad == 0 {
                        1.0
                    } else {
                        ratio(good, good + bad)
                    },
                }
            })
            .collect()
    };
    Ok(PairsReport {
        pairs: pairs.len(),
        duplicates,
        non_duplicates,
        plain: rows(false),
        verified: rows(true),
    })
}

/// One threshold's result on intent-labelled queries.
#[derive(Debug, Clone, Serialize)]
pub struct IntentsRow {
    pub threshold: f32,
    pub hits: usize,
    /// Hits whose stored query has another intent: wrong answers.
    pub wrong: usize,
    /// Share of test queries answered from the cache.
    pub hit_rate: f64,
    /// Share of hits that were wrong.
    pub wrong_share: f64,
    /// Share of test queries answered correctly from the cache.
    pub correct_rate: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct IntentsReport {
    pub stored: usize,
    pub asked: usize,
    pub plain: Vec<IntentsRow>,
    pub verified: Vec<IntentsRow>,
}

/// Stores one entry per training query, all in one tenant and context as one application's
/// cache would be, then asks each test query.
pub async fn eval_intents(
    embedder: &Arc<dyn Embedder>,
    train: &[Intent],
    test: &[Intent],
    grid: &Grid,
) -> Result<IntentsReport, EmbedError> {
    let texts = train
        .iter()
        .chain(test)
        .map(|intent| intent.text.clone())
        .collect();
    let mut vectors = embed_all(embedder, texts).await?.into_iter();
    let cache = Cache::new(Arc::clone(embedder), crate::cache::Config::default());
    let tenant = TenantId(Digest32::of("semcache/eval/intents", &[]));
    let mut item_of = HashMap::new();
    for (i, stored) in train.iter().enumerate() {
        let entry = cache
            .insert(&key(tenant, &stored.text), vectors.next(), answer(), None)
            .await;
        item_of.insert(entry.id, i);
    }
    let queries: Vec<_> = test
        .iter()
        .zip(vectors)
        .map(|(asked, vector)| (key(tenant, &asked.text), vector))
        .collect();
    let outcomes = look_up_all(&cache, &queries, &item_of, grid.lowest());

    let rows = |verified: bool| {
        grid.thresholds()
            .map(|threshold| {
                let (mut hits, mut wrong) = (0, 0);
                for (asked, outcome) in test.iter().zip(outcomes.of(verified)) {
                    if let Some(served) = served_at(*outcome, threshold) {
                        hits += 1;
                        if train[served.item].category != asked.category {
                            wrong += 1;
                        }
                    }
                }
                IntentsRow {
                    threshold,
                    hits,
                    wrong,
                    hit_rate: ratio(hits, test.len()),
                    wrong_share: ratio(wrong, hits),
                    correct_rate: ratio(hits - wrong, test.len()),
                }
            })
            .collect()
    };
    Ok(IntentsReport {
        stored: train.len(),
        asked: test.len(),
        plain: rows(false),
        verified: rows(true),
    })
}

/// The lowest threshold whose false-hit rate is at most `max_false_hit_rate`.
pub fn recommend(rows: &[PairsRow], max_false_hit_rate: f64) -> Option<&PairsRow> {
    rows.iter().find(|row| row.false_hit_rate <= max_false_hit_rate)
}

/// Whether two grid thresholds are the same one.
fn same_threshold(a: f32, b: f32) -> bool {
    (a - b).abs() < 1e-4
}

/// Markdown bold around the serving threshold's row.
fn bold_at(threshold: f32, default: f32) -> &'static str {
    if same_threshold(threshold, default) {
        "**"
    } else {
        ""
    }
}

fn percent(value: f64) -> String {
    format!("{:.1}%", value * 100.0)
}

/// A Markdown table of both variants, one row per threshold, the `default` row in bold.
pub fn pairs_table(report: &PairsReport, default: f32) -> String {
    let mut out = String::from(
        "| threshold | recall | false hits | precision | recall, verified | false hits, verified | precision, verified |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (plain, verified) in report.plain.iter().zip(&report.verified) {
        let mark = bold_at(plain.threshold, default);
        out.push_str(&format!(
            "| {mark}{:.2}{mark} | {} | {} | {} | {} | {} | {} |\n",
            plain.threshold,
            percent(plain.recall),
            percent(plain.false_hit_rate),
            percent(plain.precision),
            percent(verified.recall),
            percent(verified.false_hit_rate),
            percent(verified.precision),
        ));
    }
    out
}

/// What the verifier does at `threshold`: duplicate hits kept, non-duplicate hits removed.
pub fn verifier_summary(report: &PairsReport, threshold: f32) -> Option<String> {
    let (plain, verified) = report.at(threshold)?;
    Some(format!(
        "At {threshold:.2}, the verifier keeps {} of the duplicate hits ({} of {}) and removes {} of the non-duplicate hits ({} of {}).",
        percent(ratio(verified.duplicates_served, plain.duplicates_served)),
        verified.duplicates_served,
        plain.duplicates_served,
        percent(ratio(
            plain.non_duplicates_served - verified.non_duplicates_served.min(plain.non_duplicates_served),
            plain.non_duplicates_served
        )),
        plain.non_duplicates_served - verified.non_duplicates_served.min(plain.non_duplicates_served),
        plain.non_duplicates_served,
    ))
}

pub fn intents_table(report: &IntentsReport, default: f32) -> String {
    let mut out = String::from(
        "| threshold | hit rate | wrong among hits | hit rate, verified | wrong among hits, verified |\n\
         |---|---|---|---|---|\n",
    );
    for (plain, verified) in report.plain.iter().zip(&report.verified) {
        let mark = bold_at(plain.threshold, default);
        out.push_str(&format!(
            "| {mark}{:.2}{mark} | {} | {} | {} | {} |\n",
            plain.threshold,
            percent(plain.hit_rate),
            percent(plain.wrong_share),
            percent(verified.hit_rate),
            percent(verified.wrong_share),
        ));
    }
    out
}

/// A row of a threshold table: its threshold.
trait AtThreshold {
    fn threshold(&self) -> f32;
}

impl AtThreshold for PairsRow {
    fn threshold(&self) -> f32 {
        self.threshold
    }
}

impl AtThreshold for IntentsRow {
    fn threshold(&self) -> f32 {
        self.threshold
    }
}

/// A measure of a threshold's row, and its label.
type Measure<'a, R> = (&'a str, fn(&R) -> f64);

/// Two measures against the threshold, each by the threshold alone (dashed) and verified:
/// the first in blue, the second in red.
fn verified_and_plain<R: AtThreshold>(
    plain: &[R],
    verified: &[R],
    measures: [Measure<'_, R>; 2],
) -> Vec<Series> {
    let colors = [
        plotters::style::RGBColor(31, 119, 180),
        plotters::style::RGBColor(214, 39, 40),
    ];
    let curve = |rows: &[R], f: fn(&R) -> f64| rows.iter().map(|row| (row.threshold(), f(row))).collect();
    measures
        .into_iter()
        .zip(colors)
        .flat_map(|((label, f), color)| {
            [
                Series {
                    label: format!("{label}, threshold alone (dashed)"),
                    color,
                    dashed: true,
                    points: curve(plain, f),
                },
                Series {
                    label: format!("{label}, verified"),
                    color,
                    dashed: false,
                    points: curve(verified, f),
                },
            ]
        })
        .collect()
}

/// Recall and false-hit rate against the threshold, without and with verification.
pub fn pairs_series(report: &PairsReport) -> Vec<Series> {
    verified_and_plain(
        &report.plain,
        &report.verified,
        [
            ("duplicates served", |r| r.recall),
            ("non-duplicates served", |r| r.false_hit_rate),
        ],
    )
}

/// Hit rate and wrong share among hits against the threshold, without and with verification.
pub fn intents_series(report: &IntentsReport) -> Vec<Series> {
    verified_and_plain(
        &report.plain,
        &report.verified,
        [
            ("hit rate", |r| r.hit_rate),
            ("wrong among hits", |r| r.wrong_share),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_is_exact_and_includes_the_default() {
        let grid = Grid::parse("0.70:0.98:0.02").unwrap().with(0.85);
        let thresholds: Vec<f32> = grid.thresholds().collect();
        assert_eq!(thresholds.first(), Some(&0.70));
        assert_eq!(thresholds.last(), Some(&0.98));
        assert!(thresholds.contains(&0.82));
        assert!(thresholds.contains(&0.85));
        assert_eq!(thresholds.len(), 16);
        assert!(Grid::parse("0.9:0.8:0.01").is_err());
        assert!(Grid::parse("0.7:0.9").is_err());
        assert!(Grid::parse("0.7:1.5:0.1").is_err());
    }

    #[test]
    fn recommends_the_lowest_threshold_under_the_rate() {
        let row = |threshold, false_hit_rate| PairsRow {
            threshold,
            duplicates_served: 0,
            non_duplicates_served: 0,
            recall: 0.0,
            false_hit_rate,
            precision: 1.0,
        };
        let rows = [row(0.8, 0.2), row(0.85, 0.06), row(0.9, 0.04), row(0.95, 0.01)];
        assert_eq!(recommend(&rows, 0.05).unwrap().threshold, 0.9);
        assert_eq!(recommend(&rows, 0.5).unwrap().threshold, 0.8);
        assert!(recommend(&rows, 0.001).is_none());
    }
}

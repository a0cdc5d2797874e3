//! Conversations: pairs of chats labelled by whether the answer stored for one may be served
//! to the other, in six kinds (three that should hit, three traps). Each side goes through the
//! chat completions protocol exactly as a request would (`ChatRequest::parse`, `cache_input`),
//! so what decides the outcome is what the server keys on: the context fingerprint and the
//! last user message.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::judged::serve_all;
use super::{
    answer, bold_at, embed_all, look_up_all, percent, ratio, same_threshold, served_at, verified_and_plain,
    AtThreshold, Grid, JudgedRow, Series,
};
use crate::cache::{Cache, Digest32, Fingerprint, RequestKey, TenantId};
use crate::context::{self, Context};
use crate::embed::cosine;
use crate::embed::{Embedder, Error as EmbedError};
use crate::judge::{self, Judge, Question};
use crate::openai::ChatRequest;

/// What a pair tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Should hit: the same conversation in other words.
    Reworded,
    /// Should hit: history that does not bear on the request (small talk, a settled topic).
    IrrelevantHistory,
    /// Should hit: extra chatter around the same request.
    ExtraChatter,
    /// Trap: the same last message after another subject.
    ContextSwap,
    /// Trap: one detail of an earlier turn differs (a date, amount, product, account…).
    DetailSwap,
    /// Trap: the intent flips in an earlier turn ("don't cancel, just pause").
    IntentFlip,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Reworded,
        Kind::IrrelevantHistory,
        Kind::ExtraChatter,
        Kind::ContextSwap,
        Kind::DetailSwap,
        Kind::IntentFlip,
    ];

    pub fn should_hit(self) -> bool {
        matches!(
            self,
            Kind::Reworded | Kind::IrrelevantHistory | Kind::ExtraChatter
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Reworded => "reworded",
            Kind::IrrelevantHistory => "irrelevant_history",
            Kind::ExtraChatter => "extra_chatter",
            Kind::ContextSwap => "context_swap",
            Kind::DetailSwap => "detail_swap",
            Kind::IntentFlip => "intent_flip",
        }
    }
}

/// Two chats: the answer to `stored` is in the cache, `asked` comes in.
#[derive(Debug, Clone, Deserialize)]
pub struct ConversationPair {
    pub id: String,
    pub kind: Kind,
    pub should_hit: bool,
    #[serde(default)]
    pub domain: String,
    #[serde(default)]
    pub note: String,
    /// OpenAI chat messages, ending with the request's user message.
    pub stored: Vec<serde_json::Value>,
    pub asked: Vec<serde_json::Value>,
}

impl ConversationPair {
    /// The chat completion request a client would send for one side.
    fn request(messages: &[serde_json::Value]) -> serde_json::Value {
        serde_json::json!({"model": "gpt-4o-mini", "messages": messages})
    }
}

/// Reads JSONL conversation pairs, checking each: its label agrees with its kind, and both
/// sides are chat requests the server would cache.
pub fn read_conversations(path: &Path) -> anyhow::Result<Vec<ConversationPair>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read conversation pairs from {}", path.display()))?;
    let mut pairs = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
    {
        let at = || format!("{}:{}", path.display(), n + 1);
        let pair: ConversationPair = serde_json::from_str(line).with_context(|| {
            format!(
                "{}: expected {{\"id\", \"kind\", \"should_hit\", \"stored\": [messages], \"asked\": [messages]}}",
                at()
            )
        })?;
        anyhow::ensure!(
            pair.should_hit == pair.kind.should_hit(),
            "{}: kind {} says should_hit is {}",
            at(),
            pair.kind.name(),
            pair.kind.should_hit()
        );
        for (side, messages) in [("stored", &pair.stored), ("asked", &pair.asked)] {
            let body = serde_json::to_vec(&ConversationPair::request(messages))?;
            let request = ChatRequest::parse(&body)
                .map_err(|invalid| anyhow::anyhow!("{}: {side}: {}", at(), invalid.message))?;
            anyhow::ensure!(
                request.cache_input().is_some(),
                "{}: {side} is not a request the cache keys",
                at()
            );
        }
        pairs.push(pair);
    }
    anyhow::ensure!(
        !pairs.is_empty(),
        "{} holds no conversation pairs",
        path.display()
    );
    Ok(pairs)
}

/// One threshold's result on conversation pairs.
#[derive(Debug, Clone, Serialize)]
pub struct ConversationsRow {
    pub threshold: f32,
    /// Pairs that should hit and were served.
    pub should_hit_served: usize,
    /// Traps served (wrong answers).
    pub traps_served: usize,
    pub should_hit_rate: f64,
    pub trap_rate: f64,
    /// Pairs served, per kind.
    pub served_by_kind: BTreeMap<&'static str, usize>,
    /// Semantic mode: asked sides that another pair's stored side, of the same bot (model,
    /// system prompt, tools and parameters), would have answered had their own partner not been
    /// there. A cache holds many conversations: this is how often one would get another's
    /// answer (an upper bound: two pairs may ask the same thing).
    pub others_served: Option<usize>,
    pub others_rate: Option<f64>,
}

impl AtThreshold for ConversationsRow {
    fn threshold(&self) -> f32 {
        self.threshold
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ConversationsReport {
    pub pairs: usize,
    pub should_hit: usize,
    pub traps: usize,
    /// Pairs of each kind.
    pub by_kind: BTreeMap<&'static str, usize>,
    /// How the context was compared: `exact` (as the server keys chats) or `semantic` (the
    /// conversation matcher, `crate::context`).
    pub context: &'static str,
    pub plain: Vec<ConversationsRow>,
    pub verified: Vec<ConversationsRow>,
}

/// Stores each pair's `stored` side and asks its `asked` side, each pair under a tenant of its
/// own (so only its partner can answer it), keyed as the server keys chat requests.
pub async fn eval_conversations(
    embedder: &Arc<dyn Embedder>,
    pairs: &[ConversationPair],
    grid: &Grid,
) -> Result<ConversationsReport, EmbedError> {
    let (cache, queries, item_of) = exact_cache(embedder, pairs).await?;
    let outcomes = look_up_all(&cache, &queries, &item_of, grid.lowest());
    Ok(report_of(pairs, grid, &outcomes, None, "exact"))
}

/// Entries for queries, as the stored sides are and the asked sides look them up (keyed as
/// the server keys chat requests), and the pair each entry id is.
type Loaded = (Cache, Vec<(RequestKey, Vec<f32>)>, HashMap<u64, usize>);

async fn exact_cache(embedder: &Arc<dyn Embedder>, pairs: &[ConversationPair]) -> Result<Loaded, EmbedError> {
    let key_of = |i: usize, messages: &[serde_json::Value]| {
        let body = serde_json::to_vec(&ConversationPair::request(messages)).expect("JSON");
        let input = ChatRequest::parse(&body)
            .ok()
            .and_then(|request| request.cache_input())
            .expect("read_conversations checked every side");
        let tenant = TenantId(Digest32::of(
            "semcache/eval/conversation",
            &[&(i as u64).to_le_bytes()],
        ));
        RequestKey::new(tenant, input.fingerprint, input.prompt)
    };
    let keys: Vec<(RequestKey, RequestKey)> = pairs
        .iter()
        .enumerate()
        .map(|(i, pair)| (key_of(i, &pair.stored), key_of(i, &pair.asked)))
        .collect();
    let texts = keys
        .iter()
        .flat_map(|(stored, asked)| [stored.prompt.clone(), asked.prompt.clone()])
        .collect();
    let mut vectors = embed_all(embedder, texts).await?.into_iter();
    let cache = Cache::new(Arc::clone(embedder), crate::cache::Config::default());
    let mut item_of = HashMap::new();
    let mut queries = Vec::with_capacity(pairs.len());
    for (i, (stored, asked)) in keys.into_iter().enumerate() {
        let (a, b) = (vectors.next(), vectors.next());
        let entry = cache.insert(&stored, a, answer(), None).await;
        item_of.insert(entry.id, i);
        queries.push((asked, b.expect("two vectors per pair")));
    }
    Ok((cache, queries, item_of))
}

/// The pairs through each judge (`None`: the verifier alone) at `threshold`: in exact mode
/// through the cache's lookup, in semantic mode through the conversation matcher, the judge
/// quoting both conversations.
pub async fn judge_conversations(
    embedder: &Arc<dyn Embedder>,
    pairs: &[ConversationPair],
    semantic: bool,
    threshold: f32,
    judges: &[Option<Judge>],
) -> Result<Vec<JudgedRow>, EmbedError> {
    let mut rows = Vec::with_capacity(judges.len());
    if !semantic {
        for judge in judges {
            let (cache, queries, item_of) = exact_cache(embedder, pairs).await?;
            let right = |query: usize, _item: usize| pairs[query].should_hit;
            rows.push(serve_all(&cache, &queries, &item_of, threshold, judge.as_ref(), &right).await);
        }
        return Ok(rows);
    }
    let sides: Vec<(usize, Side, Side)> = pairs
        .iter()
        .enumerate()
        .filter_map(|(i, pair)| Some((i, side_of(&pair.stored)?, side_of(&pair.asked)?)))
        .collect();
    let texts: Vec<String> = sides
        .iter()
        .flat_map(|(_, stored, asked)| [stored, asked].map(|side| side.analysed.context.compared_text()))
        .collect();
    let vectors = embed_all(embedder, texts).await?;
    for judge in judges {
        let mut row = JudgedRow::new(judge.as_ref(), pairs.len());
        for (n, (i, stored, asked)) in sides.iter().enumerate() {
            let similarity = cosine(&vectors[2 * n], &vectors[2 * n + 1]);
            if context::check(&stored.analysed, &asked.analysed).is_err() {
                continue;
            }
            let served = match judge {
                None => similarity >= threshold,
                Some(judge) if similarity >= judge.policy.floor => {
                    let (stored, asked) = (&stored.analysed.context, &asked.analysed.context);
                    let question = Question {
                        stored: judge::request_of("", Some(stored)),
                        stored_context: Some(stored),
                        asked: judge::request_of("", Some(asked)),
                        asked_context: Some(asked),
                    };
                    let ruling = judge.ask(&question, None).await;
                    row.count(&ruling);
                    ruling.approved()
                }
                Some(_) => false,
            };
            if served {
                row.hits += 1;
                row.wrong += usize::from(!pairs[*i].should_hit);
            }
        }
        rows.push(row.finish());
    }
    Ok(rows)
}

/// The per-threshold rows of pairs whose outcomes are known.
fn report_of(
    pairs: &[ConversationPair],
    grid: &Grid,
    outcomes: &super::Outcomes,
    others: Option<&Others>,
    context: &'static str,
) -> ConversationsReport {
    let should_hit = pairs.iter().filter(|pair| pair.should_hit).count();
    let traps = pairs.len() - should_hit;
    let rows = |verified: bool| {
        grid.thresholds()
            .map(|threshold| {
                let mut served_by_kind: BTreeMap<&'static str, usize> =
                    Kind::ALL.iter().map(|kind| (kind.name(), 0)).collect();
                for (pair, outcome) in pairs.iter().zip(outcomes.of(verified)) {
                    if served_at(*outcome, threshold).is_some() {
                        *served_by_kind.entry(pair.kind.name()).or_default() += 1;
                    }
                }
                let served = |hit: bool| -> usize {
                    Kind::ALL
                        .iter()
                        .filter(|kind| kind.should_hit() == hit)
                        .map(|kind| served_by_kind[kind.name()])
                        .sum()
                };
                let (good, bad) = (served(true), served(false));
                let others_served = others.map(|others| {
                    let best = if verified { &others.verified } else { &others.plain };
                    best.iter().filter(|s| s.is_some_and(|s| s >= threshold)).count()
                });
                ConversationsRow {
                    others_served,
                    others_rate: others_served.map(|n| ratio(n, pairs.len())),
                    threshold,
                    should_hit_served: good,
                    traps_served: bad,
                    should_hit_rate: ratio(good, should_hit),
                    trap_rate: ratio(bad, traps),
                    served_by_kind,
                }
            })
            .collect()
    };
    let mut by_kind: BTreeMap<&'static str, usize> = BTreeMap::new();
    for pair in pairs {
        *by_kind.entry(pair.kind.name()).or_default() += 1;
    }
    ConversationsReport {
        pairs: pairs.len(),
        should_hit,
        traps,
        by_kind,
        context,
        plain: rows(false),
        verified: rows(true),
    }
}

/// One side of a pair as the semantic matcher reads it, analysed, with what stays exact of it
/// (the partition it is looked up in).
fn side_of(messages: &[serde_json::Value]) -> Option<Side> {
    let body = serde_json::to_vec(&ConversationPair::request(messages)).ok()?;
    let request = ChatRequest::parse(&body).ok()?;
    let input = request.cache_input()?;
    let exact = input
        .conversation
        .as_ref()
        .map_or(input.fingerprint, |conversation| conversation.fingerprint);
    let context = Context::of(&request.earlier_turns()?, &input.prompt);
    Some(Side {
        exact,
        analysed: context.analysed(),
    })
}

/// One side of a pair: what stays exact of it, and its conversation analysed.
struct Side {
    exact: Fingerprint,
    analysed: context::Analysed,
}

/// For each asked side, the highest similarity at which another pair's stored side of the same
/// partition would answer it: by similarity alone, and passing the matcher.
struct Others {
    plain: Vec<Option<f32>>,
    verified: Vec<Option<f32>>,
}

/// The semantic matcher on each pair: its similarity is that of the compared texts (each
/// request with what it refers back to, `Context::compared_text`), the one text per request
/// that is embedded; verified, the pair must also pass `context::check` (the hit verifier on
/// the compared texts, contrasts over the user turns, turn by turn and as a whole, and
/// decisions). A pair whose history is not plain text would be matched exactly: it is not
/// served here.
pub async fn eval_conversations_semantic(
    embedder: &Arc<dyn Embedder>,
    pairs: &[ConversationPair],
    grid: &Grid,
) -> Result<ConversationsReport, EmbedError> {
    // Each readable pair's stored and asked sides, with the pair's index.
    let sides: Vec<(usize, Side, Side)> = pairs
        .iter()
        .enumerate()
        .filter_map(|(i, pair)| Some((i, side_of(&pair.stored)?, side_of(&pair.asked)?)))
        .collect();
    let texts: Vec<String> = sides
        .iter()
        .flat_map(|(_, stored, asked)| [stored, asked].map(|side| side.analysed.context.compared_text()))
        .collect();
    // The stored side of `sides[n]` has vector 2n, its asked side 2n + 1.
    let vectors = embed_all(embedder, texts).await?;
    let mut outcomes = super::Outcomes {
        plain: vec![None; pairs.len()],
        verified: vec![None; pairs.len()],
    };
    for (n, (i, stored, asked)) in sides.iter().enumerate() {
        let served = Some(super::Served {
            item: *i,
            similarity: cosine(&vectors[2 * n], &vectors[2 * n + 1]).min(1.0),
        });
        outcomes.plain[*i] = served;
        if context::check(&stored.analysed, &asked.analysed).is_ok() {
            outcomes.verified[*i] = served;
        }
    }
    let others = others_of(pairs.len(), &sides, &vectors);
    Ok(report_of(pairs, grid, &outcomes, Some(&others), "semantic"))
}

/// Each asked side against the stored sides of the other pairs in its partition; `vectors` as
/// in [`eval_conversations_semantic`].
fn others_of(pairs: usize, sides: &[(usize, Side, Side)], vectors: &[Vec<f32>]) -> Others {
    let mut others = Others {
        plain: vec![None; pairs],
        verified: vec![None; pairs],
    };
    for (n, (i, _, asked)) in sides.iter().enumerate() {
        let answers = sides
            .iter()
            .enumerate()
            .filter(|(m, (_, stored, _))| *m != n && stored.exact == asked.exact);
        for (m, (_, stored, _)) in answers {
            let similarity = cosine(&vectors[2 * m], &vectors[2 * n + 1]).min(1.0);
            let raise = |best: &mut Option<f32>| *best = Some(best.map_or(similarity, |b| b.max(similarity)));
            raise(&mut others.plain[*i]);
            if context::check(&stored.analysed, &asked.analysed).is_ok() {
                raise(&mut others.verified[*i]);
            }
        }
    }
    others
}

/// Should-hit pairs and traps served per threshold (verified, as the server serves by
/// default; the threshold alone in brackets), then each kind at `default`.
pub fn conversations_table(report: &ConversationsReport, default: f32) -> String {
    let others = report.verified.iter().any(|row| row.others_rate.is_some());
    let mut out = String::from(
        "| threshold | should-hit served | traps served | should-hit served, threshold alone | traps served, threshold alone |",
    );
    out.push_str(if others {
        " another pair's answer served | the same, threshold alone |\n|---|---|---|---|---|---|---|\n"
    } else {
        "\n|---|---|---|---|---|\n"
    });
    for (plain, verified) in report.plain.iter().zip(&report.verified) {
        let mark = bold_at(plain.threshold, default);
        out.push_str(&format!(
            "| {mark}{:.2}{mark} | {} | {} | {} | {} |",
            plain.threshold,
            percent(verified.should_hit_rate),
            percent(verified.trap_rate),
            percent(plain.should_hit_rate),
            percent(plain.trap_rate),
        ));
        if let (true, Some(verified), Some(plain)) = (others, verified.others_rate, plain.others_rate) {
            out.push_str(&format!(" {} | {} |", percent(verified), percent(plain)));
        }
        out.push('\n');
    }
    let at_default = report
        .verified
        .iter()
        .find(|row| same_threshold(row.threshold, default));
    if let Some(row) = at_default {
        out.push_str(&format!(
            "\nAt {default:.2}, verified, per kind:\n\n| kind | pairs | served |\n|---|---|---|\n"
        ));
        for kind in Kind::ALL {
            let pairs = report.by_kind.get(kind.name()).copied().unwrap_or(0);
            let served = row.served_by_kind.get(kind.name()).copied().unwrap_or(0);
            let label = if kind.should_hit() { "should hit" } else { "trap" };
            out.push_str(&format!(
                "| {} ({label}) | {pairs} | {} ({served}) |\n",
                kind.name(),
                percent(ratio(served, pairs))
            ));
        }
    }
    out
}

/// Should-hit and trap shares served against the threshold, without and with verification.
pub fn conversations_series(report: &ConversationsReport) -> Vec<Series> {
    verified_and_plain(
        &report.plain,
        &report.verified,
        [
            ("should-hit pairs served", |r| r.should_hit_rate),
            ("traps served", |r| r.trap_rate),
        ],
    )
}
